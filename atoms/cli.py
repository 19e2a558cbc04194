"""The `atoms` command: the paper's experiment and the theorem checks from the shell."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="atoms",
    help=(
        "Test the claims of 'Towards Atoms of Large Language Models' (arXiv 2509.20784) on real and "
        "synthetic data: the atomic inner product, atoms as a sparse dictionary, uniqueness and exact l1 "
        "recovery, and identifiability by threshold SAEs."
    ),
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Commands are listed below; each has its own --help."""


_KINDS = ("gaussian", "simplex", "steiner", "dirac-hadamard")


@app.command()
def geometry(
    kind: str = typer.Option("gaussian", help=f"Synthetic dictionary: one of {', '.join(_KINDS)}."),
    n_atoms: int = typer.Option(256, help="Atoms of a Gaussian dictionary (other kinds fix their size)."),
    d: int = typer.Option(64, help="Dimension of a Gaussian or simplex dictionary; n for Dirac-Hadamard."),
    k: int = typer.Option(4, help="Non-zeros per planted code (the activations the AIP is fitted on)."),
    samples: int = typer.Option(20_000, help="Planted activations m = code @ W_dec the AIP is fitted on."),
    seed: int = typer.Option(0, help="Seed of the dictionary and the codes."),
) -> None:
    """AIP and coherence of a synthetic dictionary: Euclidean against AIP-whitened atoms.

    Activations are planted K-sparse non-negative codes times the atoms; the AIP is fitted on them (the
    uncentered second moment, SPEC section 1) and the atoms' coherence, babel and Welch bound are printed
    both ways.
    """
    from rich.console import Console
    from rich.table import Table

    from atoms import synth
    from atoms.aip import AIP
    from atoms.dictionary import Dictionary, welch_bound

    makers = {
        "gaussian": lambda: synth.gaussian_dictionary(n_atoms, d, seed),
        "simplex": lambda: synth.simplex_etf(d),
        "steiner": lambda: synth.steiner_etf(16),
        "dirac-hadamard": lambda: synth.dirac_hadamard(d),
    }
    if kind not in makers:
        raise typer.BadParameter(
            f"unknown kind {kind!r}; choose one of {', '.join(_KINDS)}.", param_hint="--kind"
        )
    W = makers[kind]()
    codes = synth.planted_codes(samples, W.shape[0], min(k, W.shape[0]), 0.5, 1.5, True, seed)
    aip = AIP.fit(codes.values @ W)
    table = Table(
        title=f"{kind} dictionary, {W.shape[0]} atoms in R^{W.shape[1]}, AIP from {samples} samples"
    )
    for column in ("geometry", "coherence", "babel(K)", "Welch bound"):
        table.add_column(column, justify="right" if column != "geometry" else "left")
    bound = welch_bound(*W.shape)
    for name, dic in (("Euclidean", Dictionary(W)), ("AIP", Dictionary(W, aip))):
        table.add_row(
            name, f"{dic.coherence():.4f}", f"{dic.babel(min(k, W.shape[0] - 1)):.4f}", f"{bound:.4f}"
        )
    console = Console()
    console.print(table)
    console.print(f"AIP: condition number {aip.condition_number:.3g}, ridge {aip.ridge:g}.")
