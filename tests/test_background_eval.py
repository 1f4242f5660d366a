"""eval_mode=background: the evaluation of step N runs beside training and gives the numbers, the steps and the best
checkpoint a blocking run gives; what it cannot run beside training is refused before the run opens."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from experiments.simpo_qwen import SimpoQwen
from harness.core.errors import ConfigError
from harness.training.overrides import apply_overrides
from harness.training.runner import run_experiment

KEYS = ["eval/rouge/rougeL", "eval/perplexity/perplexity", "eval/bleu/bleu"]


def _run(tmp_path, monkeypatch, mode: str):
    uri = f"sqlite:///{tmp_path / mode / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the best checkpoint by the lowest ROUGE-L: an early step, whose weights training has left behind by the time
    # a background evaluation's report comes back
    summary = run_experiment(SimpoQwen(max_steps=4, eval_every=2, eval_limit=32, eval_mode=mode,
                                       select_metric="eval/rouge/rougeL", select_mode="min",
                                       output_dir=str(tmp_path / mode / "outputs")))
    client = MlflowClient(uri)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(summary.run_id, key)]
               for key in [*KEYS, "eval/time/waited_s", "eval/time/blocking_s", "eval/time/total_s"]}
    run = client.get_run(summary.run_id)
    return summary, history, run


@pytest.mark.slow
def test_background_evaluation_gives_the_blocking_runs_numbers_and_best_checkpoint(tmp_path, monkeypatch):
    blocking, blocking_history, _ = _run(tmp_path, monkeypatch, "blocking")
    background, history, run = _run(tmp_path, monkeypatch, "background")
    for key in KEYS:
        assert [s for s, _ in history[key]] == [0, 2, 4], key
        assert [v for _, v in history[key]] == pytest.approx([v for _, v in blocking_history[key]], rel=1e-6), key
    # every background report says how long training waited for it, and its cost on training's path
    assert [s for s, _ in history["eval/time/waited_s"]] == [0, 2, 4]
    assert blocking_history["eval/time/waited_s"] == []
    for (_, blocked), (_, waited), (_, total) in zip(history["eval/time/blocking_s"], history["eval/time/waited_s"],
                                                     history["eval/time/total_s"], strict=True):
        assert waited <= blocked <= total + blocked
    share = sum(v for _, v in history["eval/time/blocking_s"]) / run.data.metrics["run/wall_s"]
    assert run.data.metrics["run/eval_share"] == pytest.approx(share)

    assert background.best_step == blocking.best_step and background.best_value == blocking.best_value
    selection = json.loads((background.best_checkpoint / "selection.json").read_text())
    assert selection["step"] == blocking.best_step
    saved = load_file(background.best_checkpoint / "model.safetensors")
    expected = load_file(blocking.best_checkpoint / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in saved)  # the weights of that step


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (["eval_mode=sometimes"], {}, "field 'eval_mode' = 'sometimes' must be 'blocking' or 'background'"),
    (["eval_mode=background", "backend=hf"], {}, "= 'background' needs backend=vllm"),
    (["eval_mode=background"], {"launch": "torchrun"}, "eval_mode=background runs in one process"),
])
def test_what_cannot_run_beside_training_is_refused(args, kwargs, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(SimpoQwen, args, **kwargs)
    assert message in str(err.value)


def test_background_refuses_evaluators_that_read_the_model_and_online_rl():
    from experiments.grpo_qwen import GrpoQwen

    with pytest.raises(ConfigError, match="= .background. cannot run reward_accuracy, which reads the model"):
        apply_overrides(SimpoQwen, ["eval_mode=background", "evaluators=rouge,reward_accuracy"])
    with pytest.raises(ConfigError, match="= .background. cannot share the engine with online RL's rollouts"):
        apply_overrides(GrpoQwen, ["eval_mode=background"])
