"""TiDAR FlexAttention masks over a packed batch and a paged KV cache (no vLLM import).

A mixed batch (a prefill, full TiDAR steps, a degraded decode) with shuffled physical
pages: the mask_mod from ``vllm_tidar.flex_mask`` must give exactly
``StepMask.for_prefix(P)`` for TiDAR requests and causal masks otherwise, the KV-block
pruning must keep every block a mask row needs, and ``flex_attention`` with that block
mask must match SDPA with the dense masks. Runs on CPU (eager flex; compiled flex is
marked slow) and, where a GPU is present, on CUDA (compiled flex). The vLLM backend
built on this (``vllm_tidar.plugin.flex_attention``) is tested in test_vllm_flex.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from vllm_tidar.flex_mask import paged_tidar_mask_mod, tidar_logical_mask, visible_kv_blocks
from vllm_tidar.layout import DecodeLayout, StepMask

BLOCK = 16  # page size = flex KV block size (vLLM's direct build needs them equal)
Q_BLOCK = 16
NUM_PAGES = 24  # physical pages; page 0 is never handed out (as in vLLM)
MAX_PREFIX = 200


@dataclass
class Batch:
    layout: DecodeLayout
    query_lens: list[int]
    seq_lens: list[int]
    tidar: list[bool]
    block_table: torch.Tensor  # [num_reqs, max_pages] physical page per logical page
    physical_to_logical: torch.Tensor  # [num_reqs, NUM_PAGES], -1 where unused
    device: torch.device

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def prefixes(self) -> list[int]:
        return [s - q for q, s in zip(self.query_lens, self.seq_lens)]

    def tensors(self):
        d = self.device
        qsl = torch.tensor([0] + self.query_lens, device=d).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor(self.seq_lens, dtype=torch.int32, device=d)
        doc_ids = torch.repeat_interleave(torch.arange(self.num_reqs, device=d), torch.tensor(self.query_lens, device=d))
        is_tidar = torch.tensor(self.tidar, dtype=torch.bool, device=d)
        return qsl, seq_lens, doc_ids.to(torch.int32), is_tidar

    def template(self) -> torch.Tensor:
        return StepMask(self.layout, 0, self.device).for_prefix(0)

    def expected(self) -> list[torch.Tensor]:
        """Per request ``[query_len, seq_len]``: StepMask for TiDAR steps, causal otherwise."""
        step_mask = StepMask(self.layout, MAX_PREFIX, self.device)
        out = []
        for t, s, p, is_t in zip(self.query_lens, self.seq_lens, self.prefixes, self.tidar):
            if is_t:
                assert t == self.layout.num_tokens
                out.append(step_mask.for_prefix(p))
            else:
                rows = torch.arange(t, device=self.device)[:, None] + p
                out.append(torch.arange(s, device=self.device)[None, :] <= rows)
        return out

    def physical_slots(self, req: int) -> torch.Tensor:
        """Physical KV index of each logical position of a request."""
        pos = torch.arange(self.seq_lens[req], device=self.device)
        return self.block_table[req, pos // BLOCK].long() * BLOCK + pos % BLOCK


def make_batch(device, layout: DecodeLayout | None = None, seed: int = 0) -> Batch:
    layout = layout or DecodeLayout(4)  # K = 3, L = 20
    big_l = layout.num_tokens
    # (query_len, prefix, tidar): prefill, TiDAR step across pages, degraded decode,
    # TiDAR step with a short prefix. With DecodeLayout(4) the TiDAR step at P=38 is
    # tokens 39..58 at positions 38..57: mask block 1 (positions 46..49) straddles both
    # a KV page boundary (48) and a q-block boundary (token 48, position 47)
    reqs = [(39, 0, False), (big_l, 38, True), (3, 40, False), (big_l, 13, True)]
    g = torch.Generator().manual_seed(seed)
    pages = (torch.randperm(NUM_PAGES - 1, generator=g) + 1).tolist()
    max_pages = max((p + q + BLOCK - 1) // BLOCK for q, p, _ in reqs)
    block_table = torch.zeros(len(reqs), max_pages, dtype=torch.int32)
    p2l = torch.full((len(reqs), NUM_PAGES), -1, dtype=torch.long)
    for i, (q, p, _) in enumerate(reqs):
        for j in range((p + q + BLOCK - 1) // BLOCK):
            page = pages.pop()
            block_table[i, j] = page
            p2l[i, page] = j
    return Batch(
        layout=layout,
        query_lens=[q for q, _, _ in reqs],
        seq_lens=[p + q for q, p, _ in reqs],
        tidar=[t for _, _, t in reqs],
        block_table=block_table.to(device),
        physical_to_logical=p2l.to(device),
        device=torch.device(device),
    )


def mask_mod_of(batch: Batch):
    qsl, seq_lens, doc_ids, is_tidar = batch.tensors()
    return paged_tidar_mask_mod(doc_ids, qsl, seq_lens, batch.physical_to_logical, BLOCK, is_tidar, batch.template())


def grid(mask_mod, num_q: int, num_kv: int, device) -> torch.Tensor:
    q = torch.arange(num_q, device=device)[:, None]
    kv = torch.arange(num_kv, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, q, kv)


def check_dense(batch: Batch, dense: torch.Tensor) -> None:
    """``dense`` [num_tokens, NUM_PAGES*BLOCK] (physical KV) against the expected masks."""
    start = 0
    for i, exp in enumerate(batch.expected()):
        rows = dense[start : start + batch.query_lens[i]]
        slots = batch.physical_slots(i)
        assert torch.equal(rows[:, slots], exp), f"request {i}"
        # nothing outside the request's own live slots
        assert int(rows.sum()) == int(exp.sum()), f"request {i} sees foreign slots"
        start += batch.query_lens[i]


def direct_block_mask(batch: Batch, mask_mod, causal_pruning: bool = False) -> BlockMask:
    """Like vLLM's ``_build_block_mask_direct``: per q block of 16 tokens, the physical
    pages of the logical blocks any of its tokens may see (``visible_kv_blocks``)."""
    qsl, seq_lens, doc_ids, is_tidar = batch.tensors()
    nlog = batch.block_table.shape[1]
    if causal_pruning:
        is_tidar = torch.zeros_like(is_tidar)
    keep = visible_kv_blocks(doc_ids, qsl, seq_lens, is_tidar, nlog, BLOCK)
    live = torch.arange(nlog, device=batch.device)[None, :] * BLOCK < seq_lens[doc_ids.long()][:, None]
    pages = torch.where(keep & live, batch.block_table[doc_ids.long()].long(), 0)
    n_qb = (batch.num_tokens + Q_BLOCK - 1) // Q_BLOCK
    kv_indices = torch.full((n_qb, NUM_PAGES), 0, dtype=torch.int32)
    kv_num = torch.zeros(n_qb, dtype=torch.int32)
    for qb in range(n_qb):
        used = sorted(set(pages[qb * Q_BLOCK : (qb + 1) * Q_BLOCK].flatten().tolist()) - {0})
        kv_num[qb] = len(used)
        kv_indices[qb, : len(used)] = torch.tensor(used, dtype=torch.int32)
    return BlockMask.from_kv_blocks(
        kv_num[None, None].to(batch.device),
        kv_indices[None, None].to(batch.device),
        BLOCK_SIZE=(Q_BLOCK, BLOCK),
        mask_mod=mask_mod,
        seq_lengths=(batch.num_tokens, NUM_PAGES * BLOCK),
    )


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_options(device) -> dict | None:
    """As vLLM's direct build (``get_kernel_options``): the Triton kernel's tiles must
    match the block mask's 16 x 16 blocks (larger tiles leave no valid config)."""
    return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": Q_BLOCK, "BLOCK_N": BLOCK} if device == "cuda" else None


# --- the logical rule ---------------------------------------------------------------------
def test_logical_mask_is_step_mask_or_causal():
    layout = DecodeLayout(4, 2)
    template = StepMask(layout, 0).for_prefix(0)
    step = StepMask(layout, 50)
    for p in (0, 1, 17, 50):
        q = torch.arange(layout.num_tokens)[:, None] + p
        kv = torch.arange(p + layout.num_tokens)[None, :]
        req = torch.zeros((), dtype=torch.long)
        prefix = torch.tensor([p])
        tidar = tidar_logical_mask(req, q, kv, torch.tensor([True]), prefix, template)
        assert torch.equal(tidar, step.for_prefix(p))
        causal = tidar_logical_mask(req, q, kv, torch.tensor([False]), prefix, template)
        assert torch.equal(causal, kv <= q)


# --- paged, packed batch ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [DecodeLayout(4), DecodeLayout(4, 1), DecodeLayout(8, 3)], ids=str)
def test_flex_paged_mask_matches_step_mask(device, layout):
    batch = make_batch(device, layout)
    mm = mask_mod_of(batch)
    dense = grid(mm, batch.num_tokens, NUM_PAGES * BLOCK, device)
    check_dense(batch, dense)
    # the same through flex's own vmap-based materialisation
    made = create_mask(mm, None, None, batch.num_tokens, NUM_PAGES * BLOCK, device=device)
    assert torch.equal(made[0, 0], dense)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_block_pruning_keeps_mask_rows_blockmates(device):
    batch = make_batch(device)
    qsl, seq_lens, doc_ids, is_tidar = batch.tensors()
    nlog = batch.block_table.shape[1]
    keep = visible_kv_blocks(doc_ids, qsl, seq_lens, is_tidar, nlog, BLOCK)
    start = 0
    for i, exp in enumerate(batch.expected()):
        need = torch.zeros(exp.shape[0], nlog, dtype=torch.bool, device=device)
        for j in range(nlog):
            need[:, j] = exp[:, j * BLOCK : (j + 1) * BLOCK].any(-1)
        rows = keep[start : start + exp.shape[0]]
        assert bool((rows | ~need).all()), f"request {i}: pruning drops needed KV blocks"
        start += exp.shape[0]
    # causal pruning by the query's own position would drop them: the TiDAR request at
    # P=38 (tokens 39..58) has block-1 mask rows at positions 46, 47 (page 2) that see
    # rows at positions 48, 49 (page 3)
    causal_keep = visible_kv_blocks(doc_ids, qsl, seq_lens, torch.zeros_like(is_tidar), nlog, BLOCK)
    assert not bool(causal_keep[39:59].equal(keep[39:59]))
    # the block mask (as vLLM's direct build makes it) covers every live (q, kv) pair;
    # with causal pruning it would not (token 47 is the last of its q block)
    dense = grid(mask_mod_of(batch), batch.num_tokens, NUM_PAGES * BLOCK, device)
    assert _covers(direct_block_mask(batch, mask_mod_of(batch)), dense)
    assert not _covers(direct_block_mask(batch, mask_mod_of(batch), causal_pruning=True), dense)


def _covers(bm: BlockMask, dense: torch.Tensor) -> bool:
    """Every True of ``dense`` [num_q, NUM_PAGES*BLOCK] lies in a block the mask lists."""
    blocks = bm.to_dense()[0, 0, :, :NUM_PAGES].bool()  # [q blocks, kv blocks]
    covered = blocks.repeat_interleave(Q_BLOCK, 0)[: dense.shape[0]].repeat_interleave(BLOCK, 1)
    return bool((covered | ~dense).all())


def _modes():
    out = [pytest.param("cpu", False, id="cpu-eager"), pytest.param("cpu", True, id="cpu-compiled", marks=pytest.mark.slow)]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", True, id="cuda-compiled"))
    return out


@pytest.mark.parametrize("device,compiled", _modes())
def test_flex_attention_matches_sdpa(device, compiled):
    batch = make_batch(device)
    hq, hkv, d = 4, 2, 32
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float32
    query = torch.randn(1, hq, batch.num_tokens, d, generator=g, device=device, dtype=dtype)
    key_cache = torch.randn(1, hkv, NUM_PAGES * BLOCK, d, generator=g, device=device, dtype=dtype)
    value_cache = torch.randn(1, hkv, NUM_PAGES * BLOCK, d, generator=g, device=device, dtype=dtype)
    bm = direct_block_mask(batch, mask_mod_of(batch))
    fn = torch.compile(flex_attention, fullgraph=True) if compiled else flex_attention
    out = fn(query, key_cache, value_cache, block_mask=bm, enable_gqa=True, kernel_options=kernel_options(device))
    # reference: per request, gather its logical KV and run SDPA with the dense mask
    start = 0
    for i, exp in enumerate(batch.expected()):
        t = batch.query_lens[i]
        slots = batch.physical_slots(i)
        ref = F.scaled_dot_product_attention(
            query[:, :, start : start + t],
            key_cache[:, :, slots],
            value_cache[:, :, slots],
            attn_mask=exp,
            enable_gqa=True,
        )
        tol = 1e-5 if device == "cpu" else 2e-3
        torch.testing.assert_close(out[:, :, start : start + t], ref, atol=tol, rtol=tol, msg=f"request {i}")
        start += t
