"""Issue 15, hardening of sign-in and blind labelling, against a real uvicorn server and Postgres, with
httpx and real headless Chromium: a page on another origin cannot sign a browser in (login CSRF); every
state-changing request from another origin is refused; the session cookie holds a random id, never the
annotator's token, and rotates, ends and expires; others' labels stay hidden until mine is saved.

Expected answers come from what the test wrote itself, plain SQL and the HTTP answers; nothing is
mocked. Annotators are made with the real `neuron-catalog users` command.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import api_server
import httpx
import pytest
from cli_runner import cli
from sqlalchemy import text
from sqlalchemy.engine import Engine

from catalog.config import settings
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters

TAG = uuid.uuid4().hex[:6]
EVIL = ("http://evil.example", "null")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("security")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(21, 60)) + "\n", encoding="utf-8")
    api_server.save_gpt2_with_biases(work / "gpt2", seed=8, bias_seed=9)
    name = f"sec-{TAG}"
    run = extract(ExtractRequest(model=str(work / "gpt2"), name=name, corpus=str(corpus),
                                 params=default_parameters(top_n=4, window=16)), engine=engine).run_id
    try:
        yield {"name": name, "run_id": run}
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")


def add_user(who: str) -> str:
    r = cli("users", "add", f"{who}-{TAG}")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def users(cat: dict[str, Any]) -> dict[str, str]:
    return {who: add_user(who) for who in ("vic", "mal", "ann", "bob", "cy")}


# --- helpers ----------------------------------------------------------------------------------


def set_cookie(r: httpx.Response) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for line in r.headers.get_list("set-cookie"):
        jar.load(line)
    return jar


def sign_in(server: str, token: str, *, cookie: str | None = None, origin: str | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"Origin": origin or server, **(headers or {})}
    if cookie is not None:
        h["Cookie"] = cookie
    return httpx.post(f"{server}/signin", data={"token": token, "next": "/"}, headers=h, timeout=30)


def session_of(server: str, token: str) -> str:
    """Sign in; the session cookie's value."""
    r = sign_in(server, token)
    assert r.status_code == 303, r.text
    return set_cookie(r)["nc_session"].value


def page_state(server: str, sid: str | None, *, name: str = "nc_session",
               headers: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(who the home page says is signed in, the page's CSRF token) for this cookie."""
    h = dict(headers or {})
    if sid is not None:
        h["Cookie"] = f"{name}={sid}"
    r = httpx.get(f"{server}/", headers=h, timeout=30)
    assert r.status_code == 200, r.text
    who = re.search(r"signed in as <b>([^<]+)</b>", r.text)
    csrf = re.search(r'<meta name="csrf-token" content="([^"]*)">', r.text)
    assert csrf is not None
    return (who.group(1) if who else None), csrf.group(1)


def sessions_of(engine: Engine, who: str) -> list[tuple[Any, ...]]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(text(
            "SELECT s.id_sha256, s.csrf_token, s.revoked_at FROM ui_sessions s JOIN annotators a ON a.id = s.annotator_id "
            "WHERE a.name = :n ORDER BY s.id"), {"n": f"{who}-{TAG}"})]


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def annotation_count(engine: Engine, cat: dict[str, Any], who: str, layer: int, neuron: int) -> int:
    with engine.connect() as c:
        return int(c.scalar(text(
            "SELECT count(*) FROM annotations a JOIN annotators u ON u.id = a.annotator_id JOIN catalog_models m "
            "ON m.id = a.model_id WHERE m.name = :m AND u.name = :u AND a.layer = :l AND a.neuron = :n"),
            {"m": cat["name"], "u": f"{who}-{TAG}", "l": layer, "n": neuron}))


# --- (a) a cross-site sign-in in Chromium ------------------------------------------------------


@pytest.fixture(scope="module")
def attacker_site(server: str, users: dict[str, str]) -> Iterator[str]:
    """A second server on another port (another origin, the same site) whose page auto-submits a
    sign-in form with the attacker's token to the app."""
    page = (f'<!doctype html><title>win a prize</title><form id="f" method="post" action="{server}/signin">'
            f'<input name="token" value="{users["mal"]}"><input name="next" value="/"></form>'
            '<script>document.getElementById("f").submit()</script>').encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _attack(context: Any, server: str, attacker: str) -> int:
    """Open the attacker's page in ``context``; the status of the app's answer to the forged sign-in."""
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    with pg.expect_response(lambda r: r.url == f"{server}/signin" and r.request.method == "POST") as answer:
        pg.goto(attacker)
    status = answer.value.status
    pg.close()
    return int(status)


def _header_name(context: Any, server: str) -> str:
    pg = context.new_page()
    pg.goto(f"{server}/")
    out = pg.locator("header").inner_text()
    pg.close()
    return str(out)


def test_a_page_elsewhere_cannot_sign_the_browser_in(browser: Any, server: str, attacker_site: str,
                                                      users: dict[str, str], engine: Engine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert attacker_site != server and attacker_site.rsplit(":", 1)[0] == server.rsplit(":", 1)[0]
    # a victim who is not signed in
    fresh = browser.new_context()
    try:
        assert _attack(fresh, server, attacker_site) == 403
        assert [c for c in fresh.cookies() if "nc_session" in c["name"]] == []
        header = _header_name(fresh, server)
        assert "Sign in" in header and f"mal-{TAG}" not in header
    finally:
        fresh.close()
    assert sessions_of(engine, "mal") == []  # the forged sign-in made no session at all
    # a victim signed in as themselves stays themselves
    victim = browser.new_context(base_url=server)
    try:
        pg = victim.new_page()
        pg.goto("/signin")
        pg.fill("#token", users["vic"])  # not keyboard.type: autofocus may land after the first keys
        with pg.expect_navigation(url=f"{server}/"):
            pg.press("#token", "Enter")
        before = [c["value"] for c in victim.cookies() if c["name"] == "nc_session"]
        assert len(before) == 1
        assert _attack(victim, server, attacker_site) == 403
        assert [c["value"] for c in victim.cookies() if c["name"] == "nc_session"] == before
        header = _header_name(victim, server)
        assert f"vic-{TAG}" in header and f"mal-{TAG}" not in header
    finally:
        victim.close()
    # control: the very same page does sign a browser in once its origin is trusted (so the refusal
    # above is the origin check's doing, not a broken attack page)
    monkeypatch.setattr(settings, "trusted_origins", f"https://other.example, {attacker_site}")
    control = browser.new_context()
    try:
        assert _attack(control, server, attacker_site) == 303
        assert f"mal-{TAG}" in _header_name(control, server)
    finally:
        control.close()


# --- (b) the origin check on every state-changing request --------------------------------------


def test_cross_origin_sign_in_refused(server: str, users: dict[str, str], engine: Engine) -> None:
    for origin in EVIL:
        r = sign_in(server, users["cy"], origin=origin)
        assert r.status_code == 403, (origin, r.text)
        assert "not this site" in r.json()["detail"] and "\n" not in r.json()["detail"]
        assert "set-cookie" not in r.headers
    # a Referer from elsewhere (no Origin), and neither header on a form post
    r = httpx.post(f"{server}/signin", data={"token": users["cy"]}, headers={"Referer": "http://evil.example/x"})
    assert r.status_code == 403 and "Referer" in r.json()["detail"]
    r = httpx.post(f"{server}/signin", data={"token": users["cy"]})
    assert r.status_code == 403 and "Origin or Referer" in r.json()["detail"]
    # a browser's form post asks for HTML: it gets the UI's error page
    r = sign_in(server, users["cy"], origin="null", headers={"Accept": "text/html,*/*"})
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html") and "not this site" in r.text
    assert sessions_of(engine, "cy") == []
    # same origin: signed in (by Origin, or by a same-origin Referer)
    assert sign_in(server, users["cy"]).status_code == 303
    r = httpx.post(f"{server}/signin", data={"token": users["cy"]}, headers={"Referer": f"{server}/signin"})
    assert r.status_code == 303 and set_cookie(r)["nc_session"].value
    assert len(sessions_of(engine, "cy")) == 2


def test_cross_origin_sign_out_and_saves_refused(server: str, cat: dict[str, Any], users: dict[str, str],
                                                 engine: Engine) -> None:
    sid = session_of(server, users["bob"])
    who, csrf = page_state(server, sid)
    assert who == f"bob-{TAG}" and csrf
    cookie = {"Cookie": f"nc_session={sid}"}
    form_url = f"{server}/models/{cat['name']}/neurons/0/1/annotate"
    form = {"label": "semantic", "description": "tried from elsewhere", "base_revision": "", "csrf_token": csrf}
    put_url = f"{server}/api/v1/models/{cat['name']}/neurons/0/2/annotations/bob-{TAG}"
    body = {"label": "shallow", "description": "tried from elsewhere"}
    bearer = {"Authorization": f"Bearer {users['bob']}"}
    for origin in (*EVIL, None):
        h = {**cookie, **({"Origin": origin} if origin else {})}
        assert httpx.post(f"{server}/signout", data={"csrf_token": csrf}, headers=h).status_code == 403
        assert httpx.post(form_url, data=form, headers=h).status_code == 403
        r = httpx.put(put_url, json=body, headers={**h, **bearer})
        assert r.status_code == 403 and "detail" in r.json(), r.text
    assert page_state(server, sid)[0] == f"bob-{TAG}"  # still signed in
    assert annotation_count(engine, cat, "bob", 0, 1) == 0 and annotation_count(engine, cat, "bob", 0, 2) == 0
    # same origin: each goes through
    same = {**cookie, "Origin": server}
    r = httpx.post(form_url, data=form, headers=same)
    assert r.status_code == 303, r.text
    assert annotation_count(engine, cat, "bob", 0, 1) == 1
    assert httpx.put(put_url, json=body, headers={**same, **bearer}).status_code == 201
    # a bearer-only client (curl, a script): no Origin, no cookie, still works
    r = httpx.put(f"{server}/api/v1/models/{cat['name']}/neurons/0/3/annotations/bob-{TAG}", json=body, headers=bearer)
    assert r.status_code == 201, r.text
    # but a present Origin is always checked, bearer or not
    r = httpx.put(f"{server}/api/v1/models/{cat['name']}/neurons/0/4/annotations/bob-{TAG}", json=body,
                  headers={**bearer, "Origin": "http://evil.example"})
    assert r.status_code == 403 and annotation_count(engine, cat, "bob", 0, 4) == 0
    assert httpx.post(f"{server}/signout", data={"csrf_token": csrf}, headers=same).status_code == 303
    assert page_state(server, sid)[0] is None


def test_origin_of_an_https_request_behind_the_proxy(server: str, users: dict[str, str]) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (its default): the request's origin is https
    https = {"X-Forwarded-Proto": "https"}
    assert sign_in(server, users["cy"], headers=https).status_code == 403  # Origin http:// is not https://
    r = sign_in(server, users["cy"], origin=server.replace("http://", "https://"), headers=https)
    assert r.status_code == 303, r.text


# --- (c) the cookie and its session ------------------------------------------------------------


def test_cookie_holds_a_random_session_id_not_the_token(server: str, users: dict[str, str], engine: Engine) -> None:
    token = users["ann"]
    r = sign_in(server, token)
    assert r.status_code == 303
    jar = set_cookie(r)
    assert list(jar) == ["nc_session"]
    m = jar["nc_session"]
    sid = m.value
    assert token not in r.headers["set-cookie"] and sid != token and len(sid) >= 40
    assert m["httponly"] and m["samesite"].lower() == "strict" and m["path"] == "/" and not m["secure"]
    assert int(m["max-age"]) == int(settings.session_max_days * 86400)
    stored = sessions_of(engine, "ann")
    assert [s[0] for s in stored] == [sha(sid)]  # only its hash is stored
    assert sha(token) not in {s[0] for s in stored}
    with engine.connect() as c:  # the id itself appears nowhere in the table
        assert c.scalar(text("SELECT count(*) FROM ui_sessions WHERE id_sha256 = :v OR csrf_token = :v"),
                        {"v": sid}) == 0
    assert page_state(server, sid)[0] == f"ann-{TAG}"
    hours = f"{settings.session_idle_hours:g}"
    assert f"after {hours} hours without use" in " ".join(httpx.get(f"{server}/signin").text.split())  # the form says so
    # the token itself is no cookie: the old design's cookie signs nobody in
    assert page_state(server, token, name="nc_token")[0] is None
    assert page_state(server, token)[0] is None


def test_session_rotates_at_sign_in_and_ends_at_sign_out(server: str, users: dict[str, str], engine: Engine) -> None:
    first = session_of(server, users["ann"])
    again = sign_in(server, users["ann"], cookie=f"nc_session={first}")  # the same browser signs in again
    second = set_cookie(again)["nc_session"].value
    assert second != first
    assert page_state(server, first)[0] is None and page_state(server, second)[0] == f"ann-{TAG}"
    revoked = {h: r for h, _, r in sessions_of(engine, "ann")}
    assert revoked[sha(first)] is not None and revoked[sha(second)] is None
    # a failed sign-in leaves the browser's session alone
    assert sign_in(server, "nc_wrong", cookie=f"nc_session={second}").status_code == 401
    assert page_state(server, second)[0] == f"ann-{TAG}"
    # sign-out deletes the session: the old cookie value no longer works, even if kept
    _, csrf = page_state(server, second)
    out = httpx.post(f"{server}/signout", data={"csrf_token": csrf},
                     headers={"Origin": server, "Cookie": f"nc_session={second}"})
    assert out.status_code == 303
    cleared = set_cookie(out)["nc_session"]
    assert cleared.value == "" and int(cleared["max-age"]) == 0
    assert sha(second) not in {h for h, _, _ in sessions_of(engine, "ann")}
    assert page_state(server, second)[0] is None


def test_session_expires_idle_and_absolute(server: str, users: dict[str, str], engine: Engine) -> None:
    idle, old = session_of(server, users["cy"]), session_of(server, users["cy"])
    assert page_state(server, idle)[0] == f"cy-{TAG}" and page_state(server, old)[0] == f"cy-{TAG}"
    hours = settings.session_idle_hours
    with engine.begin() as c:
        c.execute(text("UPDATE ui_sessions SET last_seen_at = now() - make_interval(mins => :m) WHERE id_sha256 = :h"),
                  {"m": int(hours * 60) + 1, "h": sha(idle)})
        c.execute(text("UPDATE ui_sessions SET expires_at = now() - interval '1 second' WHERE id_sha256 = :h"),
                  {"h": sha(old)})
    assert page_state(server, idle)[0] is None
    assert page_state(server, old)[0] is None
    # within the idle limit a session lives on, and a request records its use
    recent = session_of(server, users["cy"])
    with engine.begin() as c:
        c.execute(text("UPDATE ui_sessions SET last_seen_at = now() - make_interval(mins => :m) WHERE id_sha256 = :h"),
                  {"m": int(hours * 60) - 5, "h": sha(recent)})
    assert page_state(server, recent)[0] == f"cy-{TAG}"
    with engine.connect() as c:
        age = c.scalar(text("SELECT extract(epoch FROM now() - last_seen_at) FROM ui_sessions WHERE id_sha256 = :h"),
                       {"h": sha(recent)})
    assert age < hours * 3600 - 60  # moved forward by the page view


def test_revoking_the_annotator_ends_their_sessions(server: str, users: dict[str, str], engine: Engine) -> None:
    token = add_user("gone")
    a, b = session_of(server, token), session_of(server, token)
    assert page_state(server, a)[0] == f"gone-{TAG}" and page_state(server, b)[0] == f"gone-{TAG}"
    assert cli("users", "revoke", f"gone-{TAG}").returncode == 0
    assert page_state(server, a)[0] is None and page_state(server, b)[0] is None
    assert all(r is not None for _, _, r in sessions_of(engine, "gone"))
    # a new token later does not bring the old sessions back
    fresh = add_user("gone")
    assert page_state(server, a)[0] is None
    assert page_state(server, session_of(server, fresh))[0] == f"gone-{TAG}"


def test_csrf_token_is_per_session(server: str, cat: dict[str, Any], users: dict[str, str], engine: Engine) -> None:
    one, two = session_of(server, users["cy"]), session_of(server, users["cy"])
    csrf_one, csrf_two = page_state(server, one)[1], page_state(server, two)[1]
    assert csrf_one and csrf_two and csrf_one != csrf_two
    stored = {h: c for h, c, _ in sessions_of(engine, "cy")}
    assert stored[sha(one)] == csrf_one and stored[sha(two)] == csrf_two
    url = f"{server}/models/{cat['name']}/neurons/1/1/annotate"
    form = {"label": "none", "description": "", "base_revision": ""}
    # session one's token does not pass with session two's cookie
    r = httpx.post(url, data={**form, "csrf_token": csrf_one}, headers={"Origin": server, "Cookie": f"nc_session={two}"})
    assert r.status_code == 403 and "CSRF" in r.text
    assert annotation_count(engine, cat, "cy", 1, 1) == 0
    r = httpx.post(url, data={**form, "csrf_token": csrf_two}, headers={"Origin": server, "Cookie": f"nc_session={two}"})
    assert r.status_code == 303 and annotation_count(engine, cat, "cy", 1, 1) == 1


def test_secure_cookie_over_https_and_by_setting(server: str, users: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    https_origin = server.replace("http://", "https://")
    https = {"X-Forwarded-Proto": "https"}
    r = sign_in(server, users["cy"], origin=https_origin, headers=https)
    jar = set_cookie(r)
    assert list(jar) == ["__Host-nc_session"]
    m = jar["__Host-nc_session"]
    assert m["secure"] and m["httponly"] and m["path"] == "/" and not m["domain"]
    # over https only the __Host- cookie counts (a plain one could be planted by a sibling host)
    assert page_state(server, m.value, name="__Host-nc_session", headers=https)[0] == f"cy-{TAG}"
    assert page_state(server, m.value, name="nc_session", headers=https)[0] is None
    plain = session_of(server, users["cy"])
    assert page_state(server, plain, headers=https)[0] is None
    # forced on over plain http
    monkeypatch.setattr(settings, "cookie_secure", "true")
    forced = set_cookie(sign_in(server, users["cy"]))
    assert list(forced) == ["__Host-nc_session"] and forced["__Host-nc_session"]["secure"]
    # forced off even over https
    monkeypatch.setattr(settings, "cookie_secure", "false")
    off = set_cookie(sign_in(server, users["cy"], origin=https_origin, headers=https))
    assert list(off) == ["nc_session"] and not off["nc_session"]["secure"]


# --- (d) blind first labelling -----------------------------------------------------------------


def test_others_labels_stay_hidden_until_mine_is_saved(server: str, cat: dict[str, Any], users: dict[str, str]) -> None:
    name, layer, neuron = cat["name"], 1, 7
    secret = f"aardvark habits {TAG}"
    api = f"{server}/api/v1/models/{name}"
    url = f"{api}/neurons/{layer}/{neuron}/annotations"

    def bearer(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {users[who]}"}

    r = httpx.put(f"{url}/ann-{TAG}", json={"label": "semantic", "description": secret}, headers=bearer("ann"))
    assert r.status_code == 201, r.text
    # anonymous: none of it, but told how many are hidden
    anon = httpx.get(url)
    assert anon.status_code == 200 and anon.json() == [] and anon.headers["x-hidden-annotations"] == "1"
    assert httpx.get(url, headers={"Authorization": "Bearer nc_wrong"}).status_code == 401
    assert httpx.get(f"{url}/ann-{TAG}/revisions").status_code == 401
    assert httpx.get(f"{api}/annotations/export").status_code == 401
    card = httpx.get(f"{server}/models/{name}/neurons/{layer}/{neuron}")
    assert card.status_code == 200 and secret not in card.text and 'id="others-hidden"' in card.text
    # the author sees their own
    mine = httpx.get(url, headers=bearer("ann")).json()
    assert [(a["annotator"], a["description"]) for a in mine] == [(f"ann-{TAG}", secret)]
    # bob, before saving his: nothing of ann's, through the API, the revisions, the export or the card
    assert httpx.get(url, headers=bearer("bob")).json() == []
    assert httpx.get(f"{url}/ann-{TAG}/revisions", headers=bearer("bob")).status_code == 403
    export = httpx.get(f"{api}/annotations/export", headers=bearer("bob"))
    assert export.status_code == 200 and secret not in export.text
    sid = session_of(server, users["bob"])
    who, csrf = page_state(server, sid)
    assert who == f"bob-{TAG}"
    card = httpx.get(f"{server}/models/{name}/neurons/{layer}/{neuron}", headers={"Cookie": f"nc_session={sid}"})
    assert secret not in card.text and "1 other annotation hidden until you save yours" in card.text
    # bob saves his own through the card's form; now ann's shows everywhere for him
    r = httpx.post(f"{server}/models/{name}/neurons/{layer}/{neuron}/annotate",
                   data={"label": "shallow", "description": "bob's own view", "base_revision": "", "csrf_token": csrf},
                   headers={"Origin": server, "Cookie": f"nc_session={sid}"})
    assert r.status_code == 303, r.text
    card = httpx.get(f"{server}/models/{name}/neurons/{layer}/{neuron}", headers={"Cookie": f"nc_session={sid}"})
    assert secret in card.text and 'id="others-hidden"' not in card.text
    seen = httpx.get(url, headers=bearer("bob"))
    assert {(a["annotator"], a["label"]) for a in seen.json()} == {(f"ann-{TAG}", "semantic"), (f"bob-{TAG}", "shallow")}
    assert seen.headers["x-hidden-annotations"] == "0"
    hist = httpx.get(f"{url}/ann-{TAG}/revisions", headers=bearer("bob"))
    assert hist.status_code == 200 and hist.json()["revisions"][0]["description"] == secret
    rows = [json.loads(line) for line in httpx.get(f"{api}/annotations/export", headers=bearer("bob")).text.splitlines()]
    assert {(x["annotator"], x["layer"], x["neuron"]) for x in rows if x["annotator"] == f"ann-{TAG}"} == {
        (f"ann-{TAG}", layer, neuron)}
    # still hidden from readers and from anyone who has not labelled it
    assert httpx.get(url).json() == [] and httpx.get(url).headers["x-hidden-annotations"] == "2"
    assert httpx.get(url, headers=bearer("cy")).json() == []
    # aggregate agreement stays open
    assert httpx.get(f"{api}/agreement").status_code == 200
