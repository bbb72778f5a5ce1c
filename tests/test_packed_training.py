"""Training on packed windows with `data.document_mask` and `data.reset_positions` (train/packing.py): the ids
derived from `<|endoftext|>`, a step's loss equal to each document's loss computed alone, and a tiny run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_train_config

import flax_gpt2
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from flax_gpt2.train import config_checks, step as step_lib
from flax_gpt2.train.packing import GPT2_EOT, Packing

EOT = GPT2_EOT


def test_segments_and_positions_start_at_each_endoftext():
    inputs = jnp.asarray([[5, 6, EOT, 7, 8, 9, EOT, EOT, 4]])
    got = Packing(document_mask=True, reset_positions=True).model_inputs(inputs)
    np.testing.assert_array_equal(got["segment_ids"], [[0, 0, 1, 1, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(got["position_ids"], [[0, 1, 0, 1, 2, 3, 0, 0, 1]])
    assert Packing().model_inputs(inputs) == {}  # the default leaves the model's inputs alone
    assert set(Packing(reset_positions=True).model_inputs(inputs)) == {"position_ids"}


def _documents_row():
    """One window `[T+1]`: the tail of a document cut by the window, then three documents each starting with
    `<|endoftext|>`, and the `<|endoftext|>` that starts the next (a target only)."""
    rng = np.random.default_rng(3)
    pieces = [rng.integers(0, 1000, 6)] + [np.concatenate([[EOT], rng.integers(0, 1000, n)]) for n in (9, 4, 11)]
    return np.concatenate(pieces + [[EOT]]).astype(np.int32)  # 6 + 10 + 5 + 12 + 1 = T + 1 with T = 33


def test_the_step_loss_is_the_mean_of_the_documents_losses_alone():
    config = flax_gpt2.GPT2Config.from_preset("tiny", n_embd=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.key(0))
    row = _documents_row()
    tokens = jnp.asarray(row)[None]
    packed = float(jax.jit(step_lib.make_loss_fn(model, Packing(document_mask=True, reset_positions=True)))(
        params, tokens, jax.random.key(1)))

    # Each document alone: its inputs (from its <|endoftext|> on) predicting the next tokens, the
    # <|endoftext|> after it included; the step's mean is over every predicted token of the window.
    starts = [0] + [i for i in range(len(row) - 1) if row[i] == EOT] + [len(row) - 1]
    losses, counts = [], []
    for a, b in zip(starts[:-1], starts[1:]):
        logits = model.apply({"params": params}, jnp.asarray(row[a:b])[None]).logits
        losses.append(float(step_lib.cross_entropy(logits, jnp.asarray(row[a + 1:b + 1])[None])))
        counts.append(b - a)
    assert len(losses) == 4 and sum(counts) == len(row) - 1
    alone = float(np.dot(losses, counts) / sum(counts))
    assert abs(packed - alone) <= 1e-5
    # Without masking, the later documents see the earlier ones: the loss is another.
    unmasked = float(step_lib.make_loss_fn(model)(params, tokens, jax.random.key(1)))
    assert abs(unmasked - alone) > 1e-3


def test_packing_keys_must_be_booleans(tmp_path):
    config = tiny_train_config(tmp_path, **{"data.document_mask": None})  # ml_collections refuses other types
    with pytest.raises(config_checks.ConfigValueError, match=r"data\.document_mask=None: must be True or False"):
        config_checks.check_config(config)


def test_a_tiny_run_with_document_masking_trains(tmp_path):
    from flax_gpt2.train.train_loop import train_and_evaluate

    rng = np.random.default_rng(0)
    words = "the a king queen sword crown river night day speaks runs falls rises".split()
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 30)))}) + "\n"
                              for _ in range(400)))
    config = tiny_train_config(tmp_path / "cache", steps=3, eval_every=3, checkpoint_every=3, eval_batch_size=4, **{
        "data.source": str(source), "data.document_mask": True, "data.reset_positions": True})
    result = train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert result["step"] == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result["eval_loss"])
