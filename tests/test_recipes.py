"""Fine-tuning recipes: CommonGen / ELI5 record formatting and the CommonGen coverage metric."""

import json

import pytest

from flax_gpt2.train import recipes


def test_commongen_release_record_matches_card_format():
    record = {"concept_set": "kid_N#room_N#dance_V", "scene": ["A kid dances in the room.", "Kids dance."]}
    assert recipes.commongen_documents(record) == [" kid, room, dance: A kid dances in the room.",
                                                   " kid, room, dance: Kids dance."]
    # the prompt the card samples with is the document's prefix
    assert recipes.commongen_prompt(recipes.concepts_of(record)) == " kid, room, dance:"


def test_commongen_hf_dataset_and_pair_formats(shared_dir):
    assert recipes.commongen_documents({"concepts": ["ski", "mountain"], "target": "I ski down a mountain."}) == \
        [" ski, mountain: I ski down a mountain."]
    src = shared_dir / "data" / "commongen" / "commongen.dev.src_alpha.txt"
    pairs = list(recipes.commongen_line_pairs(str(src)))
    assert len(pairs) == 4018  # `wc -l` says 4,017: the last line has no newline
    assert pairs[0] == {"concepts": ["field", "stand", "look"],
                        "target": "The player stood in the field looking at the batter."}


def test_commongen_jsonl_concept_sets(shared_dir):
    path = shared_dir / "data" / "commongen" / "commongen.dev.jsonl"
    sets = recipes.read_commongen_sets(str(path))
    # 993 records; two differ only in a part-of-speech suffix, which the card's format drops
    assert len(sets) == 992 and sets[0] == ["field", "look", "stand"]
    docs = list(recipes.format_records("commongen", (json.loads(l) for l in path.open()), str(path)))
    assert len(docs) == sum(len(json.loads(l)["scene"]) for l in path.open())
    assert all("_N" not in d.split(":")[0] and "_V" not in d.split(":")[0] for d in docs)


def test_eli5_formats():
    hf = {"q_id": "x", "title": "Why?", "answers": {"a_id": ["1", "2"], "text": ["Because.", "It is."]}}
    assert recipes.eli5_documents(hf) == ["Because. It is."]
    assert recipes.eli5_documents({"question": "Why?", "answer": "Because."}) == ["Because."]
    assert recipes.eli5_documents({"answers.text": ["a", "b"]}) == ["a b"]


@pytest.mark.parametrize("recipe,record,message", [
    ("commongen", {"scene": ["x"]}, "needs 'concept_set' or 'concepts'"),
    ("commongen", {"concept_set": "a_N#b_V"}, "needs 'scene' or 'target'"),
    ("commongen", {"concept_set": "", "scene": ["x"]}, "empty concept set"),
    ("eli5", {"question": "only a question"}, "needs 'answers'"),
    ("poetry", {"text": "x"}, "unknown data.recipe"),
])
def test_bad_records_name_the_problem(recipe, record, message):
    with pytest.raises((KeyError, ValueError), match=message):
        list(recipes.format_records(recipe, iter([record]), "f.jsonl"))


def test_pair_format_errors(tmp_path):
    (tmp_path / "x.src_alpha.txt").write_text("a b\nc d\n")
    with pytest.raises(FileNotFoundError, match="x.tgt.txt is missing"):
        list(recipes.commongen_line_pairs(str(tmp_path / "x.src_alpha.txt")))
    (tmp_path / "x.tgt.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="has 2 lines but"):
        list(recipes.commongen_line_pairs(str(tmp_path / "x.src_alpha.txt")))


@pytest.mark.parametrize("concepts,sentence,expected", [
    (["kid", "room", "dance"], "A kid dances in the room.", 1.0),
    (["kid", "room", "dance"], "The kids were dancing.", 2 / 3),
    (["run", "carry", "bag"], "He carries bags while running.", 1.0),
    (["field", "look", "stand"], "Nothing here.", 0.0),
    (["dog"], "", 0.0),
])
def test_coverage(concepts, sentence, expected):
    assert recipes.coverage(concepts, sentence) == pytest.approx(expected)


def test_tokenize_corpus_command_line_takes_a_recipe(shared_dir, bpe_dir, tmp_path, capsys):
    """The command line exposes what `tokenize_corpus` supports (`--recipe`, `--no_progress`) with the CLI
    conventions: the same tokens as the function, and a bad recipe is a usage error (exit 2, one line)."""
    import json

    from flax_gpt2.train import tokenize_corpus as tc

    source = str(shared_dir / "data" / "commongen" / "commongen.dev.jsonl")
    argv = [source, str(tmp_path / "cli"), "--recipe", "commongen", "--tokenizer", str(bpe_dir), "--no-progress"]
    assert tc.main(argv) == 0
    meta = tc.tokenize_corpus(source, str(tmp_path / "fn"), recipe="commongen", tokenizer=str(bpe_dir),
                              progress=False)
    cli_meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert (cli_meta["num_tokens"], cli_meta["num_documents"]) == (meta["num_tokens"], meta["num_documents"])
    assert (tmp_path / "cli" / "tokens_00000.bin").read_bytes() == (tmp_path / "fn" / "tokens_00000.bin").read_bytes()
    capsys.readouterr()
    # without the recipe these records have no text field: a runtime error naming it, exit 1
    assert tc.main([source, str(tmp_path / "plain"), "--tokenizer", str(bpe_dir), "--no_progress"]) == 1
    assert "has no field 'text'" in capsys.readouterr().err
    assert tc.main([source, str(tmp_path / "bad"), "--recipe", "alpaca"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'alpaca'" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
