"""`key=value` overrides: typed values, and errors that stop before any work and list the valid fields."""

import subprocess
import sys

import pytest

from experiments.simpo_qwen import SimpoQwen
from harness.commands.cli import main
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.training.overrides import apply_overrides


def test_values_are_parsed_by_field_type():
    exp = apply_overrides(SimpoQwen, ["beta=2.0", "max_steps=7", "peft=lora", "evaluators=bleu,rouge",
                                      "select_metric=eval/bleu/bleu", "model=/some/dir"])
    assert (exp.beta, exp.max_steps, exp.peft, exp.evaluators) == (2.0, 7, "lora", ["bleu", "rouge"])
    assert exp.model == "/some/dir" and isinstance(exp.beta, float)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus=1"], "unknown field 'bogus'"),
        (["max_steps=abc"], "field 'max_steps' expects int, got 'abc'"),
        (["peft=maybe"], "field 'peft' = 'maybe' must be one of none, lora, dora, qlora"),
        (["beta"], "override 'beta' is not key=value"),
        (["backend=tgi"], "field 'backend' = 'tgi' must be one of vllm, hf"),
        (["evaluators=bleu,nope"], "unknown ['nope']"),
        (["eval_every=0"], "field 'eval_every' = 0 must be >= 1"),
    ],
)
def test_bad_overrides_name_the_problem_and_list_fields(args, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(SimpoQwen, args)
    assert message in str(err.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU machine's refusal")
def test_qlora_on_a_cpu_machine_stops_before_anything_loads():
    with pytest.raises(ConfigError, match="field 'peft' = 'qlora' needs a CUDA GPU and bitsandbytes .* use peft=lora"):
        apply_overrides(SimpoQwen, ["peft=qlora"])


def test_select_metric_must_come_from_an_enabled_evaluator():
    with pytest.raises(ConfigError, match="select_metric.*choose one of: eval/rouge/rouge1"):
        apply_overrides(SimpoQwen, ["evaluators=rouge", "select_metric=eval/bleu/bleu"])


@pytest.mark.slow
def test_cli_rejects_unknown_field_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", "simpo_qwen", "max_step=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HARNESS_CACHE": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "unknown field 'max_step'" in result.stderr
    assert "max_steps: int = 60" in result.stderr and "beta: float = 2.5" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was built or written


def test_cli_rejects_unknown_experiment(capsys):
    # the CLI's entry point in this process; the test above checks the same path through a real subprocess
    assert main(["run", "nope_qwen"]) == 2
    from experiments import discover

    assert f"unknown experiment 'nope_qwen'; known: {', '.join(sorted(discover()))}\n" in capsys.readouterr().err
    assert "simpo_qwen" in discover() and "dpo_qwen" in discover()


def test_evaluator_options_work_in_any_experiment():
    exp = apply_overrides(SimpoQwen, ["evaluators=humaneval", "humaneval_n=4", "humaneval_k=1,2",
                                      "humaneval_problems=data/code_eval.jsonl",
                                      "select_metric=eval/humaneval/pass_at_1"])
    assert exp.params()["humaneval_n"] == 4 and exp.params()["humaneval_k"] == "1,2"
    (humaneval,) = exp.make_evaluators()
    assert (humaneval.n, humaneval.ks, len(humaneval.problems)) == (4, [1, 2], 96)
    with pytest.raises(ConfigError, match="field 'humaneval_n' expects int"):
        apply_overrides(SimpoQwen, ["humaneval_n=many"])
    with pytest.raises(ConfigError, match="unknown field 'humaneval_bogus'"):
        apply_overrides(SimpoQwen, ["humaneval_bogus=1"])
