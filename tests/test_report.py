"""`python -m app report`: SVG charts and a static page from offline runs, with no server.

A real offline sweep (2 grid points, one agent, Fashion-MNIST) makes the runs and the journal; the report
must show both runs, sorted by the sweep's own metric, with charts whose lines hold every logged point.
Runs built in memory check what a sweep cannot easily produce: hostile names, NaN losses, unfinished runs.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import re
import shlex
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import clean_env, error_lines, run_app

from app import artifact, display, runlog, sources
from app.runs import grouping, ranking, report, svg, sweepcharts, table
from app.sweep.optuna import importance
from app.sweep.optuna import storage as sweep_storage
from app.sweep.optuna.trials import trial_rows

SVG = "{http://www.w3.org/2000/svg}"
SWEEP = """name: tiny-report
method: grid
metric: {name: val_loss, goal: minimize}
parameters:
  learning_rate: {values: [0.0005, 0.02]}
"""
EPOCHS = 3


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, fashion_dir_1k_test) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "sweep.yaml").write_text(SWEEP)
    env = clean_env(tmp, DATASET="fashion_mnist", DATA_DIR=str(fashion_dir_1k_test), EPOCHS=str(EPOCHS), TRAIN_STRIDE="50",
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


def table_rows(page: str) -> list[dict[str, str]]:
    """The runs table as {column head: cell text} per row, in the page's order."""
    found = re.search(r'<table class="runs"><thead><tr>(.*?)</tr></thead><tbody>(.*?)</tbody>', page, re.S)
    heads = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", found.group(1))]
    return [dict(zip(heads, [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]))
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", found.group(2))]


def tick_value(label: str) -> float:
    return float(label[:-1]) * {"k": 1e3, "M": 1e6}[label[-1]] if label[-1] in "kM" else float(label)


@pytest.mark.slow
def test_report_renders_the_sweep(sweep_runs, tmp_path):
    out = tmp_path / "report"
    proc = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg"') == 5 and ".png" not in page  # every chart inline
    runs = {r.run_id: r for r in map(runlog.read, runlog.find(sweep_runs))}
    assert len(runs) == 2

    # the table: both trials, the sweep's metric (val_loss, minimize) from its journal, best first
    assert "<th>learning_rate</th><th>val_loss</th>" in page and "(goal: minimize)" in page
    assert f"with log axes as the sweep defines them, read from its journal {sweep_runs / 'sweeps' / 'tiny-report.journal'}.</p>" in page
    rows = [(r["run"], r["learning_rate"], r["val_loss"]) for r in table_rows(page) if r["state"] == "finished"]
    assert len(rows) == 2, page
    assert float(rows[0][2]) <= float(rows[1][2])
    assert {r[1] for r in rows} == {"0.0005", "0.02"}
    # each run's trial number and seconds are those sweep-status shows (its journal's trial rows)
    journal = sweep_storage.load_study(str(sweep_runs / "sweeps" / "tiny-report.journal"), "tiny-report")
    shown = {r["run"]: (r["trial"], r["seconds"]) for r in table_rows(page)}
    assert shown == {t["run"]: (str(t["trial"]), f"{t['seconds']:.4g}") for t in trial_rows(journal)}

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
    # a 2-point grid: no importance (too few trials), a parallel line and a history point per trial
    found = ET.parse(out / "tiny-report-importance.svg").getroot()
    assert children(found, "rect", "importance") == [] and f"needs {importance.MIN_TRIALS}+ completed trials" in texts(found, "note")
    parallel = ET.parse(out / "tiny-report-parallel.svg").getroot()
    assert len(children(parallel, "polyline", "trial")) == 2
    axes = {g.get("data-name"): g for g in parallel.iter(f"{SVG}g") if g.get("class") == "axis"}
    assert [t.text for t in axes["learning_rate"].iter(f"{SVG}text") if t.get("class") == "axis-note"] == ["log scale"]
    # the metric is a range with ticks, never choices, however few runs there are
    metric_ticks = [tick_value(t.text) for t in axes["val_loss"].iter(f"{SVG}text") if t.get("class") == "tick"]
    assert len(metric_ticks) >= 3 and metric_ticks == sorted(metric_ticks)
    assert not {float(r[2]) for r in rows} <= set(metric_ticks)  # ticks, not the two values themselves
    assert f"{float(rows[0][2]):.4f}</b> (goal: minimize)" in page and f"--learning_rate={rows[0][1]}" in page
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
    group = grouping.make_group("</svg><b>sweep", hostile_runs())
    index, charts = report.page(Path("runs <here>"), [group], ["folder <x>: broken"])
    assert sorted(charts) == [f"svg-b-sweep-{kind}.svg" for kind in ("curves", "history", "importance", "parallel", "params")]
    # the page's one script is the table's sorter, a constant: nothing a run log holds becomes markup
    assert index.count("<script") == 1 and index.endswith(table.SORT_SCRIPT + "</body></html>\n")
    index = index.replace(table.SORT_SCRIPT, "")
    assert "<script" not in index and "<img" not in index and "</svg><b>" not in index
    assert '<b>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</b>' in index  # the best run, in words
    assert "<td>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</td>" in index
    for chart in charts.values():
        assert "<script" not in chart
        assert_finite_geometry(ET.fromstring(chart))  # parses: nothing user-made broke the markup
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
    parallel = ET.fromstring(charts["svg-b-sweep-parallel.svg"])
    (line,) = children(parallel, "polyline", "trial")  # the finished run only
    assert line.get("data-run") == '<script>alert("x")</script>'
    assert line.find(f"{SVG}title").text.startswith('run <script>alert("x")</script> (#1)')
    found = ET.fromstring(charts["svg-b-sweep-importance.svg"])
    assert [g.get("data-name") for g in found.iter(f"{SVG}g") if g.get("class") == "setting"] == ["optimizer"]


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
    index, _ = report.page(Path("runs"), [grouping.make_group("g", runs)], [])
    head = re.search(r"<thead><tr>(.*?)</tr></thead>", index).group(1)
    headers = re.findall(r"<th>(.*?)</th>", head)
    assert len(headers) == len(set(headers)) and "epochs" in headers and "epochs done" in headers
    done = headers.index("epochs done")
    cells = {r["run"]: r for r in table_rows(index)}
    assert cells["run0"]["epochs done"] == "1" and cells["run1"]["epochs done"] == "3" and done > headers.index("epochs")
    assert cells["run0"]["model artifact"] == "-"  # logged no artifact


# ------------------------------------------------------------------------------------------
# what a sweep found: parallel coordinates, importance, history, the best run
# ------------------------------------------------------------------------------------------

# Real offline runs of a W&B sweep (the agent gives each run WANDB_SWEEP_ID), written by the real wandb
# library, as two hosts would: every other run in a second runs folder. val_accuracy is decided by
# learning_rate alone (best at 3e-3); batch_size is noise.
WANDB_SWEEP_WRITER = r"""
import math, os, random, sys, wandb
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
os.environ["WANDB_SWEEP_ID"] = "swp12345"
for i in range(n):
    lr = 10 ** rng.uniform(-4, -1)
    run = wandb.init(project="p", dir=f"{root}/host{i % 2}", mode="offline",
                     config={"learning_rate": lr, "batch_size": rng.choice([32, 64, 128, 256]), "epochs": 2,
                             "kernels": [16, 32], "data_dir": "/data", "output_dir": "/out"})
    acc = 0.9 - 0.1 * (math.log10(lr) + 2.5) ** 2 + rng.gauss(0, 0.005)
    for e in range(2):
        run.log({"loss": 1.0 / (e + 1)}, step=10 * e)
        run.log({"epoch": e, "val_loss": 1 - acc, "val_accuracy": acc - 0.05 * (1 - e)}, step=10 * e + 5)
    run.summary["val_accuracy"] = acc
    run.finish()
"""
WANDB_SWEEP_RUNS = 24


@pytest.fixture(scope="module")
def wandb_sweep_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wandb-sweep")
    for host in ("host0", "host1"):
        (root / host).mkdir()
    proc = subprocess.run([sys.executable, "-c", WANDB_SWEEP_WRITER, str(root), str(WANDB_SWEEP_RUNS)],
                          env=clean_env(root, WANDB_SILENT="true"), cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def children(element: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in element.iter(f"{SVG}{tag}") if cls in (e.get("class") or "").split()]


def test_a_wandb_sweep_spread_over_two_runs_folders(wandb_sweep_runs, tmp_path):
    out = tmp_path / "report"
    hosts = [str(wandb_sweep_runs / "host0"), str(wandb_sweep_runs / "host1")]
    proc = run_app(["report", *hosts, "--out", str(out)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = {r.run_id: r for r in map(runlog.read, runlog.find(wandb_sweep_runs))}
    assert len(runs) == WANDB_SWEEP_RUNS and {r.sweep_id for r in runs.values()} == {"swp12345"}
    best = max(runs.values(), key=lambda r: r.summary["val_accuracy"])
    page = (out / "index.html").read_text()
    assert "<h2>wandb-sweep-swp12345</h2>" in page  # one group, both folders
    # its metric and goal are on the W&B server: what the report assumed is said, not guessed silently
    assert ('<p class="sweep-source assumed">Ranked by <b>val_accuracy (maximize)</b>, assumed: a W&amp;B sweep keeps '
            "its metric and goal on the W&amp;B server, not in its offline runs.") in page

    parallel = ET.parse(out / "wandb-sweep-swp12345-parallel.svg").getroot()
    assert_finite_geometry(parallel)
    lines = children(parallel, "polyline", "trial")
    assert len(lines) == WANDB_SWEEP_RUNS  # one line per completed run
    assert {line.get("data-run") for line in lines} == set(runs)
    titles = {line.get("data-run"): line.find(f"{SVG}title").text for line in lines}
    assert titles[best.run_id].startswith(f"run {best.run_id} ") and "learning_rate=" in titles[best.run_id]
    (top,) = children(parallel, "polyline", "best-trial")
    assert top.get("data-run") == best.run_id and top is lines[-1]  # drawn last: on top
    axes = [(g.get("data-name"), [t.text for t in g.iter(f"{SVG}text") if t.get("class") == "axis-note"][0])
            for g in parallel.iter(f"{SVG}g") if g.get("class") == "axis"]
    # most important first, the metric last; learning_rate spans 1e-4..1e-1: a log axis
    # batch_size's 4 values are evenly spaced choices, as importance treats them
    assert axes == [("learning_rate", "log scale"), ("batch_size", "choices"), ("val_accuracy", "metric, maximize")]
    ticks = [t.text for g in parallel.iter(f"{SVG}g") if g.get("data-name") == "batch_size"
             for t in g.iter(f"{SVG}text") if t.get("class") == "tick"]
    assert ticks == ["32", "64", "128", "256"]  # by value, not as text
    # the best run's vertex on the metric axis is the highest of all (maximize: larger is drawn higher)
    assert coordinates(top)[-1][1] == min(coordinates(line)[-1][1] for line in lines)

    found = ET.parse(out / "wandb-sweep-swp12345-importance.svg").getroot()
    rows = [g.get("data-name") for g in found.iter(f"{SVG}g") if g.get("class") == "setting"]
    assert rows == ["learning_rate", "batch_size"]
    assert len(children(found, "rect", "importance")) == 2 and len(children(found, "rect", "correlation")) == 2
    assert "PED-ANOVA" in " ".join(texts(found, "method"))

    history = ET.parse(out / "wandb-sweep-swp12345-history.svg").getroot()
    (panel,) = panels(history).values()
    assert len(shapes(panel, "circle", "point")) == WANDB_SWEEP_RUNS
    (so_far,) = shapes(panel, "polyline", "line")
    ys = [y for _, y in coordinates(so_far)]
    assert all(a >= b for a, b in itertools.pairwise(ys))  # best so far (maximize) never goes down the chart
    assert len(shapes(panel, "circle", "best")) == 1

    # the best run in words, with a command that trains exactly its settings
    summary = re.search(r'<p class="best-run">(.*?)</p>', page, re.S).group(1)
    assert best.run_id in summary and f"{best.summary['val_accuracy']:.4f}" in summary
    command = html.unescape(re.search(r'<pre class="retrain">(.*?)</pre>', page, re.S).group(1))
    argv = shlex.split(command.replace(" \\\n", " "))  # continuation lines, joined as a shell joins them
    assert command.splitlines()[0].startswith("python -m app train --learning_rate=")  # swept settings first
    shell = subprocess.run(["bash", "-c", command.replace("python -m app train", "printf '%s\\n'", 1)],
                           capture_output=True, text=True, timeout=30)
    assert shell.stdout.splitlines() == argv[4:]  # what bash passes on is what shlex read
    assert argv[:4] == ["python", "-m", "app", "train"]
    retrained = sources.load(argv[4:], environ={}, dotenv_path=None)
    assert retrained.learning_rate == best.config["learning_rate"]  # every digit: repr of the float
    assert retrained.batch_size == best.config["batch_size"] and retrained.kernels == (16, 32)
    assert "/data" not in command and "/out" not in command  # the training host's paths are not this host's


def test_the_page_renders_in_a_real_browser(wandb_sweep_runs, tmp_path):
    from PIL import Image, ImageStat
    from test_artifacts import browse

    out = tmp_path / "report"
    index, _ = report.render([wandb_sweep_runs / "host0", wandb_sweep_runs / "host1"], out)
    dom = browse(index, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    built = ET.fromstring(re.search(r"<svg[^>]*class=\"chart\".*?</svg>", dom.stdout, re.S).group(0))
    assert built.find(f"{SVG}text").text.endswith("every completed run through its settings to val_accuracy")
    assert len(re.findall(r'class="trial(?: best-trial)?"', dom.stdout)) == WANDB_SWEEP_RUNS and dom.stdout.count('class="setting"') == 2
    assert dom.stdout.count("<title>run ") >= 2 * WANDB_SWEEP_RUNS  # hover: parallel lines and history points
    assert 'class="retrain"' in dom.stdout

    shot = tmp_path / "report.png"
    proc = browse(index, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,1300", "--hide-scrollbars")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    # the charts sit at the top: ink there, and the best run's red line and the viridis lines are painted
    gray = image.convert("L")
    assert ImageStat.Stat(gray.crop((0, 250, 1400, 1300))).stddev[0] > 10
    colours = image.crop((0, 250, 900, 1000)).getcolors(maxcolors=1 << 20)
    assert any(r > 200 and g < 40 and b < 40 for _, (r, g, b) in colours)  # red: the best run
    assert any(r > 200 and g > 200 and b < 80 for _, (r, g, b) in colours)  # yellow: the best of viridis


def test_log_axes_follow_the_sweeps_distribution(tmp_path):
    """An offline sweep's storage says which settings are drawn log-uniform, even when the values the
    runs happened to get span less than a factor of 10."""
    from test_importance import fill_sweep

    fill_sweep(tmp_path, 3)
    runs = []
    for i, lr in enumerate((0.002, 0.004, 0.008)):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i}", group="known-answer",
                                config={"learning_rate": lr, "batch_size": 32 * (i + 1)}, exit_code=0,
                                summary={"val_loss": 1.0 + i})
        runs.append(run)
    group = grouping.make_group("known-answer", runs, "val_loss", "minimize")
    here = ranking.Sources([tmp_path / "runs"]).definition("known-answer")
    assert here.source == f"its journal {tmp_path / 'runs' / 'sweeps' / 'known-answer.journal'}" and not here.assumed
    assert grouping._log_scale(group, here.log) == {"batch_size": False, "learning_rate": True}
    elsewhere = ranking.Sources([tmp_path / "elsewhere"]).definition("known-answer")
    assert "no sweeps/known-answer.journal is beside the runs" in elsewhere.assumed
    assert grouping._log_scale(group, elsewhere.log) == {"batch_size": False, "learning_rate": False}


def test_too_few_runs_show_words_not_importance():
    runs = []
    for i in range(4):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i}", group="g", exit_code=0,
                                config={"learning_rate": 0.001 * (i + 1), "optimizer": "adam"}, summary={"val_loss": 1.0 / (i + 1)})
        runs.append(run)
    runs[0].config["optimizer"] = "sgd"
    runs[0].exit_code = None  # never finished: not a trial of the charts, so optimizer never varied among them
    index, charts = report.page(Path("runs"), [grouping.make_group("g", runs, "val_loss", "minimize")], [])
    found = ET.fromstring(charts["g-importance.svg"])
    assert children(found, "rect", "importance") == []
    notes = texts(found, "note")
    assert f"needs {importance.MIN_TRIALS}+ completed trials" in notes
    assert "never varied among the completed trials (always adam)" in notes
    assert any(f"at least {importance.MIN_TRIALS} completed trials" in t for t in texts(found, "method"))
    assert len(children(found, "rect", "correlation")) == 1  # learning_rate: 3 points are enough for a rank correlation
    assert len(children(ET.fromstring(charts["g-parallel.svg"]), "polyline", "trial")) == 3


def test_a_big_sweep_draws_its_best_runs_in_colour_over_the_rest_in_grey():
    runs = []
    for i in range(report.CURVES_IN_COLOUR + 5):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i:02d}", group="g", exit_code=0,
                                config={"learning_rate": 0.001 * (i + 1)}, summary={"val_loss": 1.0 + i})
        run.history = [{"_step": 10 * (e + 1), "epoch": e, "val_loss": 2.0 + i - e} for e in range(3)]
        runs.append(run)
    _, charts = report.page(Path("runs"), [grouping.make_group("g", runs[::-1], "val_loss", "minimize")], [])
    curves = ET.fromstring(charts["g-curves.svg"])
    assert curves.find(f"{SVG}text").text == f"g: {len(runs)} run(s), the best {report.CURVES_IN_COLOUR} in colour"
    best = [r.run_id for r in runs[:report.CURVES_IN_COLOUR]]  # lowest val_loss first
    assert [g.get("data-run") for g in curves.iter(f"{SVG}g") if g.get("class") == "legend-entry"] == best
    rest = [g for g in curves.iter(f"{SVG}g") if g.get("class") == "legend-rest"]
    assert len(rest) == 1 and rest[0].find(f"{SVG}text").text == "the other 5 runs (table below)"
    val_loss = panels(curves)["val_loss"]
    lines = shapes(val_loss, "polyline", "line")
    assert [e.get("data-run") for e in lines] == [r.run_id for r in runs[report.CURVES_IN_COLOUR:]] + best  # grey under
    assert {e.get("stroke") for e in lines[:5]} == {report.GREY} and report.GREY not in {e.get("stroke") for e in lines[5:]}
    assert all(len(coordinates(e)) == 3 for e in lines)  # every run's every epoch is drawn
    points = shapes(val_loss, "circle", "point")
    assert {e.get("data-run") for e in points} == set(best) and len(points) == 3 * len(best)


def test_the_render_benchmark_runs(tmp_path):
    """bench/report_sweep.py end to end on a small sweep (no timing asserted: the numbers are the machine's)."""
    proc = subprocess.run([sys.executable, str(Path(report.__file__).parents[2] / "bench" / "report_sweep.py"),
                           "--trials", "40", "--repeats", "1"], env=clean_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report of 40 completed trials (3 swept settings)" in proc.stdout and "whole page: median" in proc.stdout
    assert "bench-sweep-parallel.svg" in proc.stdout and "importance: median" in proc.stdout


def test_pruned_and_failed_runs_are_not_trials_and_an_absurd_value_gets_no_command():
    runs = []
    for i, (exit_code, pruned) in enumerate([(0, False), (0, True), (1, False), (0, False)]):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i}", group="g", exit_code=exit_code,
                                config={"learning_rate": 0.001 * (i + 1)}, summary={"val_loss": 0.1 * (4 - i)})
        if pruned:
            run.summary["pruned"] = True  # stopped by Hyperband after an early epoch: its value is not comparable
        runs.append(run)
    runs[3].config["dataset"] = "x" * 5000
    index, charts = report.page(Path("runs"), [grouping.make_group("g", runs, "val_loss", "minimize")], [])
    lines = children(ET.fromstring(charts["g-parallel.svg"]), "polyline", "trial")
    assert sorted(line.get("data-run") for line in lines) == ["r0", "r3"]
    assert "Best of 2 completed run(s): <b>r3</b>" in index
    assert 'class="retrain"' not in index and "no retrain command" in index and "x" * 300 not in index


def test_a_diverged_run_is_no_trial_and_the_table_says_diverged():
    # a run that diverged in its second epoch finished with exit code 0, its summary still holding the first
    # epoch's val_loss (the lowest here): it must not be ranked, let alone be the best
    runs = []
    for i, val_loss in enumerate([0.3, 0.01, 0.2]):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i}", group="g", exit_code=0,
                                config={"learning_rate": [0.001, 1e3, 0.003][i]}, summary={"val_loss": val_loss})
        runs.append(run)
    runs[1].summary.update(diverged=True, diverged_at="loss nan at step 640 (epoch 2)")
    index, charts = report.page(Path("runs"), [grouping.make_group("g", runs, "val_loss", "minimize")], [])
    lines = children(ET.fromstring(charts["g-parallel.svg"]), "polyline", "trial")
    assert sorted(line.get("data-run") for line in lines) == ["r0", "r2"]
    assert "Best of 2 completed run(s): <b>r2</b>" in index
    assert {r["run"]: r["state"] for r in table_rows(index)}["r1"] == "diverged"


# ------------------------------------------------------------------------------------------
# where a sweep's metric and goal come from: its own storage, else an assumption said on the page
# ------------------------------------------------------------------------------------------

# Real offline runs of the known-answer sweep (tests/test_importance.py) as its agents write them: the
# sweep's name as their group. val_loss and val_accuracy disagree on the best run, so ranking by the
# wrong metric shows: pg-c has the lowest val_loss, pg-b the highest val_accuracy.
PG_RUNS = {"pg-a": (0.002, 0.30, 0.80), "pg-b": (0.004, 0.45, 0.92), "pg-c": (0.008, 0.25, 0.85), "pg-d": (0.003, 0.50, 0.70)}
PG_WRITER = r"""
import json, sys, wandb
root, runs = sys.argv[1], json.loads(sys.argv[2])
for run_id, (lr, loss, acc) in runs.items():
    run = wandb.init(project="p", dir=root, mode="offline", id=run_id, group="known-answer",
                     config={"learning_rate": lr, "batch_size": 64, "epochs": 1})
    run.log({"loss": loss + 0.5}, step=1)
    run.log({"epoch": 0, "val_loss": loss, "val_accuracy": acc}, step=2)
    run.summary.update({"val_loss": loss, "val_accuracy": acc})
    run.finish()
"""


def without_storage(tmp: Path) -> dict[str, str]:
    return {k: v for k, v in clean_env(tmp).items() if k != "SWEEP_STORAGE"}  # whatever the shell running the tests has


def best_run(page: str) -> str:
    return re.search(r'<p class="best-run">Best of \d+ completed run\(s\): <b>(.*?)</b>', page).group(1)


def parallel_notes(folder: Path) -> dict[str, str]:
    parallel = ET.parse(folder / "known-answer-parallel.svg").getroot()
    return {g.get("data-name"): [t.text for t in g.iter(f"{SVG}text") if t.get("class") == "axis-note"][0]
            for g in parallel.iter(f"{SVG}g") if g.get("class") == "axis"}


def test_a_sweep_kept_in_postgresql_is_ranked_by_its_own_metric(tmp_path):
    """A val_loss/minimize sweep whose storage is PostgreSQL: SWEEP_STORAGE (as its agents had it) or
    --storage gives the report the sweep's metric, goal and log axes; without either, the page says
    that val_accuracy (maximize) was assumed and why."""
    from cluster import postgres_server
    from test_importance import fill_sweep

    runs = tmp_path / "copied-runs"  # runs gathered from the hosts: no journal came with them
    runs.mkdir()
    proc = subprocess.run([sys.executable, "-c", PG_WRITER, str(runs), json.dumps(PG_RUNS)],
                          env=clean_env(tmp_path, WANDB_SILENT="true"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with postgres_server() as url:
        fill_sweep(tmp_path, 3, storage=url)  # the sweep as its agents began it: val_loss, minimize, log-uniform lr
        by_env = run_app(["report", str(runs), "--out", str(tmp_path / "by-env")], clean_env(tmp_path, SWEEP_STORAGE=url), tmp_path)
        by_flag = run_app(["report", str(runs), "--out", str(tmp_path / "by-flag"), "--storage", url],
                          without_storage(tmp_path), tmp_path)
    unnamed = run_app(["report", str(runs), "--out", str(tmp_path / "unnamed")], without_storage(tmp_path), tmp_path)
    port = url.rsplit(":", 1)[1].split("/")[0]
    for proc, folder in ((by_env, "by-env"), (by_flag, "by-flag")):
        assert proc.returncode == 0, proc.stderr
        page = (tmp_path / folder / "index.html").read_text()
        assert best_run(page) == "pg-c" and "val_loss <b>0.2500</b> (goal: minimize)" in page
        assert "<th>learning_rate</th><th>val_loss</th>" in page
        assert ('<p class="sweep-source">Ranked by val_loss (minimize) with log axes as the sweep defines them, read from '
                f"its storage postgresql+psycopg2://sweep@127.0.0.1:{port}/postgres.</p>") in page
        # 0.002..0.008 spans 4x: only the sweep's log_uniform_values makes it a log axis
        assert parallel_notes(tmp_path / folder)["learning_rate"] == "log scale"
        rows = [r["run"] for r in table_rows(page)]
        assert rows == ["pg-c", "pg-a", "pg-b", "pg-d"]  # by val_loss, lowest first
    assert unnamed.returncode == 0, unnamed.stderr
    page = (tmp_path / "unnamed" / "index.html").read_text()
    assert best_run(page) == "pg-b" and "(goal: maximize)" in page
    note = re.search(r'<p class="sweep-source assumed">(.*?)</p>', page).group(1)
    assert note.startswith("Ranked by <b>val_accuracy (maximize)</b>, assumed: sweep &#x27;known-answer&#x27; is in no "
                           "storage named (no --storage given, SWEEP_STORAGE unset)") and "pass --storage" in note
    assert parallel_notes(tmp_path / "unnamed")["learning_rate"] != "log scale"


@pytest.mark.parametrize("server", ["silent", "closed"])
def test_a_storage_that_does_not_answer_is_one_line_not_a_hang(tmp_path, server):
    """A database host that accepts and then says nothing (or refuses) ends the report with one line
    naming the storage, password hidden, before any run is read; nothing is written."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "silent":
        listener.listen(8)  # the kernel completes the handshake; nobody ever answers
    else:
        listener.close()
    try:
        (tmp_path / "runs").mkdir()
        url = f"postgresql://sweep:s3cret@127.0.0.1:{port}/sweeps"
        # the default bound (sweep_storage.CONNECT_TIMEOUT_S) ends the wait; the subprocess timeout only catches a hang
        proc = run_app(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--storage", url],
                       clean_env(tmp_path), tmp_path, timeout=sweep_storage.CONNECT_TIMEOUT_S + 50)
    finally:
        listener.close()
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert f"postgresql+psycopg2://sweep:***@127.0.0.1:{port}/sweeps: cannot open the database" in line
    assert ("no answer from the database within" if server == "silent" else "Connection refused") in line
    assert "s3cret" not in proc.stderr and not (tmp_path / "r").exists()


def test_an_empty_storage_option_is_one_line(tmp_path):
    (tmp_path / "runs").mkdir()
    proc = run_app(["report", str(tmp_path / "runs"), "--storage", " "], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        "error: --storage is empty: give the sweep's journal file or its postgresql://user:password@host/db URL"]


def test_an_importance_under_one_percent_keeps_the_chart_well_formed():
    """`<1%` is text to escape, not markup: the standalone .svg must parse as XML."""
    from app.runs import sweepcharts

    result = importance.Importance(method="test", trials=30, settings=[
        importance.Setting("learning_rate", 0.997, -0.9), importance.Setting("kernels", 0.003, 0.01)])
    chart = ET.fromstring(sweepcharts.importance_svg("g", result, "val_loss"))
    assert "<1%" in [t.text for t in chart.iter(f"{SVG}text")]


def test_the_report_replaces_links_in_its_folder_and_never_writes_through_them(sweep_runs, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    (out / "index.html").symlink_to(victim)
    (out / "tiny-report-curves.svg").symlink_to(victim)
    proc = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "mine\n"
    assert not (out / "index.html").is_symlink() and "<svg" in (out / "index.html").read_text()
    assert not (out / "tiny-report-curves.svg").is_symlink()
    assert not list(out.glob(".*.part"))  # no temporary file left beside them


@pytest.mark.parametrize("where", ["/proc/report", "/sys/report"])
def test_a_report_folder_where_nothing_can_be_written_is_one_line(sweep_runs, tmp_path, where):
    proc = run_app(["report", str(sweep_runs), "--out", where], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert f"--out {where!r} is not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_invisible_controls_in_a_run_log_are_shown_not_obeyed():
    """A right-to-left override in a run id or a recorded setting would make the page and the retrain
    command read as something other than what they are: each is shown as its escape."""
    from app import display

    rlo = "\u202e"
    runs = hostile_runs()
    runs[0].run_id = f"ab{rlo}cd"
    runs[0].config["data_dir"] = f"/data{rlo}x"
    index, charts = report.page(Path("runs"), [grouping.make_group("g", runs)], [])
    assert rlo not in index and all(rlo not in c for c in charts.values())
    assert "ab\\u202ecd" in index
    command = display.retrain_command({"architecture": f"CNN{rlo}x", "epochs": 2}, [])
    assert rlo not in command and "$'--architecture=CNN\\u202ex'" in command
    # the form pastes into bash as the very value recorded
    echoed = subprocess.run(["bash", "-c", f"printf %s {command.split()[-1]}"], capture_output=True, text=True)
    assert echoed.stdout == f"--architecture=CNN{rlo}x"


def test_a_full_volume_under_the_report_is_one_line_and_the_old_report_stands(sweep_runs, tmp_path):
    from conftest import fill, volume

    with volume(tmp_path / "vol", "1m") as vol:
        out = vol / "report"
        first = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
        assert first.returncode == 0, first.stderr
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        fill(vol)
        proc = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
        assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
        assert f"--out {str(out)!r}: its volume is full" in proc.stderr, proc.stderr  # before any run is read
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, nothing lost


# ------------------------------------------------------------------------------------------
# the table and the charts tell the runs apart: trial numbers, one best, how each ended
# ------------------------------------------------------------------------------------------

def offline_trials() -> list[runlog.OfflineRun]:
    """Four trials of offline sweep "g" as their logs hold them (the agent names a trial's run <sweep>-<trial>):
    r1 the best completed, r2 pruned with the lowest (early, not comparable) val_loss, r3 still running,
    r0 a one-epoch run (one loss point, one val point)."""
    runs = []
    for i, (trial, seconds, val_loss) in enumerate([(3, 12.5, 0.4), (5, 30.0, 0.2), (7, 7.0, 0.01), (9, None, 0.3)]):
        run = runlog.OfflineRun(path=Path(f"offline-run-{i}"), run_id=f"r{i}", group="g", name=f"g-{trial}",
                                exit_code=None if seconds is None else 0, runtime=seconds,
                                config={"learning_rate": 0.001 * 3 ** i, "device": "auto", "cuda_graph": True},
                                summary={"val_loss": val_loss, "device": "cpu"})
        epochs = 1 if i == 0 else 3
        run.history = [row for e in range(epochs) for row in ({"_step": 10 * e + 5, "loss": 1.0 / (e + 2)},
                                                             {"_step": 10 * e + 9, "epoch": e, "val_loss": val_loss + 0.1 * (epochs - e)})]
        runs.append(run)
    runs[2].summary["pruned"] = True
    return runs


def test_the_table_shows_trial_numbers_and_seconds_as_sweep_status_and_one_best_row():
    group = grouping.make_group("g", offline_trials(), "val_loss", "minimize")
    group.trials = {"r1": {"trial": 15, "seconds": 42.0}}  # the storage's word wins: r1 was retried as trial 15
    index, _ = report.page(Path("runs"), [group], [])
    rows = {r["run"]: r for r in table_rows(index)}
    assert {k: (r["trial"], r["seconds"], r["state"]) for k, r in rows.items()} == {
        "r0": ("3", "12.5", "finished"), "r1": ("15", "42", "finished"), "r2": ("7", "7", "pruned"), "r3": ("9", "-", "killed")}
    assert index.count('<tr class="best"') == 1 and re.search(r'<tr class="best"[^>]*><td>15</td><td>r1</td>', index)
    assert "<b>r1</b> (trial 15, 42 s; folder offline-run-1)" in index and "(started" not in index
    assert "<title>run r1 (trial 15): val_loss 0.2;" in index  # the charts' hover texts too

    # runs no sweep storage numbers (a W&B sweep's): the order they started in, sorting as a number
    wandb_runs = offline_trials()
    for i, run in enumerate(wandb_runs):
        run.group, run.name, run.sweep_id = "", "", "swp1"
        run.history[0]["_timestamp"] = 1000.0 - i  # the last one started first
    index, _ = report.page(Path("runs"), [grouping.make_group("wandb-sweep-swp1", wandb_runs, "val_loss", "minimize")], [])
    assert {r["run"]: r["trial"] for r in table_rows(index)} == {"r0": "#4", "r1": "#3", "r2": "#2", "r3": "#1"}
    assert '<td data-sort="4">#4</td>' in index and "(the 3rd of 4 runs to start, 30 s;" in index


def test_only_the_sweeps_best_run_carries_the_best_alias():
    recorded = artifact.Recorded("model-r0", ["latest", "best-g"], 479_000, "d1", ["model.onnx"], {})
    assert table.model_label(recorded, best=True) == "model-r0:latest +best-g (479 kB)"
    assert table.model_label(recorded, best=False) == "model-r0:latest +was best-g (479 kB)"  # it was, when it finished
    assert recorded.aliases == ["latest", "best-g"]  # the record itself is left as it is


def test_pruned_runs_are_crosses_and_a_one_epoch_run_is_a_point():
    _, charts = report.page(Path("runs"), [grouping.make_group("g", offline_trials(), "val_loss", "minimize")], [])
    curves = ET.fromstring(charts["g-curves.svg"])
    assert_finite_geometry(curves)
    drawn = panels(curves)
    for title, chart in [(t, drawn[t]) for t in ("training loss", "val_loss")]:  # no val_accuracy was logged
        ended = shapes(chart, "path", "ended")
        assert [(e.get("data-run"), e.get("data-state")) for e in ended] == [("r2", "pruned")], title
        assert ended[0].find(f"{SVG}title").text.endswith(": pruned")
        # r0 logged one point of each: a dot, where a line of one point draws nothing
        assert shapes(chart, "polyline", "line", "r0") and len(shapes(chart, "circle", "point", "r0")) == 1, title
    legend = [e.text for g in curves.iter(f"{SVG}g") if g.get("class") == "legend-entry" for e in g.iter(f"{SVG}text")]
    assert any(label.startswith("r2 ") and label.endswith("(pruned)") for label in legend)
    assert "pruned, diverged or failed" in " ".join(texts(curves, "ended-note"))

    params = ET.fromstring(charts["g-params.svg"])
    (lr,) = panels(params).values()
    assert len(shapes(lr, "circle", "point")) == 2  # r0 and r1: completed
    (cross,) = shapes(lr, "path", "ended")
    assert cross.find(f"{SVG}title").text.startswith("r2 (pruned): learning_rate=")
    (ring,) = shapes(lr, "circle", "best")  # r1's, not the pruned run's lower value
    best = next(p for p in shapes(lr, "circle", "point") if p.find(f"{SVG}title").text.startswith("r1:"))
    assert (ring.get("cx"), ring.get("cy")) == (best.get("cx"), best.get("cy"))

    # a diverged and a failed run end in a cross too, each saying how it ended
    runs = offline_trials()
    runs[0].exit_code = 1
    runs[1].summary["diverged"] = True
    _, charts = report.page(Path("runs"), [grouping.make_group("g", runs, "val_loss", "minimize")], [])
    val_loss = panels(ET.fromstring(charts["g-curves.svg"]))["val_loss"]
    assert sorted((e.get("data-run"), e.get("data-state")) for e in shapes(val_loss, "path", "ended")) == [
        ("r0", "exit 1"), ("r1", "diverged"), ("r2", "pruned")]


def test_the_retrain_command_leaves_the_device_to_the_host_and_says_where_it_ran():
    config = {"learning_rate": 0.01, "epochs": 1, "device": "auto", "cuda_graph": True, "compile": "none",
              "channels_last": True, "gpu_memory_fraction": 0.0, "amp": "bf16"}
    command = display.retrain_command(config, ["learning_rate"])
    argv = shlex.split(command.replace(" \\\n", " "))
    assert argv[4] == "--learning_rate=0.01" and "--amp=bf16" in argv and "--epochs=1" in argv
    assert not any(a.split("=")[0][2:] in display.DEVICE_BOUND for a in argv[4:]), argv
    assert "--device=cpu" in display.retrain_command({**config, "device": "cpu"}, ["device"])  # swept: kept

    group = grouping.make_group("g", offline_trials(), "val_loss", "minimize")
    index, _ = report.page(Path("runs"), [group], [])
    shown = html.unescape(re.search(r'<pre class="retrain">(.*?)</pre>', index, re.S).group(1))
    assert "--device" not in shown and "--cuda_graph" not in shown and "--learning_rate=0.003" in shown
    assert ('<p class="ran-on">It trained on cpu with --cuda_graph=true; to repeat it on the same kind of device '
            "add --device=cpu --cuda_graph=true.</p>") in index


def test_the_importance_chart_draws_each_interval_and_says_rough():
    from test_importance import issue_sweep

    result = importance.evaluate(issue_sweep(30, 34), ["learning_rate", "batch_size", "kernels"], "minimize",
                                 {"learning_rate": True})
    chart = ET.fromstring(sweepcharts.importance_svg("t", result, "val_loss"))
    assert_finite_geometry(chart)
    settings = {g.get("data-name"): g for g in chart.iter(f"{SVG}g") if g.get("class") == "setting"}
    for s in result.settings:
        (whisker,) = children(settings[s.name], "path", "interval")
        words = " ".join(t.text or "" for t in settings[s.name].iter(f"{SVG}text"))
        assert f"({importance.interval(s)})" in words and ("rough" in words) == s.rough
    assert " ".join(texts(chart, "method")).count("A rough ranking: 30 trials, under 50") == 1


def test_the_table_sorts_in_a_real_browser(tmp_path):
    from test_artifacts import browse

    group = grouping.make_group("g", offline_trials(), "val_loss", "minimize")
    index, _ = report.page(Path("runs"), [group], [])
    # click "seconds" (ascending; "-" last), note the order, then "trial" twice (descending)
    clicks = ("<script>var heads = Array.from(document.querySelectorAll('table.runs th'));"
              "function order() { return Array.from(document.querySelectorAll('table.runs tbody tr'))"
              ".map(function (r) { return r.cells[1].textContent; }).join(' '); }"
              "function click(name) { heads.find(function (h) { return h.textContent === name; }).click(); }"
              "click('seconds'); document.body.dataset.bySeconds = order();"
              "click('trial'); click('trial'); document.body.dataset.byTrial = order();</script>")
    page = tmp_path / "index.html"
    page.write_text(index.replace("</body>", clicks + "</body>"))
    dom = browse(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-by-seconds="r2 r0 r1 r3"' in dom.stdout and 'data-by-trial="r3 r2 r1 r0"' in dom.stdout
