"""Keeping the best checkpoint by one eval metric, replaced atomically so it is never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.training.inloop import EvalReport, improves, selection_value


class BestCheckpoint:
    def __init__(self, directory: Path, metric: str, mode: str, tokenizer, tracker=None):
        self.directory = directory
        self.metric = metric
        self.mode = mode
        self.tokenizer = tokenizer
        self.tracker = tracker
        self.step: int | None = None
        self.value: float | None = None
        self.skipped: list[int] = []  # steps whose evaluation did not produce the metric

    def _skip(self, report: EvalReport) -> None:
        """An evaluation without the metric (a dependency such as the judge failed) takes no part in selection: warn,
        count it (best/skipped_evals, cumulative) and let training go on."""
        self.skipped.append(report.step)
        print(f"[warn] step {report.step}: {self.metric} was not produced by this evaluation (an evaluator's "
              f"dependency failed?); skipped for best-checkpoint selection ({len(self.skipped)} so far)", flush=True)
        if self.tracker is not None:
            self.tracker.log_metrics({"best/skipped_evals": len(self.skipped)}, report.step)

    def __call__(self, report: EvalReport, model) -> None:
        value = selection_value(report, self.metric)
        if value is None:
            self._skip(report)
            return
        if not improves(value, self.value, self.mode):
            return
        staging = self.directory.with_name(self.directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)  # a PEFT model saves its adapter only
        self.tokenizer.save_pretrained(staging)
        selection = {"metric": self.metric, "mode": self.mode, "step": report.step, "value": value}
        (staging / "selection.json").write_text(json.dumps(selection, indent=2))
        previous = self.directory.with_name(self.directory.name + ".previous")
        if self.directory.exists():
            self.directory.rename(previous)
        staging.rename(self.directory)
        shutil.rmtree(previous, ignore_errors=True)
        self.step, self.value = report.step, value
        if self.tracker is not None:
            # tags, not metrics: the run's page and the runs table show them as values, not one-point charts
            self.tracker.set_tags({"best_checkpoint": str(self.directory.resolve()), "best.step": str(report.step),
                                   "best.value": repr(value), "best.metric": self.metric})
            # the checkpoint's metadata where every client of the store reads it (a tracking server's artifact store);
            # the weights stay on this machine's disk
            self.tracker.log_dict({**selection, "path": str(self.directory.resolve())}, "best/selection.json")
