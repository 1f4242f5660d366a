"""Resolving `model=` (embedded, local directory or hub name), loading it, and wrapping it with LoRA."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.tiny_model import TINY_QWEN2, ensure_tiny_model


def resolve_model(name: str) -> str:
    """A directory path for local and embedded models; hub names are passed through for HF/vLLM to fetch."""
    if name == TINY_QWEN2:
        return str(ensure_tiny_model())
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, lora: bool = False, rank: int = 16, alpha: int = 32, dropout: float = 0.0):
    """fp32 on CPU (bf16 training there is slow and lossy), bf16 on a GPU."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model
