"""The console of a run (harness.training.console): progress bars with an ETA on a terminal only, and library
chatter in the run's library.log (an MLflow artifact) instead of on screen."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from harness.core.errors import DataError
from harness.paths import REPO_ROOT
from harness.training import console

ETA = re.compile(r"\d\d:\d\d<\d\d:\d\d")  # tqdm's [elapsed<remaining]

# What a default run printed among its own lines before library output was routed to library.log
CHATTER = ("Setting accelerator to CPU", "Triton is installed", "NUMA binding", "FutureWarning",
           "torch.distributed process group is initialized", "Loading safetensors checkpoint shards",
           "Tokenizing train dataset", "Creating initial MLflow database tables", "(MainProcess pid=")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    assert console.progress_enabled(FakeTerminal()) and not console.progress_enabled(io.StringIO())
    monkeypatch.setenv(console.PROGRESS_ENV, "0")
    assert not console.progress_enabled(FakeTerminal())
    monkeypatch.setenv(console.PROGRESS_ENV, "1")
    assert console.progress_enabled(io.StringIO())


def test_train_bar_shows_steps_eta_and_loss(monkeypatch):
    from transformers import TrainerState

    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    terminal, pipe = FakeTerminal(), io.StringIO()
    for stream in (terminal, pipe):
        callback = console.train_progress(stream)
        state = TrainerState(max_steps=10, global_step=0)
        callback.on_train_begin(None, state, None)
        for step in range(1, 5):
            time.sleep(0.12)  # past tqdm's minimum redraw interval, so every step is drawn
            state.global_step = step
            callback.on_log(None, state, None, logs={"loss": 1.25 + step})
            callback.on_step_end(None, state, None)
        callback.on_train_end(None, state, None)
    last = terminal.getvalue().split("\r")[-1]
    assert last.startswith("train:  40%") and "4/10" in last and "loss=5.2500" in last, last
    assert ETA.search(last), last
    assert pipe.getvalue() == ""  # not a terminal: no bar at all


def test_lines_printed_under_a_bar_stay_whole():
    terminal = FakeTerminal()
    shown = console.BarSafeStream(terminal)
    progress = console.bar(3, "eval step 20", "part", shown, leave=False)  # drawn on the terminal behind it
    progress.update()
    shown.write("[eval] step 20: ")
    shown.write("rouge/rougeL=70.00\n")
    progress.update()
    progress.close()
    text = terminal.getvalue()
    assert "[eval] step 20: rouge/rougeL=70.00\n" in text
    before, _, after = text.partition("[eval] step 20: rouge/rougeL=70.00\n")
    # the bar is drawn, cleared for the line (a carriage return, blanks, a carriage return), then drawn again
    assert before.startswith("\reval step 20:") and before.endswith(" \r") and after.startswith("\reval step 20:")


def test_library_log_takes_stderr_and_logging_then_gives_them_back(tmp_path, capfd, monkeypatch):
    # pytest points sys.stderr at its own buffer; a process's sys.stderr writes to file descriptor 2
    monkeypatch.setattr(sys, "stderr", os.fdopen(2, "w", closefd=False))
    library = logging.getLogger("some_library")  # configured as MLflow or transformers do: a handler on stderr
    monkeypatch.setattr(library, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(library, "propagate", False)
    with console.library_log() as log:
        assert console.current() is log
        os.write(2, b"written by C code to fd 2\n")
        library.warning("a library's warning")
        print("[run] the harness's own line", flush=True)
        path = log.move_to(tmp_path / "run")
        print("after the move", file=sys.stderr, flush=True)
    print("back on the console", file=sys.stderr, flush=True)
    out, err = capfd.readouterr()
    assert path == tmp_path / "run" / "library.log"
    text = path.read_text()
    for line in ("written by C code to fd 2", "a library's warning", "after the move"):
        assert line in text and line not in err
    assert "[run] the harness's own line" in out and "[run]" not in text
    assert err == "back on the console\n"
    assert not list(tmp_path.glob("harness-library-*"))  # the temporary file was moved, not left behind


@pytest.mark.slow
def test_run_shows_harness_lines_and_logs_library_output(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != console.PROGRESS_ENV}
    out = subprocess.run([sys.executable, "-m", "harness", "run", "sft_qwen", "max_steps=2", "eval_every=2",
                          "eval_limit=4", "max_new_tokens=8", f"output_dir={tmp_path / 'out'}"],
                         cwd=REPO_ROOT, env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])
    run_id = run.info.run_id
    library_log = tmp_path / "out" / "sft_qwen" / run_id / "library.log"
    for line in ("[run] sft_qwen:", "[data] 2000 training rows", f"[mlflow] run {run_id}",
                 f"[run] library output (transformers, TRL, vLLM, ...): {library_log}", "[eval] vllm backend ready",
                 "[eval] step 0:", "[eval] step 2:", "== sft_qwen: baseline (step 0) vs final (step 2)"):
        assert line in out.stdout, line
    for chatter in CHATTER:
        assert chatter not in out.stdout and chatter not in out.stderr, chatter
    assert out.stderr == ""
    assert "%|" not in out.stdout  # no progress bar when stdout is not a terminal
    text = library_log.read_text()
    for chatter in ("Setting accelerator to CPU", "Triton is installed", "Initializing a V1 LLM engine",
                    "FutureWarning", "torch.distributed process group is initialized",
                    "Creating initial MLflow database tables"):
        assert chatter in text, chatter
    assert "library.log" in [a.path for a in client.list_artifacts(run_id)]
    logged = client.download_artifacts(run_id, "library.log", str(tmp_path))
    assert "Initializing a V1 LLM engine" in open(logged).read()


def test_a_failed_run_still_logs_its_library_output(tmp_path, monkeypatch, capfd):
    from harness.training.tracking.runs import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "stderr", os.fdopen(2, "w", closefd=False))
    with pytest.raises(RuntimeError, match="diverged"):  # the runner's order: the log outside the MLflow run
        with console.library_log() as log, mlflow_run("console_test", {}, {}) as tracker:
            log.move_to(tmp_path / "run", tracker)
            os.write(2, b"engine noise\n")
            raise RuntimeError("diverged")
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    logged = client.download_artifacts(tracker.run_id, "library.log", str(tmp_path / "download"))
    assert "engine noise\n" in open(logged).read()

    with pytest.raises(RuntimeError, match="no run directory yet"):  # failed before the run's directory existed
        with console.library_log():
            os.write(2, b"early noise\n")
            raise RuntimeError("no run directory yet")
    kept = re.search(r"\[run\] library output of the failed run: (\S+)", capfd.readouterr().err)
    assert kept and open(kept.group(1)).read() == "early noise\n"
    os.unlink(kept.group(1))

    with pytest.raises(DataError), console.library_log() as log:  # bad input: the error says it all
        os.write(2, b"import noise\n")
        raise DataError("data.jsonl:3: field 'prompt' is missing")
    assert capfd.readouterr().err == "" and not log.path.exists()
