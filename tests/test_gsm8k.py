"""GSM8K in the `answer` evaluator: GSM8K-format records read as eval samples, and the `#### N` (strict-match) and
last-number (flexible-extract) rules scoring exactly as lm-evaluation-harness's gsm8k task on the same outputs."""

import json
import math
from pathlib import Path

import pytest
import yaml

from evaluators import EVALUATORS, EvalContext
from evaluators.answer import answer_scores, gsm8k_extract
from harness.core.errors import DataError
from harness.core.eval_data import eval_set_samples
from harness.core.records import EvalSample, read_records
from harness.paths import DATA_DIR

EXAMPLE = DATA_DIR / "gsm8k_example.jsonl"


def _outputs(answer: str, solution: str) -> list[str]:
    """Model outputs for one problem: the worked solution, a stated answer, formats lm-eval treats specially (commas,
    `$`, a trailing period, a decimal), wrong and empty ones, and answers where the two filters disagree."""
    wrong = str(int(answer) + 1)
    return [solution, f"The answer is {answer}.", f"#### {answer}", f"#### {answer}.0", f"#### ${answer}",
            f"So the total is ${int(answer):,} in all.", f"#### {answer}\nOr maybe {wrong}", f"#### {wrong}",
            f"I count {answer} first, then {wrong} at the end", "No idea.", "", f"####{answer}", f"{answer} apples",
            f"The result: -{answer}", f"#### {int(answer):,}"]


@pytest.fixture(scope="module")
def lm_eval_gsm8k():
    """lm-eval's own gsm8k task pieces, read from the task's YAML: its filters and its exact_match options."""
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    filters = {}
    for entry in task["filter_list"]:
        regex, take_first = entry["filter"]
        assert (regex["function"], take_first["function"]) == ("regex", "take_first")
        filters[entry["name"]] = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
    (metric,) = task["metric_list"]
    options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}

    def score(name: str, output: str, target: str) -> float:
        (extracted,) = filters[name].apply([[output]], [{}])[0][:1]  # take_first
        return 100.0 * exact_match_hf_evaluate([extracted], [target], **options)["exact_match"]

    return score, filters


def test_gsm8k_records_become_eval_samples():
    records = read_records(str(EXAMPLE))
    samples = eval_set_samples(records, required={"answer": "the answer evaluator reads it"})
    raw = [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines()]
    assert [s.prompt for s in samples] == [r["question"] for r in raw]
    assert [s.reference for s in samples] == [r["answer"] for r in raw]  # the worked solution, #### line included
    assert [s.answer for s in samples][:2] == ["7", "15"]
    assert [s.answer for s in samples] == [r["answer"].split("#### ")[-1] for r in raw]
    assert [s.id for s in samples] == [str(i) for i in range(len(raw))]


def test_a_gsm8k_answer_without_its_final_line_is_named(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n"
                    + json.dumps({"question": "2+2?", "answer": "2 + 2 = 4"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} line 2: field 'answer' must end with a line '#### N'"):
        eval_set_samples(read_records(str(path)))
    # other shapes keep their own errors: an MMLU-style record (answer an index) is not read as GSM8K
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} line 1: field 'prompt' is missing"):
        eval_set_samples(read_records(str(path)))


def test_filters_are_lm_evals(lm_eval_gsm8k):
    _, filters = lm_eval_gsm8k
    outputs = ["#### 1,000 then #### 7", "It costs $1,250.50 in total, about 3 each.", "x 5 y", "none", "-3 and -12"]
    for output in outputs:
        assert gsm8k_extract(output) == filters["strict-match"].apply([[output]], [{}])[0][0]
        assert gsm8k_extract(output, flexible=True) == filters["flexible-extract"].apply([[output]], [{}])[0][0]
    assert gsm8k_extract("It costs $1,250.50 in total, about 3 each.", flexible=True) == "3"
    assert gsm8k_extract("none") == "[invalid]"


def test_scores_equal_lm_evals_gsm8k_task_on_gsm8k_records(lm_eval_gsm8k):
    score, _ = lm_eval_gsm8k
    samples = eval_set_samples(read_records(str(EXAMPLE)))
    rows = [(s, output) for s in samples for output in _outputs(s.answer, s.reference)]
    assert len(rows) >= 100
    ours = [answer_scores(output, s.answer, s.reference) for s, output in rows]
    strict = [score("strict-match", output, s.reference) for s, output in rows]  # lm-eval's target: the solution
    flexible = [score("flexible-extract", output, s.reference) for s, output in rows]
    assert [r["gsm8k_strict"] for r in ours] == strict
    assert [r["gsm8k_flexible"] for r in ours] == flexible
    # the outputs exercise both verdicts of both rules, and the rules disagree somewhere
    assert set(strict) == set(flexible) == {0.0, 100.0} and strict != flexible
    result = EVALUATORS["answer"]().evaluate(EvalContext([s for s, _ in rows], predictions=[o for _, o in rows]))
    assert result.metrics["gsm8k_strict"] == pytest.approx(sum(strict) / len(strict))
    assert result.metrics["gsm8k_flexible"] == pytest.approx(sum(flexible) / len(flexible))
    assert result.per_sample["gsm8k_flexible"] == flexible


def test_gsm8k_metrics_score_gsm8k_solutions_only():
    samples = eval_set_samples(read_records(str(EXAMPLE)))[:1]  # answer 7
    samples += [EvalSample("rome", "Capital of Italy?", "It is Rome.", "Rome"),
                EvalSample("sum", "11 plus 92?", "11 plus 92 is 103.", "103")]  # a number, but no worked solution
    result = EVALUATORS["answer"]().evaluate(EvalContext(samples, predictions=["#### 7", "Rome", "#### 103"]))
    assert result.per_sample["gsm8k_strict"][0] == 100.0
    assert math.isnan(result.per_sample["gsm8k_strict"][1]) and math.isnan(result.per_sample["gsm8k_flexible"][2])
    assert result.metrics["gsm8k_strict"] == result.metrics["gsm8k_flexible"] == 100.0
    assert result.metrics["numeric"] == 100.0  # both numbers found
    others = EVALUATORS["answer"]().evaluate(EvalContext(samples[1:], predictions=["Rome", "103"]))
    assert "gsm8k_strict" not in others.metrics and "gsm8k_flexible" not in others.metrics


def test_gsm8k_metrics_are_selectable():
    from experiments.simpo_qwen import SimpoQwen
    from harness.training.overrides import apply_overrides

    exp = apply_overrides(SimpoQwen, [f"eval_data={EXAMPLE}", "evaluators=answer",
                                      "select_metric=eval/answer/gsm8k_flexible"])
    assert exp.select_metric == "eval/answer/gsm8k_flexible"
