"""Eval sets: the `eval_data` option (one file, several named files, the held-out split), the seeded split of the
training file (`eval_split`), and eval samples from plain and whole-conversation records.

- `eval_data=data/eval.jsonl`: one set, metrics `eval/<evaluator>/<metric>` (a hub `name:split` stays one set too);
- `eval_data=hf:openai/gsm8k:main:test` (or `gsm8k:hf:openai/gsm8k:main:test` among several): a hub dataset with
  its config, loaded by `datasets.load_dataset` (harness.core.records.hub_dataset); its records are read in the
  shapes the evaluators know (GSM8K's question/answer as they are: docs/guides/eval-sets.md);
- `eval_data=facts:data/eval.jsonl,chat:my_chats.jsonl`: several sets, metrics `eval/<set>/<evaluator>/<metric>`;
- `split` (alone, or as a set's path: `heldout:split`) is the share `eval_split` of the training file held out,
  seeded by the run's seed and removed from the training rows; an empty `eval_data` means `split`.

Errors name the option (ConfigError) or the file, line and field (DataError).
"""

from __future__ import annotations

import random
import re

from harness.core.errors import ConfigError, DataError
from harness.core.formats import CHAT_SOURCES, PREFERENCE_SOURCES, _messages, chat, detect, preference, record_format
from harness.core.records import (
    HUB_PREFIX,
    LOCAL_SUFFIXES,
    EvalSample,
    Record,
    eval_answer,
    eval_sample,
    hub_dataset,
    require_text,
    resolve_local,
)

SPLIT = "split"  # the eval_data path that means the held-out share of train_data
SET_NAME = re.compile(r"[A-Za-z0-9_-]+")
# first path parts of metric keys that are not eval sets: "eval/time/...", "eval/generation/..."
RESERVED_NAMES = ("time", "generation")
HELDOUT_SOURCES = (*PREFERENCE_SOURCES, *CHAT_SOURCES, "kto")


def parse_eval_data(value: str, reserved: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """[(set name, path)] of an `eval_data` value; the name is "" for a single unnamed set (metrics keep the
    unprefixed keys). `reserved`: names a set may not take besides RESERVED_NAMES (the evaluators': a set's tables
    are logged beside the evaluators' own). Raises ConfigError with why the value is refused, to follow
    "field 'eval_data' = ...": a list item that is not name:path, a bad or repeated name."""
    value = value.strip()
    if not value:
        return [("", SPLIT)]
    items = [item.strip() for item in value.split(",")]
    if len(items) == 1 and not _is_named(items[0]):
        hub_dataset(items[0])  # a hf: spec of another form is refused here, with the form it should have
        return [("", items[0])]
    sets = []
    for item in items:
        name, colon, path = item.partition(":")
        name, path = name.strip(), path.strip()
        if not colon or not name or not path:
            raise ConfigError(f"has the item {item!r}, which is not name:path; several eval sets are given as "
                              f"name:path,name:path (one path alone needs no name)")
        if not SET_NAME.fullmatch(name):
            raise ConfigError(f"has the set name {name!r}: a name is letters, digits, _ and - only")
        if name in (*RESERVED_NAMES, *reserved):
            raise ConfigError(f"has the set name {name!r}, which metric keys and tables already use for something "
                              f"else ({', '.join((*RESERVED_NAMES, *reserved))}): choose another name")
        if name in (n for n, _ in sets):
            raise ConfigError(f"names the set {name!r} twice: each set needs its own name")
        hub_dataset(path)
        sets.append((name, path))
    return sets


def _is_named(item: str) -> bool:
    """Whether one `eval_data` item is `name:path` rather than a path or a hub `name:split`: it is when what follows
    the first colon is a local file, ends like one, is `split`, or is itself a hub `name:split`."""
    name, colon, rest = item.partition(":")
    if not colon or not SET_NAME.fullmatch(name.strip()) or item.startswith(HUB_PREFIX):
        return False
    rest = rest.strip()
    return rest == SPLIT or ":" in rest or rest.endswith(LOCAL_SUFFIXES) or resolve_local(rest) is not None


def metric_key(key: str, set_name: str) -> str:
    """`key` ("eval/<evaluator>/<metric>", "eval/time/<x>", "eval/generation/<x>") as eval set `set_name` logs it:
    eval/<set>/<evaluator>/<metric>, and eval/time/<set>/<x>, eval/generation/<set>/<x>, so that timings and
    token counts keep their prefixes; unchanged for the unnamed set ("")."""
    if not set_name:
        return key
    _eval, group, rest = key.split("/", 2)
    return f"eval/{group}/{set_name}/{rest}" if group in RESERVED_NAMES else f"eval/{set_name}/{group}/{rest}"


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): round(fraction x N) records drawn with `seed`, disjoint from the rest;
    both keep the file's order. Split by record, before records become rows, so that no conversation or pair is
    trained on and evaluated both. Holding out none or all of them is a DataError naming eval_split."""
    n = len(records)
    k = round(fraction * n)
    if not 0 < k < n:
        raise DataError(f"eval_split={fraction} of the {n} training records holds out {k}: it must leave at least "
                        f"one record for evaluation and one for training")
    held = set(random.Random(seed).sample(range(n), k))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def heldout_samples(records: list[Record], data_format: str = "auto", limit: int = 0,
                    required: dict[str, str] | None = None) -> tuple[list[EvalSample], list[str]]:
    """Eval samples from held-out training records, and the source (file and line) of each: a record with `prompt`
    and `reference` is read as an eval record; a preference pair gives its prompt, the chosen answer as reference
    and the rejected one beside it; a chat its last assistant turn as reference after the turns before it; a KTO
    record its completion when labelled desirable (an undesirable one is no reference, so it gives no sample).
    Raw text has no reference to score against: a DataError. `limit` keeps the first N samples (0: all)."""
    samples, sources = [], []
    for record in records:
        sample = _heldout_sample(record, data_format, required)
        if sample is not None:
            samples.append(sample)
            sources.append(record.source)
        if limit and len(samples) == limit:
            break
    if not samples:
        raise DataError(f"{records[0].source}: the held-out records (eval_split) give no eval sample (KTO records "
                        f"labelled undesirable have no reference answer)")
    return samples, sources


def _heldout_sample(record: Record, data_format: str, required: dict[str, str] | None) -> EvalSample | None:
    # the id is the record's own `id`, else its place in the training file: the same for every run of one file
    index = record.source.rpartition(" ")[2]
    if data_format == "auto" and isinstance(record.fields.get("prompt"), str) and "reference" in record.fields:
        return eval_sample(record, index, required)  # an eval-style record (GRPO's rl.jsonl)
    if data_format == "auto":
        fmt = detect(record, ("preference",))  # UltraFeedback rows hold a pair and a chat: the pair has more
    else:
        fmt = record_format([record], data_format, HELDOUT_SOURCES)
    if fmt not in HELDOUT_SOURCES:
        raise DataError(f"{record.source}: eval_split holds out {fmt} records, which have no reference answer to "
                        f"score against; give eval_data a file of prompt/reference records instead")
    rejected = None
    if fmt == "kto":
        if record.fields.get("label") is not True:
            return None
        conversation = [{"role": "user", "content": require_text(record, "prompt")}]
        reference = require_text(record, "completion")
    elif fmt == "preference" or (fmt == "sharegpt" and _is_pair(record)):
        pair = preference(record, fmt)
        conversation, reference = pair["prompt"], _answer(pair["chosen"])
        rejected = _answer(pair["rejected"])
    else:
        turns = chat(record, fmt)
        conversation, reference = turns[:-1], turns[-1]["content"]
    if not conversation or conversation[-1]["role"] != "user":
        raise DataError(f"{record.source}: held out for evaluation (eval_split), but its answer does not follow a "
                        f"user turn")
    answer = eval_answer(record, required is not None and "answer" in required, (required or {}).get("answer", ""))
    user_only = len(conversation) == 1
    return EvalSample(str(record.fields.get("id", index)), conversation[-1]["content"], reference, answer,
                      None if user_only else tuple(conversation), rejected)


def _is_pair(record: Record) -> bool:
    return any(k in record.fields for k in ("chosen", "rejected", "chosen_gpt", "rejected_gpt"))


def _answer(turns: list[dict]) -> str:
    """An answer's text: its assistant turns (usually one), a blank line between."""
    return "\n\n".join(m["content"] for m in turns)


def eval_set_samples(records: list[Record], limit: int = 0,
                     required: dict[str, str] | None = None) -> list[EvalSample]:
    """The samples of an eval file: each record a prompt and reference (harness.core.records.eval_sample) or a whole
    conversation (`messages`, see conversation_sample); `limit` keeps the first N (0 keeps all)."""
    samples = [conversation_sample(r, i, required) if "messages" in r.fields else eval_sample(r, i, required)
               for i, r in enumerate(records[:limit] if limit else records)]
    if not samples:
        raise DataError("the eval data has no records")
    return samples


def conversation_sample(record: Record, index: int, required: dict[str, str] | None = None) -> EvalSample:
    """An eval record that is a whole conversation: `messages` ({role, content}: system, earlier turns) ending with
    the user turn the model answers, and `reference`, the expected reply; or, without `reference`, `messages` ending
    with that reply as an assistant turn. Errors name the file, line and field."""
    turns = _messages(record, "messages", record.fields.get("messages"))
    if "reference" in record.fields:
        reference = require_text(record, "reference")
        why = "the turn the model answers; the expected reply is 'reference'"
    else:
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{record.source}: field 'reference' is missing (the expected reply): give it, or end "
                            f"'messages' with the reply as an assistant turn")
        reference = require_text(record, f"messages[{len(turns) - 1}].content", turns[-1]["content"])
        turns = turns[:-1]
        why = "the turn the model answers, before the final assistant turn that is the reference"
    if not turns or turns[-1]["role"] != "user":
        last = f"messages[{len(turns) - 1}].role" if turns else "messages"
        raise DataError(f"{record.source}: field '{last}' must be 'user' ({why})")
    prompt = require_text(record, f"messages[{len(turns) - 1}].content", turns[-1]["content"])
    answer = eval_answer(record, required is not None and "answer" in required, (required or {}).get("answer", ""))
    return EvalSample(str(record.fields.get("id", index)), prompt, reference, answer, tuple(turns))
