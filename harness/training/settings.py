"""Which settings go together: the one check that run, sweep and launch all call before any work.

A value alone is typed by overrides; everything else lives here: ranges, choices, field against field
(backend x peft x lora_serving x evaluators x select_metric), the experiment's own rules (its `rules()`), and what
the way it is started allows (a launcher, a sweep). Defaults that depend on the start (ZeRO-2 under the deepspeed
launcher) are filled in here too, so that the printed config shows them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable

import torch

from evaluators import EVALUATORS, is_diagnostic
from harness.core.errors import ConfigError
from harness.core.eval_data import SPLIT, metric_key, parse_eval_data
from harness.core.prompts import read_chat_template
from harness.training.distributed import LAUNCHERS, deepspeed_config, zero_stage
from harness.training.experiment import (
    BACKENDS,
    EVAL_TRUNCATIONS,
    GENERATION_DTYPES,
    PEFT_KINDS,
    ROLLOUT_ENGINES,
    Experiment,
)


def check_settings(exp: Experiment, launch: str | None = None, sweep: bool = False) -> Experiment:
    """`exp` with start-dependent defaults filled in, after every rule; raises ConfigError naming the field.
    `launch`: the launcher that will start the ranks (deepspeed, torchrun) or None for one process; `sweep`: the
    experiment runs as sweep trials."""
    if launch == "deepspeed" and exp.deepspeed == "none":
        exp = dataclasses.replace(exp, deepspeed="zero2")
    name = exp.name()
    for ok, field, why in _finite_rules(exp) + _range_rules(exp) + _field_rules(exp) + exp.rules():
        if not ok:
            where = f"field '{field}' = {_value(exp, field)!r} " if field else ""
            raise ConfigError(f"{name}: {where}{why}")
    try:
        deepspeed = deepspeed_config(exp.deepspeed)
        stage = zero_stage(deepspeed) if deepspeed else None
        if exp.chat_template:
            read_chat_template(exp.chat_template)  # a named template, or a Jinja file that parses
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None
    for ok, why in _start_rules(exp, launch, sweep, stage):
        if not ok:
            raise ConfigError(f"{name}: {why}")
    return exp


def _value(exp: Experiment, field: str):
    """A field's value, or an evaluator option's (`humaneval_k`) as the evaluator would be built with it."""
    if hasattr(exp, field):
        return getattr(exp, field)
    for name in dict.fromkeys([*exp.evaluators, *exp.evaluator_options]):
        option = field.removeprefix(f"{name}_")
        if name in EVALUATORS and option != field:
            return EVALUATORS[name].resolved_options(exp.evaluator_kwargs(name)).get(option)
    return None


def _finite_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    """No float anywhere in the config (a field, an item of a list field, an evaluator option) may be NaN or
    infinite: `learning_rate=1e999` parses (as inf) but trains every weight into NaN."""
    values = [(f.name, getattr(exp, f.name)) for f in dataclasses.fields(exp) if f.name != "evaluator_options"]
    values += [(f"{e}_{k}", v) for e, opts in exp.evaluator_options.items() for k, v in opts.items()]
    floats = [(name, v) for name, value in values for v in (value if isinstance(value, list) else [value])
              if isinstance(v, float)]
    bad = list(dict.fromkeys(name for name, v in floats if not math.isfinite(v)))
    return [(False, name, "must be a finite number (not NaN or infinite)") for name in bad]


# Ranges of method fields, checked in every experiment that declares the field.
_METHOD_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v >= 0, "must be >= 0"),
    "cpo_alpha": (lambda v: v >= 0, "must be >= 0"),
    "desirable_weight": (lambda v: v > 0, "must be > 0"),
    "undesirable_weight": (lambda v: v > 0, "must be > 0"),
    "kd_alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1] (the KL's share of the loss)"),
    "kd_temperature": (lambda v: v > 0, "must be > 0"),
    "temperature": (lambda v: v > 0, "must be > 0 (rollouts are sampled)"),
    "reward_weights": (lambda v: all(w >= 0 for w in v), "every weight must be >= 0"),
}


def _range_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    """Values that parse but make no sense: the base fields' ranges, the method fields' (_METHOD_RANGES), and the
    chosen evaluators' option rules (HumanEval: every k <= n), each named by its `<evaluator>_<option>` key."""
    rules = [
        (0 <= exp.seed < 2**32, "seed", "must be in [0, 2**32) (numpy and torch take seeds in that range)"),
        (exp.max_length >= 1, "max_length", "must be >= 1"),
        (exp.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (exp.eval_truncation in EVAL_TRUNCATIONS, "eval_truncation", f"must be one of {', '.join(EVAL_TRUNCATIONS)}"),
        (0 <= exp.eval_split < 1, "eval_split", "must be in [0, 1) (the share of train_data held out; 0 = none)"),
        (exp.lora_rank >= 1, "lora_rank", "must be >= 1"),
        (exp.lora_alpha > 0, "lora_alpha", "must be > 0"),
        (0 <= exp.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
        (bool(exp.lora_target_modules), "lora_target_modules", "must name at least one module (or all-linear)"),
        (exp.num_train_epochs >= 0, "num_train_epochs", "must be >= 0 (0 = the length is max_steps)"),
        (exp.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
        (exp.warmup_steps >= -1, "warmup_steps", "must be >= 0, or -1 for min(5, a tenth of the training steps)"),
        (0 <= exp.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1) (a fraction of the training steps)"),
        (exp.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (exp.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)"),
        (exp.early_stop_patience >= 0, "early_stop_patience", "must be >= 0 (0 = no early stopping)"),
        (exp.save_every >= 0, "save_every", "must be >= 0 (0 = no periodic checkpoints)"),
        (exp.save_total_limit >= 1, "save_total_limit", "must be >= 1 (the newest complete checkpoints kept)"),
    ]
    rules += [(check(getattr(exp, field)), field, why) for field, (check, why) in _METHOD_RANGES.items()
              if hasattr(exp, field)]
    for name in exp.evaluators:
        if name in EVALUATORS:
            rules += [(ok, f"{name}_{option}", why)
                      for ok, option, why in EVALUATORS[name].option_rules(exp.evaluator_kwargs(name))]
    return rules


def _field_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    unknown = [e for e in exp.evaluators if e not in EVALUATORS]
    _, set_rules = _eval_set_rules(exp)
    produced = produced_metrics(exp)
    selectable = [key for key in produced if not is_diagnostic(key)]
    rules = [
        *set_rules,
        *_unchosen_option_rules(exp),
        (exp.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}"),
        (exp.select_mode in ("max", "min"), "select_mode", "must be 'max' or 'min'"),
        (exp.register_as == exp.register_as.strip() and not any(c in exp.register_as for c in "/:"), "register_as",
         "an MLflow registered model name may not contain '/' or ':' nor start or end with spaces"),
        (exp.eval_mode in ("blocking", "background"), "eval_mode", "must be 'blocking' or 'background'"),
        (exp.generation_dtype in GENERATION_DTYPES, "generation_dtype",
         f"must be one of {', '.join(GENERATION_DTYPES)}"),
        *_length_rules(exp),
        *_schedule_rules(exp),
        (exp.eval_every >= 1, "eval_every", "must be >= 1"),
        (exp.eval_limit >= 0, "eval_limit", "must be >= 0 (0 means the whole eval set)"),
        (exp.batch_size >= 1, "batch_size", "must be >= 1"),
        # 0 is allowed: a control run, whose summary shows what the test calls a change when the weights stay put
        (exp.learning_rate >= 0, "learning_rate", "must be >= 0 (0: a control run that trains nothing)"),
        (bool(exp.evaluators), "evaluators", "must name at least one evaluator"),
        (exp.peft in PEFT_KINDS, "peft", f"must be one of {', '.join(PEFT_KINDS)}"),
        (exp.lora_serving in ("merge", "request"), "lora_serving", "must be 'merge' or 'request'"),
        (exp.lora_serving == "merge" or (exp.peft == "lora" and exp.backend == "vllm"), "lora_serving",
         "'request' needs peft=lora and backend=vllm (vLLM serves plain LoRA adapters only)"),
        (exp.peft != "qlora" or _qlora_available(), "peft",
         "needs a CUDA GPU and bitsandbytes (4-bit NF4 base weights); this machine has none: use peft=lora, "
         "which trains the same adapter on full-precision weights"),
        (not unknown, "evaluators", f"unknown {unknown}; known: {', '.join(sorted(EVALUATORS))}"),
        (exp.select_metric in selectable or bool(unknown), "select_metric",
         ("is a diagnostic (how the evaluation went, not how good the model is)" if exp.select_metric in produced
          else "is not produced by the chosen evaluators") + f"; choose one of: {', '.join(selectable)}"),
    ]
    if exp.eval_mode == "background":
        readers = [e for e in exp.evaluators if e in EVALUATORS and EVALUATORS[e].needs_model]
        rules += [(exp.backend == "vllm", "eval_mode", "needs backend=vllm (hf generates with the model "
                                                       "being trained)"),
                  (not readers, "eval_mode", f"cannot run {', '.join(readers)}, which reads the model "
                                             f"being trained; use eval_mode=blocking"),
                  (not exp.needs_rollouts, "eval_mode", "cannot share the engine with online RL's "
                                                        "rollouts; use eval_mode=blocking")]
    if exp.needs_rollouts:
        rules.append((exp.backend == "vllm", "",
                      f"backend={exp.backend!r}: rollouts come from the vLLM engine; use vllm"))
    if exp.model_head == "reward":
        generating = [e for e in exp.evaluators if e in EVALUATORS and not EVALUATORS[e].needs_model]
        rules.append((not generating and exp.backend == "hf", "",
                      f"a reward model has no language-model head, so it can only be evaluated by reward_accuracy "
                      f"with backend=hf (got evaluators={exp.evaluators}, backend={exp.backend})"))
    return rules


def produced_metrics(exp: Experiment) -> list[str]:
    """The metric keys the chosen evaluators log on the eval sets of eval_data (diagnostics included)."""
    sets, _ = _eval_set_rules(exp)
    return [metric_key(f"eval/{e}/{m}", name) for name, _ in sets for e in exp.evaluators if e in EVALUATORS
            for m in EVALUATORS[e].metric_names(exp.evaluator_kwargs(e))]


def _unchosen_option_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    """An option of an evaluator that `evaluators` does not choose would be dropped without a word: refused when it
    is given on the command line (evaluator_options) or when the experiment's `<evaluator>_<option>` field is set
    away from its default."""
    defaults = type(exp)()
    given = [(e, option) for e in EVALUATORS if e not in exp.evaluators for option in EVALUATORS[e].resolved_options()
             if option in exp.evaluator_options.get(e, {})
             or getattr(exp, f"{e}_{option}", None) != getattr(defaults, f"{e}_{option}", None)]
    return [(False, f"{e}_{option}", f"is an option of the {e} evaluator, which evaluators={','.join(exp.evaluators)} "
                                     f"does not choose, so it would be ignored: add {e} to evaluators, or drop "
                                     f"{e}_{option}")
            for e, option in given]


def _eval_set_rules(exp: Experiment) -> tuple[list[tuple[str, str]], list[tuple[bool, str, str]]]:
    """The eval sets of `eval_data` ([(name, path)]; one unnamed set when the value does not parse, so the other
    rules still run) and their rules: the value parses, and the held-out split is read exactly when eval_split holds
    one out."""
    try:
        sets = parse_eval_data(exp.eval_data, reserved=tuple(EVALUATORS))
    except ConfigError as e:
        return [("", exp.eval_data)], [(False, "eval_data", str(e))]
    reads_split = any(path == SPLIT for _, path in sets)
    return sets, [
        (reads_split or exp.eval_split == 0, "eval_split",
         f"holds out training records that no eval set reads: set eval_data={SPLIT} (or name it among several, "
         f"heldout:{SPLIT},facts:data/eval.jsonl)"),
        (not reads_split or exp.eval_split > 0, "eval_data",
         f"reads the held-out split ({SPLIT}{', an empty eval_data' if not exp.eval_data.strip() else ''}), but "
         f"eval_split is 0: set eval_split (e.g. 0.05), or give eval_data a file"),
    ]


def _length_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    """Exactly one of max_steps and num_train_epochs decides how long a run trains: max_steps=0 hands it to
    num_train_epochs (transformers would let a positive max_steps silently override the epochs)."""
    return [
        (exp.max_steps >= 0, "max_steps", "must be >= 1, or 0 to train for num_train_epochs"),
        (exp.max_steps != 0 or exp.num_train_epochs > 0, "max_steps",
         "trains for num_train_epochs, which is 0: set max_steps >= 1, or num_train_epochs > 0"),
        (exp.max_steps <= 0 or exp.num_train_epochs == 0, "num_train_epochs",
         f"and max_steps = {exp.max_steps} both set the length of the run: set max_steps=0 to train for "
         f"epochs, or num_train_epochs=0 to train for max_steps"),
    ]


# transformers' schedulers that a harness run cannot drive, and why
_UNUSABLE_SCHEDULERS = {
    "reduce_lr_on_plateau": "follows the trainer's own evaluation loss, which a harness run does not compute",
    "greedy": "follows the trainer's own evaluation loss, which a harness run does not compute",
    "cosine_with_min_lr": "needs lr_scheduler_kwargs (min_lr), which the harness does not pass; use cosine",
    "cosine_warmup_with_min_lr": "needs lr_scheduler_kwargs (min_lr), which the harness does not pass; use cosine",
    "warmup_stable_decay": "needs lr_scheduler_kwargs (num_decay_steps), which the harness does not pass",
}


def lr_schedulers() -> list[str]:
    """The `lr_scheduler_type` values a run accepts: transformers' SchedulerType names it can drive."""
    from transformers import SchedulerType

    return [s.value for s in SchedulerType if s.value not in _UNUSABLE_SCHEDULERS]


def _schedule_rules(exp: Experiment) -> list[tuple[bool, str, str]]:
    schedulers = lr_schedulers()
    return [
        (exp.lr_scheduler_type in schedulers, "lr_scheduler_type",
         _UNUSABLE_SCHEDULERS.get(exp.lr_scheduler_type, f"must be one of {', '.join(schedulers)}")),
        (exp.warmup_ratio == 0 or exp.warmup_steps == -1, "warmup_ratio",
         f"and warmup_steps = {exp.warmup_steps} both set the warm-up: set one of them (warmup_steps=-1 with "
         f"warmup_ratio, or warmup_ratio=0 with warmup_steps)"),
        (exp.lr_scheduler_type != "constant" or (exp.warmup_steps <= 0 and exp.warmup_ratio == 0),
         "lr_scheduler_type", "'constant' has no warm-up, so the warm-up set would be ignored: use "
                              "constant_with_warmup, or warmup_steps=0"),
    ]


def _start_rules(exp: Experiment, launch: str | None, sweep: bool, stage: int | None) -> list[tuple[bool, str]]:
    readers = [e for e in exp.evaluators if EVALUATORS[e].needs_model]
    return [
        (not sweep or not exp.resume, f"resume={exp.resume}: a sweep resumes its own trials (run the sweep again); "
                                      f"resume one run with `python -m harness run {exp.name()} resume=RUN_ID`"),
        (not sweep or exp.early_stop_patience == 0,
         f"early_stop_patience={exp.early_stop_patience}: a sweep stops unpromising trials with its pruner "
         f"(--pruner); run the sweep with early_stop_patience=0"),
        (launch is None or exp.eval_mode == "blocking",
         f"eval_mode={exp.eval_mode} runs in one process: under --launch the ranks decide on rank 0's evaluations "
         f"at the same steps; use eval_mode=blocking"),
        (launch is None or exp.early_stop_patience == 0,
         f"early_stop_patience={exp.early_stop_patience}: the decision is made on rank 0's evaluations, which the "
         f"other ranks cannot see yet; run without --launch, or with early_stop_patience=0"),
        (not sweep or stage is None,
         f"deepspeed={exp.deepspeed}: a sweep runs each trial as one process; for several workers run `make "
         f"sweep-worker` on each machine or GPU instead"),
        (launch is None or launch in LAUNCHERS, f"--launch {launch!r}: expected one of {', '.join(LAUNCHERS)}"),
        (launch is not None or stage is None,
         f"deepspeed={exp.deepspeed} runs its ranks under a launcher: `python -m harness run {exp.name()} ... "
         f"--launch deepspeed --nproc 2` (make experiment LAUNCH=deepspeed NPROC=2)"),
        (exp.rollout_engines in ROLLOUT_ENGINES,
         f"rollout_engines={exp.rollout_engines!r}: expected one of {', '.join(ROLLOUT_ENGINES)}"),
        # vLLM's in-process engine takes the first GPU whatever the rank: every rank's engine would share GPU 0
        (exp.rollout_engines == "rank0" or not torch.cuda.is_available(),
         "rollout_engines=each_rank runs on CPU only for now: vLLM's in-process engine always takes GPU 0, so every "
         "rank's engine would share it; use rollout_engines=rank0"),
        (exp.rollout_engines == "rank0" or exp.needs_rollouts,
         f"rollout_engines={exp.rollout_engines}: {exp.name()} generates no rollouts (only online RL methods do)"),
        # rank 0 syncs the engine from its own copy of the policy for every rank's rollouts (harness.rl.rollouts)
        (stage != 3 or not exp.needs_rollouts,
         "online RL under ZeRO-3: rank 0 syncs the rollout engine from its own copy of the policy, which ZeRO-3 "
         "shards across ranks; use deepspeed=zero2 (or torchrun without DeepSpeed)"),
        (launch is None or stage != 3 or (exp.backend != "hf" and not readers),
         f"under ZeRO-3 the live model's weights are sharded across ranks, so in-loop evaluation must go through "
         f"the vLLM engine (backend=vllm, got {exp.backend}); evaluators that run the training model itself "
         f"({', '.join(readers) or 'none'}) need zero2 or no DeepSpeed"),
    ]


def _qlora_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None

