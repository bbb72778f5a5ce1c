"""Every config key's class on resume, as one table: harmless (changes freely), training (needs
`allow_config_change`) or architecture (never). A key the table does not know fails the test, so a new
config key gets a class on purpose rather than by the accident of a prefix."""

import pytest

from flax_gpt2.configs import base
from flax_gpt2.train import run_guard

HARMLESS, TRAINING, ARCHITECTURE = "harmless", "training", "architecture"

CLASSES = {
    # cadence and bookkeeping
    "log_every": HARMLESS, "eval_every": HARMLESS, "eval_batches": HARMLESS, "eval_batch_size": HARMLESS,
    "checkpoint_every": HARMLESS, "keep_checkpoints": HARMLESS, "async_checkpointing": HARMLESS,
    "progress_bar": HARMLESS, "cpu_peak_flops": HARMLESS, "coverage_sets": HARMLESS, "compile_only": HARMLESS,
    "allow_config_change": HARMLESS, "eval_hellaswag": HARMLESS, "eval_hellaswag_limit": HARMLESS,
    "profile_steps": HARMLESS,
    "watchdog_seconds": HARMLESS, "watchdog_exit": HARMLESS, "compile_cache_dir": HARMLESS,
    "sample.max_new_tokens": HARMLESS, "sample.prompt": HARMLESS, "sample.temperature": HARMLESS,
    "sample.top_k": HARMLESS,
    # placement: orbax reshards on restore; accumulation gives the same gradient
    "distributed.coordinator_address": HARMLESS, "distributed.enabled": HARMLESS,
    "distributed.num_processes": HARMLESS, "distributed.process_id": HARMLESS,
    "mesh.data": HARMLESS, "mesh.fsdp": HARMLESS, "mesh.tensor": HARMLESS, "logical_axis_rules": HARMLESS,
    "micro_batch_size": HARMLESS, "data.num_threads": HARMLESS, "data.cache_dir": HARMLESS,
    "data.cache_shared": HARMLESS, "data.remote_reads": HARMLESS, "data.remote_cache_bytes": HARMLESS,
    "data.remote_block_bytes": HARMLESS,
    # the same math in another form
    "model.remat": HARMLESS, "model.scan_layers": HARMLESS, "model.attention": HARMLESS,
    # the length of the run: harmless only while the lr schedule stays the same at every step, and base's
    # cosine decays over `steps` (decay_steps=0); `epochs` is resolved into `steps` before the comparison
    "steps": TRAINING, "optimizer.decay_steps": TRAINING, "epochs": HARMLESS,
    # the math of a step, or what it trains on
    "batch_size": TRAINING, "seed": TRAINING, "init_from": TRAINING,
    "model.dropout": TRAINING, "model.dtype": TRAINING,
    "data.source": TRAINING, "data.seq_len": TRAINING, "data.tokenizer": TRAINING, "data.recipe": TRAINING,
    "data.dataset_config": TRAINING, "data.split": TRAINING, "data.text_field": TRAINING,
    "data.val_fraction": TRAINING, "data.document_mask": TRAINING, "data.reset_positions": TRAINING,
    "data.loss_on": TRAINING,
    "optimizer.lr": TRAINING, "optimizer.b1": TRAINING, "optimizer.b2": TRAINING, "optimizer.eps": TRAINING,
    "optimizer.weight_decay": TRAINING, "optimizer.grad_clip": TRAINING, "optimizer.warmup_steps": TRAINING,
    "optimizer.min_lr_ratio": TRAINING, "optimizer.schedule": TRAINING,
    # the shapes (or dtype) of the saved arrays
    "model.preset": ARCHITECTURE, "model.n_layer": ARCHITECTURE, "model.n_embd": ARCHITECTURE,
    "model.n_head": ARCHITECTURE, "model.n_positions": ARCHITECTURE, "model.param_dtype": ARCHITECTURE,
    # LoRA: rank and targets fix the adapters' shapes; the rest is the math of a step
    "lora.rank": ARCHITECTURE, "lora.targets": ARCHITECTURE,
    "lora.alpha": TRAINING, "lora.dropout": TRAINING, "lora.base_dtype": TRAINING,
}


def _changed(value):
    """Some other value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return value + [["extra", None]]
    return 12  # None: an unset size


def _saved():
    return run_guard.flatten(base.get_config())


def test_the_table_covers_every_config_key():
    missing = sorted(set(_saved()) - set(CLASSES))
    assert not missing, f"config keys without a resume class: {missing}; add each to CLASSES in this file"
    assert not set(CLASSES) - set(_saved()), "CLASSES names keys the config no longer has"


def _outcome(key, *, allow):
    saved = _saved()
    current = dict(saved, **{key: _changed(saved[key])})
    try:
        diff = run_guard.check_resume_config(saved, current, allow_change=allow, workdir="/runs/r")
    except run_guard.ConfigChangedError as e:
        assert key in str(e) and "/runs/r" in str(e) and "nothing was changed" in str(e)
        return "refused", str(e)
    assert set(diff) == {key}
    return "accepted", ""


@pytest.mark.parametrize("key", sorted(CLASSES))
def test_each_key_is_treated_as_its_class(key):
    if key not in _saved():
        pytest.fail(f"{key} is in CLASSES but not in the config")
    without, message = _outcome(key, allow=False)
    with_allow, message_allowed = _outcome(key, allow=True)
    expected = {HARMLESS: ("accepted", "accepted"), TRAINING: ("refused", "accepted"),
                ARCHITECTURE: ("refused", "refused")}[CLASSES[key]]
    assert (without, with_allow) == expected, CLASSES[key]
    if CLASSES[key] == TRAINING:
        assert "--config.allow_config_change=True" in message
    if CLASSES[key] == ARCHITECTURE:
        assert "fix the shapes" in message_allowed and "--config.init_from=/runs/r" in message_allowed


def test_a_longer_run_on_a_schedule_that_does_not_depend_on_its_length_is_harmless():
    saved = dict(_saved(), **{"optimizer.schedule": "constant", "optimizer.warmup_steps": 10})
    longer = dict(saved, steps=saved["steps"] * 2)
    assert run_guard.check_resume_config(saved, longer, allow_change=False, workdir="w") == {
        "steps": (saved["steps"], longer["steps"])}
    # the same change on a cosine schedule moves the learning rate of the steps already planned
    cosine = dict(saved, **{"optimizer.schedule": "cosine"})
    with pytest.raises(run_guard.ConfigChangedError, match="steps"):
        run_guard.check_resume_config(cosine, dict(cosine, steps=saved["steps"] * 2), allow_change=False,
                                      workdir="w")


def test_an_architecture_change_is_refused_even_beside_allowed_ones():
    saved = _saved()
    current = dict(saved, **{"optimizer.lr": 1e-3, "log_every": 3, "model.n_layer": 4})
    with pytest.raises(run_guard.ConfigChangedError, match=r"model\.n_layer: None -> 4") as e:
        run_guard.check_resume_config(saved, current, allow_change=True, workdir="w")
    assert "optimizer.lr" not in str(e.value)  # the message names what blocks, not what was allowed


def test_a_key_only_one_side_has_counts_as_changed():
    """A checkpoint from before a key existed, resumed by a config that has it (and the reverse)."""
    saved = _saved()
    newer = dict(saved, **{"data.new_knob": 1})
    with pytest.raises(run_guard.ConfigChangedError, match=r"data\.new_knob: '<absent>' -> 1"):
        run_guard.check_resume_config(saved, newer, allow_change=False, workdir="w")
    older = {k: v for k, v in saved.items() if k != "log_every"}
    assert run_guard.check_resume_config(older, saved, allow_change=False, workdir="w") == {
        "log_every": ("<absent>", saved["log_every"])}


def test_a_key_added_later_is_no_change_while_it_keeps_the_old_behaviour():
    """A run from before `data.document_mask` existed trained without it: resuming it with the default is no
    change, turning it on is one (a training key)."""
    current = _saved()
    older = {k: v for k, v in current.items() if k not in run_guard.ADDED_LATER}
    assert run_guard.check_resume_config(older, current, allow_change=False, workdir="w") == {}
    with pytest.raises(run_guard.ConfigChangedError, match=r"data\.document_mask: '<absent>' -> True"):
        run_guard.check_resume_config(older, dict(current, **{"data.document_mask": True}), allow_change=False,
                                      workdir="w")
