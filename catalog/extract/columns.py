"""The pipeline's results as the writer's named columns: where pipeline objects meet vocabulary names.

``catalog.store.ingest.RunWriter`` takes plain columns (numpy arrays and lists) keyed by the names of
``catalog.vocab`` and of the tables; this module is the one place that knows which attribute of a
``LayerRecord`` or ``CorpusAnalysis`` holds which figure. Per neuron, arrays are [d_mlp] (index =
0-based neuron); ``None`` stands for a column that is null throughout (a weight-only run, a figure
the architecture lacks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from catalog.extract.pipeline import CorpusAnalysis, LayerRecord
from catalog.vocab import ABLATIONS, NEURON_FIELDS, Projection, TriggerSign, ValueTokenKind


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def neuron_columns(rec: LayerRecord) -> dict[str, Any]:
    """The ``neurons`` columns of one layer: every figure of ``vocab.NEURON_FIGURES`` (arrays [d_mlp],
    None = null) and the vectors ([d_mlp, d_model] float32; up_vector None without an up-projection)."""
    w = rec.weights
    act = rec.activation or {}
    abl = rec.ablation or {}
    fire = rec.firing or {}
    base = rec.agreement
    lab = rec.label
    figures: dict[str, torch.Tensor | list[str | None] | None] = {
        "key_norm": w.key_norm,
        "value_norm": w.value_norm,
        "up_norm": w.up_norm,
        "bias": w.bias,
        "alignment": w.alignment,
        "up_alignment": w.up_alignment,
        "activation_mean": act.get("mean"),
        "activation_std": act.get("std"),
        "activation_positive_fraction": act.get("positive_fraction"),
        "activation_max": act.get("max"),
        "agreement": base.agreement if base else None,
        "next_token_mean_rank": base.mean_rank if base else None,
        **{f"ablation_{kind}": abl.get(kind) for kind in ABLATIONS},
        "gate_open_fraction": fire.get("gate_open_fraction"),
        "abs_coefficient_p50": fire.get("abs_p50"),
        "abs_coefficient_p90": fire.get("abs_p90"),
        "abs_coefficient_p99": fire.get("abs_p99"),
        "negative_trigger_share": rec.negative_share,
        "agreement_shuffled": base.shuffled if base else None,
        "agreement_folded": base.folded if base else None,
        "agreement_top1": base.top1 if base else None,
        "agreement_negative": base.negative if base else None,
        "next_token_rank_percentile": base.rank_percentile if base else None,
        "next_token_rank_percentile_shuffled": base.rank_percentile_shuffled if base else None,
        "top_token_frequency": base.top_token_frequency if base else None,
        "label_contrast": lab.inputs.contrast if lab else None,
        "label_context": lab.inputs.context if lab else None,
        "label_confidence": lab.confidence if lab else None,
        "label_triggers": lab.inputs.triggers if lab else None,
        "suggested_label": rec.labels,
    }
    assert tuple(figures) == NEURON_FIELDS, "every figure of the vocabulary, in its order"
    cols: dict[str, Any] = {k: v if v is None or isinstance(v, list) else _np(v) for k, v in figures.items()}
    cols["key_vector"] = rec.keys.numpy()
    cols["value_vector"] = rec.values.numpy()
    cols["up_vector"] = None if rec.ups is None else rec.ups.numpy()
    return cols


def value_token_columns(rec: LayerRecord) -> dict[str, Any]:
    """The ``value_tokens`` rows of one layer, flattened: neuron, convention, kind, rank, token_id, logit."""
    parts = []
    projections = [(Projection.raw, rec.projection)]
    if rec.projection_folded is not None:
        projections.append((Projection.folded, rec.projection_folded))
    for convention, p in projections:
        for kind, ids, logits in ((ValueTokenKind.top, p.top_ids, p.top_logits),
                                  (ValueTokenKind.bottom, p.bottom_ids, p.bottom_logits)):
            d, k = ids.shape
            parts.append((convention.value, kind.value, np.repeat(np.arange(d), k), np.tile(np.arange(k), d),
                          ids.numpy().reshape(-1), logits.double().numpy().reshape(-1)))
    return {
        "neuron": np.concatenate([x[2] for x in parts]),
        "convention": [x[0] for x in parts for _ in range(len(x[2]))],
        "kind": [x[1] for x in parts for _ in range(len(x[2]))],
        "rank": np.concatenate([x[3] for x in parts]),
        "token_id": np.concatenate([x[4] for x in parts]),
        "logit": np.concatenate([x[5] for x in parts]),
    }


def trigger_columns(rec: LayerRecord) -> dict[str, np.ndarray] | None:
    """The ``triggers`` rows of one layer, flattened (neuron, sign, rank, document, position, coefficient,
    coefficient_without_<ablation>; NaN = null); None for a weight-only run."""
    if rec.top is None:
        return None
    blocks = [(TriggerSign.positive, rec.top, rec.top_ablated)]
    if rec.bottom is not None:
        blocks.append((TriggerSign.negative, rec.bottom, None))
    without = [f"coefficient_without_{kind}" for kind in ABLATIONS]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "neuron", "sign", "rank", "document", "position", "coefficient", *without)}
    for sign, state, ablated in blocks:
        docs = state.documents.cpu()
        keep = (docs >= 0).numpy()
        d, k = docs.shape
        neuron, rank = np.repeat(np.arange(d), k), np.tile(np.arange(k), d)
        flat = keep.reshape(-1)
        cols["neuron"].append(neuron[flat])
        cols["rank"].append(rank[flat])
        cols["sign"].append(np.full(int(flat.sum()), int(sign)))
        cols["document"].append(docs.numpy().reshape(-1)[flat])
        cols["position"].append(state.positions.cpu().numpy().reshape(-1)[flat])
        cols["coefficient"].append((state.values.cpu().double().numpy() * int(sign)).reshape(-1)[flat])
        for kind, name in zip(ABLATIONS, without, strict=True):
            if ablated is None or kind not in ablated:  # negative triggers; encoders (no ablations)
                cols[name].append(np.full(int(flat.sum()), np.nan))
            else:
                cols[name].append(ablated[kind].double().numpy().reshape(-1)[flat])
    return {k: np.concatenate(v) for k, v in cols.items()}


def layer_columns(rec: LayerRecord) -> dict[str, Any]:
    """``RunWriter.layer``'s keyword arguments for one layer: ``RunWriter.layer(**layer_columns(rec))``."""
    return {
        "layer": rec.layer,
        "row": dict(rec.stats),
        "neurons": neuron_columns(rec),
        "value_tokens": value_token_columns(rec),
        "triggers": trigger_columns(rec),
    }


def prefix_columns(a: CorpusAnalysis) -> dict[str, list[Any]]:
    """The ``prefixes`` columns: document, position, text, token_id, next_token_id (None at a document's
    end) and text_after (None outside encoders)."""
    n = len(a.prefix_text)
    return {
        "document": a.prefixes.documents.tolist(),
        "position": a.prefixes.positions.tolist(),
        "text": list(a.prefix_text),
        "token_id": a.prefix_token.tolist(),
        "next_token_id": [x if x >= 0 else None for x in a.prefix_next.tolist()],
        "text_after": list(a.prefix_text_after) if a.prefix_text_after is not None else [None] * n,
    }
