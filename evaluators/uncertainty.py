"""Error bars for in-loop scores, and the paired test that says whether a change between two evaluations is real.

A score here is either a mean over samples (ROUGE, char BLEU-4, answer accuracy: one value per eval sample) or a
corpus metric computed from per-sample sufficient statistics summed over the samples (sacreBLEU corpus BLEU:
n-gram matches and lengths; corpus perplexity: NLL and token counts). Both are handled the same way: a
`Statistic` is the per-sample statistics (one row per sample) plus the function that turns their column sums into
the score (for a mean: the sum over n).

One score's error bars follow sacreBLEU's bootstrap (`sacrebleu/significance.py`) step for step: indices
`numpy.random.default_rng(seed).choice(n, size=(n_resamples, n), replace=True)`, seed 12345 and 1000 resamples
(sacreBLEU's defaults); the 95% interval is the sorted resampled scores at positions `n_resamples // 40` and
`n_resamples - n_resamples // 40 - 1`. A mean also gets its standard error, stdev / sqrt(n) (n - 1 in the stdev); a
corpus metric the standard deviation of its bootstrap scores.

A change between two evaluations of the same samples is tested by paired approximate randomization, sacreBLEU's `ar`
test: under "the two systems are equally good" each sample's two statistics rows are exchangeable, so each of
10,000 trials swaps every sample's rows with probability 1/2 (`default_rng(seed).integers(2, size=(trials, n),
dtype=bool)`, sacreBLEU's draw) and recomputes the difference; p = (#{trials with |difference| >= |observed|} + 1) /
(trials + 1). That p-value is valid whatever the metric (a mean, BLEU, a ratio such as corpus perplexity): tests in
tests/test_uncertainty.py measure its false-positive rate by simulation. sacreBLEU's own paired bootstrap p-value
(`|d_i| - mean|d_i| > |d|`) is NOT used: folding the resampled differences before centring them shrinks the null
distribution, and equal systems were called different 13% of the time at alpha 0.05. One departure from sacreBLEU's
`ar`: a trial counts when its difference is >= the observed one (sacreBLEU counts only >): with 0/100 scores many
trials tie with the observed difference, and counting ties is what keeps the rejection rate at or under alpha (two
identical systems get p = 1, where sacreBLEU's rule gives 1 / (trials + 1)).

The interval of a paired difference is the difference plus or minus the test's critical value: the smallest
|difference| the randomization test calls significant at alpha. So the 95% interval excludes 0 exactly when p < 0.05:
the interval and the verdict cannot disagree. (It is the interval obtained by inverting the test under a shift of
the difference; it is conservative when there is a real difference, because the swapped trials then spread wider.)
Several metrics tested at once are one family: `holm` adjusts their p-values (Holm's step-down method), and the
verdict uses the adjusted p-value; the raw p-value is shown beside it.

Values that are not finite (a judge answer that did not parse, None in a logged table) are left out of a mean; a
paired test of means keeps the samples with a value on both sides.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

N_RESAMPLES = 1000  # sacreBLEU's default for its bootstrap
N_TRIALS = 10_000  # sacreBLEU's default for its approximate randomization test
SEED = 12345  # sacreBLEU's default seed (SACREBLEU_SEED)
ALPHA = 0.05  # a paired difference with (Holm-adjusted) p < ALPHA is called significant
_TIES = 1e-9  # relative: a trial's |difference| this close to the observed one is a tie (the same value, rounded)
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
    """new - base on the same samples: the difference, its 95% interval, the randomization test's p-value and, once
    `holm` has adjusted it within a family of tests, the adjusted p-value and the family's size."""

    base: float
    new: float
    delta: float
    low: float
    high: float
    p_value: float
    n: int  # samples compared
    p_adjusted: float | None = None
    family: int = 1
    open_interval: bool = False  # its ends excluded: shown as (low, high) when an end is 0 and the change significant

    @property
    def significant(self) -> bool:
        return (self.p_value if self.p_adjusted is None else self.p_adjusted) < ALPHA

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95% interval leaves out 0: exactly when the raw p-value is under 0.05."""
        return (self.low >= 0 or self.high <= 0) if self.open_interval else (self.low > 0 or self.high < 0)

    def describe(self, digits: int = 3, family: str = "metrics") -> str:
        """`+18.750, 95% CI [+9.375, +28.125], p=0.001 (Holm p=0.004 over 4 metrics), significant`; `family` names
        what the tests adjusted together are (a sweep's report: tests)."""
        verdict = "significant" if self.significant else "not significant"
        holm = "" if self.p_adjusted is None else f" (Holm p{format_p(self.p_adjusted)} over {self.family} {family})"
        left, right = "()" if self.open_interval else "[]"
        return (f"{self.delta:+.{digits}f}, 95% CI {left}{self.low:+.{digits}f}, {self.high:+.{digits}f}{right}, "
                f"p{format_p(self.p_value)}{holm}, {verdict}")


def format_p(p: float) -> str:
    """`=0.047`, or `<0.001` where three decimals would show a p-value of 0 (10,000 trials resolve 1e-4)."""
    return "<0.001" if p < 0.001 else f"={p:.3f}"


@lru_cache(maxsize=8)
def _swaps(n: int, n_trials: int, seed: int) -> np.ndarray:
    """Which samples keep their own side in each randomization trial: sacreBLEU's `ar` draw."""
    keep = np.random.default_rng(seed).integers(2, size=(n_trials, n), dtype=bool)
    keep.flags.writeable = False
    return keep


def randomized_differences(base: Statistic, new: Statistic, n_trials: int = N_TRIALS,
                           seed: int = SEED) -> np.ndarray:
    """new - base on each randomization trial, where each sample's two rows of statistics are swapped or kept."""
    keep = _swaps(base.n, n_trials, seed)
    diffs = np.empty(n_trials)
    for start in range(0, n_trials, 1000):  # chunks keep the (trials x samples) matrix small for large eval sets
        k = keep[start:start + 1000].astype(np.float64)
        base_side = k @ base.stats + (1 - k) @ new.stats
        new_side = (1 - k) @ base.stats + k @ new.stats
        diffs[start:start + 1000] = new.score(new_side) - base.score(base_side)
    return diffs


def _sizes(differences: np.ndarray) -> np.ndarray:
    """|difference| of each trial, sorted, with values equal up to rounding (within _TIES) made exactly equal: the
    same difference reached by two summation orders is one value, for the p-value and the margin alike."""
    size = np.sort(np.abs(differences))
    if len(size) < 2:
        return size
    starts = np.concatenate([[True], np.diff(size) > _TIES * np.maximum(size[1:], 1e-300)])
    return size[np.flatnonzero(starts)[np.cumsum(starts) - 1]]


def _mid_p(sizes: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The mid-p value of each |difference| in `observed` among the trials' sorted, snapped `sizes`."""
    tie = observed * _TIES
    above = len(sizes) - np.searchsorted(sizes, observed + tie, side="right")
    ties = len(sizes) - above - np.searchsorted(sizes, observed - tie, side="left")
    return (above + (ties + 1) / 2) / (len(sizes) + 1)


def randomization_p_value(differences: np.ndarray, observed: float) -> float:
    """The two-sided mid-p value of `observed` among the trials' differences: (#{|trial| > |observed|} + (#{|trial|
    = |observed|} + 1) / 2) / (trials + 1), the observed assignment counted as one more trial; 1 for no difference.
    Counting ties by half (the mid-p of the McNemar test) keeps 0/100 scores, whose trials tie often, near alpha:
    counting them whole rejected equal systems 2.9% of the time at alpha 0.05, half 3.6-4.9% (simulated)."""
    return 1.0 if observed == 0 else float(_mid_p(_sizes(differences), np.array([abs(observed)]))[0])


def critical_difference(differences: np.ndarray, alpha: float = ALPHA) -> tuple[float, bool]:
    """The margin m and whether it is open: `randomization_p_value` calls a difference significant exactly when its
    size is above m (open: at or above m), so the interval observed +- m, with its ends excluded when open, excludes
    0 exactly when p < alpha. The p-value falls as |difference| grows and is lower at a value some trial reached than
    just under it: where it first drops under alpha at such a value, that value is significant and the interval open."""
    sizes = _sizes(differences)
    atoms = np.unique(sizes[sizes > 0])
    if not len(atoms):
        return 0.0, False
    trials = len(sizes) + 1
    beyond = len(sizes) - np.searchsorted(sizes, atoms, side="right")
    at_atom = _mid_p(sizes, atoms)
    kept = np.flatnonzero(at_atom >= alpha)
    if not len(kept):  # even the smallest difference a trial reached is significant
        return float(atoms[0]), True
    k = kept[-1]
    if (beyond[k] + 0.5) / trials < alpha or k + 1 == len(atoms):  # p between this atom and the next
        return float(atoms[k]), False
    return float(atoms[k + 1]), True


def paired_randomization(base: Statistic, new: Statistic, n_trials: int = N_TRIALS, seed: int = SEED) -> Paired:
    """The paired approximate randomization test of two systems on the same samples (rows of `base` and `new`
    aligned), with the interval that agrees with it (module docstring)."""
    if base.n != new.n:
        raise ValueError(f"a paired test needs the same samples on both sides ({base.n} vs {new.n})")
    b, v = base.value(), new.value()
    diffs = randomized_differences(base, new, n_trials, seed)
    margin, is_open = critical_difference(diffs)
    touches_zero = abs(abs(v - b) - margin) <= _TIES * margin  # only then do the excluded ends change the reading
    return Paired(b, v, v - b, v - b - margin, v - b + margin, randomization_p_value(diffs, v - b), base.n,
                  open_interval=is_open and touches_zero)


def method_line(samples: int | None = None) -> str:
    """How a block of paired tests was computed and what its verdict means, for the summary and `harness compare`."""
    over = f" over the {samples} eval samples" if samples else " over the same eval samples"
    return (f"paired approximate randomization{over}, {N_TRIALS} trials, seed {SEED}; the interval excludes 0 "
            f"exactly when p < {ALPHA}; significant: Holm-adjusted p < {ALPHA} over the metrics tested together")


def holm(tests: Mapping[Any, Paired]) -> dict[Any, Paired]:
    """The tests with Holm-adjusted p-values over the family they form (step-down: the i-th smallest p times the
    number of hypotheses not yet rejected, kept monotone, capped at 1)."""
    order = sorted(tests, key=lambda key: tests[key].p_value)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * tests[key].p_value))
        adjusted[key] = replace(tests[key], p_adjusted=running, family=len(order))
    return {key: adjusted[key] for key in tests}


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


def unit_table(evaluator, own: Mapping[str, Sequence] | None) -> dict[str, list] | None:
    """An evaluator's own rows (EvalResult.table) as a per-sample table of its units (HumanEval's problems,
    reward_accuracy's pairs): `id` = the unit (its `unit_column`), and `<evaluator>/<metric>` = the mean over the
    unit's rows of the rows' `<metric>` column, for each of its mean_metrics (HumanEval's pass@1 of a problem with n
    samples is its share of passing samples); and `<evaluator>/<metric>_stats` = the sum of the rows' `<metric>_stats`
    for each of its corpus_metrics (the choice evaluator's bits per byte). The unit is what a bootstrap or a paired
    test resamples: n samples of one problem are not n independent problems. None when `own` lacks the columns."""
    units = _column(own or {}, evaluator.unit_column) if evaluator.unit_column else None
    if units is None:
        return None
    table: dict[str, list] = {"id": list(dict.fromkeys(str(u) for u in units))}
    position = {unit: i for i, unit in enumerate(table["id"])}
    for metric in evaluator.mean_metrics:
        values = _column(own, metric)
        if values is None:
            continue
        sums, counts = np.zeros(len(position)), np.zeros(len(position))
        for unit, value in zip(units, values, strict=True):
            if _is_finite(value):
                sums[position[str(unit)]] += float(value)
                counts[position[str(unit)]] += 1
        with np.errstate(invalid="ignore"):
            table[f"{evaluator.name}/{metric}"] = (sums / counts).tolist()  # NaN for a unit with no value: left out
    for metric in evaluator.corpus_metrics:  # sufficient statistics add up: a unit's are the sum of its rows'
        rows = _column(own, f"{metric}{STATS_SUFFIX}")
        if rows is None:
            continue
        totals: dict[str, np.ndarray] = {}
        for unit, row in zip(units, rows, strict=True):
            totals[str(unit)] = totals.get(str(unit), 0) + np.asarray(row, dtype=np.float64)
        table[f"{evaluator.name}/{metric}{STATS_SUFFIX}"] = [totals[unit].tolist() for unit in table["id"]]
    return table


def paired_tests(evaluators: Mapping[str, Any], base: Mapping[str, Sequence], new: Mapping[str, Sequence],
                 base_own: Mapping[str, Mapping] | None = None, new_own: Mapping[str, Mapping] | None = None,
                 n_trials: int = N_TRIALS, seed: int = SEED) -> dict[str, Paired]:
    """"eval/<evaluator>/<metric>" -> the paired randomization test of new - base, for every metric of `evaluators`
    (name -> class) whose per-sample values both tables hold, on the samples they share (paired by id); for an
    evaluator with its own units, on its unit tables built from `base_own` / `new_own` (evaluator name -> its own
    rows). A pair of tables that hold different samples (or units) gives no tests."""
    tests = {}
    for name, evaluator in evaluators.items():
        if evaluator.unit_column:
            tables = tuple(unit_table(evaluator, (own or {}).get(name)) for own in (base_own, new_own))
        else:
            tables = (base, new)
        if tables[0] is not None and tables[1] is not None:
            tests.update(_paired_tests_of(name, evaluator, *tables, n_trials, seed))
    return tests


def _paired_tests_of(name: str, evaluator, base: Mapping[str, Sequence], new: Mapping[str, Sequence],
                     n_trials: int, seed: int) -> dict[str, Paired]:
    rows = aligned_rows(base, new)
    if rows is None:
        return {}
    base_rows, new_rows = rows
    tests = {}
    for metric in evaluator.mean_metrics:
        a, b = _column(base, f"{name}/{metric}"), _column(new, f"{name}/{metric}")
        if a is None or b is None:
            continue
        pairs = [(a[i], b[j]) for i, j in zip(base_rows, new_rows, strict=True)
                 if _is_finite(a[i]) and _is_finite(b[j])]
        if len(pairs) >= 2:
            tests[f"eval/{name}/{metric}"] = paired_randomization(
                mean_statistic([float(x) for x, _ in pairs]), mean_statistic([float(y) for _, y in pairs]),
                n_trials, seed)
    for metric in evaluator.corpus_metrics:
        a, b = (_column(base, f"{name}/{metric}{STATS_SUFFIX}"), _column(new, f"{name}/{metric}{STATS_SUFFIX}"))
        if a is None or b is None:
            continue
        sa = _corpus(evaluator, metric, [a[i] for i in base_rows])
        sb = _corpus(evaluator, metric, [b[j] for j in new_rows])
        if sa is not None and sb is not None and sa.n >= 2:
            tests[f"eval/{name}/{metric}"] = paired_randomization(sa, sb, n_trials, seed)
    return tests
