"""RL from preferences vs RL on the true reward, side by side in one invocation (``kilter control``).

For each task, every seed runs three agents with the same algorithm, hyper-parameters and
step budget, each in its own subprocess, one after the other (the machine is shared):

* ``true``    — ``reward_source=env``: the agent is trained on the environment's reward;
* ``active``  — the learned reward, queries chosen by ensemble disagreement;
* ``random``  — the learned reward, queries chosen at random;

and reports the final true return on the real task (deterministic policy, ``eval_episodes``
episodes, no fixed horizon), the labels used, and the ratio preference / true-reward agent.

``--label-sweep`` adds the label-efficiency comparison: active and random queries with label
budgets from ``--budgets``; the answer is the smallest budget whose mean final return reaches
90 % of the true-reward agent's (over the same seeds).  Returns, not wall-clock, are the figures
of merit; the per-run time is printed for orientation only (approximate on a shared machine).

    python benchmarks/bench_control.py --tasks cartpole,pendulum --seeds 3
    python benchmarks/bench_control.py --tasks cartpole --seeds 2 --label-sweep --budgets 25,50,100,200
    python benchmarks/bench_control.py --quick          # a 2-minute correctness check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "control"

# per task: the preset, its step budget here, label budget, and a uniformly random policy's true return
# (measured: 20 episodes, seeds 0-19; Pong: the usual figure)
TASKS = {
    "cartpole": {
        "config": "cartpole.yaml",
        "overrides": ["total_timesteps=40960", "rounds=10", "queries.total_labels=300"],
        "random_return": 22.9,
    },
    "pendulum": {
        "config": "pendulum.yaml",
        "overrides": ["total_timesteps=10000", "rounds=5", "queries.total_labels=400"],
        "random_return": -1245.9,
    },
    "hopper": {
        "config": "hopper.yaml",
        "overrides": [
            "total_timesteps=20000",
            "rounds=10",
            "queries.total_labels=200",
            "eval_every=10",
            "save_every=10",
            "agent.extra.learning_starts=2000",
        ],
        "random_return": 24.8,
    },
    "pong": {
        "config": "pong.yaml",
        "overrides": [
            "total_timesteps=40960",
            "rounds=4",
            "queries.total_labels=100",
            "eval_every=4",
            "save_every=4",
            "eval_episodes=1",
        ],
        "random_return": -20.7,
    },
    "breakout": {
        "config": "breakout.yaml",
        "overrides": [
            "total_timesteps=49152",
            "rounds=4",
            "queries.total_labels=200",
            "eval_every=1",
            "save_every=4",
            "eval_episodes=10",
        ],
        "random_return": 1.45,  # with env.atari_fire (a random policy also fires itself)
    },
}
QUICK = ["total_timesteps=8192", "rounds=2", "queries.total_labels=40", "eval_episodes=3"]


def run_one(task: str, variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    spec = TASKS[task]
    run_dir = out / f"{task}-{variant}-seed{seed}"
    args = [
        sys.executable,
        "-m",
        "kilter",
        "control",
        "--config",
        str(CONFIGS / spec["config"]),
        f"output_dir={run_dir}",
        f"seed={seed}",
        *spec["overrides"],
        *extra,
    ]
    if variant == "true":
        args.append("reward_source=env")
    elif variant in ("active", "random"):
        args.append(f"queries.method={variant}")
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src"), MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), SDL_VIDEODRIVER="dummy"
    )
    t0 = time.time()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{task} {variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = rows[-1]
    result = {
        "task": task,
        "variant": variant,
        "seed": seed,
        "final_true_return": final.get("eval/true_return"),
        "labels": final.get("labels/total", 0),
        "steps": final["step"],
        "seconds": round(seconds, 1),
        "curve": [r.get("eval/true_return") for r in rows],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="cartpole,pendulum", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (to split seeds)")
    p.add_argument("--variants", default="true,active,random")
    p.add_argument(
        "--label-sweep", action="store_true", help="also find the labels needed to reach 90%% of the true agent"
    )
    p.add_argument("--budgets", default="25,50,100,200")
    p.add_argument("--sweep-task", default="cartpole")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks that everything runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "control"))
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = (QUICK if args.quick else []) + list(args.set)
    results = []
    for task in args.tasks.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for variant in args.variants.split(","):
                results.append(run_one(task, variant, seed, out, extra))
    sweep = []
    if args.label_sweep:
        for budget in [int(b) for b in args.budgets.split(",")]:
            for seed in range(args.seeds):
                for method in ("active", "random"):
                    r = run_one(
                        args.sweep_task,
                        method,
                        seed,
                        out / f"labels-{budget}",
                        extra + [f"queries.total_labels={budget}"],
                    )
                    r["budget"] = budget
                    sweep.append(r)
    (out / "results.json").write_text(json.dumps({"runs": results, "sweep": sweep}, indent=1))
    print(report(results, sweep, args.sweep_task))
    return 0


def report(results: list[dict], sweep: list[dict], sweep_task: str) -> str:
    lines = [
        "| task | agent | final true return (mean ± sd) | per seed | labels | steps | pref / true | normalised |",
        "|---|---|---|---|---|---|---|---|",
    ]
    true_mean: dict[str, float] = {}
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        true_mean[task] = _mean([r["final_true_return"] for r in rows if r["variant"] == "true"])
        rand = TASKS[task]["random_return"]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            vals = [r["final_true_return"] for r in rows if r["variant"] == variant]
            labels = [r["labels"] for r in rows if r["variant"] == variant]
            m = _mean(vals)
            # pref / true only reads well for positive returns; normalised = (x - random) / (true - random) always does
            ratio = f"{m / true_mean[task]:.2f}" if variant != "true" and true_mean[task] > 0 else ""
            norm = (
                f"{(m - rand) / (true_mean[task] - rand):.2f}" if variant != "true" and true_mean[task] != rand else ""
            )
            per_seed = ", ".join(f"{v:.0f}" for v in vals)
            lines.append(
                f"| {task} | {variant} | {m:.1f} ± {_sd(vals):.1f} | {per_seed} | {max(labels)} | "
                f"{rows[0]['steps']} | {ratio} | {norm} |"
            )
    if sweep:
        target = 0.9 * true_mean.get(sweep_task, float("nan"))
        lines += [
            "",
            f"Labels to reach 90 % of the true-reward agent on {sweep_task} (target {target:.1f}):",
            "",
            "| budget | active (mean) | random (mean) |",
            "|---|---|---|",
        ]
        reached = {"active": None, "random": None}
        for budget in sorted({r["budget"] for r in sweep}):
            cells = []
            for method in ("active", "random"):
                m = _mean([r["final_true_return"] for r in sweep if r["budget"] == budget and r["variant"] == method])
                if reached[method] is None and m >= target:
                    reached[method] = budget
                cells.append(f"{m:.1f}")
            lines.append(f"| {budget} | {cells[0]} | {cells[1]} |")
        lines.append("")
        lines.append(
            f"First budget reaching 90 %: active {reached['active'] or 'not reached'}, "
            f"random {reached['random'] or 'not reached'}."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
