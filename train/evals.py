"""What a run evaluates besides its loss: HellaSwag during training, CommonGen coverage and a sample at the end."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from flax_gpt2.evaluation import hellaswag
from flax_gpt2.generation import generate
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils import file_io

from . import commongen_eval, data


def hellaswag_evaluator(config, model, mesh, rules, params_sharding, eval_batch: int):
    """`params -> {"hellaswag_acc", "hellaswag_acc_norm"}` over `config.eval_hellaswag` (None if unset).

    The llm.c / build-nanogpt definition (flax_gpt2.evaluation.hellaswag): each ending scored by its mean token loss;
    the 4 * eval_batch rows of a call are split over the devices like a train batch.
    """
    if not config.eval_hellaswag:
        return None

    tokenizer = get_tokenizer(config.data.tokenizer or None, pass_folder_as=data.TOKENIZER_FLAG)
    examples = hellaswag.load(config.eval_hellaswag, tokenizer, limit=config.eval_hellaswag_limit)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(nn.logical_to_mesh_axes(("batch",), rules)[0],
                                                                        None))
    loss_fn = hellaswag.make_loss_fn(model, params_sharding, rows)

    def run(params) -> dict[str, float]:
        r = hellaswag.evaluate(params, examples, loss_fn, batch_size=eval_batch, context_length=model.config.n_positions)
        return {"hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"]}
    return run


def commongen_coverage(model, params, config, cut: int, workdir: str, writer, writer_step: int) -> dict:
    """Coverage of held-out CommonGen concept sets; appended to metrics.jsonl and printed."""

    params = jax.device_get(params)
    sets = commongen_eval.held_out_concept_sets(config.data, cut, config.coverage_sets)
    out = commongen_eval.commongen_coverage(model, params, config.data, sets,
                                            workdir if jax.process_index() == 0 else None)
    writer.write(writer_step, coverage=out["coverage"], coverage_sets=out["coverage_sets"])
    if jax.process_index() == 0:
        print(f"CommonGen coverage on {out['coverage_sets']} held-out concept sets: {out['coverage']:.3f}", flush=True)
        for row in out["samples"]:
            print(f"  {', '.join(row['concepts'])}: {row['sentence']}  (coverage {row['coverage']:.2f})", flush=True)
    return {"coverage": out["coverage"], "coverage_sets": out["coverage_sets"]}


def sample_after_training(model: GPT2LMHeadModel, params, config, workdir: str) -> str:
    """Samples `config.sample.max_new_tokens` after `config.sample.prompt`; writes `workdir/sample.txt`."""

    if jax.process_count() > 1:  # every host generates from a full local copy
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_put(params, jax.devices()[0] if jax.process_count() == 1 else jax.local_devices()[0])
    tokenizer = get_tokenizer(config.data.tokenizer or None, pass_folder_as=data.TOKENIZER_FLAG)
    prompt = np.asarray([tokenizer.encode(config.sample.prompt)], np.int32)
    max_new = min(config.sample.max_new_tokens, model.config.n_positions - prompt.shape[1])
    tokens = generate(model, params, prompt, max_new_tokens=max_new, do_sample=True,
                      temperature=config.sample.temperature, top_k=config.sample.top_k, seed=config.seed)
    text = tokenizer.decode(np.asarray(tokens[0]).tolist())
    if jax.process_index() == 0:
        file_io.atomic_write(file_io.join(workdir, "sample.txt"), text + "\n")
        print(f"--- sample ---\n{text}\n---", flush=True)
    return text
