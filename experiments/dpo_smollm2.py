"""LoRA DPO of SmolLM2-135M-Instruct against its own answers (SPIN-style pairs), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.dpo_qwen import DpoQwen
from harness.training.experiment import help_field


@dataclass
class DpoSmollm2(DpoQwen):
    """LoRA DPO of SmolLM2-135M-Instruct: chosen = the task's answer, rejected = the model's own greedy answer."""

    model: str = help_field("smollm2", "SmolLM2-135M-Instruct (built on first use), or any model directory/GGUF")
    train_data: str = help_field(
        "data/smollm2_self_pairs.jsonl", "preference pairs; the default's rejected answers are SmolLM2's own "
        "(`python -m harness data self-pairs --model smollm2 --prompts data/preference.jsonl`)")
    peft: str = help_field("lora", "lora (default here; the reference is the base under the adapter), dora, none")
    learning_rate: float = help_field(
        5e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type); LoRA moves from ~1e-4")
    max_steps: int = help_field(10, "training steps (optimizer updates); 0 = train for num_train_epochs instead")
    eval_every: int = help_field(5, "evaluate in the loop every N steps, and at step 0 and after the last step")
    eval_limit: int = help_field(32, "first N eval records; 0 means all")
    max_length: int = help_field(128, "prompt + answer tokens seen by the trainer (the pairs need <= 96)")
    max_new_tokens: int = help_field(32, "cap on generated tokens per eval prompt (greedy decoding)")
    gradient_checkpointing: bool = help_field(
        False, "recompute activations in the backward pass: off here, where 8 pairs of <= 96 tokens fit easily and "
               "the recomputation would only slow the steps")
