"""The attention kernels behind `GPT2Config.attention`: the same math, three implementations.

- "xla": einsum scores, masked softmax in float32, einsum with V. Handles everything (KV-cache decoding,
  attention dropout, `reorder_and_upcast_attn`); the reference the others are tested against.
- "dot_product": `jax.nn.dot_product_attention`. On NVIDIA GPUs with bf16/fp16 inputs it runs cuDNN's
  flash attention (`implementation="cudnn"`); elsewhere XLA's own fused path.
- "splash": the Pallas splash-attention kernel for TPU (`jax.experimental.pallas.ops.tpu`), causal with
  padding (and documents, when the model is given `segment_ids`) expressed as segment ids; on other
  platforms it runs in Pallas interpret mode (tests only).
- "auto": "splash" on TPU v4 and later when the sequence tiles into 128-token blocks, "dot_product" on GPU, else
  "xla" — chosen from the platform the program is compiled for (the mesh's devices), never from the host.

A backend that cannot do something GPT-2 asks for refuses instead of quietly doing something else:
attention dropout in training (attn_pdrop > 0) is only implemented by "xla".

Shapes follow the model's alphabet: q `[B, T, H, K]`, k and v `[B, S, H, K]`, mask `[B, 1, T, S]` (True =
visible); the output is `[B, T, H, K]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
SPLASH_BLOCK = 128  # the TPU kernel's tile along the sequence


def target_device(x: Array):
    """The device (kind) the program tracing `x` is compiled for: that of the mesh `x` is sharded over (a
    TPU program compiled on a CPU host is a TPU's), else of the abstract mesh in context, else the first
    device. Has `.platform` and `.device_kind`."""
    device = getattr(getattr(jax.typeof(x).sharding, "mesh", None), "abstract_device", None)
    if device is None:
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device if device is not None else jax.devices()[0]


def target_platform(x: Array) -> str:
    """`target_device(x).platform`: "cpu", "gpu"/"cuda", "tpu"."""
    return target_device(x).platform


def choose_backend(requested: str, q: Array, *, dropout: bool) -> str:
    """The backend "auto" means for these inputs (others are returned as they are)."""
    if requested != "auto":
        return requested
    if dropout:
        return "xla"
    device = target_device(q)
    platform = device.platform
    # Splash's Mosaic kernel targets TPU v4 and later; v2/v3 keep the XLA path.
    if platform == "tpu" and q.shape[1] % SPLASH_BLOCK == 0 and not any(
            old in str(getattr(device, "device_kind", "")) for old in ("v2", "v3")):
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "dot_product"
    return "xla"


def xla_attention(q: Array, k: Array, v: Array, mask: Array, scale, *, kv_axes: str = "BSHK",
                  probs_dtype=None, dropout=None) -> Array:
    """Einsum attention; `kv_axes` "BHSK" reads a KV cache laid out heads-first without a transpose."""
    scores = jnp.einsum(f"BTHK,{kv_axes}->BHTS", q, k, preferred_element_type=jnp.float32) * scale
    # finfo.min (not -inf) as HF does: a fully masked row (a left-padding query) stays finite.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(probs_dtype or v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum(f"BHTS,{kv_axes}->BTHK", probs, v)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, scale) -> Array:
    """`jax.nn.dot_product_attention`, with cuDNN flash attention where the platform and dtype allow it."""
    implementation = None
    if target_platform(q) in ("gpu", "cuda") and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
        implementation = "cudnn"
    if v.dtype != q.dtype:  # reorder_and_upcast_attn upcasts q and k only; the kernel wants one dtype
        v = v.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, scale, *,
                     interpret: bool | None = None) -> Array:
    """Causal self-attention through the Pallas splash kernel (T = S, a multiple of 128).

    `segment_ids` `[B, T]` (ints): a token sees only earlier tokens with its own id. The model passes the
    attention mask (1 = token, 0 = padding), so a token never sees padding, or, for document masking, the
    documents' ids with padding given an id of its own. (A padding query sees other padding where "xla"
    would give it a uniform row: its output differs, and nothing reads it.)
    """
    # Pallas' TPU kernels are imported only when this backend runs: most models (and every CPU run but the
    # interpret-mode tests) never need them, and the import costs ~0.1 s (measured on this 2-core CPU).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, _ = q.shape
    if t % SPLASH_BLOCK:
        raise ValueError(f"attention='splash' needs the sequence length to be a multiple of {SPLASH_BLOCK}, got {t}")
    if interpret is None:
        interpret = target_platform(q) != "tpu"
    segments = (jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale
    v = v.astype(q.dtype)

    def local(q, k, v, segments):  # one device's rows and heads: [b, T, h, K]
        kernel = _splash_kernel(t, q.shape[2], interpret)
        to_hsk = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, T, h, K] -> [b, h, T, K]
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            to_hsk(q), to_hsk(k), to_hsk(v), segments)
        return jnp.swapaxes(out, 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segments)
    # A Pallas (Mosaic) kernel is not partitioned by XLA: run it per shard, batch and heads as the logical
    # axis rules in context place them (the sequence must not be split: causal attention needs all of it).
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"))
    spec = P(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segments)


def _splash_kernel(t: int, h: int, interpret: bool):
    # Made anew for each trace, never cached here: the kernel holds its mask's block tables as arrays made in the
    # trace that builds it, and a kernel kept across traces leaked them into the next (nn.scan over layers traces
    # the block more than once). The costly part, the mask's processing in numpy, is cached by Pallas itself.
    # imported here for the reason given in `splash_attention`
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as sk,
                                                                  splash_attention_mask as sm)

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
    block = min(SPLASH_BLOCK, t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
