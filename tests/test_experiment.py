"""Tests of atoms.experiment (the `atoms run` pipeline) and atoms.cards, end to end on a tiny model.

The model is a random 4-block Llama (d = 32) with a byte-level tokenizer, saved to a folder and loaded by
`atoms.models.load_model` like any local model; the text is a few generated files. A full run with two
layers and the sweep takes a few seconds. Nothing reaches the network.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama

import atoms.fit
from atoms.activations import Tokens
from atoms.aip import AIP
from atoms.cards import Card, choose_latents, make_cards
from atoms.errors import BadInputError
from atoms.experiment import (
    DEFINITIONS,
    ExperimentConfig,
    choose_threads,
    command_config,
    field_docs,
    representation_shift,
    run_command,
    run_experiment,
)

WORDS = (
    "the of atoms sparse model layer token dictionary river mountain music history science city king war "
    "water village painter bridge"
).split()


def build_tiny(root: Path) -> tuple[Path, list[str]]:
    """A random 4-block Llama (d = 32) saved under root/model, and six generated text files."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(
        tokenizer,
        max_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    files = []
    for k in range(6):
        path = root / f"doc{k}.txt"
        path.write_text(" ".join(rng.choice(WORDS) for _ in range(900)) + "\n")
        files.append(str(path))
    return root / "model", files


def tiny_config(model: Path, files: list[str], output: Path, **overrides) -> ExperimentConfig:
    """Two layers, 2048 fit and 512 held-out tokens, SAEs of 4d = 128 atoms, the sweep and a 3 x 3 phase
    plane on; basis pursuit on every q* sample."""
    settings = {
        "model": str(model),
        "layers": (1, 3),
        "fit_tokens": 2048,
        "heldout_tokens": 512,
        "text_files": tuple(files),
        "output": str(output),
        "seq_len": 64,
        "steps": 30,
        "batch_size": 64,
        "l0_targets": (4.0, 8.0),
        "main_l0": 8.0,
        "seeds": 2,
        "eval_every": 5,
        "min_steps": 10,
        "plateau_window": 3,
        "lr_warmup_steps": 5,
        "sparsity_warmup_steps": 10,
        "angle_vectors": 200,
        "neuron_samples": 64,
        "erc_samples": 2,
        "bp_samples": None,
        "cards": 2,
        "card_examples": 3,
        "sweep": True,
        "sweep_multiples": (1, 2),
        "sweep_tokens": (256, 1024),
        "sweep_steps": 20,
        "sweep_batch_size": 64,
        "phase_atoms": 24,
        "phase_grid": 3,
        "phase_trials": 4,
        "threads": 1,
    }
    settings.update(overrides)
    return ExperimentConfig(**settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """One uninterrupted tiny run: (config, results)."""
    config = tiny_config(*tiny, tmp_path_factory.mktemp("run") / "out")
    return config, run_experiment(config, progress=False)


# ---------------------------------------------------------------------------------------------- results


def numeric_leaves(obj, path=""):
    """(dotted path, value) of every number in a JSON tree; a list of numbers is one leaf."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numeric_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        if obj and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            yield path, obj
        else:
            for i, v in enumerate(obj):
                yield from numeric_leaves(v, f"{path}.{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def defined(path: str) -> bool:
    """Whether a definition pattern ("*" = one path segment) covers `path`."""
    parts = path.split(".")
    for pattern in DEFINITIONS:
        segments = pattern.split(".")
        if len(segments) == len(parts) and all(
            fnmatch.fnmatchcase(p, s) for p, s in zip(parts, segments, strict=True)
        ):
            return True
    return False


def test_every_number_has_a_definition_and_results_are_strict_json(run):
    _, results = run
    missing = [
        path
        for path, value in numeric_leaves(results)
        if not (defined(path) or (isinstance(value, list) and defined(path + ".0")))
    ]
    assert not missing, f"numbers without a definition: {missing[:20]}"
    text = json.dumps(results, allow_nan=False)  # NaN or inf would raise here
    assert json.loads(text) == results
    assert set(field_docs()) == {f for f in ExperimentConfig.__dataclass_fields__}
    assert all(len(doc) > 20 for doc in field_docs().values())


def resolves(tree, segments) -> bool:
    """Whether the dotted-path pattern `segments` ("*" = any key or index) names something in `tree`."""
    if not segments:
        return True
    if isinstance(tree, list):
        tree = {str(i): v for i, v in enumerate(tree)}
    if not isinstance(tree, dict):
        return False
    head, rest = segments[0], segments[1:]
    children = tree.values() if head == "*" else [tree[head]] if head in tree else []
    return any(resolves(child, rest) for child in children)


def test_every_definition_names_keys_of_the_run(run):
    """The other way round: no definition outlives its key (the tiny run computes every part)."""
    _, results = run
    stale = [pattern for pattern in DEFINITIONS if not resolves(results, pattern.split("."))]
    assert not stale, f"definitions of keys the results lack: {stale}"


def test_results_hold_meta_model_text_and_every_layer(run):
    config, results = run
    meta = results["meta"]
    assert meta["seed"] == 0 and meta["config"]["layers"] == [1, 3]
    assert meta["command"].startswith("atoms run ") and "--layers 1,3" in meta["command"]
    assert "--sweep --sweep-steps 20" in meta["command"]
    assert "torch" in meta["versions"] and "transformers" in meta["versions"]
    assert meta["wall_seconds"] > 0 and meta["cpu_seconds"] > 0 and meta["threads"] == 1
    assert len(meta["load_average_start"]) == 3
    assert results["model"]["d"] == 32 and results["model"]["n_layers"] == 4
    assert results["text"]["fit_tokens"] == 2048 and results["text"]["heldout_tokens"] == 512
    assert results["text"]["fit_articles"] + results["text"]["heldout_articles"] == 6
    assert list(results["layers"]) == ["1", "3"]
    for lay in results["layers"].values():
        assert set(lay["dictionaries"]) == {"neurons", "features", "atoms"}
        for kind, m in lay["dictionaries"].items():
            assert m["r2_euclidean"] <= 1 and m["r2_aip"] <= 1
            for key in ("q_star_quantile", "q_star_per_sample", "q_star_per_sample_euclidean"):
                assert 0 <= m[key] <= 1, (kind, key)
            assert m["n_atoms"] == (32 if kind == "neurons" else 128)
        neurons = lay["dictionaries"]["neurons"]
        # The identity basis reconstructs exactly and, Euclidean, is orthonormal: every sample is unique.
        assert neurons["r2_euclidean"] == 1.0 and neurons["r2_aip"] == 1.0
        assert neurons["l0"] == 32.0 and neurons["q_star_quantile_euclidean"] == 1.0
        assert neurons["q_star_samples"] == 64
        assert lay["dictionaries"]["atoms"]["q_star_samples"] == 512
        assert 0 <= lay["dictionaries"]["atoms"]["window"]["samples_certified"] <= 1
        assert {len(lay["cards"][k]) for k in lay["cards"]} <= {2}
    assert len(results["sweep"]["cells"]) == 4
    # The SAEs are saved in SAELens format under the output folder.
    assert (Path(config.output) / "saes" / "layer_001_atoms" / "cfg.json").is_file()


def test_basis_pursuit_certifies_every_q_star_sample_and_the_phase_plane_is_drawn(run):
    _, results = run
    for lay in results["layers"].values():
        for kind, m in lay["dictionaries"].items():
            cert = m["certified"]
            assert cert["bp_solver"] == "batched"
            assert cert["bp_n"] == m["q_star_samples"], kind
            assert cert["bp_recovered"] + cert["bp_flagged"] + cert["bp_failed"] == cert["bp_n"]
        # The neurons are a basis: every code is the unique one, and basis pursuit proves it.
        assert lay["dictionaries"]["neurons"]["certified"]["bp_fraction"] == 1.0
    phase = results["phase_transition"]
    assert phase["n"] == 24 and phase["deltas"] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    for sign in ("signed", "nonneg"):
        rates = np.array(phase[sign]["rates"])
        assert rates.shape == (3, 3) and ((rates >= 0) & (rates <= 1)).all()
        assert phase[sign]["measurements"] == [4, 12, 20]
        # rho = 1/6 at delta = 5/6 lies far below the curve: recovery there is all but certain.
        assert rates[2, 0] >= 0.75, phase[sign]


def test_summary_is_the_mean_over_layers(run):
    _, results = run
    for kind in ("neurons", "features", "atoms"):
        for key in ("r2_euclidean", "r2_aip", "l0", "q_star_quantile", "q_star_per_sample"):
            values = [lay["dictionaries"][kind][key] for lay in results["layers"].values()]
            assert results["summary"][kind][key] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)


def test_r2_matches_an_independent_reference(run, tiny):
    """Held-out R^2 of the saved atoms SAE, recomputed with numpy from its reloaded weights."""
    from atoms.activations import load_capture
    from atoms.tsae import load_saelens

    config, results = run
    capture_root = next((Path(config.output) / "work" / "capture").iterdir())
    held = load_capture(capture_root / "heldout").activations(3).double().numpy()
    sae = load_saelens(Path(config.output) / "saes" / "layer_003_atoms")
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(held).float()).x_hat.double().numpy()
    reference = 1 - ((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert results["layers"]["3"]["dictionaries"]["atoms"]["r2_euclidean"] == pytest.approx(
        reference, abs=1e-4
    )


# ---------------------------------------------------------------------------------------------- resume


def test_a_second_run_loads_everything_and_gives_the_same_numbers(run):
    config, results = run
    again = run_experiment(config, progress=False)
    assert results["meta"]["loaded_layers"] == [] and again["meta"]["loaded_layers"] == [1, 3]
    assert again["layers"] == results["layers"]
    assert again["sweep"]["cells"][0]["r2_heldout_aip"] == results["sweep"]["cells"][0]["r2_heldout_aip"]
    assert again["meta"]["wall_seconds"] < results["meta"]["wall_seconds"]


def test_other_settings_in_the_same_folder_start_fresh_work(run, tiny, tmp_path):
    """A run with another token budget in a used folder captures and trains anew beside the old work."""
    config = tiny_config(*tiny, tmp_path / "out", layers=(1,), sweep=False)
    first = run_experiment(config, progress=False)
    other = run_experiment(
        tiny_config(*tiny, tmp_path / "out", layers=(1,), sweep=False, fit_tokens=1536), progress=False
    )
    assert other["meta"]["loaded_layers"] == [] and other["text"]["fit_tokens"] == 1536
    assert len(list((tmp_path / "out" / "work" / "fitted").iterdir())) == 2
    assert other["layers"]["1"]["aip"]["n_samples"] == 1536 != first["layers"]["1"]["aip"]["n_samples"]


def test_an_interrupted_run_resumes_and_matches_an_uninterrupted_one(run, tiny, tmp_path, monkeypatch):
    """Stop the first training at step 27 (after the step-25 checkpoint), rerun: same final numbers."""
    reference_config, reference = run
    config = tiny_config(*tiny, tmp_path / "out", sweep=False)
    real_train = atoms.fit.train
    state = {"armed": True}

    def interrupted(model, x, tc, checkpoint_dir=None, progress=True, callback=None, stop=None):
        def tick(stats):
            callback(stats)
            if state["armed"] and stats.step == 27:
                state["armed"] = False
                raise KeyboardInterrupt

        return real_train(
            model, x, tc, checkpoint_dir=checkpoint_dir, progress=progress, callback=tick, stop=stop
        )

    monkeypatch.setattr(atoms.fit, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=False)
    assert not state["armed"]
    checkpoints = list((tmp_path / "out" / "work").rglob("step_*.pt"))
    assert checkpoints, "the interrupted training left no checkpoint to resume from"
    resumed = run_experiment(config, progress=False)
    for key in ("1", "3"):
        for kind in ("features", "atoms"):
            ours = resumed["layers"][key]["dictionaries"][kind]
            theirs = reference["layers"][key]["dictionaries"][kind]
            for metric in ("r2_euclidean", "r2_aip", "l0", "q_star_quantile", "coherence_aip"):
                assert ours[metric] == theirs[metric], (key, kind, metric)
    assert reference_config.output != config.output


# ---------------------------------------------------------------------------------------------- the command


def test_command_flags_build_the_config():
    config = command_config(layers="2, 4", tokens=1024, text=["a.txt"], output=Path("x"), threads=1)
    assert config.preset == "default" and config.layers == (2, 4) and config.steps == 6000
    assert config.fit_tokens == 1024 and config.heldout_tokens == 512
    assert config.text_files == ("a.txt",) and config.output == "x" and config.threads == 1
    quick = command_config(quick=True, n_atoms=64, seed=3, sweep=True)
    assert quick.preset == "quick" and quick.layers == (3,) and quick.steps == 800
    assert (quick.n_atoms, quick.seed, quick.sweep) == (64, 3, True)
    assert command_config(tokens=40_000).heldout_tokens == 10_000
    assert command_config(sweep=True, sweep_steps=3000).sweep_steps == 3000
    with pytest.raises(BadInputError, match="without the sweep; add --sweep"):
        command_config(sweep_steps=3000)


def test_run_command_runs_and_writes_the_report(tiny, tmp_path):
    model, files = tiny
    results = run_command(
        model=str(model), tokens=1024, text=files, output=tmp_path / "q", quick=True, progress=False
    )
    assert results["meta"]["config"]["preset"] == "quick" and results["meta"]["config"]["steps"] == 800
    assert results["meta"]["command"].startswith("atoms run --quick")
    assert "--tokens 1024" in results["meta"]["command"]
    for name in ("report.md", "report.html", "results.json"):
        assert (tmp_path / "q" / name).is_file()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"layers": (1, 1)}, "repeats"),
        ({"layers": ()}, "non-empty"),
        ({"n_atoms": 0}, "n_atoms"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"bp_solver": "magic"}, "bp_solver"),
        ({"lr": -1.0}, "lr must be"),
        ({"sweep_layer": 2}, "sweep_layer 2 is not among layers"),
        ({"sweep_multiples": (0,)}, "multiples of d"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(overrides, match):
    with pytest.raises(BadInputError, match=match):
        ExperimentConfig(**overrides)


def test_bad_flags_and_missing_layers(tiny, tmp_path):
    with pytest.raises(BadInputError, match="comma-separated"):
        run_command(layers="3;9", output=tmp_path / "x", progress=False)
    model, files = tiny
    config = tiny_config(model, files, tmp_path / "y", layers=(7,), sweep=False)
    with pytest.raises(BadInputError, match="4 decoder blocks"):
        run_experiment(config, progress=False)
    with pytest.raises(BadInputError, match="ExperimentConfig"):
        run_experiment({"layers": [1]}, progress=False)


def test_one_text_file_is_split_into_paragraphs(tiny, tmp_path):
    model, _ = tiny
    rng = random.Random(1)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(10))
    (tmp_path / "one.txt").write_text(text)
    config = tiny_config(
        model, [str(tmp_path / "one.txt")], tmp_path / "o", layers=(0,), fit_tokens=1024, sweep=False
    )
    results = run_experiment(config, progress=False)
    assert results["text"]["fit_articles"] == 8 and results["text"]["heldout_articles"] == 2
    assert "paragraphs" in results["text"]["source"]
    (tmp_path / "short.txt").write_text("a single paragraph")
    bad = tiny_config(model, [str(tmp_path / "short.txt")], tmp_path / "s", layers=(0,))
    with pytest.raises(BadInputError, match="single paragraph"):
        run_experiment(bad, progress=False)


def test_choose_threads():
    assert choose_threads(3) == 3
    assert 1 <= choose_threads(None) <= (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------- pieces


def test_representation_shift_against_numpy():
    rng = np.random.default_rng(0)
    d = 16
    mix = np.eye(d) + 0.8 * rng.standard_normal((d, d))
    fit = rng.standard_normal((3000, d)) @ mix + 6.0
    held = rng.standard_normal((400, d)) @ mix + 6.0
    aip = AIP.fit(fit)
    out = representation_shift(torch.tensor(fit), torch.tensor(held), aip, n_vectors=300, seed=0)

    def angles(x):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        i, j = np.triu_indices(len(x), 1)
        return np.degrees(np.arccos(np.clip((u[i] * u[j]).sum(1), -1, 1)))

    # Held-out: 300 of the 400 rows (seeded), all pairs; Euclidean and whitened by an independent Cholesky.
    rows = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:300].sort().values.numpy()
    chol = np.linalg.cholesky((fit.T @ fit) / len(fit))
    white = np.linalg.solve(chol, held[rows].T).T
    for geometry, x in (("euclidean", held[rows]), ("aip", white)):
        got = out["heldout"][geometry]
        ref = angles(x)
        assert got["mean"] == pytest.approx(ref.mean(), abs=1e-9)
        assert got["median"] == pytest.approx(np.median(ref), abs=1e-9)
        assert got["n_pairs"] == 300 * 299 // 2 and sum(got["histogram"]) == got["n_pairs"]
        assert got["histogram"] == np.histogram(ref, bins=90, range=(0, 180))[0].tolist()
    # The Gaussian null with C's second moment whitens to N(0, I): AIP angles centre at 90 degrees and the
    # mean |cos| of independent isotropic vectors in R^d is Gamma(d/2) / (sqrt(pi) Gamma((d + 1)/2)).
    null = out["gaussian_null"]["aip"]
    assert null["mean"] == pytest.approx(90.0, abs=0.5)
    expected = math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    assert null["mean_abs_cos"] == pytest.approx(expected, rel=0.05)
    # With a large mean, Euclidean angles of real activations centre far below 90 degrees.
    assert out["in_sample"]["euclidean"]["mean"] < 60


def tokens_of(ids: list[list[int]]) -> Tokens:
    """Tokens of chunks `ids` (each chunk's position 0 dropped, as capture does), all from text 0."""
    rows = [(tok, s, p) for s, chunk in enumerate(ids) for p, tok in enumerate(chunk) if p > 0]
    t = torch.tensor(rows)
    return Tokens(t[:, 0], t[:, 1], t[:, 2], torch.zeros(len(rows), dtype=torch.int64))


def test_cards_list_the_top_tokens_in_context():
    tokenizer = byte_tokenizer()
    chunks = [
        tokenizer("<s>hello world", add_special_tokens=False)["input_ids"],
        tokenizer("<s>abc", add_special_tokens=False)["input_ids"],
    ]
    tokens = tokens_of(chunks)
    n = tokens.token_id.numel()  # 11 + 3 captured tokens ("hello world" and "abc")
    codes = torch.zeros(n, 3)
    codes[4, 0], codes[12, 0], codes[0, 0] = 5.0, 3.0, 1.0  # "o" of hello, "b" of abc, "h"
    codes[:, 2] = -1.0  # never positive
    cards = make_cards(
        codes, tokens, tokenizer, kind="atom", latents=[0, 2], examples=2, before=3, after=1, sources=["doc"]
    )
    first = cards[0]
    assert first.kind == "atom" and first.latent == 0 and first.fires == pytest.approx(3 / n)
    assert [e.row for e in first.examples] == [4, 12]
    assert (first.examples[0].before, first.examples[0].token, first.examples[0].after) == ("ell", "o", " ")
    assert (first.examples[1].before, first.examples[1].token, first.examples[1].after) == ("a", "b", "c")
    assert first.examples[0].source == "doc" and first.examples[0].value == 5.0
    assert cards[1].examples == [] and cards[1].fires == 0.0
    assert Card.from_json(json.loads(json.dumps(first.to_json()))) == first


def test_choose_latents_and_card_errors():
    codes = torch.zeros(10, 6)
    codes[:3, [1, 4]] = 1.0
    codes[0, 5] = 1.0
    assert choose_latents(codes, 5, min_fires=2) == [1, 4]
    assert choose_latents(codes, 1, seed=3) == choose_latents(codes, 1, seed=3)
    assert set(choose_latents(codes, 2, seed=0)) <= {1, 4, 5}
    tokens = tokens_of([list(range(11))])
    tokenizer = byte_tokenizer()
    with pytest.raises(BadInputError, match="rows but tokens describe"):
        make_cards(codes[:4], tokens, tokenizer, kind="atom")
    with pytest.raises(BadInputError, match="out of range"):
        make_cards(codes, tokens, tokenizer, kind="atom", latents=[6])
    with pytest.raises(BadInputError, match="n_tokens, n_latents"):
        make_cards(codes[None], tokens, tokenizer, kind="atom")
    with pytest.raises(BadInputError, match="count"):
        choose_latents(codes, -1)


def test_readme_tables_print_from_results_json(run, tmp_path):
    """docs/readme_tables.py turns a run's results.json into README's main-job tables: the verdict table
    first (one row per claim, the report's cells), then one row per dictionary (and per layer), with the
    numbers of the run; the neurons' certified cells say they are a basis; last, one row per sweep cell.
    Without verdicts (a results.json from before them) or a sweep it prints the others."""
    _, results = run
    script = Path(__file__).resolve().parents[1] / "docs" / "readme_tables.py"

    def tables(results):
        path = tmp_path / "results.json"
        path.write_text(json.dumps(results))
        out = subprocess.run(
            [sys.executable, "-P", str(script), str(path)], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().split("\n\n")

    verdicts, headline, bp, grid = tables(results)
    assert len(verdicts.splitlines()) == 2 + len(results["verdicts"])
    first = results["verdicts"][0]
    assert first["description"].replace("|", "\\|") in verdicts.splitlines()[2]
    assert first["verdict"].upper() in verdicts.splitlines()[2]
    assert len(headline.splitlines()) == 2 + 3
    assert len(bp.splitlines()) == 2 + 3 * len(results["layers"])
    atoms_r2 = f"{100 * results['summary']['atoms']['r2_euclidean']:.1f}%"
    assert atoms_r2 in headline.splitlines()[2]
    assert [line for line in bp.splitlines() if "| neurons |" in line and "basis (trivially unique)" in line]
    assert len(grid.splitlines()) == 2 + len(results["sweep"]["cells"]) and "| converged |" in grid
    assert len(tables({k: v for k, v in results.items() if k != "verdicts"})) == 3
    assert len(tables({k: v for k, v in results.items() if k not in ("verdicts", "sweep")})) == 2
