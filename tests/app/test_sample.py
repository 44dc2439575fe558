"""`kilter sample` with tiny random GPT-2 models built offline in the test."""

import json
import re

import pytest

from kilter.cli import main
from kilter.feedback.store import Store

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "models answer questions about the weather",
    "people compare two answers and pick the better one",
]


def tiny_model(folder, seed):
    """A one-layer GPT-2 with a word-level tokenizer trained on a few sentences, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<|unk|>", "<|pad|>", "<|eos|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<|unk|>", pad_token="<|pad|>", eos_token="<|eos|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_model(root / "alpha", 1), tiny_model(root / "beta", 2)


def test_sample_a_tournament_into_a_project_and_into_jsonl(capsys, tmp_path, two_models):
    db = str(tmp_path / "s.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat", "id": "p1"}\n{"prompt": "a dog ran"}\n')
    assert main(["project", "create", "arena", "--task", "pairwise", "--db", db]) == 0
    models = ",".join(two_models)
    code = main(["sample", "--models", models, "--prompts", str(prompts), "--k", "2", "--max_new_tokens", "6",
                 "--temperature", "0.9", "--top_p", "0.95", "--batch_size", "3", "--project", "arena", "--db", db])
    assert code == 0
    out = capsys.readouterr().out
    # 2 prompts x (2 models x 2 samples); pairs only across models: 2 x 2 = 4 battles per prompt, fewer
    # when a tiny model repeats itself (repeated and empty responses are left out)
    added = re.search(r"added (\d+) prompts, (\d+) responses -> (\d+) items to arena", out)
    assert added and int(added.group(2)) <= 8 and 1 <= int(added.group(3)) <= 8, out
    store = Store(db)
    project = store.project("arena")
    assert_items_differ(store, project)
    user = store.create_user("ann")[0]
    view = store.next_task(project, user)
    assert {c.model for c in view.responses} == {"alpha", "beta"}
    for c in view.responses:
        assert c.sampling["temperature"] == 0.9 and c.sampling["top_p"] == 0.95
        assert c.sampling["max_new_tokens"] == 6 and c.sampling["do_sample"] is True
        assert len(c.text.split()) <= 6  # at most 6 new word-level tokens
    store.close()

    out_file = tmp_path / "candidates.jsonl"
    assert main(["sample", "--models", two_models[0], "--prompts", str(prompts), "--k", "3",
                 "--max_new_tokens", "4", "--out", str(out_file)]) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "a dog ran"] and rows[0]["id"] == "p1"
    assert all(2 <= len(r["responses"]) <= 3 for r in rows) and rows[0]["responses"][0]["model"] == "alpha"
    n = sum(len(r["responses"]) for r in rows)
    # the file is in the import format: it goes straight into a ranking project
    assert main(["project", "create", "rk", "--task", "ranking", "--db", db]) == 0
    assert main(["import", "--project", "rk", "--file", str(out_file), "--db", db]) == 0
    assert f"imported {len(rows)} prompts, {n} responses -> {len(rows)} items" in capsys.readouterr().out


def assert_items_differ(store, project):
    """No item shows two responses with the same text, and none is empty."""
    items = {}
    for c in store.item_candidates(project):
        items.setdefault(c[0], []).append(c[1])
    assert items
    for texts in items.values():
        assert all(t.strip() for t in texts) and len(set(texts)) == len(texts), texts


def test_two_copies_of_one_model_give_no_identical_pairs(capsys, tmp_path, two_models):
    """Seeded alike, two copies of one model used to write the same texts: 4 of 8 pairs had chosen == rejected."""
    db = str(tmp_path / "s.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "a dog ran"}\n')
    assert main(["project", "create", "twins", "--task", "pairwise", "--db", db]) == 0
    copies = f"{two_models[0]},{two_models[0]}"
    assert main(["sample", "--models", copies, "--names", "left,right", "--prompts", str(prompts), "--k", "2",
                 "--max_new_tokens", "6", "--project", "twins", "--db", db]) == 0
    store = Store(db)
    assert_items_differ(store, store.project("twins"))
    store.close()


def test_sample_is_reproducible_with_a_seed(two_models):
    from kilter.feedback.sampling import generate

    first = generate(two_models[0], ["the cat", "people compare"], 2, max_new_tokens=5, seed=7)
    again = generate(two_models[0], ["the cat", "people compare"], 2, max_new_tokens=5, seed=7)
    assert first == again and len(first) == 2 and all(len(r) == 2 for r in first)


def test_sample_needs_project_or_out(capsys, tmp_path, two_models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n')
    code = main(["sample", "--models", two_models[0], "--prompts", str(prompts)])
    assert code == 2 and "exactly one of 'project'" in capsys.readouterr().err
