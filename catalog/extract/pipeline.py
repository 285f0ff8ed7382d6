"""Model (+ corpus) -> per-layer catalog records, with no database in sight.

``analyse_corpus`` runs the corpus pass and the ablations once for all layers; ``layer_records``
then yields one ``LayerRecord`` per layer (weights, projections, agreement) so that the store can
write it out before the next layer is computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from catalog.extract import ablation as abl
from catalog.extract.architectures import MlpView
from catalog.extract.corpus_pass import TokenisedCorpus, TopState, corpus_pass
from catalog.extract.weights import (
    NeuronWeights,
    TokenProjection,
    layer_weight_stats,
    neuron_weights,
    project_values,
    value_logits,
)

Progress = Callable[[str, int, int], None]  # (stage, done increment, total)


@dataclass(frozen=True)
class Parameters:
    top_n: int = 50
    window: int = 256
    batch_tokens: int = 4096
    value_top: int = 30
    value_bottom: int = 10
    ablation_seed: int = 0
    shallow_last_drop: float = 0.5
    semantic_other_drop: float = 0.25


@dataclass
class CorpusAnalysis:
    corpus: TokenisedCorpus
    stats: list[dict[str, torch.Tensor]]  # per layer: mean, std, positive_fraction, max
    top: list[TopState]
    bottom: list[TopState] | None
    prefixes: abl.PrefixTable
    prefix_text: list[str]
    prefix_token: torch.Tensor  # [P] the trigger token
    prefix_next: torch.Tensor  # [P] the next token in the document, -1 at its end
    ablated: dict[str, list[torch.Tensor]]  # kind -> per layer [d_mlp, N] coefficients
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def analyse_corpus(
    view: MlpView,
    tokenizer: Any,
    corpus: TokenisedCorpus,
    params: Parameters,
    progress: Progress | None = None,
) -> CorpusAnalysis:
    model = view.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    value_projs = view.value_projs()

    def tick(stage: str, total: int) -> Callable[[int], None] | None:
        return None if progress is None else (lambda n: progress(stage, n, total))

    t0 = time.perf_counter()
    result = corpus_pass(
        model, value_projs, corpus, top_n=params.top_n, gated=view.gated,
        batch_tokens=params.batch_tokens, pad=pad, progress=tick("corpus pass", corpus.n_tokens),
    )
    t1 = time.perf_counter()
    table = abl.prefix_table(corpus, result.top, result.bottom)
    texts = abl.prefix_texts(corpus, table, tokenizer)
    top_ids = table.top_ids
    ablated: dict[str, list[torch.Tensor]] = {
        "last": [t.previous.cpu() for t in result.top],
    }
    # A single-token prefix has no 'without last' either (the corpus pass read BOS there).
    single = table.positions % corpus.chunk == 0  # the trigger is its window's first token
    for layer, ids in enumerate(top_ids):
        one_token = torch.where(ids >= 0, single[ids.clamp(min=0)], True)
        ablated["last"][layer] = torch.where(one_token, math.nan, ablated["last"][layer])
    jobs = abl.ablation_jobs(corpus, table, torch.cat([i.flatten() for i in top_ids]), seed=params.ablation_seed)
    for kind in ("first", "random"):
        job = jobs[kind]
        ablated[kind] = abl.run_ablation(
            model, value_projs, job, top_ids, n_prefixes=len(table), bos=corpus.bos, pad=pad,
            batch_tokens=params.batch_tokens, progress=tick(f"ablation ({kind})", sum(len(r) for r in job.rows)),
        )
    t2 = time.perf_counter()
    return CorpusAnalysis(
        corpus=corpus,
        stats=[s.summary() for s in result.stats],
        top=result.top,
        bottom=result.bottom,
        prefixes=table,
        prefix_text=texts,
        prefix_token=abl.token_at(corpus, table, 0),
        prefix_next=abl.token_at(corpus, table, 1),
        ablated=ablated,
        timings={"corpus_pass": t1 - t0, "ablation": t2 - t1},
        counts={
            "tokens": result.tokens,
            "documents": len(corpus.tokens),
            "windows": len(corpus.windows),
            "truncated_documents": corpus.truncated_documents,
            "prefixes": len(table),
            "ablation_tokens": sum(len(r) for j in jobs.values() for r in j.rows),
        },
    )


@dataclass
class LayerRecord:
    layer: int
    stats: dict[str, Any]  # the layers row (seed 000 figures, histograms, seed 001 means)
    weights: NeuronWeights
    keys: torch.Tensor  # [d_mlp, d_model] float32, CPU
    values: torch.Tensor
    ups: torch.Tensor | None
    projection: TokenProjection
    seconds: dict[str, float] = field(default_factory=dict)  # compute time by stage
    # corpus figures; None for a weight-only run
    activation: dict[str, torch.Tensor] | None = None
    agreement: abl.Agreement | None = None
    ablation: dict[str, torch.Tensor] | None = None  # kind -> [d_mlp] mean relative change
    labels: list[str | None] | None = None
    top: TopState | None = None
    bottom: TopState | None = None
    top_ablated: dict[str, torch.Tensor] | None = None  # kind -> [d_mlp, N] coefficients


def _nanmean(x: torch.Tensor) -> float | None:
    m = float(x.double().nanmean())
    return None if math.isnan(m) else m


def layer_records(
    view: MlpView, params: Parameters, analysis: CorpusAnalysis | None = None,
    progress: Progress | None = None,
) -> Iterator[LayerRecord]:
    unembedding = view.unembedding().detach()
    for layer in range(view.n_layers):
        with torch.inference_mode():
            t0 = time.perf_counter()
            w = view.layer(layer)
            n = neuron_weights(w)
            stats = layer_weight_stats(w, n)
            keys, values = w.keys.detach().float().cpu(), w.values.detach().float().cpu()
            ups = None if w.ups is None else w.ups.detach().float().cpu()
            t1 = time.perf_counter()
            logits = value_logits(w.values, unembedding)
            projection = _cpu(project_values(logits, params.value_top, params.value_bottom))
            t2 = time.perf_counter()
            record = LayerRecord(
                layer=layer, stats=stats, weights=n, keys=keys, values=values, ups=ups, projection=projection,
                seconds={"weight_statistics": t1 - t0, "token_projections": t2 - t1},
            )
            if analysis is not None:
                _add_corpus_figures(record, logits, analysis, params)
                record.seconds["corpus_figures"] = time.perf_counter() - t2
        if progress is not None:
            progress("weights and projections", 1, view.n_layers)
        yield record


def _cpu(p: TokenProjection) -> TokenProjection:
    return TokenProjection(p.top_ids.cpu(), p.top_logits.cpu(), p.bottom_ids.cpu(), p.bottom_logits.cpu())


def _add_corpus_figures(record: LayerRecord, logits: torch.Tensor, a: CorpusAnalysis, params: Parameters) -> None:
    layer = record.layer
    top = a.top[layer]
    ids = a.prefixes.top_ids[layer]
    next_ids = torch.where(ids >= 0, a.prefix_next[ids.clamp(min=0)], -1)
    record.agreement = abl.agreement(logits.cpu(), next_ids)
    values = top.values.cpu()
    values = torch.where(ids >= 0, values, math.nan)
    changes = {k: abl.relative_change(values, a.ablated[k][layer]) for k in abl.ABLATIONS}
    means = {k: abl.nanmean_rows(c) for k, c in changes.items()}
    record.ablation = means
    record.labels = abl.suggested_labels(
        -means["last"], -means["first"], -means["random"],
        shallow=params.shallow_last_drop, semantic=params.semantic_other_drop,
    )
    record.activation = {k: v.cpu() for k, v in a.stats[layer].items()}
    record.top = top
    record.bottom = a.bottom[layer] if a.bottom is not None else None
    record.top_ablated = {k: a.ablated[k][layer] for k in abl.ABLATIONS}
    record.stats.update(
        mean_agreement=_nanmean(record.agreement.agreement),
        # per layer: the mean over triggers of all its neurons (seed 001's figures)
        mean_ablation_last=_nanmean(changes["last"]),
        mean_ablation_first=_nanmean(changes["first"]),
        mean_ablation_random=_nanmean(changes["random"]),
    )
