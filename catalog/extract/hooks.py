"""Forward hooks on named sites (the value projections' inputs, the key projections' outputs), and padding.

Hooks are registered in a context manager that removes them in ``finally``; tensors are detached at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def pad_rows(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: coefficients need no logits, which cost ~a fifth of a
    small model's forward pass (SmolLM2: 576 x 49152 per token)."""
    return getattr(model, "base_model", model)


@contextmanager
def capture_coefficients(
    value_projs: Sequence[nn.Module], on_layer: Callable[[int, torch.Tensor], None], shape: list[int]
) -> Iterator[None]:
    """Call ``on_layer(layer, coefficients [batch, pos, d_mlp])`` during each forward pass.

    ``shape`` holds the current [batch, pos]; OPT flattens the MLP input to [batch*pos, d_mlp].
    """

    def hook_for(layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            on_layer(layer, args[0].detach().reshape(shape[0], shape[1], -1))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(value_projs)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(
    modules: Sequence[nn.Module], on_layer: Callable[[int, torch.Tensor], None], shape: list[int]
) -> Iterator[None]:
    """Call ``on_layer(layer, output [batch, pos, d_mlp])`` with each module's forward output
    (the key projections: their output is the pre-activation, bias included)."""

    def hook_for(layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            on_layer(layer, out.detach().reshape(shape[0], shape[1], -1))

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
