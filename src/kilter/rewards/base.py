"""Reward sources for RL and how they combine into one scalar per response.

A *source* maps (prompts, responses) to one float per response.  Kinds:

* ``model`` -- a saved reward model or ensemble (:func:`kilter.models.reward.load_reward`);
  for an ensemble the reward is ``mean - std_coef * std`` over members, a pessimistic
  (uncertainty-penalised) reward that discourages exploiting where the members disagree.
* ``function`` -- a plain Python callable ``f(prompts, responses) -> list[float]`` named
  ``"package.module:function"`` or ``"path/to/file.py:function"``; ``builtin:gold`` is the
  built-in task's hidden gold judgment (:func:`kilter.data.task.gold_scores`).
* ``bleu`` / ``rouge`` -- sentence BLEU or ROUGE in [0, 1] against references from a
  demonstration file (``{"prompt", "completion"}`` rows; several rows per prompt are several
  references), as in sequence-level REINFORCE for translation and summarisation.

:class:`RewardPipeline` sums the sources with their weights (DeepMind's Sparrow combined a
preference model with rule penalties this way), subtracts a penalty from responses that hit
the length limit without ending, optionally normalises with running statistics and clips.
Prompts reach functions and references as text: a conversational prompt (message list) is
represented by its last message's content.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kilter.config import BaseConfig
from kilter.errors import ConfigError, KilterError

RewardFn = Callable[[list, list[str]], Sequence[float]]

__all__ = [
    "RewardSourceConfig",
    "RewardConfig",
    "RewardOutput",
    "RewardPipeline",
    "RunningMeanStd",
    "ModelReward",
    "FunctionReward",
    "build_reward",
    "call_function",
    "load_function",
    "prompt_text",
]


# --------------------------------------------------------------------------- config


class RewardSourceConfig(BaseConfig):
    """One term of the reward; the total is the weighted sum of all terms."""

    type: Literal["model", "function", "bleu", "rouge"]
    """model (reward model folder or ensemble), function (Python callable), bleu or rouge (against references)."""
    path: str
    """A reward-model folder; 'module:function', 'file.py:function' or builtin:gold; or a references file."""
    weight: float = 1.0
    """Multiplier of this term in the total reward."""
    name: str | None = None
    """Name in the metrics (reward/<name>); default rm for models, the function's name, bleu or rouge."""
    std_coef: float = Field(0.0, ge=0)
    """Ensembles: reward = mean - std_coef * std over members (0: the mean)."""
    rouge_type: str = "rougeL"
    """ROUGE variant for type rouge (rouge1, rouge2, rougeL, rougeLsum)."""
    batch_size: int = Field(64, gt=0)
    """Reward-model scoring batch size."""


class RewardConfig(BaseConfig):
    """Where the scalar reward of a response comes from, and how it is shaped."""

    model: str | None = None
    """Shorthand for one source of type model with weight 1: a reward-model folder, ensemble or rm run directory."""
    function: str | None = None
    """Shorthand for one function source with weight 1: 'module:function', 'file.py:function' or builtin:gold."""
    sources: list[RewardSourceConfig] = []
    """Further weighted sources (see RewardSourceConfig); all sources are summed."""
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    """Subtract this from the reward of responses that hit max_new_tokens without ending (null: none); reward models score such responses without an appended EOS."""
    device: str | None = None
    """Where reward models run: null = the trainer's device; cpu offloads them (their weights never
    take GPU memory; scoring runs on the CPU); cuda:N puts them on another GPU."""
    normalize: bool = False
    """Standardise rewards with running mean/std over all rewards seen so far (kept in checkpoints)."""
    clip: float | None = Field(None, gt=0)
    """Clip the (normalised) reward to [-clip, clip] (null: no clipping)."""

    def all_sources(self) -> list[RewardSourceConfig]:
        out = list(self.sources)
        if self.model:
            out.insert(0, RewardSourceConfig(type="model", path=self.model))
        if self.function:
            out.insert(1 if self.model else 0, RewardSourceConfig(type="function", path=self.function))
        return out


# --------------------------------------------------------------------------- helpers


def prompt_text(prompt: Any) -> str:
    """A prompt as text for functions and references: itself, or a message list's last content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def load_function(spec: str) -> RewardFn:
    """Import a reward function from ``"pkg.module:name"``, ``"path/to/file.py:name"`` or ``builtin:gold``.

    The one loader of user reward functions (ppo, bon, DPO/KTO samples, eval): a target ending in
    ``.py`` or holding a path separator is a file, imported under a stable module name (registered,
    so its classes pickle); anything else is a module on the path.  Every failure -- a bad spec,
    a missing file, an import error inside the user's file, no such callable -- is one ConfigError.
    """
    if spec == "builtin:gold":
        from kilter.data.task import gold_scores

        return gold_scores
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"reward function {spec!r}: expected 'module:function', 'path/to/file.py:function' "
                          "or builtin:gold")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: file not found: {target}")
        module_name = "kilter_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"reward function {spec!r}: cannot import {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file failed to import; say so in one line
            sys.modules.pop(module_name, None)
            raise ConfigError(f"reward function {spec!r}: importing {target} failed: "
                              f"{type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"reward function {spec!r}: cannot import module {target} ({exc})") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {target} has no callable named {name!r}")
    return fn


def call_function(fn: RewardFn, prompts: Sequence, responses: Sequence[str], name: str = "") -> list[float]:
    """``fn(prompts as text, responses)`` checked: one finite number per response, else one KilterError.

    Prompts reach every reward function the same way, as text (:func:`prompt_text`: a message list
    becomes its last message's content), whichever command calls it.
    """
    label = name or getattr(fn, "__name__", "reward function")
    out = fn([prompt_text(p) for p in prompts], list(responses))
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().flatten().tolist()
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise KilterError(f"reward function {label} must return a list of numbers, got {type(out).__name__}") from None
    if len(values) != len(responses):
        raise KilterError(f"reward function {label} returned {len(values)} rewards for {len(responses)} responses")
    bad = next((v for v in values if not math.isfinite(v)), None)
    if bad is not None:
        raise KilterError(f"reward function {label} returned a non-finite reward ({bad})")
    return values


def _references(path: str) -> dict[str, list[str]]:
    from kilter.data.sources import load_records

    rows = load_records(path, "demonstration").rows
    refs: dict[str, list[str]] = {}
    for row in rows:
        completion = row["completion"]
        text = completion if isinstance(completion, str) else prompt_text(completion)
        refs.setdefault(prompt_text(row["prompt"]), []).append(text)
    if not refs:
        raise ConfigError(f"reward references file {path} has no rows")
    return refs


class RunningMeanStd:
    """Mean and variance of every value seen so far, updated a batch at a time.

    Combines batch statistics with the parallel-variance formula of Chan et al. (1979), so
    the result equals the statistics of all values concatenated (population variance).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.var = 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_var = float(values.var(unbiased=False))
        if self.count == 0:
            self.count, self.mean, self.var = n, batch_mean, batch_var
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


# --------------------------------------------------------------------------- sources


class ModelReward:
    """A reward model or ensemble as a source; ensembles may subtract ``std_coef * std``."""

    def __init__(self, path: str, name: str = "rm", std_coef: float = 0.0, batch_size: int = 64,
                 device: str | None = None) -> None:
        from kilter.models.reward import load_reward

        self.path = path
        self.name = name
        self.std_coef = std_coef
        self.batch_size = batch_size
        self.model = load_reward(path, device=device)
        self.last_std: torch.Tensor | None = None

    @property
    def is_ensemble(self) -> bool:
        return hasattr(self.model, "members")

    def __call__(self, prompts: list, responses: list[str], finished: Sequence[bool] | None = None) -> torch.Tensor:
        mean, std = self.model.score_with_std(prompts, responses, batch_size=self.batch_size, finished=finished)
        self.last_std = std if self.is_ensemble else None
        return (mean - self.std_coef * std).float()


class FunctionReward:
    """A Python callable (or BLEU/ROUGE) as a source; its output is checked for shape and finiteness."""

    def __init__(self, fn: RewardFn, name: str, spec: str = "") -> None:
        self.fn = fn
        self.name = name
        self.spec = spec or name

    def __call__(self, prompts: list, responses: list[str], finished: Sequence[bool] | None = None) -> torch.Tensor:
        return torch.tensor(call_function(self.fn, prompts, responses, self.spec), dtype=torch.float32)


@dataclass
class RewardOutput:
    total: torch.Tensor
    """(N,) the reward the RL algorithm optimises (after penalty, normalisation, clipping)."""
    raw: torch.Tensor
    """(N,) the weighted sum of the sources, before any shaping."""
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    """(N,) each source's unweighted reward by name (plus '<name>_std' for ensembles)."""


class RewardPipeline:
    """Weighted sources -> penalty for unfinished responses -> running normalisation -> clip."""

    def __init__(self, sources: list[tuple[Any, float]], missing_eos_penalty: float | None = None,
                 normalize: bool = False, clip: float | None = None) -> None:
        if not sources:
            raise ConfigError("no reward source: set reward.model, reward.function or reward.sources")
        names = [s.name for s, _ in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward sources need distinct names, got {names}; set name: for each")
        self.sources = sources
        self.missing_eos_penalty = missing_eos_penalty
        self.normalize = normalize
        self.clip = clip
        self.stats = RunningMeanStd()
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Data-parallel runs: every process's rewards of the batch (in rank order), for the running statistics."""

    def __call__(self, prompts: list, responses: list[str], finished: Sequence[bool] | None = None,
                 update_stats: bool = True) -> RewardOutput:
        raw = torch.zeros(len(responses), dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for source, weight in self.sources:
            values = source(prompts, responses, finished)
            components[source.name] = values
            if getattr(source, "last_std", None) is not None:
                components[f"{source.name}_std"] = source.last_std
            raw = raw + weight * values
        total = raw.clone()
        if self.missing_eos_penalty is not None and finished is not None:
            unfinished = ~torch.as_tensor(list(finished), dtype=torch.bool)
            total = total - self.missing_eos_penalty * unfinished.float()
        if self.normalize:
            if update_stats:
                self.stats.update(self.gather(total) if self.gather is not None else total)
            total = (total - self.stats.mean) / (self.stats.std + 1e-8)
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        return RewardOutput(total=total, raw=raw, components=components)

    @property
    def uses_model(self) -> bool:
        return any(isinstance(s, ModelReward) for s, _ in self.sources)

    def first_model_path(self) -> str | None:
        return next((s.path for s, _ in self.sources if isinstance(s, ModelReward)), None)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])


def build_source(cfg: RewardSourceConfig, device: str | None = None):
    if cfg.type == "model":
        return ModelReward(cfg.path, cfg.name or "rm", cfg.std_coef, cfg.batch_size, device)
    if cfg.type == "function":
        fn = load_function(cfg.path)
        default = "gold" if cfg.path == "builtin:gold" else getattr(fn, "__name__", "function")
        return FunctionReward(fn, cfg.name or default, cfg.path)
    from kilter.rewards.text import BleuReward, RougeReward

    refs = _references(cfg.path)
    fn = BleuReward(refs) if cfg.type == "bleu" else RougeReward(refs, rouge_type=cfg.rouge_type)
    return FunctionReward(fn, cfg.name or cfg.type, f"{cfg.type}:{cfg.path}")


def build_reward(cfg: RewardConfig, device: str | None = None) -> RewardPipeline:
    """The pipeline a config describes; fails with one line when no source is given."""
    specs = cfg.all_sources()
    if not specs:
        raise ConfigError("no reward source: set reward.model (a reward model), reward.function "
                          "('module:function' or builtin:gold) or reward.sources")
    if cfg.device is not None:
        from kilter.distributed import resolve_device

        device = resolve_device(cfg.device, "reward.device")
    sources = [(build_source(s, device), s.weight) for s in specs]
    return RewardPipeline(sources, cfg.missing_eos_penalty, cfg.normalize, cfg.clip)
