"""``kilter loop``: online iterated RLHF with people (or a simulated crowd) in the loop.

Anthropic retrained the preference model on the new data and redeployed the policy weekly
(Bai et al. 2022, section 4.5). This command does that in rounds, each a fixed sequence of
stages (:data:`STAGES`)::

    sample     the current policy answers the round's prompts, K responses each (plus one answer per
               earlier snapshot when ``snapshots`` > 0: each item is then also a battle of policies);
               selection picks which pairs people see (all, random, or by reward-ensemble disagreement)
    publish    the pairs become items of the feedback project LOOP-rN (plus gold items with known answers)
    collect    wait until the round's quota of judgments is stored: people in `kilter serve`, the simulated
               crowd through the app's HTTP pages (crowd.py), or both
    export     every round's judgments so far -> comparisons JSONL (flagged annotators left out if asked);
               older rounds are down-weighted by subsampling: round r' keeps old_data_weight ** (r - r')
    reward     the reward model is refreshed: warm start from the previous round's RM (kilter rm init_from=)
               or trained from the SFT backbone
    policy     PPO / RLOO / GRPO against the new RM, or DPO on the round's pairs, from the current policy
               with the KL penalty anchored to pi_0 = the SFT model (ref_model=)
    evaluate   gold, proxy reward, KL and sqrt(KL) to the SFT model, distinct-2, held-out RM agreement with
               the gold preference on fresh samples, the Gao et al. fit of the PPO curve; the new policy
               becomes the sampler

Before round 1 the loop trains the built-in SFT model when ``sft_model`` is null, and evaluates
pi_0 (``baseline``). State lives in ``output_dir/state.json`` (written atomically after every stage,
with a count of how often each stage was started) and in the feedback database. Every stage is
idempotent: a stage whose result is recorded is never run again, an interrupted one is redone from
what is stored (the trainers continue from their checkpoints; judgments are the database's, so a
resumed collection neither loses nor repeats one). ``resume=true`` continues after a kill -9.

The package: config.py (LoopConfig), state.py (state.json, run_stage), selection.py (which pairs people
see), app.py (the feedback app in a thread), measures.py (held-out agreement, calibration, the Gao fit),
stages.py (the Loop: one method per stage, each calling a trainer's or the app's own entry point).
"""

from __future__ import annotations

from kilter.commands.loop.app import serve_in_thread
from kilter.commands.loop.config import LoopConfig, PolicySection, RewardSection, check_config
from kilter.commands.loop.measures import heldout_agreement, human_calibration, ppo_curve_fit
from kilter.commands.loop.selection import _weighted_rounds, disagreement_pairs, gap_spread, information_gain
from kilter.commands.loop.stages import Loop
from kilter.commands.loop.state import STAGES, STATE_VERSION, LoopState, run_stage

__all__ = ["STAGES", "STATE_VERSION", "Loop", "LoopConfig", "LoopState", "PolicySection", "RewardSection",
           "check_config", "disagreement_pairs", "gap_spread", "heldout_agreement", "human_calibration",
           "information_gain", "ppo_curve_fit", "run", "run_stage", "serve_in_thread", "_weighted_rounds"]


def run(cfg: LoopConfig) -> int:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return Loop(cfg).run()
