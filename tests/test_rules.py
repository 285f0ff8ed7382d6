"""Pure rules: the random-token ablation (for any one prefix the removed token is uniform over its
first L - 1) and the next-token ranks behind agreement."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

from catalog.extract.ablation import random_chain, random_removed
from catalog.extract.weights import token_ranks


def test_chain_is_strictly_decreasing_and_ends_at_zero() -> None:
    for doc in range(200):
        chain = random_chain(0, doc, 0, 40)
        assert chain[-1] == 0 and all(a > b for a, b in pairwise(chain))
        assert chain[0] <= 38  # never the last token of the longest prefix


def test_removed_token_is_uniform_for_each_prefix_length() -> None:
    window, draws = 12, 6000
    chains = [random_chain(7, doc, 0, window) for doc in range(draws)]
    for length in range(2, window + 1):
        counts = np.bincount([random_removed(c, length) for c in chains], minlength=length - 1)
        assert len(counts) == length - 1  # only tokens before the last are ever removed
        expected = draws / (length - 1)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # 99.9% quantile of chi-square with <= 10 degrees of freedom is 29.6
        assert chi2 < 29.6, (length, counts.tolist())


def test_chain_is_deterministic_per_seed_document_and_window() -> None:
    assert random_chain(3, 5, 255, 100) == random_chain(3, 5, 255, 100)
    assert random_chain(3, 5, 255, 100) != random_chain(4, 5, 255, 100)


def test_chain_costs_about_two_window_lengths() -> None:
    # tokens run for a window whose every prefix is a trigger: T + r1 + r2 + ... ~ 2T
    window = 255
    costs = [window + sum(random_chain(0, d, 0, window)) for d in range(500)]
    assert np.mean(costs) < 2.2 * window


def test_token_ranks_equal_brute_force_with_ties_and_gaps() -> None:
    g = torch.Generator().manual_seed(0)
    # coarse values: many ties inside rows and between targets
    logits = torch.randint(-5, 6, (37, 300), generator=g).float()
    ids = torch.randint(0, 300, (37, 9), generator=g)
    ids[3] = ids[3, 0]  # the same token nine times
    ids[5, :4] = -1  # no trigger
    ids[6] = -1
    got = token_ranks(logits, ids, chunk=8)  # several chunks, the last one partial
    for i in range(37):
        for j in range(9):
            t = int(ids[i, j])
            want = 0 if t < 0 else 1 + int((logits[i] > logits[i, t]).sum())
            assert int(got[i, j]) == want, (i, j)
