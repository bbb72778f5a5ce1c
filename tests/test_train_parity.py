"""The first training steps equal a transformers PyTorch training loop from the same weights and batches:
AdamW with the same betas, eps, weight decay on the same parameters, clipping and schedule."""

import math

import ml_collections
import numpy as np
import pytest

STEPS = 4  # the first update has lr 0 (warmup); the next three move the weights


def test_train_steps_match_transformers(hf_tiny):
    import jax
    import torch
    import transformers

    import flax_gpt2
    from configs import base
    from train import mesh as mesh_lib, step as step_lib

    _, folder = hf_tiny
    opt = base.get_config().optimizer  # AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clipping at 1.0
    opt.update(dict(lr=1e-3, warmup_steps=1, decay_steps=6, min_lr_ratio=0.1, schedule="cosine"))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 50257, size=(4, 33)) for _ in range(STEPS)]

    # flax_gpt2: the sharded train step on a 1-device mesh, fp32, no dropout.
    model, params = flax_gpt2.from_pretrained(str(folder), progress=False)
    model = flax_gpt2.GPT2LMHeadModel(model.config.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    tx, schedule = step_lib.make_optimizer(opt, total_steps=6)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len=32)
    state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), 32, params=params)
    train_step = step_lib.jit_train_step(model, tx, schedule, shardings, mesh_lib.batch_sharding(mesh, rules))
    ours = []
    for tokens in batches:
        state, metrics = train_step(state, tokens[None].astype(np.int32), jax.random.key(0))
        ours.append(float(metrics["loss"]))

    # transformers: same weights, dropout off, AdamW with our decay mask as parameter groups.
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(folder, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                 attn_pdrop=0.0).train()
    named = dict(torch_model.named_parameters())  # the tied lm_head appears once, as wte
    decay = [p for n, p in named.items() if n.endswith(".weight") and ".ln_" not in n]
    no_decay = [p for n, p in named.items() if not (n.endswith(".weight") and ".ln_" not in n)]
    assert len(decay) == 2 + 4 * 2 and len(no_decay) == len(named) - len(decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)

    def lr_factor(step):  # optax.warmup_cosine_decay_schedule(0, lr, warmup, decay, lr * min_lr_ratio) / lr
        if step < opt.warmup_steps:
            return step / opt.warmup_steps
        progress = min(step - opt.warmup_steps, opt.decay_steps - opt.warmup_steps) / (
            opt.decay_steps - opt.warmup_steps)
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    theirs = []
    for tokens in batches:
        ids = torch.tensor(tokens)
        loss = torch_model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), opt.grad_clip)
        optimizer.step()
        scheduler.step()
        theirs.append(loss.item())

    assert [float(schedule(i)) for i in range(STEPS)] == pytest.approx(
        [opt.lr * lr_factor(i) for i in range(STEPS)], rel=1e-6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
