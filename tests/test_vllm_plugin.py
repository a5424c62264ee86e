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


def test_plugin_logs_reach_vllms_handler():
    # adaptive drafting logs its choice at INFO; without routing it would vanish at the root logger
    # (vLLM configures only its own "vllm" logger, as an engine does at start)
    code = ("import sys, vllm_tidar; vllm_tidar.register(); from vllm.config.logging import LoggingConfig; "
            "from vllm.logger import configure_logging; configure_logging(LoggingConfig(log_level=sys.argv[1])); "
            "import importlib; mods = ('__init__', 'adaptive', 'config', 'cpu_threads', 'model'); "
            "[importlib.import_module('vllm_tidar.plugin' + ('' if m == '__init__' else '.' + m)).logger"
            ".info('tidar-log-marker-' + m) for m in mods]")
    mods = ("__init__", "adaptive", "config", "cpu_threads", "model")
    for level, shown in (("INFO", True), ("WARNING", False)):
        out = subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, check=True)
        for m in mods:
            assert (f"tidar-log-marker-{m}\n" in out.stdout + out.stderr) == shown, (level, m, out.stdout, out.stderr)


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
    bf16 = _model_config(["TiDARLlamaForCausalLM"], tidar, tidar_draft_dtype="bfloat16")
    assert tidar_speculative_config(None, bf16) == auto
    with pytest.raises(TidarError, match="tidar_draft_dtype must be one of auto, float32, bfloat16, got 'fp8'"):
        tidar_speculative_config(None, _model_config(["TiDARLlamaForCausalLM"], tidar, tidar_draft_dtype="fp8"))


# --- attention backend ---------------------------------------------------------------------
def _attention_batch(reqs, bs, hq, hkv, d, layout, seed=0, dtype=torch.float32):
    """Random KV for a mixed batch written through the backend's KV write (as the runner
    does), the metadata the builder would make, and the dense SDPA reference output (in
    fp32, from the ``dtype`` inputs; the cache and the ISA are what vLLM picks for ``dtype``).

    ``reqs``: (committed tokens, scheduled tokens, is a full TiDAR step) per request."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_tidar.plugin.attention import TiDARCPUImpl, TiDARCPUMetadata, _kernel_batch, _KernelParams

    g = torch.Generator().manual_seed(seed)
    isa = _get_attn_isa(dtype, bs, d)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    impl = TiDARCPUImpl(hq, d, d**-0.5, hkv)
    max_blocks = max(-(-(p + t) // bs) for p, t, _ in reqs)
    nb = 1 + len(reqs) * max_blocks
    kv_cache = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)
    perm = 1 + torch.randperm(nb - 1, generator=g)  # scattered pages, block 0 unused
    tables = perm.view(len(reqs), max_blocks).to(torch.int32)  # vLLM's block table dtype
    step_mask = StepMask(layout, 0)
    qs, ks, vs, refs, slots = [], [], [], [], []
    for (prefix, t, tidar), table in zip(reqs, tables):
        k_all = torch.randn(prefix + t, hkv, d, generator=g).to(dtype)
        v_all = torch.randn(prefix + t, hkv, d, generator=g).to(dtype)
        pos = torch.arange(prefix + t)
        slot = table[pos // bs].long() * bs + pos % bs
        impl.do_kv_cache_update(layer, k_all[:prefix], v_all[:prefix], kv_cache, slot[:prefix])
        q = torch.randn(t, hq, d, generator=g).to(dtype)
        qs.append(q), ks.append(k_all[prefix:]), vs.append(v_all[prefix:]), slots.append(slot[prefix:])
        if tidar:
            mask = torch.cat([torch.ones(t, prefix, dtype=torch.bool), layout.template], 1)
        else:
            mask = torch.arange(prefix + t)[None, :] <= (torch.arange(t)[:, None] + prefix)
        ref = F.scaled_dot_product_attention(
            q.float().transpose(0, 1), k_all.float().transpose(0, 1).repeat_interleave(hq // hkv, 0),
            v_all.float().transpose(0, 1).repeat_interleave(hq // hkv, 0), attn_mask=mask, scale=d**-0.5,
        )
        refs.append(ref.transpose(0, 1).to(dtype))
    # this step's new tokens go through one batched KV write, like the runner's
    impl.do_kv_cache_update(layer, torch.cat(ks), torch.cat(vs), kv_cache, torch.cat(slots))
    qsl = [0]
    for _, t, _ in reqs:
        qsl.append(qsl[-1] + t)
    seq_lens = [p + t for p, t, _ in reqs]
    params = _KernelParams(hq, hkv, d, dtype, isa, -1, "auto")
    kernel = _kernel_batch(params, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), tables)
    md = TiDARCPUMetadata(
        num_actual_tokens=qsl[-1], num_reqs=len(reqs), query_start_loc=qsl, seq_lens=seq_lens,
        is_prefilling=[not tidar and t > 1 and i % 2 == 1 for i, (_, t, tidar) in enumerate(reqs)],
        block_table=tables, slot_mapping=torch.cat(slots), kernel=kernel, params=params, block_size=bs,
    )
    md.set_tidar_steps(torch.tensor([r[2] for r in reqs]), step_mask)
    return impl, layer, kv_cache, md, torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(refs)


@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("block_len", [4, 8])
def test_attention_backend_matches_dense_template_and_causal(bs, block_len):
    """Mixed batch: TiDAR steps (verify rows in vLLM's CPU_ATTN kernel, mask rows in the
    batched SDPA) next to a prefill chunk, a one-token decode and a degraded step, on
    several page sizes, against dense SDPA with the layout's template."""
    layout = DecodeLayout(block_len)
    big_l = layout.num_tokens
    reqs = [(45, big_l, True), (10, 37, False), (70, 1, False), (33, 5, False), (130, big_l, True), (3, big_l, True)]
    impl, layer, kv_cache, md, q, k, v, ref = _attention_batch(reqs, bs, 4, 2, 64, layout)
    assert md.tidar is not None and md.tidar.mask_rows.shape == (3, layout.num_mask_slots)
    output = torch.full_like(q, float("nan"))
    impl.forward(layer, q, k, v, kv_cache, md, output)
    torch.testing.assert_close(output, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_len", [4, 8])
def test_attention_backend_batch_of_only_tidar_steps(block_len):
    """Every request a full TiDAR step: all rows (verify and mask) in one SDPA, no kernel
    call, against dense SDPA with the layout's template."""
    layout = DecodeLayout(block_len)
    big_l = layout.num_tokens
    reqs = [(45, big_l, True), (130, big_l, True), (3, big_l, True)]
    impl, layer, kv_cache, md, q, k, v, ref = _attention_batch(reqs, 16, 4, 2, 64, layout)
    assert md.tidar.kernel is None and md.tidar.bias.shape[:3] == (3, 1, big_l)
    output = torch.full_like(q, float("nan"))
    impl.forward(layer, q, k, v, kv_cache, md, output)
    torch.testing.assert_close(output, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_reader_reads_what_the_kernels_cache_write_wrote(dtype):
    """The pages the TiDAR rows read in torch hold what vLLM's ``cpu_attn_reshape_and_cache``
    wrote, in the layout of the ISA vLLM picks for the dtype on this CPU (bf16 on an AMX CPU:
    the ``amx`` ISA packs keys and values in pairs; fp32: the plain ``K^T | V`` pages)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_tidar.plugin.attention import TiDARCPUImpl, page_layout, read_pages

    bs, hkv, d, n = 32, 2, 64, 70
    isa = _get_attn_isa(dtype, bs, d)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    kv_cache = torch.zeros(5, hkv, bs, 2 * d, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(n, hkv, d, generator=g).to(dtype) for _ in range(2))
    pages = torch.tensor([4, 1, 3])  # scattered
    slots = pages[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    TiDARCPUImpl(4, d, d**-0.5, hkv).do_kv_cache_update(layer, k, v, kv_cache, slots)
    head_pages = (pages[None, :] * hkv + torch.arange(hkv)[:, None]).flatten()  # (head, page) order
    layout = page_layout(isa, dtype, bs, d)
    keys, values = read_pages(kv_cache, head_pages, layout, 1)  # (1, H, 3 * bs, D)
    assert torch.equal(keys[0, :, :n], k.transpose(0, 1))
    assert torch.equal(values[0, :, :n], v.transpose(0, 1))
    if isa == "vec":
        assert layout.key is None and layout.value is None  # no element gather on the plain pages


@pytest.mark.parametrize("block_len", [4, 8])
def test_attention_backend_in_bf16_on_this_cpus_isa(block_len):
    """A bf16 model's cache (the ``amx`` ISA's packed pages on an AMX CPU): mixed batch and a
    batch of only TiDAR steps against the dense reference, to bf16 accuracy."""
    layout = DecodeLayout(block_len)
    big_l = layout.num_tokens
    for reqs in ([(45, big_l, True), (10, 37, False), (70, 1, False), (130, big_l, True)],
                 [(45, big_l, True), (3, big_l, True)]):
        impl, layer, kv_cache, md, q, k, v, ref = _attention_batch(reqs, 32, 4, 2, 64, layout, dtype=torch.bfloat16)
        output = torch.full_like(q, float("nan"))
        impl.forward(layer, q, k, v, kv_cache, md, output)
        torch.testing.assert_close(output.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_attention_backend_without_tidar_steps_is_the_stock_kernel(monkeypatch):
    """No TiDAR step in the batch: one CPU_ATTN call over the whole batch, as vLLM's own
    CPU backend runs it (same output bits)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata

    layout = DecodeLayout(4)
    reqs = [(10, 37, False), (70, 1, False), (33, 5, False)]
    impl, layer, kv_cache, md, q, k, v, ref = _attention_batch(reqs, 32, 4, 2, 64, layout)
    assert md.tidar is None
    out = torch.empty_like(q)
    impl.forward(layer, q, k, v, kv_cache, md, out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    from vllm.v1.attention.backends import cpu_attn

    cfg = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: cfg)
    stock = CPUAttentionBackendImpl(4, 64, 64**-0.5, 2, None, None, "auto")
    smd = CPUAttentionMetadata(
        num_actual_tokens=md.num_actual_tokens, max_query_len=37, query_start_loc=md.kernel.query_start_loc,
        max_seq_len=max(md.seq_lens), seq_lens=md.kernel.seq_lens, block_table=md.block_table,
        slot_mapping=md.slot_mapping, scheduler_metadata=md.kernel.scheduler_metadata,
    )
    out_stock = torch.empty_like(q)
    stock.forward(layer, q, k, v, kv_cache, smd, out_stock)
    assert torch.equal(out, out_stock)


def test_step_mask_rows_are_the_template_after_each_prefix():
    layout = DecodeLayout(4, 2)
    big_l, n_verify = layout.num_tokens, layout.num_verify
    sm = StepMask(layout, 0)
    width = 7 + big_l + 5
    bias = sm.mask_rows_bias(torch.tensor([3, 0, 7]), width, torch.float32)
    assert bias.shape == (3, 1, layout.num_mask_slots, width)
    assert ((bias == 0) | torch.isneginf(bias)).all()
    full = sm.step_rows_bias(torch.tensor([3, 0, 7]), width, torch.float32)
    assert full.shape == (3, 1, big_l, width) and torch.equal(full[:, :, n_verify:], bias)
    for t, p in enumerate([3, 0, 7]):
        seen = full[t, 0] == 0
        assert seen[:, :p].all()  # the committed prefix
        assert torch.equal(seen[:, p : p + big_l], layout.template)  # the step rows
        assert not seen[:, p + big_l :].any()  # padding


# --- proposer ------------------------------------------------------------------------------
class _FakeModel:
    def __init__(self, stash):
        self.stash = stash
        self.num_drafts = []

    def tidar_next_drafts(self, accepted, num_drafts):
        s, self.stash = self.stash, {}
        return {i: rows[a][:num_drafts] for i, rows in s.items()
                if num_drafts and i < len(accepted) and (a := accepted[i]) is not None and a < len(rows)}

    def tidar_use_layout(self, layout):
        self.num_drafts.append(layout.num_drafts if layout is not None else None)  # None: a plain step next


def _proposer(bl=4, k=None, schedule=None, trained=()):
    from vllm_tidar.plugin.common import PROPOSER_PATH
    from vllm_tidar.plugin.proposer import TiDARProposer

    layout = DecodeLayout(bl, k)
    hf = SimpleNamespace(tidar=TidarSettings(bl, 1, block_lengths=trained).to_dict(), vocab_size=1000)
    cfg = SimpleNamespace(
        speculative_config=SimpleNamespace(
            method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=layout.num_speculative_tokens,
            num_speculative_tokens_per_batch_size=schedule,
        ),
        model_config=SimpleNamespace(hf_config=hf, model="ckpt"),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
    )
    return TiDARProposer(cfg), layout


@pytest.mark.parametrize("k", [1, 2, 3])
def test_proposer_picks_block_of_accepted_count(k):
    prop, layout = _proposer(4, k)
    n_masks = layout.num_mask_slots
    drafts = (100 + layout.block_draft_index).tolist()  # the model's stash: row a = drafts after a acceptances
    for a in range(k + 1):
        model = _FakeModel({0: drafts})
        prop.load_model(model)
        out = prop.propose([[5] * (a + 1), [], [7]], None, None)
        want_rows = layout.next_draft_rows(a)
        want = [100 + r for r in range(want_rows.start, want_rows.stop)]
        assert out[0] == want + [1] * n_masks
        assert len(out[0]) == layout.num_tokens - 1
        assert out[1] == []  # partial prefill chunk
        assert out[2] == [1] * (layout.num_tokens - 1)  # no TiDAR step: all MASK
        assert model.num_drafts == [k]


def test_proposer_follows_a_drafts_per_batch_size_schedule():
    """vLLM's num_speculative_tokens_per_batch_size (spec-token units) carries a fixed
    schedule: batch 1 drafts 3, batches 2-3 draft 1, larger batches run plain AR steps."""
    from vllm_tidar.plugin.config import schedule_in_spec_tokens

    layout = DecodeLayout(4)
    sched = schedule_in_spec_tokens([[1, 1, 3], [2, 3, 1], [4, 8, 0]], 4, 3)
    assert sched == [(1, 1, 19), (2, 3, DecodeLayout(4, 1).num_speculative_tokens), (4, 8, 0)]
    prop, _ = _proposer(4, 3, schedule=sched)
    drafts = (100 + layout.block_draft_index).tolist()
    model = _FakeModel({0: drafts, 1: drafts})
    prop.load_model(model)
    out = prop.propose([[5, 6], [7]], None, None)  # batch 2 -> K=1
    one = DecodeLayout(4, 1)
    assert out[0] == [drafts[1][0]] + [1] * one.num_mask_slots
    assert out[1] == [drafts[0][0]] + [1] * one.num_mask_slots
    assert model.num_drafts == [1]
    model.stash = {0: drafts}
    assert prop.propose([[5]], None, None)[0] == drafts[0][:3] + [1] * layout.num_mask_slots  # batch 1 -> K=3
    assert prop.propose([[5]] * 4, None, None) == [[]] * 4  # batch 4 -> plain AR steps
    assert prop.propose([[5]] * 4, None, None) == [[]] * 4
    assert model.num_drafts == [1, 3, None]  # the model is told once that plain steps come
    with pytest.raises(TidarError, match="K=3 exceeds"):
        schedule_in_spec_tokens([[1, 8, 3]], 4, 2)
    with pytest.raises(TidarError, match="list of"):
        schedule_in_spec_tokens([[1, 8]], 4, 3)


def test_proposer_moves_drafts_between_block_lengths():
    """The stash of a block-length-4 step seeds a block-length-2 step (first draft kept) and
    the reverse pads the missing drafts with MASK (rejected like any MASK draft)."""
    four, two = DecodeLayout(4, 3), DecodeLayout(2, 1)
    prop, _ = _proposer(4, 3, trained=(2,))
    assert prop.policy.layouts == [four, DecodeLayout(4, 2), DecodeLayout(4, 1), two]
    model = _FakeModel({0: [[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]]})
    prop.load_model(model)
    prop.policy.schedule = [None, two]
    assert prop.propose([[5, 6]], None, None) == [[21] + [1] * two.num_mask_slots]
    model.stash = {0: [[51], [61]]}  # a block-length-2 step stashes one draft per block
    prop.policy.schedule = [None, four]
    assert prop.propose([[7]], None, None) == [[51, 1, 1] + [1] * four.num_mask_slots]
    assert model.num_drafts == [1, 3]


def test_proposer_rejects_non_tidar_model():
    prop, _ = _proposer()
    with pytest.raises(TypeError):
        prop.load_model(object())
