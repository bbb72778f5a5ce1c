"""LoRA on CommonGen: `configs/finetune_commongen.py` with gpt2-medium frozen and low-rank adapters trained,
sized for one Colab GPU (a T4's 16 GB) or TPU.

    python -m train --config configs/finetune_commongen_lora.py --workdir runs/commongen-lora
    python -m flax_gpt2.convert --model runs/commongen-lora --out commongen-lora --format peft

Only the adapters (rank 16 on every attention and MLP projection: ~6M of 355M weights) get gradients and
AdamW moments, so the memory that full fine-tuning spends on optimizer state goes to the batch; checkpoints
hold only the adapters (~75 MB with their moments instead of ~4 GB). LoRA wants a larger learning rate than
full fine-tuning (PEFT's examples use 1e-4 to 3e-4); the run keeps the recipe's data, epochs and schedule.
"""

from flax_gpt2.configs import finetune_commongen


def get_config():
    c = finetune_commongen.get_config()
    c.init_from = "gpt2-medium"
    c.lora.rank = 16
    c.lora.alpha = 32.0  # scale alpha / rank = 2
    c.lora.dropout = 0.05
    c.lora.targets = "c_attn,c_proj,c_fc"  # every linear layer of the blocks (c_proj: attention's and the MLP's)
    c.optimizer.lr = 2e-4
    return c
