"""Review UI pages: home, sign in/out, the neuron card with the annotation form, the review queue,
search and similar neurons. Thin: queries come from catalog.read and catalog.annotations."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import text

from catalog.annotations import service, sessions
from catalog.annotations.schemas import AnnotationWrite
from catalog.api.annotations import QueueParams
from catalog.api.deps import SessionDep, WriteSessionDep
from catalog.api.routes import SearchParams, search_query
from catalog.config import settings
from catalog.read import catalog, search, vectors
from catalog.read.errors import InvalidParameter, ReadError, Unauthorized
from catalog.read.schemas import STAT_MEANINGS
from catalog.store.models import HUMAN_LABELS, LABELS, NEURON_STATS
from catalog.ui import auth
from catalog.ui.templating import render

router = APIRouter(include_in_schema=False)
# Keys of the label choices (seed 001's classes; 0 = no clear pattern).
LABEL_KEYS = {"shallow": "1", "semantic": "2", "shallow+semantic": "3", "none": "0"}
QUEUE_KEYS = {"queue", "per_layer", "skip", *SearchParams.model_fields}


def _error_page(request: Request, exc: ReadError) -> HTMLResponse:
    return render(request, "ui_error.html", {"title": "Error", "status": exc.status, "message": str(exc)},
                  status_code=exc.status)


def _params(request: Request, keys: set[str]) -> dict[str, Any]:
    """Query parameters as a dict of lists for repeatable ones, dropping empty form fields."""
    out: dict[str, Any] = {}
    for k, v in request.query_params.multi_items():
        if v == "" or k not in keys:
            continue
        if k == "layer":
            out.setdefault("layer", []).append(v)
        else:
            out[k] = v
    return out


def _queue_context(request: Request) -> str:
    """The review-queue parameters this page was reached with, as a query string ('' outside a queue)."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k in QUEUE_KEYS and v != ""]
    return urlencode(items) if any(k == "queue" for k, _ in items) else ""


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, user: auth.PageUser) -> HTMLResponse:
    try:
        models = [(e, r) for e, r in catalog.list_models(session, limit=500) if r is not None]
    except ReadError as exc:
        return _error_page(request, exc)
    return render(request, "home.html", {"title": "Catalogs", "models": models})


@router.get("/signin", response_class=HTMLResponse)
def signin_form(request: Request, user: auth.PageUser, next: str = "/") -> HTMLResponse:
    return render(request, "signin.html", _signin_context(next, None))


def _signin_context(next: str, error: str | None) -> dict[str, Any]:
    return {"title": "Sign in", "next": _safe_next(next), "error": error,
            "idle_hours": f"{settings.session_idle_hours:g}", "max_days": f"{settings.session_max_days:g}"}


def _safe_next(target: str) -> str:
    # Only paths on this site: an open redirect would let a link send a signed-in annotator anywhere.
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.post("/signin", response_class=HTMLResponse)
def signin(request: Request, session: WriteSessionDep, token: Annotated[str, Form(max_length=200)] = "",
           next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    # (A cross-origin post never gets here: catalog.web_security refuses it, so no page elsewhere can
    # sign this browser in as someone else.)
    who = service.authenticate(session, token.strip())
    if who is None:
        auth.resolve(request, session)  # whoever was signed in stays signed in
        return render(request, "signin.html", _signin_context(next, "Unknown or revoked token."), status_code=401)
    # A new random session at every sign-in; the browser's previous one (if any) is revoked.
    session_id, _ = sessions.start(session, who, replacing=auth.session_id(request))
    response = RedirectResponse(_safe_next(next), status_code=303)
    auth.set_session_cookie(request, response, session_id)
    return response


@router.post("/signout", response_class=HTMLResponse)
def signout(request: Request, session: WriteSessionDep, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    auth.resolve(request, session)
    try:
        auth.check_csrf(request, csrf_token)
    except auth.CsrfFailed as exc:
        return _error_page(request, exc)
    sessions.end(session, auth.session_id(request) or "")
    response = RedirectResponse("/", status_code=303)
    auth.clear_session_cookie(request, response)
    return response


# One primary-key lookup per trigger (LIMIT 1 keeps the planner from flattening the LATERAL back into
# a join, which hashes every prefix of the run, a sequential scan growing with the corpus, to find a
# page's hundred).
_TRIGGER_TOKENS_SQL = text("""
SELECT k.document, k.position, x.text
FROM unnest(CAST(:docs AS bigint[]), CAST(:positions AS int[])) AS k(document, position)
CROSS JOIN LATERAL (
    SELECT t.text FROM prefixes p JOIN tokens t ON t.run_id = p.run_id AND t.token_id = p.token_id
    WHERE p.run_id = :run AND p.document = k.document AND p.position = k.position LIMIT 1) x
""")


def _trigger_tokens(session: SessionDep, run_id: int, triggers: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
    """Decoded text of each trigger's own (last) token, to highlight it in its prefix."""
    if not triggers:
        return {}
    rows = session.execute(_TRIGGER_TOKENS_SQL, {"run": run_id, "docs": [t["document"] for t in triggers],
                                                 "positions": [t["position"] for t in triggers]}).tuples().all()
    return {(d, p): txt for d, p, txt in rows}


def _split(text: str, token: str | None) -> tuple[str, str]:
    """(context, trigger token) of a prefix: the token is the prefix's tail when it decodes to it."""
    if token and text.endswith(token):
        return text[: len(text) - len(token)], token
    if token and text.endswith(token.strip()) and token.strip():
        return text[: len(text) - len(token.strip())], token.strip()
    return text, ""


def _card_context(request: Request, session: SessionDep, user: Any, model: str, layer: int, neuron: int,
                  *, error: str | None = None, draft: dict[str, Any] | None = None) -> dict[str, Any]:
    entry, run = catalog.require_run(session, model)
    rec = json.loads(catalog.neuron_record_json(session, model, layer, neuron))
    # Blind first labelling: others' labels show once I have saved mine; readers see none (the API's rule).
    annotations, hidden = service.visible_annotations(session, model, layer, neuron, user)
    mine = next((a for a in annotations if user is not None and a.annotator == user.name), None)
    history = service.history(session, model, layer, neuron, user.name).revisions if mine is not None else []
    others_visible = mine is not None
    tokens = _trigger_tokens(session, run.id, rec["triggers"] + (rec.get("negative_triggers") or []))
    top_coef = max((abs(t["activation"]) for t in rec["triggers"]), default=0.0) or 1.0

    def rows(triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for t in triggers:
            context, tok = _split(t["text"], tokens.get((t["document"], t["position"])))
            out.append({**t, "context": context, "token": tok, "bar": min(1.0, abs(t["activation"]) / top_coef)})
        return out

    queue = _queue_context(request)
    projection = "folded" if request.query_params.get("projection") == "folded" else "raw"
    return {
        "title": f"{model} {layer}/{neuron}", "entry": entry, "run": run, "rec": rec, "model": model,
        "layer": layer, "neuron": neuron, "triggers": rows(rec["triggers"]),
        "negative": rows(rec.get("negative_triggers") or []), "annotations": annotations, "mine": mine,
        "history": history, "others_visible": others_visible, "hidden_count": hidden,
        "mine_examples": {f"{e.document}:{e.position}" for e in mine.examples} if mine else set(),
        "others": [a for a in annotations if mine is None or a.annotator != mine.annotator],
        "stats": [(s, rec.get(s), STAT_MEANINGS[s]) for s in NEURON_STATS], "labels": HUMAN_LABELS,
        "label_keys": LABEL_KEYS, "queue": queue, "error": error, "draft": draft or {},
        "rule": run.label_rule or {},
        "projection": projection,
        "top_tokens": rec["value_top_tokens_folded" if projection == "folded" else "value_top_tokens"],
        "bottom_tokens": rec["value_bottom_tokens_folded" if projection == "folded" else "value_bottom_tokens"],
        "nav": _nav(entry, model, layer, neuron, queue),
    }


def _nav(entry: Any, model: str, layer: int, neuron: int, queue: str) -> dict[str, Any]:
    """The card's neighbour links as (href, text), or None: ``prev`` / ``next`` are what k / j follow.

    Outside a queue they are the numerically adjacent neurons. Inside one (``queue`` is the page's queue
    query string) next is the queue's next neuron (this one skipped, as n does) and previous the neuron
    skipped last on the way here, taken off the skip list (app.js goes back in the browser's history
    instead when the page before was a card of the same queue, e.g. one just saved). The numeric
    neighbours stay as ``prev_neuron`` / ``next_neuron``, without the queue.
    """
    m = quote(model, safe="")
    before = (layer, neuron - 1) if neuron > 0 else (layer - 1, entry.d_mlp - 1) if layer > 0 else None
    after = (layer, neuron + 1) if neuron + 1 < entry.d_mlp else (layer + 1, 0) if layer + 1 < entry.n_layers else None
    prev_n = (f"/models/{m}/neurons/{before[0]}/{before[1]}", f"{before[0]}/{before[1]}") if before else None
    next_n = (f"/models/{m}/neurons/{after[0]}/{after[1]}", f"{after[0]}/{after[1]}") if after else None
    if not queue:
        return {"prev": prev_n, "next": next_n, "prev_neuron": None, "next_neuron": None}
    items = parse_qsl(queue, keep_blank_values=False)
    nxt = (f"/models/{m}/review?" + urlencode([*items, ("skip", f"{layer}-{neuron}")]), "next in queue")
    prev = None
    skips = [i for i, (k, v) in enumerate(items) if k == "skip"]
    if skips:
        a, _, b = items[skips[-1]][1].partition("-")
        if a.isdigit() and b.isdigit():
            rest = items[:skips[-1]] + items[skips[-1] + 1:]
            prev = (f"/models/{m}/neurons/{int(a)}/{int(b)}?" + urlencode(rest), f"previous in queue ({a}/{b})")
    return {"prev": prev, "next": nxt, "prev_neuron": prev_n, "next_neuron": next_n}


@router.get("/models/{model}/neurons/{layer}/{neuron}", response_class=HTMLResponse)
def card(request: Request, model: str, layer: int, neuron: int, session: SessionDep, user: auth.PageUser) -> HTMLResponse:
    try:
        return render(request, "card.html", _card_context(request, session, user, model, layer, neuron))
    except ReadError as exc:
        return _error_page(request, exc)


@router.post("/models/{model}/neurons/{layer}/{neuron}/annotate", response_class=HTMLResponse)
def annotate(request: Request, model: str, layer: int, neuron: int, session: WriteSessionDep,
             label: Annotated[str, Form(max_length=40)] = "", description: Annotated[str, Form(max_length=4000)] = "",
             base_revision: Annotated[str, Form(max_length=20)] = "",
             examples: Annotated[list[str] | None, Form(max_length=60)] = None,
             csrf_token: Annotated[str, Form(max_length=200)] = "", queue: Annotated[str, Form(max_length=4000)] = "",
             ) -> Response:
    user = auth.resolve(request, session)
    draft = {"label": label, "description": description}
    try:
        if user is None:
            raise Unauthorized("sign in with your annotator token to annotate")
        auth.check_csrf(request, csrf_token)
        chosen = []
        for e in examples or []:
            doc, _, pos = e.partition(":")
            chosen.append({"document": int(doc), "position": int(pos)})
        try:
            body = AnnotationWrite(label=label, description=description, examples=chosen,  # type: ignore[arg-type]
                                   base_revision=int(base_revision) if base_revision else None)
        except (ValidationError, ValueError) as exc:
            raise InvalidParameter("label: choose one (1 shallow, 2 semantic, 3 both, 0 none)"
                                   if not label or label not in HUMAN_LABELS else f"invalid annotation: {exc}") from exc
        service.save(session, model=model, layer=layer, neuron=neuron, annotator=user, body=body)
    except ReadError as exc:
        session.rollback()
        if isinstance(exc, auth.CsrfFailed | Unauthorized) or user is None:
            return _error_page(request, exc)
        try:
            ctx = _card_context(request, session, user, model, layer, neuron, error=str(exc), draft=draft)
        except ReadError as inner:
            return _error_page(request, inner)
        ctx["queue"], ctx["nav"] = queue, _nav(ctx["entry"], model, layer, neuron, queue)
        return render(request, "card.html", ctx, status_code=exc.status)
    session.commit()
    target = f"/models/{model}/review?{queue}" if queue else f"/models/{model}/neurons/{layer}/{neuron}?saved=1"
    return RedirectResponse(target, status_code=303)


@router.get("/models/{model}/review", response_class=HTMLResponse)
def review(request: Request, model: str, session: SessionDep, user: auth.PageUser) -> Response:
    """The next neuron of my queue (a redirect to its card), or the queue's end with my progress."""
    if user is None:
        return RedirectResponse("/signin?" + urlencode({"next": str(request.url.path) + "?" + request.url.query}),
                                status_code=303)
    raw = _params(request, QUEUE_KEYS)
    raw.setdefault("queue", "first")
    raw.pop("skip", None)
    skipped = set()
    for s in request.query_params.getlist("skip"):
        a, _, b = s.partition("-")
        if a.isdigit() and b.isdigit():
            skipped.add((int(a), int(b)))
    try:
        try:
            p = QueueParams.model_validate(raw).model_dump()  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise InvalidParameter("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
        item = service.next_item(session, model, user, queue=p["queue"], per_layer=p["per_layer"],
                                 query=search_query(p, viewer_id=user.id if user is not None else None), skip=skipped)
    except ReadError as exc:
        return _error_page(request, exc)
    context = urlencode([(k, v) for k, v in request.query_params.multi_items() if k in QUEUE_KEYS and v != ""]
                        + ([] if "queue" in request.query_params else [("queue", "first")]))
    if item.done:
        return render(request, "queue_done.html", {"title": "Queue done", "model": model, "item": item,
                                                   "context": context})
    return RedirectResponse(f"/models/{model}/neurons/{item.layer}/{item.neuron}?{context}", status_code=303)


SNIPPET_CHARS = 120


def _cut_start(text: str, start: int) -> int:
    """``start`` moved forward to the next word's beginning when it falls inside a word."""
    if 0 < start < len(text) and text[start - 1].isalnum() and text[start].isalnum():
        while start < len(text) and not text[start].isspace():
            start += 1
    return start


def _cut_end(text: str, end: int) -> int:
    """``end`` moved back to the end of the previous word when it falls inside a word."""
    if 0 < end < len(text) and text[end - 1].isalnum() and text[end].isalnum():
        while end > 0 and not text[end - 1].isspace():
            end -= 1
    return end


def snippet(text: str, spans: list[list[int]] | None = None, width: int = SNIPPET_CHARS) -> list[tuple[str, bool]]:
    """A prefix as (piece, highlighted) pieces: the whole when short, else about ``width`` characters around the
    first span (or the tail: the trigger is at the end), cut between words, with "…" where text was left out."""
    spans = sorted(spans or [])
    start, end = 0, len(text)
    if len(text) > width:
        first = spans[0][0] if spans else len(text)
        start = _cut_start(text, max(0, min(first - width // 4, len(text) - width)))
        end = max(_cut_end(text, min(len(text), start + width)), min(len(text), spans[0][1]) if spans else 0)
    out: list[tuple[str, bool]] = [("…", False)] if start > 0 else []
    at = start
    for a, b in spans:
        a, b = max(a, at), min(b, end)
        if a >= b:
            continue
        if a > at:
            out.append((text[at:a], False))
        out.append((text[a:b], True))
        at = b
    if end > at:
        out.append((text[at:end], False))
    if end < len(text):
        out.append(("…", False))
    return out


@router.get("/models/{model}/search", response_class=HTMLResponse)
def search_page(request: Request, model: str, session: SessionDep, user: auth.PageUser) -> HTMLResponse:
    raw = _params(request, set(SearchParams.model_fields))
    form = {k: request.query_params.get(k, "") for k in SearchParams.model_fields if k != "layer"}
    form["layer"] = ",".join(request.query_params.getlist("layer"))
    try:
        entry, _ = catalog.require_run(session, model)
        if "layer" in raw and len(raw["layer"]) == 1 and "," in raw["layer"][0]:
            raw["layer"] = [x for x in raw["layer"][0].split(",") if x.strip()]
        try:
            p = SearchParams.model_validate(raw).model_dump()  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise InvalidParameter("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
        page = search.search(session, model, search_query(p, viewer_id=user.id if user is not None else None))
        error = None
    except ReadError as exc:
        if exc.status == 404:
            return _error_page(request, exc)
        page, error = None, str(exc)
        entry = None
    next_link = None
    if page is not None and page.next_cursor:
        items = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor" and v != ""]
        next_link = f"/models/{model}/search?" + urlencode([*items, ("cursor", page.next_cursor)])
    queue_link = f"/models/{model}/review?" + urlencode(
        [("queue", "first"), *((k, v) for k, v in request.query_params.multi_items()
                                if k in SearchParams.model_fields and k not in ("sort", "limit", "cursor") and v != "")])
    return render(request, "search.html", {
        "title": f"Search {model}", "model": model, "entry": entry, "page": page, "error": error, "form": form,
        "stats": NEURON_STATS, "labels": LABELS, "human_labels": HUMAN_LABELS, "next_link": next_link,
        "queue_link": queue_link, "sorts": search.SORT_KEYS, "relevance": search.RELEVANCE,
        "snippets": [
            {"top": snippet(n.top_trigger.text) if n.top_trigger else [],
             "matching": [(m, snippet(m.text, m.spans)) for m in (n.matching_triggers or [])[:1]]}
            for n in (page.items if page is not None else [])],
        "ranges_open": any(form.get(f"{b}_{s}") for s in NEURON_STATS for b in ("min", "max")),
    }, status_code=422 if error else 200)


@router.get("/models/{model}/neurons/{layer}/{neuron}/similar", response_class=HTMLResponse)
def similar_page(request: Request, model: str, layer: int, neuron: int, session: SessionDep, user: auth.PageUser,
                 space: str = "value") -> HTMLResponse:
    try:
        page = vectors.similar(session, model, layer, neuron, space=space, k=20)
    except ReadError as exc:
        return _error_page(request, exc)
    return render(request, "similar.html", {"title": f"Similar to {layer}/{neuron}", "model": model, "layer": layer,
                                            "neuron": neuron, "page": page, "space": space})
