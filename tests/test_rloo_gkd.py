"""RLOO and GKD (on-policy distillation) with their samples drawn from the in-loop vLLM engine: each runs a few
steps with in-loop evaluation into one FINISHED MLflow run, and the samples their trainers take are the synced
policy's (sampling logprobs checked against the policy, as for GRPO in test_generation_parity)."""

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import load_class
from harness.core.errors import ConfigError
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.core.records import read_records
from harness.engines.hf_engine import HFBackend
from harness.paths import REPO_ROOT
from harness.rl.rollouts import VLLMRollout
from harness.training.overrides import apply_overrides


def _perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    return model


def _run(name: str, tmp_path, *overrides: str) -> tuple[MlflowClient, object]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # its own process: the run builds its own in-process vLLM engine (samples and evaluation share it)
    out = subprocess.run([sys.executable, "-m", "harness", "run", name, "max_steps=2", "eval_every=2", "eval_limit=4",
                          "max_new_tokens=8", "evaluators=rouge", "select_metric=eval/rouge/rougeL",
                          f"output_dir={tmp_path}", *overrides],
                         cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")] == [0, 2]
    return client, run


@pytest.mark.slow
def test_rloo_runs_with_engine_rollouts_and_logs_rewards(tmp_path):
    client, run = _run("rloo_qwen", tmp_path, "batch_size=4", "num_generations=2")
    metrics = run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/rewards/rouge_l/mean")] == [1, 2]
    # every step's 4 completions came from the one engine, in one process
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/rollout/completions")] == [4, 4]
    assert metrics["train/rollout/ranks"] == 1 and 0 < metrics["train/completions/mean_length"] <= 8
    combined = metrics["train/rewards/answer_match/mean"] + 0.5 * metrics["train/rewards/rouge_l/mean"]
    assert metrics["train/reward"] == pytest.approx(combined, abs=1e-5)


@pytest.mark.slow
def test_gkd_distils_on_engine_samples_from_a_different_teacher(tmp_path, tiny_model_dir):
    # a teacher that differs from the student (the default tiny-qwen2-large takes minutes to build; `make
    # experiment NAME=gkd_qwen` exercises it): the divergence is then > 0 from the first step
    teacher = tmp_path / "teacher"
    _perturbed(load_model(tiny_model_dir), seed=3).save_pretrained(teacher)
    load_tokenizer(tiny_model_dir).save_pretrained(teacher)
    client, run = _run("gkd_qwen", tmp_path, f"teacher={teacher}", "batch_size=4")
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(loss) == 2 and all(v > 0 for v in loss)
    # lmbda=1: both steps trained on 4 student samples from the engine
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/rollout/completions")] == [4, 4]


def test_rloo_and_gkd_sample_from_the_synced_policy(tmp_path, vllm_backend, tiny_model_dir):
    """The trainers' generation hooks go through the engine after a sync with the trainer's (changed) model: they
    return the engine's samples, whose sampling logprobs equal the policy's own."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in ("What is the capital of France?", "How many legs?")]
    for name, seed in (("rloo_qwen", 11), ("gkd_qwen", 12)):
        exp = apply_overrides(load_class(name), [f"teacher={tiny_model_dir}"] if name == "gkd_qwen" else [])
        model = _perturbed(load_model(tiny_model_dir), seed=seed)
        rows = exp.train_rows(read_records(exp.train_data))[:8]
        trainer = exp.build_trainer(model, tokenizer, rows, [], str(tmp_path / name), backend=vllm_backend)
        if name == "rloo_qwen":
            group = exp.num_generations
            hooked = trainer._generate_single_turn([ids for ids in prompt_ids for _ in range(group)], None, {})
        else:
            group = 1
            padded = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt")
            batch = trainer._student_samples({"prompts": padded["input_ids"],
                                              "prompt_attention_mask": padded["attention_mask"]})
            width = padded["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][:, :width], padded["input_ids"])
            assert (batch["labels"][:, :width] == -100).all()
            hooked = [row[width:][mask[width:].bool()].tolist()
                      for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        # the same seed at the same step: the engine draws the hooks' samples again, now with their logprobs
        rollout = VLLMRollout(vllm_backend, tokenizer, exp.max_new_tokens, exp.temperature, exp.seed)
        completions = rollout.sample(prompt_ids, group, trainer)
        assert hooked == [ids for c in completions for ids in c.token_ids] and all(hooked)
        hf = HFBackend(tokenizer)
        hf.sync_weights(model)
        for prompt, c in zip(prompt_ids, completions, strict=True):
            for got, want in zip(c.logprobs, hf.logprobs([prompt] * group, c.token_ids), strict=True):
                assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-3), name


def test_gkd_and_rloo_check_their_fields():
    with pytest.raises(ConfigError, match=r"lmbda.*must be in \[0, 1\]"):
        apply_overrides(load_class("gkd_qwen"), ["lmbda=1.5"])
    with pytest.raises(ConfigError, match="backend='hf': rollouts come from the vLLM engine"):
        apply_overrides(load_class("gkd_qwen"), ["backend=hf"])
    with pytest.raises(ConfigError, match="batch_size must be a multiple of num_generations"):
        apply_overrides(load_class("rloo_qwen"), ["batch_size=6", "num_generations=4"])
