"""What MLflow's UI shows first: an experiment's runs table with the columns that tell its runs apart.

MLflow 3.17's UI opens every experiment in its GenAI view (traces, evaluations) unless the link says
`workflowType=machine_learning` (or the browser was switched to "Model training" once); its runs table shows no
metric or param until someone picks them. A view the UI can load from a link is a JSON experiment tag
`mlflow.sharedViewState.<key>` (what its "Share" button writes), so every run adds its select metric and the fields
it overrides to the experiment's view, and the links the harness prints open that view.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from harness.training.tracking.retries import retrying

# the kind MLflow records for an experiment of trained models; a UI without the GenAI / Model training switch opens
# the runs table by it
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
VIEW_KEY = "harness"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
WORKFLOW = "workflowType=machine_learning"
MAX_COLUMNS = 24  # the table stays readable and the tag well under MLflow's 5000-character experiment-tag limit
DATASET_COLUMN = "attributes.`Dataset`"


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: `metrics.`eval/rouge/rougeL``, `params.`seed``."""
    return f"{kind}.`{key}`"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the harness's view."""
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={VIEW_KEY}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def add_columns(client: MlflowClient, experiment: Experiment, metrics: Sequence[str], params: Sequence[str]) -> None:
    """Add `metrics` and `params` to the experiment's view (after those earlier runs added, newest runs first);
    columns past MAX_COLUMNS are left out. A view someone else broke is replaced."""
    try:
        view = json.loads(experiment.tags.get(VIEW_TAG, "{}"))
        shown = [c for c in view.get("selectedColumns", []) if isinstance(c, str)]
    except (json.JSONDecodeError, AttributeError):
        shown = []
    wanted = [DATASET_COLUMN, *(column("metrics", m) for m in metrics), *(column("params", p) for p in params)]
    columns = list(dict.fromkeys([*shown, *wanted]))[:MAX_COLUMNS]
    if columns == shown:
        return
    view = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    retrying(client.set_experiment_tag, experiment.experiment_id, VIEW_TAG, json.dumps(view))
