"""Multi-process training: starting the ranks under a launcher, and what each rank does in a run.

The parent process checks everything (overrides, data, the model, the DeepSpeed config) and builds the model
once, then starts NPROC copies of `python -m harness run NAME ...` under `deepspeed` or `torchrun`. Rank 0
owns the MLflow run and the in-loop vLLM engine; the other ranks train their shard of every batch and wait
while rank 0 evaluates. With ZeRO-3 every rank takes part in gathering the full weights for that evaluation.

Across several machines (`--nnodes N --node-rank K --master-addr HOST`) the same command runs on every node; each
node's parent checks and prepares on its own machine (any node may hold global rank 0 under torchrun, see Nodes), and
its launcher joins the others: torchrun through its c10d rendezvous hosted by node 0, DeepSpeed's launcher without
ssh (`--no_ssh`, a hostfile written here listing the N nodes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from harness.core.errors import ConfigError
from harness.core.files import free_port
from harness.paths import REPO_ROOT

LAUNCHERS = ("deepspeed", "torchrun")
CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
NAMED_CONFIGS = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}
LAUNCHER_ENV = "HARNESS_LAUNCHER"  # set for the ranks, so the run records how it was started
NODES_ENV = "HARNESS_NODES"  # the number of nodes, for the run's tags
NODE_ADDR_ENV = "HARNESS_NODE_ADDR"  # this node's address on the network to node 0, for the run's tags
MASTER_PORT = 29500  # torchrun's and DeepSpeed's own default
# how long node 0's rendezvous waits for every node: each node's parent first checks and prepares on its own machine
# (imports, data, the model), which took over a minute on a loaded 2-core machine
JOIN_TIMEOUT_S = 900
T = TypeVar("T")


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


@dataclass(frozen=True)
class Nodes:
    """A run across `count` machines, as this one (`rank`) takes part in it. Node 0 hosts the rendezvous at
    `master_addr`:`master_port`. Under DeepSpeed node K's ranks are K x NPROC ... (the hostfile's order), so global
    rank 0, which owns the MLflow run and the in-loop engine, is on node 0. torchrun's c10d rendezvous numbers the
    nodes itself, in the order of their addresses (`local_addr`, compared as strings): global rank 0 is on the node
    whose address sorts first, which is why every node prepares as if it were the one."""

    count: int
    rank: int
    master_addr: str
    master_port: int
    local_addr: str  # this node's address on the route to master_addr
    interface: str  # the network interface holding local_addr


def _route_to(host: str, port: int) -> str:
    """The local address this machine sends from to `host` (a UDP socket's connect picks the route and sends
    nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def _interface_of(address: str) -> str | None:
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.family == socket.AF_INET and a.address == address for a in addrs)), None)


def _is_local(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def check_nodes(launch: str | None, count: int, rank: int, master_addr: str | None,
                master_port: int | None) -> Nodes | None:
    """The multi-node options checked against each other and this machine's network (None: one node), before
    anything is prepared or started; each refusal names the option."""
    if count == 1:
        given = [o for o, v in (("--node-rank", rank != 0), ("--master-addr", master_addr),
                                ("--master-port", master_port is not None)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with several nodes (--nnodes N, N > 1)")
        return None
    if launch is None:
        raise ConfigError(f"--nnodes {count}: a multi-node run starts its ranks under a launcher: add "
                          f"{' or '.join(f'--launch {name}' for name in LAUNCHERS)}")
    if not 0 <= rank < count:
        raise ConfigError(f"--node-rank {rank}: expected 0 to {count - 1} (--nnodes {count})")
    if not master_addr:
        raise ConfigError(f"--nnodes {count} needs --master-addr: node 0's address, as every node reaches it")
    port = MASTER_PORT if master_port is None else master_port
    if not 0 < port < 65536:
        raise ConfigError(f"--master-port {port}: expected 1-65535")
    try:
        address = socket.getaddrinfo(master_addr, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        local_addr = _route_to(address, port)
    except OSError as e:
        raise ConfigError(f"--master-addr {master_addr}: not reachable from this machine ({e.strerror or e})") from None
    if rank == 0 and not _is_local(address):
        raise ConfigError(f"--master-addr {master_addr}: node 0 (--node-rank 0) hosts the rendezvous there, but "
                          f"{address} is not an address of this machine; give node 0's own address")
    interface = _interface_of(local_addr)
    if interface is None:
        raise ConfigError(f"--master-addr {master_addr}: this machine reaches it from {local_addr}, which no network "
                          "interface here holds")
    return Nodes(count, rank, master_addr, port, local_addr, interface)


def launch_command(launcher: str, nproc: int, port: int, args: list[str], nodes: Nodes | None = None,
                   hostfile: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `nproc` ranks of `python -m harness ARGS` on this node (of
    `nodes`, when the run spans several; DeepSpeed then reads their list from `hostfile`, see write_hostfile)."""
    env = {LAUNCHER_ENV: launcher, NODES_ENV: str(nodes.count if nodes else 1)}
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator; it counts one device per NUMA node unless LOCAL_SIZE says how many ranks
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(nproc))
    if nodes is not None:
        env[NODE_ADDR_ENV] = nodes.local_addr
        # gloo binds to the address the host name resolves to, else to loopback, where the other nodes cannot
        # reach it: the interface on the route to node 0 instead (unless one is chosen already)
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", nodes.interface)
    if launcher == "deepspeed":
        executable = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        # --no_local_rank: the ranks read LOCAL_RANK from the environment instead of a --local_rank argument
        where = (["--num_gpus", str(nproc), "--master_port", str(port)] if nodes is None else
                 # each node starts its own ranks (no ssh): the hostfile's Kth line is node K
                 ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(nodes.rank),
                  "--master_addr", nodes.master_addr, "--master_port", str(nodes.master_port)])
        return [executable, "--no_local_rank", *where, "--module", "harness", *args], env
    where = (["--nproc_per_node", str(nproc), "--master_port", str(port)] if nodes is None else
             ["--nnodes", str(nodes.count), "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"{nodes.master_addr}:{nodes.master_port}", "--rdzv-id", "harness",
              # node 0 hosts the rendezvous store: torch's own test (is the endpoint this host's name?) misses an
              # address that the host name does not resolve to
              "--rdzv-conf", f"is_host={str(nodes.rank == 0).lower()},join_timeout={JOIN_TIMEOUT_S}",
              "--local-addr", nodes.local_addr])
    return [sys.executable, "-m", "torch.distributed.run", *where, "-m", "harness", *args], env


def write_hostfile(directory: Path, nodes: Nodes, nproc: int) -> Path:
    """DeepSpeed's hostfile for a launch without ssh: one line per node, NPROC slots each, in node-rank order (the
    names are only labels there: every node starts its own ranks)."""
    path = directory / "hostfile"
    path.write_text("".join(f"node{k} slots={nproc}\n" for k in range(nodes.count)))
    return path


def launch(launcher: str, nproc: int, args: list[str], nodes: Nodes | None = None) -> int:
    """Start the ranks and wait for them; the exit status is the launcher's (non-zero if any rank failed)."""
    with tempfile.TemporaryDirectory(prefix="harness-launch-") as scratch:
        hostfile = write_hostfile(Path(scratch), nodes, nproc) if nodes and launcher == "deepspeed" else None
        command, env = launch_command(launcher, nproc, free_port(), args, nodes, hostfile)
        where = f" on node {nodes.rank} of {nodes.count} ({nodes.local_addr})" if nodes else ""
        print(f"[launch] {nproc} process{'es' if nproc > 1 else ''}{where} with {launcher}: {' '.join(command)}",
              flush=True)
        return subprocess.run(command, env={**os.environ, **env}).returncode


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank; each rank passes its own (a collective: every rank calls it, at the same
    point)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
