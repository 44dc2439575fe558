"""The database layer on a real SQLite file and (when reachable) a real PostgreSQL server."""

import random
import threading
from collections import Counter
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from feedback_testlib import seed_project
from sqlalchemy import text

from kilter.errors import KilterError
from kilter.feedback.importer import parse_row
from kilter.feedback.migrate import current_revision
from kilter.feedback.models import Base
from kilter.feedback.store import Store, database_url
from kilter.feedback.tasks import parse_submission


def judge(store, project, user, choice="A2", rng=None, timeout_s=1800.0):
    """Take the next task and answer it; returns the task view or None when nothing is left."""
    view = store.next_task(project, user, timeout_s=timeout_s, rng=rng)
    if view is None:
        return None
    data = {"choice": [choice], "label": ["up"], "text": ["written"]}
    for pos in range(len(view.responses)):
        data[f"rank_{pos}"] = [str(pos + 1)]
        data[f"score_{pos}"] = ["5"]
    store.submit(project, user, view.assignment_id,
                 lambda shown: parse_submission(project.task, lambda n: data.get(n, []), shown))
    return view


def users(store, *names):
    return [store.create_user(n)[0] for n in names]


def test_migrations_build_exactly_the_models_schema(store):
    assert current_revision(store.engine) == "0003"
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    store.migrate()  # a second upgrade is a no-op
    assert current_revision(store.engine) == "0003"


def test_sqlite_runs_in_wal_mode_and_fsyncs_judgments(sqlite_path):
    store = Store(sqlite_path)
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with store._write(durable=True) as s:  # judgments: FULL, the WAL is fsynced at commit
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2
    with store._write(durable=False) as s:  # reservations: NORMAL
        assert s.execute(text("PRAGMA synchronous")).scalar() == 1
    store.close()


def test_database_url_forms(tmp_path):
    assert database_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert database_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert database_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_overlap_each_item_judged_by_n_different_people(store):
    project = seed_project(store, "p", "pairwise", n_prompts=3, overlap=2, members=())
    people = users(store, "u1", "u2", "u3")
    for user in people:
        while judge(store, project, user):
            pass
    records = store.judgments(project)
    per_item = Counter(r.item_id for r in records)
    assert sorted(per_item.values()) == [2, 2, 2]  # 3 items x overlap 2
    assert len({(r.item_id, r.user) for r in records}) == len(records)  # never twice by one person
    assert Counter(r.user for r in records) == {"u1": 3, "u2": 3}  # u3 found nothing left
    progress = store.progress(project)
    assert (progress.items, progress.complete_items, progress.judgments) == (3, 3, 6)


def test_open_task_comes_back_unchanged_until_answered(store):
    project = seed_project(store, "p", "ranking", n_prompts=2, k=4, members=())
    (user,) = users(store, "u1")
    first = store.next_task(project, user)
    again = store.next_task(project, user)
    assert again.assignment_id == first.assignment_id
    assert [c.id for c in again.responses] == [c.id for c in first.responses]


def test_display_order_is_random_and_recorded(store):
    project = seed_project(store, "p", "pairwise", n_prompts=1, overlap=16, members=())
    people = users(store, *[f"u{i}" for i in range(16)])
    rng = random.Random(0)
    for user in people:
        judge(store, project, user, choice="A4", rng=rng)
    records = store.judgments(project)
    orders = Counter(tuple(r.display_order) for r in records)
    slot_ids = [c.id for c in records[0].candidates]
    assert set(orders) == {tuple(slot_ids), tuple(reversed(slot_ids))}  # both sides were shown first
    for r in records:  # "A much better" picks whichever candidate was on the left for that person
        assert r.preferred_candidate_id == r.display_order[0]
        assert r.strength == 1.0


def test_a_seeded_order_repeats_in_a_new_database_and_still_varies(tmp_path):
    def orders(path: str, seed: int) -> list[tuple[int, ...]]:
        s = Store(path)
        s.migrate()
        try:
            project = seed_project(s, "p", "pairwise", n_prompts=12, members=())
            a, b = users(s, "a", "b")
            shown = []
            for user in (a, b, a, b) * 3:  # annotators take turns, as the loop's crowd does
                view = s.next_task(project, user, seed=seed)
                s.submit(project, user, view.assignment_id,
                         lambda sh: parse_submission("pairwise", lambda n: ["A2"] if n == "choice" else [], sh))
                shown.append(tuple(c.id for c in view.responses))
            return shown
        finally:
            s.close()

    first, again = orders(str(tmp_path / "1.db"), 7), orders(str(tmp_path / "2.db"), 7)
    assert first == again  # the same pages in a rerun
    assert len({o[0] < o[1] for o in first}) == 2  # but both sides still come first
    assert orders(str(tmp_path / "3.db"), 8) != first


def test_skip_frees_the_item_and_the_skipper_never_sees_it_again(store):
    project = seed_project(store, "p", "rating", n_prompts=1, k=1, members=())
    a, b = users(store, "a", "b")
    view = store.next_task(project, a)
    store.skip(project, a, view.assignment_id)
    assert store.next_task(project, a) is None
    assert store.next_task(project, b).item_id == view.item_id


def test_stale_assignment_is_offered_to_someone_else(store):
    project = seed_project(store, "p", "rating", n_prompts=1, k=1, members=())
    a, b = users(store, "a", "b")
    held = store.next_task(project, a)
    assert store.next_task(project, b, timeout_s=3600) is None  # still reserved for a
    assert store.next_task(project, b, timeout_s=0).item_id == held.item_id  # reservation lapsed


def test_gold_items_are_mixed_in_and_do_not_use_up_overlap(store):
    project = seed_project(store, "p", "pairwise", n_prompts=3, overlap=1, members=(), gold_fraction=1.0,
                           golds=[0])  # prompt 0 is gold: response 0 is the better one
    a, b = users(store, "a", "b")
    first_a = store.next_task(project, a)
    assert first_a is not None
    records_before = store.judgments(project)
    assert records_before == []
    judge(store, project, a)
    first_b = judge(store, project, b)
    assert first_a.item_id == first_b.item_id  # both met the gold item, despite overlap 1
    gold_records = [r for r in store.judgments(project) if r.is_gold]
    assert {r.user for r in gold_records} == {"a", "b"}
    assert gold_records[0].gold == {"preferred": 0}
    progress = store.progress(project)
    assert (progress.items, progress.gold_items) == (2, 1)


def test_submit_is_idempotent_and_owner_only(store):
    project = seed_project(store, "p", "pairwise", n_prompts=1, members=())
    a, b = users(store, "a", "b")
    view = store.next_task(project, a)

    def parse(shown):
        return parse_submission("pairwise", lambda n: {"choice": ["B1"]}.get(n, []), shown)

    first = store.submit(project, a, view.assignment_id, parse)
    second = store.submit(project, a, view.assignment_id, parse)
    assert first[1] is True and second == (first[0], False)
    assert len(store.judgments(project)) == 1
    with pytest.raises(KilterError, match="not assigned to you"):
        store.submit(project, b, view.assignment_id, parse)


def test_candidates_keep_model_and_sampling_settings(store):
    project = seed_project(store, "p", "pairwise", n_prompts=1, members=())
    (a,) = users(store, "a")
    judge(store, project, a)
    (record,) = store.judgments(project)
    assert [(c.model, c.sampling) for c in record.candidates] == [
        ("model-0", {"temperature": 0.7}), ("model-1", {"temperature": 0.7})]
    assert record.shown_at <= record.created_at
    assert record.created_at - record.shown_at < timedelta(minutes=1)


def test_import_is_all_or_nothing(store):
    project = seed_project(store, "p", "pairwise", n_prompts=1, members=())
    rows = [parse_row({"prompt": "new", "id": "fresh", "responses": ["a", "b"]}, "f line 1"),
            parse_row({"prompt": "again", "id": "p-0", "responses": ["a", "b"]}, "f line 2")]
    with pytest.raises(KilterError, match="f line 2: prompt id 'p-0' is already in project"):
        store.import_prompts("p", rows)
    assert store.progress(project).items == 1  # the valid first row was not written either


def test_accounts(store):
    user, token = store.create_user("Alice", "annotator", "correct horse", invite_hours=1)
    assert token is None  # an account with a password gets no invite link
    assert store.check_password("alice", "correct horse").id == user.id  # usernames ignore case
    assert store.check_password("alice", "wrong horse") is None
    assert store.check_password("nobody", "correct horse") is None
    bob, token = store.create_user("bob", invite_hours=1)
    assert store.user_by_invite(token).id == bob.id
    assert store.user_by_invite(token + "x") is None
    assert store.redeem_invite(token).id == bob.id
    assert store.redeem_invite(token) is None and store.user_by_invite(token) is None  # single use
    with pytest.raises(KilterError, match="already exists"):
        store.create_user("alice")
    with pytest.raises(KilterError, match="at least 8"):
        store.set_password("alice", "short")
    store.set_password("alice", "new password")
    assert store.get_user(user.id).session_epoch == 1
    store.set_active("alice", False)
    assert store.check_password("alice", "new password") is None
    with pytest.raises(KilterError, match="username"):
        store.create_user("bad name!")
    with pytest.raises(KilterError, match="username"):
        store.create_user("henry\n")  # "$" would have let a trailing newline through
    with pytest.raises(KilterError, match="project name"):
        store.create_project("arena\n", "pairwise")
    with pytest.raises(KilterError, match="no project named 'nosuch'"):
        store.create_user("henry", projects=["nosuch"])
    assert "henry" not in [u.username for u in store.users()]  # nothing half-created


def test_annotators_see_only_their_projects(store):
    seed_project(store, "mine", "rating", n_prompts=1, k=1, members=())
    seed_project(store, "theirs", "rating", n_prompts=1, k=1, members=())
    ann = store.create_user("ann")[0]
    boss = store.create_user("boss", "admin")[0]
    store.add_member("mine", "ann")
    assert [p.name for p in store.projects(ann)] == ["mine"]
    assert [p.name for p in store.projects(boss)] == ["mine", "theirs"]
    assert store.can_access(ann, store.project("mine").id)
    assert not store.can_access(ann, store.project("theirs").id)


def test_concurrent_annotators_never_exceed_overlap(store):
    project = seed_project(store, "p", "pairwise", n_prompts=6, overlap=2, members=())
    people = users(store, *[f"u{i}" for i in range(8)])
    errors = []

    def work(user):
        try:
            while judge(store, project, user):
                pass
        except Exception as exc:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    per_item = Counter(r.item_id for r in store.judgments(project))
    assert sorted(per_item.values()) == [2] * 6


def test_progress_per_person_and_all_done_stays_done(store):
    """Gold items used to come back after the real work was done: reloading undid "all done"."""
    project = seed_project(store, "p", "pairwise", n_prompts=2, overlap=2, members=(), gold_fraction=0.5,
                           golds=[0, 0])  # prompts 0 and 1 are gold; add two regular prompts
    store.import_prompts("p", [parse_row({"prompt": f"real {i}", "responses": [f"x{i}", f"y{i}"]}, "r") for i in range(2)])
    a, b = users(store, "a", "b")
    assert store.user_progress(project, a) == {"done": 0, "skipped": 0, "remaining": 2}
    rng = random.Random(3)
    while judge(store, project, a, rng=rng):
        pass
    mine = store.user_progress(project, a)
    assert mine["remaining"] == 0 and mine["done"] >= 2  # both real items, and any gold met on the way
    for seed in range(30):  # whatever the dice say, nothing more for a
        assert store.next_task(project, a, rng=random.Random(seed)) is None
    assert store.user_progress(project, b)["remaining"] == 2  # overlap 2: b still has both real items
