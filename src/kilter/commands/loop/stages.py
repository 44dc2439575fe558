"""The loop itself: one method per stage, each calling a trainer's or the app's own entry point."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kilter.commands.crowd import BrowserAnnotator, crowd_members, work
from kilter.commands.loop.app import serve_in_thread
from kilter.commands.loop.config import LoopConfig, check_config
from kilter.commands.loop.measures import (
    _ppo_rows,
    _read_jsonl,
    heldout_agreement,
    human_calibration,
    ppo_curve_fit,
)
from kilter.commands.loop.selection import _weighted_rounds, disagreement_pairs, gap_spread, information_gain
from kilter.commands.loop.state import STAGES, LoopState, run_stage
from kilter.data.readers import write_jsonl
from kilter.data.sources import hold_out, load_records
from kilter.data.task import gold_score
from kilter.errors import ConfigError, KilterError
from kilter.evaluation.overoptimization import divergence
from kilter.feedback import analysis, export
from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store
from kilter.runs import atomic_write_text


class Loop:
    """One loop run. Stage methods return JSON-ready results that state.json keeps."""

    def __init__(self, cfg: LoopConfig, on_judgment: Callable[[int], None] | None = None):
        check_config(cfg)  # before anything is written to output_dir
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.state = LoopState.load_or_start(cfg)
        self.on_judgment = on_judgment

    # ---- helpers

    def round_dir(self, r: int) -> Path:
        return self.out / f"round-{r}"

    def project_name(self, r: int) -> str:
        return f"{self.cfg.project}-r{r}"

    @contextmanager
    def store(self) -> Iterator[Store]:
        store = Store(self.cfg.db_url)
        try:
            store.migrate()
            yield store
        finally:
            store.close()

    def sft(self) -> str:
        return run_stage(self.state, "sft", self._train_sft)

    def policy_of(self, r: int) -> str:
        """The policy that samples in round r: the SFT model, then each round's updated policy."""
        return self.sft() if r == 1 else self.state.result(f"{r - 1}:policy")["model"]

    # ---- stages before round 1

    def _train_sft(self) -> str:
        if self.cfg.sft_model:
            return self.cfg.sft_model
        from kilter.trainers.sft import SFTConfig
        from kilter.trainers.sft import run as run_sft

        out = self.out / "sft"
        sft_cfg = SFTConfig(output_dir=str(out), max_steps=self.cfg.sft_steps, seed=self.cfg.seed, resume=True,
                            n_samples=0, log_every=25, eval_every=10_000, save_every=50, tensorboard=False)
        sft_cfg.data.train = f"builtin:sft@{self.cfg.task_split}"
        sft_cfg.optim.lr = 2e-3
        if run_sft(sft_cfg):
            raise KilterError("the SFT stage failed (see above)")
        return str(out / "final")

    def _baseline(self) -> dict:
        return self._evaluate_models({"sft": self.sft()}, None, self.out / "baseline")["sft"]

    # ---- round stages

    def _sample(self, r: int) -> dict:
        """samples.jsonl: {prompt, responses: [{text, model}]} per published prompt."""
        import torch

        from kilter.commands.label import LabelConfig, sample_groups
        from kilter.models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        pool = cfg.prompts_per_round * (cfg.pool_factor if cfg.selection != "all" else 1)
        every = [row["prompt"] for row in load_records(cfg.prompts, "prompt").rows]
        rng = random.Random(f"loop-prompts-{cfg.seed}-{r}")
        prompts = [every[i] for i in sorted(rng.sample(range(len(every)), min(pool, len(every))))]
        models = [(f"round-{r - 1}" if r > 1 else "sft", self.policy_of(r), cfg.k)]
        models += [(f"round-{s - 1}" if s > 1 else "sft", self.policy_of(s), 1)
                   for s in range(r - 1, max(0, r - 1 - cfg.snapshots), -1)]
        groups: list[list[dict]] = [[] for _ in prompts]
        for name, path, k in models:
            tokenizer = load_tokenizer(path)
            model = load_causal_lm(path, tokenizer)
            model.eval()
            torch.manual_seed(cfg.seed + r)  # an interrupted sample stage draws the same responses again
            label_cfg = LabelConfig(model=path, k=max(2, k), temperature=cfg.temperature,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + r)
            texts, _ = sample_groups(model, tokenizer, prompts, label_cfg)
            for g, answers in zip(groups, texts):
                seen = {x["text"] for x in g}
                g.extend({"text": t, "model": name} for t in answers[:k] if t not in seen)
        rows = [{"prompt": p, "responses": g} for p, g in zip(prompts, groups) if len(g) >= 2]
        rows = self._select(r, rows)
        folder = self.round_dir(r)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "samples.jsonl", rows)
        return {"file": str(folder / "samples.jsonl"), "prompts": len(rows), "selection": cfg.selection}

    def _select(self, r: int, rows: list[dict]) -> list[dict]:
        cfg = self.cfg
        if cfg.selection == "all":
            return rows[: cfg.prompts_per_round]
        rng = random.Random(f"loop-select-{cfg.seed}-{r}")
        if cfg.selection in ("active", "information") and r > 1:
            from kilter.models.reward import RewardEnsemble, load_reward

            rm = load_reward(self.state.result(f"{r - 1}:reward")["model"])
            if not isinstance(rm, RewardEnsemble):
                raise ConfigError(f"selection={cfg.selection} needs a reward ensemble: set reward.ensemble_size=2 or more")
            prompts = [row["prompt"] for row in rows for _ in row["responses"]]
            texts = [x["text"] for row in rows for x in row["responses"]]
            flat = rm.member_scores(prompts, texts).T.tolist()  # (N, M)
            scores, at = [], 0
            for row in rows:
                scores.append(flat[at: at + len(row["responses"])])
                at += len(row["responses"])
            chosen = disagreement_pairs(scores, cfg.prompts_per_round,
                                        information_gain if cfg.selection == "information" else gap_spread)
        else:  # random, and active/information in round 1 (there is no reward model yet)
            picked = sorted(rng.sample(range(len(rows)), min(cfg.prompts_per_round, len(rows))))
            chosen = [(p, *sorted(rng.sample(range(len(rows[p]["responses"])), 2))) for p in picked]
        return [{"prompt": rows[p]["prompt"], "responses": [rows[p]["responses"][i], rows[p]["responses"][j]]}
                for p, i, j in chosen]

    def _publish(self, r: int) -> dict:
        cfg = self.cfg
        rows = _read_jsonl(self.round_dir(r) / "samples.jsonl")
        name = self.project_name(r)
        with self.store() as store:
            if name not in {p.name for p in store.projects()}:
                store.create_project(name, "pairwise", overlap=cfg.overlap, gold_fraction=cfg.gold_fraction,
                                     title=f"Loop round {r}",
                                     instructions="Which response would you rather get? Name the product, stay "
                                                  "on topic and be positive.")
            if not store.prompt_external_ids(store.project(name).id):  # the import is one transaction
                parsed = [parse_row({"prompt": row["prompt"], "id": f"r{r}-{i}",
                                     "responses": [{"text": x["text"], "model": x["model"]} for x in row["responses"]]},
                                    f"round {r} prompt {i}") for i, row in enumerate(rows)]
                parsed += self._gold_rows(r, rows)
                store.import_prompts(name, parsed)
            for member in self._member_names(store):
                store.add_member(name, member)
            progress = store.progress(store.project(name))
        return {"project": name, "items": progress.items, "gold_items": progress.gold_items}

    def _gold_rows(self, r: int, rows: list[dict]) -> list:
        """Pairs of this round's responses with a clear gold winner, imported again as gold items."""
        golds: list = []
        if not self.cfg.prompts.startswith("builtin:"):
            return golds  # the answer key is the built-in task's gold score: meaningless for other prompts
        for i, row in enumerate(rows):
            if len(golds) >= self.cfg.gold_items:
                break
            a, b = row["responses"][0]["text"], row["responses"][1]["text"]
            g_a, g_b = gold_score(row["prompt"], a), gold_score(row["prompt"], b)
            if abs(g_a - g_b) >= 0.5:
                golds.append(parse_row({"prompt": row["prompt"], "id": f"r{r}-gold-{i}", "responses": [a, b],
                                        "gold": 0 if g_a > g_b else 1}, f"round {r} gold {i}"))
        return golds

    def _crowd_passwords(self) -> dict[str, str]:
        """The crowd's accounts (created once; passwords kept in output_dir/crowd.json, written before use)."""
        from kilter.feedback import security

        path = self.out / "crowd.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        wanted = {a.name for a in crowd_members(self.cfg.crowd)}
        if not wanted <= set(known):
            known.update({n: security.new_token(18) for n in wanted if n not in known})
            atomic_write_text(path, json.dumps(known, indent=2) + "\n")
            path.chmod(0o600)
        return known

    def _member_names(self, store: Store) -> list[str]:
        names = list(self.cfg.members) if self.cfg.mode != "simulated" else []
        if self.cfg.mode != "people":
            existing = {u.username for u in store.users()}
            for name, password in self._crowd_passwords().items():
                if name not in existing:
                    store.create_user(name, "annotator", password=password)
            names += [a.name for a in crowd_members(self.cfg.crowd)]
        return names

    def quota(self, store: Store, r: int) -> int:
        progress = store.progress(store.project(self.project_name(r)))
        return self.cfg.quota or progress.items * self.cfg.overlap

    def _collect(self, r: int) -> dict:
        cfg = self.cfg
        name = self.project_name(r)
        with self.store() as store:
            project = store.project(name)
            wanted = self.quota(store, r)
            self.state.data["current"].update(project=name, quota=wanted)  # for the app's /admin/loop page
            self.state.save()

            crowd = crowd_members(cfg.crowd) if cfg.mode != "people" else []
            crowd_names = {a.name for a in crowd}

            def judged(by_crowd: bool | None = None) -> int:
                """Regular judgments stored so far: all, only the crowd's (True) or only people's (False)."""
                return sum(1 for j in store.judgments(project)
                           if not j.is_gold and (by_crowd is None or (j.user in crowd_names) == by_crowd))

            # the crowd's part of the quota; in both mode people judge the rest (and may judge more)
            crowd_wanted = {"people": 0, "simulated": wanted, "both": math.ceil(cfg.crowd_share * wanted)}[cfg.mode]
            if crowd_wanted:
                passwords = self._crowd_passwords()
                with serve_in_thread(cfg.db_url, str(self.out), order_seed=cfg.seed) as url:
                    people = [BrowserAnnotator(a, url, seed=cfg.seed * 1000 + r * 64 + i)
                              for i, a in enumerate(crowd)]
                    try:
                        for person in people:
                            person.login(passwords[person.who.name])
                        work(people, name, crowd_wanted, lambda: judged(by_crowd=True), on_judgment=self.on_judgment)
                    finally:
                        for person in people:
                            person.close()
            if cfg.mode != "simulated":
                self._wait_for_people(judged, wanted, name)
            done, by_crowd = judged(), judged(by_crowd=True)
        if done < wanted:
            raise KilterError(f"round {r}: only {done} of {wanted} judgments could be collected in {name!r} "
                              "(every annotator ran out of items); lower quota or raise overlap")
        return {"judgments": done, "quota": wanted, "by_crowd": by_crowd, "by_people": done - by_crowd}

    def _wait_for_people(self, judged: Callable[[], int], wanted: int, name: str) -> None:
        while (done := judged()) < wanted:
            print(f"\rkilter loop: {name}: {done}/{wanted} judgments (people are working in kilter serve)",
                  end="", file=sys.stderr, flush=True)
            time.sleep(self.cfg.poll_s)
        print(file=sys.stderr)

    def _export(self, r: int) -> dict:
        cfg = self.cfg
        folder = self.round_dir(r)
        by_round: dict[int, list[dict]] = {}
        with self.store() as store:
            projects = [store.project(self.project_name(rr)) for rr in range(1, r + 1)]
            records = {rr: store.judgments(p) for rr, p in zip(range(1, r + 1), projects)}
        # Annotators are judged on every round so far: one round gives a troll too few gold items to be caught.
        quality = analysis.quality([x for rows in records.values() for x in rows], "pairwise")
        report = {"alpha": quality.alpha, "flagged": quality.flagged,
                  "annotators": {s.name: {"judgments": s.judgments, "gold_rate": s.gold_rate, "gold": list(s.gold),
                                          "peer_rate": s.peer_rate} for s in quality.annotators}}
        for rr, project in zip(range(1, r + 1), projects):
            kept = records[rr]
            if cfg.exclude_flagged:
                kept = analysis.without_users(kept, quality.flagged)
            kept = [x for x in kept if not x.is_gold]
            by_round[rr] = export.build(kept, "pairwise", "comparisons", "each", project=project.name)
        # with snapshots, each item is a battle between policies: the round's tournament
        kept_now = analysis.without_users(records[r], quality.flagged) if cfg.exclude_flagged else records[r]
        report["leaderboard"] = analysis.model_leaderboard(kept_now, n_bootstrap=100, seed=cfg.seed) \
            if analysis.battles(kept_now) else []
        write_jsonl(folder / "comparisons.jsonl", by_round[r])
        # each round's held-out share never trains an RM (the split is a function of the seed and the round)
        split = {rr: hold_out(rows, cfg.heldout_fraction, cfg.seed * 1000 + rr) for rr, rows in by_round.items()}
        write_jsonl(folder / "heldout.jsonl", split[r][1])
        train = _weighted_rounds({rr: kept for rr, (kept, _) in split.items()}, r, cfg.reward.old_data_weight, cfg.seed)
        write_jsonl(folder / "train.jsonl", train)
        atomic_write_text(folder / "quality.json", json.dumps(report, indent=2) + "\n")
        if not by_round[r]:
            raise KilterError(f"round {r}: no usable comparisons (all judgments were ties, both-bad or flagged)")
        return {"round_pairs": len(by_round[r]), "train_pairs": len(train), "heldout_pairs": len(split[r][1]),
                "flagged": sorted(report["flagged"]),
                "alpha": report["alpha"], "leaderboard": report["leaderboard"]}

    def _reward(self, r: int) -> dict:
        from kilter.trainers.rm import RMConfig, RMData
        from kilter.trainers.rm import run as run_rm

        cfg = self.cfg
        out = self.round_dir(r) / "rm"
        warm = cfg.reward.warm_start and r > 1
        rm_cfg = RMConfig(model=self.sft(), init_from=self.state.result(f"{r - 1}:reward")["model"] if warm else None,
                          output_dir=str(out), epochs=cfg.reward.epochs, batch_size=cfg.reward.batch_size, seed=cfg.seed + r, resume=True,
                          ensemble_size=cfg.reward.ensemble_size, n_samples=0, log_every=10, eval_every=10_000,
                          save_every=10_000, tensorboard=False,
                          data=RMData(train=str(self.round_dir(r) / "train.jsonl"), eval_fraction=0.0))
        rm_cfg.optim.lr = cfg.reward.lr
        if run_rm(rm_cfg):
            raise KilterError(f"round {r}: the reward-model stage failed (see above)")
        return {"model": str(out / "final"), "warm_start": warm}

    def _policy(self, r: int) -> dict:
        cfg, pol = self.cfg, self.cfg.policy
        out = self.round_dir(r) / "policy"
        start = self.policy_of(r)
        if pol.algorithm == "dpo":
            from kilter.trainers.dpo import DPOConfig, DPOData
            from kilter.trainers.dpo import run as run_dpo

            dpo_cfg = DPOConfig(model=start, ref_model=self.sft(), output_dir=str(out), beta=pol.dpo_beta,
                                epochs=pol.dpo_epochs, seed=cfg.seed + r, resume=True, log_every=10,
                                eval_every=10_000, save_every=10_000, tensorboard=False,
                                data=DPOData(train=str(self.round_dir(r) / "comparisons.jsonl")))
            dpo_cfg.optim.lr = pol.lr
            code = run_dpo(dpo_cfg)
        else:
            from kilter.rewards.base import RewardConfig
            from kilter.trainers.ppo import PPOConfig, PPOData, RolloutSection, UpdateSection
            from kilter.trainers.ppo import run as run_ppo

            ppo_cfg = PPOConfig(model=start, ref_model=self.sft(), output_dir=str(out), algorithm=pol.algorithm,
                                iterations=pol.iterations, seed=cfg.seed + r, resume=True,
                                reward=RewardConfig(model=self.state.result(f"{r}:reward")["model"]),
                                rollout=RolloutSection(batch_size=pol.batch_size, samples_per_prompt=pol.samples_per_prompt,
                                                       max_new_tokens=cfg.max_new_tokens, **pol.engine_fields()),
                                update=UpdateSection(epochs=2, num_minibatches=2), data=PPOData(prompts=cfg.prompts, n_eval=16),
                                eval_every=pol.eval_every or pol.iterations, sample_every=pol.iterations,
                                n_samples=2, save_every=max(1, pol.iterations // 2), tensorboard=False,
                                eval_agreement=True, early_stop=pol.early_stop, early_stop_patience=pol.patience)
            ppo_cfg.optim.lr = pol.lr
            ppo_cfg.value.optim.lr = pol.lr
            ppo_cfg.kl.beta = pol.kl_beta
            code = run_ppo(ppo_cfg)
        if code:
            raise KilterError(f"round {r}: the policy stage failed (see above)")
        return {"model": str(out / "final"), "algorithm": pol.algorithm}

    def _evaluate_models(self, models: dict[str, str], reward_model: str | None, out: Path) -> dict[str, dict]:
        from kilter.evaluation.evaluate import EvalConfig, evaluate_models

        eval_cfg = EvalConfig(models=models, reference="sft", reward_model=reward_model,
                              prompts=f"builtin:prompts_eval@{self.cfg.task_split}", max_prompts=self.cfg.eval_prompts, n_samples=2,
                              max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed, output_dir=str(out),
                              show_prompts=0, **self.cfg.policy.engine_fields())
        report = evaluate_models(eval_cfg, verbose=False)
        results = {}
        for m in report["models"]:
            metrics = dict(m["metrics"])
            metrics["agreement/heldout"] = heldout_agreement(m["samples"]) if reward_model else None
            metrics["kl/sqrt"] = math.sqrt(max(0.0, metrics.get("kl/ref") or 0.0))
            results[m["name"]] = metrics
        return results

    def _human_heldout(self, r: int, rm_path: str) -> dict:
        """The round's RM on the round's held-out human judgments: agreement, and calibration.json in eval/."""
        from kilter.models.reward import load_reward

        rows = _read_jsonl(self.round_dir(r) / "heldout.jsonl")
        if not rows:
            return {"agreement/human": None, "calibration/ece": None}
        rm = load_reward(rm_path)
        prompts = [x["prompt"] for x in rows]
        gaps = (rm.score(prompts, [x["chosen"] for x in rows]) - rm.score(prompts, [x["rejected"] for x in rows]))
        table = human_calibration(gaps.tolist())
        folder = self.round_dir(r) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "calibration.json", json.dumps(table, indent=2) + "\n")
        return {"agreement/human": float((gaps > 0).double().mean() + 0.5 * (gaps == 0).double().mean()),
                "calibration/ece": table["ece"], "calibration/pairs": len(rows),
                "calibration/source": "held-out human judgments"}

    def _evaluate(self, r: int) -> dict:
        rm = self.state.result(f"{r}:reward")["model"]
        metrics = self._evaluate_models({"sft": self.sft(), "policy": self.state.result(f"{r}:policy")["model"]},
                                        rm, self.round_dir(r) / "eval")["policy"]
        metrics.update(self._human_heldout(r, rm))
        first = _ppo_rows(self.round_dir(1) / "policy")[:1]
        anchor = first[0]["reward/gold"] if first and first[0]["kl/ref"] == 0 else None  # pi_0 on training prompts
        metrics.update(ppo_curve_fit([self.round_dir(rr) / "policy" for rr in range(1, r + 1)], anchor))
        collected = self.state.result(f"{r}:collect")
        exported = self.state.result(f"{r}:export")
        metrics.update({"round": r, "judgments": collected["judgments"], "pairs/round": exported["round_pairs"],
                        "pairs/train": exported["train_pairs"], "annotators/flagged": len(exported["flagged"]),
                        "agreement/alpha": exported["alpha"]})
        return metrics

    # ---- driver

    def run(self) -> int:
        cfg = self.cfg
        if cfg.mode == "people" and not cfg.members:
            print("kilter loop: people mode with no members: add annotators to the round projects with "
                  "`kilter project add-user` while the loop waits", file=sys.stderr)
        if self.state.data["stopped"]:
            print(f"kilter loop: stopped earlier ({self.state.data['stopped']}); nothing to do")
            return 0
        self.sft()
        baseline = run_stage(self.state, "baseline", self._baseline)
        print(f"kilter loop: pi_0 gold {baseline['reward/gold']:+.3f}")
        stages: dict[str, Callable[[int], Any]] = {
            "sample": self._sample, "publish": self._publish, "collect": self._collect, "export": self._export,
            "reward": self._reward, "policy": self._policy, "evaluate": self._evaluate}
        for r in range(1, cfg.rounds + 1):
            for name in STAGES:
                run_stage(self.state, f"{r}:{name}", lambda fn=stages[name], r=r: fn(r))
            self._write_metrics()
            metrics = self.state.result(f"{r}:evaluate")
            print(f"kilter loop: round {r}: gold {metrics['reward/gold']:+.3f} (pi_0 {baseline['reward/gold']:+.3f}), "
                  f"proxy {metrics.get('reward/rm') or float('nan'):+.3f}, sqrt(KL) {metrics['kl/sqrt']:.2f}, "
                  f"RM agreement with gold {_share(metrics.get('agreement/heldout'))} and with held-out people "
                  f"{_share(metrics.get('agreement/human'))}, names the product "
                  f"{_share(metrics.get('response/product_mention'))}, "
                  f"{metrics['judgments']} judgments, {metrics['annotators/flagged']} annotators flagged")
            warning = self._overoptimised(r)
            if warning:
                print(f"WARNING kilter loop: {warning}", file=sys.stderr)
                if cfg.early_stop:
                    self.state.data["stopped"] = f"round {r}: {warning}"
                    self.state.save()
                    break
        print(f"kilter loop: done; state in {self.state.path}; `kilter report {self.out}` draws it")
        return 0

    def rounds(self) -> list[dict]:
        return [self.state.result(f"{r}:evaluate") for r in range(1, self.cfg.rounds + 1)
                if self.state.is_done(f"{r}:evaluate")]

    def _overoptimised(self, r: int) -> str | None:
        rows = self.rounds()
        if rows and rows[-1].get("ppo/diverged"):
            return f"in round {r}'s PPO iterations the proxy reward rose while gold fell (over-optimisation?)"
        proxy = [x.get("reward/rm") or 0.0 for x in rows]
        for key in ("reward/gold", "agreement/heldout"):
            truth = [x.get(key) for x in rows]
            if None not in truth and divergence(proxy, truth, window=2):
                return f"proxy reward rose while {key} fell in round {r} (over-optimisation?)"
        return None

    def _write_metrics(self) -> None:
        """metrics.jsonl: pi_0 at step 0 and one row per finished round (rewritten whole: resume never repeats a row)."""
        rows = [{"step": 0, **self.state.result("baseline")}] + [{"step": x["round"], **x} for x in self.rounds()]
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def _share(x: float | None) -> str:
    """A rate as a percentage for the round line; '–' when there was nothing to measure."""
    return "–" if x is None else f"{x:.0%}"
