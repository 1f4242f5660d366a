"""A run's model in MLflow: logged to the run's artifacts (an MLflow transformers model, or a LoRA adapter's
files) and, when asked, registered as a new version of a registered model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mlflow.entities import RunTag

from harness.training.tracking.retries import retrying
from harness.training.tracking.store import open_client

MODEL_ARTIFACT = "model"  # where a run's MLflow model is, under its artifacts


@dataclass(frozen=True)
class LoggedModel:
    uri: str  # runs:/RUN_ID/model
    flavor: str  # transformers (an MLflow model) or adapter (the PEFT adapter's files)
    version: str | None  # NAME/VERSION in the model registry; None when not registered


def log_model(run_id: str, directory: Path, adapter: bool, tags: dict[str, str], register_as: str = "") -> LoggedModel:
    """Logs the model in `directory` to the run's artifacts under `model` and, with `register_as`, registers it as
    a new version of that registered model (created if missing) carrying `tags`. Full weights become an MLflow
    transformers-flavour model (mlflow.transformers.load_model reads it back); a LoRA adapter is logged as its own
    files, because the flavour holds an adapter only on a hub base model it can name, and the base here is often a
    local directory. Everything goes through the client, so a local store and a tracking server work alike."""
    client = open_client()
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        source = directory
        if not adapter:
            import mlflow.transformers

            source = Path(tmp) / MODEL_ARTIFACT
            # explicit requirements: inferring them imports every package transformers can use (torchvision, ...)
            requirements = [f"{p}=={metadata.version(p)}" for p in ("torch", "transformers")]
            mlflow.transformers.save_model(str(directory), str(source), task="text-generation",
                                           pip_requirements=requirements, metadata=dict(tags))
        retrying(client.log_artifacts, run_id, str(source), MODEL_ARTIFACT)
    uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    flavor = "adapter" if adapter else "transformers"
    version = None
    if register_as:
        from mlflow.exceptions import MlflowException

        try:
            retrying(client.create_registered_model, register_as)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = retrying(client.get_run, run_id).info.artifact_uri
        made = retrying(client.create_model_version, register_as, f"{artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
                         tags=tags)
        version = f"{register_as}/{made.version}"
    run_tags = {"model.logged": uri, "model.flavor": flavor, **({"model.registered": version} if version else {})}
    retrying(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return LoggedModel(uri, flavor, version)
