"""Text metrics for `kilter eval`: BLEU, ROUGE, diversity, length and win rate.

BLEU comes from sacrebleu (Post, 2018, "A Call for Clarity in Reporting BLEU Scores") and ROUGE
from Google's rouge-score, so numbers match what papers report. sacrebleu and rouge-score are
imported inside the functions: importing this module stays cheap.

References are given per hypothesis: ``refs[i]`` is one string or a list of strings (several
references for hypothesis i; the lists may differ in length).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from kilter.errors import KilterError

References = Sequence[str | Sequence[str]]


def _reference_list(refs: str | Sequence[str]) -> list[str]:
    """One hypothesis's references as a list of strings."""
    return [refs] if isinstance(refs, str) else list(refs)


def _check_aligned(hyps: Sequence[str], refs: References) -> list[list[str]]:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise KilterError("metrics: hyps and refs must be lists of strings, one entry per hypothesis")
    if len(hyps) != len(refs):
        raise KilterError(f"metrics: {len(hyps)} hypotheses but {len(refs)} references")
    per_hyp = [_reference_list(r) for r in refs]
    for i, r in enumerate(per_hyp):
        if not r:
            raise KilterError(f"metrics: hypothesis {i} has no reference")
    return per_hyp


@lru_cache(maxsize=8)
def get_sentence_bleu_metric(tokenize: str):
    from sacrebleu.metrics import BLEU

    # effective order: short sentences are not zeroed just because they lack 4-grams
    return BLEU(tokenize=tokenize, effective_order=True)


def bleu(hyps: Sequence[str], refs: References, tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (Papineni et al., 2002).

    Corpus BLEU pools n-gram counts over all sentences before taking the geometric mean, so it
    is not the mean of sentence BLEUs.
    """
    from sacrebleu.metrics import BLEU

    per_hyp = _check_aligned(hyps, refs)
    if not per_hyp:
        return 0.0
    depth = max(len(r) for r in per_hyp)
    # sacrebleu wants reference *streams*; None marks "no k-th reference for this sentence"
    streams = [[r[k] if k < len(r) else None for r in per_hyp] for k in range(depth)]
    return float(BLEU(tokenize=tokenize).corpus_score(list(hyps), streams).score)


def sentence_bleu(hyp: str, refs: str | Sequence[str], tokenize: str = "13a") -> float:
    """Sentence-level BLEU (0-100) of one hypothesis, with sacrebleu's exp smoothing."""
    references = _reference_list(refs)
    if not references:
        raise KilterError("metrics: sentence_bleu needs at least one reference")
    return float(get_sentence_bleu_metric(tokenize).sentence_score(hyp, references).score)


@lru_cache(maxsize=8)
def get_rouge_scorer(types: tuple[str, ...], use_stemmer: bool = True):
    """A cached ``rouge_score.rouge_scorer.RougeScorer`` (building the stemmer is not free)."""
    from rouge_score import rouge_scorer as rs

    unknown = [t for t in types if not (t in ("rougeL", "rougeLsum") or _is_rouge_n(t))]
    if unknown:
        raise KilterError(
            f"metrics: unknown ROUGE type(s) {unknown}; use rouge1..rouge9, rougeL, rougeLsum"
        )
    return rs.RougeScorer(list(types), use_stemmer=use_stemmer)


def _is_rouge_n(name: str) -> bool:
    return name.startswith("rouge") and name[5:].isdigit() and 1 <= int(name[5:]) <= 9


def rouge(
    hyps: Sequence[str],
    refs: References,
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F-measure (0-1) per type (Lin, 2004), best reference per hypothesis.

    rouge-score's tokenizer lowercases and keeps only ``[a-z0-9]`` runs, so text in other scripts
    scores 0; use BLEU for those languages.
    """
    per_hyp = _check_aligned(hyps, refs)
    types = tuple(types)
    scorer = get_rouge_scorer(types, use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for hyp, references in zip(hyps, per_hyp, strict=True):
        scores = scorer.score_multi(references, hyp)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: (totals[t] / len(per_hyp) if per_hyp else 0.0) for t in types}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams over whitespace tokens.

    Counted over the whole set, so repeating the same answer to every prompt lowers it. Returns
    0.0 when the texts hold no n-gram at all.
    """
    if n < 1:
        raise KilterError(f"metrics: distinct_n needs n >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _token_count(text: str, tokenizer: Any) -> int:
    if tokenizer is None:
        return len(text.split())
    # Hugging Face tokenizers are callable but return a dict, so prefer .encode
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            return len(encode(text, add_special_tokens=False))
        except TypeError:
            return len(encode(text))
    return len(tokenizer(text))


def mean_length(texts: Sequence[str], tokenizer: Callable[[str], Sequence] | Any = None) -> float:
    """Mean length in tokens: whitespace words by default, else ``tokenizer``'s tokens.

    ``tokenizer`` is a Hugging Face tokenizer (special tokens are not counted) or any callable
    returning a token sequence. nan for an empty list.
    """
    if not texts:
        return math.nan
    return sum(_token_count(t, tokenizer) for t in texts) / len(texts)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of items where A scored higher than B; a tie counts 0.5. nan if empty."""
    if len(scores_a) != len(scores_b):
        raise KilterError(
            f"metrics: win_rate got {len(scores_a)} scores for A but {len(scores_b)} for B"
        )
    if not scores_a:
        return math.nan
    points = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b, strict=True)
    )
    return points / len(scores_a)
