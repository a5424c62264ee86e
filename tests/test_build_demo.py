"""``vllm-tidar build-demo``'s stages, wired with recording stand-ins for training and distillation."""

import json
from pathlib import Path

import pytest

from vllm_tidar import cli, demo_base, distill, train
from vllm_tidar.demo_base import DEMO_DISTILL_RECIPE, DEMO_HEADERS_RECIPE, DEMO_RECIPE


@pytest.fixture
def calls(monkeypatch):
    """Each stage's call: ("train", config) or ("distill", config); distill writes one sample line."""
    seen = []

    def fake_train(cfg, progress=True):
        seen.append(("train", cfg))
        if cfg.distill_data:
            seen.append(("data", Path(cfg.distill_data).read_text()))
        return Path(cfg.out)

    def fake_distill(cfg, progress=True):
        seen.append(("distill", cfg))
        Path(cfg.out).write_text(json.dumps({"kind": cfg.prompt_kind}) + "\n")
        return {}

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(distill, "distill", fake_distill)
    monkeypatch.setattr(demo_base, "build_base", lambda out, seed=0: Path(out))
    monkeypatch.setattr(demo_base, "write_corpus", lambda out: Path(out))
    return seen


def test_build_demo_runs_the_three_stages_in_order(calls, tmp_path):
    assert cli.main(["build-demo", "--out", str(tmp_path / "demo")]) == 0
    kinds = [c[0] for c in calls]
    assert kinds == ["train", "distill", "train", "data", "distill", "train", "data"]
    stage1, windows, stage2, _, headers, stage3, both = (c[1] for c in calls)
    assert stage1.block_lengths == DEMO_RECIPE["block_lengths"] and stage1.steps == 600
    assert windows.checkpoint == stage1.out and windows.prompt_kind == "windows"
    assert stage2.base == stage1.out and stage2.steps == 2000 and stage2.draft_adapter_rank == 256
    assert not stage2.distill_completion_only and stage2.lr == DEMO_DISTILL_RECIPE["lr"]
    assert headers.checkpoint == stage1.out and headers.prompt_kind == "headers" and headers.num_samples == 4000
    assert stage3.base == stage2.out and stage3.out == str(tmp_path / "demo") and stage3.steps == 800
    assert stage3.distill_completion_only and stage3.lr == DEMO_HEADERS_RECIPE["lr"]
    assert [json.loads(line)["kind"] for line in both.splitlines()] == ["windows", "headers"]


def test_build_demo_stops_after_the_stages_asked_for(calls, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["build-demo", "--out", out, "--headers-steps", "0"]) == 0
    assert [c[0] for c in calls] == ["train", "distill", "train", "data"] and calls[2][1].out == out
    calls.clear()
    assert cli.main(["build-demo", "--out", out, "--distill-steps", "0"]) == 0
    assert [c[0] for c in calls] == ["train"] and calls[0][1].out == out
    assert cli.main(["build-demo", "--out", out, "--distill-steps", "0", "--headers-steps", "5"]) == 2
    assert "--headers-steps continues the self-distillation stage" in capsys.readouterr().err
