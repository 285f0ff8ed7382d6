"""The BOS read before every window is explicit (--bos auto|none|TOKEN) and recorded on the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from catalog.export import records
from catalog.extract.pipeline import Parameters
from catalog.extract.windows import BosError, choose_bos
from catalog.read.catalog import current_run
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest
from catalog.store.database import get_engine, session_scope
from catalog.store.models import CatalogModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    """Like SmolLM2-Instruct's GGUF tokenizer: BOS is the chat header, and no BOS is added."""
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "a", "b"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", add_bos_token=False)


def test_choose_bos() -> None:
    chat = _chat_tokenizer()
    assert choose_bos(chat, "auto")[0] == 0  # <|endoftext|>, not the chat header
    assert choose_bos(chat, "<|im_start|>")[0] == 1
    assert choose_bos(chat, "none") == (None, "none")
    with pytest.raises(BosError, match="no such token"):
        choose_bos(chat, "<|nope|>")
    plain = tiny_models.tokenizer(True)  # no <|endoftext|>: its own BOS
    assert choose_bos(plain, "auto")[0] == plain.convert_tokens_to_ids("<s>")
    assert choose_bos(tiny_models.tokenizer(False), "auto")[0] is None


LINES = ["the cat sat on the mat", "a dog ran fast and the bird sang", "red house by the river"]


def _coefficients(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Layer-0 coefficients of every position of ``ids``, read by this test's own hook."""
    got: list[torch.Tensor] = []
    proj = model.transformer.h[0].mlp.c_proj  # type: ignore[union-attr,index]
    h = proj.register_forward_pre_hook(lambda _m, a: got.append(a[0][0].detach().clone()))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("spec", ["none", "</s>", "auto"])
def test_extraction_reads_the_chosen_bos(migrated_db: str, tmp_path: Path, spec: str) -> None:
    model_dir = tiny_models.save("gpt2", tmp_path / "m", seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    name = f"bos-{spec}"
    engine = get_engine(migrated_db)
    params = Parameters(top_n=2, window=16, batch_tokens=64)
    extract(ExtractRequest(model=str(model_dir), name=name, corpus=str(corpus),
                           params=Parameters(**{**params.__dict__, "bos": spec})), engine=engine)
    tok = tiny_models.tokenizer(True)
    lead = {"none": [], "</s>": [tok.convert_tokens_to_ids("</s>")], "auto": [tok.convert_tokens_to_ids("<s>")]}[spec]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        with session_scope(engine) as s:
            found = current_run(s, name)
            assert found is not None
            p = found[1].parameters
            assert p["bos"] == spec and p["bos_token_id"] == (lead[0] if lead else None)
            assert p["bos_token"] == (tok.convert_ids_to_tokens(lead[0]) if lead else None)
            checked = 0
            for rec in records(s, name, layers=[0]):
                for t in rec["triggers"]:
                    ids = tok(LINES[t["document"]], add_special_tokens=False)["input_ids"]
                    want = _coefficients(model, lead + ids)[len(lead) + t["position"], rec["neuron"]]
                    assert t["activation"] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
                    checked += 1
            assert checked > 0
    finally:
        with session_scope(engine) as s:
            s.query(CatalogModel).filter(CatalogModel.name == name).delete()
