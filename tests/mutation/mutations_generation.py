"""Realistic mutations of attention, generation, serving and evaluation (`run.py` applies them along with
`mutations.py`'s, one at a time): each is a one- or two-line bug a user would meet, with the fast tests that
must catch it. Same format and rules as `mutations.py` (an anchor must occur exactly once)."""

from __future__ import annotations

from mutations import Mutation

_BACKENDS = "tests/test_attention_backends.py::test_backend_equals_xla_forward_and_backward"
_AUTO = "tests/test_attention_backends.py::test_auto_choice_for_the_target"
_CHOOSE = "tests/test_sampling_strategies.py::test_choose_draws_from_what_process_keeps"
_SERVE = "tests/test_serve.py::"
_SPEC = "tests/test_serve_speculative.py::"
_HARNESS = "tests/test_hellaswag.py::test_harness_style_equals_lm_eval_hellaswag[non_ascii]"

MUTATIONS: tuple[Mutation, ...] = (
    # --- attention ----------------------------------------------------------------------------------------
    Mutation(
        "dot_product_checks_k_dtype_for_v", "flax_gpt2/modeling/attention.py",
        (("    if v.dtype != q.dtype:  # reorder_and_upcast_attn", "    if k.dtype != q.dtype:  # reorder_and_upcast_attn"),),
        (f"{_BACKENDS}[dot_product-bfloat16-reorder_and_upcast-default]",),
        "attention='dot_product' with bfloat16 and reorder_and_upcast_attn raises 'value dtype should be float32'"),
    Mutation(
        "splash_ignores_the_padding_mask", "flax_gpt2/modeling/attention.py",
        (("    segments = (jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))\n",
          "    segments = jnp.ones((b, t), jnp.int32)\n"),),
        (f"{_BACKENDS}[splash-float32-plain-default]",),
        "with attention='splash' the tokens of a left-padded prompt attend to its padding"),
    Mutation(
        "auto_splash_on_tpu_v3", "flax_gpt2/modeling/attention.py",
        (('for old in ("v2", "v3"))', 'for old in ("v2",))'),),
        (f"{_AUTO}[TPU v3-tpu-xla-xla]",),
        "attention='auto' picks the splash kernel on TPU v3, which its Mosaic kernel does not support"),
    Mutation(
        "auto_splash_for_any_length", "flax_gpt2/modeling/attention.py",
        (('if platform == "tpu" and q.shape[1] % SPLASH_BLOCK == 0 and not any(',
          'if platform == "tpu" and not any('),),
        (f"{_AUTO}[TPU v4-tpu-splash-xla]",),
        "attention='auto' on TPU v4 picks splash for a sequence that does not tile into 128 blocks: an error"),
    # --- sampling -----------------------------------------------------------------------------------------
    Mutation(
        "warp_divides_by_temperature_after_top_k_and_top_p", "flax_gpt2/generation/logits_processors.py",
        (("    logits = apply_temperature(logits, _column(settings.temperature))\n", ""),
         ("    return _stage(stages.top_p, lambda x: jnp.where(p < 1, top_p_filter(x, p, min_tokens_to_keep), x), "
          "logits)",
          "    logits = _stage(stages.top_p, lambda x: jnp.where(p < 1, top_p_filter(x, p, min_tokens_to_keep), x), "
          "logits)\n    return apply_temperature(logits, _column(settings.temperature))")),
        (f"{_CHOOSE}[0.5-40-0.5]", "tests/test_sampling_strategies.py::test_temperature_comes_before_the_filters"),
        "sampling with top-k and top-p picks the nucleus before the temperature: other tokens than transformers"),
    Mutation(
        "top_k_keeps_one_more", "flax_gpt2/generation/logits_processors.py",
        (("jnp.clip(jnp.broadcast_to(k, logits.shape[:-1]), min_tokens_to_keep",
          "jnp.clip(jnp.broadcast_to(k + 1, logits.shape[:-1]), min_tokens_to_keep"),),
        ("tests/test_sampling_strategies.py::test_top_k_matches_transformers",
         "tests/test_sampling_strategies.py::test_top_k_per_row_matches_transformers_row_by_row"),
        "top_k=k samples among k + 1 tokens, in generate and in the server"),
    # --- serving ------------------------------------------------------------------------------------------
    Mutation(
        "serve_logprobs_of_the_tempered_logits", "flax_gpt2/serve/slots.py",
        (("        logprobs = jax.nn.log_softmax(x, axis=-1)\n",
          "        logprobs = jax.nn.log_softmax(x / rows.temperature[:, None], axis=-1)\n"),),
        (f"{_SERVE}test_sampled_logprobs_are_the_returned_tokens_teacher_forced",),
        "logprobs report the tempered distribution instead of the model's"),
    Mutation(
        "serve_logprob_of_the_most_likely_token", "flax_gpt2/serve/slots.py",
        (("        return jnp.take_along_axis(logprobs, token[:, None], axis=1)[:, 0], ids, values",
          "        return values[:, 0], ids, values"),),
        (f"{_SERVE}test_sampled_logprobs_are_the_returned_tokens_teacher_forced",),
        "a sampled token's logprob is the most likely token's (right for greedy only)"),
    Mutation(
        "serve_presence_and_frequency_swapped", "flax_gpt2/generation/logits_processors.py",
        (("    return logits - (_column(frequency) * counts + _column(presence) * (counts > 0).astype(jnp.float32))",
          "    return logits - (_column(presence) * counts + _column(frequency) * (counts > 0).astype(jnp.float32))"),),
        (f"{_SERVE}test_each_penalty_alone_follows_openais_formula",),
        "frequency_penalty acts as presence_penalty and the other way round"),
    Mutation(
        "serve_sampling_key_folds_the_column", "flax_gpt2/serve/slots.py",
        (("    keys = row_keys(rows, slots.pos - slots.start)",
          "    keys = row_keys(rows, slots.pos)"),),
        (f"{_SERVE}test_sampling_equals_generate_and_seeds_reproduce",),
        "a sampled request's key is folded with its column, not its step: other tokens than generate's"),
    Mutation(
        "serve_endoftext_in_prompt_is_plain_text", "flax_gpt2/serve/engine.py",
        (("self.tokenizer.encode(prompt, allowed_special=USER_TEXT_SPECIAL)", "self.tokenizer.encode(prompt)"),),
        (f"{_SERVE}test_endoftext_in_a_prompt_is_the_special_token",),
        "README's CommonGen prompt '<|endoftext|> kid, room, dance:' is served as 7 plain-text tokens"),
    Mutation(
        "serve_empty_stop_string_kept", "flax_gpt2/generation/detokenize.py",
        (("self.stop = tuple(s for s in stop if s)", "self.stop = tuple(stop)"),),
        (f"{_SERVE}test_an_empty_stop_string_is_ignored",),
        "stop=[''] cuts every completion to the empty string"),
    Mutation(
        "serve_several_steps_while_a_request_waits", "flax_gpt2/serve/engine.py",
        (("if self.decode_steps == 1 or self._waiting:", "if self.decode_steps == 1:"),),
        (f"{_SERVE}test_a_waiting_request_makes_the_running_one_step_once_per_call",),
        "a waiting request is admitted up to decode_steps - 1 steps late"),
    Mutation(
        "serve_engine_failure_forgets_the_waiting", "flax_gpt2/serve/engine.py",
        (("failed = [s for s in self._running if s is not None] + list(self._waiting)",
          "failed = [s for s in self._running if s is not None]"),),
        (f"{_SERVE}test_a_failed_step_fails_every_request_then_the_engine_serves_again",),
        "after a device failure, the requests that were waiting never get an answer"),
    Mutation(
        "serve_speculative_keeps_every_proposal", "flax_gpt2/serve/speculative_slots.py",
        (("    good = proposals == best[:, :k]\n", "    good = proposals == proposals\n"),),
        (f"{_SPEC}test_greedy_requests_equal_generate_while_sampled_ones_share_the_batch",),
        "serve --draft_model keeps the draft's proposals unchecked: the draft's text, not the model's"),
    Mutation(
        "serve_speculative_sampled_rows_keep_every_proposal", "flax_gpt2/serve/speculative_slots.py",
        (("    good = jnp.arange(k)[None, :] < kept[:, None]", "    good = jnp.arange(k)[None, :] < k"),),
        (f"{_SPEC}test_sampled_rows_keep_the_target_distribution[warped]",),
        "serve --draft_model keeps every sampled proposal: the draft's distribution, not the model's"),
    Mutation(
        "serve_speculative_rejected_token_drawn_from_p", "flax_gpt2/serve/speculative_slots.py",
        (("    pending = _draw(keys, pending_logits, k + 2)",
          "    pending = _draw(keys, p_warped[jnp.arange(n), kept], k + 2)"),),
        (f"{_SPEC}test_sampled_rows_keep_the_target_distribution[warped]",),
        "after a rejection the server draws from p instead of max(0, p - q): tokens the draft favours are too rare"),
    # --- evaluation ---------------------------------------------------------------------------------------
    Mutation(
        "perplexity_window_past_the_end", "flax_gpt2/evaluation/perplexity.py",
        (("        prev_end = end\n        if end == num_tokens:\n            break\n", "        prev_end = end\n"),),
        ("tests/test_evaluate.py::test_sliding_windows_score_every_token_once",),
        "sliding-window perplexity runs the model on windows that score nothing (same number, more compute)"),
    Mutation(
        "hellaswag_acc_norm_by_bytes", "flax_gpt2/evaluation/hellaswag.py",
        (("tuple(len(e) for e in endings)", "tuple(len(e.encode()) for e in endings)"),),
        (_HARNESS,),
        "harness-style acc_norm divides by UTF-8 bytes: another number than lm-eval for non-ASCII endings"),
    Mutation(
        "hellaswag_harness_acc_norm_by_tokens", "flax_gpt2/evaluation/hellaswag.py",
        (('    if examples.style == "nanogpt":\n        normalized = sum_loss / num_tokens\n',
          '    if True:\n        normalized = sum_loss / num_tokens\n'),),
        (_HARNESS,),
        "harness-style acc_norm divides by tokens (nanoGPT's rule) instead of lm-eval's characters"),
)
