"""Answer accuracy: does the output give the record's short `answer`? Three ways, each 0-100 over the eval samples.

- `exact`: the final answer extracted from the output, normalised, equals the normalised `answer`.
- `numeric`: for records whose `answer` is a number, the last number in the extracted final answer equals it within
  `tolerance` (|x - a| <= tolerance x max(1, |a|)); averaged over those records only (absent when there are none).
- `contains`: the `answer` string appears verbatim in the output (case and spacing as written). This is the GRPO
  `answer_match` reward's rule (harness/rl/rewards.py calls `contains_answer` below), so `eval/answer/contains`
  measures in the loop what that reward pays. Loose on purpose: the answer "5" is also contained in "15".

Normalisation (`normalize`), applied to both sides: Unicode NFKC (full-width letters, digits and punctuation become
ASCII), case-folding, every run of white space collapsed to one space, then surrounding white space, quotes
("'“”‘’「」『』《》«»`) and trailing punctuation (.,;:!? and 。，、；：！？…) stripped, repeatedly.

Extraction of the final answer (`extract_answer`), the first rule that applies:
1. a marker, the last one in the output: `\\boxed{X}`, else `#### X` (GSM8K; the rest of that line), else
   `answer is X` / `answer: X` / `答案是X` / `答案：X` (case-insensitive; up to the end of that sentence or line);
2. the reference's frame: the record's `reference` with the answer in it (its last occurrence) shows the words around
   the answer, e.g. reference `The capital of Italy is Rome.` for answer `Rome` frames `The capital of Italy is _.`;
   an output of that form (compared case-folded and with spaces collapsed, trailing punctuation ignored) gives the
   text in the gap. This is how the embedded tasks state their answers, in both languages;
3. otherwise the whole output.

GSM8K's rule, as lm-evaluation-harness's `gsm8k` task applies it (lm_eval/tasks/gsm8k/gsm8k.yaml), for records in
GSM8K's shape: the `reference` is a worked solution with a `#### N` line (harness.core.records.gsm8k_sample reads
GSM8K's `question`/`answer` records so); absent, like `numeric`, when the set has none:
- `gsm8k_strict` (lm-eval: `exact_match,strict-match`): the first `#### N` of the output, N matched by
  `#### (\\-?[0-9\\.\\,]+)`;
- `gsm8k_flexible` (lm-eval: `exact_match,flexible-extract`): the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` in the
  output (its first non-empty group);
then lm-eval's `exact_match` against the reference, as lm-eval's target is the whole solution, with the task's
options: on both the extracted text and the reference, `,` and `$` removed,
everything up to the last `#### ` removed, one trailing `.` removed, lower-cased; equal strings score 100. No match
at all is lm-eval's "[invalid]", which scores 0. Stricter than `numeric`: `72.0` is not `72`.

Numbers (`parse_number`, `last_number`): optional sign (`-`, `+`, `−`), digits with optional thousands commas
(`1,000`), optional decimals (`3.50`, `.5`), optionally a simple fraction `a/b` (`3/4` = 0.75); a sign right after
a digit is not a sign (`63-58` is 63 and 58). So `1,000` = `1000`, `3.50` = `3.5`, `-7` = `−7`. An `answer` is a
number when all of it (normalised) is one. Not handled: words (`five`, `五`), scientific notation, units.
"""

from __future__ import annotations

import math
import re
import unicodedata

from evaluators.base import EvalContext, EvalResult, Evaluator
from harness.core.errors import DataError

_QUOTES = "\"'“”‘’「」『』《》«»`"
_TRAILING = ".,;:!?。，、；：！？…"


def contains_answer(output: str, answer: str) -> bool:
    """True when the answer string appears verbatim in the output (case and spacing as written)."""
    return answer in output


def _fold(text: str) -> str:
    """NFKC, case-folded, every white-space run one space (edges kept)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold())


def normalize(text: str) -> str:
    """The comparison form of an answer: see the module docstring."""
    text, previous = _fold(text), None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES).rstrip(_TRAILING)
    return text


_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"(?<![\d.])([-+\u2212])?({_DIGITS})(?:/({_DIGITS}))?(?!\d)")


def _value(sign: str | None, whole: str, denominator: str | None) -> float | None:
    value = float(whole.replace(",", ""))
    if denominator is not None:
        below = float(denominator.replace(",", ""))
        if below == 0:
            return None
        value /= below
    return -value if sign in ("-", "\u2212") else value


def parse_number(text: str) -> float | None:
    """The number that all of `text` (normalised) is, else None."""
    match = _NUMBER.fullmatch(normalize(text))
    return _value(*match.groups()) if match else None


def last_number(text: str) -> float | None:
    """The last number written in `text`, else None."""
    found = [_value(*m.groups()) for m in _NUMBER.finditer(unicodedata.normalize("NFKC", text))]
    found = [v for v in found if v is not None]
    return found[-1] if found else None


def _boxed(output: str) -> str | None:
    """The content of the last \\boxed{...} (braces inside balanced)."""
    start = output.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(output)):
        depth += {"{": 1, "}": -1}.get(output[j], 0)
        if depth == 0:
            return output[i:j]
    return None


_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:answer\s*(?:is\s*:?|:)|答案\s*(?:(?:是|为)\s*[:：]?|[:：]))\s*(.+?)"
                        r"(?=[.!?。！？](?:\s|$)|\n|$)", re.IGNORECASE)


# lm-eval's gsm8k task: its two regex filters, the fallback of a filter that finds nothing, and the regexes its
# exact_match removes from both sides (in this order) before comparing lower-cased strings
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"


def gsm8k_extract(output: str, flexible: bool = False) -> str:
    """The answer lm-eval's gsm8k filter takes from `output`: strict-match the first `#### N`, flexible-extract the
    last number-like run; "[invalid]" when there is none."""
    found = (GSM8K_FLEXIBLE if flexible else GSM8K_STRICT).findall(output)
    if not found:
        return INVALID
    match = found[-1] if flexible else found[0]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((m for m in match if m), INVALID)
    return match.strip()


def gsm8k_normal(text: str) -> str:
    """What lm-eval's exact_match compares, with the gsm8k task's regexes_to_ignore and ignore_case."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_match(output: str, solution: str, flexible: bool = False) -> bool:
    """lm-eval's gsm8k exact_match of `output` (after its strict or flexible filter) against the worked `solution`
    (its `#### N` line)."""
    return gsm8k_normal(gsm8k_extract(output, flexible)) == gsm8k_normal(solution)


def _framed(output: str, reference: str, answer: str) -> str | None:
    """The text in the output where the reference has its answer, when the output has the reference's frame."""
    folded, answer = _fold(reference), _fold(answer).strip()
    at = folded.rfind(answer) if answer else -1
    if at < 0:
        return None
    prefix = folded[:at].lstrip()
    suffix = folded[at + len(answer):].strip().rstrip(_TRAILING).rstrip()
    text = _fold(output).strip().rstrip(_TRAILING).rstrip()
    if not (text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)):
        return None
    return text[len(prefix): len(text) - len(suffix)].strip()


def extract_answer(output: str, reference: str = "", answer: str = "") -> str:
    """The final answer stated in `output` (module docstring: markers, then the reference's frame, then all)."""
    boxed = _boxed(output)
    if boxed is not None:
        return boxed
    for marker in (_HASHES, _ANSWER_IS):
        found = marker.findall(output)
        if found:
            return found[-1]
    framed = _framed(output, reference, answer)
    return framed if framed is not None else output


def answer_scores(output: str, answer: str, reference: str = "", tolerance: float = 1e-6) -> dict:
    """One sample: `exact`, `numeric`, `contains`, `gsm8k_strict`, `gsm8k_flexible` as 0/100 (numeric NaN when the
    answer is not a number, the gsm8k ones when the reference is not a GSM8K solution), and `extracted`."""
    extracted = extract_answer(output, reference, answer)
    expected = parse_number(answer)
    if expected is None:
        numeric = float("nan")
    else:
        got = last_number(extracted)
        numeric = 100.0 * (got is not None and abs(got - expected) <= tolerance * max(1.0, abs(expected)))
    strict, flexible = ((100.0 * gsm8k_match(output, reference, f) if "#### " in reference else float("nan"))
                        for f in (False, True))
    return {"exact": 100.0 * (bool(normalize(answer)) and normalize(extracted) == normalize(answer)),
            "numeric": numeric, "contains": 100.0 * contains_answer(output, answer), "gsm8k_strict": strict,
            "gsm8k_flexible": flexible, "extracted": extracted}


class Answer(Evaluator):
    name = "answer"
    metrics = ("exact", "numeric", "contains", "gsm8k_strict", "gsm8k_flexible")
    partial_metrics = ("numeric", "gsm8k_strict", "gsm8k_flexible")  # over the records they apply to only
    mean_metrics = metrics
    needs_fields = ("answer",)

    def __init__(self, tolerance: float = 1e-6):
        self.tolerance = tolerance

    @classmethod
    def option_rules(cls, options=None) -> list[tuple[bool, str, str]]:
        tolerance = cls.resolved_options(options)["tolerance"]
        return [(tolerance >= 0, "tolerance", "must be >= 0 (relative, absolute below 1)")]

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        missing = [s.id for s in ctx.samples if s.answer is None]
        if missing:
            raise DataError(f"the answer evaluator needs an 'answer' field in every eval record; missing for id(s) "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        rows = [answer_scores(p, s.answer, s.reference, self.tolerance)
                for p, s in zip(ctx.predictions, ctx.samples, strict=True)]
        per = {k: [r[k] for r in rows] for k in (*self.metrics, "extracted")}
        metrics = {k: sum(per[k]) / len(per[k]) for k in ("exact", "contains")}
        for k in self.partial_metrics:
            values = [v for v in per[k] if not math.isnan(v)]
            if values:
                metrics[k] = sum(values) / len(values)
        return EvalResult({k: metrics[k] for k in self.metrics if k in metrics}, per)
