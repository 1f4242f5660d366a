"""The rm_qwen -> ppo_qwen chain (`reward_model=run:latest:rm_qwen`, harness/training/lineage.py) and the resume of
an interrupted PPO run (harness/rl/ppo.py saves and reloads its value model with each checkpoint): a reward model
trained for a few steps scores the PPO rollouts and starts the value model, and a PPO run SIGKILLed after its
checkpoint at step 1 and resumed ends with the same policy and value model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from experiments import load_class
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.rl.rewards import RewardModel
from harness.training import lineage
from harness.training.overrides import apply_overrides
from harness.training.resume import COMPLETE, resumed_experiment
from harness.training.runner import run_experiment

# tiny sizes; ppo_epochs x num_minibatches = 4 updates per step, in a seeded order a resume has to reproduce, and a
# learning rate large enough that one step moves the weights far beyond the comparison's tolerance
PPO = ["max_steps=2", "eval_every=2", "eval_limit=2", "evaluators=rouge", "max_new_tokens=8", "batch_size=2",
       "ppo_epochs=2", "num_minibatches=2", "learning_rate=1e-3", "save_every=1", "rewards=reward_model",
       "reward_weights=1", "value_init=auto", "reward_model=run:latest:rm_qwen"]


def _store_run(client: MlflowClient, tmp_path: Path, experiment: str, name: str, config: dict) -> str:
    """A finished run as the store holds it, with a best checkpoint holding `config` as its config file `name`."""
    found = client.get_experiment_by_name(experiment)
    run_id = client.create_run(found.experiment_id if found else client.create_experiment(experiment)).info.run_id
    best = tmp_path / run_id / "best"
    best.mkdir(parents=True)
    (best / "selection.json").write_text('{"metric": "eval/rouge/rougeL", "mode": "max", "step": 2, "value": 1.0}')
    (best / name).write_text(json.dumps(config))
    client.set_tag(run_id, "best_checkpoint", str(best))
    client.set_terminated(run_id, "FINISHED")  # run:latest:X takes only finished runs
    return run_id


def test_reward_model_run_references_are_pinned_and_a_run_without_a_score_head_is_refused(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    sft = _store_run(client, tmp_path, "sft_qwen", "config.json", {"architectures": ["Qwen2ForCausalLM"]})
    sft_lora = _store_run(client, tmp_path, "sft_qwen", "adapter_config.json",
                          {"base_model_name_or_path": "tiny-qwen2", "task_type": "CAUSAL_LM"})
    rm_lora = _store_run(client, tmp_path, "rm_lora", "adapter_config.json",
                         {"base_model_name_or_path": "tiny-qwen2", "task_type": "SEQ_CLS"})
    rm = _store_run(client, tmp_path, "rm_qwen", "config.json", {"architectures": ["Qwen2ForSequenceClassification"],
                                                                 "id2label": {"0": "LABEL_0"}})
    ppo = load_class("ppo_qwen")
    exp = apply_overrides(ppo, ["rewards=reward_model", "reward_weights=1", f"reward_model=run:{sft}"])
    with pytest.raises(ConfigError, match=rf"reward_model=run:{sft}: run {sft} of experiment 'sft_qwen' is not a "
                                          r"reward model \(its best checkpoint .* is a Qwen2ForCausalLM, not a "
                                          r"one-score head\): name a run of rm_qwen"):
        lineage.resolve_reward_model(exp)
    assert exp.reward_model == f"run:{sft}"  # not pinned: refused as given
    with pytest.raises(ConfigError, match=rf"run {sft_lora} of experiment 'sft_qwen' is not a reward model \(its "
                                          r"best checkpoint .* is a CAUSAL_LM adapter"):
        lineage.reward_model_path(f"run:{sft_lora}")
    # a LoRA reward model is its adapter directory: RewardModel merges it into its base as it loads it
    assert lineage.reward_model_path(f"run:{rm_lora}") == str(tmp_path / rm_lora / "best")
    exp = apply_overrides(ppo, ["rewards=reward_model", "reward_weights=1", "reward_model=run:latest:rm_qwen"])
    assert lineage.resolve_reward_model(exp) == rm
    assert exp.reward_model == f"run:{rm}" and lineage.reward_model_run_id(exp) == rm
    assert lineage.pinned_overrides(exp) == ["model=tiny-qwen2", f"reward_model=run:{rm}"]
    assert lineage.reward_model_path(exp.reward_model) == str(tmp_path / rm / "best")
    # a directory (or an empty field) is used as given: nothing to pin, no run to record
    plain = apply_overrides(load_class("grpo_qwen"), ["rewards=reward_model", "reward_weights=1",
                                                      f"reward_model={tmp_path}"])
    assert lineage.resolve_reward_model(plain) is None and lineage.reward_model_path(plain.reward_model) == str(
        tmp_path)
    assert lineage.pinned_overrides(plain) == ["model=tiny-qwen2"]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_a_trained_reward_model_chains_into_ppo_and_an_interrupted_ppo_run_resumes_exactly(tmp_path, monkeypatch,
                                                                                             capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    # a reward model trained for a few steps on the 16 pairs it is evaluated on, so that its margin there grows and
    # the best checkpoint is a trained one
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((REPO_ROOT / "data" / "preference_eval.jsonl").read_text("utf-8").splitlines(True)[:16]),
                     "utf-8")
    rm = run_experiment(apply_overrides(load_class("rm_qwen"), [
        f"train_data={pairs}", f"reward_accuracy_pairs={pairs}", "reward_accuracy_limit=16", "max_steps=4",
        "eval_every=4", "batch_size=4", "max_length=64", "learning_rate=1e-3",
        "select_metric=eval/reward_accuracy/margin", f"output_dir={tmp_path / 'rm'}"]))
    assert rm.best_step == 4, "the trained reward model, not its untrained start, must be the best checkpoint"

    # the uninterrupted run, watched: the value model it builds and what its reward model is asked to score
    values, scored = [], []
    ppo_module = sys.modules[load_class("ppo_qwen").__module__]
    with monkeypatch.context() as watch:
        def value_model_from(source, init=None):
            model = real_value_model_from(source, init)
            values.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return model

        def score(self, completions, prompts, **kwargs):
            result = real_score(self, completions, prompts, **kwargs)
            scored.append((list(completions), list(prompts), result))
            return result

        real_value_model_from, real_score = ppo_module.value_model_from, RewardModel.__call__
        watch.setattr(ppo_module, "value_model_from", value_model_from)
        watch.setattr(RewardModel, "__call__", score)
        whole = run_experiment(apply_overrides(load_class("ppo_qwen"), [*PPO, f"output_dir={tmp_path / 'a'}"]))
    run = client.get_run(whole.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["reward_model"] == f"run:{rm.run_id}"  # pinned: a resume uses the same reward model
    assert run.data.params["reward_model_run"] == run.data.tags["reward_model_run"] == rm.run_id
    # a run that is no reward model (this PPO run's policy) is refused before a run opens
    with pytest.raises(ConfigError, match=rf"reward_model=run:{whole.run_id}: .* is not a reward model"):
        run_experiment(apply_overrides(load_class("ppo_qwen"), [*PPO, f"reward_model=run:{whole.run_id}",
                                                                f"output_dir={tmp_path / 'a'}"]))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # the value model started as the trained reward model: its trunk and its score head
    best = RewardModel(str(rm.best_checkpoint))
    (start,) = values
    reward_state = best.model.state_dict()
    assert set(start) - {"score.bias"} == set(reward_state)
    assert all(torch.equal(start[k], reward_state[k]) for k in reward_state)
    # the step's reward is the trained reward model's score of that step's rollouts
    assert len(scored) == 2  # one rollout per step
    completions, prompts, result = scored[0]
    assert len(completions) == 2 and any(completions)
    assert best(completions, prompts) == pytest.approx(result, abs=1e-6)
    (logged,) = [m for m in client.get_metric_history(whole.run_id, "train/ppo/rewards/reward_model") if m.step == 1]
    assert logged.value == pytest.approx(sum(result) / len(result), abs=1e-5)

    # the same run in its own process, SIGKILLed once its checkpoint at step 1 is complete
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    killed_dir = tmp_path / "b"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "ppo_qwen", *PPO, f"output_dir={killed_dir}"],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 500
    while not (markers := list(killed_dir.glob(f"ppo_qwen/*/checkpoints/checkpoint-1/{COMPLETE}"))) and (
            proc.poll() is None and time.time() < deadline):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    log.close()
    assert markers and proc.returncode == -9, (tmp_path / "killed.log").read_text()[-3000:]
    run_dir = markers[0].parent.parent.parent
    capsys.readouterr()
    resumed = run_experiment(resumed_experiment(load_class("ppo_qwen"), [f"resume={run_dir.name}"]))
    assert "continuing from checkpoint-1" in capsys.readouterr().out
    assert client.get_run(resumed.run_id).info.status == "FINISHED" and resumed.steps_trained == 2

    # policy and value model after step 2 equal the uninterrupted run's; step 2 moved both far beyond that
    ends = {name: run / "checkpoints" / "checkpoint-2" for name, run in
            (("whole", tmp_path / "a" / "ppo_qwen" / whole.run_id), ("resumed", run_dir))}
    for part in (".", "value_model"):
        whole_end, resumed_end = (_tensors(ends[name] / part) for name in ("whole", "resumed"))
        assert _max_difference(whole_end, resumed_end) < 1e-6, part
        assert _max_difference(whole_end, _tensors(run_dir / "checkpoints" / "checkpoint-1" / part)) > 1e-4, part
    for key in ("train/ppo/reward", "train/ppo/value_loss", "train/ppo/policy_loss"):
        (a,), (b,) = ([m.value for m in client.get_metric_history(r, key) if m.step == 2]
                      for r in (whole.run_id, resumed.run_id))
        assert b == pytest.approx(a, abs=1e-5), key
