"""The model: its config and presets, the Flax modules, attention backends, the KV cache, and the two parameter
layouts (per-layer and scanned). Depends on nothing else in flax_gpt2 but `utils`."""
