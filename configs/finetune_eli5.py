"""Fine-tune distilgpt2 on ELI5 with the hyperparameters of the distilgpt2-ELI5 model card.

    python -m train --config configs/finetune_eli5.py --workdir runs/eli5
    python -m train --config configs/finetune_eli5.py --workdir runs/eli5-local --config.data.source=eli5.jsonl

Card: learning rate 2e-5, batch 8, seed 42, Adam betas (0.9, 0.999), eps 1e-8, linear schedule, 3 epochs.
As Hugging Face's causal-LM tutorial (which made that card) does, each record's answers are joined into one
text and the texts are grouped into fixed 128-token blocks; 20% of the first 5,000 records are held out. The
run logs eval loss and perplexity at the end of every epoch (metrics.jsonl `epoch`, `eval_loss`,
`eval_perplexity`), the card's results table.
Sources: `eli5_category` on the hub (`answers.text`), or local json/jsonl with `answers`/`answer` fields.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.init_from = "distilgpt2"
    c.seed = 42
    c.model.dropout = 0.1  # transformers trains with the checkpoint's dropout (0.1)
    c.data.recipe = "eli5"
    c.data.source = "eli5_category"
    c.data.split = "train[:5000]"
    c.data.seq_len = 128  # the tutorial's block_size
    c.data.val_fraction = 0.2
    c.batch_size = 8
    c.epochs = 3
    c.optimizer.lr = 2e-5
    c.optimizer.schedule = "linear"  # from lr down to 0 over all steps, no warmup (transformers' default)
    c.optimizer.warmup_steps = 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01  # the tutorial's TrainingArguments(weight_decay=0.01)
    c.optimizer.grad_clip = 1.0  # transformers' max_grad_norm default
    c.eval_every = 0  # 0 with epochs: evaluate at the end of every epoch
    c.eval_batches = 0  # 0 = the whole held-out split
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
