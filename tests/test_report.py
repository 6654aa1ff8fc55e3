"""`python -m app report`: SVG charts and a static page from offline runs, with no server.

A real offline sweep (2 grid points, one agent, Fashion-MNIST) makes the runs and the journal; the report
must show both runs, sorted by the sweep's own metric, with charts whose lines hold every logged point.
Runs built in memory check what a sweep cannot easily produce: hostile names, NaN losses, unfinished runs.
"""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import clean_env, error_lines, run_app

from app import runlog
from app.runs import report, svg

SVG = "{http://www.w3.org/2000/svg}"
SWEEP = """name: tiny-report
method: grid
metric: {name: val_loss, goal: minimize}
parameters:
  learning_rate: {values: [0.0005, 0.02]}
"""
EPOCHS = 3


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, fashion_dir) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "sweep.yaml").write_text(SWEEP)
    env = clean_env(tmp, DATASET="fashion_mnist", DATA_DIR=str(fashion_dir), EPOCHS=str(EPOCHS), TRAIN_STRIDE="50",
                    VAL_SIZE="1000", LOG_INTERVAL="3", BATCH_SIZE="64", WATCH_LOG="none", WANDB_MODE="offline", WANDB_DIR=str(tmp / "runs"),
                    OUTPUT_DIR=str(tmp / "outputs"), SWEEP_CONFIG=str(tmp / "sweep.yaml"))
    proc = run_app(["offline-agent"], env, tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs"


def panels(svg: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-title"): g for g in svg.iter(f"{SVG}g") if g.get("class") == "panel"}


def shapes(panel: ET.Element, tag: str, cls: str, run_id: str | None = None) -> list[ET.Element]:
    return [e for e in panel.iter(f"{SVG}{tag}")
            if e.get("class") == cls and (run_id is None or e.get("data-run") == run_id)]


def texts(panel: ET.Element, cls: str) -> list[str]:
    return [e.text for e in panel.iter(f"{SVG}text") if e.get("class") == cls]


def coordinates(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def assert_finite_geometry(svg: ET.Element) -> None:
    for element in svg.iter():
        for name in ("x", "y", "cx", "cy", "x1", "y1", "x2", "y2", "points"):
            numbers = re.split(r"[ ,]+", element.get(name, "0").strip())
            assert all(math.isfinite(float(n)) for n in numbers), (element.tag, name, element.get(name))


def tick_value(label: str) -> float:
    return float(label[:-1]) * {"k": 1e3, "M": 1e6}[label[-1]] if label[-1] in "kM" else float(label)


@pytest.mark.slow
def test_report_renders_the_sweep(sweep_runs, tmp_path):
    out = tmp_path / "report"
    proc = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg"') == 2 and ".png" not in page  # both charts inline
    runs = {r.run_id: r for r in map(runlog.read, runlog.find(sweep_runs))}
    assert len(runs) == 2

    # the table: both trials, the sweep's metric (val_loss, minimize) from its journal, best first
    assert "<th>learning_rate</th><th>val_loss</th>" in page and "goal: minimize val_loss" in page
    rows = re.findall(r"<tr><td>(\w{8})</td><td>finished</td><td>([\d.]+)</td><td>([\d.]+)</td>", page)
    assert len(rows) == 2, page
    assert float(rows[0][2]) <= float(rows[1][2])
    assert {r[1] for r in rows} == {"0.0005", "0.02"}

    curves = ET.parse(out / "tiny-report-curves.svg").getroot()
    assert_finite_geometry(curves)
    assert curves.find(f"{SVG}text").text == "tiny-report: 2 run(s)"
    charts = panels(curves)
    assert set(charts) == {"training loss", "val_loss", "val_accuracy"}
    for run_id, run in runs.items():
        # every logged training loss is a vertex of the run's line, in step order
        (loss_line,) = shapes(charts["training loss"], "polyline", "line", run_id)
        xy = coordinates(loss_line)
        assert len(xy) == len(run.metric("loss")) >= 2 * EPOCHS
        assert all(a[0] < b[0] for a, b in itertools.pairwise(xy))
        for key in ("val_loss", "val_accuracy"):
            (line,) = shapes(charts[key], "polyline", "line", run_id)
            xy = coordinates(line)
            assert len(xy) == len(shapes(charts[key], "circle", "point", run_id)) == EPOCHS
            values = [v for _, v in run.metric(key)]
            # a higher value is drawn higher up (smaller SVG y)
            for i in range(EPOCHS - 1):
                assert (values[i] > values[i + 1]) == (xy[i][1] < xy[i + 1][1]), (key, values, xy)
    for chart in charts.values():
        for axis in ("xtick", "ytick"):
            ticks = [tick_value(t) for t in texts(chart, axis)]
            assert len(ticks) >= 2 and ticks == sorted(ticks), (axis, ticks)
    assert texts(charts["val_loss"], "xtick") == ["1", "2", "3"]  # whole epochs
    assert texts(charts["val_accuracy"], "xlabel") == ["epoch"]
    legend = [e.text for g in curves.iter(f"{SVG}g") if g.get("class") == "legend-entry" for e in g.iter(f"{SVG}text")]
    assert [label.split()[0] for label in legend] == [r[0] for r in rows]  # best first, as in the table

    params = ET.parse(out / "tiny-report-params.svg").getroot()
    (lr,) = panels(params).values()
    assert texts(lr, "xlabel") == ["learning_rate (log)"]  # 0.0005..0.02 spans 40x
    assert {"0.001", "0.01"} <= set(texts(lr, "xtick"))
    points = shapes(lr, "circle", "point")
    assert len(points) == 2
    (ring,) = shapes(lr, "circle", "best")
    best = next(p for p in points if p.find(f"{SVG}title").text.startswith(rows[0][0]))
    assert (ring.get("cx"), ring.get("cy")) == (best.get("cx"), best.get("cy"))


def hostile_runs() -> list[runlog.OfflineRun]:
    evil = '<script>alert("x")</script>'
    runs = []
    for i, (run_id, optimizer, finished) in enumerate([(evil, "a&b", True), ("plain123", '"><img src=x>', False)]):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=run_id, group="</svg><b>sweep",
                                config={"optimizer": optimizer, "learning_rate": 0.01}, exit_code=0 if finished else None)
        run.history = [{"_step": 100 * s, "loss": 2.0 / s} for s in range(1, 6)]
        run.history[2]["loss"] = math.nan  # a diverging step: left out of the line, not written as "nan"
        run.history += [{"_step": 600 + e, "epoch": e, "val_loss": 1.0 / (e + 1), "val_accuracy": 0.5 + e / 10}
                        for e in range(2)]
        runs.append(run)
    return runs


def test_user_text_is_escaped_and_bad_values_are_skipped():
    group = report.make_group("</svg><b>sweep", hostile_runs())
    index, charts = report.page(Path("runs <here>"), [group], ["folder <x>: broken"])
    assert sorted(charts) == ["svg-b-sweep-curves.svg", "svg-b-sweep-params.svg"]
    assert "<script" not in index and "<img" not in index and "</svg><b>" not in index
    assert "<td>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</td>" in index
    for svg in charts.values():
        assert "<script" not in svg
        assert_finite_geometry(ET.fromstring(svg))  # parses: nothing user-made broke the markup
    curves = ET.fromstring(charts["svg-b-sweep-curves.svg"])
    assert curves.find(f"{SVG}text").text == "</svg><b>sweep: 2 run(s)"
    legend = {g.get("data-run"): g for g in curves.iter(f"{SVG}g") if g.get("class") == "legend-entry"}
    assert set(legend) == {'<script>alert("x")</script>', "plain123"}
    assert legend["plain123"].find(f"{SVG}text").text == 'plain123 optimizer="><img src=x>'
    loss = panels(curves)["training loss"]
    for run_id in legend:
        (line,) = shapes(loss, "polyline", "line", run_id)
        assert len(coordinates(line)) == 4  # 5 logged, 1 NaN
        assert (line.get("stroke-dasharray") is None) == (run_id != "plain123")  # dotted: never finished
    params = ET.fromstring(charts["svg-b-sweep-params.svg"])
    (optimizer,) = panels(params).values()  # learning_rate is the same in both: not a swept setting
    assert texts(optimizer, "xtick") == ["a&b"]  # only the finished run is a point


@pytest.mark.parametrize("values, log, integer, labels", [
    ([1500, 60000], False, False, ["0", "20k", "40k", "60k"]),
    ([1, 2, 3], False, True, ["1", "2", "3"]),
    ([0.0005, 0.02], True, False, ["0.0005", "0.001", "0.002", "0.005", "0.01", "0.02"]),
    ([0.7, 0.7], False, False, ["0.65", "0.7", "0.75"]),  # one value: still an axis
])
def test_axis_ticks_cover_the_data_with_readable_labels(values, log, integer, labels):
    axis = svg.Axis.fit(values, log=log, integer=integer)
    assert [label for _, label in axis.ticks()] == labels
    assert all(0 <= axis.frac(v) <= 1 for v in values)


def test_report_without_runs_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_app(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "no offline runs" in proc.stderr


def test_the_epochs_setting_and_the_epochs_done_are_two_columns():
    runs = []
    for i, epochs in enumerate((1, 3)):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"run{i}", group="g",
                                config={"epochs": epochs}, exit_code=0)
        run.history = [{"_step": e, "epoch": e, "val_loss": 1.0 / (e + 1)} for e in range(epochs)]
        runs.append(run)
    index, _ = report.page(Path("runs"), [report.make_group("g", runs)], [])
    head = re.search(r"<thead><tr>(.*?)</tr></thead>", index).group(1)
    headers = re.findall(r"<th>(.*?)</th>", head)
    assert len(headers) == len(set(headers)) and "epochs" in headers and "epochs done" in headers
    done = headers.index("epochs done")
    cells = {r[0]: r for r in (re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", index))}
    assert cells["run0"][done] == "1" and cells["run1"][done] == "3"
    assert cells["run0"][headers.index("model artifact")] == "-"  # logged no artifact
