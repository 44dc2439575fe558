"""The feedback commands: kilter project | users | import | export | leaderboard | serve --help."""

import io
import json

import pytest

from kilter.cli import main
from kilter.data.records import validate_record
from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store
from kilter.feedback.tasks import parse_submission


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "cli.db")


def arena_file(tmp_path):
    rows = [{"prompt": f"question {i}", "id": f"q{i}",
             "responses": [{"text": f"{m} says {i}", "model": m, "sampling": {"temperature": 0.8}}
                           for m in ("weak", "strong", "medium")]} for i in range(5)]
    return write_jsonl(tmp_path / "arena.jsonl", rows)


def judge_all(db, project_name, username):
    """Someone who always prefers strong > medium > weak, with a clear margin."""
    store = Store(db)
    project = store.project(project_name)
    user = next(u for u in store.users() if u.username == username)
    order = {"strong": 0, "medium": 1, "weak": 2}
    while (view := store.next_task(project, user)) is not None:
        left, right = view.responses
        choice = "A3" if order[left.model] < order[right.model] else "B3"
        store.submit(project, user, view.assignment_id,
                     lambda shown, c=choice: parse_submission("pairwise", lambda n: {"choice": [c]}.get(n, []), shown))
    store.close()


def test_project_users_import_export_leaderboard(capsys, tmp_path, db, monkeypatch):
    code, out, _ = run(capsys, "project", "create", "arena", "--task", "pairwise", "--title", "Model arena", "--db", db)
    assert code == 0 and "created project arena (pairwise, overlap 1)" in out
    code, out, _ = run(capsys, "users", "add", "ann", "--invite", "--project", "arena", "--db", db,
                       "--base-url", "https://label.example.org")
    assert code == 0 and "invite link: https://label.example.org/invite/" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-password\n"))
    code, out, _ = run(capsys, "users", "add", "root", "--role", "admin", "--password-stdin", "--db", db)
    assert code == 0 and "created admin root" in out and "invite" not in out
    code, out, _ = run(capsys, "import", "--project", "arena", "--file", arena_file(tmp_path), "--db", db)
    # 5 prompts x 3 models -> 3 cross-model pairs each
    assert code == 0 and "imported 5 prompts, 15 responses -> 15 items (0 gold) into arena" in out

    judge_all(db, "arena", "ann")

    code, out, _ = run(capsys, "project", "list", "--db", db)
    assert code == 0 and out.splitlines()[1].split() == ["arena", "pairwise", "1", "15/15", "15", "1"]
    code, out, _ = run(capsys, "project", "status", "arena", "--json", "--db", db)
    status = json.loads(out)
    assert status["judgments"] == 15 and status["annotators"][0]["name"] == "ann"

    code, out, _ = run(capsys, "leaderboard", "--project", "arena", "--bootstrap", "50", "--db", db)
    assert code == 0
    models = [line.split()[1] for line in out.splitlines()[1:] if not line.startswith("note:")]
    assert models == ["strong", "medium", "weak"]
    assert "note: fewer than 30 battles (wide intervals): medium, strong, weak" in out
    code, out, _ = run(capsys, "leaderboard", "--project", "arena", "--format", "json", "--bootstrap", "0", "--db", db)
    rows = json.loads(out)
    assert [r["model"] for r in rows] == ["strong", "medium", "weak"]
    assert rows[0]["wins"] == 10 and rows[0]["losses"] == 0 and rows[2]["win_rate"] == 0.0

    out_dir = tmp_path / "export"
    code, out, _ = run(capsys, "export", "--project", "arena", "--out", str(out_dir), "--db", db)
    assert code == 0 and "wrote 15 comparisons records" in out and "wrote 15 raw records" in out
    comparisons = [json.loads(x) for x in (out_dir / "comparisons.jsonl").read_text().splitlines()]
    for row in comparisons:
        validate_record(row, "comparison")
        assert row["strength"] == 0.75
        assert ("strong" in row["chosen"]) or ("medium" in row["chosen"] and "weak" in row["rejected"])
    single = tmp_path / "train.jsonl"
    code, _, _ = run(capsys, "export", "--project", "arena", "--kind", "auto", "--out", str(single), "--db", db)
    assert code == 0 and len(single.read_text().splitlines()) == 15


@pytest.mark.parametrize("argv, message", [
    (["project", "create", "x", "--task", "vote"], "invalid choice: 'vote'"),
    (["project", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["project", "add-user", "nope", "ann"], "no project named 'nope'"),
    (["users", "invite", "ghost"], "no user named 'ghost'"),
    (["export", "--project", "nope", "--out", "x"], "no project named 'nope'"),
    (["export", "--project", "p", "--out", "x", "--aggregate", "median"], "aggregate"),
    (["export", "--out", "x"], "config key 'project' is required"),
    (["leaderboard"], "config key 'project' is required"),
    (["import", "--project", "p", "--file", "missing.jsonl"], "missing.jsonl: file not found"),
    (["sample", "--prompts", "p.jsonl"], "config key 'models' is required"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, db, argv, message):
    code, _, err = run(capsys, *argv, "--db", db)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_import_errors_name_the_line_and_field(capsys, tmp_path, db):
    run(capsys, "project", "create", "rk", "--task", "ranking", "--db", db)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "responses": ["x", "y"]}, {"prompt": "b", "responses": ["x"]}])
    code, _, err = run(capsys, "import", "--project", "rk", "--file", bad, "--db", db)
    assert code == 2 and "bad.jsonl line 2: field 'responses': a ranking project needs 2 to 9 responses" in err


def test_import_of_a_latin1_file_is_one_line_and_exit_code_2(capsys, tmp_path, db):
    run(capsys, "project", "create", "pw", "--task", "pairwise", "--db", db)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "café", "responses": ["a", "b"]}\n'.encode("latin-1"))
    code, _, err = run(capsys, "import", "--project", "pw", "--file", str(path), "--db", db)
    assert code == 2 and "latin1.jsonl line 1: not UTF-8 text" in err and len(err.strip().splitlines()) == 1


def test_users_add_is_all_or_nothing(capsys, db):
    code, _, err = run(capsys, "users", "add", "henry", "--project", "nosuch", "--db", db)
    assert code == 2 and "no project named 'nosuch'" in err
    code, out, _ = run(capsys, "users", "list", "--db", db)
    assert "henry" not in out
    code, _, err = run(capsys, "users", "add", "henry\n", "--db", db)
    assert code == 2 and "username" in err


def test_api_tokens_from_the_cli(capsys, db):
    run(capsys, "users", "add", "bot", "--db", db)
    code, out, _ = run(capsys, "users", "token", "bot", "--name", "online-loop", "--db", db)
    token = out.strip()
    assert code == 0 and token.startswith("klt_")
    store = Store(db)
    assert store.api_token_user(token).username == "bot"
    store.close()
    code, out, _ = run(capsys, "users", "revoke-tokens", "bot", "--db", db)
    assert code == 0 and "revoked 1" in out


def test_leaderboard_refuses_tasks_without_battles(capsys, db):
    run(capsys, "project", "create", "th", "--task", "rating", "--db", db)
    code, _, err = run(capsys, "leaderboard", "--project", "th", "--db", db)
    assert code == 2 and "leaderboards need pairwise or ranking" in err


@pytest.mark.parametrize("command, expected", [
    ("serve", "secure_cookies"), ("export", "aggregate"), ("import", "file"), ("leaderboard", "bootstrap"),
    ("sample", "max_new_tokens"), ("project", "add-user"), ("users", "set-password"),
])
def test_help(capsys, command, expected):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and expected in out


def test_project_subcommand_help(capsys):
    code, out, _ = run(capsys, "project", "create", "--help")
    assert code == 0 and "--overlap" in out and "--gold-fraction" in out


def test_db_from_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KILTER_DB", str(tmp_path / "env.db"))
    assert run(capsys, "project", "create", "e", "--task", "demonstration")[0] == 0
    assert (tmp_path / "env.db").exists()


def test_every_exported_file_reads_with_the_trainers_readers(capsys, tmp_path, db):
    """kilter export writes only rows that kilter sft | rm | dpo | kto accept (issue 18, defect 3)."""
    from kilter.data.readers import read_records
    from kilter.feedback.export import RECORD_KIND

    store = Store(db)
    store.migrate()
    user = store.create_user("ann")[0]
    answers = {
        "pairwise": [{"choice": ["A3"]}, {"choice": ["tie"]}, {"choice": ["B1"]}],
        "ranking": [{"rank_0": ["1"], "rank_1": ["2"], "rank_2": ["2"], "score_0": ["5"], "score_1": ["3"], "score_2": ["3"]}],
        "rating": [{"label": ["up"]}, {"label": ["down"]}],
        "edit": [{"text": ["Edited.\r\nBetter now."]}, {"text": ["rating answer 1\r\n"]}],  # the second: unchanged
        "demonstration": [{"text": ["Written by hand."]}],
    }
    for task, forms in answers.items():
        store.create_project(task, task)
        k = {"pairwise": 2, "ranking": 3, "rating": 1, "edit": 1, "demonstration": 0}[task]
        rows = [parse_row({"prompt": f"{task} question {i}",
                           **({"responses": [f"rating answer {i}" if task == "edit" else f"{task} answer {i}.{j}"
                                             for j in range(k)]} if k else {})}, f"line {i}")
                for i in range(len(forms))]
        store.import_prompts(task, rows)
        project = store.project(task)
        for form in forms:
            view = store.next_task(project, user)
            store.submit(project, user, view.assignment_id,
                         lambda shown, f=form, t=task: parse_submission(t, lambda n: f.get(n, []), shown))
    store.close()
    for task in answers:
        out = tmp_path / task
        assert main(["export", "--project", task, "--out", str(out), "--db", db]) == 0
        for path in sorted(out.glob("*.jsonl")):
            if path.stem in RECORD_KIND and path.read_text():
                records = read_records(path, RECORD_KIND[path.stem])
                assert len(records) == len(path.read_text().splitlines()) and records.n_skipped == 0
    assert len((tmp_path / "edit" / "comparisons.jsonl").read_text().splitlines()) == 1  # the unchanged edit is no pair
