"""`vllm-tidar quality`: the sandbox, scoring, stop-sequence truncation, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_tidar.benchmarks import quality
from vllm_tidar.benchmarks.quality import STOP_SEQUENCES, check_program, generate_completion, truncate
from vllm_tidar.benchmarks.sandbox import SandboxLimits, run_program, run_programs

DEMO = Path(__file__).resolve().parents[1] / "vllm_tidar" / "checkpoints" / "demo"
FAST = SandboxLimits(timeout=5.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Decode with one torch thread (much faster than two on a busy 2-core machine), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in quality.load_problems()}


# --- sandbox and scoring ------------------------------------------------------------------------
def test_canonical_solutions_pass(problems):
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/53", "HumanEval/162"]  # 162 imports hashlib
    programs = [check_program(problems[i], problems[i]["canonical_solution"]) for i in ids]
    results = run_programs(programs, FAST, workers=2)
    assert [r.status for r in results] == ["passed"] * len(ids), [r.detail for r in results]


def test_wrong_solution_fails(problems):
    p = problems["HumanEval/0"]
    r = run_program(check_program(p, "    return False\n"), FAST)
    assert r.status == "failed" and "AssertionError" in r.detail
    r = run_program(check_program(p, "    return (\n"), FAST)  # syntax error
    assert r.status == "failed" and "SyntaxError" in r.detail


def test_infinite_loop_times_out(problems):
    p = problems["HumanEval/53"]
    r = run_program(check_program(p, "    while True:\n        pass\n"), SandboxLimits(timeout=1.0))
    assert r.status == "timeout" and r.seconds < 4
    r = run_program("import time\ntime.sleep(30)\n", SandboxLimits(timeout=1.0))
    assert r.status == "timeout" and r.seconds < 4


@pytest.mark.parametrize("source, detail", [
    ("x = bytearray(4 << 30)\n", "MemoryError"),  # over RLIMIT_AS
    ("import os\nos.abort()\n", "SIGABRT"),
    ("import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
    ("import os\nos._exit(0)\n", "exited before the end"),  # skips the tests: not a pass
    ("import sys\nsys.exit(0)\n", "SystemExit"),
    ("import os\nos.kill(os.getppid(), 9)\n", "blocked by the sandbox"),
    ("import subprocess\nsubprocess.run(['true'])\n", "blocked by the sandbox"),
])
def test_hostile_programs_fail_without_harm(source, detail):
    r = run_program(source, SandboxLimits(timeout=5.0, memory_mb=512))
    assert r.status == "failed" and detail in r.detail, r
    assert os.getpid() > 0  # still here


def test_pass_needs_the_program_to_finish():
    assert run_program("print('hello')\n", FAST).passed
    assert not run_program("import sys\nprint('x')\nraise SystemExit(0)\n", FAST).passed


def test_candidate_cannot_see_our_environment(monkeypatch):
    monkeypatch.setenv("TIDAR_SECRET_FOR_TEST", "x")
    assert run_program("import os\nassert 'TIDAR_SECRET_FOR_TEST' not in os.environ\n", FAST).passed


# --- stop sequences -------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", STOP_SEQUENCES)
def test_truncate_each_stop(stop):
    assert truncate(f"    return x\n\n{stop[1:]} rest\n") == "    return x\n"
    assert truncate(f"    return x{stop} rest") == "    return x"


def test_truncate_earliest_and_none():
    assert truncate("    a = 1\n#c\n\ndef f():\n") == "    a = 1"
    assert truncate("    a = 1\n\ndef f():\n#c\n") == "    a = 1\n"
    assert truncate("    return 1\n") == "    return 1\n"
    assert truncate("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented: no stop
    assert truncate("\nif __name__") == ""


# --- decoding ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random 2-layer TiDAR Llama with the demo's tokenizer (vocab 8192, mask 1, eos 0)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vllm_tidar.checkpoint import TidarSettings, save_tidar

    tok = AutoTokenizer.from_pretrained(DEMO)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=0, pad_token_id=0, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than HF's init so argmax margins are not razor thin
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    out = tmp_path_factory.mktemp("tiny_quality")
    save_tidar(model, tok, TidarSettings(block_length=4, mask_token_id=1), out)
    return out


@pytest.mark.parametrize("mode", ["ar", "tidar"])
def test_generate_completion_matches_reference_generate(tiny_ckpt, problems, mode):
    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    model, tok, settings = load_tidar(tiny_ckpt)
    dec = ReferenceDecoder(model, settings)
    for task in ("HumanEval/0", "HumanEval/1"):
        ids = tok(problems[task]["prompt"], add_special_tokens=False)["input_ids"]
        full = dec.generate(ids, 24, mode=mode, eos_token_id=tok.eos_token_id)
        c = generate_completion(dec, tok, ids, 24, mode)
        assert full.token_ids[: len(c.token_ids)] == c.token_ids
        assert c.completion == truncate(tok.decode([t for t in full.token_ids if t != 0]))
        if c.finish != "stop_sequence":
            assert c.token_ids == full.token_ids and c.num_forwards == full.num_forwards


def test_stop_sequence_ends_decoding_early(tiny_ckpt, problems):
    """Decoding stops at the token that completes a stop sequence; greedy TiDAR at the same token as AR."""
    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    model, tok, settings = load_tidar(tiny_ckpt)
    dec = ReferenceDecoder(model, settings)
    ids = tok(problems["HumanEval/2"]["prompt"], add_special_tokens=False)["input_ids"]
    full = dec.generate(ids, 24, mode="ar")
    assert 0 not in full.token_ids[:12]  # no EOS in the way
    stop = tok.decode(full.token_ids[7:9])  # text made by tokens 8 and 9: a stop sequence for this test
    text = tok.decode(full.token_ids)
    ar = generate_completion(dec, tok, ids, 24, "ar", stops=(stop,))
    td = generate_completion(dec, tok, ids, 24, "tidar", stops=(stop,))
    assert ar.finish == td.finish == "stop_sequence"
    assert ar.num_forwards == len(ar.token_ids) <= 9 < 24
    assert stop in tok.decode(ar.token_ids) and stop not in tok.decode(ar.token_ids[:-1])
    assert ar.completion == text[: text.index(stop)]
    assert td.token_ids == ar.token_ids and td.completion == ar.completion
    assert td.generated >= len(td.token_ids)  # TiDAR may overshoot inside its last step


# --- end to end ---------------------------------------------------------------------------------------
def _run_quality(ckpt, out, *args):
    """``vllm-tidar quality`` in its own process (see below); asserts it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_tidar.cli", "quality", "--checkpoint", str(ckpt), *args, "--timeout", "3",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_quality_cli_end_to_end(tiny_ckpt, tmp_path):
    """The command as users run it, in its own process (an in-process vLLM engine of an earlier
    test replaces torch.set_num_threads with a no-op for the rest of the process)."""
    out = tmp_path / "q"
    proc = _run_quality(tiny_ckpt, out, "--limit", "2", "--max-tokens", "16", "--betas", "1,0.5")
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["modes"]] == ["ar", "tidar_beta1", "tidar_beta0.5"]
    assert report["exactness_beta1"]["identical"] == 2 == report["exactness_beta1"]["problems"]
    ar = report["modes"][0]
    assert ar["tokens_per_forward"] == pytest.approx(1.0) and ar["problems"] == 2
    assert all(m["statuses"]["passed"] + m["statuses"]["failed"] + m["statuses"]["timeout"] == 2
               for m in report["modes"])
    assert [p["task_id"] for p in report["problems"]] == ["HumanEval/0", "HumanEval/1"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    md = (out / "report.md").read_text()
    assert "pass@1" in md and "2/2" in md and "Sandbox" in md
    assert "wrote" in proc.stdout
    assert report["torch_threads"] == 1  # --threads default: decoded with one torch thread


def test_quality_cli_errors(capsys):
    from vllm_tidar.cli import main

    assert main(["quality", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quality", "--betas", "1,2"])


def test_quality_plain_ar_only(tiny_ckpt, tmp_path):
    """``--betas none``: pass@1 of plain AR alone (an AR base before its conversion)."""
    out = tmp_path / "q"
    _run_quality(tiny_ckpt, out, "--limit", "1", "--max-tokens", "8", "--betas", "none")
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["modes"]] == ["ar"] and report["exactness_beta1"] is None
    assert "pass@1" in (out / "report.md").read_text()
