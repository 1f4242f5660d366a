"""Errors that stop a run before any work, each naming what the user has to fix."""


class ConfigError(ValueError):
    """A bad experiment name, override key, value type or field value."""


class DataError(ValueError):
    """A data file or record that cannot be used: the message names the file, line and field."""
