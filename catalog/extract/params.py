"""Extraction parameters and the progress callback's shape: torch-free, so requests and run rows
can carry them without importing the maths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[str, int, int], None]  # (stage, done increment, total)


@dataclass(frozen=True)
class Parameters:
    top_n: int = 50
    window: int = 256
    batch_tokens: int = 4096
    value_top: int = 30
    value_bottom: int = 10
    ablation_seed: int = 0  # also seeds the shuffled-value baseline and the label bootstrap
    label_min_prefix: int = 4
    label_min_triggers: int = 5
    label_quantile: float = 0.5
    label_bootstrap: int = 200
    # BOS read before each window: "auto" (the tokenizer's own, see corpus_pass.choose_bos), "none",
    # or a token's text
    bos: str = "auto"
