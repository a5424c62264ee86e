"""``vllm-tidar breakdown``: the per-step time split adds up, runs on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from vllm_tidar.cli import main as cli_main

pytest.importorskip("vllm")


@pytest.mark.slow
def test_breakdown_parts_add_up_to_the_step(tmp_path, capsys):
    from vllm_helpers import tiny_checkpoint

    from vllm_tidar.benchmarks.breakdown import GEMMS, PARTS

    ckpt = tiny_checkpoint(block_length=4)
    rc = cli_main(["breakdown", "--checkpoint", str(ckpt), "--batch-sizes", "1,2", "--max-tokens", "10",
                   "--tidar", "4:3,4:1,4:0", "--methods", "class,tidar", "--out", str(tmp_path), "--name", "bd"])
    assert rc == 0
    data = json.loads((tmp_path / "bd.json").read_text())["results"]
    assert set(data) == {"AR (TiDAR class)", "TiDAR Bl=4 K=3", "TiDAR Bl=4 K=1", "TiDAR Bl=4 K=0 (drafting off)"}
    for label, per_batch in data.items():
        assert set(per_batch) == {"1", "2"}
        for b, med in per_batch.items():
            assert med["steps"] > 0
            # each TiDAR request schedules L = (K+1)(1+Bl) tokens per decode step, AR and drafting off 1
            want = 1 if label.startswith("AR") or "drafting off" in label else (int(label[-1]) + 1) * 5
            assert med["tokens_per_step"] == want * int(b)
            assert all(med[p] >= 0 for p in PARTS) and med["attention"] > 0
            assert med["total"] > med["forward"] + med["attention"]
            # the projections' GEMMs run inside the forward; no draft adapter here: no merged GEMMs
            base = sum(med[g] for g in GEMMS if g.endswith("base"))
            assert 0 < base < med["forward"] and all(med[g] == 0 for g in GEMMS if g.endswith("merged"))
    md = (tmp_path / "bd.md").read_text()
    assert "| TiDAR Bl=4 K=3 | 2 | 40 |" in md and md in capsys.readouterr().out
    assert "| method | batch | qkv_proj base |" in md
    assert cli_main(["breakdown", "--tidar", "8-7"]) == 2
    assert "--tidar: expected BLOCK_LENGTH:K pairs" in capsys.readouterr().err
