"""Tiny random causal LMs (Llama, and one per family in FAMILIES) and a byte-level tokenizer, for tests that
need a real transformers model offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast


def byte_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) with <s>, </s>, <pad> special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    special = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", **special)


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast, max_positions: int = 128, **config: int
) -> LlamaForCausalLM:
    """A random 4-block Llama with d = 32 (seeded), in eval mode; `config` adds LlamaConfig fields."""
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        **config,
    )
    return LlamaForCausalLM(llama).eval()


def _family_configs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Config of each family at d = 32, 3 blocks; the Gemmas need head_dim as it is not d / heads there."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common |= special
    gemma = {**common, "head_dim": 8}
    return {
        "llama": LlamaConfig(**common),
        "gemma": GemmaConfig(**gemma),
        # A window shorter than the test chunks, so the sliding-window blocks really mask.
        "gemma2": Gemma2Config(**gemma, sliding_window=8),
        "gemma3": Gemma3TextConfig(**gemma, sliding_window=8),
        "qwen2": Qwen2Config(**common),
        "gpt2": GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=128, **special
        ),
    }


FAMILIES = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "gpt2")
"""Families `tiny_family` builds: Llama, Gemma 1-3 (text), Qwen2, GPT-2 (blocks in transformer.h)."""


def tiny_family(family: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A random 3-block causal LM of `family` (one of FAMILIES) with d = 32 (seeded), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _family_configs(tokenizer)[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_family(family: str, folder: Path) -> Path:
    """Save a `tiny_family` model and its byte tokenizer to `folder` (save_pretrained); returns `folder`."""
    tokenizer = byte_tokenizer()
    tiny_family(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
