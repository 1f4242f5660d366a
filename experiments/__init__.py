"""One experiment class per module; the module name is the experiment's NAME (`make experiment NAME=...`).

Directories listed in HARNESS_EXPERIMENTS_PATH (separated like PATH) hold more experiment modules, so that
experiments can live outside this repository."""

import os

__path__ += [p for p in os.environ.get("HARNESS_EXPERIMENTS_PATH", "").split(os.pathsep) if p]
