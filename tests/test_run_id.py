"""The run id rule (`app.runid`): W&B's own rules for run ids, and one safe path component, bounded.

    .venv/bin/python -m pytest -q tests/test_run_id.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import UserError

WANDB_RESERVED = ":;,#?/'"


@given(st.text(max_size=80))
def test_any_text_is_either_one_safe_name_or_one_line_naming_its_source(value: str):
    from app import runid

    try:
        got = runid.check(value, "WANDB_RUN_ID")
    except UserError as exc:
        message = str(exc)
        assert message.startswith("WANDB_RUN_ID=") and "\n" not in message and len(message) < 400
        return
    assert got == value and 1 <= len(got) <= runid.MAX_LENGTH
    assert Path(got).name == got and got not in (".", "..") and not got.startswith((".", "-"))
    assert not set(got) & set(WANDB_RESERVED + "\\\0") and got == got.strip() and got.isascii()


@given(st.from_regex(r"\A[a-z0-9]{8}\Z"))
def test_the_ids_wandb_and_we_make_are_accepted(value: str):
    from app import runid

    assert runid.check(value, "WANDB_RUN_ID") == value


@pytest.mark.parametrize("value", ["abc", "run-1_b.2", "A" * 64, "0"])
def test_ordinary_names_are_accepted(value: str):
    from app import runid

    assert runid.check(value, "WANDB_RUN_ID") == value


def test_a_run_id_from_a_journal_that_is_not_a_name_resumes_nothing(tmp_path: Path):
    """A trial's `resume_run` comes from the sweep's storage: a path there never reaches the file system."""
    import torch

    from app.config import Config
    from app.sweep.optuna import trial as trials

    outputs = tmp_path / "base" / "outputs"
    victim = tmp_path / "victim"
    victim.mkdir()
    outputs.mkdir(parents=True)  # the path climbs out through it
    torch.save({"model": {}, "epoch": 1}, victim / "checkpoint.pt")  # a readable checkpoint outside OUTPUT_DIR

    class Trial:
        user_attrs = {"resume_run": "../../victim"}

    config = Config(output_dir=str(outputs), epochs=3)
    assert trials._resume_from(Trial(), config, "new00001", "val_loss") == ""
    assert not (outputs / "new00001").exists()
