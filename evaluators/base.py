"""What an evaluator receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from harness.data import EvalSample
    from harness.generation import GenerationBackend


@dataclass
class EvalContext:
    """One evaluation's inputs. `predictions` are generated once per step and shared by all evaluators."""

    samples: list[EvalSample]
    predictions: list[str] | None = None
    backend: GenerationBackend | None = None  # for evaluators that score with the model itself
    prompt_ids: list[list[int]] | None = None  # the rendered, tokenized prompts the backend generated from
    tokenizer: object | None = None
    model: object | None = None  # the live model being trained, for evaluators that score with it directly


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]  # short names; the harness logs them as eval/<evaluator>/<metric>
    per_sample: dict[str, list[float]] = field(default_factory=dict)  # column -> one value per sample
    table: dict[str, list] | None = None  # the evaluator's own rows when they are not the eval samples


class Evaluator(Protocol):
    name: str
    metrics: tuple[str, ...]  # the metric names `evaluate` returns, so a config can be checked before running
    needs_generation: bool  # True: reads ctx.predictions; False: scores with ctx.backend

    def evaluate(self, ctx: EvalContext) -> EvalResult: ...

# Optional on an evaluator: `needs_model = True` when it runs ctx.model itself (not possible under ZeRO-3 sharding),
# `artifacts` (file name -> text, logged once per run, e.g. the judge's templates) and
# `close()` (called when the run ends, e.g. to stop a judge server the evaluator started).
