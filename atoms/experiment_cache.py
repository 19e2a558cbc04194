"""Cache keys of the experiment's resumable work, and which settings enter each of them.

`atoms run` keeps everything it computes under `config.output / "work"`, in folders and files named by a
digest of what they depend on, so that a restart with the same settings resumes and changed settings start
fresh work beside the old. The caches:

- capture: the activations captured from the fit and the held-out text (`work/capture/<key>/`);
- layer: the finished results of one layer (`work/layers/<key>/layer_NNN.json`);
- training: the checkpoints of one SAE of a layer (`work/fitted/<capture>/train/...-<key>/`);
- sweep_cell: the checkpoints of one cell of the capacity-vs-data sweep (`work/fitted/<capture>/sweep/...`);
- phase: the basis-pursuit phase plane (`work/phase/<key>.json`).

Every setting of `ExperimentConfig` is declared in `FIELD_CACHES` with the caches it enters; a setting
missing from the table (or a name there that is no setting) fails at import, so adding a field forces the
decision instead of silently entering every key or none. The trainings' keys also hold the objects built from
the settings (TrainConfig, the SAE's config, the plateau rule), so settings that reach a training only
through those need no entry for it. `code_version()` is part of every key: an upgraded or edited toolkit
never reuses an older run's work.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoms.experiment_config import ExperimentConfig

if TYPE_CHECKING:
    from atoms.convergence import PlateauRule
    from atoms.train import TrainConfig

__all__ = [
    "FIELD_CACHES",
    "Cache",
    "CacheKeys",
    "check_declared",
    "code_version",
    "digest",
    "read_json",
    "settings",
    "write_json",
]


class Cache(enum.StrEnum):
    """The cached results of a run (see the module docstring for where each lives)."""

    CAPTURE = "capture"
    LAYER = "layer"
    TRAINING = "training"
    SWEEP_CELL = "sweep_cell"
    PHASE = "phase"


_C, _L, _T, _S, _P = Cache.CAPTURE, Cache.LAYER, Cache.TRAINING, Cache.SWEEP_CELL, Cache.PHASE

# Why a setting enters no key: where results go, how fast they come (device and threads change rounding only),
# which preset the fields started from (the fields themselves are keyed), where converted models are kept.
# The sweep's settings reach its cells through TrainConfig, the SAE's size and the cell's folder name.
FIELD_CACHES: dict[str, frozenset[Cache]] = {
    name: frozenset(caches)
    for name, caches in {
        "model": (_C, _L),
        "layers": (_C, _L),
        "fit_tokens": (_C, _L),
        "heldout_tokens": (_C, _L),
        "n_atoms": (_L,),
        "text_files": (_C, _L),
        "heldout_fraction": (_C, _L),
        "output": (),
        "device": (),
        "seed": (_C, _L, _P),
        "threads": (),
        "seq_len": (_C, _L),
        "capture_batch": (_C, _L),
        "steps": (_L,),
        "batch_size": (_L,),
        "lr": (_L,),
        "adam_beta1": (_L,),
        "lr_warmup_steps": (_L,),
        "sparsity_warmup_steps": (_L,),
        "l0_targets": (_L,),
        "main_l0": (_L,),
        "seeds": (_L,),
        "eval_every": (_L,),
        "plateau_window": (_L,),
        "plateau_tol": (_L,),
        "l0_tol": (_L,),
        "min_steps": (_L,),
        "validation_fraction": (_L, _T),
        "validation_rows": (_L, _T),
        "target_l0_gain": (_L,),
        "target_l0_damping": (_L,),
        "target_l0_smoothing": (_L,),
        # A training cut short by the budget stops at another step: a layer's results depend on it.
        "budget_minutes": (_L,),
        "bandwidth": (_L,),
        "threshold_init": (_L,),
        "l0_coefficient": (_L,),
        "l1_coefficient": (_L,),
        # The AIP the TSAEs train under: the SAE's config does not hold it.
        "ridge": (_L, _T, _S),
        "angle_vectors": (_L,),
        "q_samples": (_L,),
        "neuron_samples": (_L,),
        "erc_samples": (_L,),
        "bp_samples": (_L,),
        "bp_solver": (_L, _P),
        "bp_fallback": (_L,),
        "cards": (_L,),
        "card_examples": (_L,),
        "sweep": (),
        "sweep_layer": (),
        "sweep_multiples": (),
        "sweep_tokens": (),
        "sweep_steps": (),
        "sweep_batch_size": (),
        "phase_atoms": (_P,),
        "phase_grid": (_P,),
        "phase_trials": (_P,),
        # Keyed since the first release; it changes nothing computed, only whether a hub model may load.
        "allow_download": (_L,),
        "cache_dir": (),
        "preset": (),
    }.items()
}


def check_declared(config_class: type = ExperimentConfig) -> None:
    """Raise RuntimeError unless FIELD_CACHES declares exactly the fields of `config_class`."""
    undeclared = {f.name for f in fields(config_class)} ^ set(FIELD_CACHES)
    if undeclared:
        raise RuntimeError(
            f"ExperimentConfig fields {sorted(undeclared)} are not declared in (or not fields of) "
            "atoms.experiment_cache.FIELD_CACHES: say which caches each one enters."
        )


check_declared()


def code_version() -> str:
    """The atoms version and a digest of its source (atoms and atoms.kernels): part of every cache key, so
    an upgraded or edited toolkit never reuses an older run's captures, layer results or phase plane."""
    import atoms
    import atoms.kernels

    sha = hashlib.sha256()
    for package in (atoms, atoms.kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            sha.update(path.name.encode())
            sha.update(path.read_bytes())
    return f"{importlib.metadata.version('atoms')}+{sha.hexdigest()[:12]}"


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of obj as sorted JSON (str() for anything JSON cannot hold)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def settings(config: ExperimentConfig, cache: Cache) -> dict[str, Any]:
    """The settings of `config` that enter `cache`'s key, by field name."""
    return {k: v for k, v in asdict(config).items() if cache in FIELD_CACHES[k]}


@dataclass(frozen=True)
class CacheKeys:
    """The keys of one run's caches; `version` is code_version() when the run started."""

    config: ExperimentConfig
    version: str

    @classmethod
    def of(cls, config: ExperimentConfig) -> CacheKeys:
        """The keys of `config` under the toolkit as it is now."""
        return cls(config, code_version())

    def _key(self, cache: Cache, *parts: Any) -> str:
        return digest([self.version, str(cache), settings(self.config, cache), *parts])

    @property
    def capture(self) -> str:
        """The captured activations."""
        return self._key(Cache.CAPTURE)

    @property
    def layer(self) -> str:
        """A layer's finished results; they depend on the capture too."""
        return self._key(Cache.LAYER, self.capture)

    def training(
        self, train_config: TrainConfig, sae_config: dict[str, Any], rule: PlateauRule, *, sweep: bool = False
    ) -> str:
        """One SAE's checkpoints (a sweep cell's with sweep=True); their folders lie in the capture's, so
        the capture needs no part here."""
        cache = Cache.SWEEP_CELL if sweep else Cache.TRAINING
        return self._key(cache, asdict(train_config), sae_config, asdict(rule))

    @property
    def phase(self) -> str:
        """The phase plane (no captured data behind it)."""
        return self._key(Cache.PHASE)


def read_json(path: Path) -> Any | None:
    """The JSON data cached at path, or None when nothing finished was cached there."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    """Cache data at path atomically: a run killed while writing leaves no half file to load later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
