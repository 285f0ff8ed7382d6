"""The neuron card's keyboard and token chips in real headless Chromium (Playwright) against a real server
and Postgres: j/k inside and outside a review queue, / and the card's search box, and whitespace tokens
drawn visibly (" Paris" is not "Paris"; a newline is ↵).

The catalog is a weights-only tiny GPT-2 whose vocabulary holds 'Paris', ' Paris', a newline, a tab
and a no-break space besides tiny_models' words. The queue's order is read from the API as a second
annotator walks the same queue (the 'first' queue's order is the same for everyone); the chips'
expected tokens come from numpy over the model's own weights.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_server
import httpx
import numpy as np
import pytest
import tiny_models
import torch
from cli_runner import cli
from sqlalchemy.engine import Engine
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest

TAG = uuid.uuid4().hex[:6]
SPACE = api_server.SPACE
# byte-level forms: Ċ = "\n", ĉ = "\t", Âł = "\u00a0" (UTF-8 C2 A0)
EXTRA = {"Paris": "Paris", SPACE + "Paris": " Paris", "Ċ": "\n", "ĉ": "\t", "Âł": "\u00a0"}
SHOWN_TOP = 20  # the card shows the value's first 20 top tokens
QUEUE = {"queue": "first", "layer": "1", "per_layer": "20"}
pytestmark = pytest.mark.usefixtures("one_thread")


def card_key(url: str) -> tuple[int, int]:
    m = re.search(r"/neurons/(\d+)/(\d+)", url)
    assert m, url
    return int(m.group(1)), int(m.group(2))


def save_model(directory: Path) -> tuple[Path, dict[str, int]]:
    directory.mkdir(parents=True, exist_ok=True)
    words = tiny_models.WORDS
    vocab = {t: i for i, t in enumerate(tiny_models.SPECIAL + words + [SPACE + w for w in words] + list(EXTRA))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert {tok.decode([vocab[k]]) for k in EXTRA} == set(EXTRA.values())
    torch.manual_seed(11)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=tiny_models.D_MODEL, n_inner=tiny_models.D_MLP, n_layer=2,
                     n_head=2, n_positions=tiny_models.MAX_POS, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, {EXTRA[k]: vocab[k] for k in EXTRA}


@pytest.fixture(scope="module")
def cat(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory, ids = save_model(tmp_path_factory.mktemp("keys") / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(directory)
    values = np.stack([b.mlp.c_proj.weight.detach().double().numpy() for b in model.transformer.h])
    E = model.get_output_embeddings().weight.detach().double().numpy()
    tops = {(l, n): list(np.argsort(-(values[l, n] @ E.T), kind="stable")[:SHOWN_TOP])
            for l in range(values.shape[0]) for n in range(values.shape[1])}
    name = f"keys-{TAG}"
    extract(ExtractRequest(model=str(directory), name=name), engine=engine)  # weights only: fast
    try:
        yield {"name": name, "ids": ids, "tops": tops, "d_mlp": values.shape[1]}
    finally:
        api_server.drop_catalog(engine, name, annotators_like=f"%-{TAG}")


def add_user(name: str) -> str:
    r = cli("users", "add", f"{name}-{TAG}")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def users(cat: dict[str, Any]) -> dict[str, str]:
    return {"ada": add_user("ada"), "bob": add_user("bob")}


@pytest.fixture(scope="module")
def context(browser: Any, server: str, users: dict[str, str]) -> Iterator[Any]:
    """A browser context signed in as ada through the sign-in form."""
    ctx = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.goto("/signin")
    pg.wait_for_function("document.activeElement && document.activeElement.id === 'token'")  # autofocus lands after load
    pg.keyboard.type(users["ada"])
    with pg.expect_navigation():
        pg.keyboard.press("Enter")
    assert f"ada-{TAG}" in pg.locator("header").inner_text()
    pg.close()
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
        assert not errors, errors
    finally:
        pg.close()


def queue_order(server: str, cat: dict[str, Any], token: str, n: int) -> list[tuple[int, int]]:
    """The queue's first n neurons, as bob walks it through the API (annotating each to move on)."""
    out = []
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{server}/api/v1/models/{cat['name']}", headers=h, timeout=30) as c:
        for _ in range(n):
            item = c.get("/queue/next", params=QUEUE).json()
            assert not item["done"], item
            out.append((item["layer"], item["neuron"]))
            r = c.put(f"/neurons/{item['layer']}/{item['neuron']}/annotations/bob-{TAG}",
                      json={"label": "none", "description": "", "base_revision": None})
            assert r.status_code == 201, r.text
    return out


def press(pg: Any, key: str) -> None:
    with pg.expect_navigation():
        pg.keyboard.press(key)
    pg.wait_for_load_state()


def test_j_and_k_move_within_the_queue(page: Any, cat: dict[str, Any], users: dict[str, str], server: str) -> None:
    order = queue_order(server, cat, users["bob"], 3)
    assert len(set(order)) == 3 and all(layer == 1 for layer, _ in order)
    # the queue is not numeric order, so moving within it differs from moving to the neighbour
    assert any(b != (a[0], a[1] + 1) for a, b in itertools.pairwise(order))
    page.goto(f"/models/{cat['name']}/review?" + "&".join(f"{k}={v}" for k, v in QUEUE.items()))
    page.wait_for_url(re.compile(r"/neurons/\d+/\d+"))
    seen = [card_key(page.url)]
    for _ in range(2):
        assert "queue=first" in page.url and page.locator("#skip").count() == 1
        press(page, "j")
        seen.append(card_key(page.url))
    assert seen == order
    assert "queue=first" in page.url and "layer=1" in page.url
    press(page, "k")  # back to the one before, still in the queue
    assert card_key(page.url) == order[1] and "queue=first" in page.url
    press(page, "k")
    assert card_key(page.url) == order[0] and "queue=first" in page.url
    assert page.locator("#skip").count() == 1
    # save this one (0 = none, Enter): the queue opens the next; k goes back to the one just saved, by
    # the browser's history (nothing was skipped, so the card has no previous-in-queue link)
    page.keyboard.press("0")
    press(page, "Enter")
    page.wait_for_url(re.compile(r"/neurons/\d+/\d+"))
    assert card_key(page.url) == order[1] and "queue=first" in page.url
    assert page.locator("#prev").count() == 0
    press(page, "k")
    assert card_key(page.url) == order[0] and "queue=first" in page.url
    assert page.locator("input[name=label][value=none]").is_checked()  # the saved label
    # numeric neighbours stay reachable by mouse, outside the queue
    assert "queue=" not in (page.locator("#next-neuron").get_attribute("href") or "queue=")


def test_k_without_history_takes_back_the_last_skip(context: Any, cat: dict[str, Any], server: str) -> None:
    """Opened with no page before it (a new tab), k goes to the neuron skipped last, off the skip list."""
    (l0, n0), (l1, n1) = (1, 4), (1, 9)
    pg = context.new_page()
    try:
        pg.goto(f"/models/{cat['name']}/neurons/1/2?queue=first&layer=1&skip={l0}-{n0}&skip={l1}-{n1}")
        press(pg, "k")
        assert card_key(pg.url) == (l1, n1)
        assert "queue=first" in pg.url and f"skip={l0}-{n0}" in pg.url and f"skip={l1}-{n1}" not in pg.url
    finally:
        pg.close()


def test_j_and_k_outside_a_queue_are_the_numeric_neighbours(page: Any, cat: dict[str, Any]) -> None:
    last = cat["d_mlp"] - 1
    page.goto(f"/models/{cat['name']}/neurons/0/{last}")
    assert page.locator("#skip").count() == 0
    press(page, "j")
    assert card_key(page.url) == (1, 0) and "queue" not in page.url
    press(page, "j")
    assert card_key(page.url) == (1, 1)
    press(page, "k")
    assert card_key(page.url) == (1, 0)
    press(page, "k")
    assert card_key(page.url) == (0, last) and page.locator("#skip").count() == 0


def test_slash_focuses_the_card_search_box(page: Any, cat: dict[str, Any], users: dict[str, str],
                                           server: str) -> None:
    r = httpx.put(f"{server}/api/v1/models/{cat['name']}/neurons/0/3/annotations/ada-{TAG}",
                  json={"label": "semantic", "description": "capital cities of Europe", "base_revision": None},
                  headers={"Authorization": f"Bearer {users['ada']}"}, timeout=30)
    assert r.status_code == 201, r.text
    page.goto(f"/models/{cat['name']}/neurons/1/5")
    assert page.evaluate("document.activeElement.id") != "q"
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    assert page.evaluate("document.activeElement.closest('form').id") == "card-search"
    page.keyboard.type("capital")  # typed into the box: the letters are no shortcuts there
    assert card_key(page.url) == (1, 5)
    press(page, "Enter")
    assert page.url.startswith(f"{server}/models/{cat['name']}/search?") and "q=capital" in page.url
    assert page.locator("#results tbody a").all_inner_texts() == ["0/3"]


def chip(page: Any, section: str, token: str) -> Any:
    codes = " ".join(f"U+{ord(c):04X}" for c in token)
    loc = page.locator(f'#{section} .chip[title$="· {codes}"]')
    assert loc.count() == 1, (token, loc.count())
    return loc


def test_whitespace_tokens_are_drawn_visibly(page: Any, cat: dict[str, Any]) -> None:
    ids, tops = cat["ids"], cat["tops"]
    both = next(k for k, t in tops.items() if ids[" Paris"] in t and ids["Paris"] in t)
    page.goto(f"/models/{cat['name']}/neurons/{both[0]}/{both[1]}")
    spaced, plain = chip(page, "top-tokens", " Paris"), chip(page, "top-tokens", "Paris")
    assert spaced.inner_text() == "␣Paris" and plain.inner_text() == "Paris"
    marker = spaced.locator("span.ws")
    assert marker.get_attribute("title") == "U+0020 space"
    box = marker.bounding_box()
    assert box is not None and box["width"] > 2  # drawn, not an invisible space
    assert spaced.bounding_box()["width"] > plain.bounding_box()["width"]
    for token, mark in (("\n", "↵"), ("\t", "⇥"), ("\u00a0", "⍽")):
        key = next(k for k, t in tops.items() if ids[token] in t)
        page.goto(f"/models/{cat['name']}/neurons/{key[0]}/{key[1]}")
        c = chip(page, "top-tokens", token)
        assert c.inner_text() == mark
        assert c.locator("span.ws").get_attribute("title").startswith(f"U+{ord(token):04X}")
