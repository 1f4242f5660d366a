"""Error bars for in-loop scores, and the paired test that says whether a change between two evaluations is real.

A score here is either a mean over samples (ROUGE, char BLEU-4, answer accuracy: one value per eval sample) or a
corpus metric computed from per-sample sufficient statistics summed over the samples (sacreBLEU corpus BLEU:
n-gram matches and lengths; corpus perplexity: NLL and token counts). Both are handled the same way: a
`Statistic` is the per-sample statistics (one row per sample) plus the function that turns their column sums into
the score (for a mean: the sum over n). Resampling samples and recomputing the score on each resample is then
sacreBLEU's bootstrap (`sacrebleu/significance.py`), which we follow step for step:

- indices: `numpy.random.default_rng(seed).choice(n, size=(n_resamples, n), replace=True)`, seed 12345 and 1000
  resamples by default (sacreBLEU's `SACREBLEU_SEED` default and its `bs` default), the same indices for every
  metric and both sides of a paired test;
- 95% interval: the sorted resampled scores at positions `n_resamples // 40` and `n_resamples - n_resamples // 40
  - 1` (the 26th and 975th of 1000), as sacreBLEU's `estimate_ci` (which reports their half-width around the
  bootstrap mean; we report the two ends);
- paired p-value: with `d` the observed difference (new - base) and `d_i` the difference on resample i,
  `p = (#{i : |d_i| - mean_j |d_j| > |d|} + 1) / (n_resamples + 1)`, sacreBLEU's `_paired_bs_test`. One departure:
  when every resampled difference is exactly 0 (the two sides agree on every sample) p is 1, where sacreBLEU's
  formula gives 1 / (n_resamples + 1) and would call two identical systems different.

A per-sample mean also gets its standard error, stdev / sqrt(n) (n - 1 in the stdev); a corpus metric gets the
standard deviation of its bootstrap scores instead (the bootstrap estimate of its standard error).
Values that are not finite (a judge answer that did not parse, None in a logged table) are left out of a mean; a
paired test of means keeps the samples with a value on both sides.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

N_RESAMPLES = 1000  # sacreBLEU's default for its paired bootstrap
SEED = 12345  # sacreBLEU's default seed (SACREBLEU_SEED)
ALPHA = 0.05  # a paired difference with p < ALPHA is called significant
SUFFIXES = ("_se", "_ci_low", "_ci_high")  # eval/<evaluator>/<metric><suffix>: the error bars of a logged metric
STATS_SUFFIX = "_stats"  # per-sample table column <evaluator>/<metric>_stats: a corpus metric's sufficient statistics


def is_error_bar(key: str) -> bool:
    """An error-bar key (`eval/bleu/bleu4_se`), logged beside its metric but neither a score nor selectable."""
    return key.endswith(SUFFIXES)


@dataclass(frozen=True)
class Statistic:
    """A score over samples: `stats` has one row of statistics per sample; `score` maps their column sums (one row
    per resample, shape (resamples, k)) to the score of each resample."""

    stats: np.ndarray
    score: Callable[[np.ndarray], np.ndarray]

    @property
    def n(self) -> int:
        return len(self.stats)

    def value(self) -> float:
        return float(self.score(self.stats.sum(axis=0, keepdims=True))[0])

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """The score on each resample; `counts[i, j]` is how often sample j is drawn in resample i."""
        return self.score(counts @ self.stats)


def mean_statistic(values: Sequence[float]) -> Statistic:
    """The mean of `values` (already finite) as a Statistic."""
    n = len(values)
    return Statistic(np.asarray(values, dtype=np.float64).reshape(n, 1), lambda totals: totals[:, 0] / n)


def finite(values: Sequence[Any]) -> list[float]:
    """The finite numbers among `values` (None, NaN, inf and non-numbers dropped)."""
    return [float(v) for v in values if _is_finite(v)]


def _is_finite(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean: sample standard deviation (n - 1) over sqrt(n); NaN for fewer than 2."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else float("nan")


@lru_cache(maxsize=8)
def _counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each of n samples is drawn in each resample, for sacreBLEU's resample indices."""
    idx = np.random.default_rng(seed).choice(n, size=(n_resamples, n), replace=True)
    flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)
    counts.flags.writeable = False
    return counts


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The bootstrap resamples of n samples, one row of n indices each, drawn as sacreBLEU draws them."""
    return np.random.default_rng(seed).choice(n, size=(n_resamples, n), replace=True)


def percentile_interval(scores: np.ndarray) -> tuple[float, float]:
    """The 95% interval of resampled scores: the order statistics sacreBLEU's `estimate_ci` takes."""
    ordered = np.sort(scores)
    low = len(ordered) // 40
    return float(ordered[low]), float(ordered[len(ordered) - low - 1])


@dataclass(frozen=True)
class Interval:
    value: float  # the score on all samples
    se: float  # standard error (a mean) or the bootstrap scores' standard deviation (a corpus metric)
    low: float  # 95% bootstrap interval
    high: float


def bootstrap_interval(stat: Statistic, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       is_mean: bool = False) -> Interval:
    """The score with its standard error and bootstrap 95% interval; `is_mean`: the standard error is the analytic
    one of a mean (stdev / sqrt(n)), else the standard deviation of the bootstrap scores."""
    scores = stat.resampled(_counts(stat.n, n_resamples, seed))
    low, high = percentile_interval(scores)
    se = standard_error(stat.stats[:, 0].tolist()) if is_mean else float(np.std(scores, ddof=1))
    return Interval(stat.value(), se, low, high)


@dataclass(frozen=True)
class Paired:
    """new - base on the same samples: the difference, its 95% bootstrap interval and the paired p-value."""

    base: float
    new: float
    delta: float
    low: float
    high: float
    p_value: float
    n: int  # samples compared

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def describe(self, digits: int = 3) -> str:
        """`+18.750, 95% CI [+9.375, +28.125], p=0.001, significant`"""
        verdict = "significant" if self.significant else "not significant"
        return (f"{self.delta:+.{digits}f}, 95% CI [{self.low:+.{digits}f}, {self.high:+.{digits}f}], "
                f"p={self.p_value:.3f}, {verdict}")


def paired_bootstrap(base: Statistic, new: Statistic, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Paired:
    """sacreBLEU's paired bootstrap of two systems on the same samples (rows of `base` and `new` aligned): the same
    resamples for both, the interval of the resampled differences, and sacreBLEU's p-value (module docstring)."""
    if base.n != new.n:
        raise ValueError(f"a paired test needs the same samples on both sides ({base.n} vs {new.n})")
    counts = _counts(base.n, n_resamples, seed)
    diffs = new.resampled(counts) - base.resampled(counts)
    b, v = base.value(), new.value()
    low, high = percentile_interval(diffs)
    if not np.any(diffs):
        p = 1.0
    else:
        sample_diffs = np.abs(diffs)
        p = (int(np.sum(sample_diffs - sample_diffs.mean() > abs(v - b))) + 1) / (n_resamples + 1)
    return Paired(b, v, v - b, low, high, p, base.n)


# ---- scores of an evaluation's per-sample table ----
# In-loop, the eval table (harness.training.inloop.Evaluation.run, logged as eval_samples/step_NNNNNN.json) has a
# column <evaluator>/<metric> for every metric an evaluator computes as a mean over samples (its `mean_metrics`),
# and <evaluator>/<metric>_stats for every corpus metric (its `corpus_metrics`, recomputed by its `corpus_score`).

def _column(table: Mapping[str, Sequence], key: str) -> list | None:
    column = table.get(key)
    return list(column) if column is not None else None


def _corpus(evaluator, metric: str, rows: Sequence) -> Statistic | None:
    try:
        stats = np.asarray([[float(x) for x in row] for row in rows], dtype=np.float64)
    except (TypeError, ValueError):  # a row that is not a list of numbers: not a table this code wrote
        return None
    if stats.ndim != 2 or not len(stats) or not np.all(np.isfinite(stats)):
        return None
    return Statistic(stats, lambda totals: np.asarray(evaluator.corpus_score(metric, totals), dtype=np.float64))


def table_statistics(evaluator, table: Mapping[str, Sequence]) -> dict[str, tuple[Statistic, bool]]:
    """metric -> (its Statistic, whether it is a mean) for the metrics of `evaluator` (a class or an instance) that
    `table` holds the per-sample values of."""
    found: dict[str, tuple[Statistic, bool]] = {}
    for metric in evaluator.mean_metrics:
        values = _column(table, f"{evaluator.name}/{metric}")
        if values is not None and (kept := finite(values)):
            found[metric] = (mean_statistic(kept), True)
    for metric in evaluator.corpus_metrics:
        rows = _column(table, f"{evaluator.name}/{metric}{STATS_SUFFIX}")
        if rows is not None and (stat := _corpus(evaluator, metric, rows)) is not None:
            found[metric] = (stat, False)
    return found


def error_bars(evaluator, table: Mapping[str, Sequence], n_resamples: int = N_RESAMPLES,
               seed: int = SEED) -> dict[str, float]:
    """`<metric>_se`, `<metric>_ci_low`, `<metric>_ci_high` for each metric of `evaluator` with per-sample values
    in `table`; none for a metric with fewer than 2 samples (no spread to measure)."""
    bars = {}
    for metric, (stat, is_mean) in table_statistics(evaluator, table).items():
        if stat.n < 2:
            continue
        interval = bootstrap_interval(stat, n_resamples, seed, is_mean=is_mean)
        bars.update({f"{metric}_se": interval.se, f"{metric}_ci_low": interval.low,
                     f"{metric}_ci_high": interval.high})
    return bars


def aligned_rows(base: Mapping[str, Sequence], new: Mapping[str, Sequence]) -> tuple[list[int], list[int]] | None:
    """Row positions pairing the samples of two per-sample tables by id (and, when both have them, checking the
    prompts agree); None when the tables do not hold the same samples."""
    base_ids, new_ids = _column(base, "id"), _column(new, "id")
    if base_ids is None or new_ids is None or len(base_ids) != len(new_ids):
        return None
    base_ids, new_ids = [str(i) for i in base_ids], [str(i) for i in new_ids]
    if base_ids == new_ids:
        rows = list(range(len(base_ids)))
        new_rows = rows
    elif len(set(base_ids)) == len(base_ids) and set(base_ids) == set(new_ids) and len(set(new_ids)) == len(new_ids):
        position = {sample: j for j, sample in enumerate(new_ids)}
        rows = list(range(len(base_ids)))
        new_rows = [position[sample] for sample in base_ids]
    else:
        return None
    base_prompts, new_prompts = _column(base, "prompt"), _column(new, "prompt")
    if base_prompts is not None and new_prompts is not None and any(
            base_prompts[i] != new_prompts[j] for i, j in zip(rows, new_rows, strict=True)):
        return None
    return rows, new_rows


def paired_tests(evaluators: Mapping[str, Any], base: Mapping[str, Sequence], new: Mapping[str, Sequence],
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Paired]:
    """"eval/<evaluator>/<metric>" -> the paired bootstrap of new - base, for every metric of `evaluators` (name ->
    class) whose per-sample values both tables hold, on the samples they share (paired by id); {} when the tables
    hold different samples."""
    rows = aligned_rows(base, new)
    if rows is None:
        return {}
    base_rows, new_rows = rows
    tests = {}
    for name, evaluator in evaluators.items():
        for metric in evaluator.mean_metrics:
            a, b = _column(base, f"{name}/{metric}"), _column(new, f"{name}/{metric}")
            if a is None or b is None:
                continue
            pairs = [(a[i], b[j]) for i, j in zip(base_rows, new_rows, strict=True)
                     if _is_finite(a[i]) and _is_finite(b[j])]
            if len(pairs) >= 2:
                tests[f"eval/{name}/{metric}"] = paired_bootstrap(
                    mean_statistic([float(x) for x, _ in pairs]), mean_statistic([float(y) for _, y in pairs]),
                    n_resamples, seed)
        for metric in evaluator.corpus_metrics:
            a, b = (_column(base, f"{name}/{metric}{STATS_SUFFIX}"), _column(new, f"{name}/{metric}{STATS_SUFFIX}"))
            if a is None or b is None:
                continue
            sa = _corpus(evaluator, metric, [a[i] for i in base_rows])
            sb = _corpus(evaluator, metric, [b[j] for j in new_rows])
            if sa is not None and sb is not None and sa.n >= 2:
                tests[f"eval/{name}/{metric}"] = paired_bootstrap(sa, sb, n_resamples, seed)
    return tests
