"""Tracker: one MLflow run's writes (metrics, tables, tags, artifacts, its final status) and what it reads back of
its own history. Writes to a tracking server go through an Outbox, so a server that is down for a while costs no
data and does not stop training (harness.training.outbox); writes to a local store go straight to it."""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_LOGGED_ARTIFACTS

from harness.core.errors import TrackingUnavailable
from harness.training.outbox import FLUSH_TIMEOUT_ENV, Outbox, flush_timeout, redact, server_answers, write_items
from harness.training.tracking.retries import retrying
from harness.training.tracking.store import tracking_uri
from harness.training.tracking.view import experiment_url, run_url

TAG_VALUE_LIMIT = 8000  # MLflow cuts longer tag values
UNDELIVERED_FILE = "mlflow_undelivered.jsonl"


def description(head: list[str], rows: list[str], foot: list[str], artifact: str) -> tuple[str, str]:
    """A markdown description: all of it (for the artifact `artifact`) and what a run's page shows, cut to whole
    table rows under MLflow's tag limit, with a row saying how many are left out and where they are."""
    whole = "\n".join(head + rows + foot)
    shown, kept = whole, list(rows)
    while len(shown) > TAG_VALUE_LIMIT and kept:
        kept.pop()
        shown = "\n".join(head + kept + [f"| ... {len(rows) - len(kept)} more rows in the artifact {artifact} |"]
                          + foot)
    return whole, shown


def ui_base() -> str:
    """The MLflow UI's address: the tracking server's, or the one `make ui` serves for a local store."""
    uri = redact(tracking_uri())
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


class Tracker:
    """One MLflow run; every write goes through here. Writes to a tracking server go through an Outbox, so a
    server that is down for a while costs no data and does not stop training (harness.training.outbox); writes
    to a local store go straight to it."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        uri = str(client.tracking_uri)
        self.outbox = (Outbox(self._write, lambda: server_answers(uri), redact(uri))
                       if uri.startswith(("http://", "https://")) else None)
        # where writes the server never took are kept: the runner points it into the run's output directory
        self.undelivered_file = Path(tempfile.gettempdir()) / f"harness-{run_id}-{UNDELIVERED_FILE}"

    def url(self) -> str:
        """Where the run is in the MLflow UI: the tracking server's, or the one `make ui` serves."""
        return run_url(ui_base(), self.experiment_id, self.run_id)

    def experiment_url(self) -> str:
        """The run's experiment as a runs table with the columns that tell its runs apart."""
        return experiment_url(ui_base(), self.experiment_id)

    def _send(self, item: dict) -> None:
        if self.outbox is None:
            self._write(item)
        else:
            self.outbox.send(item)

    def _write(self, item: dict) -> None:
        """Perform one write `item` (a JSON-able dict, see the methods below, so that an undelivered one can be
        kept in a file and sent later)."""
        kind = item["kind"]
        if kind == "metrics":
            batch = [Metric(*m) for m in item["metrics"]]
            for i in range(0, len(batch), 500):  # MLflow's batch limit
                retrying(self.client.log_batch, self.run_id, metrics=batch[i : i + 500])
        elif kind == "text":
            retrying(self.client.log_text, self.run_id, item["text"], item["artifact_file"])
        elif kind == "table":
            self._write({**item, "kind": "text"})
            tags = retrying(self.client.get_run, self.run_id).data.tags
            listed = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
            entry = {"path": item["artifact_file"], "type": "table"}
            if entry not in listed and len(value := json.dumps([*listed, entry])) <= TAG_VALUE_LIMIT:
                self._write({"kind": "tags", "tags": {MLFLOW_LOGGED_ARTIFACTS: value}})
        elif kind == "dict":
            retrying(self.client.log_dict, self.run_id, item["data"], item["artifact_file"])
        elif kind == "tags":
            retrying(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in item["tags"].items()])
        elif kind == "artifact":  # the file's bytes travel in the item: the file may be gone when it is sent
            with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
                copy = Path(tmp) / item["name"]
                copy.write_bytes(base64.b64decode(item["data"]))
                retrying(self.client.log_artifact, self.run_id, str(copy), item["artifact_path"])
        elif kind == "inputs":
            retrying(self.client.log_inputs, self.run_id, datasets=[
                DatasetInput(Dataset(**d["dataset"]), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
                for d in item["datasets"]])
        elif kind == "end":
            retrying(self.client.set_terminated, self.run_id, item["status"])
        else:
            raise ValueError(f"unknown MLflow write kind {kind!r}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        # NaN and inf are logged as they are (MLflow stores both): a diverged loss must show, not vanish
        self._send({"kind": "metrics", "metrics": [[k, float(v), now, step] for k, v in metrics.items()]})

    def log_table(self, table: dict[str, list], artifact_file: str) -> None:
        """What MLflow's `log_table` writes (split-orient JSON, listed in the run's `mlflow.loggedArtifacts` tag so
        the UI shows it as a table), without its failure in long runs: once that list outgrows a tag's 8000
        characters MLflow cuts it to invalid JSON and every later `log_table` raises. Tables past that point are
        artifacts only."""
        import pandas as pd

        text = pd.DataFrame(table).to_json(orient="split", index=False, date_format="iso")
        self._send({"kind": "table", "text": text, "artifact_file": artifact_file})

    def log_inputs(self, datasets: list[dict]) -> None:
        """Datasets as the run's inputs: each {"dataset": Dataset's fields, "context": training or evaluation}
        (harness.training.tracking.datasets)."""
        self._send({"kind": "inputs", "datasets": datasets})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._send({"kind": "dict", "data": data, "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send({"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.outbox is None:  # a local store: nothing waits in a queue, so the file is logged from where it is
            retrying(self.client.log_artifact, self.run_id, path, artifact_path)
            return
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        self._send({"kind": "artifact", "name": Path(path).name, "data": data, "artifact_path": artifact_path})

    def end(self, status: str) -> None:
        """End the run with `status` once every queued write is in. A server still down after
        HARNESS_MLFLOW_FLUSH_TIMEOUT seconds leaves the run RUNNING there: the writes it did not take, the status
        last, go to `undelivered_file` (console and error name it; `python -m harness mlflow-send FILE` sends
        them), and TrackingUnavailable is raised."""
        self._send({"kind": "end", "status": status})
        if self.outbox is None:
            return
        timeout = flush_timeout()
        interrupted = None
        try:
            left = self.outbox.close(timeout)
        except KeyboardInterrupt as e:  # Ctrl-C while waiting: stop waiting, but keep what is queued
            left, interrupted = self.outbox.close(0), e
        if not left:
            return
        path = write_items([{"run_id": self.run_id, **item} for item in left], self.undelivered_file)
        refused = sum("error" in item for item in left)
        why = ", ".join([*([f"{len(left) - refused} still queued after waiting {timeout:.0f}s ({FLUSH_TIMEOUT_ENV})"]
                           if len(left) > refused else []),
                         *([f"{refused} refused, each with its error in the file"] if refused else [])])
        stays = "; the run stays RUNNING there" if any(i["kind"] == "end" and "error" not in i for i in left) else ""
        message = (f"MLflow server {redact(str(self.client.tracking_uri))} did not take {len(left)} write(s) of run "
                   f"{self.run_id} ({why}){stays}. They are kept in {path}: send them with "
                   f"`python -m harness mlflow-send {path}` once the server is back")
        print(f"[error] {message}", flush=True)
        if interrupted is not None:
            raise interrupted
        raise TrackingUnavailable(message)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in retrying(self.client.get_metric_history, self.run_id, key)]

    def histories(self, prefix: str) -> dict[str, list[tuple[int, float]]]:
        """The full history of every metric of the run whose key starts with `prefix`, in step order."""
        keys = retrying(self.client.get_run, self.run_id).data.metrics
        return {k: sorted(self.metric_history(k)) for k in sorted(keys) if k.startswith(prefix)}

    def fail_if_running(self) -> bool:
        """Mark the run FAILED if its process died before ending it; True if it did."""
        if retrying(self.client.get_run, self.run_id).info.status != "RUNNING":
            return False
        retrying(self.client.set_terminated, self.run_id, "FAILED")
        return True
