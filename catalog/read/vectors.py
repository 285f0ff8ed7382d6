"""Vector queries: token ranking (v_i . e_token over every value vector) and similar neurons (cosine).

Both are exact (part 10). Each run stores exact lists (catalog/extract/neighbours.py): per token,
order and convention the neurons with the highest logit or cosine, and per neuron and space its
most similar neurons. A request takes the first k of a list that lie in its layers; when the list
holds fewer (k beyond it, or a narrow layer range), every vector in range is scored instead.

Token ranking has four orders (schemas.TOKEN_ORDERS): logit and cosine (lists, else a scan), effect
(coefficient x logit: always a scan) and rank (the stored top tokens first, then candidates ranked
over the whole vocabulary; see _by_rank).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.read.catalog import require_run
from catalog.read.errors import InvalidParameter, NotFound, Unsupported
from catalog.read.schemas import TOKEN_ORDERS, RankedNeuron, SimilarNeuron, SimilarPage, TokenRanking
from catalog.read.tokens import resolve_token
from catalog.store.models import PROJECTIONS, CatalogModel

MAX_K = 500
# The typical coefficient of order=effect (README, "Token ranking orders").
EFFECT_COEFFICIENT = "abs_coefficient_p99"


def _layer_range(entry: CatalogModel, layer_min: int | None, layer_max: int | None) -> tuple[int, int]:
    lo = 0 if layer_min is None else layer_min
    hi = entry.n_layers - 1 if layer_max is None else layer_max
    for v in (lo, hi):
        if not 0 <= v < entry.n_layers:
            raise InvalidParameter(f"layer: {v} is out of range (this model has layers 0-{entry.n_layers - 1})")
    if lo > hi:
        raise InvalidParameter(f"layer_min ({lo}) is above layer_max ({hi})")
    return lo, hi


def token_ranking(session: Session, name: str, token: str, *, k: int = 50,
                  layer_min: int | None = None, layer_max: int | None = None,
                  projection: str = "raw", order: str = "logit") -> TokenRanking:
    """The k neurons that promote the token most under ``order`` (schemas.TOKEN_ORDERS); a word's
    forms are merged per neuron by the better one.

    ``projection='folded'`` scores v_i . (e_t * g) with g the final norm's gain (its own lists).
    """
    entry, run = require_run(session, name)
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be 1-{MAX_K}")
    if projection not in PROJECTIONS:
        raise InvalidParameter(f"projection: one of {', '.join(PROJECTIONS)}")
    if order not in TOKEN_ORDERS:
        raise InvalidParameter(f"order: one of {', '.join(TOKEN_ORDERS)}")
    lo, hi = _layer_range(entry, layer_min, layer_max)
    tok = resolve_token(session, run.id, token, vocab_size=entry.vocab_size, param="token")
    rid = int(run.id)
    gain = _array(run.final_norm_gain) if projection == "folded" and run.final_norm_gain is not None else None
    convention = "folded" if projection == "folded" else "raw"
    stored_top = _stored_top(session, rid, convention, lo)
    scan = _Scan(session, entry, rid, lo, hi, convention, tok.token_ids, gain)
    ranks: dict[Key, int] = {}
    if order == "rank":
        best, complete, method = _by_rank(scan, k, stored_top, ranks)
    elif order == "effect":
        if not session.execute(text(
                f"SELECT EXISTS (SELECT 1 FROM neurons WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi "
                f"AND {EFFECT_COEFFICIENT} IS NOT NULL)"), {"lo": lo, "hi": hi}).scalar():
            raise Unsupported(f"order=effect needs corpus figures ({EFFECT_COEFFICIENT}): catalog {name!r} has none "
                              "in these layers (extracted without --corpus, or before part 5); use logit, rank or "
                              "cosine")
        best = _merge(scan.top(k, "effect"), k)
        complete, method = True, "exact"  # no list orders by c_i v_i . e: every vector in range is scored
    else:
        best = _merge(scan.top(k, order), k)
        complete, method = True, "exact"
    items = _figures(session, rid, best, scan.query_sql, convention, ranks)
    return TokenRanking(items=items, resolved_tokens={"token": tok}, order=order,  # type: ignore[arg-type]
                        method=method, complete=complete, stored_top_tokens=stored_top)  # type: ignore[arg-type]


Key = tuple[int, int]
# A neuron's place in an order: (sort key, token_id); the lowest key comes first.
Placed = dict[Key, tuple[tuple[float, ...], int]]


class _Scan:
    """Scores of the value vectors of one run's layers lo..hi against each form of a token: from the
    form's stored exact list when it holds the answer, else by scoring every vector in range."""

    def __init__(self, session: Session, entry: CatalogModel, rid: int, lo: int, hi: int, convention: str,
                 token_ids: list[int], gain: np.ndarray | None) -> None:
        self.session, self.entry, self.rid, self.lo, self.hi = session, entry, rid, lo, hi
        self.convention, self.token_ids, self.gain = convention, token_ids, gain
        self.dim = int(entry.d_model)
        self._queries: dict[int, np.ndarray] | None = None
        # A form's query vector in SQL, from the tokens row `t` of the run (v . (e * g) = (v * g) . e):
        # pgvector's float32 product is the float32 rounding of the exact one, as e * g in numpy is.
        self.query_sql = ("t.unembedding * (SELECT final_norm_gain FROM extraction_runs WHERE id = t.run_id)"
                          if gain is not None else "t.unembedding")

    def queries(self) -> dict[int, np.ndarray]:
        """Each form's query vector, float64: e_t, or e_t * g exactly (read only when something is scanned)."""
        if self._queries is None:
            rows = self.session.execute(text(
                "SELECT token_id, unembedding FROM tokens WHERE run_id = :r AND token_id = ANY(:ids) "
                "ORDER BY token_id"), {"r": self.rid, "ids": self.token_ids}).all()
            if any(u is None for _, u in rows):
                raise Unsupported("this catalog was extracted before token ranking existed (no unembedding "
                                  "stored): extract it again")
            self._queries = {int(t): _array(e) * self.gain if self.gain is not None else _array(e) for t, e in rows}
        return self._queries

    def top(self, k: int, order: str) -> dict[int, list[tuple[int, int, float]]]:
        """Per form, (layer, neuron, score) of the k best by logit, cosine or effect, best first, ties by
        (layer, neuron)."""
        out: dict[int, list[tuple[int, int, float]]] = {}
        if order in ("logit", "cosine"):
            for t, ids, scores in self.session.execute(text(
                    "SELECT token_id, ids, scores FROM token_lists WHERE run_id = :r AND convention = :c "
                    "AND ranking = :o AND token_id = ANY(:t)"),
                    # without a final-norm gain the folded scores are the raw ones: so are the lists
                    {"r": self.rid, "c": self.convention if self.gain is not None else "raw", "o": order,
                     "t": self.token_ids}).tuples():
                listed = in_range(ids, scores, int(self.entry.d_mlp), self.lo, self.hi, k)
                if listed is not None:
                    out[int(t)] = listed
        for t in self.token_ids:
            if t not in out:
                out[t] = self.scan(t, self.queries()[t], k, order)
        return out

    def scan(self, token_id: int, q: np.ndarray, k: int, order: str) -> list[tuple[int, int, float]]:
        """Every vector in range scored against ``q``: the k best, as ``top``."""
        score = {"logit": "-(value_vector <#> CAST(:e AS vector))",
                 "cosine": "1 - (value_vector <=> CAST(:e AS vector))",
                 "effect": f"{EFFECT_COEFFICIENT} * -(value_vector <#> CAST(:e AS vector))"}[order]
        where = f"run_id = {self.rid} AND layer BETWEEN :lo AND :hi"
        if order == "effect":
            where += f" AND {EFFECT_COEFFICIENT} IS NOT NULL"
        sql = f"SELECT layer, neuron, {score} AS score FROM neurons WHERE {where} ORDER BY score DESC, layer, neuron LIMIT :k"
        params = {"e": _vec(q), "lo": self.lo, "hi": self.hi, "k": k}
        return [(a, b, float(c)) for a, b, c in self.session.execute(text(sql), params).tuples()]

    def vectors(self, keys: list[Key] | None) -> tuple[list[Key], np.ndarray]:
        """Value vectors of the given neurons (None: every neuron in range), float64 [n, d_model]."""
        if keys is None:
            rows = self.session.execute(text(
                f"SELECT layer, neuron, value_vector FROM neurons WHERE run_id = {self.rid} "
                "AND layer BETWEEN :lo AND :hi ORDER BY layer, neuron"), {"lo": self.lo, "hi": self.hi}).tuples().all()
        else:
            rows = self.session.execute(text(
                f"SELECT n.layer, n.neuron, n.value_vector FROM unnest(CAST(:l AS int[]), CAST(:n AS int[])) AS "
                f"k(layer, neuron) JOIN neurons n ON n.run_id = {self.rid} AND n.layer = k.layer "
                "AND n.neuron = k.neuron ORDER BY n.layer, n.neuron"),
                {"l": [a for a, _ in keys], "n": [b for _, b in keys]}).tuples().all()
        found = [(int(a), int(b)) for a, b, _ in rows]
        return found, (np.stack([_array(v) for _, _, v in rows]) if rows else np.zeros((0, self.dim)))


def _merge(per_token: dict[int, list[tuple[int, int, float]]], k: int) -> Placed:
    """The k best neurons over every form (each neuron by its best form), from each form's k best."""
    best: Placed = {}
    for token_id, rows in per_token.items():
        for layer, neuron, score in rows:
            key = (-score, layer, neuron)
            if (layer, neuron) not in best or key < best[(layer, neuron)][0]:
                best[(layer, neuron)] = (key, token_id)
    return dict(sorted(best.items(), key=lambda kv: kv[1][0])[:k])


def _by_rank(scan: _Scan, k: int, stored_top: int, ranks: dict[Key, int]) -> tuple[Placed, bool, str]:
    """The k neurons giving the token the best (lowest) rank in their own logits, ties by cosine.

    1. Every neuron whose stored top tokens (value_tokens, the first ``stored_top`` of the whole
       vocabulary) hold the token: rank exact, and this is every neuron with rank <= stored_top.
       When these are k or more, the answer is exact and complete.
    2. Otherwise the rest have rank > stored_top: candidates are ranked over the whole vocabulary
       (1 + the tokens with a higher logit, float64 from the stored vectors): every neuron in range
       when neurons x vocabulary <= rank_exact_max_logits (complete), else the nearest values to the
       token by cosine (rank_candidates, at least 2x the neurons still wanted; not complete).
    """
    session, rid, convention = scan.session, scan.rid, scan.convention
    queries = scan.queries()
    found: dict[Key, tuple[tuple[float, ...], int]] = {}
    full = True  # each form's stored list was read to its end
    for token_id, q in queries.items():
        rows = session.execute(text(
            f"SELECT v.layer, v.neuron, v.rank + 1 AS rank, 1 - (n.value_vector <=> CAST(:e AS vector)) AS cosine "
            f"FROM value_tokens v JOIN neurons n ON n.run_id = v.run_id AND n.layer = v.layer AND n.neuron = v.neuron "
            f"WHERE v.run_id = {rid} AND v.kind = 'top' AND v.convention = '{convention}' AND v.token_id = :t "
            "AND v.layer BETWEEN :lo AND :hi ORDER BY v.rank, cosine DESC, v.layer, v.neuron LIMIT :k"),
            {"e": _vec(q), "t": token_id, "lo": scan.lo, "hi": scan.hi, "k": k}).tuples().all()
        full &= len(rows) < k
        for layer, neuron, rank, cos in rows:
            sort_key = (float(rank), -float(cos), layer, neuron)
            if (layer, neuron) not in found or sort_key < found[(layer, neuron)][0]:
                found[(layer, neuron)] = (sort_key, token_id)
                ranks[(layer, neuron)] = int(rank)
    if not full or len(found) >= k:
        return dict(sorted(found.items(), key=lambda kv: kv[1][0])[:k]), True, "exact"
    wanted = k - len(found)
    n_range = (scan.hi - scan.lo + 1) * int(scan.entry.d_mlp)
    vocab = int(scan.entry.vocab_size)
    method = "exact"
    if n_range * vocab <= settings.rank_exact_max_logits:
        keys, vecs = scan.vectors(None)
        complete = True
    else:
        m = max(settings.rank_candidates, 2 * wanted)
        pool: set[Key] = set()
        for t, q in queries.items():
            pool.update((a, b) for a, b, _ in scan.scan(t, q, m + len(found), "cosine"))
        keys, vecs = scan.vectors(sorted(pool - set(found)))
        complete = len(keys) >= n_range - len(found)  # every other neuron was a candidate
    keep = [i for i, key in enumerate(keys) if key not in found]
    keys, vecs = [keys[i] for i in keep], vecs[keep]
    if keys:
        E = _unembedding(session, rid)
        ids = list(queries)
        gain = scan.gain
        r = _vocabulary_ranks(vecs * gain if gain is not None else vecs, E, ids)  # [n, forms]
        norms = np.linalg.norm(vecs, axis=1)
        cos = np.stack([vecs @ queries[t] / np.maximum(norms * np.linalg.norm(queries[t]), 1e-300) for t in ids],
                       axis=1)
        extra: Placed = {}
        for i, key in enumerate(keys):
            j = min(range(len(ids)), key=lambda j: (r[i, j], -cos[i, j]))
            extra[key] = ((float(r[i, j]), -float(cos[i, j]), *key), ids[j])
        for key, placed in sorted(extra.items(), key=lambda kv: kv[1][0])[:wanted]:
            found[key] = placed
            ranks[key] = int(placed[0][0])
    return dict(sorted(found.items(), key=lambda kv: kv[1][0])[:k]), complete, method


def _vocabulary_ranks(vecs: np.ndarray, E: np.ndarray, ids: list[int], chunk_elems: int = 1 << 22) -> np.ndarray:
    """[n, len(ids)] 1-based rank of each token id in each row's logits vecs @ E.T over the whole
    vocabulary: 1 + the number of tokens with a strictly higher logit (the extraction's definition).
    The token itself is never counted, whatever the rounding of its own logit."""
    n = vecs.shape[0]
    targets = np.stack([vecs @ E[t].astype(np.float64) for t in ids], axis=1)  # [n, forms]
    counts = np.zeros((n, len(ids)), dtype=np.int64)
    step = max(1, chunk_elems // max(n, 1))
    for start in range(0, E.shape[0], step):
        logits = vecs @ E[start:start + step].astype(np.float64).T  # [n, chunk]
        for j, t in enumerate(ids):
            above = logits > targets[:, j:j + 1]
            if start <= t < start + step:
                above[:, t - start] = False
            counts[:, j] += above.sum(axis=1)
    return counts + 1


def _figures(session: Session, rid: int, best: Placed, query_sql: str, convention: str,
             ranks: dict[Key, int]) -> list[RankedNeuron]:
    """Every figure of the chosen neurons, for the form that placed each, in the order's order: one
    statement, the query vectors built in Postgres from the tokens rows (``_Scan.query_sql``)."""
    if not best:
        return []
    rows = session.execute(text(
        "SELECT k.layer, k.neuron, k.token_id, -(n.value_vector <#> q.e) AS logit, 1 - (n.value_vector <=> q.e) "
        f"AS cosine, n.value_norm, n.{EFFECT_COEFFICIENT}, n.activation_max, v.rank + 1 AS rank "
        "FROM unnest(CAST(:l AS int[]), CAST(:n AS int[]), CAST(:t AS int[])) AS k(layer, neuron, token_id) "
        f"JOIN tokens t ON t.run_id = {rid} AND t.token_id = k.token_id "
        f"CROSS JOIN LATERAL (SELECT {query_sql} AS e) q "
        f"JOIN neurons n ON n.run_id = {rid} AND n.layer = k.layer AND n.neuron = k.neuron "
        "LEFT JOIN value_tokens v ON v.run_id = n.run_id AND v.layer = n.layer AND v.neuron = n.neuron "
        f"AND v.convention = '{convention}' AND v.kind = 'top' AND v.token_id = k.token_id"),
        {"l": [a for a, _ in best], "n": [b for _, b in best], "t": [t for _, t in best.values()]},
    ).tuples().all()
    out: dict[Key, RankedNeuron] = {}
    for layer, neuron, token_id, logit, cos, norm, coef, amax, rank in rows:
        key = (layer, neuron)
        out[key] = RankedNeuron(
            layer=layer, neuron=neuron, token_id=token_id, logit=logit, cosine=cos, value_norm=norm,
            rank=ranks.get(key, rank), coefficient=coef, activation_max=amax,
            effect=None if coef is None else coef * logit)
    return [out[key] for key in best if key in out]


# How many top tokens per neuron a published run stores, per (database, run, convention): a run's
# rows never change once published, so one count per server process serves every request.
_STORED_TOP: dict[tuple[str, int, str], int] = {}


def _stored_top(session: Session, rid: int, convention: str, layer: int) -> int:
    """How many top tokens per neuron the run stores (30, or the vocabulary when it is smaller)."""
    key = (str(session.get_bind().engine.url), rid, convention)
    if key not in _STORED_TOP:
        n = session.execute(text(
            "SELECT count(*) FROM value_tokens WHERE run_id = :r AND layer = :l AND neuron = 0 AND convention = :c "
            "AND kind = 'top'"), {"r": rid, "l": layer, "c": convention}).scalar()
        _STORED_TOP[key] = int(n or 0)
    return _STORED_TOP[key]


# One run's unembedding in memory (float32 [vocab, d_model], token id order), for ranks beyond the
# stored top tokens: read once per server process and run (e.g. 113 MB for SmolLM2, 322 MB for GPT-2-XL).
_E_CACHE: dict[int, np.ndarray] = {}
_E_LOCK = threading.Lock()


def _unembedding(session: Session, rid: int) -> np.ndarray:
    with _E_LOCK:
        if rid not in _E_CACHE:
            rows = session.execute(text("SELECT token_id, unembedding FROM tokens WHERE run_id = :r ORDER BY token_id"),
                                   {"r": rid}).tuples().all()
            if any(e is None for _, e in rows) or [t for t, _ in rows] != list(range(len(rows))):
                raise Unsupported("this catalog's tokens table lacks unembeddings (extracted before token ranking "
                                  "existed): extract it again")
            E = np.stack([_array(e) for _, e in rows]).astype(np.float32)
            _E_CACHE.clear()  # one run at a time
            _E_CACHE[rid] = E
        return _E_CACHE[rid]


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "to_numpy"):
        v = v.to_numpy()
    elif hasattr(v, "to_list"):
        v = v.to_list()
    return np.asarray(v, dtype=np.float64)


def similar(session: Session, name: str, layer: int, neuron: int, *, space: str = "value", k: int = 20,
            layer_min: int | None = None, layer_max: int | None = None) -> SimilarPage:
    """The k neurons whose key (or value) vector has the highest cosine with this neuron's, exactly: from
    the run's stored list when it holds the answer, else by scoring every vector in range."""
    entry, run = require_run(session, name)
    if space not in ("key", "value"):
        raise InvalidParameter("space: must be key or value")
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be 1-{MAX_K}")
    lo, hi = _layer_range(entry, layer_min, layer_max)
    rid = int(run.id)
    listed = session.execute(text(
        "SELECT ids, cosines FROM similar_lists WHERE run_id = :r AND space = :s AND layer = :l AND neuron = :n"),
        {"r": rid, "s": space, "l": layer, "n": neuron}).first()
    if listed is not None:
        found = in_range(listed[0], listed[1], int(entry.d_mlp), lo, hi, k)
        if found is not None:
            items = [SimilarNeuron(layer=a, neuron=b, cosine=c) for a, b, c in found]
            return SimilarPage(items=items, space=space, method="exact")  # type: ignore[arg-type]
    # No list (a run from before part 10), or the answer lies beyond it: score every vector in range.
    column = f"{space}_vector"
    v = session.execute(
        text(f"SELECT {column} FROM neurons WHERE run_id = :r AND layer = :l AND neuron = :n"),
        {"r": rid, "l": layer, "n": neuron},
    ).scalar()
    if v is None:
        raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron} "
                       f"(layers 0-{entry.n_layers - 1}, neurons 0-{entry.d_mlp - 1})")
    sql = (f"SELECT layer, neuron, 1 - ({column} <=> CAST(:v AS vector)) AS cosine FROM neurons "
           f"WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi AND NOT (layer = :l AND neuron = :n) "
           f"ORDER BY {column} <=> CAST(:v AS vector), layer, neuron LIMIT :k")
    rows = session.execute(text(sql), {"v": _vec(v), "lo": lo, "hi": hi, "k": k, "l": layer, "n": neuron}).tuples()
    items = [SimilarNeuron(layer=a, neuron=b, cosine=c) for a, b, c in rows]
    return SimilarPage(items=items, space=space, method="exact")  # type: ignore[arg-type]


def in_range(ids: list[int], scores: list[float], d_mlp: int, lo: int, hi: int,
             k: int) -> list[tuple[int, int, float]] | None:
    """The first k (layer, neuron, score) of a stored exact list (flat ids) that lie in layers lo..hi,
    or None when it holds fewer. The list is a head of the exact order, so any k it holds are the k best."""
    out = []
    for flat, score in zip(ids, scores, strict=True):
        a, b = divmod(int(flat), d_mlp)
        if lo <= a <= hi:
            out.append((a, b, float(score)))
            if len(out) == k:
                return out
    return None


def _vec(v: Any) -> str:
    """pgvector's text form: works for bind parameters whatever adapters the connection has."""
    if isinstance(v, str):
        return v
    if hasattr(v, "to_list"):  # pgvector.Vector / HalfVector
        v = v.to_list()
    # tolist gives Python floats at once (half the cost of float() per numpy scalar); repr round-trips
    return "[" + ",".join(map(repr, np.asarray(v, dtype=np.float64).tolist())) + "]"


# Note: the query vector is one bind parameter used twice; Postgres types a parameter by its first
# use, so the index ORDER BY casts it to vector first and to halfvec second. The other order would
# make the "full precision" re-score use the half-precision vector.
