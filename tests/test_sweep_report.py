"""Whether a sweep's best trial is real (harness.sweeps.winner through report.log_study): trial runs made by hand in a
real MLflow store, each holding per-sample tables at step 0 and at its last evaluation, an Optuna study whose
completed trials point at them, and a real parent run that gets the verdict."""

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from evaluators import EVALUATORS
from evaluators.uncertainty import holm, paired_tests
from harness.sweeps.report import log_study
from harness.training.tracking.runs import mlflow_run

KEY = "eval/rouge/rougeL"
N = 64
LAST = 4  # each trial's last evaluation: the step its value comes from
LR = optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True)


def _table(scores) -> dict[str, list]:
    return {"id": [f"s{i}" for i in range(N)], "prompt": [f"question {i}" for i in range(N)],
            "rouge/rougeL": [float(x) for x in scores]}


def _sweep(tmp_path, monkeypatch, base, finals, fingerprints=None):
    """The parent run's state after log_study over one completed trial per entry of `finals` (its last table),
    every trial starting from `base` at step 0; returns (summary, parent run, {trial: its last table})."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", KEY)
    tables = {}
    for number, scores in enumerate(finals):
        fingerprint = (fingerprints or {}).get(number, "sha256:eval")
        with mlflow_run("sweep_report", {"model": "tiny-qwen2", "eval_data": "data/eval.jsonl"},
                        {"data.eval.fingerprint": fingerprint}) as run:
            run.log_table(_table(base), "eval_samples/step_000000.json")
            run.log_table(_table(scores), f"eval_samples/step_{LAST:06d}.json")
        tables[number] = _table(scores)
        study.add_trial(optuna.trial.create_trial(
            value=float(np.mean(scores)), intermediate_values={0: float(np.mean(base)), LAST: float(np.mean(scores))},
            params={"learning_rate": 1e-5 * (number + 1)}, distributions={"learning_rate": LR},
            user_attrs={"mlflow_run_id": run.run_id}))
    with mlflow_run("sweep_report", {}, {"sweep.role": "parent"}) as parent:
        summary = log_study(study, parent)
    return summary, MlflowClient(uri).get_run(parent.run_id), tables


def _scores(seed: int, shift: dict[int, float] | None = None):
    """A starting model's per-sample rougeL and four trials that each add per-sample noise (sd 4) to it, trial k
    also `shift[k]` on every sample."""
    rng = np.random.default_rng(seed)
    base = np.round(rng.uniform(40, 100, N), 2)
    return base, [np.round(base + rng.normal(0, 4, N) + (shift or {}).get(k, 0.0), 2) for k in range(4)]


def _text(client_run, tmp_path) -> str:
    path = MlflowClient().download_artifacts(client_run.info.run_id, "sweep/verdict.txt", str(tmp_path))
    return Path(path).read_text()


def test_best_of_equally_noisy_trials_is_indistinguishable_though_its_raw_p_is_under_alpha(tmp_path, monkeypatch,
                                                                                            capsys):
    # seed 35: the best of the four noisy trials is +1.05 over step 0 with a raw p of 0.027: alone, "significant";
    # one of four tries, it is not (the winner's curse), and it is no better than the runner-up
    base, finals = _scores(35)
    summary, parent, tables = _sweep(tmp_path, monkeypatch, base, finals)
    out = capsys.readouterr().out
    means = [float(np.mean(f)) for f in finals]
    best, runner_up = int(np.argmax(means)), int(np.argsort(means)[-2])
    assert summary["best_trial"] == best

    baseline = _table(base)
    family = {k: paired_tests(EVALUATORS, baseline, t)[KEY] for k, t in tables.items()}
    family["runner_up"] = paired_tests(EVALUATORS, tables[runner_up], tables[best])[KEY]
    adjusted = holm(family)
    vs_base, vs_runner = adjusted[best], adjusted["runner_up"]
    assert vs_base.p_value < 0.05 <= vs_base.p_adjusted and vs_runner.p_adjusted >= 0.05

    tags = parent.data.tags
    sentence = ("the best trial is indistinguishable from the baseline and from the runner-up (the sweep found no "
                "real improvement)")
    assert tags["sweep.verdict"] == summary["verdict"] == sentence
    assert tags["sweep.runner_up.trial"] == str(runner_up) and tags["sweep.verdict.tests"] == "5"
    for name, test in (("baseline", vs_base), ("runner_up", vs_runner)):  # the numbers of the paired test itself
        assert [float(tags[f"sweep.best_vs_{name}.{k}"]) for k in ("delta", "ci_low", "ci_high", "p_value", "p_holm")
                ] == [test.delta, test.low, test.high, test.p_value, test.p_adjusted]
        assert tags[f"sweep.best_vs_{name}.significant"] == "False"
    assert vs_base.base == pytest.approx(np.mean(base)) and vs_base.new == pytest.approx(means[best])

    block = out[out.index("[sweep] is the best trial real?"):].split("\n{")[0].strip()
    assert block == _text(parent, tmp_path).strip()
    lines = block.splitlines()
    assert f"{KEY} (higher is better) at each completed trial's last evaluation" in lines[0]
    assert f"same {N} eval samples" in lines[0]
    assert lines[1] == (f"  best trial {best}: {means[best]:.3f} (step {LAST}); baseline: {np.mean(base):.3f} "
                        f"(step 0 of trial {best}'s run, the starting model)")
    assert lines[2] == (f"  vs baseline (step 0): {vs_base.delta:+.3f}, 95% CI [{vs_base.low:+.3f}, "
                        f"{vs_base.high:+.3f}], p={vs_base.p_value:.3f} (Holm p={vs_base.p_adjusted:.3f} over 5 "
                        f"tests), not significant")
    assert lines[3].startswith(f"  vs runner-up (trial {runner_up}, {means[runner_up]:.3f} at step {LAST}): "
                               f"{vs_runner.delta:+.3f}, 95% CI [")
    assert lines[4].startswith("  Holm over 5 tests: each of the 4 completed trials against the baseline, and the "
                               "best against the runner-up")
    assert lines[-1] == f"  verdict: {sentence}"
    plots = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "sweep/plots")}
    assert "sweep/plots/optimization_history.png" in plots
    summary_path = MlflowClient().download_artifacts(parent.info.run_id, "sweep/summary.json", str(tmp_path))
    assert json.loads(Path(summary_path).read_text())["verdict"] == sentence


def test_a_trial_with_a_real_gain_is_significant_and_a_trial_from_other_eval_data_is_left_out(tmp_path, monkeypatch,
                                                                                             capsys):
    base, finals = _scores(35, shift={2: 5.0})
    finals.append(np.round(base + 1, 2))  # trial 4: evaluated on other eval data, so no baseline it shares
    summary, parent, tables = _sweep(tmp_path, monkeypatch, base, finals, fingerprints={4: "sha256:other"})
    out = capsys.readouterr().out
    assert summary["best_trial"] == 2
    tags = parent.data.tags
    assert tags["sweep.verdict"] == ("the best trial is better than the baseline and than the runner-up (a real "
                                     "improvement, and a real winner)")
    runner_up = int(tags["sweep.runner_up.trial"])
    assert runner_up != 4 and tags["sweep.verdict.tests"] == "5"  # 4 trials against the baseline, 1 against trial 2
    family = {k: paired_tests(EVALUATORS, _table(base), tables[k])[KEY] for k in range(4)}
    adjusted = holm(family | {"r": paired_tests(EVALUATORS, tables[runner_up], tables[2])[KEY]})
    assert float(tags["sweep.best_vs_baseline.p_holm"]) == adjusted[2].p_adjusted < 0.05
    assert float(tags["sweep.best_vs_runner_up.p_holm"]) == adjusted["r"].p_adjusted < 0.05
    assert float(tags["sweep.best_vs_baseline.delta"]) == adjusted[2].delta == pytest.approx(5.0, abs=1.5)
    assert tags["sweep.best_vs_baseline.significant"] == tags["sweep.best_vs_runner_up.significant"] == "True"
    assert ", significant" in next(line for line in out.splitlines() if line.startswith("  vs baseline (step 0): "))
    assert ("  note: trial 4: started from another model or eval data than trial 2 (data.eval.fingerprint differ); "
            "left out") in out.splitlines()
