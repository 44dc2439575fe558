"""``kilter sample``: K candidate responses per prompt from one or several models, for labeling.

Each model is a Hugging Face folder (or a Kilter preset such as ``builtin:tiny``). Prompts are
sampled in batches with ``generate(do_sample=True)``; every candidate records its model and the
sampling settings, so the database always says where a response came from. With two or more
models, a pairwise project turns every prompt into battles between different models -- a
tournament whose leaderboard ``kilter leaderboard`` prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from kilter.config import Field
from kilter.distributed import resolve_device
from kilter.errors import ConfigError, DataError
from kilter.feedback.cli import default_db, open_store, require
from kilter.feedback.importer import (
    CandidateIn,
    distinct_responses,
    read_jsonl,
    write_jsonl,
)
from kilter.rollout.engine import EngineOptions


class SampleConfig(EngineOptions):
    """With several models a pairwise project gets cross-model pairs only: a tournament for kilter leaderboard."""

    models: list[str] = Field(default_factory=list)
    """Model folders (saved with save_pretrained) or presets, comma-separated on the command line; required."""
    names: list[str] = Field(default_factory=list)
    """Names recorded for the models (default: each folder's name), in the same order as models."""
    prompts: str = ""
    """JSONL file with one {"prompt", "id"?} object per line; required."""
    k: int = Field(2, ge=1, le=64)
    """Responses per prompt from each model."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest response, in tokens."""
    batch_size: int = Field(8, ge=1)
    """Sequences generated together."""
    seed: int = 0
    """Random seed (the same seed gives the same responses on the same machine); model i samples with seed + i, so two copies of one model still differ."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Wrap each prompt in the tokenizer's chat template as a user turn: when it has one (auto), always, or never."""
    device: str = "cpu"
    """Torch device for generation, e.g. cpu or cuda."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights precision."""
    project: str = ""
    """Add the prompts and responses to this project (give project or out)."""
    out: str = ""
    """Write the prompts and responses to this JSONL file in the import format (give project or out)."""
    db: str = Field(default_factory=default_db)
    """SQLite file or database URL, for project (default: $KILTER_DB or kilter.db)."""

    @field_validator("models", "names", mode="before")
    @classmethod
    def _split(cls, value):
        # `--models a,b` arrives as one string
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


def _render(tokenizer, prompt: str, mode: str) -> tuple[str, bool]:
    """The text to feed the model and whether the tokenizer should add its special tokens."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ConfigError("config key 'chat_template': 'always' but the tokenizer has no chat template")
    if mode == "never" or not has_template:
        return prompt, True
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return text, False  # the template already holds BOS and friends


def generate(model_path: str, prompts: list[str], k: int, *, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0, chat_template: str = "auto",
             device: str = "cpu", dtype: str = "fp32", engine: EngineOptions | None = None) -> list[list[str]]:
    """``k`` sampled continuations of each prompt, shape ``[len(prompts)][k]`` (special tokens removed).

    ``engine`` (vllm, vllm-server) samples with that engine instead of ``model.generate``.
    """
    import torch

    from kilter.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path, padding_side="left")  # left padding: new tokens line up at the end
    if engine is not None and engine.engine != "hf":
        return _generate_with_engine(engine, model_path, tokenizer, prompts, k, temperature=temperature,
                                     top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                     chat_template=chat_template, dtype=dtype)
    model = load_causal_lm(model_path, tokenizer, dtype=dtype, device=device)
    model.eval()
    rendered = [_render(tokenizer, p, chat_template) for p in prompts]
    jobs = [(i, text, special) for i, (text, special) in enumerate(rendered) for _ in range(k)]
    out: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        special = batch[0][2]
        enc = tokenizer([text for _, text, _ in batch], return_tensors="pt", padding=True,
                        add_special_tokens=special).to(device)
        if enc["input_ids"].shape[1] == 0:
            raise DataError("a prompt became zero tokens; it cannot be continued")
        with torch.no_grad():
            tokens = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(tokens[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (i, _, _), text in zip(batch, texts):
            out[i].append(text.strip())
    return out


def _generate_with_engine(options: EngineOptions, model_path: str, tokenizer, prompts: list[str], k: int, *,
                          temperature: float, top_p: float, max_new_tokens: int, seed: int, chat_template: str,
                          dtype: str) -> list[list[str]]:
    import torch

    from kilter.rollout.engine import close_engine, load_engine
    from kilter.rollout.generate import SamplingParams

    ids = []
    for prompt in prompts:
        text, special = _render(tokenizer, prompt, chat_template)
        row = tokenizer(text, add_special_tokens=special)["input_ids"]
        if not row:
            raise DataError("a prompt became zero tokens; it cannot be continued")
        ids.append(row)
    engine, _ = load_engine(options, model_path, tokenizer, dtype=dtype, seed=seed,
                            max_model_len=max(map(len, ids)) + max_new_tokens)
    torch.manual_seed(seed)
    gen = engine.generate([row for row in ids for _ in range(k)],
                          SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p))
    close_engine(engine)
    return [[t.strip() for t in gen.texts[i * k:(i + 1) * k]] for i in range(len(prompts))]


def run(cfg: SampleConfig) -> int:
    require(cfg, "prompts")
    cfg.check_available()
    if not cfg.models:
        raise ConfigError("config key 'models' is required: one or more model folders, e.g. --models runs/sft/final,runs/ppo/final")
    if bool(cfg.project) == bool(cfg.out):
        raise ConfigError("give exactly one of 'project' (add to the database) or 'out' (write JSONL)")
    if cfg.names and len(cfg.names) != len(cfg.models):
        raise ConfigError(f"config key 'names': {len(cfg.names)} names for {len(cfg.models)} models")
    names = cfg.names or [Path(m).name or m for m in cfg.models]
    if len(set(names)) != len(names):
        names = list(cfg.models)  # two folders called "final": fall back to the full paths
    rows = read_jsonl(cfg.prompts)
    for row in rows:
        if row.responses:
            raise DataError(f"{row.where}: field 'responses': prompt files for sampling hold prompts only")
    device = resolve_device(cfg.device)
    store = open_store(cfg.db) if cfg.project else None
    try:
        task = store.project(cfg.project).task if store is not None else None  # fail before generating
        texts = [r.prompt for r in rows]
        for index, (model_path, name) in enumerate(zip(cfg.models, names)):
            seed = cfg.seed + index
            settings = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                        "do_sample": True, "seed": seed, "model_path": model_path}
            samples = generate(model_path, texts, cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed,
                               chat_template=cfg.chat_template, device=device, dtype=cfg.dtype, engine=cfg)
            for row, responses in zip(rows, samples):
                row.responses += [CandidateIn(text, name, dict(settings)) for text in responses]
            print(f"sampled {cfg.k} x {len(rows)} responses from {name}", flush=True)
        rows, dropped = distinct_responses(rows, task)
        if any(dropped.values()):
            print(f"left out {dropped['empty']} empty and {dropped['repeated']} repeated responses (no comparison "
                  f"can be made of them); {dropped['prompts']} prompts kept too few different responses and were left out",
                  flush=True)
        if not rows:
            raise DataError("no prompt kept enough different, non-empty responses; sample longer or at a higher temperature")
        if store is not None:
            counts = store.import_prompts(cfg.project, rows)
            print(f"added {counts['prompts']} prompts, {counts['candidates']} responses -> {counts['items']} items to {cfg.project}")
        else:
            write_jsonl(rows, cfg.out)
            print(f"wrote {len(rows)} prompts with {sum(len(r.responses) for r in rows)} responses to {cfg.out}")
    finally:
        if store is not None:
            store.close()
    return 0

