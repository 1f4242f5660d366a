"""The `Experiment` base class: its dataclass fields are the configuration, its methods the hooks.

An experiment file in `experiments/` subclasses it, adds the fields of its method with defaults that run on
the embedded model, and implements `build_trainer`. No training logic lives here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.errors import ConfigError

BACKENDS = ("vllm", "hf")
PEFT_KINDS = ("none", "lora", "dora", "qlora")
GENERATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _qlora_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@dataclass
class Experiment:
    """Fields every experiment accepts."""

    model_head: ClassVar[str] = "causal_lm"  # "reward" for a scalar-score head (reward models)
    # True for online RL: build_trainer then also gets `backend`, the run's vLLM engine, to generate rollouts
    needs_rollouts: ClassVar[bool] = False

    model: str = "tiny-qwen2"  # "tiny-qwen2", a local model directory, or a Hugging Face hub name
    train_data: str = "data/preference.jsonl"  # local .jsonl/.json/.parquet, or hub "name[:split]"
    eval_data: str = "data/eval.jsonl"
    data_format: str = "auto"  # train_data's record format, detected from its keys; or see harness/formats.py
    max_steps: int = 60
    eval_every: int = 20
    eval_limit: int = 64  # first N eval records; 0 means all
    seed: int = 0
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_length: int = 128  # prompt + completion tokens seen by the trainer
    backend: str = "vllm"  # generation for in-loop evaluation: "vllm" (weights synced in memory) or "hf"
    max_new_tokens: int = 48
    generation_dtype: str = "auto"  # vLLM engine precision: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    evaluators: list[str] = field(default_factory=lambda: ["perplexity", "bleu", "rouge"])
    select_metric: str = "eval/rouge/rougeL"  # the best checkpoint is kept by this metric
    select_mode: str = "max"  # "max" or "min"
    peft: str = "none"  # none (full weights), lora, dora, qlora (GPU + bitsandbytes only)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or module names: q_proj,v_proj
    # How vLLM sees a LoRA adapter: "merge" folds it into the synced weights; "request" serves it as a LoRA request
    lora_serving: str = "merge"
    # none, zero2, zero3 (configs in harness/deepspeed_configs/) or a DeepSpeed JSON file; needs a launch
    deepspeed: str = "none"
    output_dir: str = "outputs"
    # Set from the command line as <evaluator>_<option>=value for options no field declares (see make_evaluators).
    evaluator_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values that a type alone cannot; raise ConfigError naming the field."""
        from evaluators import EVALUATORS

        checks = [
            (self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}"),
            (self.select_mode in ("max", "min"), "select_mode", "must be 'max' or 'min'"),
            (self.generation_dtype in GENERATION_DTYPES, "generation_dtype",
             f"must be one of {', '.join(GENERATION_DTYPES)}"),
            (self.max_steps >= 1, "max_steps", "must be >= 1"),
            (self.eval_every >= 1, "eval_every", "must be >= 1"),
            (self.eval_limit >= 0, "eval_limit", "must be >= 0 (0 means the whole eval set)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (bool(self.evaluators), "evaluators", "must name at least one evaluator"),
            (self.peft in PEFT_KINDS, "peft", f"must be one of {', '.join(PEFT_KINDS)}"),
            (self.lora_serving in ("merge", "request"), "lora_serving", "must be 'merge' or 'request'"),
            (self.lora_serving == "merge" or (self.peft == "lora" and self.backend == "vllm"), "lora_serving",
             "'request' needs peft=lora and backend=vllm (vLLM serves plain LoRA adapters only)"),
            (self.peft != "qlora" or _qlora_available(), "peft",
             "needs a CUDA GPU and bitsandbytes (4-bit NF4 base weights); this machine has none: use peft=lora, "
             "which trains the same adapter on full-precision weights"),
        ]
        unknown = [e for e in self.evaluators if e not in EVALUATORS]
        checks.append((not unknown, "evaluators", f"unknown {unknown}; known: {', '.join(sorted(EVALUATORS))}"))
        selectable = [f"eval/{e}/{m}" for e in self.evaluators if e in EVALUATORS for m in EVALUATORS[e].metrics]
        checks.append((self.select_metric in selectable or unknown, "select_metric",
                       f"is not produced by the chosen evaluators; choose one of: {', '.join(selectable)}"))
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"{self.name()}: field '{name}' = {getattr(self, name)!r} {why}")
        try:
            self.deepspeed_config()
        except ConfigError as e:
            raise ConfigError(f"{self.name()}: {e}") from None

    def deepspeed_config(self) -> str | None:
        """The path of the DeepSpeed config the trainer gets, or None without DeepSpeed."""
        from harness.distributed import deepspeed_config, zero_stage

        path = deepspeed_config(self.deepspeed)
        if path is None:
            return None
        zero_stage(path)  # a malformed file stops here, naming its line
        return str(path)

    @classmethod
    def name(cls) -> str:
        return cls.__module__.rsplit(".", 1)[-1]

    @classmethod
    def description(cls) -> str:
        return (inspect.getdoc(cls) or "").partition("\n")[0]

    def params(self) -> dict[str, Any]:
        """Every field, flattened to MLflow-loggable scalars."""
        values = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "evaluator_options"]
        values += [(f"{e}_{k}", v) for e, opts in self.evaluator_options.items() for k, v in opts.items()]
        return {name: ",".join(map(str, v)) if isinstance(v, list) else v for name, v in values}

    def make_evaluators(self) -> list:
        """The evaluators by name, each configured from this experiment's `<evaluator>_<option>` fields
        (e.g. `humaneval_n` sets HumanEval's `n`) and then from `evaluator_options` (the same names given on the
        command line where no field declares them); other options keep the evaluator's default."""
        from evaluators import EVALUATORS

        made = []
        for name in self.evaluators:
            cls = EVALUATORS[name]
            options = inspect.signature(cls.__init__).parameters
            kwargs = {p: getattr(self, f"{name}_{p}") for p in options if hasattr(self, f"{name}_{p}")}
            made.append(cls(**{**kwargs, **self.evaluator_options.get(name, {})}))
        return made

    def search_space(self, trial) -> dict[str, Any]:
        """The fields a sweep tunes: call `trial.suggest_*` with each field's name and return {field: value}.
        `self` holds the fields fixed for every trial (defaults and overrides), so the space may depend on them
        (e.g. tune `lora_rank` only when `peft` is set)."""
        raise ConfigError(f"{self.name()} declares no search space: add a `search_space(self, trial)` method "
                          f"to experiments/{self.name()}.py (see experiments/simpo_qwen.py)")

    def train_rows(self, records: list) -> list[dict]:
        """Validate the training records and convert them to the rows the trainer reads (see harness.data).
        Called before anything is written, so a bad record stops the run with its file, line and field."""
        raise NotImplementedError

    def trainer_args(self, output_dir: str) -> dict[str, Any]:
        """The arguments every method in harness.methods takes from the base fields."""
        return dict(output_dir=output_dir, max_steps=self.max_steps, learning_rate=self.learning_rate,
                    batch_size=self.batch_size, seed=self.seed, max_length=self.max_length,
                    deepspeed=self.deepspeed_config())

    def build_trainer(self, model, tokenizer, rows: list[dict], callbacks: list, output_dir: str):
        """Return a transformers/TRL Trainer that trains `model`; the harness calls `.train()` on it."""
        raise NotImplementedError


def discover() -> dict[str, type[Experiment]]:
    """Every experiment class in the `experiments` package, by module name."""
    import experiments

    found = {}
    for info in pkgutil.iter_modules(experiments.__path__):
        found[info.name] = load_class(info.name)
    return found


def load_class(name: str) -> type[Experiment]:
    import experiments

    if name not in {i.name for i in pkgutil.iter_modules(experiments.__path__)}:
        known = sorted(i.name for i in pkgutil.iter_modules(experiments.__path__))
        raise ConfigError(f"unknown experiment '{name}'; known: {', '.join(known)}")
    module = importlib.import_module(f"experiments.{name}")
    classes = [c for c in vars(module).values()
               if inspect.isclass(c) and issubclass(c, Experiment) and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ConfigError(f"experiments/{name}.py must define exactly one Experiment subclass, found {len(classes)}")
    return classes[0]
