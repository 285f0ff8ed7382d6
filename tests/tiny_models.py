"""Tiny, seeded, randomly initialised models of every supported family, saved as local directories.

A word-level tokenizer keeps token boundaries obvious in tests. ``bos=False`` builds a tokenizer
without a BOS token (the no-BOS code path).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue", "green", "house", "tree", "river", ".", ",", "and", "of", "to", "in", "is", "was", "big", "small", "bird", "sang", "sun", "moon"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
FAMILIES = ("gpt2", "gpt_neox", "opt", "llama")
D_MODEL, D_MLP, N_LAYERS, MAX_POS = 16, 24, 2, 64
# The final norm's weight (the gain that the 'folded' projection multiplies into E), per family
FINAL_NORM = {"gpt2": "transformer.ln_f.weight", "gpt_neox": "gpt_neox.final_layer_norm.weight",
              "opt": "model.decoder.final_layer_norm.weight", "llama": "model.norm.weight"}


def tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    v = len(SPECIAL) + len(WORDS)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=2, n_positions=MAX_POS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model: torch.nn.Module = GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=v, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                            num_attention_heads=2, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, tie_word_embeddings=False)
        model = GPTNeoXForCausalLM(cfg)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=v, hidden_size=D_MODEL, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS,
                        num_attention_heads=2, max_position_embeddings=MAX_POS, word_embed_proj_dim=D_MODEL,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = OPTForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=v, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init is tiny (std 0.02); scale weights up so coefficients differ clearly between prefixes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(10.0)
        # A final-norm gain other than 1, so that the 'folded' projection (E * g) differs from the raw
        # one; the final norm comes after every MLP, so no memory coefficient changes.
        gain = dict(model.named_parameters())[FINAL_NORM[family]]
        gain.copy_(torch.empty_like(gain).uniform_(0.2, 3.0))
    return model.eval()


def save(family: str, directory: Path, *, seed: int = 0, bos: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build(family, seed).save_pretrained(directory)
    tokenizer(bos).save_pretrained(directory)
    return directory
