"""Checks of a training config's values, run before anything is written: each bad value is one clear error
naming the key, so a typo costs seconds, not a run."""

from __future__ import annotations

from flax_gpt2.modeling.lora import TARGET_NAMES
from flax_gpt2.utils import dtypes
from flax_gpt2.utils.cli import UsageError
from flax_gpt2.utils.validation import is_int, is_real

from . import loss_mask
from .mesh import MESH_AXES


class ConfigValueError(UsageError):
    """A config key holds a value the run cannot use; the message names the key and what is allowed."""

def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(f"config.{key}={value!r}: {allowed}")


def check_config(config) -> None:
    """Raises ConfigValueError for the first value no run could use (counts, rates, fractions, ...)."""
    at_least_one = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size", "data.seq_len")
    non_negative = ("epochs", "eval_every", "eval_batches", "eval_batch_size", "micro_batch_size",
                    "optimizer.warmup_steps", "optimizer.decay_steps", "coverage_sets", "data.num_threads",
                    "sample.max_new_tokens", "sample.top_k", "seed", "eval_hellaswag_limit")
    for key in at_least_one:
        value = _get(config, key)
        _require(is_int(value) and value >= 1, key, value, "must be an integer >= 1")
    for key in non_negative:
        value = _get(config, key)
        _require(is_int(value) and value >= 0, key, value, "must be an integer >= 0")
    _require(config.seed < 2**32, "seed", config.seed, "must be below 2**32")
    opt = config.optimizer
    for key in ("lr", "eps", "weight_decay", "grad_clip"):
        value = opt[key]
        _require(is_real(value) and value >= 0, f"optimizer.{key}", value, "must be a finite number >= 0")
    for key in ("b1", "b2"):
        _require(is_real(opt[key]) and 0 <= opt[key] < 1, f"optimizer.{key}", opt[key], "must be in [0, 1)")
    _require(is_real(opt.min_lr_ratio) and 0 <= opt.min_lr_ratio <= 1, "optimizer.min_lr_ratio",
             opt.min_lr_ratio, "must be in [0, 1]")
    _require(is_real(config.model.dropout) and 0 <= config.model.dropout < 1, "model.dropout",
             config.model.dropout, "must be in [0, 1)")
    _require(is_real(config.data.val_fraction) and 0 <= config.data.val_fraction < 1, "data.val_fraction",
             config.data.val_fraction, "must be in [0, 1)")
    _require(is_real(config.sample.temperature) and config.sample.temperature > 0, "sample.temperature",
             config.sample.temperature, "must be a finite number > 0")
    _require(is_real(config.cpu_peak_flops) and config.cpu_peak_flops > 0, "cpu_peak_flops",
             config.cpu_peak_flops, "must be a finite number > 0")
    _require(is_real(config.watchdog_seconds) and config.watchdog_seconds > 0, "watchdog_seconds",
             config.watchdog_seconds, "must be a number of seconds > 0 (the minimum time without a finished step "
             "before every host dumps its stacks; it is raised to 10x the median step time)")
    for key in ("data.document_mask", "data.reset_positions"):
        value = _get(config, key)
        _require(isinstance(value, bool), key, value, "must be True or False")
    _require(config.data.loss_on in loss_mask.LOSS_ON, "data.loss_on", config.data.loss_on,
             f"must be one of {loss_mask.LOSS_ON} ('completion' scores only the tokens after a recipe's prompt)")
    _require(config.data.remote_reads in ("range", "mirror"), "data.remote_reads", config.data.remote_reads,
             "must be 'range' (read only the blocks each host needs) or 'mirror' (copy the corpus to local disk)")
    block = config.data.remote_block_bytes
    _require(is_int(block) and block >= 2 and block % 2 == 0, "data.remote_block_bytes", block,
             "must be an even integer >= 2 (tokens are 2 bytes; 4096 is the default)")
    _require(is_int(config.data.remote_cache_bytes) and config.data.remote_cache_bytes >= max(block, 1 << 20),
             "data.remote_cache_bytes", config.data.remote_cache_bytes,
             "must be an integer >= 1 MiB (1048576) and >= data.remote_block_bytes")
    _check_axis_rules(config.logical_axis_rules)
    check_lora(config)


def check_lora(config) -> None:
    """`lora.*`: rank 0 (off) or more, and with rank > 0 values `LoRAConfig` accepts and a known base dtype."""
    lora = config.lora
    _require(is_int(lora.rank) and lora.rank >= 0, "lora.rank", lora.rank,
             "must be an integer >= 0 (0 = no LoRA: full fine-tuning)")
    if lora.rank == 0:
        return
    _require(is_real(lora.alpha) and lora.alpha > 0, "lora.alpha", lora.alpha, "must be a finite number > 0")
    _require(is_real(lora.dropout) and 0 <= lora.dropout < 1, "lora.dropout", lora.dropout, "must be in [0, 1)")
    targets = tuple(t.strip() for t in lora.targets.split(",")) if isinstance(lora.targets, str) else ()
    unknown = [t for t in targets if t not in TARGET_NAMES]
    _require(bool(targets) and all(targets) and not unknown, "lora.targets", lora.targets,
             f"must be comma-separated module names of {', '.join(TARGET_NAMES)} (e.g. 'c_attn' or 'c_attn,c_fc'; "
             "c_proj is both attn.c_proj and mlp.c_proj)")
    _require(lora.base_dtype == "" or lora.base_dtype in dtypes.DTYPES, "lora.base_dtype", lora.base_dtype,
             f"must be '' (model.param_dtype) or one of {', '.join(sorted(dtypes.DTYPES))}")


def _check_axis_rules(rules) -> None:
    """`logical_axis_rules`: pairs (logical axis name, mesh axis | tuple of mesh axes | None)."""

    def good(rule) -> bool:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            return False
        axes = (rule[1],) if isinstance(rule[1], str) else (() if rule[1] is None else rule[1])
        return isinstance(axes, (tuple, list)) and all(a in MESH_AXES for a in axes)

    _require(isinstance(rules, (tuple, list)) and all(map(good, rules)), "logical_axis_rules", rules,
             f"must be pairs (logical axis name, one of {MESH_AXES}, a tuple of them, or None)")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_batch(config, batch_shards: int) -> int:
    """The micro-batch size, after checking it divides `batch_size` and splits over the mesh's batch shards."""
    micro = config.micro_batch_size or config.batch_size
    if config.batch_size <= 0 or micro <= 0 or config.batch_size % micro:
        raise ConfigValueError(f"batch_size={config.batch_size} must be a positive multiple of "
                               f"micro_batch_size={config.micro_batch_size}")
    if micro % batch_shards:
        raise ConfigValueError(f"the micro-batch of {micro} sequences is not divisible by the {batch_shards} ways "
                               "the mesh splits the batch (data x fsdp); change batch_size/micro_batch_size or the "
                               "mesh")
    return micro
