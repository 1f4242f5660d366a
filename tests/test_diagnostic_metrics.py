"""An evaluator's diagnostic metrics (a judge's request, failure and cache counts, HumanEval's outcome counts) say how
the evaluation went, not how good the model is: logged and shown, but never a select_metric, a row of the end-of-run
summary, or a divergence for the non-finite guard."""

import pytest

from evaluators import EVALUATORS, is_diagnostic
from experiments.sft_code_qwen import SftCodeQwen
from experiments.simpo_qwen import SimpoQwen
from harness.core.errors import ConfigError, TrainingDiverged
from harness.training.guards import NonFiniteGuard
from harness.training.inloop import EvalReport, format_report, is_quality_metric
from harness.training.overrides import apply_overrides

TIMES = {"eval/time/total_s": 1.0, "eval/time/sync_s": 0.1, "eval/time/generate_s": 0.5, "eval/time/score_s": 0.4}


def test_judge_and_humaneval_declare_their_counts_diagnostic_under_any_eval_set():
    assert EVALUATORS["judge"].diagnostic_metrics == ("parse_failures", "requests", "failed", "cache_hits")
    assert EVALUATORS["humaneval"].diagnostic_metrics == ("passed", "failed", "timed_out", "errored")
    for key in ("eval/judge/requests", "eval/heldout/judge/cache_hits", "eval/humaneval/errored"):
        assert is_diagnostic(key) and not is_quality_metric(key), key
    for key in ("eval/judge/score", "eval/heldout/judge/win_rate", "eval/humaneval/pass_at_1", "eval/rouge/rougeL"):
        assert not is_diagnostic(key) and is_quality_metric(key), key
    assert not is_diagnostic("eval/time/judge_s") and not is_diagnostic("eval/answer/failed")  # another's name


@pytest.mark.parametrize(("cls", "args", "metric", "listed"), [
    (SimpoQwen, ["evaluators=judge"], "eval/judge/requests", "eval/judge/score, eval/judge/win_rate"),
    (SftCodeQwen, [], "eval/humaneval/passed", "eval/humaneval/pass_at_1"),
])
def test_a_diagnostic_is_refused_as_select_metric_listing_only_quality_metrics(cls, args, metric, listed):
    with pytest.raises(ConfigError) as err:
        apply_overrides(cls, [*args, f"select_metric={metric}"])
    assert str(err.value).endswith(f"field 'select_metric' = '{metric}' is a diagnostic (how the evaluation went, "
                                   f"not how good the model is); choose one of: {listed}")


def test_the_nonfinite_guard_stops_on_a_score_and_not_on_a_diagnostic():
    guard = NonFiniteGuard(stop=True)
    guard(EvalReport(3, {"eval/judge/score": 7.0, "eval/judge/requests": float("inf"),
                         "eval/humaneval/errored": float("nan")}, {}, {}), None)  # no exception
    with pytest.raises(TrainingDiverged, match="step 3: eval/judge/score=nan is not finite"):
        guard(EvalReport(3, {"eval/judge/score": float("nan"), "eval/judge/requests": 4.0}, {}, {}), None)


def test_the_summary_compares_scores_only_and_the_console_shows_diagnostics_apart(capsys):
    from harness.training.summary import RunSummary, print_summary

    reports = [EvalReport(step, {"eval/judge/score": score, "eval/judge/requests": requests,
                                 "eval/judge/cache_hits": 0.0, **TIMES}, {}, {})
               for step, score, requests in ((0, 5.0, 8.0), (2, 6.0, 16.0))]
    print_summary(RunSummary("rid", "sqlite:///x", "exp", reports, None, None, None, 1.0, 2, "eval/judge/score"))
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("eval/")]
    assert rows == ["eval/judge/score"]
    line = format_report(reports[1])
    assert line.startswith("[eval] step 2: judge/score=6.00 | judge/requests=16 judge/cache_hits=0 | 1.00s")
