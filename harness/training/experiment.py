"""The `Experiment` base class: its dataclass fields are the configuration, its methods the hooks.

An experiment file in `experiments/` subclasses it, adds the fields of its method with defaults that run on
the embedded model, and implements `build_trainer`. No training logic lives here.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.core.errors import ConfigError
from harness.training.distributed import deepspeed_config

BACKENDS = ("vllm", "hf")
PEFT_KINDS = ("none", "lora", "dora", "qlora")
GENERATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    # none, zero2, zero3 (configs in harness/training/deepspeed_configs/) or a DeepSpeed JSON file; needs a launch
    deepspeed: str = "none"
    output_dir: str = "outputs"
    # Set from the command line as <evaluator>_<option>=value for options no field declares (see make_evaluators).
    evaluator_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rules(self) -> list[tuple[bool, str, str]]:
        """The experiment's own rules beyond the common ones, as (holds, field or "", why not); checked with all
        the others by harness.training.settings.check_settings."""
        return []

    def deepspeed_config(self) -> str | None:
        """The path of the DeepSpeed config the trainer gets, or None without DeepSpeed."""
        path = deepspeed_config(self.deepspeed)
        return str(path) if path else None

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
        """Validate the training records and convert them to the rows the trainer reads (see harness.core.records).
        Called before anything is written, so a bad record stops the run with its file, line and field."""
        raise NotImplementedError

    def trainer_args(self, output_dir: str) -> dict[str, Any]:
        """The arguments every method in harness.training.methods takes from the base fields."""
        return dict(output_dir=output_dir, max_steps=self.max_steps, learning_rate=self.learning_rate,
                    batch_size=self.batch_size, seed=self.seed, max_length=self.max_length,
                    deepspeed=self.deepspeed_config())

    def build_trainer(self, model, tokenizer, rows: list[dict], callbacks: list, output_dir: str):
        """Return a transformers/TRL Trainer that trains `model`; the harness calls `.train()` on it."""
        raise NotImplementedError

