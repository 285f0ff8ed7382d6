"""Annotations (part 4) over HTTP against a real uvicorn server and the session's real Postgres.

A tiny seeded GPT-2 catalog with a corpus is extracted here. Annotators are made with the real
`neuron-catalog users` command. Expected answers come from what the test itself wrote, plain SQL,
and kappas worked out by hand (or published) — never from catalog.annotations.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_server
import httpx
import pytest
import tiny_models
from cli_runner import cli
from sqlalchemy import delete, text
from sqlalchemy.engine import Engine

from catalog.annotations.agreement import cohen_kappa, fleiss_kappa
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import session_scope
from catalog.store.models import Annotation, AnnotationRevision

TAG = uuid.uuid4().hex[:6]
PARAMS: dict[str, Any] = {"top_n": 8, "window": 32}
pytestmark = pytest.mark.usefixtures("one_thread")





@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("annotations")
    lines = api_server.random_lines(5, 120)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    directory = api_server.save_gpt2_with_biases(work / "gpt2", seed=0, bias_seed=100)
    other = api_server.save_gpt2_with_biases(work / "gpt2-other", seed=7, bias_seed=107)
    name = f"ann-{TAG}"
    summary = extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus),
                                     params=default_parameters(**PARAMS)), engine=engine)
    try:
        yield {"name": name, "run_id": summary.run_id, "dir": directory, "other": other, "corpus": corpus}
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")


def add_user(name: str) -> str:
    r = cli("users", "add", name)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("nc_") and len(token) > 30
    return token


@pytest.fixture(scope="module")
def users(cat: dict[str, Any]) -> dict[str, str]:
    return {who: add_user(f"{who}-{TAG}") for who in ("ann", "bob", "cy")}








def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def put(api: httpx.Client, cat: dict[str, Any], who: str, token: str, layer: int, neuron: int,
        **body: Any) -> httpx.Response:
    body.setdefault("description", "ends with 'cat'")
    return api.put(f"/models/{cat['name']}/neurons/{layer}/{neuron}/annotations/{who}-{TAG}", json=body,
                   headers=auth(token))


def triggers_of(engine: Engine, run_id: int, layer: int, neuron: int) -> list[tuple[int, int]]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(text(  # type: ignore[misc]
            "SELECT document, position FROM triggers WHERE run_id = :r AND layer = :l AND neuron = :n "
            "ORDER BY sign DESC, rank"), {"r": run_id, "l": layer, "n": neuron})]


# --- agreement maths against published and hand-worked values -------------------------------


def test_cohen_kappa_published_example() -> None:
    # Wikipedia, "Cohen's kappa": 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> 0.4
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    kappa, observed = cohen_kappa(pairs)
    assert observed == pytest.approx(0.7)
    assert kappa == pytest.approx(0.4)


def test_fleiss_kappa_published_example() -> None:
    from collections import Counter

    # Wikipedia, "Fleiss' kappa": 10 subjects, 14 raters, 5 categories -> P-bar 0.378, kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [Counter({str(j): n for j, n in enumerate(row) if n}) for row in table]
    kappa, observed = fleiss_kappa(items)
    assert observed == pytest.approx(0.378, abs=5e-4)
    assert kappa == pytest.approx(0.210, abs=5e-4)


# --- annotators and tokens ------------------------------------------------------------------


def test_users_are_stored_hashed_and_listed(users: dict[str, str], engine: Engine) -> None:
    with engine.connect() as c:
        stored = dict(c.execute(text("SELECT name, token_sha256 FROM annotators WHERE name LIKE :p"),
                                {"p": f"%-{TAG}"}).tuples().all())
    for who, token in users.items():
        assert stored[f"{who}-{TAG}"] == hashlib.sha256(token.encode()).hexdigest()
        assert token not in json.dumps(stored)
    listed = cli("users", "list")
    assert listed.returncode == 0 and f"bob-{TAG}" in listed.stdout and "active" in listed.stdout
    again = cli("users", "add", f"bob-{TAG}")
    assert again.returncode == 1 and again.stderr.startswith("error:") and "already has a token" in again.stderr


def test_writing_needs_a_valid_token_of_the_named_annotator(api: httpx.Client, cat: dict[str, Any],
                                                            users: dict[str, str], engine: Engine) -> None:
    url = f"/models/{cat['name']}/neurons/0/1/annotations/ann-{TAG}"
    body = {"label": "shallow", "description": "ends with 'the'"}
    assert api.put(url, json=body).status_code == 401
    assert api.put(url, json=body, headers=auth("nc_not-a-token")).status_code == 401
    assert api.put(url, json=body, headers={"Authorization": users["ann"]}).status_code == 401  # no scheme
    r = api.put(url, json=body, headers=auth(users["bob"]))  # bob writing ann's annotation
    assert r.status_code == 403 and "ann-" in r.json()["detail"]
    # a revoked token stops working; the annotations stay
    temp = add_user(f"temp-{TAG}")
    assert put(api, cat, "temp", temp, 0, 2, label="semantic", description="colours").status_code == 201
    revoked = cli("users", "revoke", f"temp-{TAG}")
    assert revoked.returncode == 0, revoked.stderr
    assert put(api, cat, "temp", temp, 0, 3, label="semantic", description="colours").status_code == 401
    with engine.connect() as c:
        listed = c.scalars(text(
            "SELECT u.name FROM annotations a JOIN annotators u ON u.id = a.annotator_id JOIN catalog_models m "
            "ON m.id = a.model_id WHERE m.name = :m AND a.layer = 0 AND a.neuron = 2"), {"m": cat["name"]}).all()
    assert listed == [f"temp-{TAG}"]


def test_bad_input(api: httpx.Client, cat: dict[str, Any], users: dict[str, str], engine: Engine) -> None:
    tok = users["cy"]
    cases = [
        ({"label": "deep"}, 422, "label"),
        ({"label": "semantic", "description": "   "}, 422, "description"),
        ({"label": "shallow", "description": ""}, 422, "description"),
        ({"label": "shallow", "examples": [{"document": 10**6, "position": 0}]}, 422, "examples"),
        ({"label": "shallow", "extra": 1}, 422, "extra"),
        ({"label": "shallow", "base_revision": 0}, 422, "base_revision"),
    ]
    for body, status, word in cases:
        r = put(api, cat, "cy", tok, 1, 5, **body) if "description" not in body else api.put(
            f"/models/{cat['name']}/neurons/1/5/annotations/cy-{TAG}", json=body, headers=auth(tok))
        assert r.status_code == status, (body, r.text)
        assert word in r.json()["detail"], (body, r.text)
    assert put(api, cat, "cy", tok, 9, 0, label="shallow").status_code == 404  # layer out of range
    assert api.put(f"/models/nope-{TAG}/neurons/0/0/annotations/cy-{TAG}", json={"label": "none"},
                   headers=auth(tok)).status_code == 404
    bad_json = api.put(f"/models/{cat['name']}/neurons/1/5/annotations/cy-{TAG}", content=b"{",
                       headers={**auth(tok), "Content-Type": "application/json"})
    assert bad_json.status_code in (400, 422)
    # none needs no description; nothing above was written
    assert put(api, cat, "cy", tok, 1, 5, label="none", description="").status_code == 201
    with engine.connect() as c:
        n = c.scalar(text("SELECT count(*) FROM annotation_revisions r JOIN annotations a ON a.id = r.annotation_id "
                          "JOIN annotators u ON u.id = a.annotator_id WHERE u.name = :u AND a.layer = 1 AND a.neuron = 5"),
                     {"u": f"cy-{TAG}"})
    assert n == 1


def test_revisions_and_stale_edits(api: httpx.Client, cat: dict[str, Any], users: dict[str, str],
                                   engine: Engine) -> None:
    tok = users["ann"]
    examples = [{"document": d, "position": p} for d, p in triggers_of(engine, cat["run_id"], 1, 3)[:2]]
    first = put(api, cat, "ann", tok, 1, 3, label="shallow", description="ends with 'cat'", examples=examples)
    assert first.status_code == 201, first.text
    a = first.json()
    assert (a["revision"], a["label"], a["examples"], a["run_id"]) == (1, "shallow", examples, cat["run_id"])
    assert a["on_other_weights"] is False
    again = put(api, cat, "ann", tok, 1, 3, label="semantic", description="animals")  # a second "first"
    assert again.status_code == 409 and "base_revision 1" in again.json()["detail"]
    second = put(api, cat, "ann", tok, 1, 3, label="semantic", description="animals", base_revision=1)
    assert second.status_code == 200 and second.json()["revision"] == 2
    stale = put(api, cat, "ann", tok, 1, 3, label="none", description="", base_revision=1)
    assert stale.status_code == 409 and "latest is 2" in stale.json()["detail"]
    hist = api.get(f"/models/{cat['name']}/neurons/1/3/annotations/ann-{TAG}/revisions", headers=auth(tok)).json()
    assert [(r["revision"], r["label"], r["description"]) for r in hist["revisions"]] == [
        (1, "shallow", "ends with 'cat'"), (2, "semantic", "animals")]
    assert hist["revisions"][0]["examples"] == examples and hist["revisions"][1]["examples"] == []
    assert hist["annotation"]["revision"] == 2
    assert api.get(f"/models/{cat['name']}/neurons/1/3/annotations/bob-{TAG}/revisions",
                   headers=auth(tok)).status_code == 404


def _race(calls: list[Any]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_annotators_saving_at_the_same_moment_both_kept(server: str, cat: dict[str, Any],
                                                            users: dict[str, str]) -> None:
    def call(who: str, label: str) -> Any:
        def go() -> httpx.Response:
            with httpx.Client(base_url=f"{server}/api/v1", timeout=60) as c:
                return put(c, cat, who, users[who], 0, 7, label=label, description=f"{who}'s view")
        return go

    results = _race([call("ann", "shallow"), call("bob", "semantic"), call("cy", "shallow+semantic")])
    assert [r.status_code for r in results] == [201, 201, 201], [r.text for r in results]
    with httpx.Client(base_url=f"{server}/api/v1") as c:
        listed = c.get(f"/models/{cat['name']}/neurons/0/7/annotations", headers=auth(users["ann"])).json()
    assert {(a["annotator"], a["label"], a["description"]) for a in listed} == {
        (f"ann-{TAG}", "shallow", "ann's view"), (f"bob-{TAG}", "semantic", "bob's view"),
        (f"cy-{TAG}", "shallow+semantic", "cy's view")}


def test_one_annotator_racing_two_revisions_one_wins(server: str, cat: dict[str, Any], users: dict[str, str]) -> None:
    with httpx.Client(base_url=f"{server}/api/v1", timeout=60) as c:
        assert put(c, cat, "bob", users["bob"], 0, 9, label="shallow").status_code == 201

    def call(label: str) -> Any:
        def go() -> httpx.Response:
            with httpx.Client(base_url=f"{server}/api/v1", timeout=60) as c:
                return put(c, cat, "bob", users["bob"], 0, 9, label=label, description=label, base_revision=1)
        return go

    results = _race([call("semantic"), call("none")])
    assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    winner = next(r for r in results if r.status_code == 200).json()
    with httpx.Client(base_url=f"{server}/api/v1") as c:
        hist = c.get(f"/models/{cat['name']}/neurons/0/9/annotations/bob-{TAG}/revisions",
                     headers=auth(users["bob"])).json()
    assert [r["revision"] for r in hist["revisions"]] == [1, 2]
    assert hist["revisions"][1]["label"] == winner["label"]


def test_search_by_annotation(api: httpx.Client, cat: dict[str, Any], users: dict[str, str], engine: Engine) -> None:
    tok = users["cy"]
    assert put(api, cat, "cy", tok, 1, 11, label="semantic", description="zebrafish habitats").status_code == 201
    name = cat["name"]

    def keys(params: dict[str, Any], token: str | None = tok) -> set[tuple[int, int]]:
        r = api.get(f"/models/{name}/neurons", params={**params, "limit": 500},
                    headers=auth(token) if token else None)
        assert r.status_code == 200, r.text
        return {(n["layer"], n["neuron"]) for n in r.json()["items"]}

    assert keys({"q": "zebrafish"}) == {(1, 11)}  # no corpus prefix has this word
    assert keys({"q": '"zebrafish habitats"'}) == {(1, 11)}
    assert keys({"q": "zebrafish -habitats"}) == set()
    # blind first labelling: a reader's pattern does not reach descriptions, nor another annotator's
    assert keys({"q": "zebrafish"}, token=None) == set()
    assert keys({"q": "zebrafish"}, token=users["bob"]) == set()
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT a.layer, a.neuron, a.label, u.name FROM annotations a JOIN annotators u ON u.id = a.annotator_id "
            "JOIN catalog_models m ON m.id = a.model_id WHERE m.name = :n"), {"n": name}).tuples().all()
        everyone = {(layer, n) for layer in range(2) for n in range(tiny_models.D_MLP)}
    annotated = {(r[0], r[1]) for r in rows}
    mine = {(r[0], r[1]) for r in rows if r[3] == f"cy-{TAG}"}
    assert annotated and keys({"annotated": "true"}, token=None) == annotated  # that someone did is no label
    assert keys({"annotated": "false"}, token=None) == everyone - annotated
    others = {(r[0], r[1]) for r in rows if r[3] != f"cy-{TAG}"}
    assert others - mine, "the test needs neurons that only others have labelled"
    for label in ("shallow", "semantic", "none"):
        # only the neurons cy has annotated too: others' labels elsewhere stay hidden from cy
        assert keys({"human_label": label}) == {(r[0], r[1]) for r in rows if r[2] == label} & mine
    assert keys({"annotator": f"cy-{TAG}"}) == mine
    assert keys({"annotator": f"ann-{TAG}"}) == {(r[0], r[1]) for r in rows if r[3] == f"ann-{TAG}"} & mine
    assert keys({"annotator": f"cy-{TAG}", "layer": 1, "human_label": "semantic"}) == {
        (r[0], r[1]) for r in rows if r[3] == f"cy-{TAG}" and r[0] == 1 and r[2] == "semantic"}
    for params in ({"human_label": "semantic"}, {"annotator": f"cy-{TAG}"}, {"annotator": "nobody-at-all"}):
        r = api.get(f"/models/{name}/neurons", params=params)  # a reader: no filtering by labels at all
        assert r.status_code == 401 and "blind" in r.json()["detail"], r.text
    assert api.get(f"/models/{name}/neurons", params={"human_label": "deep"}).status_code == 422
    assert api.get(f"/models/{name}/neurons", params={"annotator": "nobody-at-all"}, headers=auth(tok)).status_code == 422


def test_review_queue_per_layer(api: httpx.Client, cat: dict[str, Any], engine: Engine) -> None:
    tok = add_user(f"queue-{TAG}")
    url = f"/models/{cat['name']}/queue/next"
    assert api.get(url).status_code == 401
    seen: list[tuple[int, int]] = []
    for _ in range(5):  # 2 per layer over 2 layers, then done
        item = api.get(url, params={"per_layer": 2}, headers=auth(tok)).json()
        if item["done"]:
            break
        key = (item["layer"], item["neuron"])
        assert key not in seen
        seen.append(key)
        r = put(api, cat, "queue", tok, *key, label="none", description="")
        assert r.status_code == 201, r.text
    assert item["done"] is True and len(seen) == 4
    assert sorted(layer for layer, _ in seen) == [0, 0, 1, 1]
    assert [layer for layer, _ in seen[:2]] in ([0, 1], [1, 0])  # drawn across layers, not one layer first
    assert {p["layer"]: p["mine"] for p in item["progress"]} == {0: 2, 1: 2}
    # the same fixed draw for everyone: another annotator's first item is this one's first
    other = add_user(f"queue2-{TAG}")
    theirs = api.get(url, params={"per_layer": 2}, headers=auth(other)).json()
    assert (theirs["layer"], theirs["neuron"]) == seen[0]
    # restricted by a search filter
    only = api.get(url, params={"per_layer": 3, "layer": 1, "max_alignment": 0.0}, headers=auth(tok)).json()
    with engine.connect() as c:
        allowed = {n for (n,) in c.execute(text(
            "SELECT neuron FROM neurons WHERE run_id = :r AND layer = 1 AND alignment <= 0"), {"r": cat["run_id"]})}
    if only["done"]:
        assert not allowed - {n for layer, n in seen if layer == 1}
    else:
        assert only["layer"] == 1 and only["neuron"] in allowed and (1, only["neuron"]) not in seen
    # second opinions: what others annotated and I did not, fewest annotators first
    second = api.get(url, params={"queue": "second"}, headers=auth(other)).json()
    with engine.connect() as c:
        counts = dict(c.execute(text(
            "SELECT a.layer || '/' || a.neuron, count(*) FROM annotations a JOIN catalog_models m ON m.id = a.model_id "
            "WHERE m.name = :n GROUP BY 1"), {"n": cat["name"]}).tuples().all())
    assert not second["done"]
    got = f"{second['layer']}/{second['neuron']}"
    assert got in counts and counts[got] == min(counts.values()) == second["others"]
    assert api.get(url, params={"queue": "third"}, headers=auth(tok)).status_code == 422


def test_agreement_against_hand_computation(api: httpx.Client, cat: dict[str, Any], users: dict[str, str],
                                            engine: Engine) -> None:
    """Two fresh annotators on four layer-... neurons: kappa worked out by hand."""
    a, b = add_user(f"ka-{TAG}"), add_user(f"kb-{TAG}")
    la = ["shallow", "shallow", "semantic", "none"]
    lb = ["shallow", "semantic", "semantic", "none"]
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert put(api, cat, "ka", a, 1, 20 + i, label=x, description="d" if x != "none" else "").status_code == 201
        assert put(api, cat, "kb", b, 1, 20 + i, label=y, description="d" if y != "none" else "").status_code == 201
    rep = api.get(f"/models/{cat['name']}/agreement").json()
    pair = next(p for p in rep["pairs"] if set(p["annotators"]) == {f"ka-{TAG}", f"kb-{TAG}"})
    # p_o = 3/4; marginals ka (2,1,1), kb (1,2,1): p_e = (2+2+1)/16 = 5/16; kappa = (3/4-5/16)/(11/16) = 7/11
    assert pair["items"] == 4 and pair["kappa"] == pytest.approx(7 / 11)
    # the human-vs-suggested rate over every current label, by plain SQL
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT a.label, n.suggested_label, a.layer FROM annotations a JOIN catalog_models m ON m.id = a.model_id "
            "JOIN neurons n ON n.run_id = m.current_run_id AND n.layer = a.layer AND n.neuron = a.neuron "
            "WHERE m.name = :n AND n.suggested_label IS NOT NULL"), {"n": cat["name"]}).tuples().all()
    assert rep["with_suggested"]["annotations"] == len(rows)
    assert rep["with_suggested"]["matches"] == sum(h == s for h, s, _ in rows)
    layer1 = next(x for x in rep["layers"] if x["layer"] == 1)
    assert layer1["with_suggested"]["matches"] == sum(h == s for h, s, layer in rows if layer == 1)
    assert layer1["between_annotators"]["method"] in ("cohen", "fleiss")
    cli_out = cli("annotations", "agreement", "--model", cat["name"])
    assert cli_out.returncode == 0 and "overall" in cli_out.stdout and "kappa" in cli_out.stdout


def test_export_import_round_trip(api: httpx.Client, cat: dict[str, Any], users: dict[str, str], engine: Engine,
                                  tmp_path: Path) -> None:
    assert put(api, cat, "bob", users["bob"], 1, 0, label="shallow", description="ends with ','").status_code == 201
    assert put(api, cat, "bob", users["bob"], 1, 0, label="shallow", description="ends with ', '",
               base_revision=1).status_code == 200
    name = cat["name"]

    def snapshot() -> list[tuple[Any, ...]]:
        with engine.connect() as c:
            return sorted(tuple(r) for r in c.execute(text(
                "SELECT a.layer, a.neuron, u.name, r.revision, r.label, r.description, r.examples::text, r.run_id "
                "FROM annotation_revisions r JOIN annotations a ON a.id = r.annotation_id "
                "JOIN annotators u ON u.id = a.annotator_id JOIN catalog_models m ON m.id = a.model_id "
                "WHERE m.name = :n"), {"n": name}))

    before = snapshot()
    for suffix in ("jsonl", "csv"):
        out = tmp_path / f"ann.{suffix}"
        r = cli("annotations", "export", "--model", name, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert f"wrote {len(before)} annotation revisions" in r.stdout
        assert api.get(f"/models/{name}/annotations/export", params={"format": suffix}).status_code == 401
        http = api.get(f"/models/{name}/annotations/export", params={"format": suffix}, headers=auth(users["bob"]))
        assert http.status_code == 200
        if suffix == "jsonl":  # over HTTP: the CLI's rows of the neurons bob annotated (blind first labelling)
            every = out.read_text(encoding="utf-8").splitlines()
            bobs = {(r["layer"], r["neuron"]) for r in map(json.loads, every) if r["annotator"] == f"bob-{TAG}"}
            visible = [line for line in every if (json.loads(line)["layer"], json.loads(line)["neuron"]) in bobs]
            assert http.text.splitlines() == visible and len(visible) < len(every)
            assert any(json.loads(line)["annotator"] != f"bob-{TAG}" for line in visible)
        again = cli("annotations", "import", str(out))  # everything already there
        assert again.returncode == 0, again.stderr
        assert f"0 revisions added, {len(before)} already present" in again.stdout
        assert snapshot() == before
    # wipe the model's annotations and restore them from the CSV
    with session_scope(engine) as s:
        model_id = s.scalar(text("SELECT id FROM catalog_models WHERE name = :n"), {"n": name})
        s.execute(delete(Annotation).where(Annotation.model_id == model_id))
    assert snapshot() == []
    restored = cli("annotations", "import", str(tmp_path / "ann.csv"))
    assert restored.returncode == 0, restored.stderr
    assert snapshot() == before
    # a conflicting file fails whole and writes nothing
    lines = (tmp_path / "ann.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows[-1]["description"] = "something else"
    rows.append({**rows[0], "layer": 0, "neuron": 23, "annotator": f"newbie-{TAG}", "revision": 1})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    failed = cli("annotations", "import", str(bad))
    assert failed.returncode == 1 and failed.stderr.startswith("error:") and "differs" in failed.stderr
    assert snapshot() == before
    with engine.connect() as c:
        assert c.scalar(text("SELECT count(*) FROM annotators WHERE name = :n"), {"n": f"newbie-{TAG}"}) == 0
    for content, word in ((b"\x00\xff\xfe", "UTF-8"), (b"", "no annotation rows"), (b"[1]\n", "JSON object")):
        f = tmp_path / "broken.jsonl"
        f.write_bytes(content)
        r = cli("annotations", "import", str(f))
        assert r.returncode == 1 and word in r.stderr, r.stderr


def test_reextraction_keeps_annotations(api: httpx.Client, cat: dict[str, Any], users: dict[str, str],
                                        engine: Engine) -> None:
    name = cat["name"]
    assert put(api, cat, "ann", users["ann"], 0, 4, label="semantic", description="colours").status_code == 201
    before = api.get(f"/models/{name}/neurons/0/4/annotations", headers=auth(users["ann"])).json()
    with engine.connect() as c:
        count_before = c.scalar(text("SELECT count(*) FROM annotation_revisions"))
    # the same weights again: a new run; the annotations stay, made on the same weights
    same = extract(ExtractRequest(model=str(cat["dir"]), name=name, corpus=str(cat["corpus"]),
                                  params=default_parameters(**PARAMS)), engine=engine)
    assert same.run_id != cat["run_id"]
    after = api.get(f"/models/{name}/neurons/0/4/annotations", headers=auth(users["ann"])).json()
    assert [(a["annotator"], a["label"], a["run_id"], a["on_other_weights"]) for a in after] == [
        (a["annotator"], a["label"], a["run_id"], False) for a in before]
    assert after[0]["run_id"] == cat["run_id"]
    # other weights under the same name: still kept, and marked as made on other weights
    other = extract(ExtractRequest(model=str(cat["other"]), name=name, corpus=str(cat["corpus"]),
                                   params=default_parameters(**PARAMS)), engine=engine)
    moved = api.get(f"/models/{name}/neurons/0/4/annotations", headers=auth(users["ann"])).json()
    assert [a["annotator"] for a in moved] == [a["annotator"] for a in before]
    assert all(a["on_other_weights"] for a in moved)
    with engine.connect() as c:
        assert c.scalar(text("SELECT count(*) FROM annotation_revisions")) == count_before
        assert c.scalar(text("SELECT count(*) FROM extraction_runs WHERE id = :r"), {"r": cat["run_id"]}) == 0
    # a revision on the new weights records them
    rev = put(api, cat, "ann", users["ann"], 0, 4, label="semantic", description="colours", base_revision=1).json()
    assert rev["run_id"] == other.run_id and rev["on_other_weights"] is False
    with session_scope(engine) as s:
        assert s.get(AnnotationRevision, (s.scalar(text(
            "SELECT a.id FROM annotations a JOIN annotators u ON u.id = a.annotator_id "
            "WHERE u.name = :u AND a.layer = 0 AND a.neuron = 4"), {"u": f"ann-{TAG}"}), 1)) is not None
