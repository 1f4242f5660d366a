"""Early stopping (`early_stop_patience`): training stops once select_metric has not improved for N evaluations in a
row. The run then ends as usual: the report of the step it stopped at is its final evaluation, the best checkpoint
stays, and the run says that it stopped early (a console line, the MLflow tag `early_stopped_at`)."""

from __future__ import annotations

from transformers import TrainerCallback

from harness.training.inloop import EvalReport, improves, selection_value


class EarlyStop(TrainerCallback):
    """An eval-report listener (after the report is logged) and a trainer callback placed after the in-loop
    evaluation, so that a decision made on a step's report stops training at the end of that same step.

    An evaluation without the metric (see selection_value) neither improves nor counts against the patience;
    improving means strictly better than the best value so far, the step-0 baseline included."""

    def __init__(self, metric: str, mode: str, patience: int, tracker=None):
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.tracker = tracker
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0  # evaluations in a row without improvement
        self.stopped_at: int | None = None  # the step training stopped at, when it stopped before its end

    def __call__(self, report: EvalReport, _model) -> None:
        value = selection_value(report, self.metric)
        if value is None:
            return
        if improves(value, self.best, self.mode):
            self.best, self.best_step, self.since_best = value, report.step, 0
        else:
            self.since_best += 1

    def state_dict(self) -> dict:
        """The best value, its step and the count without improvement: saved into every checkpoint, so that a resumed
        run decides as the uninterrupted one would (harness.training.resume)."""
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None or self.since_best < self.patience:
            return
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            return  # the last step: training ends here anyway, so it did not stop early
        control.should_training_stop = True
        self.stopped_at = state.global_step
        print(f"[early stop] step {state.global_step}: {self.metric} has not improved on {self.best:.4f} (step "
              f"{self.best_step}) for {self.since_best} evaluation(s) (early_stop_patience={self.patience}); "
              f"training stops here", flush=True)
        if self.tracker is not None:
            self.tracker.set_tags({"early_stopped_at": str(state.global_step)})
