"""The embedded examples show their methods working: a run of each embedded experiment at its defaults ends with its
select metric significantly better than at step 0 by the run's own summary (the randomization test, Holm over every
metric), with its best checkpoint after step 0; the same run at learning_rate=0 changes nothing. README's Training
methods table lists every experiment's figures."""

import pytest

from experiments import load_class
from harness.training.overrides import apply_overrides
from harness.training.runner import run_experiment
from harness.training.summary import summary_tests

# Every embedded experiment, at its defaults (fewer steps do not keep every verdict: sft_qwen at 30 steps has not
# learnt the chat format yet)
EXAMPLES = ("sft_qwen", "pretrain_qwen", "sft_code_qwen", "dpo_qwen", "simpo_qwen", "cpo_qwen", "orpo_qwen",
            "kto_qwen", "rm_qwen", "grpo_qwen", "rloo_qwen", "ppo_qwen", "gkd_qwen", "distill_qwen")


def _run(name: str, tmp_path, overrides: list[str]):
    exp = apply_overrides(load_class(name), [*overrides, f"output_dir={tmp_path}"])
    return exp, run_experiment(exp)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_ends_significantly_better_by_its_own_summary(name, tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp, summary = _run(name, tmp_path, [])
    test = summary_tests(summary)[exp.select_metric]
    better = test.delta < 0 if exp.select_mode == "min" else test.delta > 0
    assert better and test.significant, (name, test.describe())
    assert summary.best_step and summary.best_step > 0


@pytest.mark.parametrize("name", ["simpo_qwen", "grpo_qwen"])
def test_learning_rate_zero_changes_nothing(name, tmp_path, monkeypatch, tiny_model_dir):
    """The gain comes from the method: at learning_rate=0 (a preference method, an RL method with its rollouts and
    rewards) every metric stays exactly where it was."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, summary = _run(name, tmp_path, ["learning_rate=0", "max_steps=8", "eval_every=8"])
    tests = summary_tests(summary)
    assert tests and all(t.delta == 0 and t.p_value == 1 and not t.significant for t in tests.values()), tests
