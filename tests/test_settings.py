"""app.settings: every setting declared once and read typed (empty = unset, errors naming the variable);
.env files checked line by line (app.sources); and every list kept outside the package (.env.example,
docs/settings.md, compose's pass-through, the k8s settings, agents.sbatch) checked against the table."""

from __future__ import annotations

import ast
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from app import settings, tracking
from app.errors import UserError
from app.settings_cli import container_lines, example_problems, generated_part, passes_into_container
from app.sources import read_dotenv
from conftest import REPO


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), (" YES ", True), ("on", True),
                                             ("false", False), ("0", False), ("off", False), ("No", False)])
def test_flag(value, expected):
    assert settings.get("ALLOW_CPU", {"ALLOW_CPU": value}) is expected


@pytest.mark.parametrize("environ", [{}, {"ALLOW_CPU": ""}, {"ALLOW_CPU": "   "}])
@pytest.mark.parametrize("name, default", [("ALLOW_CPU", False), ("SWEEP_DEDUPE", True)])
def test_flag_unset_or_empty_is_the_declared_default(environ, name, default):
    assert settings.get(name, {name: v for v in environ.values()}) is default


def test_flag_names_the_variable_and_the_words():
    with pytest.raises(UserError, match=r"^ALLOW_CPU='maybe' must be true or false \(also 1/0, yes/no, on/off\)$"):
        settings.get("ALLOW_CPU", {"ALLOW_CPU": "maybe"})


def test_the_true_false_words_are_the_training_keys_words():
    for word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        assert settings.get("ALLOW_CPU", {"ALLOW_CPU": word}) is settings.get("RESUME", {"RESUME": word})


@pytest.mark.parametrize("value, expected", [("3", 3), (" 12 ", 12), ("", None)])
def test_count(value, expected):
    assert settings.get("AGENT_COUNT", {"AGENT_COUNT": value}) == expected
    assert settings.get("SYNC_TIMEOUT_S", {}) == 120  # the declared default


# 1_000, ١٢ (Arabic-Indic digits) and 0x10: int() takes the first two, no .env user writes any of them
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "1e3", "1_000", "١٢", "0x10"])
def test_count_refuses_naming_what_it_counts(value):
    with pytest.raises(UserError, match=rf"^AGENT_COUNT='{value}' must be a positive integer "
                                        r"\(runs per agent; unset = until the sweep ends\)$"):
        settings.get("AGENT_COUNT", {"AGENT_COUNT": value})


@pytest.mark.parametrize("value, ok", [("0.5", True), ("2.5", True), ("1e1", True), (".5", True), ("0", False),
                                       ("-1", False), ("nan", False), ("inf", False), ("x", False), ("1_0", False),
                                       ("١", False)])
def test_positive_number(value, ok):
    if ok:
        assert settings.get("SWEEP_HEARTBEAT_S", {"SWEEP_HEARTBEAT_S": value}) == float(value)
    else:
        with pytest.raises(UserError, match=rf"^SWEEP_HEARTBEAT_S='{value}' must be a positive number "
                                            r"\(seconds between heartbeats\)$"):
            settings.get("SWEEP_HEARTBEAT_S", {"SWEEP_HEARTBEAT_S": value})


@pytest.mark.parametrize("value, ok", [("0", True), ("600", True), ("2.5", True), ("601", False), ("-1", False),
                                       ("nan", False), ("x", False)])
def test_bounded_number(value, ok):
    if ok:
        assert settings.get("AGENT_START_STAGGER", {"AGENT_START_STAGGER": value}) == float(value)
    else:
        with pytest.raises(UserError, match=rf"^AGENT_START_STAGGER='{value}' must be seconds between 0 and 600$"):
            settings.get("AGENT_START_STAGGER", {"AGENT_START_STAGGER": value})


@pytest.mark.parametrize("value, ok", [("0.5", True), ("3600", True), (" 15 ", True), ("", True), ("0", False),
                                       ("3601", False), ("-1", False), ("nan", False), ("inf", False), ("1m", False)])
def test_positive_bounded_number(value, ok):
    # the W&B agents' outage bound: empty is the default minute, zero would give up before the first answer
    if ok:
        assert settings.get("AGENT_OUTAGE_S", {"AGENT_OUTAGE_S": value}) == (float(value) if value else 60.0)
    else:
        with pytest.raises(UserError, match=rf"^AGENT_OUTAGE_S='{value}' must be seconds above 0, at most 3600$"):
            settings.get("AGENT_OUTAGE_S", {"AGENT_OUTAGE_S": value})


@pytest.mark.parametrize("value, ok", [("0", True), (" 3 ", True), ("-1", False), ("two", False), ("1.0", False),
                                       ("²", False), ("1_0", False), ("+1", False), ("9" * 5000, False)])
def test_whole_number(value, ok):
    if ok:
        assert settings.get("GPU_COUNT", {"GPU_COUNT": value}) == int(value)
    else:
        with pytest.raises(UserError, match=rf"^GPU_COUNT='{re.escape(value.strip())}' must be a whole number of GPUs \(0 = none\)$"):
            settings.get("GPU_COUNT", {"GPU_COUNT": value})


def test_choice_is_case_blind_and_lists_what_is_allowed():
    assert settings.get("APP_MODE", {"APP_MODE": " RUN "}) == "run"
    assert settings.get("APP_MODE", {"APP_MODE": ""}) == "auto"
    with pytest.raises(UserError, match=r"^APP_MODE='later' must be one of: auto, run, agent, offline-sweep$"):
        settings.get("APP_MODE", {"APP_MODE": "later"})


def test_path_and_runs_root():
    assert settings.get("SWEEP_CLAIMS_DIR", {"SWEEP_CLAIMS_DIR": ""}) is None
    assert settings.get("GPU_SLOTS_DIR", {"GPU_SLOTS_DIR": " /s "}) == Path("/s")
    assert settings.runs_root({}) == Path("runs") and settings.runs_root({"WANDB_DIR": "/runs"}) == Path("/runs")


def test_a_training_key_reads_as_the_config_reads_it():
    assert settings.get("GPU_MEMORY_FRACTION", {}) == 0.0
    assert settings.get("KERNELS", {"KERNELS": "8,16"}) == (8, 16)
    with pytest.raises(UserError, match=r"^gpu_memory_fraction='half' \(from environment\) is not a number$"):
        settings.get("GPU_MEMORY_FRACTION", {"GPU_MEMORY_FRACTION": "half"})


def test_one_run_id_rule():
    assert settings.get("WANDB_RUN_ID", {"WANDB_RUN_ID": "abc-1.x"}) == "abc-1.x"
    for bad in ("../x", " abc", "a/b"):
        with pytest.raises(UserError, match=r"^WANDB_RUN_ID=.* is not a usable run id"):
            settings.get("WANDB_RUN_ID", {"WANDB_RUN_ID": bad})


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("AGENT_COUNT", "4")
    assert settings.get("AGENT_COUNT") == 4


def test_a_name_not_declared_is_a_bug_not_a_default():
    with pytest.raises(KeyError, match="AGENT_CONT is not a declared setting"):
        settings.get("AGENT_CONT", {"AGENT_CONT": "3"})
    with pytest.raises(KeyError):
        settings.is_set("SWEEP_STORGE", {})


def test_drop_empty_wandb_leaves_everything_else():
    environ = {"WANDB_MODE": "", "WANDB_PROJECT": " ", "WANDB_DIR": "/runs", "EPOCHS": ""}
    assert sorted(settings.drop_empty_wandb(environ)) == ["WANDB_MODE", "WANDB_PROJECT"]
    assert environ == {"WANDB_DIR": "/runs", "EPOCHS": ""}


def test_tidy_wandb_writes_the_modes_back_as_checked_and_leaves_a_bad_one_to_its_check():
    environ = {"WANDB_MODE": " OFFLINE ", "AGENT_RUN_MODE": "Offline", "WANDB_NOTES": "", "EPOCHS": "3"}
    assert settings.tidy_wandb(environ) == ["WANDB_NOTES"]
    assert environ == {"WANDB_MODE": "offline", "AGENT_RUN_MODE": "offline", "EPOCHS": "3"}
    bad = {"WANDB_MODE": " Cloud", "AGENT_RUN_MODE": "dryrun"}  # dryrun: W&B's own word, not a run mode of ours
    settings.tidy_wandb(bad)
    assert bad == {"WANDB_MODE": " Cloud", "AGENT_RUN_MODE": "dryrun"}
    with pytest.raises(UserError, match=r"^WANDB_MODE='Cloud' must be one of"):
        settings.get("WANDB_MODE", bad)


# --- .env files ---

def test_dotenv_values_comments_quotes_and_empty_lines(tmp_path: Path):
    f = tmp_path / ".env"
    f.write_text("# a comment\n\nWANDB_MODE=\nEPOCHS=3  # trailing comment\nexport SEED=4\nWANDB_NOTES=\"a b\"\n")
    assert read_dotenv(f) == {"EPOCHS": "3", "SEED": "4", "WANDB_NOTES": "a b"}


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
        read_dotenv(f)
    assert str(caught.value) == f"{tmp_path}/{fragment}"


# `$` in a value: expanded as docker compose does, where python-dotenv's dotenv_values reads it the same
# (docker compose v2.40 `config` gave these by hand); refused in one line where the two differ
HOME_ENV = {"HOME": "/home/u", "EMPTY": ""}
DOCKER_CONFIG = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")  # its plugins: not under HOME_ENV's
AGREED = {
    "braced": ("WANDB_DIR=${HOME}/runs\n", {"WANDB_DIR": "/home/u/runs"}),
    "double-quoted": ('WANDB_DIR="${HOME}/runs"\n', {"WANDB_DIR": "/home/u/runs"}),
    "default-unset": ("WANDB_DIR=${NOPE:-/r}\n", {"WANDB_DIR": "/r"}),
    "default-not-taken": ("WANDB_DIR=${HOME:-/r}\n", {"WANDB_DIR": "/home/u"}),
    "earlier-line": ("DATA_DIR=/d\nOUTPUT_DIR=${DATA_DIR}/out\n", {"DATA_DIR": "/d", "OUTPUT_DIR": "/d/out"}),
    "unset-is-blank": ("WANDB_NOTES=${NOPE}\nSEED=${NOPE}1\n", {"SEED": "1"}),
    "single-quoted-lone-dollar": ("WANDB_NOTES='pa$word'\n", {"WANDB_NOTES": "pa$word"}),
    "dollar-not-a-name": ("WANDB_NOTES=costs $5 or $\n", {"WANDB_NOTES": "costs $5 or $"}),
}


@pytest.mark.parametrize("case", AGREED, ids=list(AGREED))
def test_dotenv_references_expand_as_compose_and_python_dotenv_both_read_them(tmp_path: Path, monkeypatch, case):
    from dotenv import dotenv_values

    text, expected = AGREED[case]
    (tmp_path / ".env").write_text(text)
    assert read_dotenv(tmp_path / ".env", HOME_ENV) == expected
    for name, value in HOME_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NOPE", raising=False)
    theirs = {k: v for k, v in dotenv_values(tmp_path / ".env", interpolate=True).items() if v}
    assert theirs == expected  # what a user's own script reads from the same file
    (tmp_path / "compose.yml").write_text("services:\n  t:\n    image: busybox\n    env_file:\n      - path: .env\n")
    env = {k: v for k, v in os.environ.items() if k not in settings.TABLE and k != "NOPE"}
    r = subprocess.run(["docker", "compose", "-f", "compose.yml", "config", "--format", "json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env={**env, **HOME_ENV, "DOCKER_CONFIG": DOCKER_CONFIG})
    if r.returncode != 0 and "CI" not in os.environ:
        pytest.skip(f"docker compose is not usable here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    composed = yaml.safe_load(r.stdout)["services"]["t"]["environment"]
    assert {k: v.replace("$$", "$") for k, v in composed.items() if v} == expected  # config escapes $ as $$


DISAGREED = {
    "bare-name": ("WANDB_DIR=$HOME/runs\n", "WANDB_DIR='$HOME/runs' is '/home/u/runs' to docker compose but '$HOME/runs' to python-dotenv"),
    "double-dollar": ("WANDB_NOTES=a$$b\n", "WANDB_NOTES='a$$b' is 'a$b' to docker compose but 'a$$b' to python-dotenv"),
    "single-quoted-braced": ("WANDB_DIR='${HOME}'\n", "WANDB_DIR='${HOME}' is '${HOME}' to docker compose but '/home/u'"),
    "default-of-empty": ("WANDB_DIR=${EMPTY:-/r}\n", "WANDB_DIR='${EMPTY:-/r}' is '/r' to docker compose but ''"),
    "environment-and-earlier-line": ("HOME=/other\nWANDB_DIR=${HOME}\n", "is '/home/u' to docker compose but '/other'"),
    "dash-default": ("WANDB_DIR=${HOME-/r}\n", "WANDB_DIR: ${HOME-/r} is read differently by docker compose and python-dotenv"),
    "nested-default": ("WANDB_DIR=${NOPE:-${HOME}}\n", "WANDB_DIR: ${NOPE:-${HOME} is read differently"),
    "open-brace": ("WANDB_DIR=${HOME\n", "WANDB_DIR: ${ without its } is read differently"),
    "escaped-in-double-quotes": ('WANDB_DIR="\\$HOME"\n', "WANDB_DIR: \\$ is read differently"),
}


@pytest.mark.parametrize("case", DISAGREED, ids=list(DISAGREED))
def test_dotenv_references_compose_and_python_dotenv_read_differently_are_one_line(tmp_path: Path, case):
    text, fragment = DISAGREED[case]
    (tmp_path / ".env").write_text("SEED=1\n" + text)
    with pytest.raises(UserError) as caught:
        read_dotenv(tmp_path / ".env", HOME_ENV)
    line = str(caught.value)
    assert line.startswith(f"{tmp_path / '.env'}:{1 + text.count(chr(10))}: ")  # the line of the value itself
    assert fragment in line and "\n" not in line, line


def test_the_export_for_slurm_expands_references_from_the_jobs_environment(tmp_path: Path):
    (tmp_path / ".env").write_text("OUTPUT_DIR=${HOME}/outputs\nDATA_DIR='${HOME}'\n")
    env = {k: v for k, v in os.environ.items() if k not in settings.TABLE}
    export = subprocess.run([sys.executable, "-m", "app", "env", "--export", ".env"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={**env, "HOME": "/home/u", "PYTHONPATH": str(REPO)})
    assert export.returncode == 2 and export.stdout == "", export.stdout
    assert export.stderr.startswith("error: .env:2: DATA_DIR='${HOME}' is '${HOME}' to docker compose"), export.stderr
    (tmp_path / ".env").write_text("OUTPUT_DIR=${HOME}/outputs\n")
    export = subprocess.run([sys.executable, "-m", "app", "env", "--export", ".env"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={**env, "HOME": "/home/u", "PYTHONPATH": str(REPO)})
    assert export.stdout == "export OUTPUT_DIR=/home/u/outputs\n", export.stderr


def test_dotenv_may_carry_the_runtime_settings_of_the_containers(tmp_path: Path):
    # the same .env feeds compose's and launch's containers: thread counts, CUDA and proxy settings are not typos
    f = tmp_path / ".env"
    f.write_text("OMP_NUM_THREADS=4\nCUDA_LAUNCH_BLOCKING=1\nNCCL_DEBUG=INFO\nhttps_proxy=http://proxy:3128\nTZ=UTC\n")
    assert read_dotenv(f) == {"OMP_NUM_THREADS": "4", "CUDA_LAUNCH_BLOCKING": "1", "NCCL_DEBUG": "INFO",
                              "https_proxy": "http://proxy:3128", "TZ": "UTC"}


def test_dotenv_that_is_not_a_settings_file(tmp_path: Path):
    (tmp_path / "bin.env").write_bytes(b"\xff\xfe\x00EPOCHS=1")
    with pytest.raises(UserError, match="is not a text file of KEY=value lines"):
        read_dotenv(tmp_path / "bin.env")
    (tmp_path / "big.env").write_text("# x\n" * 100_000)
    with pytest.raises(UserError, match="is over 256 KiB"):
        read_dotenv(tmp_path / "big.env")
    with pytest.raises(UserError, match=r"cannot read .* \(Is a directory\)"):
        read_dotenv(tmp_path)


def test_every_setting_of_the_shipped_example_is_known():
    values = read_dotenv(REPO / ".env.example")  # raises on an unknown key or a broken line
    assert "WANDB_MODE" not in values  # unset: offline without a key, online with one (both README flows)


@pytest.mark.parametrize("typo, meant", [("SWEEP_STORGE", "SWEEP_STORAGE"), ("GPU_SLOT_DIR", "GPU_SLOTS_DIR"),
                                         ("AGENTS_COUNT", "AGENT_COUNT"), ("SYNC_TIMEOUT", "SYNC_TIMEOUT_S")])
def test_a_typo_of_any_declared_setting_gets_its_did_you_mean(tmp_path: Path, typo: str, meant: str):
    (tmp_path / ".env").write_text(f"{typo}=1\n")
    with pytest.raises(UserError) as caught:
        read_dotenv(tmp_path / ".env")
    assert str(caught.value) == f"{tmp_path}/.env:1: unknown setting {typo}; did you mean {meant}?"


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


# --- the table itself, and every list kept outside the package checked against it ---

def test_the_training_keys_are_configs_fields_not_typed_again():
    from app.config import KEYS, Config, notes

    training = [s for s in settings.TABLE.values() if s.scope == settings.TRAINING]
    assert [s.name for s in training] == [k.upper() for k in KEYS]
    for s in training:
        assert s.default == getattr(Config(), s.name.lower()) and s.meaning == notes()[s.name.lower()] != ""
    assert settings.TABLE["DATASET"].choices == ("mnist", "fashion_mnist")
    assert settings.TABLE["RESUME"].kind == "flag" and settings.TABLE["KERNELS"].kind == "list"


def test_every_declaration_says_what_it_means_and_where_it_applies():
    for s in settings.TABLE.values():
        assert s.meaning and "\n" not in s.meaning, s.name
        assert (s.kind == "choice") == bool(s.choices), s.name
        if s.default is not None and s.scope != settings.TRAINING:
            settings.get(s.name, {s.name: str(s.default).lower() if isinstance(s.default, bool) else str(s.default)})


APP = REPO / "app"
SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")


def test_every_setting_name_written_in_the_package_is_declared():
    """Reads and writes alike: a name the package spells in a string is in the table (or one of the
    runtime's, such as the proxy variables), so a typo in the code fails here, WANDB_* ones too."""
    for path in APP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SETTING_NAME.match(node.value):
                assert node.value in settings.TABLE or node.value in settings.RUNTIME, \
                    f"{path}:{node.lineno}: {node.value} is not declared"


def test_no_module_but_settings_reads_a_setting_from_an_environment_by_name():
    """`environ["X"]`, `environ.get("X")` and `os.getenv("X")` are app.settings' alone; the others ask it."""
    for path in APP.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                name, target = node.slice, node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                    and node.func.attr in ("get", "getenv"):
                name, target = node.args[0], node.func.value
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and SETTING_NAME.match(name.value):
                where = ast.unparse(target)
                assert "environ" not in where and where != "os", f"{path}:{node.lineno}: {ast.unparse(node)}"


def test_container_lines_follow_the_scopes():
    environ = {"EPOCHS": "2", "SWEEP_ID": "e/p/s", "ALLOW_CPU": "true", "CUDA_VISIBLE_DEVICES": "1",
               "APP_EXEC": "podman run x", "BASE_IMAGE": "img", "SYNC_TIMEOUT_S": "9", "UID": "1000",
               "OMP_NUM_THREADS": "4", "PIP_INDEX_URL": "http://mirror", "HOME": "/root", "EDITOR": "vi"}
    assert container_lines(environ).splitlines() == ["ALLOW_CPU=true", "CUDA_VISIBLE_DEVICES=1", "EPOCHS=2",
                                                     "OMP_NUM_THREADS=4", "SWEEP_ID=e/p/s"]
    for s in settings.TABLE.values():
        assert passes_into_container(s.name) is (s.scope not in (settings.HOST, settings.BUILD))


def test_the_env_example_lists_every_setting_at_its_default():
    assert example_problems(REPO / ".env.example") == []


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace("\nSWEEP_DEDUPE=true\n", "\n"), "SWEEP_DEDUPE is missing"),
    (lambda t: t.replace("\n# SYNC_TIMEOUT_S=120\n", "\n"), "SYNC_TIMEOUT_S is missing"),
    (lambda t: t + "SWEEP_TIMEOUT=3\n", "SWEEP_TIMEOUT is not a declared setting"),
    (lambda t: t.replace("\nEPOCHS=5\n", "\nEPOCHS=7\n"), "EPOCHS=7 is not its default (`5`)"),
    (lambda t: t + "# AGENT_COUNT=2\n", "AGENT_COUNT is listed twice"),
])
def test_the_env_example_check_fails_on_a_copy_that_lost_or_changed_an_entry(tmp_path: Path, change, problem):
    copy = tmp_path / ".env.example"
    copy.write_text(change((REPO / ".env.example").read_text()))
    problems = example_problems(copy)
    assert len(problems) == 1 and problem in problems[0], problems


def test_compose_passes_every_agent_and_entrypoint_setting_and_nothing_undeclared():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    passthrough = compose["x-passthrough"]
    scope = {n: settings.TABLE[n].scope for n in passthrough}  # KeyError: a name nothing declares
    expected = {n for n, s in settings.TABLE.items() if s.scope in (settings.AGENT, settings.CONTAINER)} - {"APP_MODE"}
    assert expected <= set(passthrough), sorted(expected - set(passthrough))
    assert {n for n, v in passthrough.items() if v is None} <= expected | {
        n for n, sc in scope.items() if sc == settings.WANDB}  # taken from the shell: the user's settings
    pinned = {n: v for n, v in passthrough.items() if v is not None}
    assert pinned["DATA_DIR"] == "/data" and pinned["WANDB_DIR"] == "/runs" and pinned["OUTPUT_DIR"] == "/outputs"
    for name in ("train", "agent"):  # each service says its mode
        assert compose["services"][name]["environment"]["APP_MODE"] in settings.TABLE["APP_MODE"].choices
    cpu = yaml.safe_load((REPO / "docker-compose.cpu.yml").read_text().replace("!reset", ""))
    assert all(n in settings.TABLE for service in cpu["services"].values() for n in service["environment"])
    # compose's own ${NAME:-default}: declared, host or build settings or ones that reach the image, and the
    # same default as the table's
    text = (REPO / "docker-compose.yml").read_text()
    for name, default in re.findall(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}", text):
        assert Path(default) == Path(str(settings.TABLE[name].default)), name
    for arg in compose["x-trainer"]["build"]["args"]:
        assert settings.TABLE[arg].scope == settings.BUILD


def test_the_image_builds_from_the_declared_base():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={settings.TABLE['BASE_IMAGE'].default}\n" in dockerfile


def test_k8s_settings_are_declared_and_at_the_tables_defaults():
    k8s = REPO / "deploy" / "k8s"
    for number, line in enumerate((k8s / "base" / "settings.env").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        s = settings.TABLE[name]
        assert s.scope in (settings.TRAINING, settings.WANDB, settings.AGENT, settings.CONTAINER), line
        assert name not in ("WANDB_API_KEY", "SWEEP_STORAGE"), f"{line}: a secret in the ConfigMap"
        assert name not in ("DATA_DIR", "WANDB_DIR", "OUTPUT_DIR"), f"{line}: the pods pin the folders"
        assert settings.get(name, {name: value}) == settings.get(name, {}), f"settings.env:{number}: {line}"
    for path in k8s.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            text = yaml.safe_dump(doc)
            for name in re.findall(r"\bname: ([A-Z][A-Z0-9_]*)\n", text):
                assert name in settings.TABLE, f"{path}: {name}"
            for generator in (doc or {}).get("configMapGenerator", []):
                for literal in generator.get("literals", []):
                    name, _, value = literal.partition("=")
                    settings.get(name, {name: value})  # declared, and a value it allows


def _names_in(path: Path) -> set[str]:
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", path.read_text()))


def test_agents_sbatch_reads_only_declared_settings_and_hands_none_of_the_hosts_on():
    script = REPO / "deploy" / "slurm" / "agents.sbatch"
    names = _names_in(script) | set(re.findall(r"^\s*([A-Z][A-Z0-9_]*)=", script.read_text(), re.M))
    # Slurm's, the runtime's and bash's own (IFS: the script splits a time limit with it)
    slurms_own = {n for n in names if n.startswith("SLURM_") or n in settings.RUNTIME or n in ("PWD", "IFS")}
    for name in sorted(names - slurms_own):
        assert name in settings.TABLE or settings.known(name), f"agents.sbatch reads {name}: declare it"
    exported = set(re.findall(r"\bexport ([A-Z][A-Z0-9_]*)=", script.read_text()))
    exported |= {n for line in re.findall(r"^export (.*)$", script.read_text(), re.M)
                 for n in re.findall(r"\b([A-Z][A-Z0-9_]*)=", line)}
    assert {"DATA_DIR", "WANDB_DIR", "OUTPUT_DIR", "APP_MODE"} <= exported
    assert all(settings.TABLE[n].scope not in (settings.HOST, settings.BUILD) for n in exported if n in settings.TABLE)
    # what the script itself reads on the host never reaches the container's --env-file
    for name in ("ENV_FILE", "APP_PYTHON", "APP_EXEC", "REQUEUE_ON_STOP"):
        assert name in names and not passes_into_container(name)


def test_docs_settings_holds_the_current_reference():
    r = subprocess.run([sys.executable, "-m", "app", "env", "--reference"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert generated_part((REPO / "docs" / "settings.md").read_text()) == r.stdout, \
        "docs/settings.md is out of date: put `python -m app env --reference` between its markers"
    for s in settings.TABLE.values():
        assert f"`{s.name}`" in r.stdout


def test_the_export_of_the_shipped_example_evaluates_in_bash_without_an_error(tmp_path: Path):
    """agents.sbatch evals `python -m app env --export .env`: after `cp .env.example .env` bash must not
    print "UID: readonly variable" in every job's log, and UID/GID (compose's host user) stay out."""
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    env = {k: v for k, v in os.environ.items() if k not in settings.TABLE}
    export = subprocess.run([sys.executable, "-m", "app", "env", "--export", ".env"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)})
    assert export.returncode == 0, export.stderr
    assert "export WANDB_PROJECT=" in export.stdout  # the file's settings are there
    assert not re.search(r"^export (UID|GID)=", export.stdout, re.M), export.stdout
    shell = subprocess.run(["bash", "-c", 'set -e\neval "$1"\necho "$WANDB_PROJECT"', "bash", export.stdout],
                           capture_output=True, text=True, timeout=60, env=env)
    assert shell.returncode == 0 and shell.stderr == "", shell.stderr
    assert shell.stdout.strip() == settings.setting("WANDB_PROJECT").default
