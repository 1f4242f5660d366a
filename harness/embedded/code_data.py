"""Easy Python tasks in HumanEval's format that the embedded model can learn: each function's name and
docstring say what to compute, with a number to carry into the body. Training and eval use disjoint functions."""

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
HELD_OUT_PER_FAMILY = 16  # each family's eval numbers; every number still appears in training, in other families


def split_tasks(seed: int = 0) -> tuple[list[tuple[tuple, int]], list[tuple[tuple, int]]]:
    """(family, number) pairs for training and for eval: each family holds out its own numbers, so an eval function
    is never seen while its number is, under other names (what the model must carry over is the number, which a
    held-out range of digits would make a test of something else)."""
    rng = random.Random(seed)
    train, held_out = [], []
    for family in FAMILIES:
        numbers = list(range(1, 100))
        rng.shuffle(numbers)
        held_out += [(family, n) for n in sorted(numbers[:HELD_OUT_PER_FAMILY])]
        train += [(family, n) for n in sorted(numbers[HELD_OUT_PER_FAMILY:])]
    return train, held_out


def _problem(family: tuple, n: int) -> dict:
    name, doc, body, arg, inputs = family
    fn = name.format(n=n)
    prompt = f'def {fn}({arg}):\n    """{doc.format(n=n)}"""\n'
    reference = f"def _ref({arg}):\n    {body.format(n=n)}\n"
    test = (f"{reference}\n\ndef check(candidate):\n    for {arg} in {inputs}:\n"
            f"        assert candidate({arg}) == _ref({arg}), {arg}\n")
    return {"task_id": f"CodeTask/{fn}", "prompt": prompt, "canonical_solution": f"    {body.format(n=n)}\n",
            "test": test, "entry_point": fn}


def code_prose(seed: int = 0) -> list[str]:
    """The training functions as one-line Python for pretraining text (a .txt document is a line): the base model
    learns their names, operations and the code's tokens, not the def/docstring/return layout SFT teaches. Only
    training tasks, so no eval function is seen."""
    return [f"{name.format(n=n)} = lambda {arg}: {body.format(n=n)[len('return '):]}  # {doc.format(n=n)}"
            for (name, doc, body, arg, _), n in split_tasks(seed)[0]]


def generate_code_tasks(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """`code_sft.jsonl` (prompt/completion pairs) and `code_eval.jsonl` (HumanEval format) from `split_tasks`: the
    eval functions never appear in training."""
    train_tasks, held_out = split_tasks(seed)
    train = [_problem(f, n) for f, n in train_tasks]
    random.Random(seed).shuffle(train)
    eval_set = sorted((_problem(f, n) for f, n in held_out), key=lambda p: p["task_id"])
    paths = {"code_sft": out_dir / "code_sft.jsonl", "code_eval": out_dir / "code_eval.jsonl"}
    paths["code_sft"].write_text("".join(
        json.dumps({"prompt": p["prompt"], "completion": p["canonical_solution"]}) + "\n" for p in train))
    paths["code_eval"].write_text("".join(json.dumps(p) + "\n" for p in eval_set))
    return paths
