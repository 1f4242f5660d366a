"""The only package that talks to MLflow, one module per concern (import the module you need):

- store: which tracking store (MLFLOW_TRACKING_URI or the embedded SQLite file) and a client for it; a SQLite
  store is created or upgraded under a file lock, and a store MLflow cannot migrate is refused with the way out.
- retries: store calls retried while SQLite is locked by another writer, with Ctrl-C held until they are done.
- tracker: Tracker, one run's writes (params, tags, metrics, tables, artifacts, its final status), through an
  outbox when the store is a server.
- runs: opening a run or reopening a resumed one (mlflow_run), ending the runs of dead processes, sending the
  writes a run kept in a file.
- queries: reading runs back: one run's state, the newest run of an experiment that a use accepts, metric
  histories, logged tables.
- registry: a run's model as an MLflow model and a registered model version.
- train_metrics: the trainer callback that sends the trainer's own logs to the run.
"""
