"""The first training steps equal a PyTorch training loop (transformers' GPT-2, torch AdamW) from the same weights
and batches: AdamW with the same betas, eps, weight decay on the same parameters, clipping, schedule and
gradient accumulation. Compared: losses, then every parameter and both Adam moments after the last step.

Also: which parameters `decay_mask` decays on the real parameter tree, rematerialization, and a bf16 step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

STEPS = 4  # the first update has lr 0 (warmup); the next three move the weights
ACCUM, MICRO, SEQ = 2, 2, 32  # each step: 2 micro-batches of 2 rows of 32 + 1 tokens


def _is_decayed_in_torch(name: str) -> bool:
    """torch parameter groups: decay matrices and embeddings (`*.weight` outside LayerNorm), not biases or LN."""
    return name.endswith(".weight") and ".ln_" not in name


def test_train_steps_match_torch_adamw_with_accumulation(hf_tiny_random):
    import torch
    import transformers

    import flax_gpt2
    from flax_gpt2.configs import base
    from flax_gpt2.checkpoints import hf_state_dict as weights
    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    _, folder = hf_tiny_random  # every parameter random: decaying a bias or a LayerNorm scale moves it
    opt = base.get_config().optimizer  # AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clipping at 1.0
    opt.update(dict(lr=1e-3, warmup_steps=1, decay_steps=6, min_lr_ratio=0.1, schedule="cosine"))
    assert opt.weight_decay > 0 and opt.grad_clip > 0
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 50257, size=(ACCUM, MICRO, SEQ + 1)) for _ in range(STEPS)]

    # flax_gpt2: the sharded train step on a 1-device mesh, fp32, no dropout.
    model, params = flax_gpt2.from_pretrained(str(folder), progress=False)
    model = flax_gpt2.GPT2LMHeadModel(model.config.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    tx, schedule = step_lib.make_optimizer(opt, total_steps=6)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len=SEQ)
    state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), SEQ, params=params)
    train_step = step_lib.jit_train_step(model, tx, schedule, shardings, mesh_lib.batch_sharding(mesh, rules))
    ours, our_norms = [], []
    for tokens in batches:
        state, metrics = train_step(state, tokens.astype(np.int32), jax.random.key(0))
        ours.append(float(metrics["loss"]))
        our_norms.append(float(metrics["grad_norm"]))
    assert int(state.step) == STEPS

    # transformers + torch AdamW: same weights, dropout off, decay only on matrices and embeddings.
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(folder, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                 attn_pdrop=0.0).train()
    named = dict(torch_model.named_parameters())  # the tied lm_head appears once, as wte
    decay = [p for n, p in named.items() if _is_decayed_in_torch(n)]
    no_decay = [p for n, p in named.items() if not _is_decayed_in_torch(n)]
    assert len(decay) == 2 + 4 * 2 and len(no_decay) == 2 + 8 * 2  # wte, wpe, 4 matrices / layer; the rest
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
    theirs, their_norms = [], []
    for tokens in batches:
        optimizer.zero_grad()
        total = 0.0
        for micro in tokens:  # accumulate: the mean over micro-batches of each one's mean loss
            ids = torch.tensor(micro)
            loss = torch_model(ids, labels=ids).loss / ACCUM
            loss.backward()
            total += loss.item()
        their_norms.append(float(torch.nn.utils.clip_grad_norm_(torch_model.parameters(), opt.grad_clip)))
        optimizer.step()
        scheduler.step()
        theirs.append(total)

    assert [float(schedule(i)) for i in range(STEPS)] == pytest.approx(
        [opt.lr * lr_factor(i) for i in range(STEPS)], rel=1e-6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the norm of the accumulated gradient, before clipping (and above the clip threshold, as early on)
    np.testing.assert_allclose(our_norms, their_norms, rtol=1e-4)
    assert min(their_norms) > opt.grad_clip

    # Every parameter and both Adam moments, mapped to transformers' names through the rename table.
    # Decaying a LayerNorm scale (~1) or a bias (~0.1) by mistake moves it by lr * wd * value summed over the
    # steps: ~3e-4 * value here; the two fp32 programs differ by at most ~4e-6.
    config = model.config
    d = config.n_embd
    by_name = lambda tree: weights.hf_state_dict_from_params(jax.device_get(tree), config)  # noqa: E731
    moments = zip_by_name(by_name(state.params), by_name(optax_moment(state.opt_state, "mu")),
                          by_name(optax_moment(state.opt_state, "nu")))
    for name, (p_ours, m_ours, v_ours) in moments.items():
        p = named[name]
        p_theirs = p.detach().numpy()
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds q . b_k to every score of a query: softmax cancels it, so its gradient is 0 up
            # to rounding, which Adam normalizes into updates of either sign. Compare queries and values only.
            p_ours, p_theirs = np.delete(p_ours, np.s_[d:2 * d]), np.delete(p_theirs, np.s_[d:2 * d])
        np.testing.assert_allclose(p_ours, p_theirs, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(m_ours, optimizer.state[p]["exp_avg"].numpy(), atol=1e-6, rtol=1e-3,
                                   err_msg=name)
        np.testing.assert_allclose(v_ours, optimizer.state[p]["exp_avg_sq"].numpy(), atol=1e-7, rtol=1e-3,
                                   err_msg=name)
    # and the weights did move by more than that
    _, start = flax_gpt2.from_pretrained(str(folder), progress=False)
    assert min(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params))) > 1e-4


def optax_moment(opt_state, name):
    """The one `name` ("mu" / "nu") parameter tree inside the optimizer state."""
    import optax

    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    assert len(found) == 1, found
    return found[0][1]


def zip_by_name(*dicts):
    assert all(d.keys() == dicts[0].keys() for d in dicts)
    return {k: tuple(d[k] for d in dicts) for k in dicts[0]}


def test_decay_mask_on_the_real_parameter_tree():
    """Decayed: every kernel and both embeddings (untied lm_head included), in both layer layouts.
    Not decayed: biases, LayerNorm scales and shifts. And the optimizer really decays exactly those."""
    import flax_gpt2
    from flax_gpt2.configs import base
    from flax_gpt2.modeling import layer_stacking
    from flax_gpt2.train import step as step_lib

    config = flax_gpt2.GPT2Config.from_preset("tiny", tie_word_embeddings=False)
    params = _random_params(flax_gpt2.GPT2LMHeadModel(config))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(step_lib.decay_mask(params))}
    decayed = sorted(k for k, v in flat.items() if v)
    expected = ["lm_head/kernel", "transformer/wpe/embedding", "transformer/wte/embedding"] + [
        f"transformer/h_{i}/{m}/kernel" for i in range(config.n_layer)
        for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
    assert decayed == sorted(expected)
    assert all(k.endswith(("/bias", "/scale")) for k, v in flat.items() if not v)
    assert len(flat) == 3 + 2 + config.n_layer * (4 + 4 + 2 + 2)  # embeddings, lm_head, ln_f; kernels, biases, LNs
    stacked = step_lib.decay_mask(layer_stacking.stack_layers(params))
    assert sum(jax.tree.leaves(stacked)) == 3 + 4  # stacked kernels: one leaf per module

    # The optimizer itself: with zero gradients only decayed entries change (by lr * wd * value).
    opt = base.get_config().optimizer
    opt.update(dict(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=0.0))
    tx, _ = step_lib.make_optimizer(opt, total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == step_lib.decay_mask(params)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -1e-2 * 0.5 * params["lm_head"]["kernel"], rtol=1e-5)


def _random_params(model, seed=0):
    """Every parameter random (biases and LayerNorm affine too), drawn with numpy in the shapes `init` makes."""
    import flax.linen as nn

    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def fill(path, a):
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + rng.normal(0, 0.1, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _tiny(**overrides):
    """The tiny preset with a 512-token vocabulary (fast to compile) and dropout on."""
    import flax_gpt2

    config = flax_gpt2.GPT2Config.from_preset("tiny", vocab_size=SMALL_VOCAB, resid_pdrop=0.1, embd_pdrop=0.1,
                                              attn_pdrop=0.1)
    return flax_gpt2.GPT2LMHeadModel(config.replace(**overrides))


SMALL_VOCAB = 512


def _rel_diff(a, b) -> float:
    """Relative L2 distance between two trees (as one vector)."""
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)) for x, y in
              zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in jax.tree.leaves(b))
    return math.sqrt(num / den)


def test_remat_gives_the_same_loss_and_gradients():
    """`remat=True` recomputes each block in the backward pass: the same loss and gradients as without, with
    dropout on (the recomputation must draw the same masks). (Remat under scan: test_scan_attention.)"""
    from flax_gpt2.train import step as step_lib

    params = _random_params(_tiny())
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, SMALL_VOCAB, (2, 17)), jnp.int32)
    loss_fns = [step_lib.make_loss_fn(_tiny(remat=remat)) for remat in (False, True)]
    jaxprs = [str(jax.make_jaxpr(f)(params, tokens, jax.random.key(3))) for f in loss_fns]
    assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]  # the blocks really are rematerialized
    plain, remat = (jax.jit(jax.value_and_grad(f)) for f in loss_fns)
    (loss_a, grads_a), (loss_b, grads_b) = plain(params, tokens, jax.random.key(3)), remat(params, tokens,
                                                                                           jax.random.key(3))
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-6)
    assert _rel_diff(grads_b, grads_a) <= 1e-6
    # while another dropout key gives other gradients
    assert _rel_diff(plain(params, tokens, jax.random.key(4))[1], grads_a) > 1e-2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_block_grad_barrier_changes_no_number(scan_layers):
    """The CPU train step stores each block's output cotangent (`block_grad_barrier`, a conditional in the
    backward pass): on for the CPU step, off in the model by default, and the same loss and gradients."""
    from flax_gpt2.modeling.grad_barrier import grad_barrier
    from flax_gpt2.train import step as step_lib

    model = _tiny(scan_layers=scan_layers)
    params = _random_params(_tiny())
    if scan_layers:
        from flax_gpt2.modeling import layer_stacking
        params = layer_stacking.to_layout(params, True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, SMALL_VOCAB, (2, 17)), jnp.int32)
    step_loss = step_lib.make_loss_fn(model)
    barrier = model.clone(config=model.config.replace(block_grad_barrier=True))

    def plain_loss(params, tokens, rng):
        logits = model.apply({"params": params}, tokens[:, :-1], deterministic=False, rngs={"dropout": rng}).logits
        return step_lib.cross_entropy(logits, tokens[:, 1:])

    assert model.config.block_grad_barrier is False
    jaxprs = [str(jax.make_jaxpr(jax.grad(f))(params, tokens, jax.random.key(3))) for f in (plain_loss, step_loss)]
    assert " cond[" not in jaxprs[0] and jaxprs[1].count(" cond[") == (1 if scan_layers else 2)
    (loss_a, grads_a), (loss_b, grads_b) = (jax.jit(jax.value_and_grad(f))(params, tokens, jax.random.key(3))
                                            for f in (plain_loss, step_loss))
    assert float(loss_a) == float(loss_b)
    assert _rel_diff(grads_b, grads_a) <= 1e-6
    # identity forward; a NaN cotangent stays NaN
    x = jnp.arange(6.0).reshape(2, 3)
    assert (grad_barrier(x) == x).all() and (barrier.config.block_grad_barrier is True)
    assert bool(jnp.isnan(jax.grad(lambda v: grad_barrier(v).sum() * jnp.nan)(x)).all())


# One bf16-compute train step (fp32 master weights) against the fp32 step, same weights and batch: loss within
# 0.1%, gradient norm within 1%, and the parameter updates within 20% (relative L2; Adam turns the sign of
# each tiny gradient into a full-size step, so a rounding-level gradient difference can flip an entry's step).
# Measured: 4e-5, 0.06% and 11%.
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL, BF16_UPDATE_RTOL = 1e-3, 1e-2, 0.2


def test_bf16_train_step_is_finite_and_close_to_fp32():
    from flax_gpt2.configs import base
    from flax_gpt2.train import step as step_lib

    params = _random_params(_tiny())
    opt = base.get_config().optimizer
    opt.update(dict(warmup_steps=0, schedule="constant", lr=1e-3))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, SMALL_VOCAB, (2, 2, 33)), jnp.int32)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = _tiny(dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        tx, schedule = step_lib.make_optimizer(opt, total_steps=10)
        state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        state, metrics = jax.jit(step_lib.make_train_step(model, tx, schedule))(state, tokens, jax.random.key(0))
        out[dtype] = (state, {k: float(v) for k, v in metrics.items()})
    (state32, m32), (state16, m16) = out[jnp.float32], out[jnp.bfloat16]
    assert m16["finite"] and int(state16.step) == 1
    assert all(x.dtype == jnp.float32 and bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state16.params))
    assert m16["loss"] == pytest.approx(m32["loss"], rel=BF16_LOSS_RTOL)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=BF16_GRAD_NORM_RTOL)
    step = lambda s: jax.tree.map(jnp.subtract, s.params, params)  # noqa: E731
    assert _rel_diff(step(state16), step(state32)) <= BF16_UPDATE_RTOL
