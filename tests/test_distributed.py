"""Data-parallel training in two processes under DeepSpeed (CPU accelerator): one MLflow run, in-loop evaluation on
rank 0 with the ZeRO-3 shards gathered, and the refusals that stop a launch before anything starts. The launch
across several nodes is built and checked here; tests/test_two_nodes.py runs it."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from experiments import load_class
from harness.commands.cli import main
from harness.commands.score import score_file
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.training import distributed
from harness.training.overrides import apply_overrides


def test_deepspeed_zero3_in_two_processes_logs_one_run_evaluated_on_the_gathered_weights(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # lr 1e-3 moves the weights visibly in 4 steps; keeping the *highest* perplexity makes the kept checkpoint
    # (almost surely) one of a trained step rather than the start
    out = subprocess.run(
        [sys.executable, "-m", "harness", "run", "sft_qwen", "--launch", "deepspeed", "--nproc", "2",
         f"model={tiny_model_dir}", "deepspeed=zero3", "max_steps=4", "eval_every=2", "eval_limit=16",
         "learning_rate=1e-3", "select_metric=eval/perplexity/perplexity", "select_mode=max", f"output_dir={tmp_path}"],
        cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])  # one, not one per rank
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2" and run.data.tags["distributed.launcher"] == "deepspeed"
    assert run.data.params["deepspeed"] == "zero3"
    perplexity = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/perplexity/perplexity")}
    assert sorted(perplexity) == [0, 2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    gathers = client.get_metric_history(run.info.run_id, "eval/time/gather_s")
    assert [m.step for m in gathers] == [0, 2, 4] and all(m.value > 0 for m in gathers)

    # The best checkpoint was saved by rank 0 inside the gather: full trained weights, not shards or the start.
    best = tmp_path / "sft_qwen" / run.info.run_id / "best"
    selection = json.loads((best / "selection.json").read_text())
    trained, start = load_file(best / "model.safetensors"), load_file(f"{tiny_model_dir}/model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    # the engine saw the trained weights change; the checkpoint holds the weights of the step it was selected at
    assert perplexity[4] != perplexity[0]
    assert any(not trained[k].equal(start[k]) for k in start) == (selection["step"] > 0)
    # ...and HF scoring those weights offline gives the perplexity the rank-0 engine measured at that step.
    eval_file = tmp_path / "eval16.jsonl"
    eval_file.write_text("".join((REPO_ROOT / "data" / "eval.jsonl").read_text().splitlines(keepends=True)[:16]))
    offline = score_file("perplexity", str(eval_file), str(best)).metrics["perplexity"]
    assert offline == pytest.approx(perplexity[selection["step"]], rel=1e-3)
    baseline = score_file("perplexity", str(eval_file), tiny_model_dir).metrics["perplexity"]
    assert perplexity[0] == pytest.approx(baseline, rel=1e-3)


def test_deepspeed_needs_a_launch_and_a_readable_config(tmp_path):
    with pytest.raises(ConfigError, match=r"sft_qwen: deepspeed=zero2 runs its ranks under a launcher: .*--launch"):
        apply_overrides(load_class("sft_qwen"), ["deepspeed=zero2"])
    with pytest.raises(ConfigError, match=r"field 'deepspeed' = 'nope.json': expected none, zero2, zero3 or a "):
        apply_overrides(load_class("sft_qwen"), ["deepspeed=nope.json"])
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(ConfigError, match=rf"DeepSpeed config {bad}: line 1: "):
        apply_overrides(load_class("sft_qwen"), [f"deepspeed={bad}"])
    bad.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match=r"'zero_optimization.stage' = 4 must be 0-3"):
        apply_overrides(load_class("sft_qwen"), [f"deepspeed={bad}"])


def test_rollout_engines_is_checked_before_a_launch():
    with pytest.raises(ConfigError, match=r"rollout_engines='per_gpu': expected one of rank0, each_rank"):
        apply_overrides(load_class("grpo_qwen"), ["rollout_engines=per_gpu"], launch="deepspeed")
    with pytest.raises(ConfigError, match=r"rollout_engines=each_rank: sft_qwen generates no rollouts"):
        apply_overrides(load_class("sft_qwen"), ["rollout_engines=each_rank"], launch="deepspeed")
    exp = apply_overrides(load_class("ppo_qwen"), ["rollout_engines=each_rank"], launch="torchrun")
    assert exp.rollout_engines == "each_rank"


@pytest.mark.slow  # the first call imports the training stack (about 9 s); the refusals themselves take ms
@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("rm_qwen", ["deepspeed=zero3"], r"rm_qwen: under ZeRO-3 .* \(reward_accuracy\) need zero2 or no DeepSpeed"),
    ("sft_qwen", ["deepspeed=zero3", "backend=hf"], r"must go through the vLLM engine \(backend=vllm, got hf\)"),
    ("grpo_qwen", ["deepspeed=zero3"], r"grpo_qwen: online RL under ZeRO-3: rank 0 syncs the rollout engine"),
    ("sft_qwen", ["--nnodes", "2"], r"--nnodes 2 needs --master-addr: node 0's address"),
])
def test_launch_refuses_what_ranks_cannot_do_before_starting_them(name, overrides, message, tmp_path, monkeypatch,
                                                                  capsys):
    # the CLI's own entry point in this process: the launcher's parent is what refuses, before any rank starts
    # (test_overrides runs one refusal through a real `python -m harness` subprocess)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(["run", name, "--launch", "torchrun", *overrides, f"output_dir={tmp_path}"])
    out, err = capsys.readouterr()
    assert code == 2 and "[launch]" not in out
    assert re.search(message, err), err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("launch", "nnodes", "node_rank", "master_addr", "master_port", "message"), [
    (None, 2, 0, "127.0.0.1", None, r"^--nnodes 2: .* add --launch deepspeed or --launch torchrun$"),
    ("torchrun", 2, 2, "127.0.0.1", None, r"^--node-rank 2: expected 0 to 1 \(--nnodes 2\)$"),
    ("deepspeed", 2, -1, "127.0.0.1", None, r"^--node-rank -1: expected 0 to 1"),
    ("torchrun", 3, 1, None, None, r"^--nnodes 3 needs --master-addr"),
    ("torchrun", 2, 1, "127.0.0.1", 70000, r"^--master-port 70000: expected 1-65535$"),
    ("torchrun", 1, 1, None, None, r"^--node-rank: only with several nodes"),
    ("torchrun", 1, 0, "10.0.0.1", 29400, r"^--master-addr, --master-port: only with several nodes \(--nnodes N"),
])
def test_multi_node_options_are_checked_against_each_other(launch, nnodes, node_rank, master_addr, master_port,
                                                           message):
    with pytest.raises(ConfigError, match=message):
        distributed.check_nodes(launch, nnodes, node_rank, master_addr, master_port)


def test_each_node_joins_node_0s_rendezvous_from_its_interface_toward_it(tmp_path, monkeypatch):
    # two nodes on this machine's loopback: tests/test_two_nodes.py runs the real thing across two network namespaces
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    node0 = distributed.check_nodes("torchrun", 2, 0, "127.0.0.1", None)
    assert node0 == distributed.Nodes(2, 0, "127.0.0.1", 29500, "127.0.0.1", "lo")
    node1 = dataclasses.replace(node0, rank=1)
    for node, host in ((node0, "true"), (node1, "false")):  # node 0 hosts the rendezvous, the others join it
        command, env = distributed.launch_command("torchrun", 2, 0, ["run", "sft_qwen"], node)
        assert " ".join(command).endswith(
            "--nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 --rdzv-id harness "
            f"--rdzv-conf is_host={host},join_timeout={distributed.JOIN_TIMEOUT_S} --local-addr 127.0.0.1 "
            "-m harness run sft_qwen")
        assert {k: env[k] for k in ("GLOO_SOCKET_IFNAME", distributed.NODES_ENV, distributed.NODE_ADDR_ENV)} == \
            {"GLOO_SOCKET_IFNAME": "lo", distributed.NODES_ENV: "2", distributed.NODE_ADDR_ENV: "127.0.0.1"}
    # DeepSpeed's launcher without ssh: node K's ranks follow the hostfile's Kth line
    hostfile = distributed.write_hostfile(tmp_path, node1, 2)
    assert hostfile.read_text() == "node0 slots=2\nnode1 slots=2\n"
    command, _ = distributed.launch_command("deepspeed", 2, 0, ["run", "sft_qwen"], node1, hostfile)
    assert f"--hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 127.0.0.1 --master_port 29500 " \
           "--module harness run sft_qwen" in " ".join(command)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # chosen by the user: kept
    assert distributed.launch_command("torchrun", 2, 0, ["run", "sft_qwen"], node1)[1]["GLOO_SOCKET_IFNAME"] == "eth7"
