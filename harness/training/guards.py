"""Training that diverged: a loss, grad norm or eval score that turned NaN or infinite.

Such values are logged as they are (MLflow stores NaN and inf), warned about on the console, and with
`stop_on_nonfinite` (the default) stop the run FAILED with the step named, instead of training on with every later
metric meaningless. Other train/* values the trainer logs may be NaN by design (TRL's GRPO logs NaN reward
statistics for rows no reward function scored): those are warned about only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from transformers import TrainerCallback

from harness.core.errors import TrainingDiverged
from harness.training.inloop import EvalReport, is_quality_metric

# train/* keys whose non-finite value means the weights are (or are about to be) garbage
FATAL_TRAIN_KEYS = ("train/loss", "train/train_loss", "train/grad_norm")


def nonfinite(metrics: dict) -> dict[str, float]:
    """The numeric entries of `metrics` that are NaN or infinite."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not math.isfinite(v)}


class NonFiniteGuard(TrainerCallback):
    """A trainer callback on the trainer's logs (placed after the logger, so the value is in MLflow first) and an
    eval-report listener (placed after the report is logged)."""

    def __init__(self, stop: bool):
        self.stop = stop

    def check(self, metrics: dict, step: int, fatal: Callable[[str], bool]) -> None:
        """Warn about the non-finite values in `metrics`; raise TrainingDiverged instead when one is `fatal`."""
        bad = nonfinite(metrics)
        if not bad:
            return
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        if self.stop and any(fatal(k) for k in bad):
            raise TrainingDiverged(
                f"step {step}: {shown} is not finite (NaN or infinite): training diverged, so the run stops here "
                f"(stop_on_nonfinite=true). Lower learning_rate, or set stop_on_nonfinite=false to train on")
        print(f"[warn] step {step}: {shown} is not finite (NaN or infinite); logged as such", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.check({f"train/{k}": v for k, v in (logs or {}).items()}, state.global_step,
                   lambda k: k in FATAL_TRAIN_KEYS)

    def __call__(self, report: EvalReport, _model) -> None:
        self.check({k: v for k, v in report.metrics.items() if is_quality_metric(k)}, report.step,
                   lambda k: True)
