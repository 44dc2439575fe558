"""Fuzz every command with bad configs and every data-reading command with bad data files (seeded).

Each generated input is bad for sure -- a config value is checked to fail the command's own config
class before it is used, a config file or argument list is broken in a way YAML or the grammar
refuses, a data file holds one row that no record kind accepts -- and every one must end in exit 2
with one ``kilter <command>: error:`` line naming what is wrong and no traceback.  The counts of
what was tried are printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kilter.cli import COMMANDS, _load, main

SEED = 19
CONFIG_COMMANDS = [name for name, cmd in COMMANDS.items() if cmd.config]
BASE = {"convert-hh": ["input=a.jsonl", "output=b.jsonl"]}
"""What a command requires, so that the error reported first is the generated one."""


def _check(capsys, code: int, what: str, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, f"{what}: exit {code}\n{err[-1500:]}"
    assert len(errors) == 1 and "Traceback" not in err, f"{what}:\n{err[-1500:]}"
    assert all(n in errors[0] for n in needles), f"{what}: {errors[0]!r} does not name {needles}"
    return errors[0]


# ------------------------------------------------------------------ configs


def _leaf_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append((prefix + name, ann))
    return out


CANDIDATES = ["abc", "1.5", "-7", "0", "nan", "inf", "-inf", "1e999", "[1, 2]", "{a: 1}", "''", "[]", "null",
              "true", "'2024-01-01'", "[[[]]]", "{x: {y: z}}", "\u2603", "-1e-30", "99999999999999999999999"]


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _is_bad(cls: type[BaseModel], key: str, text: str, base: list[str]) -> bool:
    """True when ``key=text`` makes ``cls`` invalid (so the command must refuse it)."""
    from kilter.config import load_config  # parses and validates exactly as the CLI does

    try:
        load_config(cls, None, [*base, f"{key}={text}"])
    except Exception:  # noqa: BLE001 -- any refusal counts: the CLI must turn it into one line
        return True
    return False


def _config_cases(rng: random.Random) -> list[tuple[str, list[str], str]]:
    """(command, argv, the key the error must name) for bad values of every command's fields."""
    cases = []
    for command in CONFIG_COMMANDS:
        cls = _load(COMMANDS[command].config)
        fields = _leaf_fields(cls)
        for key, _ in rng.sample(fields, min(len(fields), 8)):
            for text in rng.sample(CANDIDATES, 4):
                if _is_bad(cls, key, text, BASE.get(command, [])):
                    cases.append((command, [*BASE.get(command, []), f"{key}={text}"], key.split(".")[-1]))
        # keys that do not exist, at the top and inside a section
        sections = [k.rsplit(".", 1)[0] for k, _ in fields if "." in k]
        base = BASE.get(command, [])
        cases.append((command, [*base, f"no_such_key_{rng.randrange(1000)}=1"], "no_such_key"))
        if sections:
            cases.append((command, [*base, f"{rng.choice(sections)}.bogus=1"], "bogus"))
    return cases


def _broken_argv(rng: random.Random) -> list[tuple[str, list[str], str]]:
    """Argument lists the grammar refuses: no '=', an empty key, a section given a scalar, a value given keys."""
    cases = []
    for command in CONFIG_COMMANDS:
        cls = _load(COMMANDS[command].config)
        fields = _leaf_fields(cls)
        scalar = rng.choice([k for k, ann in fields if ann in (int, float)] or [fields[0][0]])
        sections = sorted({k.split(".")[0] for k, _ in fields if "." in k})
        argv = [(["justaword"], "justaword"), (["=1"], "empty key"), (["--config"], "--config"),
                ([f"{scalar}.deeper=1"], scalar.split(".")[-1])]
        if sections:
            argv.append(([f"{rng.choice(sections)}=3"], ""))
        ints = [k for k, ann in fields if ann is int]
        if ints:
            argv.append(([f"--{rng.choice(ints)}"], "needs a value"))
        cases += [(command, a, needle) for a, needle in argv]
    return cases


def _broken_config_files(rng: random.Random, folder: Path) -> list[tuple[str, list[str], str]]:
    """YAML files broken for sure: duplicate keys, tabs, unclosed quotes/brackets, non-UTF-8, wrong top level."""
    cases = []
    for i, command in enumerate(CONFIG_COMMANDS):
        cls = _load(COMMANDS[command].config)
        text = yaml.safe_dump(cls().model_dump(mode="json"), sort_keys=False) if command != "convert-hh" else \
            "input: a.jsonl\noutput: b.jsonl\n"
        lines = text.splitlines()
        top = [line for line in lines if line and not line.startswith(" ") and ":" in line]
        line = rng.choice(top)
        key = line.split(":")[0]
        broken = {
            "duplicate": (text + line + "\n", f"'{key}' is given twice"),
            "tab": ("\t" + text, "not valid YAML"),
            "quote": (text + f"{key}: \"unclosed\n", "not valid YAML"),
            "bracket": (text + "extra: [1, 2\n", "not valid YAML"),
            "alias": (text + "extra: *nowhere\n", "not valid YAML"),
            "tag": (text + "extra: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
            "list": ("- 1\n- 2\n", "mapping"),
            "scalar": ("just words\n", "mapping"),
        }
        for kind in rng.sample(sorted(broken), 4):
            body, needle = broken[kind]
            path = folder / f"{command}-{kind}-{i}.yaml"
            path.write_text(body, encoding="utf-8")
            cases.append((command, ["--config", str(path)], needle))
        latin = folder / f"{command}-latin1.yaml"
        latin.write_bytes(text.encode("utf-8") + "note: caf\xe9\n".encode("latin-1"))
        cases.append((command, ["--config", str(latin)], "not UTF-8"))
        cases.append((command, ["--config", str(folder / "missing.yaml")], "not found"))
    return cases


RAW = [("report", ["/no/such/run"], "no such run directory"), ("report", ["--bogus"], "--bogus"),
       ("project", ["bogus"], "invalid choice"), ("project", ["create"], "required"),
       ("project", ["status", "p", "--bogus-flag"], "bogus"), ("users", ["bogus"], "invalid choice"),
       ("users", ["add"], "username")]
"""The commands that parse their own arguments (argparse): bad arguments are one line too."""


def test_fuzz_configs_of_every_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that got past its config would write here, not in the repo
    rng = random.Random(SEED)
    cases = _config_cases(rng) + _broken_argv(rng) + _broken_config_files(rng, tmp_path) + RAW
    tried: Counter = Counter()
    for command, argv, needle in cases:
        _check(capsys, main([command, *argv]), f"kilter {command} {' '.join(argv)}", needle)
        tried[command] += 1
    print(f"\nconfig fuzz: {sum(tried.values())} bad inputs over {len(tried)} commands: "
          + ", ".join(f"{c} {n}" for c, n in sorted(tried.items())))
    assert len(tried) == len(CONFIG_COMMANDS) + 3 and sum(tried.values()) > 500


# ------------------------------------------------------------------ data files

DEMO = {"prompt": "Describe the lamp.", "completion": "A bright lamp."}
PAIR = {"prompt": "Describe the lamp.", "chosen": "A bright lamp.", "rejected": "Lamp."}
RANKING = {"prompt": "Describe the lamp.", "responses": ["A bright lamp.", "Lamp.", "A lamp."], "ranks": [1, 3, 2]}
THUMB = {"prompt": "Describe the lamp.", "completion": "A bright lamp.", "label": True}
PROMPT = {"prompt": "Describe the lamp."}

BAD_TEXT = [None, 123, 1.5, True, {}, [], [1, 2], "", "   \n", {"role": "user"}, [{"role": "bogus", "content": "x"}],
            [{"content": "x"}], [{"role": "user", "content": 7}], float("nan")]
BAD_FIELDS = {
    "label": [None, "yes", 2, [], {}, 0.5],
    "ranks": [None, [1], [1, 2, 3, 4], [0, 1, 2], [1, -1, 2], ["1", "2", "3"], [1.5, 2, 3], "1,2,3"],
    "responses": [None, "one", ["only one"], ["same", "same", "other"], [1, 2, 3], {}],
    "strength": ["strong", 1.5, -0.1, [], float("nan")],
}


def _bad_rows(good: dict, rng: random.Random) -> list[tuple[dict, str]]:
    """Rows that no record kind accepts in place of ``good``: a field dropped, or set to a value of the wrong kind."""
    out = []
    for field in good:
        if field == "chosen" or field == "rejected" or field in ("prompt", "completion"):
            values = BAD_TEXT
        else:
            values = BAD_FIELDS[field]
        for value in rng.sample(values, min(3, len(values))):
            out.append(({**good, field: value}, field))
        if field != "prompt" or "chosen" not in good:
            out.append(({k: v for k, v in good.items() if k != field}, field))
    return out


def _write_rows(path: Path, rows: list[Any], style: str) -> None:
    if style == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")


def _broken_files(folder: Path, good: dict) -> list[tuple[Path, str]]:
    """Files broken as files: not JSON, cut short, binary, empty, the wrong extension, not UTF-8, bad Parquet."""
    line = json.dumps(good)
    files = {
        "not-json.jsonl": (f"{line}\n{{prompt: oops}}\n", "not valid JSON"),
        "cut.jsonl": (f"{line}\n{line[: len(line) // 2]}\n", "not valid JSON"),
        "array-line.jsonl": (f"{line}\n[1, 2]\n", "expected an object"),
        "empty.jsonl": ("", "no "),
        "blank.jsonl": ("\n\n  \n", "no "),
        "top-number.json": ("42", "expected a JSON list"),
        "cut.json": (f"[{line}, {line[:10]}", "not valid JSON"),
        "data.txt": (line, "unsupported file extension"),
        "data": (line, "unsupported file extension"),
    }
    out = []
    for name, (body, needle) in files.items():
        (folder / name).write_text(body, encoding="utf-8")
        out.append((folder / name, needle))
    (folder / "latin1.jsonl").write_bytes((json.dumps({**good, "prompt": "caf\xe9"}, ensure_ascii=False) + "\n")
                                          .encode("latin-1"))
    out.append((folder / "latin1.jsonl", "not UTF-8"))
    (folder / "garbage.parquet").write_bytes(os.urandom(512))
    out.append((folder / "garbage.parquet", "Parquet"))
    (folder / "folder").mkdir()
    out.append((folder / "folder", "save_to_disk"))
    out.append((folder / "missing.jsonl", "not found"))
    return out


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A one-step reward model on the micro backbone: what score/bon/eval need to reach their data."""
    out = tmp_path_factory.mktemp("fuzz-rm") / "rm"
    data = out.parent / "pairs.jsonl"
    _write_rows(data, [{**PAIR, "prompt": f"Describe lamp {i}."} for i in range(4)], "jsonl")
    assert main(["rm", "model=builtin:micro", f"data.train={data}", f"output_dir={out}", "max_steps=1",
                 "batch_size=2", "n_samples=0", "tensorboard=false", "threads=1"]) == 0
    return out / "final"


def _readers(tmp: Path, reward_model: Path) -> dict[str, tuple[list[str], str, list[dict]]]:
    """command -> (argv before the data key, the data key, the good rows a file of it holds)."""
    micro = "model=builtin:micro"
    return {
        "sft": (["sft", micro, "data.eval=null", "max_steps=1", "n_samples=0"], "data.train", [DEMO]),
        "rm/comparisons": (["rm", micro, "max_steps=1", "n_samples=0"], "data.train", [PAIR]),
        "rm/rankings": (["rm", micro, "max_steps=1", "n_samples=0"], "data.train", [RANKING]),
        "rm/thumbs": (["rm", micro, "max_steps=1", "n_samples=0"], "data.train", [THUMB]),
        "dpo": (["dpo", micro, "max_steps=1", "samples.n=0"], "data.train", [PAIR]),
        "kto": (["kto", micro, "max_steps=1", "samples.n=0"], "data.train", [THUMB]),
        "ppo": (["ppo", micro, "iterations=1", "reward.function=builtin:gold", "n_samples=0"], "data.prompts",
                [PROMPT]),
        "distill": (["distill", micro, "max_steps=1", "context=Be brief."], "data.train", [PROMPT]),
        "bon": (["bon", micro, "reward_fn=kilter.data.task:gold_scores"], "prompts", [PROMPT]),
        "eval": (["eval", "models=[builtin:micro]"], "prompts", [PROMPT]),
        "label": (["label", micro], "prompts", [PROMPT]),
        "score": (["score", f"model={reward_model}"], "input", [THUMB]),
    }


def test_fuzz_data_files_of_every_reading_command(tmp_path, capsys, reward_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED)
    tried: Counter = Counter()
    for reader, (argv, key, good_rows) in _readers(tmp_path, reward_model).items():
        folder = tmp_path / reader.replace("/", "-")
        folder.mkdir()
        good = good_rows[0]
        cases: list[tuple[Path, Any]] = []
        bad_rows = _bad_rows(good, rng)
        for n, (row, field) in enumerate(rng.sample(bad_rows, min(len(bad_rows), 9))):
            style = rng.choice(["jsonl", "json"])
            rows = [{**good, "prompt": f"Describe lamp {i}."} for i in range(3)]
            at = rng.randrange(1, 4)
            rows.insert(at, row)  # the first row is sound: the kind of the file is judged from it
            path = folder / f"row-{n}.{style}"
            _write_rows(path, rows, style)
            cases.append((path, (f"{path}:{at + 1}" if style == "jsonl" else f"{path}:record {at + 1}", field)))
        cases += [(path, (str(path), needle)) for path, needle in _broken_files(folder, good)]
        for path, needles in cases:
            what = f"kilter {' '.join(argv)} {key}={path} ({path.read_text(errors='replace')[:300] if path.is_file() else ''})"
            _check(capsys, main([*argv, f"{key}={path}", f"output_dir={folder / 'out'}", "threads=1"]
                               if "output_dir" in _fields(argv[0]) else [*argv, f"{key}={path}", "threads=1"]),
                   what, *((needles,) if isinstance(needles, str) else needles))
            tried[reader] += 1
    print(f"\ndata fuzz: {sum(tried.values())} bad files over {len(tried)} readers: "
          + ", ".join(f"{c} {n}" for c, n in sorted(tried.items())))
    assert len(tried) == 12 and sum(tried.values()) > 200


def _fields(command: str) -> set[str]:
    return set(_load(COMMANDS[command].config).model_fields)


# ------------------------------------------------------------------ in a real process


@pytest.mark.parametrize("argv", [["sft", "optim.betas=[1.5,2.0]"], ["control", "agent.device=quantum"]])
def test_a_real_process_prints_exactly_one_line(argv, tmp_path):
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "kilter", *argv, f"output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"kilter {argv[0]}: error: "), done.stderr
