"""`python -m harness.commands.bench [PART ...]` (`make bench PARTS=...`): runs the named parts (all by default)
in PARTS order, each printing its [bench] lines, then prints every result as one JSON line. A part's module is
imported only when it runs: most import vLLM or torch, which take seconds."""

from __future__ import annotations

import importlib
import json
import os
import sys

# part -> its module under harness.commands.bench; `generation` and `sync` are one measurement
PARTS = {"generation": "generation", "sync": "generation", "share": "share", "lora": "lora", "ddp": "ddp",
         "sandbox": "sandbox", "judge": "judge", "sweep": "sweep", "smollm2": "smollm2", "services": "services",
         "ppo": "ppo", "rollout_ranks": "rollout_ranks", "choice": "choice", "roofline": "roofline",
         "sweep_scale": "sweep_scale"}


def main(parts: list[str]) -> None:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown bench parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    modules = dict.fromkeys(PARTS[p] for p in PARTS if not parts or p in parts)  # in PARTS order, each once
    import torch

    print(f"[bench] {os.cpu_count()} CPU cores, torch {torch.__version__}", flush=True)
    results = {}
    for module in modules:
        results.update(importlib.import_module(f"harness.commands.bench.{module}").run())
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
