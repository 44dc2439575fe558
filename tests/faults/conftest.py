"""Tiny runs of every trainer for the fault-injection suite: the built-in micro model, a few steps.

``faults.args(name, out, data)`` (the ``faults`` fixture) is the argument list of a short run of ``kilter <name>`` that
checkpoints after every step (so a kill can land anywhere), logs every step, and keeps every
checkpoint; ``tiny_data`` writes the few records those runs read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

TRAINERS = ("sft", "rm", "dpo", "kto", "ppo", "distill")
CONTROL = Path(__file__).resolve().parents[2] / "configs" / "control" / "cartpole.yaml"

_COMMON = ["model=builtin:micro", "tensorboard=false", "threads=1", "log_every=1", "save_every=1",
           "keep_checkpoints=null", "optim.lr=1e-3"]


def trainer_args(name: str, out: Path, data: dict[str, Path], steps: int = 3) -> list[str]:
    """argv (without the leading ``kilter``) of a ``steps``-step run of trainer ``name`` into ``out``."""
    common = [name, f"output_dir={out}", *_COMMON]
    if name == "sft":
        return [*common, f"max_steps={steps}", "batch_size=4", "n_samples=0", "eval_every=2"]
    if name == "rm":
        return [*common, f"data.train={data['rankings']}", f"max_steps={steps}", "batch_size=2", "n_samples=0",
                "data.max_length=64", "eval_every=2"]
    if name == "dpo":
        return [*common, f"data.train={data['comparisons']}", f"max_steps={steps}", "batch_size=2", "samples.n=0",
                "eval_every=2", "data.eval_fraction=0.2"]
    if name == "kto":
        return [*common, f"data.train={data['thumbs']}", f"max_steps={steps}", "batch_size=4", "samples.n=0",
                "eval_every=2"]
    if name == "ppo":
        return [*common, f"iterations={steps}", "reward.function=builtin:gold", "rollout.batch_size=4",
                "rollout.max_new_tokens=6", "update.num_minibatches=2", "update.epochs=1", "data.n_eval=2",
                "eval_every=2", "n_samples=2", "sample_every=1"]
    if name == "distill":
        return [*common, f"max_steps={steps}", "context=Be brief.", "data.max_train_prompts=8",
                "data.samples_per_prompt=1", "data.max_new_tokens=6", "data.max_eval_prompts=2",
                "data.eval_samples=1", "batch_size=4", "eval_every=2"]
    if name == "control":  # CartPole, 3 rounds of 128 steps, a dozen synthetic preferences
        return ["control", "--config", str(CONTROL), f"output_dir={out}", "env.n_envs=2", "agent.n_steps=64",
                "agent.batch_size=64", "agent.n_epochs=1", f"total_timesteps={128 * steps}", f"rounds={steps}",
                "queries.total_labels=12", "queries.pool_size=20", "reward.epochs=1", "eval_episodes=1",
                "tensorboard=false", "keep_checkpoints=10"]
    raise ValueError(name)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Rankings (K=3), comparisons, thumbs and demonstrations of the built-in task, a dozen prompts."""
    from kilter.data.task import build_task, gold_score

    root = tmp_path_factory.mktemp("faults-data")
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for d in build_task(seed=0, n_demonstrations=800, n_eval=10).demonstrations:
        if d["completion"] not in by_prompt[d["prompt"]]:
            by_prompt[d["prompt"]].append(d["completion"])
    rows: dict[str, list[dict]] = defaultdict(list)
    for prompt, responses in [(p, r[:3]) for p, r in by_prompt.items() if len(r) >= 3][:12]:
        golds = [gold_score(prompt, r) for r in responses]
        ranks = [1 + sum(o > g for o in golds) for g in golds]
        rows["rankings"].append({"prompt": prompt, "responses": responses, "ranks": ranks})
        best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
        rows["comparisons"].append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst]})
        rows["thumbs"] += [{"prompt": prompt, "completion": r, "label": g > 0} for r, g in zip(responses, golds)]
        rows["demos"].append({"prompt": prompt, "completion": responses[best]})
    out = {}
    for name, items in rows.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return out


def comparable_metrics(run: Path) -> list[dict]:
    """metrics.jsonl without what differs between two identical runs (wall time, speed)."""
    from kilter.runs import read_metrics

    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in read_metrics(run)]


def _tensors(tree, prefix: str, out: dict) -> None:
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _tensors(value, f"{prefix}.{key}", out)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _tensors(value, f"{prefix}.{i}", out)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor under ``run/final``, by file and name: safetensors (policy, critic, members), .pt files
    and the .pth members of a stable-baselines3 agent.zip (control)."""
    import io
    import zipfile

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted((run / "final").rglob("*")):
        name = str(path.relative_to(run))
        if path.suffix == ".safetensors":
            _tensors(load_file(str(path)), name, out)
        elif path.suffix == ".pt":
            _tensors(torch.load(path, weights_only=False), name, out)
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pth"):
                        _tensors(torch.load(io.BytesIO(archive.read(member)), weights_only=False),
                                 f"{name}/{member}", out)
    assert out, f"no weights found in {run / 'final'}"
    return out


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Helpers:
    """What the suite's tests share, as one fixture (test modules cannot import conftest.py)."""

    trainers = TRAINERS
    args = staticmethod(trainer_args)
    metrics = staticmethod(comparable_metrics)
    weights = staticmethod(final_weights)
    same = staticmethod(same_weights)


@pytest.fixture
def one_line_error(capsys):
    """check(code, *needles): the command exited 2 with exactly one ``error:`` line on stderr, no
    traceback, and that line holds every needle; returns the line."""

    def check(code: int, *needles: str) -> str:
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2 and len(errors) == 1, err[-2000:]
        assert "Traceback" not in err
        assert all(n in errors[0] for n in needles), errors[0]
        return errors[0]

    return check


@pytest.fixture(scope="session")
def faults() -> Helpers:
    return Helpers()


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
