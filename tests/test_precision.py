"""Mixed precision means fp32 master weights: what trains is fp32 on every device, bf16 only in the GPU's autocast
and in frozen weights under an adapter. Why: an AdamW step at lr 1e-5 applied to bf16 weights mostly rounds away."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harness.core.models import MASTER_DTYPE, add_adapter, training_precision
from harness.training.methods import common_args


@pytest.mark.parametrize("peft", ["none", "lora", "dora", "qlora"])
def test_gpu_training_autocasts_bf16_and_a_full_fine_tune_loads_fp32_master_weights(peft):
    precision = training_precision("cuda", peft)
    assert precision.autocast_bf16
    # a full fine-tune trains every weight it loads: they must be fp32; under an adapter the frozen base may be bf16
    assert precision.load_dtype == (torch.float32 if peft == "none" else torch.bfloat16)


@pytest.mark.parametrize("peft", ["none", "lora", "dora"])
def test_cpu_training_is_fp32_without_autocast(peft):
    precision = training_precision("cpu", peft)
    assert (precision.load_dtype, precision.autocast_bf16) == (torch.float32, False)
    args = common_args(output_dir="unused", max_steps=1, learning_rate=1e-5, batch_size=1, seed=0)
    assert (args["bf16"], args["use_cpu"]) == (False, True)  # this machine has no GPU


def test_an_adamw_step_at_lr_1e_5_mostly_rounds_away_in_bf16_but_not_in_fp32_master_weights():
    torch.manual_seed(0)
    init = torch.randn(256, 256) * 0.02  # the scale of a transformer's initialised linear weights
    grad = torch.randn(256, 256)
    changed = {}
    for dtype in (torch.bfloat16, MASTER_DTYPE):
        weight = torch.nn.Parameter(init.to(dtype))
        weight.grad = grad.to(dtype)
        before = weight.detach().clone()
        torch.optim.AdamW([weight], lr=1e-5, weight_decay=0.0).step()
        changed[dtype] = (weight.detach() != before).float().mean().item()
    # Adam's first step moves each weight by about lr = 1e-5; half a bf16 spacing is above that for |w| >= 2^-8
    assert changed[torch.bfloat16] < 0.2, changed
    assert changed[MASTER_DTYPE] > 0.99, changed


def _tiny_model(dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return Qwen2ForCausalLM(config).to(dtype)


@pytest.mark.parametrize("peft", ["lora", "dora"])
def test_an_adapter_on_a_bf16_base_trains_fp32_weights_and_leaves_the_base_bf16(peft):
    model = add_adapter(_tiny_model(torch.bfloat16), peft, rank=4, alpha=8)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {MASTER_DTYPE}, trainable
    assert set(frozen.values()) == {torch.bfloat16}


def test_a_quantized_models_adapter_stays_fp32_after_trl_builds_the_trainer(tiny_model_dir, tmp_path):
    """TRL casts a 4-bit model's adapter to bf16 when it builds any trainer; the harness casts it back before the
    optimizer exists. A real 4-bit load needs bitsandbytes on a GPU (`make gpu-check` does one): here the flag TRL
    reads is set on an fp32 LoRA model."""
    from harness.core.models import load_model, load_tokenizer
    from harness.training.methods import sft_trainer

    model = load_model(tiny_model_dir, peft="lora", rank=4, alpha=8)
    model.is_loaded_in_4bit = True
    rows = [{"prompt": "2 + 2 =", "completion": " 4"}] * 2
    trainer = sft_trainer(model, load_tokenizer(tiny_model_dir), rows, [], max_length=32,
                          output_dir=str(tmp_path), max_steps=1, learning_rate=1e-5, batch_size=1, seed=0)
    adapters = {n: p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert adapters and set(adapters.values()) == {MASTER_DTYPE}, adapters
