"""Resolving `model=` (embedded, GGUF file, local directory or hub name), loading it, and wrapping it with a PEFT
adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from harness.core.errors import ConfigError
from harness.core.prompts import read_chat_template
from harness.embedded.gguf_models import ModelBuildError, ensure_gguf_model
from harness.embedded.smollm2 import SMOLLM2, ensure_smollm2
from harness.embedded.tiny_qwen2 import TINY_QWEN2, ensure_tiny_model

# Models the project builds itself, on first use, all three in one build: name -> stage (see tiny_qwen2.py)
EMBEDDED = {f"{TINY_QWEN2}-base": "base", TINY_QWEN2: "instruct", f"{TINY_QWEN2}-teacher": "teacher"}
# A PEFT (LoRA/DoRA) checkpoint holds this file, which names the base model, and the adapter weights only
ADAPTER_CONFIG = "adapter_config.json"


def resolve_model(name: str) -> str:
    """A directory path for local and embedded models (`smollm2` and `.gguf` files are converted into the cache on
    first use); hub names are passed through for HF/vLLM to fetch. A model that cannot be fetched or converted
    raises ConfigError saying what failed and what to pass instead."""
    if name in EMBEDDED:
        return str(ensure_tiny_model(stage=EMBEDDED[name]))
    try:
        if name == SMOLLM2:
            return str(ensure_smollm2())
        if name.lower().endswith(".gguf") and not Path(name).is_dir():
            return str(ensure_gguf_model(name))
    except ModelBuildError as e:
        raise ConfigError(str(e)) from e
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def remote_code_warning(model: str) -> str:
    """The line a run prints when trust_remote_code is on."""
    return (f"[warn] trust_remote_code=true: loading {model} may run Python code that the model's repository ships "
            f"(its own model or tokenizer classes), here and in the vLLM engine; use it only for models you trust")


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The model's tokenizer (its eos token doubles as the pad token when it has none); `chat_template`, a named
    template or a Jinja file (see harness.core.prompts.read_chat_template), replaces the model's own chat template
    or gives it one, so that training, eval prompts and the saved checkpoint all use it."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


@dataclass(frozen=True)
class TrainingPrecision:
    """How a model is held for training. `load_dtype`: what the weights are loaded in, and the frozen ones stay in
    (adapter weights are MASTER_DTYPE whatever it is). `autocast_bf16`: the trainer computes forward and backward
    under bf16 autocast (the TRL/transformers config's `bf16`, see autocasts_bf16)."""

    load_dtype: torch.dtype
    autocast_bf16: bool


# Trainable weights and the optimizer's updates to them: an AdamW step near lr 1e-5 is below half a bf16 spacing for
# weights above about 0.004 in size, so most of the steps applied to bf16 weights round to nothing
MASTER_DTYPE = torch.float32


def training_device() -> str:
    """Where this process trains: `cuda` when torch sees a GPU, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocasts_bf16(device: str) -> bool:
    """Whether training on `device` runs under bf16 autocast: on a GPU, whatever the method or adapter."""
    return device == "cuda"


def training_precision(device: str, peft: str) -> TrainingPrecision:
    """Mixed precision on a GPU, the same for every training method: fp32 master weights with bf16 autocast. A
    full fine-tune loads in fp32 (all of it trains); under a LoRA-family adapter the frozen base may stay bf16 (or
    4-bit NF4 with bf16 compute for qlora) and only the adapter is fp32. On CPU everything is fp32 without autocast
    (bf16 training there is slow and lossy). DeepSpeed's bf16 mode (on with `bf16`) keeps its own fp32 master copy
    of the fp32-loaded model."""
    if not autocasts_bf16(device):
        return TrainingPrecision(torch.float32, autocast_bf16=False)
    return TrainingPrecision(MASTER_DTYPE if peft == "none" else torch.bfloat16, autocast_bf16=True)


def load_model(path: str, peft: str = "none", rank: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: list[str] | None = None, head: str = "causal_lm", trust_remote_code: bool = False):
    """The model in training_precision for this machine and `peft`, on the GPU when there is one; with `peft`, a
    LoRA-family adapter on `target_modules` (default every linear layer): lora, dora (weight-decomposed), or qlora
    (LoRA on the base model loaded in 4-bit NF4 by bitsandbytes; GPU only, checked by check_settings before
    anything loads). `trust_remote_code`: run the modelling code a hub model ships (off unless the experiment sets
    it)."""
    device = training_device()
    dtype = training_precision(device, peft).load_dtype
    kwargs = {"trust_remote_code": trust_remote_code}
    if peft == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    if head == "reward":  # one scalar per sequence, read at its last token: a new head on the same trunk
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=1, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if device == "cuda" and peft != "qlora":  # a 4-bit model is placed by bitsandbytes
        model = model.to(device)
    if peft == "none":
        return model
    return add_adapter(model, peft, rank, alpha, dropout, target_modules, head)


def add_adapter(model, peft: str, rank: int = 16, alpha: int = 32, dropout: float = 0.0,
                target_modules: list[str] | None = None, head: str = "causal_lm"):
    """`model` (frozen from here on) under a new `peft` adapter (lora, dora or qlora, see load_model) whose weights
    are MASTER_DTYPE whatever the base's dtype."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft == "qlora":
        model = prepare_model_for_kbit_training(model)
    targets = target_modules or ["all-linear"]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=peft == "dora",
                        target_modules=targets[0] if targets == ["all-linear"] else targets,
                        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    # autocast_adapter_dtype: PEFT creates the adapter weights in MASTER_DTYPE on a bf16 base (a reward model's
    # score head, trained as a copy of a base module, keeps the base's dtype: PEFT's forward casts only adapters)
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def master_adapter_weights(model: torch.nn.Module) -> None:
    """Casts the trainable adapter weights (lora_*) of `model` back to MASTER_DTYPE in place, where something
    (TRL, for a quantized base) cast them lower; PEFT's forward casts their input to match."""
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name and param.dtype != MASTER_DTYPE:
            param.data = param.data.to(MASTER_DTYPE)
