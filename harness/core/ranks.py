"""Which process of a multi-process run this is, read from the launcher's environment (RANK, WORLD_SIZE)."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a rank started by a launcher (even a single one)."""
    return "LOCAL_RANK" in os.environ
