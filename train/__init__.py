"""The training application: sharded GPT-2 training, from one CPU to a TPU pod (see train_loop.py).

It lives in `train/` in the repository (`python -m train` from a checkout) and installs as
`flax_gpt2.train` (`python -m flax_gpt2.train`); its modules import each other as `flax_gpt2.train.*`, so
the two entry points run the same modules.
"""
