"""Whether a sweep's best trial is real: its paired difference from the baseline and from the runner-up.

Optuna's best trial is the best of several noisy values, so it looks better than it is (the winner's curse): trials
that all score like the starting model still have a best, above the starting model about as often as not, and the
more trials the further above. This module says whether the best beats what it must beat, on the same eval samples.

What is compared: a trial's value is its objective (`select_metric`) at the last evaluation that produced it
(harness.sweeps.trial), so each completed trial's per-sample table of that step is compared, not its best
checkpoint's. The baseline is step 0 of the best trial's own run: every trial starts from the same model on the same
eval samples. That is checked (the runs' `model` and `parent_run` params and eval-data fingerprint tags, the tables'
sample ids and prompts); a trial that does not match is left out of the comparison, with a note saying so.

The tests (evaluators/uncertainty.py's paired randomization test, on the objective's per-sample values) are every
completed trial against the baseline, and the best against the runner-up (the compared trial with the next best
value). They are one family for Holm's correction, so the number of trials counts: the more trials, the more the
best must beat the baseline by. The verdict reads the adjusted p-values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluators import EVALUATORS
from evaluators.uncertainty import ALPHA, N_TRIALS, SEED, Paired, holm, paired_tests
from harness.core.eval_data import metric_key
from harness.training.tracking.queries import eval_set_names, eval_tables, find_run
from harness.training.tracking.store import open_client

# What every trial must share for the best trial's step 0 to be the baseline of all of them.
ORIGIN_PARAMS = ("model", "parent_run")
ORIGIN_TAG_PREFIX = "data.eval."  # data.eval.fingerprint, data.eval.<set>.fingerprint


@dataclass(frozen=True)
class Finisher:
    """A completed trial as the verdict reads it."""

    number: int
    value: float
    step: int  # the evaluation its value comes from
    run_id: str
    start: float | None = None  # its objective at step 0


@dataclass(frozen=True)
class Verdict:
    objective: str
    sentence: str  # "the best trial is indistinguishable from ...", or "no verdict: <why>"
    lines: list[str]  # the console block, the sentence last
    best: Finisher | None = None
    runner_up: Finisher | None = None
    vs_baseline: Paired | None = None  # best - baseline, Holm-adjusted over `family` tests
    vs_runner_up: Paired | None = None  # best - runner-up, in the same family
    family: int = 0
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)

    def tags(self) -> dict[str, str]:
        """The parent run's tags: the sentence, and each test's numbers as `sweep.best_vs_<other>.<field>`."""
        tags = {"sweep.verdict": self.sentence, "sweep.verdict.tests": str(self.family)}
        if self.runner_up is not None:
            tags["sweep.runner_up.trial"] = str(self.runner_up.number)
        for name, test in (("baseline", self.vs_baseline), ("runner_up", self.vs_runner_up)):
            if test is not None:
                tags.update({f"sweep.best_vs_{name}.{k}": str(v) for k, v in (
                    ("delta", test.delta), ("ci_low", test.low), ("ci_high", test.high), ("p_value", test.p_value),
                    ("p_holm", test.p_adjusted), ("significant", test.significant))})
        return tags


def judge_best(finishers: list[Finisher], objective: str, mode: str) -> Verdict | None:
    """The verdict on the best of `finishers` (the completed trials, in trial order) for `objective` and
    select_mode `mode` ("max" or "min"); None when no trial completed. The best is Optuna's: the best value, the
    first such trial on a tie."""
    if not finishers:
        return None
    ranked = sorted(finishers, key=lambda f: -f.value if mode == "max" else f.value)
    best = ranked[0]
    client = open_client()
    runs = {f.number: find_run(client, f.run_id) for f in ranked}
    best_run = runs[best.number]
    if best_run is None:
        return _no_verdict(objective, f"trial {best.number}'s run {best.run_id} is not in the tracking store")
    located = _objective_column(objective, eval_set_names(best_run.data.params.get("eval_data", "")))
    if located is None:
        return _no_verdict(objective, f"{objective} has no per-sample values to pair (only metrics an evaluator "
                                      f"computes per sample or from per-sample statistics do)")
    set_name, evaluator, key = located
    baseline = eval_tables(best.run_id, best_run.data.params.get("eval_data", ""), 0)[set_name]
    if baseline is None:
        return _no_verdict(objective, f"trial {best.number}'s run logged no per-sample table at step 0")
    origin = _origin(best_run)
    tables, tests, notes = {}, {}, []
    for f in ranked:
        run = runs[f.number]
        if run is None:
            notes.append(f"trial {f.number}: its run {f.run_id} is not in the tracking store; left out")
            continue
        if (differs := sorted(k for k in {*origin, *_origin(run)} if origin.get(k) != _origin(run).get(k))):
            notes.append(f"trial {f.number}: started from another model or eval data than trial {best.number} "
                         f"({', '.join(differs)} differ); left out")
            continue
        table = eval_tables(f.run_id, run.data.params.get("eval_data", ""), f.step)[set_name]
        test = None if table is None else _paired(evaluator, key, baseline, table)
        if test is None:
            why = "no per-sample table" if table is None else "not the same eval samples as the baseline"
            notes.append(f"trial {f.number}: {why} at step {f.step}; left out")
            continue
        tables[f.number], tests[f.number] = table, test
    if best.number not in tables:
        return _no_verdict(objective, notes[0], notes=notes)
    runner_up = next((f for f in ranked[1:] if f.number in tables), None)
    if runner_up is not None and (versus := _paired(evaluator, key, tables[runner_up.number],
                                                    tables[best.number])) is not None:
        tests["runner_up"] = versus
    adjusted = holm(tests)
    starts = {f.start for f in ranked if f.number in tables and f.start is not None}
    if len(starts) > 1:
        notes.append(f"the trials' step-0 values differ ({min(starts):.4g} to {max(starts):.4g}): their starting "
                     f"points are not identical; each is compared with trial {best.number}'s step 0")
    return _verdict(objective, mode, set_name, best, runner_up, adjusted[best.number], adjusted.get("runner_up"),
                    len(tables), notes)


def _objective_column(objective: str, set_names: list[str]) -> tuple[str, str, str] | None:
    """(eval set, evaluator, key without the set) of the objective, when an evaluator has it per sample."""
    for name in set_names:
        key = objective.replace(f"eval/{name}/", "eval/", 1) if name else objective
        parts = key.split("/")
        if metric_key(key, name) != objective or len(parts) != 3 or parts[1] not in EVALUATORS:
            continue
        evaluator = EVALUATORS[parts[1]]
        if parts[2] in (*evaluator.mean_metrics, *evaluator.corpus_metrics):
            return name, parts[1], key
    return None


def _paired(evaluator: str, key: str, base: dict, new: dict) -> Paired | None:
    return paired_tests({evaluator: EVALUATORS[evaluator]}, base, new).get(key)


def _origin(run) -> dict[str, str]:
    return {**{k: run.data.params[k] for k in ORIGIN_PARAMS if k in run.data.params},
            **{k: v for k, v in run.data.tags.items() if k.startswith(ORIGIN_TAG_PREFIX)}}


def _no_verdict(objective: str, why: str, notes: list[str] | None = None) -> Verdict:
    sentence = f"no verdict: {why}"
    return Verdict(objective, sentence, ["[sweep] is the best trial real?", *(f"  note: {n}" for n in notes or []),
                                         f"  verdict: {sentence}"], notes=notes or [])


def _standing(test: Paired | None, mode: str) -> str | None:
    if test is None:
        return None
    if not test.significant:
        return "indistinguishable"
    return "better" if (test.delta > 0) == (mode == "max") else "worse"


def _sentence(vs_baseline: Paired, vs_runner_up: Paired | None, mode: str) -> str:
    base, runner = _standing(vs_baseline, mode), _standing(vs_runner_up, mode)
    if base == "indistinguishable":
        claim = ("the best trial is indistinguishable from the baseline and from the runner-up" if runner in (
            "indistinguishable", None) else "the best trial is better than the runner-up but indistinguishable from "
                                            "the baseline")
        return f"{claim} (the sweep found no real improvement)"
    if base == "worse":
        return "the best trial is worse than the baseline (no setting tried improved on the starting model)"
    if runner == "better":
        return ("the best trial is better than the baseline and than the runner-up (a real improvement, and a real "
                "winner)")
    if runner == "indistinguishable":
        return ("the best trial is better than the baseline but indistinguishable from the runner-up (a real "
                "improvement; the sweep cannot tell its best settings apart)")
    return "the best trial is better than the baseline (a real improvement; no other trial to compare)"


def _verdict(objective: str, mode: str, set_name: str, best: Finisher, runner_up: Finisher | None,
             vs_baseline: Paired, vs_runner_up: Paired | None, compared: int, notes: list[str]) -> Verdict:
    sentence = _sentence(vs_baseline, vs_runner_up, mode)
    where = f" of eval set {set_name}" if set_name else ""
    lines = [f"[sweep] is the best trial real? {objective} ({'higher' if mode == 'max' else 'lower'} is better) at "
             f"each completed trial's last evaluation (the value Optuna ranks), paired over the same "
             f"{vs_baseline.n} eval samples{where}",
             f"  best trial {best.number}: {vs_baseline.new:.3f} (step {best.step}); baseline: {vs_baseline.base:.3f} "
             f"(step 0 of trial {best.number}'s run, the starting model)",
             f"  vs baseline (step 0): {vs_baseline.describe(family='tests')}"]
    if runner_up is None:
        lines.append("  vs runner-up: none (one trial compared)")
    elif vs_runner_up is not None:
        lines.append(f"  vs runner-up (trial {runner_up.number}, {vs_runner_up.base:.3f} at step {runner_up.step}): "
                     f"{vs_runner_up.describe(family='tests')}")
    else:
        lines.append(f"  vs runner-up (trial {runner_up.number}): its table does not pair with the best's")
    lines.append(f"  Holm over {vs_baseline.family} tests: each of the {compared} completed trials against the "
                 f"baseline{', and the best against the runner-up' if vs_runner_up is not None else ''}; paired "
                 f"approximate randomization, {N_TRIALS} trials, seed {SEED}; significant: Holm p < {ALPHA}")
    lines += [f"  note: {n}" for n in notes]
    lines.append(f"  verdict: {sentence}")
    return Verdict(objective, sentence, lines, best, runner_up, vs_baseline, vs_runner_up, vs_baseline.family, notes)
