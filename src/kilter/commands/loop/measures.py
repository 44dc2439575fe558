"""What each round measures from its files: held-out agreement and calibration, the Gao et al. fit of the PPO curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kilter.evaluation.overoptimization import divergence, fit_gao


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gold_ordered_pairs(samples: list[dict]) -> list[tuple[dict, dict]]:
    """(better by gold, worse by gold) sample pairs of each prompt; gold ties left out."""
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = []
    for group in by_prompt.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                if a["gold"] != b["gold"]:
                    pairs.append((a, b) if a["gold"] > b["gold"] else (b, a))
    return pairs


def human_calibration(gaps: list[float], n_bins: int = 5) -> dict:
    """Reliability table of the RM's P(chosen wins) = sigmoid(r_chosen - r_rejected) on held-out human judgments.

    ``gaps``: r_chosen - r_rejected per held-out comparison (the person's choice is the outcome).
    """
    import torch

    from kilter.evaluation.calibration import calibration_report, calibration_sums

    p = torch.sigmoid(torch.tensor(gaps, dtype=torch.float64))
    return calibration_report(calibration_sums(p, n_bins))


def heldout_agreement(samples: list[dict]) -> float | None:
    """Share of a prompt's sample pairs on which the reward model orders the two responses as gold does.

    ``samples``: kilter eval's per-sample rows (prompt_index, gold, rm); gold ties are left out.
    """
    pairs = _gold_ordered_pairs(samples)
    return sum(a["rm"] > b["rm"] for a, b in pairs) / len(pairs) if pairs else None


def _ppo_rows(policy_dir: Path) -> list[dict]:
    path = policy_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [x for x in _read_jsonl(path) if "reward/gold" in x and "kl/ref" in x and "reward/raw" in x]


def ppo_curve_fit(policy_dirs: list[Path], anchor: float | None = None) -> dict[str, float | None]:
    """Gao et al.'s RL form fitted to the PPO iterations of every round so far: gold gain vs sqrt(KL to pi_0).

    The gain is measured from ``anchor``, pi_0's gold (default: the first iteration's, which samples
    from pi_0 itself in round 1). ``ppo/diverged`` is 1 when, in the last round's iterations, the
    proxy climbed over the last third while gold fell. Empty without PPO metrics (DPO rounds).
    """
    per_round = [_ppo_rows(p) for p in policy_dirs]
    rows = [x for part in per_round for x in part]
    if len(rows) < 3:
        return {}
    last = per_round[-1]
    out: dict[str, float | None] = {}
    if len(last) >= 2:
        window = max(2, len(last) // 3)
        out["ppo/diverged"] = float(divergence([x["reward/raw"] for x in last], [x["reward/gold"] for x in last], window))
    start = rows[0]["reward/gold"] if anchor is None else anchor
    d = [math.sqrt(max(0.0, x["kl/ref"])) for x in rows]
    try:
        fit = fit_gao("rl", d, [x["reward/gold"] - start for x in rows])
    except ValueError:
        return out
    out.update({"gao/alpha": fit.alpha, "gao/beta": fit.beta, "gao/r2": fit.r2, "gao/peak_sqrt_kl": fit.peak_d})
    return out
