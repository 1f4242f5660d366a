"""Reading runs back from the tracking store: one run and its state, the newest run of an experiment that a use
accepts, the metric histories of finished runs, a table a run logged."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness.core.errors import ConfigError, TrackingUnavailable
from harness.core.eval_data import parse_eval_data
from harness.training.outbox import redact
from harness.training.tracking.retries import retrying
from harness.training.tracking.store import open_client, shown_tracking_uri

LOOKUP_ATTEMPTS = 4  # a run looked up while the store fails is asked again after 1, 2 and 4 s


def find_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run `run_id`; None only when the store answers that it has no such run (MLflow's
    RESOURCE_DOES_NOT_EXIST: a typo, or a run of another store); another answer the store gives as the caller's
    error is raised as it is. A failure on the store's side or on the way (a server that does not answer, a 5xx)
    is asked again, LOOKUP_ATTEMPTS tries in all, then raised as TrackingUnavailable: read as "no such run", one
    failed lookup would turn a resume into a new run."""
    error: Exception | None = None
    for attempt in range(LOOKUP_ATTEMPTS):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        try:
            return retrying(client.get_run, run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            if e.get_http_status_code() < 500:  # the store's definite answer (a malformed id, no permission)
                raise
            error = e
        except Exception as e:  # the REST client's connection errors and timeouts are requests' own
            error = e
    raise TrackingUnavailable(
        f"could not look up run {run_id} in {redact(str(client.tracking_uri))} ({LOOKUP_ATTEMPTS} tries over "
        f"{2 ** (LOOKUP_ATTEMPTS - 1) - 1} s): {error}. Try again once the store answers")


@dataclass(frozen=True)
class RunState:
    run_id: str
    experiment: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)


def _state(client: MlflowClient, run: Run, experiment: str | None = None) -> RunState:
    name = experiment or retrying(client.get_experiment, run.info.experiment_id).name
    return RunState(run.info.run_id, name, run.info.status, dict(run.data.params), dict(run.data.tags))


def run_state(run_id: str) -> RunState | None:
    """A run's experiment, status and params; None when the store has no such (active) run."""
    client = open_client()
    run = find_run(client, run_id)
    if run is None or run.info.lifecycle_stage != "active":
        return None
    return _state(client, run)


SHOWN_REFUSALS = 5  # newer runs named in a message; the rest are counted
SEARCH_PAGE = 100  # runs read from the store at a time, newest first


def newest_run(experiment: str, refusal: Callable[[RunState], str | None], ref: str) -> RunState:
    """The newest run (by start time) of the MLflow experiment `experiment` that a use accepts: `refusal(state)`
    says why a run will not do, None when it will. Every use that names "the newest run" (resume=latest,
    run:latest:EXPERIMENT as a model) resolves it here, each with its own refusal. When newer runs were refused a
    `[latest]` line names the run chosen and the ones skipped, with why; ConfigError, beginning with `ref` (how
    the user named it), when no run will do."""
    client = open_client()
    found = retrying(client.get_experiment_by_name, experiment)
    skipped: list[str] = []
    token = None
    while found is not None:
        page = retrying(client.search_runs, [found.experiment_id], "", order_by=["attributes.start_time DESC"],
                        max_results=SEARCH_PAGE, page_token=token)
        for run in page:
            state = _state(client, run, experiment)
            why = refusal(state)
            if why is None:
                if skipped:
                    print(f"[latest] {ref}: run {state.run_id} ({state.status}); skipped newer run(s) of "
                          f"'{experiment}': {_listed(skipped)}", flush=True)
                return state
            skipped.append(f"{state.run_id} ({state.status}: {why})")
        token = page.token
        if not token:
            break
    if not skipped:
        raise ConfigError(f"{ref}: the MLflow experiment '{experiment}' has no run in {shown_tracking_uri()}")
    raise ConfigError(f"{ref}: no run of the MLflow experiment '{experiment}' in {shown_tracking_uri()} will do: "
                      f"{_listed(skipped)}")


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:SHOWN_REFUSALS])
    return shown + (f"; and {len(items) - SHOWN_REFUSALS} more" if len(items) > SHOWN_REFUSALS else "")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    experiment: str
    params: dict[str, str]
    history: dict[str, list[tuple[int, float]]]  # metric key -> (step, value) in step order


def load_runs(run_ids: list[str], experiment: str | None, keep: Callable[[str], bool], max_runs: int
              ) -> list[RunRecord]:
    """The given runs, or the newest finished runs of an MLflow experiment that logged a metric `keep` accepts,
    with the full history of those metrics."""
    client = open_client()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} in {shown_tracking_uri()}")
        runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                              order_by=["attributes.start_time DESC"], max_results=1000)
                if any(keep(k) for k in r.data.metrics)][:max_runs]
    else:
        runs = []
        for run_id in run_ids:
            if (run := find_run(client, run_id)) is None:
                raise ValueError(f"run {run_id!r} is not in {shown_tracking_uri()}")
            runs.append(run)
    names = {}
    records = []
    for run in runs:
        exp_id = run.info.experiment_id
        names.setdefault(exp_id, client.get_experiment(exp_id).name)
        history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                   for k in sorted(run.data.metrics) if keep(k)}
        records.append(RunRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8], names[exp_id],
                                 dict(run.data.params), history))
    return records


def load_table(run_id: str, artifact_file: str) -> dict[str, list] | None:
    """A table a run logged with Tracker.log_table (split-orient JSON), as columns; None when the run has no such
    artifact or it is not such a table."""
    client = open_client()
    with tempfile.TemporaryDirectory(prefix="table-") as tmp:
        try:
            path = retrying(client.download_artifacts, run_id, artifact_file, tmp)
            data = json.loads(Path(path).read_text())
        except Exception:  # MLflow raises its own error types for a missing artifact; either way there is no table
            return None
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or not isinstance(data.get("data"),
                                                                                                 list):
        return None
    columns = [str(c) for c in data["columns"]]
    return {c: [row[i] for row in data["data"]] for i, c in enumerate(columns)}


def eval_set_names(eval_data: str) -> list[str]:
    """The eval sets of a run's `eval_data` param ("" for one unnamed set)."""
    try:
        return [name for name, _ in parse_eval_data(eval_data)]
    except ConfigError:  # a param the harness did not write: read it as one unnamed set
        return [""]


def eval_tables(run_id: str, eval_data: str, step: int) -> dict[str, dict[str, list] | None]:
    """Eval set name ("" for one unnamed set) -> the per-sample table the run logged for it at `step`
    (eval_samples/[<set>/]step_NNNNNN.json), or None; the sets are those of the run's `eval_data` param."""
    return {name: load_table(run_id, f"eval_samples/{name + '/' if name else ''}step_{step:06d}.json")
            for name in eval_set_names(eval_data)}
