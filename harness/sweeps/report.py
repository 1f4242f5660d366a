"""What a sweep leaves in its MLflow parent run: best params and value, the trials table and the study's plots."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.training.tracking.tracker import Tracker

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def log_study(study: optuna.Study, parent: Tracker) -> dict:
    """Log the study's state to the parent run and return the summary the sweep prints last."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    finished = [t for t in trials if t.state.is_finished()]
    summary = {"best_value": None, "best_params": None, "best_trial": None,
               "trials": {k: v for k, v in counts.items() if v},
               "steps_trained": sum(t.user_attrs.get("steps_trained", 0) for t in finished)}
    if counts["COMPLETE"]:
        best = study.best_trial
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        parent.log_metrics({"sweep/best_value": best.value}, len(finished))
        parent.set_tags({"best.trial": best.number, "best.run_id": best.user_attrs.get("mlflow_run_id", ""),
                         **{f"best.params.{k}": v for k, v in best.params.items()}})
    parent.log_metrics({f"sweep/trials_{k.lower()}": v for k, v in counts.items()}, len(finished))
    parent.log_dict(summary, "sweep/summary.json")
    parent.log_table(_trials_table(trials), "sweep/trials.json")
    _log_plots(study, parent)
    return summary


def _trials_table(trials: list[optuna.trial.FrozenTrial]) -> dict[str, list]:
    names = sorted({k for t in trials for k in t.params})
    table = {"number": [t.number for t in trials], "state": [t.state.name for t in trials],
             "value": [t.value for t in trials],
             "last_step": [t.last_step for t in trials],
             "steps_trained": [t.user_attrs.get("steps_trained") for t in trials],
             "mlflow_run_id": [t.user_attrs.get("mlflow_run_id") for t in trials]}
    table.update({f"params.{n}": [t.params.get(n) for t in trials] for n in names})
    return table


def _log_plots(study: optuna.Study, parent: Tracker) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for name, function in PLOTS.items():
            try:
                ax = getattr(optuna_plots, function)(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need two finished trials that differ
                print(f"[sweep] plot {name} skipped: {e}", flush=True)
                continue
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            parent.log_artifact(str(path), "sweep/plots")
