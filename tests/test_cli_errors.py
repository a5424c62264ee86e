"""User mistakes give one clear line on stderr and exit code 2, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vllm_tidar.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("vllm-tidar: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    for f in DEMO.iterdir():
        if f.is_file():  # the base files; an AR checkpoint has no draft adapter
            shutil.copy(f, out)
    raw = json.loads((out / "config.json").read_text())
    raw.pop("tidar")
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_block_length_below_two():
    assert_one_line_error(run_cli("demo", "--reference", "--block-length", "1", "--max-tokens", "4"), "block length must be")
    assert_one_line_error(run_cli("demo", "--block-length", "4"), "--block-length needs --reference")


def test_num_drafts_out_of_range():
    assert_one_line_error(run_cli("demo", "--num-drafts", "8"), "--num-drafts must be between 1 and 7")


def test_checkpoint_without_tidar_settings(plain_ckpt):
    assert_one_line_error(run_cli("demo", "--checkpoint", str(plain_ckpt)), "no TiDAR settings")


def test_empty_prompt():
    assert_one_line_error(run_cli("demo", "--prompt", ""), "prompt is empty")


def test_max_tokens_not_positive():
    assert_one_line_error(run_cli("demo", "--max-tokens", "0"), "max_tokens must be > 0")


def test_demo_longer_than_the_model_positions():
    assert_one_line_error(run_cli("demo", "--max-tokens", "5000"), "exceed the model's 2048 positions")


def test_unreadable_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("train", "--base", str(DEMO), "--data", str(empty), "--out", str(tmp_path / "o"), "--steps", "1")
    assert_one_line_error(proc, "no readable text files")
    proc = run_cli("train", "--base", str(DEMO), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "neither a folder nor a .jsonl")


def test_train_block_length_below_two(tmp_path):
    proc = run_cli("train", "--base", str(DEMO), "--data", str(DEMO), "--out", str(tmp_path / "o"), "--block-lengths", "1")
    assert_one_line_error(proc, "block length must be >= 2")


def test_reference_demo_runs_and_reports_parity():
    proc = run_cli("demo", "--reference", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "TiDAR output identical to AR: True" in proc.stdout


def _train_nproc(tmp_path, *args):
    return run_cli("train", "--base", str(DEMO), "--data", str(DEMO), "--out", str(tmp_path / "o"), *args)


def test_train_more_ranks_than_cores(tmp_path):
    import os

    n = len(os.sched_getaffinity(0)) + 1
    proc = _train_nproc(tmp_path, "--nproc", str(n), "--batch-size", str(2 * n))
    assert_one_line_error(proc, f"{n} ranks on this node but only")


def test_train_world_size_not_dividing_the_batch(tmp_path):
    assert_one_line_error(_train_nproc(tmp_path, "--nproc", "2", "--batch-size", "3"), "batch size 3 is not divisible by 2 ranks")


def test_train_missing_distributed_backend(tmp_path):
    import torch.distributed as dist

    if dist.is_nccl_available():
        pytest.skip("this torch build has NCCL")
    proc = _train_nproc(tmp_path, "--nproc", "2", "--device", "cuda")
    assert_one_line_error(proc, "torch.distributed backend 'nccl' (for device cuda) is not available")
