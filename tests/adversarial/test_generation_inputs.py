"""Token choice under hostile settings: a model vocabulary padded past its tokenizer's, and a top-p too small
for float32.

The padded model is GPT-2's 50,257 ids padded to 50,304 (as llm.c and nanoGPT checkpoints are), built so
that the 47 padded ids would win every step without the vocabulary rule (`limit_vocab`). The reference is
the same model with its vocabulary cut to the tokenizer's: generate, sample, the pipeline and lm-eval on
the padded model must equal it token for token, sampled draws included.
"""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import SHARED, make_hf_model, randomize_parameters
from flax_gpt2 import from_pretrained, generate, get_tokenizer
from flax_gpt2 import sample as sample_cli
from flax_gpt2.generation import top_p_filter
from flax_gpt2.generation.pipeline import TextGenerationPipeline

TOKENIZER_VOCAB = 50257
PADDED_VOCAB = 50304


def padded_vocab_folders(tmp_path_factory, name="padded_vocab"):
    """`(padded, cut)`: save_pretrained folders (with GPT-2's tokenizer files) of a tiny random GPT-2 whose
    vocabulary is padded to 50,304, and of the same model cut to the tokenizer's 50,257 ids.

    ln_f's bias and the padded rows of the (tied) embedding point the same way, so every padded id's logit
    (~250) towers over the real ones (~15): unmasked, they win every greedy step and nearly every draw.
    """
    torch.manual_seed(0)
    config = dict(n_positions=128, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=PADDED_VOCAB, **config)).eval()
    randomize_parameters(model, seed=3, std=0.3)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        direction = torch.randn(64, generator=generator)
        model.transformer.ln_f.bias.copy_(direction)
        padding = PADDED_VOCAB - TOKENIZER_VOCAB
        model.transformer.wte.weight[TOKENIZER_VOCAB:] = 4 * direction + 0.1 * torch.randn(
            padding, 64, generator=generator)
    cut = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=TOKENIZER_VOCAB, **config)).eval()
    state = model.state_dict()
    state = {k: (v[:TOKENIZER_VOCAB] if v.shape[:1] == (PADDED_VOCAB,) else v) for k, v in state.items()}
    cut.load_state_dict(state)
    folders = []
    for label, m in (("padded", model), ("cut", cut)):
        folder = tmp_path_factory.mktemp(f"{name}_{label}")
        m.save_pretrained(folder)
        shutil.copyfile(SHARED / "gpt2-bpe" / "encoder.json", folder / "vocab.json")
        shutil.copyfile(SHARED / "gpt2-bpe" / "vocab.bpe", folder / "merges.txt")
        folders.append(folder)
    return tuple(folders)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe_dir):
    return padded_vocab_folders(tmp_path_factory)


@pytest.fixture(scope="module")
def padded(folders):
    model, params = from_pretrained(folders[0], progress=False)
    assert model.config.vocab_size == PADDED_VOCAB
    return model, params


@pytest.fixture(scope="module")
def cut(folders):
    model, params = from_pretrained(folders[1], progress=False)
    assert model.config.vocab_size == TOKENIZER_VOCAB
    return model, params


@pytest.fixture(scope="module")
def tokenizer(bpe_dir):
    return get_tokenizer(str(bpe_dir))


PROMPTS = [[464, 2068, 7586, 21831], [50256, 40, 1101, 257]]


def test_the_padded_ids_would_win_without_the_rule(padded):
    """The test model is adversarial: without `vocab_limit` every greedy token is a padded id."""
    out = generate(*padded, PROMPTS, max_new_tokens=6)[:, 4:]
    assert (out >= TOKENIZER_VOCAB).all()


@pytest.mark.parametrize("options", [
    dict(),
    dict(do_sample=True, top_k=0, top_p=0.9, num_return_sequences=3, seed=5),
    dict(do_sample=True, top_k=50, seed=3),  # the pipeline's defaults (its test reuses this compilation)
    dict(num_beams=3, num_return_sequences=2, repetition_penalty=1.5),
], ids=["greedy", "sample", "sample_top_k", "beam"])
def test_generate_with_vocab_limit_equals_the_cut_model(padded, cut, options):
    got = generate(*padded, PROMPTS, max_new_tokens=12, eos_token_id=50256, vocab_limit=TOKENIZER_VOCAB,
                   **options)
    expected = generate(*cut, PROMPTS, max_new_tokens=12, eos_token_id=50256, **options)
    np.testing.assert_array_equal(got, expected)
    assert got.max() < TOKENIZER_VOCAB


def test_prompt_ids_outside_the_tokenizer_are_refused(padded):
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50257\).*vocab_limit"):
        generate(*padded, [[464, 50300]], max_new_tokens=2, vocab_limit=TOKENIZER_VOCAB)
    with pytest.raises(ValueError, match="vocab_limit must be None or an integer from 1"):
        generate(*padded, [[464]], max_new_tokens=2, vocab_limit=PADDED_VOCAB + 1)


def test_sample_command_on_a_padded_model_equals_the_cut_model(folders, capsys, tmp_path):
    """`sample` decodes every sequence (before: an id >= 50,257 could not be decoded and every sample was lost)."""
    outputs = []
    for folder in folders:
        code = sample_cli.main(["--model", str(folder), "--prompt", "The quick brown fox", "--top_k", "0",
                                "--num_return_sequences", "3", "--max_new_tokens", "12", "--seed", "4",
                                "--no_progress", "--cache_dir", str(tmp_path)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]
    assert outputs[0].count("=== GENERATED SEQUENCE") == 3


def test_pipeline_on_a_padded_model_equals_the_cut_model(padded, cut, tokenizer):
    texts = [TextGenerationPipeline(*m, tokenizer)(["Hello there", "A"], max_new_tokens=12, seed=3)
             for m in (padded, cut)]
    assert texts[0] == texts[1]


def test_lm_eval_on_a_padded_model_equals_the_cut_model(padded, cut, tokenizer):
    """Loglikelihoods are over the tokenizer's ids (the padded ones add no mass) and generation never yields
    an undecodable id: the lm-eval model on the padded weights answers as on the cut ones."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from flax_gpt2.evaluation.lm_eval_model import FlaxGPT2LM

    def instances(kind, args_list):
        return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]

    answers = []
    for model, params in (padded, cut):
        lm = FlaxGPT2LM(model=model, params=params, tokenizer=tokenizer, batch_size=2, progress=False)
        scores = lm.loglikelihood(instances("loglikelihood", [("The cat", " sat on"), ("A", " b c d")]))
        texts = lm.generate_until(instances("generate_until", [("Once upon", {"until": ["\n\n"], "max_gen_toks": 8}),
                                                               ("It", {"max_gen_toks": 8})]))
        answers.append((scores, texts))
    (scores, texts), (expected_scores, expected_texts) = answers
    np.testing.assert_allclose([s for s, _ in scores], [s for s, _ in expected_scores], rtol=1e-5)
    assert [g for _, g in scores] == [g for _, g in expected_scores]
    assert texts == expected_texts


# ---- top-p below float32's resolution of 1 - p ----

@pytest.mark.parametrize("p", [1e-8, 1e-12, 5e-8])
def test_tiny_top_p_keeps_the_most_likely_token_as_transformers(p):
    """HF's TopPLogitsWarper keeps the argmax (min_tokens_to_keep=1); before, 1 - p rounded to 1.0 in
    float32 and every token was dropped, so the draw was always token 0."""
    logits = np.random.RandomState(0).randn(4, TOKENIZER_VOCAB).astype(np.float32) * 3
    expected = transformers.TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy()
    for top_p in (p, jnp.full((4, 1), p, jnp.float32)):  # a Python float (generate) and per-row arrays (serve)
        got = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
        assert (np.isfinite(got).sum(axis=1) == 1).all()


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    _, folder = make_hf_model(tmp_path_factory, "tiny_top_p", seed=2, randomize=True, randomize_std=0.3)
    return folder


def test_generate_with_tiny_top_p_is_greedy(peaked):
    model, params = from_pretrained(peaked, progress=False)
    greedy = generate(model, params, PROMPTS, max_new_tokens=10)
    for seed in (0, 1):
        sampled = generate(model, params, PROMPTS, max_new_tokens=10, do_sample=True, top_k=0, top_p=1e-8, seed=seed)
        np.testing.assert_array_equal(sampled, greedy)


def test_sample_command_with_tiny_top_p_is_greedy(peaked, capsys, tmp_path):
    outputs = []
    for flags in (["--greedy"], ["--top_k", "0", "--top_p", "1e-8"]):
        code = sample_cli.main(["--model", str(peaked), "--prompt", "Hello", "--max_new_tokens", "8", "--no_progress",
                                "--cache_dir", str(tmp_path), *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]
    assert "!!!!" not in outputs[1]
