"""Titles and captions of the report's figures: what each shows, which seed claim it tests, and the
measured numbers (by layer, and the first third of the layers against the last third where the claim
is a depth trend). Pure functions of the figure data; plain text (the HTML escapes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from catalog.report import data as d

TITLES = {
    "bias-scatter": "Bias against key norm, value norm and alignment",
    "bias-fits": "Fitted slope, correlations and means by layer",
    "alignment": "Key-value alignment by layer",
    "cosines": "Cosine between a layer's columns",
    "ablation": "Coefficient drop when a token is removed",
    "label-contrast": "Paired contrast: last token against a random other token",
    "agreement": "Agreement by layer, with its baselines",
    "labels": "Suggested labels by layer",
    "human": "Human labels by layer and their agreement with the suggested label",
}


def num(v: float | None, digits: int = 3) -> str:
    """A number as the captions print it: significant digits, '-' when missing, no '-0'."""
    if v is None:
        return "-"
    s = f"{v:.{digits}g}"
    return "0" if s in ("-0", "0") else s


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def per_layer(layers: Sequence[int], values: Sequence[Any], fmt: Any = num) -> str:
    """'layer 0: 0.12, 1: 0.3, ...' (one value per layer)."""
    if len(layers) == 1:
        return f"layer {layers[0]}: {fmt(values[0])}"
    return "layer " + ", ".join(f"{layer}: {fmt(v)}" for layer, v in zip(layers, values, strict=True))


def _where(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else "each layer"


def _trend(layers: Sequence[int], values: Sequence[float | None], fmt: Any = num) -> str:
    """'first third of the layers X, last third Y' (empty for fewer than 3 layers)."""
    if len(layers) < 3:
        return ""
    early, late = d.thirds(layers, values)
    return f"; first third of the layers {fmt(early)}, last third {fmt(late)}"


def _rule(rule: dict[str, Any] | None) -> str:
    if not rule:
        return ""
    return " Label rule of this run: " + ", ".join(f"{k} = {rule_value(v)}" for k, v in sorted(rule.items())) + "."


def rule_value(v: Any) -> str:
    """A label-rule setting as printed: floats to 4 significant digits, anything else as it is."""
    return num(v, 4) if isinstance(v, float) else str(v)


def bias_scatter(fig: d.BiasScatter, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    which = (f"in layer {fig.layers[0]}" if len(fig.layers) == 1 else
             f"in layers {', '.join(map(str, fig.layers))} of 0-{ref.n_layers - 1}")
    parts = []
    for layer in fig.layers:
        fits = fig.fits.get(layer, {})
        parts.append(f"layer {layer}: " + "; ".join(
            f"{d.STAT_NAMES[s]} slope {num(f.slope)}, r {num(f.r)}" if f else f"{d.STAT_NAMES[s]} no fit"
            for s, f in fits.items()))
    return (f"Each neuron's bias against its key norm ‖k_i‖, value norm ‖v_i‖ and key-value alignment cos(k_i, v_i) "
            f"{which}, with the least-squares line. Tests {d.SEED_000}, Figure 1: the bias tracks the key's "
            "magnitude (a longer key passes the same threshold sooner, so the bias compensates), most values "
            "share one magnitude with a few outliers, and the bias follows the alignment, with clear correlations "
            f"in later layers. Measured (slope of bias on x, Pearson r): {' | '.join(parts)}.")


def bias_fits(fig: d.BiasFits, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    abs_r = {s: [None if r is None else abs(r) for r in fig.r(s)] for s in d.WEIGHT_STATS}
    trends = "".join(f" |r| of bias with {d.STAT_NAMES[s]}{_trend(fig.layers, abs_r[s])}." for s in d.WEIGHT_STATS
                     if len(fig.layers) >= 3)
    return ("Per layer: the least-squares slope of each neuron's bias on its alignment (seed 000's fitted line), "
            "Pearson r of bias with key norm, value norm and alignment, and the mean bias and mean alignment. "
            f"Tests {d.SEED_000}, Figures 1-2: the correlations are clear in later layers, and the bias follows the "
            f"alignment. Measured slope on alignment: {per_layer(fig.layers, fig.slope('alignment'))}. "
            f"Pearson r with key norm: {per_layer(fig.layers, fig.r('key_norm'))}; with value norm: "
            f"{per_layer(fig.layers, fig.r('value_norm'))}; with alignment: "
            f"{per_layer(fig.layers, fig.r('alignment'))}. Mean bias: {per_layer(fig.layers, fig.mean_bias)}."
            + trends)


def alignment(fig: d.Alignment, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    gated = (" For this gated MLP the key is the gate row, so this is cos(g_i, v_i), not seed 000's M1-M2 "
             "alignment." if fig.gated else "")
    return (f"Distribution of the key-value alignment cos(k_i, v_i) over the neurons of {_where(fig.layers)} "
            f"(violin: the density; dot: the mean). Tests {d.SEED_000}, Figure 1: in early layers two clusters, "
            "one positively and one negatively aligned, which in later layers become a single, slightly negative "
            f"cluster. Measured mean: {per_layer(fig.layers, fig.mean)}; share of neurons with positive alignment: "
            f"{per_layer(fig.layers, fig.positive_share, pct)}{_trend(fig.layers, fig.positive_share, pct)}."
            + gated + _single_clip(fig.layers, [("alignment", fig.values)]))


def cosines(fig: d.Cosines, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    sample = (f"all {fig.all_pairs} pairs of distinct columns" if fig.pairs >= fig.all_pairs else
              f"{fig.pairs} pairs of distinct columns per layer, drawn uniformly with a fixed seed "
              f"({d.COSINE_SEED}) from the {fig.all_pairs} there are")
    return (f"Distribution of the cosine similarity between distinct keys (M1 columns) and between distinct values "
            f"(M2 columns) of {_where(fig.layers)}, over {sample}; the diamond marks the stored mean over all "
            f"pairs (key_cosine_mean, value_cosine_mean: exact). Tests {d.SEED_000}, Figure 3: the keys tend to "
            "point, at least partly, in a shared direction (mean cosine above 0), while the values are nearly "
            f"uncorrelated (around 0). Measured mean cosine of keys: {per_layer(fig.layers, fig.stored_key_mean)}; "
            f"of values: {per_layer(fig.layers, fig.stored_value_mean)}."
            + _single_clip(fig.layers, [("keys", fig.keys), ("values", fig.values)], bins=50))


def ablation(fig: d.Ablation, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    drops = {k: [None if v is None else -v for v in vs] for k, vs in
             (("last", fig.last), ("first", fig.first), ("random", fig.random))}
    return ("Drop of the top triggers' memory coefficients (the negated median, over every trigger of a layer, of "
            "the relative change (a'-a)/max(|a|, s), s the neuron's median trigger coefficient: a floor, so a "
            "near-zero coefficient cannot blow the ratio up, and a median, so one outlying trigger cannot move a "
            f"layer) when the prefix's last token, its first token or a random other token is removed. "
            f"Tests {d.SEED_001}, 'change in memory coefficient': removing the last token lowers the coefficient "
            "most, by 60% or more in lower layers and by about 40% in upper layers, and the first or a random token "
            f"by up to 25%, most in low layers. Measured drop without the last token: "
            f"{per_layer(fig.layers, drops['last'], pct)}{_trend(fig.layers, drops['last'], pct)}; without the "
            f"first: {per_layer(fig.layers, drops['first'], pct)}; without a random token: "
            f"{per_layer(fig.layers, drops['random'], pct)}. The trigger is its document's maximum, so any removal "
            "tends to lower it (selection); the paired-contrast figure uses the random removal as the control.")


def contrast(fig: d.Contrast, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    med, ctx = fig.medians("contrast"), fig.medians("context")
    return ("Per neuron: label_contrast, the median over its triggers of (coefficient without a random other token "
            "- coefficient without the last token) / the neuron's typical trigger coefficient (positive: the last "
            "token matters more than a random other one, i.e. shallow), and label_context, the median drop when a "
            f"random other token is removed, in the same units; boxes over the neurons of {_where(fig.layers)}. "
            f"Tests the finding of {d.SEED_001} that patterns are shallow in lower layers and semantic in upper ones, "
            "with the random removal as the control for 'any change lowers a maximum' (so the contrast should fall "
            f"with depth). Measured median contrast: {per_layer(fig.layers, med)}{_trend(fig.layers, med)}; median "
            f"context drop: {per_layer(fig.layers, ctx)}.{_rule(fig.rule)}"
            + _single_clip(fig.layers, [("label_contrast", fig.contrast), ("label_context", fig.context)]))


def _single_clip(layers: Sequence[int], named: Sequence[tuple[str, dict[int, Any]]], bins: int = 40) -> str:
    """A one-layer figure draws histograms: say how each one's axis was clipped, if it was ('' otherwise)."""
    if len(layers) != 1:
        return ""
    return d.clip_notes([(name, values[layers[0]]) for name, values in named if layers[0] in values], bins)


def agreement(fig: d.Agreement, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    m = fig.means
    agree, shuffled, chance = m["agreement"], m["agreement_shuffled"], m["top_token_frequency"]
    extra = []
    if any(v is not None for v in m["agreement_top1"]):
        extra.append(f"top-1 trigger agreement rate: {per_layer(fig.layers, m['agreement_top1'])}")
    if any(v is not None for v in m["agreement_folded"]):
        extra.append(f"with the final-norm gain folded in: {per_layer(fig.layers, m['agreement_folded'])}")
    if any(v is not None for v in m["agreement_negative"]):
        extra.append(f"negative triggers against the bottom tokens: {per_layer(fig.layers, m['agreement_negative'])}")
    rank, rank_sh = fig.medians["next_token_rank_percentile"], fig.medians["next_token_rank_percentile_shuffled"]
    ranks = (f" Median next-token rank percentile (0 = the value's top token, 0.5 = chance): "
             f"{per_layer(fig.layers, rank)}; shuffled: {per_layer(fig.layers, rank_sh)}."
             if any(v is not None for v in rank) else "")
    encoder = (" For this encoder the agreement and the rank compare the value's top token with the trigger token "
               "itself, not the next one (a masked LM reads out the token at its own position)."
               if not ref.causal else "")
    return ("Mean over the neurons of each layer of the agreement (share of a neuron's top triggers whose next token "
            "is its value's top token, precision@N), beside its baselines: the same triggers scored against "
            "another neuron's value of the layer (shuffled, fixed seed), and the corpus frequency of the value's top "
            "token (chance); also Geva's top-1 trigger agreement, the folded projection and, for gated models, the "
            f"negative triggers. Tests {d.SEED_001}, 'agreement rate': a value's top prediction agrees with its "
            "key's triggers' next tokens, more often in upper layers. Measured agreement: "
            f"{per_layer(fig.layers, agree)}{_trend(fig.layers, agree)}; shuffled: {per_layer(fig.layers, shuffled)}; "
            f"chance (top-token frequency): {per_layer(fig.layers, chance)}"
            + "".join(f"; {e}" for e in extra) + "." + ranks + encoder)


def labels(fig: d.Labels, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    shares = fig.shares()
    shallow = [s.get("shallow", 0.0) if s else None for s in shares]
    semantic = [s.get("semantic", 0.0) if s else None for s in shares]
    return (f"Shares of the suggested labels among the neurons of {_where(fig.layers)} that have one (neurons "
            "without a measurable trigger have none; their count is printed above each bar). Tests "
            f"{d.SEED_001}: annotators found mostly shallow patterns in lower layers and semantic ones in upper "
            f"layers. Measured share shallow: {per_layer(fig.layers, shallow, pct)}{_trend(fig.layers, shallow, pct)}; "
            f"semantic: {per_layer(fig.layers, semantic, pct)}{_trend(fig.layers, semantic, pct)}; without a label: "
            f"{per_layer(fig.layers, fig.unlabelled, str)}.{_rule(fig.rule)}")


def human(fig: d.Human, ref: d.RunRef) -> str:
    if fig.note:
        return fig.note
    total = sum(sum(c.values()) for c in fig.counts)
    k = fig.overall
    kappa = ("undefined (too few items or a single label)" if k is None or k.kappa is None else num(k.kappa))
    return ("Left: shares of annotators' current labels per layer (each annotator's label of a neuron counted once; "
            f"{total} annotations). Right: human label (rows) against the suggested label (columns). Tests the human "
            f"classification of {d.SEED_001} (shallow in lower layers, semantic in upper ones), and whether the "
            "suggested label says what annotators see. Cohen's kappa of the human against the suggested label "
            f"(each annotation one item): {kappa} over {k.items if k else 0} annotations (observed agreement "
            f"{num(k.observed if k else None)}); by layer: "
            f"{per_layer(fig.layers, [x.kappa for x in fig.by_layer])}.")
