"""Preference pairs against a model's own answers, as in SPIN (Chen et al., 2024): for each prompt, `chosen` is the
data's answer and `rejected` is what the model itself answers (greedy, through its chat template). DPO on such pairs
moves a model from its own habits (here: SmolLM2-135M-Instruct's long, often wrong answers) toward the data's, which
pairs whose two answers differ in one token (data/preference.jsonl) cannot: there the shared tokens cancel out.

    python -m harness data self-pairs --model smollm2 --prompts data/preference.jsonl --limit 512 \\
        --out data/smollm2_self_pairs.jsonl
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.commands.model_ref import open_engine, render_prompts, resolve_ref
from harness.core.errors import DataError
from harness.core.files import atomic_writer
from harness.core.generation import GenParams
from harness.core.records import read_records, require_text, resolve_local


def make_self_pairs(model: str, prompts_file: str, out: str, limit: int = 512, max_new_tokens: int = 48,
                    seed: int = 0) -> dict:
    """Write `out` (JSONL: prompt, chosen, rejected) from the first `limit` records of `prompts_file` (each with a
    string `prompt` and `chosen` or `reference`); pairs whose model answer equals the chosen one are left out.
    All or nothing: `out` appears once every row is written."""
    records = read_records(prompts_file)[: limit or None]
    if not records:
        raise DataError(f"{prompts_file}: no records")
    prompts = [require_text(r, "prompt") for r in records]
    chosen = [require_text(r, "chosen" if "chosen" in r.fields else "reference") for r in records]
    source = resolve_ref(model)
    _, prompt_ids = render_prompts(source, prompts)
    engine = open_engine(source, prompt_ids, max_new_tokens, seed)
    started = time.time()
    try:
        completions = engine.generate(prompt_ids, GenParams(max_new_tokens=max_new_tokens, seed=seed))
    finally:
        engine.close()
    generate_s = time.time() - started
    rows = [{"prompt": p, "chosen": c, "rejected": completion.texts[0].strip()}
            for p, c, completion in zip(prompts, chosen, completions, strict=True)]
    rows = [r for r in rows if r["rejected"] and r["rejected"] != r["chosen"]]
    with atomic_writer(Path(out), [prompts_file, resolve_local(prompts_file)]) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tokens = sum(c.num_tokens for c in completions)
    return {"out": out, "model": model, "prompts": len(records), "pairs": len(rows),
            "generate_s": round(generate_s, 1), "tokens_per_s": round(tokens / max(generate_s, 1e-9), 1)}
