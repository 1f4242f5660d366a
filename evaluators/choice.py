"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it (its `multiple_choice` tasks), so
that the numbers compare with published ones.

Each question is a context (the rendered question, after an optional few-shot prefix) and its choices; every choice
is scored as the continuation `" " + choice` (lm-eval's target_delimiter) by the sum of its tokens' log-probabilities
given the context, all choices of all questions in one backend call (the in-loop vLLM engine's prompt log-probs, or
the HF backend's forward pass). Context and continuation are tokenized as lm-eval's HF model does (encode the whole,
take the context's tokens off the front, trailing context spaces moved into the continuation).

Metrics, 0-100 but bpb:
- acc: the choice with the largest log-likelihood is the gold one;
- acc_norm: the same after dividing each log-likelihood by its choice's length in characters (lm-eval's acc_norm);
- acc_bytes: ... by its length in UTF-8 bytes (lm-eval's acc_bytes);
- bpb: bits per byte of the gold continuation, lm-eval's bits_per_byte aggregation: sum of -loglik over questions /
  (ln 2 x sum of their bytes), a corpus metric (a question with a long answer weighs more, as in lm-eval);
- acc_centered: accuracy centred on chance, (acc - chance) / (1 - chance) with chance the set's mean 1/len(choices),
  averaged over the sets when `data` names several (nanochat's CORE).
With several sets, each set's own five metrics are logged as <set>_<metric> too.

Record shapes (see docs/evaluators/choice.md): plain (`prompt`, `choices`, `answer`), MMLU (`question`, `choices`,
`answer`, optional `subject`), ARC (`question`, `choices` {text, label}, `answerKey`), HellaSwag (`ctx` or `ctx_a` and
`ctx_b`, optional `activity_label`, `endings`, `label`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from evaluators.base import EvalContext, EvalResult, Evaluator
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import SPLIT, parse_eval_data
from harness.core.records import Record, read_records, require_index, require_text, require_texts

SHAPES = ("auto", "plain", "mmlu", "arc", "hellaswag")
MEASURES = ("acc", "acc_norm", "acc_bytes", "bpb", "acc_centered")
TARGET_DELIMITER = " "  # lm-eval's default: between the context and each choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default: after each few-shot example


@dataclass(frozen=True)
class Question:
    id: str
    set: str
    description: str  # lm-eval's task description (MMLU's subject line): once, before any few-shot example
    text: str  # the rendered question (lm-eval's doc_to_text)
    choices: tuple[str, ...]  # what is scored, without the delimiter (lm-eval's doc_to_choice)
    gold: int


def record_shape(record: Record) -> str:
    """Which of the shapes a record has, by its fields; a DataError naming the file and line otherwise."""
    fields = record.fields
    if "endings" in fields:
        return "hellaswag"
    if "answerKey" in fields or isinstance(fields.get("choices"), dict):
        return "arc"
    if "question" in fields:
        return "mmlu"
    if "prompt" in fields:
        return "plain"
    raise DataError(f"{record.source}: not a multiple-choice record: expected prompt/choices/answer, MMLU's "
                    f"question/choices/answer, ARC's question/choices{{text,label}}/answerKey or HellaSwag's "
                    f"ctx/endings/label (it has {', '.join(sorted(fields)) or 'no fields'})")


def hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _plain(record: Record) -> tuple[str, str, list[str], int]:
    choices = require_texts(record, "choices", at_least=2)
    answer = record.fields.get("answer")
    gold = choices.index(answer) if isinstance(answer, str) and answer in choices else None
    return "", require_text(record, "prompt"), choices, (
        gold if gold is not None else require_index(record, "answer", len(choices)))


def _mmlu(record: Record) -> tuple[str, str, list[str], int]:
    options = require_texts(record, "choices", at_least=2)
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = (require_text(record, "question").strip() + "\n"
            + "".join(f"{letter}. {option}\n" for letter, option in zip(letters, options, strict=True)) + "Answer:")
    subject = record.fields.get("subject")
    # lm-eval's mmlu tasks open with the subject (its _generate_configs.py writes one per subject)
    description = (f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}"
                   f".\n\n") if isinstance(subject, str) and subject.strip() else ""
    return description, text, letters, require_index(record, "answer", len(options))


def _arc(record: Record) -> tuple[str, str, list[str], int]:
    choices = record.fields.get("choices")
    if not isinstance(choices, dict):
        raise DataError(f"{record.source}: field 'choices' must be an object {{text: [...], label: [...]}} (ARC)")
    texts = require_texts(record, "choices.text", choices.get("text"), at_least=2)
    labels = require_texts(record, "choices.label", choices.get("label"), at_least=len(texts))
    key = require_text(record, "answerKey")
    if len(labels) != len(texts) or key not in labels:
        raise DataError(f"{record.source}: field 'answerKey' = {key!r} must be one of choices.label {labels} (one "
                        f"label per choice text)")
    return "", f"Question: {require_text(record, 'question')}\nAnswer:", texts, labels.index(key)


def _hellaswag(record: Record) -> tuple[str, str, list[str], int]:
    label = record.fields.get("activity_label")
    prefix = f"{require_text(record, 'activity_label')}: " if label is not None else ""
    if "ctx_a" in record.fields:  # lm-eval's process_docs: ctx_a + " " + ctx_b.capitalize()
        ctx = require_text(record, "ctx_a") + " " + require_text(record, "ctx_b", blank_ok=True).capitalize()
    else:
        ctx = require_text(record, "ctx")
    endings = [hellaswag_text(e) for e in require_texts(record, "endings", at_least=2)]
    return "", hellaswag_text(prefix + ctx), endings, require_index(record, "label", len(endings))


RENDERERS = {"plain": _plain, "mmlu": _mmlu, "arc": _arc, "hellaswag": _hellaswag}


def read_questions(path: str, set_name: str = "", shape: str = "auto", limit: int = 0) -> list[Question]:
    """The questions of a file of multiple-choice records (any of the shapes, or only `shape`); `limit` keeps the
    first N. Every problem is a DataError naming the file, line and field."""
    records = read_records(path)
    questions, seen = [], {}
    for i, record in enumerate(records[:limit] if limit else records):
        kind = record_shape(record) if shape == "auto" else shape
        description, text, choices, gold = RENDERERS[kind](record)
        own = str(record.fields.get("id", i))
        if own in seen:
            raise DataError(f"{record.source}: field 'id' = {own!r} is also the id of {seen[own]}")
        seen[own] = record.source
        questions.append(Question(f"{set_name}/{own}" if set_name else own, set_name, description, text,
                                  tuple(choices), gold))
    return questions


def fewshot_prefix(examples: list[Question]) -> str:
    """lm-eval's few-shot examples: each rendered question, the delimiter and its gold choice, then a blank line."""
    return "".join(q.text + TARGET_DELIMITER + q.choices[q.gold] + FEWSHOT_DELIMITER for q in examples)


def _encode(tokenizer, text: str) -> list[int]:
    """lm-eval HFLM.tok_encode (add_bos_token unset): the tokenizer's own special tokens, none when the text already
    starts with its prefix token (BOS, else EOS)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = prefix is not None and text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=False) if starts else tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair for a causal model: trailing spaces of the context move into the continuation, the
    whole is encoded, and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return head, whole[len(head):]


def score_question(lls: list[float], choices: tuple[str, ...], gold: int, delimiter: str) -> dict:
    """One question's predictions and scores from its choices' log-likelihoods (lm-eval's process_results: argmax
    takes the first of equal scores)."""
    lls_ = np.asarray(lls, dtype=np.float64)
    chars = np.asarray([len(c) for c in choices], dtype=np.float64)
    nbytes = np.asarray([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    pred, pred_norm, pred_bytes = (int(np.argmax(lls_)), int(np.argmax(lls_ / chars)), int(np.argmax(lls_ / nbytes)))
    gold_bytes = len((delimiter + choices[gold]).encode("utf-8"))  # the scored continuation's bytes
    return {"pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes, "acc": 100.0 * (pred == gold),
            "acc_norm": 100.0 * (pred_norm == gold), "acc_bytes": 100.0 * (pred_bytes == gold),
            "bpb": -lls[gold] / (math.log(2) * gold_bytes), "bpb_stats": [-float(lls[gold]), float(gold_bytes)]}


def centered(acc: float, chance: float) -> float:
    """Accuracy (0-100) centred on chance (0-1): 0 at chance, 100 when every answer is right."""
    return (acc - 100.0 * chance) / (1.0 - chance)


def bits_per_byte(stats: list[list[float]]) -> float:
    totals = np.asarray(stats, dtype=np.float64).sum(axis=0)
    return float(totals[0] / (math.log(2) * totals[1]))


class Choice(Evaluator):
    """Multiple choice by the log-likelihood of each choice (see the module docstring)."""

    name = "choice"
    metrics = MEASURES
    mean_metrics = ("acc", "acc_norm", "acc_bytes", "acc_centered")  # over questions: the rows of its own table
    corpus_metrics = ("bpb",)  # per question: [-loglik of the gold continuation, its bytes]
    unit_column = "id"
    needs_generation = False  # it scores its own questions

    @classmethod
    def _sets(cls, options: dict | None) -> list[tuple[str, str]]:
        return parse_eval_data(cls.resolved_options(options)["data"])

    @classmethod
    def metric_names(cls, options: dict | None = None) -> tuple[str, ...]:
        """The five metrics, then each set's own five (<set>_acc, ...) when `data` names several sets."""
        try:
            sets = cls._sets(options)
        except ConfigError:  # option_rules says why
            sets = []
        per_set = [f"{name}_{m}" for name, _ in sets for m in MEASURES] if len(sets) > 1 else []
        return (*MEASURES, *per_set)

    @classmethod
    def option_rules(cls, options: dict | None = None) -> list[tuple[bool, str, str]]:
        o = cls.resolved_options(options)
        try:
            sets, why = cls._sets(options), ""
        except ConfigError as e:
            sets, why = [], str(e)
        return [
            (not why, "data", why),
            (bool(why) or SPLIT not in (p for _, p in sets), "data",
             "names files of multiple-choice records (one path, or name:path,name:path); 'split' is not one"),
            (o["limit"] >= 0, "limit", "must be >= 0 (0 means every question)"),
            (o["shape"] in SHAPES, "shape", f"must be one of {', '.join(SHAPES)}"),
        ]

    own_prompts_remedy = "shorten choice_fewshot, or leave the question out of choice_data"

    @classmethod
    def own_prompts(cls, options: dict | None, tokenizer) -> list[tuple[str, int, int]]:
        """Every choice's context and continuation: one prompt the engine scores (and generates 1 token after), so
        the engine's context is sized for the longest and one over the model's is refused before the run opens."""
        evaluator = cls(**(options or {}))
        ids = [f"{q.id} choice {i}" for q in evaluator.questions for i in range(len(q.choices))]
        contexts, continuations = evaluator.requests(tokenizer)
        return [(i, len(c) + len(k), 1) for i, c, k in zip(ids, contexts, continuations, strict=True)]

    def __init__(self, data: str = "data/choice_eval.jsonl", fewshot: str = "", shape: str = "auto", limit: int = 0,
                 chat: bool = False):
        """`data`: one file, or several named sets (name:path,name:path); `fewshot`: a file of solved examples (any
        shape) put before every question, all of them in file order (lm-eval's first_n sampler); `shape`: read every
        record as this shape instead of detecting it; `limit`: the first N questions of each set (0: all); `chat`:
        render the few-shot examples and the question as one user turn through the model's chat template, with no
        delimiter before the choice (as lm_eval --apply_chat_template)."""
        if shape not in SHAPES:
            raise ConfigError(f"choice shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        self.sets = parse_eval_data(data)
        self.questions = [q for name, path in self.sets for q in read_questions(path, name, shape, limit)]
        self.prefix = fewshot_prefix(read_questions(fewshot, shape=shape)) if fewshot else ""
        self.chat = chat
        self.delimiter = "" if chat else TARGET_DELIMITER
        self._requests: tuple[list[list[int]], list[list[int]]] | None = None  # tokenized once, on first use

    def context(self, question: Question, tokenizer) -> str:
        """The text every choice of `question` continues: its description, the few-shot examples, the question."""
        if not self.chat:
            return question.description + self.prefix + question.text
        messages = [{"role": "system", "content": question.description.strip()}] if question.description else []
        messages.append({"role": "user", "content": self.prefix + question.text})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def requests(self, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
        """(context ids, continuation ids) of every choice of every question, in order."""
        if self._requests is None:
            pairs = [encode_pair(tokenizer, self.context(q, tokenizer), self.delimiter + choice)
                     for q in self.questions for choice in q.choices]
            self._requests = ([p for p, _ in pairs], [c for _, c in pairs])
        return self._requests

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        contexts, continuations = self.requests(ctx.tokenizer)
        logprobs = iter(ctx.backend.logprobs(contexts, continuations))
        rows = []
        for q in self.questions:
            lls = [float(sum(next(logprobs))) for _ in q.choices]
            rows.append({"id": q.id, "set": q.set, "context": self.context(q, ctx.tokenizer),
                         "choices": list(q.choices), "gold": q.gold, "loglik": lls,
                         **score_question(lls, q.choices, q.gold, self.delimiter)})
        for row, weight in zip(rows, self._centering(rows), strict=True):
            row["acc_centered"] = weight[0] * centered(row["acc"], weight[1])  # its share of the headline
        metrics = self._metrics(rows)
        if len(self.sets) > 1:
            for name, _ in self.sets:
                own = self._metrics([r for r in rows if r["set"] == name])
                own["acc_centered"] = centered(own["acc"], self._chance(name))
                metrics.update({f"{name}_{m}": v for m, v in own.items()})
        return EvalResult(metrics, table={key: [r[key] for r in rows] for key in rows[0]})

    def _chance(self, set_name: str) -> float:
        return float(np.mean([1 / len(q.choices) for q in self.questions if q.set == set_name]))

    def _centering(self, rows: list[dict]) -> list[tuple[float, float]]:
        """(weight, chance) of each row: the mean of weight x centred correctness over all rows is the mean over sets
        of each set's centred accuracy (centering is linear in a set's correct answers), so acc_centered is a mean
        metric whose error bar and paired test resample questions."""
        sizes = {name: sum(r["set"] == name for r in rows) for name, _ in self.sets}
        chance = {name: self._chance(name) for name in sizes}
        return [(len(rows) / (len(sizes) * sizes[r["set"]]), chance[r["set"]]) for r in rows]

    @staticmethod
    def _metrics(rows: list[dict]) -> dict[str, float]:
        metrics = {m: float(np.mean([r[m] for r in rows])) for m in ("acc", "acc_norm", "acc_bytes", "acc_centered")}
        metrics["bpb"] = bits_per_byte([r["bpb_stats"] for r in rows])
        return metrics

    @classmethod
    def corpus_score(cls, metric: str, totals: np.ndarray) -> np.ndarray:
        if metric != "bpb":
            return super().corpus_score(metric, totals)
        totals = np.atleast_2d(totals)
        return totals[:, 0] / (math.log(2) * totals[:, 1])
