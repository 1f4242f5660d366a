"""Fields explain themselves: every configuration field carries its help, the guide's table of the base fields
(docs/guides/experiments.md) is complete, and `python -m harness show` prints fields, values and help, then the
settings check, without running."""

import dataclasses
import re
import subprocess
import sys

import pytest

from experiments import discover
from harness.commands.cli import main
from harness.core.files import atomic_writer, write_json_atomic
from harness.paths import REPO_ROOT
from harness.training.experiment import Experiment, field_help

INTERNAL = {"evaluator_options"}  # set from the command line; has help but is not listed as a field


@pytest.mark.parametrize("name", sorted(discover()))
def test_every_field_has_help(name):
    cls = discover()[name]
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in INTERNAL and not field_help(f).strip()]
    assert not missing, f"{name}: fields without metadata help: {missing}"


def test_internal_field_has_help_too():
    (options,) = [f for f in dataclasses.fields(Experiment) if f.name == "evaluator_options"]
    assert field_help(options)


def guide_base_fields() -> list[str]:
    """The field names in the guide's table under "Fields every experiment has" (a cell may name several)."""
    text = (REPO_ROOT / "docs" / "guides" / "experiments.md").read_text(encoding="utf-8")
    section = text.split("## Fields every experiment has\n", 1)[1]
    rows = re.match(r"\s*((?:\|.*\|\s*\n)+)", section).group(1).splitlines()
    names = []
    for row in rows[2:]:  # past the header and its --- line
        first_cell = row.strip().strip("|").split("|")[0]
        names += first_cell.split("`")[1::2]  # the backticked names: `a`, `b` / `c`
    return names


def test_guide_lists_exactly_the_base_fields():
    listed = guide_base_fields()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    fields = {f.name for f in dataclasses.fields(Experiment)} - INTERNAL
    assert set(listed) == fields, (f"the guide lacks {sorted(fields - set(listed))}; "
                                   f"the guide has extra {sorted(set(listed) - fields)}")


def test_atomic_writer_is_all_or_nothing(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with atomic_writer(path) as f:
        f.write("one\n")
        assert not path.exists()  # nothing at the name until the block ends
    assert path.read_text() == "one\n"
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write("half")
        raise RuntimeError("a bad record")
    assert path.read_text() == "one\n" and sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{"a": 1}'


def show(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "show", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # a harness subprocess (imports torch and the evaluators), though it loads no model
def test_show_prints_fields_values_help_and_the_settings_check():
    result = show("simpo_qwen", "beta=3.0")
    assert result.returncode == 0, result.stderr
    (beta,) = [line for line in result.stdout.splitlines() if line.startswith("beta ")]
    assert beta.split()[:4] == ["beta", "float", "2.5", "3.0"]  # name, type, default, value
    assert "reward scale; the SimPO paper's setting" in beta
    assert re.search(r"^max_steps\s+int\s+60\s+60\s+training steps", result.stdout, re.MULTILINE)
    assert "evaluator_options" not in result.stdout
    assert result.stdout.rstrip().endswith("settings check: OK")


def test_show_reports_a_failed_settings_check_with_status_2(capsys):
    # the CLI's entry point in this process; the test above runs `show` as a subprocess
    assert main(["show", "simpo_qwen", "select_metric=eval/bleu/nope"]) == 2
    out, err = capsys.readouterr()
    assert "settings check: FAILED" in out
    assert "field 'select_metric' = 'eval/bleu/nope' is not produced by the chosen evaluators" in err


def test_show_types_overrides_as_run_does(capsys):
    assert main(["show", "simpo_qwen", "max_steps=abc"]) == 2  # stops before listing anything
    out, err = capsys.readouterr()
    assert "field 'max_steps' expects int, got 'abc'" in err and out == ""
    assert main(["show", "simpo_qwen", "max_step=3"]) == 2
    assert "unknown field 'max_step'" in capsys.readouterr().err
