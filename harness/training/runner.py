"""One experiment run, top to bottom: validate inputs, open the MLflow run, train with in-loop evaluation,
print the summary. Everything that can be checked is checked before the run is opened."""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PrinterCallback, set_seed
from transformers.utils import logging as hf_logging

from evaluators import EVALUATORS
from harness.core import ranks
from harness.core import records as data
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import (
    SPLIT,
    eval_set_samples,
    heldout_samples,
    parse_eval_data,
    split_records,
)
from harness.core.files import check_writable_dir
from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer, remote_code_warning
from harness.core.prompts import render_sample
from harness.embedded.smollm2 import model_source_tags
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend
from harness.paths import REPO_ROOT
from harness.training import console, distributed, interrupts
from harness.training.checkpoints import BestCheckpoint
from harness.training.early_stop import EarlyStop
from harness.training.experiment import Experiment
from harness.training.guards import NonFiniteGuard
from harness.training.inloop import (
    EvalReport,
    EvalSet,
    EvalSuite,
    Evaluation,
    InLoopEvaluation,
    format_report,
)
from harness.training.lineage import (
    log_best_model,
    parent_run_id,
    resolve_experiment_model,
    resolve_reward_model,
    reward_model_run_id,
)
from harness.training.outbox import redact
from harness.training.resume import (
    CheckpointKeeper,
    check_restorable,
    claim_run_dir,
    load_resume,
    restore_best,
    restore_state,
    stateful_parts,
)
from harness.training.summary import RunSummary, print_summary, summary_markdown, summary_tests
from harness.training.tracking.datasets import dataset_input
from harness.training.tracking.runs import mlflow_run
from harness.training.tracking.store import shown_tracking_uri
from harness.training.tracking.tracker import UNDELIVERED_FILE, Tracker
from harness.training.tracking.train_metrics import TrainMetricsLogger


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
        return VLLMBackend(model_path, seed=exp.seed, max_model_len=engine_max_model_len(exp, tokenizer),
                           dtype=exp.generation_dtype, lora_rank=lora_rank, trust_remote_code=exp.trust_remote_code)
    return HFBackend(tokenizer)


def engine_max_model_len(exp: Experiment, tokenizer) -> int:
    """The in-loop vLLM engine's context: prompt + generated tokens it accepts, for the eval prompts and for the
    longest prompt an evaluator generates from by itself (HumanEval's, with humaneval_max_new_tokens)."""
    return max(256, exp.max_length + exp.max_new_tokens, *(p + n for _, _, p, n in evaluator_prompts(exp, tokenizer)))


def evaluator_prompts(exp: Experiment, tokenizer) -> list[tuple[str, str, int, int]]:
    """(evaluator, id, prompt tokens, most new tokens) of the prompts the chosen evaluators generate from by
    themselves (Evaluator.own_prompts)."""
    return [(e, *prompt) for e in exp.evaluators if e in EVALUATORS
            for prompt in EVALUATORS[e].own_prompts(exp.evaluator_kwargs(e), tokenizer)]


def check_evaluator_prompts(exp: Experiment, tokenizer, context: int | None) -> None:
    """A prompt an evaluator generates from by itself (a HumanEval problem) that leaves no room for its new tokens
    in the model's `context` is a DataError naming the problem and the lengths (not a vLLM error once the run is
    open); such prompts are never cut, since a cut problem is another problem."""
    if context is None:
        return
    for evaluator, prompt_id, prompt, new in evaluator_prompts(exp, tokenizer):
        if prompt + new > context:
            raise DataError(f"{evaluator} prompt {prompt_id}: {prompt} tokens, and {new} new tokens after it make "
                            f"{prompt + new}, over the model's context of {context} ({exp.backend} backend): "
                            f"{EVALUATORS[evaluator].own_prompts_remedy}")


def model_context(exp: Experiment, model_path: str, tokenizer) -> int | None:
    """Tokens in-loop generation can hold: the model's positions (max_position_embeddings) and, with vLLM, the
    engine's max_model_len; None when the model's config names no limit (HF generate then has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=exp.trust_remote_code)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    limits = [n for n in (positions, engine_max_model_len(exp, tokenizer) if exp.backend == "vllm" else None) if n]
    return min(limits) if limits else None


def fit_eval_prompts(exp: Experiment, tokenizer, context: int | None, samples: list[data.EvalSample],
                     sources: list[str]) -> list[list[int]]:
    """The eval prompts as the backends get them (chat template, token ids), each checked to leave room in the
    model's `context` for max_new_tokens (when an evaluator generates from them) and for its reference (when one
    scores the reference after the prompt, as perplexity does). A prompt that does not fit is a DataError naming
    its file, line and id, or with eval_truncation=left keeps its last tokens that fit. A whole-conversation sample
    the chat template cannot render is a DataError naming its file, line and id."""
    ids = []
    for sample, source in zip(samples, sources, strict=True):
        try:
            ids.append(render_sample(tokenizer, sample, exp.system_prompt))
        except ConfigError as e:
            if sample.messages is None:  # the system_prompt field, not this record (render_prompt names it)
                raise
            raise DataError(f"{source} (id {sample.id}): field 'messages': {e}") from None
    generates = any(EVALUATORS[e].needs_generation for e in exp.evaluators)
    scores_references = any(EVALUATORS[e].scores_references for e in exp.evaluators)
    if context is None or not (generates or scores_references):
        return ids
    fitted, truncated = [], 0
    for sample, source, prompt in zip(samples, sources, ids, strict=True):
        needs = [(exp.max_new_tokens, f"max_new_tokens={exp.max_new_tokens}")] if generates else []
        if scores_references:
            n = len(tokenizer(sample.reference, add_special_tokens=False)["input_ids"]) + 1
            needs.append((n, f"its reference ({n - 1} tokens, scored after the prompt) and one more"))
        room, what = max(needs)
        keep = context - room
        if len(prompt) <= keep:
            fitted.append(prompt)
        elif exp.eval_truncation == "left" and keep > 0:
            fitted.append(prompt[-keep:])
            truncated += 1
        else:
            fix = (f"shorten it, lower max_new_tokens, or set eval_truncation=left to keep its last {keep} tokens"
                   if keep > 0 else "no prompt fits: lower max_new_tokens or use a model with a longer context")
            raise DataError(f"{source} (id {sample.id}): the prompt is {len(prompt)} tokens with the chat template; "
                            f"with {what} that is {len(prompt) + room} tokens, over the model's context of "
                            f"{context} ({exp.backend} backend): {fix}")
    if truncated:
        print(f"[data] eval_truncation=left: {truncated} eval prompt(s) cut to their last tokens to fit the "
              f"model's context of {context}", flush=True)
    return fitted


def run_experiment(exp: Experiment, hooks: RunHooks | None = None) -> RunSummary | None:
    """Train `exp` (checked by harness.training.settings.check_settings) with in-loop evaluation. In a
    multi-process launch only rank 0 returns a summary. Library output goes to the run's library.log (see
    harness.training.console); a rank other than 0 keeps its own only when it fails."""
    with console.library_log():
        return _run_experiment(exp, hooks)


def _run_experiment(exp: Experiment, hooks: RunHooks | None) -> RunSummary | None:
    started = time.time()
    hf_logging.disable_progress_bar()
    main = ranks.is_main()
    rows, eval_sets, model_path = prepare(exp, verbose=main)
    if not main:
        _train_shard(exp, rows, model_path)
        return None
    evaluators = exp.make_evaluators()  # loads and checks their own inputs (HumanEval problems, the sandbox, a judge)
    try:
        return _train_and_evaluate(exp, rows, eval_sets, model_path, evaluators, started, hooks or RunHooks())
    finally:
        for evaluator in evaluators:
            evaluator.close()


def output_root(exp: Experiment) -> Path:
    """OUTPUT_DIR/NAME: the run's checkpoints go under it, in a directory named by the run id."""
    out_dir = Path(exp.output_dir)
    return (out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir) / exp.name()


def prepare(exp: Experiment, verbose: bool = True) -> tuple[list[dict], list[EvalSet], str]:
    """Inputs first: a bad file, an eval prompt too long for the model or an output_dir that cannot be written stops
    here, before a model is loaded or an MLflow run exists. Returns the training rows (less the records eval_split
    holds out), the eval sets of eval_data (samples and prompt token ids, see fit_eval_prompts) and the model's
    path (the embedded model is built here on first use)."""
    if verbose:
        print(f"[run] {exp.name()}: " + " ".join(f"{k}={v}" for k, v in exp.params().items()), flush=True)
    if verbose and exp.trust_remote_code:
        print(remote_code_warning(exp.model), flush=True)
    check_writable_dir(output_root(exp), "output_dir")
    train_records, heldout = data.read_records(exp.train_data), []
    if exp.eval_split:
        train_records, heldout = split_records(train_records, exp.eval_split, exp.seed)
        if verbose:
            print(f"[data] eval_split={exp.eval_split}: {len(heldout)} of {len(train_records) + len(heldout)} "
                  f"training records held out for evaluation (seed {exp.seed}), not trained on")
    rows = exp.train_rows(train_records)
    eval_sets, model_path = prepare_evaluation(exp, heldout, verbose,
                                               f"{len(rows)} training rows from {exp.train_data}; ")
    return rows, eval_sets, model_path


def prepare_evaluation(exp: Experiment, heldout: list[data.Record] | None = None, verbose: bool = True,
                       data_line: str = "") -> tuple[list[EvalSet], str]:
    """The evaluation half of prepare, which `harness eval` runs alone (no training data): the eval sets of
    eval_data (`heldout`: the records eval_split held out), the model resolved and its tokenizer loaded, every eval
    prompt and evaluator prompt checked against its context. Returns (eval sets, the model's path)."""
    loaded = [(name, path, *_eval_set_samples(exp, path, heldout or [])) for name, path in
              parse_eval_data(exp.eval_data)]
    if verbose:
        print(f"[data] {data_line}eval samples: " + ", ".join(
            f"{len(samples)} from {path if path != SPLIT else 'the held-out split'}" + (f" ({name})" if name else "")
            for name, path, samples, _ in loaded))
    model_path = resolve_experiment_model(exp)  # model=run:...: another run's best checkpoint (training/lineage.py)
    resolve_reward_model(exp)  # reward_model=run:...: a reward model run's best checkpoint, pinned to its id
    exp.check_models(model_path)  # e.g. a distillation teacher's vocabulary against the student's
    try:
        tokenizer = _tokenizer(exp, model_path)
    except (OSError, ValueError) as e:  # transformers': no hub model by that name, or no tokenizer files in it
        if Path(model_path).is_dir():
            raise ConfigError(f"model={exp.model}: {model_path} holds no tokenizer that can be loaded ({e})") from None
        raise ConfigError(f"model={exp.model}: not an embedded model, a directory, a .gguf file or a run reference, "
                          f"and no hub model could be loaded by that name ({e}); without network, set "
                          f"HF_HUB_OFFLINE=1 to use the hub cache") from None
    context = model_context(exp, model_path, tokenizer)
    eval_sets = [EvalSet(name, samples, fit_eval_prompts(exp, tokenizer, context, samples, sources))
                 for name, _, samples, sources in loaded]
    check_evaluator_prompts(exp, tokenizer, context)
    return eval_sets, model_path


def _eval_set_samples(exp: Experiment, path: str,
                      heldout: list[data.Record]) -> tuple[list[data.EvalSample], list[str]]:
    """One eval set's samples (the first eval_limit) and the source (file and line) of each: from an eval file, or
    from the records eval_split held out of train_data (path `split`)."""
    if path == SPLIT:
        return heldout_samples(heldout, exp.data_format, exp.eval_limit, required_eval_fields(exp))
    records = data.read_records(path)
    samples = eval_set_samples(records, exp.eval_limit, required_eval_fields(exp))
    return samples, [r.source for r in records[: len(samples)]]


def required_eval_fields(exp: Experiment) -> dict[str, str]:
    """Eval record fields the chosen evaluators read besides prompt and reference (their `needs_fields`) -> why,
    so that a record without one stops the run in prepare, naming the file, line and field."""
    return {f: f"the {name} evaluator reads it" for name in exp.evaluators if name in EVALUATORS
            for f in EVALUATORS[name].needs_fields}


def _tokenizer(exp: Experiment, model_path: str):
    """The model's tokenizer with the run's chat_template, if it sets one."""
    return load_tokenizer(model_path, trust_remote_code=exp.trust_remote_code, chat_template=exp.chat_template)


def load_tokenizer_and_model(exp: Experiment, model_path: str):
    set_seed(exp.seed)  # what a new part starts from (a reward model's score head, a LoRA adapter) follows the seed
    return _tokenizer(exp, model_path), load_model(model_path, exp.peft, exp.lora_rank, exp.lora_alpha,
                                                   exp.lora_dropout, exp.lora_target_modules, head=exp.model_head,
                                                   trust_remote_code=exp.trust_remote_code)


def _train(exp: Experiment, model, tokenizer, rows: list[dict], callbacks: list, output_dir: str,
           resume_from: Path | None = None, **extra):
    trainer = exp.build_trainer(model, tokenizer, rows, callbacks, output_dir, **extra)
    if ranks.world_size() > 1:  # the trainer has started the ranks' process group
        resume_from = _follow_rank0(exp, trainer, callbacks, resume_from)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; TrainMetricsLogger prints progress
    if ranks.is_main():
        trainer.add_callback(console.train_progress())  # a bar with an ETA, on a terminal only
    # from a checkpoint: weights, optimizer, scheduler, RNG, step and data position (harness.training.resume)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def _follow_rank0(exp: Experiment, trainer, callbacks: list, resume_from: Path | None) -> Path | None:
    """Every rank checkpoints into rank 0's directory (a rank's RNG state, its DeepSpeed optimizer shard) and resumes
    where rank 0 does: from its checkpoint, not evaluating again the steps it evaluated before (a rank waiting at an
    evaluation's barrier that rank 0 skips would hang). Returns the checkpoint to resume from."""
    in_loop = next(c for c in callbacks if isinstance(c, InLoopEvaluation))
    output_dir, resume_from, done = distributed.from_rank0((trainer.args.output_dir, resume_from, in_loop.done))
    if ranks.is_main():
        return resume_from
    if (exp.save_every or resume_from) and not Path(output_dir).parent.is_dir():
        raise ConfigError(f"rank {ranks.rank()}: {Path(output_dir).parent}, rank 0's run directory, is not on this "
                          "node: with save_every or resume across several nodes, output_dir must be on a filesystem "
                          "that every node shares")
    trainer.args.output_dir, in_loop.done = output_dir, done
    return resume_from


def _train_shard(exp: Experiment, rows: list[dict], model_path: str) -> None:
    """A rank other than 0: trains on its shard of every batch and joins rank 0's evaluations and checkpoints; logs
    nothing. With rollout_engines=each_rank it builds an engine of its own for its rollouts (harness.rl.rollouts)."""
    tokenizer, model = load_tokenizer_and_model(exp, model_path)
    extra = {}
    if exp.needs_rollouts:
        extra["backend"] = make_backend(exp, model_path, tokenizer) if exp.rollout_engines == "each_rank" else None
    set_seed(exp.seed)  # after the engine, which reseeds the process's global RNGs itself
    callbacks = [InLoopEvaluation(None, exp.eval_every, [])]
    if exp.save_every:
        callbacks.append(CheckpointKeeper(exp.save_total_limit))  # its barrier: rank 0 marks a checkpoint complete
    # the trainer's directory until rank 0's is known (_follow_rank0)
    with tempfile.TemporaryDirectory(prefix=f"rank{ranks.rank()}-") as output_dir:
        _train(exp, model, tokenizer, rows, callbacks, output_dir, **extra)


def eval_tags(exp: Experiment) -> dict[str, str]:
    """data.eval.fingerprint (data.eval.<set>.fingerprint for named sets): the file's, or for the held-out split
    the share, seed and training file that decide it."""
    return {f"data.eval.{name + '.' if name else ''}fingerprint":
            f"{SPLIT} {exp.eval_split} seed {exp.seed} of {data.fingerprint(exp.train_data)}" if path == SPLIT
            else data.fingerprint(path) for name, path in parse_eval_data(exp.eval_data)}


def data_inputs(exp: Experiment, rows: list[dict], eval_sets: list[EvalSet], tags: dict[str, str]) -> list[dict]:
    """The run's training rows and eval sets as MLflow dataset inputs, digests the run's data.*.fingerprint `tags`
    (a held-out split's, which names the share, seed and training file, hashed to fit MLflow's digest)."""
    paths = dict(parse_eval_data(exp.eval_data))
    inputs = [dataset_input(Path(exp.train_data).name, exp.train_data, rows, tags["data.train.fingerprint"],
                            "training")]
    for s in eval_sets:
        fingerprint = tags[f"data.eval.{s.name + '.' if s.name else ''}fingerprint"]
        path = paths[s.name]
        digest = fingerprint if path != SPLIT else hashlib.blake2b(fingerprint.encode(), digest_size=8).hexdigest()
        samples = [{k: v for k, v in asdict(x).items() if v is not None} for x in s.samples]
        inputs.append(dataset_input(s.name or Path(path).name, path, samples, digest, "evaluation"))
    return inputs


def _train_and_evaluate(exp: Experiment, rows: list[dict], eval_sets: list[EvalSet], model_path: str,
                        evaluators: list, started: float, hooks: RunHooks) -> RunSummary:
    name = exp.name()
    tags = {"model": exp.model, "model.path": model_path, **model_source_tags(model_path),
            "experiment.class": type(exp).__qualname__,
            "data.train.fingerprint": data.fingerprint(exp.train_data), **eval_tags(exp), **hooks.tags}
    params = exp.params()
    if parent := parent_run_id(exp):  # a chained stage: the run it starts from, as a tag and a param
        tags["parent_run"] = params["parent_run"] = parent
    if reward_run := reward_model_run_id(exp):  # an RL stage scored by a reward model run (rm_qwen -> ppo_qwen)
        tags["reward_model_run"] = params["reward_model_run"] = reward_run
    if ranks.launched():
        tags.update({"distributed.world_size": str(ranks.world_size()),
                     "distributed.launcher": os.environ.get(distributed.LAUNCHER_ENV, "unknown"),
                     "distributed.nodes": os.environ.get(distributed.NODES_ENV, "1")})
        if distributed.NODE_ADDR_ENV in os.environ:  # several nodes: the one that evaluates and checkpoints
            tags["distributed.rank0_addr"] = os.environ[distributed.NODE_ADDR_ENV]
    if exp.resume:  # the run's id here (resumed_experiment)
        check_restorable(output_root(exp) / exp.resume / "checkpoints", evaluators)
    # signals wait for a step or evaluation boundary (harness.training.interrupts), then end the run KILLED
    with (mlflow_run(name, params, tags, run_name=hooks.run_name or exp.run_name(),
                    resume_run_id=exp.resume or None, shown=([exp.select_metric], [*exp.changed_fields(), "seed"]))
          as tracker,
          interrupts.deferred()):
        print(f"[mlflow] run {tracker.run_id} in experiment '{name}' at {shown_tracking_uri()}", flush=True)
        if hooks.on_open is not None:
            hooks.on_open(tracker)
        tracker.log_dict({"experiment": name, **exp.params()}, "config.json")
        if not exp.resume:  # a resumed run has them
            tracker.log_inputs(data_inputs(exp, rows, eval_sets, tags))
        for evaluator in evaluators:
            for artifact_file, text in evaluator.artifacts.items():
                tracker.log_text(text, artifact_file)
        out_dir = output_root(exp) / tracker.run_id
        tracker.undelivered_file = out_dir / UNDELIVERED_FILE  # writes a down tracking server never took
        lock = claim_run_dir(out_dir)  # held until the process ends: a resume of a live run is refused
        library_log = console.current().move_to(out_dir, tracker)  # logged to the run as it ends, failed or not
        print(f"[run] library output (transformers, TRL, vLLM, ...): {library_log}", flush=True)
        resumed = load_resume(tracker, out_dir) if exp.resume else None
        tokenizer, model = load_tokenizer_and_model(exp, model_path)
        t = time.time()
        backend = make_backend(exp, model_path, tokenizer)
        print(f"[eval] {backend.name} backend ready in {time.time() - t:.1f}s", flush=True)
        set_seed(exp.seed)  # after the engine, which reseeds the process's global RNGs itself
        evaluation = eval_suite(exp, eval_sets, evaluators, backend, tokenizer)
        best = BestCheckpoint(out_dir / "best", exp.select_metric, exp.select_mode, tokenizer, tracker)
        if resumed:
            restore_best(best, best.directory)
        log_report = report_logger(tracker)
        guard = NonFiniteGuard(exp.stop_on_nonfinite)  # after the logging of a value: it is in MLflow either way
        stoppers = [EarlyStop(exp.select_metric, exp.select_mode, exp.early_stop_patience, tracker)
                    ] if exp.early_stop_patience else []
        in_loop = InLoopEvaluation(evaluation, exp.eval_every, [log_report, guard, best, *stoppers, *hooks.monitors],
                                   background=exp.eval_mode == "background")
        parts = stateful_parts(evaluators, *stoppers)  # saved with each checkpoint (harness.training.resume)
        if resumed:
            in_loop.done, in_loop.reports = set(resumed.eval_steps), list(resumed.reports)
            restore_state(resumed, parts, stoppers)
        # monitors come after in_loop: a decision made on a step's report takes effect at that same step's end
        callbacks = [interrupts.StopAtBoundary(), in_loop, *stoppers, *hooks.monitors,
                     TrainMetricsLogger(tracker, logged_through=resumed.train_logged_through if resumed else -1), guard]
        if exp.save_every:
            callbacks.append(CheckpointKeeper(exp.save_total_limit, parts))
        extra = {"backend": backend} if exp.needs_rollouts else {}
        trainer = _train(exp, model, tokenizer, rows, callbacks, str(out_dir / "checkpoints"),
                         resumed.checkpoint if resumed else None, **extra)
        summary = RunSummary(tracker.run_id, tracker.url(), name, in_loop.reports,
                             best.directory if best.step is not None else None, best.step, best.value,
                             time.time() - started, trainer.state.global_step, exp.select_metric, tuple(best.skipped),
                             stoppers[0].stopped_at if stoppers else None, tracker.experiment_url())
        # the evaluations' time on training's path: all of it, or for background ones what training waited
        eval_s = sum(r.metrics.get("eval/time/blocking_s", r.metrics["eval/time/total_s"]) for r in in_loop.reports)
        tracker.log_metrics({"run/wall_s": summary.wall_s, "run/eval_share": eval_s / summary.wall_s},
                            trainer.state.global_step)
        tests = summary_tests(summary)
        whole, shown = summary_markdown(summary, tests)  # the run's page says what the console says
        tracker.log_text(whole, "summary.md")
        tracker.set_tags({"mlflow.note.content": shown})
        if exp.log_model or exp.register_as:
            _log_model(tracker.run_id, summary.best_checkpoint, exp.register_as)
    lock.close()
    if isinstance(backend, VLLMBackend):
        backend.close()
    del backend, trainer
    gc.collect()
    print_summary(summary, tests)
    return summary


def eval_suite(exp: Experiment, eval_sets: list[EvalSet], evaluators: list, backend, tokenizer) -> EvalSuite:
    """Every eval set of `exp` evaluated by `evaluators` on `backend`: what a run calls at each eval step and
    `harness eval` once, so that both measure a model the same way."""
    generation = GenParams(max_new_tokens=exp.max_new_tokens, seed=exp.seed)
    return EvalSuite({s.name: Evaluation(evaluators, s.samples, backend, tokenizer, generation,
                                         prompt_ids=s.prompt_ids, system_prompt=exp.system_prompt, eval_set=s.name)
                      for s in eval_sets})


def report_logger(tracker: Tracker) -> Callable[[EvalReport, object], None]:
    """The listener that logs an eval report to the run: its metrics at its step, one table per eval set
    (eval_samples/[<set>/]step_N.json, an evaluator's own under [<set>/]<evaluator>/), and the eval line."""

    def log_report(report: EvalReport, _model) -> None:
        tracker.log_metrics(report.metrics, report.step)
        for prefix, set_report in ({f"{n}/": r for n, r in report.sets.items()} or {"": report}).items():
            tracker.log_table(set_report.table, f"eval_samples/{prefix}step_{report.step:06d}.json")
            for evaluator, table in set_report.evaluator_tables.items():
                tracker.log_table(table, f"eval_samples/{prefix}{evaluator}/step_{report.step:06d}.json")
        print(format_report(report), flush=True)

    return log_report


def _log_model(run_id: str, best: Path | None, register_as: str) -> None:
    """log_model / register_as at the end of a run. A failure here (a tracking server gone) leaves the trained run
    FINISHED: its checkpoint is on disk, and `harness export` still makes it a standalone model."""
    if best is None:
        print("[warn] log_model: the run has no best checkpoint, so no MLflow model was logged", flush=True)
        return
    t = time.time()
    try:
        logged = log_best_model(run_id, best, register_as)
    except Exception as e:  # MLflow raises many types (store, HTTP, registry); the message says which
        print(f"[warn] log_model: logging the best checkpoint as an MLflow model failed ({redact(str(e))}); it stays "
              f"at {best}", flush=True)
        return
    registered = f", registered as {logged.version}" if logged.version else ""
    print(f"[mlflow] best checkpoint logged as MLflow model {logged.uri} ({logged.flavor}){registered} in "
          f"{time.time() - t:.1f}s", flush=True)
