"""One table of bad inputs and the errors they raise; each message must say what is wrong AND what to do.

Every row is (id, where, call, error class, what-is-wrong regex, fix regex). The test runs the call and checks
the class and both regexes against the message. `python tests/test_bad_input.py` prints the same table as
Markdown from the messages actually raised (for docs/operations.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import byte_tokenizer, tiny_llama
from transformers import BertConfig, ViTConfig

from atoms.activations import capture, load_capture, load_shards
from atoms.aip import AIP, SecondMoment
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError, IllConditionedError
from atoms.metrics import per_sample_coherence, q_star, r2
from atoms.models import load_model
from atoms.recovery import erc
from atoms.text import text_files
from atoms.train import TrainConfig, train
from atoms.tsae import TSAE, load_saelens, save_saelens

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Atoms are sparse directions."]


def _rows(seed: int, n: int = 64, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _with(x: torch.Tensor, value: float, at: tuple[int, int] = (3, 2)) -> torch.Tensor:
    x = x.clone()
    x[at] = value
    return x


def _truncate(path: Path, keep: float = 0.5) -> Path:
    os.truncate(path, int(path.stat().st_size * keep))
    return path


class Ctx:
    """Files and models the rows need, built on first use in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def tiny(self):
        torch.set_num_threads(1)
        tok = byte_tokenizer()
        return tiny_llama(tok), tok

    def capture_dir(self, name: str) -> Path:
        """A finished 3-shard capture (d = 32, layer 1) of its own, free to be damaged."""
        model, tok = self.tiny
        out = self.root / name
        capture(model, tok, TEXTS, [1], max_tokens=90, seq_len=32, shard_tokens=32, out_dir=out)
        return out

    def damaged_checkpoint(self) -> tuple[TSAE, torch.Tensor, TrainConfig, Path]:
        """A 3-step run with a checkpoint per step, its newest checkpoint cut to a third."""
        x = _rows(1, n=256)
        cfg = TrainConfig(batch_size=32, steps=3, checkpoint_every=1, lr_warmup_steps=0)
        ckpt = self.dir("ckpt")
        train(TSAE(8, 16), x, cfg, checkpoint_dir=ckpt, progress=False)
        _truncate(ckpt / "step_000000003.pt", 1 / 3)
        return TSAE(8, 16), x, cfg, ckpt

    def foreign_checkpoint(self) -> tuple[TSAE, torch.Tensor, TrainConfig, Path]:
        ckpt = self.dir("foreign_ckpt")
        torch.save({"weights": torch.zeros(3)}, ckpt / "step_000000005.pt")
        return TSAE(8, 16), _rows(1, n=256), TrainConfig(batch_size=32, steps=8), ckpt

    def model_dir(self, kind: str) -> Path:
        out = self.dir(f"model_{kind}")
        if kind == "vit":
            ViTConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
            ).save_pretrained(out)
        elif kind == "bert":
            BertConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
            ).save_pretrained(out)
        elif kind == "garbage":
            (out / "config.json").write_text("{this is not json")
        elif kind == "no_weights":
            model, _ = self.tiny
            model.config.save_pretrained(out)
        return out

    def garbage_gguf(self) -> Path:
        path = self.dir("gguf") / "model.gguf"
        path.write_bytes(b"GGUF" + bytes(60))
        return path

    def saved_sae(self, name: str, damage: str) -> Path:
        out = self.root / name
        save_saelens(TSAE(8, 16, AIP.fit(_rows(2))), out)
        _truncate(out / damage)
        return out

    def file(self, name: str, content: bytes) -> Path:
        path = self.root / name
        path.write_bytes(content)
        return path


class Case(NamedTuple):
    id: str
    bad_input: str
    where: str
    call: Callable[[Ctx], object]
    error: type[Exception]
    what: str
    fix: str


X = _rows(0)
DUPLICATED = torch.cat([_rows(4, n=10), _rows(4, n=10)[:1]])  # atom 10 repeats atom 0

CASES = [
    # --- NaN / Inf ------------------------------------------------------------------------------------------
    Case(
        "nan-moment",
        "NaN activations",
        "SecondMoment.update",
        lambda c: SecondMoment(8).update(_with(X, float("nan"))),
        BadInputError,
        r"holds 1 non-finite values \(1 NaN, 0 Inf\); first at indices "
        r"\[\(3, 2\)\]",
        r"Remove or repair those rows.*capture in float32",
    ),
    Case(
        "inf-aip-fit",
        "Inf activations",
        "AIP.fit",
        lambda c: AIP.fit(_with(X, float("inf"))),
        BadInputError,
        r"holds 1 non-finite values \(0 NaN, 1 Inf\)",
        r"Remove or repair those rows",
    ),
    Case(
        "nan-whiten",
        "NaN activations",
        "AIP.whiten",
        lambda c: AIP.fit(X).whiten(_with(X, float("nan"))),
        BadInputError,
        r"x holds 1 non-finite",
        r"Remove or repair those rows",
    ),
    Case(
        "nan-tsae",
        "NaN activations",
        "TSAE forward",
        lambda c: TSAE(8, 16)(_with(X, float("nan"))),
        BadInputError,
        r"activations holds 1 non-finite",
        r"Remove or repair those rows",
    ),
    Case(
        "inf-train",
        "Inf activations",
        "train",
        lambda c: train(
            TSAE(8, 16), _with(X, -float("inf")), TrainConfig(batch_size=8, steps=1), progress=False
        ),
        BadInputError,
        r"activations holds 1 non-finite values \(0 NaN, 1 Inf\)",
        r"Remove or repair",
    ),
    Case(
        "nan-r2",
        "NaN reconstructions",
        "metrics.r2",
        lambda c: r2(X, _with(X, float("nan"))),
        BadInputError,
        r"x_hat holds 1 non-finite",
        r"Remove or repair those rows",
    ),
    Case(
        "nan-atoms",
        "NaN atoms",
        "Dictionary",
        lambda c: Dictionary(_with(X[:10], float("nan"))),
        BadInputError,
        r"atoms \(rows\) with non-finite entries \(1 with NaN, 0 with Inf\) at rows \[3\]",
        r"Drop those rows or re-initialise them.*training diverged",
    ),
    # --- singular moments -----------------------------------------------------------------------------------
    Case(
        "few-samples",
        "fewer samples than d",
        "AIP.from_moment",
        lambda c: AIP.from_moment(SecondMoment(8).update(X[:3])),
        IllConditionedError,
        r"condition number inf.*from 3 samples for d = 8",
        r"collect more activations, or pass ridge=[0-9e.-]+ to add",
    ),
    Case(
        "dead-dim",
        "a dimension zero in every sample",
        "AIP.fit",
        lambda c: AIP.fit(X * (torch.arange(8) != 2)),
        IllConditionedError,
        r"Dimensions \[2\] are zero in every sample \(dead\)",
        r"pass ridge=[0-9e.-]+",
    ),
    Case(
        "zero-moment",
        "all-zero activations",
        "AIP.fit",
        lambda c: AIP.fit(torch.zeros(20, 8)),
        IllConditionedError,
        r"C has trace 0.*every vector behind it is zero",
        r"Check the activation capture \(hook point, layer index\)",
    ),
    Case(
        "few-atoms",
        "fewer atoms than d",
        "AIP.from_dictionary",
        lambda c: AIP.from_dictionary(X[:5]),
        IllConditionedError,
        r"5 atoms for d = 8.*singular",
        r"pass ridge=1e-6",
    ),
    # --- zero and duplicate atoms ---------------------------------------------------------------------------
    Case(
        "zero-atom",
        "zero atom",
        "Dictionary",
        lambda c: Dictionary(_with(X[:10], 0.0, (slice(4, 5), slice(None)))),
        BadInputError,
        r"zero atoms: rows \[4\]",
        r"Drop those rows or re-initialise them",
    ),
    Case(
        "tiny-atom",
        "atom of norm 1e-20 times the others",
        "Dictionary",
        lambda c: Dictionary(torch.cat([X[:9], 1e-20 * X[9:10]])),
        BadInputError,
        r"zero atoms: rows \[9\].*below 1e-12 times the median",
        r"Drop those rows or re-initialise",
    ),
    Case(
        "zero-atom-init",
        "zero atom",
        "TSAE.init_from_atoms_",
        lambda c: TSAE(8, 3).init_from_atoms_(torch.cat([X[:2], torch.zeros(1, 8)])),
        BadInputError,
        r"atoms \[2\] are zero vectors",
        r"drop them, or replace them by random unit vectors",
    ),
    Case(
        "dup-atoms-erc",
        "duplicate atoms on a support",
        "recovery.erc",
        lambda c: erc(DUPLICATED, [0, 10]),
        IllConditionedError,
        r"2 atoms of the support span only rank 1",
        r"remove duplicate atoms",
    ),
    Case(
        "dup-index",
        "an atom listed twice in one code",
        "metrics.per_sample_coherence",
        lambda c: per_sample_coherence(Dictionary(X[:10]), torch.tensor([[3, 3]]), torch.ones(1, 2)),
        BadInputError,
        r"sample 0 lists atom 3 more than once",
        r"merge the repeated entries",
    ),
    Case(
        "dup-support",
        "a support index repeated",
        "recovery.erc",
        lambda c: erc(X[:10], [1, 1]),
        BadInputError,
        r"support \[1, 1\] must hold distinct indices",
        r"remove repeats",
    ),
    # --- mismatched d ---------------------------------------------------------------------------------------
    Case(
        "d-aip",
        "AIP of d = 16, activations of d = 8",
        "AIP.whiten",
        lambda c: AIP.fit(_rows(1, d=16)).whiten(X),
        BadInputError,
        r"last dimension 8 but 16 was expected",
        r"activations, the AIP and the dictionary come from the same layer and model",
    ),
    Case(
        "d-sae-aip",
        "SAE of d = 8, AIP of d = 16",
        "TSAE",
        lambda c: TSAE(8, 16, AIP.fit(_rows(1, d=16))),
        BadInputError,
        r"the AIP has d = 16 but the model has d = 8",
        r"fit the AIP on activations of the layer the model is trained on",
    ),
    Case(
        "d-sae-input",
        "SAE d_in = 16 given d = 8",
        "TSAE forward",
        lambda c: TSAE(16, 32)(X),
        BadInputError,
        r"last dimension 8 but 16 was expected",
        r"same layer and model",
    ),
    Case(
        "d-capture-sae",
        "captured layer (d = 32) vs SAE d_in = 16",
        "train",
        lambda c: train(
            TSAE(16, 32),
            load_shards(c.capture_dir("cap_width"), 1),
            TrainConfig(batch_size=8, steps=1),
            progress=False,
        ),
        BadInputError,
        r"last dimension 32 but 16 was expected",
        r"same layer and model",
    ),
    Case(
        "d-dictionary",
        "atoms of d = 8, AIP of d = 16",
        "Dictionary",
        lambda c: Dictionary(X[:10], AIP.fit(_rows(1, d=16))),
        BadInputError,
        r"W_dec has d = 8 but the AIP has d = 16",
        r"Fit the AIP on activations of the same layer",
    ),
    Case(
        "d-merge",
        "moments of d = 8 and 16",
        "SecondMoment.merge",
        lambda c: SecondMoment(8).merge(SecondMoment(16)),
        BadInputError,
        r"cannot merge SecondMoment\(d=8.*with SecondMoment\(d=16",
        r"both must come from the same layer",
    ),
    Case(
        "d-r2",
        "reconstruction of another width",
        "metrics.r2",
        lambda c: r2(X, X[:, :4]),
        BadInputError,
        r"x_hat has last dimension 4 but 8",
        r"same layer and model",
    ),
    # --- wrong dtypes ---------------------------------------------------------------------------------------
    Case(
        "int",
        "int64 activations",
        "SecondMoment.update",
        lambda c: SecondMoment(8).update(torch.ones(4, 8, dtype=torch.int64)),
        BadInputError,
        r"dtype torch.int64; a floating dtype is required",
        r"Cast it first, e.g. `x.float\(\)`",
    ),
    Case(
        "complex",
        "complex activations",
        "AIP.fit",
        lambda c: AIP.fit(X.to(torch.complex64)),
        BadInputError,
        r"complex dtype torch.complex64; activations are real",
        r"Pass x.real",
    ),
    Case(
        "strings",
        "numpy array of strings",
        "SecondMoment.update",
        lambda c: SecondMoment(8).update(np.array([["1.5"] * 8])),
        BadInputError,
        r"numpy array of dtype <U3.*not numbers",
        r"x.astype\(np.float32\)",
    ),
    Case(
        "list",
        "a Python list",
        "TSAE.encode",
        lambda c: TSAE(8, 16).encode([[0.0] * 8]),
        BadInputError,
        r"must be a torch tensor or numpy array, got list",
        r"torch.tensor\(x, dtype=torch.float32\)",
    ),
    Case(
        "sae-dtype",
        "integer model dtype",
        "TSAE",
        lambda c: TSAE(8, 16, dtype=torch.int8),
        BadInputError,
        r"got torch.int8",
        r"dtype must be torch.float32, float64, bfloat16 or float16",
    ),
    Case(
        "l0-float",
        "float support sizes",
        "metrics.q_star",
        lambda c: q_star(torch.rand(5), torch.rand(5)),
        BadInputError,
        r"l0_i must be an integer tensor.*got torch.float32",
        r"pass per_sample_coherence's second output",
    ),
    # --- empty ----------------------------------------------------------------------------------------------
    Case(
        "empty-batch",
        "empty batch (0, d)",
        "SecondMoment.update",
        lambda c: SecondMoment(8).update(torch.empty(0, 8)),
        BadInputError,
        r"activations is empty \(shape \(0, 8\)\)",
        r"pass at least one vector",
    ),
    Case(
        "empty-forward",
        "empty batch (0, d)",
        "TSAE forward",
        lambda c: TSAE(8, 16)(torch.empty(0, 8)),
        BadInputError,
        r"activations is empty",
        r"pass at least one vector",
    ),
    Case(
        "no-samples",
        "a moment read before any update",
        "SecondMoment.matrix",
        lambda c: SecondMoment(8).matrix,
        BadInputError,
        r"has no samples yet",
        r"call update\(activations\) before reading it",
    ),
    Case(
        "few-rows",
        "fewer activations than one batch",
        "train",
        lambda c: train(TSAE(8, 16), X[:10], TrainConfig(batch_size=32), progress=False),
        BadInputError,
        r"hold 10 vectors, fewer than batch_size = 32",
        r"lower the batch size or pass more activations",
    ),
    Case(
        "no-texts",
        "no texts",
        "capture",
        lambda c: capture(*c.tiny, [], [1], max_tokens=10),
        BadInputError,
        r"texts is empty",
        r"pass at least one text",
    ),
    Case(
        "blank-text",
        "an empty text",
        "capture",
        lambda c: capture(*c.tiny, ["ok", " \n"], [1], max_tokens=10),
        BadInputError,
        r"texts\[1\] is empty or blank",
        r"remove it from the list",
    ),
    Case(
        "empty-file",
        "an empty text file",
        "text.text_files",
        lambda c: text_files([c.file("e.txt", b" \n")]),
        BadInputError,
        r"e\.txt' is empty",
        r"remove it from the list or give it some text",
    ),
    # --- model paths ----------------------------------------------------------------------------------------
    Case(
        "vit",
        "a vision model folder",
        "models.load_model",
        lambda c: load_model(c.model_dir("vit")),
        BadInputError,
        r"holds a 'vit' model, which transformers cannot load as a causal language model",
        r"Capture needs a decoder-only LM such as Llama",
    ),
    Case(
        "bert",
        "an encoder (BERT) folder",
        "models.load_model",
        lambda c: load_model(c.model_dir("bert")),
        BadInputError,
        r"holds a 'bert' model, an encoder with bidirectional attention, not a causal LM",
        r"Use a decoder-only LM such as Llama.*set is_decoder=true",
    ),
    Case(
        "bad-config",
        "a folder whose config.json is garbage",
        "models.load_model",
        lambda c: load_model(c.model_dir("garbage")),
        BadInputError,
        r"no readable config\.json",
        r"Point to a folder written by `save_pretrained`",
    ),
    Case(
        "no-weights",
        "a config without weights",
        "models.load_model",
        lambda c: load_model(c.model_dir("no_weights")),
        BadInputError,
        r"has a config but its weights cannot be read",
        r"re-save it",
    ),
    Case(
        "bad-gguf",
        "a damaged .gguf file",
        "models.load_model",
        lambda c: load_model(c.garbage_gguf(), cache_dir=c.dir("cache")),
        BadInputError,
        r"model\.gguf is not a GGUF causal LM that transformers can read",
        r"Pass a complete \.gguf of a Llama-family model",
    ),
    Case(
        "no-model",
        "a name that is not a local model",
        "models.load_model",
        lambda c: load_model("no-such/model-here"),
        BadInputError,
        r"not a local model folder or \.gguf file",
        r"pass allow_download=True",
    ),
    Case(
        "not-transformers",
        "a module that is not a transformers model",
        "capture",
        lambda c: capture(torch.nn.Linear(4, 4), c.tiny[1], TEXTS, [0], max_tokens=10),
        BadInputError,
        r"Linear has no \.config",
        r"pass a transformers model, e\.g\. from load_model\(\)",
    ),
    # --- damaged files --------------------------------------------------------------------------------------
    Case(
        "ckpt-truncated",
        "a truncated checkpoint",
        "train (resume)",
        lambda c: train(*c.damaged_checkpoint()[:3], checkpoint_dir=c.root / "ckpt", progress=False),
        BadInputError,
        r"step_000000003\.pt is unreadable",
        r"delete it to resume from an older one",
    ),
    Case(
        "ckpt-foreign",
        "a checkpoint file not written by atoms",
        "train (resume)",
        lambda c: train(*c.foreign_checkpoint()[:3], checkpoint_dir=c.root / "foreign_ckpt", progress=False),
        BadInputError,
        r"is not a checkpoint written by atoms\.train",
        r"use another checkpoint_dir",
    ),
    Case(
        "shard",
        "a damaged shard",
        "activations.load_shards",
        lambda c: load_shards(_truncate(c.capture_dir("cap_shard") / "shard_00001.safetensors").parent, 1),
        BadInputError,
        r"shard_00001\.safetensors, listed in the manifest.*is unreadable.*damaged or removed after it was "
        r"written",
        r"Delete .*cap_shard and capture again",
    ),
    Case(
        "shard-resume",
        "a damaged shard",
        "capture (rerun)",
        lambda c: capture(
            *c.tiny,
            TEXTS,
            [1],
            max_tokens=90,
            seq_len=32,
            shard_tokens=32,
            out_dir=_truncate(c.capture_dir("cap_rerun") / "shard_00000.safetensors").parent,
        ),
        BadInputError,
        r"shard_00000\.safetensors.*is unreadable",
        r"Delete .*cap_rerun and capture again",
    ),
    Case(
        "manifest",
        "a damaged capture manifest",
        "activations.load_capture",
        lambda c: load_capture(_truncate(c.capture_dir("cap_manifest") / "manifest.json").parent),
        BadInputError,
        r"manifest\.json is not valid JSON",
        r"delete .*cap_manifest and capture again",
    ),
    Case(
        "capture-moment",
        "a damaged moment checkpoint",
        "activations.load_capture",
        lambda c: load_capture(
            _truncate(c.capture_dir("cap_moment") / "moment_00003_layer001.safetensors").parent
        ),
        BadInputError,
        r"moment checkpoint moment_00003_layer001\.safetensors.*is unreadable",
        r"delete .*cap_moment and capture again",
    ),
    Case(
        "aip-file",
        "a damaged AIP file",
        "AIP.load",
        lambda c: AIP.load(c.file("a.safetensors", b"\x08" + bytes(20))),
        BadInputError,
        r"a\.safetensors is not a readable safetensors file",
        r"save it with AIP\.save",
    ),
    Case(
        "aip-foreign",
        "a SecondMoment file loaded as an AIP",
        "AIP.load",
        lambda c: AIP.load((lambda p: (SecondMoment(8).update(X).save(p), p)[1])(c.root / "m.safetensors")),
        BadInputError,
        r"does not hold a AIP \(format tag 'SecondMoment'",
        r"write it with AIP\.save and load it with AIP\.load",
    ),
    Case(
        "moment-file",
        "a truncated SecondMoment file",
        "SecondMoment.load",
        lambda c: SecondMoment.load(
            _truncate((lambda p: (SecondMoment(8).update(X).save(p), p)[1])(c.root / "m2.safetensors"))
        ),
        BadInputError,
        r"m2\.safetensors is not a readable safetensors file",
        r"save it with SecondMoment\.save",
    ),
    Case(
        "sae-weights",
        "damaged SAE weights",
        "tsae.load_saelens",
        lambda c: load_saelens(c.saved_sae("sae_w", "sae_weights.safetensors")),
        BadInputError,
        r"sae_weights\.safetensors is unreadable",
        r"Re-save the model with save_saelens",
    ),
    Case(
        "sae-aip",
        "a damaged AIP beside SAE weights",
        "tsae.load_saelens",
        lambda c: load_saelens(c.saved_sae("sae_a", "aip.safetensors")),
        BadInputError,
        r"AIP saved with the model in .*sae_a is unreadable.*aip\.safetensors is not a readable",
        r"re-save the model with save_saelens",
    ),
    Case(
        "sae-missing-part",
        "an SAE module of one's own without a decoder",
        "tsae.save_saelens",
        lambda c: save_saelens(
            torch.nn.ParameterDict(
                {"W_enc": torch.zeros(8, 16), "b_enc": torch.zeros(16), "b_dec": torch.zeros(8)}
            ),
            c.dir("no_decoder"),
        ),
        BadInputError,
        r"ParameterDict has no W_dec",
        r"a SAELens-style SAE needs W_enc \(d, n\), b_enc \(n,\), W_dec \(n, d\), b_dec \(d,\), and "
        r"threshold or log_threshold",
    ),
    Case(
        "own-bandwidth",
        "TrainConfig.bandwidth for a TSAE",
        "train.train",
        lambda c: train(TSAE(8, 16), X, TrainConfig(batch_size=8, bandwidth=0.05), progress=False),
        BadInputError,
        r"TrainConfig.bandwidth is for SAE modules of one's own; a TSAE has its own",
        r"Leave TrainConfig.bandwidth at None",
    ),
    Case(
        "aip-fit-path",
        "a file path instead of activations",
        "AIP.fit",
        lambda c: AIP.fit(c.root / "activations.safetensors"),
        BadInputError,
        r"must be a \(\.\.\., d\) tensor or array, or an iterable of \(batch, d\) ones .*got PosixPath",
        r"update an atoms\.aip\.SecondMoment batch by batch and call AIP\.from_moment",
    ),
]

HAS_GGUF = importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("bad_input"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_message_names_problem_and_fix(case, ctx):
    if case.id == "bad-gguf" and not HAS_GGUF:
        pytest.skip("the gguf package is not installed")
    with pytest.raises(case.error) as info:
        case.call(ctx)
    message = str(info.value)
    assert re.search(case.what, message, flags=re.S), f"what is wrong: {case.what!r} not in {message!r}"
    assert re.search(case.fix, message, flags=re.S), f"the fix: {case.fix!r} not in {message!r}"


def test_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def markdown() -> str:
    """The table for docs/operations.md, from the messages the calls raise now."""
    lines = ["| bad input | where | error | message (what is wrong, and the fix) |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        ctx = Ctx(Path(root))
        for case in CASES:
            try:
                case.call(ctx)
            except case.error as err:
                kind = type(err).__name__
                text = str(err).replace(root, "<dir>").replace("|", "\\|").replace("\n", " ")
            else:
                raise AssertionError(f"{case.id} raised nothing")
            lines.append(f"| {case.bad_input} | `{case.where}` | {kind} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
    print(json.dumps({"rows": len(CASES)}), file=sys.stderr)
