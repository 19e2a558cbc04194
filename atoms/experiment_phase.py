"""The basis-pursuit phase transition drawn in the report: Gaussian problems over the (delta, rho) plane.

Signed and non-negative codes at N = phase_atoms atoms, beside the theoretical curves
(`atoms.recovery.phase_transition`). It depends on no captured data, so it is cached on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoms.experiment_cache import CacheKeys, read_json, write_json
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_progress import Progress
from atoms.recovery import phase_transition

__all__ = ["PHASE", "phase_plane"]


def _grid(what: str) -> Keys:
    """A (delta, rho) grid of `what`: rows delta, columns rho."""
    return each(each(what))


_PLANE = Keys(
    {
        "measurements": each("Measurements m = round(delta N) of each grid row."),
        "rates": _grid(
            "Fraction of the cell's problems basis pursuit recovered (row delta, column rho; signed or "
            "nonneg)."
        ),
        "ci_low": _grid("Lower end of the Wilson 95% interval of the cell's rate."),
        "ci_high": _grid("Upper end of the Wilson 95% interval of the cell's rate."),
        "flagged": _grid("Problems of the cell in the flagged band (neither proven)."),
        "failed": _grid("Problems of the cell basis pursuit failed to recover."),
        "curve": each(
            "Theoretical transition rho*(delta) (Donoho-Tanner, from the statistical dimension) at each grid "
            "delta."
        ),
        "codes_per_dictionary": "Problems sharing one Gaussian dictionary.",
        "seconds": "Wall seconds of the plane for this sign.",
    }
)
PHASE = Keys(
    {
        "n": "Atoms N of the phase transition's Gaussian problems.",
        "trials": "Problems per phase-transition cell and sign.",
        "deltas": each("Grid values of delta = m/N (measurements over atoms)."),
        "rhos": each("Grid values of rho = k/m (non-zeros over measurements)."),
        "signed": _PLANE,
        "nonneg": _PLANE,
    }
)
"""The results' "phase_transition" (null when phase_atoms is 0)."""


def phase_plane(config: ExperimentConfig, folder: Path, keys: CacheKeys, bars: Progress) -> dict[str, Any]:
    """Basis pursuit over the (delta, rho) plane at N = phase_atoms, signed and non-negative (PHASE);
    cached in `folder` by its settings."""
    n, grid, trials = config.phase_atoms, config.phase_grid, config.phase_trials
    cached = folder / f"{keys.phase}.json"
    found = read_json(cached)
    if found is not None:
        bars.log(f"phase transition: loaded from {cached}")
        return found
    points = [(i + 0.5) / grid for i in range(grid)]
    planes = {}
    update = bars.task(f"phase transition, N = {n}", 2 * grid)
    for done, nonneg in enumerate((False, True)):
        cells = []
        for i, delta in enumerate(points):
            cells.append(
                phase_transition(
                    n, [delta], points, trials, nonneg=nonneg, seed=config.seed + i, solver=config.bp_solver
                )
            )
            update(completed=done * grid + i + 1)
        planes["nonneg" if nonneg else "signed"] = _PLANE.build(
            measurements=[int(c.measurements[0]) for c in cells],
            rates=[c.rates[0].tolist() for c in cells],
            ci_low=[c.ci_low[0].tolist() for c in cells],
            ci_high=[c.ci_high[0].tolist() for c in cells],
            flagged=[c.flagged[0].tolist() for c in cells],
            failed=[c.failures[0].tolist() for c in cells],
            curve=[float(c.curve[0]) for c in cells],
            codes_per_dictionary=cells[0].codes_per_dictionary,
            seconds=sum(c.seconds for c in cells),
        )
    out = PHASE.build(n=n, trials=trials, deltas=points, rhos=points, **planes)
    write_json(cached, out)
    return out
