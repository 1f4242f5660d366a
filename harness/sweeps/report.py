"""What a sweep leaves in its MLflow parent run: best params and value, whether the best trial is real (its paired
difference from the baseline and the runner-up, harness.sweeps.winner), the trials table and the study's plots."""

from __future__ import annotations

import tempfile
import textwrap
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.sweeps.winner import Finisher, Verdict, judge_best
from harness.training.tracking.tracker import Tracker, description

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
    verdict = judge_best(finishers(trials), study.user_attrs.get("objective", ""),
                         "max" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "min")
    if verdict is not None:
        print(verdict.text(), flush=True)
        summary["verdict"] = verdict.sentence
        parent.set_tags(verdict.tags())
        parent.log_text(verdict.text() + "\n", "sweep/verdict.txt")
    parent.log_dict(summary, "sweep/summary.json")
    parent.log_table(_trials_table(trials), "sweep/trials.json")
    whole, shown = _description(study, trials, summary, verdict, parent.experiment_id)
    parent.log_text(whole, "sweep/summary.md")
    parent.set_tags({"mlflow.note.content": shown})  # the parent's page lists its trials
    _log_plots(study, parent, verdict)
    return summary


def finishers(trials: list[optuna.trial.FrozenTrial]) -> list[Finisher]:
    """The completed trials with a run, as the verdict reads them: a value is the objective at the trial's last
    report (harness.sweeps.trial), so its step is the trial's last step."""
    return [Finisher(t.number, t.value, t.last_step, t.user_attrs["mlflow_run_id"], t.intermediate_values.get(0))
            for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("mlflow_run_id")
            and t.last_step is not None]


def _trials_table(trials: list[optuna.trial.FrozenTrial]) -> dict[str, list]:
    names = sorted({k for t in trials for k in t.params})
    table = {"number": [t.number for t in trials], "state": [t.state.name for t in trials],
             "value": [t.value for t in trials],
             "last_step": [t.last_step for t in trials],
             "steps_trained": [t.user_attrs.get("steps_trained") for t in trials],
             "mlflow_run_id": [t.user_attrs.get("mlflow_run_id") for t in trials]}
    table.update({f"params.{n}": [t.params.get(n) for t in trials] for n in names})
    return table


def _description(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], summary: dict,
                 verdict: Verdict | None, experiment_id: str) -> tuple[str, str]:
    """The parent run's description: the study, its best trial and verdict, and a table of every trial (state,
    value, params, a link to its run); all of it (sweep/summary.md) and what the run's page shows."""
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items())
    objective = study.user_attrs.get("objective", "the objective")
    head = [f"**Sweep `{study.study_name}`** on {objective}: {len(trials)} trials ({counts}), "
            f"{summary['steps_trained']} steps trained.", ""]
    if summary["best_trial"] is not None:
        head += [f"Best: trial {summary['best_trial']}, {objective} = {summary['best_value']:.4g}.", ""]
    if verdict is not None:
        head += [f"Verdict: {verdict.sentence}.", ""]
    names = sorted({k for t in trials for k in t.params})
    table = [f"| trial | state | {objective} | {' | '.join(names)} | run |", "|" + " --- |" * (len(names) + 4)]

    def link(t: optuna.trial.FrozenTrial) -> str:
        run_id = t.user_attrs.get("mlflow_run_id")
        return f"[trial-{t.number}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else ""

    rows = [f"| {t.number} | {t.state.name} | {'' if t.value is None else f'{t.value:.4g}'} | "
            + " | ".join(f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, ""))
                         for n in names) + f" | {link(t)} |" for t in trials]
    return description(head + table, rows, [], "sweep/summary.md")


def _log_plots(study: optuna.Study, parent: Tracker, verdict: Verdict | None) -> None:
    """Optuna's plots; the optimization history also shows the baseline (step 0) and the verdict."""
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
            if name == "optimization_history" and verdict is not None:
                _mark_verdict(ax, verdict)
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            parent.log_artifact(str(path), "sweep/plots")


def _mark_verdict(ax, verdict: Verdict) -> None:
    if verdict.vs_baseline is not None:
        ax.axhline(verdict.vs_baseline.base, color="grey", linestyle="--", label="baseline (step 0)")
        ax.legend()
    shown = [line.strip() for line in verdict.lines if line.startswith(("  vs ", "  verdict:"))]
    ax.figure.text(0.01, -0.02, "\n".join(textwrap.fill(line, 110) for line in shown), ha="left", va="top",
                   fontsize=8)
