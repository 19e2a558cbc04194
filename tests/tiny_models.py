"""A tiny random Llama and a byte-level tokenizer, for tests that need a real transformers model offline."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


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
