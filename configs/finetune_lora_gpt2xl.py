"""LoRA fine-tuning of GPT-2 XL (1558M) at T=1024 on a single TPU v5e chip (16 GiB of HBM).

    python -m train --config configs/finetune_lora_gpt2xl.py --workdir runs/xl-lora \
        --config.data.source=my_corpus.jsonl
    python -m train --config configs/finetune_lora_gpt2xl.py --workdir W --config.compile_only=v5litepod-1

Full fine-tuning needs the fp32 params and both AdamW moments, 25 GB, before any activation: it cannot fit
one chip (`--config.lora.rank=0` with compile_only says so). With LoRA the base is frozen and kept in
bfloat16 (3.1 GB); the adapters (rank 16 on attention and MLP: ~19M weights) and their moments are ~0.2 GB,
which leaves the chip to the activations: rematerialized, scanned blocks and 16 accumulated micro-batches
of 2 x 1024 tokens. The merged kernels (`lora.apply_lora`: W + scale * A @ B) and their gradients are
transients of the step for all 48 layers at once, so targets cost memory too: compile_only measured 13.3 GiB
per chip with all four projections at micro-batch 2 (12.2 GiB with `c_attn,c_proj`, 10.9 GiB with `c_attn`),
and 22.5 GiB (does not fit) at micro-batch 4. On more chips, `--config.mesh.fsdp=N` shards the base (and
`micro_batch_size` a multiple of N).
"""

from flax_gpt2.configs import finetune


def get_config():
    c = finetune.get_config()
    c.init_from = "gpt2-xl"
    c.model.remat = True
    c.model.scan_layers = True
    c.data.seq_len = 1024
    c.batch_size = 32
    c.micro_batch_size = 2
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = "c_attn,c_proj,c_fc"
    c.lora.base_dtype = "bfloat16"
    c.optimizer.lr = 2e-4
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
