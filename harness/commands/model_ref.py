"""What `serve`, `chat`, `sample` and `data self-pairs` generate from: a model named by a run (its best checkpoint),
a directory (full weights, or a LoRA adapter served on its base model) or a model name, and the in-process vLLM
engine for it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import ConfigError
from harness.core.models import ADAPTER_CONFIG, load_tokenizer, resolve_model
from harness.core.prompts import render_prompt

if TYPE_CHECKING:
    from harness.engines.vllm_engine import VLLMBackend

_RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


@dataclass(frozen=True)
class ModelRef:
    ref: str  # as given
    base: str  # the directory (or hub name) vLLM loads
    adapter: str | None = None  # a LoRA adapter directory served on `base`
    adapter_rank: int | None = None
    tokenizer_dir: str = ""  # where the tokenizer and its chat template come from (the checkpoint's own)
    run_id: str | None = None  # the training run whose best checkpoint this is

    def describe(self) -> dict[str, str]:
        """The producer fields a record or an MLflow run carries."""
        found = {"source": self.ref, "model": self.adapter or self.base}
        return {**found, "source_run": self.run_id} if self.run_id else found


def _experiment_names() -> set[str]:
    from experiments import discover

    return set(discover())


def resolve_ref(ref: str) -> ModelRef:
    """`ref`: a directory, `RUN_ID`, `run:RUN_ID`, `run:latest:EXPERIMENT`, an experiment name (its newest run), or
    a model name resolve_model knows (tiny-qwen2, smollm2, a .gguf file, a hub name)."""
    run_id = None
    path = Path(ref)
    if not path.is_dir() and (ref.startswith("run:") or _RUN_ID.fullmatch(ref) or ref in _experiment_names()):
        from harness.training.lineage import find_checkpoint  # opens the MLflow store only for a run reference

        ckpt = find_checkpoint(ref if ref.startswith("run:") or _RUN_ID.fullmatch(ref) else f"run:latest:{ref}")
        path, run_id = ckpt.path, ckpt.run_id
    if not path.is_dir():
        resolved = resolve_model(ref)
        return ModelRef(ref, resolved, tokenizer_dir=resolved)
    path = path.resolve()
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        return ModelRef(ref, str(path), tokenizer_dir=str(path), run_id=run_id)
    adapter = json.loads(config.read_text())
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config}: names no base_model_name_or_path, so the adapter's base model is unknown")
    ranks = [adapter.get("r") or 0, *(adapter.get("rank_pattern") or {}).values()]
    # the adapter's own tokenizer (saved with every checkpoint) carries the chat template it was trained with
    tokenizer_dir = str(path) if (path / "tokenizer_config.json").is_file() else resolve_model(base)
    return ModelRef(ref, resolve_model(base), str(path), int(max(ranks)), tokenizer_dir, run_id)


def open_engine(model: ModelRef, prompt_ids: list[list[int]], max_new_tokens: int, seed: int = 0,
                max_model_len: int = 0) -> VLLMBackend:
    """An in-process vLLM engine for `model` (float32: the training precision), its context sized for the longest
    prompt plus `max_new_tokens` (at least 256) unless `max_model_len` is given; an adapter is served as a LoRA
    request on the base model."""
    from harness.engines.vllm_engine import VLLMBackend

    length = max_model_len or max(256, max(map(len, prompt_ids), default=0) + max_new_tokens)
    rank = vllm_lora_rank(model.adapter_rank) if model.adapter_rank else None
    engine = VLLMBackend(model.base, seed=seed, max_model_len=length, dtype="float32", lora_rank=rank)
    if model.adapter:
        engine.use_adapter(model.adapter)
    return engine


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts (it takes only a few values) that holds an adapter of `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise ConfigError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {allowed[-1]}")
    return fitting[0]


def render_prompts(model: ModelRef, prompts: list[str]):
    """(tokenizer, prompt token ids through the model's chat template) for `prompts`."""
    tokenizer = load_tokenizer(model.tokenizer_dir)
    return tokenizer, [render_prompt(tokenizer, p) for p in prompts]
