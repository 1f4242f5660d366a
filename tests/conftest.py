"""Shared fixtures: the embedded model (built once, cached like any run) and one vLLM engine per session."""

import json

import pytest

from harness.core.paths import DATA_DIR
from harness.core.records import EvalSample


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from harness.embedded.tiny_qwen2 import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def vllm_backend(tiny_model_dir):
    from harness.engines.vllm_engine import VLLMBackend

    # float32, the precision the weights are trained in here: parity must then be exact, token for token
    backend = VLLMBackend(tiny_model_dir, seed=0, max_model_len=256, dtype="float32")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def eval_samples() -> list[EvalSample]:
    rows = [json.loads(line) for line in (DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    return [EvalSample(r["id"], r["prompt"], r["reference"]) for r in rows[:32]]
