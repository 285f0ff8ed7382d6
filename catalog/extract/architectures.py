"""Where each supported family keeps its FFN key-value memories.

For neuron i of a layer (0-based): the key k_i is the d_model vector whose dot product with the MLP
input gives the pre-activation; the value v_i is the d_model vector that the memory coefficient
m_i scales in the MLP output. Gated (LLaMA-family) MLPs compute m_i = silu(x.g_i) * (x.u_i): the
gate row g_i is the key and the up row u_i a second input vector.

Encoders (BERT) are read the same way: their FFN is a GELU MLP with biases, but attention sees the
whole window (``causal`` False), so a coefficient belongs to a token position in context, not to
the prefix ending there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class LayerWeights:
    keys: torch.Tensor  # [d_mlp, d_model]
    values: torch.Tensor  # [d_mlp, d_model]
    biases: torch.Tensor | None  # [d_mlp], bias of the input projection
    ups: torch.Tensor | None  # [d_mlp, d_model], gated models only


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    gated: bool
    blocks: Callable[[Any], nn.ModuleList]
    # The module whose forward input is the vector of memory coefficients ([..., d_mlp]).
    value_proj: Callable[[Any], nn.Module]
    layer_weights: Callable[[Any], LayerWeights]
    # None where the model has no final norm (post-LN encoders): the 'folded' convention is then raw.
    final_norm: Callable[[Any], nn.Module | None]
    # The module whose forward output is the key pre-activation x.k_i + b_i (the gate for gated MLPs).
    key_proj: Callable[[Any], nn.Module] | None = None
    # False for encoders: attention is bidirectional, so a trigger is a token position in context.
    causal: bool = True


def _gpt2_weights(block: Any) -> LayerWeights:
    # Conv1D stores weight as [in, out]: keys are the columns of c_fc, values the rows of c_proj.
    mlp = block.mlp
    return LayerWeights(mlp.c_fc.weight.T, mlp.c_proj.weight, mlp.c_fc.bias, None)


def _neox_weights(block: Any) -> LayerWeights:
    mlp = block.mlp
    return LayerWeights(mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight.T, mlp.dense_h_to_4h.bias, None)


def _opt_weights(block: Any) -> LayerWeights:
    return LayerWeights(block.fc1.weight, block.fc2.weight.T, block.fc1.bias, None)


def _llama_weights(block: Any) -> LayerWeights:
    mlp = block.mlp
    return LayerWeights(mlp.gate_proj.weight, mlp.down_proj.weight.T, mlp.gate_proj.bias, mlp.up_proj.weight)


def _bert_weights(block: Any) -> LayerWeights:
    # intermediate.dense computes x.K^T + b, GELU gives the coefficients, output.dense maps them back.
    return LayerWeights(block.intermediate.dense.weight, block.output.dense.weight.T, block.intermediate.dense.bias,
                        None)


FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2", ("gpt2",), False,
        blocks=lambda m: m.transformer.h,
        value_proj=lambda b: b.mlp.c_proj,
        layer_weights=_gpt2_weights,
        final_norm=lambda m: m.transformer.ln_f,
        key_proj=lambda b: b.mlp.c_fc,
    ),
    Family(
        "gpt_neox", ("gpt_neox",), False,
        blocks=lambda m: m.gpt_neox.layers,
        value_proj=lambda b: b.mlp.dense_4h_to_h,
        layer_weights=_neox_weights,
        final_norm=lambda m: m.gpt_neox.final_layer_norm,
        key_proj=lambda b: b.mlp.dense_h_to_4h,
    ),
    Family(
        "opt", ("opt",), False,
        blocks=lambda m: m.model.decoder.layers,
        value_proj=lambda b: b.fc2,
        layer_weights=_opt_weights,
        final_norm=lambda m: m.model.decoder.final_layer_norm,
        key_proj=lambda b: b.fc1,
    ),
    Family(
        "llama", ("llama", "mistral", "qwen2"), True,
        blocks=lambda m: m.model.layers,
        value_proj=lambda b: b.mlp.down_proj,
        layer_weights=_llama_weights,
        final_norm=lambda m: m.model.norm,
        key_proj=lambda b: b.mlp.gate_proj,
    ),
    Family(
        # BertModel (e.g. sentence-transformers' MiniLM) or BertForMaskedLM: base_model is the BertModel.
        "bert", ("bert",), False,
        blocks=lambda m: m.base_model.encoder.layer,
        value_proj=lambda b: b.output.dense,
        layer_weights=_bert_weights,
        final_norm=lambda m: None,  # post-LN: every block ends in its own LayerNorm, nothing after the last
        key_proj=lambda b: b.intermediate.dense,
        causal=False,
    ),
)

SUPPORTED = ("GPT-2, GPT-NeoX/Pythia, OPT, the LLaMA family (Llama, Mistral, Qwen2, SmolLM) "
             "and BERT encoders (BertModel, BertForMaskedLM)")


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}: supported families are {SUPPORTED} "
        f"(model_type one of {', '.join(t for f in FAMILIES for t in f.model_types)})"
    )


@dataclass(frozen=True)
class MlpView:
    """A loaded language model (causal LM or encoder) seen as a stack of FFN key-value memories."""

    model: Any  # a transformers PreTrainedModel (attributes differ per family)
    family: Family

    @classmethod
    def of(cls, model: Any) -> MlpView:
        return cls(model, family_for(model.config.model_type))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def gated(self) -> bool:
        return self.family.gated

    @property
    def causal(self) -> bool:
        return self.family.causal

    def layer(self, layer: int) -> LayerWeights:
        return self.family.layer_weights(self.blocks[layer])

    @property
    def d_model(self) -> int:
        return int(self.layer(0).keys.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.layer(0).keys.shape[0])

    def value_projs(self) -> list[nn.Module]:
        return [self.family.value_proj(b) for b in self.blocks]

    def key_projs(self) -> list[nn.Module] | None:
        key_proj = self.family.key_proj
        return None if key_proj is None else [key_proj(b) for b in self.blocks]

    def final_norm_gain(self) -> torch.Tensor | None:
        """The final norm's elementwise gain g [d_model] (LayerNorm/RMSNorm weight), None without one.

        The head computes logits = norm(h) . E^T with norm(h) = g * n(h) (+ beta): folding g into E
        (E * g) gives the direction's logits as the model reads them (the 'folded' convention). The
        bias beta adds the same logit shift to every value, so it is left out.
        """
        try:
            norm = self.family.final_norm(self.model)
        except AttributeError:
            return None
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.d_model,):
            return None
        return weight.detach()

    def unembedding(self) -> torch.Tensor:
        """E as stored, [vocab, d_model] (no final norm folded in: the 'raw_unembedding' convention).

        Encoders: the word embeddings, to which BERT ties its MLM decoder (a bare BertModel has no head).
        """
        if not self.causal:
            return self.model.get_input_embeddings().weight
        emb = self.model.get_output_embeddings().weight
        project_out = getattr(getattr(getattr(self.model, "model", None), "decoder", None), "project_out", None)
        if project_out is not None:
            # OPT-350m-style models unembed in a smaller space; map it back to d_model.
            emb = emb @ project_out.weight
        return emb
