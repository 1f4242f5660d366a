"""The `choice` benchmark part: its generated questions, and the part end to end on the embedded model with the
session's engine (its tiny workload, BENCH_CHOICE_TINY's; the measurement itself is run by hand,
`make bench PARTS=choice`)."""

import json

import pytest

from evaluators.choice import read_questions
from harness.commands.bench import choice as part
from harness.commands.bench.__main__ import main
from harness.paths import DATA_DIR


def test_questions_are_distinct_rotations_of_the_shipped_ones_with_the_gold_answer_kept(tmp_path):
    path = tmp_path / "q.jsonl"
    part.write_questions(130, path)
    questions = read_questions(str(path))
    source = [json.loads(line) for line in (DATA_DIR / "choice_eval.jsonl").read_text().splitlines()]
    source = [r for r in source if len(r["choices"]) == 4]
    assert len(questions) == 130 and len({q.text for q in questions}) == 130
    assert all(len(q.choices) == 4 for q in questions)
    for i, q in enumerate(questions):
        r = source[i % len(source)]
        assert q.text == f"Question {i + 1}. {r['prompt']}"
        assert q.choices[q.gold] == r["choices"][r["answer"]]  # the gold answer moved with its rotation
        assert sorted(q.choices) == sorted(r["choices"])
    assert [q.gold for q in questions[len(source):2 * len(source)]] != [q.gold for q in questions[:len(source)]]


def test_unknown_part_lists_choice():
    with pytest.raises(SystemExit, match="choose from .*choice"):
        main(["choices"])


def test_part_runs_end_to_end_on_the_embedded_model(vllm_backend, capsys):
    r = part.choice_speed(part.CHOICE_TINY, engine=vllm_backend)
    assert (r["questions"], r["requests"], r["default_choice_questions"]) == (8, 32, 60)
    assert r["same_answers"] and r["max_loglik_gap"] < 1e-3  # both backends scored the same requests
    assert r["hf_questions_per_s"] > 0 and r["vllm_questions_per_s"] > 0
    assert r["vllm_over_hf"] == pytest.approx(r["vllm_questions_per_s"] / r["hf_questions_per_s"])
    assert r["eval_evaluators"] == "perplexity,bleu,rouge" and r["eval_prompts"] == 4
    assert 0 < r["bench_choice_share"] < 1 and 0 < r["default_choice_share"] < 1
    assert r["default_choice_share"] == pytest.approx(r["default_choice_s"] / (r["default_choice_s"] + r["eval_s"]))
    part.print_choice(r)
    out = capsys.readouterr().out
    assert "[bench] choice on tiny-qwen2 (3.7M params), 8 questions x 4 choices (32 log-likelihood requests)" in out
    assert "-> vLLM/HF" in out and "+ choice on its default 60 questions" in out
