"""Each training method's experiment trains a few steps on the embedded model and logs in-loop evals to MLflow."""

import pytest
from mlflow.tracking import MlflowClient

from experiments import load_class
from harness.training.overrides import apply_overrides
from harness.training.runner import run_experiment

# the metric each method's trainer logs besides the loss: proof that the intended loss ran
METHODS = {"sft_qwen": "train/mean_token_accuracy", "dpo_qwen": "train/rewards/margins",
           "cpo_qwen": "train/rewards/margins", "orpo_qwen": "train/log_odds_ratio", "kto_qwen": "train/kl",
           "pretrain_qwen": "train/mean_token_accuracy"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_and_logs_in_loop_evals(name, tmp_path, monkeypatch, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # HF generation: the in-loop vLLM path is the same for every method and is tested in test_experiment_run
    exp = apply_overrides(load_class(name), ["max_steps=2", "eval_every=1", "eval_limit=8", "max_new_tokens=8",
                                             "backend=hf", f"output_dir={tmp_path}"])
    summary = run_experiment(exp)
    client = MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_experiment_by_name(name).experiment_id
    perplexity = client.get_metric_history(summary.run_id, "eval/perplexity/perplexity")
    assert [m.step for m in perplexity] == [0, 1, 2]
    assert perplexity[0].value != perplexity[-1].value  # the weights the evaluators saw changed
    assert [m.step for m in client.get_metric_history(summary.run_id, "eval/rouge/rougeL")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(summary.run_id, "train/loss")] == [1, 2]
    assert client.get_metric_history(summary.run_id, METHODS[name]), sorted(run.data.metrics)


def test_reward_model_is_scored_by_pairwise_accuracy_on_held_out_pairs(tmp_path, monkeypatch, tiny_model_dir):
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = apply_overrides(load_class("rm_qwen"), ["max_steps=2", "eval_every=1", "reward_accuracy_limit=16",
                                                  f"output_dir={tmp_path}"])
    summary = run_experiment(exp)
    client = MlflowClient(uri)
    accuracy = client.get_metric_history(summary.run_id, "eval/reward_accuracy/accuracy")
    assert [m.step for m in accuracy] == [0, 1, 2]
    path = client.download_artifacts(summary.run_id, "eval_samples/reward_accuracy/step_000002.json", str(tmp_path))
    table = json.loads(open(path).read())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert len(rows) == 16 and all(r["correct"] == (r["score_chosen"] > r["score_rejected"]) for r in rows)
    assert 100 * sum(r["correct"] for r in rows) / 16 == accuracy[-1].value
    assert client.get_metric_history(summary.run_id, "train/loss")
    assert (tmp_path / "rm_qwen" / summary.run_id / "best" / "config.json").exists()


def test_reward_model_refuses_generation_evaluators():
    from harness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="rm_qwen: a reward model has no language-model head"):
        apply_overrides(load_class("rm_qwen"), ["backend=vllm"])


def test_grpo_rolls_out_from_the_in_loop_engine_and_logs_rewards(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from harness.paths import REPO_ROOT

    # a reward model as the third reward: the embedded trunk with a fresh scalar head (what rm_qwen starts from)
    reward_model = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_model)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_model)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # its own process: the run builds its own in-process vLLM engine (rollouts and evaluation share it)
    out = subprocess.run([sys.executable, "-m", "harness", "run", "grpo_qwen", "max_steps=2", "eval_every=1",
                          "eval_limit=8", "max_new_tokens=12", "rewards=answer_match,rouge_l,reward_model",
                          "reward_weights=1,0.5,0.1", f"reward_model={reward_model}", f"output_dir={tmp_path}"],
                         cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grpo_qwen").experiment_id])
    metrics = run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/rewards/answer_match/mean")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/rewards/reward_model/mean")] == [1, 2]
    assert 0 < metrics["train/rewards/rouge_l/mean"] <= 1 and 0 < metrics["train/completions/mean_length"] <= 12
    assert metrics["train/rewards/reward_model/std"] > 0  # it scored the completions, not a constant
    # reward = 1.0 x answer_match + 0.5 x rouge_l + 0.1 x reward_model, per completion: the means combine the same way
    combined = (metrics["train/rewards/answer_match/mean"] + 0.5 * metrics["train/rewards/rouge_l/mean"]
                + 0.1 * metrics["train/rewards/reward_model/mean"])
    assert metrics["train/reward"] == pytest.approx(combined, abs=1e-5)


def test_code_pass_reward_runs_the_tests_in_the_sandbox():
    from harness.embedded.code_data import FAMILIES, _problem
    from harness.rl.rewards import CodePass

    task = _problem(FAMILIES[0], 7)  # add_7
    fenced = "Here it is:\n```python\ndef add_7(x):\n    return x + 7\n```"
    completions = ["    return x + 7\n", "    return x + 8\n", fenced, "    import os; os._exit(0)\n",
                   "    while True: pass\n"]
    reward = CodePass(timeout_s=2.0)
    n = len(completions)
    assert reward(completions, prompts=[task["prompt"]] * n, test=[task["test"]] * n,
                  entry_point=[task["entry_point"]] * n) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_grpo_needs_the_vllm_engine_and_known_rewards():
    from harness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="backend='hf': rollouts come from the vLLM engine"):
        apply_overrides(load_class("grpo_qwen"), ["backend=hf"])
    with pytest.raises(ConfigError, match=r"rewards: unknown \['bleu'\]"):
        apply_overrides(load_class("grpo_qwen"), ["rewards=bleu", "reward_weights=1"])
    with pytest.raises(ConfigError, match=r"rewards=reward_model needs reward_model=PATH"):
        apply_overrides(load_class("grpo_qwen"), ["rewards=reward_model", "reward_weights=1"])


def test_distillation_mixes_teacher_kl_and_cross_entropy(tmp_path, monkeypatch, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the student as its own teacher: before the first update the two distributions are identical, so KL = 0
    # (the default teacher, tiny-qwen2-teacher, is the same size: any model with the student's vocabulary will do)
    exp = apply_overrides(load_class("distill_qwen"), [f"teacher={tiny_model_dir}", "kd_alpha=0.25", "max_steps=2",
                                                       "eval_every=2", "eval_limit=8", "max_new_tokens=8",
                                                       "backend=hf", f"output_dir={tmp_path}"])
    summary = run_experiment(exp)
    client = MlflowClient(uri)

    def history(key):
        return [m.value for m in client.get_metric_history(summary.run_id, key)]

    kl, ce, loss = history("train/kd/kl"), history("train/kd/ce"), history("train/loss")
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # the student moved away
    assert loss == pytest.approx([0.25 * k + 0.75 * c for k, c in zip(kl, ce, strict=True)], rel=1e-4)
    assert [m.step for m in client.get_metric_history(summary.run_id, "eval/rouge/rougeL")] == [0, 2]
