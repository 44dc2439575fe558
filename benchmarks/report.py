"""Turn the JSON results of the bench_*.py scripts into the tables of RESULTS.md.

    benchmarks/.venv-trl/bin/python benchmarks/report.py > benchmarks/out/tables.md

Reads benchmarks/out/{sft,rm,dpo,rl}-<models>.json (whichever exist) and prints, per benchmark, the
machine line, the matmul peaks measured at the start and end of that invocation, the command,
and a table of medians with Kilter/TRL ratios, plus every run's samples/s so the spread shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

TITLES = {"sft": "SFT (kilter sft vs TRL SFTTrainer)", "rm": "Reward model (kilter rm vs TRL RewardTrainer)",
          "dpo": "DPO (kilter dpo vs TRL DPOTrainer)", "rl": "Online RL (kilter ppo/rloo vs TRL RLOOTrainer)"}
UNITS = {"sft": ("examples/s", "tokens/s"), "rm": ("pairs/s", "tokens/s"), "dpo": ("pairs/s", "tokens/s"),
         "rl": ("episodes/s", "gen. tokens/s")}


def table(report: dict) -> str:
    samples, tokens = UNITS[report["bench"]]
    metric = report["rows"][0]["metric_name"] if report["rows"] else "metric"
    columns = [("model", "model"), ("setting", "setting"), ("lib", "library"), ("samples_per_s", samples),
               ("tokens_per_s", tokens), ("step_s", "s/step"), ("max_rss_mb", "peak RSS MB"),
               ("metric", metric), ("mfu_pct", "MFU %"), ("ratio", "Kilter/TRL")]
    return C.markdown_table(report["rows"], columns)


def spread(report: dict) -> str:
    lines = []
    for row in report["rows"]:
        runs = ", ".join(f"{v:.3g}" for v in row.get("samples_per_s_all", []))
        lines.append(f"- {row['model']} / {row['setting']} / {row['lib']}: {runs}")
    return "\n".join(lines)


def summary(reports: list[dict]) -> str:
    """One line per benchmark and model: the identical-settings ratio and the best-vs-best ratio
    (each library's fastest best-* setting), against the issue's targets."""
    lines = ["| benchmark | model | identical settings: Kilter/TRL samples/s (tokens/s) | Kilter best | TRL best "
             "| best/best samples/s (tokens/s) |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        by_model: dict[str, list[dict]] = {}
        for row in r["rows"]:
            by_model.setdefault(row["model"], []).append(row)
        for model, rows in by_model.items():
            same = {row["lib"]: row for row in rows if row["setting"].startswith("same")}
            trl_same = next((v for k, v in same.items() if k.startswith("trl")), None)
            ratios = ", ".join(f"{k} {v['samples_per_s'] / trl_same['samples_per_s']:.2f}x "
                               f"({v['tokens_per_s'] / trl_same['tokens_per_s']:.2f}x)"
                               for k, v in same.items() if not k.startswith("trl") and trl_same)
            best = [row for row in rows if row["setting"].startswith("best")]
            kil = max((x for x in best if not x["lib"].startswith("trl")), key=lambda x: x["samples_per_s"], default=None)
            trl = max((x for x in best if x["lib"].startswith("trl")), key=lambda x: x["samples_per_s"], default=None)
            if kil and trl:
                cells = (f"{kil['samples_per_s']:.3g}/s ({kil['setting']})", f"{trl['samples_per_s']:.3g}/s ({trl['setting']})",
                         f"{kil['samples_per_s'] / trl['samples_per_s']:.2f}x "
                         f"({kil['tokens_per_s'] / trl['tokens_per_s']:.2f}x)")
            else:
                cells = ("-", "-", "-")
            lines.append(f"| {r['bench']} | {model} | {ratios} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else C.OUT
    paths = [p for bench in ("sft", "rm", "dpo", "rl") for p in sorted(out.glob(f"{bench}-*.json"))
             if not p.name.endswith("-quick.json")]
    print("### Summary\n")
    print(summary([json.loads(p.read_text()) for p in paths]))
    print()
    for path in paths:
        r = json.loads(path.read_text())
        bench = r["bench"]
        ps, pe = r["peaks_start"], r.get("peaks_end", {})
        models = ", ".join(sorted({row["model"] for row in r["rows"]}))
        print(f"### {TITLES[bench]}: {models}\n")
        print(f"`benchmarks/.venv-trl/bin/python benchmarks/{r['command']}` -- {r['date']}  ")
        print(f"{r['machine']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "  ")
        print(f"matmul peak GFLOP/s: fp32 {ps['fp32']:.1f} -> {pe.get('fp32', float('nan')):.1f}, "
              f"bf16 {ps['bf16']:.1f} -> {pe.get('bf16', float('nan')):.1f} (start -> end); load average "
              f"{r.get('loadavg_start', ['?'])[0]:.2f} -> {r.get('loadavg_end', ['?'])[0]:.2f}\n")
        print(table(r))
        print("\nsamples/s of each run (in run order):\n")
        print(spread(r))
        for note in r.get("notes", []):
            print(f"\nnote: {note}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
