"""Keeping the best checkpoint by one eval metric, replaced atomically so it is never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.training.inloop import EvalReport


class BestCheckpoint:
    def __init__(self, directory: Path, metric: str, mode: str, tokenizer, tracker=None):
        self.directory = directory
        self.metric = metric
        self.mode = mode
        self.tokenizer = tokenizer
        self.tracker = tracker
        self.step: int | None = None
        self.value: float | None = None

    def _better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def __call__(self, report: EvalReport, model) -> None:
        value = report.metrics[self.metric]
        if not self._better(value):
            return
        staging = self.directory.with_name(self.directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)  # a PEFT model saves its adapter only
        self.tokenizer.save_pretrained(staging)
        (staging / "selection.json").write_text(json.dumps(
            {"metric": self.metric, "mode": self.mode, "step": report.step, "value": value}, indent=2))
        previous = self.directory.with_name(self.directory.name + ".previous")
        if self.directory.exists():
            self.directory.rename(previous)
        staging.rename(self.directory)
        shutil.rmtree(previous, ignore_errors=True)
        self.step, self.value = report.step, value
        if self.tracker is not None:
            self.tracker.log_metrics({"best/step": report.step, "best/value": value}, report.step)
            self.tracker.set_tags({"best_checkpoint": str(self.directory.resolve())})
