"""Where the harness reads shipped files and writes caches and outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


def cache_dir() -> Path:
    """Built models and other derived files; never committed. HARNESS_CACHE moves it (e.g. to a shared disk)."""
    return Path(os.environ.get("HARNESS_CACHE", REPO_ROOT / ".cache"))
