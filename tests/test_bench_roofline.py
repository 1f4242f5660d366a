"""The roofline bench part's arithmetic: the matrices it says one decode step multiplies by are the model's."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harness.commands.bench.roofline import (
    decode_shapes,
    decode_step_s,
    matmul_weights,
    memory_bandwidth,
    operator_kind,
)


def test_decode_shapes_are_every_linear_layer_of_the_model():
    # SmolLM2-135M's shape ratios (grouped-query attention, tied embeddings), scaled down
    config = Qwen2Config(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    linear = [tuple(m.weight.shape[::-1]) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(decode_shapes(config)) == sorted(linear)  # (in, out) of each, the vocabulary head included
    assert matmul_weights(decode_shapes(config)) == sum(a * b for a, b in linear)


def test_the_limits_are_measured_not_assumed():
    shapes = [(64, 64)] * 4
    assert 0 < decode_step_s(shapes, batch=8, dtype=torch.float32, repeats=2) < 1
    assert memory_bandwidth(megabytes=16, repeats=2) > 1e8  # any machine copies more than 100 MB/s


def test_profiled_operators_fall_into_their_kinds():
    # names as torch's profiler reports a vLLM CPU forward
    expected = {
        "_C::onednn_mm": "matmuls",
        "aten::addmm": "matmuls",
        "_C::cpu_attention_with_kv_cache": "attention",
        "vllm::unified_kv_cache_update": "attention",
        "_C::greedy_argmax": "sampling",
        "aten::softmax": "sampling",
        "aten::silu": "other operators",
        "aten::mul": "other operators",
    }
    assert {name: operator_kind(name) for name in expected} == expected
