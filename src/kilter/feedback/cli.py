"""Command-line side of the feedback app: ``kilter serve | project | users | import | export | leaderboard``.

``project`` and ``users`` are command groups with their own argument parsing; the others are
typed configs like every Kilter command (``kilter export --help`` lists every option).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Literal

from kilter.config import BaseConfig, Field
from kilter.errors import ConfigError, KilterError


def default_db() -> str:
    return os.environ.get("KILTER_DB", "kilter.db")


def open_store(db: str):
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from kilter.feedback.store import Store

    store = Store(db)
    try:
        store.migrate()
    except (SQLAlchemyError, OSError, CommandError) as exc:  # connection refused, bad credentials, unwritable file ...
        store.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilterError(f"cannot open database {db!r}: {first}") from None
    return store


def require(cfg: BaseConfig, *keys: str) -> None:
    for key in keys:
        if not getattr(cfg, key):
            raise ConfigError(f"config key {key!r} is required (e.g. --{key.replace('_', '-')} VALUE)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one-line KilterErrors (the CLI exits 2 with them)."""

    def error(self, message: str):
        raise KilterError(f"{message} (see `{self.prog} --help`)")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help
        if exc.code in (0, None):
            return None
        raise


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=default_db(),
                        help="SQLite file or database URL (default: $KILTER_DB or kilter.db)")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


# --------------------------------------------------------------------------- kilter serve


def serve(cfg) -> int:
    import uvicorn
    from sqlalchemy.engine import make_url

    from kilter.feedback.app import create_app

    store = open_store(cfg.db)
    if not any(u.is_admin for u in store.users()):
        print("kilter serve: no admin account yet; create one with `kilter users add NAME --role admin --invite`",
              file=sys.stderr)
    shown_db = make_url(store.url).render_as_string(hide_password=True)
    print(f"Kilter feedback app on http://{cfg.host}:{cfg.port} (database {shown_db})", flush=True)
    store.close()
    options = dict(host=cfg.host, port=cfg.port, log_level=cfg.log_level, proxy_headers=cfg.proxy_headers,
                   forwarded_allow_ips=cfg.forwarded_allow_ips, timeout_graceful_shutdown=5)
    if cfg.workers > 1:
        os.environ["KILTER_SERVE_CONFIG"] = cfg.model_dump_json()
        uvicorn.run("kilter.feedback.cli:app_factory", factory=True, workers=cfg.workers, **options)
    else:
        uvicorn.run(create_app(cfg), **options)
    return 0


def app_factory():
    """App for each uvicorn worker process (``--workers N``); settings come from the parent."""
    from kilter.feedback.app import create_app
    from kilter.feedback.settings import ServeConfig

    return create_app(ServeConfig.model_validate_json(os.environ["KILTER_SERVE_CONFIG"]))


# --------------------------------------------------------------------------- kilter import


class ImportConfig(BaseConfig):
    """Each line: {"prompt", "id"?, "responses": [text or {"text", "model", "sampling"}], "gold"?} (docs/feedback.md, "Import format")."""

    project: str = ""
    """Project to add the items to (created with `kilter project create`); required."""
    file: str = ""
    """JSONL file: one {"prompt", "id"?, "responses": [...], "gold"?} object per line."""
    db: str = Field(default_factory=default_db)
    """SQLite file or database URL (default: $KILTER_DB or kilter.db)."""


def run_import(cfg: ImportConfig) -> int:
    from kilter.feedback.importer import read_jsonl

    require(cfg, "project", "file")
    rows = read_jsonl(cfg.file)
    store = open_store(cfg.db)
    try:
        counts = store.import_prompts(cfg.project, rows)
    finally:
        store.close()
    print(f"imported {counts['prompts']} prompts, {counts['candidates']} responses -> {counts['items']} items "
          f"({counts['gold_items']} gold) into {cfg.project}")
    return 0


# --------------------------------------------------------------------------- kilter export


class ExportConfig(BaseConfig):
    """Records follow DESIGN.md "Records", so kilter sft | rm | dpo | kto read them directly; aggregation rules in docs/feedback.md."""

    project: str = ""
    """Project to export; required."""
    out: str = ""
    """Output: a .jsonl file for one kind, or a folder (one <kind>.jsonl per kind); required."""
    kind: Literal["auto", "all", "comparisons", "rankings", "ratings", "demonstrations", "raw"] = "all"
    """Records to write: 'all' (every kind the task supports, plus raw), 'auto' (the task's main kind) or one kind."""
    aggregate: Literal["each", "mean", "majority"] = "each"
    """How judgments of the same item by several people combine: one record each, mean, or majority vote."""
    min_judgments: int = Field(1, ge=1)
    """Leave out items with fewer judgments than this (e.g. the project's overlap)."""
    exclude_flagged: bool = False
    """Leave out annotators flagged by the quality checks (low gold accuracy or peer agreement)."""
    include_gold: bool = True
    """Export judgments on gold items too (they are real prompts with real responses)."""
    include_rejected: bool = False
    """Export judgments a reviewer rejected too (raw always has them, with the review)."""
    db: str = Field(default_factory=default_db)
    """SQLite file or database URL (default: $KILTER_DB or kilter.db)."""


def run_export(cfg: ExportConfig) -> int:
    from kilter.feedback import analysis, export

    require(cfg, "project", "out")
    store = open_store(cfg.db)
    try:
        project = store.project(cfg.project)
        records = store.judgments(project)
    finally:
        store.close()
    if cfg.exclude_flagged:
        records = analysis.without_users(records, analysis.quality(records, project.task).flagged)
    if not cfg.include_gold:
        records = [r for r in records if not r.is_gold]
    if cfg.kind == "all":
        kinds = list(export.KINDS_FOR_TASK[project.task])
    elif cfg.kind == "auto":
        kinds = [export.DEFAULT_KIND[project.task]]
    else:
        kinds = [cfg.kind]
    out = Path(cfg.out)
    if out.suffix == ".jsonl" and len(kinds) > 1:
        raise ConfigError(f"config key 'out': {cfg.out} is one file but kind={cfg.kind!r} writes {len(kinds)} files; give a folder")
    for kind in kinds:
        problems: list[str] = []
        rows = export.build(records, project.task, kind, cfg.aggregate, cfg.min_judgments, project=project.name,
                            problems=problems, include_rejected=cfg.include_rejected)
        path = out if out.suffix == ".jsonl" else out / f"{kind}.jsonl"
        export.write(rows, path)
        print(f"wrote {len(rows)} {kind} records to {path}")
        if problems:
            print(f"left out {len(problems)} {kind} records a trainer would refuse (first: {problems[0]})")
    return 0


# --------------------------------------------------------------------------- kilter leaderboard


class LeaderboardConfig(BaseConfig):
    """A battle is a pairwise (or ranking) judgment between responses of two different models; ties count half a win each."""

    project: str = ""
    """Project whose pairwise or ranking judgments are the battles; required."""
    bootstrap: int = Field(200, ge=0)
    """Bootstrap rounds for the 95% interval of the Bradley-Terry ratings (0 = no interval)."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    format: Literal["table", "json"] = "table"
    """Print a table, or one JSON list of rows."""
    exclude_flagged: bool = False
    """Leave out annotators flagged by the quality checks."""
    category: str = ""
    """Only prompts of this category (the import's "category" field); default: all."""
    db: str = Field(default_factory=default_db)
    """SQLite file or database URL (default: $KILTER_DB or kilter.db)."""


def run_leaderboard(cfg: LeaderboardConfig) -> int:
    from kilter.feedback import analysis

    require(cfg, "project")
    store = open_store(cfg.db)
    try:
        project = store.project(cfg.project)
        records = store.judgments(project)
    finally:
        store.close()
    if project.task not in ("pairwise", "ranking"):
        raise KilterError(f"project {project.name!r} is a {project.task} project; leaderboards need pairwise or ranking judgments")
    flagged = analysis.quality(records, project.task).flagged if cfg.exclude_flagged else {}
    board = analysis.leaderboard_report(records, exclude=flagged, n_bootstrap=cfg.bootstrap, seed=cfg.seed,
                                        category=cfg.category or None)
    rows = board.rows
    notes = []
    if board.excluded_battles:
        notes.append(f"left out {board.excluded_battles} battles judged by flagged annotators "
                     f"({', '.join(board.excluded_annotators)})")
    if board.disconnected:
        notes.append("the models form groups that were never compared with each other, so each group is rated on "
                     "its own scale: " + "; ".join(f"group {i} ({', '.join(g)})" for i, g in enumerate(board.groups, 1)))
    if board.few_battles:
        notes.append(f"fewer than {analysis.FEW_BATTLES} battles (wide intervals): {', '.join(board.few_battles)}")
    if board.style_coefficients:
        notes.append("style control (log-odds per sd): " + ", ".join(f"{k} {v:+.2f}" for k, v in board.style_coefficients.items()))
    if cfg.format == "json":
        print(json.dumps(rows, indent=2))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    if not rows:
        if not board.excluded_battles:
            print(f"no battles yet in {project.name}: judgments on items whose responses come from different models are needed")
        for note in notes:
            print(f"note: {note}")
        return 0

    def ci(row):
        return "-" if row["bt_lower"] is None else f"{row['bt_lower']:.0f}..{row['bt_upper']:.0f}"

    group = [[r["group"]] for r in rows] if board.disconnected else [[] for _ in rows]
    def styled(row):
        return "-" if row["style_bt"] is None else f"{row['style_bt']:.0f}"

    _print_table([[r["rank"], *g, r["model"], f"{r['bt']:.0f}", ci(r), styled(r), f"{r['elo']:.0f}", r["battles"],
                   f"{r['wins']}/{r['losses']}/{r['ties']}", f"{100 * r['win_rate']:.1f}%"] for r, g in zip(rows, group)],
                 ["#", *(["group"] if board.disconnected else []), "model", "bradley-terry", "95% interval",
                  "style-controlled", "elo", "battles", "w/l/t", "win rate"])
    for note in notes:
        print(f"note: {note}")
    return 0


# --------------------------------------------------------------------------- kilter project


def project_main(argv: list[str]) -> int:
    parser = _Parser(prog="kilter project", description="Create and inspect labeling projects.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    p = sub.add_parser("create", help="create a project")
    p.add_argument("name", help="short name used in URLs (letters, digits, '_', '.', '-')")
    p.add_argument("--task", required=True, choices=["pairwise", "ranking", "rating", "edit", "demonstration"],
                   help="what annotators do with each item")
    p.add_argument("--overlap", type=int, default=1, help="how many different people judge each item (default 1)")
    p.add_argument("--gold-fraction", type=float, default=0.0,
                   help="share of tasks drawn from gold items, 0-1 (default 0; gold items come from the import's 'gold' field)")
    p.add_argument("--title", default="", help="title shown to annotators (default: the name)")
    p.add_argument("--instructions", default="", help="instructions shown above every task")
    p.add_argument("--instructions-file", default=None, help="read the instructions from a text file")
    _db_option(p)
    p = sub.add_parser("list", help="list projects with their progress")
    _db_option(p)
    for action, text in (("add-user", "add annotators to a project"), ("remove-user", "remove annotators from a project")):
        p = sub.add_parser(action, help=text)
        p.add_argument("name", help="project name")
        p.add_argument("users", nargs="+", help="usernames")
        _db_option(p)
    p = sub.add_parser("import", help="import prompts and responses from JSONL (same as `kilter import`)")
    p.add_argument("name", help="project name")
    p.add_argument("file", help="JSONL file")
    _db_option(p)
    p = sub.add_parser("status", help="progress, agreement and flagged annotators of a project")
    p.add_argument("name", help="project name")
    p.add_argument("--json", action="store_true", help="print JSON")
    _db_option(p)
    args = _parse(parser, argv)
    if args is None:
        return 0
    if args.action is None:
        parser.print_help()
        return 0
    if args.action == "import":
        return run_import(ImportConfig(project=args.name, file=args.file, db=args.db))
    store = open_store(args.db)
    try:
        return _project_action(store, args)
    finally:
        store.close()


def _project_action(store, args) -> int:
    if args.action == "create":
        instructions = args.instructions
        if args.instructions_file:
            path = Path(args.instructions_file)
            if not path.is_file():
                raise KilterError(f"instructions file not found: {path}")
            instructions = path.read_text(encoding="utf-8")
        p = store.create_project(args.name, args.task, args.overlap, args.title, instructions, args.gold_fraction)
        print(f"created project {p.name} ({p.task}, overlap {p.overlap})")
    elif args.action == "list":
        rows = []
        for p in store.projects():
            prog = store.progress(p)
            rows.append([p.name, p.task, p.overlap, f"{prog.complete_items}/{prog.items}", prog.judgments,
                         len(store.members(p.id))])
        _print_table(rows, ["project", "task", "overlap", "complete", "judgments", "members"])
    elif args.action in ("add-user", "remove-user"):
        store.project(args.name)
        for username in args.users:
            if args.action == "add-user":
                added = store.add_member(args.name, username)
                print(f"{username}: {'added to' if added else 'already in'} {args.name}")
            else:
                store.remove_member(args.name, username)
                print(f"{username}: removed from {args.name}")
    elif args.action == "status":
        _status(store, args)
    return 0


def _status(store, args) -> None:
    from kilter.feedback import analysis

    project = store.project(args.name)
    prog = store.progress(project)
    report = analysis.quality(store.judgments(project), project.task)
    if args.json:
        print(json.dumps({
            "project": project.name, "task": project.task, "overlap": project.overlap, "items": prog.items,
            "complete_items": prog.complete_items, "gold_items": prog.gold_items, "judgments": prog.judgments,
            "alpha": report.alpha, "alpha_level": report.alpha_level,
            "annotators": [{"name": a.name, "judgments": a.judgments, "peer_agreement": list(a.peer),
                            "gold_accuracy": list(a.gold), "median_seconds": a.median_seconds, "flags": a.reasons}
                           for a in report.annotators]}, indent=2))
        return
    alpha = "n/a" if report.alpha is None else f"{report.alpha:.3f} ({report.alpha_level})"
    print(f"{project.name}: {project.task}, overlap {project.overlap}; {prog.complete_items}/{prog.items} items complete, "
          f"{prog.judgments} judgments, {prog.gold_items} gold items; Krippendorff's alpha {alpha}")
    if report.annotators:
        _print_table([[a.name, a.judgments, f"{a.peer[0]}/{a.peer[1]}", f"{a.gold[0]}/{a.gold[1]}",
                       "; ".join(a.reasons) or "ok"] for a in report.annotators],
                     ["annotator", "judgments", "peer agree", "gold correct", "review"])


# --------------------------------------------------------------------------- kilter users


def users_main(argv: list[str]) -> int:
    parser = _Parser(prog="kilter users", description="Manage accounts of the feedback app.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    p = sub.add_parser("add", help="create an account")
    p.add_argument("username")
    p.add_argument("--role", choices=["admin", "reviewer", "annotator"], default="annotator",
                   help="default annotator; a reviewer also accepts or rejects other people's judgments")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--invite", action="store_true",
                   help="print a single-use invite link that logs the person in (the default without a password)")
    p.add_argument("--invite-hours", type=float, default=72.0, help="hours the invite link stays valid (default 72)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="address people open the server at, for the printed link (default http://127.0.0.1:8000)")
    p.add_argument("--project", action="append", default=[], help="also add to this project (repeatable)")
    _db_option(p)
    p = sub.add_parser("list", help="list accounts")
    _db_option(p)
    p = sub.add_parser("invite", help="make a new single-use invite link for an account without a password")
    p.add_argument("username")
    p.add_argument("--invite-hours", type=float, default=72.0, help="hours the link stays valid (default 72)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="address people open the server at, for the printed link (default http://127.0.0.1:8000)")
    _db_option(p)
    p = sub.add_parser("token", help="print a new API token for scripts (Authorization: Bearer TOKEN)")
    p.add_argument("username")
    p.add_argument("--name", default="", help="what the token is for, e.g. online-loop")
    _db_option(p)
    p = sub.add_parser("revoke-tokens", help="revoke every API token of an account")
    p.add_argument("username")
    _db_option(p)
    p = sub.add_parser("set-password", help="set a password (asked for, or read with --password-stdin)")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _db_option(p)
    for action in ("deactivate", "activate"):
        p = sub.add_parser(action, help=f"{action} an account (deactivating also ends its sessions)")
        p.add_argument("username")
        _db_option(p)
    args = _parse(parser, argv)
    if args is None:
        return 0
    if args.action is None:
        parser.print_help()
        return 0
    store = open_store(args.db)
    try:
        return _users_action(store, args)
    finally:
        store.close()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise KilterError("the two passwords differ")
    return first


def _users_action(store, args) -> int:
    if args.action == "add":
        password = _read_password(True) if args.password_stdin else None
        hours = args.invite_hours if args.invite or password is None else None
        user, token = store.create_user(args.username, args.role, password, invite_hours=hours, projects=args.project)
        print(f"created {user.role} {user.username}" + (f" in {', '.join(args.project)}" if args.project else ""))
        if token:
            print(f"invite link: {args.base_url.rstrip('/')}/invite/{token}")
    elif args.action == "list":
        _print_table([[u.username, u.role, "yes" if u.active else "no", "yes" if u.has_password else "no",
                       u.invite_expires_at.strftime("%Y-%m-%d") if u.invite_expires_at else "-"] for u in store.users()],
                     ["user", "role", "active", "password", "invite until"])
    elif args.action == "invite":
        token = store.new_invite(args.username, args.invite_hours)
        print(f"invite link: {args.base_url.rstrip('/')}/invite/{token}")
    elif args.action == "token":
        print(store.create_api_token(args.username, args.name))
    elif args.action == "revoke-tokens":
        print(f"revoked {store.revoke_api_tokens(args.username)} API tokens of {args.username}")
    elif args.action == "set-password":
        store.set_password(args.username, _read_password(args.password_stdin))
        print(f"password of {args.username} set; their other sessions are logged out")
    else:
        store.set_active(args.username, args.action == "activate")
        print(f"{args.username} {args.action}d")
    return 0
