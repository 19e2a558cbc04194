"""Every public entry point that takes tensors works on accelerator tensors and answers on their device.

No GPU is needed: `NotOnCPU` is a CPU tensor that poses as one on an accelerator. Its device is `HERE`
(`cpu:0`: a CPU device with an index, so branches on `device.type` still take the CPU paths, while
`HERE != torch.device("cpu")` keeps "move back to x.device" apart from "move to the host"). Inside the
`accelerator` fixture (a torch function mode) it behaves as a CUDA tensor does, where it matters here:

- `.numpy()`, `np.asarray(t)` and `t.__array__()` raise CUDA's TypeError, so no code may hand it to numpy,
  scipy or cvxpy without moving it to the host first;
- `.cpu()`, `.to("cpu")`, `.to(device="cpu")`, `.to(host_tensor)` and `.numpy(force=True)` move it to the
  host: a plain tensor, a copy as a transfer is;
- every torch op with a NotOnCPU input returns NotOnCPU (gradients included); factories given `device=HERE`
  and moves to HERE (`.to(HERE)`, `.to(not_on_cpu_tensor)`) create it; `to_here` moves a module;
- an op mixing it with a host tensor of one or more dimensions raises CUDA's RuntimeError, except where CUDA
  allows it: host 0-dim tensors, host indices of `t[index]`, and `copy_`;
- it pickles as a host tensor, as `torch.load(map_location="cpu")` reads a CUDA one.

An entry point passes when (a) it runs without that TypeError or RuntimeError and (b) its tensor outputs are
NotOnCPU again (computed on the device, or moved back there): `assert_home`. Documented host results are
checked as such (`host=`, `assert_on_host`): the accumulators' state (SecondMoment, R2Accumulator) and an
AIP's factor, cast to each input's device on use; `SparseAutoencoder.dictionary()`; a Capture's rows and
moments; `phase_transition`, which draws its own problems on the host.

Not covered here, with the reason:
- code behind `device.type == "cuda"`: the Triton kernels of atoms.kernels (tests/test_gpu.py on a GPU) and
  batched_recovery's thread-count guard (CPU only). NotOnCPU reports device type "cpu", so the torch
  reference paths run here;
- entry points without tensor inputs: `welch_bound`, `AIP.metric` / `save` / `load`, `SecondMoment.save` /
  `load`, `load_capture`, `load_shards`, `load_tokens` (they read into host memory);
- modules outside this issue: atoms.synth and atoms.strategies (generators drawing on the host),
  atoms.distributed (needs a process group; tests/test_distributed.py), and the drivers atoms.experiment,
  atoms.report and atoms.cli, which keep statistics on the host by design (`ExperimentConfig.device`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from tiny_models import byte_tokenizer, tiny_llama
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from atoms import recovery
from atoms.activations import capture
from atoms.aip import AIP, SecondMoment, euclidean_angles
from atoms.batched_recovery import solve_batched
from atoms.dictionary import Dictionary, babel, coherence
from atoms.metrics import (
    R2Accumulator,
    certified_fractions,
    neuron_codes,
    neuron_dictionary,
    per_sample_coherence,
    q_star,
    r2,
    to_sparse,
    tsae_window,
    unit_codes,
)
from atoms.recovery import (
    basis_pursuit,
    classify,
    cvxpy_problem,
    donoho_tanner_curve,
    dual_certificate,
    erc,
    phase_transition,
    wilson_interval,
)
from atoms.rip import rip_constant
from atoms.train import TrainConfig, TrainState, make_optimizer, train, train_step
from atoms.tsae import TSAE, ReLUSAE, load_saelens, save_saelens
from atoms.uniqueness import spark, spark_lower_bounds

HERE = torch.device("cpu", 0)
HOST = torch.device("cpu")
_NUMPY_ERROR = (
    "can't convert cpu:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory "
    "first."
)


class NotOnCPU(torch.Tensor):
    """A CPU tensor that poses as one on the accelerator `HERE` (see the module docstring)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return HERE

    def __reduce_ex__(self, protocol):
        with torch._C.DisableTorchFunction():
            return self.clone().__reduce_ex__(protocol)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__array__ or (func is torch.Tensor.numpy and not kwargs.get("force")):
            raise TypeError(_NUMPY_ERROR)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if func is torch.Tensor.numpy:  # numpy(force=True) copies to the host first
                return out.copy()
            if _target(func, args, kwargs) == HOST:
                return out.clone()  # a plain tensor: a transfer copies
        return _retype(out, (args, kwargs))


def _retype(out, inputs):
    """`out` with every plain tensor turned NotOnCPU in place (torch's own conversion, `as_subclass`, makes
    each result a view, which custom autograd functions that write in place refuse); a plain input handed
    back as the result is copied first, so the caller's tensor keeps its type."""
    if isinstance(out, (tuple, list)):
        return type(out)([_retype(o, inputs) for o in out])
    if type(out) is torch.Tensor:
        if any(out is t for t in tree_flatten(inputs)[0]):
            with torch._C.DisableTorchFunction():
                out = out.clone()
        out.__class__ = NotOnCPU
    return out


def here(x: torch.Tensor | np.ndarray) -> NotOnCPU:
    """A copy of x on the simulated accelerator."""
    return _retype(torch.as_tensor(x).clone(), ())


def _holds_here(tree) -> bool:
    return any(isinstance(t, NotOnCPU) for t in tree_flatten(tree)[0])


def _target(func, args, kwargs) -> torch.device | None:
    """Where a move sends its tensor (HERE or HOST); None when `func` is no move."""
    if func is torch.Tensor.cpu:
        return HOST
    if func is not torch.Tensor.to:
        return kwargs.get("device") and _where(torch.device(kwargs["device"]))
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(other, torch.Tensor):
        return HERE if isinstance(other, NotOnCPU) else HOST
    device = kwargs.get("device", args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else None)
    return None if device is None else _where(torch.device(device))


def _where(device: torch.device) -> torch.device:
    if device in (HERE, HOST):
        return device
    raise AssertionError(f"device {device} is neither the host nor the simulated accelerator {HERE}")


def _check_same_device(func, args, kwargs) -> None:
    """CUDA's rule: one op, one device, except host 0-dim tensors, host indices of t[index] and copy_."""
    if func in (torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu):
        return
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], NotOnCPU):
        # The indices may stay on the host; a value written must be on the device (or 0-dim).
        tensors = [t for t in args[:1] + args[2:3] if isinstance(t, torch.Tensor)]
    on_host = [t for t in tensors if not isinstance(t, NotOnCPU) and t.ndim > 0]
    if on_host and any(isinstance(t, NotOnCPU) for t in tensors):
        name = getattr(func, "__name__", repr(func))
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {HERE} and cpu! "
            f"({name}: host tensor of shape {tuple(on_host[0].shape)})"
        )


class _Accelerator(TorchFunctionMode):
    """Makes NotOnCPU tensors behave as CUDA tensors (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_same_device(func, args, kwargs)
        out = func(*args, **kwargs)
        target = _target(func, args, kwargs)
        # Factories and torch.as_tensor skip the subclass's dispatch: their results go on the device here.
        if target == HERE or (target is None and _holds_here((args, kwargs))):
            return _retype(out, (args, kwargs))
        return out


@pytest.fixture
def accelerator():
    with _Accelerator():
        yield


def to_here(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every parameter and buffer on the simulated accelerator (their gradients follow)."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = torch.nn.Parameter(here(p.detach()), p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = here(b)
    return module


def _tensors(result, path: str = "result") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in `result`, through tuples, NamedTuples, lists and dicts."""
    if isinstance(result, torch.Tensor):
        yield path, result
        return
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        items = zip(result._fields, result, strict=True)
    elif isinstance(result, (tuple, list)):
        items = enumerate(result)
    elif isinstance(result, dict):
        items = result.items()
    else:
        return
    for name, value in items:
        yield from _tensors(value, f"{path}.{name}")


def assert_home(result, host: tuple[str, ...] = ()) -> None:
    """Every tensor in `result` is NotOnCPU, except the ones at the paths in `host` ("result.field"),
    which are documented to come back on the host."""
    for path, tensor in _tensors(result):
        if path in host:
            assert not isinstance(tensor, NotOnCPU), f"{path} should be on the host"
        else:
            assert isinstance(tensor, NotOnCPU), f"{path} came back on the host, not on the caller's device"


def assert_on_host(result) -> None:
    assert_home(result, host=tuple(path for path, _ in _tensors(result)))


# ------------------------------------------------------------------------------------------------------------
# The simulation itself
# ------------------------------------------------------------------------------------------------------------


def test_not_on_cpu_refuses_numpy_like_cuda(accelerator):
    x = here(torch.arange(6.0).reshape(2, 3))
    for convert in (lambda t: t.numpy(), np.asarray, lambda t: t.__array__(), lambda t: np.linalg.norm(t)):
        with pytest.raises(TypeError, match="can't convert cpu:0 device type tensor to numpy"):
            convert(x)
    np.testing.assert_array_equal(x.cpu().numpy(), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(x.numpy(force=True), np.arange(6.0).reshape(2, 3))


def test_results_stay_and_moves_leave(accelerator):
    x = here(torch.ones(3, dtype=torch.float64))
    for stays in (x * 2, x.sum(), x.to(torch.float32), x.to(HERE), x.to(x), torch.zeros(2, device=x.device)):
        assert isinstance(stays, NotOnCPU)
    for leaves in (x.cpu(), x.to("cpu"), x.to(device="cpu"), x.to(torch.ones(1)), x.to("cpu", torch.float32)):
        assert type(leaves) is torch.Tensor
    assert isinstance(torch.ones(2).to(HERE), NotOnCPU) and isinstance(torch.ones(2).to(x), NotOnCPU)
    moved = x.cpu()
    moved += 1  # a transfer copies
    assert float(x.sum()) == 3.0
    weight = torch.nn.Parameter(here(torch.ones(3)))
    (weight * x.float()).sum().backward()
    assert isinstance(weight.grad, NotOnCPU)


def test_mixing_devices_raises_like_cuda(accelerator):
    x = here(torch.ones(3))
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.ones(3)])
    assert isinstance(x + torch.tensor(1.0), NotOnCPU)  # a host 0-dim tensor is allowed, as on CUDA
    assert isinstance(x[torch.tensor([0, 2])], NotOnCPU)  # so are host indices


def _planted_numpy_call(W: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(W.numpy(), compute_uv=False)


def test_detector_catches_a_planted_numpy_call_and_a_host_result(accelerator):
    W = here(torch.eye(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="to numpy"):
        _planted_numpy_call(W)
    with pytest.raises(AssertionError, match="host"):
        assert_home({"out": torch.linalg.svdvals(W).cpu()})
    assert_home({"out": torch.linalg.svdvals(W)})


# ------------------------------------------------------------------------------------------------------------
# Recovery: basis pursuit, certificates, ERC
# ------------------------------------------------------------------------------------------------------------


# Dirac-Hadamard in d = 8: 16 atoms of coherence 1/sqrt(8), so 2-sparse codes are recovered exactly.
W_DH = np.vstack([np.eye(8), hadamard(8) / np.sqrt(8)])


def _codes(n: int, k: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, W_DH.shape[0]))
    for row in codes:
        row[rng.choice(W_DH.shape[0], k, replace=False)] = rng.uniform(0.5, 1.5, k)
    return codes


@pytest.mark.parametrize("solver", ["batched", "cvxpy", "linprog", "omp"])
def test_basis_pursuit(accelerator, solver):
    codes = _codes(4)
    codes[1] = 0.0  # m = 0: the zero code, no solve
    W, truth = here(W_DH), here(codes)
    result = basis_pursuit(W, truth @ W, solver=solver, true_codes=truth, nonneg=True)
    assert result.counts == {"recovered": 4, "flagged": 0, "failed": 0}, result.reasons
    assert_home(result)
    np.testing.assert_allclose(result.codes.cpu().numpy(), codes, atol=1e-6)


def test_basis_pursuit_fallback_and_device_argument(accelerator, monkeypatch):
    # Two iterations prove nothing: every sample goes to HiGHS on the host, and its answers come back.
    monkeypatch.setattr(recovery, "solve_batched", functools.partial(solve_batched, max_iter=2))
    W, truth = here(W_DH), here(_codes(3))
    result = basis_pursuit(W.cpu(), truth @ W, true_codes=truth, use_true_codes=False, device=HERE)
    assert bool(result.proof.fallback.all()) and result.counts["recovered"] == 3
    assert_home(result)


def test_solve_batched(accelerator):
    W = here(W_DH)
    m = here(_codes(3)) @ W
    solution = solve_batched(W, m / torch.linalg.vector_norm(m, dim=1, keepdim=True))
    assert_home(solution)


def test_certificates(accelerator):
    W, code = here(W_DH), here(_codes(1)[0])
    certificate = dual_certificate(W, code, nonneg=True)
    assert certificate.ok
    assert_home(certificate)
    support = code.nonzero().flatten()
    assert 0 <= erc(W, support) < 1
    twins = here(np.vstack([W_DH[:2], W_DH[:1]]))  # atom 2 repeats atom 0: a dependent support
    dependent = dual_certificate(twins, here(torch.tensor([1.0, 0.0, 1.0])))
    assert not dependent.ok
    assert_home(dependent)
    assert cvxpy_problem(W).x.shape == (16,)
    decisions, _ = classify(here(torch.zeros(2)), here(torch.zeros(2)), ["optimal", "uncertified"])
    assert decisions == ["recovered", "flagged"]
    assert_home(wilson_interval(here(torch.tensor([3.0, 5.0])), 10))
    assert_home(donoho_tanner_curve(here(torch.tensor([0.25, 0.5]))))


def test_phase_transition_takes_device_grids(accelerator):
    # Its problems are drawn and solved on the host, where its result stays: the grids are settings.
    result = phase_transition(
        n=12, deltas=here(torch.tensor([0.5])), rhos=here(torch.tensor([0.2])), trials=2
    )
    assert_on_host(result)


# ------------------------------------------------------------------------------------------------------------
# Geometry: SecondMoment, AIP, Dictionary, spark, RIP
# ------------------------------------------------------------------------------------------------------------


def _activations(n: int = 64, d: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ (torch.eye(d) + 0.3).double()


def test_second_moment_and_aip(accelerator):
    x = here(_activations())
    moment = SecondMoment(8).update(x[:32]).merge(SecondMoment(8).update(x[32:]))
    count, mean, m2 = moment.state()
    # The accumulator lives on the host: it merges across processes and saves to disk.
    assert_on_host([mean, m2, moment.matrix])
    SecondMoment.from_state(count, here(mean), here(m2))
    for aip in (AIP.fit(x), AIP.from_moment(here(moment.matrix)), AIP.from_dictionary(x)):
        assert_on_host(aip.cholesky)
        assert_home([aip.whiten(x), aip.unwhiten(x), aip.inner(x, x), aip.norm(x), aip.cosine(x, x[:1])])
        assert_home(aip.angles(x, pairs=20))
        assert_home(aip.angles(x))
    assert_home(euclidean_angles(x, pairs=(here(torch.tensor([0, 1])), here(torch.tensor([2, 3])))))


def test_dictionary_statistics(accelerator):
    x = here(_activations())
    W = here(W_DH)
    for dic in (Dictionary(W), Dictionary(W, AIP.fit(x))):
        assert_home([dic.raw, dic.unit, dic.norms])
        assert 0 < dic.coherence() < 1 and dic.babel(2) > 0 and dic.babel_crossing() is not None
        assert_home(dic.max_coherence())
        assert_home(dic.cos_histogram())
        assert_home(dic.cos_histogram(bins=7))
        assert_home([dic.gram(), dic.gram(here(torch.tensor([0, 3]))), dic.gram([1, 2])])
        assert isinstance(dic.near_duplicates(0.3), list)
    assert coherence(W) == pytest.approx(8**-0.5) and babel(W, 2) == pytest.approx(2 * 8**-0.5)


def test_spark_and_rip(accelerator):
    W = here(W_DH)
    assert spark(W, method="enumerate").kind == "exact"
    assert spark(Dictionary(W), method="bounds").kind == "bounds"
    assert spark_lower_bounds(W)[0] >= 3
    assert rip_constant(W, 2).kind == "exact"
    assert rip_constant(W, 3, max_supports=10, samples=50, greedy_seeds=2).kind == "lower_bound"


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------


def test_r2_and_sparse_codes(accelerator):
    x = here(_activations())
    aip = AIP.fit(x)
    assert r2(x, x * 0.9) > 0.9 and r2(x, x * 0.9, aip) > 0.9
    accumulator = R2Accumulator(aip).update(x[:32], x[:32]).merge(R2Accumulator(aip).update(x[32:], x[32:]))
    assert accumulator.value() == 1.0
    count, mean, scatter, sse = accumulator.state()
    assert_on_host(mean)  # an accumulator lives on the host, as SecondMoment
    assert R2Accumulator.from_state(count, here(mean), scatter, sse, aip).value() == 1.0
    codes = here(_codes(5))
    indices, values = to_sparse(codes)
    assert_home([indices, values, neuron_codes(x)])
    dic = Dictionary(here(W_DH), aip)
    assert_home([unit_codes(dic, codes), unit_codes(dic, values, indices)])
    mu, l0 = per_sample_coherence(dic, indices, values)
    assert_home([mu, l0])
    assert 0 <= q_star(mu, l0).value <= 1 and 0 <= q_star(mu, l0, form="per_sample").value <= 1
    assert neuron_dictionary(8, aip).n_atoms == 8


@pytest.mark.parametrize("bp_solver", ["batched", "linprog", basis_pursuit])
def test_certified_fractions(accelerator, bp_solver):
    indices, values = to_sparse(here(_codes(6)))
    certified = certified_fractions(
        Dictionary(here(W_DH)), indices, values, erc_samples=4, bp_samples=3, bp_solver=bp_solver, nonneg=True
    )
    assert certified.erc_count == 4 and certified.bp_recovered == 3
    assert_home(certified)


def test_tsae_window(accelerator):
    codes = here(_codes(6))
    dic = Dictionary(here(W_DH))
    for given in (codes, to_sparse(codes)):
        window = tsae_window(dic, given, here(torch.full((16,), 0.3)))
        assert_home(window)


# ------------------------------------------------------------------------------------------------------------
# Learning: TSAE, ReLU SAE, the trainer
# ------------------------------------------------------------------------------------------------------------


_TRAIN = TrainConfig(lr=1e-3, batch_size=16, steps=3, lr_warmup_steps=1, sparsity_warmup_steps=1, log_every=1)


@pytest.mark.parametrize("make", [lambda aip: TSAE(8, 16, aip), lambda aip: ReLUSAE(8, 16)])
def test_sae_forward_and_training(accelerator, make, tmp_path):
    x = here(_activations().float())
    model = to_here(make(AIP.fit(x)))
    assert_home(model(x))
    assert_home([model.encode(x), model.decode(model.encode(x))])
    model.fit_input_scale(x)
    model.init_from_atoms_(here(W_DH[:16]))
    # The atoms leave the model on the host, in float64: they feed Dictionary and the report.
    assert_home(model.dictionary(), host=("result.0",))
    # Two steps with checkpoints, then a fresh model resumes from the second one (a CPU-loaded checkpoint).
    assert_home(
        train(model, x, dataclasses.replace(_TRAIN, steps=2), checkpoint_dir=tmp_path, progress=False)
    )
    resumed = to_here(make(AIP.fit(x)))
    assert_home(train(resumed, x, _TRAIN, checkpoint_dir=tmp_path, progress=False))
    assert all(isinstance(p, NotOnCPU) for p in resumed.parameters())
    assert_home(train(to_here(make(AIP.fit(x))), [x[:16]] * 3, _TRAIN, progress=False))
    state = TrainState.start(model, _TRAIN)
    train_step(model, make_optimizer(model, _TRAIN), x[:16], state)
    assert_home([state.tokens_since_fired, state.dead_latents()])
    loaded = load_saelens(save_saelens(model, tmp_path / "sae"))  # saved from the device, loaded on the host
    torch.testing.assert_close(loaded.encode(x.cpu()), model.encode(x).cpu(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_disk", [False, True])
def test_capture(accelerator, tmp_path, on_disk):
    tokenizer = byte_tokenizer()
    model = to_here(tiny_llama(tokenizer))
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Atoms are sparse directions."]
    out_dir = tmp_path if on_disk else None
    got = capture(model, tokenizer, texts, [0, 2], max_tokens=60, seq_len=24, batch_size=2, out_dir=out_dir)
    # The rows and moments of a capture live on the host (in memory or in shards): they outgrow a GPU.
    assert_on_host([[got.activations(layer) for layer in got.layers], got.tokens, got.moments[0].matrix])
    assert got.n_tokens == 60 and got.moments[2].count == 60
