"""Agreement between annotators: Cohen's kappa (two raters) and Fleiss' kappa (more), pure functions.

Fleiss' kappa is computed in its form for a varying number of raters per item: each item's
agreement P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)) over its own n_i >= 2 ratings, category
shares p_j over all ratings. With the same n for every item it is Fleiss (1971) exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> tuple[float | None, float | None]:
    """(kappa, observed agreement) of two raters over items labelled by both; kappa None when undefined."""
    n = len(pairs)
    if n == 0:
        return None, None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in first) / (n * n)
    if n < 2 or expected >= 1.0:
        return None, observed
    return (observed - expected) / (1.0 - expected), observed


def fleiss_kappa(items: Sequence[Counter[str]]) -> tuple[float | None, float | None]:
    """(kappa, mean per-item agreement) over items, each a count of labels from >= 2 raters."""
    rated = [c for c in items if sum(c.values()) >= 2]
    if not rated:
        return None, None
    per_item = []
    totals: Counter[str] = Counter()
    for c in rated:
        n_i = sum(c.values())
        per_item.append((sum(v * v for v in c.values()) - n_i) / (n_i * (n_i - 1)))
        totals.update(c)
    observed = sum(per_item) / len(per_item)
    all_ratings = sum(totals.values())
    expected = sum((v / all_ratings) ** 2 for v in totals.values())
    if len(rated) < 2 or expected >= 1.0:
        return None, observed
    return (observed - expected) / (1.0 - expected), observed


def kappa_for(labels: dict[tuple[int, int], dict[str, str]]) -> tuple[int, int, str | None, float | None, float | None]:
    """(items, annotators, method, kappa, observed) for {neuron: {annotator: label}}: Cohen's when the
    neurons with two or more labels were labelled by exactly two annotators in all, Fleiss' otherwise."""
    multi = {k: v for k, v in labels.items() if len(v) >= 2}
    raters = sorted({a for v in multi.values() for a in v})
    if not multi:
        return 0, len(raters), None, None, None
    if len(raters) == 2:
        a, b = raters
        kappa, observed = cohen_kappa([(v[a], v[b]) for v in multi.values()])
        return len(multi), 2, "cohen", kappa, observed
    kappa, observed = fleiss_kappa([Counter(v.values()) for v in multi.values()])
    return len(multi), len(raters), "fleiss", kappa, observed
