"""POST /models/{model}/probe: run the catalog's model on a text and list the neurons that fire.

The route module imports no torch; the first probe loads torch, transformers and the model (once
per catalog run, kept for the life of the process). Probes of one model run one at a time: the
coefficient hooks sit on the shared model. A server installed without the ``extract`` extra (the
torch-free API image) answers every probe 501: it keeps the rest of the API and never fails at import.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from catalog.api.deps import SessionDep
from catalog.api.routes import ERRORS
from catalog.config import settings
from catalog.read.catalog import require_run
from catalog.read.errors import InvalidParameter, ReadError, Unsupported
from catalog.read.schemas import ErrorBody, ProbeNeuron, ProbeRequest, ProbeResult, ProbeToken

router = APIRouter(responses=ERRORS)
NO_TORCH = ("probe needs torch and the model, which this server does not have (the torch-free API image); "
            "serve the API from the worker image for probe: see README 'Compose'")


class ProbeUnavailable(ReadError):
    """This server cannot run a model: it was installed without torch."""

    status = 501


@cache
def probe_available() -> bool:
    """Whether torch and transformers are installed (looked up once; nothing is imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    except (ImportError, ValueError):  # a finder that refuses the name; a half-removed package
        return False


@dataclass
class _Held:
    run_id: int
    loaded: Any  # catalog.loading.LoadedModel
    lock: threading.Lock


class ModelCache:
    """One loaded model per catalog entry, replaced when the entry's current run changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}

    def get(self, name: str, run_id: int, spec: str, weights_sha256: str | None) -> _Held:
        with self._lock:
            held = self._held.get(name)
            if held is not None and held.run_id == run_id:
                return held
            from catalog.loading import ModelSourceError, load
            from catalog.loading import weights_sha256 as digest

            try:
                loaded = load(spec)
            except (ModelSourceError, ValueError, OSError) as exc:
                raise Unsupported(f"cannot load the model of catalog {name!r} from {spec!r}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            if weights_sha256 is not None and digest(loaded.model) != weights_sha256:
                raise Unsupported(f"the model at {spec!r} no longer has the weights catalog {name!r} was "
                                  "extracted from; extract it again")
            held = self._held[name] = _Held(run_id, loaded, threading.Lock())
            return held


models = ModelCache()


def run_probe(loaded: Any, text: str, k: int, *, window: int, max_tokens: int,
              bos: str | int | None = "auto") -> tuple[list[ProbeToken], list[ProbeNeuron]]:
    """Per token the k strongest neurons, and overall the k with the highest maximum over the text.

    The text is read as the corpus pass reads one document (the run's BOS first, if any;
    [CLS] text [SEP] for an encoder), so its coefficients are the ones the catalog's triggers were
    ranked by; it must fit one window.
    """
    import torch

    from catalog.corpus import Document
    from catalog.extract.hooks import backbone, capture_coefficients
    from catalog.extract.windows import tokenise

    tok = loaded.tokenizer
    corpus = tokenise([Document(0, text)], tok, window=window, max_tokens=None, causal=loaded.view.causal, bos=bos)
    if not corpus.tokens:
        raise InvalidParameter("text: has no tokens")
    ids = corpus.tokens[0]
    lead = [corpus.bos] if corpus.bos is not None else []
    tail = [corpus.sep] if corpus.sep is not None else []
    cap = min(max_tokens, window - len(lead) - len(tail))
    if len(ids) > cap:
        raise InvalidParameter(f"text: is {len(ids)} tokens long; the probe reads at most {cap} (one window)")
    input_ids = torch.tensor([lead + ids + tail], device=loaded.device)
    view = loaded.view
    layers: list[torch.Tensor] = [torch.empty(0)] * view.n_layers

    def on_layer(layer: int, coeffs: torch.Tensor) -> None:
        layers[layer] = coeffs[0, len(lead):len(lead) + len(ids)].float().cpu()  # [pos, d_mlp], BOS/SEP dropped

    shape = list(input_ids.shape)
    with torch.inference_mode(), capture_coefficients(view.value_projs(), on_layer, shape):
        backbone(loaded.model)(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    coeffs = torch.stack(layers, dim=1)  # [pos, layer, d_mlp]
    pos, n_layers, d_mlp = coeffs.shape
    flat = coeffs.reshape(pos, n_layers * d_mlp)
    kk = min(k, n_layers * d_mlp)
    values, where = flat.topk(kk, dim=1)
    texts = tok.batch_decode([[i] for i in ids], skip_special_tokens=False)
    per_token = [
        ProbeToken(position=p, token_id=ids[p], token=texts[p], neurons=[
            ProbeNeuron(layer=int(w) // d_mlp, neuron=int(w) % d_mlp, coefficient=float(v))
            for v, w in zip(values[p].tolist(), where[p].tolist(), strict=True)
        ])
        for p in range(pos)
    ]
    best, best_at = flat.max(dim=0).values.topk(kk)
    top = [ProbeNeuron(layer=int(w) // d_mlp, neuron=int(w) % d_mlp, coefficient=float(v))
           for v, w in zip(best.tolist(), best_at.tolist(), strict=True)]
    return per_token, top


def require_torch() -> None:
    if not probe_available():
        raise ProbeUnavailable(NO_TORCH)


# require_torch is a route dependency: it runs before the session's, so a torch-free server answers 501
# without touching the database.
@router.post("/models/{model}/probe", response_model=ProbeResult, tags=["probe"], dependencies=[Depends(require_torch)],
             responses={501: {"model": ErrorBody, "description":
                              "This server has no torch (the torch-free API image): it cannot run a model."}})
def probe(model: Annotated[str, Path(max_length=200)], body: ProbeRequest, session: SessionDep) -> ProbeResult:
    """Run the model on ``text`` (length capped) and list, per token, the neurons with the highest
    coefficients, and overall the neurons with the highest maximum over the text."""
    entry, run = require_run(session, model)
    params = run.parameters or {}
    spec = str(params.get("model") or entry.source)
    window = int(params.get("window", 256))
    # the BOS the run read documents after (runs before part 5 recorded none: the tokenizer's choice)
    bos = params["bos_token_id"] if "bos_token_id" in params else params.get("bos", "auto")
    session.rollback()  # no transaction held while the model loads or runs
    held = models.get(entry.name, run.id, spec, run.weights_sha256)
    with held.lock:
        per_token, top = run_probe(held.loaded, body.text.replace("\x00", "\ufffd"), body.k, window=window,
                                   max_tokens=settings.probe_max_tokens, bos=bos)
    return ProbeResult(model=entry.name, run_id=run.id, tokens=per_token, top=top)


