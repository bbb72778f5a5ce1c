"""Hugging Face GPT-2 state dicts <-> flax_gpt2 parameter trees, through one rename table.

Every tensor in a Hugging Face (PyTorch) GPT-2 checkpoint is listed once in `RENAMES`, with its key,
our parameter path, and both shapes written in the shape alphabet of `flax_gpt2.modeling.model`, plus
`P` (n_positions) and `N` (outputs of the multiple-choice projection: 1, or D when
`summary_proj_to_labels=False`). HF's `Conv1D` already stores `[in, out]` like our Dense kernels, so
most renames are plain reshapes; only `nn.Linear` heads (`lm_head`, the multiple-choice `summary`)
are stored `[out, in]` and need a transpose.

Conversion is strict: a missing, unexpected or misshapen tensor is an error that names it and the
shape expected. Arrays here are numpy (dtype casting and device placement are the caller's).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.model import GPT2DoubleHeadsModel, GPT2LMHeadModel, GPT2Model

logger = logging.getLogger(__name__)

Params = dict[str, Any]


class Rename(NamedTuple):
    hf: str  # HF key below the `transformer.` prefix (heads sit at the top level); "{i}" is the layer
    ours: str  # our parameter path, "/"-separated
    hf_shape: str  # e.g. "D,3D"
    our_shape: str  # e.g. "D,3,H,K": the same elements, reshaped (after the transpose, if any)
    transpose: bool = False  # nn.Linear stores [out, in]
    scope: str = "transformer"  # "transformer", "block" (once per layer), "lm_head" or "mc_head"


RENAMES: tuple[Rename, ...] = (
    Rename("wte.weight", "wte/embedding", "V,D", "V,D"),
    Rename("wpe.weight", "wpe/embedding", "P,D", "P,D"),
    Rename("h.{i}.ln_1.weight", "h_{i}/ln_1/scale", "D", "D", scope="block"),
    Rename("h.{i}.ln_1.bias", "h_{i}/ln_1/bias", "D", "D", scope="block"),
    # Fused QKV: HF's output axis is (q|k|v, head, head_dim) flattened, ours keeps the three axes.
    Rename("h.{i}.attn.c_attn.weight", "h_{i}/attn/c_attn/kernel", "D,3D", "D,3,H,K", scope="block"),
    Rename("h.{i}.attn.c_attn.bias", "h_{i}/attn/c_attn/bias", "3D", "3,H,K", scope="block"),
    # HF merges heads as (head, head_dim) before c_proj, so its input axis splits into [H, K].
    Rename("h.{i}.attn.c_proj.weight", "h_{i}/attn/c_proj/kernel", "D,D", "H,K,D", scope="block"),
    Rename("h.{i}.attn.c_proj.bias", "h_{i}/attn/c_proj/bias", "D", "D", scope="block"),
    Rename("h.{i}.ln_2.weight", "h_{i}/ln_2/scale", "D", "D", scope="block"),
    Rename("h.{i}.ln_2.bias", "h_{i}/ln_2/bias", "D", "D", scope="block"),
    Rename("h.{i}.mlp.c_fc.weight", "h_{i}/mlp/c_fc/kernel", "D,F", "D,F", scope="block"),
    Rename("h.{i}.mlp.c_fc.bias", "h_{i}/mlp/c_fc/bias", "F", "F", scope="block"),
    Rename("h.{i}.mlp.c_proj.weight", "h_{i}/mlp/c_proj/kernel", "F,D", "F,D", scope="block"),
    Rename("h.{i}.mlp.c_proj.bias", "h_{i}/mlp/c_proj/bias", "D", "D", scope="block"),
    Rename("ln_f.weight", "ln_f/scale", "D", "D"),
    Rename("ln_f.bias", "ln_f/bias", "D", "D"),
    Rename("lm_head.weight", "lm_head/kernel", "V,D", "D,V", transpose=True, scope="lm_head"),
    Rename("multiple_choice_head.summary.weight", "multiple_choice_head/summary/kernel", "N,D", "D,N",
           transpose=True, scope="mc_head"),
    Rename("multiple_choice_head.summary.bias", "multiple_choice_head/summary/bias", "N", "N", scope="mc_head"),
)

# Causal-mask buffers older transformers versions saved; we build the mask ourselves.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_HEAD_PREFIXES = ("lm_head.", "multiple_choice_head.")


class Entry(NamedTuple):
    """One tensor of a concrete model: its HF key, our path, and both shapes."""
    hf: str
    ours: str
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]
    transpose: bool
    scope: str


def _shape(spec: str, dims: Mapping[str, int]) -> tuple[int, ...]:
    """"D,3D" -> (D, 3 * D) and "D,3,H,K" -> (D, 3, H, K) for the dims of a config."""
    out = []
    for part in spec.split(","):
        if part.isdigit():
            out.append(int(part))
        else:
            factor, letter = part[:-1], part[-1]
            out.append((int(factor) if factor else 1) * dims[letter])
    return tuple(out)


def _dims(config: GPT2Config) -> dict[str, int]:
    n = 1 if config.summary_proj_to_labels else config.n_embd
    return dict(V=config.vocab_size, P=config.n_positions, D=config.n_embd, H=config.n_head, K=config.head_dim,
                F=config.mlp_dim, N=n)


def _has_transformer_prefix(model_class: type) -> bool:
    return model_class is not GPT2Model


def entries(config: GPT2Config, model_class: type = GPT2LMHeadModel) -> list[Entry]:
    """The tensors of `model_class(config)`, with HF keys without the `transformer.` prefix and our paths
    as they appear in that model's parameter tree."""
    if model_class not in (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel):
        raise ValueError(f"model_class must be GPT2Model, GPT2LMHeadModel or GPT2DoubleHeadsModel, got {model_class}")
    scopes = {"transformer", "block"}
    if model_class is not GPT2Model and not config.tie_word_embeddings:
        scopes.add("lm_head")
    if model_class is GPT2DoubleHeadsModel and config.summary_use_proj:
        scopes.add("mc_head")
    dims = _dims(config)
    out = []
    for r in RENAMES:
        if r.scope not in scopes:
            continue
        ours = r.ours
        if r.scope in ("transformer", "block") and _has_transformer_prefix(model_class):
            ours = "transformer/" + ours
        layers = range(config.n_layer) if r.scope == "block" else [None]
        for i in layers:
            out.append(Entry(r.hf.format(i=i), ours.format(i=i), _shape(r.hf_shape, dims), _shape(r.our_shape, dims),
                             r.transpose, r.scope))
    return out


def tensor_count(config: GPT2Config, model_class: type = GPT2LMHeadModel) -> int:
    """`len(entries(config, model_class))`, counted without listing them (a config may claim any n_layer)."""
    per_layer = sum(r.scope == "block" for r in RENAMES)
    once = len(entries(config.replace(n_layer=1), model_class)) - per_layer
    return once + per_layer * config.n_layer


def _layer_count_problem(keys: list[str], config: GPT2Config, pattern: str) -> str:
    """A line naming the mismatch when the config has more layers than `keys` hold blocks (matched by
    `pattern`, the layer its group 1); "" otherwise (extra or partial blocks are listed tensor by tensor).

    Checked before the per-tensor comparison, which lists ~12 tensors per layer of the config: a
    config.json claiming n_layer=10000000 over 2-layer weights would otherwise build 120M entries (~20 GB)
    before failing.
    """
    layers = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if config.n_layer <= len(layers):
        return ""
    have = f"{len(layers)} (blocks {min(layers)} to {max(layers)})" if layers else "none"
    return f"the config has n_layer={config.n_layer} but the weights hold {have}"


def expected_param_shapes(config: GPT2Config, model_class: type = GPT2LMHeadModel) -> dict[str, tuple[int, ...]]:
    """`{our "/"-joined param path: shape}` of `model_class(config)`."""
    return {e.ours: e.our_shape for e in entries(config, model_class)}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
    """`{"a/b": x}` -> `{"a": {"b": x}}`."""
    tree: Params = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _shape_problems(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Any], what: str,
                    missing_ok: frozenset[str] = frozenset(), name: Callable[[str], str] = str) -> list[str]:
    """Every missing, unexpected, misshapen or not floating-point tensor of `got`, one line per kind.

    Only shapes and dtypes are looked at: no tensor is read. `name(key)` is how a non-float key is named.
    """
    problems = []
    missing = [k for k in expected if k not in got and k not in missing_ok]
    unexpected = [k for k in got if k not in expected]
    misshapen = [k for k in expected if k in got and tuple(np.shape(got[k])) != expected[k]]
    # GPT-2's parameters are all floats: int weights would load as int parameters and compute garbage.
    not_float = [k for k in expected if k in got and not _is_floating(_dtype(got[k]))]
    if missing:
        problems.append(f"missing {what}: " + _join(f"{k} {list(expected[k])}" for k in missing))
    if unexpected:
        problems.append(f"unexpected {what}: " + _join(f"{k} {list(np.shape(got[k]))}" for k in unexpected))
    if misshapen:
        problems.append(f"misshapen {what}: " + _join(
            f"{k} has shape {list(np.shape(got[k]))}, expected {list(expected[k])}" for k in misshapen))
    if not_float:
        problems.append(f"{what} that are not floating point: " + _join(
            f"{name(k)} has dtype {_dtype(got[k]).name}" for k in not_float))
    return problems


def _dtype(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return dtype if isinstance(dtype, np.dtype) else np.asarray(x).dtype  # e.g. a torch tensor, or a list


def _is_floating(dtype: np.dtype) -> bool:
    """float16/32/64, bfloat16 and the other ml_dtypes floats (which numpy does not count as np.floating)."""
    return jnp.issubdtype(dtype, jnp.floating)


def _join(items, limit: int = 24) -> str:
    items = list(items)
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_params(params: Mapping[str, Any], config: GPT2Config, model_class: type = GPT2LMHeadModel) -> None:
    """Raises ValueError naming every missing, unexpected, misshapen or non-float parameter of `model_class(config)`.

    Stacked (`scan_layers`) trees are checked layer by layer."""
    params = layer_stacking.unstack_layers(params)
    flat = flatten(params)
    layer_problem = _layer_count_problem(list(flat), config, r"(?:transformer/)?h_(\d+)/")
    problems = [layer_problem] if layer_problem else _shape_problems(expected_param_shapes(config, model_class),
                                                                      flat, "parameters")
    if problems:
        raise ValueError(f"parameters do not fit {model_class.__name__} with this config:\n  " + "\n  ".join(problems))


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: GPT2Config,
                              model_class: type = GPT2LMHeadModel, *, seed: int = 0) -> Params:
    """Our parameter tree for `model_class(config)` from a Hugging Face GPT-2 state dict.

    Args:
      state_dict: `{HF key: array}` as saved by transformers' GPT2Model, GPT2LMHeadModel or
        GPT2DoubleHeadsModel (keys with or without the `transformer.` prefix).
      config: the model's config; every tensor's shape is checked against it.
      model_class: GPT2Model, GPT2LMHeadModel or GPT2DoubleHeadsModel.
      seed: seeds the multiple-choice head when the checkpoint has none (see below).

    Returns:
      The nested params dict (numpy arrays in the checkpoint's dtype) for `model.apply({"params": ...})`.

    Heads the checkpoint has but `model_class` lacks are dropped with a log note (a double-heads
    checkpoint into an LM model, or an LM checkpoint into GPT2Model). A multiple-choice head that
    `GPT2DoubleHeadsModel` needs but the checkpoint lacks is initialized randomly, as transformers does,
    with a warning naming its keys: that head must be trained before use. The tied `lm_head.weight`
    some checkpoints carry is ignored when `tie_word_embeddings=True`. Anything else missing,
    unexpected, misshapen or not floating point is a ValueError that names it (and the file it came
    from, when `state_dict` is a `formats.StateDict`).

    Tensors are read (`np.asarray`) only after every key, shape and dtype has been checked, and only
    the ones the model uses: the unused tensors of a lazily read checkpoint are never read.
    """
    source = getattr(state_dict, "source", None)
    normalized: dict[str, Any] = {}
    original: dict[str, str] = {}  # short key -> the checkpoint's key
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"checkpoint{_in(source)} has a non-string key {key!r}")
        short = key.removeprefix("transformer.")
        if short in normalized:
            raise ValueError(f"checkpoint{_in(source)} has {short!r} both with and without the 'transformer.' "
                             "prefix")
        if not _IGNORED.match(short):
            normalized[short], original[short] = value, key

    layer_problem = _layer_count_problem(list(normalized), config, r"h\.(\d+)\.")
    if layer_problem:
        raise ValueError(f"checkpoint{_in(source)} does not fit {model_class.__name__} with this config: "
                         f"{layer_problem}")
    table = {e.hf: e for e in entries(config, model_class)}
    dropped = sorted(k for k in normalized if k.startswith(_HEAD_PREFIXES) and k not in table)
    for key in dropped:
        del normalized[key]
    # A tied checkpoint may still carry lm_head.weight (a copy of wte); only note heads we really drop.
    noted = [k for k in dropped if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if noted:
        logger.info("%s has no head for checkpoint tensors %s; they were not loaded", model_class.__name__, noted)

    mc_missing = frozenset(k for k, e in table.items() if e.scope == "mc_head" and k not in normalized)
    problems = _shape_problems({k: e.hf_shape for k, e in table.items()}, normalized, "checkpoint tensors",
                               missing_ok=mc_missing, name=lambda k: _located(state_dict, original[k]))
    if problems:
        raise ValueError(f"checkpoint{_in(source)} does not fit {model_class.__name__} with this config "
                         f"(n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
                         f"n_positions={config.n_positions}, tie_word_embeddings={config.tie_word_embeddings}):"
                         "\n  " + "\n  ".join(problems))

    flat = {}
    for key, e in table.items():
        if key in mc_missing:
            continue
        x = np.asarray(normalized[key])
        flat[e.ours] = (x.T if e.transpose else x).reshape(e.our_shape)
    if mc_missing:
        rng = np.random.default_rng(seed)
        for key in sorted(mc_missing):
            e = table[key]
            # The model's own initializers: normal(initializer_range) kernel, zero bias.
            flat[e.ours] = (rng.normal(0.0, config.initializer_range, e.our_shape) if e.ours.endswith("kernel")
                            else np.zeros(e.our_shape)).astype(np.float32)
        warnings.warn(f"checkpoint has no multiple-choice head; {sorted(mc_missing)} initialized randomly "
                      "(train the head before using mc_logits)", stacklevel=2)
    return unflatten(flat)


def _in(source: str | None) -> str:
    return f" {source}" if source else ""


def _located(state_dict: Mapping[str, Any], key: str) -> str:
    """`key`, and the shard that holds it when that is not the file the error already names."""
    file_of = getattr(state_dict, "file_of", None)
    if file_of is None or file_of(key) == getattr(state_dict, "source", None):
        return key
    return f"{key} (in {file_of(key)})"


def infer_model_class(params: Mapping[str, Any]) -> type:
    """GPT2Model, GPT2LMHeadModel or GPT2DoubleHeadsModel, from the top level of a parameter tree."""
    if "transformer" not in params:
        return GPT2Model
    return GPT2DoubleHeadsModel if "multiple_choice_head" in params else GPT2LMHeadModel


def hf_state_dict_from_params(params: Mapping[str, Any], config: GPT2Config,
                              model_class: type | None = None) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (numpy, contiguous) for our parameter tree.

    Keys are as transformers saves them: with the `transformer.` prefix for GPT2LMHeadModel and
    GPT2DoubleHeadsModel, without for GPT2Model; a tied `lm_head.weight` is not written.
    `model_class` defaults to the one the tree's top level implies.
    """
    model_class = model_class or infer_model_class(params)
    params = layer_stacking.unstack_layers(params)  # the rename table speaks per layer
    check_params(params, config, model_class)
    flat = flatten(params)
    prefix = "transformer." if _has_transformer_prefix(model_class) else ""
    out = {}
    for e in entries(config, model_class):
        x = np.asarray(flat[e.ours])
        if e.transpose:
            x = x.reshape(e.hf_shape[::-1]).T
        key = prefix + e.hf if e.scope in ("transformer", "block") else e.hf
        out[key] = np.ascontiguousarray(x.reshape(e.hf_shape))
    return out
