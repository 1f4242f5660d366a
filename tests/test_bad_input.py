"""Bad input, faults and concurrency: values that parse but make no sense, evaluator options that do not go together,
eval prompts longer than the model's context, unwritable outputs, a dependency that fails during a run, and a
loss that turns NaN. Each test is named by the case of the issue it covers."""

import json
import math
import os
import re

import pytest
from mlflow.tracking import MlflowClient

from experiments.distill_qwen import DistillQwen
from experiments.grpo_qwen import GrpoQwen
from experiments.sft_code_qwen import SftCodeQwen
from experiments.simpo_qwen import SimpoQwen
from harness.core.errors import ConfigError, DataError, TrainingDiverged
from harness.core.files import free_port
from harness.paths import REPO_ROOT
from harness.training.inloop import EvalReport
from harness.training.overrides import apply_overrides

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only directories anyway


def _report(step: int, **metrics) -> EvalReport:
    return EvalReport(step, {f"eval/{k.replace('__', '/')}": v for k, v in metrics.items()}, {}, {})


class _Tracker:
    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)


# ---- case 6: selecting on a metric an evaluation did not produce ----

def test_case6_humaneval_k_larger_than_n_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"field 'humaneval_k' = \[5\] pass@k needs at least k samples per problem, "
                                          r"so every k must be <= humaneval_n \(1\)"):
        apply_overrides(SftCodeQwen, ["humaneval_k=5", "humaneval_n=1"])
    with pytest.raises(ConfigError, match=r"field 'humaneval_k' = \[1, 10\] .* <= humaneval_n \(4\)"):
        apply_overrides(SimpoQwen, ["evaluators=humaneval", "humaneval_k=1,10", "humaneval_n=4",
                                    "select_metric=eval/humaneval/pass_at_1"])
    from evaluators.humaneval import HumanEval

    with pytest.raises(ConfigError, match=r"every k must be <= n \(1\)"):  # built directly: refused, not dropped
        HumanEval(problems="data/code_eval.jsonl", n=1, k=[1, 5])


def test_case6_selectable_metrics_follow_the_evaluator_options():
    exp = apply_overrides(SftCodeQwen, ["humaneval_k=1,10", "humaneval_n=20",
                                        "select_metric=eval/humaneval/pass_at_10"])  # refused before the fix
    assert exp.select_metric == "eval/humaneval/pass_at_10"
    with pytest.raises(ConfigError, match="select_metric.*choose one of: eval/humaneval/pass_at_1$"):
        apply_overrides(SftCodeQwen, ["select_metric=eval/humaneval/pass_at_10"])  # k is 1 by default
    with pytest.raises(ConfigError, match="'eval/judge/win_rate' is not produced by the chosen evaluators"):
        apply_overrides(SimpoQwen, ["evaluators=judge", "judge_pairwise=false", "select_metric=eval/judge/win_rate"])


def test_case6_an_evaluation_without_the_metric_is_skipped_for_selection(tmp_path, capsys):
    from harness.training.checkpoints import BestCheckpoint

    tracker = _Tracker()
    best = BestCheckpoint(tmp_path / "best", "eval/judge/score", "max", tokenizer=None, tracker=tracker)
    best(_report(0, judge__failed=4.0), model=None)  # the judge was down: no score; before the fix a KeyError
    best(_report(1, judge__score=float("nan")), model=None)
    assert best.skipped == [0, 1] and best.step is None and not (tmp_path / "best").exists()
    assert tracker.metrics == [(0, {"best/skipped_evals": 1}), (1, {"best/skipped_evals": 2})]
    out = capsys.readouterr().out
    assert "[warn] step 0: eval/judge/score was not produced by this evaluation" in out


def test_case6_a_sweep_trial_reports_nothing_for_an_evaluation_without_the_metric():
    from harness.sweeps.trial import StopSignal, TrialMonitor

    class Trial:
        number = 0

        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return False

    trial = Trial()
    monitor = TrialMonitor(trial, "eval/judge/score", StopSignal())
    monitor(_report(0, judge__failed=4.0), None)
    monitor(_report(1, judge__score=7.0), None)
    assert trial.reported == [(1, 7.0)]


@pytest.mark.slow
def test_case6_judge_down_with_select_metric_on_its_score_trains_to_finished(tmp_path, tiny_model_dir, monkeypatch,
                                                                             capsys):
    """A closed port for the judge, selection on its score: every evaluation skips selection, training finishes.
    The run goes through the CLI's entry point in this process (no start-up to pay)."""
    from harness.commands.cli import main

    pairs = (REPO_ROOT / "data" / "preference.jsonl").read_text().splitlines()[:16]
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "simpo_qwen", f"train_data={tmp_path / 'pairs.jsonl'}", "max_steps=2", "eval_every=1",
                 "eval_limit=4", "max_new_tokens=4", "batch_size=4", "backend=hf", "evaluators=judge",
                 f"judge_base_url=http://127.0.0.1:{free_port()}/v1", "judge_retries=0", "judge_timeout_s=2",
                 "judge_cache=false", "select_metric=eval/judge/score", f"output_dir={tmp_path / 'out'}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert "[warn] step 0: eval/judge/score was not produced" in stdout
    assert "selection skipped 3 of 3 evaluations without eval/judge/score (steps 0, 1, 2)" in stdout
    assert "best checkpoint: none" in stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    assert run.info.status == "FINISHED"
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "best/skipped_evals")}
    assert skipped == {0: 1.0, 1: 2.0, 2: 3.0}
    failed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/judge/failed")}
    assert failed == {0: 4.0, 1: 12.0, 2: 12.0}  # 4 pointwise calls; then 8 pairwise ones too, against step 0
    assert not client.get_metric_history(run.info.run_id, "eval/judge/score")


# ---- an option of an evaluator that evaluators= does not choose ----

@pytest.mark.parametrize(("cls", "args", "key", "evaluator"), [
    (SimpoQwen, ["humaneval_n=20"], "humaneval_n", "humaneval"),  # an option no field declares (command line)
    (SimpoQwen, ["judge_base_url=http://127.0.0.1:9/v1"], "judge_base_url", "judge"),
    (SftCodeQwen, ["evaluators=rouge", "select_metric=eval/rouge/rougeL", "humaneval_n=20"], "humaneval_n",
     "humaneval"),  # the experiment's own field, set away from its default
])
def test_an_option_of_an_unchosen_evaluator_is_refused_naming_it(cls, args, key, evaluator):
    with pytest.raises(ConfigError) as err:
        apply_overrides(cls, args)
    chosen = ",".join(cls().evaluators if "evaluators=rouge" not in args else ["rouge"])
    assert f"field '{key}' = " in str(err.value)
    assert (f"is an option of the {evaluator} evaluator, which evaluators={chosen} does not choose, so it would be "
            f"ignored: add {evaluator} to evaluators, or drop {key}") in str(err.value)


def test_an_unchosen_evaluator_option_stops_run_before_mlflow_and_defaults_pass(tmp_path, monkeypatch, capsys):
    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["run", "simpo_qwen", "humaneval_n=20", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "'humaneval_n' = 20 is an option of the humaneval evaluator" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() or MlflowClient(uri).get_experiment_by_name("simpo_qwen") is None
    # an experiment's own evaluator fields at their defaults are no option given
    assert apply_overrides(SftCodeQwen, ["evaluators=rouge", "select_metric=eval/rouge/rougeL"]).humaneval_n == 1


# ---- case 7: an eval prompt longer than the model's context ----

def _long_eval_file(tmp_path):
    rows = [{"id": "short-1", "prompt": "What is 2 plus 2?", "reference": "2 plus 2 is 4."},
            {"id": "too-long", "prompt": "Repeat after me: " + "apple banana cherry " * 150, "reference": "ok."},
            {"id": "short-2", "prompt": "What is 3 times 3?", "reference": "3 times 3 is 9."}]
    path = tmp_path / "eval_long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_case7_an_eval_prompt_over_the_context_stops_before_any_run_names_file_and_record(tmp_path, monkeypatch,
                                                                                           tiny_model_dir):
    from harness.training.runner import run_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    path = _long_eval_file(tmp_path)
    exp = apply_overrides(SimpoQwen, [f"eval_data={path}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError) as err:
        run_experiment(exp)
    message = str(err.value)
    assert f"{path} line 2 (id too-long): the prompt is " in message
    assert "over the model's context of 256 (vllm backend)" in message and "eval_truncation=left" in message
    assert MlflowClient(uri).get_experiment_by_name("simpo_qwen") is None  # no MLflow run, not even an experiment


@pytest.mark.slow
def test_case7_with_left_truncation_prepare_accepts_the_long_prompt(tmp_path, tiny_model_dir):
    from harness.core.models import load_tokenizer
    from harness.core.prompts import render_prompt
    from harness.training.runner import prepare

    path = _long_eval_file(tmp_path)
    exp = apply_overrides(SimpoQwen, [f"eval_data={path}", "eval_truncation=left", f"output_dir={tmp_path / 'out'}"])
    _rows, (eval_set,), model_path = prepare(exp, verbose=False)
    samples, prompt_ids = eval_set.samples, eval_set.prompt_ids
    full = [render_prompt(load_tokenizer(model_path), s.prompt) for s in samples]
    assert prompt_ids[0] == full[0] and prompt_ids[2] == full[2]  # prompts that fit are left alone
    assert len(full[1]) > 256 and len(prompt_ids[1]) == 256 - exp.max_new_tokens
    assert prompt_ids[1] == full[1][-len(prompt_ids[1]):]  # the last tokens, so the generation prompt stays


# ---- case 9: values that parse but make no sense ----

NONSENSE = [
    (SimpoQwen, ["learning_rate=1e999"], "field 'learning_rate' = inf must be a finite number"),
    (SimpoQwen, ["learning_rate=nan"], "field 'learning_rate' = nan must be a finite number"),
    (SimpoQwen, ["learning_rate=-1e-5"], "field 'learning_rate' = -1e-05 must be >= 0 (0: a control run"),
    (SimpoQwen, ["seed=-1"], "field 'seed' = -1 must be in [0, 2**32)"),
    (SimpoQwen, ["max_new_tokens=0"], "field 'max_new_tokens' = 0 must be >= 1"),
    (SimpoQwen, ["max_length=0"], "field 'max_length' = 0 must be >= 1"),
    (SimpoQwen, ["lora_rank=0"], "field 'lora_rank' = 0 must be >= 1"),
    (SimpoQwen, ["lora_alpha=0"], "field 'lora_alpha' = 0 must be > 0"),
    (SimpoQwen, ["lora_dropout=1.0"], "field 'lora_dropout' = 1.0 must be in [0, 1)"),
    (SimpoQwen, ["lora_dropout=-0.1"], "field 'lora_dropout' = -0.1 must be in [0, 1)"),
    (SimpoQwen, ["eval_limit=-1"], "field 'eval_limit' = -1 must be >= 0"),
    (SimpoQwen, ["eval_truncation=middle"], "field 'eval_truncation' = 'middle' must be one of error, left"),
    (SimpoQwen, ["beta=inf"], "field 'beta' = inf must be a finite number"),
    (SimpoQwen, ["gamma=-inf"], "field 'gamma' = -inf must be a finite number"),
    (SimpoQwen, ["beta=-1"], "field 'beta' = -1.0 must be >= 0"),
    (DistillQwen, ["kd_temperature=0"], "field 'kd_temperature' = 0.0 must be > 0"),
    (DistillQwen, ["kd_alpha=1.5"], "field 'kd_alpha' = 1.5 must be in [0, 1]"),
    (GrpoQwen, ["reward_weights=1.0,nan"], "field 'reward_weights' = [1.0, nan] must be a finite number"),
    (SimpoQwen, ["evaluators=judge", "select_metric=eval/judge/score", "judge_timeout_s=nan"],
     "field 'judge_timeout_s' = nan must be a finite number"),
    (SimpoQwen, ["evaluators=judge", "select_metric=eval/judge/score", "judge_max_concurrency=0"],
     "field 'judge_max_concurrency' = 0 must be >= 1"),
    (SftCodeQwen, ["humaneval_temperature=inf"], "field 'humaneval_temperature' = inf must be a finite number"),
]


@pytest.mark.parametrize(("cls", "args", "message"), NONSENSE, ids=[" ".join(args) for _, args, _ in NONSENSE])
def test_case9_values_that_make_no_sense_are_refused_naming_the_field(cls, args, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(cls, args)
    assert message in str(err.value)


def test_case9_a_nonfinite_loss_stops_the_run_and_other_train_values_only_warn(capsys):
    from harness.training.guards import NonFiniteGuard

    class State:
        global_step = 7

    NonFiniteGuard(stop=True).on_log(None, State(), None, logs={"loss": 0.5, "rewards/mean": float("nan")})
    assert "[warn] step 7: train/rewards/mean=nan is not finite" in capsys.readouterr().out  # GRPO logs such NaN
    with pytest.raises(TrainingDiverged, match=r"step 7: train/loss=nan is not finite .*stop_on_nonfinite=true"):
        NonFiniteGuard(stop=True).on_log(None, State(), None, logs={"loss": float("nan")})
    with pytest.raises(TrainingDiverged, match=r"step 3: eval/perplexity/perplexity=inf"):
        NonFiniteGuard(stop=True)(_report(3, perplexity__perplexity=math.inf), None)
    NonFiniteGuard(stop=False).on_log(None, State(), None, logs={"loss": float("inf")})
    assert "[warn] step 7: train/loss=inf is not finite" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("stop", [True, False], ids=["stop", "train_on"])
def test_case9_a_loss_that_turns_nan_is_logged_and_stops_the_run_failed(tmp_path, tiny_model_dir, stop, monkeypatch,
                                                                        capsys):
    """learning_rate=1e30 (finite, so accepted) blows the embedded model's weights up after one step. The run goes
    through the CLI's entry point in this process (its exit status and console lines as `python -m harness run`'s;
    test_experiment_run runs the command in a subprocess)."""
    from harness.commands.cli import main

    rows = (REPO_ROOT / "data" / "sft.jsonl").read_text().splitlines()[:16]
    (tmp_path / "sft.jsonl").write_text("\n".join(rows) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "sft_qwen", f"train_data={tmp_path / 'sft.jsonl'}", "learning_rate=1e30", "max_steps=3",
                 "eval_every=3", "eval_limit=4", "max_new_tokens=4", "batch_size=2", "backend=hf", "evaluators=bleu",
                 "select_metric=eval/bleu/bleu", f"stop_on_nonfinite={str(stop).lower()}",
                 f"output_dir={tmp_path / 'out'}"])
    stdout, stderr = capsys.readouterr()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert math.isfinite(loss[1]) and math.isnan(loss[2])  # logged as NaN, not dropped, not shown as 0.0
    if stop:
        assert code == 1, stderr[-3000:]
        assert "error: step 2: train/loss=nan" in stderr and "stop_on_nonfinite=false" in stderr
        assert run.info.status == "FAILED" and set(loss) == {1, 2}
    else:
        assert code == 0, stderr[-3000:]
        assert "[warn] step 2: train/loss=nan" in stdout
        assert run.info.status == "FINISHED" and math.isnan(loss[3])


# ---- case 10: duplicate runs in compare, unwritable outputs ----

@pytest.fixture
def store(tmp_path, monkeypatch):
    """A small MLflow store made with the client: two runs with an eval curve each, no training."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("cmp", artifact_location=(tmp_path / "mlruns").as_uri())
    ids = []
    for name, values in (("first", (40.0, 42.0)), ("second", (40.0, 39.0))):
        run = client.create_run(exp_id, run_name=name)
        for step, value in zip((0, 2), values, strict=True):
            client.log_metric(run.info.run_id, "eval/bleu/bleu", value, step=step)
        client.log_param(run.info.run_id, "learning_rate", "1e-4" if name == "first" else "1e-5")
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return client, ids


def test_case10_compare_lists_a_run_given_twice_once(store, tmp_path):
    from harness.commands.compare import compare

    client, (a, b) = store
    table, png, _ = compare([a, b, a], out=str(tmp_path / "curves.png"))
    header = table.splitlines()[0]
    assert header.count(a[:8]) == 1 and header.count(b[:8]) == 1
    assert header.index(a[:8]) < header.index(b[:8])  # order kept
    assert png.exists() and len(client.list_artifacts(a, "compare")) == 1


def _read_only_dir(tmp_path):
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


@pytest.mark.parametrize("where", ["under_a_file", pytest.param("read_only", marks=pytest.mark.skipif(
    AS_ROOT, reason="root writes into a read-only directory"))])
def test_case10_compare_refuses_an_unwritable_out_before_any_work(store, tmp_path, where, capsys):
    from harness.commands.cli import main

    _client, (a, _b) = store
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "curves.png" if where == "under_a_file" else _read_only_dir(tmp_path) / "c.png"
    assert main(["compare", a, "no-such-run", "--out", str(out)]) == 2  # checked before the runs are read
    assert f"error: --out {out}: " in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", pytest.param("read_only", marks=pytest.mark.skipif(
    AS_ROOT, reason="root writes into a read-only directory"))])
def test_case10_an_unwritable_output_dir_stops_in_prepare_before_the_run_opens(tmp_path, where):
    from harness.training.runner import prepare

    (tmp_path / "a-file").write_text("x")
    output_dir = tmp_path / "a-file" / "outputs" if where == "under_a_file" else _read_only_dir(tmp_path) / "o"
    exp = apply_overrides(SimpoQwen, [f"output_dir={output_dir}"])
    with pytest.raises(ConfigError, match=re.escape(f"output_dir {output_dir}/simpo_qwen: ")):
        prepare(exp, verbose=False)  # first thing: before the data is read or a model is resolved
