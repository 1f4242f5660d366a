"""Shared fixtures: the embedded model (built once, cached like any run) and one vLLM engine per session.

The `slow` marker (registered in pyproject.toml) is on every test that takes more than about 3 seconds: it needs
the embedded model or a vLLM engine (a training run, a model server), runs the harness in a subprocess (each start
imports torch and friends), or does much else (builds a model, runs hundreds of sandboxed programs). Tests that use
`tiny_model_dir` or `vllm_backend`, directly or through another fixture, get it here; the others carry
`@pytest.mark.slow` (or `pytestmark`) in their file. `make test-fast` runs `pytest -m "not slow"` in about a minute.
"""

import json

import pytest

from harness.core.records import EvalSample
from harness.paths import DATA_DIR

# A test that asks for one of these, directly or through another fixture, is slow.
SLOW_FIXTURES = frozenset({"tiny_model_dir", "vllm_backend"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
