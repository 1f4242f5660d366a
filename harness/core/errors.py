"""Errors that stop a run, each naming what the user has to fix: all but TrainingDiverged and TrackingUnavailable
before any work."""


class ConfigError(ValueError):
    """A bad experiment name, override key, value type or field value."""


class DataError(ValueError):
    """A data file or record that cannot be used: the message names the file, line and field."""


class TrainingDiverged(RuntimeError):
    """A training loss, grad norm or eval score turned NaN or infinite (stop_on_nonfinite): names the step."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not take all of a run's writes by its end (down past the wait, or refused):
    names the file that keeps them. Also a store that kept failing when asked for a run (a resume's): names the
    run and the store."""
