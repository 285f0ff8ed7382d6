"""Model (+ corpus) -> per-layer catalog records, with no database in sight.

``pass_state`` runs the corpus pass over a shard, ``ablate`` the ablations of a shard's prefixes and
``analysis_from`` joins the merged result (catalog/runs/sharded.py drives them); ``layer_records``
then yields one ``LayerRecord`` per layer (weights, projections, agreement) so that the store can
write it out before the next layer is computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from catalog.extract import ablation as abl
from catalog.extract import labels as lab
from catalog.extract.architectures import MlpView
from catalog.extract.baselines import Baselines, agreement_figures, negative_trigger_share
from catalog.extract.blocks import Scratch
from catalog.extract.corpus_pass import corpus_pass
from catalog.extract.encoder import agreement_targets, texts_after
from catalog.extract.neighbours import TokenLists
from catalog.extract.params import Parameters, Progress
from catalog.extract.states import PassState, TopState
from catalog.extract.weights import (
    NeuronWeights,
    TokenProjection,
    layer_weight_stats,
    neuron_weights,
    project_values,
    value_logits,
)
from catalog.extract.windows import TokenisedCorpus


@dataclass
class CorpusAnalysis:
    corpus: TokenisedCorpus
    stats: list[dict[str, torch.Tensor]]  # per layer: mean, std, positive_fraction, max
    firing: list[dict[str, torch.Tensor]]  # per layer: gate_open_fraction, abs_p50/p90/p99
    token_counts: torch.Tensor  # [vocab] occurrences of each token among the counted corpus tokens
    top: list[TopState]
    bottom: list[TopState] | None
    prefixes: abl.PrefixTable
    prefix_text: list[str]
    prefix_token: torch.Tensor  # [P] the trigger token
    prefix_next: torch.Tensor  # [P] the next token in the document, -1 at its end
    ablated: dict[str, list[torch.Tensor]]  # kind -> per layer [d_mlp, N] coefficients
    labels: list[lab.LayerLabels] | None = None  # per layer; None without ablations
    label_rule: dict[str, Any] | None = None  # the rule as applied, thresholds included
    prefix_text_after: list[str] | None = None  # encoders: [P] the window's text after the trigger
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def agreement_targets(self) -> torch.Tensor:
        """[P] the token a trigger's value is compared with: the next one, or for an encoder the
        trigger token itself (-1: none)."""
        return agreement_targets(self.prefix_token, self.prefix_next, causal=self.corpus.causal)


def pass_state(
    view: MlpView, tokenizer: Any, corpus: TokenisedCorpus, params: Parameters, progress: Progress | None = None,
    starts: abl.StartCache | None = None,
) -> PassState:
    """The corpus pass over ``corpus`` (a whole corpus or one shard's documents) as a mergeable state;
    ``starts`` keeps the windows' starts for an ablation in this process (``start_cache``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = corpus_pass(
        view.model, view.value_projs(), corpus, top_n=params.top_n, gated=view.gated,
        batch_tokens=params.batch_tokens, pad=pad, key_projs=view.key_projs(),
        progress=None if progress is None else (lambda n: progress("corpus pass", n, corpus.n_tokens)),
        starts=starts,
    )
    vocab = int(view.unembedding().shape[0])
    flat = torch.tensor([t for toks in corpus.tokens for t in toks], dtype=torch.long)
    token_counts = torch.bincount(flat, minlength=vocab)[:vocab]
    return PassState(
        [s for s in result.stats], result.firing, result.top, result.bottom, token_counts,
        {"tokens": result.tokens, "documents": len(corpus.tokens), "windows": len(corpus.windows),
         "truncated_documents": corpus.truncated_documents},
    )


def start_cache(view: MlpView, params: Parameters, budget: int) -> abl.StartCache | None:
    """A cache for the windows' starts (``ablation.StartCache``, up to ``budget`` bytes) when a corpus
    pass and the random ablation run in one process: a causal model whose cache may be cut."""
    if not view.causal or budget <= 0 or not abl.shares_starts(view.model):
        return None
    return abl.StartCache(params.ablation_seed, budget)


def trigger_documents(state: PassState) -> list[int]:
    """The corpus indices of the documents holding some neuron's trigger, ascending."""
    tops = list(state.top) + list(state.bottom or [])
    docs = torch.unique(torch.cat([t.documents.cpu().flatten() for t in tops]))
    return [int(d) for d in docs.tolist() if d >= 0]


def ablation_cuts(table: abl.PrefixTable, prefixes_per_shard: int) -> list[tuple[int, int, int]]:
    """Cut the prefix table into (doc_start, doc_stop, prefixes) ranges of whole documents, each about
    ``prefixes_per_shard`` prefixes; deterministic for a given table."""
    docs = table.documents.tolist()
    if not docs:
        return []
    uniq, counts = torch.unique_consecutive(torch.tensor(sorted(docs)), return_counts=True)
    cuts: list[tuple[int, int, int]] = []
    start, n = int(uniq[0]), 0
    for d, c in zip(uniq.tolist(), counts.tolist(), strict=True):
        if n and n + c > prefixes_per_shard:
            cuts.append((start, d, n))
            start, n = d, 0
        n += c
    cuts.append((start, int(uniq[-1]) + 1, n))
    return cuts


def ablate(
    view: MlpView, tokenizer: Any, corpus: TokenisedCorpus, table: abl.PrefixTable, params: Parameters,
    documents: tuple[int, int] | None = None, progress: Progress | None = None,
    starts: abl.StartCache | None = None,
) -> tuple[dict[str, list[torch.Tensor]], int]:
    """The 'first' and 'random' ablations of the top triggers whose document is in ``documents``
    ([start, stop); all without it): per kind, per layer [d_mlp, N] (NaN elsewhere), and the tokens run.
    The random rows read the windows' starts ``starts`` holds (kept by this process's corpus pass)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.cat([i.flatten() for i in table.top_ids])
    if documents is not None:
        doc = table.documents[ids.clamp(min=0)]
        ids = torch.where((ids >= 0) & (doc >= documents[0]) & (doc < documents[1]), ids, -1)
    jobs = abl.ablation_jobs(corpus, table, ids, seed=params.ablation_seed)
    shared = abl.shares_starts(view.model)
    starts = starts if shared else None
    lead = 1 if corpus.bos is not None else 0
    total = sum(j.tokens(shared, j.cached(starts, lead)) for j in jobs.values())
    out: dict[str, list[torch.Tensor]] = {}
    for kind in ("first", "random"):
        job = jobs[kind]
        out[kind] = abl.run_ablation(
            view.model, view.value_projs(), job, table.top_ids, n_prefixes=len(table), bos=corpus.bos, pad=pad,
            batch_tokens=params.batch_tokens,
            progress=None if progress is None else (lambda n: progress("ablation", n, total)),
            starts=starts if kind == "random" else None,
        )
    abl.read_from_first(out["random"], out["first"], jobs["random"], table.top_ids)
    return out, total


def analysis_from(
    view: MlpView, tokenizer: Any, corpus: TokenisedCorpus, state: PassState, table: abl.PrefixTable,
    ablated: dict[str, list[torch.Tensor]], params: Parameters, counts: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> CorpusAnalysis:
    """The merged pass state, its prefix table and the ablations as one analysis (labels included).

    ``corpus`` needs to hold only the documents with triggers (``trigger_documents``).
    """
    t0 = time.perf_counter()
    top_ids = table.top_ids
    lengths = corpus.prefix_lengths(table.slots, table.positions)  # tokens read up to each trigger
    full: dict[str, list[torch.Tensor]] = {}
    if corpus.causal:  # an encoder's triggers are positions in context: no prefix ablations (encoder.py)
        full["last"] = [t.previous.cpu() for t in state.top]
        # A single-token prefix has no 'without last' either (the corpus pass read BOS there).
        single = lengths == 1  # the trigger is its window's first token
        for layer, ids in enumerate(top_ids):
            one_token = torch.where(ids >= 0, single[ids.clamp(min=0)], True)
            full["last"][layer] = torch.where(one_token, math.nan, full["last"][layer])
        full.update(ablated)
    rule = lab.LabelRule(min_prefix=params.label_min_prefix, min_triggers=params.label_min_triggers,
                         quantile=params.label_quantile, bootstrap=params.label_bootstrap, seed=params.ablation_seed)
    layer_labels: list[lab.LayerLabels] | None = None
    applied: dict[str, Any] | None = None
    if "random" in full:  # encoders have no prefix ablations, hence no label
        per_layer = []
        for layer, ids in enumerate(top_ids):
            a = torch.where(ids >= 0, state.top[layer].values.cpu(), math.nan)
            n_tok = torch.where(ids >= 0, lengths[ids.clamp(min=0)], 0)
            per_layer.append((a, full["last"][layer], full["random"][layer], n_tok))
        n_layers = len(per_layer)
        layer_labels, applied = lab.label_layers(
            per_layer, rule, None if progress is None else (lambda: progress("labels", 1, n_layers)))
    texts = abl.prefix_texts(corpus, table, tokenizer)
    return CorpusAnalysis(
        corpus=corpus,
        stats=[s.summary() for s in state.stats],
        firing=[f.summary() for f in state.firing],
        token_counts=state.token_counts,
        top=state.top,
        bottom=state.bottom,
        prefixes=table,
        prefix_text=texts,
        prefix_token=abl.token_at(corpus, table, 0),
        prefix_next=abl.token_at(corpus, table, 1),
        ablated=full,
        labels=layer_labels,
        label_rule=applied,
        prefix_text_after=None if corpus.causal else texts_after(corpus, table, tokenizer),
        timings={"labels": time.perf_counter() - t0},
        counts={**state.counts, "window_overlap": corpus.overlap, "prefixes": len(table), **(counts or {})},
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
    projection_folded: TokenProjection | None = None  # the final norm's gain folded into E
    seconds: dict[str, float] = field(default_factory=dict)  # compute time by stage
    # corpus figures; None for a weight-only run
    activation: dict[str, torch.Tensor] | None = None
    agreement: Baselines | None = None
    ablation: dict[str, torch.Tensor] | None = None  # kind -> [d_mlp] mean relative change (ablation.py)
    labels: list[str | None] | None = None
    label: lab.LayerLabels | None = None  # the label rule's inputs and confidence
    firing: dict[str, torch.Tensor] | None = None  # gate_open_fraction, abs_p50/p90/p99
    negative_share: torch.Tensor | None = None  # gated models
    top: TopState | None = None
    bottom: TopState | None = None
    top_ablated: dict[str, torch.Tensor] | None = None  # kind -> [d_mlp, N] coefficients


def _nanmean(x: torch.Tensor) -> float | None:
    m = float(x.double().nanmean())
    return None if math.isnan(m) else m


def layer_records(
    view: MlpView, params: Parameters, analysis: CorpusAnalysis | None = None,
    progress: Progress | None = None, token_lists: TokenLists | None = None,
) -> Iterator[LayerRecord]:
    """Each layer's record; ``token_lists`` (if given) is fed the layer's V.E^T products."""
    unembedding = view.unembedding().detach()
    gain = view.final_norm_gain()
    folded_e = unembedding if gain is None else unembedding * gain.to(unembedding.dtype)
    # Each layer's products go to the same two tensors (blocks.Scratch): nothing a record holds views
    # them (the projections, lists and figures are computed from them, not slices of them).
    scratch = Scratch()

    def into(name: str, values: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        out = scratch.get(name, (values.shape[0], E.shape[0]), torch.float32, values.device)
        return value_logits(values, E, out=out)

    for layer in range(view.n_layers):
        with torch.inference_mode():
            t0 = time.perf_counter()
            w = view.layer(layer)
            n = neuron_weights(w)
            stats = layer_weight_stats(w, n)
            keys, values = w.keys.detach().float().cpu(), w.values.detach().float().cpu()
            ups = None if w.ups is None else w.ups.detach().float().cpu()
            t1 = time.perf_counter()
            logits = into("raw", w.values, unembedding)
            projection = _cpu(project_values(logits, params.value_top, params.value_bottom))
            folded = logits if gain is None else into("folded", w.values, folded_e)
            projection_folded = projection if gain is None else _cpu(
                project_values(folded, params.value_top, params.value_bottom))
            t2 = time.perf_counter()
            if token_lists is not None:
                token_lists.add(layer, w.values, logits, None if gain is None else folded)
            t3 = time.perf_counter()
            record = LayerRecord(
                layer=layer, stats=stats, weights=n, keys=keys, values=values, ups=ups, projection=projection,
                projection_folded=projection_folded,
                seconds={"weight_statistics": t1 - t0, "token_projections": t2 - t1, "token_lists": t3 - t2},
            )
            if analysis is not None:
                _add_corpus_figures(record, logits, folded, analysis, params)
                record.seconds["corpus_figures"] = time.perf_counter() - t3
        if progress is not None:
            progress("weights and projections", 1, view.n_layers)
        yield record


def _cpu(p: TokenProjection) -> TokenProjection:
    return TokenProjection(p.top_ids.cpu(), p.top_logits.cpu(), p.bottom_ids.cpu(), p.bottom_logits.cpu())


def _median(x: torch.Tensor) -> float | None:
    return abl.nanmedian_all(x)


def _add_corpus_figures(record: LayerRecord, logits: torch.Tensor, folded: torch.Tensor, a: CorpusAnalysis,
                        params: Parameters) -> None:
    layer = record.layer
    top = a.top[layer]
    ids = a.prefixes.top_ids[layer]
    next_ids = torch.where(ids >= 0, a.agreement_targets[ids.clamp(min=0)], -1)
    negative_next = None
    if a.bottom is not None and a.prefixes.bottom_ids is not None:
        b_ids = a.prefixes.bottom_ids[layer]
        negative_next = torch.where(b_ids >= 0, a.agreement_targets[b_ids.clamp(min=0)], -1)
    base = agreement_figures(logits.cpu(), next_ids, a.token_counts, seed=params.ablation_seed, layer=layer,
                             folded_logits=folded.cpu(), negative_next=negative_next)
    record.agreement = base
    values = top.values.cpu()
    values = torch.where(ids >= 0, values, math.nan)
    # (a' - a) / max(|a|, s), s the neuron's typical trigger coefficient: the label rule's scale
    scale = lab.typical_coefficient(values)
    changes = {k: abl.relative_change(values, a.ablated[k][layer], scale) for k in abl.ABLATIONS if k in a.ablated}
    means = {k: abl.nanmean_rows(c) for k, c in changes.items()}
    record.ablation = means
    if a.labels is not None:
        record.label = a.labels[layer]
        record.labels = record.label.labels
    record.activation = {k: v.cpu() for k, v in a.stats[layer].items()}
    record.firing = {k: v.cpu() for k, v in a.firing[layer].items()}
    record.top = top
    record.bottom = a.bottom[layer] if a.bottom is not None else None
    if record.bottom is not None:
        record.negative_share = negative_trigger_share(top.values.cpu(), record.bottom.values.cpu())
    record.top_ablated = {k: a.ablated[k][layer] for k in abl.ABLATIONS if k in a.ablated}
    lab_inputs = record.label.inputs if record.label is not None else None
    assert base.percentiles is not None and base.percentiles_shuffled is not None
    record.stats.update(
        mean_agreement=_nanmean(base.agreement),
        # per layer: the MEDIAN over every trigger of the layer (the columns keep seed 001's 'mean_'
        # names; a mean was wrecked by one outlying trigger)
        mean_ablation_last=abl.nanmedian_all(changes["last"]) if "last" in changes else None,
        mean_ablation_first=abl.nanmedian_all(changes["first"]) if "first" in changes else None,
        mean_ablation_random=abl.nanmedian_all(changes["random"]) if "random" in changes else None,
        # baselines: means over neurons; rank percentiles: medians over every trigger of the layer
        mean_agreement_shuffled=_nanmean(base.shuffled) if base.shuffled is not None else None,
        mean_agreement_folded=_nanmean(base.folded) if base.folded is not None else None,
        agreement_top1_rate=_nanmean(base.top1) if base.top1 is not None else None,
        mean_agreement_negative=_nanmean(base.negative) if base.negative is not None else None,
        mean_top_token_frequency=_nanmean(base.top_token_frequency) if base.top_token_frequency is not None else None,
        median_rank_percentile=_median(base.percentiles),
        median_rank_percentile_shuffled=_median(base.percentiles_shuffled),
        median_label_contrast=_median(lab_inputs.contrast) if lab_inputs is not None else None,
        median_label_context=_median(lab_inputs.context) if lab_inputs is not None else None,
    )
