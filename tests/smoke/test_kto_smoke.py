"""`kilter kto` end to end on thumbs up/down of the built-in task, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kilter.cli import main
from kilter.runs import read_metrics

COMMON = ["tensorboard=false", "threads=2", "samples.n=0"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def thumbs(tmp_path_factory) -> dict[str, Path]:
    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import build_task

    task = build_task()
    folder = tmp_path_factory.mktemp("kto-data")
    demos = task.demonstrations[:480]
    train = SimulatedLabeler(noise=0.3, seed=0).label_thumbs([d["prompt"] for d in demos],
                                                             [d["completion"] for d in demos])
    held = task.eval_demonstrations[:96]
    held_out = SimulatedLabeler(noise=0.0, seed=1).label_thumbs([d["prompt"] for d in held],
                                                                [d["completion"] for d in held])
    return {"train": _write(folder / "thumbs.jsonl", train), "small": _write(folder / "small.jsonl", train[:32]),
            "eval": _write(folder / "eval_thumbs.jsonl", held_out)}


def test_kto_separates_held_out_thumbs(sft_model_dir, thumbs, tmp_path):
    out = tmp_path / "kto"
    code = main(["kto", *COMMON, f"model={sft_model_dir}", f"output_dir={out}", f"data.train={thumbs['train']}",
                 f"data.eval={thumbs['eval']}", "batch_size=16", "max_steps=30", "optim.lr=5e-4", "log_every=10",
                 "eval_every=30", "save_every=1000"])
    assert code == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/rewards/auc" in r]
    train = [r for r in rows if "loss/kto" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval/rewards/auc"] > 0.6  # chance is 0.5
    assert evals[-1]["eval/rewards/margin"] > evals[0]["eval/rewards/margin"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # (the training loss of a window depends on its mix of thumbs up and down, so it is not compared)
    assert all(r["kl/ref"] >= 0 for r in train)  # z0 is a clamped KL estimate
    assert "rewards/desirable" in train[-1] and "logps/undesirable" in train[-1]
    assert (out / "final" / "config.json").is_file()


def test_kto_precomputed_and_online_reference_agree(sft_model_dir, thumbs, tmp_path):
    args = [f"model={sft_model_dir}", f"data.train={thumbs['small']}", "batch_size=8", "max_steps=2",
            "log_every=1", "optim.lr=1e-3", "desirable_weight=1.2"]
    assert main(["kto", *COMMON, *args, f"output_dir={tmp_path / 'pre'}"]) == 0
    assert main(["kto", *COMMON, *args, f"output_dir={tmp_path / 'online'}", "reference=online"]) == 0
    pre, online = read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "online")
    assert len(pre) == len(online) == 2
    for a, b in zip(pre, online):
        for key in ("loss/kto", "kl/ref", "rewards/desirable"):
            # the precomputed table comes from padded rows, the policy from padding-free ones: fp32
            # sums of ~20 log-probs laid out differently agree to ~1e-6 nats, not bit for bit
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Review the lamp.", "completion": "Nice lamp.", "label": "yes"}, "field 'label': expected true or false"),
    ({"prompt": "Review the lamp.", "completion": "", "label": True}, "field 'completion'"),
    ({"prompt": "Review the lamp.", "completion": "Nice lamp."}, "field 'label': missing"),
    ({"completion": "Nice lamp.", "label": False}, "field 'prompt': missing"),
])
def test_bad_rating_rows_exit_2_with_one_line(tmp_path, capsys, row, message):
    good = {"prompt": "Review the desk.", "completion": "A fine desk.", "label": True}
    bad = _write(tmp_path / "bad.jsonl", [good, good, row])
    code = main(["kto", f"data.train={bad}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"{bad}:3" in err and message in err


def test_csv_label_must_be_true_or_false(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion,label\nReview the desk.,A fine desk.,true\nReview the lamp.,Nice.,maybe\n")
    code = main(["kto", f"data.train={bad}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:3" in err and "'label'" in err


def test_kto_padding_free_rows_match_the_padded_forward(sft_model_dir, thumbs, tmp_path):
    """KTO's padding-free path (packed rows, completion-only logits) trains like the padded one."""
    args = [f"model={sft_model_dir}", f"data.train={thumbs['small']}", "batch_size=8", "max_steps=3",
            "log_every=1", "optim.lr=1e-3", "reference=online"]
    assert main(["kto", *COMMON, *args, f"output_dir={tmp_path / 'packed'}"]) == 0
    assert main(["kto", *COMMON, *args, f"output_dir={tmp_path / 'padded'}", "data.padding_free=false"]) == 0
    packed, padded = read_metrics(tmp_path / "packed"), read_metrics(tmp_path / "padded")
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [1, 2, 3]
    assert packed[0].get("perf/padding_free") == 1 and padded[0].get("perf/padding_free") in (None, 0)
    for a, b in zip(packed, padded):
        for key in ("loss/kto", "kl/ref", "rewards/desirable", "rewards/undesirable"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4)
    assert abs(packed[-1]["rewards/margin"]) > 1e-3  # the policy moved away from the reference
