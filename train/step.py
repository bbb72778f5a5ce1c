"""The train state, the optimizer, and the train / eval steps (loss, gradients, accumulation).

The steps are plain functions of arrays; `train_loop` jits them with explicit shardings. Parameters are
kept in `param_dtype` (fp32 master weights) and cast to the model's compute `dtype` inside its layers.

LoRA (`lora` given): `TrainState.params` holds the adapters, the only trained arrays, and `TrainState.base`
the frozen model. The base is an input of every step like the params, so the step stays one jitted function
of the state (no multi-GB constant baked into the program), yet it is never differentiated
(`lora.frozen_base_loss` stops its gradient), never given to the optimizer (whose state is built on the
adapters alone) and never checkpointed (`train/checkpointing.py` saves `params` and `opt_state`): a resume
reloads it from `init_from`. Everything that reads `params` (sharding, checkpoints, checksums) therefore
works on the adapters unchanged. Memory: `lora.apply_lora` merges the adapters into the kernels, so each
targeted kernel has a merged copy and a kernel-sized gradient as transients of the step (for every layer at
once under `scan_layers`); `configs/finetune_lora_gpt2xl.py` has the measured cost.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from flax_gpt2.modeling import layer_stacking, lora as lora_lib
from flax_gpt2.modeling.attention import target_platform
from flax_gpt2.modeling.lora import LoRAConfig

from . import loss_mask
from .packing import Packing

Array = jax.Array

# `optax.apply_if_finite` skips a non-finite update; the train loop stops at the first one, so this
# count of tolerated consecutive skips is never reached.
_MAX_NONFINITE_SKIPS = 1_000_000


@flax.struct.dataclass
class TrainState:
    step: Array  # optimizer steps taken (int32 scalar)
    params: Any  # what the optimizer trains: the model's params, or a LoRA run's adapters
    opt_state: Any
    base: Any = None  # a LoRA run's frozen model params (module docstring); None otherwise


def decay_mask(params) -> Any:
    """Weight decay on matrices and embeddings (`kernel`, `embedding`) and LoRA adapters (`lora_a`, `lora_b`,
    as Hugging Face's Trainer decays PEFT's), never on biases or LayerNorm.

    Anything not found under such a name (including optax's params placeholder) is not decayed.
    """
    def leaf(path, _):
        return bool(path) and getattr(path[-1], "key", None) in ("kernel", "embedding", "lora_a", "lora_b")
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then (`schedule`) cosine decay to `lr * min_lr_ratio` at `decay_steps`,
    linear decay to 0 at `decay_steps` (transformers' `get_linear_schedule_with_warmup`), or constant."""
    decay_steps = opt_config.decay_steps or total_steps
    warmup = min(opt_config.warmup_steps, decay_steps)
    if opt_config.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optimizer.schedule={opt_config.schedule!r}: choose 'cosine', 'linear' or 'constant'")
    if opt_config.schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, opt_config.lr, warmup),
                                     optax.linear_schedule(opt_config.lr, 0.0, decay_steps - warmup)], [warmup])
    if opt_config.schedule == "constant" or warmup == decay_steps or opt_config.min_lr_ratio == 1:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, opt_config.lr, warmup), optax.constant_schedule(opt_config.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_config.lr, warmup_steps=warmup, decay_steps=decay_steps,
        end_value=opt_config.lr * opt_config.min_lr_ratio)


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, masked) after global-norm clipping; non-finite updates skipped."""
    schedule = make_schedule(opt_config, total_steps)
    chain = []
    if opt_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt_config.grad_clip))
    chain.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                             weight_decay=opt_config.weight_decay, mask=decay_mask))
    return optax.apply_if_finite(optax.chain(*chain), _MAX_NONFINITE_SKIPS), schedule


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean next-token cross-entropy in float32 (nats per token): logsumexp minus the target's logit.

    The target logit is picked with a one-hot product rather than a gather (`optax`'s integer-label
    loss), whose gradient is a scatter into the `[B, T, V]` logits: ~2x slower on CPU. The value is
    the same (one nonzero term in the sum).
    """
    return jnp.mean(token_nll(logits, targets))


def token_nll(logits: Array, targets: Array) -> Array:
    """Each position's next-token cross-entropy `[B, T]` in float32 (see `cross_entropy`)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def masked_nll(logits: Array, targets: Array, scored: Array) -> tuple[Array, Array]:
    """`(sum of scored positions' nll, their count)`; `scored` is the targets' 0/1 mask (train/loss_mask.py)."""
    return jnp.sum(token_nll(logits, targets) * scored), jnp.sum(scored)


def make_loss_fn(model: nn.Module, packing: Packing | None = None,
                 loss_on: str = "all") -> Callable[[Any, Array, Array], Any]:
    """`loss_fn(params, tokens [B, T+1], dropout_rng) -> mean loss` of predicting tokens[:, 1:]; `packing`
    masks attention at document boundaries and/or restarts positions (train/packing.py). With
    `loss_on="completion"` the tokens carry the loss mask (train/loss_mask.py) and `loss_fn` returns
    `(sum of the scored nll, (that sum, the scored count))`, for `value_and_grad(..., has_aux=True)`."""
    packing = packing or Packing()
    loss_mask.check_loss_on(loss_on)

    def loss_fn(params, tokens, rng):
        scored = None
        if loss_on == "completion":
            tokens, scored = loss_mask.split(tokens)
        # On CPU each block's output cotangent is stored rather than recomputed by every consumer
        # (flax_gpt2/modeling/grad_barrier.py: ~1.5x faster backward); GPU/TPU fusion has no such problem.
        barrier = target_platform(tokens) == "cpu"
        step_model = model.clone(config=model.config.replace(block_grad_barrier=True)) if barrier else model
        inputs = tokens[:, :-1]
        logits = step_model.apply({"params": params}, inputs, deterministic=False, rngs={"dropout": rng},
                                  **packing.model_inputs(inputs)).logits
        if scored is None:
            return cross_entropy(logits, tokens[:, 1:])
        total, count = masked_nll(logits, tokens[:, 1:], scored[:, 1:])
        return total, (total, count)

    return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    lora: LoRAConfig | None = None, packing: Packing | None = None,
                    loss_on: str = "all") -> Callable[[TrainState, Array, Array], tuple[TrainState, dict]]:
    """`train_step(state, tokens [A, B, T+1], rng) -> (state, metrics)`.

    The gradient of the A micro-batches of B sequences is accumulated in a `lax.scan` and averaged, which
    equals the gradient of the whole A*B batch (every row has T target tokens). Dropout keys depend
    only on `rng`, the step and the micro-batch index, so a resumed run draws the same masks. With `lora`,
    `state.params` are the adapters over the frozen `state.base` (module docstring). `packing`: as in
    `make_loss_fn`. With `loss_on="completion"` the micro-batches' scored sums and counts are added up and
    the loss and gradient divided by the batch's count: the full batch's masked mean (train/loss_mask.py).
    """
    loss_fn = make_loss_fn(model, packing, loss_on)
    masked = loss_on == "completion"
    if lora is None:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=masked)
    else:
        adapted = jax.value_and_grad(lora_lib.frozen_base_loss(loss_fn, lora), has_aux=masked)

        def grad_fn(adapters, tokens, rng, base):
            # The model's dropout and the adapters' draw from independent keys of the micro-batch's key.
            model_rng, lora_rng = jax.random.split(rng)
            return adapted(adapters, base, tokens, model_rng, dropout_rng=lora_rng if lora.dropout > 0 else None)

    def train_step(state: TrainState, tokens: Array, rng: Array):
        rng = jax.random.fold_in(rng, state.step)
        extra = () if lora is None else (state.base,)

        def accumulate(carry, xs):
            loss_sum, count, grad_sum = carry
            index, micro_tokens = xs
            value, grads = grad_fn(state.params, micro_tokens, jax.random.fold_in(rng, index), *extra)
            loss, micro_count = value[1] if masked else (value, 1.0)
            return (loss_sum + loss, count + micro_count, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, count, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(tokens.shape[0]), tokens))
        # "all": the mean of the micro-batches' means (count = their number); "completion": scored sum / count (a
        # batch with no scored token gives 0 and a zero gradient rather than NaN).
        count = jnp.maximum(count, 1.0) if masked else tokens.shape[0]
        loss, grads = loss / count, jax.tree.map(lambda g: g / count, grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = opt_state.last_finite & jnp.isfinite(loss)
        # A skipped (non-finite) step leaves params and optimizer moments as they were; so does `step`.
        new_state = state.replace(step=state.step + finite.astype(state.step.dtype), params=params,
                                  opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   "finite": finite}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, lora: LoRAConfig | None = None, packing: Packing | None = None,
                   loss_on: str = "all") -> Callable[..., Array]:
    """`eval_step(params, tokens [1, B, T+1]) -> mean loss` without dropout; with `lora`,
    `eval_step(adapters, tokens, base)`. `packing`: as in `make_loss_fn` (held-out windows are packed alike).
    With `loss_on="completion"` it returns `[scored nll sum, scored count]` (`loss_mask.combine_eval` adds
    the batches up)."""
    packing = packing or Packing()
    loss_mask.check_loss_on(loss_on)

    def eval_step(params, tokens, base=None):
        tokens = tokens[0]
        if loss_on == "completion":
            tokens, scored = loss_mask.split(tokens)
        if lora is not None:
            params = lora_lib.apply_lora(base, params, lora)
        inputs = tokens[:, :-1]
        logits = model.apply({"params": params}, inputs, deterministic=True, **packing.model_inputs(inputs)).logits
        if loss_on == "completion":
            return jnp.stack(masked_nll(logits, tokens[:, 1:], scored[:, 1:]))
        return cross_entropy(logits, tokens[:, 1:])

    return eval_step


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   state_shardings: TrainState, batch_sharding: jax.sharding.NamedSharding,
                   lora: LoRAConfig | None = None, packing: Packing | None = None, loss_on: str = "all"):
    """The train step jitted with explicit in/out shardings; the input state's buffers are donated (a LoRA
    run's base is passed through: its output aliases its input)."""
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(make_train_step(model, tx, schedule, lora, packing, loss_on),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(model: nn.Module, params_shardings, batch_sharding: jax.sharding.NamedSharding,
                  lora: LoRAConfig | None = None, base_shardings=None, packing: Packing | None = None,
                  loss_on: str = "all"):
    """The eval step jitted; with `lora`, it takes `(adapters, tokens, base)` and `base_shardings` places the base."""
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    in_shardings = (params_shardings, batch_sharding) + (() if lora is None else (base_shardings,))
    return jax.jit(make_eval_step(model, lora, packing, loss_on), in_shardings=in_shardings, out_shardings=replicated)


def full_params(state: TrainState, lora: LoRAConfig | None, base_shardings=None) -> Any:
    """The model's params of `state`: `state.params`, or a LoRA run's base with its adapters merged (a new
    base-sized tree placed like the base, for evaluations that take plain params: HellaSwag, sampling)."""
    if lora is None:
        return state.params
    return jax.jit(lambda base, adapters: lora_lib.merge_adapter(base, adapters, lora),
                   out_shardings=base_shardings)(state.base, state.params)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, state_shardings: TrainState,
                     rng: Array, seq_len: int, params=None) -> TrainState:
    """A fresh train state placed by `state_shardings`: `params` (global arrays) or a random init.

    Each device computes only its own shard of a random init; partitionable threefry (JAX's default)
    makes the values independent of the mesh. The init is drawn per layer and then stacked for a
    `scan_layers` model, so one seed gives the same weights in either layout.
    """
    def init(rng, params):
        if params is None:
            unrolled = type(model)(model.config.replace(scan_layers=False))
            params = nn.unbox(unrolled.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
            params = layer_stacking.to_layout(params, model.config.scan_layers)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=state_shardings)(rng, params)


def init_lora_state(tx: optax.GradientTransformation, state_shardings: TrainState, rng: Array, base,
                    gpt2_config, lora: LoRAConfig) -> TrainState:
    """A fresh LoRA train state over `base` (global arrays placed by `state_shardings.base`): adapters drawn
    by `lora.init_lora` in the base's layout (B = 0: step 0's model is the base exactly) in the params
    dtype, their optimizer state, step 0."""
    def init(rng, base):
        adapters = lora_lib.init_lora(rng, base, gpt2_config, lora, dtype=gpt2_config.param_dtype)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters))

    trained = state_shardings.replace(base=None)
    return jax.jit(init, out_shardings=trained)(rng, base).replace(base=base)


def init_base(model: nn.Module, base_shardings, rng: Array, seq_len: int, dtype) -> Any:
    """The random init `init_train_state` draws from `rng` (the same values), in `dtype`: the base of a
    LoRA run without `init_from`."""
    def init(rng):
        unrolled = type(model)(model.config.replace(scan_layers=False))
        params = nn.unbox(unrolled.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
        params = layer_stacking.to_layout(params, model.config.scan_layers)
        return jax.tree.map(lambda x: x.astype(dtype), params)

    return jax.jit(init, out_shardings=base_shardings)(rng)
