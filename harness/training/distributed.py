"""Multi-process training: starting the ranks under a launcher, and what each rank does in a run.

The parent process checks everything (overrides, data, the model, the DeepSpeed config) and builds the model
once, then starts NPROC copies of `python -m harness run NAME ...` under `deepspeed` or `torchrun`. Rank 0
owns the MLflow run and the in-loop vLLM engine; the other ranks train their shard of every batch and wait
while rank 0 evaluates. With ZeRO-3 every rank takes part in gathering the full weights for that evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from harness.core.errors import ConfigError
from harness.core.files import free_port
from harness.paths import REPO_ROOT

LAUNCHERS = ("deepspeed", "torchrun")
CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
NAMED_CONFIGS = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}
LAUNCHER_ENV = "HARNESS_LAUNCHER"  # set for the ranks, so the run records how it was started


def deepspeed_config(value: str) -> Path | None:
    """The config file for the `deepspeed` field: none, zero2, zero3 (shipped) or a JSON file of your own."""
    if value == "none":
        return None
    if value in NAMED_CONFIGS:
        return NAMED_CONFIGS[value]
    found = next((p for p in (Path(value), REPO_ROOT / value) if p.is_file()), None)  # like data files
    if found is None:
        raise ConfigError(f"field 'deepspeed' = {value!r}: expected none, zero2, zero3 or a DeepSpeed JSON file "
                          f"(looked in {Path.cwd()} and {REPO_ROOT})")
    return found.resolve()


def zero_stage(path: Path) -> int:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path}: line {e.lineno}: {e.msg}") from None
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {path}: field 'zero_optimization.stage' = {stage!r} must be 0-3")
    return stage


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every parameter holds its full tensor: under ZeRO-3 each rank keeps only a shard, so all ranks must
    enter together (it is a collective) before rank 0 syncs the engine or saves a checkpoint."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def launch_command(launcher: str, nproc: int, port: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `nproc` ranks of `python -m harness ARGS`."""
    env = {LAUNCHER_ENV: launcher}
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator; it counts one device per NUMA node unless LOCAL_SIZE says how many ranks
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(nproc))
    if launcher == "deepspeed":
        executable = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        # --no_local_rank: the ranks read LOCAL_RANK from the environment instead of a --local_rank argument
        return [executable, "--no_local_rank", "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", "harness", *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port), "-m", "harness", *args], env


def launch(launcher: str, nproc: int, args: list[str]) -> int:
    """Start the ranks and wait for them; the exit status is the launcher's (non-zero if any rank failed)."""
    command, env = launch_command(launcher, nproc, free_port(), args)
    print(f"[launch] {nproc} processes with {launcher}: {' '.join(command)}", flush=True)
    return subprocess.run(command, env={**os.environ, **env}).returncode
