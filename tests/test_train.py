"""The AR -> TiDAR trainer on a tiny model."""

import json

import pytest
import torch

from vllm_tidar.checkpoint import load_tidar
from vllm_tidar.layout import TrainingLayout
from vllm_tidar.reference import ReferenceDecoder
from vllm_tidar.data import pack, read_texts
from vllm_tidar.objective import tidar_loss
from vllm_tidar.train import TrainConfig, _load, lr_at, train


def test_training_lowers_both_losses_and_saves_a_tidar_checkpoint(base, data, tmp_path):
    out = tmp_path / "tidar"
    cfg = TrainConfig(base=str(base), data=str(data), out=str(out), block_lengths=(4,), seq_len=64,
                      batch_size=4, steps=30, lr=3e-3, min_lr=3e-4, warmup=0.1, save_every=15)
    model0, tok0, mask_id = _load(cfg)
    rows = pack(read_texts(data), tok0, 64)[:8]
    layout = TrainingLayout(64, 4)
    with torch.no_grad():
        _, ar0, diff0 = tidar_loss(model0, rows, layout, mask_id, 1.0)
    train(cfg, progress=False)
    model, tok, settings = load_tidar(out)
    with torch.no_grad():
        _, ar1, diff1 = tidar_loss(model, rows, layout, settings.mask_token_id, 1.0)
    assert ar1 < ar0 - 0.5 and diff1 < diff0 - 0.5
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["TiDARLlamaForCausalLM"] and raw["tidar"]["block_length"] == 4
    assert tok.convert_ids_to_tokens(settings.mask_token_id) == "<|mask|>"
    dec = ReferenceDecoder(model, settings)
    ids = tok("def forward(self", add_special_tokens=False)["input_ids"]
    res = dec.generate(ids, 20)
    assert res.token_ids == dec.generate(ids, 20, mode="ar").token_ids and len(res.token_ids) == 20


def test_resume_continues_from_saved_step(base, data, tmp_path):
    out = tmp_path / "tidar"
    common = dict(base=str(base), data=str(data), out=str(out), block_lengths=(4,), seq_len=64,
                  batch_size=2, lr=1e-3, save_every=3)
    train(TrainConfig(**common, steps=3), progress=False)
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    train(TrainConfig(**common, steps=6, resume=True), progress=False)
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 6


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(base="", data="", out="", steps=100, lr=1.0, min_lr=0.1, warmup=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(10, cfg) > lr_at(50, cfg) > lr_at(90, cfg)
