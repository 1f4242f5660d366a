"""Preference pairs against a model's own answers, as in SPIN (Chen et al., 2024): for each prompt, `chosen` is the
data's answer and `rejected` is what the model itself answers (greedy, through its chat template). DPO on such pairs
moves a model from its own habits toward the data's (pairs whose two answers differ in one token cannot: there the
shared tokens cancel out). The embedded pairs (`make data`) are the embedded instruct model's own wrong answers;
`data/smollm2_self_pairs.jsonl` holds SmolLM2-135M-Instruct's long, often wrong ones:

    python -m harness data self-pairs --model smollm2 --prompts data/preference_prompts.jsonl --limit 512 \\
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


def own_answer_pairs(engine, prompt_ids: list[list[int]], prompts: list[str], chosen: list[str],
                     max_new_tokens: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Rows {prompt, chosen, rejected} with `rejected` the engine's greedy answer to each prompt, leaving out the
    prompts it answers exactly as `chosen`; and the generation's figures (generate_s, tokens_per_s)."""
    started = time.time()
    completions = engine.generate(prompt_ids, GenParams(max_new_tokens=max_new_tokens, seed=seed))
    generate_s = time.time() - started
    rows = [{"prompt": p, "chosen": c, "rejected": completion.texts[0].strip()}
            for p, c, completion in zip(prompts, chosen, completions, strict=True)]
    tokens = sum(c.num_tokens for c in completions)
    return ([r for r in rows if r["rejected"] and r["rejected"] != r["chosen"]],
            {"generate_s": round(generate_s, 1), "tokens_per_s": round(tokens / max(generate_s, 1e-9), 1)})


def _read_prompts(prompts_file: str, limit: int) -> tuple[list[str], list[str]]:
    records = read_records(prompts_file)[: limit or None]
    if not records:
        raise DataError(f"{prompts_file}: no records")
    return ([require_text(r, "prompt") for r in records],
            [require_text(r, "chosen" if "chosen" in r.fields else "reference") for r in records])


def _write_rows(out: str, rows: list[dict], inputs: list) -> None:
    with atomic_writer(Path(out), inputs) as f:  # all or nothing: `out` appears once every row is written
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def make_self_pairs(model: str, prompts_file: str, out: str, limit: int = 512, max_new_tokens: int = 48,
                    seed: int = 0) -> dict:
    """Write `out` (JSONL: prompt, chosen, rejected) from the first `limit` records of `prompts_file` (each with a
    string `prompt` and `chosen` or `reference`); pairs whose model answer equals the chosen one are left out.
    All or nothing: `out` appears once every row is written."""
    prompts, chosen = _read_prompts(prompts_file, limit)
    source = resolve_ref(model)
    _, prompt_ids = render_prompts(source, prompts)
    engine = open_engine(source, prompt_ids, max_new_tokens, seed)
    try:
        rows, figures = own_answer_pairs(engine, prompt_ids, prompts, chosen, max_new_tokens, seed)
    finally:
        engine.close()
    _write_rows(out, rows, [prompts_file, resolve_local(prompts_file)])
    return {"out": out, "model": model, "prompts": len(prompts), "pairs": len(rows), **figures}


# The embedded on-policy pairs (`make data`), from the instruct model through one vLLM engine: (prompts file, pairs
# file) in the data directory. Training pairs on the preference prompts; held-out pairs on the eval prompts, for
# reward models' accuracy.
EMBEDDED_PAIRS = (("preference_prompts.jsonl", "preference.jsonl"), ("eval.jsonl", "preference_eval.jsonl"))
EMBEDDED_PAIRS_TOKENS = 48  # as many new tokens as an in-loop evaluation: rejected is what the eval would see


def make_embedded_pairs(data_dir: Path, model: str = "tiny-qwen2") -> dict[str, Path]:
    """Write the embedded preference pairs into `data_dir`: chosen the task's right answer, rejected the instruct
    model's own greedy answer where it is wrong (own_answer_pairs)."""
    source = resolve_ref(model)
    jobs = [(data_dir / src, data_dir / dst, *_read_prompts(str(data_dir / src), 0)) for src, dst in EMBEDDED_PAIRS]
    rendered = [render_prompts(source, prompts)[1] for _, _, prompts, _ in jobs]
    engine = open_engine(source, [ids for r in rendered for ids in r], EMBEDDED_PAIRS_TOKENS)
    try:
        results = [own_answer_pairs(engine, ids, prompts, chosen, EMBEDDED_PAIRS_TOKENS)[0]
                   for (_, _, prompts, chosen), ids in zip(jobs, rendered, strict=True)]
    finally:
        engine.close()
    for (src, dst, _, _), rows in zip(jobs, results, strict=True):
        _write_rows(str(dst), rows, [src])
    return {dst.stem: dst for _, dst, _, _ in jobs}
