"""`kilter loop` with a simulated crowd: label efficiency of active vs random pair selection, and the gold
gain per round.

Every run is one `kilter loop` subprocess on the same SFT model (trained once, in the output folder),
the same prompts, crowd and trainers; only ``selection`` and the seed differ. ``active`` picks, per
prompt, the pair of the K responses the reward ensemble (ensemble_size=2, from the previous round)
disagrees on most and publishes the most disputed prompts; ``random`` picks prompts and pairs at
random from the same pool (pool_factor x prompts_per_round prompts). Round 1 has no reward model yet,
so both select at random there.

``information`` picks by expected information gain instead (BALD: the mutual information between the
label and the ensemble, from the members' Bradley-Terry probabilities). The app's left/right order is
seeded by the loop's seed (``order_seed``), so a run repeats its labels within a seed.

Figures of merit (no wall-clock): gold of the held-out evaluation after each round, the judgments
spent so far, ``gold gain per 100 judgments`` = (final gold - SFT gold) / (judgments / 100), and the
**labels needed to reach a fixed gold level** (``--target``; the judgments spent up to the first round
whose gold reaches it, or "not reached" within ``--rounds``).

    python benchmarks/bench_loop.py --seeds 3 --rounds 5 --target 0.5     # active, information, random, 3 seeds each
    python benchmarks/bench_loop.py --seeds 1 --rounds 5 --only all       # the gold gain per round of a 5-round loop
    python benchmarks/bench_loop.py --out /tmp/bench-loop-check --seeds 1 --rounds 2 --sft-steps 20 \
        policy.iterations=1 prompts_per_round=8 eval_prompts=4 gold_items=2   # a quick check that the script works
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sft(out: Path, steps: int, split: str) -> Path:
    final = out / "sft" / "final"
    if not final.exists():
        subprocess.run([sys.executable, "-m", "kilter", "sft", f"output_dir={out / 'sft'}", f"max_steps={steps}",
                        f"data.train=builtin:sft@{split}", "optim.lr=2e-3", "n_samples=0", "eval_every=1000",
                        "save_every=1000", "tensorboard=false", "threads=1"], check=True, cwd=ROOT)
    return final


def labels_to_reach(result: dict, target: float) -> int | None:
    """Judgments spent up to the first round whose held-out gold reaches ``target`` (None: never)."""
    return next((x["judgments"] for x in result["rounds"] if x["gold"] >= target), None)


def run_loop(out: Path, model: Path, selection: str, seed: int, rounds: int, extra: list[str]) -> dict:
    run = out / f"{selection}-seed{seed}"
    args = [sys.executable, "-m", "kilter", "loop", "--config", str(ROOT / "configs" / "loop" / "tiny.yaml"),
            f"output_dir={run}", f"sft_model={model}", f"rounds={rounds}", f"selection={selection}", f"seed={seed}",
            "reward.ensemble_size=2", "pool_factor=3", *extra]
    if (run / "state.json").exists():
        args.append("resume=true")
    subprocess.run(args, check=True, cwd=ROOT)
    state = json.loads((run / "state.json").read_text())
    base = state["done"]["baseline"]["reward/gold"]
    per_round, spent = [], 0
    for r in range(1, rounds + 1):
        ev = state["done"][f"{r}:evaluate"]
        spent += ev["judgments"]
        per_round.append({"round": r, "judgments": spent, "gold": ev["reward/gold"],
                          "agreement": ev.get("agreement/heldout"), "sqrt_kl": ev["kl/sqrt"],
                          "distinct_2": ev.get("response/distinct_2"),
                          "product_mention": ev.get("response/product_mention")})
    gain = per_round[-1]["gold"] - base
    return {"selection": selection, "seed": seed, "sft_gold": base, "rounds": per_round,
            "gain_per_100": gain / (spent / 100)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-loop")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="active,information,random",
                        help="comma-separated selections (all, random, active, information)")
    parser.add_argument("--target", type=float, default=0.5, help="the gold level for 'labels needed'")
    parser.add_argument("--sft-steps", type=int, default=1000, help="steps of the shared SFT model (tiny.yaml's)")
    parser.add_argument("extra", nargs="*", help="further key=value overrides for every kilter loop run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = sft(out, args.sft_steps, "template")
    results = [run_loop(out, model, sel, seed, args.rounds, args.extra)
               for seed in range(args.seeds) for sel in args.only.split(",")]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| selection | seed | SFT gold | " + " | ".join(f"gold r{r} (judgments)" for r in range(1, args.rounds + 1))
          + " | gold gain per 100 judgments |")
    print("|---" * (args.rounds + 4) + "|")
    for res in results:
        cells = " | ".join(f"{x['gold']:+.3f} ({x['judgments']})" for x in res["rounds"])
        print(f"| {res['selection']} | {res['seed']} | {res['sft_gold']:+.3f} | {cells} | {res['gain_per_100']:+.3f} |")
    for sel in args.only.split(","):
        mine = [r for r in results if r["selection"] == sel]
        gains = [r["gain_per_100"] for r in mine]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        needed = [labels_to_reach(r, args.target) for r in mine]
        reached = [n for n in needed if n is not None]
        labels = (f"{statistics.mean(reached):.0f}" + (f" ± {statistics.stdev(reached):.0f}" if len(reached) > 1 else "")
                  if reached else "–")
        print(f"{sel}: gold gain per 100 judgments {statistics.mean(gains):+.3f} ± {spread:.3f} over {len(gains)} seeds; "
              f"labels to reach gold {args.target:+.2f}: {labels} ({len(reached)} of {len(needed)} seeds reached it: "
              f"{needed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
