"""Vector queries: token ranking (v_i . e_token over every value vector) and similar neurons (cosine).

Both use the run's HNSW indexes (catalog/store/search_index.py) unless the neurons in range are
few enough to score them all exactly (``settings.exact_vector_scan_max``). Index candidates are
re-scored with the full-precision vectors, so every returned score is exact; only recall is
approximate (measured in bench/part3_search.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from catalog.config import settings
from catalog.read.catalog import require_run
from catalog.read.errors import InvalidParameter, NotFound, Unsupported
from catalog.read.schemas import RankedNeuron, SimilarNeuron, SimilarPage, TokenRanking
from catalog.read.tokens import resolve_token
from catalog.store.models import PROJECTIONS, CatalogModel
from catalog.store.search_index import MAX_HNSW_DIM, vector_expression

MAX_K = 500


def _layer_range(entry: CatalogModel, layer_min: int | None, layer_max: int | None) -> tuple[int, int]:
    lo = 0 if layer_min is None else layer_min
    hi = entry.n_layers - 1 if layer_max is None else layer_max
    for v in (lo, hi):
        if not 0 <= v < entry.n_layers:
            raise InvalidParameter(f"layer: {v} is out of range (this model has layers 0-{entry.n_layers - 1})")
    if lo > hi:
        raise InvalidParameter(f"layer_min ({lo}) is above layer_max ({hi})")
    return lo, hi


def _use_index(entry: CatalogModel, lo: int, hi: int) -> bool:
    return (hi - lo + 1) * entry.d_mlp > settings.exact_vector_scan_max and entry.d_model <= MAX_HNSW_DIM


def _ann_settings(session: Session, k: int, filtered: bool, ef_search: int | None = None) -> None:
    ef = settings.hnsw_ef_search if ef_search is None else ef_search
    session.execute(text(f"SET LOCAL hnsw.ef_search = {min(1000, max(int(ef), 2 * k))}"))
    # pgvector's cost estimate grows with ef_search; past ~850 on a GPT-2-XL-sized run the planner
    # would trade the index for a scan of every vector (exact, but ~1 s). The index path was chosen.
    session.execute(text("SET LOCAL enable_seqscan = off"))
    # With a layer filter the index keeps scanning until k rows pass it (pgvector >= 0.8).
    session.execute(text(f"SET LOCAL hnsw.iterative_scan = {'relaxed_order' if filtered else 'off'}"))


def token_ranking(session: Session, name: str, token: str, *, k: int = 50,
                  layer_min: int | None = None, layer_max: int | None = None,
                  projection: str = "raw") -> TokenRanking:
    """The k neurons whose value gives the token the highest logit; a word's forms are merged by max.

    ``projection='folded'`` scores v_i . (e_t * g) with g the final norm's gain: the same index over
    value vectors serves both, only the query vector changes.
    """
    entry, run = require_run(session, name)
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be 1-{MAX_K}")
    if projection not in PROJECTIONS:
        raise InvalidParameter(f"projection: one of {', '.join(PROJECTIONS)}")
    gain = None
    if projection == "folded" and run.final_norm_gain is not None:
        gain = np.asarray(run.final_norm_gain.to_list() if hasattr(run.final_norm_gain, "to_list")
                          else run.final_norm_gain, dtype=np.float64)
    lo, hi = _layer_range(entry, layer_min, layer_max)
    tok = resolve_token(session, run.id, token, vocab_size=entry.vocab_size, param="token")
    rid, dim = int(run.id), int(entry.d_model)
    rows = session.execute(
        text("SELECT token_id, unembedding FROM tokens WHERE run_id = :r AND token_id = ANY(:ids)"),
        {"r": rid, "ids": tok.token_ids},
    ).all()
    if any(u is None for _, u in rows):
        raise Unsupported(f"catalog {name!r} was extracted before token ranking existed (no unembedding "
                          "stored): extract it again")
    use_index = _use_index(entry, lo, hi)
    best: dict[tuple[int, int], RankedNeuron] = {}
    for token_id, e in rows:
        if gain is not None:
            e = np.asarray(e.to_list() if hasattr(e, "to_list") else e, dtype=np.float64) * gain
        params: dict[str, Any] = {"e": _vec(e), "lo": lo, "hi": hi, "k": k}
        if use_index:
            _ann_settings(session, k, filtered=(lo, hi) != (0, entry.n_layers - 1),
                          ef_search=settings.hnsw_ef_search_ranking)
            sql = (f"WITH c AS (SELECT layer, neuron, value_vector, value_norm FROM neurons "
                   f"WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi "
                   f"ORDER BY {vector_expression('value_vector', dim)} <#> CAST(CAST(:e AS vector) AS halfvec({dim})) LIMIT :k) "
                   f"SELECT layer, neuron, -(value_vector <#> CAST(:e AS vector)) AS logit, value_norm FROM c")
        else:
            sql = (f"SELECT layer, neuron, -(value_vector <#> CAST(:e AS vector)) AS logit, value_norm FROM neurons "
                   f"WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi "
                   f"ORDER BY value_vector <#> CAST(:e AS vector), layer, neuron LIMIT :k")
        for layer, neuron, logit, norm in session.execute(text(sql), params).tuples():
            key = (layer, neuron)
            if key not in best or logit > best[key].logit:
                best[key] = RankedNeuron(layer=layer, neuron=neuron, logit=logit, token_id=token_id, value_norm=norm)
    items = sorted(best.values(), key=lambda r: (-r.logit, r.layer, r.neuron))[:k]
    return TokenRanking(items=items, token=tok, method="hnsw" if use_index else "exact")


def similar(session: Session, name: str, layer: int, neuron: int, *, space: str = "value", k: int = 20,
            layer_min: int | None = None, layer_max: int | None = None) -> SimilarPage:
    """The k neurons whose key (or value) vector has the highest cosine with this neuron's."""
    entry, run = require_run(session, name)
    if space not in ("key", "value"):
        raise InvalidParameter("space: must be key or value")
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be 1-{MAX_K}")
    lo, hi = _layer_range(entry, layer_min, layer_max)
    rid, dim = int(run.id), int(entry.d_model)
    column = f"{space}_vector"
    v = session.execute(
        text(f"SELECT {column} FROM neurons WHERE run_id = :r AND layer = :l AND neuron = :n"),
        {"r": rid, "l": layer, "n": neuron},
    ).scalar()
    if v is None:
        raise NotFound(f"catalog {name!r} has no neuron {layer}/{neuron} "
                       f"(layers 0-{entry.n_layers - 1}, neurons 0-{entry.d_mlp - 1})")
    params: dict[str, Any] = {"v": _vec(v), "lo": lo, "hi": hi, "k": k + 1, "l": layer, "n": neuron}
    use_index = _use_index(entry, lo, hi)
    if use_index:
        _ann_settings(session, k + 1, filtered=(lo, hi) != (0, entry.n_layers - 1))
        sql = (f"WITH c AS (SELECT layer, neuron, {column} AS vec FROM neurons "
               f"WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi "
               f"ORDER BY {vector_expression(column, dim)} <=> CAST(CAST(:v AS vector) AS halfvec({dim})) LIMIT :k) "
               f"SELECT layer, neuron, 1 - (vec <=> CAST(:v AS vector)) AS cosine FROM c")
    else:
        sql = (f"SELECT layer, neuron, 1 - ({column} <=> CAST(:v AS vector)) AS cosine FROM neurons "
               f"WHERE run_id = {rid} AND layer BETWEEN :lo AND :hi "
               f"ORDER BY {column} <=> CAST(:v AS vector), layer, neuron LIMIT :k")
    rows = [r for r in session.execute(text(sql), params).tuples() if (r[0], r[1]) != (layer, neuron)]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    items = [SimilarNeuron(layer=a, neuron=b, cosine=c) for a, b, c in rows[:k]]
    return SimilarPage(items=items, space=space, method="hnsw" if use_index else "exact")  # type: ignore[arg-type]


def _vec(v: Any) -> str:
    """pgvector's text form: works for bind parameters whatever adapters the connection has."""
    if isinstance(v, str):
        return v
    if hasattr(v, "to_list"):  # pgvector.Vector / HalfVector
        v = v.to_list()
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


# Note: the query vector is one bind parameter used twice; Postgres types a parameter by its first
# use, so the index ORDER BY casts it to vector first and to halfvec second. The other order would
# make the "full precision" re-score use the half-precision vector.
