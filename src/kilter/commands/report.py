"""``kilter report RUN_DIR [--out FILE]``: one self-contained HTML page for a run directory.

Works for any run directory with a ``metrics.jsonl`` (sft, rm, ppo, dpo, ...): its curves grouped
by namespace (loss/, reward/, kl/, eval/, ...), the reward model's calibration table when there is
one, and the last samples. For a ``kilter loop`` directory (it has ``state.json``) also: the
per-round table, gold and proxy reward against sqrt(KL) to the SFT model with Gao et al.'s RL
form fitted to the PPO iterations (and its peak), the PPO curves of every round end to end,
held-out reward-model agreement and annotator gold accuracy, and sample responses per round.

Plots are matplotlib PNGs embedded as data: URIs and the style sheet is inline, so the file needs
no network and no other file (open it anywhere, attach it to an issue).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from kilter.errors import KilterError
from kilter.evaluation.overoptimization import fit_gao, gao_curve

USAGE = "usage: kilter report RUN_DIR [--out FILE.html]"
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.text{text-align:left;max-width:520px}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{width:520px;border:1px solid #eee}
figcaption{font-size:12px;color:#555;max-width:520px}.warn{color:#a40}
"""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise KilterError(f"{path}, line {n}: not valid JSON") from None
    return rows


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(name: str, fig, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{html.escape(name)}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return "–" if v is None else html.escape(str(v))


def _table(rows: list[dict], columns: list[tuple[str, str]], text_cols: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f'<td class="text">{_fmt(r.get(k))}</td>' if k in text_cols else f"<td>{_fmt(r.get(k))}</td>"
                                    for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- any run directory


def curve_sections(rows: list[dict], title: str = "") -> list[str]:
    """One plot per metric namespace (loss/, reward/, kl/, eval/, ...) of numeric values against step."""
    plt = _plt()
    groups: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("perf/"):
                keys = groups.setdefault(key.split("/", 1)[0], [])
                if key not in keys and not key.endswith("_stderr"):
                    keys.append(key)
    out = []
    for space, keys in groups.items():
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for key in keys[:8]:
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{title}{space}/")
        ax.legend(fontsize=7)
        out.append(_figure(f"{title}{space}", fig, f"{space}/ metrics by step ({', '.join(keys[:8])})"))
    return out


def calibration_section(run: Path) -> str:
    path = run / "calibration.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    bins = data.get("bins") if isinstance(data, dict) else None
    if not bins:
        return ""
    plt = _plt()
    xs = [b.get("mean_predicted", b.get("predicted")) for b in bins]
    ys = [b.get("accuracy", b.get("observed")) for b in bins]
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if not pts:
        return ""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], color="#999", lw=1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed")
    ax.set_title("reward-model calibration")
    return _figure("calibration", fig, f"reliability diagram from {path.name}")


def samples_section(run: Path, limit: int = 8) -> str:
    path = run / "samples.jsonl"
    if not path.exists():
        return ""
    rows = _read_jsonl(path)[-limit:]
    cols = [(k, k) for k in ("step", "prompt", "response", "reward", "gold") if any(k in r for r in rows)]
    return "<h2>Samples</h2>" + _table(rows, cols, text_cols=("prompt", "response"))


# --------------------------------------------------------------------------- loops


def _loop_rows(state: dict) -> tuple[dict, list[dict]]:
    done = state.get("done", {})
    rounds = []
    r = 1
    while f"{r}:evaluate" in done:
        rounds.append(dict(done[f"{r}:evaluate"], round=r))
        r += 1
    return done.get("baseline", {}), rounds


def _ppo_rows(run: Path, n_rounds: int) -> list[tuple[int, dict]]:
    out = []
    for r in range(1, n_rounds + 1):
        path = run / f"round-{r}" / "policy" / "metrics.jsonl"
        if path.exists():
            out += [(r, row) for row in _read_jsonl(path) if "reward/raw" in row]
    return out


def loop_sections(run: Path, state: dict) -> list[str]:
    plt = _plt()
    baseline, rounds = _loop_rows(state)
    parts = ["<h2>Rounds</h2>"]
    table = [dict(baseline, round=0, judgments=None)] + rounds
    parts.append(_table(table, [("round", "round"), ("judgments", "judgments"), ("pairs/train", "train pairs"),
                                ("reward/gold", "gold"), ("reward/rm", "proxy (RM)"), ("kl/sqrt", "sqrt(KL)"),
                                ("agreement/heldout", "RM agreement with gold (fresh samples)"),
                                ("agreement/human", "RM agreement with held-out people"),
                                ("response/distinct_2", "distinct-2"), ("response/product_mention", "names product"),
                                ("win_rate/gold", "gold win rate vs SFT"), ("annotators/flagged", "flagged"),
                                ("gao/peak_sqrt_kl", "fitted peak sqrt(KL)")]))
    if state.get("stopped"):
        parts.append(f'<p class="warn">Stopped early: {html.escape(state["stopped"])}</p>')
    if not rounds:
        return parts
    figures = []
    # gold and proxy against sqrt(KL): the rounds, the PPO iterations, and the fitted RL form
    ppo = _ppo_rows(run, len(rounds))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    d0 = [0.0] + [x["kl/sqrt"] for x in rounds]
    ax.plot(d0, [baseline.get("reward/gold", 0.0)] + [x["reward/gold"] for x in rounds], "o-", label="gold (eval, per round)")
    ax.plot(d0[1:], [x.get("reward/rm") for x in rounds], "s--", label="proxy RM (eval, per round)")
    if ppo:
        d = [math.sqrt(max(0.0, row["kl/ref"])) for _, row in ppo]
        gold = [row.get("reward/gold") for _, row in ppo]
        ax.scatter(d, [row["reward/raw"] for _, row in ppo], s=8, alpha=0.5, label="proxy (PPO iterations)")
        if None not in gold:
            ax.scatter(d, gold, s=8, alpha=0.5, label="gold (PPO iterations)")
            # the gain is counted from pi_0: round 1's first rollout samples from it (KL 0)
            start = gold[0] if ppo[0][1]["kl/ref"] == 0 else baseline.get("reward/gold", gold[0])
            try:
                fit = fit_gao("rl", d, [g - start for g in gold])
            except ValueError:
                fit = None
            if fit is not None:
                grid = [max(d) * i / 100 for i in range(1, 101)]
                ax.plot(grid, [start + y for y in gao_curve("rl", fit.alpha, fit.beta, grid)], "k-", lw=1,
                        label=f"Gao RL fit a={fit.alpha:.2f} b={fit.beta:.2f}")
                peak = fit.peak_d
                parts.append(f"<p>Gao et al. RL form fitted to every PPO iteration: alpha={fit.alpha:.3f}, "
                             f"beta={fit.beta:.3f}, R²={fit.r2:.2f}; fitted gold peak at sqrt(KL) = "
                             + (f"{peak:.2f}" if peak is not None else "none (still rising)") + ".</p>")
    ax.set_xlabel("sqrt(KL to the SFT model)")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    figures.append(_figure("gold-vs-kl", fig, "gold vs proxy vs sqrt(KL), with the fitted Gao et al. curve"))
    if ppo:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        xs = list(range(1, len(ppo) + 1))
        axes[0].plot(xs, [row["reward/raw"] for _, row in ppo], label="proxy")
        if all("reward/gold" in row for _, row in ppo):
            axes[0].plot(xs, [row["reward/gold"] for _, row in ppo], label="gold")
        axes[1].plot(xs, [row["kl/ref"] for _, row in ppo], color="C3", label="KL to SFT")
        for ax in axes:
            ax.set_xlabel("PPO iteration (all rounds)")
            ax.legend(fontsize=7)
        figures.append(_figure("ppo-curves", fig, "per PPO iteration, every round end to end: proxy, gold, KL"))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([x["round"] for x in rounds], [x.get("agreement/heldout") for x in rounds], "o-",
            label="held-out RM agreement with gold")
    ax.plot([x["round"] for x in rounds], [x.get("agreement/human") for x in rounds], "^-",
            label="RM agreement with held-out human judgments")
    ax.plot([x["round"] for x in rounds], [x.get("response/distinct_2") for x in rounds], "s-", label="distinct-2")
    ax.plot([x["round"] for x in rounds], [x.get("response/product_mention") for x in rounds], "d-",
            label="names the product")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.legend(fontsize=7)
    figures.append(_figure("agreement", fig, "held-out reward-model agreement (with gold on fresh policy samples, "
                           "with held-out people), diversity and naming the product"))
    last_eval = run / f"round-{len(rounds)}" / "eval"
    if (last_eval / "calibration.json").exists():
        figures.append(calibration_section(last_eval).replace(
            "reliability diagram from calibration.json",
            f"round {len(rounds)}'s RM on round {len(rounds)}'s held-out human judgments (never trained on): "
            "predicted vs observed"))
    parts += figures
    quality = run / f"round-{len(rounds)}" / "quality.json"
    if quality.exists():
        q = json.loads(quality.read_text())
        rows = [dict(v, annotator=k, flagged="; ".join(q["flagged"].get(k, []))) for k, v in q["annotators"].items()]
        parts.append(f"<h2>Annotators (all rounds; Krippendorff alpha {_fmt(q.get('alpha'))})</h2>")
        parts.append(_table(rows, [("annotator", "annotator"), ("judgments", "judgments"), ("gold_rate", "gold accuracy"),
                                   ("peer_rate", "peer agreement"), ("flagged", "flagged")], text_cols=("annotator", "flagged")))
    done = state.get("done", {})
    for r in range(1, len(rounds) + 1):
        board = (done.get(f"{r}:export") or {}).get("leaderboard") or []
        if board:
            parts.append(f"<h2>Round {r} tournament (the crowd's battles between policies)</h2>")
            parts.append(_table(board, [("rank", "rank"), ("model", "policy"), ("bt", "Bradley-Terry"),
                                        ("bt_lower", "lower"), ("bt_upper", "upper"), ("elo", "Elo"),
                                        ("wins", "wins"), ("losses", "losses"), ("ties", "ties")], text_cols=("model",)))
    parts.append("<h2>Samples (held-out prompts)</h2>")
    for r in range(1, len(rounds) + 1):
        path = run / f"round-{r}" / "eval" / "eval.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        prompts = report["prompts"]["items"]
        model = next((m for m in report["models"] if m["name"] == "policy"), None)
        if model is None:
            continue
        rows = [dict(s, prompt=prompts[s["prompt_index"]]) for s in model["samples"][:6]]
        parts.append(f"<h3>round {r}</h3>" + _table(rows, [("prompt", "prompt"), ("response", "response"),
                                                             ("gold", "gold"), ("rm", "proxy")], text_cols=("prompt", "response")))
    return parts


# --------------------------------------------------------------------------- entry point


def build_report(run: Path) -> str:
    if not run.is_dir():
        raise KilterError(f"{run}: no such run directory")
    state_path, metrics_path = run / "state.json", run / "metrics.jsonl"
    if not state_path.exists() and not metrics_path.exists():
        raise KilterError(f"{run}: not a run directory (no metrics.jsonl or state.json)")
    parts = [f"<h1>Kilter report: {html.escape(str(run))}</h1>"]
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            raise KilterError(f"{state_path}: not valid JSON") from None
        parts += loop_sections(run, state)
    elif metrics_path.exists():
        rows = _read_jsonl(metrics_path)
        parts.append("<h2>Curves</h2>")
        parts += curve_sections(rows)
        parts.append(calibration_section(run))
        parts.append(samples_section(run))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Kilter report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE + "\n\n" + (__doc__ or "").strip())
        return 0 if argv else 2
    run, out = Path(argv[0]), None
    rest = argv[1:]
    if rest[:1] == ["--out"] and len(rest) == 2:
        out = Path(rest[1])
    elif rest:
        print(f"kilter report: error: unexpected arguments {' '.join(rest)}; {USAGE}", file=sys.stderr)
        return 2
    from kilter.runs import atomic_write_text

    page = build_report(run)
    out = out or run / "report.html"
    atomic_write_text(out, page)
    print(f"kilter report: wrote {out} ({len(page) // 1024} KiB)")
    return 0
