"""One experiment run, top to bottom: validate inputs, open the MLflow run, train with in-loop evaluation,
print the summary. Everything that can be checked is checked before the run is opened."""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PrinterCallback, set_seed
from transformers.utils import logging as hf_logging

from harness.core import ranks
from harness.core import records as data
from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer, resolve_model
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend
from harness.paths import REPO_ROOT
from harness.training import distributed
from harness.training.checkpoints import BestCheckpoint
from harness.training.experiment import Experiment
from harness.training.inloop import EvalReport, Evaluation, InLoopEvaluation, format_report, is_quality_metric
from harness.training.tracking import Tracker, TrainMetricsLogger, mlflow_run, tracking_uri


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    run_url: str
    experiment_name: str
    reports: list[EvalReport]
    best_checkpoint: Path | None
    best_step: int | None
    best_value: float | None
    wall_s: float
    steps_trained: int


@dataclass
class RunHooks:
    """How a caller such as a sweep trial joins a run: its name and tags, a call once the MLflow run is open,
    and monitors that see every eval report and are trainer callbacks too (so they can stop training)."""

    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    on_open: Callable[[Tracker], None] | None = None
    monitors: list = field(default_factory=list)


def make_backend(exp: Experiment, model_path: str, tokenizer):
    if exp.backend == "vllm":
        lora_rank = exp.lora_rank if exp.lora_serving == "request" else None
        return VLLMBackend(model_path, seed=exp.seed, max_model_len=max(256, exp.max_length + exp.max_new_tokens),
                           dtype=exp.generation_dtype, lora_rank=lora_rank)
    return HFBackend(tokenizer)


def run_experiment(exp: Experiment, hooks: RunHooks | None = None) -> RunSummary | None:
    """Train `exp` (checked by harness.training.settings.check_settings) with in-loop evaluation. In a
    multi-process launch only rank 0 returns a summary."""
    started = time.time()
    hf_logging.disable_progress_bar()
    main = ranks.is_main()
    rows, samples, model_path = prepare(exp, verbose=main)
    if not main:
        _train_shard(exp, rows, model_path)
        return None
    evaluators = exp.make_evaluators()  # loads and checks their own inputs (HumanEval problems, the sandbox, a judge)
    try:
        return _train_and_evaluate(exp, rows, samples, model_path, evaluators, started, hooks or RunHooks())
    finally:
        for evaluator in evaluators:
            evaluator.close()


def prepare(exp: Experiment, verbose: bool = True) -> tuple[list[dict], list, str]:
    """Inputs first: a bad file stops here, before a model is loaded or an MLflow run exists. Returns the training
    rows, the eval samples and the model's path (the embedded model is built here on first use)."""
    if verbose:
        print(f"[run] {exp.name()}: " + " ".join(f"{k}={v}" for k, v in exp.params().items()), flush=True)
    rows = exp.train_rows(data.read_records(exp.train_data))
    samples = data.eval_samples(data.read_records(exp.eval_data), exp.eval_limit)
    if verbose:
        print(f"[data] {len(rows)} training rows from {exp.train_data}, {len(samples)} eval samples from "
              f"{exp.eval_data}")
    return rows, samples, resolve_model(exp.model)


def _load(exp: Experiment, model_path: str):
    return load_tokenizer(model_path), load_model(model_path, exp.peft, exp.lora_rank, exp.lora_alpha,
                                                  exp.lora_dropout, exp.lora_target_modules, head=exp.model_head)


def _train(exp: Experiment, model, tokenizer, rows: list[dict], callbacks: list, output_dir: str, **extra):
    trainer = exp.build_trainer(model, tokenizer, rows, callbacks, output_dir, **extra)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; TrainMetricsLogger prints progress
    trainer.train()
    return trainer


def _train_shard(exp: Experiment, rows: list[dict], model_path: str) -> None:
    """A rank other than 0: trains on its shard of every batch and joins rank 0's evaluations; logs nothing."""
    tokenizer, model = _load(exp, model_path)
    set_seed(exp.seed)
    with tempfile.TemporaryDirectory(prefix=f"rank{ranks.rank()}-") as output_dir:
        _train(exp, model, tokenizer, rows, [InLoopEvaluation(None, exp.eval_every, [])], output_dir)


def _train_and_evaluate(exp: Experiment, rows: list[dict], samples, model_path: str, evaluators: list,
                        started: float, hooks: RunHooks) -> RunSummary:
    name = exp.name()
    tags = {"model": exp.model, "model.path": model_path, "experiment.class": type(exp).__qualname__,
            "data.train.fingerprint": data.fingerprint(exp.train_data),
            "data.eval.fingerprint": data.fingerprint(exp.eval_data), **hooks.tags}
    if ranks.launched():
        tags.update({"distributed.world_size": str(ranks.world_size()),
                     "distributed.launcher": os.environ.get(distributed.LAUNCHER_ENV, "unknown")})
    with mlflow_run(name, exp.params(), tags, run_name=hooks.run_name) as tracker:
        print(f"[mlflow] run {tracker.run_id} in experiment '{name}' at {tracking_uri()}", flush=True)
        if hooks.on_open is not None:
            hooks.on_open(tracker)
        tracker.log_dict({"experiment": name, **exp.params()}, "config.json")
        for evaluator in evaluators:
            for artifact_file, text in evaluator.artifacts.items():
                tracker.log_text(text, artifact_file)
        out_dir = Path(exp.output_dir)
        out_dir = (out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir) / name / tracker.run_id
        tokenizer, model = _load(exp, model_path)
        t = time.time()
        backend = make_backend(exp, model_path, tokenizer)
        print(f"[eval] {backend.name} backend ready in {time.time() - t:.1f}s", flush=True)
        set_seed(exp.seed)  # after the engine, which reseeds the process's global RNGs itself
        evaluation = Evaluation(evaluators, samples, backend, tokenizer,
                                GenParams(max_new_tokens=exp.max_new_tokens, seed=exp.seed))
        best = BestCheckpoint(out_dir / "best", exp.select_metric, exp.select_mode, tokenizer, tracker)

        def log_report(report: EvalReport, _model) -> None:
            tracker.log_metrics(report.metrics, report.step)
            tracker.log_table(report.table, f"eval_samples/step_{report.step:06d}.json")
            for evaluator, table in report.evaluator_tables.items():
                tracker.log_table(table, f"eval_samples/{evaluator}/step_{report.step:06d}.json")
            print(format_report(report), flush=True)

        in_loop = InLoopEvaluation(evaluation, exp.eval_every, [log_report, best, *hooks.monitors])
        # monitors come after in_loop: a decision made on a step's report takes effect at that same step's end
        callbacks = [in_loop, *hooks.monitors, TrainMetricsLogger(tracker)]
        extra = {"backend": backend} if exp.needs_rollouts else {}
        trainer = _train(exp, model, tokenizer, rows, callbacks, str(out_dir / "trainer"), **extra)
        summary = RunSummary(tracker.run_id, tracker.url(), name, in_loop.reports,
                             best.directory if best.step is not None else None, best.step, best.value,
                             time.time() - started, trainer.state.global_step)
        eval_s = sum(r.metrics["eval/time/total_s"] for r in in_loop.reports)
        tracker.log_metrics({"run/wall_s": summary.wall_s, "run/eval_share": eval_s / summary.wall_s},
                            trainer.state.global_step)
    del backend, trainer
    gc.collect()
    print_summary(summary)
    return summary


def print_summary(summary: RunSummary) -> None:
    first, last = summary.reports[0], summary.reports[-1]
    print(f"\n== {summary.experiment_name}: baseline (step {first.step}) vs final (step {last.step})")
    for key, base in first.metrics.items():
        if not is_quality_metric(key) or key not in last.metrics:
            continue
        final = last.metrics[key]
        delta = final - base if not (math.isnan(base) or math.isnan(final)) else float("nan")
        print(f"  {key:<28} {base:10.3f} -> {final:10.3f}  ({delta:+.3f})")
    print(f"  MLflow run: {summary.run_id} in {tracking_uri()}")
    print(f"  MLflow UI:  {summary.run_url}" + ("" if summary.run_url.startswith(tracking_uri()) else "  (`make ui`)"))
    if summary.best_checkpoint:
        print(f"  best checkpoint: {summary.best_checkpoint} "
              f"(step {summary.best_step}, {summary.best_value:.3f})")
    print(f"  wall time: {summary.wall_s:.1f}s")
