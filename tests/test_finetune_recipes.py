"""The model-card fine-tuning recipes end to end on tiny models: CommonGen and ELI5 configs train, evaluate
per epoch, report coverage, sample with the card's prompt, and export to a folder transformers loads; with
`--config.lora.rank`, they train adapters only and export them for PEFT."""

import json

import numpy as np
import pytest
from conftest import make_hf_model

from flax_gpt2.train import config_cli, train_loop


def _run(config_file, workdir, *overrides):
    config, _ = config_cli.parse_args(["train", "--config", config_file, "--workdir", str(workdir), *overrides])
    return train_loop.train_and_evaluate(config, str(workdir))


def _records(path):
    return [json.loads(line) for line in open(path)]


TINY = ["--config.init_from=", "--config.model.preset=tiny", "--config.model.dtype=float32",
        "--config.progress_bar=False", "--config.checkpoint_every=1000"]


def _eli5_file(tmp_path, shared_dir):
    """A local ELI5-shaped jsonl (question + answer records, from Tiny Shakespeare's lines)."""
    lines = [ln for ln in (shared_dir / "data" / "tinyshakespeare.txt").read_text().splitlines() if ln.strip()]
    sample_file = tmp_path / "eli5.jsonl"
    with open(sample_file, "w") as f:
        for i in range(0, 1200, 4):
            f.write(json.dumps({"question": lines[i], "answer": " ".join(lines[i + 1:i + 4])}) + "\n")
    return sample_file


@pytest.fixture(scope="module")
def commongen_run(tmp_path_factory, shared_dir):
    src = shared_dir / "data" / "commongen" / "commongen.dev.jsonl"
    small = tmp_path_factory.mktemp("cg_data") / "cg.jsonl"
    small.write_text("".join(open(src).readlines()[:60]))
    workdir = tmp_path_factory.mktemp("cg_run")
    overrides = [*TINY, f"--config.data.source={small}", f"--config.data.tokenizer={shared_dir / 'gpt2-bpe'}",
                 f"--config.data.cache_dir={workdir}/cache", "--config.data.seq_len=64",
                 "--config.data.val_fraction=0.2", "--config.batch_size=8", "--config.epochs=2",
                 "--config.eval_every=0", "--config.optimizer.lr=1e-3", "--config.optimizer.warmup_steps=2",
                 "--config.coverage_sets=3"]
    config, _ = config_cli.parse_args(["train", "--config", "configs/finetune_commongen.py", "--workdir", str(workdir),
                                       *overrides])
    return workdir, train_loop.train_and_evaluate(config, str(workdir)), config


def test_commongen_trains_evaluates_per_epoch_and_reports_coverage(commongen_run):
    workdir, result, _ = commongen_run
    records = _records(workdir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    assert all(r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-6) for r in evals)
    coverage = [r for r in records if "coverage" in r]
    assert len(coverage) == 1 and coverage[0]["coverage_sets"] == 3
    samples = _records(workdir / "commongen_samples.jsonl")
    assert len(samples) == 3 and all(s["concepts"] for s in samples)
    # The logged figure is the mean of the samples' coverage, each recomputed from its sentence.
    from flax_gpt2.train import recipes
    assert all(s["coverage"] == recipes.coverage(s["concepts"], s["sentence"]) for s in samples)
    assert coverage[0]["coverage"] == pytest.approx(np.mean([s["coverage"] for s in samples]), abs=1e-12)
    assert result["coverage"] == coverage[0]["coverage"]


def test_commongen_prompts_are_left_padded_for_generate(bpe_dir, monkeypatch):
    """The card's prompt, `<|endoftext|>` + " kid, room, dance:", ends at the last column of each row."""
    from types import SimpleNamespace

    from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
    from flax_gpt2.train import commongen_eval, recipes

    tok = get_tokenizer(bpe_dir)
    eot = tok.eot_token
    answer = tok.encode(" A kid dances in the room.")
    calls = []

    def fake_generate(model, params, ids, mask, **kwargs):
        calls.append((ids, mask))
        return np.concatenate([ids, np.tile(np.int32(answer), (len(ids), 1))], axis=1)

    monkeypatch.setattr(commongen_eval, "generate", fake_generate)
    sets = [["kid", "room", "dance"], ["ski", "mountain"], ["dog", "frisbee", "catch", "throw"]]
    result = commongen_eval.commongen_coverage(None, None, SimpleNamespace(tokenizer=str(bpe_dir)), sets, None,
                                               batch_size=2)
    assert [r["sentence"] for r in result["samples"]] == ["A kid dances in the room."] * 3
    assert result["samples"][0]["coverage"] == 1.0
    for (ids, mask), chunk in zip(calls, (sets[:2], sets[2:]), strict=True):
        prompts = [[eot] + tok.encode(recipes.commongen_prompt(c)) for c in chunk]
        width = max(map(len, prompts))
        assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (len(chunk), width)
        for row, row_mask, prompt in zip(ids, mask, prompts):
            pad = width - len(prompt)
            assert row.tolist() == [eot] * pad + prompt and row_mask.tolist() == [0] * pad + [1] * len(prompt)


def test_commongen_held_out_sets_are_not_trained_on(commongen_run):
    """The coverage sets come from the held-out tail of the stream: none of their scenes were trained on."""
    from flax_gpt2 import get_tokenizer
    from flax_gpt2.train import commongen_eval, data

    _, _, config = commongen_run
    store = data.load_tokens(config.data, progress=False)
    cut = data.split_point(store, config.data.val_fraction, config.data.seq_len)
    sets = commongen_eval.held_out_concept_sets(config.data, cut, 100)
    trained = get_tokenizer(config.data.tokenizer).decode(store.read(0, cut).tolist())
    trained_prompts = {doc.split(":", 1)[0].strip() for doc in trained.split("<|endoftext|>") if ":" in doc}
    assert sets and not any(", ".join(s) in trained_prompts for s in sets)


def test_sample_cli_on_commongen_run(commongen_run, capsys):
    from flax_gpt2 import sample

    workdir, _, _ = commongen_run
    assert 0 == sample.main(["--model", str(workdir), "--prompt", "<|endoftext|> kid, room, dance:", "--stop_token", ".",
                 "--max_new_tokens", "8", "--greedy", "--no_progress", "--cache_dir", str(workdir / "sample_cache")])
    out = capsys.readouterr().out
    assert "." not in out.strip().split("kid, room, dance:")[-1]  # cut at the stop token


def test_eli5_card_recipe_per_epoch_table_and_export(tmp_path, shared_dir):
    import torch
    import transformers

    sample_file = _eli5_file(tmp_path, shared_dir)
    workdir = tmp_path / "run"
    result = _run("configs/finetune_eli5.py", workdir, *TINY, f"--config.data.source={sample_file}",
                  f"--config.data.tokenizer={shared_dir / 'gpt2-bpe'}", f"--config.data.cache_dir={tmp_path}/cache",
                  "--config.batch_size=8", "--config.optimizer.lr=1e-3")
    records = _records(workdir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]  # the card's per-epoch table
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    lrs = [r["lr"] for r in records if "lr" in r]
    # linear decay to 0 with no warmup: the last of N steps runs at lr / N (as transformers' scheduler)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-3 / result["step"], rel=1e-5)
    assert result["step"] == evals[-1]["step"]

    from flax_gpt2 import convert

    hf_dir = convert.convert(str(workdir), str(tmp_path / "hf"), progress=False)
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    import flax_gpt2

    model, params = flax_gpt2.from_pretrained(str(workdir), progress=False)
    ids = np.arange(20, dtype=np.int64)[None] * 37
    ours = np.asarray(model.apply({"params": params}, ids.astype(np.int32)).logits)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_linear_schedule_matches_transformers():
    import torch
    import transformers

    from flax_gpt2.configs import base
    from flax_gpt2.train import step

    opt = base.get_config().optimizer
    opt.schedule, opt.lr, opt.warmup_steps = "linear", 2e-5, 10
    ours = step.make_schedule(opt, 100)
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    ref = transformers.get_linear_schedule_with_warmup(torch_opt, 10, 100)
    for s in range(100):
        assert float(ours(s)) == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-12), s  # optax runs in float32
        torch_opt.step()
        ref.step()


def test_eli5_recipe_with_lora_trains_adapters_only_and_exports_for_peft(tmp_path, tmp_path_factory, shared_dir):
    """`configs/finetune_eli5.py --config.lora.rank=8` on a tiny base: the checkpoint holds only adapters (and
    their moments), step 1's loss is the base's (a full fine-tune's first loss on the same batch), the loss
    goes down, and `convert --format peft` writes an adapter that loads onto the base with the run's logits."""
    import jax

    import flax_gpt2
    from flax_gpt2 import convert
    from flax_gpt2.checkpoints import run_adapters, run_folders

    _, base_dir = make_hf_model(tmp_path_factory, name="eli5_base", randomize=True)
    data = [f"--config.data.source={_eli5_file(tmp_path, shared_dir)}",
            f"--config.data.tokenizer={shared_dir / 'gpt2-bpe'}", f"--config.data.cache_dir={tmp_path}/cache",
            f"--config.init_from={base_dir}", "--config.model.dropout=0.0", "--config.log_every=1",
            "--config.epochs=0", "--config.batch_size=8"]
    steps = 6
    lora_run = tmp_path / "lora"
    result = _run("configs/finetune_eli5.py", lora_run, *TINY, *data, f"--config.steps={steps}",
                  "--config.lora.rank=8", "--config.optimizer.lr=1e-2", "--config.checkpoint_every=3")
    assert result["stopped"] == "done" and result["step"] == steps
    losses = [r["loss"] for r in _records(lora_run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == steps and np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0], losses

    # Step 1's loss is the base model's on the first batch: LoRA's B starts at 0 (same seed, same batch order).
    full_run = tmp_path / "full"
    _run("configs/finetune_eli5.py", full_run, *TINY, *data, "--config.steps=1")
    full_first = [r["loss"] for r in _records(full_run / "metrics.jsonl") if "loss" in r][0]
    assert losses[0] == pytest.approx(full_first, abs=1e-5), (losses[0], full_first)

    # Only adapters (and their optimizer state) in every checkpoint.
    manager = run_folders.reader(lora_run)
    try:
        for step in (3, steps):
            saved = manager.item_metadata(step)
            for item in ("params", "opt_state"):
                tree = getattr(saved[item], "tree", saved[item])
                names = {getattr(path[-1], "key", None) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
                         if len(getattr(leaf, "shape", ())) >= 2}
                assert names == {"lora_a", "lora_b"}, (step, item, names)
    finally:
        manager.close()
    adapters, lora, base = run_adapters.load_run_adapter(lora_run)
    assert lora.rank == 8 and lora.targets == ("c_attn",) and base["init_from"] == str(base_dir)

    # The PEFT export loads back onto the base (the weights hash checked) as the run's model.
    out = tmp_path / "adapter"
    assert convert.main(["--model", str(lora_run), "--out", str(out), "--format", "peft", "--no_progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    model, base_params = flax_gpt2.from_pretrained(str(base_dir), progress=False)
    _, exported = flax_gpt2.from_pretrained(str(base_dir), adapter=str(out), progress=False)
    ids = (np.arange(20, dtype=np.int32)[None] * 37) % 50257
    logits = lambda params: np.asarray(model.apply({"params": params}, ids).logits)  # noqa: E731
    ours = logits(flax_gpt2.merge_adapter(base_params, adapters, lora))
    np.testing.assert_allclose(logits(exported), ours, atol=1e-5)
    assert np.abs(ours - logits(base_params)).max() > 1e-4  # the trained adapter changes the model
