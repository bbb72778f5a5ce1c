"""`data.loss_on="completion"` (train/loss_mask.py): the corpus's per-token mask (prompt_completion and CommonGen
recipes), the step's masked mean against one computed by hand from the model's logits, gradient accumulation,
the eval loss, and the errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_train_config

import flax_gpt2
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from flax_gpt2.train import config_checks, data, loss_mask, run_guard, step as step_lib, tokenize_corpus as tc


def _model():
    config = flax_gpt2.GPT2Config.from_preset("tiny", n_embd=32, vocab_size=1024, attn_pdrop=0.0, resid_pdrop=0.0,
                                              embd_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    return model, init_params(model, jax.random.key(0))


def _batch(a: int, b: int, t: int = 12, seed: int = 0):
    """Tokens `[a, b, t+1]` and a 0/1 mask whose rows hold very different numbers of scored tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, (a * b, t + 1)).astype(np.int32)
    mask = (rng.random((a * b, t + 1)) < np.linspace(0.1, 0.9, a * b)[:, None]).astype(np.uint8)
    mask[0, 1:] = 0
    mask[0, 3] = 1  # one row with a single scored target
    return tokens.reshape(a, b, t + 1), mask.reshape(a, b, t + 1)


def _hand_masked_mean(model, params, tokens, mask) -> float:
    """sum(mask * nll) / sum(mask) over predicted positions, in float64 numpy from the model's logits."""
    tokens, mask = tokens.reshape(-1, tokens.shape[-1]), mask.reshape(-1, mask.shape[-1])
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens[:, :-1])).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = log_z - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:].astype(np.float64)  # target-side: the predicted token decides
    return float((nll * weights).sum() / weights.sum())


def _train_step(model, tmp_path, loss_on):
    opt = tiny_train_config(tmp_path).optimizer
    tx, schedule = step_lib.make_optimizer(opt, 10)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=_model()[1], opt_state=None)
    state = state.replace(opt_state=tx.init(state.params))
    return jax.jit(step_lib.make_train_step(model, tx, schedule, loss_on=loss_on)), state


def test_the_step_loss_is_the_hand_computed_masked_mean(tmp_path):
    model, params = _model()
    tokens, mask = _batch(1, 4)
    step, state = _train_step(model, tmp_path, "completion")
    _, metrics = step(state, jnp.asarray(loss_mask.pack(tokens, mask)), jax.random.key(1))
    hand = _hand_masked_mean(model, params, tokens, mask)
    assert abs(float(metrics["loss"]) - hand) <= 1e-6 * hand
    # The mask matters: the unmasked mean is another number.
    assert abs(_hand_masked_mean(model, params, tokens, np.ones_like(mask)) - hand) > 1e-3
    # The eval step gives the same masked sum and count.
    total, count = np.asarray(step_lib.make_eval_step(model, loss_on="completion")(
        params, jnp.asarray(loss_mask.pack(tokens, mask).reshape(1, 4, -1))))
    assert count == mask[..., 1:].sum() and abs(total / count - hand) <= 1e-6 * hand


def test_accumulation_gives_the_full_batch_masked_mean(tmp_path):
    model, params = _model()
    tokens, mask = _batch(4, 1)
    step, state = _train_step(model, tmp_path, "completion")
    packed = loss_mask.pack(tokens, mask)
    whole_state, whole = step(state, jnp.asarray(packed.reshape(1, 4, -1)), jax.random.key(1))
    step, state = _train_step(model, tmp_path, "completion")
    accumulated_state, accumulated = step(state, jnp.asarray(packed), jax.random.key(1))
    hand = _hand_masked_mean(model, params, tokens, mask)
    assert abs(float(whole["loss"]) - hand) <= 1e-6 * hand
    assert abs(float(accumulated["loss"]) - hand) <= 1e-6 * hand
    np.testing.assert_allclose(float(accumulated["grad_norm"]), float(whole["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 accumulated_state.params, whole_state.params)
    # Averaging the micro-batches' own means (what "all" does) would weight rows with few scored tokens up.
    means = [_hand_masked_mean(model, params, tokens[i:i + 1], mask[i:i + 1]) for i in range(4)]
    assert abs(np.mean(means) - hand) > 1e-2


def test_loss_on_all_is_the_plain_mean_and_reads_plain_tokens(tmp_path):
    model, params = _model()
    tokens, mask = _batch(2, 2)
    step, state = _train_step(model, tmp_path, "all")
    _, metrics = step(state, jnp.asarray(tokens), jax.random.key(1))
    hand = _hand_masked_mean(model, params, tokens, np.ones_like(mask))
    assert abs(float(metrics["loss"]) - hand) <= 1e-6 * hand
    step, state = _train_step(model, tmp_path, "completion")
    _, all_scored = step(state, jnp.asarray(loss_mask.pack(tokens, np.ones_like(mask))), jax.random.key(1))
    assert abs(float(all_scored["loss"]) - hand) <= 1e-6 * hand


def _encode(text):
    return tc.gpt2_encoding().encode_ordinary(text)


def test_prompt_completion_corpus_writes_the_mask(tmp_path):
    source = tmp_path / "sft.jsonl"
    source.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " A: 4"}) + "\n\n"
                      + json.dumps({"prompt": "Hi", "completion": " there"}) + "\n")
    meta = tc.tokenize_corpus(str(source), str(tmp_path / "corpus"), recipe="prompt_completion", progress=False)
    store = data.TokenStore(str(tmp_path / "corpus"))
    tokens, mask = store.read(0, len(store)), store.read(0, len(store), store.masks)
    first = _encode("Q: 2+2?") + _encode(" A: 4") + [50256]
    assert tokens.tolist() == first + [17250, 612, 50256]  # "Hi", " there", <|endoftext|>
    n_prompt = len(_encode("Q: 2+2?"))
    assert mask.tolist() == [0] * n_prompt + [1] * (len(first) - n_prompt) + [0, 1, 1]
    assert meta["loss_mask"]["num_scored"] == int(mask.sum())
    assert (tmp_path / "corpus" / "mask_00000.bin").stat().st_size == len(tokens)
    # Windows carry the mask in the ids' bit 16 only when asked to.
    plain, scored = (data.Windows(store, 0, len(store), 4, s).read(np.array([1])) for s in (False, True))
    np.testing.assert_array_equal(plain[0], tokens[4:9])
    np.testing.assert_array_equal(scored[0], tokens[4:9] + (mask[4:9].astype(np.int32) << 16))


def test_commongen_mask_covers_the_sentence_and_its_endoftext(tmp_path):
    (tmp_path / "cg.src_alpha.txt").write_text("kid room dance\nski mountain\n")
    (tmp_path / "cg.tgt.txt").write_text("A kid dances in the room.\nI ski down a mountain, fast.\n")
    tc.tokenize_corpus(str(tmp_path / "cg.src_alpha.txt"), str(tmp_path / "corpus"), recipe="commongen",
                       progress=False)
    store = data.TokenStore(str(tmp_path / "corpus"))
    tokens, mask = store.read(0, len(store)), store.read(0, len(store), store.masks)
    decode = tc.gpt2_encoding().decode
    ends = [i + 1 for i, t in enumerate(tokens) if t == 50256]
    docs = [(tokens[a:b], mask[a:b]) for a, b in zip([0] + ends[:-1], ends)]
    assert [decode(t[m == 0].tolist()) for t, m in docs] == [" kid, room, dance:", " ski, mountain:"]
    assert [decode(t[m == 1].tolist()) for t, m in docs] == [" A kid dances in the room.<|endoftext|>",
                                                               " I ski down a mountain, fast.<|endoftext|>"]
    # The tokens are the whole document's encoding (the card's format, as before the mask existed).
    assert tokens.tolist() == _encode(" kid, room, dance: A kid dances in the room.") + [50256] + _encode(
        " ski, mountain: I ski down a mountain, fast.") + [50256]


def test_errors_name_the_problem(tmp_path):
    config = tiny_train_config(tmp_path, **{"data.loss_on": "prompt"})
    with pytest.raises(config_checks.ConfigValueError, match=r"data\.loss_on='prompt': must be one of"):
        config_checks.check_config(config)
    with pytest.raises(ValueError, match=r"data\.loss_on='none'"):
        step_lib.make_loss_fn(_model()[0], loss_on="none")
    (tmp_path / "plain.txt").write_text("no prompts here")
    tc.tokenize_corpus(str(tmp_path / "plain.txt"), str(tmp_path / "plain"), progress=False)
    store = data.TokenStore(str(tmp_path / "plain"))
    assert store.masks is None and loss_mask.check_corpus("all", store.meta, store.folder) is False
    with pytest.raises(ValueError, match=r"^data\.loss_on='completion' needs .* no loss mask: tokenize it with a "
                                         r"recipe that has prompts .*'prompt_completion'"):
        loss_mask.check_corpus("completion", store.meta, store.folder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "only"}) + "\n")
    with pytest.raises(KeyError, match=r"bad\.jsonl:2: a prompt_completion record needs .* missing \['completion'\]"):
        tc.tokenize_corpus(str(bad), str(tmp_path / "bad"), recipe="prompt_completion", progress=False)
    bad.write_text(json.dumps({"prompt": "a", "completion": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'completion' must be a string"):
        tc.tokenize_corpus(str(bad), str(tmp_path / "bad"), recipe="prompt_completion", progress=False)


def test_a_damaged_mask_is_named(tmp_path):
    source = tmp_path / "sft.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", "completion": " there"}) + "\n")
    tc.tokenize_corpus(str(source), str(tmp_path / "corpus"), recipe="prompt_completion", progress=False)
    (tmp_path / "corpus" / "mask_00000.bin").write_bytes(b"\x00\x02\x01")
    with pytest.raises(data.CorpusError, match=r"mask_00000\.bin holds 2 at position 1; a loss mask holds only 0"):
        data.TokenStore(str(tmp_path / "corpus"))
    (tmp_path / "corpus" / "mask_00000.bin").write_bytes(b"\x00")
    with pytest.raises(data.CorpusError, match=r"mask_00000\.bin is 1 bytes but the loss mask needs one byte"):
        data.TokenStore(str(tmp_path / "corpus"))


def test_old_runs_resume_with_loss_on_all():
    current = {"data.loss_on": "all", "data.recipe": "commongen"}
    older = {"data.recipe": "commongen"}
    assert run_guard.check_resume_config(older, current, allow_change=False, workdir="w") == {}
    with pytest.raises(run_guard.ConfigChangedError, match=r"data\.loss_on: '<absent>' -> 'completion'"):
        run_guard.check_resume_config(older, dict(current, **{"data.loss_on": "completion"}), allow_change=False,
                                      workdir="w")


def test_a_tiny_completion_run_trains_and_a_corpus_without_prompts_is_refused(tmp_path):
    from flax_gpt2.train.train_loop import train_and_evaluate

    rng = np.random.default_rng(0)
    words = "the a king queen sword crown river night day speaks runs falls rises".split()
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words, 6)) + ":",
                                          "completion": " " + " ".join(rng.choice(words, rng.integers(2, 12)))}) + "\n"
                              for _ in range(300)))
    settings = dict(steps=2, eval_every=2, checkpoint_every=2, eval_batch_size=4, micro_batch_size=4)
    config = tiny_train_config(tmp_path / "cache", **settings, **{
        "data.source": str(source), "data.recipe": "prompt_completion", "data.loss_on": "completion",
        "data.val_fraction": 0.2})
    result = train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert result["step"] == 2 and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_loss" in r] == [2]
    text = tmp_path / "plain.txt"
    text.write_text(" ".join(rng.choice(words, 3000)))
    config = tiny_train_config(tmp_path / "cache", **settings, **{"data.source": str(text),
                                                                 "data.loss_on": "completion"})
    with pytest.raises(ValueError, match=r"data\.loss_on='completion' needs a corpus"):
        train_and_evaluate(config, str(tmp_path / "run2"))
