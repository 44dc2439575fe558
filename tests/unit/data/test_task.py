"""The built-in product-review task: data generation, prompt split, gold score, `kilter task`."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest

from kilter.cli import main
from kilter.data import task
from kilter.data.task import (
    EVAL_PRODUCTS,
    PRODUCTS,
    build_task,
    extract_product,
    gold_breakdown,
    gold_score,
    gold_scores,
    names_product,
    product_mention_rate,
    products_named,
    repetition_fraction,
    split_prompts,
)

PROMPT = "Write a review of the blender."
BEST = "The blender is great. It works well and looks nice."


@pytest.fixture(scope="module")
def data():
    return build_task(seed=0, n_demonstrations=1000, n_eval=100)


@pytest.fixture(scope="module")
def demo_golds(data):
    return gold_scores([d["prompt"] for d in data.demonstrations], [d["completion"] for d in data.demonstrations])


def test_same_seed_same_data_other_seed_other_data():
    a = build_task(seed=3, n_demonstrations=200, n_eval=20)
    b = build_task(seed=3, n_demonstrations=200, n_eval=20)
    c = build_task(seed=4, n_demonstrations=200, n_eval=20)
    assert a == b
    assert a.demonstrations != c.demonstrations
    assert a.eval_demonstrations != c.eval_demonstrations
    # the prompt split is fixed so evaluations compare across seeds
    assert (a.train_prompts, a.eval_prompts) == (c.train_prompts, c.eval_prompts)


def test_sizes_and_record_shapes(data):
    assert len(data.demonstrations) == 1000 and len(data.eval_demonstrations) == 100
    assert len(data.corpus) == 1000
    train, held = set(data.train_prompts), set(data.eval_prompts)
    for demo, text in zip(data.demonstrations, data.corpus):
        assert set(demo) == {"prompt", "completion"}
        assert demo["prompt"] in train
        assert demo["completion"] and demo["completion"] == demo["completion"].strip()
        assert text == demo["prompt"] + " " + demo["completion"]
    assert all(d["prompt"] in held for d in data.eval_demonstrations)
    # demonstrations cycle through prompts, so 1000 rows cover all 320 training prompts
    assert {d["prompt"] for d in data.demonstrations} == train


def test_product_split_holds_out_products():
    train, held = split_prompts("product")
    assert len(train) == 8 * 40 and len(held) == 8 * 8
    assert not set(train) & set(held)
    assert {extract_product(p) for p in held} == set(EVAL_PRODUCTS)
    assert not {extract_product(p) for p in train} & set(EVAL_PRODUCTS)


def test_held_out_products_never_appear_in_training_text(data):
    named = set().union(*(products_named(t) for t in data.corpus))
    assert named and not named & set(EVAL_PRODUCTS)
    eval_named = set().union(*(products_named(d["completion"]) for d in data.eval_demonstrations))
    assert eval_named <= set(EVAL_PRODUCTS)


def test_template_split_holds_out_phrasings():
    train, held = split_prompts("template")
    assert len(train) == 6 * 48 and len(held) == 2 * 48
    assert not set(train) & set(held)
    assert {extract_product(p) for p in held} == set(PRODUCTS)
    data = build_task(n_demonstrations=50, n_eval=10, split="template")
    assert set(data.eval_prompts) == set(held)


def test_template_split_held_out_phrasings_use_only_words_of_its_training_text():
    # held-out phrasings test new word orders, not unseen vocabulary ("What ...?" and "Share ..." had words and a
    # "?" that no training prompt or demonstration of this split contains, so no policy could learn to answer them)
    data = build_task(n_demonstrations=4000, n_eval=10, split="template")
    tokens = re.compile(r"[A-Za-z']+|[^A-Za-z'\s]")
    seen = {t for text in data.corpus for t in tokens.findall(text)}
    unseen = {t for p in data.eval_prompts for t in tokens.findall(p)} - seen
    assert not unseen, f"held-out phrasings use {sorted(unseen)}, absent from the template split's training text"
    assert {"What", "?", "Share"} - seen  # the check can fail: those are not in the training text


def test_extract_product():
    assert extract_product("Write a review of the blender.") == "blender"
    assert extract_product("What do you think of the Kayak?") == "kayak"
    assert extract_product("Compare toasters please") == "toaster"
    assert extract_product("Write a poem about the sea.") is None
    # a substring of a longer word is not a product ("lamp" in "clamp")
    assert extract_product("Review the clamp.") is None
    assert products_named("My lamp and two mice. The Lamp! The toasters.") == {"lamp", "toaster"}


def test_demonstrations_spread_widely_around_a_mediocre_mean(demo_golds):
    assert all(math.isfinite(g) for g in demo_golds)
    mean, std = statistics.fmean(demo_golds), statistics.pstdev(demo_golds)
    assert std > 0.4
    # the best reviews score about 2 (the product named, warm, short), so a mean near 0.25 is mediocre
    assert -0.75 < mean < 0.5
    # room both ways: some demonstrations are nearly ideal, some awful
    assert max(demo_golds) > 1.0 and min(demo_golds) < -1.2


def test_demonstrations_vary_along_every_gold_axis(data):
    parts = [gold_breakdown(d["prompt"], d["completion"]) for d in data.demonstrations]
    sentiments = [p["sentiment"] for p in parts]
    assert min(sentiments) < -0.7 and max(sentiments) > 0.7
    topics = {p["topic"] for p in parts}
    assert topics == {1.0, 0.5, 0.0, -0.5}  # named, named + digression, vague, another product
    lengths = [p["length"] for p in parts]
    assert sum(x == 0 for x in lengths) > 200 and sum(x <= -0.5 for x in lengths) > 100
    n_sentences = [d["completion"].count(".") for d in data.demonstrations]
    assert min(n_sentences) == 1 and max(n_sentences) == 5
    # demonstrations are (almost) never repetitive: degenerate loops are what a policy must avoid
    repetition = [p["repetition"] for p in parts]
    assert sum(r == 0 for r in repetition) >= 0.98 * len(parts) and min(repetition) > -0.25


def test_hand_written_best_review_beats_worse_ones():
    best = gold_score(PROMPT, BEST)
    worse = {
        "negative": "The blender is terrible. It broke after a week.",
        "off topic": "The toaster is great. It works well and looks nice.",
        "vague": "It is great. It works well and looks nice.",
        "rambling": BEST + " I bought it last week. My sister has one too. The store is close to"
        " my house. We eat dinner at six.",
        "repetitive words": "great great great great",
        "stutter": "The blender is great great great great great.",
        "repeated sentences": "The blender is great. The blender is great. The blender is great.",
        "empty": "   ",
    }
    for name, text in worse.items():
        assert gold_score(PROMPT, text) < best - 0.3, name
    assert gold_score(PROMPT, "") == -2.0


def test_repetition_fraction_worked_examples():
    assert repetition_fraction("great great great great") == 1.0  # stutter 3/3
    assert repetition_fraction("The blender is great. The blender is great.") == 0.5  # sentences 1/2
    assert repetition_fraction("a b c. a b c. a b c.") == pytest.approx(2 / 3)  # sentences 2/3
    assert repetition_fraction("one two three one two three four") == pytest.approx(1 / 5)  # trigrams
    assert repetition_fraction(BEST) == 0.0
    assert repetition_fraction("") == 0.0


def test_gold_terms_worked_by_hand():
    # 15 words, names the blender and the toaster, no repetition
    text = "The blender and the toaster sit on one shelf in a room with four old chairs"
    parts = gold_breakdown(PROMPT, text)
    assert parts["topic"] == 0.5  # +1.0 own product, -0.5 another product
    assert parts["length"] == pytest.approx(-0.4)  # 16 words, 4 beyond 12
    assert parts["repetition"] == 0.0
    expected_sentiment = task._analyzer().polarity_scores(text)["compound"]
    assert parts["sentiment"] == expected_sentiment
    assert gold_score(PROMPT, text) == pytest.approx(expected_sentiment + 0.5 - 0.4)
    # the length cost is capped at 1.0
    long = " ".join(["word"] * 5 + [f"w{i}" for i in range(60)])
    assert gold_breakdown(PROMPT, long)["length"] == -1.0
    # a prompt naming no product gives no topic term at all
    assert gold_breakdown("Say something.", "The toaster is fine.")["topic"] == 0.0
    assert gold_breakdown(PROMPT, "The toaster is fine.")["topic"] == -0.5
    assert gold_breakdown(PROMPT, "The blenders are fine.")["topic"] == 1.0


def test_names_product_and_its_rate():
    assert names_product(PROMPT, "The blenders are fine.") is True
    assert names_product(PROMPT, "I love it.") is False
    assert names_product(PROMPT, "The toaster is fine.") is False
    assert names_product("Say something.", "The blender is fine.") is None
    # prompts that name no product do not count either way
    rate = product_mention_rate([PROMPT, PROMPT, "Say something.", "Review the lamp."],
                                ["The blender is great.", "I love it.", "Blender!", "My lamp is nice."])
    assert rate == pytest.approx(2 / 3)
    assert product_mention_rate(["Say something."], ["Hi."]) is None


def test_builtin_specs_pick_the_split():
    from kilter.data.sources import builtin_eval_spec, load_records
    from kilter.errors import KilterError

    default = load_records("builtin:prompts_eval", "prompt").rows
    template = load_records("builtin:prompts_eval@template", "prompt").rows
    assert {extract_product(r["prompt"]) for r in default} == set(EVAL_PRODUCTS)
    assert {extract_product(r["prompt"]) for r in template} == set(PRODUCTS)  # every product, unseen phrasings
    assert [r["prompt"] for r in template] == split_prompts("template")[1]
    assert load_records("builtin:prompts_eval@product", "prompt").rows == default
    assert builtin_eval_spec("builtin:sft@template", {"builtin:sft": "builtin:sft_eval"}) == "builtin:sft_eval@template"
    assert builtin_eval_spec("builtin:sft", {"builtin:sft": "builtin:sft_eval"}) == "builtin:sft_eval"
    assert builtin_eval_spec("data/sft.jsonl", {"builtin:sft": "builtin:sft_eval"}) is None
    with pytest.raises(KilterError, match="unknown split 'random'.*builtin:prompts@template"):
        load_records("builtin:prompts@random", "prompt")


def test_gold_scores_batches_and_checks_lengths():
    texts = [BEST, "The blender is awful."]
    assert gold_scores([PROMPT, PROMPT], texts) == [gold_score(PROMPT, t) for t in texts]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_scores([PROMPT, PROMPT], [BEST])


def test_vader_analyzer_is_built_once():
    assert task._analyzer() is task._analyzer()


def test_kilter_task_writes_the_files(tmp_path, capsys):
    out = tmp_path / "task"
    rc = main(["task", f"out_dir={out}", "n_demonstrations=40", "n_eval=8", "seed=2"])
    assert rc == 0
    expected = {"corpus.jsonl": 40, "sft.jsonl": 40, "sft_eval.jsonl": 8, "prompts.jsonl": 320, "prompts_eval.jsonl": 64}
    for name, n in expected.items():
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert len(rows) == n, name
    data = build_task(seed=2, n_demonstrations=40, n_eval=8)
    assert [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()] == data.demonstrations
    assert json.loads((out / "corpus.jsonl").read_text().splitlines()[0]) == {"text": data.corpus[0]}
    assert json.loads((out / "prompts_eval.jsonl").read_text().splitlines()[0]) == {"prompt": data.eval_prompts[0]}
    printed = capsys.readouterr().out
    assert "sft.jsonl" in printed and "demonstration gold" in printed


def test_kilter_task_rejects_bad_config(tmp_path, capsys):
    assert main(["task", f"out_dir={tmp_path}", "n_demonstrations=0"]) == 2
    assert "n_demonstrations" in capsys.readouterr().err
    assert main(["task", f"out_dir={tmp_path}", "split=random"]) == 2
    assert not list(tmp_path.iterdir())
