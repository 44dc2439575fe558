"""The built-in task: short product reviews, judged by a hidden "gold" preference.

Kilter's offline default needs a task that a tiny GPT can learn on two CPU cores in about a
minute, and a judge that stands in for people.  This module provides both:

* **Prompts** are one instruction sentence such as ``Write a review of the blender.``
  (8 templates x 48 products in 4 categories = 384 distinct prompts).
* **Demonstrations** (SFT data) are 1-5 short templated sentences from a vocabulary of a few
  hundred words.  They deliberately *vary in quality* along every gold axis -- sentiment from
  very negative to very positive, on topic / vague / about the wrong product, concise or padded
  with filler -- roughly uniformly, so the average demonstration is mediocre and the SFT
  model's samples leave plenty of room for RLHF to improve.
* **Gold** (:func:`gold_score`) is the hidden human preference; see its docstring for the
  formula.  :mod:`kilter.data.labeler` turns it into noisy comparisons, rankings and thumbs.

Formatting stays out of this module: a prompt is exactly the instruction sentence and a
completion is exactly the review text (no leading space, no EOS).  Trainers join them as
``prompt + separator + completion + EOS`` with whatever separator or chat template they use.

Train/eval split (``split=``):

* ``"product"`` (default): the products at positions 5 and 11 of each category (8 of 48) are
  held out, so eval prompts name products never seen in training data -- this measures
  generalization, but a model must copy an unseen word from the prompt to be on topic.
* ``"template"``: the last two prompt templates are held out; every product appears on both
  sides.  Easier, for models that cannot copy unseen words.  The held-out phrasings reorder
  words of the training text ("Give a review of the kettle.", "Tell me what you think of my
  kettle."), so they test a new phrasing, not an unseen word.

The split is fixed (independent of the seed) so evaluations are comparable across seeds.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from kilter.config import BaseConfig, Field

__all__ = [
    "CATEGORIES",
    "PRODUCTS",
    "EVAL_PRODUCTS",
    "PROMPT_TEMPLATES",
    "TaskData",
    "TaskConfig",
    "build_task",
    "split_prompts",
    "extract_product",
    "products_named",
    "names_product",
    "product_mention_rate",
    "gold_breakdown",
    "gold_score",
    "gold_scores",
    "repetition_fraction",
    "write_review",
    "run",
]

# --------------------------------------------------------------------------- catalogue

# Product names are single lowercase words that VADER gives no sentiment and that the
# review templates never use as ordinary words (so "mentions the product" is unambiguous).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "kitchen": (
        "blender", "toaster", "kettle", "mixer", "microwave", "skillet",
        "juicer", "teapot", "oven", "fridge", "grinder", "stove",
    ),
    "electronics": (
        "phone", "laptop", "tablet", "camera", "speaker", "headset",
        "keyboard", "mouse", "monitor", "printer", "router", "charger",
    ),
    "home": (
        "lamp", "chair", "desk", "sofa", "mattress", "pillow",
        "blanket", "rug", "mirror", "clock", "vacuum", "heater",
    ),
    "outdoor": (
        "bicycle", "tent", "backpack", "helmet", "kayak", "scooter",
        "skateboard", "hammock", "flashlight", "cooler", "umbrella", "lantern",
    ),
}  # fmt: skip
PRODUCTS: tuple[str, ...] = tuple(p for names in CATEGORIES.values() for p in names)
_HELD_OUT_POSITIONS = (5, 11)  # per category, for split="product"
EVAL_PRODUCTS: tuple[str, ...] = tuple(
    names[i] for names in CATEGORIES.values() for i in _HELD_OUT_POSITIONS
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "Write a review of the {product}.",
    "Write a short review of the {product}.",
    "Review the {product}.",
    "Tell me what you think of the {product}.",
    "Give your opinion on the {product}.",
    "Describe your experience with the {product}.",
    # Held out by split="template": new phrasings made only of words its training text contains
    # (earlier "What do you think of the {product}?" and "Share a review of the {product}." used
    # "What", "Share" and "?", which no training prompt or demonstration has).
    "Give a review of the {product}.",
    "Tell me what you think of my {product}.",
)
_HELD_OUT_TEMPLATES = 2

Split = Literal["product", "template"]

# --------------------------------------------------------------------------- review phrases
# Sentiment levels run from -2 (very negative) to +2 (very positive).  Words were chosen
# from VADER's lexicon so the gold sentiment term tracks the level a demonstration was
# written at; "{S}" is a capitalized subject ("The blender", "It"), "{O}" an object.

_ADJECTIVES: dict[int, tuple[str, ...]] = {
    2: ("great", "excellent", "amazing", "wonderful", "fantastic", "perfect", "awesome"),
    1: ("good", "nice", "useful", "solid", "handy"),
    0: ("okay", "fine", "average", "ordinary", "basic", "plain"),
    -1: ("bad", "poor", "weak", "disappointing", "annoying", "noisy", "flimsy"),
    -2: ("terrible", "awful", "horrible", "useless", "worthless"),
}

_OPENERS: dict[int, tuple[str, ...]] = {
    2: ("{S} is {adj}.", "I love {O}.", "{S} works perfectly.", "{S} is the best I have ever had."),
    1: ("{S} is {adj}.", "I like {O}.", "{S} works well.", "{S} does the job."),
    0: ("{S} is {adj}.", "{S} works most of the time.", "{S} does what it says.", "I do not mind {O}."),
    -1: ("{S} is {adj}.", "I do not like {O}.", "{S} stopped working after a month.", "{S} is hard to use."),
    -2: ("{S} is {adj}.", "I hate {O}.", "{S} broke on the first day.", "{S} is a waste of money."),
}

_FOLLOW_UPS: dict[int, tuple[str, ...]] = {
    2: ("I highly recommend it.", "It is {adj}.", "I would happily buy it again.", "Everyone should get one, it is awesome.",
        "I love it.", "It works great."),
    1: ("It is easy to use.", "I would recommend it.", "It looks nice.", "It is {adj}.", "I like it."),
    0: ("It is fine for the price.", "It is nothing special.", "It could be better.", "It is {adj}.",
        "It is what it is."),
    -1: ("I would not buy it again, sadly.", "It feels cheap and weak.", "The quality is poor.", "It is {adj}.",
         "It is too loud and annoying."),
    -2: ("Do not buy it.", "It is a total disaster.", "It is the worst thing I own.", "It is {adj}.",
         "Avoid it.", "It broke after a week."),
}  # fmt: skip

# Rambling: sentences about the writer's life that VADER scores as neutral.
_FILLER: tuple[str, ...] = (
    "I bought it last week.", "I got it on sale.", "My sister has one too.",
    "It came in a big box.", "I use it every day.", "We moved to a new house last year.",
    "The store is close to my house.", "I ordered it online.", "My dog sleeps all day.",
    "It was raining that day.", "I have two kids.", "My neighbor asked about it.",
    "I read about it in a magazine.", "The box was blue.", "I paid with cash.",
    "My brother works at a bank.", "We eat dinner at six.", "I drive an old car.",
    "The mail came late on Monday.", "I also need new shoes.",
)  # fmt: skip

# Digressions name a different product from the catalogue (off topic for gold).
_DIGRESSIONS: tuple[str, ...] = (
    "I also have {a_other}.", "My old {other} was {adj}.", "I also bought {a_other} last month.",
    "My {other} is better.", "I wanted {a_other} instead.",
)  # fmt: skip

_NAMED_SUBJECTS = ("The {p}", "This {p}", "My {p}", "My new {p}")
_NAMED_OBJECTS = ("this {p}", "the {p}", "my {p}")
_VAGUE_SUBJECTS = ("It", "This one", "This thing")
_VAGUE_OBJECTS = ("it", "this one")

# How a demonstration relates to its prompt's product: names it, never names any product,
# reviews another product by mistake, or names it and then digresses to another one.  Reviewing
# the wrong product is rare (as a person's mistake is): with 15% of them the SFT model named the
# wrong product in more samples than the right one, and a tiny reward model learned "names a
# product" rather than "names this product", which RLHF cannot turn into naming the right one.
# Vague reviews ("It works well.") are common, as in people's demonstrations: naming the product is
# what the gold preference, and so RLHF, has to add.  With 60% named and 20% vague the SFT model
# already named the product in 70% of held-out samples and PPO could only reach 84%; with these
# weights (about half the demonstrations name the product) SFT names it in about 45% and the
# demo's PPO in about 73% (docs/ppo.md, "The demo since issue 13 item 7").
_TOPIC_MODES = ("named", "vague", "confused", "digress")
_TOPIC_WEIGHTS = (0.4, 0.45, 0.04, 0.11)

# --------------------------------------------------------------------------- prompts


def split_prompts(split: Split = "product") -> tuple[list[str], list[str]]:
    """(train_prompts, eval_prompts), fixed for a given ``split`` (see the module docstring)."""
    if split not in ("product", "template"):
        raise ValueError(f"split must be 'product' or 'template', got {split!r}")
    train, held = [], []
    for t_index, template in enumerate(PROMPT_TEMPLATES):
        for product in PRODUCTS:
            if split == "product":
                is_eval = product in EVAL_PRODUCTS
            else:
                is_eval = t_index >= len(PROMPT_TEMPLATES) - _HELD_OUT_TEMPLATES
            (held if is_eval else train).append(template.format(product=product))
    return train, held


_PRODUCT_RE = re.compile(r"\b(" + "|".join(PRODUCTS) + r")s?\b", re.IGNORECASE)


def extract_product(prompt: str) -> str | None:
    """The first catalogue product named in ``prompt`` (lowercase), or None if there is none."""
    match = _PRODUCT_RE.search(prompt)
    return match.group(1).lower() if match else None


def products_named(text: str) -> set[str]:
    """Every catalogue product ``text`` names (singular or plural, any case)."""
    return {m.group(1).lower() for m in _PRODUCT_RE.finditer(text)}


def names_product(prompt: str, response: str) -> bool | None:
    """Whether ``response`` names the product ``prompt`` asks about; None when the prompt names none."""
    product = extract_product(prompt)
    return None if product is None else product in products_named(response)


def product_mention_rate(prompts: list[str], responses: list[str]) -> float | None:
    """Share of responses that name their prompt's product, over prompts that name one (None: no such prompt)."""
    hits = [h for h in map(names_product, prompts, responses) if h is not None]
    return sum(hits) / len(hits) if hits else None


# --------------------------------------------------------------------------- gold

SENTIMENT_WEIGHT = 1.0
ON_TOPIC_BONUS = 1.0
OFF_TOPIC_PENALTY = 0.5
FREE_WORDS = 12
LENGTH_COST_PER_WORD = 0.1
LENGTH_COST_CAP = 1.0
REPETITION_WEIGHT = 1.5
EMPTY_SCORE = -2.0

_WORD_RE = re.compile(r"[a-z0-9']+")
_SENTENCE_RE = re.compile(r"[.!?\n]+")


@lru_cache(maxsize=1)
def _analyzer():
    """VADER's analyzer, built once on first use (loading its lexicon is the slow part)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def repetition_fraction(text: str) -> float:
    """How degenerate ``text`` is, in [0, 1]: the largest of three repetition rates.

    * repeated sentences: share of sentences equal (as lowercase words) to an earlier one;
    * repeated trigrams: share of word trigrams (inside a sentence) seen before in the text;
    * stutter: share of word pairs (inside a sentence) that are one word twice ("great great").

    N-grams do not cross sentence ends, so "Avoid it. It is bad." is not a stutter.
    Worked: "great great great great" -> sentences 0, trigrams 1/2, stutter 3/3 -> 1.0;
    "The blender is great. The blender is great." -> sentences 1/2, trigrams 2/4 -> 0.5.
    """
    sentences = [tuple(_words(s)) for s in _SENTENCE_RE.split(text)]
    sentences = [s for s in sentences if s]
    if not sentences:
        return 0.0
    trigrams = [t for s in sentences for t in zip(s, s[1:], s[2:])]
    pairs = [p for s in sentences for p in zip(s, s[1:])]
    rates = [1.0 - len(set(sentences)) / len(sentences)]
    if trigrams:
        rates.append(1.0 - len(set(trigrams)) / len(trigrams))
    if pairs:
        rates.append(sum(a == b for a, b in pairs) / len(pairs))
    return max(rates)


def gold_breakdown(prompt: str, response: str) -> dict[str, float]:
    """The terms of :func:`gold_score` by name (they sum to it), for reports and debugging."""
    words = _words(response)
    if not words:
        return {"empty": EMPTY_SCORE}
    sentiment = SENTIMENT_WEIGHT * _analyzer().polarity_scores(response)["compound"]
    topic = 0.0
    product = extract_product(prompt)
    if product is not None:
        named = products_named(response)
        topic += ON_TOPIC_BONUS if product in named else 0.0
        topic -= OFF_TOPIC_PENALTY if named - {product} else 0.0
    length = -min(LENGTH_COST_CAP, LENGTH_COST_PER_WORD * max(0, len(words) - FREE_WORDS))
    repetition = -REPETITION_WEIGHT * repetition_fraction(response)
    return {"sentiment": sentiment, "topic": topic, "length": length, "repetition": repetition}


def gold_score(prompt: str, response: str) -> float:
    """The hidden human preference for ``response`` to ``prompt`` (higher is better).

    gold = sentiment + topic + length + repetition, where

    * sentiment  = VADER compound score of the response, in [-1, 1];
    * topic      = +1.0 if it names the prompt's product, -0.5 if it names any other
                   catalogue product (both can apply: +0.5); 0 when the prompt names no product.
                   Naming the product outweighs any change of tone, so generic praise that
                   would fit every prompt ("I love it.") loses to a review of *this* product;
    * length     = -0.1 per word beyond 12, capped at -1.0 (words = runs of letters/digits);
    * repetition = -1.5 x :func:`repetition_fraction` (so "great great great" cannot win);

    and a response without any word scores -2.0.  The best reviews reach about 2, the
    worst about -3; demonstrations spread over roughly [-2, 2].
    """
    return float(sum(gold_breakdown(prompt, response).values()))


def gold_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`gold_score` for each (prompt, response) pair; usable as a Python reward function."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_scores got {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


# --------------------------------------------------------------------------- demonstrations


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fill(rng: random.Random, template: str, level: int, product: str | None, other: str) -> str:
    if product is None:
        subject, obj = rng.choice(_VAGUE_SUBJECTS), rng.choice(_VAGUE_OBJECTS)
    else:
        subject = rng.choice(_NAMED_SUBJECTS).format(p=product)
        obj = rng.choice(_NAMED_OBJECTS).format(p=product)
    return template.format(
        S=subject, O=obj, adj=rng.choice(_ADJECTIVES[level]), other=other, a_other=_article(other)
    )


def write_review(rng: random.Random, product: str, others: list[str]) -> str:
    """One demonstration for ``product``: a random sentiment level, topic mode and length."""
    level = rng.randint(-2, 2)
    mode = rng.choices(_TOPIC_MODES, weights=_TOPIC_WEIGHTS)[0]
    other = rng.choice(others)
    n_sentences = rng.randint(1, 5)
    n_core = rng.randint(1, min(3, n_sentences))
    n_filler = n_sentences - n_core
    if mode == "digress" and n_filler > 0:
        n_filler -= 1  # the digression takes a filler's place

    def level_near() -> int:
        # Some reviews are mixed: a sentence one step away from the overall level.
        if rng.random() < 0.15:
            return max(-2, min(2, level + rng.choice((-1, 1))))
        return level

    subject = {"named": product, "vague": None, "confused": other, "digress": product}[mode]
    opener_level = level_near()
    opener = _fill(rng, rng.choice(_OPENERS[opener_level]), opener_level, subject, other)
    rest: list[str] = []
    follow_ups = [t for t in _FOLLOW_UPS[level] if t != opener]  # "I love it." twice is degenerate
    for template in rng.sample(follow_ups, n_core - 1):
        rest.append(_fill(rng, template, level_near(), subject, other))
    rest.extend(rng.sample(_FILLER, n_filler))
    if mode == "digress":
        rest.append(_fill(rng, rng.choice(_DIGRESSIONS), level_near(), subject, other))
    rng.shuffle(rest)
    return " ".join([opener, *rest])


def _demonstrations(rng: random.Random, prompts: list[str], n: int, products: list[str]) -> list[dict]:
    """``n`` demonstrations cycling through ``prompts`` in a fresh shuffled order each pass."""
    rows: list[dict] = []
    order: list[str] = []
    while len(rows) < n:
        if not order:
            order = list(prompts)
            rng.shuffle(order)
        prompt = order.pop()
        product = extract_product(prompt)
        assert product is not None  # every task prompt names a catalogue product
        others = [p for p in products if p != product]
        rows.append({"prompt": prompt, "completion": write_review(rng, product, others)})
    return rows


@dataclass
class TaskData:
    """Everything the built-in task provides; prompts and completions are unformatted text."""

    corpus: list[str]
    """Plain texts for optional LM pretraining: ``prompt + " " + completion`` of each demonstration."""
    demonstrations: list[dict]
    """SFT records ``{"prompt", "completion"}`` on training prompts."""
    train_prompts: list[str]
    """Prompts for training (SFT, labeling, RL)."""
    eval_prompts: list[str]
    """Held-out prompts for evaluation."""
    eval_demonstrations: list[dict]
    """SFT records on held-out prompts (for an eval loss)."""


def build_task(seed: int = 0, n_demonstrations: int = 4000, n_eval: int = 200, split: Split = "product") -> TaskData:
    """Generate the task; the same arguments always give the same data.

    Training demonstrations only name training-side products (and eval ones only eval-side
    products) when ``split="product"``, so held-out products never leak into training text.
    """
    train_prompts, eval_prompts = split_prompts(split)
    if split == "product":
        train_products = [p for p in PRODUCTS if p not in EVAL_PRODUCTS]
        eval_products = list(EVAL_PRODUCTS)
    else:
        train_products = eval_products = list(PRODUCTS)
    demos = _demonstrations(random.Random(f"kilter-task-{seed}-train"), train_prompts, n_demonstrations, train_products)
    eval_demos = _demonstrations(random.Random(f"kilter-task-{seed}-eval"), eval_prompts, n_eval, eval_products)
    corpus = [f"{d['prompt']} {d['completion']}" for d in demos]
    return TaskData(corpus, demos, train_prompts, eval_prompts, eval_demos)


# --------------------------------------------------------------------------- command


class TaskConfig(BaseConfig):
    """Files: corpus.jsonl, sft.jsonl, sft_eval.jsonl, prompts.jsonl, prompts_eval.jsonl (DESIGN.md records)."""

    out_dir: str = "data/task"
    """Folder to write the files into (created if missing; existing files are replaced)."""
    seed: int = 0
    """Seed for the demonstrations; the train/eval prompt split does not depend on it."""
    n_demonstrations: int = Field(4000, gt=0)
    """Number of training demonstrations (also the number of corpus texts)."""
    n_eval: int = Field(200, gt=0)
    """Number of demonstrations on held-out prompts."""
    split: Split = "product"
    """What eval holds out: "product" (8 of 48 products never seen in training) or "template" (2 of 8 prompt phrasings)."""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(cfg: TaskConfig) -> int:
    data = build_task(cfg.seed, cfg.n_demonstrations, cfg.n_eval, cfg.split)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "corpus.jsonl": [{"text": t} for t in data.corpus],
        "sft.jsonl": data.demonstrations,
        "sft_eval.jsonl": data.eval_demonstrations,
        "prompts.jsonl": [{"prompt": p} for p in data.train_prompts],
        "prompts_eval.jsonl": [{"prompt": p} for p in data.eval_prompts],
    }
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
        print(f"wrote {len(rows):>5} rows to {out / name}")
    golds = gold_scores([d["prompt"] for d in data.demonstrations], [d["completion"] for d in data.demonstrations])
    mean = sum(golds) / len(golds)
    std = math.sqrt(sum((g - mean) ** 2 for g in golds) / len(golds))
    print(f"demonstration gold: mean {mean:+.3f}, std {std:.3f}, min {min(golds):+.3f}, max {max(golds):+.3f}")
    return 0
