"""Reference-based text rewards: sentence BLEU and ROUGE against known good outputs.

Reward functions share one signature, ``f(prompts, responses, **kw) -> list[float]``, one reward
per response. These are the rewards for sequence-level REINFORCE on translation or summarisation
(Ranzato et al., 2016, "Sequence Level Training with Recurrent Neural Networks", optimises BLEU
directly); both lie in [0, 1] so they combine with other rewards without rescaling.

Where the references come from, in order of precedence:

1. ``references=`` passed to the call: a list aligned with ``responses`` (each entry one string
   or a list of strings). A trainer that carries a ``reference`` column through the batch uses
   this.
2. A mapping given to the constructor, ``{prompt text: reference(s)}``, looked up by the prompt
   of each response (exact text first, then with surrounding whitespace stripped).
3. A list given to the constructor, aligned with the responses of every call. Only useful when
   the same fixed prompt list is scored each time (evaluation sets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kilter.errors import KilterError
from kilter.rewards.text_metrics import get_rouge_scorer, get_sentence_bleu_metric

ReferenceSource = Mapping[str, str | Sequence[str]] | Sequence[str | Sequence[str]]


def _as_list(refs: str | Sequence[str]) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


class _ReferenceReward:
    """Resolves the references for each response; subclasses score one (response, references)."""

    name = "reference"

    def __init__(self, references: ReferenceSource | None = None) -> None:
        if isinstance(references, str):
            raise KilterError(
                f"{self.name} reward: references must be a mapping or a list, not one string"
            )
        if isinstance(references, Mapping):
            self._by_prompt = {str(p): _as_list(r) for p, r in references.items()}
            self._by_prompt_stripped = {p.strip(): r for p, r in self._by_prompt.items()}
            self._aligned = None
        else:
            self._by_prompt = self._by_prompt_stripped = None
            self._aligned = None if references is None else [_as_list(r) for r in references]

    def _references(
        self, prompts: Sequence[str], responses: Sequence[str], kw: dict
    ) -> list[list[str]]:
        if len(prompts) != len(responses):
            raise KilterError(
                f"{self.name} reward: {len(prompts)} prompts but {len(responses)} responses"
            )
        given = kw.get("references")
        if given is None:
            given = self._aligned
        if given is not None:
            if len(given) != len(responses):
                raise KilterError(
                    f"{self.name} reward: {len(given)} references for {len(responses)} responses"
                )
            return [_as_list(r) for r in given]
        if self._by_prompt is None:
            raise KilterError(
                f"{self.name} reward: no references given (constructor or references=)"
            )
        out = []
        for prompt in prompts:
            refs = self._by_prompt.get(prompt)
            if refs is None:
                refs = self._by_prompt_stripped.get(prompt.strip())
            if refs is None:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise KilterError(f"{self.name} reward: no reference for prompt {shown!r}")
            out.append(refs)
        return out

    def score(self, response: str, references: list[str]) -> float:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **kw) -> list[float]:
        refs = self._references(prompts, responses, kw)
        return [self.score(resp, r) for resp, r in zip(responses, refs, strict=True)]


class BleuReward(_ReferenceReward):
    """Sentence BLEU / 100 (sacrebleu, exp smoothing, effective order) against the references.

    Identical text scores 1.0 and a response sharing no word with any reference scores 0.0.
    """

    name = "bleu"

    def __init__(self, references: ReferenceSource | None = None, tokenize: str = "13a") -> None:
        super().__init__(references)
        self._metric = get_sentence_bleu_metric(tokenize)

    def score(self, response: str, references: list[str]) -> float:
        # sacrebleu's float arithmetic can land a hair above 100 for a perfect match
        return min(1.0, self._metric.sentence_score(response, references).score / 100.0)


class RougeReward(_ReferenceReward):
    """ROUGE F-measure of ``rouge_type`` against the best-matching reference, in [0, 1]."""

    name = "rouge"

    def __init__(
        self,
        references: ReferenceSource | None = None,
        rouge_type: str = "rougeL",
        use_stemmer: bool = True,
    ) -> None:
        super().__init__(references)
        self.rouge_type = rouge_type
        self._scorer = get_rouge_scorer((rouge_type,), use_stemmer)

    def score(self, response: str, references: list[str]) -> float:
        return float(self._scorer.score_multi(references, response)[self.rouge_type].fmeasure)
