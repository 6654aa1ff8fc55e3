"""The house's import rules (pyproject.toml's [tool.importlinter] contracts) hold, and they bite: an
import that runs back up, from the core into a wing, is reported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(folder: Path) -> subprocess.CompletedProcess:
    # run where the package lies: lint-imports imports `app` from its working folder first
    return subprocess.run([str(LINT), "--config", str(folder / "pyproject.toml"), "--no-cache"], cwd=folder,
                          capture_output=True, text=True, timeout=120)


def test_imports_run_downhill_with_no_loops():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_a_core_module_importing_a_wing_breaks_the_contract(tmp_path: Path):
    shutil.copytree(REPO / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    train = tmp_path / "app" / "train.py"
    train.write_text(train.read_text() + "\nfrom app.sweep.optuna import plan  # noqa: E402,F401\n")
    proc = lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "app.train is not allowed to import app.sweep" in proc.stdout, proc.stdout[-3000:]
