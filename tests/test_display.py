"""How a recorded value reads in sweep-status, its findings and the report: one set of rules (app.display)."""

from __future__ import annotations

import pytest

from app import display


@pytest.mark.parametrize("v, number", [(3, 3.0), (0.25, 0.25), (True, None), ("0.1", None), (None, None),
                                       (float("nan"), None), (float("inf"), None), ([1.0], None)])
def test_a_number_is_finite_and_not_a_bool(v, number):
    assert display.number(v) == number


@pytest.mark.parametrize("v, text, cell", [(0.0123456, "0.01235", "0.01235"), ([16, 32], "16,32", "16,32"),
                                           ((5,), "5", "5"), (None, "None", "-"), ("relu", "relu", "relu"), (7, "7", "7")])
def test_text_and_table_cells(v, text, cell):
    assert display.text(v) == text
    assert display.cell(v) == cell


def test_a_table_can_ask_for_fixed_decimals():
    assert display.cell(0.98765, ".4f") == "0.9877" and display.cell(None, ".4f") == "-"
