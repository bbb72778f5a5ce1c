"""GPT-2 as pure-functional Flax linen modules, numerically equal to Hugging Face's PyTorch GPT-2.

Shape alphabet (used in names, comments and einsum strings across flax_gpt2):
    B  batch                 T  query length (tokens fed in this call)
    S  key length (the KV cache's slots, or T without a cache)
    D  model width (n_embd)  H  attention heads    K  head dim (D // H)
    F  MLP width (n_inner)   V  vocabulary         C  choices (multiple-choice head)

Parameter names mirror Hugging Face's (`wte`, `h_0/attn/c_attn`, `ln_f`, ...) so the conversion table in
`flax_gpt2.checkpoints.hf_state_dict` stays a list of renames. Fused QKV is stored `[D, 3, H, K]` and the attention
output projection `[H, K, D]` so that tensor parallelism splits whole heads.

The block matmuls, `wte` and the output projection also take int8 weights (`modeling/quantize.py`'s
`Int8Weight`, dequantized inside the matmul through the `promote_dtype` / `dot_general` hooks of `nn.Dense`);
float weights run exactly as without the hooks.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`); activations are
constrained as (`batch`, `length`, `embed`). Mesh rules that map them to devices live in the training config.

Why one file: the network reads top to bottom here (embeddings, the block, the stack, the three heads), as
nanoGPT's model.py does; what can stand alone (attention backends, the KV cache, activations, the parameter
layouts) lives beside it in `modeling/`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flax_gpt2.modeling import attention as attention_lib
from flax_gpt2.modeling.activations import ACTIVATIONS
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.grad_barrier import grad_barrier
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.quantize import Embed, Int8Weight, dot_general, head_logits, promote_dtype

Array = jax.Array


@flax.struct.dataclass
class GPT2ModelOutput:
    last_hidden_state: Array  # [B, T, D], after ln_f
    hidden_states: tuple[Array, ...] | None = None  # n_layer + 1 entries, HF's order (last one after ln_f)
    cache: KVCache | None = None


@flax.struct.dataclass
class GPT2LMOutput:
    logits: Array  # [B, T, V], float32
    hidden_states: tuple[Array, ...] | None = None
    cache: KVCache | None = None


@flax.struct.dataclass
class GPT2DoubleHeadsOutput:
    logits: Array  # [B, C, T, V], float32
    mc_logits: Array  # [B, C], float32
    hidden_states: tuple[Array, ...] | None = None


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` that skips its sharding constraint while its value does not yet have
    the named rank: `nn.DenseGeneral` unboxes its kernel at the flattened 2-D init shape before reshaping
    it (flax issue #3676), which fails under a mesh + logical axis rules. The full-rank param is still
    constrained when the module reads it."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _partitioned(init, axes: tuple[str | None, ...]):
    return lambda *args, **kwargs: _LogicallyPartitioned(init(*args, **kwargs), axes)


def _normal(std: float, axes: tuple[str | None, ...]):
    return _partitioned(nn.initializers.normal(std), axes)


def _zeros(axes):
    return _partitioned(nn.initializers.zeros_init(), axes)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] like PyTorch, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype,
        use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)))


class Attention(nn.Module):
    """Causal multi-head self-attention with an optional KV cache (`config.attention` picks the kernel).

    `mask` `[B, 1, T, S]` is what every backend but splash reads; splash reads `segments` `[B, T]` (the
    documents' ids, padding its own: `GPT2Model`), or, when there are none, the mask's last query row.
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, mask: Array, segments: Array | None, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, deterministic: bool,
                 layer_idx) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        h, k_dim = cfg.n_head, cfg.head_dim
        qkv = nn.DenseGeneral(
            features=(3, h, k_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="c_attn",
            promote_dtype=promote_dtype, dot_general=dot_general,
            kernel_init=_normal(cfg.initializer_range, ("embed", None, "heads", "kv")),
            bias_init=_zeros((None, "heads", "kv")))(x)  # [B, T, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        new_kv = None
        if layer_cache is not None:
            # The cache is [B, H, S, K]: each head's keys are contiguous, so the attention dots over the
            # cache need no per-step transpose (a copy of the whole cache) before the matmul.
            cache_k, cache_v = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype),
                                             (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype),
                                             (0, 0, cache_index, 0))
            new_kv = (k, v)
            k, v = k.astype(cfg.dtype), v.astype(cfg.dtype)

        scale = k_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            # layer_idx is a Python int unrolled and a traced one under nn.scan; both give the same float32.
            scale = jnp.float32(scale) / (jnp.asarray(layer_idx, jnp.float32) + 1)
        if cfg.reorder_and_upcast_attn:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        dropout = not deterministic and cfg.attn_pdrop > 0
        backend = "xla" if layer_cache is not None else attention_lib.choose_backend(cfg.attention, q,
                                                                                     dropout=dropout)
        if dropout and backend != "xla":
            raise ValueError(f"attention={cfg.attention!r} has no attention dropout; set attn_pdrop=0 (or "
                             "model.dropout=0 in training) or use attention='xla'")
        if backend == "xla":
            drop = nn.Dropout(cfg.attn_pdrop)
            out = attention_lib.xla_attention(
                q, k, v, mask, scale, kv_axes="BHSK" if layer_cache is not None else "BSHK", probs_dtype=cfg.dtype,
                dropout=(lambda p: drop(p, deterministic=deterministic)) if dropout else None)
        elif backend == "dot_product":
            out = attention_lib.dot_product_attention(q, k, v, mask, scale)
        else:  # splash: causal + segments (without documents, the last query row of the mask is the padding mask
            # when S = T: padding and tokens are the two segments)
            out = attention_lib.splash_attention(q, k, v, mask[:, 0, -1, :] if segments is None else segments, scale)
        out = out.astype(cfg.dtype)

        out = nn.DenseGeneral(
            features=cfg.n_embd, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="c_proj",
            promote_dtype=promote_dtype, dot_general=dot_general,
            kernel_init=_normal(cfg.initializer_range / (2 * cfg.n_layer) ** 0.5, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)))(out)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, new_kv


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        x = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="c_fc",
                     promote_dtype=promote_dtype, dot_general=dot_general,
                     kernel_init=_normal(cfg.initializer_range, ("embed", "mlp")),
                     bias_init=_zeros(("mlp",)))(x)
        x = ACTIVATIONS[cfg.activation_function](x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = nn.Dense(cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="c_proj",
                     promote_dtype=promote_dtype, dot_general=dot_general,
                     kernel_init=_normal(cfg.initializer_range / (2 * cfg.n_layer) ** 0.5, ("mlp", "embed")),
                     bias_init=_zeros(("embed",)))(x)
        return nn.Dropout(cfg.resid_pdrop)(x, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    `layer_idx` is the block's depth (for `scale_attn_by_inverse_layer_idx`): an attribute when the
    blocks are unrolled, an argument (traced) under `nn.scan`.
    """

    config: GPT2Config
    layer_idx: int | None = None

    @nn.compact
    def __call__(self, x, mask, segments, layer_cache, cache_index, deterministic: bool, layer_idx=None):
        layer_idx = self.layer_idx if layer_idx is None else layer_idx
        attn_out, new_kv = Attention(self.config, name="attn")(
            _layer_norm(self.config, "ln_1")(x), mask, segments, layer_cache, cache_index, deterministic, layer_idx)
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x), deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if self.config.block_grad_barrier:
            x = grad_barrier(x)
        return x, new_kv


def _block_class(config: GPT2Config):
    # static_argnums counts `self`: (self, x, mask, segments, layer_cache, cache_index, deterministic, layer_idx).
    return nn.remat(Block, static_argnums=(6,)) if config.remat else Block


def _scanned_block(block: Block, x: Array, per_layer: tuple, mask: Array, segments: Array | None, cache_index,
                   deterministic: bool, output_hidden_states: bool):
    """The body of `nn.scan` over layers: carry the hidden state; per layer, its index and cache rows."""
    layer_idx, layer_cache = per_layer
    y, new_kv = block(x, mask, segments, layer_cache, cache_index, deterministic, layer_idx)
    return y, (new_kv, x if output_hidden_states else None)


def attention_mask_4d(attention_mask: Array | None, batch: int, length: int, key_length: int,
                      offset: Array | int, segment_ids: Array | None = None) -> Array:
    """Boolean `[B, 1, T, S]` mask: key s is visible to query t iff s <= offset + t, the key is not padding
    and (with `segment_ids [B, T]`, T = S) both are in the same segment."""
    q_pos = offset + jnp.arange(length)[:, None]
    visible = jnp.arange(key_length)[None, :] <= q_pos  # [T, S]
    visible = jnp.broadcast_to(visible[None, None], (batch, 1, length, key_length))
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return visible


def splash_segment_ids(segment_ids: Array, attention_mask: Array | None) -> Array:
    """`[B, T]` ids for the splash kernel, which knows segments, not padding: the documents' ids, with padding
    given an id no document of its row has (one below the row's smallest), so no token sees padding."""
    if attention_mask is None:
        return segment_ids
    padding_id = jnp.min(segment_ids, axis=1, keepdims=True) - 1
    return jnp.where(attention_mask.astype(bool), segment_ids, padding_id)


class GPT2Model(nn.Module):
    """The GPT-2 transformer: token + position embeddings, `n_layer` blocks, final LayerNorm.

    Call with `input_ids [B, T]`; optional `attention_mask` (1 = token, 0 = padding; `[B, T]`, or
    `[B, S]` covering every cache slot when a cache is given), `position_ids [B, T]` (default:
    consecutive from the cache index), `token_type_ids [B, T]` (embedded with `wte`, as HF does) and a
    `KVCache`. Returns `GPT2ModelOutput` (with the updated cache when one was given).

    `segment_ids [B, T]` (ints, keyword; not with a cache) packs several documents in a row: a token attends
    only to earlier tokens with its own id, so each document is computed as if alone, when its
    `position_ids` also restart at 0 where it starts. Every attention backend honours them.
    """

    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_normal(cfg.initializer_range, ("vocab", "embed")))
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            embedding_init=_normal(0.01, (None, "embed")))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        block = _block_class(cfg)
        if cfg.scan_layers:
            # One block whose params carry a leading `layers` axis (logical name "layers"), run by nn.scan.
            # Dropout keys are split per layer by the scan, so masks differ from the unrolled model's.
            self.h = block(cfg, name="h")
        else:
            self.h = [block(cfg, i, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, position_ids: Array | None = None,
                 token_type_ids: Array | None = None, cache: KVCache | None = None, *,
                 segment_ids: Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> GPT2ModelOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (document masking) cannot be combined with a KV cache: decoding "
                                 "continues one document; pass segment_ids=None when decoding")
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected {(b, t)} to match input_ids")
        offset = cache.index if cache is not None else 0
        s = cache.cache_length if cache is not None else t
        if attention_mask is not None and attention_mask.shape != (b, s):
            where = "the cache's slots" if cache is not None else "input_ids"
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(b, s)} to match {where}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(t)[None, :], (b, t))
        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.drop(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mask = attention_mask_4d(attention_mask, b, t, s, offset, segment_ids)
        segments = None if segment_ids is None else splash_segment_ids(segment_ids, attention_mask)

        if cfg.scan_layers:
            x, all_hidden, new_keys, new_values = self._scan_blocks(x, mask, segments, cache, deterministic,
                                                                    output_hidden_states)
        else:
            all_hidden, new_keys, new_values = [], [], []
            for i, block in enumerate(self.h):
                if output_hidden_states:
                    all_hidden.append(x)
                layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
                x, kv = block(x, mask, segments, layer_cache, offset, deterministic)
                if kv is not None:
                    new_keys.append(kv[0])
                    new_values.append(kv[1])
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden.append(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), index=cache.index + t)
        return GPT2ModelOutput(last_hidden_state=x, hidden_states=tuple(all_hidden) if output_hidden_states else None,
                               cache=new_cache)

    def _scan_blocks(self, x, mask, segments, cache, deterministic, output_hidden_states):
        """The blocks under `nn.scan`. The KV cache keeps its per-layer layout outside the model (decoding
        code reorders its rows), so it is stacked on the way in and split on the way out."""
        n = self.config.n_layer
        layer_cache = (jnp.stack(cache.keys), jnp.stack(cache.values)) if cache is not None else None
        scan = nn.scan(_scanned_block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, (new_kv, hidden) = scan(self.h, x, (jnp.arange(n), layer_cache), mask, segments,
                                   cache.index if cache is not None else 0, deterministic, output_hidden_states)
        all_hidden = [hidden[i] for i in range(n)] if output_hidden_states else []
        keys = [new_kv[0][i] for i in range(n)] if cache is not None else []
        values = [new_kv[1][i] for i in range(n)] if cache is not None else []
        return x, all_hidden, keys, values

    def attend(self, x: Array) -> Array:
        """Tied output projection: `[B, T, D] -> [B, T, V]` logits in float32."""
        return output_logits(x, self.wte.embedding, self.config.dtype, vocab_major=True)


def output_logits(hidden: Array, head: Array, dtype: Any, *, vocab_major: bool = False) -> Array:
    """Logits `[..., V]` in float32 from hidden states `[..., D]`: the one output projection that the model
    and the decoding loop both use. `head` is `[D, V]` (an `lm_head` kernel), or `[V, D]` with
    `vocab_major=True` (the tied `wte` embedding); both operands are cast to the compute `dtype`. An int8 `head`
    (`flax_gpt2.modeling.quantize.Int8Weight`) is dequantized inside the matmul."""
    if isinstance(head, Int8Weight):
        return head_logits(hidden, head, dtype, vocab_major=vocab_major)
    spec = "...D,VD->...V" if vocab_major else "...D,DV->...V"
    return jnp.einsum(spec, hidden.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied output projection (`tie_word_embeddings=False`); HF's `lm_head` (no bias)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kernel = self.param("kernel", _normal(cfg.initializer_range, ("embed", "vocab")),
                            (cfg.n_embd, cfg.vocab_size), cfg.param_dtype)
        return output_logits(x, kernel, cfg.dtype)


class _WithLMHead(nn.Module):
    """Shared by the LM and double-heads models: the transformer plus tied (or untied) output logits."""

    config: GPT2Config

    def setup(self):
        self.transformer = GPT2Model(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = LMHead(self.config)
        self.setup_heads()

    def setup_heads(self):
        pass

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.transformer.attend(hidden)
        return self.lm_head(hidden)


class GPT2LMHeadModel(_WithLMHead):
    """GPT-2 with the language-modelling head. Same inputs as `GPT2Model`; returns `GPT2LMOutput`
    whose `.logits` are `[B, T, V]` float32 (and `.cache` the updated KV cache when one was given)."""

    def __call__(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None, cache=None, *,
                 segment_ids=None, deterministic: bool = True, output_hidden_states: bool = False) -> GPT2LMOutput:
        out = self.transformer(input_ids, attention_mask, position_ids, token_type_ids, cache,
                               segment_ids=segment_ids, deterministic=deterministic,
                               output_hidden_states=output_hidden_states)
        return GPT2LMOutput(logits=self.logits(out.last_hidden_state), hidden_states=out.hidden_states,
                            cache=out.cache)


class SequenceSummary(nn.Module):
    """HF's `SequenceSummary` for the multiple-choice head: pick a vector per choice, project, activate.

    `summary_type` "last" / "first" / "mean" summarize each choice's sequence. (transformers 5.x applies
    those three to the 4-D [B, C, T, D] states as if they were [B, T, D], indexing the choices axis and
    returning [B, T] scores; the default "cls_index" is the same in both.)
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, hidden: Array, cls_index: Array | None, deterministic: bool) -> Array:
        cfg = self.config  # hidden: [B, C, T, D]; cls_index: [B, C]
        if cfg.summary_type == "last":
            x = hidden[..., -1, :]
        elif cfg.summary_type == "first":
            x = hidden[..., 0, :]
        elif cfg.summary_type == "mean":
            x = hidden.mean(axis=-2)
        else:  # cls_index; HF defaults to the last token
            if cls_index is None:
                cls_index = jnp.full(hidden.shape[:-2], hidden.shape[-2] - 1, jnp.int32)
            x = jnp.take_along_axis(hidden, cls_index[..., None, None], axis=-2)[..., 0, :]
        x = nn.Dropout(cfg.summary_first_dropout)(x, deterministic=deterministic)
        if cfg.summary_use_proj:
            # GPT2DoubleHeadsModel fixes num_labels = 1, so the projection is to 1 class or to D.
            num_classes = 1 if cfg.summary_proj_to_labels else cfg.n_embd
            x = nn.Dense(num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="summary",
                         kernel_init=_normal(cfg.initializer_range, ("embed", None)),
                         bias_init=_zeros((None,)))(x)
        if cfg.summary_activation is not None:
            x = ACTIVATIONS[cfg.summary_activation](x)
        return nn.Dropout(cfg.summary_last_dropout)(x, deterministic=deterministic)


class GPT2DoubleHeadsModel(_WithLMHead):
    """GPT-2 with the LM head and a multiple-choice head (HF's `GPT2DoubleHeadsModel`).

    `input_ids [B, C, T]`, `mc_token_ids [B, C]` (the token whose hidden state scores each choice;
    default the last). Returns `.logits [B, C, T, V]` and `.mc_logits [B, C]`.
    """

    def setup_heads(self):
        self.multiple_choice_head = SequenceSummary(self.config)

    def __call__(self, input_ids, mc_token_ids=None, attention_mask=None, position_ids=None, token_type_ids=None,
                 *, deterministic: bool = True, output_hidden_states: bool = False) -> GPT2DoubleHeadsOutput:
        if input_ids.ndim != 3:
            raise ValueError(f"input_ids must be [batch, choices, length], got shape {input_ids.shape}")
        lead = input_ids.shape[:2]
        flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
        out = self.transformer(flat(input_ids), flat(attention_mask), flat(position_ids), flat(token_type_ids),
                                  deterministic=deterministic, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state.reshape(*lead, *out.last_hidden_state.shape[1:])
        logits = self.logits(out.last_hidden_state)
        mc = self.multiple_choice_head(hidden, mc_token_ids, deterministic)
        return GPT2DoubleHeadsOutput(logits=logits.reshape(*lead, *logits.shape[1:]),
                                     mc_logits=mc[..., 0].astype(jnp.float32) if mc.shape[-1] == 1 else mc,
                                     hidden_states=out.hidden_states)


def unwrap_params(params: Any) -> Any:
    """The params, given either them or Flax's `{"params": ...}` variables (what `model.init` returns)."""
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def init_params(model: nn.Module, rng: Array, batch: int = 1, length: int = 8) -> dict[str, Any]:
    """Random parameters for `model` (unboxed from their logical-partitioning metadata)."""
    shape = (batch, 2, length) if isinstance(model, GPT2DoubleHeadsModel) else (batch, length)
    variables = jax.jit(model.init)(rng, jnp.zeros(shape, jnp.int32))
    return nn.unbox(variables["params"])
