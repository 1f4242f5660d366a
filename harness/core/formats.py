"""The record formats post-training data ships in, detected, validated and converted to what trainers read.

Formats (detected from the first record's keys, or named explicitly):
- messages: {"messages": [{"role", "content"}, ...]} (OpenAI chat; optional system turn; multi-turn)
- sharegpt: {"conversations": [{"from", "value"}, ...]}, for preferences with "chosen"/"rejected" as
  {"from", "value"} turns or "chosen_gpt"/"rejected_gpt" strings
- alpaca: {"instruction", "input" (optional), "output", "system" (optional)}
- preference: {"prompt", "chosen", "rejected"}, each a string or a list of {"role", "content"} messages
- kto: {"prompt", "completion", "label" (bool)}: unpaired preference
- prompt_completion: {"prompt", "completion"} strings (plain completion, e.g. code)
- text: {"text"} (raw text; a .txt file gives one record per line)

Every error names the record's file and line (or record index) and the field.
"""

from __future__ import annotations

import re
from collections import Counter

from harness.core.errors import DataError
from harness.core.records import Record, require_text

FORMATS = ("messages", "sharegpt", "alpaca", "preference", "kto", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# what each trainer input can be built from
CHAT_SOURCES = ("messages", "sharegpt", "alpaca", "prompt_completion")
PREFERENCE_SOURCES = ("preference", "sharegpt")
KTO_SOURCES = ("kto", "preference", "sharegpt")  # a pair gives one desirable and one undesirable example
TEXT_SOURCES = ("text",)


_DETECT = (("sharegpt", {"conversations"}), ("messages", {"messages"}), ("preference", {"chosen", "rejected"}),
           ("kto", {"completion", "label"}), ("alpaca", {"instruction"}),
           ("prompt_completion", {"prompt", "completion"}), ("text", {"text"}))


def detect(record: Record, accepted: tuple[str, ...] = FORMATS) -> str:
    """The format of `record` from its keys: the first match in _DETECT's order, preferring one in `accepted`
    (UltraFeedback-binarized rows have `messages` and `chosen`/`rejected`: preference for DPO, messages for SFT)."""
    keys = set(record.fields)
    matches = [fmt for fmt, needs in _DETECT if needs <= keys]
    if matches:
        return next((fmt for fmt in matches if fmt in accepted), matches[0])
    raise DataError(f"{record.source}: cannot tell the format from the fields {sorted(keys)}; expected one of "
                    f"{', '.join(FORMATS)} (see harness/formats.py), or name it with data_format=")


def record_format(records: list[Record], fmt: str, accepted: tuple[str, ...]) -> str:
    """The format of these records (`fmt`, or detected when "auto"), checked to be one the caller can use."""
    if not records:
        raise DataError("the data has no records")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data_format={fmt!r} is not a format; choose auto or one of {', '.join(FORMATS)}")
    found = detect(records[0], accepted) if fmt == "auto" else fmt
    if found not in accepted:
        raise DataError(f"{records[0].source}: {found} records cannot be used here; this method reads "
                        f"{', '.join(accepted)}")
    return found


def _messages(record: Record, key: str, value, roles=ROLES) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{record.source}: field '{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{record.source}: field '{where}' must be an object with string 'role' and 'content'")
        if m["role"] not in roles:
            raise DataError(f"{record.source}: field '{where}.role' is {m['role']!r}; expected one of {roles}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text_or_messages(record: Record, key: str, role: str) -> list[dict]:
    value = record.fields.get(key)
    if isinstance(value, list):
        return _messages(record, key, value)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{record.source}: field '{key}' must be a string or a list of {{role, content}} messages")
    return [{"role": role, "content": require_text(record, key, value)}]


def _sharegpt_turns(record: Record, key: str, value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{record.source}: field '{key}' must be a non-empty list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{record.source}: field '{where}.from' must be one of {sorted(SHAREGPT_ROLES)}")
        content = require_text(record, f"{where}.value", turn.get("value"))
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": content})
    return out


def _ends_with_assistant(record: Record, key: str, messages: list[dict]) -> list[dict]:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{record.source}: field '{key}' must end with an assistant turn (the training target)")
    return messages


def chat(record: Record, fmt: str) -> list[dict]:
    """One conversation as messages ending with an assistant turn."""
    if fmt == "messages":
        return _ends_with_assistant(record, "messages", _messages(record, "messages", record.fields.get("messages")))
    if fmt == "sharegpt":
        turns = _sharegpt_turns(record, "conversations", record.fields.get("conversations"))
        return _ends_with_assistant(record, "conversations", turns)
    if fmt == "alpaca":
        instruction = require_text(record, "instruction")
        extra = record.fields.get("input") or ""
        system = record.fields.get("system")
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                     {"role": "assistant", "content": require_text(record, "output")}]
        return messages
    if fmt == "prompt_completion":
        return [{"role": "user", "content": require_text(record, "prompt")},
                {"role": "assistant", "content": require_text(record, "completion")}]
    raise DataError(f"{record.source}: {fmt} records are not conversations")


def assistant_turn_rows(messages: list[dict]) -> list[dict]:
    """One conversational prompt/completion row per assistant turn, the history before it as the prompt: training
    on all of them puts the loss on every assistant token of a multi-turn chat, whatever the chat template."""
    return [{"prompt": messages[:i], "completion": [m]} for i, m in enumerate(messages)
            if m["role"] == "assistant" and i > 0]


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(value) -> list[dict] | None:
    """An Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages; None if it is not one."""
    if not isinstance(value, str):
        return None
    text = value.lstrip()
    if not text.startswith("Human:") or "\n\nAssistant:" not in text:
        return None
    parts = _HH_TURN.split(text)  # "", who, said, who, said, ...
    return [{"role": _HH_ROLES[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2],
                                                                                  strict=True)]


def _whole_conversations(record: Record) -> dict | None:
    """A pair whose `chosen` and `rejected` are whole conversations (UltraFeedback-binarized, HH-RLHF: the user
    turns repeated inside each answer, with or without a separate `prompt`) split into the shared prompt, every
    turn up to the last user turn, and each side's assistant continuation; None for an ordinary pair."""
    chosen, rejected = record.fields.get("chosen"), record.fields.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(record, "chosen", chosen), _messages(record, "rejected", rejected)
        if chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant":
            return None  # answers only: the prompt is the `prompt` field
    else:
        chosen, rejected = _hh_turns(chosen), _hh_turns(rejected)
        if chosen is None or rejected is None:
            return None
    cut = [max((i + 1 for i, m in enumerate(turns) if m["role"] == "user"), default=0) for turns in (chosen, rejected)]
    if cut[0] == 0 or cut[0] != cut[1] or chosen[:cut[0]] != rejected[:cut[1]]:
        raise DataError(f"{record.source}: fields 'chosen' and 'rejected' are whole conversations that differ before "
                        "the answer: both must hold the same turns up to and including the last user turn")
    shared, n = chosen[:cut[0]], cut[0]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) == n or any(m["role"] != "assistant" for m in turns[n:]):
            raise DataError(f"{record.source}: field '{key}' must continue its last user turn with assistant turns "
                            "only (the answer)")
    if record.fields.get("prompt") is not None:
        given = _hh_turns(record.fields["prompt"]) or _text_or_messages(record, "prompt", "user")
        given = given[:-1] if given[-1] == {"role": "assistant", "content": ""} else given  # HH's "Assistant:" cue
        unsystem = [m for m in shared if m["role"] != "system"]
        if given not in (shared[:len(given)], unsystem[:len(given)]):
            raise DataError(f"{record.source}: field 'prompt' is not how 'chosen' and 'rejected' begin (they are "
                            "whole conversations, so each must start with the prompt)")
    return {"prompt": shared, "chosen": chosen[n:], "rejected": rejected[n:]}


def preference(record: Record, fmt: str) -> dict:
    """{"prompt": messages, "chosen": [assistant], "rejected": [assistant]}, TRL's conversational format; when
    `chosen` and `rejected` are whole conversations, the prompt is the turns they share (see _whole_conversations),
    so that it appears once."""
    if fmt == "preference":
        pair = _whole_conversations(record)
        if pair is not None:
            return pair
        return {"prompt": _text_or_messages(record, "prompt", "user"),
                "chosen": _text_or_messages(record, "chosen", "assistant"),
                "rejected": _text_or_messages(record, "rejected", "assistant")}
    if fmt == "sharegpt":
        prompt = _sharegpt_turns(record, "conversations", record.fields.get("conversations"))
        answers = {}
        for side in ("chosen", "rejected"):
            if f"{side}_gpt" in record.fields:
                answers[side] = require_text(record, f"{side}_gpt")
            elif isinstance(record.fields.get(side), dict):
                answers[side] = require_text(record, f"{side}.value", record.fields[side].get("value"))
            else:
                raise DataError(f"{record.source}: field '{side}' (a {{from, value}} turn) or '{side}_gpt' "
                                "is missing: a ShareGPT preference record needs both answers")
        return {"prompt": prompt, **{k: [{"role": "assistant", "content": v}] for k, v in answers.items()}}
    raise DataError(f"{record.source}: {fmt} records are not preference pairs")


def kto(record: Record, fmt: str) -> list[dict]:
    """Unpaired {"prompt", "completion", "label"} rows; a preference pair gives two (chosen True, rejected False)."""
    if fmt == "kto":
        label = record.fields.get("label")
        if not isinstance(label, bool):
            raise DataError(f"{record.source}: field 'label' must be true or false, got {label!r}")
        return [{"prompt": _text_or_messages(record, "prompt", "user"),
                 "completion": _text_or_messages(record, "completion", "assistant"), "label": label}]
    pair = preference(record, fmt)
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def text(record: Record, fmt: str) -> str:
    return require_text(record, "text")


def convert(records: list[Record], fmt: str, to: str) -> list[dict]:
    """Rows in the target format `to` (messages, sft, preference, kto or text), validated record by record;
    `sft` is `messages` split into one prompt/completion row per assistant turn."""
    targets = {"messages": (CHAT_SOURCES, lambda r, f: [{"messages": chat(r, f)}]),
               "sft": (CHAT_SOURCES, lambda r, f: assistant_turn_rows(chat(r, f))),
               "preference": (PREFERENCE_SOURCES, lambda r, f: [preference(r, f)]),
               "kto": (KTO_SOURCES, kto),
               "text": (TEXT_SOURCES, lambda r, f: [{"text": text(r, f)}])}
    if to not in targets:
        raise DataError(f"--to {to!r}: choose one of {', '.join(targets)}")
    accepted, build = targets[to]
    found = record_format(records, fmt, accepted)
    return [row for r in records for row in build(r, found)]


def check(records: list[Record], fmt: str = "auto") -> Counter:
    """Validate every record in its own detected (or the given) format; counts per format."""
    counts: Counter = Counter()
    for r in records:
        found = detect(r) if fmt == "auto" else fmt
        {"messages": chat, "sharegpt": _check_sharegpt, "alpaca": chat, "preference": preference, "kto": kto,
         "prompt_completion": chat, "text": text}[found](r, found)
        counts[found] += 1
    return counts


def _check_sharegpt(record: Record, fmt: str) -> None:
    """A ShareGPT record is a preference pair when it has answers beside the conversation, else a conversation."""
    if any(k in record.fields for k in ("chosen", "rejected", "chosen_gpt", "rejected_gpt")):
        preference(record, fmt)
    else:
        chat(record, fmt)
