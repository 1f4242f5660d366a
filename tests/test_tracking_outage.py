"""A tracking server that goes down during a run: writes queue in order, arrive when it is back, and a server that
stays down leaves them in a file that `mlflow-send` delivers. The fast tests use a port where nothing listens (a
real refused connection); the slow ones stop a real `mlflow server` for 20 s in the middle of a training run, and
make a resume's run lookup fail for a moment through a proxy in front of one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness.commands import cli
from harness.core.errors import ConfigError, TrackingUnavailable
from harness.core.files import free_port
from harness.paths import REPO_ROOT
from harness.training.outbox import FLUSH_TIMEOUT_ENV, Outbox, flush_timeout, read_items, redact, server_answers
from harness.training.tracking.tracker import UNDELIVERED_FILE, Tracker


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in for the server's write endpoint: stores what arrives, answers /health."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        item = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not item.get("refuse"):
            self.server.received.append(item)
        self.send_response(400 if item.get("refuse") else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_writes_queue_in_order_while_nothing_listens_and_arrive_once_a_server_does(capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def deliver(item):
        requests.post(f"{url}/write", json=item, timeout=2).raise_for_status()

    box = Outbox(deliver, lambda: server_answers(url), url)
    t = time.monotonic()
    for n in range(6):  # the first is refused and queued, the rest queue behind it without touching the network
        box.send({"kind": "metrics", "n": n, "refuse": n == 3})
    assert time.monotonic() - t < 2 and box.pending() == 6
    out = capsys.readouterr().out
    assert (f"[warn] MLflow server {url} unreachable ([Errno 111] Connection refused): 1 item queued, training goes "
            "on") in out

    server = ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # a write the server refuses once it is back (a 4xx) does not hold up the others: it is kept for the file
        (refused,) = box.close(timeout=20)
        assert refused["n"] == 3 and "400 Client Error" in refused["error"]
        assert [item["n"] for item in server.received] == [0, 1, 2, 4, 5]  # in the order they were sent
        out = capsys.readouterr().out
        assert "[warn] MLflow refused a queued metrics write (400 Client Error" in out
        assert f"[mlflow] reconnected to {url} after" in out and "s: 5 queued items delivered" in out
        assert box.delivered == 5 and box.outages == 1
        box.send({"kind": "metrics", "n": 6})  # after close: straight to the server
        assert server.received[-1]["n"] == 6
    finally:
        server.shutdown()
        server.server_close()


def _log_to_a_dead_server(tmp_path: Path, run_id: str) -> Tracker:
    """A Tracker of run `run_id` whose server (with a password in its URL) is a port where nothing listens, after
    a few writes; the end of the run waits 1 s for it."""
    tracker = Tracker(MlflowClient(f"http://user:s3cret@127.0.0.1:{free_port()}"), "1", run_id)
    tracker.undelivered_file = tmp_path / "out" / UNDELIVERED_FILE
    tracker.log_metrics({"eval/x": 1.0}, 0)
    tracker.log_table({"id": ["a", "b"], "score": [0.5, 1.0]}, "eval_samples/step_000000.json")
    tracker.log_metrics({"eval/x": 2.0, "train/loss": float("nan")}, 2)
    tracker.set_tags({"best_checkpoint": 2})
    return tracker


def test_a_server_that_stays_down_leaves_the_writes_in_order_in_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "1")
    run_id = "f" * 32
    tracker = _log_to_a_dead_server(tmp_path, run_id)
    expected = (rf"did not take 5 write\(s\) of run {run_id} \(5 still queued after waiting 1s "
                rf"\({FLUSH_TIMEOUT_ENV}\)\); the run stays RUNNING there\. They are kept in "
                rf"{tmp_path / 'out' / UNDELIVERED_FILE}: send them with")
    with pytest.raises(TrackingUnavailable, match=expected):
        tracker.end("FINISHED")
    out = capsys.readouterr().out
    assert "s3cret" not in out and "user:***@127.0.0.1" in out and "[error] MLflow server" in out

    items = read_items(tracker.undelivered_file)
    assert [i["kind"] for i in items] == ["metrics", "table", "metrics", "tags", "end"]
    assert {i["run_id"] for i in items} == {run_id} and items[-1]["status"] == "FINISHED"
    assert items[2]["metrics"][0][:2] == ["eval/x", 2.0] and math.isnan(items[2]["metrics"][1][1])
    assert "s3cret" not in tracker.undelivered_file.read_text()


@pytest.mark.slow  # creating a SQLite store runs MLflow's schema migrations
def test_mlflow_send_delivers_a_kept_file_to_the_store_and_ends_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "0")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = MlflowClient(store)
    run_id = local.create_run(local.create_experiment("outage")).info.run_id
    tracker = _log_to_a_dead_server(tmp_path, run_id)
    with pytest.raises(TrackingUnavailable):
        tracker.end("FINISHED")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert cli.main(["mlflow-send", str(tracker.undelivered_file)]) == 0
    sent = f"[mlflow] run {run_id}: 5 write(s) from {tracker.undelivered_file} sent to {store}"
    out = capsys.readouterr().out
    assert sent in out
    run = local.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["best_checkpoint"] == "2"
    assert [(m.step, m.value) for m in local.get_metric_history(run_id, "eval/x")] == [(0, 1.0), (2, 2.0)]
    assert math.isnan(local.get_metric_history(run_id, "train/loss")[0].value)
    table = Path(local.download_artifacts(run_id, "eval_samples/step_000000.json", str(tmp_path))).read_text()
    assert json.loads(table) == {"columns": ["id", "score"], "data": [["a", 0.5], ["b", 1.0]]}
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "eval_samples/step_000000.json",
                                                                    "type": "table"}]

    # sent in full, the file is renamed: a second mlflow-send resends nothing (metrics would be logged twice)
    done = tracker.undelivered_file.with_name("mlflow_undelivered.sent.jsonl")
    assert f"[mlflow] all sent: {tracker.undelivered_file} renamed to {done}" in out
    assert done.is_file() and not tracker.undelivered_file.exists()
    assert cli.main(["mlflow-send", str(tracker.undelivered_file)]) == 2
    assert f"it was sent already and renamed to {done}" in capsys.readouterr().err
    assert len(local.get_metric_history(run_id, "eval/x")) == 2

    # a write that fails (a run the store does not have) keeps it and the writes after it in the file, unsent
    kept = tmp_path / "again" / UNDELIVERED_FILE
    items = [{"run_id": run_id, "kind": "tags", "tags": {"replayed": "yes"}},
             {"run_id": "0" * 32, "kind": "tags", "tags": {"lost": "no"}},
             {"run_id": run_id, "kind": "metrics", "metrics": [["eval/x", 3.0, 0, 4]], "error": "refused once"}]
    kept.parent.mkdir()
    kept.write_text("".join(json.dumps(i) + "\n" for i in items))
    assert cli.main(["mlflow-send", str(kept)]) == 1
    err = capsys.readouterr().err
    assert f"error: {kept}: write 2 of 3 (tags of run {'0' * 32}) failed: " in err
    assert f"1 sent; the 2 not sent are kept in {kept}: send them with `python -m harness mlflow-send {kept}`" in err
    assert read_items(kept) == items[1:] and not kept.with_name("mlflow_undelivered.sent.jsonl").exists()
    assert local.get_run(run_id).data.tags["replayed"] == "yes"
    assert len(local.get_metric_history(run_id, "eval/x")) == 2


def test_what_counts_as_unreachable_and_what_is_printed(monkeypatch):
    from harness.training.outbox import unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as refused:
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_run("0" * 32)
    assert unreachable(refused.value)
    assert not unreachable(MlflowException("Run '123' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert redact("http://alice:pa:ss@host:5000/api x https://h/y") == "http://alice:***@host:5000/api x https://h/y"
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=f"{FLUSH_TIMEOUT_ENV}='soon': expected a number of seconds >= 0"):
        flush_timeout()
    monkeypatch.delenv(FLUSH_TIMEOUT_ENV)
    assert flush_timeout() == 300


def _start_server(directory: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store in `directory`, in its own session so that a stop takes all its processes."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(directory / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{directory / 'server.db'}", "--artifacts-destination",
                             str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not server_answers(f"http://127.0.0.1:{port}"):
        assert proc.poll() is None and time.monotonic() < deadline, (directory / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    return proc


def _stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # as a crash or a pulled plug: no goodbye to the clients
    proc.wait()


@pytest.mark.slow
def test_a_run_whose_server_is_stopped_for_20_s_ends_finished_with_every_eval_step(tmp_path, tiny_model_dir):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    steps = list(range(0, 13, 2))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "harness", "run", "sft_qwen", "max_steps=12", "eval_every=2",
                            "eval_limit=4", "max_new_tokens=8", "backend=hf", "evaluators=bleu",
                            "select_metric=eval/bleu/bleu", f"output_dir={tmp_path / 'out'}"],
                           cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in run.stdout:
            lines.append(line)
            if line.startswith("[eval] step 0:"):  # printed once the step-0 evaluation is logged
                break
        _stop_server(server)
        down = time.monotonic()
        reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
        reader.start()
        time.sleep(20)
        server = _start_server(tmp_path, port)  # same port, same store
        print(f"server down {time.monotonic() - down:.0f}s")
        assert run.wait(timeout=600) == 0, "".join(lines)[-5000:]
        reader.join(timeout=10)
        out = "".join(lines)
        print("".join(line for line in lines if line.startswith(("[warn]", "[mlflow]", "[eval]", "[error]"))))
        assert f"[warn] MLflow server {uri} unreachable" in out and "training goes on" in out, out[-5000:]
        assert f"[mlflow] reconnected to {uri}" in out and "queued items delivered" in out, out[-5000:]
        warned = out.index("unreachable")
        assert "[eval] step 2:" in out[warned:]  # training went on while the server was down

        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])
        assert found.info.status == "FINISHED"
        for key in ("eval/bleu/bleu", "eval/time/total_s"):
            assert [m.step for m in client.get_metric_history(found.info.run_id, key)] == steps, key
        assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == list(range(1, 13))
        tables = {a.path for a in client.list_artifacts(found.info.run_id, "eval_samples")}
        assert {f"eval_samples/step_{s:06d}.json" for s in steps} <= tables
        assert not (tmp_path / "out" / "sft_qwen" / found.info.run_id / UNDELIVERED_FILE).exists()
    finally:
        if run.poll() is None:
            run.kill()
        _stop_server(server)


class _FlakyProxy(BaseHTTPRequestHandler):
    """In front of a real MLflow server on 127.0.0.1: forwards every request, except that it answers the next
    `server.failing_lookups` run lookups (GET .../runs/get) with 503, as a server restarting or overloaded does."""

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/runs/get" in self.path and self.server.failing_lookups > 0:
            self.server.failing_lookups -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = requests.request(self.command, self.server.upstream + self.path, data=body or None,
                                  headers=headers, timeout=60)
        self.send_response(answer.status_code)
        for k, v in answer.headers.items():  # requests has undone the transfer and content encodings
            if k.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.mark.slow  # starts a real MLflow server
def test_a_resume_whose_run_lookup_fails_for_a_moment_continues_that_run_not_a_new_one(tmp_path, monkeypatch):
    from harness.training.tracking.queries import LOOKUP_ATTEMPTS
    from harness.training.tracking.runs import mlflow_run

    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):  # the client settings a run uses (outbox.py)
        monkeypatch.setenv(key, value)
    port = free_port()
    server = _start_server(tmp_path, port)
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    proxy.upstream, proxy.failing_lookups = f"http://127.0.0.1:{port}", 0
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "30")
    try:
        with mlflow_run("resumable", {"max_steps": 8}, {}) as first:
            first.log_metrics({"train/loss": 1.0}, 2)
        client = MlflowClient(uri)
        client.set_terminated(first.run_id, "KILLED")

        # one lookup failing past the client's own retries (3 answers of 503): the same run is reopened
        proxy.failing_lookups = 3
        with mlflow_run("resumable", {"max_steps": 8}, {}, resume_run_id=first.run_id) as resumed:
            resumed.log_metrics({"train/loss": 0.5}, 4)
        assert proxy.failing_lookups == 0 and resumed.run_id == first.run_id
        experiment = client.get_experiment_by_name("resumable").experiment_id
        assert [r.info.run_id for r in client.search_runs([experiment])] == [first.run_id]
        assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [2, 4]

        # a store that keeps failing: an error naming the run and the store, and still no new run
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        proxy.failing_lookups = LOOKUP_ATTEMPTS
        with pytest.raises(TrackingUnavailable, match=rf"could not look up run {first.run_id} in {uri} "
                                                      rf"\({LOOKUP_ATTEMPTS} tries over 7 s\): .*503"):
            with mlflow_run("resumable", {"max_steps": 8}, {}, resume_run_id=first.run_id):
                pass
        assert len(client.search_runs([experiment])) == 1

        # the store's definite "no such run" (a run of another store): a new run, as before
        with mlflow_run("resumable", {"max_steps": 8}, {}, resume_run_id="0" * 32) as fresh:
            pass
        assert fresh.run_id != first.run_id and len(client.search_runs([experiment])) == 2
    finally:
        proxy.shutdown()
        proxy.server_close()
        _stop_server(server)
