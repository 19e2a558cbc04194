"""Tests of the experiment's results definitions (atoms.experiment_definitions) and cache keys
(atoms.experiment_cache): a results key cannot exist without its definition, a defined key cannot go missing,
and every setting says which cached work it keys. No model runs here (test_experiment.py runs one)."""

from __future__ import annotations

import dataclasses

import pytest

from atoms import experiment_training as et
from atoms.convergence import PlateauRule
from atoms.experiment import DEFINITIONS, RESULTS, ExperimentConfig
from atoms.experiment_cache import FIELD_CACHES, Cache, CacheKeys, check_declared
from atoms.experiment_definitions import Keys, SchemaError, check, definitions, each
from atoms.experiment_layer import LAYER
from atoms.experiment_metrics import CERTIFIED, DICTIONARY
from atoms.train import TrainConfig

POINT = Keys({"x": "The x coordinate.", "y": "The y coordinate.", "label": "A name."}, optional=["label"])


def test_build_refuses_an_undefined_key_and_a_missing_one():
    assert POINT.build(x=1, y=2) == {"x": 1, "y": 2}
    assert list(POINT.build(y=2, x=1, label="a")) == ["y", "x", "label"]  # the builder's order is kept
    with pytest.raises(SchemaError, match=r"\['z'\] have no definition"):
        POINT.build(x=1, y=2, z=3)
    with pytest.raises(SchemaError, match=r"\['y'\] are missing"):
        POINT.build(x=1)
    with pytest.raises(SchemaError, match="optional"):
        Keys({"x": "The x coordinate."}, optional=["w"])


def test_check_walks_nested_records_lists_and_maps():
    tree = {"points": [{"x": 1, "y": 2}], "by_name": {"a": {"x": 0, "y": 0}}, "note": {"anything": [1]}}
    schema = Keys({"points": each(POINT), "by_name": each(POINT), "note": "Free-form data."})
    check(tree, schema)
    check({**tree, "points": None}, schema)  # a record that was not computed
    with pytest.raises(SchemaError, match=r"points\.0: keys \['z'\] have no definition"):
        check({**tree, "points": [{"x": 1, "y": 2, "z": 3}]}, schema)
    with pytest.raises(SchemaError, match=r"by_name\.a: .*\['x'\] are missing"):
        check({**tree, "by_name": {"a": {"y": 0}}}, schema)
    with pytest.raises(SchemaError, match="extra"):
        check({**tree, "extra": 1}, schema)
    with pytest.raises(SchemaError, match="got int"):
        check({**tree, "points": 5}, schema)


def test_definitions_flatten_the_declarations():
    schema = Keys({"a": "A.", "b": each(POINT, doc="Points."), "c": each(each("A grid value."))})
    assert definitions(schema) == {
        "a": "A.",
        "b": "Points.",
        "b.*.x": "The x coordinate.",
        "b.*.y": "The y coordinate.",
        "b.*.label": "A name.",
        "c.*.*": "A grid value.",
    }


def test_the_results_definitions_come_from_the_record_declarations():
    assert DEFINITIONS == definitions(RESULTS)
    for key, description in CERTIFIED.keys.items():
        if isinstance(description, str):
            assert DEFINITIONS[f"layers.*.dictionaries.*.certified.{key}"] == description
    # Every setting is documented by its own docstring, and every definition says something.
    assert {k.removeprefix("meta.config.") for k in DEFINITIONS if k.startswith("meta.config.")} == {
        f.name for f in dataclasses.fields(ExperimentConfig)
    }
    assert all(len(text) > 10 for text in DEFINITIONS.values())


def test_a_layer_with_an_undefined_or_missing_key_is_caught():
    """A layer record whose atoms dictionary gained an undocumented number, or lost a documented one."""
    keys = [k for k in DICTIONARY.keys if k not in DICTIONARY.optional]
    record = {k: None for k in keys}
    layer = {k: None for k in LAYER.keys} | {"dictionaries": {"atoms": record}}
    check(layer, LAYER)
    with pytest.raises(SchemaError, match=r"dictionaries\.atoms: keys \['r2_new'\] have no definition"):
        check(layer | {"dictionaries": {"atoms": record | {"r2_new": 0.5}}}, LAYER)
    with pytest.raises(SchemaError, match=r"\['l0'\] are missing"):
        check(layer | {"dictionaries": {"atoms": {k: v for k, v in record.items() if k != "l0"}}}, LAYER)


# ---------------------------------------------------------------------------------------------- cache keys


def test_every_setting_declares_the_caches_it_enters():
    check_declared()
    assert set(FIELD_CACHES) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    grown = dataclasses.make_dataclass("Grown", [("new_setting", int, 0)], bases=(ExperimentConfig,))
    with pytest.raises(RuntimeError, match=r"\['new_setting'\] are not declared"):
        check_declared(grown)


def test_keys_change_with_the_settings_they_declare_and_the_code_version():
    base = CacheKeys(ExperimentConfig(), "1.0+abc")
    where = CacheKeys(ExperimentConfig(output="elsewhere", threads=1, device="cuda"), "1.0+abc")
    assert (where.capture, where.layer, where.phase) == (base.capture, base.layer, base.phase)
    steps = CacheKeys(ExperimentConfig(steps=10), "1.0+abc")
    assert steps.capture == base.capture and steps.layer != base.layer and steps.phase == base.phase
    tokens = CacheKeys(ExperimentConfig(fit_tokens=1000), "1.0+abc")
    assert tokens.capture != base.capture and tokens.layer != base.layer
    phase = CacheKeys(ExperimentConfig(phase_grid=3), "1.0+abc")
    assert (phase.capture, phase.layer) == (base.capture, base.layer) and phase.phase != base.phase
    upgraded = CacheKeys(ExperimentConfig(), "1.1+def")
    assert upgraded.capture != base.capture and upgraded.layer != base.layer and upgraded.phase != base.phase
    assert Cache.TRAINING in FIELD_CACHES["validation_fraction"]
    assert Cache.SWEEP_CELL not in FIELD_CACHES["validation_fraction"]  # a cell validates on its own data


def test_training_keys_hold_the_code_version_and_tell_the_sweep_apart():
    tc, sae, rule = TrainConfig(), {"d": 8, "n_atoms": 32}, PlateauRule()
    base = CacheKeys(ExperimentConfig(), "1.0+abc")
    assert base.training(tc, sae, rule) == CacheKeys(ExperimentConfig(output="x"), "1.0+abc").training(
        tc, sae, rule
    )
    assert base.training(tc, sae, rule) != CacheKeys(ExperimentConfig(), "1.1").training(tc, sae, rule)
    assert base.training(tc, sae, rule) != base.training(tc, sae, rule, sweep=True)
    assert base.training(tc, sae, rule) != base.training(dataclasses.replace(tc, lr=1e-3), sae, rule)
    ridge = CacheKeys(ExperimentConfig(ridge=0.1), "1.0+abc")
    assert ridge.training(tc, sae, rule, sweep=True) != base.training(tc, sae, rule, sweep=True)


def test_budget_shares_follow_the_weights(monkeypatch):
    """A frontier point gets FRONTIER_SHARE of a main seed's time, a ReLU SAE KIND_WEIGHT times a TSAE's;
    unused time passes to later trainings."""
    clock = [0.0]
    monkeypatch.setattr(et.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(et, "METRICS_SECONDS", 10.0)
    config = ExperimentConfig(l0_targets=(8.0, 32.0), main_l0=32.0, seeds=2)
    plan = et.runs(config)
    main = [("atoms", 32.0, 0), ("atoms", 32.0, 1), ("features", 32.0, 0), ("features", 32.0, 1)]
    assert plan == [*main, ("atoms", 8.0, 0), ("features", 8.0, 0)]
    weights = [et.budget_weight(config, kind, t) for kind, t, _ in plan]
    assert weights == [1.0, 1.0, 1.6, 1.6, 0.25, 0.4]
    budget = et.Budget(minutes=1.0)  # 60 s, 6 trainings: 60 s of metrics set aside leaves nothing
    budget.plan(weights)
    assert budget.weight == pytest.approx(5.85) and budget.share() == 0.0
    budget = et.Budget(minutes=3.0)  # 180 s - 60 s of metrics = 120 s over weight 5.85
    budget.plan(weights)
    assert budget.share(1.0) == pytest.approx(120 / 5.85)
    assert budget.share(0.25) == pytest.approx(120 / 5.85 / 4)
    assert budget.deadline(1.0) == pytest.approx(120 / 5.85)
    # The first training plateaued after 4 s: the rest share what is left, the metrics of all six (they run
    # after the layer's last training) still set aside.
    clock[0] = 4.0
    assert budget.deadline(1.0) == pytest.approx(4.0 + (180 - 4 - 60) / 4.85)
    budget.measured(6)
    assert budget.share(0.25) == pytest.approx((180 - 4) * 0.25 / 3.85)  # weight 3.85 left, none to measure
    assert et.Budget(None).deadline() is None
