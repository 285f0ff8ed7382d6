"""Helpers of tests/test_api.py: a real uvicorn server on a free port, the space-marked tiny GPT-2 and
seeded corpora. Nothing here imports catalog.read: the tests' references stay independent of it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import tiny_models
import torch
import uvicorn
from cli_runner import free_port
from sqlalchemy import Engine, text
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SPACE = "\u0120"  # GPT-2's byte-level space marker





@contextmanager
def running_server(app: object, *, startup_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields the base URL, stops on exit."""
    port = free_port()
    from catalog.api.server import JsonErrorsProtocol

    server = uvicorn.Server(uvicorn.Config(app=app, host="127.0.0.1", port=port, log_level="warning",  # type: ignore[arg-type]
                                           http=JsonErrorsProtocol,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="api-test-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            if not thread.is_alive():
                raise RuntimeError("the API server thread ended during startup")
            try:
                if httpx.get(f"{base}/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not answer /healthz within {startup_s}s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def drop_catalog(engine: Engine, name: str, *, annotators_like: str | None = None) -> None:
    """Remove a test's catalog entry with its annotations (they outlive runs by design, so an entry
    cannot go while they remain), optionally its annotators, and the entry's HNSW indexes."""

    with engine.begin() as c:
        c.execute(text("DELETE FROM annotations WHERE model_id IN (SELECT id FROM catalog_models WHERE name = :n)"),
                  {"n": name})
        c.execute(text("DELETE FROM catalog_models WHERE name = :n"), {"n": name})
        if annotators_like is not None:
            c.execute(text("DELETE FROM annotators WHERE name LIKE :p"), {"p": annotators_like})


def save_gpt2_with_biases(directory: Path, *, seed: int = 0, bias_seed: int = 1) -> Path:
    """tiny_models' GPT-2 with seeded random biases (fresh ones are all zero) saved to ``directory``."""
    model = tiny_models.build("gpt2", seed=seed)
    gen = torch.Generator().manual_seed(bias_seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    tiny_models.tokenizer().save_pretrained(directory)
    return directory


def spaced_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level vocabulary with both forms of every word: 'cat' and 'Ġcat' (decoded ' cat')."""
    words = tiny_models.WORDS
    vocab = {t: i for i, t in enumerate(tiny_models.SPECIAL + words + [SPACE + w for w in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_spaced_gpt2(directory: Path, *, seed: int = 3, n_layers: int = 3) -> Path:
    """A tiny GPT-2 over the space-marked vocabulary (built as tiny_models.build builds GPT-2)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = spaced_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=tiny_models.D_MODEL, n_inner=tiny_models.D_MLP, n_layer=n_layers,
                     n_head=2, n_positions=tiny_models.MAX_POS, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(10.0)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def random_lines(seed: int, n: int, *, lo: int = 3, hi: int = 14, planted: list[str] | None = None) -> list[str]:
    """``n`` seeded random sentences of tiny_models.WORDS; ``planted`` lines are spread among them."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(tiny_models.WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]
    for i, line in enumerate(planted or []):
        lines[(i * 37 + 11) % n] = line
    return lines
