"""Two nodes on one machine, for real: two network namespaces made here (each a host with its own address and its
own loopback, joined to the other by a veth pair and to nothing else), PostgreSQL and the authenticated MLflow
server in the first, and one training job across both, one process per node: under torchrun's c10d rendezvous
(SIGKILLed on both nodes after its first complete checkpoint, then resumed on both) and under DeepSpeed's launcher
without ssh. What a cluster's nodes usually share besides the network is shared here too: the filesystem (the
repository, the model, output_dir) and the virtualenv. Needs root (`ip netns add`); skips with the reason
otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from harness.commands import services
from harness.paths import REPO_ROOT
from harness.training.resume import COMPLETE, last_complete

pytestmark = pytest.mark.slow

ADDRS = ("10.213.29.1", "10.213.29.2")  # node 0, node 1: a private /24 that exists only inside the namespaces
MASTER_PORT = 29400
# a namespace's ports are its own, so fixed ones clash with nothing on the machine
PG_PORT, MLFLOW_PORT = 5433, 5050
NODE_TIMEOUT_S = 600  # one launch on both nodes; about 1.5 min each on a loaded 2-core machine
# small and quick, as tests/test_distributed.py sizes its runs; lr 1e-3 moves the perplexity within a few steps, and
# keeping the *highest* makes the kept checkpoint (almost surely) a trained step's
RUN = ["eval_every=2", "eval_limit=4", "max_length=64", "batch_size=2", "evaluators=perplexity",
       "select_metric=eval/perplexity/perplexity", "select_mode=max", "learning_rate=1e-3"]
# run inside node 0's namespace (the MLflow server is reachable from there only): a launcher's runs of sft_qwen,
# with the (step, value) history of each metric named after it
QUERY = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient()
experiment = client.get_experiment_by_name("sft_qwen")
runs = client.search_runs([experiment.experiment_id]) if experiment else []
print(json.dumps([{"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags, "params": r.data.params,
                   "history": {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                               for k in sys.argv[2:]}}
                  for r in runs if r.data.tags.get("distributed.launcher") == sys.argv[1]]))
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a node's command and everything under it: torchrun starts its workers in sessions of their own, so
    the process group is not enough."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.wait()


@dataclass
class Hosts:
    namespaces: tuple[str, str]
    services: services.Services
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)  # every node command started, killed at the end

    def start(self, node: int, launcher: str, args: list[str], log: Path) -> subprocess.Popen:
        """`harness run sft_qwen ARGS` on `node`, one process there, as each machine of a cluster starts it."""
        cmd = ["ip", "netns", "exec", self.namespaces[node], sys.executable, "-m", "harness", "run", "sft_qwen",
               *args, "--launch", launcher, "--nproc", "1", "--nnodes", "2", "--node-rank", str(node),
               "--master-addr", ADDRS[0], "--master-port", str(MASTER_PORT)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def runs(self, launcher: str, *metrics: str) -> list[dict]:
        out = subprocess.run(["ip", "netns", "exec", self.namespaces[0], sys.executable, "-c", QUERY, launcher,
                              *metrics], env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    tag = os.getpid()
    namespaces = (f"harness-n0-{tag}", f"harness-n1-{tag}")
    try:
        made = _ip("netns", "add", namespaces[0])
    except FileNotFoundError:
        pytest.skip("no `ip` command (iproute2): the two hosts are network namespaces made with it")
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be made here (`ip netns add`: {made.stderr.strip()}); they need root "
                    "with CAP_SYS_ADMIN and CAP_NET_ADMIN")
    # not pytest's tmp_path: it is private to root (0700), and as root the cluster runs as the postgres user
    directory = Path(tempfile.mkdtemp(prefix="harness-two-nodes-"))
    hosts = None
    try:
        # the veth pair is made with its ends in the namespaces: nothing is added to the machine's own interfaces
        for args in (["netns", "add", namespaces[1]],
                     ["link", "add", f"h2n{tag}a", "netns", namespaces[0], "type", "veth", "peer", "name",
                      f"h2n{tag}b", "netns", namespaces[1]],
                     *(a for k, (ns, addr) in enumerate(zip(namespaces, ADDRS, strict=True)) for a in (
                         ["-n", ns, "addr", "add", f"{addr}/24", "dev", f"h2n{tag}{'ab'[k]}"],
                         ["-n", ns, "link", "set", f"h2n{tag}{'ab'[k]}", "up"],
                         ["-n", ns, "link", "set", "lo", "up"]))):  # each host's own loopback (vLLM's, gloo's)
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
        started = subprocess.run(["ip", "netns", "exec", namespaces[0], sys.executable, "-m", "harness", "services",
                                  "start", "--dir", str(directory), "--host", ADDRS[0], "--pg-port", str(PG_PORT),
                                  "--mlflow-port", str(MLFLOW_PORT), "--workers", "1"],
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        s = services.Services(directory, ADDRS[0], PG_PORT, MLFLOW_PORT, (directory / "password").read_text().strip())
        # no client settings from this shell, and no proxy: the nodes reach the MLflow server in node 0's namespace
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "OPTUNA_", "GLOO_")) and not k.lower().endswith("_proxy")}
        hosts = Hosts(namespaces, s, {**env, **s.mlflow_env(), "PYTHONUNBUFFERED": "1"})
        yield hosts
    finally:
        for proc in hosts.procs if hosts else []:
            _kill(proc)
        if (directory / "services.json").exists():
            services.stop(directory, quiet=True)  # signals and pid files: works from outside the namespace
        for ns in namespaces:
            # a process left in a namespace would keep it alive, unnamed, after `ip netns del`
            for pid in _ip("netns", "pids", ns).stdout.split():
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(int(pid)).kill()
            _ip("netns", "del", ns)  # its end of the veth pair goes with it
        shutil.rmtree(directory, ignore_errors=True)


def _logs(paths: list[Path]) -> str:
    return "\n".join(f"--- node {k} ({ADDRS[k]}), {p.name}:\n{p.read_text()[-2500:]}" for k, p in enumerate(paths))


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Both nodes' commands to their end; once one fails the other is killed (it would wait for its peer until the
    rendezvous or collective timed out)."""
    deadline = time.time() + NODE_TIMEOUT_S
    while (any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs)
           and time.time() < deadline):
        time.sleep(0.5)
    codes = [p.poll() for p in procs]
    for p in procs:
        _kill(p)
    assert codes == [0, 0], f"exit status per node {codes} (None: still running after {NODE_TIMEOUT_S}s)\n" + \
        _logs(logs)


def test_torchrun_on_two_nodes_logs_one_run_evaluated_on_node_0_and_resumes_it_on_both(hosts, tiny_model_dir,
                                                                                       tmp_path):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", "max_steps=6", "save_every=2", *RUN, f"output_dir={out}"]
    logs = [tmp_path / f"first-node{k}.log" for k in (0, 1)]
    first = [hosts.start(k, "torchrun", args, logs[k]) for k in (0, 1)]
    # both nodes lose power once the first checkpoint is complete: nothing runs a handler, the run stays RUNNING
    deadline = time.time() + NODE_TIMEOUT_S
    while not (marked := list(out.glob(f"sft_qwen/*/checkpoints/checkpoint-*/{COMPLETE}"))) \
            and all(p.poll() is None for p in first) and time.time() < deadline:
        time.sleep(0.05)
    for p in first:
        _kill(p)
    assert marked, _logs(logs)
    assert [p.returncode for p in first] == [-9, -9], _logs(logs)  # killed mid-run, not ended before
    run_dir = marked[0].parent.parent.parent
    checkpoint = last_complete(run_dir / "checkpoints")  # a newer one may have been marked before the kill landed
    (run,) = hosts.runs("torchrun")  # one run, not one per node or rank
    assert (run["id"], run["status"]) == (run_dir.name, "RUNNING")
    # rank 0, which owns the run and the in-loop engine, is node 0's (its address sorts first, see distributed.Nodes)
    assert {k: run["tags"].get(f"distributed.{k}") for k in ("world_size", "nodes", "rank0_addr")} == \
        {"world_size": "2", "nodes": "2", "rank0_addr": ADDRS[0]}
    # node 1 only trains and checkpoints its part (its RNG state) into the shared directory
    assert (checkpoint / "rng_state_1.pth").is_file() and (checkpoint / "rng_state_0.pth").is_file()
    first_text = [p.read_text() for p in logs]
    assert "[eval] step 0:" in first_text[0] and "[mlflow] run" in first_text[0]
    assert "[eval]" not in first_text[1] and "[mlflow] run" not in first_text[1]
    assert f"on node 1 of 2 ({ADDRS[1]}) with torchrun" in first_text[1] and "--rdzv-backend c10d" in first_text[1]

    logs = [tmp_path / f"resume-node{k}.log" for k in (0, 1)]
    _wait([hosts.start(k, "torchrun", [f"resume={run['id']}"], logs[k]) for k in (0, 1)], logs)
    (run,) = hosts.runs("torchrun", "eval/perplexity/perplexity", "train/loss")
    assert (run["id"], run["status"]) == (run_dir.name, "FINISHED")  # the same run, continued
    # every eval step and train step once: evaluated by node 0's rank 0 only, nothing logged twice across the kill
    perplexity = dict(run["history"]["eval/perplexity/perplexity"])
    assert sorted(s for s, _ in run["history"]["eval/perplexity/perplexity"]) == [0, 2, 4, 6]
    assert sorted(s for s, _ in run["history"]["train/loss"]) == [1, 2, 3, 4, 5, 6]
    text = [p.read_text() for p in logs]
    assert f"continuing from {checkpoint.name}" in text[0] and "[eval] step 0:" not in text[0]
    assert "[eval]" not in text[1] and "[mlflow] run" not in text[1]
    # both nodes resumed from rank 0's checkpoint, so they agree on the steps (one that did not would hang)
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-4",
                                                                                         "checkpoint-6"]
    for kept in (run_dir / "checkpoints").glob("checkpoint-*"):
        assert {"COMPLETE", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in kept.iterdir()}
    # one best checkpoint, the run's: the highest perplexity of all its evaluations, before the kill and after
    assert list(out.glob("sft_qwen/*/best")) == [run_dir / "best"]
    selection = json.loads((run_dir / "best" / "selection.json").read_text())
    best = max(perplexity, key=perplexity.get)
    assert (selection["step"], selection["value"]) == (best, pytest.approx(perplexity[best]))


def test_deepspeed_launcher_without_ssh_runs_one_job_on_two_nodes(hosts, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", "max_steps=2", "save_every=2", *RUN, f"output_dir={out}"]
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]
    _wait([hosts.start(k, "deepspeed", args, logs[k]) for k in (0, 1)], logs)
    (run,) = hosts.runs("deepspeed", "eval/time/total_s", "train/loss")
    assert run["status"] == "FINISHED" and run["params"]["deepspeed"] == "zero2"
    assert {k: run["tags"].get(f"distributed.{k}") for k in ("world_size", "nodes", "rank0_addr")} == \
        {"world_size": "2", "nodes": "2", "rank0_addr": ADDRS[0]}
    assert [sorted(s for s, _ in run["history"][k]) for k in ("eval/time/total_s", "train/loss")] == [[0, 2], [1, 2]]
    text = [p.read_text() for p in logs]
    # the hostfile's second line is node 1: its one process is global rank 1
    assert "--no_ssh --node_rank 1" in text[1] and "'node1': [1]" in text[1]
    assert "[eval]" not in text[1] and "[mlflow] run" not in text[1]
    # ZeRO-2 shards the optimizer: each node wrote its own shard into rank 0's checkpoint, what a resume reads
    shards = {p.name for p in (out / "sft_qwen" / run["id"] / "checkpoints" / "checkpoint-2").rglob("*optim*")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards


def test_each_node_checks_node_0s_address_before_it_prepares_anything(hosts):
    # on node 1: node 0's address is reachable but not its own, and no route leads to an address off the /24
    for args, message in ((["--node-rank", "0", "--master-addr", ADDRS[0]],
                           f"--master-addr {ADDRS[0]}: node 0 (--node-rank 0) hosts the rendezvous there, but "
                           f"{ADDRS[0]} is not an address of this machine"),
                          (["--node-rank", "1", "--master-addr", "10.99.0.1"],
                           "--master-addr 10.99.0.1: not reachable from this machine (Network is unreachable)")):
        out = subprocess.run(["ip", "netns", "exec", hosts.namespaces[1], sys.executable, "-m", "harness", "run",
                              "sft_qwen", "--launch", "torchrun", "--nnodes", "2", *args],
                             cwd=REPO_ROOT, env=hosts.env, capture_output=True, text=True, timeout=300)
        assert (out.returncode, out.stdout) == (2, ""), out.stdout + out.stderr
        assert f"error: {message}" in out.stderr
