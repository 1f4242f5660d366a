"""Reading training and eval records from local files or the Hugging Face hub, validated up front.

Every problem is reported with the file, the line (JSONL) or record index (JSON, Parquet, hub) and the field,
before any training starts.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError, DataError
from harness.paths import REPO_ROOT

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    source: str  # "path line N" or "dataset record N": where an error message should point
    fields: dict[str, Any]


_FIELD = object()  # require_text's default: read the value from the record's own field


def require_text(record: Record, key: str, value: Any = _FIELD, *, blank_ok: bool = False, why: str = "") -> str:
    """The text of the required field `key` of `record`, returned as it is (not stripped).

    The rule for every required text field: present, a `str`, and not empty once stripped of white space.
    `blank_ok=True` waives the last condition, for model outputs (a prediction or completion may be empty).
    `value` is the field's value when it is not a top-level field (e.g. key 'conversations[0].value').
    The error names the file and line (or record) and the field, and adds `why` in parentheses when given.
    """
    value = record.fields.get(key) if value is _FIELD else value
    if value is None:
        what = "is missing"
    elif not isinstance(value, str):
        what = "must be a string" if blank_ok else "must be a non-empty string"
    elif blank_ok or value.strip():
        return value
    else:
        what = "must be a non-empty string"
    raise DataError(f"{record.source}: field '{key}' {what}" + (f" ({why})" if why else ""))


def require_texts(record: Record, key: str, value: Any = _FIELD, *, at_least: int = 1) -> list[str]:
    """The list of texts in the required field `key` (multiple-choice choices): a JSON array of at least `at_least`
    strings, each non-empty once stripped; the error names the file and line and the field or its bad item."""
    value = record.fields.get(key) if value is _FIELD else value
    if not isinstance(value, list) or len(value) < at_least:
        what = "is missing" if value is None else f"must be a list of at least {at_least} strings"
        raise DataError(f"{record.source}: field '{key}' {what}")
    return [require_text(record, f"{key}[{i}]", item) for i, item in enumerate(value)]


def require_index(record: Record, key: str, size: int, value: Any = _FIELD) -> int:
    """The required field `key` as an index into a list of `size` items (a multiple-choice answer): a JSON integer or
    a string of digits ("3", as HellaSwag writes its labels) in [0, size)."""
    value = record.fields.get(key) if value is _FIELD else value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
        return value
    what = "is missing" if value is None else f"must be an index in [0, {size}) (got {value!r})"
    raise DataError(f"{record.source}: field '{key}' {what}")


def resolve_local(spec: str) -> Path | None:
    """A path as given (relative to the working directory), else relative to the repository root."""
    for candidate in (Path(spec), REPO_ROOT / spec):
        if candidate.is_file():
            return candidate
    return None


def read_records(spec: str) -> list[Record]:
    """Records of a local JSONL (also .jsonl.gz)/JSON/Parquet file, a .txt file (one {"text"} record per line),
    or a hub dataset (see hub_dataset); none at all is an error naming `spec`."""
    records = _read_records(spec)
    if not records:
        raise DataError(f"{spec}: no records")
    return records


def _read_records(spec: str) -> list[Record]:
    path = resolve_local(spec)
    if path is None:
        if spec.endswith(LOCAL_SUFFIXES):
            raise DataError(f"{spec}: no such file (looked in {Path.cwd()} and {REPO_ROOT})")
        return _read_hub(spec)
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".txt":
        return _read_text(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Record(f"{path} record {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 data file (gzip-compressed when it ends in .gz), with a leading UTF-8 byte order mark
    (files saved on Windows) dropped. Bytes that are not UTF-8 (another encoding, or a file cut through a
    multi-byte character) are a DataError naming the file, line and byte offset."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut file ends early (EOFError)
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({e.reason}: byte 0x{raw[offset]:02x} at byte offset "
                        f"{offset}); save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Lines split on newlines only (CRLF accepted), as JSON Lines defines them: str.splitlines would also split
    inside a string holding U+2028, a form feed or a lone CR, which `json.dumps(ensure_ascii=False)` writes raw."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for lineno, line in enumerate(_lines(read_text_file(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        records.append(Record(f"{path} line {lineno}", row))
    return records


def _read_text(path: Path) -> list[Record]:
    """One document per non-empty line (multi-line documents belong in JSONL as {"text": ...})."""
    lines = enumerate(_lines(read_text_file(path)), start=1)
    return [Record(f"{path} line {n}", {"text": line}) for n, line in lines if line.strip()]


def _read_json(path: Path) -> list[Record]:
    try:
        rows = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a JSON array of objects")
    return [Record(f"{path} record {i + 1}", row) for i, row in enumerate(rows)]


HUB_PREFIX = "hf:"  # hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, a hub dataset with its config (docs/guides/eval-sets.md)


@dataclass(frozen=True)
class HubDataset:
    name: str  # the hub repository (openai/gsm8k), or a local directory laid out as one
    config: str | None  # the dataset's config (gsm8k's main, mmlu's all), None for its default
    split: str


def hub_dataset(spec: str) -> HubDataset:
    """What a hub spec names: `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`, or without the prefix `NAME` (split train)
    or `NAME:SPLIT`. A prefixed spec of another form is a ConfigError saying the form."""
    if not spec.startswith(HUB_PREFIX):
        name, _, split = spec.partition(":")
        return HubDataset(name, None, split or "train")
    parts = [p.strip() for p in spec.removeprefix(HUB_PREFIX).split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"{spec!r}: a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (e.g. "
                          f"hf:openai/gsm8k:main:test)")
    return HubDataset(parts[0], parts[1] if len(parts) == 3 else None, parts[-1])


def _read_hub(spec: str) -> list[Record]:
    import datasets

    hub = hub_dataset(spec)
    try:
        ds = datasets.load_dataset(hub.name, hub.config, split=hub.split)
    except Exception as e:  # the hub client raises many types; the user needs the name and the reason
        offline = datasets.config.HF_HUB_OFFLINE
        hint = ("HF_DATASETS_OFFLINE is set, so only the datasets cache is read: load it once with network, or give "
                "a local file" if offline else "without network, set HF_DATASETS_OFFLINE=1 to read the copy in the "
                "datasets cache, or give a local file")
        config = f" config {hub.config!r}" if hub.config else ""
        raise DataError(f"{spec}: not a local file, and the hub dataset {hub.name!r}{config} split {hub.split!r} "
                        f"could not be loaded ({e}); {hint}") from e
    return [Record(f"{spec} record {i + 1}", row) for i, row in enumerate(ds)]


def fingerprint(spec: str) -> str:
    """sha256 of a local file's bytes (first 16 hex digits), or the hub name itself."""
    path = resolve_local(spec)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else f"hub:{spec}"


def prompt_completion_rows(records: list[Record]) -> list[dict]:
    """Supervised pairs `prompt`/`completion` (strings); the loss is on the completion only."""
    rows = [{key: require_text(r, key) for key in ("prompt", "completion")} for r in records]
    if not rows:
        raise DataError("the training data has no records")
    return rows


@dataclass(frozen=True)
class EvalSample:
    id: str
    prompt: str  # the user turn the model answers (a conversation's last user turn)
    reference: str
    answer: str | None = None  # the short checkable answer (the `answer` evaluator, GRPO's answer_match), if given
    # a whole conversation (system, earlier turns) ending with the user turn `prompt`, rendered as it is by the chat
    # template (harness.core.prompts.render_sample); None: `prompt` alone is the conversation
    messages: tuple[dict, ...] | None = None
    rejected: str | None = None  # a preference pair's rejected answer (`reference` is the chosen one), when held out


def eval_answer(record: Record, required: bool = False, why: str = "") -> str | None:
    """A record's `answer`: a non-empty string, or a JSON number as text (72 -> "72", 3.5 -> "3.5"). Without
    `required`, anything else (absent, empty, another type) is None, so runs that do not read it never fail on it;
    with `required` it is an error naming the file, line and field, like every required field."""
    value = record.fields.get("answer")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not required:
        return value if isinstance(value, str) and value.strip() else None
    return require_text(record, "answer", why=why)


def gsm8k_sample(record: Record, index: int | str) -> EvalSample | None:
    """A record in GSM8K's shape (openai/gsm8k: `question`, and `answer` the worked solution ending with a line
    `#### N`) as an eval sample: prompt = the question, reference = the whole solution, answer = N (what follows the
    last `####`); None for a record of another shape (one with a `prompt`, or whose `answer` is not text)."""
    if "prompt" in record.fields or "question" not in record.fields or not isinstance(record.fields.get("answer"), str):
        return None
    question, solution = require_text(record, "question"), require_text(record, "answer")
    _, mark, final = solution.rpartition("####")
    if not mark or not final.strip():
        raise DataError(f"{record.source}: field 'answer' must end with a line '#### N' giving the final answer "
                        f"(a GSM8K record has question and answer; other eval records have prompt and reference)")
    return EvalSample(str(record.fields.get("id", index)), question, solution, final.strip())


def eval_sample(record: Record, index: int | str, required: dict[str, str] | None = None) -> EvalSample:
    """An eval record with a string `prompt` and `reference`, and `answer` when present, or a GSM8K record
    (gsm8k_sample); its id is its `id` field or `index`. `required`: fields the record must have besides those (only
    `answer` is known) -> why, for the error message (e.g. {"answer": "the answer evaluator compares outputs with
    it"})."""
    required = required or {}
    unknown = sorted(set(required) - {"answer"})
    if unknown:
        raise ValueError(f"eval records carry no field(s) {unknown}")
    gsm8k = gsm8k_sample(record, index)
    if gsm8k is not None:
        return gsm8k
    return EvalSample(str(record.fields.get("id", index)), require_text(record, "prompt"),
                      require_text(record, "reference"), eval_answer(record, "answer" in required,
                                                                     required.get("answer", "")))
