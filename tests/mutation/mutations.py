"""The fixed list of realistic mutations `run.py` applies, one at a time, to a copy of the repository.

Each is a bug a user would hit, written as exact text replacements in one file, with the fast tests that
must catch it. An anchor (`old`) that no longer occurs exactly once is an error, so the list cannot rot
silently: when the code changes, update the anchor (and keep the mutation's meaning).
"""

from __future__ import annotations

from typing import NamedTuple


class Mutation(NamedTuple):
    name: str
    file: str  # relative to the repository root
    replacements: tuple[tuple[str, str], ...]  # (old, new), applied in order; each old must occur exactly once
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root) that must fail
    why: str  # the bug, as a user would meet it


MUTATIONS: tuple[Mutation, ...] = (
    # --- the five of the review ---------------------------------------------------------------------------
    Mutation(
        "beam_bound_without_length_penalty", "flax_gpt2/generation/beam_search.py",
        (("best_possible = running_scores[:, :1] / (step.astype(jnp.float32) ** length_penalty)",
          "best_possible = running_scores[:, :1] / step.astype(jnp.float32)"),),
        ("tests/test_generation.py::test_beam_search_matches_transformers",),
        "beam search stops too early (length_penalty > 1) or too late (< 1): other beams than transformers"),
    Mutation(
        "lambada_first_token_only", "flax_gpt2/evaluation/perplexity.py",
        (("correct += bool(greedy[row, sl].all())", "correct += bool(greedy[row, sl][0])"),),
        ("tests/test_evaluate.py::test_lambada_counts_a_word_right_only_when_every_token_is",
         "tests/test_evaluate.py::test_lambada_matches_transformers"),
        "LAMBADA accuracy counts a multi-token word right when only its first token is"),
    Mutation(
        "weight_decay_on_biases_and_layernorm", "train/step.py",
        (('in ("kernel", "embedding", "lora_a", "lora_b")',
          'in ("kernel", "embedding", "lora_a", "lora_b", "bias", "scale")'),),
        ("tests/test_train_parity.py::test_decay_mask_on_the_real_parameter_tree",
         "tests/test_train_parity.py::test_train_steps_match_torch_adamw_with_accumulation"),
        "AdamW decays biases and LayerNorm scales towards 0"),
    Mutation(
        "same_dropout_key_for_every_micro_batch", "train/step.py",
        (("value, grads = grad_fn(state.params, micro_tokens, jax.random.fold_in(rng, index), *extra)",
          "value, grads = grad_fn(state.params, micro_tokens, rng, *extra)"),),
        ("tests/test_train_dropout.py",),
        "every accumulated micro-batch drops the same units"),
    Mutation(
        "ln_1_ln_2_swapped_in_rename_table", "flax_gpt2/checkpoints/hf_state_dict.py",
        (('Rename("h.{i}.ln_1.weight", "h_{i}/ln_1/scale"', 'Rename("h.{i}.ln_1.weight", "h_{i}/ln_2/scale"'),
         ('Rename("h.{i}.ln_2.weight", "h_{i}/ln_2/scale"', 'Rename("h.{i}.ln_2.weight", "h_{i}/ln_1/scale"')),
        ("tests/test_weights.py::test_every_tensor_lands_where_transformers_uses_it",),
        "a pretrained checkpoint loads with its two LayerNorm scales per block exchanged (round trips still pass)"),
    # --- more realistic slips -----------------------------------------------------------------------------
    Mutation(
        "no_causal_mask", "flax_gpt2/modeling/model.py",
        (("visible = jnp.arange(key_length)[None, :] <= q_pos  # [T, S]",
          "visible = jnp.ones((length, key_length), bool)  # [T, S]"),),
        ("tests/test_parity.py::test_lm_logits_without_mask",),
        "every token attends to the future"),
    Mutation(
        "decode_positions_count_left_padding", "flax_gpt2/generation/sampling.py",
        (("positions = (state.lengths + state.step - 1)[:, None]",
          "positions = (state.prompt_len + state.step - 1)[:, None]"),),
        ("tests/test_generation.py::test_greedy_left_padded_batch_and_penalties_match_transformers",
         "tests/test_generation.py::test_left_padded_batch_equals_one_at_a_time"),
        "a left-padded prompt decodes with position ids shifted by its padding"),
    Mutation(
        "prefill_position_ids_off_by_one", "flax_gpt2/generation/model_step.py",
        (("position_ids = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)",
          "position_ids = jnp.cumsum(mask, axis=1)"),),
        ("tests/test_generation.py::test_greedy_matches_transformers",),
        "the prompt is encoded with positions 1..T instead of 0..T-1"),
    Mutation(
        "top_p_keeps_one_token_too_few", "flax_gpt2/generation/logits_processors.py",
        (("keep = bits >= lo", "keep = bits > lo"),),
        ("tests/test_sampling_strategies.py::test_top_p_matches_transformers",),
        "nucleus sampling drops the least likely token of the nucleus"),
    Mutation(
        "repetition_penalty_wrong_way", "flax_gpt2/generation/logits_processors.py",
        (("penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)",
          "penalized = jnp.where(logits < 0, logits / penalty, logits * penalty)"),),
        ("tests/test_sampling_strategies.py::test_repetition_penalty_matches_transformers",),
        "repetition_penalty > 1 encourages repeats instead of discouraging them"),
    Mutation(
        "accumulated_gradients_not_averaged", "train/step.py",
        (("loss, grads = loss / count, jax.tree.map(lambda g: g / count, grads)",
          "loss, grads = loss / count, grads"),),
        ("tests/test_train_sharding.py::test_gradient_accumulation_equals_big_batch",
         "tests/test_train_parity.py::test_train_steps_match_torch_adamw_with_accumulation"),
        "gradient accumulation sums micro-batch gradients: A times the gradient (and its clipping)"),
    Mutation(
        "perplexity_windows_rescore_the_overlap", "flax_gpt2/evaluation/perplexity.py",
        (("windows.append(Window(begin, end, max(prev_end, begin + 1)))",
          "windows.append(Window(begin, end, begin + 1))"),),
        ("tests/test_evaluate.py::test_sliding_windows_score_every_token_once",
         "tests/test_evaluate.py::test_perplexity_matches_transformers"),
        "sliding-window perplexity scores overlapping tokens twice"),
    Mutation(
        "resume_replays_the_last_batch", "train/step_loop.py",
        (("paused |= checkpointer.save(state, batches.state, hf_model_config",
          "paused |= checkpointer.save(state, data_before, hf_model_config"),),
        ("tests/test_train_run.py::test_sigterm_then_resume_reproduces_the_run",),
        "a resumed run's data position is one batch behind: it trains on the last batch twice"),
    # --- checkpoints: checksums, corrupt checkpoints, older checkpoints ------------------------------------
    Mutation(
        "checksum_index_ignores_strides", "flax_gpt2/checkpoints/run_folders.py",
        (("stride *= bits.shape[axis]", "stride *= 1"),),
        ("tests/test_checkpoint_integrity.py",),
        "a checkpoint whose a[0, 1] and a[1, 0] were exchanged passes its checksum (every axis counted with stride 1)"),
    Mutation(
        "checksum_without_position_weight", "flax_gpt2/checkpoints/run_folders.py",
        (("weight = index * jnp.uint32(_MIX) | jnp.uint32(1)", "weight = jnp.ones_like(index)"),),
        ("tests/test_checkpoint_integrity.py",),
        "the checksum is a plain sum of the words: any reordering of an array's values passes"),
    Mutation(
        "checksum_of_values_not_bits", "flax_gpt2/checkpoints/run_folders.py",
        (("bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)", "bits = x.astype(jnp.uint32)"),),
        ("tests/test_checkpoint_integrity.py",),
        "the checksum converts float values to integers instead of reading their bits: a flipped mantissa bit passes"),
    Mutation(
        "optimizer_state_not_verified", "train/checkpointing.py",
        (('run_folders.verify(restored["opt_state"], checksums.get("opt_state"), where)', "pass"),),
        ("tests/test_train_safety.py::test_a_flipped_bit_in_the_optimizer_state_is_caught",),
        "a flipped bit in an AdamW moment is resumed from: every later update silently changes"),
    Mutation(
        "corrupt_checkpoint_deleted", "train/checkpointing.py",
        (("file_io.epath(file_io.join(checkpoint_dir(self.workdir), str(step))).rename(target)",
          '__import__("shutil").rmtree(file_io.join(checkpoint_dir(self.workdir), str(step)))'),),
        ("tests/test_train_safety.py::test_a_flipped_bit_in_the_optimizer_state_is_caught",),
        "a corrupt checkpoint is deleted instead of set aside: what a user might still recover is gone"),
    Mutation(
        "resume_assumes_the_saved_layout_is_the_current_one", "train/checkpointing.py",
        (("saved_scan = run_folders.saved_params_are_stacked(self.manager, step)",
          "saved_scan = layer_stacking.is_stacked(abstract_state.params)"),),
        ("tests/test_layer_stacking.py::test_a_per_layer_checkpoint_restores_in_either_layout_placed_by_its_shardings",),
        "a run that switches scan_layers on resume reads its checkpoint in the wrong layout (the saved layout is "
        "guessed from the current config instead of read from the arrays)"),
    Mutation(
        "resume_restarts_the_data_order", "train/checkpointing.py",
        (("return state, DataState(**meta.data)", "return state, DataState()"),),
        ("tests/test_train_safety.py::test_a_checkpoint_meta_missing_a_field_is_corruption_not_a_guess",),
        "a resumed run reads the data from the beginning again: batches it already trained on, twice"),
    # --- resume guard -----------------------------------------------------------------------------------
    Mutation(
        "every_data_key_harmless_on_resume", "train/run_guard.py",
        (('"data.num_threads", "data.cache_dir",', '"data.",'),),
        ("tests/test_resume_guard.py",),
        "a resume with another data.source or data.seq_len continues silently on other data"),
    Mutation(
        "n_positions_not_an_architecture_key", "train/run_guard.py",
        (('"model.n_head", "model.n_positions",', '"model.n_head",'),),
        ("tests/test_resume_guard.py",),
        "allow_config_change lets n_positions change although the position table's shape is fixed"),
    Mutation(
        "run_length_always_harmless", "train/run_guard.py",
        (("if _matches_any(unsafe, LENGTH) and _same_schedule(saved, current):", "if _matches_any(unsafe, LENGTH):"),),
        ("tests/test_resume_guard.py",),
        "resuming with more steps reshapes a cosine schedule mid-run without a word"),
    # --- learning-rate schedules ------------------------------------------------------------------------
    Mutation(
        "cosine_decay_steps_exclude_warmup", "train/step.py",
        (("warmup_steps=warmup, decay_steps=decay_steps,", "warmup_steps=warmup, decay_steps=decay_steps - warmup,"),),
        ("tests/test_schedules.py",),
        "optax's decay_steps read as the cosine's length after warmup: the cosine ends `warmup` steps early"),
    Mutation(
        "linear_decay_too_long", "train/step.py",
        (("optax.linear_schedule(opt_config.lr, 0.0, decay_steps - warmup)",
          "optax.linear_schedule(opt_config.lr, 0.0, decay_steps)"),),
        ("tests/test_schedules.py",),
        "the linear schedule reaches 0 `warmup` steps after the run ends (transformers' ends at the last step)"),
    Mutation(
        "warmup_starts_above_zero", "train/step.py",
        (("[optax.linear_schedule(0.0, opt_config.lr, warmup), optax.constant_schedule(opt_config.lr)]",
          "[optax.linear_schedule(opt_config.lr / max(warmup, 1), opt_config.lr, warmup), "
          "optax.constant_schedule(opt_config.lr)]"),),
        ("tests/test_schedules.py",),
        "the first warmup step already uses lr / warmup (transformers' first step uses 0)"),
    Mutation(
        "cosine_ignores_min_lr_ratio", "train/step.py",
        (("end_value=opt_config.lr * opt_config.min_lr_ratio)", "end_value=0.0)"),),
        ("tests/test_schedules.py",),
        "the cosine decays to 0 instead of lr * min_lr_ratio"),
    # --- layer stacking: scanned <-> per-layer on a sharded mesh ------------------------------------------
    Mutation(
        "stacked_restore_target_layer_axis_last", "flax_gpt2/modeling/layer_stacking.py",
        (("sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))",
          "sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))"),),
        ("tests/test_layer_stacking.py::test_restore_targets_have_the_other_layouts_shapes_and_shardings",),
        "a per-layer checkpoint restored stacked is read with the layers axis sharded and the weights' axes shifted"),
    Mutation(
        "unstacked_restore_target_drops_the_wrong_axis", "flax_gpt2/modeling/layer_stacking.py",
        (("sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))",
          "sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:-1]))"),),
        ("tests/test_layer_stacking.py::test_restore_targets_have_the_other_layouts_shapes_and_shardings",),
        "a stacked checkpoint restored per layer is read with each weight's shardings off by one axis"),
    Mutation(
        "layout_switch_converts_params_only", "flax_gpt2/modeling/layer_stacking.py",
        (("return type(tree)(*(convert_tree(v, scan_layers, stack=stack, take=take) for v in tree))",
          "return tree"),),
        ("tests/test_layer_stacking.py::test_restore_targets_have_the_other_layouts_shapes_and_shardings",),
        "a run that switches scan_layers on resume cannot restore its AdamW moments (kept in the old layout)"),
    # --- compile_only's fit decision --------------------------------------------------------------------
    Mutation(
        "fits_against_total_hbm", "train/compile_only.py",
        (('"eval_error" not in report and report["bytes_per_chip"] <= limit',
          '"eval_error" not in report and report["bytes_per_chip"] <= report["hbm_bytes_per_chip"]'),),
        ("tests/test_compile_only.py::test_fits_is_decided_against_usable_hbm_not_the_total",),
        "a step that needs more than the usable HBM (but less than the chip's total) is reported to fit, then OOMs"),
    Mutation(
        "fits_strict_at_the_threshold", "train/compile_only.py",
        (('and report.get("eval_bytes_per_chip", 0) <= limit)', 'and report.get("eval_bytes_per_chip", 0) < limit)'),),
        ("tests/test_compile_only.py::test_fits_is_decided_against_usable_hbm_not_the_total",),
        "an eval step that needs exactly the usable HBM is reported not to fit"),
    Mutation(
        "fits_ignores_the_eval_step", "train/compile_only.py",
        (('report["bytes_per_chip"] <= limit\n            and report.get("eval_bytes_per_chip", 0) <= limit)',
          'report["bytes_per_chip"] <= limit)'),),
        ("tests/test_compile_only.py::test_fits_is_decided_against_usable_hbm_not_the_total",),
        "the eval step (beside the resident train state) is not weighed: the run OOMs at its first eval"),
)
