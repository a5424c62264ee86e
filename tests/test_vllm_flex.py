"""The TiDAR Flex backend's metadata on vLLM's own FlexAttentionMetadata (needs vLLM).

Same mixed paged batch as test_flex_attention.py; the metadata is built the way vLLM's
builder builds it, then adopted and marked by ``set_tidar_steps`` as the model does.
Checks the mask_mod vLLM will hand to flex (vLLM's physical -> logical mapping + ours),
the rebuilt direct block mask, and flex output vs SDPA. CPU eager; CUDA compiled.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from test_flex_attention import (  # noqa: E402
    BLOCK,
    DEVICES,
    NUM_PAGES,
    Q_BLOCK,
    _covers,
    check_dense,
    grid,
    kernel_options,
    make_batch,
)

from vllm_tidar.layout import StepMask  # noqa: E402


def _metadata(batch):
    """Adopted metadata as the builder returns it (causal, block mask built)."""
    from vllm.v1.attention.backends.flex_attention import FlexAttentionMetadata, physical_to_logical_mapping

    from vllm_tidar.plugin.flex_attention import TiDARFlexMetadata

    d = batch.device
    qsl, seq_lens, _, _ = batch.tensors()
    max_seqs = 8
    pad = lambda t, n: torch.cat([t, torch.zeros(n - t.shape[0], dtype=t.dtype, device=d)])  # noqa: E731
    max_pages = batch.block_table.shape[1]
    md = FlexAttentionMetadata(
        causal=True,
        num_actual_tokens=batch.num_tokens,
        max_query_len=max(batch.query_lens),
        query_start_loc=pad(qsl, max_seqs + 1),
        query_start_loc_cpu=qsl.cpu(),
        max_seq_len=max(batch.seq_lens),
        seq_lens=pad(seq_lens, max_seqs),
        block_table=batch.block_table,
        slot_mapping=torch.zeros(batch.num_tokens, dtype=torch.long, device=d),
        total_cache_tokens=NUM_PAGES * BLOCK,
        block_size=BLOCK,
        max_possible_sequence_length=max_pages * BLOCK,
        num_reqs=batch.num_reqs,
        physical_to_logical=physical_to_logical_mapping(batch.block_table, seq_lens, BLOCK, NUM_PAGES),
        decode_offset=pad(torch.tensor(batch.prefixes, dtype=torch.int32, device=d), max_seqs),
        num_blocks_per_seq=(seq_lens + BLOCK - 1) // BLOCK,
        persistent_kv_indices=torch.empty(64, Q_BLOCK * max_pages, dtype=torch.int32, device=d),
        persistent_kv_num_blocks=torch.empty(64, dtype=torch.int32, device=d),
        persistent_doc_ids=torch.empty(256, dtype=torch.int32, device=d),
        q_block_size=Q_BLOCK,
        kv_block_size=BLOCK,
    )
    md.block_mask = md._build_block_mask_direct()  # as the builder does
    flags = torch.zeros(max_seqs, dtype=torch.bool, device=d)
    return TiDARFlexMetadata.adopt(md, flags, qsl.tolist(), [not t for t in batch.tidar])


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_flex_metadata_mask(device):
    batch = make_batch(device)
    md = _metadata(batch)
    assert md.tidar_batch() == ([0, 39, 59, 62, 82], [True, False, True, False])
    causal_bm = md.block_mask
    # the TiDAR masks, with the block mask from build(): vLLM's causal pruning misses pairs
    dense = grid(_tidar_mask_mod(md, batch), batch.num_tokens, NUM_PAGES * BLOCK, device)
    check_dense(batch, dense)
    assert not _covers(causal_bm, dense)
    md.set_tidar_steps(torch.tensor(batch.tidar, device=device), StepMask(batch.layout, 0, device))
    assert md.block_mask is not causal_bm  # rebuilt for the TiDAR requests
    assert torch.equal(grid(md.mask_mod, batch.num_tokens, NUM_PAGES * BLOCK, device), dense)
    assert _covers(md.block_mask, dense)
    assert md.causal and md.block_sparsity_hint is None  # vLLM's flags restored


def _tidar_mask_mod(md, batch):
    """What set_tidar_steps will install, without rebuilding the block mask."""
    from vllm_tidar.plugin.flex_attention import TiDARFlexMetadata

    probe = TiDARFlexMetadata.__new__(TiDARFlexMetadata)
    probe.__dict__.update(md.__dict__)
    probe.tidar_flags = torch.tensor(batch.tidar, device=batch.device)
    probe.tidar_template = StepMask(batch.layout, 0, batch.device).for_prefix(0)
    return probe.get_mask_mod()


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_flex_metadata_without_tidar_requests_stays_causal(device):
    batch = make_batch(device)
    md = _metadata(batch)
    causal_bm = md.block_mask
    md.set_tidar_steps(torch.zeros(batch.num_reqs, dtype=torch.bool, device=device), StepMask(batch.layout, 0, device))
    assert md.block_mask is causal_bm and md.tidar_template is None
    batch.tidar = [False] * batch.num_reqs
    check_dense(batch, grid(md.mask_mod, batch.num_tokens, NUM_PAGES * BLOCK, device))


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_flex_attention_matches_sdpa(device):
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    batch = make_batch(device)
    md = _metadata(batch)
    md.set_tidar_steps(torch.tensor(batch.tidar, device=device), StepMask(batch.layout, 0, device))
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, 4, batch.num_tokens, 32, generator=g, device=device)
    k = torch.randn(1, 2, NUM_PAGES * BLOCK, 32, generator=g, device=device)
    v = torch.randn(1, 2, NUM_PAGES * BLOCK, 32, generator=g, device=device)
    fn = torch.compile(flex_attention, fullgraph=True) if device == "cuda" else flex_attention
    out = fn(q, k, v, block_mask=md.block_mask, enable_gqa=True, kernel_options=kernel_options(device))
    start = 0
    for i, exp in enumerate(batch.expected()):
        t, slots = batch.query_lens[i], batch.physical_slots(i)
        ref = F.scaled_dot_product_attention(q[:, :, start : start + t], k[:, :, slots], v[:, :, slots], attn_mask=exp, enable_gqa=True)
        tol = 1e-5 if device == "cpu" else 2e-3
        torch.testing.assert_close(out[:, :, start : start + t], ref, atol=tol, rtol=tol)
        start += t


# --- end to end on CPU: the demo checkpoint with the Flex backend forced ------------------
@pytest.mark.slow
def test_demo_greedy_parity_cpu_flex_backend(monkeypatch):
    """VLLM_TIDAR_ATTENTION=flex on CPU (eager flex, pure-torch KV write): TiDAR greedy
    output equals plain AR on the CPU backend, and TiDAR steps really ran on Flex."""
    from vllm import SamplingParams
    from vllm_helpers import close_llm, demo_checkpoint, generate, make_llm, prompt_set, runner_model, token_ids

    ckpt = demo_checkpoint()
    if ckpt is None:
        pytest.skip("demo checkpoint not present")
    prompts = prompt_set(ckpt, 4, seed=5, min_len=5, max_len=40)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    # small cache: eager flex materialises scores over every cache slot
    small = dict(block_size=32, num_gpu_blocks_override=32)
    llm = make_llm(ckpt, hf_overrides={"tidar_mode": "ar"}, **small)
    try:
        ar = token_ids(generate(llm, prompts, greedy))
    finally:
        close_llm(llm)
    monkeypatch.setenv("VLLM_TIDAR_ATTENTION", "flex")
    llm = make_llm(ckpt, per_request_spec_decode_metrics="detailed", **small)
    try:
        model = runner_model(llm)
        from vllm_tidar.plugin.flex_attention import TiDARFlexBackend

        from vllm.model_executor.layers.attention import Attention

        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert layers and all(m.attn_backend is TiDARFlexBackend for m in layers)
        out = generate(llm, prompts, greedy)
        assert token_ids(out) == ar
        accepted = [sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in out]
        assert sum(accepted) > 0, "no draft accepted: TiDAR steps did not run"
    finally:
        close_llm(llm)
