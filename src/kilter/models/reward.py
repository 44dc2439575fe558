"""Reward models: load, score, save; ensembles; a critic initialised from a reward model.

**Format (DESIGN.md contract).**  A reward model is the LM backbone plus a scalar head, saved
as ``AutoModelForSequenceClassification`` with ``num_labels=1``.  The reward of a
prompt/response pair is the head's output at the last non-pad token of
``render(prompt) + response + EOS`` (the :mod:`kilter.data.tokenize` convention).

**The normalizing bias lives in config.json.**  Decoder sequence-classification heads in
transformers (``LlamaForSequenceClassification``, GPT-2, Qwen2, ...) are built with
``bias=False``, and ``from_pretrained`` silently drops a ``score.bias`` tensor found in the
weights (checked in ``tests/unit/models/test_reward.py``).  No weight of a pre-norm decoder
can stand in for it exactly: the head reads an RMS-normalised hidden state, which has no
constant coordinate.  So the bias is stored as the config attribute
``reward_bias`` (:data:`BIAS_KEY`), which ``from_pretrained`` keeps on ``model.config``:

* every Kilter consumer (:func:`score_ids`, :class:`RewardModel`, ``kilter score``, PPO)
  adds it, so they all see the normalized reward;
* with plain transformers, ``model(**batch).logits[:, 0] + model.config.reward_bias`` is the
  same number; without the addition, rewards are shifted by a constant (differences,
  rankings and accuracies are unaffected).

**Ensembles** are folders holding ``ensemble.json`` and one reward-model folder per member
(``member-0/``, ``member-1/``, ...); :func:`load_reward` returns a :class:`RewardEnsemble`
for them, whose score is the members' mean and whose uncertainty is their std.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kilter.errors import KilterError

__all__ = [
    "BIAS_KEY",
    "ENSEMBLE_FILE",
    "RewardModel",
    "RewardEnsemble",
    "build_value_model",
    "check_reward_folder",
    "get_reward_bias",
    "is_ensemble_dir",
    "load_reward",
    "load_reward_backbone",
    "load_reward_model",
    "raw_scores",
    "resolve_reward_dir",
    "save_reward_model",
    "score_ids",
    "set_reward_bias",
    "token_values",
    "write_ensemble_manifest",
]

BIAS_KEY = "reward_bias"
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_KIND = "kilter-reward-ensemble"


# --------------------------------------------------------------------------- the bias


def _hf_config(model):
    """The transformers config of a plain, peft-wrapped or DDP-wrapped model."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return inner.config


def get_reward_bias(model) -> float:
    """The normalizing bias stored in ``model.config`` (0.0 when none was set)."""
    return float(getattr(_hf_config(model), BIAS_KEY, 0.0) or 0.0)


def set_reward_bias(model, bias: float) -> None:
    setattr(_hf_config(model), BIAS_KEY, float(bias))


# --------------------------------------------------------------------------- scoring ids


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 on the first real token, so left padding is harmless
    for absolute-position models.  (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head output at the last non-pad token, WITHOUT the normalizing bias.

    input_ids, attention_mask: (B, T), padded on either side with the model's PAD token
    (which Kilter keeps distinct from EOS and from any text token) -> (B,) float32.
    Differentiable; the trainer calls it with gradients on.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                use_cache=False)
    logits = out.logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise KilterError(f"a reward model needs a single output (num_labels=1); this one gives {logits.shape[-1]}")
    return logits[:, 0].float()


def score_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalized reward of each row: :func:`raw_scores` + the stored bias.  (B, T) -> (B,)."""
    return raw_scores(model, input_ids, attention_mask) + get_reward_bias(model)


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report that lists the new head when a causal LM becomes a reward model."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def is_ensemble_dir(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def resolve_reward_dir(spec: str | Path) -> Path:
    """A reward-model (or ensemble) folder from a folder or a ``kilter rm`` run directory."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise KilterError(f"reward model folder not found: {spec}")
    if is_ensemble_dir(path) or (path / "config.json").is_file():
        return path
    if (path / "final").is_dir():
        return resolve_reward_dir(path / "final")
    if any(path.glob("member-*")):
        raise KilterError(f"{spec} holds ensemble members but no {ENSEMBLE_FILE}; the ensemble run did not finish")
    raise KilterError(f"{spec} is neither a reward model folder (config.json) nor a run directory with final/")


def load_reward_backbone(spec: str, tokenizer=None, *, dtype: str | torch.dtype = "fp32",
                         device: str | None = None, max_length: int | None = None):
    """``AutoModelForSequenceClassification`` (num_labels=1) from any model spec.

    ``spec`` is a reward-model folder (head kept), a causal-LM folder, a preset name or
    ``builtin:<size>`` (a new head is created, initialised from torch's current RNG, so
    seed first for reproducibility).  With ``tokenizer``, embeddings grow to fit its PAD
    token and ``config.pad_token_id`` is set, which the last-non-pad pooling relies on.
    ``max_length`` is checked against learned absolute positions (GPT-2), as in
    :func:`kilter.models.loading.load_causal_lm`.
    """
    from transformers import AutoModelForSequenceClassification

    from kilter.models.loading import (
        DTYPES,
        align_embeddings,
        check_positions,
        fuse_activations,
        resolve_model_path,
        set_dropout,
    )

    path = resolve_model_path(spec)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise KilterError(f"cannot load {spec} as a reward model: {str(exc).splitlines()[0]}") from None
    if max_length is not None:
        check_positions(model, max_length, spec)
    if tokenizer is not None:
        align_embeddings(model, tokenizer)
    if model.config.pad_token_id is None:
        raise KilterError(f"{spec}: the reward model needs config.pad_token_id to find the last token; "
                          "load it with its tokenizer")
    set_dropout(model, 0.0)
    fuse_activations(model)
    if device:
        model.to(device)
    return model


def save_reward_model(model, tokenizer, path: str | Path) -> None:
    """Save as a plain sequence-classification folder (LoRA merged), bias in config.json."""
    from kilter.models.saving import save_model

    save_model(model, tokenizer, Path(path), merge_lora=True)


def check_reward_folder(folder: str | Path, spec: str | Path | None = None) -> None:
    """Refuse, in one line, a folder that is not a saved reward model.

    A plain language-model folder (an SFT run's final/) would otherwise load with a randomly
    initialised score head -- transformers only warns -- and every reward would be noise.  A
    reward model is a ``*ForSequenceClassification`` with one output whose weights hold the
    score head.
    """
    folder = Path(folder)
    name = spec if spec is not None else folder
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KilterError(f"{name}: not a reward model folder (config.json unreadable: {exc})") from None
    archs = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 0) or 0)
    if not any(str(a).endswith("ForSequenceClassification") for a in archs) or labels not in (0, 1):
        raise KilterError(f"{name} holds a {', '.join(map(str, archs)) or 'model'} with no reward head, not a reward "
                          "model: train one with `kilter rm model=...` and pass its run directory or final/")
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    try:
        keys = [k for f in files for k in safe_open(str(f), framework="pt").keys()]
    except (SafetensorError, OSError) as exc:
        raise KilterError(f"{name}: the reward model's weights are unreadable ({exc})") from None
    if files and not any(k.endswith("score.weight") for k in keys):
        raise KilterError(f"{name} has no score-head weights (score.weight): it is not a trained reward model")


def load_reward_model(path: str | Path, *, device: str | None = None, dtype: str = "fp32",
                      max_length: int | None = None) -> RewardModel:
    """A :class:`RewardModel` from a folder (or a run directory whose final/ holds one)."""
    from kilter.models.loading import load_tokenizer

    folder = resolve_reward_dir(path)
    if is_ensemble_dir(folder):
        raise KilterError(f"{path} is a reward ensemble; use load_reward() for ensembles")
    check_reward_folder(folder, path)
    tokenizer = load_tokenizer(str(folder))
    model = load_reward_backbone(str(folder), tokenizer, dtype=dtype, device=device)
    model.eval()
    return RewardModel(model, tokenizer, max_length=max_length)


def load_reward(path: str | Path, *, device: str | None = None, dtype: str = "fp32",
                max_length: int | None = None) -> RewardModel | RewardEnsemble:
    """A single reward model or an ensemble, whichever ``path`` holds."""
    folder = resolve_reward_dir(path)
    if not is_ensemble_dir(folder):
        return load_reward_model(folder, device=device, dtype=dtype, max_length=max_length)
    try:
        manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
        members = list(manifest["members"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise KilterError(f"{folder / ENSEMBLE_FILE}: not a valid ensemble manifest ({exc})") from None
    if not members:
        raise KilterError(f"{folder / ENSEMBLE_FILE}: the ensemble lists no members")
    models = [load_reward_model(folder / m, device=device, dtype=dtype, max_length=max_length) for m in members]
    return RewardEnsemble(models)


def write_ensemble_manifest(folder: str | Path, members: Sequence[str], extra: dict | None = None) -> None:
    from kilter.runs import atomic_write_text

    manifest = {"kind": ENSEMBLE_KIND, "members": list(members), **(extra or {})}
    atomic_write_text(Path(folder) / ENSEMBLE_FILE, json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------- text scoring


class RewardModel:
    """A loaded reward model with its tokenizer: text in, normalized rewards out."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        tok_limit = getattr(tokenizer, "model_max_length", None) or limit
        self.max_length = int(max_length or min(limit, tok_limit, 2048))

    @property
    def bias(self) -> float:
        return get_reward_bias(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> RewardModel:
        self.model.to(device)
        return self

    def encode(self, prompts: Sequence, responses: Sequence[str], finished: Sequence[bool] | None = None) -> list[dict]:
        """Token ids of each (prompt, response), rendered exactly as in training.

        A response that ``finished`` marks False (cut at the length limit) gets no EOS: the
        reward is read at its last real token, as for an unfinished text (Huang et al. 2024).
        """
        from kilter.data.tokenize import encode_prompt_completion

        if len(prompts) != len(responses):
            raise KilterError(f"got {len(prompts)} prompts but {len(responses)} responses")
        ends = [True] * len(responses) if finished is None else list(finished)
        return [encode_prompt_completion(self.tokenizer, p, r, self.max_length, finished=bool(f))
                for p, r, f in zip(prompts, responses, ends)]

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids padded with this model's PAD -> (B,) normalized rewards."""
        return score_ids(self.model, input_ids.to(self.device), attention_mask.to(self.device))

    @torch.no_grad()
    def score(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
              progress: bool = False, finished: Sequence[bool] | None = None) -> torch.Tensor:
        """Normalized reward of each (prompt, response): (N,) float32 on the CPU."""
        return self.score_examples(self.encode(prompts, responses, finished), batch_size, progress)

    @torch.no_grad()
    def score_examples(self, examples: Sequence[dict], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Score already-encoded examples (``input_ids`` lists), longest first to cut padding."""
        from tqdm.auto import tqdm

        from kilter.data.collate import pad_batch

        was_training = self.model.training
        self.model.eval()
        out = torch.empty(len(examples), dtype=torch.float32)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        bar = tqdm(total=len(order), desc="score", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = pad_batch([examples[i] for i in idx], self.tokenizer.pad_token_id, keys=("input_ids",))
            out[idx] = self.score_ids(batch["input_ids"], batch["attention_mask"]).float().cpu()
            bar.update(len(idx))
        bar.close()
        if was_training:
            self.model.train()
        return out

    def score_with_std(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
                       progress: bool = False, finished: Sequence[bool] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards, zeros): one model has no spread; same interface as an ensemble."""
        mean = self.score(prompts, responses, batch_size, progress, finished)
        return mean, torch.zeros_like(mean)


class RewardEnsemble:
    """Several reward models judged together: mean reward and its spread across members.

    The std is the population standard deviation over members (divide by N): 0 exactly when
    every member gives the same reward, and a cheap uncertainty estimate otherwise -- for
    uncertainty-aware rewards and for choosing which pairs to ask people about.
    """

    def __init__(self, members: Sequence[RewardModel]):
        if not members:
            raise KilterError("a reward ensemble needs at least one member")
        self.members = list(members)

    @property
    def tokenizer(self):
        return self.members[0].tokenizer

    @property
    def model(self):
        return self.members[0].model

    def to(self, device) -> RewardEnsemble:
        for m in self.members:
            m.to(device)
        return self

    @torch.no_grad()
    def member_scores(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
                      progress: bool = False, finished: Sequence[bool] | None = None) -> torch.Tensor:
        """(M, N): each member's normalized reward of each pair."""
        return torch.stack([m.score(prompts, responses, batch_size, progress, finished) for m in self.members])

    def score_with_std(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
                       progress: bool = False, finished: Sequence[bool] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (N,), std (N,)) over members."""
        scores = self.member_scores(prompts, responses, batch_size, progress, finished)
        return scores.mean(0), scores.std(0, unbiased=False)

    def score(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32,
              progress: bool = False) -> torch.Tensor:
        return self.score_with_std(prompts, responses, batch_size, progress)[0]

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean reward over members for ids in the (shared) tokenizer of the members."""
        return torch.stack([m.score_ids(input_ids, attention_mask) for m in self.members]).mean(0)


# --------------------------------------------------------------------------- critic


def build_value_model(path_or_model, tokenizer=None, *, dtype: str = "fp32", device: str | None = None):
    """A fresh sequence-classification model with the reward model's weights, for a PPO critic.

    ``path_or_model`` is a reward-model folder / run directory (or an ensemble: its first
    member) or a loaded model (deep-copied, never shared).  The head becomes a
    ``Linear(hidden, 1, bias=True)`` whose bias starts at the reward model's normalizing
    bias (and ``config.reward_bias`` is reset to 0, so the bias is not counted twice);
    the bias is then trainable like the rest of the critic.  Use :func:`token_values` for
    per-token values.
    """
    if isinstance(path_or_model, (str, Path)):
        folder = resolve_reward_dir(path_or_model)
        if is_ensemble_dir(folder):
            manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
            folder = folder / manifest["members"][0]
        check_reward_folder(folder, path_or_model)
        if tokenizer is None:
            from kilter.models.loading import load_tokenizer

            tokenizer = load_tokenizer(str(folder))
        model = load_reward_backbone(str(folder), tokenizer, dtype=dtype)
    else:
        model = copy.deepcopy(getattr(path_or_model, "module", path_or_model))
    bias = get_reward_bias(model)
    old = model.score
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype,
                           device=old.weight.device)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.fill_(bias if old.bias is None else bias + float(old.bias[0]))
    model.score = head
    set_reward_bias(model, 0.0)
    model.train()
    if device:
        model.to(device)
    return model


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head applied at every position (a critic's values): (B, T) -> (B, T) float32.

    Padding positions hold meaningless values; mask them.  Adds ``config.reward_bias`` so a
    plain reward model (no head bias) gives, at its last token, exactly :func:`score_ids`.
    """
    inner = getattr(model, "module", model)
    if hasattr(inner, "peft_config"):
        inner = inner.base_model.model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                      use_cache=False).last_hidden_state
    return inner.score(hidden)[..., 0].float() + get_reward_bias(inner)
