"""app.env: typed reads of the environment, empty = unset, and .env files checked line by line."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from app import env, tracking
from app.config import ENV_NAMES, read_dotenv
from app.errors import UserError
from conftest import REPO


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), (" YES ", True), ("on", True),
                                             ("false", False), ("0", False), ("off", False), ("No", False)])
def test_flag(value, expected):
    assert env.flag("ALLOW_CPU", environ={"ALLOW_CPU": value}) is expected


@pytest.mark.parametrize("environ", [{}, {"ALLOW_CPU": ""}, {"ALLOW_CPU": "   "}])
@pytest.mark.parametrize("default", [True, False])
def test_flag_unset_or_empty_is_the_default(environ, default):
    assert env.flag("ALLOW_CPU", default, environ=environ) is default


def test_flag_names_the_variable_and_the_words():
    with pytest.raises(UserError, match=r"^ALLOW_CPU='maybe' must be true or false \(also 1/0, yes/no, on/off\)$"):
        env.flag("ALLOW_CPU", environ={"ALLOW_CPU": "maybe"})


@pytest.mark.parametrize("value, expected", [("3", 3), (" 12 ", 12), ("", None)])
def test_positive_int(value, expected):
    assert env.positive_int("AGENT_COUNT", environ={"AGENT_COUNT": value}) == expected
    assert env.positive_int("AGENT_COUNT", 7, environ={}) == 7


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "1e3"])
def test_positive_int_refuses(value):
    with pytest.raises(UserError, match=rf"^AGENT_COUNT='{value}' must be a positive integer \(runs per agent\)$"):
        env.positive_int("AGENT_COUNT", environ={"AGENT_COUNT": value}, meaning="runs per agent")


@pytest.mark.parametrize("value, ok", [("0", True), ("2.5", True), ("-1", False), ("nan", False), ("inf", False),
                                       ("x", False)])
def test_non_negative_float(value, ok):
    if ok:
        assert env.non_negative_float("S", environ={"S": value}) == float(value)
    else:
        with pytest.raises(UserError, match=rf"^S='{value}' must be a number >= 0$"):
            env.non_negative_float("S", environ={"S": value})
    with pytest.raises(UserError, match="must be a positive number"):
        env.non_negative_float("S", environ={"S": "0"}, positive=True)


def test_choice_is_case_blind_and_lists_what_is_allowed():
    assert env.choice("APP_MODE", ("auto", "run"), environ={"APP_MODE": " RUN "}) == "run"
    assert env.choice("APP_MODE", ("auto", "run"), "auto", environ={"APP_MODE": ""}) == "auto"
    with pytest.raises(UserError, match=r"^APP_MODE='later' must be one of: auto, run$"):
        env.choice("APP_MODE", ("auto", "run"), environ={"APP_MODE": "later"})


def test_path_and_runs_root():
    assert env.path("OUTPUT_DIR", "outputs", environ={"OUTPUT_DIR": ""}) == Path("outputs")
    assert env.path("OUTPUT_DIR", "outputs", environ={"OUTPUT_DIR": " /o "}) == Path("/o")
    assert env.runs_root({}) == Path(".") and env.runs_root({"WANDB_DIR": "/runs"}) == Path("/runs")


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("AGENT_COUNT", "4")
    assert env.positive_int("AGENT_COUNT") == 4


def test_drop_empty_wandb_leaves_everything_else():
    environ = {"WANDB_MODE": "", "WANDB_PROJECT": " ", "WANDB_DIR": "/runs", "EPOCHS": ""}
    assert sorted(env.drop_empty_wandb(environ)) == ["WANDB_MODE", "WANDB_PROJECT"]
    assert environ == {"WANDB_DIR": "/runs", "EPOCHS": ""}


# --- .env files ---

def test_dotenv_values_comments_quotes_and_empty_lines(tmp_path: Path):
    f = tmp_path / ".env"
    f.write_text("# a comment\n\nWANDB_MODE=\nEPOCHS=3  # trailing comment\nexport SEED=4\nWANDB_NOTES=\"a b\"\n")
    assert env.read_dotenv(f, ENV_NAMES) == {"EPOCHS": "3", "SEED": "4", "WANDB_NOTES": "a b"}


@pytest.mark.parametrize("text, fragment", [
    ("EPOCHS=1\nEPOCH=3\n", ".env:2: unknown setting EPOCH; did you mean EPOCHS?"),
    ("EPOCHS=1\n\n\nLERNING_RATE=1\n", ".env:4: unknown setting LERNING_RATE; did you mean LEARNING_RATE?"),
    ("EPOCHS 3\n", ".env:1: 'EPOCHS 3' is not a KEY=value line"),
    ("# x\n=3\n", ".env:2: '=3' is not a KEY=value line"),
])
def test_dotenv_errors_name_the_line(tmp_path: Path, text: str, fragment: str):
    f = tmp_path / ".env"
    f.write_text(text)
    with pytest.raises(UserError) as caught:
        env.read_dotenv(f, ENV_NAMES)
    assert str(caught.value) == f"{tmp_path}/{fragment}"


def test_dotenv_may_carry_the_runtime_settings_of_the_containers(tmp_path: Path):
    # the same .env feeds compose's and launch's containers: thread counts, CUDA and proxy settings are not typos
    f = tmp_path / ".env"
    f.write_text("OMP_NUM_THREADS=4\nCUDA_LAUNCH_BLOCKING=1\nNCCL_DEBUG=INFO\nhttps_proxy=http://proxy:3128\nTZ=UTC\n")
    assert env.read_dotenv(f, ENV_NAMES) == {"OMP_NUM_THREADS": "4", "CUDA_LAUNCH_BLOCKING": "1", "NCCL_DEBUG": "INFO",
                                             "https_proxy": "http://proxy:3128", "TZ": "UTC"}


def test_dotenv_that_is_not_a_settings_file(tmp_path: Path):
    (tmp_path / "bin.env").write_bytes(b"\xff\xfe\x00EPOCHS=1")
    with pytest.raises(UserError, match="is not a text file of KEY=value lines"):
        env.read_dotenv(tmp_path / "bin.env")
    (tmp_path / "big.env").write_text("# x\n" * 100_000)
    with pytest.raises(UserError, match="is over 256 KiB"):
        env.read_dotenv(tmp_path / "big.env")
    with pytest.raises(UserError, match=r"cannot read .* \(Is a directory\)"):
        env.read_dotenv(tmp_path)


def test_every_setting_of_the_shipped_example_is_known():
    values = read_dotenv(REPO / ".env.example")  # raises on an unknown key or a broken line
    assert "WANDB_MODE" not in values  # unset: offline without a key, online with one (both README flows)


# --- the writable-folder probe: unique per call, so agents sharing a volume never collide ---

def _probe_many(folder: str, rounds: int, threads: int = 4) -> int:
    """Threads of one process share its pid, as processes in separate containers can: a probe named
    by pid would be created and deleted under another prober's feet."""
    failures = []

    def probe() -> None:
        for _ in range(rounds):
            try:
                tracking.check_writable(Path(folder), "WANDB_DIR")
            except UserError:
                failures.append(1)

    workers = [threading.Thread(target=probe) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(failures)


def test_many_processes_probe_one_folder_without_a_false_refusal(tmp_path: Path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        failures = pool.starmap(_probe_many, [(str(tmp_path), 300)] * 4)
    assert failures == [0] * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".write-test")]  # no probe left behind


def test_check_writable_still_refuses_what_it_should(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^WANDB_DIR='.*/file/x' is not writable"):
        tracking.check_writable(tmp_path / "file" / "x", "WANDB_DIR")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(UserError, match="is not writable"):
            tracking.check_writable(tmp_path / "ro", "WANDB_DIR")
