"""The `slow` marker: `make test-fast` deselects every test that needs the embedded model or a vLLM engine, and
still runs a real suite."""

import re

import pytest

from harness.paths import REPO_ROOT


def _fast_expression() -> str:
    recipe = re.search(r"^test-fast:.*\n\t(.*)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "Makefile has no test-fast target"
    expression = re.search(r'-m "([^"]+)"', recipe.group(1))
    assert expression, f"test-fast selects no marker expression: {recipe.group(1)}"
    return expression.group(1)


def _collect(*args) -> list[pytest.Item]:
    class Collector:
        def pytest_collection_finish(self, session):
            self.items = list(session.items)

    collector = Collector()
    code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *args, str(REPO_ROOT / "tests")],
                       plugins=[collector])
    assert code == pytest.ExitCode.OK
    return collector.items


def test_fast_expression_deselects_model_tests_and_keeps_the_rest():
    everything = _collect()
    fast = {item.nodeid for item in _collect("-m", _fast_expression())}
    uses_model = {item.nodeid for item in everything if {"tiny_model_dir", "vllm_backend"} & set(item.fixturenames)}
    assert "tests/test_tiny_model.py::test_head_dim_fits_vllm_cpu_attention" in uses_model  # directly
    assert "tests/test_experiment_run.py::test_simpo_run_logs_in_loop_evals_tables_and_best_checkpoint" in uses_model
    assert "tests/test_generation_parity.py::test_greedy_vllm_equals_hf_after_sync" in uses_model  # via vllm_backend
    assert not uses_model & fast
    assert "tests/test_sweep.py::test_sweep_logs_nested_runs_best_params_plots_and_resumes" not in fast
    assert "tests/test_markers.py::test_fast_expression_deselects_model_tests_and_keeps_the_rest" in fast
    assert "tests/test_metrics.py::test_rouge_english_by_hand" in fast
    assert len(fast) >= 40 and len(everything) - len(fast) >= len(uses_model)
