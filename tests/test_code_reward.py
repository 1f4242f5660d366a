"""The code_pass reward cannot be forged by the completion it scores: a pass is the harness's nonce, written once the
check program has run to its end, which the program never sees (not in its text, code objects, files, argv,
environment or stdin). An RL policy that learned to print what a pass prints, or to exit early with status 0, earns 0.
"""

import pytest

from evaluators.sandbox import Sandbox
from harness.rl.rewards import CodePass

PROMPT = 'def add(a, b):\n    """Return a plus b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


WRONG = "def add(a, b):\n    return 0\n"
FORGERIES = {
    # the markers of earlier versions, printed, then an exit with status 0 before check() runs
    "old marker, exit 0": WRONG + "import sys\nprint('__all_tests_ran__')\nsys.exit(0)\n",
    "old marker, os._exit": WRONG + "import os, sys\nprint('__all_tests_ran_0123456789abcdef__')\nsys.stdout.flush()\n"
                                    "os._exit(0)\n",
    "raise SystemExit": WRONG + "raise SystemExit(0)\n",
    # whatever the program text says a pass prints (the last version printed a random marker from program.py)
    "echo the program's own text": WRONG + "import os, re, sys\nsource = open('program.py').read()\n"
                                           "for m in re.findall(r'__[a-z_]+_[0-9a-f]{16,}__', source):\n"
                                           "    print(m)\nsys.stdout.flush()\nos._exit(0)\n",
    "echo its code's constants": WRONG + "import os, sys\n"
                                         "for c in sys._getframe().f_code.co_consts:\n"
                                         "    print(c)\nsys.stdout.flush()\nos._exit(0)\n",
    "read stdin": WRONG + "import os, sys\ntry:\n    print(sys.stdin.read())\nexcept Exception:\n    pass\n"
                          "try:\n    print(os.read(0, 64).decode())\nexcept OSError:\n    pass\n"
                          "sys.stdout.flush()\nos._exit(0)\n",
}


@pytest.fixture(scope="module")
def code_pass():
    return CodePass(timeout_s=5.0)


def test_forged_passes_earn_nothing_and_a_right_answer_earns_one(code_pass):
    names = list(FORGERIES)
    right = [_fenced("def add(a, b):\n    return a + b\n"), "    return a + b\n"]
    completions = [_fenced(FORGERIES[n]) for n in names] + right
    rewards = code_pass(completions, prompts=[PROMPT] * len(completions), test=[TEST] * len(completions),
                        entry_point=["add"] * len(completions))
    assert dict(zip(names, rewards[: len(names)], strict=True)) == dict.fromkeys(names, 0.0)
    assert rewards[len(names):] == [1.0, 1.0]  # a right answer, fenced or as the continuation of the prompt


def test_an_execution_is_completed_only_when_the_program_ran_to_its_end():
    sandbox = Sandbox()
    done = sandbox.run("print('hello')")
    assert done.completed and done.returncode == 0 and done.output == "hello\n"  # the nonce is not in the output
    for early in ("import sys\nsys.exit(0)\nprint('after')", "import os\nos._exit(0)", "raise SystemExit",
                  "assert False"):
        result = sandbox.run(early)
        assert not result.completed and "after" not in result.output, early
