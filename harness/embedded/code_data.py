"""Easy Python tasks in HumanEval's format that the embedded model can learn: each function's name and
docstring say what to compute, with a number to carry into the body. Training and eval use disjoint numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

# (name, docstring, body, argument, test inputs): {n} is the task's number.
FAMILIES = [
    ("add_{n}", "Return x plus {n}.", "return x + {n}", "x", "[0, 1, 7, -3, 100]"),
    ("subtract_{n}", "Return x minus {n}.", "return x - {n}", "x", "[0, 1, 7, -3, 100]"),
    ("times_{n}", "Return x times {n}.", "return x * {n}", "x", "[0, 1, 7, -3, 12]"),
    ("greater_than_{n}", "Return True if x is greater than {n}.", "return x > {n}", "x", "[0, 5, 50, 99, 101, -1]"),
    ("first_{n}", "Return the first {n} characters of s.", "return s[:{n}]", "s",
     "['', 'abc', 'hello world, how are you today?', 'x' * 120]"),
    ("repeat_{n}", "Return s repeated {n} times.", "return s * {n}", "s", "['', 'ab', 'xyz']"),
]


def _problem(family: tuple, n: int) -> dict:
    name, doc, body, arg, inputs = family
    fn = name.format(n=n)
    prompt = f'def {fn}({arg}):\n    """{doc.format(n=n)}"""\n'
    reference = f"def _ref({arg}):\n    {body.format(n=n)}\n"
    test = (f"{reference}\n\ndef check(candidate):\n    for {arg} in {inputs}:\n"
            f"        assert candidate({arg}) == _ref({arg}), {arg}\n")
    return {"task_id": f"CodeTask/{fn}", "prompt": prompt, "canonical_solution": f"    {body.format(n=n)}\n",
            "test": test, "entry_point": fn}


def generate_code_tasks(out_dir: Path, seed: int = 0, n_eval: int = 48) -> dict[str, Path]:
    """`code_sft.jsonl` (prompt/completion pairs) from numbers not divisible by 5, `code_eval.jsonl`
    (HumanEval format) from numbers divisible by 5: the eval functions never appear in training."""
    rng = random.Random(seed)
    train = [_problem(f, n) for f in FAMILIES for n in range(1, 100) if n % 5]
    held_out = [_problem(f, n) for f in FAMILIES for n in range(5, 100, 5)]
    rng.shuffle(train)
    eval_set = sorted(rng.sample(held_out, n_eval), key=lambda p: p["task_id"])
    paths = {"code_sft": out_dir / "code_sft.jsonl", "code_eval": out_dir / "code_eval.jsonl"}
    paths["code_sft"].write_text("".join(
        json.dumps({"prompt": p["prompt"], "completion": p["canonical_solution"]}) + "\n" for p in train))
    paths["code_eval"].write_text("".join(json.dumps(p) + "\n" for p in eval_set))
    return paths
