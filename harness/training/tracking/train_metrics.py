"""The trainer's own logs (loss, rewards, lr, ...) sent to the run as train/* metrics, with a progress line. Only
the training process imports this module: transformers takes seconds to import, and the processes that only track
(compare, a sweep's driver, a store check) never need it."""

from __future__ import annotations

from transformers import TrainerCallback

from harness.training.tracking.tracker import Tracker


class TrainMetricsLogger(TrainerCallback):
    """Sends the trainer's own logs (loss, rewards, lr, ...) to MLflow as train/* and prints a progress line."""

    def __init__(self, tracker: Tracker, print_every: int = 5, logged_through: int = -1):
        """`logged_through`: a resumed run's last step already logged; the steps up to it, trained again
        from the checkpoint, are not logged twice."""
        self.tracker = tracker
        self.print_every = print_every
        self.logged_through = logged_through

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step <= self.logged_through:
            return
        numeric = {f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, int | float)}
        self.tracker.log_metrics(numeric, state.global_step)
        if state.global_step % self.print_every == 0 and "train/loss" in numeric:
            print(f"[train] step {state.global_step}/{state.max_steps} loss {numeric['train/loss']:.4f}",
                  flush=True)
