"""LoRA SFT of a real pretrained chat model, SmolLM2-135M-Instruct, on the task data, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.sft_qwen import SftQwen
from harness.training.experiment import help_field


@dataclass
class SftSmollm2(SftQwen):
    """LoRA SFT of SmolLM2-135M-Instruct (model=smollm2, fetched and converted on first use) on the chat task data."""

    model: str = help_field("smollm2", "SmolLM2-135M-Instruct (built on first use), or any model directory/GGUF")
    peft: str = help_field("lora", "lora (default here), dora, none (all 135M weights) or qlora (GPU only)")
    learning_rate: float = help_field(
        5e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type); LoRA moves from ~1e-4")
    max_steps: int = help_field(30, "training steps (optimizer updates); 0 = train for num_train_epochs instead")
    eval_every: int = help_field(10, "evaluate in the loop every N steps, and at step 0 and after the last step")
    eval_limit: int = help_field(32, "first N eval records; 0 means all")
    max_length: int = help_field(96, "prompt + completion tokens seen by the trainer (the task rows need <= 75)")
    max_new_tokens: int = help_field(32, "cap on generated tokens per eval prompt (greedy decoding)")
    gradient_checkpointing: bool = help_field(
        False, "recompute activations in the backward pass: off here, where 8 rows of <= 96 tokens fit easily and "
               "the recomputation would only slow the steps")
