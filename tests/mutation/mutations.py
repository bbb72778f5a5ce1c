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
        "lambada_first_token_only", "flax_gpt2/eval_metrics.py",
        (("correct += bool(greedy[row, sl].all())", "correct += bool(greedy[row, sl][0])"),),
        ("tests/test_evaluate.py::test_lambada_counts_a_word_right_only_when_every_token_is",
         "tests/test_evaluate.py::test_lambada_matches_transformers"),
        "LAMBADA accuracy counts a multi-token word right when only its first token is"),
    Mutation(
        "weight_decay_on_biases_and_layernorm", "train/step.py",
        (('in ("kernel", "embedding")', 'in ("kernel", "embedding", "bias", "scale")'),),
        ("tests/test_train_parity.py::test_decay_mask_on_the_real_parameter_tree",
         "tests/test_train_parity.py::test_train_steps_match_torch_adamw_with_accumulation"),
        "AdamW decays biases and LayerNorm scales towards 0"),
    Mutation(
        "same_dropout_key_for_every_micro_batch", "train/step.py",
        (("loss, grads = grad_fn(state.params, micro_tokens, jax.random.fold_in(rng, index))",
          "loss, grads = grad_fn(state.params, micro_tokens, rng)"),),
        ("tests/test_train_dropout.py",),
        "every accumulated micro-batch drops the same units"),
    Mutation(
        "ln_1_ln_2_swapped_in_rename_table", "flax_gpt2/weights.py",
        (('Rename("h.{i}.ln_1.weight", "h_{i}/ln_1/scale"', 'Rename("h.{i}.ln_1.weight", "h_{i}/ln_2/scale"'),
         ('Rename("h.{i}.ln_2.weight", "h_{i}/ln_2/scale"', 'Rename("h.{i}.ln_2.weight", "h_{i}/ln_1/scale"')),
        ("tests/test_weights.py::test_every_tensor_lands_where_transformers_uses_it",),
        "a pretrained checkpoint loads with its two LayerNorm scales per block exchanged (round trips still pass)"),
    # --- more realistic slips -----------------------------------------------------------------------------
    Mutation(
        "no_causal_mask", "flax_gpt2/model.py",
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
        (("loss, grads = loss / n_micro, jax.tree.map(lambda g: g / n_micro, grads)",
          "loss, grads = loss / n_micro, grads"),),
        ("tests/test_train_sharding.py::test_gradient_accumulation_equals_big_batch",
         "tests/test_train_parity.py::test_train_steps_match_torch_adamw_with_accumulation"),
        "gradient accumulation sums micro-batch gradients: A times the gradient (and its clipping)"),
    Mutation(
        "perplexity_windows_rescore_the_overlap", "flax_gpt2/eval_metrics.py",
        (("windows.append(Window(begin, end, max(prev_end, begin + 1)))",
          "windows.append(Window(begin, end, begin + 1))"),),
        ("tests/test_evaluate.py::test_sliding_windows_score_every_token_once",
         "tests/test_evaluate.py::test_perplexity_matches_transformers"),
        "sliding-window perplexity scores overlapping tokens twice"),
    Mutation(
        "resume_replays_the_last_batch", "train/train_loop.py",
        (("paused |= checkpointer.save(state, batches.state, hf_model_config",
          "paused |= checkpointer.save(state, data_before, hf_model_config"),),
        ("tests/test_train_run.py::test_sigterm_then_resume_reproduces_the_run",),
        "a resumed run's data position is one batch behind: it trains on the last batch twice"),
)
