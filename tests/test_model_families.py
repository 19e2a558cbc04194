"""Capture from each supported model family, loaded from a saved folder as `atoms run --model DIR` does.

Each family's tiny random model (tests/tiny_models.py: 3 blocks, d = 32, byte tokenizer) is written with
save_pretrained and read back through `atoms.models.load_model`, the loader the main job calls; the capture is
checked against transformers' own `output_hidden_states`, one unpadded chunk at a time.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

# Nothing here may reach the Hugging Face hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import FAMILIES, byte_tokenizer, save_tiny_family, tiny_family, tiny_llama

from atoms.activations import BATCH_TOKENS, capture, decoder_layers, default_batch_size
from atoms.errors import BadInputError
from atoms.models import default_dtype, load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Atoms are sparse directions in the residual stream.",
    "Wikipedia is a free online encyclopedia written by volunteers. " * 2,
]
SEQ_LEN = 24  # three times Gemma2/3's sliding window of 8, so their windowed blocks really mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the build machine's 2 cores are shared (see test_activations.one_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    folder = save_tiny_family(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(folder)


def chunks_of(tokenizer, texts, seq_len):
    """The token chunks capture feeds the model, built independently: texts joined by EOS, BOS in front."""
    ids = []
    for t in texts:
        ids += [*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id]
    body = seq_len - 1
    return [[tokenizer.bos_token_id, *ids[i : i + body]] for i in range(0, len(ids), body)]


def test_family_capture_equals_hidden_states(loaded):
    model, tok = loaded
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert len(decoder_layers(model)) == 3
    cap = capture(model, tok, TEXTS, [0, 1], max_tokens=10_000, seq_len=SEQ_LEN, batch_size=3)
    chunks = chunks_of(tok, TEXTS, SEQ_LEN)
    assert len(chunks) % 3 and len(chunks[-1]) < SEQ_LEN  # the last batch is short and padded
    n = sum(len(c) - 1 for c in chunks)
    assert cap.n_tokens == n and cap.tokens.position.min() == 1  # position 0 dropped, nothing else
    assert cap.tokens.token_id.tolist() == [t for c in chunks for t in c[1:]]
    with torch.no_grad():
        hidden = [model(torch.tensor([c]), output_hidden_states=True).hidden_states for c in chunks]
    for layer in (0, 1):
        x = cap.activations(layer)
        assert x.shape == (n, 32) and x.dtype == torch.float32 and not torch.is_inference(x)
        # Layer i is the output of block i: hidden_states[i + 1] (hidden_states[0] is the embedding).
        ref = torch.cat([h[layer + 1][0, 1:] for h in hidden])
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_family_capture_stops_after_deepest_block(loaded):
    model, tok = loaded
    blocks = decoder_layers(model)
    calls = []
    handle = blocks[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        capture(model, tok, TEXTS, [0, 1], max_tokens=10_000, seq_len=SEQ_LEN)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_batched_equals_unbatched(family):
    # Padding must not leak: chunks run alone equal the same chunks in padded batches of 4 and 7.
    tok = byte_tokenizer()
    model = tiny_family(family, tok)
    texts = [*TEXTS, "short"]
    alone = capture(model, tok, texts, [1, 2], max_tokens=10_000, seq_len=SEQ_LEN, batch_size=1)
    for size in (4, 7):
        batched = capture(model, tok, texts, [1, 2], max_tokens=10_000, seq_len=SEQ_LEN, batch_size=size)
        assert torch.equal(batched.tokens.token_id, alone.tokens.token_id)
        assert torch.equal(batched.tokens.position, alone.tokens.position)
        for layer in (1, 2):
            torch.testing.assert_close(
                batched.activations(layer), alone.activations(layer), rtol=1e-5, atol=1e-5
            )


def test_default_batch_size_per_device(tmp_path):
    assert BATCH_TOKENS == {"cpu": 2048, "cuda": 32768}
    assert default_batch_size("cpu", 256) == 8 and default_batch_size("cuda:0", 256) == 128
    assert default_batch_size("cpu", 4096) == 1  # one chunk even when it exceeds the token budget
    tok = byte_tokenizer()
    model = tiny_llama(tok)
    capture(model, tok, TEXTS, [0], max_tokens=50, seq_len=32, out_dir=tmp_path / "cap")
    identity = json.loads((tmp_path / "cap" / "manifest.json").read_text())["identity"]
    assert identity["batch_size"] == 2048 // 32


def test_default_dtype():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("meta")) == torch.float32


def test_blocks_not_found():
    tok = byte_tokenizer()
    model = tiny_family("llama", tok)
    model.config.num_hidden_layers = 5  # no ModuleList of 5 modules exists
    with pytest.raises(
        BadInputError, match=r"Cannot find the decoder blocks of LlamaForCausalLM.*= 5 .*\[3\]"
    ):
        capture(model, tok, TEXTS, [0], max_tokens=50)
    bare = torch.nn.Linear(2, 2)
    bare.config = SimpleNamespace(hidden_size=2)  # a config without num_hidden_layers
    with pytest.raises(BadInputError, match="config has no num_hidden_layers"):
        decoder_layers(bare)


def test_blocks_are_the_heaviest_list():
    # A per-layer ModuleList of norms beside the blocks, as long and registered first, is not taken.
    tok = byte_tokenizer()
    model = tiny_family("llama", tok)
    blocks = model.model.layers
    del model.model.layers
    model.model.norms = torch.nn.ModuleList(torch.nn.LayerNorm(32) for _ in range(3))
    model.model.layers = blocks
    assert decoder_layers(model) is blocks


def test_layer_out_of_range(loaded):
    model, tok = loaded
    with pytest.raises(
        BadInputError, match=r"layer 3 is out of range: this model has 3 decoder blocks.*0\.\.2"
    ):
        capture(model, tok, TEXTS, [1, 3], max_tokens=50)
