"""A run's training and eval data as MLflow dataset inputs (name, digest, source, schema, row count), so that the runs
table's dataset column tells two runs apart by their data; the digest is the harness's own fingerprint of the file
(the data.*.fingerprint tags)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import pandas as pd


def dataset_input(name: str, path: str, rows: list[dict], fingerprint: str, context: str) -> dict:
    """One input for Tracker.log_inputs: `rows` as read from `path` (a file, whose absolute path is the source, or a
    hub name), under `name`; `context` is training or evaluation."""
    source = str(Path(path).resolve()) if Path(path).exists() else None  # a hub name: MLflow notes the code
    with warnings.catch_warnings():  # MLflow warns when a frame's columns hold lists (chat messages)
        warnings.simplefilter("ignore")
        entity = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name,
                                         digest=fingerprint)._to_mlflow_entity()
    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return {"dataset": {f: getattr(entity, f) for f in fields}, "context": context}
