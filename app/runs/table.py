"""The report's table of runs (app.runs.report): one row per run, sortable by any column in the browser.

    from app.runs import table
    html_text = table.runs_table(group, best_run_id)   # escaped HTML; SORT_SCRIPT once per page makes it sortable

Each row: the trial number and seconds as `sweep-status` shows them (app.runs.grouping.trial_number,
seconds), how the run ended, its swept settings, the metric and its model artifact. ONE row is marked
best: the sweep's best completed run; a `best-<sweep>` alias another run's artifact was given when it
finished (it was the best so far then) reads "was best-<sweep>". Sorting is a small inline script: the
page stays one file that works offline, and every text in it is still escaped (the script is a constant).
"""

from __future__ import annotations

import dataclasses

from app import artifact, display
from app.runs import grouping, svg, sweepcharts
from app.runs.grouping import Group

# Click a column's head to sort by it, again to reverse. A cell's data-sort (a number) wins over its text;
# numbers sort before words ("-", "killed"), so missing values stay at the end either way.
SORT_SCRIPT = """<script>
document.querySelectorAll("table.runs").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows), up = th.dataset.sort !== "up";
      table.querySelectorAll("th").forEach(function (other) { delete other.dataset.sort; });
      th.dataset.sort = up ? "up" : "down";
      function key(row) {
        var cell = row.cells[column], text = cell ? (cell.dataset.sort || cell.textContent) : "";
        return /^\\s*[-+]?(\\d|\\.\\d)/.test(text) && isFinite(parseFloat(text)) ? parseFloat(text) : null;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), order;
        if (x !== null && y !== null) { order = x - y; }
        else if (x !== null || y !== null) { return x !== null ? -1 : 1; }
        else { order = a.cells[column].textContent.localeCompare(b.cells[column].textContent); }
        return up ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
</script>"""


def model_label(recorded: artifact.Recorded, best: bool) -> str:
    """An artifact's label, its best-<sweep> alias kept only on the sweep's best run ("was best-..." elsewhere)."""
    if best:
        return recorded.label()
    aliases = [f"was {a}" if a.startswith("best-") else a for a in recorded.aliases]
    return dataclasses.replace(recorded, aliases=aliases).label()


def runs_table(group: Group, best_run: str | None) -> str:
    """The group's runs, best first (trials that died with no run folder last), as a sortable HTML table."""
    order = {id(r): i + 1 for i, r in enumerate(sorted(group.runs, key=sweepcharts.started))}
    # "epochs done" (history), not "epochs": that is also the setting's name when a sweep varies it
    head = ["trial", "run", "state", *group.params, group.metric, "epochs done", "seconds", "test_accuracy",
            "model artifact", "folder"]
    rows = []
    for r in group.runs:
        number = grouping.trial_number(group, r)
        # a run with no trial number (a W&B sweep's): the order it started in, "#3", sorting as 3
        trial = (str(number), None) if number is not None else (f"#{order[id(r)]}", str(order[id(r)]))
        epochs = len([row for row in r.history if "val_loss" in row])
        best = r.run_id == best_run
        models = "; ".join(model_label(a, best) for a in artifact.recorded(r.path)) or "-"
        cells = [trial, (r.run_id, None), (grouping.state(r), None),
                 *[(sweepcharts.short(r.config.get(k), ".3g"), None) for k in group.params],
                 (display.cell(grouping.value(r, group.metric), ".4f"), None), (str(epochs), None),
                 (display.cell(grouping.seconds(group, r), ".4g"), None),
                 (display.cell(r.summary.get("test_accuracy"), ".4f"), None), (models, None), (r.path.name, None)]
        rows.append((' class="best" title="the sweep\'s best run"' if best else "", cells))
    listed = {r.run_id for r in group.runs}
    for d in group.died:
        if d["run"] not in listed:
            rows.append(("", [(str(d["trial"]), None) if "trial" in d else ("-", None), (d["run"] or "-", None),
                              (d["state"].lower(), None), *[("", None) for _ in group.params], ("", None), ("", None),
                              (display.cell(d.get("seconds"), ".4g"), None), ("", None), ("", None),
                              ("(no run folder)", None)]))
    body = "\n".join(f"<tr{attrs}>" + "".join(
        f'<td data-sort="{svg.esc(sort)}">{svg.esc(text)}</td>' if sort is not None else f"<td>{svg.esc(text)}</td>"
        for text, sort in cells) + "</tr>" for attrs, cells in rows)
    note = ('<p class="table-note">Click a column\'s head to sort by it. Trial and seconds as sweep-status shows '
            'them; "#3": the third run to start, where no sweep storage numbers the runs. The green row is the '
            "sweep's best run.</p>")
    return (note + '<table class="runs"><thead><tr>' + "".join(f"<th>{svg.esc(h)}</th>" for h in head) +
            f"</tr></thead><tbody>\n{body}\n</tbody></table>")
