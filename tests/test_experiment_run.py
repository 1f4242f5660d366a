"""The whole product path: `python -m harness run simpo_qwen ...` in a subprocess, read back from MLflow (or, where a
test needs no process of its own, the CLI's entry point or run_experiment in this one: no start-up to pay)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from experiments.simpo_qwen import SimpoQwen
from harness.commands.cli import main
from harness.paths import REPO_ROOT
from harness.training.runner import run_experiment

EVAL_KEYS = ["eval/perplexity/perplexity", "eval/bleu/bleu", "eval/bleu/bleu4", "eval/rouge/rouge1",
             "eval/rouge/rouge2", "eval/rouge/rougeL"]


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return env, MlflowClient(uri), tmp_path


def _harness(env, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def _only_run(client):
    exp = client.get_experiment_by_name("simpo_qwen")
    (run,) = client.search_runs([exp.experiment_id])
    return run


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_simpo_run_logs_in_loop_evals_tables_and_best_checkpoint(store):
    env, client, tmp = store
    out = _harness(env, "run", "simpo_qwen", "max_steps=4", "eval_every=2", f"output_dir={tmp / 'outputs'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "baseline (step 0) vs final (step 4)" in out.stdout
    assert "[eval] step 2:" in out.stdout and "tok/s" in out.stdout

    run = _only_run(client)
    assert run.info.status == "FINISHED"
    for key in EVAL_KEYS + ["eval/time/sync_s", "eval/time/generate_s", "eval/time/score_s",
                            "eval/generation/tokens_per_s"]:
        assert _steps(client, run.info.run_id, key) == [0, 2, 4], key
    assert _steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    assert run.data.params["beta"] == "2.5" and run.data.params["max_steps"] == "4"
    assert run.data.params["evaluators"] == "perplexity,bleu,rouge"
    tags = run.data.tags
    assert len(tags["git.commit"]) in (7, 40) or tags["git.commit"] == "unknown"
    assert tags["git.dirty"] in ("true", "false") and tags["version.trl"] == "1.16.0"
    assert len(tags["data.train.fingerprint"]) == 16 and tags["model"] == "tiny-qwen2"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval_samples")}
    assert artifacts == {f"eval_samples/step_{s:06d}.json" for s in (0, 2, 4)}
    table_path = client.download_artifacts(run.info.run_id, "eval_samples/step_000004.json", str(tmp))
    table = json.loads(open(table_path).read())
    columns = table["columns"]
    rows = [dict(zip(columns, r, strict=True)) for r in table["data"]]
    assert {"prompt", "reference", "prediction", "perplexity/perplexity", "bleu/bleu4", "rouge/rougeL"} <= set(columns)
    assert len(rows) == 256 and sum(bool(r["prediction"]) for r in rows) > 200  # eval_limit 256: the whole set
    final_rouge = client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")[-1].value
    assert sum(r["rouge/rougeL"] for r in rows) / 256 == pytest.approx(final_rouge)
    config_path = client.download_artifacts(run.info.run_id, "config.json", str(tmp))
    assert json.loads(open(config_path).read())["beta"] == 2.5

    best = tmp / "outputs" / "simpo_qwen" / run.info.run_id / "best"
    selection = json.loads((best / "selection.json").read_text())
    rouge_by_step = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")}
    assert selection["value"] == max(rouge_by_step.values())
    assert rouge_by_step[selection["step"]] == selection["value"]
    assert (best / "model.safetensors").exists() and (best / "tokenizer.json").exists()
    assert tags["best.step"] == str(selection["step"]) and float(tags["best.value"]) == selection["value"]
    assert tags["best.metric"] == "eval/rouge/rougeL" and "best/step" not in run.data.metrics

    # the run as a page: the runs view, a name saying what differs, the summary as its description, its data, the
    # machine's load
    experiment = client.get_experiment_by_name("simpo_qwen")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "simpo_qwen max_steps=4 eval_every=2 seed=0"
    description = tags["mlflow.note.content"]
    base, final = rouge_by_step[0], rouge_by_step[4]
    (row,) = [line for line in description.splitlines() if line.startswith("| `eval/rouge/rougeL` |")]
    assert row.startswith(f"| `eval/rouge/rougeL` | {base:.3f} | {final:.3f} | {final - base:+.3f} | [")
    assert row.split("|")[-2].strip() in ("**significant**", "not significant")
    summary_md = client.download_artifacts(run.info.run_id, "summary.md", str(tmp))
    assert open(summary_md).read() == description
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("preference.jsonl", "training"), ("eval.jsonl", "evaluation")}
    assert inputs["preference.jsonl", "training"].digest == tags["data.train.fingerprint"]
    assert inputs["eval.jsonl", "evaluation"].digest == tags["data.eval.fingerprint"]
    assert json.loads(inputs["eval.jsonl", "evaluation"].profile)["num_rows"] == 256
    assert json.loads(inputs["preference.jsonl", "training"].source)["uri"] == str(REPO_ROOT / "data/preference.jsonl")
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert f"best checkpoint: {best}" in out.stdout


def test_ctrl_c_ends_the_run_killed_and_keeps_what_was_logged(store, monkeypatch, capfd):
    """Ctrl-C while vLLM computes the prompt logprobs of the step-2 evaluation, sent from inside vLLM's engine loop
    so that it certainly lands there: the evaluation finishes and is logged, and the run stops there, KILLED, with
    exit status 130 and no traceback (a KeyboardInterrupt raised in vLLM came out as its UnboundLocalError)."""
    import vllm

    from harness.engines.vllm_engine import VLLMBackend
    from harness.training.inloop import Evaluation

    env, client, tmp = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    state = {"step": None, "armed": False, "sent": 0}
    score, logprobs, run_engine = Evaluation.score, VLLMBackend.logprobs, vllm.LLM._run_engine

    def scoring(self, model, step, *args, **kwargs):
        state["step"] = step
        return score(self, model, step, *args, **kwargs)

    def prompt_logprobs(self, *args, **kwargs):
        state["armed"] = state["step"] == 2 and not state["sent"]
        return logprobs(self, *args, **kwargs)

    def engine_loop(self, *args, **kwargs):
        if state["armed"]:
            state["armed"], state["sent"] = False, state["sent"] + 1
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, inside LLM.generate
        return run_engine(self, *args, **kwargs)

    monkeypatch.setattr(Evaluation, "score", scoring)
    monkeypatch.setattr(VLLMBackend, "logprobs", prompt_logprobs)
    monkeypatch.setattr(vllm.LLM, "_run_engine", engine_loop)
    # a shell's background job (`make test &`) inherits SIGINT ignored; a user's Ctrl-C reaches a run from a terminal
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["run", "simpo_qwen", "max_steps=2000", "eval_every=2", f"output_dir={tmp / 'outputs'}"])
    finally:
        signal.signal(signal.SIGINT, inherited)
    out, err = capfd.readouterr()
    assert state["sent"] == 1
    run = _only_run(client)
    for key in ("eval/perplexity/perplexity", "eval/rouge/rougeL"):  # the interrupted evaluation was logged whole
        assert _steps(client, run.info.run_id, key) == [0, 2], key
    assert _steps(client, run.info.run_id, "train/loss") == [1, 2]  # and no step trained after it
    assert code == 130, err[-3000:]
    assert run.info.status == "KILLED"
    assert "interrupted" in err and "Traceback" not in out + err
    assert "Traceback" not in (tmp / "outputs" / "simpo_qwen" / run.info.run_id / "library.log").read_text()
    assert "[run] SIGINT: stopping after the current training step or evaluation" in out


def test_a_signal_waits_for_a_boundary_and_a_second_one_forces():
    from harness.training import interrupts

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run: the signal is recorded, nothing raised
            with pytest.raises(KeyboardInterrupt, match="SIGINT again: not waiting"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            # leaving deferred() with the first signal still recorded raises it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts.deferred():
            interrupts.check()  # nothing recorded: no raise
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_sweep_trial_hands_its_signals_to_the_run_which_waits_for_a_boundary_even_on_a_second_one():
    from harness.sweeps.trial import StopSignal
    from harness.training import interrupts

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopSignal()
        with pytest.raises(KeyboardInterrupt, match="SIGINT"), interrupts.deferred():
            stop.hand_over()  # the trial's run opened
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C to the trial
            os.kill(os.getpid(), signal.SIGTERM)  # then its driver's forwarded SIGTERM: recorded, not raised
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt, match="SIGINT"):
                stop.check()  # the trial's next step or eval report is the boundary
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


class _Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("injected failure at step 3")


class _FailingSimpo(SimpoQwen):
    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return super().build_trainer(model, tokenizer, rows, callbacks + [_Boom()], output_dir)

    @classmethod
    def name(cls) -> str:
        return "simpo_qwen"


def test_exception_ends_the_run_failed_and_keeps_what_was_logged(store, monkeypatch):
    # in this process: the exception is what `python -m harness run` would end with (exit status 1, traceback)
    env, client, tmp = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_experiment(_FailingSimpo(max_steps=10, eval_every=2, output_dir=str(tmp / "outputs")))
    run = _only_run(client)
    assert run.info.status == "FAILED"
    assert _steps(client, run.info.run_id, "eval/bleu/bleu") == [0, 2]
    assert (tmp / "outputs" / "simpo_qwen" / run.info.run_id / "best" / "selection.json").exists()


def test_local_model_dir_parquet_data_lora_and_hf_backend(store, tiny_model_dir, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    env, client, tmp = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    pairs = [json.loads(line) for line in (REPO_ROOT / "data" / "preference.jsonl").read_text().splitlines()[:64]]
    pq.write_table(pa.Table.from_pylist(pairs), tmp / "pairs.parquet")
    evals = [json.loads(line) for line in (REPO_ROOT / "data" / "eval.jsonl").read_text().splitlines()[:8]]
    (tmp / "eval.json").write_text(json.dumps([{"prompt": r["prompt"], "reference": r["reference"]} for r in evals]))
    code = main(["run", "simpo_qwen", f"model={tiny_model_dir}", f"train_data={tmp / 'pairs.parquet'}",
                 f"eval_data={tmp / 'eval.json'}", "peft=dora", "lora_rank=4", "backend=hf", "max_steps=2",
                 "eval_every=1", "evaluators=bleu,rouge", f"output_dir={tmp / 'outputs'}"])  # in this process
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert f"[data] 64 training rows from {tmp / 'pairs.parquet'}; eval samples: 8 from {tmp / 'eval.json'}" in stdout
    assert "hf backend ready" in stdout
    run = _only_run(client)
    assert run.info.status == "FINISHED" and run.data.params["peft"] == "dora"
    assert _steps(client, run.info.run_id, "eval/bleu/bleu4") == [0, 1, 2]
    best = tmp / "outputs" / "simpo_qwen" / run.info.run_id / "best"
    assert (best / "adapter_config.json").exists() and not (best / "model.safetensors").exists()


def test_bad_training_record_stops_before_any_run_is_opened(store, tmp_path, monkeypatch, capsys):
    env, client, tmp = store
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert main(["run", "simpo_qwen", f"train_data={bad}"]) == 2  # the CLI's entry point, in this process
    assert f"{bad} line 2: field 'rejected' is missing" in capsys.readouterr().err
    assert client.get_experiment_by_name("simpo_qwen") is None  # no MLflow run, not even an experiment


def test_code_experiment_logs_pass_at_1_and_the_sample_table(tmp_path, tiny_model_dir, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-logged")
    code = main(["run", "sft_code_qwen", "max_steps=2", "eval_every=1", "humaneval_limit=6",
                 f"output_dir={tmp_path / 'outputs'}"])  # the CLI's entry point, in this process
    assert code == 0, capsys.readouterr().err[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_code_qwen").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("pass_at_1", "passed", "failed", "timed_out", "errored"):
        assert _steps(client, run.info.run_id, f"eval/humaneval/{key}") == [0, 1, 2], key
    final = {k: client.get_metric_history(run.info.run_id, f"eval/humaneval/{k}")[-1].value
             for k in ("passed", "failed", "timed_out", "errored", "pass_at_1")}
    assert final["passed"] + final["failed"] + final["timed_out"] + final["errored"] == 6
    assert final["pass_at_1"] == pytest.approx(100 * final["passed"] / 6)
    path = client.download_artifacts(run.info.run_id, "eval_samples/humaneval/step_000002.json", str(tmp_path))
    table = json.loads(open(path).read())
    assert {"task_id", "completion", "status", "error", "sample"} <= set(table["columns"])
    assert len(table["data"]) == 6 and all(row[0].startswith("CodeTask/") for row in table["data"])
    store_bytes = (tmp_path / "mlflow.db").read_bytes()
    assert b"sk-never-logged" not in store_bytes


def test_ctrl_c_during_a_store_call_lands_after_it_so_no_transaction_is_cut():
    from harness.training.tracking.retries import retrying

    finished = []

    def write():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the signal is pending here; a plain handler would have raised already
        finished.append(True)

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see the test above)
    try:
        with pytest.raises(KeyboardInterrupt):
            retrying(write)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.slow
def test_a_long_run_logs_every_table_past_mlflows_tag_limit(tmp_path, monkeypatch):
    from harness.training.tracking.runs import mlflow_run
    from harness.training.tracking.tracker import TAG_VALUE_LIMIT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow_run("tables", {}, {}) as tracker:
        for step in range(200):  # MLflow's own log_table raises from about the 145th table of a run
            tracker.log_table({"id": [1, 2], "prediction": ["a", f"step {step}"]}, f"eval_samples/step_{step:06d}.json")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    listed = json.loads(run.data.tags["mlflow.loggedArtifacts"])  # still valid JSON, as long as it fits
    assert 100 < len(listed) < 200 and len(run.data.tags["mlflow.loggedArtifacts"]) <= TAG_VALUE_LIMIT
    assert listed[0] == {"path": "eval_samples/step_000000.json", "type": "table"}
    assert len(client.list_artifacts(tracker.run_id, "eval_samples")) == 200
    last = json.loads(open(client.download_artifacts(tracker.run_id, "eval_samples/step_000199.json", str(tmp_path))
                           ).read())
    assert last == {"columns": ["id", "prediction"], "data": [[1, "a"], [2, "step 199"]]}
    first = client.load_table(run.info.experiment_id, "eval_samples/step_000000.json", run_ids=[tracker.run_id])
    assert list(first["prediction"]) == ["a", "step 0"]  # MLflow reads the tables it lists


def test_an_experiment_made_before_the_tag_opens_in_the_runs_view_after_its_next_run(tmp_path, monkeypatch):
    """MLflow 3 opens an experiment without mlflow.experimentKind in its GenAI view: an older store's experiments get
    the tag at their next run."""
    from harness.training.tracking.runs import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_experiment("older", artifact_location=(tmp_path / "mlruns").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("older").tags
    with mlflow_run("older", {"seed": 0}, {}):
        pass
    assert client.get_experiment_by_name("older").tags["mlflow.experimentKind"] == "custom_model_development"
