"""GPT-2 model configuration: one frozen dataclass, named presets, and the Hugging Face `config.json` bridge."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from flax_gpt2.modeling.activations import ACTIVATIONS
from flax_gpt2.utils.validation import is_int, is_real

SUMMARY_TYPES = ("last", "first", "mean", "cls_index")

# HF config.json keys that do not change the math (bookkeeping, generation defaults, or ones we re-derive).
_HF_IGNORED_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "n_ctx", "use_cache", "task_specific_params", "id2label", "label2id", "_attn_implementation_autoset",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_return_dict",
    "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
    "is_decoder", "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "tokenizer_class", "prefix", "finetuning_task", "cross_attention_hidden_size",
    "pruned_heads", "gradient_checkpointing", "add_cross_attention", "num_labels",
    # generation defaults that older checkpoints keep in config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "diversity_penalty",
    "num_beam_groups", "tf_legacy_loss", "use_bfloat16",
})


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model; field names follow Hugging Face's `GPT2Config`.

    `dtype` is the compute dtype (e.g. `jnp.bfloat16`), `param_dtype` the storage dtype of the
    parameters; softmax and layer-norm statistics are always computed in float32.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # The multiple-choice head of GPT2DoubleHeadsModel (HF's SequenceSummary).
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    summary_last_dropout: float = 0.0
    # JAX-side settings, not part of HF's config.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each block in the backward pass (saves activation memory)
    # Run the blocks with `nn.scan` over params stacked on a leading `layers` axis (`transformer/h/...`):
    # one compiled block instead of n_layer, so compile time no longer grows with depth. Same numbers.
    scan_layers: bool = False
    # Full-sequence attention: "xla" (einsum + softmax), "dot_product" (`jax.nn.dot_product_attention`:
    # cuDNN flash attention on NVIDIA GPUs), "splash" (Pallas splash attention on TPU), or "auto" (by the
    # platform the program is compiled for). Decoding with a KV cache always uses "xla".
    attention: str = "auto"
    # Pass each block's output through `flax_gpt2.modeling.grad_barrier` (identity forward; its cotangent is stored,
    # not recomputed): ~1.5x faster backward passes on CPU, nothing to gain elsewhere. Reverse mode only.
    block_grad_barrier: bool = False

    def __post_init__(self):
        _check_fields(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_params(self) -> int:
        """Parameter count of GPT2LMHeadModel (tied embeddings counted once)."""
        d, f = self.n_embd, self.mlp_dim
        block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        n = self.vocab_size * d + self.n_positions * d + self.n_layer * block + 2 * d
        if not self.tie_word_embeddings:
            n += self.vocab_size * d
        return n

    def replace(self, **overrides) -> "GPT2Config":
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> "GPT2Config":
        """Builds a config from a Hugging Face GPT-2 `config.json` (a dict, the file, or its folder).

        Every field that changes the math is honoured; one that cannot be is an error naming it.
        """
        path = None
        if not isinstance(hf, Mapping):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            hf = read_hf_json(path)
        try:
            return cls(**{**_hf_kwargs(cls, dict(hf)), **overrides})
        except ValueError as e:
            if path is None:
                raise
            raise ValueError(f"{path}: {e}") from e

    def to_hf_config(self, architectures: tuple[str, ...] = ("GPT2LMHeadModel",)) -> dict[str, Any]:
        """The Hugging Face `config.json` dict for this config."""
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}
        hf.update(model_type="gpt2", architectures=list(architectures), n_ctx=self.n_positions,
                  use_cache=True, task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
        return hf


def read_hf_json(path: str) -> dict[str, Any]:
    """The JSON object in a `config.json`; ValueError naming the file if it is not one."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a config.json file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        hf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object of config fields")
    return hf


def _hf_kwargs(cls, hf: dict[str, Any]) -> dict[str, Any]:
    """GPT2Config keyword arguments from a Hugging Face config dict (values are checked by the config)."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json has model_type={model_type!r}; flax_gpt2 reads only 'gpt2' models")
    if hf.get("add_cross_attention") not in (None, False):
        raise ValueError(f"config field add_cross_attention={hf['add_cross_attention']!r} is not supported "
                         "(GPT-2 as a decoder with cross-attention); flax_gpt2 models are decoder-only")
    if hf.get("pruned_heads"):
        raise ValueError(f"config field pruned_heads={hf['pruned_heads']!r} is not supported")
    architectures = hf.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ValueError(f'architectures must be a list of class names such as ["GPT2LMHeadModel"], '
                         f"got {architectures!r}")
    aliases = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
               "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}
    for alias, name in aliases.items():
        if alias in hf and name not in hf:
            hf[name] = hf.pop(alias)
        else:
            hf.pop(alias, None)
    known = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
    unknown = sorted(set(hf) - known - _HF_IGNORED_KEYS)
    if unknown:
        # Fields we do not know cannot be silently dropped if they might change the math.
        raise ValueError(f"config.json has fields flax_gpt2 does not know: {unknown}")
    kwargs = {k: v for k, v in hf.items() if k in known}
    for tok in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs.get(tok), list):  # some configs list several; the first is the one generation uses
            if not kwargs[tok]:
                raise ValueError(f"{tok} is an empty list")
            kwargs[tok] = kwargs[tok][0]
        if kwargs.get(tok, 0) is None:  # "no such token" in HF; we keep GPT-2's
            del kwargs[tok]
    return kwargs


# --- field checks: every field's type and range, so a bad config.json fails here, naming the field ------

# How a model runs, not what its weights are: not in config.json, and free to change when loading a checkpoint.
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "remat", "scan_layers", "attention", "block_grad_barrier"})
ATTENTION_BACKENDS = ("auto", "xla", "dot_product", "splash")
_POSITIVE_INTS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_TOKEN_IDS = ("bos_token_id", "eos_token_id")
_BOOLS = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
          "tie_word_embeddings", "summary_use_proj", "summary_proj_to_labels", "remat", "scan_layers",
          "block_grad_barrier")
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "summary_last_dropout")


def _check_fields(config: GPT2Config) -> None:
    """ValueError naming the first field of `config` with a wrong type or an out-of-range value."""
    def bad(name: str, requirement: str):
        raise ValueError(f"{name} must be {requirement}, got {getattr(config, name)!r}")

    for name in _POSITIVE_INTS:
        if not is_int(getattr(config, name)) or getattr(config, name) <= 0:
            bad(name, "a positive integer")
    if config.n_inner is not None and (not is_int(config.n_inner) or config.n_inner <= 0):
        bad("n_inner", "null (4 * n_embd) or a positive integer")
    for name in _TOKEN_IDS:
        if not is_int(getattr(config, name)) or getattr(config, name) < 0:
            bad(name, "a token id (an integer >= 0)")
    for name in _BOOLS:
        if not isinstance(getattr(config, name), bool):
            bad(name, "true or false")
    for name in _DROPOUTS:
        if not (is_real(getattr(config, name)) and 0 <= getattr(config, name) < 1):
            bad(name, "a probability in [0, 1)")
    if not (is_real(config.layer_norm_epsilon) and config.layer_norm_epsilon > 0):
        bad("layer_norm_epsilon", "a finite number > 0")
    if not (is_real(config.initializer_range) and config.initializer_range >= 0):
        bad("initializer_range", "a finite number >= 0")
    if not isinstance(config.activation_function, str) or config.activation_function not in ACTIVATIONS:
        raise ValueError(f"activation_function={config.activation_function!r} is not supported; "
                         f"choose one of {sorted(ACTIVATIONS)}")
    if not isinstance(config.summary_type, str) or config.summary_type not in SUMMARY_TYPES:
        raise ValueError(f"summary_type={config.summary_type!r} is not supported; choose one of {SUMMARY_TYPES}")
    if config.summary_activation is not None and (not isinstance(config.summary_activation, str)
                                                  or config.summary_activation not in ACTIVATIONS):
        raise ValueError(f"summary_activation={config.summary_activation!r} is not supported; "
                         f"choose None or one of {sorted(ACTIVATIONS)}")
    for name in ("dtype", "param_dtype"):
        if not _is_float_dtype(getattr(config, name)):
            bad(name, "a floating-point dtype such as jnp.float32 or jnp.bfloat16")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if config.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={config.attention!r} is not supported; choose one of {ATTENTION_BACKENDS}")


def _is_float_dtype(dtype: Any) -> bool:
    if dtype is None:  # numpy would read None as float64
        return False
    try:
        return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except (TypeError, ValueError):
        return False


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
    # Seconds-fast model for tests and smoke runs; keeps the real vocabulary so the tokenizer fits.
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
}
