"""Row blocks of the per-neuron CPU stages, run in a few Python threads with single-threaded torch ops.

These stages are many short tensor ops per block of neurons. With torch's own intra-op threads,
every op ends in a barrier that waits for all of them, and on a shared machine (2 cores, other
work running) a descheduled thread stalls each barrier: measured 5-10x slower than one thread. Whole
blocks per Python thread (torch releases the GIL inside an op) use the same cores without barriers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


@contextmanager
def _single_threaded_ops() -> Iterator[int]:
    """torch ops on one thread inside; yields the thread count there was before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def run_blocks(n: int, block: int, work: Callable[[int, int, T], None], prepare: Callable[[int, int], T],
               *, threaded: bool = True) -> None:
    """work(a, b, prepare(a, b)) for each block [a, b) of range(n).

    ``prepare`` runs in block order on the calling thread (a seeded random draw must), ``work`` in
    worker threads, one per torch thread, each block's writes disjoint from the others'. With one
    torch thread, or ``threaded`` False (tensors on an accelerator), it all runs inline.
    """
    starts = range(0, n, block)
    if not threaded or torch.get_num_threads() <= 1:
        for a in starts:
            b = min(a + block, n)
            work(a, b, prepare(a, b))
        return
    # grad and inference mode are per thread: the workers take the caller's (an inference tensor
    # can only be written to in inference mode)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_mode(a: int, b: int, prepared: T) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(a, b, prepared)

    with _single_threaded_ops() as workers, ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[None]] = deque()
        for a in starts:
            b = min(a + block, n)
            pending.append(pool.submit(in_mode, a, b, prepare(a, b)))
            if len(pending) > 2 * workers:  # bounded: prepared inputs wait for a free worker
                pending.popleft().result()
        for f in pending:
            f.result()


class Scratch:
    """Named whole-layer temporaries kept across layers, written with ``out=``: a fresh tensor of
    SmolLM2's [1,536 x 49,152] floats cost 4x the multiplication that fills it (110 against 28 ms),
    its pages faulted in again each time. Whatever a caller keeps must not view them."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._held.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            t = self._held[name] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def like(self, name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.get(name, tuple(x.shape), dtype or x.dtype, x.device)

    def clear(self) -> None:
        self._held.clear()
