"""One experiment class per module; the module name is the experiment's NAME (`make experiment NAME=...`).

Directories listed in HARNESS_EXPERIMENTS_PATH (separated like PATH) hold more experiment modules, so that
experiments can live outside this repository."""

import importlib
import inspect
import os
import pkgutil

from harness.core.errors import ConfigError
from harness.training.experiment import Experiment

__path__ += [p for p in os.environ.get("HARNESS_EXPERIMENTS_PATH", "").split(os.pathsep) if p]


def discover() -> dict[str, type[Experiment]]:
    """Every experiment class in the `experiments` package, by module name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        found[info.name] = load_class(info.name)
    return found


def load_class(name: str) -> type[Experiment]:
    if name not in {i.name for i in pkgutil.iter_modules(__path__)}:
        known = sorted(i.name for i in pkgutil.iter_modules(__path__))
        raise ConfigError(f"unknown experiment '{name}'; known: {', '.join(known)}")
    module = importlib.import_module(f"experiments.{name}")
    classes = [c for c in vars(module).values()
               if inspect.isclass(c) and issubclass(c, Experiment) and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ConfigError(f"experiments/{name}.py must define exactly one Experiment subclass, found {len(classes)}")
    return classes[0]
