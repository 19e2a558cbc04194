"""Residual-stream activations of a transformers causal LM, captured resumably (models: atoms.models).

`capture()` runs text through the model with forward hooks on the decoder blocks,
stops the forward after the deepest requested block, and streams the rows into a float64 `SecondMoment` per
layer and, given `out_dir`, into safetensors shards with a manifest from which an interrupted capture resumes.
With `out_dir`, memory does not grow with the number of tokens: rows wait in one shard-sized buffer, and the
returned `Capture` reads its tokens and activations from the shards only when asked.

Layer index convention: layer i is the output of decoder block i (0-based), i.e. the residual stream after
i + 1 blocks, equal to `hidden_states[i + 1]` of `output_hidden_states=True`. For the last block it is taken
before the final norm, whereas transformers' `hidden_states[-1]` is after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atoms.aip import SecondMoment
from atoms.errors import AtomsError, BadInputError
from atoms.text import Article

__all__ = [
    "BATCH_TOKENS",
    "SHARD_TOKENS",
    "Capture",
    "Tokens",
    "capture",
    "decoder_layers",
    "default_batch_size",
    "iter_shards",
    "load_capture",
    "load_shards",
    "load_tokens",
]

# 8192 rows of d = 576 float32 are 19 MB per layer: small enough to lose little on an interruption, large
# enough that the per-shard fsync and moment checkpoint cost nothing next to the forward passes.
SHARD_TOKENS = 8192
MANIFEST = "manifest.json"
# Tokens per forward pass when capture's batch_size is None, by device type (other accelerators take CUDA's).
# CPU: on one thread 2048 ran the tiny test Llama as fast as 8192 and a SmolLM2-shaped one 1.5x faster (1231
# against 835 tokens/s): larger batches fall out of the cache. CUDA: 32768 tokens make SmolLM2's GEMMs
# (32768 x 576 x 1536) big enough for the tensor cores and leave the ~450 kernel launches of 30 blocks (about
# 2 ms of host time) far below the ~15 ms the forward takes in bfloat16 on an H200; its intermediates take
# about 1 GB.
BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
_FORMAT = 1


# ---------------------------------------------------------------------------------------------- capture


class Tokens(NamedTuple):
    """Where each captured row comes from; every field is (n_tokens,) int64, aligned with the activations."""

    token_id: torch.Tensor
    """Vocabulary id of the token whose residual stream the row holds."""
    sequence: torch.Tensor
    """Index of the seq_len chunk (counted over the whole token stream) the token sits in."""
    position: torch.Tensor
    """Position inside that chunk; 0 is the chunk's BOS (or first token), dropped by default."""
    text: torch.Tensor
    """Index of the input text the token comes from; -1 for the BOS that opens each chunk."""

    def context(self, row: int, before: int = 8, after: int = 2) -> tuple[list[int], int]:
        """Token ids around captured row `row` within its chunk, and where that row's token sits in the list.

        Only captured tokens are available, so the dropped position 0 never appears (for atom cards).
        """
        n = self.token_id.shape[0]
        if not 0 <= row < n:
            raise BadInputError(f"row {row} is out of range for a capture of {n} tokens.")
        lo, hi = max(row - before, 0), min(row + after + 1, n)
        same = self.sequence[lo:hi] == self.sequence[row]
        ids = self.token_id[lo:hi][same].tolist()
        return ids, int(same[: row - lo].sum())


@dataclass
class Capture:
    """What `capture` returns: per-layer second moments and the activations (in memory, or shards on disk)."""

    layers: tuple[int, ...]
    """Captured decoder blocks, ascending; layer i is the output of block i."""
    d: int
    """Hidden size (width of every activation row)."""
    moments: dict[int, SecondMoment]
    """float64 second moment per layer over exactly the captured rows (empty when moment=False)."""
    n_tokens: int
    """Number of captured rows per layer (at most max_tokens; fewer if the text ran out)."""
    out_dir: Path | None = None
    """Shard folder, or None when the activations are held in memory."""
    _tokens: Tokens | None = field(default=None, repr=False)
    _held: dict[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tokens(self) -> Tokens:
        """Origin of each row: token id, chunk, position, input text. A capture on disk reads them from the
        shards at the first access (32 bytes per row), not before."""
        if self._tokens is None:
            self._tokens = load_tokens(self.out_dir)
        return self._tokens

    def activations(self, layer: int) -> torch.Tensor:
        """All rows of `layer`, (n_tokens, d) float32 on the CPU, read from memory or from the shards."""
        if layer not in self.layers:
            raise BadInputError(
                f"layer {layer} was not captured; this capture holds layers {list(self.layers)}."
            )
        if self._held is not None:
            return self._held[layer]
        return load_shards(self.out_dir, layer)


class _StopForward(Exception):
    """Raised by the deepest hook so the model spends no compute on later blocks; caught by `capture`."""


class _Chunk(NamedTuple):
    index: int
    ids: list[int]
    owners: list[int]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM, in forward order (block i gives layer i).

    Found without a per-family table, so Llama, Gemma, Gemma2/3, GPT-2, Qwen2, Mistral and the like work
    alike: the blocks are the `torch.nn.ModuleList` of `config.num_hidden_layers` modules (GPT-2's `n_layer`
    is mapped to that name by its config). Where several ModuleLists have that length (per-layer norms or
    projections beside the blocks), the one holding the most parameters is the blocks: they carry nearly
    all the non-embedding weights.
    """
    config = _text_config(model)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise BadInputError(
            f"{type(model).__name__}'s config has no num_hidden_layers, so its decoder blocks cannot be "
            "found; pass a transformers decoder-only causal LM (Llama, Gemma, GPT-2, ...), whose config "
            "sets it."
        )
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not found:
        lengths = sorted({len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)})
        raise BadInputError(
            f"Cannot find the decoder blocks of {type(model).__name__}: capture hooks the "
            f"torch.nn.ModuleList of config.num_hidden_layers = {n} blocks, and this model has none (its "
            f"ModuleLists have lengths {lengths}). Use a transformers decoder-only causal LM such as Llama, "
            "Gemma, GPT-2 or SmolLM2, or hold your blocks in one ModuleList and set "
            "config.num_hidden_layers to its length."
        )
    return max(found, key=lambda m: sum(p.numel() for p in m.parameters()))


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise BadInputError(
            f"{type(model).__name__} has no .config; pass a transformers model, e.g. from load_model()."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def default_batch_size(device: str | torch.device, seq_len: int) -> int:
    """Chunks per forward pass that `capture` runs when batch_size is None: the device type's BATCH_TOKENS
    (CUDA's for other accelerators) over seq_len, at least 1."""
    tokens = BATCH_TOKENS.get(torch.device(device).type, BATCH_TOKENS["cuda"])
    return max(1, tokens // seq_len)


def _check_texts(texts: Sequence[str | Article]) -> list[str]:
    if isinstance(texts, (str, Article)):
        raise BadInputError("texts must be a list of strings, got a single text; wrap it in a list: [text].")
    out = [t.text if isinstance(t, Article) else t for t in texts]
    if not out:
        raise BadInputError(
            "texts is empty; pass at least one text, e.g. [a.text for a in atoms.text.wikipedia_articles()]."
        )
    for k, t in enumerate(out):
        if not isinstance(t, str):
            raise BadInputError(
                f"texts[{k}] is a {type(t).__name__}, not a string; pass text, not token ids."
            )
        if not t.strip():
            raise BadInputError(f"texts[{k}] is empty or blank; remove it from the list.")
    return out


def _check_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    if isinstance(layers, int):
        layers = [layers]
    chosen = list(layers)
    if not chosen:
        raise BadInputError(
            f"layers is empty; pass block indices in 0..{n_layers - 1}, e.g. [{n_layers // 2}]."
        )
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise BadInputError(
                f"layer {i!r} is out of range: this model has {n_layers} decoder blocks, so layers must "
                f"be ints in 0..{n_layers - 1} (layer i is the output of block i)."
            )
    if len(set(chosen)) != len(chosen):
        raise BadInputError(f"layers {chosen} repeats an index; list each layer once.")
    return tuple(sorted(chosen))


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    actual = next(model.parameters()).device
    if device is not None and torch.device(device) != actual:
        raise BadInputError(
            f"the model is on {actual} but device={str(device)!r} was given; move it first with "
            f"model.to({str(device)!r}), or leave device=None to use the model's device."
        )
    return actual


def _fingerprint_model(model: torch.nn.Module) -> str:
    """A cheap identity of the weights: names, shapes and the first 256 values of every parameter."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(param.detach().reshape(-1)[:256].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _chunks(tokenizer: Any, texts: list[str], seq_len: int) -> Iterator[_Chunk]:
    """Cut the concatenated texts into chunks of seq_len tokens, each opened by BOS if the tokenizer has one.

    Texts are joined with EOS (when the tokenizer has one) so the model sees where a document ends; `owners`
    says which text each token came from (-1 for the BOS).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = seq_len - (bos is not None)
    ids: list[int] = []
    owners: list[int] = []
    index = 0
    for k, text in enumerate(texts):
        new = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            new.append(eos)
        ids.extend(new)
        owners.extend([k] * len(new))
        # Chunks are sliced at an offset and the consumed head dropped once per text: deleting it per chunk
        # made one long text quadratic (a list shift per chunk).
        start = 0
        while len(ids) - start >= body:
            yield _chunk(index, bos, ids[start : start + body], owners[start : start + body])
            index += 1
            start += body
        del ids[:start], owners[:start]
    if ids:
        yield _chunk(index, bos, ids, owners)


def _chunk(index: int, bos: int | None, ids: list[int], owners: list[int]) -> _Chunk:
    if bos is None:
        return _Chunk(index, list(ids), list(owners))
    return _Chunk(index, [bos, *ids], [-1, *owners])


class _Recorder:
    """Forward hooks gathering the kept rows of each hooked block's output; the deepest stops the pass.

    Rows are gathered on the model's device by an index whose length the host already knows, cast to float32
    there: a boolean-mask select would make every hook wait for the device to report its row count.
    """

    def __init__(self, deepest: int) -> None:
        self.deepest = deepest
        self.take: torch.Tensor | None = None
        self.rows: dict[int, torch.Tensor] = {}

    def hook(self, layer: int) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.rows[layer] = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.take).float()
            if layer == self.deepest:
                raise _StopForward

        return record


class _InFlight(NamedTuple):
    """One batch's kept rows on the host; on CUDA their activations may still be copying until `ready`."""

    rows: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None

    def wait(self) -> dict[str, torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.rows


def _forward(
    model: torch.nn.Module,
    chunks: list[_Chunk],
    recorder: _Recorder,
    layers: tuple[int, ...],
    *,
    drop_first: bool,
    done_through: tuple[int, int] | None,
    room: int,
    pad_id: int,
    device: torch.device,
) -> _InFlight:
    """Queue one right-padded batch up to the deepest layer and the copy of its first `room` kept rows (in
    (chunk, position) order) to the host; returns without waiting for the device."""
    width = max(len(c.ids) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.int64)
    owners = torch.full((len(chunks), width), -1, dtype=torch.int64)
    mask = torch.zeros((len(chunks), width), dtype=torch.int64)
    for r, c in enumerate(chunks):
        ids[r, : len(c.ids)] = torch.tensor(c.ids)
        owners[r, : len(c.ids)] = torch.tensor(c.owners)
        mask[r, : len(c.ids)] = 1
    sequence = torch.tensor([c.index for c in chunks]).unsqueeze(1).expand(-1, width)
    position = torch.arange(width).unsqueeze(0).expand(len(chunks), -1)
    keep = mask.bool()
    if drop_first:
        keep &= position > 0
    if done_through is not None:
        # Resuming: rows up to (chunk, position) = done_through are already stored.
        s, p = done_through
        keep &= (sequence > s) | ((sequence == s) & (position > p))
    take = keep.reshape(-1).nonzero().squeeze(1)[:room]
    recorder.take, recorder.rows = take.to(device), {}
    # An unpadded batch goes without a mask: transformers would check an all-ones mask on the device (a host
    # sync per forward) only to drop it, and without one SDPA takes its causal (flash) path.
    padded = not bool(mask.all())
    try:
        with torch.inference_mode():
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device) if padded else None,
                use_cache=False,
            )
    except _StopForward:
        pass
    else:
        raise AtomsError(
            f"the forward pass finished without reaching block {recorder.deepest}: the hooked ModuleList is "
            f"not the one {type(model).__name__} runs; capture supports transformers decoder-only LMs."
        )
    # One copy per layer and batch into page-locked memory lets the device copy while the host goes on; the
    # host tensors are made here, outside inference mode, so callers may use them with autograd.
    pinned = device.type == "cuda"
    rows = {}
    for i in layers:
        rows[f"layer_{i}"] = torch.empty(recorder.rows[i].shape, pin_memory=pinned)
        rows[f"layer_{i}"].copy_(recorder.rows[i], non_blocking=pinned)
    recorder.rows = {}
    for name, value in (("token_id", ids), ("sequence", sequence), ("position", position), ("text", owners)):
        rows[name] = value.reshape(-1)[take]
    ready = None
    if pinned:
        ready = torch.cuda.Event()
        ready.record()
    return _InFlight(rows, ready)


def _n_rows(rows: dict[str, torch.Tensor]) -> int:
    return int(rows["token_id"].shape[0])


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _slice(rows: dict[str, torch.Tensor], start: int, stop: int | None = None) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in rows.items()}


def capture(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str | Article],
    layers: Sequence[int],
    *,
    max_tokens: int,
    seq_len: int = 256,
    batch_size: int | None = None,
    drop_first: bool = True,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    moment: bool = True,
    shard_tokens: int = SHARD_TOKENS,
    on_shard: Callable[[int, int], None] | None = None,
) -> Capture:
    """Capture the residual stream after the given decoder blocks for up to `max_tokens` tokens of `texts`.

    The texts are tokenized, joined with EOS and cut into chunks of `seq_len` tokens, each opened by BOS when
    the tokenizer has one; batches of `batch_size` chunks (`batch_size * seq_len` tokens) run through the
    model under `torch.inference_mode`, right-padded and masked by attention_mask (padding is never captured).
    `batch_size=None` takes `default_batch_size(device, seq_len)`: 2048 tokens per forward on the CPU, 32768
    on CUDA. Layer i is the output of block i, i.e. `hidden_states[i + 1]`. A forward hook on each requested
    block keeps its rows, and the deepest one raises to end the forward there, so no compute is spent on
    later blocks or the LM head. The model runs in its own dtype (bfloat16 is fine on a GPU); the rows are
    stored as float32. On CUDA the device is waited for once per batch, and the host stores batch k's rows
    while batch k + 1 runs.

    Position 0 is dropped by default (`drop_first=True`): SmolLM2's first position is an attention sink whose
    residual norm is ~8e2 in blocks 1-8 and ~2.5e4 in blocks 11-27, against ~1e2-8e2 for every other token, so
    it would dominate the second moment and any reconstruction loss.

    Every `shard_tokens` rows are committed together: each layer's float64 `SecondMoment` is updated with them
    (when `moment=True`) and, with `out_dir`, they are written as a safetensors shard (rows of every layer as
    float32, plus token ids and positions), then the moments are checkpointed, then `manifest.json` is
    replaced atomically. A capture interrupted at any point, rerun with the same arguments, reads the
    manifest and carries on after the last committed row: no token is duplicated or lost, and shards, tokens
    and moments equal those of an uninterrupted run. Rerunning a finished capture just loads it. Different
    arguments on an existing `out_dir` raise an error. Without `out_dir` the rows are held in memory.

    `on_shard(shards_done, tokens_done)` is called after each commit (for progress reports); an exception from
    it stops the capture at that commit, resumable like any interruption. `device=None` uses the model's
    device; whatever it is, the rows are kept on the CPU (they outgrow an accelerator's memory). Returns a
    `Capture`; `n_tokens` is below `max_tokens` only if the texts ran out.
    """
    texts = _check_texts(texts)
    blocks = decoder_layers(model)
    chosen = _check_layers(layers, len(blocks))
    _check_count(max_tokens, "max_tokens", 1)
    _check_count(seq_len, "seq_len", 2)
    _check_count(shard_tokens, "shard_tokens", 1)
    run_device = _model_device(model, device)
    if batch_size is None:
        batch_size = default_batch_size(run_device, seq_len)
    _check_count(batch_size, "batch_size", 1)
    d = int(_text_config(model).hidden_size)
    identity = {
        "model": _fingerprint_model(model),
        "tokenizer": [
            type(tokenizer).__name__,
            len(tokenizer),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        ],
        "texts": {"count": len(texts), "sha256": _fingerprint_texts(texts)},
        "layers": list(chosen),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "drop_first": bool(drop_first),
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "moment": bool(moment),
    }
    store = _Store(out_dir, identity, chosen, d, getattr(model, "name_or_path", ""), run_device)
    if not store.complete:
        _run(model, tokenizer, texts, blocks, chosen, store, run_device, on_shard)
    return store.result()


def _run(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    blocks: torch.nn.ModuleList,
    layers: tuple[int, ...],
    store: _Store,
    device: torch.device,
    on_shard: Callable[[int, int], None] | None,
) -> None:
    """Forward batches until max_tokens rows are committed or the texts run out, then mark it complete."""
    ident = store.identity
    batch_size, max_tokens, shard_tokens = ident["batch_size"], ident["max_tokens"], ident["shard_tokens"]
    resume = store.done_through
    # Resume at the start of the batch that held the last committed row, so every forward sees the same batch
    # as in an uninterrupted run and the resumed rows match it bit for bit.
    first = 0 if resume is None else resume[0] // batch_size * batch_size
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    recorder = _Recorder(layers[-1])
    handles = [blocks[i].register_forward_hook(recorder.hook(i)) for i in layers]
    pending = _ShardBuffer(shard_tokens)

    def commit(rows: dict[str, torch.Tensor]) -> None:
        store.commit(rows)
        _notify(on_shard, store)

    was_training = model.training
    in_flight: _InFlight | None = None
    try:
        model.eval()  # dropout would perturb the activations; the caller's mode is restored below
        stream = (c for c in _chunks(tokenizer, texts, ident["seq_len"]) if c.index >= first)
        for batch in _batched(stream, batch_size):
            queued = 0 if in_flight is None else _n_rows(in_flight.rows)
            room = max_tokens - store.tokens_done - pending.filled - queued
            if room <= 0:
                break
            launched = _forward(
                model,
                batch,
                recorder,
                layers,
                drop_first=ident["drop_first"],
                done_through=resume,
                room=room,
                pad_id=pad_id,
                device=device,
            )
            # The previous batch's rows are stored only now, with this batch queued behind them on the
            # device, so the host's moment updates and shard writes overlap this forward; two batches of
            # rows are alive at a time.
            if in_flight is not None:
                pending.add(in_flight.wait(), commit)
            in_flight = launched
        if in_flight is not None:
            pending.add(in_flight.wait(), commit)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    pending.flush(commit)
    if store.tokens_done == 0:
        raise BadInputError(
            "the texts gave no tokens to capture (each chunk held only its first position, which drop_first "
            "removes); pass longer texts or a larger seq_len."
        )
    store.finish()


def _batched(chunks: Iterator[_Chunk], size: int) -> Iterator[list[_Chunk]]:
    batch: list[_Chunk] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardBuffer:
    """Rows waiting for their commit, copied into one block of `size` rows per field as they arrive.

    At most one shard of rows is held whatever max_tokens is (plus the batch being copied in), and a commit
    takes the block as it is. After a commit the block is handed over, not reused: the in-memory store
    keeps it, and on disk it is freed once written.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.filled = 0
        self.block: dict[str, torch.Tensor] | None = None

    def add(self, rows: dict[str, torch.Tensor], commit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Copy `rows` in stream order, calling `commit(block)` each time the block is full."""
        n, start = _n_rows(rows), 0
        while start < n:
            if self.block is None:
                self.block = {k: v.new_empty((self.size, *v.shape[1:])) for k, v in rows.items()}
            take = min(self.size - self.filled, n - start)
            for k, v in rows.items():
                self.block[k][self.filled : self.filled + take] = v[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.size:
                self._hand_over(self.block, commit)

    def flush(self, commit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Commit the rows of a partly filled block (the last, short shard)."""
        if self.filled:
            self._hand_over(_slice(self.block, 0, self.filled), commit)

    def _hand_over(
        self, rows: dict[str, torch.Tensor], commit: Callable[[dict[str, torch.Tensor]], None]
    ) -> None:
        self.block, self.filled = None, 0
        commit(rows)


def _notify(on_shard: Callable[[int, int], None] | None, store: _Store) -> None:
    if on_shard is not None:
        on_shard(store.n_commits, store.tokens_done)


# ---------------------------------------------------------------------------------------------- storage


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)`, fsync, rename over `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _moment_name(k: int, layer: int) -> str:
    return f"moment_{k:05d}_layer{layer:03d}.safetensors"


def _is_ours(name: str) -> bool:
    return name == MANIFEST or name.endswith(".tmp") or name.startswith(("shard_", "moment_"))


class _Store:
    """Committed rows and moments: in memory, or as shards, moment checkpoints and a manifest in out_dir."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str] | None,
        identity: dict[str, Any],
        layers: tuple[int, ...],
        d: int,
        model_name: str,
        device: torch.device,
    ) -> None:
        # JSON round trip so a fresh identity compares equal to one read back from a manifest.
        self.identity = json.loads(json.dumps(identity))
        self.layers, self.d, self.model_name = layers, d, str(model_name)
        self.device = device
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.moments = {i: SecondMoment(d) for i in layers} if identity["moment"] else {}
        self.shards: list[dict[str, Any]] = []
        self.held: list[dict[str, torch.Tensor]] = []
        self.tokens_done = 0
        self.n_commits = 0
        self.done_through: tuple[int, int] | None = None
        self.complete = False
        if self.out_dir is not None:
            self._open()

    def _open(self) -> None:
        out = self.out_dir
        manifest = out / MANIFEST
        if not manifest.is_file():
            if out.exists() and any(p.name != f"{MANIFEST}.tmp" for p in out.iterdir()):
                raise BadInputError(
                    f"out_dir {out} is not empty and holds no capture manifest; use a new or empty out_dir."
                )
            out.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            return
        saved = _read_manifest(out)
        if saved["identity"] != self.identity:
            diff = [
                f"{k}: stored {saved['identity'].get(k)!r}, given {v!r}"
                for k, v in self.identity.items()
                if saved["identity"].get(k) != v
            ]
            raise BadInputError(
                f"out_dir {out} holds a capture made with different arguments ({'; '.join(diff)}). Use a new "
                "out_dir, or pass the same model, texts and arguments to resume it."
            )
        self.shards = saved["shards"]
        self.tokens_done = saved["tokens_done"]
        self.n_commits = len(self.shards)
        self.done_through = None if saved["done_through"] is None else tuple(saved["done_through"])
        self.complete = saved["complete"]
        for shard in self.shards:
            _read_shard(out, shard["file"], None)
        if saved["moments"]:
            self.moments = {int(i): _load_moment(out, name) for i, name in saved["moments"].items()}
        # Files an interrupted commit left behind (a shard or moment not yet in the manifest, temp files).
        keep = {MANIFEST, *(s["file"] for s in self.shards), *saved["moments"].values()}
        for p in out.iterdir():
            if _is_ours(p.name) and p.name not in keep:
                p.unlink()

    def _write_manifest(self) -> None:
        body = {
            "format": _FORMAT,
            "model_name": self.model_name,
            "d": self.d,
            "identity": self.identity,
            "shards": self.shards,
            "tokens_done": self.tokens_done,
            "done_through": None if self.done_through is None else list(self.done_through),
            "moments": {str(i): _moment_name(self.n_commits, i) for i in self.moments}
            if self.n_commits
            else {},
            "complete": self.complete,
        }
        _write_atomic(self.out_dir / MANIFEST, lambda p: p.write_text(json.dumps(body, indent=1)))

    def commit(self, rows: dict[str, torch.Tensor]) -> None:
        """Add one block of rows to the moments and the store; on disk: shard, moments, then manifest."""
        # The float64 scatter runs on the model's device: at d = 576 it costs 0.66 MFLOP per row and layer, so
        # on the host (78 GFLOP/s per core measured) three layers cap capture at ~40k rows/s per core, far
        # below what a GPU forward delivers; there it takes microseconds per shard.
        for i, m in self.moments.items():
            m.update(rows[f"layer_{i}"].to(self.device))
        n = _n_rows(rows)
        self.tokens_done += n
        self.done_through = (int(rows["sequence"][-1]), int(rows["position"][-1]))
        self.n_commits += 1
        if self.out_dir is None:
            self.held.append(rows)
            return
        name = _shard_name(self.n_commits - 1)
        tensors = {k: v.contiguous() for k, v in rows.items()}
        _write_atomic(self.out_dir / name, lambda p: save_file(tensors, str(p)))
        for i, m in self.moments.items():
            _write_atomic(self.out_dir / _moment_name(self.n_commits, i), m.save)
        self.shards.append({"file": name, "tokens": n})
        self._write_manifest()
        for i in self.moments:
            (self.out_dir / _moment_name(self.n_commits - 1, i)).unlink(missing_ok=True)

    def finish(self) -> None:
        self.complete = True
        if self.out_dir is not None:
            self._write_manifest()

    def result(self) -> Capture:
        if self.out_dir is not None:
            return Capture(self.layers, self.d, self.moments, self.tokens_done, self.out_dir)
        rows = _cat(self.held)
        tokens = Tokens(rows["token_id"], rows["sequence"], rows["position"], rows["text"])
        held = {i: rows[f"layer_{i}"] for i in self.layers}
        return Capture(self.layers, self.d, self.moments, self.tokens_done, None, tokens, held)


def _load_moment(out_dir: Path, name: str) -> SecondMoment:
    """A committed moment checkpoint; a damaged one gets the capture's fix rather than SecondMoment's."""
    try:
        return SecondMoment.load(out_dir / name)
    except BadInputError as err:
        raise BadInputError(
            f"the moment checkpoint {name}, listed in the manifest of the capture in {out_dir}, is "
            f"unreadable ({err}). It was damaged after it was written; delete {out_dir} and capture again."
        ) from err


def _read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{out_dir} holds no {MANIFEST}; it is not a capture folder (see atoms.capture).")
    try:
        body = json.loads(path.read_text())
    except ValueError as err:
        raise BadInputError(f"{path} is not valid JSON ({err}); delete {out_dir} and capture again.") from err
    if body.get("format") != _FORMAT:
        raise BadInputError(f"{path} has format {body.get('format')!r}, not {_FORMAT}; capture again.")
    return body


def _read_shard(
    out_dir: str | os.PathLike[str], name: str, keys: Sequence[str] | None
) -> dict[str, torch.Tensor]:
    """Tensors `keys` of a committed shard (None: only check its header), or an error saying it is damaged.

    Shards are renamed into place only once written and synced, so a shard the manifest lists can be
    unreadable only if something changed it afterwards; its rows are lost with it.
    """
    path = Path(out_dir) / name
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in keys or () if k not in f.keys()]
            if not missing:
                return {k: f.get_tensor(k) for k in keys or ()}
        reason = f"it lacks {missing}"
    except Exception as err:  # safetensors raises its own error type, or OSError for a missing file
        reason = f"{type(err).__name__}: {err}"
    raise BadInputError(
        f"{path}, listed in the manifest of the capture in {out_dir}, is unreadable ({reason}): it was "
        f"damaged or removed after it was written, and its rows are lost. Delete {out_dir} and capture again."
    )


def iter_shards(out_dir: str | os.PathLike[str], layer: int) -> Iterator[torch.Tensor]:
    """Yield the committed shards of `layer` in order, each (rows, d) float32, reading one shard at a time."""
    body = _read_manifest(out_dir)
    if layer not in body["identity"]["layers"]:
        raise BadInputError(
            f"layer {layer} was not captured in {out_dir}; it holds layers {body['identity']['layers']}."
        )
    for shard in body["shards"]:
        yield _read_shard(out_dir, shard["file"], (f"layer_{layer}",))[f"layer_{layer}"]


def load_shards(out_dir: str | os.PathLike[str], layer: int) -> torch.Tensor:
    """All committed rows of `layer` under `out_dir`, (n_tokens, d) float32."""
    body = _read_manifest(out_dir)
    parts = list(iter_shards(out_dir, layer))
    return torch.cat(parts) if parts else torch.empty(0, body["d"])


def load_tokens(out_dir: str | os.PathLike[str]) -> Tokens:
    """Token id, chunk, position and input text of each committed row in `out_dir`, each (n_tokens,) int64."""
    body = _read_manifest(out_dir)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Tokens._fields}
    for shard in body["shards"]:
        for k, v in _read_shard(out_dir, shard["file"], Tokens._fields).items():
            parts[k].append(v)
    return Tokens(*(torch.cat(v) if v else torch.empty(0, dtype=torch.int64) for v in parts.values()))


def load_capture(out_dir: str | os.PathLike[str]) -> Capture:
    """Open a capture folder written by `capture(..., out_dir=...)`: tokens, moments, and lazy shard access.

    A capture that was interrupted loads with the rows committed so far.
    """
    body = _read_manifest(out_dir)
    out = Path(out_dir)
    moments = {int(i): _load_moment(out, name) for i, name in body["moments"].items()}
    return Capture(tuple(body["identity"]["layers"]), body["d"], moments, body["tokens_done"], out)
