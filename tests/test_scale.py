"""Scale (issue 9): tiled statistics equal the untiled ones, progress reports change nothing, capture streams.

- Coherence statistics, Babel, the spark bounds, q*'s per-sample coherence and the certified fractions of a
  3000-atom dictionary in d = 64 under an AIP, walked in 128-row tiles, against one-tile walks and against
  numpy on the dense 3000 x 3000 Gram (72 MB), an independent reference.
- `babel_crossing` (the spark bound's one-walk Babel search) against a bisection over `babel(k)`.
- Every `progress=` (a hook or a tqdm bar) gives bit-identical results, and the hook / bar reaches its total.
- `capture` into shards never holds more than one shard plus one batch of rows, counted from the live torch
  tensors at every shard write: the count is the same for 4 and for 24 shards.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama

import atoms.activations as act
from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.kernels import aip_gram, support_gram
from atoms.metrics import certified_fractions, per_sample_coherence, q_star
from atoms.uniqueness import spark_lower_bounds

N, D, TILE = 3000, 64, 128
SLACK = 1e-9  # atoms.uniqueness's slack on the Babel level 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the 128-row tiles are small, and on the 2 shared cores of the build machine each
    tile op's 2-thread parallel region waited for a descheduled thread (a Babel walk: 3.6 s against 0.3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def atoms_and_aip() -> tuple[torch.Tensor, AIP]:
    """3000 Gaussian atoms in d = 64 and an AIP with a decaying spectrum (seeded)."""
    gen = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    C = (Q / (1 + torch.arange(D, dtype=torch.float64) / 8)) @ Q.T
    return torch.randn(N, D, generator=gen, dtype=torch.float64), AIP.from_moment(C)


def dictionary(tile: int) -> Dictionary:
    W, aip = atoms_and_aip()
    return Dictionary(W, aip, tile=tile)


@functools.lru_cache(maxsize=1)
def dense_abs_gram() -> np.ndarray:
    """|G| of the unit atoms, diagonal set to 0, from numpy (the independent reference)."""
    u = dictionary(N).unit.numpy()
    a = np.abs(u @ u.T)
    np.fill_diagonal(a, 0.0)
    return a


def dense_crossing(a: np.ndarray, level: float) -> int | None:
    """Smallest k with max_i (sum of row i's k largest entries) >= level, from fully sorted rows."""
    csum = np.cumsum(-np.sort(-a, axis=1)[:, :-1], axis=1)  # n - 1 others per row
    reach = csum >= level
    if not reach.any():
        return None
    return int(np.argmax(reach, axis=1)[reach.any(axis=1)].min()) + 1


@functools.lru_cache(maxsize=1)
def codes() -> tuple[torch.Tensor, torch.Tensor]:
    """500 sparse codes with 1-12 active atoms each (padding -1 / 0), seeded."""
    gen = torch.Generator().manual_seed(4)
    n, k = 500, 12
    idx = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(n)])
    sizes = torch.randint(1, k + 1, (n,), generator=gen)
    active = torch.arange(k)[None, :] < sizes[:, None]
    vals = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.where(active, idx, -1), torch.where(active, vals, 0.0)


class Hook:
    """A progress hook recording its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def walks(self) -> list[list[tuple[int, int]]]:
        """The calls split into walks (a walk restarts at done == 1)."""
        out: list[list[tuple[int, int]]] = []
        for call in self.calls:
            if call[0] == 1 or not out:
                out.append([])
            out[-1].append(call)
        return out

    def assert_complete(self, n_walks: int) -> None:
        walks = self.walks()
        assert len(walks) == n_walks, walks
        for walk in walks:
            total = walk[0][1]
            assert walk == [(k, total) for k in range(1, total + 1)]


# ------------------------------------------------------------------------------------- tiled == untiled


def test_coherence_statistics_tiled_equal_untiled_and_dense():
    tiled, whole, a = dictionary(TILE), dictionary(N), dense_abs_gram()
    for dic in (tiled, whole):
        assert dic.coherence() == pytest.approx(a.max(), abs=1e-14)
        best, partner = dic.max_coherence()
        np.testing.assert_allclose(best.numpy(), a.max(axis=1), rtol=0, atol=1e-14)
        np.testing.assert_allclose(a[np.arange(N), partner.numpy()], a.max(axis=1), rtol=0, atol=1e-14)
        counts, edges = dic.cos_histogram()
        expected, _ = np.histogram(a[np.triu_indices(N, 1)], bins=edges.numpy())
        assert counts.tolist() == expected.tolist()
    assert torch.equal(tiled.max_coherence()[1], whole.max_coherence()[1])


@pytest.mark.parametrize("k", [1, 7, 40])
def test_babel_tiled_equal_dense(k):
    expected = np.sort(dense_abs_gram(), axis=1)[:, -k:].sum(axis=1).max()
    assert dictionary(TILE).babel(k) == pytest.approx(expected, abs=1e-13)
    assert dictionary(N).babel(k) == pytest.approx(expected, abs=1e-13)


@pytest.mark.parametrize(
    ("level", "width"), [(0.5, 64), (1 - SLACK, 64), (3.0, 1), (20.0, 1), (20.0, 64), (1e6, 64)]
)
def test_babel_crossing_equals_dense(level, width):
    """width=1 forces the re-walk of row tiles with a wider buffer; 1e6 is never reached (None)."""
    unit = dictionary(TILE).unit
    got = aip_gram.babel_crossing_reference(unit, level, tile=TILE, width=width)
    assert got == dense_crossing(dense_abs_gram(), level)


def test_babel_crossing_matches_bisection_on_babel():
    """The one-walk search against the definition: bisection over Dictionary.babel(k) (a smaller dictionary,
    whose crossing at level 1 is far from 1 and from n - 1)."""
    gen = torch.Generator().manual_seed(2)
    dic = Dictionary(torch.randn(400, 24, generator=gen, dtype=torch.float64), tile=64)
    for level in (1 - SLACK, 4.0):
        lo, hi = 1, dic.n_atoms - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if dic.babel(mid) >= level else (mid + 1, hi)
        assert dic.babel_crossing(level) == lo
        assert 1 < lo < dic.n_atoms - 1


def test_spark_lower_bounds_tiled_equal_dense():
    a = dense_abs_gram()
    coh = math.ceil((1 + 1 / a.max()) * (1 - SLACK))
    babel = dense_crossing(a, 1 - SLACK) + 1
    assert spark_lower_bounds(dictionary(TILE)) == (coh, babel)
    assert spark_lower_bounds(dictionary(N)) == (coh, babel)


def test_per_sample_coherence_gather_path_equals_dense():
    """The gather path (used above 4096 atoms) and the cached-Gram path agree with numpy's dense Gram."""
    idx, vals = codes()
    a = dense_abs_gram()
    expected = np.array(
        [a[np.ix_(r[r >= 0], r[r >= 0])].max() if (r >= 0).sum() > 1 else 0.0 for r in idx.numpy()]
    )
    mu, l0 = per_sample_coherence(dictionary(TILE), idx, vals)
    np.testing.assert_allclose(mu.numpy(), expected, rtol=0, atol=1e-14)
    assert l0.tolist() == (idx >= 0).sum(dim=1).tolist()
    unit = dictionary(TILE).unit
    # 0 cached atoms: per-sample row gathers; 200 KB chunks: many chunks of a few samples.
    gathered = support_gram.support_coherence_reference(
        unit, idx, vals, cached_gram_atoms=0, chunk_bytes=200_000
    )
    np.testing.assert_allclose(gathered.max_abs_cos.numpy(), expected, rtol=0, atol=1e-14)


def test_certified_fractions_tiled_equal_untiled():
    idx, vals = codes()
    tiled = certified_fractions(dictionary(TILE), idx, vals, erc_samples=6, bp_samples=0, codes_of="unit")
    whole = certified_fractions(dictionary(N), idx, vals, erc_samples=6, bp_samples=0, codes_of="unit")
    a = dense_abs_gram()
    assert tiled.spark_lower == whole.spark_lower == dense_crossing(a, 1 - SLACK) + 1
    assert tiled.spark_count == whole.spark_count
    assert torch.equal(tiled.erc_rows, whole.erc_rows)
    torch.testing.assert_close(tiled.erc_values, whole.erc_values, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- progress


def test_progress_hook_changes_nothing_and_reaches_total():
    idx, vals = codes()
    plain, hooked = dictionary(TILE), dictionary(TILE)
    hook = Hook()
    assert hooked.coherence(progress=hook) == plain.coherence()
    hook.assert_complete(1)
    assert hook.walks()[0][-1] == (300, 300)  # 24 row tiles: 24 * 25 / 2 upper tiles
    for a, b in zip(hooked.cos_histogram(), plain.cos_histogram(), strict=True):
        assert torch.equal(a, b)

    hook = Hook()
    assert hooked.babel(5, progress=hook) == plain.babel(5)
    hook.assert_complete(1)

    hook = Hook()
    assert spark_lower_bounds(dictionary(TILE), progress=hook) == spark_lower_bounds(plain)
    hook.assert_complete(2)  # a coherence walk, then the Babel walk

    hook = Hook()
    mu_h, l0_h = per_sample_coherence(plain, idx, vals, progress=hook)
    mu, l0 = per_sample_coherence(plain, idx, vals)
    assert torch.equal(mu_h, mu) and torch.equal(l0_h, l0)
    assert q_star(mu_h, l0_h) == q_star(mu, l0)
    hook.assert_complete(1)

    hook = Hook()
    args = {"erc_samples": 4, "bp_samples": 2, "bp_solver": "omp", "codes_of": "unit"}
    got = certified_fractions(dictionary(TILE), idx, vals, **args, progress=hook)
    ref = certified_fractions(dictionary(TILE), idx, vals, **args)
    hook.assert_complete(3)  # coherence, Babel, then 4 ERC steps + 1 BP step
    assert hook.walks()[-1][-1] == (5, 5)
    for field in got._fields:
        if field != "seconds":
            a, b = getattr(got, field), getattr(ref, field)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field


def test_progress_bar_on_stderr_reaches_total(capsys):
    plain = dictionary(TILE)
    assert dictionary(TILE).babel_crossing(1 - SLACK, progress=True) == plain.babel_crossing(1 - SLACK)
    err = capsys.readouterr().err
    assert "babel crossing" in err and "24/24" in err
    dictionary(TILE).coherence(progress=True)
    assert "300/300" in capsys.readouterr().err


def test_gram_reduce_kernel_path_progress_counts_launches(monkeypatch):
    """The Triton launcher (in the interpreter) reports one step per band and gives the same statistics."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    monkeypatch.setattr(aip_gram, "PARTIAL_BYTES", 1)  # one band per group row: several launches
    unit = dictionary(TILE).unit[:70].contiguous()
    hook = Hook()
    got = aip_gram.gram_reduce(unit, progress=hook)
    ref = aip_gram.gram_reduce(unit)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    hook.assert_complete(1)
    assert hook.calls[-1][1] > 1


def test_progress_rejects_other_values():
    with pytest.raises(
        ValueError, match=re.escape("progress must be False, True (a bar on stderr) or a call")
    ):
        dictionary(TILE).babel(2, progress="yes")


# ------------------------------------------------------------------------------------------- capture


def live_storages() -> dict[int, int]:
    """{data pointer: bytes} of the storages of every live CPU torch tensor."""
    gc.collect()  # tensors in unreachable cycles are not held
    # type(), not isinstance(): isinstance reads __class__, which wakes deprecated lazy module attributes.
    tensors = (o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.device.type == "cpu")
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of the live tensor storages whose data pointer is not in exclude."""
    return sum(size for ptr, size in live_storages().items() if ptr not in exclude)


def capture_peak(tmp_path, n_shards: int) -> tuple[int, int, int]:
    """Capture n_shards shards of 64 rows (layers 1 and 3), counting the bytes of live torch tensors that
    the capture created at every shard write and every on_shard call; (peak bytes, bytes per row, shards)."""
    tok = byte_tokenizer()
    model = tiny_llama(tok, max_positions=64)
    texts = [f"text {k}: " + "streams of tokens go to disk, a shard at a time. " * 3 for k in range(200)]
    shard_tokens, seq_len, batch_size = 64, 32, 3
    before = set(live_storages())
    peaks: list[int] = []
    save_file = act.save_file

    def counting_save(tensors, path):
        peaks.append(live_tensor_bytes(before))
        save_file(tensors, path)

    act.save_file = counting_save
    try:
        cap = act.capture(
            model,
            tok,
            texts,
            [1, 3],
            max_tokens=n_shards * shard_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            out_dir=tmp_path / f"cap{n_shards}",
            on_shard=lambda *_: peaks.append(live_tensor_bytes(before)),
        )
    finally:
        act.save_file = save_file
    peaks.append(live_tensor_bytes(before))  # after the return, with the Capture alive
    row_bytes = 2 * 32 * 4 + 4 * 8  # two layers of d = 32 float32, four int64 token fields
    assert cap.n_tokens == n_shards * shard_tokens
    assert len(list(act.iter_shards(cap.out_dir, 3))) == n_shards
    # One shard in the buffer plus one batch of rows (3 chunks of 31 kept positions), plus the two layers'
    # float64 second moments (d x d and d) and small index tensors: 64 KiB of slack.
    bound = (shard_tokens + batch_size * (seq_len - 1)) * row_bytes + (64 << 10)
    return max(peaks), bound, len(peaks)


def test_capture_holds_at_most_one_shard(tmp_path):
    peak3, bound, calls3 = capture_peak(tmp_path, 3)
    peak15, _, calls15 = capture_peak(tmp_path, 15)
    assert calls3 == 2 * 3 + 1 and calls15 == 2 * 15 + 1
    assert peak3 <= bound and peak15 <= bound
    # Five times the tokens, the same memory: nothing accumulates across shards.
    assert peak15 <= peak3 + (16 << 10)
