"""Evaluation inside the training loop: baseline at step 0, every `eval_every` steps, and at the end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from evaluators import EvalContext, Evaluator, is_diagnostic
from evaluators.uncertainty import STATS_SUFFIX, error_bars, is_error_bar, unit_table
from harness.core import ranks
from harness.core.eval_data import metric_key
from harness.core.generation import GenerationBackend, GenParams
from harness.core.prompts import render_sample
from harness.core.records import EvalSample
from harness.training import console, distributed, interrupts


@dataclass(frozen=True)
class EvalReport:
    step: int
    metrics: dict[str, float]  # "eval/<evaluator>/<metric>" and "eval/time/*", "eval/generation/*"
    table: dict[str, list]  # columns of the per-sample table: prompt, reference, prediction, scores
    evaluator_tables: dict[str, dict[str, list]]  # evaluator name -> its own rows (e.g. humaneval samples)
    # with several named eval sets (EvalSuite): set name -> that set's own report, keys unprefixed, with its tables;
    # `metrics` then holds every set's keys prefixed (harness.core.eval_data.metric_key) and `table` is empty
    sets: dict[str, EvalReport] = field(default_factory=dict)


def is_quality_metric(key: str) -> bool:
    """An evaluator's score ("eval/<evaluator>/<metric>"), as opposed to the timings and token counts, to the
    error bars logged beside a score (`_se`, `_ci_low`, `_ci_high`: evaluators/uncertainty.py) and to an evaluator's
    diagnostic_metrics (a judge's request counts)."""
    return (key.startswith("eval/") and not key.startswith(("eval/time/", "eval/generation/"))
            and not is_error_bar(key) and not is_diagnostic(key))


def selection_value(report: EvalReport, metric: str) -> float | None:
    """`metric` in `report` for choosing a checkpoint or reporting to a sweep; None when that evaluation did not
    produce it (a judge that was down, win_rate at the step-0 baseline) or it is NaN. Every consumer of
    select_metric reads it through here, and skips the evaluation on None instead of failing the run."""
    value = report.metrics.get(metric)
    return None if value is None or math.isnan(value) else value


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` is strictly better than `best` (None: nothing yet) for select_mode `mode`."""
    return best is None or (value > best if mode == "max" else value < best)


class Evaluation:
    """Runs the evaluators on one fixed eval set with one generation backend."""

    def __init__(self, evaluators: list[Evaluator], samples: list[EvalSample], backend: GenerationBackend,
                 tokenizer, params: GenParams, prompt_ids: list[list[int]] | None = None, system_prompt: str = "",
                 eval_set: str = ""):
        """`prompt_ids`: the samples' prompts as checked against the model's context (and truncated when asked) by
        harness.training.runner.fit_eval_prompts; by default rendered here as they are, after the `system_prompt`
        message when one is given (see harness.core.prompts.render_prompt). `eval_set`: the set's name, under which
        evaluators shared by several sets keep each set's state apart."""
        self.evaluators = evaluators
        self.eval_set = eval_set
        self.samples = samples
        self.backend = backend
        self.tokenizer = tokenizer
        self.params = params
        self.system_prompt = system_prompt
        if prompt_ids is None:
            prompt_ids = [render_sample(tokenizer, s, system_prompt) for s in samples]
        self.prompt_ids = prompt_ids

    def run(self, model, step: int) -> EvalReport:
        return self.score(model, step, self.sync(model))

    def sync(self, model) -> float:
        """Puts the live weights into the backend; the seconds it took."""
        t0 = time.perf_counter()
        self.backend.sync_weights(model)
        return time.perf_counter() - t0

    def score(self, model, step: int, sync_s: float = 0.0) -> EvalReport:
        """The report of this eval set on weights the backend already has (`sync_s`: the time syncing them took)."""
        t1 = time.perf_counter()
        generates = any(e.needs_generation for e in self.evaluators)
        # a bar over the evaluation's parts (generation, then each evaluator), on a terminal only
        progress = console.bar(len(self.evaluators) + generates, f"eval step {step}", "part", leave=False)
        ctx = EvalContext(self.samples, backend=self.backend, prompt_ids=self.prompt_ids, tokenizer=self.tokenizer,
                          model=model, eval_set=self.eval_set)
        metrics: dict[str, float] = {}
        table: dict[str, list] = {
            "id": [s.id for s in self.samples],
            "prompt": [s.prompt for s in self.samples],
            "reference": [s.reference for s in self.samples],
        }
        if any(s.answer is not None for s in self.samples):
            table["answer"] = [s.answer for s in self.samples]
        if generates:
            progress.set_postfix_str(f"generate ({len(self.prompt_ids)} prompts)")
            completions = self.backend.generate(self.prompt_ids, self.params)
            progress.update()
            ctx.predictions = [c.texts[0] for c in completions]
            table["prediction"] = ctx.predictions
            tokens = sum(c.num_tokens for c in completions)
            metrics["eval/generation/tokens"] = tokens
        t2 = time.perf_counter()
        evaluator_tables = {}
        bars_s = 0.0
        for evaluator in self.evaluators:
            progress.set_postfix_str(evaluator.name)
            result = evaluator.evaluate(ctx)
            metrics.update({f"eval/{evaluator.name}/{k}": v for k, v in result.metrics.items()})
            table.update({f"{evaluator.name}/{k}": v for k, v in result.per_sample.items()})
            table.update({f"{evaluator.name}/{k}{STATS_SUFFIX}": v for k, v in result.corpus_stats.items()})
            if result.table is not None:
                evaluator_tables[evaluator.name] = result.table
            # error bars of every metric with per-sample values (docs/evaluators/error-bars.md)
            start = time.perf_counter()
            units = unit_table(evaluator, result.table) if evaluator.unit_column else None  # HumanEval's problems
            bars = error_bars(evaluator, units if units is not None else table)
            metrics.update({f"eval/{evaluator.name}/{k}": v for k, v in bars.items()})
            bars_s += time.perf_counter() - start
            progress.update()
        progress.close()
        t3 = time.perf_counter()
        metrics["eval/time/error_bars_s"] = bars_s  # part of score_s
        metrics["eval/time/sync_s"] = sync_s
        metrics["eval/time/generate_s"] = t2 - t1
        metrics["eval/time/score_s"] = t3 - t2
        metrics["eval/time/total_s"] = sync_s + t3 - t1
        if "eval/generation/tokens" in metrics:
            metrics["eval/generation/tokens_per_s"] = metrics["eval/generation/tokens"] / max(t2 - t1, 1e-9)
        return EvalReport(step, metrics, table, evaluator_tables)


@dataclass(frozen=True)
class EvalSet:
    """One eval set of a run: its name ("" for the one unnamed set, whose metrics keep the unprefixed keys), its
    samples and their prompts as checked against the model's context (harness.training.runner.fit_eval_prompts)."""

    name: str
    samples: list[EvalSample]
    prompt_ids: list[list[int]]


class EvalSuite:
    """Every eval set of a run, evaluated at each eval step on one weight sync: one unnamed set reports as its
    Evaluation does; named sets report every key under their prefix (eval/<set>/<evaluator>/<metric>, see
    harness.core.eval_data.metric_key), each set's own report in `EvalReport.sets`, and the totals eval/time/*_s
    and eval/generation/tokens over all sets."""

    def __init__(self, evaluations: dict[str, Evaluation]):
        self.evaluations = evaluations

    def run(self, model, step: int) -> EvalReport:
        return self.score(model, step, self.sync(model))

    def sync(self, model) -> float:
        return next(iter(self.evaluations.values())).sync(model)  # the sets share one backend

    def score(self, model, step: int, sync_s: float = 0.0) -> EvalReport:
        """Every set's report on weights the backend already has; `model` is passed to evaluators that need it."""
        if list(self.evaluations) == [""]:
            return self.evaluations[""].score(model, step, sync_s)
        t0 = time.perf_counter() - sync_s
        reports = {name: evaluation.score(model, step) for name, evaluation in self.evaluations.items()}
        metrics = {metric_key(k, name): v for name, report in reports.items() for k, v in report.metrics.items()}
        for key in ("generate_s", "score_s", "error_bars_s"):
            metrics[f"eval/time/{key}"] = sum(r.metrics[f"eval/time/{key}"] for r in reports.values())
        metrics["eval/time/sync_s"] = sync_s
        metrics["eval/time/total_s"] = time.perf_counter() - t0
        counted = "eval/generation/tokens"
        tokens = [r.metrics[counted] for r in reports.values() if counted in r.metrics]
        if tokens:
            metrics[counted] = sum(tokens)
            metrics["eval/generation/tokens_per_s"] = sum(tokens) / max(metrics["eval/time/generate_s"], 1e-9)
        return EvalReport(step, metrics, {}, {}, reports)


class WeightsAt:
    """The model as it was when an evaluation running in the background synced it, for the listeners that act on the
    report later (the best checkpoint saves these weights, not the ones training has moved on to): a copy of what
    `save_pretrained` writes, the adapter's tensors for a PEFT model, every tensor otherwise."""

    def __init__(self, model):
        from peft import PeftModel

        self.model = model
        adapter_only = isinstance(model, PeftModel)
        copies: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor, which save_pretrained writes once
        self.state = {}
        for key, value in model.state_dict().items():
            if not adapter_only or "lora_" in key or "modules_to_save" in key:
                if value.data_ptr() not in copies:
                    copies[value.data_ptr()] = value.detach().clone()
                self.state[key] = copies[value.data_ptr()]

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory, state_dict=self.state)


class InLoopEvaluation(TrainerCallback):
    """Calls `evaluation` on the live model and hands each report to the listeners (MLflow, checkpoints, ...).

    In a multi-process run, rank 0 holds the evaluation and the other ranks hold None: they take part in gathering
    ZeRO-3 weights and wait at a barrier until rank 0 has evaluated, so every rank decides on the same steps.

    `background` (eval_mode=background, one process only): at an eval step the weights are synced (blocking), then
    generation and scoring run in a worker thread while training goes on; the report is logged at its own step and
    handed to the listeners at the first step end after it is ready, with the weights as they were (WeightsAt). One
    evaluation is in flight at a time: the next eval step, a checkpoint save and the end of training wait for it, and
    the time training waited is logged as eval/time/waited_s (and with the sync and the copy of the weights as
    eval/time/blocking_s, the evaluation's cost on training's path). The final evaluation blocks."""

    def __init__(self, evaluation: Evaluation | EvalSuite | None, every: int,
                 listeners: list[Callable[[EvalReport, object], None]], background: bool = False):
        self.evaluation = evaluation
        self.every = every
        self.listeners = listeners
        self.reports: list[EvalReport] = []
        self.last_step: int | None = None
        self.done: set[int] = set()  # steps a resumed run evaluated before: not evaluated (or logged) again
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="eval") if background else None
        self.pending: tuple[Future, WeightsAt, float] | None = None  # with the seconds its start held training

    def _deliver(self, report: EvalReport, model) -> None:
        self.reports.append(report)
        for listener in self.listeners:
            listener(report, model)

    def _collect(self, wait: bool) -> None:
        """Hands a background evaluation's report on once it is ready (now, waiting for it, when `wait`)."""
        if self.pending is None or not (wait or self.pending[0].done()):
            return
        future, weights, started_s = self.pending
        self.pending = None
        start = time.perf_counter()
        report = future.result()  # an evaluator's exception ends the run here, as in a blocking evaluation
        report.metrics["eval/time/waited_s"] = time.perf_counter() - start
        report.metrics["eval/time/blocking_s"] = started_s + report.metrics["eval/time/waited_s"]
        self._deliver(report, weights)

    def _evaluate(self, model, step: int, final: bool = False) -> None:
        if step in self.done:
            self.last_step = step
            return
        # a signal during the step: stop before a new evaluation (one during an evaluation stops the run at the next
        # step's start, once the trainer has logged this step too)
        interrupts.check()
        self._collect(wait=True)
        start = time.perf_counter()
        with distributed.full_parameters(model):
            if self.evaluation is not None and self.worker is not None and not final:
                sync_s = self.evaluation.sync(model)
                weights = WeightsAt(model)
                # evaluators that read the model itself are refused in this mode (settings): None keeps them off it
                self.pending = (self.worker.submit(self.evaluation.score, None, step, sync_s), weights,
                                time.perf_counter() - start)
            elif self.evaluation is not None:
                gathered_s = time.perf_counter() - start
                report = self.evaluation.run(model, step)
                if ranks.world_size() > 1:  # ZeRO-3 gathers the shards first; other setups take ~0 here
                    report.metrics["eval/time/gather_s"] = gathered_s
                self._deliver(report, model)
        distributed.barrier()
        self.last_step = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # a checkpoint saved at this step must hold every report up to it (harness.training.resume)
        self._collect(wait=control.should_save)
        if state.global_step % self.every == 0:
            self._evaluate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._collect(wait=True)
        if self.last_step != state.global_step:
            self._evaluate(model, state.global_step, final=True)
        if self.worker is not None:
            self.worker.shutdown()


def format_report(report: EvalReport) -> str:
    """One line: every score, `±` its standard error where it has one (`bleu/bleu4=54.41±3.10`), the evaluators'
    diagnostics (`judge/requests=12`), and the timings."""
    m = report.metrics

    def score(key: str, value: float) -> str:
        se = m.get(f"{key}_se")
        return f"{key.removeprefix('eval/')}={value:.2f}" + (f"±{se:.2f}" if se is not None and math.isfinite(se)
                                                             else "")

    scores = [score(k, v) for k, v in m.items() if is_quality_metric(k) and not math.isnan(v)]
    diagnostics = " ".join(f"{k.removeprefix('eval/')}={v:g}" for k, v in m.items() if is_diagnostic(k))
    speed = f", {m['eval/generation/tokens_per_s']:.0f} tok/s" if "eval/generation/tokens_per_s" in m else ""
    return (f"[eval] step {report.step}: {' '.join(scores)} | {diagnostics + ' | ' if diagnostics else ''}"
            f"{m['eval/time/total_s']:.2f}s "
            f"(sync {m['eval/time/sync_s']:.2f}, generate {m['eval/time/generate_s']:.2f}, "
            f"score {m['eval/time/score_s']:.2f}{speed})")
