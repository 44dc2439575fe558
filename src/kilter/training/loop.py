"""The parts of a training loop every trainer shares, so that each trainer's loop reads top to bottom.

- :class:`StepPlan`: how many optimizer steps a run takes and which examples each process
  uses at each step (the epoch order is a pure function of seed and epoch, so resume is exact).
- :class:`Stepper`: the optimizer and its schedule: clip, step, schedule, zero; resume; checkpoint.
- :class:`MetricWindow`: sums of a trainer's statistics between two log rows, reduced across
  processes once when the row is written, and the row's throughput figures.
- :func:`due`: the log/eval/save cadence; :func:`finish`: ``final/``, the summary line, closing.

A trainer's loop is then::

    plan = StepPlan(lengths, cfg, info, "pairs")
    stepper, start = start_training(cfg, model, plan.total_steps, run_dir, existing, say)
    window = MetricWindow(info)
    for step in range(start, plan.total_steps):
        for k, idx in enumerate(plan.micro_batches(step)): ...forward, loss, backward...; window.add(...)
        grad_norm = stepper.step()
        done = step + 1
        if due(done, cfg.log_every, plan.total_steps): run_dir.log(done, window.read() ...)
        ...
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kilter.data.collate import shard_indices
from kilter.distributed import DistInfo, all_reduce_sum, barrier
from kilter.errors import ConfigError
from kilter.runs import RunDir
from kilter.training.batching import epoch_batches, micro_batches
from kilter.training.checkpoint import resume_from, save_checkpoint, save_final
from kilter.training.optim import clip_and_norm, make_optimizer, make_scheduler
from kilter.training.parallel import gathered
from kilter.training.samples import log_samples


def due(done: int, every: int, total: int) -> bool:
    """True every ``every`` steps and at the last step (``done`` counts finished steps)."""
    return done % every == 0 or done == total


class StepPlan:
    """The run's length in optimizer steps and each process's examples at every step.

    ``lengths`` holds one length per training example (used to batch similar lengths together
    when ``by_length``); ``what`` names the examples in the error for a data set smaller than one
    global batch (batch_size x grad_accum x processes).
    """

    def __init__(self, lengths: list[int], cfg, info: DistInfo, what: str, *, seed: int | None = None,
                 by_length: bool | None = None) -> None:
        self.lengths = lengths
        self.info = info
        self.grad_accum = cfg.grad_accum
        self.seed = cfg.seed if seed is None else seed
        self.by_length = cfg.data.group_by_length if by_length is None else by_length
        self.global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        self.steps_per_epoch = len(lengths) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.train has {len(lengths)} {what}, fewer than one global batch of "
                              f"{self.global_batch} (batch_size x grad_accum x processes); lower batch_size")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self._epoch: tuple[int, list[list[int]]] | None = None

    def indices(self, step: int) -> list[int]:
        """This process's share of the global batch of optimizer step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.lengths, self.global_batch, self.seed, epoch, self.by_length))
        return shard_indices(self._epoch[1][position], self.info.rank, self.info.world_size)

    def micro_batches(self, step: int) -> list[list[int]]:
        """:meth:`indices` cut into grad_accum micro-batches."""
        return micro_batches(self.indices(step), self.grad_accum)

    def epoch(self, done: int) -> float:
        """Epochs completed after ``done`` steps (the progress/epoch metric)."""
        return done / self.steps_per_epoch


@dataclass
class Stepper:
    """One optimizer step: clip the gradient norm, step, advance the schedule, clear the gradients."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None
    state: Callable[[], dict] | None = None
    """A trainer's own state for every checkpoint (called on every process); ``restored`` holds it after a resume."""
    restored: dict = field(default_factory=dict)

    def step(self) -> float:
        """Apply the accumulated gradients; returns the gradient norm before clipping."""
        grad_norm = clip_and_norm(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir: RunDir, done: int, tokenizer, keep: int | None, trainer: str) -> None:
        save_checkpoint(run_dir, done, self.model, tokenizer, self.optimizer, self.scheduler, keep, trainer,
                        self.state() if self.state is not None else None)

    def end_of_step(self, run_dir: RunDir, done: int, total: int, cfg, tokenizer, trainer: str,
                    last: dict[str, float], evaluate: Callable[[], dict[str, float]] | None = None) -> None:
        """After step ``done``: :func:`evaluate_if_due` (when there is something to evaluate), then
        :meth:`save_if_due`; the cadence every step-based trainer shares."""
        if evaluate is not None:
            evaluate_if_due(run_dir, done, total, cfg.eval_every, evaluate, last)
        self.save_if_due(run_dir, done, total, cfg, tokenizer, trainer)

    def save_if_due(self, run_dir: RunDir, done: int, total: int, cfg, tokenizer, trainer: str) -> None:
        """A checkpoint every cfg.save_every steps and at the last one (keeping cfg.keep_checkpoints)."""
        if due(done, cfg.save_every, total):
            self.save(run_dir, done, tokenizer, cfg.keep_checkpoints, trainer)


def start_training(cfg, model: torch.nn.Module, total_steps: int, run_dir: RunDir, existing,
                   say: Callable[[str], None]) -> tuple[Stepper, int]:
    """The optimizer and schedule for ``total_steps``, restored from ``existing`` (a checkpoint to
    resume from, or None); writes config.yaml. Returns the stepper and the first step to run."""
    optimizer = make_optimizer(model, cfg.optim)
    stepper = Stepper(model, optimizer, make_scheduler(optimizer, cfg.optim, total_steps), cfg.optim.max_grad_norm)
    start = 0
    if existing is not None:
        start = resume_from(existing, run_dir, model, stepper.optimizer, stepper.scheduler, stepper.restored)
        say(f"resumed from {existing} at step {start}/{total_steps}")
    run_dir.write_config(cfg)
    return stepper, start


class MetricWindow:
    """Named sums between two log rows, summed over processes once, when the row is read.

    Every process must add the same names in the same order (trainers' loops are symmetric) and
    call :meth:`read` at the same steps.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.sums: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, **values: float | torch.Tensor) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def read(self) -> tuple[dict[str, float], float]:
        """(the sums over every process, seconds since the window opened); the window starts anew."""
        names = list(self.sums)
        totals = all_reduce_sum(torch.tensor([self.sums[n] for n in names], dtype=torch.float64), self.info)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.sums = {}
        self.start = time.perf_counter()
        return dict(zip(names, totals.tolist())), elapsed


def evaluate_if_due(run_dir: RunDir, done: int, total: int, every: int, evaluate: Callable[[], dict[str, float]],
                    last: dict[str, float]) -> None:
    """Every ``every`` steps and at the last: run ``evaluate``, log its metrics at ``done``, add them to ``last``."""
    if due(done, every, total):
        metrics = evaluate()
        run_dir.log(done, metrics)
        last.update(metrics)


def finish(run_dir: RunDir, info: DistInfo, tag: str, model, tokenizer, merge_lora: bool, last: dict[str, float],
           shown: tuple[str, ...], after: Callable[[], dict[str, float]] | None = None,
           samples: tuple | None = None) -> int:
    """Save ``final/``, then on the main process run ``after`` (its metrics join the summary), or
    log the samples after training (``samples`` = (last step, prompts, sample section, seed,
    reward function), see :func:`kilter.training.samples.log_samples`), print the summary line of the ``shown``
    metrics, close the run."""
    save_final(run_dir, model, tokenizer, merge_lora)  # under FSDP: gathered on rank 0 first
    barrier(info)
    with gathered(model):  # a collective under FSDP: every process enters, the main one samples
        if info.is_main and after is not None:
            last.update(after())
        if info.is_main and samples is not None:
            step, *rest = samples
            last.update(log_samples(run_dir, step, "after", model, tokenizer, *rest))
    if info.is_main:
        summary = ", ".join(f"{k}={last[k]:.4g}" for k in shown if k in last)
        print(f"kilter {tag}: done ({summary}); model in {run_dir.final}")
    run_dir.close()
    return 0
