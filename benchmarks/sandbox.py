"""Run untrusted candidate programs (model completions) in throw-away subprocesses.

Each program runs as ``python -I`` in its own temporary directory and process group, never in
the calling process. What the sandbox does:

- wall-clock timeout (default 5 s): the whole process group is SIGKILLed when it runs over;
- resource limits set before the candidate's first line runs (soft = hard, so the candidate
  cannot raise them back): address space (``RLIMIT_AS``, default 1 GiB), CPU seconds
  (``RLIMIT_CPU``, timeout + 1), size of any file written (``RLIMIT_FSIZE``, 16 MiB),
  open files (256), no core dumps, and ``RLIMIT_NPROC = 1`` (no new processes or threads);
- as root, and when the interpreter is readable by it, the child runs as ``nobody`` with no
  supplementary groups: it cannot write the repository or signal our processes, and the
  ``RLIMIT_NPROC`` limit applies (the kernel ignores it for root);
- an empty environment besides PATH/HOME/TMPDIR/LANG (no tokens or credentials inherited),
  stdin closed, stdout/stderr to files in the temporary directory (bounded by ``RLIMIT_FSIZE``);
- a speed bump, not a security boundary: ``os.fork``/``system``/``exec*``/``spawn*``/``kill``
  and ``subprocess.Popen`` are replaced by functions that raise;
- a pass counts only if the program ran to its end: the wrapper prints a per-run random nonce
  after the candidate's code returns, so ``os._exit(0)`` or a swallowed ``SystemExit`` before
  the tests does not pass.

What it does not isolate: the network (no namespace or firewall: a candidate can open sockets),
reads of any file the child's user can read, writes wherever that user can write (when it
cannot drop to ``nobody``, that is everything our own user can write), and CPU/memory
contention with the host. The uid drop and ``RLIMIT_NPROC`` are only in force where
``SandboxLimits.describe()`` says so. Good enough for scoring a model's HumanEval
completions; not a jail for adversarial code (use a container or VM for that).
"""

from __future__ import annotations

import json
import math
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache

# Runs in the child as `python -I -c WRAPPER LIMITS_JSON`; reads the nonce from stdin.
WRAPPER = r"""
import json, os, resource, sys
_limits = json.loads(sys.argv[1])
for _name, _value in _limits.items():
    try:
        resource.setrlimit(getattr(resource, _name), (_value, _value))
    except (ValueError, OSError):
        pass
_nonce = sys.stdin.readline().strip().encode()
sys.stdin.close()
_out = os.dup(1)
import subprocess

def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the sandbox")

for _n in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execl",
           "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
           "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _n):
        setattr(os, _n, _blocked)
subprocess.Popen = _blocked
with open("candidate.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "candidate.py", "exec")
del _f, _n, _limits, _name, _value
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(_code, _globals)
except BaseException as _e:  # SystemExit included: the program did not run to its end
    import traceback
    traceback.print_exception(_e)
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(_out, b"\n" + _nonce + b"\n")
os._exit(0)
"""

@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also bounds captured stdout/stderr)
    open_files: int = 256
    drop_privileges: bool = True  # as root: run as nobody when possible

    def rlimits(self) -> dict[str, int]:
        cpu = math.ceil(self.timeout) + 1
        return {
            "RLIMIT_AS": self.memory_mb << 20,
            "RLIMIT_CPU": cpu,
            "RLIMIT_FSIZE": self.file_size_mb << 20,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_CORE": 0,
            "RLIMIT_NPROC": 1,
        }

    def describe(self) -> dict:
        user = _sandbox_user() if self.drop_privileges else None
        as_root = os.geteuid() == 0
        return {
            **asdict(self),
            "interpreter": f"{sys.executable} -I",
            "runs_as": pwd.getpwuid(user[0]).pw_name if user else pwd.getpwuid(os.geteuid()).pw_name,
            "rlimit_nproc_enforced": bool(user) or not as_root,
            "network_isolated": False,
            "filesystem_isolated": "read: whatever the child's user can read; write: "
            + ("only world-writable places and its temporary directory" if user else "everything our user can write"),
        }


@dataclass
class RunResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str  # last line of stderr, or what killed it
    returncode: int | None
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def _sandbox_user() -> tuple[int, int] | None:
    """(uid, gid) of ``nobody`` if we are root and it can run our interpreter, else None."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    try:
        r = subprocess.run(
            [sys.executable, "-I", "-c", "pass"], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
            cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (pw.pw_uid, pw.pw_gid) if r.returncode == 0 else None


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run ``source`` in a fresh sandboxed subprocess; passed = it ran to its end."""
    user = _sandbox_user() if limits.drop_privileges else None
    nonce = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="tidar-sandbox-")
    t0 = time.monotonic()
    try:
        with open(os.path.join(tmp, "candidate.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if user:
            os.chown(tmp, *user)
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        extra = dict(user=user[0], group=user[1], extra_groups=[]) if user else {}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", WRAPPER, json.dumps(limits.rlimits())],
                cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                start_new_session=True, close_fds=True, **extra,
            )
            timed_out = False
            try:
                proc.stdin.write(nonce.encode() + b"\n")
                proc.stdin.close()
            except OSError:  # the child died before reading it
                pass
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                # the leader is not reaped yet, so its process group id cannot have been reused
                _kill_group(proc.pid)
                proc.wait()
        seconds = time.monotonic() - t0
        rc = proc.returncode
        stdout_tail = _tail(out_path)
        if timed_out:
            return RunResult("timeout", f"wall-clock limit of {limits.timeout:g} s", rc, seconds)
        if rc == -signal.SIGXCPU:
            return RunResult("timeout", "CPU time limit", rc, seconds)
        if rc == 0 and stdout_tail.rstrip("\n").rsplit("\n", 1)[-1] == nonce:
            return RunResult("passed", "", rc, seconds)
        return RunResult("failed", _failure_detail(rc, _tail(err_path)), rc, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_programs(sources: list[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                 desc: str | None = None) -> list[RunResult]:
    """Run many programs, ``workers`` subprocesses at a time; results in input order."""
    from tqdm.auto import tqdm

    results: list[RunResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(sources), desc=desc, disable=desc is None) as bar:
        futures = {pool.submit(run_program, s, limits): i for i, s in enumerate(sources)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _failure_detail(rc: int | None, stderr_tail: str) -> str:
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return f"killed by {name}"
    lines = [line for line in stderr_tail.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    return f"exit status {rc}" if rc else "exited before the end of the program"
