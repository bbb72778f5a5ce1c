"""Every learning-rate schedule with warmup equals transformers' `get_*_schedule_with_warmup` at every step
of a short run, the first (lr 0) and the last included; and the optimizer applies that lr at that step
(AdamW against torch's AdamW driven by transformers' scheduler)."""

import numpy as np
import pytest

from flax_gpt2.configs import base
from flax_gpt2.train import step as step_lib

STEPS = 10
LR = 0.05


def _opt(schedule, warmup, **overrides):
    opt = base.get_config().optimizer
    opt.update({"schedule": schedule, "lr": LR, "warmup_steps": warmup, "decay_steps": 0, "grad_clip": 0.0,
                **overrides})
    return opt


def _reference(torch_opt, schedule, warmup, steps, min_lr_ratio):
    import transformers

    if schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(torch_opt, warmup)
    if schedule == "linear":
        return transformers.get_linear_schedule_with_warmup(torch_opt, warmup, steps)
    if min_lr_ratio == 0:
        return transformers.get_cosine_schedule_with_warmup(torch_opt, warmup, steps)
    return transformers.get_cosine_with_min_lr_schedule_with_warmup(torch_opt, warmup, steps,
                                                                    min_lr_rate=min_lr_ratio)


def _reference_lrs(schedule, warmup, steps, min_lr_ratio):
    import torch

    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = _reference(torch_opt, schedule, warmup, steps, min_lr_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        torch_opt.step()
        scheduler.step()
    return lrs


CASES = [("constant", 3, 0.1), ("constant", 1, 0.1), ("linear", 3, 0.1), ("linear", 1, 0.1),
         ("cosine", 3, 0.0), ("cosine", 3, 0.1), ("cosine", 1, 0.25)]


@pytest.mark.parametrize("schedule, warmup, min_lr_ratio", CASES, ids=lambda v: str(v))
def test_schedule_equals_transformers_at_every_step(schedule, warmup, min_lr_ratio):
    ours = step_lib.make_schedule(_opt(schedule, warmup, min_lr_ratio=min_lr_ratio), STEPS)
    reference = _reference_lrs(schedule, warmup, STEPS, min_lr_ratio)
    got = [float(ours(s)) for s in range(STEPS)]
    assert got[0] == 0.0 and reference[0] == 0.0  # the first step moves nothing
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-12)  # optax computes in float32


def test_cosine_with_shorter_decay_holds_its_end_value():
    """decay_steps < steps: the cosine (over decay_steps, warmup included, as optax's
    warmup_cosine_decay_schedule documents) ends at lr * min_lr_ratio and stays there."""
    decay = 7
    ours = step_lib.make_schedule(_opt("cosine", 2, min_lr_ratio=0.1, decay_steps=decay), STEPS)
    reference = _reference_lrs("cosine", 2, decay, 0.1) + [LR * 0.1] * (STEPS - decay)
    np.testing.assert_allclose([float(ours(s)) for s in range(STEPS)], reference, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_adamw_applies_the_schedules_lr_at_each_step(schedule):
    """Ten AdamW steps on fixed random gradients equal torch's AdamW stepped by transformers' scheduler:
    an lr read one step early or late (or a warmup that starts above 0) moves the parameters."""
    import jax
    import jax.numpy as jnp
    import torch

    warmup, min_lr_ratio = 3, 0.0
    opt = _opt(schedule, warmup, min_lr_ratio=min_lr_ratio)
    rng = np.random.default_rng(0)
    init = {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()} for _ in range(STEPS)]

    tx, _ = step_lib.make_optimizer(opt, STEPS)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ours = []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        ours.append(jax.tree.map(np.asarray, params))

    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    torch_opt = torch.optim.AdamW(
        [{"params": [torch_params["kernel"]], "weight_decay": opt.weight_decay},
         {"params": [torch_params["bias"]], "weight_decay": 0.0}],  # decay_mask: matrices only
        lr=LR, betas=(opt.b1, opt.b2), eps=opt.eps)
    scheduler = _reference(torch_opt, schedule, warmup, STEPS, min_lr_ratio)
    for i, g in enumerate(grads):
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(g[k])
        torch_opt.step()
        scheduler.step()
        for k, p in torch_params.items():
            np.testing.assert_allclose(ours[i][k], p.detach().numpy(), rtol=0, atol=2e-6, err_msg=f"step {i} {k}")
