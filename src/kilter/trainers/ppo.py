"""Phase 3: RL fine-tuning against a reward under a KL penalty to pi_0 (``kilter ppo``).

One iteration = sample responses for a batch of prompts -> score them (reward sources,
reference log-probs, critic values) -> per-token rewards ``-beta * KL_t`` plus the sequence
reward on the last token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2) -> advantages ->
an update.  ``algorithm`` picks the estimator:

* ``ppo``: GAE over a learned critic, clipped surrogate and clipped value loss, several
  epochs over shuffled minibatches (Schulman et al. 2017; InstructGPT);
* ``a2c``: the same critic and GAE, one pass, no clipping (DeepMind's Sparrow/Gopher-Cite);
* ``reinforce``: reward-to-go minus a moving-average or greedy-decode baseline (Williams
  1992; self-critical sequence training, Rennie et al. 2017);
* ``rloo`` / ``grpo``: k samples per prompt, the others' mean (RLOO, Ahmadian et al. 2024) or
  the group's mean and std (GRPO, Shao et al. 2024) as baseline; no critic.

The math lives in :mod:`kilter.ops` and :mod:`kilter.losses`; the update epochs in
:mod:`kilter.trainers.ppo_update`; setup helpers in :mod:`kilter.trainers.ppo_setup`.

Under ``torchrun`` (``parallel=ddp`` or ``fsdp``) each process samples, scores and learns from
its contiguous share of every iteration's prompts; the statistics that span the rollout (advantage
whitening, the KL controller, reward normalisation, the minibatch token counts, the early-stopping
KL) are taken over all processes, so the update equals one process's on the whole rollout.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from kilter.distributed import DistInfo, barrier
from kilter.evaluation.overoptimization import OveroptimisationMonitor
from kilter.models.lora import count_parameters
from kilter.ops import AdaptiveKLController, FixedKLController, explained_variance, kl_estimate
from kilter.ops.kl import kl_gradient_follows, kl_placement
from kilter.ops.masked import masked_mean
from kilter.rewards.base import build_reward, prompt_text
from kilter.rollout.engine import close_engine, engine_logp_maxdiff, make_engine
from kilter.rollout.scoring import assemble, batched_logprobs, batched_scores, batched_values
from kilter.runs import read_metrics
from kilter.trainers import ppo_setup
from kilter.trainers.ppo_config import PPOConfig, PPOData, RolloutSection, UpdateSection, check_config
from kilter.trainers.ppo_update import (
    CRITIC,
    MovingAverageBaseline,
    UpdateSettings,
    compute_advantages,
    first_pass,
    fuses_first_pass,
    on_trunk,
    run_update,
    shaped_rewards,
)
from kilter.training.optim import make_optimizer, make_scheduler
from kilter.training.parallel import Ranks, gathered
from kilter.training.setup import launch, open_run_dir, prepare

# --------------------------------------------------------------------------- training


def run(cfg: PPOConfig) -> int:
    check_config(cfg)
    return launch(_train, cfg, "ppo")


def _train(cfg: PPOConfig, info: DistInfo) -> int:
    ppo_setup.check_data_parallel(cfg, info.world_size)
    existing = prepare(cfg, info)  # threads, precision, seed, fast paths; refuses to overwrite checkpoints
    device = info.device
    ranks = Ranks(info, sharded=info.enabled and cfg.parallel == "fsdp")
    say = print if info.is_main else (lambda *a, **k: None)
    reward = build_reward(cfg.reward, device=device)  # a bad reward source fails before anything is written
    if info.enabled:
        reward.gather = ranks.gather  # reward normalisation's running statistics see every process's rewards
    m = ppo_setup.build_models(cfg, reward, device)  # and so does a bad model or ref_model
    ppo_setup.distribute(m, cfg, info, ranks)  # torchrun: shard (fsdp) or replicate (ddp)
    run_dir = open_run_dir(cfg, info)
    tok = m.tokenizer
    prompts = ppo_setup.PromptStream(cfg, tok)
    eval_prompts = ppo_setup.load_eval_prompts(cfg, tok)
    gold_fn = ppo_setup.gold_function(cfg)
    ptx = ppo_setup.build_ptx(cfg, tok, rank=info.rank, world=info.world_size)
    engine = make_engine(cfg.rollout.engine, m.policy, tok, model_path=m.policy_path,
                         batch_size=cfg.rollout.generation_batch_size, seed=cfg.seed,
                         max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                         dtype=cfg.precision, **cfg.rollout.engine_kwargs())
    kl_ctl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.beta))
    ma_baseline = MovingAverageBaseline(cfg.baseline.decay)

    policy_opt = make_optimizer(m.policy, cfg.optim)
    if on_trunk(m.value):  # the head trains with the policy: one optimizer, at value.optim.lr
        policy_opt.add_param_group({"params": list(m.value.parameters()), "lr": cfg.value.optim.lr,
                                    "weight_decay": 0.0})
    policy_sched = make_scheduler(policy_opt, cfg.optim, cfg.iterations)
    value_opt = value_sched = None
    if m.value is not None and not on_trunk(m.value):
        value_opt = make_optimizer(m.value, cfg.value.optim)
        value_sched = make_scheduler(value_opt, cfg.value.optim, cfg.iterations)
    optimizers = {"policy_optimizer": policy_opt, "policy_scheduler": policy_sched}
    if value_opt is not None:
        optimizers.update(value_optimizer=value_opt, value_scheduler=value_sched)

    state = ppo_setup.LoopState(m, optimizers, kl_ctl, reward, ma_baseline, ptx, ranks)
    ppo_setup.seed_rank(cfg.seed, ranks)
    start = 0
    if cfg.resume and existing is not None:
        start = state.resume(existing, run_dir)
        engine.sync_weights(m.policy)
        say(f"kilter ppo: resumed from {existing} at iteration {start}/{cfg.iterations}")
    else:
        ppo_setup.truncate_samples(run_dir, -1)  # a fresh start: no rows of an earlier (killed) run
    run_dir.write_config(cfg)
    barrier(info)  # rank 0 has cut metrics.jsonl back to the checkpoint before any rank reads it

    trainable, total = count_parameters(m.policy)
    if info.enabled:
        say(f"kilter ppo: {info.world_size} processes (parallel={cfg.parallel}), "
            f"{cfg.rollout_size // info.world_size} responses each per iteration")
    say(f"kilter ppo: algorithm {cfg.algorithm}, {cfg.iterations} iterations x {cfg.rollout_size} responses, "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M policy parameters trainable, "
        f"reference: {m.reference_label}, "
        f"critic: {m.value_source or 'none'}, device {device}")
    estimator = cfg.kl_estimator
    kl_in_reward = kl_placement(estimator) == "reward"
    say(f"kilter ppo: KL penalty {estimator} {'in the reward' if kl_in_reward else 'as a loss term'} "
        f"(its gradient follows {kl_gradient_follows(estimator)}), loss aggregation {cfg.update.loss_aggregation}, "
        f"advantages {'whitened' if cfg.whitens else 'not whitened'}")
    if cfg.truncates_sampling:
        say(f"kilter ppo: WARNING: rollout.top_p={cfg.rollout.top_p} / top_k={cfg.rollout.top_k} truncate sampling, "
            "but the update scores tokens under the full softmax: it is off-policy and the training kl/ref is "
            "biased; eval/kl samples without truncation and stays unbiased (see docs/ppo.md)")
    settings = UpdateSettings(
        algorithm=cfg.algorithm, epochs=cfg.update.epochs, num_minibatches=cfg.update.num_minibatches,
        grad_accum=cfg.update.grad_accum, clip_range=cfg.update.clip_range,
        clip_range_value=cfg.update.clip_range_value, entropy_coef=cfg.update.entropy_coef,
        target_kl=cfg.update.target_kl, temperature=cfg.rollout.temperature, precision=cfg.precision,
        max_grad_norm=cfg.optim.max_grad_norm, value_max_grad_norm=cfg.value.optim.max_grad_norm,
        ptx_coef=cfg.ptx.coef, fuse_first_pass=cfg.update.fuse_first_pass,
        kl_loss=None if kl_in_reward else estimator, aggregation=cfg.update.loss_aggregation,
        normaliser=float(cfg.rollout.max_new_tokens), vf_coef=cfg.value.vf_coef)
    critic = m.value if cfg.algorithm in CRITIC else None
    params = cfg.sampling()
    ev = ppo_setup.Evaluator(cfg, m, reward, gold_fn, eval_prompts, params, engine=engine)
    monitor = OveroptimisationMonitor(cfg.early_stop_patience)
    for row in read_metrics(run_dir.path):  # a resumed run remembers the evaluations before its checkpoint
        _overoptimised(monitor, row)

    def evaluate() -> dict[str, float]:
        # rank 0 evaluates (under FSDP with the weights gathered on every rank); every rank gets its row
        with ppo_setup.gathered_models(m):
            out = ev.evaluate() if info.is_main else None
        return ranks.broadcast_object(out)

    if start == 0 and eval_prompts:
        eval_metrics = evaluate()
        run_dir.log(0, eval_metrics)
        _overoptimised(monitor, eval_metrics)

    progress = tqdm(total=cfg.iterations, initial=start, desc=f"kilter {cfg.algorithm}", dynamic_ncols=True,
                    disable=not info.is_main)
    last: dict[str, float] = {}
    for it in range(start, cfg.iterations):
        t0 = time.perf_counter()
        rows = ppo_setup.local_rows(prompts.batch(it), ranks)  # this process's share
        k = cfg.rollout.samples_per_prompt
        row_prompts = [r["prompt"] for r in rows for _ in range(k)]
        row_ids = [r["ids"] for r in rows for _ in range(k)]
        with gathered(m.policy):  # under FSDP each process samples alone, as many steps as its responses need
            gen = engine.generate(row_ids, params)
        t_gen = time.perf_counter() - t0
        batch = assemble(row_ids, gen.response_ids, tok.pad_token_id, device)
        mask = batch.response_mask
        fb = cfg.rollout.forward_batch_size
        first, t_first = None, 0.0
        if fuses_first_pass(settings):
            # The update's first step is one forward over the whole rollout: run it now, with grad,
            # and read the old log-probs, entropy and values off it instead of separate no-grad passes.
            t_first = time.perf_counter()
            first = first_pass(m.policy, critic, batch, settings, seed=cfg.seed, iteration=it)
            old_logp, entropy, values = first.old_logp, first.old_entropy, first.old_values
            t_first = time.perf_counter() - t_first
        elif on_trunk(critic):  # the values come from the policy's own scoring forward
            old_logp, entropy, values = batched_scores(m.policy, batch, params.temperature, fb, cfg.precision,
                                                       with_entropy=True, value_head=critic)
        else:
            old_logp, entropy = batched_logprobs(m.policy, batch, params.temperature, fb, cfg.precision,
                                                 with_entropy=True)
            values = batched_values(critic, batch, fb, cfg.precision) if critic is not None else None
        ref_logp = ppo_setup.reference_logprobs(m.reference, batch, params.temperature, fb, cfg.precision)
        scored = reward(row_prompts, gen.texts, gen.finished)
        scores = scored.total.to(device)
        kl = kl_estimate(old_logp, ref_logp, estimator) * mask
        beta = kl_ctl.beta
        # k1 enters the reward (Ouyang et al. 2022, eq. 2); k2/k3 are a loss term in run_update instead.
        token_rewards = shaped_rewards(scores, kl, mask, beta, estimator)
        baseline = None
        if cfg.algorithm == "reinforce" and cfg.baseline.kind != "none":
            with gathered(m.policy):
                baseline = ppo_setup.reinforce_baseline(cfg, m, reward, ma_baseline, rows, token_rewards, mask, params)
        adv = compute_advantages(cfg.algorithm, token_rewards, mask, values=values, gamma=cfg.update.gamma,
                                 lam=cfg.update.lam, group_size=k, baseline=baseline,
                                 whiten=cfg.whitens, group_std_scale=cfg.update.group_std_scale,
                                 reduce=ranks.sum if ranks.enabled else None)
        if cfg.algorithm == "reinforce":
            ma_baseline.update(ranks.mean(float(token_rewards.sum(1).mean())))
        t_score = time.perf_counter()
        stats = run_update(m.policy, critic, policy_opt, value_opt, batch, old_logp, adv, values, settings,
                           seed=cfg.seed, iteration=it, ptx=ptx, first=first, ref_logp=ref_logp, beta=beta,
                           ranks=ranks)
        del first  # frees the fused pass's outputs
        # the fused forward is part of the training work, as it would be without fusion
        t_train = time.perf_counter() - t_score + t_first
        policy_sched.step()
        if value_sched is not None:
            value_sched.step()
        seq_kl = kl.sum(1)
        kl_ctl.update(ranks.mean(float(seq_kl.mean())), cfg.rollout_size)
        engine.sync_weights(m.policy)

        done = it + 1
        golds = gold_fn([prompt_text(p) for p in row_prompts], gen.texts) if gold_fn else None
        metrics = {
            "reward/total": float(scored.total.mean()),
            "reward/raw": float(scored.raw.mean()),
            **{f"reward/{name}": float(v.mean()) for name, v in scored.components.items()},
            "kl/ref": float(seq_kl.mean()),
            "kl/ref_k1": float(((old_logp - ref_logp) * mask).sum(1).mean()),
            "kl/beta": beta,
            "kl/per_token": float(masked_mean(kl, mask)),
            "policy/entropy": float(masked_mean(entropy, mask)),
            "response/length": float(mask.sum(1).mean()),
            "response/finished": sum(gen.finished) / len(gen.finished),
            "advantage/mean": float(masked_mean(adv.advantages, mask)),
            "optim/lr": policy_sched.get_last_lr()[0],
            "perf/rollout_tokens_per_s": float(mask.sum()) / max(t_gen, 1e-9),
            "perf/train_tokens_per_s": stats.pop("_train_tokens") / max(t_train, 1e-9),
            "perf/iteration_s": time.perf_counter() - t0,
            **stats,
        }
        if golds is not None:
            metrics["reward/gold"] = sum(golds) / len(golds)
        engine_diff = engine_logp_maxdiff(gen, old_logp, mask)  # the engine's log-probs: a check only
        if engine_diff is not None:
            metrics["rollout/engine_logp_maxdiff"] = engine_diff
        if values is not None and adv.returns is not None:
            metrics["value/explained_variance"] = explained_variance(values, adv.returns, mask)
            metrics["value/mean"] = float(masked_mean(values, mask))
        # one row for all processes: means over their equal shares; throughputs add up
        metrics = ppo_setup.mean_metrics(metrics, ranks, summed=("perf/rollout_tokens_per_s",
                                                                  "perf/train_tokens_per_s"))
        if done % cfg.log_every == 0 or done == cfg.iterations:
            run_dir.log(done, metrics)
        last.update(metrics)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", kl=f"{metrics['kl/ref']:.2f}",
                             **({"gold": f"{metrics['reward/gold']:.3f}"} if golds is not None else {}))
        if cfg.n_samples and info.is_main and (done % cfg.sample_every == 0 or done == cfg.iterations or done == 1):
            ppo_setup.show_samples(run_dir, done, row_prompts, gen.texts, scored.total, golds, cfg.n_samples, k,
                                   write=tqdm.write)
        stop = None
        if eval_prompts and (done % cfg.eval_every == 0 or done == cfg.iterations):
            eval_metrics = evaluate()
            stop = _overoptimised(monitor, eval_metrics)
            if stop and cfg.early_stop:
                eval_metrics["early_stop/iteration"] = done
            run_dir.log(done, eval_metrics)
            last.update(eval_metrics)
        if done % cfg.save_every == 0 or done == cfg.iterations or (stop and cfg.early_stop):
            state.save(run_dir, done, cfg)
        if stop and info.is_main:
            tqdm.write(f"WARNING kilter {cfg.algorithm}: iteration {done}: {stop}"
                       + ("; stopping (early_stop=true)" if cfg.early_stop else ""), file=sys.stderr)
        if stop and cfg.early_stop:
            break
    progress.close()
    close_engine(engine)

    ppo_setup.write_final(run_dir, m, cfg)
    keys = ("reward/total", "reward/gold", "kl/ref", "eval/gold", "eval/reward", "eval/kl")
    summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
    say(f"kilter ppo: done ({summary}); policy in {run_dir.final}")
    run_dir.close()
    return 0


def _overoptimised(monitor: OveroptimisationMonitor, row: dict) -> str | None:
    """Feed one evaluation row to the monitor; a one-line reason when it calls for a stop."""
    if "eval/reward" not in row:
        return None
    truth = "eval/agreement" if row.get("eval/agreement") is not None else "eval/gold"
    if row.get(truth) is None:
        return None
    if monitor.update(row["eval/reward"], row[truth]):
        return (f"the proxy reward rose while {truth} fell at {monitor.patience} evaluations in a row "
                "(reward over-optimisation)")
    return None


__all__ = ["PPOConfig", "PPOData", "RolloutSection", "UpdateSection", "check_config", "run"]
