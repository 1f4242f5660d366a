"""GGUF files as models: dequantized once into a Hugging Face directory in the cache, then used like any local one.

`model=/path/to/model.gguf` (any GGUF whose architecture and quantization transformers can read, with the `gguf`
package) is converted on first use into `cache_dir()/models/gguf-<sha256 of the file>-v<N>`: fp32
safetensors, the tokenizer with the file's own chat template, and a generation config with the tokenizer's eos
(for smollm2 `<|im_end|>`, the end of an assistant turn). Built in a staging directory under an fcntl lock and
renamed into place, as the embedded tiny model is, so a killed conversion never leaves a directory that looks
finished. The same content reached by another path (a copy, the file inside the smollm2 wheel) maps to the same
directory.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from harness.paths import cache_dir

# Bump when the conversion's output changes, so that directories converted by an older version are not reused.
CONVERSION_VERSION = 1


class ModelBuildError(RuntimeError):
    """A model the harness builds or converts itself could not be made; the message says what failed and how to
    point `model=` elsewhere."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_target(sha256: str) -> Path:
    """Where the conversion of a GGUF file with this content hash lives, whatever the file is called (its name is
    recorded in the directory's build.json)."""
    return cache_dir() / "models" / f"gguf-{sha256[:16]}-v{CONVERSION_VERSION}"


def is_built(directory: Path) -> bool:
    return (directory / "config.json").exists() and (directory / "build.json").exists()


def build_once(target: Path, build: Callable[[Path], None], built: Callable[[Path], bool] = is_built) -> Path:
    """Run `build(staging)` unless `target` is already `built` (a model directory by default): under a lock beside
    it (concurrent first uses build once), into `<target>.partial`, renamed into place only when complete (a killed
    build leaves no directory that looks finished; its partial one is cleared by the next build). A failed build
    removes its staging."""
    if built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built(target):
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)  # an unfinished directory from elsewhere, never a built one
        staging.rename(target)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path, log: Callable[[str], None] = print,
                 eos_token: str | None = None, source: dict | None = None) -> None:
    """Dequantize `gguf_file` into an fp32 Hugging Face directory `out_dir` (created): weights, tokenizer (with
    the file's chat template) and generation config. `eos_token` (e.g. `<|im_end|>`) is made the tokenizer's
    and the generation config's eos, so generation stops at the end of the assistant's turn; by default the
    file's own eos is used. `source` is recorded in build.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    started = time.time()
    log(f"[model] converting {gguf_file.name} ({gguf_file.stat().st_size / 1e6:.0f} MB) to a float32 Hugging Face "
        f"model (one-time) -> {out_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
        raise ModelBuildError(
            f"cannot convert {gguf_file}: transformers could not read it ({type(e).__name__}: {e}). GGUF files "
            f"work when transformers supports their architecture and quantization type (the `gguf` package must "
            f"be installed); otherwise point model= at a Hugging Face model directory instead") from e
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ModelBuildError(f"{gguf_file}: its vocabulary has no {eos_token!r} token")
        tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    eos_id = tokenizer.eos_token_id
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The model was loaded through the GGUF quantizer, but its weights are plain fp32 tensors now: without the
    # quantizer's marks save_pretrained writes ordinary safetensors (with them it refuses to serialize).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[model] {type(model).__name__}: {n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} "
        f"layers, vocab {model.config.vocab_size}; eos {tokenizer.eos_token!r}; chat template: "
        f"{'yes' if tokenizer.chat_template else 'none'} ({time.time() - started:.0f}s)")
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "build.json").write_text(json.dumps({
        "converted_from": gguf_file.name, "conversion_version": CONVERSION_VERSION, "parameters": n_params,
        "dtype": "float32", **(source or {})}, indent=2))
    del model
    gc.collect()
    log(f"[model] saved in {time.time() - started:.0f}s")


def ensure_gguf_model(gguf_file: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """The converted directory of a GGUF file, converting it on first use (keyed by the file's sha256)."""
    path = Path(gguf_file)
    if not path.is_file():
        raise ModelBuildError(f"model={gguf_file}: no such GGUF file")
    t = time.time()
    sha = file_sha256(path)
    if time.time() - t > 2:
        log(f"[model] hashed {path.name} in {time.time() - t:.1f}s")
    target = gguf_target(sha)
    if is_built(target):
        return target
    build_once(target, lambda staging: convert_gguf(path, staging, log, source={"sha256": sha}))
    log(f"[model] {path.name} ready at {target}")
    return target
