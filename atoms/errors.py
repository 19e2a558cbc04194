"""Errors the toolkit raises on bad input, and the checks that raise them.

Every message names what is wrong and what to do about it: a researcher who feeds NaN activations or a
singular moment should learn the fix from the message alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

__all__ = [
    "AtomsError",
    "BadInputError",
    "IllConditionedError",
    "as_batches",
    "as_float_tensor",
    "check_finite",
]


class AtomsError(ValueError):
    """Base class of every input or numerics error raised by atoms."""


class BadInputError(AtomsError):
    """Wrong shape or dtype, NaN/Inf values, an empty batch, zero or duplicate atoms."""


class IllConditionedError(AtomsError):
    """A second moment or Gram matrix too close to singular for a Cholesky solve."""


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise BadInputError if `x` holds NaN or Inf, naming how many and where the first ones are."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = [tuple(int(i) for i in row) for row in bad[:5]]
    n_nan = int(torch.isnan(x).sum())
    raise BadInputError(
        f"{what} holds {bad.shape[0]} non-finite values ({n_nan} NaN, {bad.shape[0] - n_nan} Inf); first at "
        f"indices {first}. Remove or repair those rows before passing them (for activations: check for "
        "overflow in half precision and capture in float32)."
    )


def as_float_tensor(
    x: torch.Tensor | np.ndarray,
    what: str,
    *,
    ndim_min: int = 1,
    d: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Convert `x` to a floating torch tensor and check dtype, dims, last dim `d`, non-emptiness, finiteness.

    `dtype=None` keeps the tensor's floating dtype; otherwise the result is cast to `dtype`.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            raise BadInputError(
                f"{what} is a numpy array of dtype {x.dtype} ({x.dtype.kind!r} kind), not numbers; pass "
                "numeric activations, e.g. x.astype(np.float32)."
            )
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise BadInputError(
            f"{what} must be a torch tensor or numpy array, got {type(x).__name__}; convert it first, e.g. "
            "torch.tensor(x, dtype=torch.float32)."
        )
    if x.is_complex():
        raise BadInputError(
            f"{what} has complex dtype {x.dtype}; activations are real vectors. Pass x.real if the imaginary "
            "part is rounding noise, otherwise check where the complex values come from."
        )
    if not x.is_floating_point():
        raise BadInputError(
            f"{what} has dtype {x.dtype}; a floating dtype is required. Cast it first, e.g. `x.float()`."
        )
    if x.ndim < ndim_min:
        raise BadInputError(f"{what} has shape {tuple(x.shape)}; it needs at least {ndim_min} dimension(s).")
    if d is not None and x.shape[-1] != d:
        raise BadInputError(
            f"{what} has last dimension {x.shape[-1]} but {d} was expected (shape {tuple(x.shape)}). "
            "Check that the activations, the AIP and the dictionary come from the same layer and model."
        )
    if x.numel() == 0:
        raise BadInputError(f"{what} is empty (shape {tuple(x.shape)}); pass at least one vector.")
    if dtype is not None:
        x = x.to(dtype)
    check_finite(x, what)
    return x


def as_batches(
    activations: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    d: int | None = None,
    *,
    hint: str = "",
) -> Iterator[torch.Tensor]:
    """Checked (batch, d) float tensors from one (..., d) tensor or array (one batch), or from each batch of
    an iterable of them: a DataLoader, a generator, a list (a 1-tuple batch, as a DataLoader over a
    TensorDataset yields it, is unpacked). d: the width every batch must have; None takes the first batch's.
    Raises BadInputError for another type (its message ends with `hint`) or an iterable without batches.
    """
    if isinstance(activations, (torch.Tensor, np.ndarray)):
        x = as_float_tensor(activations, "activations", d=d)
        yield x.reshape(-1, x.shape[-1])
        return
    if not isinstance(activations, Iterable) or isinstance(activations, (str, bytes, dict)):
        raise BadInputError(
            "activations must be a (..., d) tensor or array, or an iterable of (batch, d) ones (a "
            f"DataLoader, a generator, a list of batches); got {type(activations).__name__}.{hint}"
        )
    empty = True
    for i, batch in enumerate(activations):
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            batch = batch[0]
        x = as_float_tensor(batch, f"activations batch {i}", d=d)
        d, empty = x.shape[-1], False
        yield x.reshape(-1, d)
    if empty:
        raise BadInputError("activations yielded no batches; pass an iterable that yields (batch, d) ones.")
