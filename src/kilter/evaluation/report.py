"""Reports of ``kilter eval``: eval.json, eval.md (metrics + side-by-side samples) and gold_vs_kl.png.

Everything here reads the dict that :func:`kilter.evaluation.evaluate.evaluate_models` returns,
so a report can be re-rendered from a saved eval.json without touching a model.  No torch import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (metric key, column header, decimals, key of its standard error or None)
COLUMNS: list[tuple[str, str, int, str | None]] = [
    ("reward/gold", "gold", 3, "reward/gold_stderr"),
    ("reward/rm", "RM", 3, "reward/rm_stderr"),
    ("reward/rm_ensemble_std", "RM ens. std", 3, None),
    ("kl/ref", "KL", 3, "kl/ref_stderr"),
    ("win_rate/gold", "win (gold)", 3, None),
    ("win_rate/rm", "win (RM)", 3, None),
    ("text/bleu", "BLEU", 1, None),
    ("text/rouge1", "ROUGE-1", 3, None),
    ("text/rouge2", "ROUGE-2", 3, None),
    ("text/rougeL", "ROUGE-L", 3, None),
    ("response/length", "length", 1, None),
    ("response/finished", "ended", 2, None),
    ("response/distinct_1", "distinct-1", 3, None),
    ("response/distinct_2", "distinct-2", 3, None),
    ("response/product_mention", "names product", 2, None),
]

LEGEND = {
    "gold": "hidden gold score, mean ± standard error",
    "RM": "reward-model score, mean ± standard error",
    "RM ens. std": "mean disagreement (std) between the reward-model ensemble's members",
    "KL": "KL(model ‖ reference) per response in nats, mean ± standard error (estimator below)",
    "win (gold)": "share of responses the gold judge prefers to the reference's response to the same prompt (ties 0.5)",
    "win (RM)": "the same, judged by the reward model",
    "BLEU": "corpus BLEU against the references (0-100, sacrebleu)",
    "ROUGE-1": "mean ROUGE F1 against the references (0-1, rouge-score)",
    "ROUGE-2": "mean ROUGE F1 against the references (0-1, rouge-score)",
    "ROUGE-L": "mean ROUGE F1 against the references (0-1, rouge-score)",
    "length": "mean response length in generated tokens (EOS not counted)",
    "ended": "share of responses that ended with EOS before the length limit",
    "distinct-1": "unique words / all words over all responses",
    "distinct-2": "unique word bigrams / all bigrams over all responses",
    "names product": "share of responses that name the product their prompt asks about (built-in task prompts)",
}


def _cell(text: str, newline: str = "<br>", max_chars: int | None = None) -> str:
    """Text made safe for one Markdown table cell."""
    text = text.replace("\r", "").replace("|", "\\|").replace("\n", newline)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{decimals}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def present_columns(report: dict[str, Any]) -> list[tuple[str, str, int, str | None]]:
    """The metric columns at least one model has a value for."""
    return [c for c in COLUMNS if any(m["metrics"].get(c[0]) is not None for m in report["models"])]


def metrics_markdown(report: dict[str, Any]) -> str:
    """One row per model, one column per metric that was computed."""
    columns = present_columns(report)
    rows = []
    for model in report["models"]:
        metrics = model["metrics"]
        name = _cell(model["name"]) + (" (reference)" if model["is_reference"] else "")
        row = [name]
        for key, _, decimals, err in columns:
            text = _fmt(metrics.get(key), decimals)
            if err and metrics.get(err) is not None and metrics.get(key) is not None:
                text += f" ± {_fmt(metrics[err], decimals)}"
            row.append(text)
        rows.append(row)
    return _table(["model"] + [c[1] for c in columns], rows)


def samples_markdown(report: dict[str, Any], n_prompts: int = 4, max_chars: int | None = None) -> str:
    """The first sample of each model for the first ``n_prompts`` prompts, side by side (gold/RM in brackets)."""
    prompts = report["prompts"]["items"][:n_prompts]
    header = ["prompt"] + [_cell(m["name"]) for m in report["models"]]
    rows = []
    for index, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        row = [_cell(text, max_chars=max_chars)]
        for model in report["models"]:
            sample = next((s for s in model["samples"] if s["prompt_index"] == index and s["sample"] == 0), None)
            if sample is None:
                row.append("")
                continue
            scores = [f"{k} {sample[k]:.2f}" for k in ("gold", "rm") if sample.get(k) is not None]
            body = _cell(sample["response"] or "(empty)", max_chars=max_chars)
            row.append(body + (f" [{', '.join(scores)}]" if scores else ""))
        rows.append(row)
    return _table(header, rows)


def render_markdown(report: dict[str, Any], plot_name: str | None = None, n_prompts: int | None = None) -> str:
    """The whole eval.md document."""
    prompts = report["prompts"]
    sampling = report["sampling"]
    how = "greedy" if sampling["greedy"] else (
        f"temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k'] or 'off'}")
    judges = report["judges"]
    lines = [
        "# kilter eval",
        "",
        f"- prompts: `{prompts['source']}`, {prompts['count']} prompts x {prompts['samples_per_prompt']} samples",
        f"- sampling: {how}, at most {sampling['max_new_tokens']} new tokens, seed {sampling['seed']}",
        f"- reference model: **{report['reference']}** (KL and win rates are measured against it)",
        f"- gold judge: {judges['gold'] or 'none'}; reward model: {judges['reward_model'] or 'none'}",
    ]
    if report.get("references"):
        lines.append(f"- references for BLEU/ROUGE: `{report['references']}`")
    lines += ["", "## Metrics", "", metrics_markdown(report), ""]
    for _, header, _, _ in present_columns(report):
        lines.append(f"- **{header}**: {LEGEND[header]}")
    if report.get("kl_estimator"):
        lines += ["", f"KL estimator: {report['kl_estimator']}."]
    if plot_name:
        lines += ["", f"![gold score against KL to the reference]({plot_name})"]
    shown = n_prompts if n_prompts is not None else report.get("config", {}).get("show_prompts", 4)
    if shown:
        lines += ["", "## Samples", "", f"First sample of each model for {min(shown, prompts['count'])} prompts.",
                  "", samples_markdown(report, shown)]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot_gold_vs_kl(report: dict[str, Any], path: str | Path) -> bool:
    """Scatter of mean gold score against KL to the reference, one labelled point per model.

    Returns False (and writes nothing) when no model has both numbers.
    """
    points = [(m["name"], m["metrics"], m["is_reference"]) for m in report["models"]
              if m["metrics"].get("reward/gold") is not None and m["metrics"].get("kl/ref") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=120)
    for name, metrics, is_ref in points:
        ax.errorbar(metrics["kl/ref"], metrics["reward/gold"], xerr=metrics.get("kl/ref_stderr") or 0.0,
                    yerr=metrics.get("reward/gold_stderr") or 0.0, fmt="s" if is_ref else "o", capsize=3,
                    color="0.35" if is_ref else None, markersize=7)
        ax.annotate(name + (" (ref)" if is_ref else ""), (metrics["kl/ref"], metrics["reward/gold"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.axvline(0.0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlabel(f"KL(model ‖ {report['reference']}) per response (nats)")
    ax.set_ylabel("gold score (mean ± s.e.)")
    ax.set_title("Gold score against KL to the reference")
    ax.margins(x=0.15, y=0.25)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_reports(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write eval.json, eval.md and (when gold and KL exist) gold_vs_kl.png; return their paths."""
    from kilter.runs import atomic_write_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "eval.json", "markdown": out / "eval.md"}
    plot = out / "gold_vs_kl.png"
    has_plot = plot_gold_vs_kl(report, plot)
    if has_plot:
        files["plot"] = plot
    elif plot.exists():
        plot.unlink()  # a stale plot from an earlier run would contradict this report
    atomic_write_text(files["json"], json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(files["markdown"], render_markdown(report, plot.name if has_plot else None))
    return files


__all__ = ["COLUMNS", "metrics_markdown", "plot_gold_vs_kl", "render_markdown", "samples_markdown", "write_reports"]
