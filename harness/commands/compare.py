"""`python -m harness compare`: runs side by side, every eval metric at baseline and final, and their curves; then
each run's final evaluation against the first run's, paired over the same eval samples (difference, 95% interval,
p-value) from the per-sample tables the runs logged.

The plot is also logged to each compared run (under `compare/`) so that the MLflow UI shows it next to the run; a
run the tracking server does not let this account write to (a READ account on a team server) keeps none, and the
comparison is printed all the same.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from evaluators import EVALUATORS
from evaluators.uncertainty import Paired, aligned_rows, holm, method_line, paired_tests
from harness.core.errors import ConfigError
from harness.core.eval_data import metric_key
from harness.core.files import check_writable_dir, check_writable_file
from harness.paths import REPO_ROOT
from harness.training.inloop import is_quality_metric
from harness.training.tracking.queries import RunRecord, eval_set_names, eval_tables, load_runs, load_table
from harness.training.tracking.runs import existing_run
from harness.training.tracking.store import auth_refusal

DEFAULT_DIR = REPO_ROOT / "outputs" / "compare"
PARENT = "parent_run"  # the param a chained stage logs (harness.training.runner): the run it started from


def compare(run_ids: list[str], experiment: str | None = None, out: str | None = None,
            max_runs: int = 10) -> tuple[str, Path, dict[str, str]]:
    """The printed table and the PNG of eval curves for these runs (or an experiment's newest finished runs), and
    why the plot was not logged to a run, by run id, where the tracking server refused it. A run given twice is
    compared once (first place kept); an `out` that cannot be written stops before any work."""
    run_ids = list(dict.fromkeys(run_ids))
    if out:
        check_writable_file(Path(out), "--out")
    else:
        check_writable_dir(DEFAULT_DIR, "the default --out directory")
    try:
        runs = load_runs(run_ids, experiment, _plotted, max_runs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    runs = [r for r in runs if r.history]
    if not runs:
        raise ConfigError("no run to compare has eval metrics (eval/<evaluator>/<metric>)")
    digest = hashlib.sha1(" ".join(sorted(r.run_id for r in runs)).encode()).hexdigest()[:10]
    png = Path(out) if out else DEFAULT_DIR / f"eval_curves_{digest}.png"
    paired, tests = format_paired(runs, {r.run_id: final_tables(r) for r in runs},
                                  {r.run_id: final_unit_tables(r) for r in runs}) if len(runs) > 1 else ([], {})
    plot_curves(runs, png, tests)
    unlogged = {}
    for run in runs:
        try:
            existing_run(run.run_id).log_artifact(str(png), "compare")
        except Exception as e:  # the server's answer (401/403) is the reason; anything else is a real failure
            if (why := auth_refusal(e)) is None:
                raise
            unlogged[run.run_id] = why
    return "\n".join([format_table(runs), *paired]), png, unlogged


INTERVAL = ("_ci_low", "_ci_high")  # the ends of each point's 95% interval (evaluators/uncertainty.py)


def _plotted(key: str) -> bool:
    """A score, or an end of its 95% interval (drawn as a band around the score's curve)."""
    return is_quality_metric(key) or (key.endswith(INTERVAL) and is_quality_metric(key.rsplit("_ci_", 1)[0]))


def _scores(run: RunRecord) -> list[str]:
    return [k for k in run.history if is_quality_metric(k)]


def final_step(run: RunRecord) -> int | None:
    steps = [s for points in run.history.values() for s, _ in points]
    return max(steps) if steps else None


def final_tables(run: RunRecord) -> dict[str, dict[str, list] | None]:
    """Eval set name ("" for one unnamed set) -> the per-sample table the run logged for it at its last evaluation
    (eval_samples/[<set>/]step_NNNNNN.json), or None; the sets are those of the run's eval_data param."""
    step = final_step(run)
    eval_data = run.params.get("eval_data", "")
    return dict.fromkeys(eval_set_names(eval_data)) if step is None else eval_tables(run.run_id, eval_data, step)


def final_unit_tables(run: RunRecord) -> dict[str, dict[str, dict[str, list]]]:
    """Eval set name -> evaluator -> the evaluator's own rows at the run's last evaluation
    (eval_samples/[<set>/]<evaluator>/step_NNNNNN.json), for the evaluators whose units are their own (HumanEval's
    problems, reward_accuracy's pairs) and that the run used."""
    step = final_step(run)
    found: dict[str, dict[str, dict[str, list]]] = {}
    for set_name in eval_set_names(run.params.get("eval_data", "")):
        prefix = f"{set_name}/" if set_name else ""
        for name, evaluator in EVALUATORS.items():
            used = any(key.startswith(metric_key(f"eval/{name}/", set_name)) for key in run.history)
            if evaluator.unit_column and used and step is not None and (
                    table := load_table(run.run_id, f"eval_samples/{prefix}{name}/step_{step:06d}.json")):
                found.setdefault(set_name, {})[name] = table
    return found


def format_paired(runs: list[RunRecord], tables: dict[str, dict[str, dict[str, list] | None]],
                  unit_tables: dict[str, dict[str, dict[str, dict[str, list]]]] | None = None
                  ) -> tuple[list[str], dict[str, dict[str, Paired]]]:
    """Each run after the first against the first, at their final evaluations and eval set by eval set (`tables`:
    run id -> final_tables; `unit_tables`: run id -> final_unit_tables): the paired difference of every metric with
    per-sample (or per-unit) values, its 95% interval and p-value (evaluators/uncertainty.py), when both runs were
    evaluated on the same samples (same ids and prompts). The metrics of one run over all its sets are one family
    for Holm's correction. Returns the lines and the tests: run id -> metric key -> its test against the first run."""
    base = runs[0]
    base_tables = tables.get(base.run_id, {"": None})
    notes: dict[tuple[str, str], str] = {}
    families: dict[str, dict[tuple[str, str], Paired]] = {}  # run id -> (set, metric key) -> test
    for run in runs[1:]:
        family: dict[tuple[str, str], Paired] = {}
        for set_name, base_table in base_tables.items():
            where = f" for eval set {set_name}" if set_name else ""
            table = tables.get(run.run_id, {}).get(set_name)
            if base_table is None:
                continue
            if table is None:
                notes[run.run_id, set_name] = f"  {_label(run)}: no per-sample table{where} at step {final_step(run)}"
            elif aligned_rows(base_table, table) is None:
                notes[run.run_id, set_name] = (f"  {_label(run)}: not evaluated on the same samples{where} (ids or "
                                               f"prompts differ): not paired")
            else:
                own = [(unit_tables or {}).get(r.run_id, {}).get(set_name) for r in (base, run)]
                family.update({(set_name, metric_key(k, set_name)): t for k, t in
                               paired_tests(EVALUATORS, base_table, table, *own).items()})
        families[run.run_id] = holm(family)
    lines = [f"paired difference vs {_label(base)} at each run's final evaluation",
             f"  ({method_line()}: one block = one run against the base, all its eval sets)"]
    for set_name, base_table in base_tables.items():
        where = f" for eval set {set_name}" if set_name else ""
        if base_table is None:
            lines.append(f"  {_label(base)} logged no per-sample table{where} at step {final_step(base)}: nothing "
                         f"to pair")
            continue
        for run in runs[1:]:
            if (run.run_id, set_name) in notes:
                lines.append(notes[run.run_id, set_name])
                continue
            table = tables[run.run_id][set_name]
            tests = {key: t for (name, key), t in families[run.run_id].items() if name == set_name}
            if not tests:
                lines.append(f"  {_label(run)}: no metric with per-sample values in both tables{where}")
                continue
            lines.append(f"  {_label(run)} (step {final_step(run)}) - {_label(base)} (step {final_step(base)}), "
                         f"{len(table.get('id', ()))} samples{where}:")
            width = max(28, *(len(k) for k in tests)) + 2
            for key, test in sorted(tests.items()):
                lines.append(f"    {key.ljust(width)}{test.base:10.3f} -> {test.new:10.3f}  ({test.describe()})")
    return lines, {run_id: {key: t for (_, key), t in family.items()} for run_id, family in families.items()}


def _label(run: RunRecord) -> str:
    return f"{run.name} ({run.run_id[:8]})" if run.name != run.run_id[:8] else run.run_id[:8]


def _cell(points: list[tuple[int, float]]) -> str:
    if not points:
        return "-"
    (_, base), (_, final) = points[0], points[-1]
    delta = final - base if not (math.isnan(base) or math.isnan(final)) else float("nan")
    return f"{base:.3f} -> {final:.3f} ({delta:+.3f})"


def _differing(runs: list[RunRecord]) -> list[str]:
    """The params whose values differ between the runs (where each run's files go aside)."""
    return sorted(k for k in {k for r in runs for k in r.params}
                  if k not in (PARENT, "output_dir") and len({r.params.get(k) for r in runs}) > 1)


def format_table(runs: list[RunRecord]) -> str:
    keys = sorted({k for r in runs for k in _scores(r)})
    width = max(28, *(len(k) for k in keys)) + 2
    col = max(26, *(len(_label(r)) for r in runs)) + 2
    lines = ["metric (baseline -> final)".ljust(width) + "".join(_label(r).ljust(col) for r in runs)]
    lines.append("".ljust(width) + "".join(f"{r.experiment}, steps {_steps(r)}".ljust(col) for r in runs))
    if any(PARENT in r.params for r in runs):  # chained stages (model=run:RUN_ID): the run each one started from
        lines.append("started from run".ljust(width) + "".join(r.params.get(PARENT, "-")[:8].ljust(col) for r in runs))
    for key in keys:
        lines.append(key.ljust(width) + "".join(_cell(r.history.get(key, [])).ljust(col) for r in runs))
    differing = _differing(runs)
    if differing:
        lines.append("params that differ:")
        for key in differing:
            lines.append(f"  {key}".ljust(width) + "".join(str(r.params.get(key, "-")).ljust(col) for r in runs))
    lines += format_chains(runs)
    return "\n".join(line.rstrip() for line in lines)


def format_chains(runs: list[RunRecord]) -> list[str]:
    """Each chain of stages among the compared runs (model=run:RUN_ID), first stage first."""
    by_id = {r.run_id: r for r in runs}
    parents = {r.params.get(PARENT) for r in runs}
    lines = []
    for last in (r for r in runs if r.run_id not in parents and r.params.get(PARENT) in by_id):
        chain = [last]
        while (parent := by_id.get(chain[0].params.get(PARENT, ""))) is not None and parent not in chain:
            chain.insert(0, parent)
        lines.append("  " + " -> ".join(f"{r.experiment} ({r.run_id[:8]})" for r in chain))
    return ["chains (each stage started from the best checkpoint of the one before):", *lines] if lines else []


def _steps(run: RunRecord) -> str:
    steps = sorted({s for points in run.history.values() for s, _ in points})
    return f"{steps[0]}-{steps[-1]}" if steps else "-"


def curve_label(run: RunRecord, differing: list[str]) -> str:
    """A run in the plot's legend: its experiment, the params in which the compared runs differ (at most three),
    its id's first 8 characters."""
    shown = [f"{k}={run.params.get(k, '-')}" for k in differing[:3]] + (["..."] if len(differing) > 3 else [])
    return " ".join([run.experiment, *shown, f"({run.run_id[:8]})"])


def plot_curves(runs: list[RunRecord], path: Path, tests: dict[str, dict[str, Paired]] | None = None) -> None:
    import matplotlib.pyplot as plt

    figure = curve_figure(runs, tests)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def curve_figure(runs: list[RunRecord], tests: dict[str, dict[str, Paired]] | None = None):
    """One panel per eval metric, one line per run (labelled by curve_label), step on the x axis, each point's 95%
    interval as a band; a star on a run's final point where the paired test (`tests`, format_paired's) finds it
    different from the first run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in runs for k in _scores(r)})
    differing = _differing(runs)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for run in runs:
            points = run.history.get(key)
            if not points:
                continue
            (line,) = ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=curve_label(run, differing))
            low, high = (dict(run.history.get(key + end, [])) for end in INTERVAL)
            band = [(s, low[s], high[s]) for s, _ in points if s in low and s in high]
            if band:
                ax.fill_between(*zip(*band, strict=True), color=line.get_color(), alpha=0.15, linewidth=0)
            test = (tests or {}).get(run.run_id, {}).get(key)
            if test is not None and test.significant:
                ax.plot(*points[-1], marker="*", markersize=12, color=line.get_color(), linestyle="none")
        ax.set_title(key.removeprefix("eval/"), fontsize=10)
        ax.set_xlabel("step")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if tests:
        labels = [*labels, f"* final point differs from {curve_label(runs[0], differing)} (paired test, Holm)"]
        handles = [*handles, plt.Line2D([], [], marker="*", markersize=10, color="grey", linestyle="none")]
    figure.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    figure.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    return figure
