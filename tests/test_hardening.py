"""Part 6's edge: NUL and control characters, misleading errors and the offline /docs, against a real
server (and real Chromium for /docs). Every answer must be a one-line JSON 4xx, never a 500."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import api_server
import httpx
import pytest
from cli_runner import cli
from sqlalchemy.engine import Engine

from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters

TAG = uuid.uuid4().hex[:6]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("hardening")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(api_server.random_lines(3, 60)) + "\n", encoding="utf-8")
    directory = api_server.save_gpt2_with_biases(work / "gpt2", seed=4, bias_seed=5)
    name = f"hard-{TAG}"
    summary = extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus),
                                     params=default_parameters(top_n=5, window=32)), engine=engine)
    r = cli("users", "add", f"eve-{TAG}")
    assert r.returncode == 0, r.stderr
    try:
        yield {"name": name, "run_id": summary.run_id, "annotator": f"eve-{TAG}", "token": r.stdout.strip()}
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")


def one_line_error(r: httpx.Response, *statuses: int) -> str:
    """The response is one of ``statuses`` with a JSON body of exactly one one-line ``detail``."""
    assert r.status_code in statuses, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "\n" not in body["detail"] and len(body["detail"]) < 300, body["detail"]
    return body["detail"]


def test_nul_in_every_text_input_is_a_4xx(server: str, cat: dict[str, Any]) -> None:
    """The 11 routes of the issue, and bodies: NUL never reaches Postgres (which would answer 500)."""
    m, who = cat["name"], cat["annotator"]
    bad = "Smol%00LM"
    paths = [
        f"/api/v1/models/{bad}/layers", f"/api/v1/models/{bad}/neurons/1/1",
        f"/api/v1/models/{bad}/annotations/export", f"/api/v1/models/{bad}/agreement",
        f"/models/{bad}", f"/models/{bad}/search",
        f"/api/v1/models/{m}/neurons?annotator=a%00b", f"/models/{m}/search?annotator=a%00b",
        f"/api/v1/models/{m}/queue/next?annotator=a%00b",
        f"/api/v1/models/{m}/neurons/0/0/annotations/{who}%00x/revisions",
        # and the other text parameters and path segments
        f"/api/v1/models/{m}/neurons?q=red%00cat", f"/api/v1/models/{m}/neurons?token=text:%00",
        f"/api/v1/models/{m}/tokens/ca%00t/neurons", f"/api/v1/models/{m}/neurons?min_bias%00=1",
        "/api/v1/models/Smol%01LM/layers", f"/models/{m}/neurons/0/0?queue=%00",
    ]
    with httpx.Client(base_url=server, timeout=30) as c:
        for path in paths:
            detail = one_line_error(c.get(path), 404, 422)
            assert "500" not in detail and "DataError" not in detail
        # a JSON body with NUL in a string, and a form field with NUL
        r = c.put(f"/api/v1/models/{m}/neurons/0/0/annotations/{who}",
                  json={"label": "shallow", "description": "a\u0000b", "base_revision": None},
                  headers={"Authorization": f"Bearer {cat['token']}"})
        assert "description" in one_line_error(r, 422)
        r = c.post(f"/api/v1/models/{m}/probe", json={"text": "red\u0000cat"})
        assert "text" in one_line_error(r, 422)
        r = c.post("/signin", content=b"token=nc_%00x&next=/", headers={
            "content-type": "application/x-www-form-urlencoded", "origin": server})
        one_line_error(r, 422)
        # nothing of the above broke the server
        assert c.get("/healthz").status_code == 200


def test_misleading_errors_are_fixed(server: str, cat: dict[str, Any]) -> None:
    m, who = cat["name"], cat["annotator"]
    auth = {"Authorization": f"Bearer {cat['token']}"}
    with httpx.Client(base_url=f"{server}/api/v1", timeout=30) as c:
        put = f"/models/{m}/neurons/0/1/annotations/{who}"
        # an unknown body field is called a field, not a query parameter
        detail = one_line_error(c.put(put, json={"label": "shallow", "colour": "red"}, headers=auth), 422)
        assert "colour" in detail and "unknown field" in detail and "parameter" not in detail
        # a body that is not JSON: 400, as the OpenAPI document declares
        r = c.put(put, content=b"label=shallow", headers={**auth, "content-type": "application/json"})
        assert "JSON" in one_line_error(r, 400)
        spec = httpx.get(f"{server}/openapi.json").json()
        assert "400" in spec["paths"]["/api/v1/models/{model}/neurons/{layer}/{neuron}/annotations/{annotator}"]["put"]["responses"]
        # a base_revision from the future is not "outdated"
        created = c.put(put, json={"label": "shallow", "description": "x", "base_revision": None}, headers=auth)
        assert created.status_code in (200, 201), created.text
        detail = one_line_error(c.put(put, json={"label": "semantic", "description": "red things", "base_revision": 99}, headers=auth), 409)
        assert "outdated" not in detail and "does not exist" in detail and "latest is 1" in detail
        stale = c.put(put, json={"label": "semantic", "description": "red things", "base_revision": 1}, headers=auth)
        assert stale.status_code == 200, stale.text
        assert "outdated" in one_line_error(c.put(put, json={"label": "shallow+semantic", "description": "red things", "base_revision": 1}, headers=auth), 409)
        # a bad sort: a short line, not 1.3 kB of allowed values
        detail = one_line_error(c.get(f"/models/{m}/neurons", params={"sort": "loudness"}), 422)
        assert "loudness" in detail and len(detail) < 200
        # layer_min above layer_max: 422, not an empty page
        for path in (f"/models/{m}/neurons", f"/models/{m}/tokens/id:1/neurons", f"/models/{m}/neurons/0/0/similar"):
            assert "layer_min" in one_line_error(c.get(path, params={"layer_min": 1, "layer_max": 0}), 422)


@pytest.mark.parametrize("size", [9_000, 100_000])
def test_huge_url_gets_json(server: str, size: int) -> None:
    """A 100 kB URL (too long for httpx to send, so over a raw socket): 414 in JSON, not a plain-text 400."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /api/v1/models?x=" + b"a" * size + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    # 9 kB: the app's own limit (414); 100 kB: over llhttp's 80 kB, refused by the parser (400), in JSON too
    assert head.split(b" ")[1] == (b"414" if size < 80_000 else b"400"), head[:200]
    assert b"application/json" in head and b'"detail"' in body


def test_docs_render_offline_with_a_csp(server: str, browser: Any) -> None:
    """/docs draws its routes in Chromium with every request outside this origin refused."""
    r = httpx.get(f"{server}/docs")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    assert httpx.get(f"{server}/redoc").status_code == 404  # ReDoc would need a CDN: not offered
    outside: list[str] = []
    context = browser.new_context()
    try:
        def gate(route: Any) -> None:
            if route.request.url.startswith(server):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", gate)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.goto(f"{server}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        shown = page.inner_text("#swagger-ui")
        assert "/api/v1/models/{model}/tokens/{token}/neurons" in shown
        assert "Neuron Catalog" in shown
        assert not errors, errors
    finally:
        context.close()
    assert not outside, outside
