"""Training configs for `python -m train --config configs/<name>.py`; each run config overrides `base`."""
