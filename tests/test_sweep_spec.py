"""Sweep YAML validation: the shipped sweeps load, and every mistake is one line naming the key at fault."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import REPO

from app.errors import UserError
from app.sweep import spec as sweep_spec
from app.sweep.spec import SweepSpecError

CMD = ["${env}", "${interpreter}", "-m", "app", "train", "${args}"]
BASE = {
    "method": "grid",
    "metric": {"name": "val_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"values": [0.001, 0.01]}, "batch_size": {"values": [64, 128]}},
    "command": CMD,
}


def doc(**changes):
    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def random_with(param):
    return doc(method="random", parameters={"learning_rate": param})


def test_shipped_sweeps_load():
    specs = {p.name: sweep_spec.load(p) for p in sorted((REPO / "sweeps").glob("*.yaml"))}
    assert set(specs) == {"grid.yaml", "random.yaml", "bayes-hyperband.yaml"}
    grid = specs["grid.yaml"]
    assert grid.method == "grid" and (grid.metric, grid.goal) == ("val_accuracy", "maximize")
    points = grid.grid()
    assert len(points) == 6 and len({tuple(sorted(p.items())) for p in points}) == 6
    assert points[:2] == [{"learning_rate": 0.001, "batch_size": 64}, {"learning_rate": 0.001, "batch_size": 128}]
    assert specs["random.yaml"].run_cap == 20
    bayes = specs["bayes-hyperband.yaml"]
    assert bayes.early_terminate["type"] == "hyperband" and bayes.metric in sweep_spec.PER_EPOCH
    for spec in specs.values():
        assert spec.raw["command"] == CMD  # runs the package the image holds, with the sweep's values


def test_a_valid_doc_parses_with_inferred_distributions():
    spec = sweep_spec.parse(doc(method="random", parameters={
        "learning_rate": {"min": 0.001, "max": 0.1}, "epochs": {"min": 1, "max": 3}, "seed": {"value": 3},
        "batch_size": {"values": [32, 64]}}))
    kinds = {p.name: p.distribution for p in spec.params}
    assert kinds == {"learning_rate": "uniform", "epochs": "int_uniform", "seed": "constant", "batch_size": "categorical"}
    assert issubclass(SweepSpecError, UserError)  # the CLI prints it as one line, exit 2


ERRORS = [
    # the document and its top-level keys
    ([1, 2], "a sweep config is a YAML mapping"),
    (doc(parameter={"x": 1}), "unknown key 'parameter'"),
    (doc(method="hyperopt"), "method='hyperopt' must be one of: grid, random, bayes"),
    (doc(method=None), "method=None must be one of"),
    (doc(metric="val_accuracy"), "metric must be {name: val_accuracy"),
    (doc(metric={"goal": "maximize"}), "metric must be {name: val_accuracy"),
    (doc(metric={"name": "accuracy"}), "metric.name='accuracy' is never logged by training"),
    (doc(metric={"name": "val_loss", "goal": "lower"}), "metric.goal='lower' must be minimize or maximize"),
    (doc(method="bayes", metric=None, parameters={"learning_rate": {"min": 0.001, "max": 0.1}}), "method bayes needs a metric"),
    (doc(parameters=None), "parameters must map setting names"),
    (doc(parameters={}), "parameters must map setting names"),
    (doc(parameters=[1]), "parameters must map setting names"),
    (doc(parameters={"learning_rate": {"min": 0.001, "max": 0.1}}), "grid search needs value or values for every parameter; parameters.learning_rate is uniform"),
    (doc(run_cap=0), "run_cap=0 must be a positive integer"),
    (doc(run_cap="10"), "run_cap='10' must be a positive integer"),
    (doc(command="python -m app train"), "command must be a list of strings"),
    (doc(command=["python", 3]), "command must be a list of strings"),
    (doc(command=["${env}", "${interpreter}", "-m", "app", "train"]), "command never passes the sweep's values"),
    # one parameter
    (doc(parameters={"lr": {"values": [0.1]}}), "parameters.lr is not a training setting"),
    (doc(parameters={"learning_rate": [0.1, 0.2]}), "parameters.learning_rate must be a mapping"),
    (doc(parameters={"kernels": {"parameters": {"a": {"value": 1}}}}), "parameters.kernels: nested parameters are not used"),
    (doc(parameters={"learning_rate": {"values": [0.1], "default": 0.1}}), "parameters.learning_rate.default is not a W&B parameter key"),
    (random_with({"q": 2}), "parameters.learning_rate needs value, values, or min and max"),
    (random_with({"distribution": "lognormal", "min": 0.1, "max": 1}), "distribution='lognormal' is not a W&B distribution"),
    (random_with({"distribution": "log_uniform_values", "min": 0.001}), "distribution log_uniform_values needs max"),
    (random_with({"distribution": "categorical"}), "distribution categorical needs values"),
    (random_with({"values": []}), "parameters.learning_rate.values must be a non-empty list"),
    (random_with({"min": "small", "max": 0.1}), "parameters.learning_rate: min and max must be finite numbers"),
    (random_with({"min": True, "max": 0.1}), "parameters.learning_rate: min and max must be finite numbers"),
    (random_with({"min": 0.001, "max": float("inf")}), "parameters.learning_rate: min and max must be finite numbers"),
    (random_with({"min": 0.1, "max": 0.1}), "parameters.learning_rate: min (0.1) must be below max (0.1)"),
    (random_with({"distribution": "log_uniform_values", "min": 0, "max": 0.1}), "log_uniform_values needs min > 0"),
    (random_with({"distribution": "int_uniform", "min": 1.5, "max": 3}), "int_uniform needs integer min and max"),
    (random_with({"distribution": "q_uniform", "min": 0.001, "max": 0.1, "q": 0}), "parameters.learning_rate.q must be a positive number"),
    (doc(parameters={"batch_size": {"values": [64, 0]}}), "batch_size=0 must be >= 1"),
    (doc(parameters={"dataset": {"value": "cifar10"}}), "dataset='cifar10' must be one of"),
    (doc(parameters={"epochs": {"values": ["two"]}}), "epochs='two' (from sweep parameters.epochs) is not an integer"),
    # early termination
    (doc(early_terminate={"type": "envelope"}), "early_terminate must be {type: hyperband"),
    (doc(early_terminate="hyperband"), "early_terminate must be {type: hyperband"),
    (doc(early_terminate={"type": "hyperband", "min_iter": 1, "rate": 3}), "early_terminate.rate is not a hyperband key"),
    (doc(early_terminate={"type": "hyperband", "eta": 3}), "early_terminate needs min_iter"),
    (doc(early_terminate={"type": "hyperband", "min_iter": 0}), "early_terminate.min_iter=0 must be a positive integer"),
    (doc(early_terminate={"type": "hyperband", "min_iter": 1, "eta": 1.5}), "early_terminate.eta=1.5 must be a positive integer"),
    (doc(metric={"name": "test_accuracy", "goal": "maximize"}, early_terminate={"type": "hyperband", "min_iter": 1}),
     "early_terminate needs a per-epoch metric; metric.name='test_accuracy' is logged only once"),
]


@pytest.mark.parametrize("bad, message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_each_mistake_is_one_line(bad, message):
    with pytest.raises(SweepSpecError) as err:
        sweep_spec.parse(bad, source="s.yaml")
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_load_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(SweepSpecError, match=r"sweep config '.*absent.yaml' does not exist"):
        sweep_spec.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  learning_rate: {values: [0.1\n")
    with pytest.raises(SweepSpecError, match=r"bad.yaml is not valid YAML at line \d+"):
        sweep_spec.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SweepSpecError, match="a sweep config is a YAML mapping"):
        sweep_spec.load(empty)
    # the file's name is the source every message starts with
    typo = tmp_path / "typo.yaml"
    typo.write_text("method: grid\nmetrc: {name: val_loss}\nparameters: {seed: {values: [1, 2]}}\n")
    with pytest.raises(SweepSpecError, match=rf"^{typo}: unknown key 'metrc'"):
        sweep_spec.load(typo)


# --- property: any YAML-ish input is a valid spec or ONE short SweepSpecError line, never another exception ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from app.config import KEYS  # noqa: E402

NAMES = st.sampled_from([*sweep_spec.TOP_KEYS, *sweep_spec.PARAM_KEYS, *KEYS, "name", "goal", "type", "min_iter",
                         "eta", "s", "max_iter", "strict", "lr", ""])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from([*sweep_spec.METHODS, *sweep_spec.METRICS,
                                                           *sweep_spec.DISTRIBUTIONS, "minimize", "maximize",
                                                           "hyperband", "${args}", 0, 1, 0.5, 64, [16, 32]]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(NAMES, st.integers(0, 3)), inner, max_size=4)), max_leaves=20)


def param_spec():
    return st.dictionaries(st.sampled_from(sweep_spec.PARAM_KEYS), VALUES, max_size=4)


NUMBERS = st.one_of(st.integers(-5, 300), st.floats(-1, 1), st.floats(allow_nan=True), st.sampled_from([0.001, 0.01, 64]))
PLAUSIBLE_PARAM = st.one_of(
    st.fixed_dictionaries({"values": st.lists(st.sampled_from([1, 2, 16, 32, 64]), min_size=1, max_size=4)}),
    st.fixed_dictionaries({"min": st.integers(1, 10), "max": st.integers(11, 100)}),
    st.fixed_dictionaries({"values": st.lists(st.one_of(NUMBERS, SCALARS), min_size=0, max_size=5)}),
    st.fixed_dictionaries({"value": st.one_of(NUMBERS, SCALARS)}),
    st.fixed_dictionaries({"min": NUMBERS, "max": NUMBERS},
                          optional={"distribution": st.sampled_from(list(sweep_spec.DISTRIBUTIONS)), "q": NUMBERS}),
    param_spec(),
)
NEAR_VALID = st.fixed_dictionaries(
    {"method": st.sampled_from(sweep_spec.METHODS),
     "parameters": st.dictionaries(st.sampled_from(["learning_rate", "batch_size", "epochs", "seed", "kernels",
                                                    "train_stride", "amp"]), PLAUSIBLE_PARAM, min_size=1, max_size=3)},
    optional={"metric": st.fixed_dictionaries({"name": st.sampled_from(sweep_spec.METRICS)},
                                              optional={"goal": st.sampled_from(sweep_spec.GOALS)}),
              "run_cap": st.one_of(st.integers(-1, 50), VALUES),
              "early_terminate": st.fixed_dictionaries({"type": st.just("hyperband")},
                                                       optional={"min_iter": st.integers(0, 5), "eta": st.integers(0, 4)}),
              "command": st.sampled_from([CMD, ["python", "train.py"], "train"])})
DOCS = st.one_of(
    NEAR_VALID,
    VALUES,
    st.fixed_dictionaries({}, optional={
        "method": st.one_of(st.sampled_from(sweep_spec.METHODS), VALUES),
        "metric": st.one_of(st.fixed_dictionaries({"name": st.sampled_from(sweep_spec.METRICS)},
                                                  optional={"goal": st.sampled_from(["minimize", "maximize", "up"])}),
                            VALUES),
        "parameters": st.one_of(st.dictionaries(st.one_of(st.sampled_from(KEYS), NAMES), param_spec(), max_size=3),
                                VALUES),
        "early_terminate": st.one_of(st.fixed_dictionaries({"type": st.just("hyperband")},
                                                           optional={"min_iter": VALUES, "eta": VALUES}), VALUES),
        "run_cap": VALUES, "command": VALUES, "name": VALUES,
    }),
)


def _one_short_line(exc: Exception) -> None:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) <= sweep_spec.MAX_MESSAGE + 40, text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCS)
def test_any_document_is_a_spec_or_one_error_line(doc):
    try:
        spec = sweep_spec.parse(doc, source="s.yaml")
    except SweepSpecError as exc:
        _one_short_line(exc)
        return
    assert spec.method in sweep_spec.METHODS and spec.params
    if spec.method == "grid":
        assert 1 <= spec.grid_size <= sweep_spec.MAX_GRID


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_file_text_is_a_spec_or_one_error_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("prop") / "s.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        sweep_spec.load(path)
    except SweepSpecError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= sweep_spec.MAX_MESSAGE + len(str(path)) + 40, str(exc)
