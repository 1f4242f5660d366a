"""One run: the Experiment base class and its settings check, field overrides, the runner, the in-loop evaluation
callback, TRL method builders, checkpoints, MLflow tracking, multi-process launch."""
