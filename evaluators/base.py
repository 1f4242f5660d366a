"""What an evaluator receives and returns."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from harness.core.generation import GenerationBackend
    from harness.core.records import EvalSample


@dataclass
class EvalContext:
    """One evaluation's inputs. `predictions` are generated once per step and shared by all evaluators."""

    samples: list[EvalSample]
    predictions: list[str] | None = None
    backend: GenerationBackend | None = None  # for evaluators that score with the model itself
    prompt_ids: list[list[int]] | None = None  # the rendered, tokenized prompts the backend generated from
    tokenizer: object | None = None
    model: object | None = None  # the live model being trained, for evaluators that score with it directly
    eval_set: str = ""  # the eval set's name ("" for the one unnamed set): the key of per-set evaluator state


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]  # short names; the harness logs them as eval/<evaluator>/<metric>
    per_sample: dict[str, list[float]] = field(default_factory=dict)  # column -> one value per sample
    table: dict[str, list] | None = None  # the evaluator's own rows when they are not the eval samples
    # corpus metric -> one row of sufficient statistics per sample (Evaluator.corpus_metrics): what a bootstrap
    # resamples; the eval table keeps them as column <evaluator>/<metric>_stats
    corpus_stats: dict[str, list[list[float]]] = field(default_factory=dict)


class Evaluator:
    """The base of every evaluator. A subclass sets `name` and `metrics` and implements `evaluate`; the rest has
    defaults that fit a metric over generated text, and a subclass overrides only what differs."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the metric names `evaluate` returns, so a config is checked before running
    needs_generation: ClassVar[bool] = True  # True: reads ctx.predictions; False: generates or scores by itself
    needs_model: ClassVar[bool] = False  # True: runs ctx.model itself (impossible under ZeRO-3 sharding)
    # True: scores each eval reference after its prompt (prompt + reference must fit the model's context)
    scores_references: ClassVar[bool] = False
    # eval record fields read besides prompt and reference (answer: `answer`): every record must have them, checked
    # with the data before the run opens
    needs_fields: ClassVar[tuple[str, ...]] = ()
    # Error bars and paired tests (evaluators/uncertainty.py). mean_metrics: metrics that are the mean of the
    # per_sample column of the same name (over its finite values). corpus_metrics: metrics computed from the
    # per-sample sufficient statistics in EvalResult.corpus_stats, summed over samples, by `corpus_score`.
    mean_metrics: ClassVar[tuple[str, ...]] = ()
    corpus_metrics: ClassVar[tuple[str, ...]] = ()
    # An evaluator whose units are not the eval samples (HumanEval's problems, reward_accuracy's pairs) names the
    # column of its own rows (EvalResult.table) that says each row's unit; its mean_metrics are then means over units
    # of the rows' column of the metric's name (uncertainty.unit_table).
    unit_column: ClassVar[str] = ""
    # metrics about how the evaluation went (requests sent, failures, cache hits, outcome counts), not about the
    # model: logged like the others, but never a select_metric, a row of the end-of-run summary, or a divergence
    diagnostic_metrics: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def resolved_options(cls, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The constructor's keyword options: its defaults, overridden by `options`."""
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        return {**defaults, **(options or {})}

    @classmethod
    def metric_names(cls, options: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The metrics `evaluate` returns when built with `options` (constructor keywords; the rest default): what a
        select_metric may name, checked before a run opens without building the evaluator. Default: `metrics`."""
        return cls.metrics

    @classmethod
    def option_rules(cls, options: dict[str, Any] | None = None) -> list[tuple[bool, str, str]]:
        """(holds, option, why not) for option values that make no sense alone or together (HumanEval: every k <=
        n); harness.training.settings.check_settings checks them with every other rule before any work."""
        return []

    # what to change when one of own_prompts does not fit the model's context (named in the error before the run)
    own_prompts_remedy: ClassVar[str] = ""

    @classmethod
    def own_prompts(cls, options: dict[str, Any] | None, tokenizer) -> list[tuple[str, int, int]]:
        """(id, prompt tokens, most new tokens) of each prompt an evaluator that generates by itself (HumanEval's
        problems) sends to the backend when built with `options`: checked against the model's context before the run
        opens, and the vLLM engine's context is sized for them. Default: none."""
        return []

    @classmethod
    def corpus_score(cls, metric: str, totals: np.ndarray) -> np.ndarray:
        """The corpus metric `metric` from its sufficient statistics summed over samples, for each row of `totals`
        (one row per bootstrap resample): what a bootstrap recomputes. Needed for every name in corpus_metrics."""
        raise NotImplementedError(f"{cls.__name__} declares no corpus metric {metric!r}")

    @property
    def artifacts(self) -> dict[str, str]:
        """Files logged once per run (file name -> text), e.g. the judge's prompt templates."""
        return {}

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        """What this evaluator carries from one evaluation to the next, kept per eval set (ctx.eval_set) and as
        JSON: saved into every checkpoint and given back to load_state_dict on resume (harness.training.resume).
        None (the default): it carries nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes back what state_dict returned when the checkpoint a run resumes from was saved."""

    def close(self) -> None:
        """Release what the evaluator started (e.g. a judge server); called once when the run ends."""
