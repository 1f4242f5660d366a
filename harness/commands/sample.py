"""Rejection sampling: `python -m harness sample REF --prompts FILE --n 8 --scorer S --out OUT`.

For every prompt the engine samples n answers (through the model's chat template, seeded per request by the seed and
the prompt's place in the file, so a prompt's samples do not depend on which others share its batch); a scorer rates
each one; OUT gets the best answer as SFT data (`prompt`/`completion`) or the best and the worst as a preference pair
(`prompt`/`chosen`/`rejected`), each record with its scores, the scorer and the model that produced it (`source`,
`model`, `source_run` for a run).

Progress lives in OUT's sidecar `<OUT stem>.samples.jsonl`: one line per finished prompt (all n answers and their
scores, the model and the sampler settings), appended, flushed and fsynced as each batch is scored. A rerun skips the
prompt ids already there (a half-written last line, from a kill, is dropped) and OUT is rewritten from the sidecar at
the end, all or nothing; a rerun with another model (a `run:latest:` reference now naming another run included),
scorer, n, temperature, top_p, max_new_tokens, seed or prompt file is refused, naming what changed.

Scorers (higher is better; each reads the prompt record's fields named in SCORER_FIELDS):
- reward functions of harness/rl/rewards.py: `answer_match`, `rouge_l`, `code_pass`, `reward_model` (--reward-model);
- per-sample evaluators: `answer[/exact|numeric|contains]`, `rouge[/rouge1|rouge2|rougeL]`, `bleu[/bleu4]`,
  `judge` (its pointwise score; --judge-url, --judge-model; `local` starts a judge server for --judge-model) and
  `humaneval` (pass/fail of the task's tests in the code sandbox: the `code_pass` rule, which is HumanEval's).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.commands.model_ref import ModelRef, open_engine, render_prompts, resolve_ref
from harness.core.errors import ConfigError, DataError
from harness.core.files import atomic_writer, check_output_file, check_writable_file
from harness.core.generation import GenParams
from harness.core.records import Record, eval_answer, fingerprint, read_records, require_text, resolve_local

REWARD_SCORERS = ("answer_match", "rouge_l", "code_pass", "reward_model")
EVALUATOR_METRICS = {"answer": ("exact", "numeric", "contains"), "rouge": ("rouge1", "rouge2", "rougeL"),
                     "bleu": ("bleu4",), "judge": ("score",), "humaneval": ("pass",)}
# the prompt record's fields each scorer reads besides `prompt`
SCORER_FIELDS = {"answer_match": ("answer",), "rouge_l": ("reference",), "code_pass": ("test", "entry_point"),
                 "reward_model": (), "answer": ("answer",), "rouge": ("reference",), "bleu": ("reference",),
                 "judge": (), "humaneval": ("test", "entry_point")}
FORMATS = ("sft", "preference")


@dataclass(frozen=True)
class SampleConfig:
    ref: str  # the model: run, experiment, directory or name (see model_ref.resolve_ref)
    prompts: str
    out: str
    n: int = 8
    scorer: str = "rouge_l"
    format: str = "preference"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    limit: int = 0  # first N prompts (0 = all)
    batch: int = 16  # prompts generated and scored together; progress is saved after each batch
    reward_model: str = ""
    judge_url: str = "local"
    judge_model: str = "tiny-qwen2"


def parse_scorer(spec: str) -> tuple[str, str]:
    """(scorer, metric) of `--scorer`: a reward function (metric = its name) or `evaluator[/metric]`."""
    name, _, metric = spec.partition("/")
    if name in REWARD_SCORERS and not metric:
        return name, name
    if name in EVALUATOR_METRICS:
        metric = metric or EVALUATOR_METRICS[name][-1 if name == "rouge" else 0]
        if metric in EVALUATOR_METRICS[name]:
            return name, metric
        raise ConfigError(f"--scorer {spec}: {name} has no per-sample metric {metric!r}; choose one of "
                          f"{', '.join(EVALUATOR_METRICS[name])}")
    choices = [*REWARD_SCORERS, *(f"{e}[/{'|'.join(m)}]" for e, m in EVALUATOR_METRICS.items())]
    raise ConfigError(f"--scorer {spec!r} is not a scorer; choose one of {', '.join(choices)}")


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest score (the first of equals; NaN, an unscored sample, is ignored),
    or None when no sample has a score."""
    scored = [i for i, s in enumerate(scores) if not math.isnan(s)]
    if not scored:
        return None
    return max(scored, key=lambda i: scores[i]), min(scored, key=lambda i: scores[i])


def progress_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".samples.jsonl")


def read_progress(path: Path) -> list[dict]:
    """The finished prompts recorded in `path` (none when it does not exist). A last line without its newline was
    being written when the process died: it is cut off the file. A bad complete line is a DataError naming it."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
        print(f"[sample] {path}: dropped a half-written last line ({len(raw) - len(complete)} bytes)", flush=True)
    rows, seen = [], set()
    for lineno, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg}); delete the file to start over") from None
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{path} line {lineno}: not a sampling record (no 'id'); delete the file to start over")
        if row["id"] in seen:
            raise DataError(f"{path} line {lineno}: prompt id {row['id']!r} is recorded twice")
        seen.add(row["id"])
        rows.append(row)
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    """Append whole lines and force them to disk, so that a kill leaves every finished prompt on record."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


class Scorer:
    """Scores answers to prompt records; `__call__(records, texts)` gives one float per text (NaN: unscored)."""

    def __init__(self, cfg: SampleConfig):
        self.name, self.metric = parse_scorer(cfg.scorer)
        self.judge = None
        self.reward: Callable | None = None
        if self.name in ("code_pass", "humaneval"):
            from harness.rl.rewards import CodePass

            self.reward = CodePass()
        elif self.name == "reward_model":
            if not cfg.reward_model:
                raise ConfigError("--scorer reward_model needs --reward-model (a run, e.g. run:latest:rm_qwen, "
                                  "or a reward model directory)")
            from harness.rl.rewards import RewardModel

            self.reward = RewardModel(_model_dir(cfg.reward_model))
        elif self.name in REWARD_SCORERS:
            from harness.rl import rewards

            self.reward = getattr(rewards, self.name)
        elif self.name == "judge":
            from evaluators.judge import Judge

            self.judge = Judge(base_url=cfg.judge_url, model=cfg.judge_model, pairwise=False)

    def __call__(self, records: list[Record], texts: list[str]) -> list[float]:
        if self.reward is not None:
            columns = {c: [r.fields[c] for r in records] for c in SCORER_FIELDS[self.name]}
            scores = self.reward(texts, prompts=[r.fields["prompt"] for r in records], **columns)
            return [float(s) for s in scores]
        prompts = [r.fields["prompt"] for r in records]
        references = [r.fields.get("reference") or "" for r in records]
        if self.judge is not None:
            table = self.judge.judge(prompts, references, texts).table
            return [math.nan if s is None else float(s) for s in table["judge_score"]]
        from evaluators import EVALUATORS, EvalContext
        from harness.core.records import EvalSample

        samples = [EvalSample(str(i), p, ref, eval_answer(r)) for i, (p, ref, r)
                   in enumerate(zip(prompts, references, records, strict=True))]
        per_sample = EVALUATORS[self.name]().evaluate(EvalContext(samples, predictions=texts)).per_sample
        return [float(s) for s in per_sample[self.metric]]

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def _model_dir(ref: str) -> str:
    """A reward model given like the sampled model (a run, a directory or a name), as one directory."""
    model = resolve_ref(ref)
    if model.adapter:
        return model.adapter  # RewardModel loads an adapter on its base itself
    return model.base


def _check_prompts(cfg: SampleConfig) -> list[Record]:
    """The prompt records, each with a string `prompt`, a unique id and the fields the scorer reads; every problem
    is a DataError naming the file, line and field, raised before anything loads."""
    if cfg.n < 1:
        raise ConfigError(f"--n {cfg.n}: must be >= 1")
    if cfg.format == "preference" and cfg.n < 2:
        raise ConfigError(f"--n {cfg.n}: preference pairs need at least 2 answers per prompt (or --format sft)")
    if cfg.format not in FORMATS:
        raise ConfigError(f"--format {cfg.format!r}: choose one of {', '.join(FORMATS)}")
    if cfg.batch < 1 or cfg.max_new_tokens < 1 or cfg.limit < 0 or cfg.temperature < 0:
        raise ConfigError("--batch and --max-new-tokens must be >= 1, --limit and --temperature >= 0")
    name, _ = parse_scorer(cfg.scorer)
    records = read_records(cfg.prompts)[: cfg.limit or None]
    seen: dict[str, str] = {}
    for r in records:
        require_text(r, "prompt")
        for key in SCORER_FIELDS[name]:
            if key == "answer":
                eval_answer(r, required=True, why=f"the {name} scorer compares answers with it")
            else:
                require_text(r, key, why=f"the {name} scorer reads it")
        rid = record_id(r)
        if rid in seen:
            raise DataError(f"{r.source}: id {rid!r} repeats {seen[rid]} (resuming skips prompts by id)")
        seen[rid] = r.source
    return records


def record_id(record: Record) -> str:
    """A record's `id`, else its line (or record) number in the file."""
    if "id" in record.fields:
        return str(record.fields["id"])
    return record.source.rsplit(" ", 1)[-1]


def sampler_identity(cfg: SampleConfig) -> dict:
    """What decides a prompt's samples besides the model: recorded with every prompt in the sidecar (`sampler`), so
    that a resume with other settings is refused (_check_resumable). The prompt file's fingerprint is there because
    each prompt's seed follows its place in the file."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed, "prompts": fingerprint(cfg.prompts)}


def _check_resumable(done: list[dict], path: Path, cfg: SampleConfig, model: ModelRef) -> None:
    """A sidecar from another sampling (another model, or the same reference resolving to another run or
    directory, another scorer, n or sampler settings) must not be continued as if it were this one: the output
    would mix two samplers. Refused with every difference named."""
    if not done:
        return
    row = done[0]
    recorded = row.get("sampler", {})
    expected = {**model.describe(), "scorer": cfg.scorer, "n": cfg.n, **sampler_identity(cfg)}
    got = {**{k: row.get(k) for k in ("source", "model", "source_run", "scorer")}, "n": len(row.get("samples", [])),
           **{k: recorded.get(k) for k in sampler_identity(cfg)}}
    expected.setdefault("source_run", None)
    changed = [f"{key}={got[key]!r} then, {value!r} now" for key, value in expected.items() if got[key] != value]
    if changed:
        raise ConfigError(f"{path} holds a sampling made with other settings ({'; '.join(changed)}): resuming it "
                          f"would mix two samplers in one output. Write to another --out, or delete {path} (and "
                          f"{path.name.removesuffix('.samples.jsonl')}.jsonl beside it) to start over")


def _output_rows(cfg: SampleConfig, records: list[Record], done: dict[str, dict]) -> tuple[list[dict], int]:
    """OUT's records in the prompt file's order, and how many prompts gave none (no scored, non-blank answer, or a
    tie between the best and the worst answer: no preference)."""
    rows, skipped = [], 0
    for r in records:
        row = done.get(record_id(r))
        if row is None:
            continue
        picked = best_and_worst(row["scores"])
        best, worst = picked if picked else (None, None)
        keep = {k: row[k] for k in ("id", "scorer", "source", "model", "source_run", "sample_run") if k in row}
        if best is None or not row["samples"][best].strip():
            skipped += 1
        elif cfg.format == "sft":
            rows.append({"prompt": row["prompt"], "completion": row["samples"][best],
                         "score": row["scores"][best], **keep})
        elif row["scores"][best] > row["scores"][worst] and row["samples"][worst].strip():
            rows.append({"prompt": row["prompt"], "chosen": row["samples"][best], "rejected": row["samples"][worst],
                         "chosen_score": row["scores"][best], "rejected_score": row["scores"][worst], **keep})
        else:
            skipped += 1
    return rows, skipped


def score_summary(done: list[dict]) -> dict[str, float]:
    """The distribution of every sample's score, and of each prompt's best, worst and their gap."""
    scores = [s for row in done for s in row["scores"] if not math.isnan(s)]
    picks = [(row["scores"][b], row["scores"][w]) for row in done if (p := best_and_worst(row["scores"]))
             for b, w in [p]]
    if not scores:
        return {}
    q = statistics.quantiles(scores, n=4, method="inclusive") if len(scores) > 1 else [scores[0]] * 3
    summary = {"score/mean": statistics.fmean(scores), "score/std": statistics.pstdev(scores),
               "score/min": min(scores), "score/p25": q[0], "score/median": q[1], "score/p75": q[2],
               "score/max": max(scores), "score/unscored": sum(math.isnan(s) for row in done for s in row["scores"])}
    summary["best/mean"] = statistics.fmean(b for b, _ in picks)
    summary["worst/mean"] = statistics.fmean(w for _, w in picks)
    summary["gap/mean"] = summary["best/mean"] - summary["worst/mean"]
    return summary


def run_sample(cfg: SampleConfig, engine=None) -> dict:
    """Sample, score and write (see the module docstring); returns a summary. `engine`: an open VLLMBackend for the
    model to reuse (it is not closed); by default one is opened for `cfg.ref` and closed at the end."""
    from harness.training.tracking.runs import end_runs, mlflow_run

    records = _check_prompts(cfg)
    out = Path(cfg.out)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {cfg.out}: sample writes JSONL; give a path ending in .jsonl")
    inputs = [cfg.prompts, resolve_local(cfg.prompts)]
    check_writable_file(out, "--out")
    sidecar = progress_path(out)
    for path in (out, sidecar):
        check_output_file(path, inputs)
    model = resolve_ref(cfg.ref)
    done = read_progress(sidecar)
    _check_resumable(done, sidecar, cfg, model)
    finished = {row["id"] for row in done}
    todo = [r for r in records if record_id(r) not in finished]
    place = {record_id(r): i for i, r in enumerate(records)}  # a prompt's seed follows its place in the file
    _, prompt_ids = render_prompts(model, [r.fields["prompt"] for r in todo])
    experiment, tags = f"sample/{out.name.removesuffix('.jsonl')}", {"command": "sample", "out": str(out.resolve())}
    # a sampling of this OUT that was killed left its MLflow run RUNNING: it ended then, as KILLED (before a judge
    # server starts, so that a store failure here leaves no server behind)
    end_runs("KILLED", experiment=experiment, tags=tags)
    scorer = Scorer(cfg)  # a reward model or a judge server loads here, before the MLflow run opens
    params = {**{k: v for k, v in vars(cfg).items() if k not in ("judge_url", "judge_model", "reward_model")},
              **model.describe(), "resumed_prompts": len(done)}
    if scorer.name == "judge":
        params.update(judge_url=cfg.judge_url, judge_model=cfg.judge_model)
    if scorer.name == "reward_model":
        params["reward_model"] = cfg.reward_model
    own_engine = engine is None
    started = time.time()
    tokens = 0
    try:
        if own_engine and todo:
            engine = open_engine(model, prompt_ids, cfg.max_new_tokens, cfg.seed)
        with mlflow_run(experiment, params, tags) as tracker:
            gen = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.n, seed=cfg.seed)
            for start in range(0, len(todo), cfg.batch):
                chunk, ids = todo[start : start + cfg.batch], prompt_ids[start : start + cfg.batch]
                completions = engine.generate(ids, gen, indices=[place[record_id(r)] for r in chunk])
                tokens += sum(c.num_tokens for c in completions)
                texts = [t for c in completions for t in c.texts]
                scores = scorer([r for r in chunk for _ in range(cfg.n)], texts)
                rows = []
                for i, (r, c) in enumerate(zip(chunk, completions, strict=True)):
                    mine = scores[i * cfg.n : (i + 1) * cfg.n]
                    rows.append({"id": record_id(r), "prompt": r.fields["prompt"], "samples": c.texts,
                                 "scores": mine, "scorer": cfg.scorer, **model.describe(),
                                 "sampler": sampler_identity(cfg), "sample_run": tracker.run_id})
                _append(sidecar, rows)
                done += rows
                print(f"[sample] {len(done)}/{len(records)} prompts", flush=True)
            rows, skipped = _output_rows(cfg, records, {row["id"]: row for row in done})
            with atomic_writer(out, inputs) as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            generate_s = time.time() - started
            metrics = {**score_summary(done), "prompts": len(done), "records": len(rows), "skipped": skipped,
                       "new_prompts": len(todo), "tokens_per_s": tokens / max(generate_s, 1e-9)}
            tracker.log_metrics(metrics, 0)
            tracker.log_artifact(str(out), "sample")
            tracker.log_artifact(str(sidecar), "sample")
            run_id = tracker.run_id
    finally:
        scorer.close()
        if own_engine and engine is not None:
            engine.close()
    return {"out": str(out), "samples": str(sidecar), "format": cfg.format, "prompts": len(done),
            "new_prompts": len(todo), "records": len(rows), "skipped": skipped, "mlflow_run": run_id,
            **{k: round(v, 4) for k, v in metrics.items() if k.startswith(("score/", "best/", "worst/", "gap/"))}}
