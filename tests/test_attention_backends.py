"""Every attention backend computes what "xla" (the einsum reference) computes, forward and backward, under
each of GPT-2's attention options and in float32 and bfloat16; "auto" picks by the target platform (faked
TPU and GPU targets through an abstract mesh). Splash runs in Pallas interpret mode on CPU: shapes stay tiny."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_gpt2
from flax_gpt2.modeling import attention
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params

T = 128  # splash tiles the sequence in 128-token blocks
# Options that change the scale (per layer, so two layers) and the dtype the scores are computed in.
SCALINGS = {
    "default": {},
    "unscaled_by_inverse_layer_idx": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
}
# bfloat16 has 8 bits of mantissa: the backends sum in other orders, so they agree to its rounding, not
# to float32's. A wrong scale, mask or dtype path moves the outputs by far more (tens of percent).
RELATIVE_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _random_params(model, seed=0):
    """Every parameter random (biases and LayerNorm affine too), so that no mix-up can hide."""
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _relative_diff(a, b) -> float:
    """max |a - b| / max |b| over all leaves together (the scale of the reference)."""
    a = [np.asarray(x, np.float32) for x in jax.tree.leaves(a)]
    b = [np.asarray(x, np.float32) for x in jax.tree.leaves(b)]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / max(float(np.max(np.abs(y))) for y in b)


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("reorder", [False, True], ids=["plain", "reorder_and_upcast"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["dot_product", "splash"])
def test_backend_equals_xla_forward_and_backward(backend, dtype, reorder, scaling):
    config = flax_gpt2.GPT2Config.from_preset("tiny", n_layer=2, attention="xla", dtype=getattr(jnp, dtype),
                                              reorder_and_upcast_attn=reorder, **SCALINGS[scaling])
    xla = GPT2LMHeadModel(config)
    other = GPT2LMHeadModel(config.replace(attention=backend))
    params = _random_params(xla)
    ids = jax.random.randint(jax.random.key(7), (2, T), 0, config.vocab_size)
    mask = jnp.ones((2, T), jnp.int32).at[0, :5].set(0)  # a left-padded row
    real = np.asarray(mask, bool)[:, :, None]  # padding queries' outputs are not compared (nothing reads them)

    def logits(model, p):
        return jnp.where(real, model.apply({"params": p}, ids, attention_mask=mask).logits.astype(jnp.float32), 0.0)

    def loss(model, p):
        return jnp.sum(logits(model, p) ** 2) / 1e4

    expected, got = logits(xla, params), logits(other, params)
    assert got.dtype == expected.dtype
    assert _relative_diff(got, expected) <= RELATIVE_TOL[dtype]
    grads = [jax.grad(lambda p, m=m: loss(m, p))(params) for m in (other, xla)]
    assert _relative_diff(*grads) <= RELATIVE_TOL[dtype]


def _fake_target(device_kind: str, platform: str):
    """An abstract mesh whose devices are `device_kind` on `platform`: what a program compiled for that
    hardware on this CPU host sees."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device))


@pytest.mark.parametrize("device_kind,platform,tiled,untiled", [
    ("TPU v2", "tpu", "xla", "xla"),
    ("TPU v3", "tpu", "xla", "xla"),  # Splash's Mosaic kernel targets v4 and later
    ("TPU v4", "tpu", "splash", "xla"),
    ("TPU v5 lite", "tpu", "splash", "xla"),  # v5e
    ("TPU v5p", "tpu", "splash", "xla"),
    ("NVIDIA H100 80GB HBM3", "gpu", "dot_product", "dot_product"),
    ("cpu", "cpu", "xla", "xla"),
])
def test_auto_choice_for_the_target(device_kind, platform, tiled, untiled):
    """"auto" at sequence lengths that tile into 128-token blocks (128, 384) and that do not (100, 130),
    eagerly and while tracing a program under the target's mesh; attention dropout always takes "xla"."""
    with _fake_target(device_kind, platform):
        for t, expected in ((128, tiled), (384, tiled), (100, untiled), (130, untiled)):
            q = jnp.zeros((1, t, 2, 8))
            assert attention.choose_backend("auto", q, dropout=False) == expected, t
            traced = []
            jax.jit(lambda x: traced.append(attention.choose_backend("auto", x, dropout=False)) or x)(q)
            assert traced == [expected], t
            assert attention.choose_backend("auto", q, dropout=True) == "xla"
            assert attention.choose_backend("dot_product", q, dropout=False) == "dot_product"


def test_auto_on_this_host_without_a_mesh_is_xla():
    q = jnp.zeros((1, T, 2, 8))
    assert jax.devices()[0].platform == "cpu" and attention.choose_backend("auto", q, dropout=False) == "xla"
