"""RLOO online RL with rollouts from the in-loop vLLM engine, rewarded by checkable answers (as grpo_qwen)."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.grpo_qwen import GrpoQwen
from harness.training.experiment import help_field
from harness.training.methods import rloo_trainer


@dataclass
class RlooQwen(GrpoQwen):
    """RLOO on the embedded tiny Qwen2: G samples per task prompt from the shared vLLM engine, each sample's
    baseline the mean reward of the other G-1; same data, rewards and rules as grpo_qwen."""

    trainer_factory = staticmethod(rloo_trainer)
    beta: float = help_field(0.0, "KL to a reference (TRL's RLOO default is 0.05); 0 needs no reference model")
