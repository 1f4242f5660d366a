"""The in-loop vLLM engine: one long-lived in-process engine per run, fed the live weights in memory."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from harness.core.generation import Completion, GenParams
from harness.core.ranks import world_size
from harness.engines.weight_sync import InPlaceSync, LoraFold, Source


def inference_weights(model: torch.nn.Module) -> dict[str, Source]:
    """The model's weights under the base model's parameter names, with active LoRA (or DoRA) adapters to fold in:
    a plain LoRA layer's as a LoraFold (folded by the sync, into the engine's tensor), a variant's merged here.

    Folds write new tensors: merging in place and unmerging afterwards would leave rounding error in the weights
    being trained, accumulating with every evaluation.
    """
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return model.state_dict()
    base = model.get_base_model()
    weights = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        _dequantize_4bit(base, weights)
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = f"{name}.weight"
            for adapter in (a for a in module.active_adapters if a in module.lora_A):
                variant = module.lora_variant.get(adapter)  # DoRA and other variants merge their own way
                if variant is not None:
                    weights[key] = variant.merge_safe(module, adapter, _dense(weights[key]).clone())
                elif (isinstance(module, LoraLinear) and not module.fan_in_fan_out
                      and not module.lora_bias.get(adapter, False)):
                    fold = weights[key] if isinstance(weights[key], LoraFold) else LoraFold(weights[key], [])
                    fold.terms.append((module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                                       module.scaling[adapter]))
                    weights[key] = fold
                else:
                    dense = _dense(weights[key])
                    weights[key] = dense + module.get_delta_weight(adapter).to(dense.dtype)
    return weights


def _dense(source: Source) -> torch.Tensor:
    return source.merged() if isinstance(source, LoraFold) else source


def _dequantize_4bit(base: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """QLoRA's frozen base holds packed 4-bit weights with their quantization state as extra state-dict entries
    (`<name>.weight.absmax`, ...); the engine's model is unquantized, so it gets each weight dequantized (bitsandbytes'
    own dequantization, through PEFT) and none of those entries. Only on a GPU (bitsandbytes' 4-bit layers); checked
    by `make gpu-check`."""
    from peft.utils.integrations import dequantize_module_weight

    for name, module in base.named_modules():
        if type(getattr(module, "weight", None)).__name__ != "Params4bit":
            continue
        key = f"{name.removesuffix('.base_layer')}.weight"
        for extra in [k for k in weights if k.startswith(f"{key}.")]:
            del weights[extra]
        weights[key] = dequantize_module_weight(module)


def _release_default_group() -> None:
    """The in-process engine made torch.distributed's default group for itself, a group of one. On rank 0 of a
    multi-process training run the trainer needs that slot for the ranks' group, so it is dropped again. The
    engine's group coordinators all have one member, and with one member vLLM never communicates through them;
    their handles are removed so that the engine's shutdown does not destroy groups that no longer exist."""
    from vllm.distributed import parallel_state

    for coordinator in vars(parallel_state).values():
        if isinstance(coordinator, parallel_state.GroupCoordinator):
            if coordinator.world_size != 1:
                raise RuntimeError(f"the in-loop engine's group {coordinator.unique_name} spans "
                                   f"{coordinator.world_size} ranks; it is meant to run on rank 0 alone")
            for handle in ("device_group", "cpu_group"):
                if hasattr(coordinator, handle):
                    delattr(coordinator, handle)
    torch.distributed.destroy_process_group()


# this process's live engines: vLLM keeps its parallel groups per process, and one engine's shutdown destroys them
_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def _parallel_state_kept() -> Iterator[None]:
    """Inside, an engine's shutdown leaves vLLM's process-wide parallel groups (and torch.distributed's default
    group) alone: the engines still running in this process use them (see VLLMBackend.close)."""
    from vllm.v1.engine import core

    cleanup = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        yield
    finally:
        core.cleanup_dist_env_and_memory = cleanup


class _DerivedBufferNotice(logging.Filter):
    """Drops vLLM's per-sync warning that RotaryEmbedding got no weights: its cos/sin cache is derived from the
    config, not a weight, so there is nothing to load and the cached values are kept, as intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


def _configure_vllm_env() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings are about tuning we chose not to do
    # In-process engine: the only mode where live weights can be pushed without a checkpoint round trip.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take most of RAM
        # Without these vLLM pins torch to one thread and binds it to a core, slowing training in the same process.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 on a GPU (as RL and eval stacks run vLLM there), float32 on CPU. On CPU, float32 is the
    precision the weights are trained in, so greedy output equals HF's exactly; vllm-cpu 0.32 in bfloat16 is about
    2x faster but died with SIGILL on some prompts of the embedded model here, so it is opt-in only."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def request_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of one prompt's request: a hash of (run seed, training step, the prompt's index), so every
    prompt of a batch gets a stream of its own (one seed for all made two identical prompts sample the same text,
    and correlated the samples of all the others) and a rerun with the same seed repeats it exactly."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a torch generator's seed range


class VLLMBackend:
    """One vLLM engine for the whole run; `sync_weights` copies live weights into it in memory."""

    name = "vllm"

    def __init__(self, model_dir: str, seed: int = 0, max_model_len: int = 512, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", lora_rank: int | None = None, trust_remote_code: bool = False):
        """`lora_rank`: serve a LoRA adapter as a LoRA request (see `sync_weights`) instead of folding it in;
        `trust_remote_code`: let vLLM run the code a hub model ships (the run's trust_remote_code field)."""
        _configure_vllm_env()
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_DerivedBufferNotice())
        on_gpu = torch.cuda.is_available()
        group_was_free = not torch.distributed.is_initialized()
        lora = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1) if lora_rank else {}
        self.llm = LLM(
            model=model_dir, seed=seed, max_model_len=max_model_len,
            dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
            # CPU graph compilation costs ~25 s per engine start for ~10% more tokens/s: not worth it in a run.
            enforce_eager=not on_gpu, gpu_memory_utilization=gpu_memory_utilization,
            # a prompt prefilled in chunks makes vLLM rewind a seeded request's generator, which a CPU generator
            # cannot do ("CPU Generator does not use offset"): a large seeded rollout batch crashed the engine
            enable_chunked_prefill=on_gpu, **lora,
        )
        if group_was_free and world_size() > 1:
            _release_default_group()
        self.serve_lora = bool(lora_rank)
        self.lora_request = None
        self.in_place: InPlaceSync | str | None = None  # the sync's copy plan, or why it has none; made on first use
        self._adapter_dirs = tempfile.TemporaryDirectory(prefix="lora-requests-") if lora_rank else None
        self.logprobs([[0]], [[0]])  # first prompt-logprob call compiles kernels; pay it here, not in step 0
        _LIVE_ENGINES.add(self)

    def use_adapter(self, directory: str) -> None:
        """Generate through a saved LoRA adapter from now on (an engine built with lora_rank >= its rank): how a
        LoRA run's checkpoint is served without folding it into the base weights."""
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest(Path(directory).name, 1, str(directory))

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Fold the live weights (LoRA included) into the engine; or, when serving LoRA requests, save only the
        adapter and point the next requests at it under a fresh id (vLLM caches adapters by id)."""
        if self.serve_lora:
            from vllm.lora.request import LoRARequest

            number = self.lora_request.lora_int_id + 1 if self.lora_request else 1
            directory = Path(self._adapter_dirs.name) / f"adapter-{number}"
            model.save_pretrained(directory)
            self.lora_request = LoRARequest(f"adapter-{number}", number, str(directory))
            if number > 1:
                shutil.rmtree(Path(self._adapter_dirs.name) / f"adapter-{number - 1}", ignore_errors=True)
            return
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        sources = inference_weights(model)
        if self.in_place is None:
            self.in_place = InPlaceSync.build(runner.get_model(), sources)
            if isinstance(self.in_place, str):
                logging.getLogger(__name__).info("weight sync through vLLM's loader: %s", self.in_place)
        if isinstance(self.in_place, InPlaceSync):
            self.in_place.write(sources)
        else:
            runner.reload_weights(weights_iterator=((k, _dense(v)) for k, v in sources.items()))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def generate(self, prompt_ids: list[list[int]], params: GenParams, step: int = 0,
                 indices: Sequence[int] | None = None) -> list[Completion]:
        """Sampling (temperature > 0) seeds each prompt's request with request_seed(params.seed, `step`, its index):
        `indices` (default 0, 1, ...) name the prompts stably, e.g. by their place in a prompt file, so that a
        prompt's samples do not depend on which others share its batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        common = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                      max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                      logprobs=0 if params.sample_logprobs else None)
        if params.temperature > 0:
            indices = range(len(prompt_ids)) if indices is None else indices
            sp = [SamplingParams(**common, seed=request_seed(params.seed, step, i)) for i in indices]
            if len(sp) != len(prompt_ids):
                raise ValueError(f"{len(sp)} prompt indices for {len(prompt_ids)} prompts")
        else:
            sp = SamplingParams(**common)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp, use_tqdm=False,
                                 lora_request=self.lora_request)
        if not params.sample_logprobs:
            return [Completion([c.text for c in o.outputs], sum(len(c.token_ids) for c in o.outputs)) for o in outs]
        return [Completion([c.text for c in o.outputs], sum(len(c.token_ids) for c in o.outputs),
                           [list(c.token_ids) for c in o.outputs],
                           [[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs, strict=True)]
                            for c in o.outputs]) for o in outs]

    def logprobs(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, continuation_ids, strict=True)]
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                                 lora_request=self.lora_request)
        result = []
        for p, c, o in zip(prompt_ids, continuation_ids, outs, strict=True):
            entries = o.prompt_logprobs[len(p) :]
            result.append([entry[tok].logprob for tok, entry in zip(c, entries, strict=True)])
        return result

    def close(self) -> None:
        """Shuts the engine down now. Another engine of this process (a test's shared engine beside an in-process
        run's, two models compared) keeps vLLM's parallel groups, which this engine's shutdown would destroy."""
        _LIVE_ENGINES.discard(self)
        with _parallel_state_kept() if len(_LIVE_ENGINES) else contextlib.nullcontext():
            del self.llm
            gc.collect()  # the engine shuts down when collected
        if self._adapter_dirs is not None:
            self._adapter_dirs.cleanup()
