"""Config: the tutorial's defaults, precedence defaults < .env < environment < CLI < sweep, and every error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import LAYERED_RUN_ID, REPO

from app import runlog
from app.config import KEYS, Config, ConfigError, describe, merge, parse_cli
from app.errors import UserError
from app.sources import load


def test_defaults_are_the_tutorials():
    c = Config()
    assert (c.epochs, c.classes, c.kernels, c.batch_size, c.learning_rate, c.dataset, c.architecture, c.train_stride) == (
        5, 10, (16, 32), 128, 0.005, "mnist", "CNN", 5)
    assert c.to_dict()["kernels"] == [16, 32]  # a list, as W&B and JSON want it


def test_config_is_frozen_and_round_trips():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3  # type: ignore[misc]
    changed = c.replace(epochs="3", kernels="8")
    assert (changed.epochs, changed.kernels, c.epochs) == (3, (8,), 5)
    assert merge(Config(), changed.to_dict(), source="test") == changed


def test_precedence_defaults_dotenv_environment_cli(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SEED=7\nBATCH_SIZE=16\nEPOCHS=4\nLEARNING_RATE=0.1\nWANDB_MODE=offline\n")
    environ = {"BATCH_SIZE": "32", "EPOCHS": "3", "PATH": "/bin", "HOME": "/root"}
    c = load(["--epochs=2"], environ, dotenv_path=dotenv)
    assert c.classes == 10  # default
    assert c.seed == 7 and c.learning_rate == 0.1  # .env over defaults
    assert c.batch_size == 32  # environment over .env
    assert c.epochs == 2  # command line over environment


def test_missing_dotenv_is_fine_and_none_disables_it(tmp_path: Path):
    assert load([], {}, dotenv_path=tmp_path / "absent.env") == Config()
    (tmp_path / ".env").write_text("EPOCHS=9\n")
    assert load([], {}, dotenv_path=None) == Config()


def test_env_example_lists_every_key_and_loads_to_the_defaults():
    example = REPO / ".env.example"
    text = example.read_text()
    for key in KEYS:
        assert f"{key.upper()}=" in text, f"{key.upper()} missing from .env.example"
    assert load([], {}, dotenv_path=example) == Config()


@pytest.mark.parametrize("args, expected", [
    (["--epochs=3"], {"epochs": "3"}),
    (["--epochs", "3"], {"epochs": "3"}),
    (["--batch-size=64", "--learning_rate", "0.1"], {"batch_size": "64", "learning_rate": "0.1"}),
    (["--kernels=[8, 16]"], {"kernels": "[8, 16]"}),
    ([], {}),
])
def test_parse_cli_forms(args, expected):
    assert parse_cli(args) == expected


@pytest.mark.parametrize("text, kernels", [
    ("16,32", (16, 32)),
    ("[16, 32]", (16, 32)),
    (" 8 , 16 ", (8, 16)),
    ("8", (8,)),
    ("[4,8,16]", (4, 8, 16)),
])
def test_kernels_string_forms(text, kernels):
    assert load([f"--kernels={text}"], {}, dotenv_path=None).kernels == kernels
    assert load([], {"KERNELS": text}, dotenv_path=None).kernels == kernels


def test_values_as_a_sweep_sends_them():
    # W&B hands over JSON types: lists, ints as floats, real booleans
    c = merge(Config(), {"kernels": [8, 16], "epochs": 2.0, "learning_rate": 1, "channels_last": False}, source="W&B sweep")
    assert (c.kernels, c.epochs, c.learning_rate, c.channels_last) == ((8, 16), 2, 1.0, False)
    assert isinstance(c.epochs, int) and isinstance(c.learning_rate, float)


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("Yes", True), ("on", True),
                                         ("false", False), ("0", False), ("no", False), ("OFF", False)])
def test_boolean_forms(text, value):
    assert load([], {"RESUME": text}, dotenv_path=None).resume is value


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(**{"cli_args": [], "environ": {}, "dotenv_path": None, **kwargs})
    message = str(info.value)
    assert "\n" not in message, "a user error is one line"
    return message


# --- unknown keys: every source that can name one ---

def test_unknown_key_on_the_command_line():
    message = _error(cli_args=["--epoch=3"])
    assert "--epoch" in message and "epochs" in message  # the list of known keys shows the right spelling


def test_unknown_key_from_a_sweep():
    with pytest.raises(ConfigError, match=r"unknown config key 'dropout' \(from W&B sweep\)"):
        merge(Config(), {"dropout": 0.5}, source="W&B sweep")


def test_unknown_key_in_replace():
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        Config().replace(epoch=3)


def test_environment_and_dotenv_only_read_config_keys(tmp_path: Path):
    # both hold other settings too (PATH, WANDB_*, the container's): only the upper-case config keys
    # are training settings; the environment may hold anything, .env only what something reads
    (tmp_path / ".env").write_text("WANDB_MODE=offline\nSWEEP_ID=\nALLOW_CPU=true\nCOMPOSE_PROJECT_NAME=x\n")
    assert load([], {"PATH": "/bin", "EPOCH": "3"}, dotenv_path=tmp_path / ".env") == Config()


@pytest.mark.parametrize("line, fragment", [
    ("EPOCH=3", ".env:2: unknown setting EPOCH; did you mean EPOCHS?"),
    ("BATCHSIZE=3", ".env:2: unknown setting BATCHSIZE; did you mean BATCH_SIZE?"),
    ("SOMETHING_ELSE=1", ".env:2: unknown setting SOMETHING_ELSE"),
    ("epochs 3", ".env:2: 'epochs 3' is not a KEY=value line"),
    ("EPOCHS='3", ".env:2: \"EPOCHS='3\" is not a KEY=value line"),
])
def test_dotenv_typos_and_broken_lines_are_named(tmp_path: Path, line: str, fragment: str):
    (tmp_path / ".env").write_text(f"SEED=1\n{line}\nEPOCHS=2\n")
    with pytest.raises(UserError) as caught:
        load([], {}, dotenv_path=tmp_path / ".env")
    assert fragment in str(caught.value) and "\n" not in str(caught.value), caught.value


@pytest.mark.parametrize("environ, dotenv", [({"EPOCHS": ""}, ""), ({"EPOCHS": "  "}, ""), ({}, "EPOCHS=\n"),
                                             ({"EPOCHS": ""}, "EPOCHS=3\n")])
def test_empty_values_are_unset(tmp_path: Path, environ, dotenv):
    (tmp_path / ".env").write_text(dotenv)
    expected = 3 if "3" in dotenv else Config().epochs
    assert load([], environ, dotenv_path=tmp_path / ".env").epochs == expected


@pytest.mark.parametrize("args, fragment", [
    (["epochs=3"], "unexpected argument 'epochs=3'"),
    (["--epochs"], "--epochs needs a value"),
])
def test_malformed_command_line(args, fragment):
    assert fragment in _error(cli_args=args)


# --- wrong types, named with their source ---

@pytest.mark.parametrize("key, value, fragment", [
    ("EPOCHS", "three", "epochs='three' (from environment) is not an integer"),
    ("EPOCHS", "1.5", "is not an integer"),
    ("LEARNING_RATE", "fast", "learning_rate='fast' (from environment) is not a number"),
    ("CHANNELS_LAST", "maybe", "channels_last='maybe' (from environment) is not a boolean"),
    ("KERNELS", "16,x", "is not a list of integers"),
    ("KERNELS", "[16,", "is not a list of integers"),
    ("KERNELS", "[16, 32.5]", "is not a list of integers"),
    # Python's own number forms, which int() and float() take and no .env or shell user means
    ("EPOCHS", "1_000", "epochs='1_000' (from environment) is not an integer"),
    ("EPOCHS", "١٢", "epochs='١٢' (from environment) is not an integer"),  # Arabic-Indic 12
    ("SEED", "0x10", "seed='0x10' (from environment) is not an integer"),
    ("BATCH_SIZE", "1e3", "is not an integer"),
    ("LEARNING_RATE", "1_0.5", "learning_rate='1_0.5' (from environment) is not a number"),
    ("LEARNING_RATE", "٠.١", "is not a number"),
    ("KERNELS", "16,3_2", "is not a list of integers"),
    ("KERNELS", "[16, true]", "is not a list of integers"),
])
def test_wrong_types_from_the_environment(key, value, fragment):
    assert fragment in _error(environ={key: value})


def test_wrong_type_from_dotenv_names_the_file(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("BATCH_SIZE=big\n")
    assert f"batch_size='big' (from {dotenv}) is not an integer" in _error(dotenv_path=dotenv)


def test_wrong_type_from_the_command_line():
    assert "(from command line) is not a number" in _error(cli_args=["--learning_rate=abc"])


@pytest.mark.parametrize("values", [{"batch_size": True}, {"epochs": 2.5}, {"kernels": 16}, {"kernels": {"a": 1}},
                                    {"learning_rate": False}])
def test_wrong_types_from_a_sweep(values):
    with pytest.raises(ConfigError, match=r"\(from W&B sweep\)"):
        merge(Config(), values, source="W&B sweep")


# --- ranges and choices ---

@pytest.mark.parametrize("arg, fragment", [
    ("--epochs=0", "epochs=0 must be >= 1"),
    ("--classes=0", "classes=0 must be >= 1"),
    ("--batch_size=-1", "batch_size=-1 must be >= 1"),
    ("--train_stride=0", "train_stride=0 must be >= 1"),
    ("--log_interval=0", "log_interval=0 must be >= 1"),
    ("--watch_log_freq=0", "watch_log_freq=0 must be >= 1"),
    ("--learning_rate=0", "learning_rate=0.0 must be > 0"),
    ("--learning_rate=-0.1", "learning_rate=-0.1 must be > 0"),
    ("--learning_rate=nan", "must be > 0"),
    ("--val_size=-1", "val_size=-1 must be >= 0"),
    ("--gpu_memory_fraction=1.5", "gpu_memory_fraction=1.5 must be between 0 and 1"),
    ("--gpu_memory_fraction=-0.1", "must be between 0 and 1"),
    ("--kernels=8,16,32,64", "must be 1 to 3 positive channel counts"),
    ("--kernels=[]", "must be 1 to 3 positive channel counts"),
    ("--kernels=16,0", "must be 1 to 3 positive channel counts"),
    # far out of range: these passed, then failed in an allocation or an overflow after the run opened
    ("--kernels=100000", "kernels=[100000] must be channel counts of at most 1024"),
    ("--classes=1000000000", "classes=1000000000 must be at most 100000"),
    ("--batch_size=1000000000", "batch_size=1000000000 must be at most 65536"),
    ("--epochs=1000000000000", "epochs=1000000000000 must be at most 100000"),
    ("--log_interval=1000000000000", "log_interval=1000000000000 must be at most 1000000000"),
    ("--watch_log_freq=1000000000000", "watch_log_freq=1000000000000 must be at most 1000000000"),
    (f"--seed={2**64}", f"seed={2**64} must be a 64-bit integer"),
    (f"--seed={2**63}", "must be a 64-bit integer (-2**63 to 2**63-1), as torch.manual_seed takes"),
    (f"--seed={-2**63 - 1}", "must be a 64-bit integer"),
])
def test_ranges(arg, fragment):
    assert fragment in _error(cli_args=[arg])


def test_the_bounds_refuse_nothing_a_real_run_uses():
    """The largest values of each bound, every shipped sweep's values and the number forms people write."""
    top = Config(epochs=100_000, classes=100_000, batch_size=65_536, kernels=(1024, 1024, 1024),
                 log_interval=10**9, watch_log_freq=10**9, seed=2**63 - 1)
    assert top.seed == 2**63 - 1 and Config(seed=-2**63).seed == -2**63
    c = load(["--epochs=+3", "--learning_rate=1E-3", "--gpu_memory_fraction=.5", "--kernels= 8 , 16 "], {}, None)
    assert (c.epochs, c.learning_rate, c.gpu_memory_fraction, c.kernels) == (3, 0.001, 0.5, (8, 16))
    assert merge(Config(), {"epochs": 3.0, "kernels": [8, 16], "seed": 2**62}, "W&B sweep").seed == 2**62
    from app.sweep import spec as sweep_spec

    shipped = sorted((REPO / "sweeps").glob("*.yaml"))
    assert shipped
    for path in shipped:
        sweep_spec.load(path)  # checks every listed value and each range's ends against the config


@pytest.mark.parametrize("arg, fragment", [
    ("--dataset=cifar10", "dataset='cifar10' must be one of: mnist, fashion_mnist"),
    ("--architecture=MLP", "architecture='MLP' must be one of: CNN"),
    ("--amp=fp16", "amp='fp16' must be one of: none, bf16"),
    ("--compile=max", "compile='max' must be one of: none, default, reduce-overhead"),
    ("--watch_log=everything", "watch_log='everything' must be one of: gradients, parameters, all, none"),
    ("--device=gpu", "device='gpu' must be auto, cpu, cuda or cuda:N"),
    ("--device=cuda:x", "must be auto, cpu, cuda or cuda:N"),
])
def test_choices(arg, fragment):
    assert fragment in _error(cli_args=[arg])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_forms_accepted(device):
    assert load([f"--device={device}"], {}, dotenv_path=None).device == device


def test_describe_lists_every_key_with_its_default_and_a_note():
    lines = describe().splitlines()
    defaults = Config().to_dict()
    assert len(lines) == len(KEYS)
    for key, line in zip(KEYS, lines):
        flag, _, note = line.strip().partition("  ")
        assert flag == f"--{key}={json.dumps(defaults[key])}"
        assert note.strip(), f"--{key} has no explanation"
    assert "--kernels=[16, 32]" in lines[KEYS.index("kernels")]


# --- the whole chain in a real run, sweep layer included (see conftest.layered_run) ---

def test_every_layer_in_a_real_sweep_run(layered_run):
    cwd, _ = layered_run
    [folder] = runlog.find(cwd / "runs")
    run = runlog.read(folder)
    c = run.config
    assert c["classes"] == 10  # default
    assert c["seed"] == 5  # .env
    assert c["batch_size"] == 32  # environment over .env
    assert c["log_interval"] == 3  # command line over environment and .env
    assert c["learning_rate"] == 0.01  # the sweep over all of them
    assert c["epochs"] == 1 and c["kernels"] == [8, 16]  # the sweep over the command line / defaults
    assert run.sweep_id == "sweep-test" and run.run_id == LAYERED_RUN_ID
    # the sweep's values were trained with, not just recorded
    assert {row["epoch"] for row in run.history if "loss" in row} == {0}
    ckpt = torch.load(cwd / "outputs" / LAYERED_RUN_ID / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    assert ckpt["model"]["features.0.weight"].shape == (8, 1, 5, 5)
    assert ckpt["model"]["features.3.weight"].shape == (16, 8, 5, 5)
    assert {k: ckpt["config"][k] for k in c} == c  # the checkpoint holds the effective config
    # 1000 train images / stride 5 = 200, batches of 32, a loss point every 3 batches
    assert [step for step, _ in run.metric("loss")] == [96, 192]


# --- property-based: whatever a user, an environment or a sweep passes, a Config or one error line ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.one_of(
    st.text(max_size=30), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.floats()), max_size=5),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "[[[[[[", "[" * 5000, "9" * 5000, "cuda:²",
                     "16,32", "[16, 32]", "true", "0", "-1", "mnist", "bf16", "cuda:0", "\x00", "١٢"]),
)
_keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))


def _is_one_line_error(exc: Exception) -> bool:
    return isinstance(exc, UserError) and "\n" not in str(exc) and len(str(exc)) < 2000


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_any_sweep_values_give_a_config_or_a_config_error(values):
    try:
        c = merge(Config(), values, source="W&B sweep")
    except ConfigError as exc:
        assert _is_one_line_error(exc)
    else:
        assert isinstance(c, Config) and merge(Config(), c.to_dict(), source="again") == c  # round trip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from([f"--{k}" for k in KEYS]),
                          st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS), st.text(max_size=12))),
                max_size=6),
       st.dictionaries(st.sampled_from(sorted(k.upper() for k in KEYS)), st.text(max_size=12), max_size=4))
def test_any_command_line_and_environment(args, environ):
    try:
        c = load(args, environ, dotenv_path=None)
    except ConfigError as exc:
        assert _is_one_line_error(exc)
    else:
        assert isinstance(c, Config)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_dotenv_text(tmp_path: Path, text: str):
    f = tmp_path / ".env"
    f.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else f.write_bytes(b"\xff")
    try:
        c = load([], {}, dotenv_path=f)
    except UserError as exc:
        assert _is_one_line_error(exc)
    else:
        assert isinstance(c, Config)
