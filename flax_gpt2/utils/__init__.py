"""What every layer uses and that knows nothing of GPT-2: paths and atomic writes (local and gs://), the command
line's conventions, dtype names, the cache root."""
