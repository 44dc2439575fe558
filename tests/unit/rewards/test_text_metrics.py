import math

import pytest

from kilter.errors import KilterError
from kilter.rewards.text_metrics import (
    bleu,
    distinct_n,
    mean_length,
    rouge,
    sentence_bleu,
    win_rate,
)

# one substituted token out of six: n-gram precisions 5/6, 4/5, 3/4, 2/3, brevity penalty 1,
# so BLEU = 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * (1/3) ** 0.25
HYP, REF = "a b c d e f", "a b c d e g"
ONE_SUBSTITUTION = 100 * (1 / 3) ** 0.25


def test_corpus_bleu_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert bleu(["a b c d e"], ["v w x y z"]) == 0.0
    assert bleu([HYP], [REF]) == pytest.approx(ONE_SUBSTITUTION)
    # corpus BLEU pools n-gram counts over sentences: one perfect and one all-wrong six-token
    # sentence give precisions (6+0)/12, (5+0)/10, (4+0)/8, (3+0)/6, all 1/2 -> 50
    assert bleu(["a b c d e f", "u v w x y z"], ["a b c d e f", "g h i j k l"]) == pytest.approx(50)


def test_corpus_bleu_multiple_and_variable_references():
    # the matching reference is the second of two for the first sentence; the second has one
    refs = [["q r s t u v", REF], ["p q r s t u"]]
    pooled = (11 / 12 * 9 / 10 * 7 / 8 * 5 / 6) ** 0.25
    assert bleu([HYP, "p q r s t u"], refs) == pytest.approx(100 * pooled)


def test_sentence_bleu():
    assert sentence_bleu(HYP, REF) == pytest.approx(ONE_SUBSTITUTION)
    assert sentence_bleu(HYP, ["x y z", HYP]) == pytest.approx(100)
    assert sentence_bleu("dog", "cat") == 0.0
    # effective order: a two-word exact match is not zeroed for lacking 3- and 4-grams
    assert sentence_bleu("hello world", "hello world") == pytest.approx(100)


def test_misaligned_inputs_raise():
    with pytest.raises(KilterError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(KilterError, match="no reference"):
        rouge(["a"], [[]])
    with pytest.raises(KilterError, match="lists"):
        bleu("a b", "a b")


def test_rouge_by_hand():
    # "the cat sat" vs "the cat ran": 2 of 3 unigrams, 1 of 2 bigrams, LCS 2 -> F = 2/3, 1/2, 2/3
    one = rouge(["the cat sat"], ["the cat ran"])
    assert one == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    both = rouge(["the cat sat", "a dog barked"], ["the cat ran", "a dog barked"])
    assert both == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 4, "rougeL": 5 / 6})
    assert rouge(["a b c"], ["x y z"], types=["rouge1"]) == {"rouge1": 0.0}
    # the best of several references counts
    assert rouge(["a dog barked"], [["the cat ran", "a dog barked"]], types=["rougeL"]) == {"rougeL": 1.0}


def test_rouge_rejects_unknown_type():
    with pytest.raises(KilterError, match="rougeX"):
        rouge(["a"], ["a"], types=["rougeX"])


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 6)  # {a, b} over 6 tokens
    assert distinct_n(texts, 2) == pytest.approx(2 / 4)  # {ab, ba} over ab ba ab ab
    assert distinct_n(["one two three"], 3) == 1.0
    assert distinct_n(["too short"], 3) == 0.0
    with pytest.raises(KilterError):
        distinct_n(texts, 0)


class CountingTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character, plus a BOS when asked."""

    def encode(self, text, add_special_tokens=True):
        return [0] * (len(text) + int(add_special_tokens))

    def __call__(self, text):
        return {"input_ids": [0] * len(text)}  # a dict, like BatchEncoding: len() would be wrong


def test_mean_length():
    assert mean_length(["a b", "c d e f"]) == 3.0
    assert mean_length(["ab", "cdef"], tokenizer=list) == 3.0
    assert mean_length(["ab", "cdef"], tokenizer=CountingTokenizer()) == 3.0
    assert math.isnan(mean_length([]))


def test_win_rate():
    assert win_rate([3, 1, 2], [1, 1, 5]) == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert win_rate([2, 2], [1, 1]) == 1.0
    assert math.isnan(win_rate([], []))
    with pytest.raises(KilterError, match="2 scores for A but 1"):
        win_rate([1, 2], [1])
