"""The end-of-run summary: baseline against final for every quality metric, each change with its paired test; printed
on the console and kept as the MLflow run's description (a markdown table), so the run's page says what the console
said."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evaluators import EVALUATORS
from evaluators.uncertainty import Paired, format_p, holm, method_line, paired_tests
from harness.core.eval_data import metric_key
from harness.training.inloop import EvalReport, is_quality_metric
from harness.training.tracking.store import shown_tracking_uri
from harness.training.tracking.tracker import description


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    run_url: str
    experiment_name: str
    reports: list[EvalReport]
    best_checkpoint: Path | None
    best_step: int | None
    best_value: float | None
    wall_s: float
    steps_trained: int
    select_metric: str = ""
    skipped_selection: tuple[int, ...] = ()  # steps whose evaluation did not produce select_metric
    early_stopped_at: int | None = None  # the step early_stop_patience stopped training at
    runs_url: str = ""  # the experiment's runs table in the MLflow UI


@dataclass(frozen=True)
class Change:
    """One metric's row of the summary."""

    set_name: str
    samples: int  # the eval set's samples
    key: str
    base: float
    final: float
    test: Paired | None  # None where the metric has no per-sample values to test

    @property
    def delta(self) -> float:
        return self.final - self.base if not (math.isnan(self.base) or math.isnan(self.final)) else float("nan")

    @property
    def tested_over(self) -> str:
        """What the paired test was over when it is not every eval sample: an evaluator's own units (choice's
        questions, HumanEval's problems), or the samples with a value on both sides."""
        name = self.key.split("/")[-2]
        unit = EVALUATORS[name].unit_column if name in EVALUATORS else ""
        if self.test is None:
            return ""
        if unit:
            return f", over its {self.test.n} units ({unit})"
        return f", over the {self.test.n} samples with a value" if self.test.n != self.samples else ""


def _summary_groups(summary: RunSummary) -> dict[str, tuple[EvalReport, EvalReport]]:
    """Eval set name -> (baseline report, final report); one block named "" when the run has no named sets (a
    resumed run's restored reports have no per-set reports either)."""
    first, last = summary.reports[0], summary.reports[-1]
    no_set = EvalReport(first.step, {}, {}, {})
    return {n: (r, last.sets.get(n, no_set)) for n, r in first.sets.items()} or {"": (first, last)}


def summary_tests(summary: RunSummary) -> dict[str, Paired]:
    """The end-of-run verdicts: metric key -> the paired test of final against baseline, Holm-adjusted over every
    change of every eval set, one family (docs/evaluators/error-bars.md); empty after a single evaluation."""
    if len(summary.reports) < 2:
        return {}
    return holm({metric_key(k, set_name): t for set_name, (base_report, final_report) in
                 _summary_groups(summary).items()
                 for k, t in paired_tests(EVALUATORS, base_report.table, final_report.table,
                                          base_report.evaluator_tables, final_report.evaluator_tables).items()})


def changes(summary: RunSummary, tests: dict[str, Paired]) -> list[Change]:
    first, last = summary.reports[0], summary.reports[-1]
    rows = []
    for set_name, (base_report, _) in _summary_groups(summary).items():
        samples = len(base_report.table.get("id", ()))
        prefix = f"eval/{set_name}/" if set_name else "eval/"
        rows += [Change(set_name, samples, k, first.metrics[k], last.metrics[k], tests.get(k)) for k in first.metrics
                 if is_quality_metric(k) and k in last.metrics and k.startswith(prefix)]
    return rows


def print_summary(summary: RunSummary, tests: dict[str, Paired] | None = None) -> None:
    """`tests`: summary_tests(summary), when the caller has them already (they take a randomization test each)."""
    tests = summary_tests(summary) if tests is None else tests
    first, last = summary.reports[0], summary.reports[-1]
    print(f"\n== {summary.experiment_name}: baseline (step {first.step}) vs final (step {last.step})")
    if tests:
        print(f"  (delta, its 95% interval, p-value and verdict: {method_line()})")
    rows = changes(summary, tests)
    width = max([28, *(len(c.key) for c in rows)])
    shown_set = None
    for c in rows:
        if c.set_name and c.set_name != shown_set:
            print(f"  eval set {c.set_name} ({c.samples} samples):")
        shown_set = c.set_name
        change = c.test.describe() + c.tested_over if c.test is not None else f"{c.delta:+.3f}"
        print(f"  {c.key:<{width}} {c.base:10.3f} -> {c.final:10.3f}  ({change})")
    print(f"  MLflow run: {summary.run_id} in {shown_tracking_uri()}")
    served = "" if summary.run_url.startswith(shown_tracking_uri()) else "  (`make ui`)"
    print(f"  MLflow UI:  {summary.run_url}{served}")
    if summary.runs_url:
        print(f"  its runs:   {summary.runs_url}")
    if summary.best_checkpoint:
        print(f"  best checkpoint: {summary.best_checkpoint} "
              f"(step {summary.best_step}, {summary.best_value:.3f})")
    else:
        print(f"  best checkpoint: none (no evaluation produced {summary.select_metric})")
    if summary.skipped_selection:
        print(f"  selection skipped {len(summary.skipped_selection)} of {len(summary.reports)} evaluations without "
              f"{summary.select_metric} (steps {', '.join(map(str, summary.skipped_selection))}): an evaluator's "
              f"dependency failed; see the [warn] lines")
    if summary.early_stopped_at is not None:
        print(f"  stopped early at step {summary.early_stopped_at}: {summary.select_metric} stopped improving "
              f"(early_stop_patience)")
    print(f"  wall time: {summary.wall_s:.1f}s")


def summary_markdown(summary: RunSummary, tests: dict[str, Paired]) -> tuple[str, str]:
    """The summary as the run's description: a markdown table (metric, baseline, final, delta, 95% interval,
    p-value, verdict) and the best checkpoint; all of it (the artifact summary.md) and the description, cut to whole
    rows under MLflow's tag limit (tracker.description)."""
    first, last = summary.reports[0], summary.reports[-1]
    head = [f"**{summary.experiment_name}**: baseline (step {first.step}) vs final (step {last.step}), "
            f"{summary.steps_trained} steps trained, {summary.wall_s:.0f} s.", ""]
    if summary.best_checkpoint:
        head += [f"Best checkpoint: step {summary.best_step}, {summary.select_metric} = {summary.best_value:.4g}.", ""]
    else:
        head += [f"Best checkpoint: none (no evaluation produced {summary.select_metric}).", ""]
    if summary.early_stopped_at is not None:
        head += [f"Stopped early at step {summary.early_stopped_at} (early_stop_patience).", ""]
    table = ["| metric | baseline | final | delta | 95% interval | p (Holm) | verdict |",
             "| --- | ---: | ---: | ---: | --- | --- | --- |"]
    rows = []
    for c in changes(summary, tests):
        if c.test is None:
            rows.append(f"| `{c.key}` | {c.base:.3f} | {c.final:.3f} | {c.delta:+.3f} | | | not tested |")
            continue
        t = c.test
        left, right = "()" if t.open_interval else "[]"
        p = f"p{format_p(t.p_value)}" + (f" (Holm p{format_p(t.p_adjusted)})" if t.p_adjusted is not None else "")
        verdict = ("**significant**" if t.significant else "not significant") + c.tested_over
        rows.append(f"| `{c.key}` | {c.base:.3f} | {c.final:.3f} | {t.delta:+.3f} | {left}{t.low:+.3f}, "
                    f"{t.high:+.3f}{right} | {p} | {verdict} |")
    foot = ["", f"Changes tested by {method_line()}."] if tests else []
    return description(head + table, rows, foot, "summary.md")
