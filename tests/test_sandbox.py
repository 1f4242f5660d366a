"""The sandbox under attack: every hostile program ends within its bound and changes nothing outside it."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from evaluators.sandbox import SANDBOX_UID_BASE, SANDBOX_UID_COUNT, IsolationUnavailable, Limits, Sandbox

LIMITS = Limits(timeout_s=2.0, cpu_s=3, memory_mb=256, processes=8, file_size_mb=1, output_bytes=4096)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS, workers=2)


def _live_sandbox_processes() -> list[str]:
    """Processes still running (not zombies waiting for init) as a sandbox uid, or with the attack marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            uid = entry.stat().st_uid
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        sandbox_uid = SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_COUNT
        if state != "Z" and (sandbox_uid or b"program.py" in cmdline):
            found.append(f"{entry.name} {cmdline!r}")
    return found


def test_a_correct_program_passes_and_its_scratch_dir_is_removed(sandbox):
    result = sandbox.run("import os\nprint(os.getcwd())\nopen('note.txt', 'w').write('scratch is writable')")
    assert (result.returncode, result.timed_out) == (0, False)
    scratch = Path(result.output.strip())
    assert scratch.name == "scratch" and not scratch.exists() and not scratch.parent.exists()


@pytest.mark.parametrize("program", [
    "while True:\n    pass",
    "import time\ntime.sleep(600)",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\ntime.sleep(600)",
])
def test_hanging_programs_and_fork_bombs_are_killed_at_the_timeout(sandbox, program):
    start = time.monotonic()
    result = sandbox.run(program)
    assert result.timed_out and result.returncode != 0
    assert time.monotonic() - start < LIMITS.timeout_s + 3
    assert _live_sandbox_processes() == []


def test_memory_beyond_the_limit_fails_the_program_not_the_machine(sandbox):
    result = sandbox.run("x = bytearray(8 << 30)\nprint('allocated')")
    assert result.returncode != 0 and not result.timed_out
    assert "MemoryError" in result.output and "allocated" not in result.output


def test_files_outside_the_scratch_dir_cannot_be_written_or_deleted(sandbox, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    os.chmod(tmp_path, 0o777)  # even where permissions would allow it, the read-only mount refuses
    os.chmod(canary, 0o666)
    result = sandbox.run(f"""
import os, shutil
for attempt in (lambda: open({str(canary)!r}, 'w').write('pwned'), lambda: os.remove({str(canary)!r}),
                lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x'), lambda: shutil.rmtree({str(tmp_path)!r}),
                lambda: open('/etc/harness-pwned', 'w').write('x')):
    try:
        attempt()
        print('WROTE')
    except OSError as e:
        print('refused', e.errno)
""")
    assert result.returncode == 0 and "WROTE" not in result.output and result.output.count("refused") == 5
    assert canary.read_text() == "original" and sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]
    assert not Path("/etc/harness-pwned").exists()


def test_killing_the_parent_or_everything_visible_leaves_the_harness_running(sandbox):
    result = sandbox.run("""
import os, signal
os.kill(os.getppid() or 1, signal.SIGKILL) if os.getppid() else None
for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
print('visible pids:', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
""")
    assert result.returncode == 0 and "visible pids: [1]" in result.output  # its own PID namespace
    assert sandbox.run("print('still here')").output == "still here\n"


def test_the_parent_environment_is_not_readable(sandbox, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-harness-test-secret")
    result = sandbox.run("""
import os
print(dict(os.environ))
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:
    try:
        print(open(f'/proc/{pid}/environ', 'rb').read())
    except OSError as e:
        print('no', pid, e.errno)
""")
    assert result.returncode == 0 and "sk-harness-test-secret" not in result.output
    assert "OPENAI_API_KEY" not in result.output


def test_no_network_even_to_loopback(sandbox):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    result = sandbox.run(f"""
import socket
for host in ('127.0.0.1', '1.1.1.1'):
    try:
        socket.create_connection((host, {port}), timeout=1)
        print('CONNECTED', host)
    except OSError as e:
        print('refused', host, e.errno)
""")
    time.sleep(0.5)
    server.close()
    assert "CONNECTED" not in result.output and result.output.count("refused") == 2
    assert accepted in ([], [None])


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_printing_gigabytes_is_cut_off(sandbox):
    start = time.monotonic()
    result = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))")
    assert time.monotonic() - start < LIMITS.timeout_s + 3
    assert len(result.output) < LIMITS.output_bytes + 100 and "bytes cut" in result.output
    assert result.returncode != 0


def test_one_hanging_program_does_not_hold_up_the_others(sandbox):
    programs = ["import time\ntime.sleep(600)"] + [f"print({i} * {i})" for i in range(8)]
    start = time.monotonic()
    results = sandbox.run_many(programs)
    assert results[0].timed_out
    assert [r.output for r in results[1:]] == [f"{i * i}\n" for i in range(8)]
    assert all(r.duration_s < 1.5 for r in results[1:])
    assert time.monotonic() - start < LIMITS.timeout_s + 3


def test_refuses_without_isolation_unless_weak_isolation_is_accepted(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # a machine without bubblewrap
    with pytest.raises(IsolationUnavailable, match="apt-get install bubblewrap"):
        Sandbox(LIMITS)
    weak = Sandbox(LIMITS, allow_weak_isolation=True)
    assert not weak.isolated
    assert weak.run("print(6 * 7)").output == "42\n"
    assert weak.run("while True:\n    pass").timed_out
