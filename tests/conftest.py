"""Shared fixtures: a tiny random TiDAR checkpoint and the committed demo checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_tidar.checkpoint import TidarSettings

DEMO = Path(__file__).resolve().parents[1] / "vllm_tidar" / "checkpoints" / "demo"
# engines under test start cold: no adaptive-policy state from this machine's earlier runs
# (tests that check the cache point it at a temporary folder)
os.environ["VLLM_TIDAR_POLICY_CACHE"] = "0"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (run in CI, skip locally with -m 'not slow')")


def tiny_llama(vocab: int = 96, seed: int = 0, dtype=torch.float64, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama; float64 so argmax ties cannot flip between batchings."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    cfg["attn_implementation"] = "sdpa"
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny():
    """(model, settings): mask token is the last id."""
    model = tiny_llama()
    return model, TidarSettings(block_length=4, mask_token_id=model.config.vocab_size - 1)


@pytest.fixture(scope="session")
def demo():
    from vllm_tidar.checkpoint import load_tidar

    return load_tidar(DEMO)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """(trainer tests) A tiny random AR Llama with the demo tokenizer (no mask token: the trainer adds it);
    head size 32, the smallest vLLM's CPU attention kernel runs (its checkpoints are served in tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("base")
    tok = AutoTokenizer.from_pretrained(DEMO)
    tok.save_pretrained(out)
    # drop the mask token from the copied vocabulary so the trainer must add it
    raw = json.loads((out / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|mask|>"]
    (out / "tokenizer.json").write_text(json.dumps(raw))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("extra_special_tokens", None)
    cfg.pop("additional_special_tokens", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, head_dim=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, eos_token_id=0, bos_token_id=None))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """(trainer tests) Six torch.nn source files as training text."""
    d = tmp_path_factory.mktemp("data")
    src = Path(torch.__file__).parent / "nn" / "modules"
    for p in sorted(src.glob("*.py"))[:6]:
        (d / p.name).write_text(p.read_text())
    return d
