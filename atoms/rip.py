"""The restricted isometry constant delta_K of a dictionary: exact by enumeration, or a lower bound.

delta_K = max over supports |S| = K of ||G_SS - I||_2, with G the Gram matrix of unit-norm atoms (SPEC section
4, theorem 1). Computing it is NP-hard (Tillmann-Pfetsch 2014), so `rip_constant` enumerates every support
only when there are at most `max_supports` of them; beyond that it returns the largest value over sampled and
greedily grown supports, which is a lower bound and is flagged as one. Gershgorin ((K - 1) mu) and babel
(mu1(K - 1)) give the matching upper bounds.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Literal, NamedTuple

import numpy as np
import torch

from atoms.dictionary import Dictionary
from atoms.errors import BadInputError

__all__ = ["RIPResult", "rip_constant"]

# Floats handled per batched eigen-solve: bounds the (chunk, K, d) gather of atoms to about 32 MB.
_CHUNK_FLOATS = 1 << 22


class RIPResult(NamedTuple):
    """delta_K with its bounds.

    value: exact delta_K (kind "exact") or the largest ||G_SS - I||_2 found (kind "lower_bound").
    gershgorin_upper: (K - 1) mu.   babel_upper: mu1(K - 1).   n_supports: supports evaluated.
    support: the support attaining `value`.
    """

    value: float
    kind: Literal["exact", "lower_bound"]
    gershgorin_upper: float
    babel_upper: float
    n_supports: int
    seconds: float
    support: tuple[int, ...]


def _check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BadInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _deviations(U: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
    """||G_SS - I||_2 for each row of `supports` (batch, K) over unit atoms U (n_atoms, d) -> (batch,)."""
    A = U[supports]
    eig = torch.linalg.eigvalsh(A @ A.mT)
    return torch.maximum(eig[:, -1] - 1.0, 1.0 - eig[:, 0])


class _Best:
    """Running maximum of ||G_SS - I||_2 and the support that attains it."""

    def __init__(self) -> None:
        self.value = -math.inf
        self.support: tuple[int, ...] = ()
        self.count = 0

    def update(self, supports: torch.Tensor, dev: torch.Tensor) -> None:
        self.count += supports.shape[0]
        i = int(torch.argmax(dev))
        if float(dev[i]) > self.value:
            self.value = float(dev[i])
            self.support = tuple(sorted(int(j) for j in supports[i]))


def _enumerate(U: torch.Tensor, K: int, chunk: int) -> _Best:
    best = _Best()
    combos = itertools.combinations(range(U.shape[0]), K)
    while True:
        flat = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, chunk)), dtype=np.int64)
        if flat.size == 0:
            return best
        supports = torch.from_numpy(flat.reshape(-1, K))
        best.update(supports, _deviations(U, supports))


def _random_supports(
    U: torch.Tensor, K: int, samples: int, chunk: int, gen: torch.Generator, best: _Best
) -> None:
    """Uniform random K-subsets: the K largest of n_atoms uniform keys per row."""
    n = U.shape[0]
    rows = max(1, min(chunk, _CHUNK_FLOATS // n))
    done = 0
    while done < samples:
        c = min(rows, samples - done)
        supports = torch.rand(c, n, generator=gen, dtype=torch.float64).topk(K, dim=1).indices
        best.update(supports, _deviations(U, supports))
        done += c


def _greedy(dic: Dictionary, K: int, seeds: int, beam: int, best: _Best) -> None:
    """Grow supports from the most coherent pairs, adding the atom that most enlarges ||G_SS - I||_2.

    Candidates are first ranked by summed |cos| with the current support (the babel-style proxy, O(K n d)),
    and only the best `beam` are evaluated exactly, so no n_atoms x n_atoms Gram is formed.
    """
    if seeds == 0:
        return
    U = dic.unit
    values, partner = dic.max_coherence()
    order = torch.argsort(values.to(torch.float64), descending=True)
    pairs: list[tuple[int, int]] = []
    for i in order.tolist():
        pair = tuple(sorted((i, int(partner[i]))))
        if pair not in pairs:
            pairs.append(pair)
        if len(pairs) == seeds:
            break
    n = U.shape[0]
    for pair in pairs:
        support = list(pair)
        if K == 2:
            best.update(torch.tensor([support]), _deviations(U, torch.tensor([support])))
            continue
        while len(support) < K:
            score = (U[support] @ U.T).abs().sum(dim=0)
            score[support] = -math.inf
            cand = score.topk(min(beam, n - len(support))).indices
            grown = torch.tensor(support, device=cand.device).expand(cand.numel(), -1)
            trial = torch.cat([grown, cand[:, None]], dim=1)
            dev = _deviations(U, trial)
            if trial.shape[1] == K:
                best.update(trial, dev)
            support.append(int(cand[torch.argmax(dev)]))


def rip_constant(
    D: torch.Tensor | np.ndarray | Dictionary,
    K: int,
    *,
    max_supports: int = 200_000,
    samples: int = 20_000,
    seed: int = 0,
    greedy_seeds: int = 32,
    beam: int = 16,
) -> RIPResult:
    """Restricted isometry constant delta_K = max_{|S| = K} ||G_SS - I||_2 of unit-norm atoms.

    D: (n_atoms, d) tensor/array (rows are atoms) or a `Dictionary`. Atoms are unit-normalised in the
    Euclidean norm; for the AIP version pass whitened atoms or a Dictionary built with the AIP.

    Exact when C(n_atoms, K) <= `max_supports` (default 200,000 supports, e.g. every 3-subset of 107 atoms or
    every 5-subset of 30): every support is enumerated in chunks and batched through `torch.linalg.eigvalsh`
    on (chunk, K, K) Grams. Otherwise the result is a lower bound (kind "lower_bound"): the maximum over
    `samples` uniform random supports and supports grown greedily from the `greedy_seeds` most coherent pairs.
    Upper bounds: Gershgorin (K - 1) mu and babel mu1(K - 1) (SPEC section 4, theorem 1).
    The Grams are computed on D's device.
    """
    start = time.perf_counter()
    dic = D if isinstance(D, Dictionary) else Dictionary(D)
    U = dic.unit
    n, d = U.shape
    K = _check_positive_int(K, "K")
    if K > n:
        raise BadInputError(f"K = {K} exceeds the number of atoms {n}; choose K <= {n}.")
    max_supports = _check_positive_int(max_supports, "max_supports")
    samples = _check_positive_int(samples, "samples", minimum=0)
    greedy_seeds = _check_positive_int(greedy_seeds, "greedy_seeds", minimum=0)
    beam = _check_positive_int(beam, "beam")
    if K == 1:
        # Unit atoms: every 1 x 1 Gram is exactly [1].
        return RIPResult(0.0, "exact", 0.0, 0.0, n, time.perf_counter() - start, (0,))
    gershgorin = (K - 1) * dic.coherence()
    babel_upper = dic.babel(K - 1)
    chunk = max(1, min(16_384, _CHUNK_FLOATS // (K * d)))
    if math.comb(n, K) <= max_supports:
        best, kind = _enumerate(U, K, chunk), "exact"
    else:
        if samples == 0 and greedy_seeds == 0:
            raise BadInputError(
                f"C({n}, {K}) = {math.comb(n, K)} supports exceed max_supports = {max_supports}, and "
                "samples = 0 with greedy_seeds = 0 leaves nothing to evaluate; raise max_supports or give "
                "samples > 0."
            )
        best, kind = _Best(), "lower_bound"
        gen = torch.Generator().manual_seed(seed)
        _greedy(dic, K, greedy_seeds, beam, best)
        _random_supports(U, K, samples, chunk, gen, best)
    return RIPResult(
        value=best.value,
        kind=kind,
        gershgorin_upper=float(gershgorin),
        babel_upper=float(babel_upper),
        n_supports=best.count,
        seconds=time.perf_counter() - start,
        support=best.support,
    )
