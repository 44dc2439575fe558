"""``kilter eval``: compare policies on one prompt set and write JSON + Markdown reports.

For every model the same prompts are sampled (``n_samples`` each, the same seed for every
model, so a model evaluated against itself draws identical responses), then scored:

* **reward model** -- mean score; for an ensemble also the mean disagreement (std across members);
* **gold** -- the hidden judgment of the built-in task (:func:`kilter.data.task.gold_scores`) or a
  user function ``gold_fn`` with the reward-function signature ``f(prompts, responses)``;
* **KL to the reference** -- see :func:`sequence_kl`; the estimator is described there and in
  docs/eval.md;
* **win rate** against the reference model's responses to the same prompts (pairs matched by
  prompt and sample number), judged by the gold function and by the reward model; ties count 0.5;
* **BLEU / ROUGE** against a references file; **length** in tokens; **distinct-1/2**.

The reference model is ``reference`` (a model name, or any model spec), by default the first
model.  It always appears in the report, with KL 0 and win rate 0.5 by construction.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from kilter.distributed import resolve_device
from kilter.errors import ConfigError, DataError, KilterError
from kilter.rewards.base import call_function, load_function, prompt_text
from kilter.rollout.engine import EngineOptions

Prompt = str | list[dict[str, str]]
ScoreFn = Callable[[list, list[str]], Sequence[float]]

KL_ESTIMATOR = (
    "sequence-level k1: KL(pi || pi_ref) ~ mean over responses y ~ pi(.|x) sampled at temperature 1 "
    "(no top-p/top-k) of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] over the response "
    "tokens (EOS included); unbiased for the KL of the first max_new_tokens tokens, single terms may be negative"
)


class EvalConfig(EngineOptions):
    """Evaluate one or more models on a prompt set: reward, gold, KL, win rate, BLEU/ROUGE, length, diversity."""

    models: list[str] | dict[str, str] = Field(default_factory=lambda: ["builtin:tiny"])
    """Models to evaluate: a list of specs (HF folders, presets, builtin:tiny), a comma-separated string, or a mapping name -> spec."""
    reference: str | None = None
    """Reference model for KL and win rate: one of the model names, or another spec (null: the first model)."""
    prompts: str = "builtin:prompts_eval"
    """Prompt set: a .jsonl/.json/.csv/.parquet file of {prompt} records, a save_to_disk folder, or builtin:prompts_eval."""
    split: str | None = None
    """Split of a saved DatasetDict (default train)."""
    max_prompts: int | None = Field(64, gt=0)
    """Evaluate on the first N prompts (null: all)."""
    task_seed: int = 0
    """Seed of the built-in task's generated prompts (builtin: sources only)."""
    n_samples: int = Field(1, gt=0)
    """Responses sampled per prompt and model."""
    greedy: bool = False
    """Greedy decoding instead of sampling (needs n_samples=1)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the evaluated responses (KL always uses temperature-1 samples)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1: off)."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens (0: off)."""
    max_new_tokens: int = Field(48, gt=0)
    """Length limit of each response in tokens."""
    max_prompt_length: int = Field(256, gt=0)
    """Prompts longer than this many tokens are cut from the left."""
    seed: int = 0
    """Sampling seed, the same for every model."""
    batch_size: int = Field(32, gt=0)
    """Sequences per batch for generation, log-probs and reward-model scoring."""
    reward_model: str | None = None
    """Saved reward model or ensemble folder to score responses with (null: none)."""
    gold_fn: str | None = None
    """Hidden gold judge as module:function f(prompts, responses) -> list[float] (null: the built-in task's gold for builtin: prompts)."""
    references: str | None = None
    """JSONL/JSON/CSV file of {prompt, reference | completion} rows for BLEU and ROUGE (null: skip)."""
    kl: bool = True
    """Estimate the KL to the reference model."""
    show_prompts: int = Field(4, ge=0)
    """Prompts whose responses are shown side by side in the report."""
    output_dir: str | None = "runs/eval"
    """Folder for eval.json, eval.md and gold_vs_kl.png (null: write nothing)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weight dtype of the evaluated models."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run (auto: cuda when available)."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""

    @field_validator("models", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def samples_for_kl_reusable(self) -> bool:
        """Whether the evaluated samples come from pi itself (temperature 1, no truncation of the distribution)."""
        return not self.greedy and self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


# --------------------------------------------------------------------------- pure pieces


@torch.no_grad()
def response_logps(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                   batch_size: int = 32, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) of each response under ``model``.

    prompt_ids, response_ids: N token lists -> (N,) float64.  Scored by the same code as PPO's
    rollouts (:func:`kilter.rollout.scoring.batched_logprobs`): rows laid out as in generation,
    positions counted over real tokens, and pi is the distribution the samplers draw from
    (PAD removed).  An empty response has log-probability 0.
    """
    from kilter.rollout.scoring import assemble, batched_logprobs

    if any(len(p) == 0 for p in prompt_ids):
        raise KilterError("cannot score a response to an empty prompt (no token to condition on)")
    n = len(prompt_ids)
    out = torch.zeros(n, dtype=torch.float64)
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        responses = [list(r) for r in response_ids[start:start + batch_size]]
        if not any(responses):
            continue
        batch = assemble([list(p) for p in prompt_ids[start:start + batch_size]], responses, pad_id, device)
        logp, _ = batched_logprobs(model, batch, temperature, batch_size)
        out[start:start + len(responses)] = logp.double().sum(-1).cpu()
    return out


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-response KL terms log pi(y|x) - log pi_ref(y|x) (the k1 estimator, Schulman 2020).

    logps, ref_logps: (N,) sums over each response's tokens of log-probs under pi and pi_ref,
    for responses y ~ pi at temperature 1 -> (N,).  Their mean estimates KL(pi || pi_ref)
    without bias (sequence-level, the quantity the PPO penalty controls); single terms can be
    negative.  With responses cut at max_new_tokens it is the KL of the first max_new_tokens
    tokens, which by the chain rule never exceeds the KL of whole responses.
    """
    return logps.double() - ref_logps.double()


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n) (0 for a single value; nan for none)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def text_scores(responses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and mean ROUGE-1/2/L F1 (0-1) of ``responses`` against their references."""
    from kilter.rewards.text_metrics import bleu, rouge

    scores = {"text/bleu": bleu(list(responses), [list(r) for r in references])}
    for name, value in rouge(list(responses), [list(r) for r in references]).items():
        scores[f"text/{name}"] = value
    return scores


def prompt_key(prompt: Prompt) -> str:
    """Text that identifies a prompt across files (message lists compare by their JSON)."""
    if isinstance(prompt, str):
        return prompt.strip()
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- inputs


def load_references(path: str, prompts: Sequence[Prompt]) -> list[list[str]]:
    """References for each prompt from a file of ``{prompt, reference | references | completion}`` rows.

    A reference is a string or a list of strings; several rows for one prompt pool their
    references.  Every prompt must have at least one, or a DataError names the first missing.
    """
    from kilter.data.readers import iter_raw_rows
    from kilter.data.records import is_messages, validate_record

    by_prompt: dict[str, list[str]] = {}
    for where, row, problem in iter_raw_rows(path):
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'prompt' and 'reference' fields")
        try:
            prompt = validate_record(row, "prompt")["prompt"]
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        name = next((f for f in ("reference", "references", "completion") if row.get(f) is not None), None)
        if name is None:
            raise DataError(f"{where}: field 'reference': missing (give 'reference' or 'completion')")
        value = row[name]
        if is_messages(value):
            value = [m.get("content") for m in value if m.get("role") == "assistant"]
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
            raise DataError(f"{where}: field {name!r}: expected a non-empty string or a list of them")
        by_prompt.setdefault(prompt_key(prompt), []).extend(refs)
    if not by_prompt:
        raise DataError(f"{path}: no reference rows")
    missing = [p for p in prompts if prompt_key(p) not in by_prompt]
    if missing:
        shown = prompt_text(missing[0])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(f"{path}: no reference for {len(missing)} of the {len(prompts)} evaluated prompts "
                        f"(first: {shown!r})")
    return [by_prompt[prompt_key(p)] for p in prompts]


def resolve_gold(cfg: EvalConfig) -> ScoreFn | None:
    """The gold judge: ``gold_fn`` when set, else the built-in task's gold for builtin: prompts, else None."""
    if cfg.gold_fn:
        try:
            return load_function(cfg.gold_fn)
        except KilterError as exc:
            raise ConfigError(f"config key 'gold_fn': {exc}") from None
    if cfg.prompts.startswith("builtin:"):
        from kilter.data.task import gold_scores

        return gold_scores
    return None


@dataclass
class ModelEntry:
    name: str
    spec: str
    is_reference: bool = False


def default_name(spec: str) -> str:
    """A short display name: the folder name, with its parent when the folder name is generic."""
    if spec.startswith("builtin:") or not any(sep in spec for sep in "/\\"):
        return spec
    parts = [p for p in Path(spec).parts if p not in ("/", "")]
    name = parts[-1] if parts else spec
    i = len(parts) - 1
    while i > 0 and (parts[i] in ("final", "checkpoints", "model") or parts[i].startswith("step-")):
        i -= 1
        name = f"{parts[i]}/{name}"
    return name


def model_entries(cfg: EvalConfig) -> list[ModelEntry]:
    """The models to evaluate, reference first, with unique names."""
    if isinstance(cfg.models, dict):
        pairs = [(str(k), str(v)) for k, v in cfg.models.items()]
    else:
        pairs = [(default_name(s), s) for s in cfg.models]
    if not pairs:
        raise ConfigError("config key 'models': expected at least one model")
    entries: list[ModelEntry] = []
    seen: dict[str, int] = {}
    for name, spec in pairs:
        seen[name] = seen.get(name, 0) + 1
        entries.append(ModelEntry(name if seen[name] == 1 else f"{name}#{seen[name]}", spec))
    ref = cfg.reference
    if ref is None:
        chosen = entries[0]
    else:
        chosen = next((e for e in entries if e.name == ref), None) or next((e for e in entries if e.spec == ref), None)
        if chosen is None:
            name = default_name(ref)
            chosen = ModelEntry(name if name not in {e.name for e in entries} else f"{name} (reference)", ref)
            entries.insert(0, chosen)
    chosen.is_reference = True
    entries.remove(chosen)
    return [chosen] + entries


def check_config(cfg: EvalConfig) -> None:
    cfg.check_available()
    if cfg.greedy and cfg.n_samples > 1:
        raise ConfigError("config key 'n_samples': greedy decoding gives the same response every time; "
                          "use n_samples=1 with greedy=true")


# --------------------------------------------------------------------------- sampling and scoring


@dataclass
class Sampled:
    """One model's responses: row i answers prompt i // n (its sample number is i % n)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]


def _sample(engine, model, tokenizer, prompts: list, n: int, params, cfg: EvalConfig, seed: int) -> Sampled:
    from kilter.data.tokenize import encode_prompt

    ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    repeated = [row for row in ids for _ in range(n)]
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = engine.generate(repeated, params)
    return Sampled(gen.prompt_ids, gen.response_ids, gen.texts, gen.finished)


def _engine(cfg: EvalConfig, entry: ModelEntry, tokenizer, model):
    """The sampler of one evaluated model (cfg.engine); log-probs are always the loaded model's."""
    from kilter.models import resolve_model_path
    from kilter.rollout.engine import make_engine

    path = None if cfg.engine == "hf" else resolve_model_path(entry.spec)
    return make_engine(cfg.engine, model, tokenizer, model_path=path, batch_size=cfg.batch_size, seed=cfg.seed,
                       max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, dtype=cfg.dtype,
                       **cfg.engine_kwargs())


def _rm_scores(reward, prompts: list, texts: list[str], batch_size: int,
               finished: list[bool] | None = None) -> tuple[list[float], list[float] | None]:
    """Reward-model means, and per-response std across members for an ensemble (None for one model).

    Responses cut at the length limit (``finished`` False) are scored without an appended EOS.
    """
    if getattr(reward, "members", None) is not None and callable(getattr(reward, "score_with_std", None)):
        mean, std = reward.score_with_std(prompts, texts, batch_size=batch_size, finished=finished)
        return mean.double().tolist(), std.double().tolist()
    scores = reward.score(prompts, texts, batch_size=batch_size, finished=finished)
    return scores.double().tolist(), None


def _load_reward(spec: str, device: str, dtype: str):
    from kilter.models.reward import load_reward

    return load_reward(spec, device=device, dtype=dtype)


def _device(choice: str) -> str:
    return resolve_device(choice)


def _load(spec: str, dtype: str, device: str):
    from kilter.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer, dtype=dtype, device=device)
    model.eval()
    return tokenizer, model


def _same_vocab(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _round(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


@dataclass
class _Setup:
    """Everything shared by the models of one evaluation."""

    cfg: EvalConfig
    prompts: list
    references: list[list[str]] | None
    gold: ScoreFn | None
    reward: Any
    ref_tokenizer: Any
    ref_model: Any
    notes: list[str]
    ref_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def repeated_prompts(self) -> list:
        return [p for p in self.prompts for _ in range(self.cfg.n_samples)]


def _kl_terms(setup: _Setup, entry: ModelEntry, tokenizer, model, sampled: Sampled,
              engine) -> tuple[list[float], int, bool]:
    """Per-response KL terms, their total token count, and whether they belong to ``sampled``'s rows."""
    from kilter.rollout.generate import SamplingParams

    cfg = setup.cfg
    kl_set = sampled
    if not cfg.samples_for_kl_reusable:
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, do_sample=True)
        kl_set = _sample(engine, model, tokenizer, setup.prompts, cfg.n_samples, params, cfg, cfg.seed + 1)
    pad = tokenizer.pad_token_id
    logps = response_logps(model, kl_set.prompt_ids, kl_set.response_ids, pad, cfg.batch_size)
    if entry.is_reference:
        ref_logps = logps
    else:
        ref_logps = response_logps(setup.ref_model, kl_set.prompt_ids, kl_set.response_ids, pad, cfg.batch_size)
    terms = sequence_kl(logps, ref_logps).tolist()
    return terms, sum(len(r) for r in kl_set.response_ids), kl_set is sampled


def _evaluate_one(setup: _Setup, entry: ModelEntry, tokenizer, model) -> dict[str, Any]:
    """Sample one model's responses and compute all its metrics (the reference must come first)."""
    from kilter.data.task import product_mention_rate
    from kilter.rewards.text_metrics import distinct_n, win_rate
    from kilter.rollout.engine import close_engine
    from kilter.rollout.generate import SamplingParams

    cfg, n = setup.cfg, setup.cfg.n_samples
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, do_sample=not cfg.greedy)
    engine = _engine(cfg, entry, tokenizer, model)
    sampled = _sample(engine, model, tokenizer, setup.prompts, n, params, cfg, cfg.seed)
    texts, prompts = sampled.texts, setup.repeated_prompts
    metrics: dict[str, float | None] = {}
    per_sample: dict[str, list[float]] = {}

    if setup.gold is not None:
        # judges take prompts as text, as reward functions do (a message list becomes its last message)
        per_sample["gold"] = call_function(setup.gold, prompts, texts, name="gold_fn")
        metrics["reward/gold"], metrics["reward/gold_stderr"] = mean_and_stderr(per_sample["gold"])
    if setup.reward is not None:
        per_sample["rm"], std = _rm_scores(setup.reward, prompts, texts, cfg.batch_size, sampled.finished)
        metrics["reward/rm"], metrics["reward/rm_stderr"] = mean_and_stderr(per_sample["rm"])
        if std is not None:
            per_sample["rm_std"] = std
            metrics["reward/rm_ensemble_std"] = sum(std) / len(std)
    if cfg.kl:
        if _same_vocab(tokenizer, setup.ref_tokenizer):
            terms, n_tokens, aligned = _kl_terms(setup, entry, tokenizer, model, sampled, engine)
            if aligned:
                per_sample["kl"] = terms
            metrics["kl/ref"], metrics["kl/ref_stderr"] = mean_and_stderr(terms)
            metrics["kl/ref_per_token"] = sum(terms) / n_tokens if n_tokens else 0.0
        else:
            setup.notes.append(f"{entry.name}: no KL (its tokenizer differs from the reference's)")
    close_engine(engine)
    if entry.is_reference:
        setup.ref_scores = {k: per_sample[k] for k in ("gold", "rm") if k in per_sample}
    for judge, ref_values in setup.ref_scores.items():
        # pairs share the prompt and the sample number: row i of both models answers prompt i // n
        metrics[f"win_rate/{judge}"] = win_rate(per_sample[judge], ref_values)
    if setup.references is not None:
        metrics.update(text_scores(texts, [setup.references[i // n] for i in range(len(texts))]))
    # Counted on the generated ids: re-tokenizing decoded text can split differently.
    lengths = [sum(t != tokenizer.eos_token_id for t in r) for r in sampled.response_ids]
    metrics["response/length"] = sum(lengths) / len(lengths)
    metrics["response/finished"] = sum(sampled.finished) / len(sampled.finished)
    metrics["response/distinct_1"] = distinct_n(texts, 1)
    metrics["response/distinct_2"] = distinct_n(texts, 2)
    mention = product_mention_rate([prompt_text(p) for p in prompts], texts)
    if mention is not None:
        metrics["response/product_mention"] = mention

    samples = []
    for i, text in enumerate(texts):
        row: dict[str, Any] = {"prompt_index": i // n, "sample": i % n, "response": text, "tokens": lengths[i],
                               "finished": sampled.finished[i]}
        row.update({k: _round(v[i]) for k, v in per_sample.items()})
        samples.append(row)
    return {"name": entry.name, "spec": entry.spec, "is_reference": entry.is_reference,
            "metrics": {k: _round(v) for k, v in metrics.items()}, "samples": samples}


def evaluate_models(cfg: EvalConfig, *, reward_model: Any = None, gold_fn: ScoreFn | None = None,
                    verbose: bool = True) -> dict[str, Any]:
    """Sample, score and compare every model of ``cfg``; write the reports when ``cfg.output_dir`` is set.

    ``reward_model`` (an object with ``score``, or ``members`` + ``score_with_std`` for an
    ensemble) and ``gold_fn`` override the config's, for callers that already hold them.
    Returns the report as a JSON-ready dict (what eval.json holds)::

        {"reference": name, "prompts": {"items", "count", ...}, "notes": [...],
         "models": [{"name", "spec", "is_reference", "metrics": {"reward/gold", "kl/ref", ...},
                     "samples": [{"prompt_index", "sample", "response", "gold", ...}]}], ...}
    """
    from kilter.data.sources import load_records
    from kilter.models import resolve_model_path

    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    entries = model_entries(cfg)
    device = _device(cfg.device)
    # Every input is checked before the first model spends minutes sampling.
    for entry in entries:
        resolve_model_path(entry.spec)
    records = load_records(cfg.prompts, "prompt", split=cfg.split, task_seed=cfg.task_seed)
    prompts = [r["prompt"] for r in records.rows][: cfg.max_prompts]
    references = load_references(cfg.references, prompts) if cfg.references else None
    gold = gold_fn if gold_fn is not None else resolve_gold(cfg)
    reward = reward_model
    if reward is None and cfg.reward_model:
        reward = _load_reward(cfg.reward_model, device, cfg.dtype)

    notes: list[str] = []
    if cfg.kl and not cfg.samples_for_kl_reusable:
        notes.append("KL was estimated on separate temperature-1 samples (the evaluated responses are not draws "
                     "from the model at temperature 1).")
    ref_tokenizer, ref_model = _load(entries[0].spec, cfg.dtype, device)
    setup = _Setup(cfg, prompts, references, gold, reward, ref_tokenizer, ref_model, notes)
    results = []
    for entry in entries:
        if verbose:
            print(f"kilter eval: {entry.name}: {len(prompts)} prompts x {cfg.n_samples} samples")
        if entry.is_reference:
            results.append(_evaluate_one(setup, entry, ref_tokenizer, ref_model))
            continue
        tokenizer, model = _load(entry.spec, cfg.dtype, device)
        results.append(_evaluate_one(setup, entry, tokenizer, model))
        del model  # only the reference stays in memory
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    report = {
        "command": "kilter eval",
        "reference": entries[0].name,
        "prompts": {"source": cfg.prompts, "count": len(prompts), "samples_per_prompt": cfg.n_samples,
                    "items": prompts},
        "sampling": {"greedy": cfg.greedy, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "judges": {"gold": (cfg.gold_fn or "builtin:gold") if gold is not None else None,
                   "reward_model": cfg.reward_model or ("(given)" if reward is not None else None)},
        "references": cfg.references,
        "kl_estimator": KL_ESTIMATOR if cfg.kl else None,
        "notes": notes,
        "models": results,
        "config": cfg.model_dump(mode="json"),
    }
    if cfg.output_dir:
        from kilter.evaluation.report import write_reports

        report["files"] = {k: str(v) for k, v in write_reports(report, cfg.output_dir).items()}
    return report


def run(cfg: EvalConfig) -> int:
    from kilter.evaluation.report import metrics_markdown, samples_markdown

    report = evaluate_models(cfg)
    print()
    print(metrics_markdown(report))
    if cfg.show_prompts:
        print()
        print(samples_markdown(report, cfg.show_prompts, max_chars=70))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if report.get("files"):
        print("\nkilter eval: wrote " + ", ".join(report["files"].values()))
    return 0


__all__ = [
    "KL_ESTIMATOR",
    "EvalConfig",
    "evaluate_models",
    "load_references",
    "mean_and_stderr",
    "response_logps",
    "run",
    "sequence_kl",
    "text_scores",
]
