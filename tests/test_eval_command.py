"""`python -m harness eval MODEL_OR_RUN k=v ...`: a model measured without training exactly as a run's step 0 measures
it, as its own MLflow run; bad input stops before any run opens."""

import json

import huggingface_hub.constants
import pytest
from mlflow.tracking import MlflowClient

from harness.commands.cli import main
from harness.training.inloop import is_quality_metric

EVAL = ["evaluators=perplexity,rouge,choice", "choice_limit=8", "eval_limit=8", "backend=hf"]


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _at(client: MlflowClient, run_id: str, keys, step: int) -> dict[str, float]:
    return {k: m.value for k in keys for m in client.get_metric_history(run_id, k) if m.step == step}


def _table(client: MlflowClient, run_id: str, path: str, tmp_path) -> dict[str, list]:
    local = client.download_artifacts(run_id, path, str(tmp_path))
    table = json.loads(open(local, encoding="utf-8").read())
    return {c: [row[i] for row in table["data"]] for i, c in enumerate(table["columns"])}


def _close(a, b) -> bool:
    """Equal, numbers within float rounding, lists item by item (the table's columns: text, scores, log-likelihoods)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def _measured(metrics: dict[str, float]) -> list[str]:
    """The keys that measure the model (scores, their error bars, token counts), not the time it took."""
    return sorted(k for k in metrics if k.startswith("eval/") and not k.startswith("eval/time/")
                  and k != "eval/generation/tokens_per_s")


def test_eval_logs_the_metrics_and_tables_of_a_runs_step_0_and_of_its_best_checkpoint(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = f"output_dir={tmp_path / 'outputs'}"
    assert main(["run", "sft_qwen", *EVAL, "select_metric=eval/choice/acc_norm", "max_steps=1", "eval_every=1",
                 "learning_rate=1e-3", out]) == 0
    # where sft_qwen starts, rendered with the chat template sft_qwen gives the base
    assert main(["eval", "tiny-qwen2-base", *EVAL, "chat_template=chatml", out]) == 0
    stdout = capsys.readouterr().out
    client = MlflowClient(uri)
    (trained,) = _runs(uri, "sft_qwen")
    (evaluated,) = _runs(uri, "eval")
    logged = evaluated.data.metrics
    keys = _measured(logged)
    assert {"eval/perplexity/perplexity_se", "eval/rouge/rougeL", "eval/choice/acc_norm", "eval/choice/bpb",
            "eval/generation/tokens"} <= set(keys)
    # every measuring key of the run's step 0, at step 0, with the same value
    step0 = _at(client, trained.info.run_id, _measured(trained.data.metrics), 0)
    assert sorted(step0) == keys
    assert _at(client, evaluated.info.run_id, keys, 0) == pytest.approx(step0, rel=1e-6, abs=1e-9)
    for table in ("eval_samples/step_000000.json", "eval_samples/choice/step_000000.json"):
        ours, loops = (_table(client, r.info.run_id, table, tmp_path / r.info.run_id) for r in (evaluated, trained))
        assert sorted(ours) == sorted(loops)
        for column, values in ours.items():
            assert _close(values, loops[column]), column
    line = next(x for x in stdout.splitlines() if x.startswith("[eval] step 0:") and "±" in x)
    assert f"rouge/rougeL={logged['eval/rouge/rougeL']:.2f}±{logged['eval/rouge/rougeL_se']:.2f}" in line
    assert evaluated.data.params["evaluators"] == "perplexity,rouge,choice"
    assert "learning_rate" not in evaluated.data.params  # training fields are not the evaluation's
    assert evaluated.data.tags["model"] == "tiny-qwen2-base"
    # run:latest:sft_qwen is the run's best checkpoint (the step its select_metric was best at), measured the same
    assert main(["eval", "run:latest:sft_qwen", *EVAL, out]) == 0
    (chained,) = [r for r in _runs(uri, "eval") if r.info.run_id != evaluated.info.run_id]
    assert chained.data.tags["source_run"] == chained.data.params["source_run"] == trained.info.run_id
    best_step = int(json.loads((tmp_path / "outputs" / "sft_qwen" / trained.info.run_id / "best" /
                                "selection.json").read_text())["step"])
    at_best = _at(client, trained.info.run_id, [k for k in keys if is_quality_metric(k)], best_step)
    assert _at(client, chained.info.run_id, list(at_best), 0) == pytest.approx(at_best, rel=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["tiny-qwen2", "learning_rate=1e-3"], "'learning_rate' is a training field, and eval trains nothing"),
    (["tiny-qwen2", "max_steps=5"], "'max_steps' is a training field"),
    (["tiny-qwen2", "model=smollm2"], "the model is the first argument"),
    (["tiny-qwen2", "eval_data=facts:data/eval.jsonl,heldout:split"], "reads the held-out split of train_data"),
    (["tiny-qwen2", "eval_data="], "reads the held-out split of train_data"),
    (["tiny-qwen2", "eval_limit=-1"], "field 'eval_limit' = -1 must be >= 0"),
    (["tiny-qwen2", "humaneval_n=4"], "is an option of the humaneval evaluator, which evaluators=perplexity,bleu,"),
    # looking a run up creates the MLflow store (seconds)
    pytest.param(["run:0123456789abcdef0123456789abcdef"], "no run 0123456789abcdef0123456789abcdef in sqlite:",
                 marks=pytest.mark.slow),
    pytest.param(["run:latest:no_such_experiment"], "no_such_experiment", marks=pytest.mark.slow),
    (["/no/such/model/dir"], "model=/no/such/model/dir: not an embedded model, a directory, a .gguf file or a run "
                             "reference, and no hub model could be loaded"),
    (["no-such-org/no-such-model"], "no hub model could be loaded by that name"),
])
def test_bad_input_stops_before_any_run_opens(args, message, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against an unreachable hub
    assert main(["eval", *args, f"output_dir={tmp_path / 'out'}"]) == 2
    assert message in capsys.readouterr().err
    store = tmp_path / "mlflow.db"  # created only by what opens the store (looking a run up)
    assert not store.exists() or _runs(uri, "eval") == []


def test_a_directory_without_a_tokenizer_is_named_before_any_run_opens(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "weights").mkdir()
    assert main(["eval", str(tmp_path / "weights"), f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"{tmp_path / 'weights'} holds no tokenizer that can be loaded" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_like_takes_an_experiments_evaluation_fields_and_overrides_win():
    from harness.commands.eval_model import eval_experiment
    from harness.core.errors import ConfigError

    exp = eval_experiment("smollm2", ["eval_limit=4"], like="sft_smollm2")
    assert (exp.model, exp.max_new_tokens, exp.eval_limit) == ("smollm2", 32, 4)  # sft_smollm2 sets 32 and 32
    plain = eval_experiment("smollm2", [])
    assert (plain.max_new_tokens, plain.eval_limit) == (48, 256)  # every experiment's defaults
    code = eval_experiment("tiny-qwen2", [], like="sft_code_qwen")  # its HumanEval options, declared as fields
    kwargs = code.evaluator_kwargs("humaneval")  # the evaluator's defaults are humaneval (164 problems) and 256
    assert code.evaluators == ["humaneval"] and (kwargs["problems"], kwargs["max_new_tokens"]) == (
        "data/code_eval.jsonl", 32)
    assert eval_experiment("tiny-qwen2", ["evaluators=rouge"], like="sft_code_qwen").evaluator_options == {}
    with pytest.raises(ConfigError, match="unknown experiment 'no_such'"):
        eval_experiment("tiny-qwen2", [], like="no_such")
