"""The lm-eval model `flax_gpt2`, registered lazily: `import flax_gpt2` makes `lm_eval --model flax_gpt2` and
`simple_evaluate(model="flax_gpt2", ...)` work, without importing lm_eval's heavy modules or ours.

`lm_eval` is an optional extra (`pip install -e ".[eval]"`); without it, registering does nothing.
"""

from __future__ import annotations

import importlib.util

MODEL_NAME = "flax_gpt2"  # the name in lm-eval's model registry (`simple_evaluate(model="flax_gpt2", ...)`)
_MODEL_TARGET = "flax_gpt2.evaluation.lm_eval_model:FlaxGPT2LM"
INSTALL_HINT = 'pip install -e ".[eval]" (or pip install "lm_eval>=0.4,<0.5")'


def require_lm_eval() -> None:
    """ModuleNotFoundError naming the `[eval]` extra when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError(f"lm-evaluation-harness (`lm_eval`) is not installed; it is the optional [eval] "
                                  f"extra: {INSTALL_HINT}", name="lm_eval")


def register_lm_eval_model() -> bool:
    """Registers the lm-eval model `flax_gpt2` (a lazy entry: `flax_gpt2.evaluation.lm_eval_model` is imported on first
    use). Returns False, doing nothing, when lm_eval is not installed or its registry is not the 0.4.x one.

    Costs a few milliseconds: only lm-eval's registry and its own lazy model table are imported.
    """
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:
        # lm-eval's own models go in first: its `get_model` fills an *empty* registry with them, so a registry
        # holding only `flax_gpt2` would otherwise hide "hf" and the rest.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=_MODEL_TARGET)
    except (ImportError, AttributeError, TypeError):  # an lm_eval without the lazy Registry (older 0.4.x)
        return False
    return True
