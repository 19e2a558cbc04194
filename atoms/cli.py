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
