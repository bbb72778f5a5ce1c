"""An OpenAI-compatible completions server for flax_gpt2 models, with continuous batching.

    python -m flax_gpt2.serve --model gpt2 [--host 127.0.0.1] [--port 8000] [--max_batch 8] [--context_length 1024]

`Engine` runs the decode slots on its own thread; `create_app` is the Starlette app in front of it.
"""

from flax_gpt2.serve.api import create_app
from flax_gpt2.serve.engine import Engine

__all__ = ["Engine", "create_app"]
