"""The lm-evaluation-harness model `flax_gpt2`: lm-eval's `loglikelihood`, `loglikelihood_rolling` and
`generate_until` computed by a flax_gpt2 model.

    import lm_eval, flax_gpt2.evaluation.lm_eval_model
    lm_eval.simple_evaluate(model="flax_gpt2", model_args="pretrained=PATH,dtype=float32", tasks=["hellaswag"])

It reproduces lm-eval's Hugging Face model (`HFLM`, `--model hf`) request by request: the same tokenization
(context and continuation encoded together, then split; trailing context spaces moved into the
continuation; an empty context replaced by `<|endoftext|>`), the same left truncation to the model's
window, the same rolling windows for perplexity, and the same greedy decoding, stop sequences (`until`,
plus `<|endoftext|>`) and `max_gen_toks` (default 256) for generation. tests/test_lm_eval.py checks every
value against `HFLM` on the same weights.

Shapes are bounded so XLA compiles a handful of programs, not one per request: every call holds
`batch_size` rows (a short last batch is padded with dummy rows), and the sequence length is rounded up
to a bucket (powers of two from 16 to 256, then multiples of 128, never beyond the model's window).
Generation runs flax_gpt2's compiled KV-cache decode loop, a chunk of tokens at a time, and stops as soon
as every row has produced EOS or one of its stop sequences. A model vocabulary padded past the
tokenizer's (50,304 for 50,257) is scored and decoded over the tokenizer's ids only (`limit_vocab`).

Needs the optional `[eval]` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2.checkpoints.loading import check_vocab, model_tokenizer
from flax_gpt2.checkpoints.pretrained import from_pretrained, resolve
from flax_gpt2.evaluation.lm_eval_registration import INSTALL_HINT, MODEL_NAME
from flax_gpt2.generation import generate_stream
from flax_gpt2.generation.logits_processors import limit_vocab
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.modeling.model import unwrap_params
from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL, Tokenizer, get_tokenizer
from flax_gpt2.utils.buckets import bucket_length
from flax_gpt2.utils.dtypes import DTYPES

try:
    # lm-eval's own model table first; see lm_eval_registration.register_lm_eval_model
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator
except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(f"flax_gpt2.evaluation.lm_eval_model needs lm-evaluation-harness, the optional "
                              f"[eval] extra: "
                              f"{INSTALL_HINT}", name="lm_eval") from e

logger = logging.getLogger(__name__)

# Generation settings lm-eval tasks pass that map onto flax_gpt2.generate; anything else is an error.
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def make_scorer(model, vocab_limit: int | None = None):
    """`score(params, inputs [B, T], targets [B, T]) -> (logprob [B, T], is_greedy [B, T])`: the log-probability
    of `targets[:, t]` after `inputs[:, :t + 1]`, and whether it is the argmax. Right padding needs no mask
    (causal attention); its positions are never read back. Log-softmax runs in float32.

    With `vocab_limit` (the tokenizer's vocab_size), the distribution is over those ids only, the one the
    generation side draws from (`limit_vocab`): a model vocabulary padded past the tokenizer's adds no mass."""

    @jax.jit
    def score(params, inputs, targets):
        logits = limit_vocab(model.apply({"params": params}, inputs).logits.astype(jnp.float32), vocab_limit)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        token_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return token_logprob, jnp.argmax(logits, axis=-1) == targets

    return score


def _int_arg(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


@register_model(MODEL_NAME)
class FlaxGPT2LM(TemplateLM):
    """lm-eval's `LM` interface over a flax_gpt2 model (see the module docstring).

    Args:
      pretrained: a hub id, a Hugging Face GPT-2 folder, or a flax_gpt2 training run (as `from_pretrained`).
        Leave it out when passing `model` and `params`.
      batch_size: rows per model call (lm-eval's `--batch_size`); `"auto"` is taken as 16 (each shape is
        compiled once, so probing batch sizes as HFLM does would cost a compilation each).
      dtype: compute dtype, "float32" (default), "bfloat16" or "float16" ("auto" is float32).
      max_length: the context window (default the model's `n_positions`).
      max_gen_toks: new tokens per `generate_until` request unless the task sets its own (default 256, as HFLM).
      model, params, tokenizer: an in-memory model instead of `pretrained` (tokenizer default: GPT-2's).
      seed: the sampling seed for tasks that sample (`do_sample=True`).
      adapter: a PEFT LoRA adapter folder for `pretrained`, merged on load (`from_pretrained(adapter=)`); HFLM's
        `peft=` is accepted as its alias, so the same model_args work for both.
      progress: show progress bars.
      max_batch_size, device: accepted because `simple_evaluate` passes them; unused (JAX picks the device).
    """

    def __init__(self, pretrained: str | os.PathLike | None = None, batch_size: int | str = 8,
                 dtype: str = "float32", max_length: int | None = None, max_gen_toks: int = 256, *,
                 model: Any = None, params: Any = None, tokenizer: Any = None, seed: int = 0,
                 adapter: str | os.PathLike | None = None, peft: str | os.PathLike | None = None,
                 progress: bool = True, max_batch_size: int | None = None, device: str | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(unknown))}; it takes pretrained, "
                            f"batch_size, dtype, max_length, max_gen_toks, seed, adapter (or peft)")
        del max_batch_size, device
        if isinstance(progress, str):
            progress = progress.lower() not in ("false", "0", "no")
        self.progress = bool(progress)
        dtype = "float32" if dtype in (None, "auto") else str(dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {dtype!r}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            logger.warning("batch_size=%s: %s compiles one program per shape, so it does not probe batch sizes; "
                           "using 16", batch_size, MODEL_NAME)
            batch_size = 16
        self._batch_size = _int_arg(batch_size, "batch_size")
        self._max_gen_toks = _int_arg(max_gen_toks, "max_gen_toks")
        self.seed = int(seed)
        self.pretrained = None if pretrained is None else os.fspath(pretrained)
        self.dtype_name = dtype
        if adapter is not None and peft is not None and os.fspath(adapter) != os.fspath(peft):
            raise ValueError(f"adapter={adapter!r} and peft={peft!r} name two adapters: pass one")
        adapter = adapter if adapter is not None else peft
        self.adapter = None if adapter in (None, "") else os.fspath(adapter)
        self.model, self.params, self.tokenizer = self._load(model, params, tokenizer)
        n_positions = self.model.config.n_positions
        self._max_length = n_positions if max_length is None else _int_arg(max_length, "max_length")
        if self._max_length > n_positions:
            raise ValueError(f"max_length={self._max_length} exceeds the model's n_positions={n_positions}")
        self._score = make_scorer(self.model, self.tokenizer.vocab_size)
        self._generations = 0

    def _load(self, model, params, tokenizer):

        if (model is None) != (params is None):
            raise ValueError("pass model and params together (or neither, with pretrained=PATH)")
        if model is None:
            if self.pretrained is None:
                raise ValueError(f"{MODEL_NAME} needs pretrained=PATH (a hub id, model folder or training run) in "
                                 f"model_args, or model= and params=")
            folder = resolve(self.pretrained, progress=self.progress)
            model, params = from_pretrained(folder, dtype=DTYPES[self.dtype_name], progress=self.progress,
                                            adapter=self.adapter)
            if tokenizer is None:
                tokenizer = model_tokenizer(folder)
        elif self.pretrained is not None:
            raise ValueError("pass pretrained=PATH or model= and params=, not both")
        elif self.adapter is not None:
            raise ValueError("adapter= goes with pretrained=PATH; with model= and params=, merge it yourself "
                             "(flax_gpt2.merge_adapter)")
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = get_tokenizer(None if tokenizer is None else os.fspath(tokenizer))
        check_vocab(model.config, tokenizer, self.pretrained)
        return model, unwrap_params(params), tokenizer

    # --- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def prefix_token_id(self) -> int:
        # GPT-2's BOS is its EOS, `<|endoftext|>`: the context of an empty prompt and of rolling windows.
        return self.tokenizer.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return str(jax.devices()[0])

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}__{(self.tokenizer.name_or_path or 'gpt2').replace('/', '__')}"

    def get_model_info(self) -> dict:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return {"model_num_parameters": n_params, "model_dtype": self.dtype_name,
                "model_revision": "", "model_sha": ""}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As HF's GPT-2 tokenizer: `<|endoftext|>` in the text is the special token; nothing is added."""

        ids = self.tokenizer.encode(string, allowed_special=USER_TEXT_SPECIAL)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring -----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`(sum of log p(continuation tokens), all of them greedy)` for `((context, continuation) | None,
        context_ids, continuation_ids)` requests, as HFLM: the last `max_length + 1` tokens of
        context + continuation are kept (the model reads all but the last)."""
        window = self.max_length
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            if len(continuation) > window:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's window "
                                 f"of {window}")
            whole = (list(context) + list(continuation))[-(window + 1):]
            rows.append((whole, len(continuation)))
        # Longest first (HFLM's order): batches hold similar lengths, so little padding is computed.
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i][0]) - 1 for i in chunk), cap=window)
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(chunk):
                whole = rows[i][0]
                inputs[r, :len(whole) - 1] = whole[:-1]
                targets[r, :len(whole) - 1] = whole[1:]
            logprob, greedy = (np.asarray(a) for a in self._score(self.params, inputs, targets))
            for r, i in enumerate(chunk):
                whole, n = rows[i]
                scored = slice(len(whole) - 1 - n, len(whole) - 1)
                answer = (float(logprob[r, scored].astype(np.float64).sum()), bool(greedy[r, scored].all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in lm-eval's disjoint rolling windows of `max_length` tokens, the
        first conditioned on `<|endoftext|>`, each later one on the tokens before it (as HFLM)."""
        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            pairs = lm_eval_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, when the task asks, sampled) continuations, cut at the first stop sequence."""
        def by_length(req):
            return -len(self.tok_encode(req[0])), req[0]

        collator = Collator([req.args for req in requests], sort_fn=by_length, group_by="gen_kwargs",
                            group_fn=lambda args: args[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            settings, until, max_gen_toks = _generation_settings(all_kwargs[0], self.max_gen_toks, eos)
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's window "
                                 f"of {self.max_length} tokens")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen_toks) or [self.eot_token_id]
                       for c in contexts]
            for context, gen_kwargs, text in zip(contexts, all_kwargs,
                                                 self._generate(prompts, until, max_gen_toks, settings)):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def _generate(self, prompts: list[list[int]], until: list[str], max_gen_toks: int, settings: GenerateOptions,
                  tokens_per_chunk: int = 16) -> list[str]:

        n, eot = len(prompts), self.eot_token_id
        longest = max(len(p) for p in prompts)
        # A fixed number of rows (dummy `<|endoftext|>` prompts fill a short batch), left-padded.
        ids = np.full((self.batch_size, longest), eot, np.int32)
        mask = np.zeros_like(ids)
        mask[n:, -1] = 1
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
        self._generations += 1
        new = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        options = settings.replace(max_new_tokens=max_gen_toks, eos_token_id=eot, pad_token_id=eot,
                                   seed=(self.seed + self._generations) % 2**32, vocab_limit=self.tokenizer.vocab_size)
        for tokens in generate_stream(self.model, self.params, ids, mask, options=options,
                                      tokens_per_chunk=tokens_per_chunk):
            for i in np.flatnonzero(~done):
                new[i].extend(int(t) for t in tokens[i])
                if eot in new[i]:
                    del new[i][new[i].index(eot):]
                    done[i] = True
                elif any(stop and stop in self.tok_decode(new[i]) for stop in until):
                    done[i] = True
            if done.all():  # every row has met a stop sequence or EOS: the rest would be cut off anyway
                break
        return [_cut_at_stop(self.tok_decode(row), until) for row in new]


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop sequence (lm-eval's post-processing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _generation_settings(gen_kwargs: dict, default_max_gen_toks: int, eos: str) -> tuple[dict, list[str], int]:
    """lm-eval's generation kwargs as `(generate settings, stop sequences, max_gen_toks)`, as HFLM reads them:
    `until` (a string or list; `<|endoftext|>` is added), `max_gen_toks` (or `max_new_tokens`, `max_tokens`,
    `max_completion_tokens`), `do_sample` (default: whether `temperature > 0`), `temperature`, `top_k`,
    `top_p`, `repetition_penalty`, `no_repeat_ngram_size`."""
    if not isinstance(gen_kwargs, dict):
        raise TypeError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        until = list(until)
    else:
        raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
    if eos not in until:
        until.append(eos)
    limits = [kwargs.pop(k, None) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")]
    max_gen_toks = _int_arg(next((v for v in limits if v is not None), default_max_gen_toks), "max_gen_toks")
    if "max_length" in kwargs:
        raise ValueError("generation kwarg 'max_length' is not supported; give max_gen_toks (new tokens) instead")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = kwargs.pop("do_sample", None)
    do_sample = temperature > 0.0 if do_sample is None else bool(do_sample)
    settings: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        settings["temperature"] = temperature if temperature > 0 else 1.0
    for key in _SAMPLING_KEYS[1:]:
        if key in kwargs:
            value = kwargs.pop(key)
            settings[key] = int(value) if key in ("top_k", "no_repeat_ngram_size") else float(value)
    if do_sample and "top_k" not in settings:
        settings["top_k"] = 50  # transformers' default for sampling, which HFLM inherits
    if kwargs:
        raise ValueError(f"unsupported generation kwargs for {MODEL_NAME}: {', '.join(sorted(kwargs))}")
    return GenerateOptions(**settings), until, max_gen_toks
