"""`python -m train`: sharded GPT-2 training, from one CPU to a TPU pod (see train/train_loop.py)."""
