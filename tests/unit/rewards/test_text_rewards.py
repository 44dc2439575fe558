import pytest

from kilter.errors import KilterError
from kilter.rewards.text import BleuReward, RougeReward

REFS = {
    "Translate: le chat": "the cat sat on the mat",
    "Translate: bonjour": ["hello there", "good morning to you all"],
}


def test_bleu_reward_identical_and_disjoint():
    reward = BleuReward(REFS)
    prompts = ["Translate: le chat", "Translate: le chat", "Translate: bonjour"]
    responses = ["the cat sat on the mat", "completely unrelated words here", "good morning to you all"]
    assert reward(prompts, responses) == pytest.approx([1.0, 0.0, 1.0])


def test_bleu_reward_is_sentence_bleu_over_100():
    # one substituted token of six: (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** 0.25
    reward = BleuReward({"p": "a b c d e g"})
    assert reward(["p"], ["a b c d e f"]) == pytest.approx([(1 / 3) ** 0.25])


def test_lookup_tolerates_surrounding_whitespace_and_reports_missing_prompt():
    reward = BleuReward(REFS)
    assert reward(["  Translate: bonjour\n"], ["hello there"]) == pytest.approx([1.0])
    with pytest.raises(KilterError, match="no reference for prompt 'Translate: hola'"):
        reward(["Translate: hola"], ["hi"])


def test_aligned_references_and_call_time_override():
    aligned = BleuReward(["a b c d", "e f g h"])
    assert aligned(["x", "y"], ["a b c d", "a b c d"]) == pytest.approx([1.0, 0.0])
    with pytest.raises(KilterError, match="2 references for 1 responses"):
        aligned(["x"], ["a b c d"])
    # references passed with the batch win over the constructor's
    batch_refs = ["e f g h", ["q", "a b c d"]]
    assert aligned(["x", "y"], ["e f g h", "a b c d"], references=batch_refs) == pytest.approx([1.0, 1.0])
    with pytest.raises(KilterError, match="no references given"):
        BleuReward()(["x"], ["y"])
    with pytest.raises(KilterError, match="prompts but"):
        aligned(["x"], ["a", "b"])


def test_rouge_reward():
    reward = RougeReward({"p": "the cat ran", "q": ["x y z", "a dog barked"]})
    # rougeL: LCS "the cat" is 2 of 3 tokens each way -> F = 2/3
    scores = reward(["p", "q", "p"], ["the cat sat", "a dog barked", "nothing shared"])
    assert scores == pytest.approx([2 / 3, 1.0, 0.0])
    # rouge2: bigram "the cat" is 1 of 2 each way
    bigrams = RougeReward({"p": "the cat ran"}, rouge_type="rouge2")
    assert bigrams(["p"], ["the cat sat"]) == pytest.approx([0.5])
