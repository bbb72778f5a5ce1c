"""Dropout in the train step: every micro-batch of an accumulated step draws its own masks, and the masks depend
only on the run's key, the step and the micro-batch, so a resumed run draws the ones it would have drawn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

VOCAB = 512  # a small vocabulary: quick to compile


@pytest.fixture(scope="module")
def setup():
    """(jitted train step, initial state, tokens [2 micro-batches, 2 rows, 17]) for the tiny model, dropout 0.1."""
    import flax.linen as nn

    import flax_gpt2
    from flax_gpt2.configs import base
    from flax_gpt2.train import step as step_lib

    config = flax_gpt2.GPT2Config.from_preset("tiny", vocab_size=VOCAB, resid_pdrop=0.1, embd_pdrop=0.1,
                                              attn_pdrop=0.1)
    model = flax_gpt2.GPT2LMHeadModel(config)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype), abstract)
    opt = base.get_config().optimizer
    opt.update(dict(lr=1e-3, warmup_steps=0, schedule="constant"))
    tx, schedule = step_lib.make_optimizer(opt, total_steps=10)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    tokens = rng.integers(0, VOCAB, (2, 2, 17)).astype(np.int32)
    return jax.jit(step_lib.make_train_step(model, tx, schedule)), state, tokens


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_micro_batch_draws_its_own_dropout_masks(setup):
    """Swapping the two micro-batches of a step changes its loss and update when (and only when) the masks of
    the first and second micro-batch differ: with one key for both, the sums would be equal bit for bit."""
    train_step, state, tokens = setup
    key = jax.random.key(1)
    a_state, a = train_step(state, tokens, key)
    b_state, b = train_step(state, tokens[::-1], key)
    assert float(a["loss"]) != float(b["loss"])
    assert not _same(a_state.params, b_state.params)
    # Each micro-batch's masks come from the step's key, not from the data: the same batch, the same masks.
    again_state, again = train_step(state, tokens, key)
    assert float(again["loss"]) == float(a["loss"]) and _same(again_state.params, a_state.params)


def test_dropout_masks_are_reproducible_on_resume_and_change_every_step(setup):
    """Three steps in a row equal two steps, a round trip of the state through the host (what a checkpoint
    keeps), then the third: the masks depend on the run's key and the step counter only."""
    train_step, state, tokens = setup
    key = jax.random.key(2)
    run, losses = state, []
    for _ in range(3):
        run, metrics = train_step(run, tokens, key)
        losses.append(float(metrics["loss"]))

    resumed = state
    for _ in range(2):
        resumed, _ = train_step(resumed, tokens, key)
    resumed = jax.tree.map(jnp.asarray, jax.device_get(resumed))  # saved, then restored
    resumed, metrics = train_step(resumed, tokens, key)
    assert float(metrics["loss"]) == losses[2]
    assert _same(resumed, run)

    # The step counter picks the masks: the same weights and batch at another step draw other masks.
    _, at_step_0 = train_step(state, tokens, key)
    _, at_step_7 = train_step(state.replace(step=jnp.int32(7)), tokens, key)
    assert float(at_step_0["loss"]) != float(at_step_7["loss"])
