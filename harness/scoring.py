"""Scoring saved generations offline, with no training: the same evaluators as in the loop."""

from __future__ import annotations

from evaluators import EVALUATORS, EvalContext, EvalResult
from harness.data import EvalSample, Record, read_records
from harness.errors import DataError


def _string_field(record: Record, key: str) -> str:
    value = record.fields.get(key)
    if not isinstance(value, str):
        raise DataError(f"{record.source}: field '{key}' {'is missing' if value is None else 'must be a string'}")
    return value


def score_file(evaluator_name: str, samples_file: str, model: str | None = None) -> EvalResult:
    """Score a JSONL of `prompt`/`reference`/`prediction` rows (perplexity: `text`, or `prompt` + `reference`)."""
    evaluator = EVALUATORS[evaluator_name]()
    records = read_records(samples_file)
    if not records:
        raise DataError(f"{samples_file}: no records")
    if not evaluator.needs_generation:
        return _score_with_model(evaluator, records, model)
    samples = [EvalSample(str(i), r.fields.get("prompt", ""), _string_field(r, "reference")) for i, r in
               enumerate(records)]
    predictions = [_string_field(r, "prediction") for r in records]
    return evaluator.evaluate(EvalContext(samples, predictions=predictions))


def _score_with_model(evaluator, records: list[Record], model: str | None) -> EvalResult:
    from harness.generation import HFBackend
    from harness.models import load_model, load_tokenizer, resolve_model
    from harness.prompts import render_prompt

    if model is None:
        raise DataError(f"'{evaluator.name}' scores with a model: pass --model (a local directory or tiny-qwen2)")
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    backend = HFBackend(tokenizer)
    backend.sync_weights(load_model(path))
    samples, prompt_ids = [], []
    for i, r in enumerate(records):
        if "text" in r.fields:
            # Plain text: every token after the first is scored, given the ones before it.
            ids = tokenizer(_string_field(r, "text"), add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                raise DataError(f"{r.source}: field 'text' needs at least two tokens")
            prompt_ids.append(ids[:1])
            samples.append(EvalSample(str(i), "", tokenizer.decode(ids[1:])))
        else:
            prompt_ids.append(render_prompt(tokenizer, _string_field(r, "prompt")))
            samples.append(EvalSample(str(i), r.fields["prompt"], _string_field(r, "reference")))
    return evaluator.evaluate(EvalContext(samples, backend=backend, prompt_ids=prompt_ids, tokenizer=tokenizer))
