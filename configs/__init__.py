"""Training configs: `python -m train --config configs/<name>.py` from a checkout, `python -m flax_gpt2.train
--config <name>` installed (flax_gpt2.configs). Each run config only overrides `base`."""
