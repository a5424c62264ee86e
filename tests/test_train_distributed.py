"""Two-process FSDP2 training (gloo, CPU) against the 1-process trainer on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_tidar.checkpoint import load_tidar
from vllm_tidar.train import LOG_FILE, TrainConfig, train

# constant lr (lr == min_lr): a run stopped at step 3 and resumed to 5 follows the same schedule as an
# uninterrupted 5-step run; grad accumulation 2 exercises the once-per-step gradient reduce
RECIPE = dict(block_lengths=(4,), seq_len=64, batch_size=4, grad_accum=2, lr=2e-3, min_lr=2e-3, save_every=100)


def _cli_args(base, data, out, steps: int) -> list[str]:
    return ["--base", str(base), "--data", str(data), "--out", str(out), "--block-lengths", "4",
            "--seq-len", "64", "--batch-size", "4", "--grad-accum", "2", "--lr", "2e-3", "--min-lr", "2e-3",
            "--save-every", "100", "--steps", str(steps)]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def _torchrun_train(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "vllm_tidar.cli", "train", "--nproc", "2", *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(base, data, tmp_path_factory):
    """(1-process 5 steps, 2-process FSDP 3 steps + resume to 5 with activation checkpointing) output folders."""
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    train(TrainConfig(base=str(base), data=str(data), out=str(one), steps=5, **RECIPE), progress=False)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores (one per rank)")
    _torchrun_train(*_cli_args(base, data, two, 3), "--activation-checkpointing")
    assert [e["step"] for e in _log(two)] == [1, 2, 3]
    _torchrun_train(*_cli_args(base, data, two, 5), "--activation-checkpointing", "--resume")
    return one, two


@pytest.mark.slow
def test_two_ranks_match_one_process_through_a_resume(runs):
    one, two = runs
    ref, dist = _log(one), _log(two)
    assert [e["step"] for e in dist] == [1, 2, 3, 4, 5]
    assert [e["clean_tokens"] for e in dist] == [e["clean_tokens"] for e in ref] == [512 * s for s in range(1, 6)]
    for a, b in zip(ref, dist):
        for key in ("l_ar", "l_diff"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a, b)
    assert ref[-1]["l_ar"] < ref[0]["l_ar"]  # it trained
    model_one, _, settings_one = load_tidar(one)
    model_two, _, settings_two = load_tidar(two)
    assert settings_two == settings_one
    # Adam turns a gradient that cancels to rounding level (the two ranks sum in another order)
    # into a step of up to lr: such elements may differ by up to lr per step, at most 1 in 10^5
    for (name, p1), (_, p2) in zip(model_one.state_dict().items(), model_two.state_dict().items()):
        off = ~torch.isclose(p2, p1, rtol=1e-4, atol=1e-5)
        assert int(off.sum()) <= p1.numel() // 100_000, (name, int(off.sum()), p1.numel())
        assert float((p2 - p1).abs().max()) <= 5 * RECIPE["lr"], name
    assert (two / "sharded_state").is_dir()


@pytest.mark.slow
def test_fsdp_checkpoint_serves_in_vllm(runs):
    from vllm import SamplingParams

    from vllm_helpers import close_llm, generate, make_llm, token_ids
    from vllm_tidar.reference import ReferenceDecoder

    _, two = runs
    model, tok, settings = load_tidar(two)
    ids = tok("def forward(self, x):", add_special_tokens=False)["input_ids"]
    expected = ReferenceDecoder(model, settings).generate(ids, 8, mode="ar").token_ids
    llm = make_llm(two, max_model_len=256)
    try:
        out = token_ids(generate(llm, [ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    finally:
        close_llm(llm)
    assert out == [expected]


def test_activation_checkpointing_cuts_the_doubled_sequence_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_tidar.activation_memory import measure

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    rows = {(r["mode"], r["activation_checkpointing"]): r for r in measure(model, 128, 2, 4, mask_id=1)}
    assert rows["tidar", False]["kept"] > 1.8 * rows["ar", False]["kept"]  # the doubled sequence
    assert rows["tidar", True]["kept"] < 0.5 * rows["tidar", False]["kept"]
    assert rows["tidar", True]["peak"] < rows["tidar", False]["peak"]
