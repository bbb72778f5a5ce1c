"""Evaluation equals transformers PyTorch computing the same thing on the same weights."""

import json
import math

import numpy as np
import pytest
import torch

import flax_gpt2
from flax_gpt2.evaluation import perplexity as eval_metrics
from flax_gpt2 import evaluate


@pytest.fixture(scope="module")
def tiny(hf_tiny, bpe_dir):
    torch_model, folder = hf_tiny
    model, params = flax_gpt2.from_pretrained(str(folder), progress=False)
    tokenizer = flax_gpt2.get_tokenizer(bpe_dir)
    return torch_model, model, params, tokenizer, folder


@pytest.fixture(scope="module")
def shakespeare_ids(shared_dir, tiny):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:6000]
    return tiny[3].encode(text)


def torch_sliding_nll(torch_model, ids, window_length, stride):
    """HF's perplexity guide, scoring with per-token sums so the mean is exact. Returns (mean nll, tokens
    scored, model calls): every call of the guide's loop scores at least one token."""
    ids = torch.tensor(ids)[None]
    nll_sum, count, prev_end, calls = 0.0, 0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window_length, ids.shape[1])
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = torch_model(window).logits[:, :-1].double()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll_sum += loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        assert scored > 0
        count += scored
        calls += 1
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll_sum / count, count, calls


@pytest.mark.parametrize("window_length,stride", [(128, 64), (128, 128), (96, 40)])
def test_perplexity_matches_transformers(tiny, shakespeare_ids, window_length, stride):
    torch_model, model, params, _, _ = tiny
    ours = eval_metrics.perplexity(model, params, shakespeare_ids, stride=stride, window_length=window_length,
                                   batch_size=4, progress=False)
    nll, count, calls = torch_sliding_nll(torch_model, shakespeare_ids, window_length, stride)
    assert (ours["num_tokens"], ours["num_windows"]) == (count, calls)
    if stride < window_length:  # with overlap every token but the first is scored; else window starts are not
        assert count == len(shakespeare_ids) - 1
    assert ours["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_sliding_windows_score_every_token_once():
    for n, length, stride in [(1000, 128, 64), (129, 128, 127), (5, 128, 3), (300, 100, 99)]:
        scored = [i for w in eval_metrics.sliding_windows(n, length, stride) for i in range(w.score_from, w.end)]
        assert scored == list(range(1, n))
        windows = eval_metrics.sliding_windows(n, length, stride)
        assert all(w.end - w.begin <= length and w.end > w.score_from for w in windows)  # none scores nothing
        assert len(windows) == 1 + max(0, -(-(n - length) // stride))  # HF's loop: until a window reaches the end
    # No overlap (stride == window_length): each window's first token has no context, as in HF's guide.
    scored = [i for w in eval_metrics.sliding_windows(300, 100, 100) for i in range(w.score_from, w.end)]
    assert scored == [i for i in range(300) if i % 100]


def torch_lambada(torch_model, hf_tokenizer, texts):
    """lm-eval-harness lambada_openai: encode context+target, score the target tokens."""
    logprob_sums, correct = [], 0
    for text in texts:
        context, word = text.rsplit(" ", 1)
        whole = hf_tokenizer(context + " " + word)["input_ids"]
        ctx = hf_tokenizer(context)["input_ids"]
        target = whole[len(ctx):]
        ids = torch.tensor(ctx + target)[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(torch_model(ids).logits[0, :-1].double(), -1)
        rows = logprobs[len(ctx) - 1:]
        logprob_sums.append(sum(rows[i, t].item() for i, t in enumerate(target)))
        correct += all(int(rows[i].argmax()) == t for i, t in enumerate(target))
    return correct / len(texts), math.exp(-sum(logprob_sums) / len(texts))


def _greedy_word_examples(torch_model, tokenizer, contexts, want):
    """Texts whose last word is the model's own greedy next token, so accuracy is not trivially 0."""
    out = []
    for context in contexts:
        with torch.no_grad():
            nxt = int(torch_model(torch.tensor([tokenizer.encode(context)])).logits[0, -1].argmax())
        piece = tokenizer.decode([nxt])
        if piece.startswith(" ") and piece[1:].isalpha() and tokenizer.encode(context + piece)[-1] == nxt:
            out.append(context + piece)
        if len(out) == want:
            break
    return out


def _first_token_only_examples(torch_model, tokenizer, contexts, want):
    """Texts whose last word is two tokens: the model's greedy next token (a word), then a suffix that is not
    the greedy token after it. Right on the first target token, wrong on the second."""
    out = []
    for context in contexts:
        ids = tokenizer.encode(context)
        with torch.no_grad():
            first = int(torch_model(torch.tensor([ids])).logits[0, -1].argmax())
            second = int(torch_model(torch.tensor([ids + [first]])).logits[0, -1].argmax())
        piece = tokenizer.decode([first])
        if not (piece.startswith(" ") and piece[1:].isalpha()):
            continue
        for suffix in ("s", "ing", "ed", "ly", "er", "est"):
            whole = tokenizer.encode(context + piece + suffix)
            if whole[:-1] == ids + [first] and len(whole) == len(ids) + 2 and whole[-1] != second:
                out.append(context + piece + suffix)
                break
        if len(out) == want:
            break
    return out


def test_lambada_matches_transformers(tiny, shared_dir, bpe_dir):
    import transformers

    torch_model, model, params, tokenizer, _ = tiny
    lines = [ln.strip() for ln in (shared_dir / "data" / "tinyshakespeare.txt").read_text().splitlines()
             if len(ln.split()) >= 4][:400]
    contexts = [" ".join(ln.split()[:-1]) for ln in lines[:200]]
    greedy = _greedy_word_examples(torch_model, tokenizer, contexts, 4)
    assert greedy, "expected some lines whose greedy next token is a word"
    first_only = _first_token_only_examples(torch_model, tokenizer, contexts[100:], 3)
    assert len(first_only) == 3, "expected lines whose greedy next token starts a two-token word"
    texts = lines[200:212] + greedy + first_only
    # (transformers 5.x: the vocab_file=/merges_file= keywords silently build an empty vocabulary)
    hf_tok = transformers.GPT2Tokenizer(vocab=str(bpe_dir / "encoder.json"), merges=str(bpe_dir / "vocab.bpe"))
    assert hf_tok("Hello world")["input_ids"] == [15496, 995]
    ref_acc, ref_ppl = torch_lambada(torch_model, hf_tok, texts)
    score = eval_metrics.make_scorer(model)
    ours = eval_metrics.lambada(model, params, tokenizer, texts, batch_size=4, progress=False, scorer=score)
    assert ours["num_examples"] == len(texts)
    assert ours["accuracy"] == ref_acc and ours["accuracy"] >= len(greedy) / len(texts)
    assert ours["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    # A word is right only if every one of its tokens is the greedy prediction.
    assert torch_lambada(torch_model, hf_tok, first_only)[0] == 0.0
    assert eval_metrics.lambada(model, params, tokenizer, first_only, batch_size=4, progress=False,
                                scorer=score)["accuracy"] == 0.0


def test_lambada_counts_a_word_right_only_when_every_token_is(bpe_dir):
    """A stand-in model whose greedy prediction is right except on chosen token ids (the scorer's contract:
    log-prob and is-greedy of each next token), on final words of one to three tokens."""
    from types import SimpleNamespace

    tokenizer = flax_gpt2.get_tokenizer(bpe_dir)
    # " Coriolanus" = " Cor" "iol" "anus", " Menenius" = " Men" "en" "ius", " Marcius" = " Mar" "cius".
    wrong = {tokenizer.encode(" Coriolanus")[1], tokenizer.encode(" Marcius")[0]}

    def score(params, ids):
        ids = np.asarray(ids)
        logprob = np.full(ids[:, 1:].shape, -0.5, np.float32)
        return logprob, ~np.isin(ids[:, 1:], list(wrong))

    model = SimpleNamespace(config=SimpleNamespace(n_positions=64, vocab_size=50257))
    texts = {
        "The tribune spoke against Coriolanus": False,  # first token right, the second wrong
        "Then up rose the old Menenius": True,  # three tokens, all right
        "The people cheered for Marcius": False,  # first token wrong, the last right
        "They were all his friends": True,  # one token
    }
    result = eval_metrics.lambada(model, None, tokenizer, list(texts), batch_size=3, progress=False, scorer=score)
    assert result["accuracy"] == sum(texts.values()) / len(texts)
    assert result["num_target_tokens"] == 3 + 3 + 2 + 1
    assert result["perplexity"] == pytest.approx(math.exp(0.5 * 9 / 4))


def test_cli_prints_json_last(tiny, tmp_path, shared_dir, capsys):
    folder = tiny[4]
    text_file = tmp_path / "t.txt"
    text_file.write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:3000])
    lam = tmp_path / "l.jsonl"
    lam.write_text("\n".join(json.dumps({"text": t}) for t in ["To be or not to be", "All the world's a stage"]))
    rc = evaluate.main(["--model", str(folder), "--text_file", str(text_file), "--stride", "64",
                        "--window_length", "128", "--lambada", str(lam), "--no_progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "accuracy", "num_tokens", "lambada_num_examples"} <= set(result)
    assert result["num_tokens"] == len(tiny[3].encode(text_file.read_text())) - 1
    assert np.isfinite(result["perplexity"]) and result["lambada_num_examples"] == 2


@pytest.mark.parametrize("case,message,code", [
    ("empty", "is empty", 1),
    ("no_final_word", "no final word", 1),
    ("no_text_field", "no 'text' field", 1),
    ("stride", "must not exceed", 2),
    ("missing", "does not exist", 1),
    ("folder", "is a folder", 1),
    ("batch_size", "--batch_size: must be a positive integer", 2),
])
def test_cli_bad_inputs(tiny, tmp_path, capsys, case, message, code):
    folder = tiny[4]
    good = tmp_path / "good.txt"
    good.write_text("Some words to score here and there.\n" * 20)
    args = ["--model", str(folder), "--no_progress"]
    if case == "empty":
        (tmp_path / "e.txt").write_text("  \n")
        args += ["--text_file", str(tmp_path / "e.txt")]
    elif case in ("no_final_word", "no_text_field"):
        record = {"text": "single"} if case == "no_final_word" else {"txt": "a b c"}
        (tmp_path / "l.jsonl").write_text(json.dumps({"text": "fine text here"}) + "\n" + json.dumps(record))
        args += ["--lambada", str(tmp_path / "l.jsonl")]
    elif case == "stride":
        args += ["--text_file", str(good), "--stride", "600", "--window_length", "512"]
    elif case == "folder":
        args += ["--text_file", str(tmp_path)]
    elif case == "batch_size":
        args += ["--text_file", str(good), "--batch_size", "0"]
    else:
        args += ["--text_file", str(tmp_path / "nope.txt")]
    assert evaluate.main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_defaults_follow_the_model(tiny, tmp_path, capsys):
    """A model with n_positions 128 (< the old fixed --stride 512): window 128, stride 64."""
    text_file = tmp_path / "t.txt"
    text_file.write_text("Some words to score here and there.\n" * 60)
    assert evaluate.main(["--model", str(tiny[4]), "--text_file", str(text_file), "--no_progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["window_length"], result["stride"]) == (128, 64)
    assert "max_length" not in result  # one name per length
    assert result["num_tokens"] == result["text_tokens"] - 1
    assert evaluate.main(["--model", str(tiny[4]), "--text_file", str(text_file), "--no_progress",
                          "--stride", "200"]) == 2  # a usage error
    assert "--stride (200) must not exceed the window (128" in capsys.readouterr().err


def test_only_endoftext_is_special_in_evaluated_text(tiny, tmp_path, capsys):
    """'<|endoftext|>' separates documents; nothing else in the text becomes a special id."""
    text_file = tmp_path / "t.txt"
    text = "Hello world, the king<|endoftext|> A new document begins here."
    text_file.write_text(text)
    assert evaluate.main(["--model", str(tiny[4]), "--text_file", str(text_file), "--no_progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["text_tokens"] == len(tiny[3].encode(text, allowed_special={"<|endoftext|>"}))


def test_a_model_smaller_than_its_tokenizer_is_an_error(tmp_path_factory, tmp_path, capsys):
    """Used to print "perplexity": NaN (invalid JSON) with exit code 0."""
    from conftest import make_hf_model

    _, small = make_hf_model(tmp_path_factory, "small_vocab", vocab_size=1000)
    text_file = tmp_path / "t.txt"
    text_file.write_text("Some words to score here and there.\n" * 5)
    assert evaluate.main(["--model", str(small), "--text_file", str(text_file), "--no_progress"]) == 1
    captured = capsys.readouterr()
    assert "vocab_size (1000) is smaller than its tokenizer's (50257" in captured.err
    assert captured.out == ""


def test_non_finite_results_are_errors_not_json_nan(tiny, monkeypatch, tmp_path, capsys):
    def nan_perplexity(*args, **kwargs):
        return {"perplexity": float("nan"), "nll": float("nan"), "num_tokens": 3, "num_windows": 1}

    monkeypatch.setattr(eval_metrics, "perplexity", nan_perplexity)
    text_file = tmp_path / "t.txt"
    text_file.write_text("Some words to score.")
    assert evaluate.main(["--model", str(tiny[4]), "--text_file", str(text_file), "--no_progress"]) == 1
    captured = capsys.readouterr()
    assert "perplexity=nan" in captured.err and "NaN" not in captured.out
    with pytest.raises(FloatingPointError, match="not finite"):
        eval_metrics._finite_exp(float("nan"), "perplexity")
    with pytest.raises(FloatingPointError, match="not finite"):
        eval_metrics._finite_exp(1e6, "perplexity")  # math.exp would raise OverflowError


def test_lambada_final_word_longer_than_the_window_is_an_error(tiny):
    _, model, params, tokenizer, _ = tiny
    word = "a1" * 100  # letters and digits are separate pieces: 200 tokens, more than n_positions - 1 = 127
    with pytest.raises(ValueError, match=r"example 1: the final word is \d+ tokens, more than the 127"):
        eval_metrics.lambada(model, params, tokenizer, ["a fine text here", "some context " + word],
                             progress=False)
