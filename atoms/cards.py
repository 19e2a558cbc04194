"""Atom cards: the tokens, with their context, that activate a latent most, to judge monosemanticity by eye.

A card is made the same way for the three kinds of latent the report compares: an atom (a TSAE code), a
feature (a ReLU SAE code) or a neuron (a coordinate of the activation itself). The codes are a dense
(n_tokens, n_latents) array whose rows are aligned with the `atoms.activations.Tokens` of a capture, so each
row can be shown as its token in context. "Activates most" means the largest values: for the non-negative
SAE codes these are the strongest firings, for a neuron its largest positive coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from atoms.activations import Tokens
from atoms.errors import BadInputError, as_float_tensor

__all__ = ["Card", "Example", "choose_latents", "make_cards"]


class Example(NamedTuple):
    """One top-activating token of a card."""

    row: int
    """Row of the capture (and of the codes) the token comes from."""
    value: float
    """The latent's value on this token."""
    token: str
    """The token, decoded."""
    before: str
    """Up to `before` tokens of the same chunk that precede it, decoded."""
    after: str
    """Up to `after` tokens of the same chunk that follow it, decoded."""
    source: str
    """Title of the text the token comes from ("" for a chunk's BOS)."""


class Card(NamedTuple):
    """The top-activating tokens of one latent."""

    kind: str
    """"atom", "feature" or "neuron"."""
    latent: int
    """Index of the latent (atom, feature or neuron)."""
    fires: float
    """Fraction of the tokens on which the latent's value is positive."""
    examples: list[Example]
    """Top-activating tokens, by decreasing value."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the card (examples as dicts)."""
        return {
            "kind": self.kind,
            "latent": self.latent,
            "fires": self.fires,
            "examples": [e._asdict() for e in self.examples],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Card:
        """Inverse of `to_json`."""
        return cls(
            data["kind"], int(data["latent"]), float(data["fires"]), [Example(**e) for e in data["examples"]]
        )


def _codes(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = as_float_tensor(codes, "codes", ndim_min=2)
    if x.ndim != 2:
        raise BadInputError(
            f"codes must be dense (n_tokens, n_latents), got shape {tuple(x.shape)}; pass one row per "
            "captured token."
        )
    return x


def choose_latents(
    codes: torch.Tensor | np.ndarray, count: int, *, seed: int = 0, min_fires: int = 1
) -> list[int]:
    """A seeded random sample of `count` latents (ascending) among those positive on >= `min_fires` rows.

    codes: (n_tokens, n_latents). Fewer than `count` come back when fewer latents fire that often; a random
    sample (rather than the most frequent latents) shows what a typical latent looks like.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise BadInputError(f"count must be an int >= 0, got {count!r}.")
    x = _codes(codes)
    fires = (x > 0).sum(dim=0)
    eligible = (fires >= min_fires).nonzero().flatten()
    order = torch.randperm(eligible.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(eligible[order[:count]].tolist())


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""


def make_cards(
    codes: torch.Tensor | np.ndarray,
    tokens: Tokens,
    tokenizer: Any,
    *,
    kind: str,
    latents: Sequence[int] | None = None,
    count: int = 6,
    examples: int = 8,
    before: int = 8,
    after: int = 2,
    sources: Sequence[str] | None = None,
    seed: int = 0,
) -> list[Card]:
    """Cards of `latents` (default: `choose_latents(codes, count, seed=seed)`), codes (n_tokens, n_latents).

    tokens: the `Tokens` of the capture the codes' rows come from (same length); tokenizer: the model's, to
    decode them; sources: titles of the capture's input texts (indexed by `tokens.text`). Each card lists
    the `examples` rows with the largest values of its latent (only rows where it is positive), each with
    `before` and `after` tokens of context from the same chunk.
    """
    x = _codes(codes)
    n = x.shape[0]
    if tokens.token_id.shape[0] != n:
        raise BadInputError(
            f"codes have {n} rows but tokens describe {tokens.token_id.shape[0]}; pass the Tokens of the "
            "capture the codes were computed from."
        )
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise BadInputError(f"examples must be an int >= 1, got {examples!r}.")
    chosen = choose_latents(x, count, seed=seed) if latents is None else [int(j) for j in latents]
    bad = [j for j in chosen if not 0 <= j < x.shape[1]]
    if bad:
        raise BadInputError(f"latents {bad[:5]} are out of range for codes with {x.shape[1]} latents.")
    cards = []
    for j in chosen:
        column = x[:, j]
        top = column.topk(min(examples, n))
        rows = [(int(r), float(v)) for r, v in zip(top.indices, top.values, strict=True) if v > 0]
        shown = []
        for row, value in rows:
            ids, at = tokens.context(row, before=before, after=after)
            owner = int(tokens.text[row])
            source = sources[owner] if sources is not None and 0 <= owner < len(sources) else ""
            shown.append(
                Example(
                    row=row,
                    value=value,
                    token=_decode(tokenizer, ids[at : at + 1]),
                    before=_decode(tokenizer, ids[:at]),
                    after=_decode(tokenizer, ids[at + 1 :]),
                    source=source,
                )
            )
        cards.append(Card(kind, j, float((column > 0).double().mean()), shown))
    return cards
