"""Security: escaping of model outputs, CSRF on every POST, roles, rate limits, sessions, headers."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.routing import APIRoute
from feedback_testlib import Client, invited, seed_project
from itsdangerous import TimestampSigner

from kilter.feedback.importer import parse_row
from kilter.feedback.store import Store

EVIL = "<script>document.title='pwned'</script><img src=x onerror=\"alert(1)\">"


@pytest.fixture
def ann(app):
    client = Client(app)
    client.login_invite(invited(app.state.store, "ann"))
    return client


def test_script_in_model_output_is_escaped_text(app, ann):
    store = app.state.store
    store.create_project("xss", "pairwise")
    store.import_prompts("xss", [parse_row({"prompt": EVIL, "responses": [EVIL, "fine <b>bold</b>"]}, "x line 1")])
    store.add_member("xss", "ann")
    page, _ = ann.task("xss")
    assert "<script>document" not in page.text and "<img src=x" not in page.text and "<b>bold" not in page.text
    assert page.text.count("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;") == 2  # prompt + response
    assert "fine &lt;b&gt;bold&lt;/b&gt;" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    # video clips (the clips task) are data: URIs; no other media source is allowed
    assert [d.strip() for d in csp.split(";") if d.strip().startswith("media-src")] == ["media-src data:"]
    # the only scripts the page loads are our own static file, never inline code
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/app.js" defer>']


MARKDOWN_ATTACKS = [
    "[click](javascript:alert(1))", "[x](JaVaScRiPt:alert(1))", "[d](data:text/html;base64,PHNjcmlwdD4=)",
    "![img](x onerror=alert(1))", "<img src=x onerror=alert(1)>", "<a href='javascript:alert(1)'>a</a>",
    "<svg onload=alert(1)>", "<iframe src=//evil.example>", "`<script>`", "```html\n<script>alert(1)</script>\n```",
    "<style>body{display:none}</style>", "[ok](https://example.org/safe)",
]


def test_markdown_is_rendered_but_sanitised(app, ann):
    store = app.state.store
    store.create_project("md", "ranking")
    text = "\n\n".join(MARKDOWN_ATTACKS) + "\n\n**bold** and a list:\n\n- one\n- two\n"
    store.import_prompts("md", [parse_row({"prompt": "Render this", "responses": [text, "# Title\n\n```python\nprint(1)\n```"]},
                                          "x line 1")])
    store.add_member("md", "ann")
    page, _ = ann.task("md")
    html = page.text
    assert "<strong>bold</strong>" in html and "<li>one</li>" in html
    assert '<pre><code class="language-python">print(1)' in html  # code blocks are monospace blocks
    assert '<a href="https://example.org/safe" rel="noopener noreferrer nofollow">ok</a>' in html
    tags = start_tags(html[html.index("<main"):])
    assert not {name for name, _ in tags} & {"script", "img", "svg", "iframe", "style"}
    for name, attrs in tags:
        assert not [a for a, _ in attrs if a.startswith("on")], (name, attrs)
        assert not [v for a, v in attrs if a == "href" and not (v or "").startswith(("https:", "/", "#"))], attrs
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']


def start_tags(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag a browser would build from ``html``, with its attributes."""
    from html.parser import HTMLParser

    found = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Collect().feed(html)
    return found


def test_invisible_characters_are_made_visible():
    from kilter.feedback.render import markdown, plain

    sneaky = "pay\u200b now \u202eevil\u202c \ufeffend\u00ad"
    for html in (str(markdown(sneaky)), str(plain(sneaky))):
        for code in ("200B", "202E", "202C", "FEFF", "00AD"):
            assert f'class="invisible" title="U+{code}' in html
        assert not any(ch in html for ch in "\u200b\u202e\u202c\ufeff\u00ad")
    assert "\ue000" not in str(markdown("private \ue000 use \ue001 chars"))


def test_comment_and_names_are_escaped_on_admin_pages(app, ann):
    store = app.state.store
    seed_project(store, "pw", "pairwise", n_prompts=1)
    _, assignment = ann.task("pw")
    ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "A1", "comment": EVIL})
    admin = Client(app)
    admin.login_invite(invited(store, "boss", "admin"))
    raw = admin.get("/admin/p/pw/export?kind=raw").text
    assert "<script>" in raw  # the export holds the data as given (JSON, not HTML)
    page = admin.get("/admin/p/pw")
    assert "<script>document" not in page.text


def api_routes(routes):
    """Every APIRoute, also inside included routers (FastAPI keeps those nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def post_routes(app):
    return [r for r in api_routes(app.routes) if "POST" in r.methods]


def test_every_post_without_the_csrf_token_is_rejected(app, ann):
    store = app.state.store
    seed_project(store, "pw", "pairwise", n_prompts=2)
    _, assignment = ann.task("pw")
    admin = Client(app)
    admin.login_invite(invited(store, "boss", "admin"))
    token = store.new_invite("ann")
    paths = {"/login": {"username": "ann", "password": "x" * 8}, "/logout": {},
             "/invite/{token}": {}, "/p/{name}/submit": {"assignment_id": assignment, "choice": "A1"},
             "/p/{name}/skip": {"assignment_id": assignment}, "/admin/users": {"username": "mallory"},
             "/admin/users/{username}/invite": {}, "/admin/users/{username}/active": {"active": "0"},
             "/admin/p/{name}/members": {"username": "ann"},
             "/api/v1/projects": {"name": "made", "task": "rating"}, "/api/v1/projects/{name}/items": {},
             "/api/v1/projects/{name}/export": {}, "/p/{name}/j/{judgment_id}": {"choice": "A1"},
             "/p/{name}/skipped/{assignment_id}/reopen": {}, "/review/p/{name}/j/{judgment_id}": {"verdict": "accept"},
             "/admin/p/{name}/import": {}, "/admin/p/{name}/members/remove": {"username": "ann"},
             "/admin/projects": {"name": "made", "task": "rating"}, "/admin/p/{name}/settings": {"overlap": "3"},
             "/p/{name}/diff": {"assignment_id": assignment, "text": "x"}}
    routes = post_routes(app)
    assert sorted(r.path for r in routes) == sorted(paths)  # a new POST route must be added here
    for route in routes:
        url = route.path.format(token=token, name="pw", username="ann", judgment_id=1, assignment_id=assignment)
        for client in (ann, admin):
            missing = client.post(url, paths[route.path], csrf=False)
            wrong = client.post(url, {**paths[route.path], "csrf_token": "forged"}, csrf=False)
            assert missing.status_code == 403, (url, missing.status_code)
            assert wrong.status_code == 403, (url, wrong.status_code)
    assert store.judgments(store.project("pw")) == []
    assert "mallory" not in [u.username for u in store.users()]
    assert ann.get("/").status_code == 200  # and nobody got logged out or deactivated


def test_csrf_token_of_another_session_does_not_work(app, ann):
    store = app.state.store
    seed_project(store, "pw", "pairwise", n_prompts=1)
    _, assignment = ann.task("pw")
    other = Client(app)
    other.get("/login")
    r = ann.post("/p/pw/submit", {"assignment_id": assignment, "choice": "A1", "csrf_token": other.csrf}, csrf=False)
    assert r.status_code == 403


@pytest.mark.parametrize("method, path", [
    ("get", "/admin"), ("get", "/admin/p/secret"), ("get", "/admin/p/secret/export?kind=raw"),
    ("post", "/admin/users"), ("post", "/admin/p/secret/members"), ("post", "/admin/users/ann/invite"),
    ("get", "/p/secret"), ("post", "/p/secret/submit"), ("post", "/p/secret/skip"),
])
def test_annotator_gets_403_on_admin_pages_and_other_projects(app, ann, method, path):
    seed_project(app.state.store, "secret", "pairwise", n_prompts=1, members=())
    r = ann.get(path) if method == "get" else ann.post(path, {"assignment_id": 1, "username": "x", "choice": "A1"})
    assert r.status_code == 403
    assert "secret p0 response" not in r.text


def test_wrong_passwords_are_rate_limited_per_user_and_address(app_factory, sqlite_path):
    app = app_factory(sqlite_path, login_max_failures=3, login_window_s=60)
    app.state.store.create_user("vic", "annotator", "the real password")
    client = Client(app)
    client.get("/login")
    for _ in range(3):
        r = client.post("/login", {"username": "vic", "password": "guess"})
        assert r.status_code == 401 and "Wrong username or password" in r.text
    blocked = client.post("/login", {"username": "vic", "password": "the real password"})
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text
    assert client.get("/").status_code == 303  # not logged in
    # the limit is per (username, address): another account from here is not locked out
    assert client.post("/login", {"username": "someone", "password": "guess"}).status_code == 401


def test_login_attempts_are_limited_per_address_across_usernames(app_factory, sqlite_path):
    app = app_factory(sqlite_path, login_max_attempts_per_address=3, login_window_s=60)
    app.state.store.create_user("vic", "annotator", "the real password")
    client = Client(app)
    client.get("/login")
    for name in ("amy", "ben", "cal"):
        assert client.post("/login", {"username": name, "password": "guess"}).status_code == 401
    assert client.post("/login", {"username": "dan", "password": "guess"}).status_code == 429
    assert client.post("/login", {"username": "vic", "password": "the real password"}).status_code == 429


def test_a_login_flood_keeps_memory_flat(tmp_path, live_server):
    """60 concurrent wrong logins from one address under different names: each Argon2 check takes
    64 MiB, so unbounded they took the server from ~120 MB to 2.3 GB (issue 18, defect 6)."""
    db = str(tmp_path / "flood.db")
    store = Store(db)
    store.migrate()
    store.close()
    server = live_server(db)
    pid = server.proc.pid

    def peak_mib() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def attempt(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            page = http.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            return http.post("/login", data={"csrf_token": csrf, "username": f"user{i}", "password": "wrong-guess"}).status_code

    attempt(-1)  # warm up: one Argon2 check, templates loaded
    before = peak_mib()
    with ThreadPoolExecutor(60) as pool:
        codes = list(pool.map(attempt, range(60)))
    growth = peak_mib() - before
    assert set(codes) <= {401, 429, 503} and codes.count(429) >= 30, codes
    assert growth < 200, f"peak memory grew by {growth:.0f} MiB"


def test_rate_limit_window_expires(app_factory, sqlite_path):
    # the attempt is counted before its Argon2 check, so the window must outlast one check on a busy machine
    app = app_factory(sqlite_path, login_max_failures=1, login_window_s=2.0)
    app.state.store.create_user("vic", "annotator", "the real password")
    client = Client(app)
    client.get("/login")
    assert client.post("/login", {"username": "vic", "password": "nope"}).status_code == 401
    assert client.post("/login", {"username": "vic", "password": "nope"}).status_code == 429
    import time

    time.sleep(2.1)
    assert client.post("/login", {"username": "vic", "password": "the real password"}).status_code == 303


def test_password_change_ends_other_sessions(app, ann):
    assert ann.get("/").status_code == 200
    app.state.store.set_password("ann", "a brand new password")
    assert ann.get("/").status_code == 303


def test_login_redirect_stays_on_this_site(app):
    app.state.store.create_user("pat", "annotator", "password123")
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        client = Client(app)
        client.get("/login")
        r = client.post("/login", {"username": "pat", "password": "password123", "next": target})
        assert r.headers["location"] == "/"


def test_security_headers_and_cookie_flags(app_factory, sqlite_path):
    app = app_factory(sqlite_path, secure_cookies=True)
    client = Client(app)
    r = client.get("/login")
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["strict-transport-security"].startswith("max-age=")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" in cookie


def test_session_key_is_generated_per_database_and_kept(app_factory, tmp_path):
    a = app_factory(str(tmp_path / "a.db"))
    b = app_factory(str(tmp_path / "b.db"))
    key_a = a.state.store.secret("session_key", lambda: "unused")
    assert key_a != b.state.store.secret("session_key", lambda: "unused")
    assert len(key_a) >= 40
    token = invited(a.state.store, "ann")
    client = Client(a)
    client.login_invite(token)
    restarted = app_factory(str(tmp_path / "a.db"))  # same database: the login survives a restart
    again = Client(restarted)
    again.http.cookies = client.http.cookies
    assert again.get("/").status_code == 200
    other = Client(b)  # a cookie signed for database a means nothing to b
    other.http.cookies = client.http.cookies
    assert other.get("/").status_code == 303


def test_forged_session_cookie_is_ignored(app):
    user, _ = app.state.store.create_user("boss", "admin")
    import base64
    import json

    payload = base64.b64encode(json.dumps({"uid": user.id, "ep": 0, "csrf": "x"}).encode())
    forged = TimestampSigner("guessed-key").sign(payload).decode()
    client = Client(app)
    client.http.cookies.set("kilter_session", forged)
    assert client.get("/admin").status_code == 303


def assert_app_page(r, status, text):
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("text/html") and text in r.text, r.text[:500]
    assert "default-src 'none'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"


def test_errors_are_the_apps_html_pages_with_the_security_headers(app, ann):
    """Issue 18, defect 9: unknown routes, 405, 422 and a huge assignment id."""
    seed_project(app.state.store, "pw", "pairwise", n_prompts=1)
    ann.task("pw")
    assert_app_page(ann.get("/no/such/page"), 404, "There is no page at this address")
    assert_app_page(ann.get("/p/pw/submit"), 405, "does not take GET requests")
    ann.get("/")
    assert_app_page(ann.post("/p/pw/submit", {"assignment_id": "9" * 40, "choice": "A1"}), 400, "no valid assignment id")
    assert_app_page(ann.post("/p/pw/skip", {"assignment_id": "-3"}), 400, "no valid assignment id")
    admin = Client(app)
    admin.login_invite(invited(app.state.store, "boss", "admin"))
    assert_app_page(admin.get("/admin/p/pw/export?min_judgments=lots"), 422, "min_judgments")
    assert ann.get("/p/pw").status_code == 200  # the task is still there


def test_a_bug_gives_the_error_page_with_headers_not_a_traceback(app, ann, monkeypatch):
    from fastapi.testclient import TestClient

    seed_project(app.state.store, "pw", "pairwise", n_prompts=1)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.store, "next_task", broken)
    http = TestClient(app, raise_server_exceptions=False)
    http.cookies = ann.http.cookies
    r = http.get("/p/pw")
    assert_app_page(r, 500, "The server hit a problem")
    assert "RuntimeError" not in r.text and "Traceback" not in r.text


def test_health_probe_answers_head_and_login_never_redirects_to_a_post_route(app):
    client = Client(app)
    assert client.http.head("/healthz").status_code == 200
    assert client.get("/p/x/submit").status_code == 405  # not logged in, and GET is not allowed there
    r = client.post("/p/x/submit", {"assignment_id": "1"}, csrf=False)
    assert r.status_code in (303, 403)
    app.state.store.create_user("pat", "annotator", "password123")
    client.get("/login")
    r = client.post("/login", {"username": "pat", "password": "password123", "next": "/p/x/submit"})
    assert (r.status_code, r.headers["location"]) == (303, "/")
    assert client.get("/login?next=/p/x").status_code == 303 and client.get("/login?next=/p/x").headers["location"] == "/p/x"


def test_a_login_needed_on_a_post_goes_back_to_the_page(app):
    from kilter.feedback.routes.deps import LoginRequired, require_user

    request = SimpleNamespace(method="POST", session={}, url=SimpleNamespace(path="/p/arena/submit"))
    with pytest.raises(LoginRequired) as caught:
        require_user(request)
    assert caught.value.next_path == "/p/arena"
