"""``vllm-tidar bench``: the accounting on hand-made inputs, input errors, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from vllm_tidar.benchmarks import bench
from vllm_tidar.benchmarks import bench_stats as st
from vllm_tidar.cli import main as cli_main
from vllm_tidar.errors import TidarError


# --- accounting ------------------------------------------------------------------------------
def test_percentile_linear_interpolation():
    assert st.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert st.percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert st.percentile([1, 2, 3, 4], 0) == 1 and st.percentile([1, 2, 3, 4], 100) == 4
    assert st.percentile([7.0], 95) == 7.0
    assert st.percentile([], 50) is None
    with pytest.raises(ValueError):
        st.percentile([1], 101)


def test_tokens_per_s_and_tpot():
    assert st.tokens_per_s(256, 2.0) == 128.0
    with pytest.raises(ValueError):
        st.tokens_per_s(10, 0.0)
    assert st.request_tpot(10.0, 10.7, 8) == pytest.approx(0.1)
    assert st.request_tpot(10.0, 10.0, 1) is None


def test_forwards_per_request():
    assert st.request_forwards(8) == 8  # plain AR: prefill + 7 decode steps
    assert st.request_forwards(0) == 0
    # 3 verify steps yield 3 + 1 + 4 = 8 tokens >= the 7 after prefill: the last one was trimmed
    assert st.request_forwards(8, [2, 0, 3]) == 4
    # 2 verify steps yield 4 tokens, 5 more come from draft-less steps (e.g. n-gram found nothing)
    assert st.request_forwards(10, [1, 1]) == 1 + 2 + 5
    assert st.tokens_per_forward(10, 8) == 1.25
    assert st.tokens_per_forward(0, 0) is None


def test_acceptance_per_position_and_histogram():
    accepted = [[2, 0, 3], [1]]
    assert st.acceptance_per_position(accepted, 3) == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    # TiDAR's mask slots counted as drafts (43 = 3 + 4*10) change nothing: only the first K count
    assert st.acceptance_per_position(accepted, 3, [[43, 43, 43], [43]]) == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    # steps that drafted fewer tokens only count for the positions they drafted
    assert st.acceptance_per_position(accepted, 3, [[3, 1, 3], [2]]) == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert st.acceptance_per_position([[]], 2) == [None, None]
    assert st.acceptance_histogram(accepted, 3) == [1, 1, 1, 1]
    assert st.mean_acceptance_length(accepted) == pytest.approx(2.5)
    assert st.mean_acceptance_length([[], []]) is None


def _req(n, first, last, ttft, accepted=(), drafted=None):
    return {
        "num_tokens": n, "first_token_ts": first, "last_token_ts": last, "ttft": ttft,
        "per_step_accepted": list(accepted), "per_step_drafted": list(drafted or [3] * len(accepted)),
    }


def test_summarize_row():
    reqs = [_req(8, 1.0, 1.7, 0.05, [2, 0, 3]), _req(8, 2.0, 3.4, 0.15, [1, 1, 1, 0, 0])]
    row = st.summarize(reqs, seconds=2.0, k=3)
    assert row["tokens"] == 16 and row["requests"] == 2
    assert row["tokens_per_s"] == 8.0
    assert row["tpot_p50_ms"] == pytest.approx(150.0)  # per-request TPOTs 100 and 200 ms
    assert row["tpot_p95_ms"] == pytest.approx(195.0)
    assert row["ttft_mean_ms"] == pytest.approx(100.0) and row["ttft_p50_ms"] == pytest.approx(100.0)
    # request 1: 4 forwards; request 2: 5 verify steps yield 8 tokens >= 7 -> 6 forwards
    assert row["forwards"] == 10 and row["tokens_per_forward"] == pytest.approx(1.6)
    assert row["verify_steps"] == 8
    assert row["mean_acceptance_length"] == pytest.approx(1 + 8 / 8)
    assert row["acceptance_per_position"] == pytest.approx([5 / 8, 2 / 8, 1 / 8])
    assert row["acceptance_histogram"] == [3, 3, 1, 1]
    ar = st.summarize([_req(8, 0.0, 0.7, 0.1)], seconds=1.0)
    assert ar["tokens_per_forward"] == 1.0 and ar["acceptance_per_position"] == [] and ar["mean_acceptance_length"] is None


_META = dict(machine="cpu", vllm="0.32.0", torch="2.13.0", dtype="float32", checkpoint_name="demo", block_length=8,
             num_prompts=2, prompt_source="HumanEval", max_tokens=4, batch_sizes=[1], total_s=6.0,
             load_average={"start": 0.5, "end": 0.6}, notes=[])


def test_rows_speedup_and_identity():
    methods = [
        bench.Method("ar", "AR", "ar", baseline=""),
        bench.Method("tidar-k3", "TiDAR K=3", "tidar", k=3),
    ]
    ar_recs = [dict(_req(4, 0.0, 0.3, 0.1), token_ids=[1, 2, 3, 4]), dict(_req(4, 0.0, 0.3, 0.1), token_ids=[5, 6, 7, 8])]
    td_recs = [dict(_req(4, 0.0, 0.1, 0.1, [2]), token_ids=[1, 2, 3, 4]), dict(_req(4, 0.0, 0.1, 0.1, [2]), token_ids=[5, 6, 7, 9])]
    results = {
        "ar": {"rounds": [{1: {"records": ar_recs, "seconds": 2.0}}]},
        "tidar-k3": {"rounds": [{1: {"records": td_recs, "seconds": 1.0}}]},
    }
    rows = bench.make_rows(methods, results)
    assert [r["method"] for r in rows] == ["ar", "tidar-k3"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["identical"] is None
    assert rows[1]["speedup"] == pytest.approx(2.0) and rows[1]["identical"] == 1
    assert rows[1]["tokens_per_forward"] == pytest.approx(4 / 2)
    assert st.identical_count([[1], [2]], [[1], [3]]) == 1

    # three interleaved rounds: the speedup is the median of within-round ratios (3, 2, 0.5 -> 2),
    # not the ratio of pooled rates; identity and tokens/forward pool every round
    ar_s, td_s = [1.0, 2.0, 1.0], [1 / 3, 1.0, 2.0]
    results = {
        "ar": {"rounds": [{1: {"records": ar_recs, "seconds": a}} for a in ar_s]},
        "tidar-k3": {"rounds": [{1: {"records": td_recs, "seconds": t}} for t in td_s]},
    }
    rows = bench.make_rows(methods, results)
    assert rows[1]["rounds"] == 3 and rows[1]["speedup"] == pytest.approx(2.0)
    assert rows[1]["speedup_range"] == pytest.approx([0.5, 3.0])
    assert rows[1]["identical"] == 3 and rows[1]["requests"] == 6
    assert rows[1]["tokens_per_s"] == pytest.approx(24 / sum(td_s))
    md = bench.markdown(rows, dict(_META, rounds=3))
    assert "2.00× (0.50–3.00)" in md and "median over 3 rounds" in md


def test_interleaved_runs_every_batch_on_every_engine_in_rotating_order(monkeypatch):
    from types import SimpleNamespace

    calls = []

    class Engine:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at = name, fail_at

        def generate(self, reqs, sp, use_tqdm):
            calls.append((self.name, len(reqs)))
            if self.fail_at is not None and len(calls) >= self.fail_at:
                raise RuntimeError("head broke\nmore")
            return [r["prompt_token_ids"] for r in reqs]

    monkeypatch.setattr(bench.st, "request_record", lambda i, o: {"prompt": i, "token_ids": o, "num_tokens": len(o)})
    methods = [bench.Method(n, n, k) for n, k in (("ar", "ar"), ("tidar-k3", "tidar"), ("ngram", "ngram"))]
    engines = {m.name: Engine(m.name) for m in methods}
    args = SimpleNamespace(rounds=2, batch_sizes=[1, 2], max_tokens=4)
    prompts = [[1], [2, 2], [3, 3, 3]]
    bar = SimpleNamespace(update=lambda n: None, set_postfix_str=lambda s: None)
    dropped = []

    def failed(m, e):
        dropped.append((m.name, str(e)))
        engines.pop(m.name)

    out = bench.run_interleaved(methods, engines, args, prompts, bar, failed)
    # 2 rounds x (3 batches of 1 + 2 batches of 2) x 3 engines, each batch on every engine in turn
    assert len(calls) == 2 * 5 * 3
    firsts = [calls[i][0] for i in range(0, len(calls), 3)]
    assert firsts[:4] == ["ar", "tidar-k3", "ngram", "ar"]  # the order rotates from batch to batch
    for name in engines:
        assert len(out[name]) == 2
        for rnd in out[name]:
            assert [r["prompt"] for r in rnd[1]["records"]] == [0, 1, 2] and [r["prompt"] for r in rnd[2]["records"]] == [0, 1, 2]
            assert rnd[2]["records"][2]["token_ids"] == [3, 3, 3] and rnd[1]["seconds"] > 0
    # a method that fails is dropped; the others keep every batch
    calls.clear()
    engines = {m.name: Engine(m.name, fail_at=5 if m.name == "ngram" else None) for m in methods}
    out = bench.run_interleaved(methods, engines, args, prompts, bar, failed)
    assert dropped == [("ngram", "head broke\nmore")] and set(out) == {"ar", "tidar-k3"}
    assert all(len(rnd[b]["records"]) == 3 for name in out for rnd in out[name] for b in (1, 2))


# --- inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
        ('{"text": "a"}\n', 'line 1 has no string "prompt" field'),
        ("\n\n", "no prompts in the file"),
    ],
)
def test_bad_prompts_file_is_one_line(tmp_path, capsys, content, message):
    f = tmp_path / "p.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(TidarError, match=message):
        bench.load_prompts(str(f), 4)
    assert cli_main(["bench", "--prompts", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vllm-tidar bench: error: --prompts") and message in err and "\n" not in err


def test_prompts_file_and_humaneval(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def f():"}\n\n{"prompt": "x = 1", "id": 3}\n')
    assert bench.load_prompts(str(f), 8) == (["def f():", "x = 1"], "p.jsonl")
    texts, source = bench.load_prompts(None, 3)
    assert source == "HumanEval" and len(texts) == 3 and texts[0].startswith("from typing import List")


def test_bad_tidar_k_and_methods(tmp_path, capsys):
    assert cli_main(["bench", "--tidar-k", "8", "--out", str(tmp_path)]) == 2
    assert "--tidar-k 8: K must be between 1 and 7 (block length 8)" in capsys.readouterr().err
    assert cli_main(["bench", "--methods", "ar,medusa", "--out", str(tmp_path)]) == 2
    assert "unknown medusa" in capsys.readouterr().err
    assert cli_main(["bench", "--draft-dtypes", "fp8", "--out", str(tmp_path)]) == 2
    assert "tidar_draft_dtype must be one of auto, float32, bfloat16, got 'fp8'" in capsys.readouterr().err


def test_default_methods_on_demo(tmp_path):
    args = bench.build_parser().parse_args(["--eagle3", str(tmp_path / "missing")])
    info = bench.checkpoint_info(bench.DEMO)
    methods, notes = bench.build_methods(args, info, bench.DEMO)
    assert [m.name for m in methods] == ["ar", "tidar-adaptive", "tidar-k7", "tidar-k3", "ar-llama", "ngram"]
    assert [m.num_spec for m in methods if m.kind == "tidar"] == [7 + 8 * 8, 7 + 8 * 8, 3 + 4 * 8]
    fixed = next(m for m in methods if m.name == "tidar-k3").engine["speculative_config"]
    assert fixed["num_speculative_tokens_per_batch_size"] == [[1, 16, 3]]  # fixed K: a one-range schedule
    assert "num_speculative_tokens_per_batch_size" not in methods[1].engine["speculative_config"]
    assert {m.baseline for m in methods if m.kind == "tidar"} == {"ar"}
    assert next(m for m in methods if m.name == "ngram").baseline == "ar-llama"
    assert any("EAGLE-3 skipped" in n for n in notes)
    args = bench.build_parser().parse_args(["--block-length", "4", "--methods", "tidar"])
    methods, _ = bench.build_methods(args, info, bench.DEMO)
    assert [m.name for m in methods] == ["tidar-adaptive", "tidar-k3", "tidar-k1"]
    assert all(m.engine["hf_overrides"]["tidar"]["block_length"] == 4 for m in methods)
    assert methods[0].num_spec == 3 + 4 * 4
    args = bench.build_parser().parse_args(["--methods", "tidar", "--fixed-layout", "4:3", "--tidar-k", "7"])
    methods, _ = bench.build_methods(args, info, bench.DEMO)
    assert [m.name for m in methods] == ["tidar-adaptive", "tidar-bl4-k3", "tidar-k7"]
    assert methods[1].engine["hf_overrides"]["tidar"]["block_length"] == 4 and methods[1].num_spec == 19
    args = bench.build_parser().parse_args(["--tidar-k", "all", "--methods", "tidar", "--no-adaptive"])
    methods, _ = bench.build_methods(args, info, bench.DEMO)
    assert [m.k for m in methods] == [7, 6, 5, 4, 3, 2, 1]
    args = bench.build_parser().parse_args(["--methods", "ar,tidar", "--fixed-layout", "4:3", "--no-adaptive",
                                            "--tidar-k", "7", "--draft-dtypes", "bfloat16,float32"])
    methods, _ = bench.build_methods(args, info, bench.DEMO)
    assert [m.name for m in methods] == ["ar", "tidar-bl4-k3-bfloat16", "tidar-bl4-k3-float32", "tidar-k7-bfloat16",
                                         "tidar-k7-float32"]
    assert [m.engine.get("hf_overrides", {}).get("tidar_draft_dtype") for m in methods] == [
        None, "bfloat16", "float32", "bfloat16", "float32"]
    assert methods[1].engine["hf_overrides"]["tidar"]["block_length"] == 4 and "[bfloat16 drafts]" in methods[1].label
    args = bench.build_parser().parse_args(["--methods", "tidar", "--no-adaptive", "--tidar-k", "7",
                                            "--draft-dtypes", "float32"])
    (only,), _ = bench.build_methods(args, info, bench.DEMO)
    assert only.name == "tidar-k7" and only.engine["hf_overrides"] == {"tidar_draft_dtype": "float32"}


# --- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_end_to_end_tiny(tmp_path, capsys):
    from vllm_helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(block_length=4)
    out = tmp_path / "out"
    rc = cli_main([
        "bench", "--checkpoint", str(ckpt), "--num-prompts", "2", "--max-tokens", "6", "--batch-sizes", "1,2",
        "--methods", "ar,tidar,eagle3,ngram", "--tidar-k", "3", "--out", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "speedup.png", "acceptance.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert md in printed and "| TiDAR K=3 | 2 |" in md and "EAGLE-3 skipped" in md
    assert "Adaptive drafting started cold (`VLLM_TIDAR_POLICY_CACHE=0`)." in md  # (the tests' setting)
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["adaptive_policy_start"] == {"cache": None, "restored_steps": 0}
    rows = data["rows"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [
        (m, b) for m in ("ar", "tidar-adaptive", "tidar-k3", "ngram") for b in (1, 2)
    ]
    for r in rows:
        assert r["requests"] == 2 and r["tokens"] == 2 * 6
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["tpot_p50_ms"] <= r["tpot_p95_ms"]
        assert 1.0 <= r["tokens_per_forward"] <= 1 + r["k"]
        assert r["forwards"] <= r["tokens"]
        rates = [a for a in r["acceptance_per_position"] if a is not None]
        assert all(0 <= a <= 1 for a in rates) and rates == sorted(rates, reverse=True)
        if r["method"] == "ar":
            assert r["speedup"] == 1.0 and r["tokens_per_forward"] == 1.0
        else:
            ar = next(x for x in rows if x["method"] == "ar" and x["batch_size"] == r["batch_size"])
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / ar["tokens_per_s"])
            assert r["identical"] == 2  # greedy speculative decoding reproduces AR
    adaptive = [r for r in rows if r["method"] == "tidar-adaptive"]
    assert all(0 <= r["drafting_share"] <= 1 and "of steps drafting" in r["label"] for r in adaptive)
    td = [r for r in rows if r["method"] == "tidar-k3"]
    assert all(len(r["acceptance_per_position"]) == 3 and len(r["acceptance_histogram"]) == 4 for r in td)
    assert all(sum(r["acceptance_histogram"]) == r["verify_steps"] > 0 for r in td)
    per_req = data["requests"]["tidar-k3"][0]["1"]  # round 1, batch 1
    assert len(per_req) == 2 and all(len(x["per_step_accepted"]) == len(x["per_step_drafted"]) for x in per_req)
