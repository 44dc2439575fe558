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
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kilter.commands.crowd import BrowserAnnotator, CrowdSection, crowd_members, work
from kilter.config import BaseConfig
from kilter.data.readers import write_jsonl
from kilter.data.sources import hold_out, load_records
from kilter.data.task import gold_score
from kilter.errors import ConfigError, KilterError
from kilter.evaluation.overoptimization import divergence, fit_gao
from kilter.feedback import analysis, export
from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store
from kilter.runs import atomic_write_text

STAGES = ("sample", "publish", "collect", "export", "reward", "policy", "evaluate")
STATE_VERSION = 1


class RewardSection(BaseConfig):
    """How the reward model is refreshed each round."""

    warm_start: bool = True
    """Start from the previous round's reward model (head included); false: from the SFT backbone every round."""
    old_data_weight: float = Field(1.0, ge=0, le=1)
    """Weight of earlier rounds' judgments: round r' of round r is subsampled to old_data_weight ** (r - r') (1: all)."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training comparisons."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate."""
    batch_size: int = Field(8, gt=0)
    """Prompts (each with its pair) per reward-model batch."""
    ensemble_size: int = Field(1, ge=1)
    """Reward models trained together; selection=active needs at least 2 (their disagreement picks the pairs)."""


class PolicySection(BaseConfig):
    """How the policy is updated each round."""

    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = "ppo"
    """ppo, rloo or grpo against the round's reward model, or dpo directly on the round's pairs (online DPO)."""
    iterations: int = Field(10, gt=0)
    """RL iterations per round (ppo, rloo, grpo)."""
    batch_size: int = Field(32, gt=0)
    """Prompts per RL iteration."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt in an RL rollout (rloo and grpo need at least 2)."""
    lr: float = Field(3e-4, gt=0)
    """Policy (and critic) learning rate."""
    kl_beta: float = Field(0.05, ge=0)
    """KL penalty coefficient to the SFT model (pi_0), every round."""
    dpo_beta: float = Field(0.1, gt=0)
    """DPO's beta (its implicit KL strength to the SFT model)."""
    dpo_epochs: float = Field(2.0, gt=0)
    """Passes over the round's pairs (dpo)."""


class LoopConfig(BaseConfig):
    """Rounds of sample -> people (or a simulated crowd) judge -> reward model -> policy update -> eval."""

    output_dir: str = "runs/loop"
    """Run directory: state.json, metrics.jsonl, sft/, round-N/ (samples, data, rm/, policy/, eval/)."""
    sft_model: str | None = None
    """pi_0 and the first sampler (an SFT run's final/); null: train the built-in tiny SFT model first (sft/)."""
    sft_steps: int = Field(150, gt=0)
    """Steps of the built-in SFT run when sft_model is null."""
    rounds: int = Field(3, gt=0)
    """Rounds of the loop."""
    prompts: str = "builtin:prompts"
    """Prompts the policy answers for people (a {prompt} JSONL file or builtin:prompts)."""
    prompts_per_round: int = Field(32, gt=0)
    """Prompts (hence pairs, unless selection=all) published per round."""
    k: int = Field(2, ge=2, le=16)
    """Responses the current policy samples per prompt."""
    snapshots: int = Field(0, ge=0)
    """Also let this many earlier policies answer each prompt once (a tournament; items pair different models)."""
    selection: Literal["all", "random", "active", "information"] = "all"
    """Which pairs to publish: every pair of a prompt's responses, one random pair per prompt, the pair the reward
    ensemble disagrees on most (active: std of the members' reward gaps), or the pair with the largest expected
    information gain (information: BALD mutual information of the members' Bradley-Terry probabilities)."""
    pool_factor: int = Field(3, ge=1)
    """random and active choose prompts_per_round prompts out of pool_factor times as many."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for the published responses."""
    max_new_tokens: int = Field(40, gt=0)
    """Longest response, in tokens (sampling, RL and evaluation)."""
    mode: Literal["simulated", "people", "both"] = "simulated"
    """Who judges: the simulated crowd through the app's pages, people in `kilter serve`, or both (crowd_share)."""
    crowd_share: float = Field(0.5, ge=0, le=1)
    """mode=both: the share of each round's quota the simulated crowd judges (rounded up); people judge the rest."""
    db: str | None = None
    """Feedback database (a SQLite path or a database URL; null: output_dir/feedback.db)."""
    project: str = "loop"
    """Projects are named PROJECT-r1, PROJECT-r2, ..."""
    members: list[str] = []
    """Existing accounts (people) added to every round's project (people and both modes)."""
    quota: int | None = Field(None, gt=0)
    """Judgments to wait for per round (null: every item of the round once, gold items not counted)."""
    overlap: int = Field(1, ge=1)
    """People who judge each item."""
    gold_items: int = Field(4, ge=0)
    """Extra items per round whose right answer is known (the built-in task's gold), for annotator quality."""
    gold_fraction: float = Field(0.15, ge=0, le=1)
    """Share of an annotator's tasks that are gold items."""
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of each round's comparisons held out of reward-model training: the round's RM is scored on them
    (held-out human agreement and calibration; 0: none)."""
    exclude_flagged: bool = True
    """Leave out the judgments of annotators the app flags (low gold accuracy or peer agreement)."""
    crowd: CrowdSection = CrowdSection()
    """The simulated annotators (simulated and both modes)."""
    poll_s: float = Field(5.0, gt=0)
    """Seconds between progress checks while people work."""
    reward: RewardSection = RewardSection()
    """Reward-model refresh."""
    policy: PolicySection = PolicySection()
    """Policy update."""
    eval_prompts: int = Field(32, gt=0)
    """Held-out prompts (builtin:prompts_eval) for each round's evaluation."""
    early_stop: bool = False
    """Stop the loop when the proxy reward rises while gold or held-out agreement falls (over-optimisation)."""
    seed: int = 0
    """Seed of every stage (round r uses seed + r where a stage needs its own)."""
    resume: bool = False
    """Continue the loop in output_dir from its state.json."""
    fresh: bool = False
    """Delete output_dir (and the database, when it is the default one inside it) and start again."""
    threads: int | None = Field(1, gt=0)
    """torch CPU threads (null: torch's default); one is fastest for the tiny model."""

    @property
    def db_url(self) -> str:
        return self.db or str(Path(self.output_dir) / "feedback.db")


def check_config(cfg: LoopConfig) -> None:
    """Combinations the field types cannot refuse on their own."""
    if cfg.selection in ("active", "information") and cfg.reward.ensemble_size < 2:
        raise ConfigError(f"selection={cfg.selection} needs reward.ensemble_size >= 2 (the ensemble's disagreement "
                          "picks pairs)")
    if cfg.policy.algorithm in ("rloo", "grpo") and cfg.policy.samples_per_prompt < 2:
        raise ConfigError(f"policy.algorithm={cfg.policy.algorithm} needs policy.samples_per_prompt >= 2")
    if cfg.crowd.trolls > cfg.crowd.size or cfg.crowd.noise_max < cfg.crowd.noise_min:
        crowd_members(cfg.crowd)  # raises the one-line error
    if cfg.resume and cfg.fresh:
        raise ConfigError("resume=true and fresh=true contradict each other; pass one")


# --------------------------------------------------------------------------- state


class LoopState:
    """state.json: where the loop is, what each finished stage produced, how often each stage started."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @classmethod
    def load_or_start(cls, cfg: LoopConfig) -> LoopState:
        out = Path(cfg.output_dir)
        path = out / "state.json"
        if cfg.fresh and out.exists():
            shutil.rmtree(out)
        if path.exists():
            if not cfg.resume:
                raise ConfigError(f"{out} already holds a loop (state.json); pass resume=true to continue it "
                                  "or fresh=true to start again")
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise KilterError(f"{path}: not valid JSON ({exc})") from None
            if data.get("version") != STATE_VERSION:
                raise KilterError(f"{path}: state version {data.get('version')!r}, this kilter writes {STATE_VERSION}")
            return cls(path, data)
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"version": STATE_VERSION, "done": {}, "started": {}, "rounds": {}, "policies": [],
                           "stopped": None})
        state.save()
        return state

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def is_done(self, key: str) -> bool:
        return key in self.data["done"]

    def result(self, key: str) -> Any:
        return self.data["done"][key]

    def start(self, key: str) -> None:
        self.data["started"][key] = self.data["started"].get(key, 0) + 1
        self.save()

    def finish(self, key: str, result: Any) -> None:
        self.data["done"][key] = result
        self.save()


def run_stage(state: LoopState, key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` unless ``key`` is recorded as done; record its result. The one place a stage runs."""
    if state.is_done(key):
        return state.result(key)
    print(f"== kilter loop: {key}", flush=True)
    round_, _, stage = key.rpartition(":")
    state.data["current"] = {"round": int(round_) if round_ else 0, "stage": stage}
    state.start(key)
    result = fn()
    state.finish(key, result)
    return result


# --------------------------------------------------------------------------- selection


def gap_spread(diffs: list[float]) -> float:
    """Standard deviation over ensemble members of their reward gaps r_i - r_j of one pair, (M,) -> scalar."""
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((x - mean) ** 2 for x in diffs) / len(diffs))


def _entropy(p: float) -> float:
    """Binary entropy in nats (0 at p = 0 or 1)."""
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0.0)


def information_gain(diffs: list[float]) -> float:
    """Expected information gain of one label on a pair about the reward model (BALD, Houlsby et al. 2011).

    The members' reward gaps ``diffs`` (M,) give Bradley-Terry probabilities p_m = sigmoid(r_i - r_j);
    with the ensemble as the posterior, the mutual information between the label y and the model is
    I = H(mean_m p_m) - mean_m H(p_m) (nats): high when members are each confident but disagree, zero
    when they agree, however unsure they are. Worked: gaps (+1, -1) -> p = (0.731, 0.269), H(0.5) = 0.693,
    H(0.731) = 0.582, I = 0.111; gaps (+10, +14) -> I ~ 0.
    """
    probs = [1.0 / (1.0 + math.exp(-d)) for d in diffs]
    return max(0.0, _entropy(sum(probs) / len(probs)) - sum(map(_entropy, probs)) / len(probs))


def disagreement_pairs(member_scores: list[list[list[float]]], n: int,
                       score: Callable[[list[float]], float] = gap_spread) -> list[tuple[int, int, int]]:
    """The ``n`` (prompt, i, j) pairs the reward ensemble is most unsure about, at most one per prompt.

    ``member_scores[p][r][m]``: member m's reward of response r to prompt p, shapes (P, K, M).
    ``score`` rates a pair from its members' gaps r_i - r_j: by default their standard deviation (how
    unsure the ensemble is about which is better, Christiano et al. 2017 section 2.2.4), or
    :func:`information_gain`. Each prompt offers its highest-scoring pair, and the prompts are taken in
    order of that score (ties: lower index).
    """
    best: list[tuple[float, int, int, int]] = []
    for p, responses in enumerate(member_scores):
        top: tuple[float, int, int, int] | None = None
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                value = score([a - b for a, b in zip(responses[i], responses[j])])
                if top is None or value > top[0]:
                    top = (value, p, i, j)
        if top is not None:
            best.append(top)
    best.sort(key=lambda t: (-t[0], t[1]))
    return [(p, i, j) for _, p, i, j in best[:n]]


def _weighted_rounds(rows_by_round: dict[int, list[dict]], current: int, weight: float, seed: int) -> list[dict]:
    """All rounds' comparisons, round r' kept with probability weight ** (current - r') (fixed by the seed)."""
    out: list[dict] = []
    for r, rows in sorted(rows_by_round.items()):
        keep = weight ** (current - r)
        rng = random.Random(f"loop-weight-{seed}-{current}-{r}")
        out.extend(row for row in rows if keep >= 1.0 or rng.random() < keep)
    return out


# --------------------------------------------------------------------------- the web app in a thread


@contextmanager
def serve_in_thread(db: str, loop_dir: str | None = None, order_seed: int | None = None) -> Iterator[str]:
    """The feedback app on a free localhost port for as long as the block runs; yields its base URL.

    ``order_seed`` makes the app's left/right shuffles reproducible (the crowd's labels then repeat within a seed).
    """
    import uvicorn

    from kilter.feedback.app import create_app
    from kilter.feedback.settings import ServeConfig

    app = create_app(ServeConfig(db=db, log_level="warning", loop_dir=loop_dir, order_seed=order_seed))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="kilter-loop-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise KilterError("the feedback app did not start in a thread (see the log above)")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


# --------------------------------------------------------------------------- the loop


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
                                                       max_new_tokens=cfg.max_new_tokens),
                                update=UpdateSection(epochs=2, num_minibatches=2), data=PPOData(n_eval=16),
                                eval_every=pol.iterations, sample_every=pol.iterations, n_samples=2,
                                save_every=max(1, pol.iterations // 2), tensorboard=False)
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
                              prompts="builtin:prompts_eval", max_prompts=self.cfg.eval_prompts, n_samples=2,
                              max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed, output_dir=str(out),
                              show_prompts=0)
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
                  f"held-out RM agreement {metrics['agreement/heldout'] or float('nan'):.0%}, "
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


def run(cfg: LoopConfig) -> int:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return Loop(cfg).run()
