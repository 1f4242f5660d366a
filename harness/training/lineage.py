"""Runs as models: finding a run's best checkpoint from a reference (`RUN_ID`, `run:RUN_ID`, `run:latest:EXPERIMENT`),
telling full weights from a LoRA adapter and its base, and folding an adapter into full weights. `model=run:...`
(a stage chained on another run), `harness export` and the MLflow model of a run all start here.

A run's best checkpoint is the `best/` directory BestCheckpoint writes (weights or, for a PEFT run, the adapter
alone; the tokenizer with its chat template; selection.json with the metric, mode, step and value). The run's
`best_checkpoint` tag holds its absolute path; runs that lack the tag are looked up under their output_dir."""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import ConfigError
from harness.core.files import atomic_directory
from harness.core.models import ADAPTER_CONFIG, resolve_model
from harness.paths import REPO_ROOT
from harness.training.experiment import Experiment
from harness.training.tracking.queries import RunState, newest_run, run_state
from harness.training.tracking.registry import LoggedModel, log_model
from harness.training.tracking.store import shown_tracking_uri

RUN_PREFIX = "run:"
LATEST_PREFIX = "latest:"
SELECTION = "selection.json"
MERGED = "best-merged"  # beside best/: the adapter folded into its base, made once for model=run:... (LoRA parent)


@dataclass(frozen=True)
class RunCheckpoint:
    """A run's best checkpoint and what it is."""

    run_id: str
    experiment: str
    path: Path  # the best/ directory
    metric: str  # select_metric, e.g. eval/rouge/rougeL
    mode: str  # max or min
    step: int  # the step it was saved at
    value: float  # select_metric's value there
    base_model: str | None  # for an adapter: the model it adapts (a directory or a hub name); None = full weights
    params: dict[str, str]  # the run's MLflow params
    tags: dict[str, str]  # the run's MLflow tags

    @property
    def adapter(self) -> bool:
        """True when the checkpoint is a PEFT (LoRA/DoRA) adapter rather than full weights."""
        return self.base_model is not None

    @property
    def adapter_task(self) -> str | None:
        """An adapter's PEFT task type (SEQ_CLS for a reward model's, CAUSAL_LM for a language model's)."""
        return json.loads((self.path / ADAPTER_CONFIG).read_text()).get("task_type")

    @property
    def trust_remote_code(self) -> bool:
        return self.params.get("trust_remote_code", "false") == "true"


def is_run_ref(model: str) -> bool:
    """True for `model=run:RUN_ID` / `run:latest:EXPERIMENT`: a model that is another run's best checkpoint."""
    return model.startswith(RUN_PREFIX)


def _run_of(ref: str) -> RunState:
    """The run `ref` names: `RUN_ID`, `run:RUN_ID`, `latest:EXPERIMENT` or `run:latest:EXPERIMENT`.
    ConfigError when there is no such run."""
    body = ref.removeprefix(RUN_PREFIX).strip()
    if body.startswith(LATEST_PREFIX):
        experiment = body.removeprefix(LATEST_PREFIX).strip()
        if not experiment:
            raise ConfigError(f"{ref}: name the experiment, as run:latest:EXPERIMENT (e.g. run:latest:sft_qwen)")
        return newest_run(experiment, _not_a_finished_model, ref)
    if not body:
        raise ConfigError(f"{ref!r}: name a run, as RUN_ID, run:RUN_ID or run:latest:EXPERIMENT")
    state = run_state(body)
    if state is None:
        raise ConfigError(f"{ref}: no run {body} in {shown_tracking_uri()} (set MLFLOW_TRACKING_URI to the store the "
                          "run was logged to)")
    return state


def _not_a_finished_model(state: RunState) -> str | None:
    """Why `run:latest:EXPERIMENT` passes over a run: "the newest model" of a stage is its newest run that ended
    FINISHED with a complete best checkpoint. A RUNNING run's best can still change (or its process died); a
    FAILED or KILLED one stopped before the training it was set up for. Such a run is used only when named by its
    id."""
    if state.status != "FINISHED":
        return f"not FINISHED; name it as run:{state.run_id} to use its best checkpoint anyway"
    if not (_checkpoint_dir(state) / SELECTION).is_file():
        return f"no best checkpoint in {_checkpoint_dir(state)}"
    return None


def _checkpoint_dir(state: RunState) -> Path:
    """Where the run's best checkpoint is: its best_checkpoint tag, else OUTPUT_DIR/EXPERIMENT/RUN_ID/best."""
    if tagged := state.tags.get("best_checkpoint"):
        return Path(tagged)
    out_dir = Path(state.params.get("output_dir", "outputs"))
    return (out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir) / state.experiment / state.run_id / "best"


def find_checkpoint(ref: str) -> RunCheckpoint:
    """The best checkpoint of the run `ref` names (see _run_of; `run:latest:EXPERIMENT` is the experiment's newest
    FINISHED run with a best checkpoint). ConfigError, naming the run and the store or the directory, for an
    unknown run or one without a complete best checkpoint."""
    state = _run_of(ref)
    run_id = state.run_id
    path = _checkpoint_dir(state)
    selection = path / SELECTION
    if not selection.is_file():
        why = (f"{path} is missing (deleted, or written on another machine)" if state.tags.get("best_checkpoint")
               else f"it has no best checkpoint (no evaluation produced its select_metric; looked in {path})")
        raise ConfigError(f"{ref}: run {run_id} of experiment '{state.experiment}' ({state.status}): {why}")
    chosen = json.loads(selection.read_text())
    base = None
    if (path / ADAPTER_CONFIG).is_file():
        base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or None
        if base is None:
            raise ConfigError(f"{ref}: {path / ADAPTER_CONFIG} names no base_model_name_or_path")
    return RunCheckpoint(run_id, state.experiment, path.resolve(), chosen["metric"], chosen["mode"],
                         int(chosen["step"]), float(chosen["value"]), base, state.params, state.tags)


def best_checkpoint(ref: str) -> Path:
    """The best checkpoint directory of the run `ref` names: `RUN_ID`, `run:RUN_ID`, `latest:EXPERIMENT` or
    `run:latest:EXPERIMENT`. Full weights, or a PEFT adapter (see find_checkpoint for its base model)."""
    return find_checkpoint(ref).path


def load_merged(ckpt: RunCheckpoint):
    """(model, tokenizer) of an adapter checkpoint loaded on its base model on the CPU in float32 and folded into
    it: a plain transformers model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    trust = ckpt.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=trust)
    if ckpt.adapter_task == "SEQ_CLS":  # a reward model's adapter: the base gets the same one-score head (load_model)
        base = AutoModelForSequenceClassification.from_pretrained(ckpt.base_model, dtype=torch.float32, num_labels=1,
                                                                  trust_remote_code=trust)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(ckpt.base_model, dtype=torch.float32, trust_remote_code=trust)
    return PeftModel.from_pretrained(base, ckpt.path).merge_and_unload(), tokenizer


def write_merged(ckpt: RunCheckpoint, directory: Path) -> None:
    """An adapter checkpoint folded into its base (see load_merged), with its tokenizer and selection.json, written
    into the existing `directory`."""
    model, tokenizer = load_merged(ckpt)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / SELECTION).write_text((ckpt.path / SELECTION).read_text())


def model_directory(ckpt: RunCheckpoint) -> Path:
    """A directory of full weights to start a new run from: best/ itself, or for an adapter best/ folded into its
    base, made once beside it (remade when best/ has changed since, e.g. by a resumed run). Processes that resolve
    the same parent at once (sweep workers) take turns on a lock file beside it: the first merges, the others wait
    and reuse its directory, so none renames over a directory another is reading."""
    if not ckpt.adapter:
        return ckpt.path
    merged = ckpt.path.with_name(MERGED)
    selection = merged / SELECTION

    def current() -> bool:
        return selection.is_file() and selection.read_text() == (ckpt.path / SELECTION).read_text()

    if current():
        return merged
    with open(merged.with_name(f".{MERGED}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the OS drops it if its holder dies
        if current():  # made by the process that held the lock before us
            return merged
        print(f"[model] folding run {ckpt.run_id}'s LoRA adapter (step {ckpt.step}) into {ckpt.base_model} -> "
              f"{merged}", flush=True)
        with atomic_directory(merged, replace=True) as tmp:
            write_merged(ckpt, tmp)
    return merged


def resolve_experiment_model(exp: Experiment) -> str:
    """The directory (or hub name) `exp.model` stands for. A run reference is pinned to the run it names
    (`run:latest:EXPERIMENT` becomes `run:RUN_ID` in `exp.model`, so the run's params name its parent for good and
    a resume starts from the same one) and resolves to that run's best checkpoint as full weights."""
    if not is_run_ref(exp.model):
        return resolve_model(exp.model)
    ckpt = find_checkpoint(exp.model)
    path = model_directory(ckpt)
    print(f"[model] {exp.model}: run {ckpt.run_id} of {ckpt.experiment}, best checkpoint at step {ckpt.step} "
          f"({ckpt.metric}={ckpt.value:.4g}){', adapter folded into ' + ckpt.base_model if ckpt.adapter else ''}: "
          f"{path}", flush=True)
    exp.model = RUN_PREFIX + ckpt.run_id
    return str(path)


def parent_run_id(exp: Experiment) -> str | None:
    """The run `exp` starts from (after resolve_experiment_model pinned it), or None for any other model."""
    return exp.model.removeprefix(RUN_PREFIX) if is_run_ref(exp.model) else None


REWARD_MODEL_FIELD = "reward_model"  # the RL experiments' field (grpo_qwen, rloo_qwen, ppo_qwen)


def not_a_reward_model(directory: Path) -> str | None:
    """None when `directory` holds a reward model: full weights of a *ForSequenceClassification model with one
    label, or a sequence-classification (SEQ_CLS) adapter, as rm_qwen writes them; else what it holds instead."""
    if (directory / ADAPTER_CONFIG).is_file():
        task = json.loads((directory / ADAPTER_CONFIG).read_text()).get("task_type")
        return None if task == "SEQ_CLS" else f"a {task or 'untyped'} adapter"
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {})  # transformers writes one entry per label
    if labels == 1 and any(a.endswith("ForSequenceClassification") for a in architectures):
        return None
    return f"a {', '.join(architectures) or 'model of unnamed architecture'}" + (
        f" with {labels} labels" if labels > 1 else "")


def reward_model_checkpoint(ref: str) -> RunCheckpoint:
    """The best checkpoint of the run `ref` names (see find_checkpoint), refused unless it is a reward model: full
    weights of a *ForSequenceClassification model with one label, or a sequence-classification (SEQ_CLS) adapter,
    as rm_qwen writes them."""
    ckpt = find_checkpoint(ref)
    if (what := not_a_reward_model(ckpt.path)) is not None:
        raise ConfigError(f"{REWARD_MODEL_FIELD}={ref}: run {ckpt.run_id} of experiment '{ckpt.experiment}' is not a "
                          f"reward model (its best checkpoint {ckpt.path} is {what}, not a one-score head): name a "
                          "run of rm_qwen, e.g. reward_model=run:latest:rm_qwen")
    return ckpt


def resolve_reward_model(exp: Experiment) -> str | None:
    """For an experiment whose `reward_model` field is a run reference: checks that the run is a reward model, pins
    the field to `run:RUN_ID` (as resolve_experiment_model pins `model`, so the params, a resume and every rank name
    the same run) and returns that run id. None for a directory, a name or an empty field."""
    ref = getattr(exp, REWARD_MODEL_FIELD, "")
    if not is_run_ref(ref):
        return None
    ckpt = reward_model_checkpoint(ref)
    print(f"[model] {REWARD_MODEL_FIELD}={ref}: run {ckpt.run_id} of {ckpt.experiment}, best checkpoint at step "
          f"{ckpt.step} ({ckpt.metric}={ckpt.value:.4g}){', an adapter on ' + ckpt.base_model if ckpt.adapter else ''}"
          f": {ckpt.path}", flush=True)
    setattr(exp, REWARD_MODEL_FIELD, RUN_PREFIX + ckpt.run_id)
    return ckpt.run_id


def reward_model_run_id(exp: Experiment) -> str | None:
    """The run whose reward model `exp` uses (after resolve_reward_model pinned it), or None."""
    ref = getattr(exp, REWARD_MODEL_FIELD, "")
    return ref.removeprefix(RUN_PREFIX) if is_run_ref(ref) else None


def pinned_overrides(exp: Experiment) -> list[str]:
    """`model=` and, when it names a run, `reward_model=` as prepare pinned them: what a multi-process launch passes
    to its ranks, so that every rank loads the same runs even if a newer one appears meanwhile."""
    reward = [f"{REWARD_MODEL_FIELD}={getattr(exp, REWARD_MODEL_FIELD)}"] if reward_model_run_id(exp) else []
    return [f"model={exp.model}", *reward]


def reward_model_path(reward_model: str) -> str:
    """What the reward model (harness.rl.rewards.RewardModel) loads for a `reward_model` field: a run reference's
    best checkpoint (an adapter there is merged into its base as RewardModel loads it), else the value as given."""
    return str(reward_model_checkpoint(reward_model).path) if is_run_ref(reward_model) else reward_model


def log_best_model(run_id: str, directory: Path, register_as: str = "") -> LoggedModel:
    """Logs the best checkpoint in `directory` (a run's best/) as the MLflow model of run `run_id`, and registers it
    under `register_as` when given; its selection (metric, mode, step, value) becomes the model version's tags."""
    chosen = json.loads((directory / SELECTION).read_text())
    tags = {"select_metric": chosen["metric"], "select_mode": chosen["mode"], "select_step": str(chosen["step"]),
            "select_value": repr(float(chosen["value"])), "run_id": run_id}
    return log_model(run_id, directory, (directory / ADAPTER_CONFIG).is_file(), tags, register_as)
