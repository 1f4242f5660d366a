"""Error bars and paired tests (evaluators/uncertainty.py) against sacreBLEU's own bootstrap and direct computation;
the `answer` evaluator's normalisation; where the error bars show up (MLflow keys, the eval line, the end-of-run
summary, `harness compare`)."""

import json
import math
import random
import statistics

import numpy as np
import pytest
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest, _bootstrap_resample

from evaluators import EVALUATORS, EvalContext
from evaluators.answer import answer_scores, contains_answer, extract_answer, last_number, normalize, parse_number
from evaluators.bleu import Bleu, bleu_statistics, corpus_bleu
from evaluators.uncertainty import (
    N_RESAMPLES,
    N_TRIALS,
    Paired,
    Statistic,
    bootstrap_interval,
    error_bars,
    holm,
    mean_statistic,
    paired_randomization,
    paired_tests,
    percentile_interval,
    resample_indices,
    standard_error,
    unit_table,
)
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import eval_set_samples
from harness.core.generation import Completion
from harness.core.records import EvalSample, Record
from harness.paths import DATA_DIR


def _eval_rows(n: int = 64) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()][:n]


def _systems(seed: int = 1) -> tuple[list[str], list[str], list[str]]:
    """References and two systems' outputs: a noisier baseline and a better system, on 64 eval references."""
    refs = [r["reference"] for r in _eval_rows()]
    rng = random.Random(seed)

    def noisy(text: str, edits: int) -> str:
        chars = list(text)
        for _ in range(rng.randint(0, edits)):
            chars[rng.randrange(len(chars))] = "x"
        return "".join(chars)

    return refs, [noisy(r, 5) for r in refs], [noisy(r, 2) for r in refs]


def _bleu(stats) -> Statistic:
    return Statistic(np.asarray(stats, dtype=float), lambda totals: Bleu.corpus_score("bleu", totals))


# ---- against sacreBLEU ----

def test_bleu_statistics_sum_to_sacrebleu_corpus_bleu():
    refs, _, hyps = _systems()
    stats, tokenize = bleu_statistics(hyps, refs)
    assert tokenize == "zh" and len(stats) == 64 and len(stats[0]) == 10
    assert _bleu(stats).value() == pytest.approx(corpus_bleu(hyps, refs)[0], abs=1e-9)


def test_bleu_interval_matches_sacrebleu_bootstrap():
    refs, _, hyps = _systems()
    stats, tokenize = bleu_statistics(hyps, refs)
    ours = bootstrap_interval(_bleu(stats))  # 1000 resamples, seed 12345: sacreBLEU's defaults
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(hyps, [refs], n_bootstrap=N_RESAMPLES)  # mean and half-width of its 95% interval
    assert (ours.high - ours.low) / 2 == pytest.approx(score._ci, abs=0.01)
    # the two ends themselves: the same order statistics of sacreBLEU's own resampled scores
    _, resampled = _bootstrap_resample(metric._extract_corpus_statistics(hyps, [refs]), metric, N_RESAMPLES)
    low, high = percentile_interval(np.array([s.score for s in resampled]))
    assert ours.low == pytest.approx(low, abs=0.01) and ours.high == pytest.approx(high, abs=0.01)
    assert ours.low < ours.value < ours.high
    assert ours.se == pytest.approx(np.std([s.score for s in resampled], ddof=1), abs=0.01)


def test_bleu_from_totals_equals_sacrebleus_compute_bleu_on_every_kind_of_row():
    rng = np.random.default_rng(0)
    total = rng.integers(0, 30, (5000, 4)) * (rng.random((5000, 4)) < 0.85)  # orders with no n-grams at all
    correct = np.minimum(total, rng.integers(0, 30, (5000, 4))) * (rng.random((5000, 4)) < 0.7)  # and no matches
    rows = np.column_stack([rng.integers(0, 60, 5000), rng.integers(0, 60, 5000), correct, total]).astype(float)
    scorer = BLEU()
    expected = [scorer._compute_score_from_stats(list(row)).score for row in rows]
    assert np.max(np.abs(Bleu.corpus_score("bleu", rows) - expected)) < 1e-9
    assert sum(e > 0 for e in expected) > 1000 and sum(e == 0 for e in expected) > 1000


def test_paired_randomization_p_values_equal_sacrebleus_ar():
    refs, base, new = _systems()
    (stats_a, tokenize), (stats_b, _) = bleu_statistics(base, refs), bleu_statistics(new, refs)
    half = [*new[:32], *base[32:]]
    for system, stats in (("new", stats_b), ("half", bleu_statistics(half, refs)[0])):
        ours = paired_randomization(_bleu(stats_a), _bleu(stats))
        _, scores = PairedTest([("base", base), (system, new if system == "new" else half)],
                               {"BLEU": BLEU(tokenize=tokenize)}, [refs], test_type="ar", n_samples=N_TRIALS)()
        baseline, result = scores["BLEU"]
        assert ours.delta == pytest.approx(result.score - baseline.score, abs=1e-9)
        # the same 10,000 swaps (sacreBLEU's draw and seed); no trial ties the observed BLEU difference, so the only
        # departure is the observed assignment counted as half a trial (mid-p) instead of one
        assert ours.p_value == pytest.approx(result.p_value - 0.5 / (N_TRIALS + 1), abs=1e-12)
    assert paired_randomization(_bleu(stats_a), _bleu(stats_b)).significant


# ---- calibration, by simulation: equal systems are called different alpha of the time ----

_N, _PAIRS = 64, 1000


def _rejections(pairs) -> tuple[float, int]:
    """The share of pairs called significant at 0.05, and how often interval and verdict disagreed."""
    tests = [paired_randomization(a, b) for a, b in pairs]
    return sum(t.significant for t in tests) / len(tests), sum(t.significant != t.excludes_zero for t in tests)


def test_equal_systems_with_0_100_scores_are_called_different_about_5_percent_of_the_time():
    rng = np.random.default_rng(1)

    def pair():
        p = rng.uniform(0.1, 0.9, _N)  # each sample has its own difficulty, the same for both systems
        return mean_statistic((rng.random(_N) < p) * 100.0), mean_statistic((rng.random(_N) < p) * 100.0)

    rate, disagreements = _rejections(pair() for _ in range(_PAIRS))
    assert 0.03 <= rate <= 0.07 and disagreements == 0


def test_equal_systems_with_continuous_scores_are_called_different_about_5_percent_of_the_time():
    rng = np.random.default_rng(2)

    def pair():
        mu = rng.uniform(20, 80, _N)
        return tuple(mean_statistic(np.clip(mu + rng.normal(0, 15, _N), 0, 100)) for _ in range(2))

    rate, disagreements = _rejections(pair() for _ in range(_PAIRS))
    assert 0.03 <= rate <= 0.07 and disagreements == 0


def test_equal_systems_by_corpus_bleu_are_called_different_about_5_percent_of_the_time():
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(60)]
    refs = [" ".join(rng.choice(vocab, rng.integers(8, 20))) for _ in range(_N)]

    def noisy(ref: str) -> str:
        words = ref.split()
        for _ in range(rng.integers(0, 6)):
            words[rng.integers(len(words))] = rng.choice(vocab)
        return " ".join(words)

    # 12 candidate outputs per sample from one noisy system; each null pair draws both sides' outputs from them
    pool = np.array([bleu_statistics([noisy(r) for r in refs], refs)[0] for _ in range(12)], dtype=float)

    def pair():
        return tuple(_bleu(pool[rng.integers(12, size=_N), np.arange(_N)]) for _ in range(2))

    rate, disagreements = _rejections(pair() for _ in range(_PAIRS))
    assert 0.03 <= rate <= 0.07 and disagreements == 0


def test_equal_systems_by_corpus_perplexity_a_ratio_are_called_different_about_5_percent_of_the_time():
    rng = np.random.default_rng(4)
    perplexity = EVALUATORS["perplexity"]

    def pair():
        tokens, nll = rng.integers(5, 40, _N), rng.uniform(1, 3, _N)  # per-token NLL and length vary by sample
        return tuple(Statistic(np.column_stack([(nll + rng.normal(0, 0.5, _N)).clip(0.05) * tokens, tokens]),
                               lambda t: perplexity.corpus_score("perplexity", t)) for _ in range(2))

    rate, disagreements = _rejections(pair() for _ in range(_PAIRS))
    assert 0.03 <= rate <= 0.07 and disagreements == 0


def test_a_real_difference_of_50_to_80_percent_on_64_samples_is_found_at_least_80_percent_of_the_time():
    rng = np.random.default_rng(5)
    pairs = ((mean_statistic((rng.random(_N) < 0.5) * 100.0), mean_statistic((rng.random(_N) < 0.8) * 100.0))
             for _ in range(_PAIRS))
    rate, disagreements = _rejections(pairs)
    assert rate >= 0.8 and disagreements == 0


def test_interval_and_verdict_agree_at_the_edge_of_significance():
    # k of 64 samples flip from 0 to 100, none the other way: the first k called significant is a tie-heavy edge
    for k in range(12):
        test = paired_randomization(mean_statistic([0.0] * 64), mean_statistic([100.0] * k + [0.0] * (64 - k)))
        assert test.significant == test.excludes_zero == (k >= 5), (k, test.describe())
    edge = paired_randomization(mean_statistic([0.0] * 64), mean_statistic([100.0] * 5 + [0.0] * 59))
    assert edge.open_interval and edge.low == pytest.approx(0) and "95% CI (+0.000, +15.625)" in edge.describe()


def test_holm_adjusts_a_family_of_p_values_step_down():
    tests = {k: Paired(0, 1, 1, 0, 2, p, 64) for k, p in {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}.items()}
    adjusted = holm(tests)
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> kept monotone: 0.06 for the last
    assert {k: round(t.p_adjusted, 10) for k, t in adjusted.items()} == {"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06}
    assert [adjusted[k].significant for k in "abcd"] == [True, False, False, True]
    assert all(t.family == 4 for t in adjusted.values()) and tests["c"].significant  # 0.03 alone would be
    assert "p=0.030 (Holm p=0.060 over 4 metrics), not significant" in adjusted["c"].describe()


# ---- means ----

def test_standard_error_and_interval_of_a_mean_by_direct_computation():
    values = [random.Random(3).uniform(0, 100) for _ in range(50)]
    assert standard_error(values) == pytest.approx(statistics.stdev(values) / math.sqrt(50))
    interval = bootstrap_interval(mean_statistic(values), is_mean=True)
    assert interval.value == pytest.approx(statistics.mean(values))
    assert interval.se == pytest.approx(statistics.stdev(values) / math.sqrt(50))
    means = np.sort(np.asarray(values)[resample_indices(50)].mean(axis=1))  # the resamples, directly
    assert (interval.low, interval.high) == pytest.approx((means[25], means[974]))
    assert math.isnan(standard_error([1.0]))


def test_paired_mean_difference_and_identical_systems():
    base = [0.0] * 20 + [100.0] * 4
    new = [100.0] * 12 + [0.0] * 8 + [100.0] * 4
    result = paired_randomization(mean_statistic(base), mean_statistic(new))
    assert result.delta == pytest.approx(50.0) and result.significant and result.low > 0
    # 12 flips all one way: the only swaps as extreme are the 2 of 4096 sign patterns with all 12 the same way
    assert result.p_value == pytest.approx(2 / 4096, abs=0.0015)
    same = paired_randomization(mean_statistic(base), mean_statistic(base))  # sacreBLEU's `ar` would give 1/10001
    assert same.delta == 0 and same.p_value == 1.0 and not same.significant and same.low == same.high == 0


def test_paired_tests_pair_tables_by_id_and_refuse_other_samples():
    ids = [str(i) for i in range(10)]
    base = {"id": ids, "prompt": ids, "answer/exact": [0.0] * 10}
    new = {"id": ids[::-1], "prompt": ids[::-1], "answer/exact": [100.0] * 9 + [0.0]}  # same samples, reordered
    (key, test), = paired_tests({"answer": EVALUATORS["answer"]}, base, new).items()
    assert key == "eval/answer/exact" and test.delta == pytest.approx(90.0) and test.n == 10
    other = {**new, "prompt": ["changed"] * 10}
    assert paired_tests({"answer": EVALUATORS["answer"]}, base, other) == {}


# ---- the answer evaluator ----

@pytest.mark.parametrize(("output", "answer", "reference", "exact", "numeric"), [
    ("Rome", "Rome", "", 100, None),
    ("  rome. ", "Rome", "", 100, None),  # case, white space, trailing punctuation
    ("The capital of Italy is Rome.", "Rome", "The capital of Italy is Rome.", 100, None),  # the reference's frame
    ("the capital of italy is  ROME", "Rome", "The capital of Italy is Rome.", 100, None),
    ("The capital of Italy is Paris.", "Rome", "The capital of Italy is Rome.", 0, None),
    ("“轻”的反义词是“重”。", "重", "“轻”的反义词是“重”。", 100, None),
    ("答案是：北京。", "北京", "", 100, None),
    ("The total is 1,000.", "1000", "", 0, 100),  # numeric: commas
    ("x = 3.50", "3.5", "", 0, 100),  # decimals
    ("It is -7.", "-7", "", 0, 100),  # a sign
    ("It is 7.", "-7", "", 0, 0),
    ("63-58", "58", "", 0, 100),  # a minus after a digit is not a sign
    ("The answer is 3/4.", "0.75", "", 0, 100),  # a simple fraction
    ("#### 72", "72", "", 100, 100),  # GSM8K's marker
    ("11 plus 92 is 103.", "103", "11 plus 92 is 103.", 100, 100),
    ("11 plus 92 is 104.", "103", "11 plus 92 is 103.", 0, 0),
    ("The word \"glove\" has 5 letters.", "5", "The word \"glove\" has 5 letters.", 100, 100),
])
def test_answer_normalisation(output, answer, reference, exact, numeric):
    scores = answer_scores(output, answer, reference)
    assert scores["exact"] == exact
    assert math.isnan(scores["numeric"]) if numeric is None else scores["numeric"] == numeric
    assert scores["contains"] == 100 * (answer in output)


def test_answer_numbers_and_normal_form():
    assert parse_number("1,000") == parse_number("1000") == 1000
    assert parse_number("3.50") == parse_number("3.5") == 3.5
    assert parse_number("-7") == parse_number("\u22127") == -7
    assert parse_number("Rome") is None and parse_number("5 letters") is None
    assert last_number("from 3 to 12,500 apples") == 12500 and last_number("none") is None
    assert normalize(" “LION”. ") == "lion" and normalize("Ｒｏｍｅ！") == "rome"
    assert extract_answer(r"so \boxed{\frac{1}{2}} then") == r"\frac{1}{2}"


def test_answer_evaluator_metrics_per_sample_and_missing_answer():
    samples = [EvalSample("a", "q", "11 plus 92 is 103.", "103"), EvalSample("b", "q", "It is Rome.", "Rome"),
               EvalSample("c", "q", "1 plus 1 is 2.", "2")]
    result = EVALUATORS["answer"]().evaluate(EvalContext(samples, predictions=["11 plus 92 is 103.", "Paris",
                                                                                "1 plus 1 is 3."]))
    assert result.per_sample["exact"] == [100.0, 0.0, 0.0]
    assert result.per_sample["numeric"][0] == 100.0 and math.isnan(result.per_sample["numeric"][1])
    assert result.metrics == {"exact": pytest.approx(100 / 3), "numeric": 50.0, "contains": pytest.approx(100 / 3)}
    with pytest.raises(DataError, match="needs an 'answer' field .* id\\(s\\) x"):
        EVALUATORS["answer"]().evaluate(EvalContext([EvalSample("x", "q", "r")], predictions=["r"]))


def test_an_eval_file_without_answer_stops_in_prepare_naming_file_line_and_field(tmp_path):
    from experiments.simpo_qwen import SimpoQwen
    from harness.training.overrides import apply_overrides
    from harness.training.runner import prepare

    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "p", "reference": "r", "answer": "a"}\n{"prompt": "p", "reference": "r"}\n')
    exp = apply_overrides(SimpoQwen, [f"eval_data={path}", "evaluators=answer,bleu", "select_metric=eval/answer/exact",
                                      f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match=rf"{path} line 2: field 'answer' is missing \(the answer evaluator reads it\)"):
        prepare(exp, verbose=False)
    # without the evaluator the field is optional; a number is taken as written
    records = [Record("x line 1", {"prompt": "p", "reference": "r", "answer": 72}), Record("x line 2", {
        "prompt": "p", "reference": "r"})]
    assert [s.answer for s in eval_set_samples(records)] == ["72", None]


def test_error_bar_keys_are_not_selectable():
    from experiments.simpo_qwen import SimpoQwen
    from harness.training.overrides import apply_overrides

    exp = apply_overrides(SimpoQwen, ["evaluators=answer,bleu", "select_metric=eval/answer/numeric"])
    assert exp.select_metric == "eval/answer/numeric"
    with pytest.raises(ConfigError, match="is not produced by the chosen evaluators"):
        apply_overrides(SimpoQwen, ["evaluators=answer,bleu", "select_metric=eval/bleu/bleu4_se"])
    with pytest.raises(ConfigError, match="answer_tolerance"):
        apply_overrides(SimpoQwen, ["evaluators=answer", "select_metric=eval/answer/exact", "answer_tolerance=-1"])


def test_grpo_answer_reward_is_the_evaluators_contains_rule():
    from harness.rl import rewards

    assert rewards.contains_answer is contains_answer
    outputs = ["11 plus 92 is 103.", "103", "It is 1,03", "the answer is rome", "Rome!"]
    answers = ["103", "103", "103", "Rome", "Rome"]
    paid = rewards.answer_match([[{"role": "assistant", "content": o}] for o in outputs], answers)
    assert paid == [answer_scores(o, a)["contains"] / 100 for o, a in zip(outputs, answers, strict=True)]
    assert paid == [1.0, 1.0, 0.0, 0.0, 1.0]


# ---- in the loop, the summary and compare ----

class _Backend:
    name = "scripted"

    def __init__(self, outputs: list[str]):
        self.outputs = outputs

    def sync_weights(self, model) -> None:
        pass

    def generate(self, prompt_ids, params):
        return [Completion([o], len(o.split())) for o in self.outputs]


def _evaluate(step: int, outputs: list[str], samples: list[EvalSample]):
    from harness.core.generation import GenParams
    from harness.training.inloop import Evaluation

    evaluators = [EVALUATORS["answer"](), EVALUATORS["bleu"]()]
    evaluation = Evaluation(evaluators, samples, _Backend(outputs), None, GenParams(max_new_tokens=8),
                            prompt_ids=[[1]] * len(samples))
    return evaluation.run(model=None, step=step)


def _samples_and_outputs() -> tuple[list[EvalSample], list[str], list[str]]:
    rows = _eval_rows()
    samples = [EvalSample(r["id"], r["prompt"], r["reference"], r["answer"]) for r in rows]
    right = [r["reference"] for r in rows]
    wrong = [r["reference"].replace(r["answer"], "?") for r in rows]
    return samples, [w if i % 8 else r for i, (r, w) in enumerate(zip(right, wrong, strict=True))], \
        [r if i % 4 else w for i, (r, w) in enumerate(zip(right, wrong, strict=True))]


def test_evaluation_logs_error_bars_and_the_eval_line_shows_them(capsys):
    import time

    from harness.training.inloop import format_report, is_quality_metric

    samples, before, _ = _samples_and_outputs()
    report = _evaluate(0, before, samples)
    m = report.metrics
    for key in ("eval/answer/exact", "eval/answer/numeric", "eval/answer/contains", "eval/bleu/bleu4",
                "eval/bleu/bleu"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
        assert m[f"{key}_se"] > 0 and not is_quality_metric(f"{key}_se") and is_quality_metric(key)
    values = report.table["answer/exact"]
    assert m["eval/answer/exact_se"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert "bleu/bleu_stats" in report.table and len(report.table["bleu/bleu_stats"]) == 64
    line = format_report(report)
    assert f"answer/exact={m['eval/answer/exact']:.2f}±{m['eval/answer/exact_se']:.2f}" in line
    assert "_se" not in line and "_ci" not in line
    start = time.perf_counter()
    _evaluate(0, before, samples)
    assert m["eval/time/error_bars_s"] < 1.0 and time.perf_counter() - start < 5


def test_summary_marks_each_change_significant_or_not(capsys):
    from harness.training.summary import RunSummary, print_summary

    samples, before, after = _samples_and_outputs()
    reports = [_evaluate(0, before, samples), _evaluate(2, after, samples)]
    print_summary(RunSummary("rid", "sqlite:///x", "exp", reports, None, None, None, 1.0, 2, "eval/answer/exact"))
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("eval/")}
    assert "paired approximate randomization over the same eval samples, 10000 trials, seed 12345" in out
    assert "Holm-adjusted p < 0.05" in out
    assert ("+62.500, 95% CI [+40.625, +84.375], p<0.001 (Holm p<0.001 over 5 metrics), significant)"
            in lines["eval/answer/exact"])
    assert "95% CI [+12.570, +28.195]" in lines["eval/bleu/bleu"]
    assert "significant" in lines["eval/answer/numeric"] and "samples with a value" in lines["eval/answer/numeric"]


def test_the_run_description_is_the_summary_as_a_markdown_table():
    from pathlib import Path

    from harness.training.inloop import EvalReport
    from harness.training.summary import RunSummary, summary_markdown, summary_tests

    samples, before, after = _samples_and_outputs()
    reports = [_evaluate(0, before, samples), _evaluate(2, after, samples)]
    summary = RunSummary("rid", "sqlite:///x", "exp", reports, Path("best"), 2, 93.75, 12.0, 2, "eval/answer/exact")
    whole, text = summary_markdown(summary, summary_tests(summary))
    assert whole == text  # short enough for the run's page
    lines = text.splitlines()
    assert "| metric | baseline | final | delta | 95% interval | p (Holm) | verdict |" in lines
    base, final = reports[0].metrics["eval/answer/exact"], reports[1].metrics["eval/answer/exact"]
    assert (f"| `eval/answer/exact` | {base:.3f} | {final:.3f} | +62.500 | [+40.625, +84.375] | p<0.001 (Holm "
            f"p<0.001) | **significant** |") in lines
    assert lines[-1].startswith("Changes tested by paired approximate randomization over the same eval samples")
    assert "Best checkpoint: step 2, eval/answer/exact = 93.75." in lines
    # a description longer than MLflow keeps is cut to whole rows, saying how many are left out
    many = {f"eval/m{i}/score": float(i) for i in range(400)}
    wide = RunSummary("rid", "sqlite:///x", "exp", [EvalReport(0, many, {}, {}), EvalReport(1, many, {}, {})],
                      None, None, None, 1.0, 1, "eval/m0/score")
    whole, cut = summary_markdown(wide, {})
    assert sum(line.startswith("| `eval/") for line in whole.splitlines()) == 400
    assert len(cut) <= 8000 and "| `eval/m0/score` | 0.000 | 0.000 | +0.000 | | | not tested |" in cut
    (note,) = [line for line in cut.splitlines() if "more rows in the artifact summary.md" in line]
    shown = sum(line.startswith("| `eval/") for line in cut.splitlines())
    assert note.startswith(f"| ... {400 - shown} more rows")


def test_compare_gives_the_paired_difference_of_two_runs(tmp_path, monkeypatch):
    from harness.commands.compare import compare
    from harness.training.tracking.runs import mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    samples, before, after = _samples_and_outputs()
    ids = []
    for outputs, rate in ((before, "0.0"), (after, "1e-05")):
        with mlflow_run("cmp", {"learning_rate": rate, "seed": 0}, {}) as tracker:
            for step in (0, 2):
                report = _evaluate(step, outputs, samples)
                tracker.log_metrics(report.metrics, step)
                tracker.log_table(report.table, f"eval_samples/step_{step:06d}.json")
            ids.append(tracker.run_id)
    table, _, _ = compare(ids, out=str(tmp_path / "c.png"))
    (header,) = [line for line in table.splitlines() if line.startswith("paired difference vs ")]
    assert f"({ids[0][:8]})" in header
    (exact,) = [line for line in table.splitlines() if line.strip().startswith("eval/answer/exact ") and "CI" in line]
    assert "95% CI [" in exact and exact.rstrip().endswith(", significant)")
    assert any(line.strip().startswith("eval/bleu/bleu ") and ", p<0.001 (Holm" in line for line in table.splitlines())
    assert "_se" not in table and "_ci_low" not in table  # the error-bar keys are not listed as metrics

    # the picture: runs named by experiment and what differs, each point's interval a band, a star where the final
    # evaluation differs from the first run's
    import matplotlib.pyplot as plt

    from harness.commands.compare import _plotted, curve_figure, format_paired
    from harness.training.tracking.queries import load_runs, load_table

    runs = load_runs(ids, None, _plotted, 10)
    _, tests = format_paired(runs, {r.run_id: {"": load_table(r.run_id, "eval_samples/step_000002.json")}
                                    for r in runs})
    figure = curve_figure(runs, tests)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == [f"cmp learning_rate=0.0 ({ids[0][:8]})", f"cmp learning_rate=1e-05 ({ids[1][:8]})"]
    assert legend[2].startswith("* final point differs from cmp learning_rate=0.0")
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    exact = panels["answer/exact"]
    assert len(exact.collections) == 2  # one band per run
    metrics = _evaluate(2, after, samples).metrics
    corners = {tuple(np.round(v, 6)) for v in exact.collections[1].get_paths()[0].vertices}
    assert {(2.0, round(metrics["eval/answer/exact_ci_low"], 6)), (2.0, round(metrics["eval/answer/exact_ci_high"], 6))
            } <= corners
    stars = [line for line in exact.get_lines() if line.get_marker() == "*"]
    assert [tuple(line.get_xydata()[0]) for line in stars] == [(2, metrics["eval/answer/exact"])]
    plt.close(figure)


@pytest.mark.slow
def test_in_loop_run_logs_error_bars_and_the_summary_tests_the_change(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "simpo_qwen", "evaluators=answer,bleu", "select_metric=eval/answer/exact", "max_steps=2",
                 "eval_every=1", "eval_limit=8", "max_new_tokens=8", "backend=hf",
                 f"output_dir={tmp_path / 'outputs'}"])  # the CLI's entry point, in this process
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    for key in ("eval/answer/exact", "eval/answer/contains", "eval/bleu/bleu4", "eval/bleu/bleu"):
        for suffix in ("_se", "_ci_low", "_ci_high"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key + suffix)] == [0, 1, 2], key
    (line,) = [x for x in stdout.splitlines() if x.strip().startswith("eval/bleu/bleu4 ")]
    assert "95% CI [" in line and ("not significant)" in line or ", significant)" in line)
    assert "±" in next(x for x in stdout.splitlines() if x.startswith("[eval] step 0:"))


def test_evaluators_with_their_own_units_are_tested_over_units_not_rows():
    humaneval, reward = EVALUATORS["humaneval"], EVALUATORS["reward_accuracy"]
    # HumanEval, 2 samples of each of 12 problems: a problem's pass@1 is its share of passing samples
    tasks = [f"HumanEval/{i}" for i in range(12) for _ in range(2)]
    before = {"task_id": tasks, "pass_at_1": [0.0] * 24}
    after = {"task_id": tasks, "pass_at_1": [100.0, 0.0] * 6 + [100.0] * 12}
    units = unit_table(humaneval, after)
    assert units["id"] == [f"HumanEval/{i}" for i in range(12)]
    assert units["humaneval/pass_at_1"] == [50.0] * 6 + [100.0] * 6
    (key, test), = paired_tests({"humaneval": humaneval}, {}, {}, {"humaneval": before}, {"humaneval": after}).items()
    assert key == "eval/humaneval/pass_at_1" and test.n == 12 and test.delta == pytest.approx(75.0)
    assert test.significant and test.p_value == pytest.approx(2 / 4096, abs=0.0015)  # 12 units all one way
    assert set(error_bars(humaneval, units)) == {"pass_at_1_se", "pass_at_1_ci_low", "pass_at_1_ci_high"}
    # reward accuracy over its pairs
    before = {"pair": list(range(8)), "accuracy": [0.0] * 8, "margin": [-1.0] * 8}
    after = {"pair": list(range(8)), "accuracy": [100.0] * 8, "margin": [0.5 + i for i in range(8)]}
    tests = paired_tests({"reward_accuracy": reward}, {}, {}, {"reward_accuracy": before},
                         {"reward_accuracy": after})
    assert tests["eval/reward_accuracy/accuracy"].delta == pytest.approx(100.0)
    assert tests["eval/reward_accuracy/margin"].delta == pytest.approx(5.0)


def test_compare_pairs_humaneval_over_its_problems_from_the_logged_own_tables(tmp_path, monkeypatch):
    from harness.commands.compare import compare
    from harness.training.tracking.runs import mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tasks = [f"HumanEval/{i}" for i in range(16)]
    ids = []
    for passing in (2, 14):  # problems solved at the final evaluation
        with mlflow_run("cmp_units", {}, {}) as tracker:
            for step in (0, 2):
                solved = passing if step == 2 else 0
                tracker.log_metrics({"eval/humaneval/pass_at_1": 100 * solved / 16}, step)
                tracker.log_table({"id": ["x"], "prompt": ["x"]}, f"eval_samples/step_{step:06d}.json")
                tracker.log_table({"task_id": tasks, "pass_at_1": [100.0] * solved + [0.0] * (16 - solved)},
                                  f"eval_samples/humaneval/step_{step:06d}.json")
            ids.append(tracker.run_id)
    table, _, _ = compare(ids, out=str(tmp_path / "c.png"))
    (line,) = [row for row in table.splitlines() if row.strip().startswith("eval/humaneval/pass_at_1 ") and "CI" in row]
    # 12 problems solved by the second run only: a paired test over 16 problems, not a bare difference
    assert "12.500 ->     87.500  (+75.000, 95% CI [" in line and line.rstrip().endswith(", significant)")


def test_the_summary_says_when_a_test_was_over_an_evaluators_own_units_or_fewer_samples():
    from harness.training.summary import Change

    def tested_over(key: str, n: int, samples: int) -> str:
        return Change("", samples, key, 0.0, 1.0, Paired(0.0, 1.0, 1.0, 0.5, 1.5, 0.01, n)).tested_over

    assert tested_over("eval/choice/acc", 60, 32) == ", over its 60 units (id)"
    assert tested_over("eval/facts/humaneval/pass_at_1", 20, 32) == ", over its 20 units (task_id)"
    assert tested_over("eval/answer/numeric", 30, 32) == ", over the 30 samples with a value"
    assert tested_over("eval/rouge/rougeL", 32, 32) == ""
    assert Change("", 32, "eval/rouge/rougeL", 0.0, 1.0, None).tested_over == ""  # nothing tested
