"""Evaluation: sliding-window perplexity and LAMBADA (`perplexity`), HellaSwag (`hellaswag`), and the
lm-evaluation-harness model (`lm_eval_model`), its lazy registration and its task runner."""
