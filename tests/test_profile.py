"""``vllm-tidar profile``: the block-length recommendation (pure, synthetic curves), the HF
backend on CPU with a tiny random model, and one small end-to-end run through vLLM."""

from __future__ import annotations

import json
import random
import sys

import pytest

from vllm_tidar.benchmarks import profile as prof
from vllm_tidar.benchmarks import profile_hf, profile_vllm
from vllm_tidar.benchmarks.profile import DEFAULT_QUERY_TOKENS
from vllm_tidar.benchmarks.profile_analysis import (
    isotonic_fit,
    overall_recommendation,
    recommend_block_length,
    tidar_query_tokens,
)

GRID = list(DEFAULT_QUERY_TOKENS)


def curve(fn, grid=GRID):
    return grid, [fn(q) for q in grid]


# --- recommendation: synthetic curves ---------------------------------------------------
def test_flat_curve_gives_largest_block_length_the_grid_allows():
    rec = recommend_block_length(*curve(lambda q: 5.0))
    assert rec["block_length"] == 22 and rec["L"] == 506  # 22*23 <= 512 < 23*24
    assert rec["capped"] and rec["max_block_length"] == 22
    assert rec["ratio"] == pytest.approx(1.0)
    small = recommend_block_length(*curve(lambda q: 5.0, [1, 2, 4, 8, 16, 32]))
    assert small["block_length"] == 5 and small["capped"]  # 30 <= 32 < 42


def test_linear_curve_gives_small_block_length():
    # 1 % per extra token: L=6 -> 1.05 ok, L=12 -> 1.11 too slow
    rec = recommend_block_length(*curve(lambda q: 1.0 + 0.01 * (q - 1)))
    assert rec["block_length"] == 2 and rec["L"] == 6 and not rec["capped"]
    # 10 % per token: not even Bl = 2
    none = recommend_block_length(*curve(lambda q: 1.0 + 0.1 * (q - 1)))
    assert none["block_length"] is None and none["L"] is None
    assert none["candidates"][0]["block_length"] == 2 and not none["candidates"][0]["ok"]


def test_knee_curve_flat_then_linear():
    # flat up to q=64, then +1 % per token: threshold 1.1 reached at q = 74 -> Bl=7 (L=56), Bl=8 (L=72) ok
    rec = recommend_block_length(*curve(lambda q: 1.0 if q <= 64 else 1.0 + 0.01 * (q - 64)))
    # L=72 is interpolated between 64 (1.0) and 96 (1.32): 1.08 -> ok; L=90 -> 1.26 -> no
    assert rec["block_length"] == 8 and not rec["measured"]
    assert rec["latency_at_L_ms"] == pytest.approx(1.0 + 0.32 * 8 / 32)


def test_tolerance_parameter():
    grid, lat = curve(lambda q: 1.0 + 0.01 * (q - 1))
    assert recommend_block_length(grid, lat, 0.0)["block_length"] is None
    assert recommend_block_length(grid, lat, 0.30)["block_length"] == 5  # L=30 -> 1.29, L=42 -> 1.41
    with pytest.raises(ValueError):
        recommend_block_length(grid, lat, -0.1)


def test_tie_on_threshold_counts_as_within():
    grid = [1, 6, 12, 20]
    rec = recommend_block_length(grid, [2.0, 2.0, 2.2, 2.4], 0.10)  # L=12 exactly at 1.1x
    assert rec["block_length"] == 3 and rec["ratio"] == pytest.approx(1.1)
    rec = recommend_block_length(grid, [2.0, 2.0, 2.2000001, 2.4], 0.10)
    assert rec["block_length"] == 2


def test_repeated_samples_use_the_median_or_min():
    grid = [1, 2, 6, 12, 20]
    samples = [[10, 10, 90], [10, 11, 10], [10, 60, 10.5], [10.8, 10.5, 99], [15, 15, 15]]
    rec = recommend_block_length(grid, samples)  # medians 10, 10, 10.5, 10.8, 15
    assert rec["block_length"] == 3 and rec["baseline_ms"] == pytest.approx(10)
    assert recommend_block_length(grid, samples, stat="min")["block_length"] == 3
    with pytest.raises(ValueError):
        recommend_block_length(grid, samples, stat="mean")


def test_noisy_flat_curve_one_spike_does_not_cut_it_short():
    rng = random.Random(0)
    lat = [[1.0 + rng.uniform(-0.01, 0.01) for _ in range(5)] for _ in GRID]
    lat[3] = [1.5] * 5  # q=8 slow in every repeat (a burst of load)
    rec = recommend_block_length(GRID, lat)
    assert rec["block_length"] == 22  # pooled with the flat points after it
    raw = recommend_block_length(GRID, lat, monotone=False)
    assert raw["block_length"] is None  # without the fit, the spike at q=8 (next to L=6) stops it


def test_noisy_dip_is_not_taken_as_faster():
    # a dip at q=2 is pooled with the baseline (latency cannot fall with more tokens)
    rec = recommend_block_length([1, 2, 4, 8, 16], [1.0, 0.8, 1.0, 1.05, 2.0])
    assert rec["baseline_ms"] == pytest.approx(0.9)
    assert rec["fit"][2] == pytest.approx(0.9) and rec["fit"][4] == pytest.approx(1.0)
    # threshold 0.99: L=6 interpolates to 1.025 -> not even Bl = 2
    assert rec["block_length"] is None


def test_grid_without_exact_L_interpolate_or_require():
    grid = [1, 6, 20, 64]
    lat = [1.0, 1.0, 1.2, 3.0]
    rec = recommend_block_length(grid, lat)  # L=12 interpolated: 1 + 0.2*6/14 = 1.086 -> ok; L=20: 1.2 no
    assert rec["block_length"] == 3 and not rec["measured"]
    strict = recommend_block_length(grid, lat, interpolate=False)  # only L=6, 20, (42, 56 not on grid)
    assert strict["block_length"] == 2 and strict["measured"]
    assert [c["L"] for c in strict["candidates"]] == [6, 20]
    # L beyond the grid is never extrapolated
    assert recommend_block_length([1, 4, 8], [1, 1, 1])["block_length"] == 2
    assert recommend_block_length([1, 4], [1, 1])["block_length"] is None
    assert recommend_block_length([1, 4], [1, 1])["max_block_length"] is None


def test_input_checks():
    with pytest.raises(ValueError, match="q = 1"):
        recommend_block_length([2, 4], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        recommend_block_length([1, 6], [1, 0])
    with pytest.raises(ValueError, match="duplicate"):
        recommend_block_length([1, 6, 6], [1, 1, 1])
    # order of the grid does not matter
    a = recommend_block_length([12, 1, 6], [1.05, 1.0, 1.0])
    assert a["block_length"] == 3


def test_isotonic_fit():
    assert isotonic_fit([1, 2, 3]) == [1, 2, 3]
    assert isotonic_fit([3, 1]) == [2, 2]
    assert isotonic_fit([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    fit = isotonic_fit([5, 1, 1, 1, 6])
    assert fit == [2, 2, 2, 2, 6]


def test_vllm_max_model_len_leaves_room_for_the_output_token():
    assert profile_vllm.vllm_max_model_len(4096, 512) == 4736  # 4608 + 1 output token
    assert profile_vllm.vllm_max_model_len(128, 6) == 256
    assert profile_vllm.vllm_max_model_len(100, 27) == 128


def test_tidar_query_tokens():
    assert [tidar_query_tokens(b) for b in (2, 4, 8, 16)] == [6, 20, 72, 272]


def test_overall_recommendation():
    flat = recommend_block_length(*curve(lambda q: 1.0))
    lin = recommend_block_length(*curve(lambda q: 1.0 + 0.01 * (q - 1)))
    none = recommend_block_length(*curve(lambda q: q))
    ov = overall_recommendation({(1024, 1): flat, (4096, 4): lin})
    assert ov["block_length"] == 2 and ov["setting"] == [4096, 4]
    ov = overall_recommendation({(1024, 1): flat, (4096, 4): lin, (2048, 4): none})
    assert ov["block_length"] is None and ov["setting"] == [2048, 4]
    ov = overall_recommendation({(1024, 1): flat, (4096, 4): lin}, target=(1024, 1))
    assert ov["block_length"] == 22 and ov["rule"] == "named setting"
    # ties: same block length in two settings -> the first setting in sort order
    assert overall_recommendation({(2048, 1): lin, (1024, 4): lin})["setting"] == [1024, 4]
    with pytest.raises(ValueError):
        overall_recommendation({(1024, 1): flat}, target=(2048, 1))


def test_cli_parsing_and_errors(tmp_path, capsys):
    from vllm_tidar.cli import main

    args = prof.build_parser().parse_args(["--contexts", "1k,2k", "--query-tokens", "8,1,2", "--recommend-for", "2k:4"])
    assert args.contexts == (1024, 2048) and args.query_tokens == (1, 2, 8) and args.recommend_for == (2048, 4)
    assert main(["profile", "--backend", "hf", "--query-tokens", "2,4", "--out", str(tmp_path)]) == 2
    assert "must include 1" in capsys.readouterr().err
    assert main(["profile", "--random-config", "tiny-llama", "--out", str(tmp_path)]) == 2
    assert "--backend hf" in capsys.readouterr().err


def test_stdlib_profile_not_shadowed():
    import cProfile
    import profile

    assert profile.__name__ == "profile" and "benchmarks" not in (profile.__file__ or "")
    assert prof.__name__ == "vllm_tidar.benchmarks.profile"
    assert "benchmarks" not in cProfile.__file__
    cProfile.Profile  # noqa: B018  (usable)
    assert sys.modules["profile"] is profile


# --- HF backend on CPU (tiny random config) -----------------------------------------------
def _check_outputs(out, name, contexts, batches, qs):
    data = json.loads((out / f"{name}.json").read_text())
    keys = {(p["context"], p["batch"], p["q"]) for p in data["points"]}
    assert keys == {(c, b, q) for c in contexts for b in batches for q in qs}
    assert all(p["latency_ms"] > 0 and all(s > 0 for s in p["samples_ms"]) for p in data["points"])
    assert len(data["recommendations"]) == len(contexts) * len(batches)
    assert "block_length" in data["overall"]
    md = (out / f"{name}.md").read_text()
    assert "Recommended block length" in md and "CPU" in md
    pytest.importorskip("matplotlib")
    assert (out / f"{name}.png").stat().st_size > 1000
    return data


def test_hf_backend_tiny_random_config_cpu(tmp_path):
    from vllm_tidar.cli import main

    rc = main(["profile", "--backend", "hf", "--random-config", "tiny-qwen2", "--device", "cpu",
               "--contexts", "16,32", "--batch-sizes", "1,2", "--query-tokens", "1,6,12", "--repeats", "2",
               "--out", str(tmp_path), "--name", "p"])
    assert rc == 0
    data = _check_outputs(tmp_path, "p", [16, 32], [1, 2], [1, 6, 12])
    assert data["meta"]["backend"] == "hf" and data["meta"]["device"] == "cpu"
    assert all(p["mode"] == "eager" for p in data["points"])


def test_hf_static_cache_rewinds_between_runs():
    """The timed forward reuses the same ctx..ctx+q-1 slots: many runs must not overflow."""
    import torch

    model = profile_hf.build_random_model("tiny-llama", torch.float32, "cpu")
    pts = profile_hf.time_hf(model, [8], [1], [1, 3], repeats=4, warmup=2, device="cpu")
    assert set(pts) == {(8, 1, 1), (8, 1, 3)} and all(len(p["samples_ms"]) == 4 for p in pts.values())


# --- vLLM backend end to end (tiny checkpoint) -------------------------------------------
@pytest.mark.slow
def test_vllm_backend_end_to_end_tiny(tmp_path):
    from vllm_helpers import tiny_checkpoint

    from vllm_tidar.cli import main

    ckpt = tiny_checkpoint()
    rc = main(["profile", "--checkpoint", str(ckpt), "--contexts", "128", "--batch-sizes", "1,2",
               "--query-tokens", "1,6", "--repeats", "2", "--out", str(tmp_path), "--name", "v"])
    assert rc == 0
    data = _check_outputs(tmp_path, "v", [128], [1, 2], [1, 6])
    meta = data["meta"]
    assert meta["model_class"].endswith("TiDARLlamaForCausalLM")
    assert meta["attention_backend"].endswith("TiDARCPUBackend")
    assert all(f > 0 for p in data["points"] for f in p["forward_ms"])
