"""Checkpoint and exact resume: 4 iterations straight == 2, a kill, then resume for 2 more."""

import json

import torch
from safetensors.torch import load_file

from kilter.cli import main

# Every piece of state is exercised: adaptive KL, running reward normalisation, ptx position,
# a critic with its own optimizer, evaluation and sample tables in between (which must not
# consume the training RNG).
ARGS = ["model=builtin:micro", "iterations=4", "reward.function=builtin:gold", "reward.normalize=true",
        "rollout.batch_size=4", "rollout.max_new_tokens=6", "update.num_minibatches=2", "update.epochs=2",
        "kl.adaptive=true", "kl.target=0.5", "kl.horizon=50", "ptx.data=builtin:sft", "ptx.coef=0.1",
        "ptx.batch_size=2", "optim.lr=1e-3", "value.optim.lr=1e-3", "save_every=2", "keep_checkpoints=null",
        "data.n_eval=2", "eval_every=2", "n_samples=2", "sample_every=1", "tensorboard=false", "threads=1"]


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def test_kill_and_resume_equals_uninterrupted(tmp_path, ppo_killed_after, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["ppo", f"output_dir={straight}", *ARGS]) == 0
    assert ppo_killed_after([f"output_dir={resumed}", *ARGS], 2) == 130
    assert not (resumed / "final").exists()
    capsys.readouterr()
    # a second start without resume=true refuses to overwrite the checkpoints
    assert main(["ppo", f"output_dir={resumed}", *ARGS]) == 2
    assert "resume=true" in capsys.readouterr().err
    assert main(["ppo", f"output_dir={resumed}", *ARGS, "resume=true"]) == 0

    for name in ("model.safetensors", "value/model.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step-4" / name))
        b = load_file(str(resumed / "checkpoints" / "step-4" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    state_a = torch.load(straight / "checkpoints" / "step-4" / "training_state.pt", weights_only=False)
    state_b = torch.load(resumed / "checkpoints" / "step-4" / "training_state.pt", weights_only=False)
    assert state_a["extra"] == state_b["extra"]  # KL controller, reward statistics, baseline, ptx position
    assert state_a["extra"]["kl"]["kind"] == "adaptive" and state_a["extra"]["kl"]["beta"] != 0.05  # it moved
    assert state_a["extra"]["ptx_position"] == 4 * 2 * 2 * 2  # iterations x epochs x minibatches x batch
    assert _metrics(straight) == _metrics(resumed)
    assert {r["step"] for r in _metrics(straight)} == {0, 1, 2, 3, 4}
    trainer_state = json.loads((resumed / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert trainer_state == {"iteration": 4, "trainer": "ppo", "algorithm": "ppo"}
    samples = [json.loads(line)["iteration"] for line in (resumed / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 2, 2, 3, 3, 4, 4]
