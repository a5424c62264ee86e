"""``vllm-tidar tokens-per-forward``: TPF with the AR quality guards (distinct 4-grams,
repetition filter, identity with AR), held-out prompts and the held-out AR loss."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_tidar.cli import main as cli_main
from vllm_tidar.repetition import MIN_DISTINCT_4, distinct_4
from vllm_tidar.tokens_per_forward import held_out_loss, measure, source_prompts


def test_distinct_4_counts_repeated_4grams():
    assert distinct_4([1, 2, 3, 4, 5, 6]) == 1.0
    assert distinct_4([7] * 20) == pytest.approx(1 / 17)  # a loop: one 4-gram over and over
    assert distinct_4([1, 2]) == 1.0
    assert distinct_4([7] * 20) < MIN_DISTINCT_4 < distinct_4(list(range(20)))


def test_source_prompts_are_def_lines_with_their_docstring(tmp_path):
    (tmp_path / "a.py").write_text(
        'def f(x):\n    """One line."""\n    return x\n\n'
        'class C:\n    def g(self):\n        """Two\n        lines.\n        """\n        pass\n'
        'def h():\n    return 1\n'
    )
    assert source_prompts(tmp_path) == [
        'def f(x):\n    """One line."""\n',
        '    def g(self):\n        """Two\n        lines.\n        """\n',
    ]
    with pytest.raises(Exception, match="no .py files"):
        source_prompts(tmp_path / "missing")


def test_measure_reports_guards_and_shares_ar_outputs(tmp_path):

    from vllm_tidar.checkpoint import load_tidar

    from vllm_helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(block_length=4)
    loaded = load_tidar(ckpt)
    prompts = ["def add(a, b):\n", "import os\n\n"]
    cache: dict = {}
    with torch.inference_mode():
        s = measure(str(ckpt), prompts, 4, max_tokens=12, model_tok_settings=loaded, ar_cache=cache)
    assert s["identical_to_ar"] == 2  # greedy TiDAR is lossless
    assert set(cache) == set(prompts) and all(len(v) == 12 for v in cache.values())
    assert 1.0 <= s["tokens_per_forward"] <= 4.0 and len(s["acceptance_per_position"]) == 3
    want = sum(distinct_4(v) for v in cache.values()) / 2
    assert s["ar_distinct_4"] == pytest.approx(want)
    assert s["filtered_prompts"] == sum(distinct_4(v) >= MIN_DISTINCT_4 for v in cache.values())
    (tmp_path / "m.py").write_text("def f(x):\n    return x + 1\n" * 200)
    h = held_out_loss(str(ckpt), tmp_path, max_windows=2, model_tok_settings=loaded)
    assert h["windows"] == 2 and h["loss"] > 0


def test_cli_writes_json_with_held_out_set(tmp_path, capsys):
    from vllm_helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(block_length=4)
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text('def f(x):\n    """Add one."""\n    return x + 1\n' * 120)
    out = tmp_path / "tpf.json"
    rc = cli_main(["tokens-per-forward", "--checkpoint", str(ckpt), "--block-lengths", "4", "--max-tokens", "8",
                   "--limit", "2", "--prompts-from", str(src), "--held-out-limit", "1", "--held-out", str(src),
                   "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["sets"]) == {"HumanEval", "src"} and rep["sets"]["src"][0]["prompts"] == 1
    assert rep["held_out"]["windows"] >= 1
    printed = capsys.readouterr().out
    assert "HumanEval (2 prompts) block length 4" in printed and "identical to AR 2/2" in printed
