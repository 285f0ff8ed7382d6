"""The review UI in real headless Chromium (Debian's package, driven by Playwright) against a real server
and Postgres: sign in, annotate three neurons by keyboard alone as the queue advances, find the
annotation through search, the layer page's plots, and a planted <script> prefix that must not run.
Screenshots of each page go to docs/screenshots/ (linked from the README)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_server
import httpx
import pytest
import tiny_models
from cli_runner import REPO, cli
from sqlalchemy import text
from sqlalchemy.engine import Engine

from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import session_scope

# The README links docs/screenshots/; a run refreshes them there only when asked (so that tests do
# not rewrite tracked files), and otherwise into a temp directory.
SHOTS = REPO / "docs" / "screenshots" if os.environ.get("CATALOG_UPDATE_SCREENSHOTS") == "1" else Path(
    os.environ.get("TMPDIR", "/tmp")) / "neuron-catalog-screenshots"
TAG = uuid.uuid4().hex[:6]
PLANT = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"><b>bold?</b> '
pytestmark = pytest.mark.usefixtures("one_thread")





@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("ui")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(9, 150)) + "\n", encoding="utf-8")
    api_server.save_gpt2_with_biases(work / "gpt2", seed=4, bias_seed=5)
    name = f"ui-{TAG}"
    run = extract(ExtractRequest(model=str(work / "gpt2"), name=name, corpus=str(corpus),
                                 params=default_parameters(top_n=6, window=32, label_min_prefix=2, label_min_triggers=2)),
                 engine=engine).run_id
    # Plant markup in the strongest trigger prefix of neuron 1/2: it must show as text, never run.
    with session_scope(engine) as s:
        s.execute(text(
            "UPDATE prefixes p SET text = :plant || p.text FROM triggers t WHERE t.run_id = :r AND t.layer = 1 "
            "AND t.neuron = 2 AND t.sign = 1 AND t.rank = 0 AND p.run_id = t.run_id AND p.document = t.document "
            "AND p.position = t.position"), {"plant": PLANT, "r": run})
    try:
        yield {"name": name, "run_id": run}
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")





@pytest.fixture(scope="module")
def token(cat: dict[str, Any]) -> str:
    r = cli("users", "add", f"ada-{TAG}")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    try:
        yield pg
    finally:
        context.close()


def shot(pg: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def card_key(url: str) -> tuple[int, int]:
    m = re.search(r"/neurons/(\d+)/(\d+)", url)
    assert m, url
    return int(m.group(1)), int(m.group(2))


def test_sign_in_by_keyboard(page: Any, token: str, server: str) -> None:
    page.goto("/signin")
    shot(page, "signin")
    # the token field has focus (autofocus is applied after load: wait for it, or the first keys are lost)
    page.wait_for_function("document.activeElement && document.activeElement.id === 'token'")
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server}/")
    assert f"ada-{TAG}" in page.locator("header").inner_text()
    assert token not in page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "nc_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert token not in cookie["value"]  # a random session id, never the token (tests/test_security.py)


def test_annotate_three_by_keyboard_as_the_queue_advances(page: Any, cat: dict[str, Any], server: str,
                                                          engine: Engine) -> None:
    page.goto(f"/models/{cat['name']}/review?queue=first&per_layer=3")
    page.wait_for_url(re.compile(r"/neurons/\d+/\d+"))
    seen: list[tuple[int, int]] = []
    keys = [("1", "shallow"), ("2", "semantic"), ("3", "shallow+semantic")]
    for i, (key, label) in enumerate(keys):
        here = card_key(page.url)
        assert here not in seen
        seen.append(here)
        if i == 0:
            shot(page, "card")
        page.keyboard.press(key)  # the label; focus moves to the description
        assert page.locator(f"input[name=label][value='{label}']").is_checked()
        page.keyboard.type(f"quokka pattern {i}")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"/neurons/\d+/\d+|/review"))
    assert card_key(page.url) not in seen  # the queue moved on to a fourth neuron
    assert not page.errors, page.errors
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT a.layer, a.neuron, a.label, a.description FROM annotations a JOIN annotators u ON "
            "u.id = a.annotator_id WHERE u.name = :u ORDER BY a.id"), {"u": f"ada-{TAG}"}).tuples().all()
    assert [tuple(r) for r in rows] == [(*k, label, f"quokka pattern {i}")
                                        for i, (k, (_, label)) in enumerate(zip(seen, keys, strict=True))]
    # drawn per layer: the first two come from different layers
    assert seen[0][0] != seen[1][0]
    # after saving, my label shows with the others' (none here), and my revision number
    page.goto(f"/models/{cat['name']}/neurons/{seen[0][0]}/{seen[0][1]}")
    assert "quokka pattern 0" in page.locator("#annotation-list").inner_text()


def test_find_the_annotation_through_search(page: Any, cat: dict[str, Any]) -> None:
    page.goto(f"/models/{cat['name']}/search")
    page.keyboard.press("/")  # focuses the pattern field
    page.keyboard.type('"quokka pattern 1"')
    with page.expect_navigation():
        page.keyboard.press("Enter")
    links = page.locator("#results tbody a").all_inner_texts()
    assert len(links) == 1
    shot(page, "search")
    with page.expect_navigation():
        page.locator("#results tbody a").first.focus()
        page.keyboard.press("Enter")
    assert "quokka pattern 1" in page.content()


def test_layer_and_model_pages_draw_plots(page: Any, cat: dict[str, Any], engine: Engine, server: str,
                                         token: str) -> None:
    # one annotation on a neuron that has a suggested label (the queue's may all lack one on this tiny
    # random model, whose triggers often sit at a document's first token), through the API
    with engine.connect() as c:
        layer, neuron, label = c.execute(text(
            "SELECT layer, neuron, suggested_label FROM neurons WHERE run_id = :r AND suggested_label IS NOT NULL "
            "ORDER BY layer, neuron LIMIT 1"), {"r": cat["run_id"]}).one()
    r = httpx.put(f"{server}/api/v1/models/{cat['name']}/neurons/{layer}/{neuron}/annotations/ada-{TAG}",
                  json={"label": label, "description": "agrees with the suggested label"},
                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code in (200, 201, 409), r.text  # 409: the queue test annotated this one already
    page.goto(f"/models/{cat['name']}/layers/0")
    plots = page.locator("svg.plot")
    assert plots.count() >= 3
    # the first scatter (bias against key norm) has one point per neuron of the layer
    assert page.locator("svg.plot").first.locator("circle").count() == tiny_models.D_MLP
    box = plots.first.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 100
    shot(page, "layer")
    page.goto(f"/models/{cat['name']}")
    assert page.locator("svg.plot").count() >= 3
    # the annotators' section counts the labels saved above against the suggested ones (plain SQL)
    with engine.connect() as c:
        hits, n = c.execute(text(
            "SELECT count(*) FILTER (WHERE a.label = n.suggested_label), count(*) FROM annotations a "
            "JOIN catalog_models m ON m.id = a.model_id JOIN neurons n ON n.run_id = m.current_run_id "
            "AND n.layer = a.layer AND n.neuron = a.neuron WHERE m.name = :n AND n.suggested_label IS NOT NULL"),
            {"n": cat["name"]}).one()
    assert n > 0 and f"({hits} of {n})" in page.locator("#agreement").inner_text()
    shot(page, "model")


def test_planted_script_in_a_prefix_does_not_run(page: Any, cat: dict[str, Any], server: str) -> None:
    page.goto(f"/models/{cat['name']}/neurons/1/2")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    first = page.locator("#triggers tbody tr").first.locator("td.prefix").inner_text()
    assert first.startswith("<script>window.__pwned = 1</script><img")
    assert page.locator("#triggers img").count() == 0 and page.locator("#triggers b").count() == 0
    # the search page shows the same prefix as a summary; escaped there too
    page.goto(f"/models/{cat['name']}/search?layer=1")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#results img").count() == 0
    # and the CSP forbids inline scripts outright
    csp = httpx.get(f"{server}/models/{cat['name']}/neurons/1/2").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def test_forms_refuse_cross_site_posts(server: str, cat: dict[str, Any], token: str) -> None:
    url = f"{server}/models/{cat['name']}/neurons/0/0/annotate"
    form = {"label": "shallow", "description": "x"}
    signed = httpx.post(f"{server}/signin", data={"token": token}, headers={"Origin": server})
    assert signed.status_code == 303
    same_site = {"Origin": server, "Cookie": f"nc_session={signed.cookies['nc_session']}"}
    # a foreign origin is refused before anything else (tests/test_security.py has the rest)
    assert httpx.post(url, data=form, headers={**same_site, "Origin": "http://evil.example"}).status_code == 403
    # with the session cookie but without the form's CSRF token, or a wrong one
    r = httpx.post(url, data=form, headers=same_site)
    assert r.status_code == 403 and "CSRF" in r.text
    r = httpx.post(url, data={**form, "csrf_token": "0" * 64}, headers=same_site)
    assert r.status_code == 403 and "CSRF" in r.text
    r = httpx.post(url, data=form, headers={"Origin": server})  # no cookie at all
    assert r.status_code == 401
