"""The gold-vs-KL frontier of PPO and RLOO on the built-in task: a sweep of the KL penalty beta.

Every policy starts from the same SFT model and optimises the same reward model: the ones `kilter demo`
trains (its sft/ and rm/ stages, run once in OUT/demo and reused). For each algorithm and each beta one
short RL run (`kilter ppo`, the demo's recipe: 64 responses per iteration, 48 new tokens, 2 epochs x 2
minibatches; RLOO samples 2 responses for each of 32 prompts), then one `kilter eval` of SFT and every
policy on the held-out prompts (the demo's split), so every point is measured on the same prompts and
samples seeds. Figures of merit (no wall-clock): gold, sqrt(KL to SFT), distinct-2, the share of
responses that name the product, the reward model's score; and for each algorithm Gao et al.'s RL form
d (alpha - beta log d) fitted to (sqrt(KL), gold gain) over its betas.

    python benchmarks/frontier.py                                   # 5 betas x {ppo, rloo}, 20 iterations
    python benchmarks/frontier.py --seeds 3                         # the same with 3 RL seeds per point
    python benchmarks/frontier.py --out /tmp/frontier-check --betas 0.05,0.2 --iterations 2 \\
        --eval-prompts 8 --demo sft_epochs=0.3 ppo_iterations=1     # a quick check that the script works

Writes OUT/results.json, OUT/frontier.md (the table) and OUT/frontier.png (gold against sqrt(KL)).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's kilter, also without an editable install


def kilter(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kilter", *args], check=True, cwd=ROOT)


def rl_run(out: Path, demo: Path, algorithm: str, beta: float, seed: int, iterations: int, split: str) -> Path:
    run = out / f"{algorithm}-beta{beta:g}-seed{seed}"
    if (run / "final" / "config.json").exists():
        return run / "final"
    per_iteration = ["rollout.batch_size=64"] if algorithm == "ppo" else ["rollout.batch_size=32",
                                                                          "rollout.samples_per_prompt=2"]
    kilter("ppo", f"model={demo / 'sft' / 'final'}", f"reward.model={demo / 'rm' / 'final'}", f"output_dir={run}",
           f"algorithm={algorithm}", f"kl.beta={beta}", f"iterations={iterations}", f"seed={seed}", *per_iteration,
           "rollout.max_new_tokens=48", "update.epochs=2", "update.num_minibatches=2", "optim.lr=3e-4",
           "value.optim.lr=3e-4", f"data.prompts=builtin:prompts@{split}", f"eval_every={iterations}",
           f"save_every={iterations}", "sample_every=1000", "n_samples=0", "tensorboard=false", "threads=1",
           "resume=true")
    return run / "final"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--betas", default="0.02,0.05,0.1,0.2,0.4")
    parser.add_argument("--algorithms", default="ppo,rloo")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--split", default="template", choices=("template", "product"))
    parser.add_argument("--demo", nargs="*", default=[], help="key=value overrides for the kilter demo run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = out / "demo"
    kilter("demo", f"output_dir={demo}", f"task_split={args.split}", *args.demo)

    betas = [float(b) for b in args.betas.split(",")]
    models = {"sft": str(demo / "sft" / "final")}
    points = []
    for algorithm in args.algorithms.split(","):
        for beta in betas:
            for seed in range(args.seeds):
                name = f"{algorithm}-b{beta:g}-s{seed}"
                models[name] = str(rl_run(out, demo, algorithm, beta, seed, args.iterations, args.split))
                points.append({"name": name, "algorithm": algorithm, "beta": beta, "seed": seed})
    kilter("eval", f"models={json.dumps(models)}", "reference=sft", f"reward_model={demo / 'rm' / 'final'}",
           f"prompts=builtin:prompts_eval@{args.split}", f"max_prompts={args.eval_prompts}", "n_samples=2",
           f"output_dir={out / 'eval'}", "show_prompts=2", "threads=1")
    report = json.loads((out / "eval" / "eval.json").read_text())
    metrics = {m["name"]: m["metrics"] for m in report["models"]}
    sft = metrics["sft"]
    for p in points:
        m = metrics[p["name"]]
        p.update(gold=m["reward/gold"], rm=m.get("reward/rm"), kl=m["kl/ref"], sqrt_kl=math.sqrt(max(0.0, m["kl/ref"])),
                 distinct_2=m["response/distinct_2"], product_mention=m.get("response/product_mention"))

    from kilter.evaluation.overoptimization import fit_gao

    fits = {}
    for algorithm in args.algorithms.split(","):
        mine = [p for p in points if p["algorithm"] == algorithm]
        try:
            fit = fit_gao("rl", [p["sqrt_kl"] for p in mine], [p["gold"] - sft["reward/gold"] for p in mine])
            fits[algorithm] = {"alpha": fit.alpha, "beta": fit.beta, "r2": fit.r2, "peak_sqrt_kl": fit.peak_d}
        except ValueError as exc:
            fits[algorithm] = {"error": str(exc)}
    (out / "results.json").write_text(json.dumps({"sft": sft, "points": points, "gao_rl_fits": fits}, indent=2) + "\n")

    lines = [f"SFT: gold {sft['reward/gold']:+.3f}, distinct-2 {sft['response/distinct_2']:.3f}, names the product "
             f"{sft.get('response/product_mention') or 0:.2f}", "",
             "| algorithm | kl.beta | seed | gold | RM | KL | sqrt(KL) | distinct-2 (x SFT) | names product |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ratio = p["distinct_2"] / sft["response/distinct_2"] if sft["response/distinct_2"] else float("nan")
        lines.append(f"| {p['algorithm']} | {p['beta']:g} | {p['seed']} | {p['gold']:+.3f} | {p['rm'] or 0:+.3f} | "
                     f"{p['kl']:.2f} | {p['sqrt_kl']:.2f} | {p['distinct_2']:.3f} ({ratio:.2f}) | "
                     f"{p['product_mention'] or 0:.2f} |")
    lines.append("")
    for algorithm, fit in fits.items():
        lines.append(f"{algorithm}: Gao RL fit " + (fit["error"] if "error" in fit else
                     f"alpha={fit['alpha']:.3f} beta={fit['beta']:.3f} R2={fit['r2']:.2f}, peak sqrt(KL) "
                     + (f"{fit['peak_sqrt_kl']:.2f}" if fit["peak_sqrt_kl"] is not None else "none (still rising)")))
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, algorithm in enumerate(args.algorithms.split(",")):
        mine = sorted((p for p in points if p["algorithm"] == algorithm), key=lambda p: p["sqrt_kl"])
        ax.plot([0.0] + [p["sqrt_kl"] for p in mine], [sft["reward/gold"]] + [p["gold"] for p in mine], "o-",
                color=f"C{i}", label=algorithm)
        for p in mine:
            ax.annotate(f"{p['beta']:g}", (p["sqrt_kl"], p["gold"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("sqrt(KL to SFT), nats")
    ax.set_ylabel("gold (held-out prompts)")
    ax.set_title("gold vs KL over kl.beta (labels)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    print(f"wrote {out / 'results.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
