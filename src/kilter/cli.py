"""Command-line entry point: ``kilter <command> [--config F.yaml] [key=value | --key value ...]``.

Commands are registered in :data:`COMMANDS` by dotted paths so that ``kilter --help``
imports nothing heavy.  A config command names its typed config class and a function
``run(cfg) -> int | None``; a raw command names ``main(argv) -> int | None`` and parses
its own arguments (used for command groups such as ``kilter project create``).
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import sys
import textwrap
from dataclasses import dataclass

from kilter.config import describe_fields, load_config
from kilter.errors import ConfigError, KilterError


@dataclass(frozen=True)
class Command:
    summary: str
    config: str | None = None  # "module:Class"
    run: str | None = None  # "module:function(cfg)"
    main: str | None = None  # "module:function(argv)" for commands that parse their own args


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "Run the built-in task end to end (SFT, labels, reward model, PPO, eval) and print before/after.",
        config="kilter.commands.demo:DemoConfig",
        run="kilter.commands.demo:run",
    ),
    "task": Command(
        "Write the built-in task's data files (corpus, demonstrations, prompts) to a folder.",
        config="kilter.data.task:TaskConfig",
        run="kilter.data.task:run",
    ),
    "sft": Command(
        "Supervised fine-tuning on demonstrations (phase 1).",
        config="kilter.trainers.sft:SFTConfig",
        run="kilter.trainers.sft:run",
    ),
    "label": Command(
        "Sample K responses per prompt from a model and label them with the simulated labeler (gold + noise).",
        config="kilter.commands.label:LabelConfig",
        run="kilter.commands.label:run",
    ),
    "rm": Command(
        "Train a reward model (Bradley-Terry on comparisons, K-way rankings or thumbs; ensembles; phase 2).",
        config="kilter.trainers.rm:RMConfig",
        run="kilter.trainers.rm:run",
    ),
    "ppo": Command(
        "RL fine-tuning against a reward with a KL penalty (algorithm: ppo, a2c, reinforce, rloo, grpo).",
        config="kilter.trainers.ppo:PPOConfig",
        run="kilter.trainers.ppo:run",
    ),
    "dpo": Command(
        "Direct preference optimisation on comparisons or rankings (sigmoid DPO, IPO, conservative DPO).",
        config="kilter.trainers.dpo:DPOConfig",
        run="kilter.trainers.dpo:run",
    ),
    "kto": Command(
        "Kahneman-Tversky optimisation on thumbs-up/down ratings {prompt, completion, label}.",
        config="kilter.trainers.kto:KTOConfig",
        run="kilter.trainers.kto:run",
    ),
    "distill": Command(
        "Context distillation: train a model without a context to match its own (or a teacher's) behaviour with it.",
        config="kilter.trainers.distill:DistillConfig",
        run="kilter.trainers.distill:run",
    ),
    "loop": Command(
        "Online iterated RLHF: rounds of sample -> people or a simulated crowd judge in the app -> RM -> policy -> eval.",
        config="kilter.commands.loop:LoopConfig",
        run="kilter.commands.loop:run",
    ),
    "report": Command(
        "One self-contained HTML report (plots, tables, samples) of any run directory or loop.",
        main="kilter.commands.report:main",
    ),
    "bon": Command(
        "Best-of-n / rejection sampling: sample n responses per prompt, score them, keep the best.",
        config="kilter.commands.bon:BonConfig",
        run="kilter.commands.bon:run",
    ),
    "vllm-serve": Command(
        "Serve a model with vLLM for rollout.engine=vllm-server: generation and weight pushes over HTTP.",
        config="kilter.rollout.vllm_server:VLLMServeConfig",
        run="kilter.rollout.vllm_server:run",
    ),
    "score": Command(
        "Score prompt/response pairs (or comparisons, reporting accuracy) with a reward model or ensemble.",
        config="kilter.commands.score:ScoreConfig",
        run="kilter.commands.score:run",
    ),
    "convert-hh": Command(
        "Convert Anthropic HH-style transcripts (chosen/rejected) into prompt/chosen/rejected JSONL.",
        config="kilter.data.convert:ConvertHHConfig",
        run="kilter.data.convert:run",
    ),
    "eval": Command(
        "Evaluate models on a prompt set: reward, gold, KL to a reference, win rate, BLEU/ROUGE; JSON + Markdown.",
        config="kilter.evaluation.evaluate:EvalConfig",
        run="kilter.evaluation.evaluate:run",
    ),
    "prepare-model": Command(
        "Materialize a model preset (e.g. smollm2-135m) as a cached safetensors folder.",
        config="kilter.models.presets:PrepareConfig",
        run="kilter.models.presets:run",
    ),
    "serve": Command(
        "Serve the human-feedback web app (compare, rank, rate, edit, write) on a SQLite or PostgreSQL database.",
        config="kilter.feedback.settings:ServeConfig",
        run="kilter.feedback.cli:serve",
    ),
    "project": Command(
        "Feedback projects: create, list, add-user, remove-user, import, status (run `kilter project --help`).",
        main="kilter.feedback.cli:project_main",
    ),
    "users": Command(
        "Feedback app accounts: add (with invite link), list, invite, set-password, deactivate, activate.",
        main="kilter.feedback.cli:users_main",
    ),
    "import": Command(
        "Import prompts and candidate responses (JSONL) into a feedback project.",
        config="kilter.feedback.cli:ImportConfig",
        run="kilter.feedback.cli:run_import",
    ),
    "sample": Command(
        "Generate K candidate responses per prompt from one or several models into a project or JSONL.",
        config="kilter.feedback.sampling:SampleConfig",
        run="kilter.feedback.sampling:run",
    ),
    "export": Command(
        "Export a feedback project's judgments as training JSONL (comparisons, rankings, ratings, demonstrations, raw).",
        config="kilter.feedback.cli:ExportConfig",
        run="kilter.feedback.cli:run_export",
    ),
    "control": Command(
        "RL from preferences on control tasks (gymnasium + stable-baselines3; synthetic or human clip labels), Christiano et al. 2017.",
        config="kilter.control.train:ControlConfig",
        run="kilter.control.train:run",
    ),
    "tamer": Command(
        "TAMER (Knox & Stone 2009): learn H(s,a) from +/- presses of a simulated trainer and act greedily on it.",
        config="kilter.control.tamer:TamerConfig",
        run="kilter.control.tamer:run",
    ),
    "tamer-live": Command(
        "TAMER with a person: a web page plays the environment live and takes +/- key presses.",
        config="kilter.feedback.tamer_live:TamerLiveConfig",
        run="kilter.feedback.tamer_live:run",
    ),
    "clips-sync": Command(
        "Feed a waiting `kilter control labeler.kind=human` run: import its query clips into a clips project, write answers back.",
        config="kilter.feedback.clips:ClipSyncConfig",
        run="kilter.feedback.clips:run",
    ),
    "leaderboard": Command(
        "Rate a project's models from pairwise battles: Bradley-Terry with bootstrap intervals, and Elo.",
        config="kilter.feedback.cli:LeaderboardConfig",
        run="kilter.feedback.cli:run_leaderboard",
    ),
}


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _command_help(name: str, cmd: Command) -> str:
    lines = [f"usage: kilter {name} [--config FILE.yaml] [key=value | --key value ...]", "", cmd.summary, ""]
    cls = _load(cmd.config)
    if cls.__doc__:
        lines += [inspect.cleandoc(cls.__doc__), ""]
    lines.append("options (nested keys use dots, e.g. optim.lr=1e-4):")
    for key, typ, default, doc in describe_fields(cls):
        lines.append(f"  {key}  ({typ}, {default})" if default == "required" else f"  {key}  ({typ}, default {default})")
        for chunk in textwrap.wrap(doc, 90) or ["(no description)"]:
            lines.append(f"      {chunk}")
    return "\n".join(lines)


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {c.summary}" for n, c in COMMANDS.items())
    return (
        "usage: kilter <command> [--config FILE.yaml] [key=value ...]\n\n"
        "Kilter: reinforcement learning from human feedback, end to end.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `kilter <command> --help` for every option of a command, its meaning and default."
    )


_FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
              errno.EEXIST}
"""File-system errors a user can fix (free space, permissions, a path that is a file): one line, exit 2."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_top_help())
        return 0
    if argv[0] in {"-V", "--version"}:
        from kilter import __version__

        print(f"kilter {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"kilter: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if cmd.main is not None:
            result = _load(cmd.main)(rest)
            return int(result or 0)
        if any(a in {"-h", "--help"} for a in rest):
            print(_command_help(name, cmd))
            return 0
        config_path = None
        overrides: list[str] = []
        i = 0
        while i < len(rest):
            arg = rest[i]
            if arg == "--config" or arg == "-c":
                if i + 1 >= len(rest):
                    raise ConfigError("--config needs a file path")
                config_path = rest[i + 1]
                i += 2
                continue
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
            else:
                overrides.append(arg)
            i += 1
        cfg = load_config(_load(cmd.config), config_path, overrides)
        result = _load(cmd.run)(cfg)
        return int(result or 0)
    except KilterError as exc:
        if os.environ.get("KILTER_DEBUG"):
            raise
        print(f"kilter {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # disk full, a read-only or file-valued output_dir, permissions: the OS's own words, in one line
        if os.environ.get("KILTER_DEBUG") or exc.errno not in _FS_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"kilter {name}: error: {exc.strerror or exc}{where}; what was saved before is intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kilter {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
