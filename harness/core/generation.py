"""The generation contract every engine implements and every evaluator reads: what to generate (`GenParams`),
what comes back (`Completion`), and the backend protocol.

Prompts are token ids (see harness.core.prompts) so that engines' outputs are comparable token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


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


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string, as vLLM returns it (HF generate runs on and is cut here)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
