"""Live training weights into the in-loop vLLM engine's own tensors, copied in place.

vLLM's `reload_weights` runs every weight through the model loader again: 0.37 s for SmolLM2-135M in float32, where a
straight copy of its 540 MB takes about 0.03 s. Here each sync is a fixed plan of `copy_` calls into the engine's own
parameters, the fused projections (q/k/v, gate/up) written as row slices, and LoRA adapters folded straight into the
destination (one `addmm` each). On CPU vLLM keeps a linear layer's weight only inside a oneDNN (or sgl-kernel) handle,
packed into a blocked layout that runs its matmuls 1.5-3x faster than torch's on the unpacked weight; such a layer gets
a plain weight tensor once to copy into (the engine's weights then take twice their memory), and after each copy
vLLM's own dispatch packs it into a fresh handle.

Only for the architectures whose vLLM weight layout the tests check against `reload_weights`, unquantized, with
every engine parameter covered exactly once by the training model's weights; anything else keeps `reload_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# vLLM model classes whose parameters are the HF checkpoint's, only fused along dim 0 by `packed_modules_mapping`
# (and the vocabulary padded): generation after an in-place sync is checked against reload_weights for these.
IN_PLACE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass
class LoraFold:
    """A frozen base weight plus its active LoRA adapters' scaled B @ A, for the sync to fold in: straight into the
    engine's tensor (no merged temporary) when the dtypes match, through one merged tensor when they do not."""

    base: torch.Tensor
    terms: list[tuple[torch.Tensor, torch.Tensor, float]]  # (B, A, scale)

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    def merged(self) -> torch.Tensor:
        out = self.base.clone()
        self._add_terms(out)
        return out

    def write(self, dst: torch.Tensor) -> None:
        if dst.dtype != self.base.dtype:
            dst.copy_(self.merged())
            return
        (b, a, scale), rest = self.terms[0], self.terms[1:]
        torch.addmm(self.base, b.to(dst.dtype), a.to(dst.dtype), alpha=scale, out=dst)
        self._add_terms(dst, rest)

    def _add_terms(self, out: torch.Tensor, terms: list | None = None) -> None:
        for b, a, scale in self.terms if terms is None else terms:
            out.addmm_(b.to(out.dtype), a.to(out.dtype), alpha=scale)


Source = torch.Tensor | LoraFold


class InPlaceSync:
    """A fixed plan of copies from the training model's weights (by HF name) into the engine model's parameters."""

    def __init__(self, plan: list[tuple[str, torch.nn.Module, str, int, int]], packed: list[torch.nn.Module]):
        # (HF weight name, engine module, its parameter's name, first row, row after the last): a parameter is looked
        # up at each write, since repacking a layer may give its bias a new tensor
        self.plan = plan
        self.packed = packed  # CPU linear layers whose handles are rebuilt from their weights after each write

    @classmethod
    def build(cls, engine_model: torch.nn.Module, sources: Mapping[str, Source]) -> InPlaceSync | str:
        """The plan, or why there is none (then the caller keeps reload_weights and nothing was changed). On CPU, a
        plan gives the engine's linear layers plain weight tensors, uninitialised: build it only right before the
        first in-place sync, which writes every one of them."""
        arch = type(engine_model).__name__
        if arch not in IN_PLACE_ARCHITECTURES:
            return f"{arch} is not among the architectures checked for in-place sync: {IN_PLACE_ARCHITECTURES}"
        if getattr(engine_model, "quant_config", None) is not None:
            return "the engine's model is quantized"
        packed = getattr(engine_model, "packed_modules_mapping", {})
        modules = dict(engine_model.named_modules())
        plan, used = [], set()
        # every engine parameter is filled exactly: a fused one by its parts along dim 0, in the mapping's order
        for pname, shape in _engine_shapes(engine_model).items():
            module, _, leaf = pname.rpartition(".")
            owner, _, short = module.rpartition(".")
            parts = [f"{owner}.{p}.{leaf}" if owner else f"{p}.{leaf}" for p in packed.get(short, [])] or [pname]
            if any(p not in sources for p in parts):
                return f"no training weight for the engine's {pname} (looked for {', '.join(parts)})"
            offset = 0
            for part in parts:
                part_shape = tuple(sources[part].shape)
                if part_shape[1:] != shape[1:]:
                    return f"{part} has shape {part_shape}, the engine's {pname} {shape}"
                plan.append((part, modules[module], leaf, offset, offset + part_shape[0]))
                used.add(part)
                offset += part_shape[0]
            vocabulary = pname.endswith(("embed_tokens.weight", "lm_head.weight"))  # padded to a multiple of 64
            if offset != shape[0] and not (vocabulary and offset < shape[0]):
                return f"the training weights fill {offset} of the engine's {shape[0]} rows of {pname}"
        used_data = {sources[n].data_ptr() for n in used if isinstance(sources[n], torch.Tensor)}
        for name in set(sources) - used:
            src = sources[name]
            if not (isinstance(src, torch.Tensor) and src.data_ptr() in used_data):  # a tied head is skipped
                return f"the engine has no parameter for the training weight {name}"
        return cls(plan, _staged_linear_layers(engine_model))

    def write(self, sources: Mapping[str, Source]) -> None:
        with torch.no_grad():
            for name, module, leaf, start, stop in self.plan:
                dst, src = getattr(module, leaf).data[start:stop], sources[name]
                if isinstance(src, LoraFold):
                    src.write(dst)
                else:
                    dst.copy_(src)
        if self.packed:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module in self.packed:
                # the old handle goes first: its packed copy's memory is then reused (the new one before it left
                # the repack 0.2-0.5 s instead of 0.2 s on SmolLM2, and took twice the memory meanwhile)
                module.cpu_linear = None
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def _linear_layers(engine_model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in engine_model.modules() if hasattr(m, "cpu_linear")]


def _packed_away(module: torch.nn.Module) -> tuple[int, int] | None:
    """The full shape of a CPU linear layer's weight that vLLM moved into a oneDNN (or sgl-kernel) handle, leaving
    an empty `weight`; None for any other module."""
    if hasattr(module, "cpu_linear") and module.weight.numel() == 0:
        return module.output_size_per_partition, module.input_size_per_partition
    return None


def _engine_shapes(engine_model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each engine parameter's full shape, a packed-away weight's included."""
    shapes = {name: tuple(p.shape) for name, p in engine_model.named_parameters()}
    for name, module in engine_model.named_modules():
        if (shape := _packed_away(module)) is not None:
            shapes[f"{name}.weight"] = shape
    return shapes


def _staged_linear_layers(engine_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The engine's CPU linear layers, each with a plain weight to copy into: uninitialised where vLLM left it empty."""
    layers = _linear_layers(engine_model)
    for module in layers:
        if (shape := _packed_away(module)) is not None:
            module.weight = torch.nn.Parameter(torch.empty(shape, dtype=module.weight.dtype), requires_grad=False)
    return layers
