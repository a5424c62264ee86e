"""Unit tests of the vLLM plugin pieces (no engine): registration, config rewriting,
the TiDAR CPU attention backend against a dense reference, and draft selection."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vllm_tidar.checkpoint import TidarSettings
from vllm_tidar.errors import TidarError
from vllm_tidar.layout import DecodeLayout, StepMask


def test_import_is_vllm_free():
    code = "import sys, vllm_tidar; assert callable(vllm_tidar.register); assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "tidar"]
    assert eps and eps[0].value == "vllm_tidar:register"


def test_register_registers_architectures_and_config_hooks():
    import vllm_tidar
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_tidar.plugin.common import MODEL_CLASSES
    from vllm_tidar.plugin.config import TiDARConfigHook

    vllm_tidar.register()
    vllm_tidar.register()
    archs = set(ModelRegistry.get_supported_archs())
    for arch in MODEL_CLASSES:
        assert arch in archs
        assert MODELS_CONFIG_MAP[arch] is TiDARConfigHook


def _model_config(archs, tidar=None, **extra):
    hf = SimpleNamespace(architectures=archs, vocab_size=100, **extra)
    if tidar is not None:
        hf.tidar = tidar
    return SimpleNamespace(hf_config=hf, model="ckpt")


def test_speculative_config_rewrites():
    from vllm_tidar.plugin.common import PROPOSER_PATH
    from vllm_tidar.plugin.config import tidar_speculative_config

    tidar = {"block_length": 4, "mask_token_id": 1}
    mc = _model_config(["TiDARLlamaForCausalLM"], tidar)
    auto = tidar_speculative_config(None, mc)
    assert auto == {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": 19}
    sugar = tidar_speculative_config({"method": "tidar", "num_speculative_tokens": 2}, mc)
    assert sugar["num_speculative_tokens"] == 2 + 3 * 4 and sugar["method"] == "custom_class"
    assert tidar_speculative_config(None, _model_config(["TiDARLlamaForCausalLM"], tidar, tidar_mode="ar")) is None
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    assert tidar_speculative_config(dict(ngram), mc) == ngram
    plain = _model_config(["LlamaForCausalLM"])
    assert tidar_speculative_config(None, plain) is None
    with pytest.raises(TidarError, match="needs a TiDAR checkpoint"):
        tidar_speculative_config({"method": "tidar"}, plain)
    with pytest.raises(TidarError, match="between 1 and 3"):
        tidar_speculative_config({"method": "tidar", "num_speculative_tokens": 0}, mc)


# --- attention backend ---------------------------------------------------------------------
def _fill_cache(impl, kv_cache, block_table, keys, values, start, bs):
    """Write tokens at logical positions start.. of one request through do_kv_cache_update."""
    n = keys.shape[0]
    pos = torch.arange(start, start + n)
    slots = block_table[pos // bs].long() * bs + pos % bs
    impl.do_kv_cache_update(None, keys, values, kv_cache, slots)


def test_attention_backend_matches_dense_template_and_causal():
    from vllm_tidar.plugin.attention import TiDARCPUImpl, TiDARCPUMetadata

    torch.manual_seed(0)
    hq, hkv, d, bs, nb = 4, 2, 16, 32, 16
    layout = DecodeLayout(4)
    big_l = layout.num_tokens
    step_mask = StepMask(layout, 256)
    impl = TiDARCPUImpl(hq, d, d**-0.5, hkv)
    kv_cache = torch.zeros(nb, hkv, bs, 2 * d)

    # request 0: TiDAR step after P=45 committed tokens; request 1: 37-token prefill chunk
    # after 10 cached tokens; request 2: one-token decode after 70 tokens
    reqs = [(45, big_l, True), (10, 37, False), (70, 1, False)]
    tables = [torch.tensor([3, 7, 1, 0]), torch.tensor([9, 2, 0, 0]), torch.tensor([4, 5, 11, 0])]
    qs, ks, vs, outs_ref = [], [], [], []
    for (prefix, t, tidar), table in zip(reqs, tables):
        k_all = torch.randn(prefix + t, hkv, d)
        v_all = torch.randn(prefix + t, hkv, d)
        _fill_cache(impl, kv_cache, table, k_all[:prefix], v_all[:prefix], 0, bs)
        q = torch.randn(t, hq, d)
        qs.append(q), ks.append(k_all[prefix:]), vs.append(v_all[prefix:])
        if tidar:
            mask = step_mask.for_prefix(prefix)
        else:
            mask = torch.arange(prefix + t)[None, :] <= (torch.arange(t)[:, None] + prefix)
        ref = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k_all.transpose(0, 1).repeat_interleave(hq // hkv, 0),
            v_all.transpose(0, 1).repeat_interleave(hq // hkv, 0),
            attn_mask=mask,
            scale=d**-0.5,
        )
        outs_ref.append(ref.transpose(0, 1))
    # this step's new tokens go through the batched KV write, like the runner does
    qsl = [0]
    for _, t, _ in reqs:
        qsl.append(qsl[-1] + t)
    slot_mapping = torch.cat(
        [
            table[torch.arange(p, p + t) // bs].long() * bs + torch.arange(p, p + t) % bs
            for (p, t, _), table in zip(reqs, tables)
        ]
    )
    impl.do_kv_cache_update(None, torch.cat(ks), torch.cat(vs), kv_cache, slot_mapping)
    md = TiDARCPUMetadata(
        num_actual_tokens=qsl[-1],
        num_reqs=3,
        query_start_loc=qsl,
        seq_lens=[p + t for p, t, _ in reqs],
        is_prefilling=[False, True, False],
        block_table=torch.stack(tables),
        slot_mapping=slot_mapping,
        tidar_step=[r[2] for r in reqs],
        step_mask=step_mask,
    )
    output = torch.empty(qsl[-1], hq, d)
    impl.forward(None, torch.cat(qs), None, None, kv_cache, md, output)
    torch.testing.assert_close(output, torch.cat(outs_ref), rtol=1e-5, atol=1e-5)


# --- proposer ------------------------------------------------------------------------------
class _FakeModel:
    def __init__(self, stash):
        self.stash = stash

    def take_tidar_drafts(self):
        s, self.stash = self.stash, {}
        return s


def _proposer(bl=4, k=None):
    from vllm_tidar.plugin.common import PROPOSER_PATH
    from vllm_tidar.plugin.proposer import TiDARProposer

    layout = DecodeLayout(bl, k)
    hf = SimpleNamespace(tidar=TidarSettings(bl, 1).to_dict(), vocab_size=1000)
    cfg = SimpleNamespace(
        speculative_config=SimpleNamespace(
            method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=layout.num_speculative_tokens
        ),
        model_config=SimpleNamespace(hf_config=hf, model="ckpt"),
    )
    return TiDARProposer(cfg), layout


@pytest.mark.parametrize("k", [1, 2, 3])
def test_proposer_picks_block_of_accepted_count(k):
    prop, layout = _proposer(4, k)
    n_masks = layout.num_mask_slots
    drafts = 100 + layout.next_draft_index  # the model's stash: row a = drafts after a acceptances
    for a in range(k + 1):
        prop.load_model(_FakeModel({0: drafts}))
        out = prop.propose([[5] * (a + 1), [], [7]], None, None)
        want_rows = layout.next_draft_rows(a)
        want = [100 + r for r in range(want_rows.start, want_rows.stop)]
        assert out[0] == want + [1] * n_masks
        assert len(out[0]) == layout.num_tokens - 1
        assert out[1] == []  # partial prefill chunk
        assert out[2] == [1] * (layout.num_tokens - 1)  # no TiDAR step: all MASK


def test_proposer_rejects_non_tidar_model():
    prop, _ = _proposer()
    with pytest.raises(TypeError):
        prop.load_model(object())
