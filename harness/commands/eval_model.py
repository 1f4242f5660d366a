"""`python -m harness eval MODEL_OR_RUN k=v ...`: the in-loop evaluation of a run's step 0, on any model and without
training, as its own MLflow run in the experiment `eval`.

The model is anything `model=` takes (tiny-qwen2, smollm2, a directory, a .gguf file, a hub name, run:RUN_ID or
run:latest:EXPERIMENT: the run's best checkpoint, an adapter folded into its base). The k=v overrides are an
experiment's evaluation fields and evaluator options, checked by the same settings check before any run opens;
training fields are refused. The evaluation is the runner's own (prepare_evaluation, eval_suite, report_logger), so
the metrics at step 0, the per-sample tables, error bars and eval line are those a run logs at its step 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from harness.core.errors import ConfigError
from harness.training.experiment import Experiment

EXPERIMENT = "eval"  # the MLflow experiment of every `harness eval` run: models side by side (harness compare)
# the fields an evaluation reads; every other field of an experiment is training's
EVAL_FIELDS = ("eval_data", "eval_limit", "evaluators", "backend", "max_new_tokens", "eval_truncation",
               "generation_dtype", "seed", "system_prompt", "chat_template", "trust_remote_code", "output_dir")


@dataclass
class ModelEval(Experiment):
    """A model evaluated without training: the evaluation fields of every experiment, with their defaults."""

    @classmethod
    def name(cls) -> str:
        return EXPERIMENT

    def params(self) -> dict:
        """The model, the evaluation fields and the evaluator options: the training fields it never reads are not
        logged."""
        return {k: v for k, v in super().params().items()
                if k == "model" or k in EVAL_FIELDS or not hasattr(self, k)}


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    metrics: dict[str, float]


def eval_experiment(model: str, overrides: list[str], like: str = "") -> ModelEval:
    """The evaluation of `model` with `overrides` (key=value) over the evaluation fields of the experiment `like`
    (its defaults: eval_data, eval_limit, max_new_tokens, ..., and evaluator options it declares as fields) or of
    any experiment when empty, through the settings check every run passes. A training field, model= among the
    overrides or any bad value is a ConfigError naming it."""
    from evaluators import is_diagnostic
    from harness.training.overrides import field_types, parse_overrides
    from harness.training.settings import check_settings, produced_metrics

    training = sorted(set(field_types(ModelEval)) - set(EVAL_FIELDS) - {"model"})
    for override in overrides:
        key = override.partition("=")[0]
        if key == "model":
            raise ConfigError(f"eval: the model is the first argument (python -m harness eval MODEL_OR_RUN k=v ...), "
                              f"not {override!r}")
        if key in training:
            raise ConfigError(f"eval: {key!r} is a training field, and eval trains nothing; it takes the evaluation "
                              f"fields {', '.join(EVAL_FIELDS)} and the evaluators' options (<evaluator>_<option>)")
    if not model.strip():
        raise ConfigError("eval: name a model: tiny-qwen2, smollm2, a directory, a .gguf file, a hub name, "
                          "run:RUN_ID or run:latest:EXPERIMENT")
    values, options = parse_overrides(ModelEval, overrides)
    if like:
        like_values, like_options = _evaluation_of(like)
        values = {**like_values, **values}
        options = {e: {**like_options.get(e, {}), **options.get(e, {})} for e in {*like_options, *options}
                   if e in values["evaluators"] or e in options}  # the experiment's options of evaluators in use
    exp = ModelEval(model=model, **values, evaluator_options=options)
    if _reads_split(exp.eval_data):  # before the settings check, whose advice (set eval_split) eval cannot take
        raise ConfigError(f"eval: eval_data={exp.eval_data!r} reads the held-out split of train_data, and eval has "
                          f"no training data: give eval_data files or hub datasets (name:path,... or "
                          f"hf:NAME:CONFIG:SPLIT)")
    # no checkpoint is selected, but the settings check wants a select_metric the evaluators produce
    exp.select_metric = next((k for k in produced_metrics(exp) if not is_diagnostic(k)), exp.select_metric)
    return check_settings(exp)


def _evaluation_of(name: str) -> tuple[dict, dict[str, dict]]:
    """Experiment `name`'s evaluation fields as it sets them, and the evaluator options it declares as fields
    (`humaneval_n`) by evaluator."""
    from evaluators import EVALUATORS
    from experiments import load_class
    from harness.training.overrides import evaluator_option_types

    exp = load_class(name)()
    options = {e: {o: getattr(exp, f"{e}_{o}") for o in evaluator_option_types(e) if hasattr(exp, f"{e}_{o}")}
               for e in EVALUATORS}
    return {f: getattr(exp, f) for f in EVAL_FIELDS}, {e: o for e, o in options.items() if o}


def _reads_split(eval_data: str) -> bool:
    from harness.core.eval_data import SPLIT, parse_eval_data

    try:
        return any(path == SPLIT for _, path in parse_eval_data(eval_data))
    except ConfigError:  # a value that does not parse: the settings check names eval_data and why
        return False


def run_eval(exp: ModelEval) -> EvalRun:
    """Evaluate `exp.model` once, as step 0, logged to a new MLflow run of the experiment `eval`. Bad input (a model
    that cannot be found, a run without a checkpoint, a bad eval record or option) stops before the run opens."""
    from transformers.utils import logging as hf_logging

    from harness.core.files import check_writable_dir
    from harness.core.models import remote_code_warning
    from harness.training import console
    from harness.training.runner import output_root, prepare_evaluation

    with console.library_log():
        hf_logging.disable_progress_bar()
        print(f"[eval] {exp.model}: " + " ".join(f"{k}={v}" for k, v in exp.params().items() if k != "model"),
              flush=True)
        if exp.trust_remote_code:
            print(remote_code_warning(exp.model), flush=True)
        check_writable_dir(output_root(exp), "output_dir")
        eval_sets, model_path = prepare_evaluation(exp)
        evaluators = exp.make_evaluators()  # loads and checks their own inputs (choice questions, HumanEval, ...)
        try:
            return _evaluate(exp, eval_sets, model_path, evaluators)
        finally:
            for evaluator in evaluators:
                evaluator.close()


def _evaluate(exp: ModelEval, eval_sets: list, model_path: str, evaluators: list) -> EvalRun:
    from transformers import set_seed

    from harness.embedded.smollm2 import model_source_tags
    from harness.engines.vllm_engine import VLLMBackend
    from harness.training import console
    from harness.training.lineage import parent_run_id
    from harness.training.runner import (
        eval_suite,
        eval_tags,
        load_tokenizer_and_model,
        make_backend,
        output_root,
        report_logger,
    )
    from harness.training.tracking.runs import mlflow_run
    from harness.training.tracking.store import shown_tracking_uri
    from harness.training.tracking.tracker import UNDELIVERED_FILE

    started = time.time()
    tags = {"model": exp.model, "model.path": model_path, **model_source_tags(model_path),
            "experiment.class": type(exp).__qualname__, **eval_tags(exp)}
    params = exp.params()
    if source := parent_run_id(exp):  # run:... was pinned to the run it names by prepare_evaluation
        tags["source_run"] = params["source_run"] = source
    with mlflow_run(EXPERIMENT, params, tags, run_name=exp.model) as tracker:
        print(f"[mlflow] run {tracker.run_id} in experiment '{EXPERIMENT}' at {shown_tracking_uri()}", flush=True)
        tracker.log_dict({"experiment": EXPERIMENT, **params}, "config.json")
        for evaluator in evaluators:
            for artifact_file, text in evaluator.artifacts.items():
                tracker.log_text(text, artifact_file)
        out_dir = output_root(exp) / tracker.run_id
        tracker.undelivered_file = out_dir / UNDELIVERED_FILE
        library_log = console.current().move_to(out_dir, tracker)
        print(f"[eval] library output (transformers, vLLM, ...): {library_log}", flush=True)
        tokenizer, model = load_tokenizer_and_model(exp, model_path)
        t = time.time()
        backend = make_backend(exp, model_path, tokenizer)
        print(f"[eval] {backend.name} backend ready in {time.time() - t:.1f}s", flush=True)
        set_seed(exp.seed)  # after the engine, which reseeds the process's global RNGs itself, as a run does
        try:
            report = eval_suite(exp, eval_sets, evaluators, backend, tokenizer).run(model, 0)
            report_logger(tracker)(report, model)
            wall_s = time.time() - started
            tracker.log_metrics({"run/wall_s": wall_s, "run/eval_share": report.metrics["eval/time/total_s"] / wall_s},
                                0)
        finally:
            if isinstance(backend, VLLMBackend):
                backend.close()
    print(f"  MLflow run: {tracker.run_id} in {shown_tracking_uri()} (experiment '{EXPERIMENT}')\n"
          f"  MLflow UI:  {tracker.url()}\n  wall time: {time.time() - started:.1f}s", flush=True)
    return EvalRun(tracker.run_id, report.metrics)
