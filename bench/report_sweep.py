"""How long the offline report takes to draw a large sweep, and how big the page gets.

    .venv/bin/python bench/report_sweep.py --trials 500 [--repeats 3]

Builds TRIALS completed runs of a bayes-like sweep in memory (learning_rate log-uniform, batch_size and
kernels from lists, 5 epochs of history and 20 training-loss points each, as the real runs log) and times
`app.runs.report.page` on them: every chart of the page (what the sweep found, the per-setting scatter,
the curves) and the table; reading the runs' logs is not part of it. Prints the median and the range over
the repeats, the parts' own times, and the size of each file the report would write.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import runlog  # noqa: E402
from app.runs import grouping, report, sweepcharts  # noqa: E402
from app.sweep.optuna import importance  # noqa: E402


def runs(n: int, seed: int = 0) -> list[runlog.OfflineRun]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lr = 10 ** rng.uniform(-4, -1.5)
        config = {"learning_rate": lr, "batch_size": rng.choice([32, 64, 128, 256]),
                  "kernels": rng.choice([[8, 16], [16, 32], [32, 64]]), "epochs": 5, "seed": 0}
        acc = 0.9 - 0.05 * (math.log10(lr) + 2.5) ** 2 + rng.gauss(0, 0.01)
        run = runlog.OfflineRun(path=Path(f"offline-run-20260101_{i:06d}-r{i:05d}"), run_id=f"r{i:05d}",
                                group="bench-sweep", config=config, exit_code=0, summary={"val_accuracy": acc})
        run.history = [{"_step": 25 * s, "_timestamp": 1e9 + i, "loss": 2.0 / (s + 1)} for s in range(20)]
        run.history += [{"_step": 500 + e, "epoch": e, "val_loss": 1 - acc + 0.1 / (e + 1),
                         "val_accuracy": acc - 0.02 / (e + 1)} for e in range(5)]
        out.append(run)
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    group = grouping.make_group("bench-sweep", runs(args.trials), "val_accuracy", "maximize")
    group.log = {"learning_rate": True}
    pages, parts = [], {"importance": [], "parallel": [], "history": []}
    for _ in range(args.repeats):
        seconds, (index, charts) = timed(lambda: report.page(Path("runs"), [group], []))
        pages.append(seconds)
        trials = sweepcharts.trials_of(group.runs, lambda r: r.summary["val_accuracy"])
        s, result = timed(lambda: importance.evaluate([(t.run.config, t.value) for t in trials], group.params,
                                                      group.goal, group.log))
        parts["importance"].append(s)
        names = [x.name for x in result.settings]
        parts["parallel"].append(timed(lambda: sweepcharts.parallel_svg("t", trials, names, group.metric, group.goal,
                                                                        group.log))[0])
        parts["history"].append(timed(lambda: sweepcharts.history_svg("t", trials, names, group.metric, group.goal))[0])
    print(f"report of {args.trials} completed trials ({len(group.params)} swept settings), {args.repeats} repeats")
    print(f"  whole page: median {statistics.median(pages):.2f} s [{min(pages):.2f}, {max(pages):.2f}]")
    for name, times in parts.items():
        print(f"  {name}: median {statistics.median(times):.3f} s")
    print(f"  index.html {len(index) / 1e6:.2f} MB; " +
          ", ".join(f"{name} {len(text) / 1e3:.0f} kB" for name, text in sorted(charts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
