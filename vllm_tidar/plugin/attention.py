"""TiDAR attention backend for the vLLM CPU platform: vLLM's ``CPU_ATTN`` kernel for every
causal row, one batched SDPA for the mask rows of TiDAR steps.

The KV cache is ``CPU_ATTN``'s own (same shape, same ISA-packed layout, written by its
``cpu_attn_reshape_and_cache`` op), so a batch without TiDAR steps (prefill, plain AR
mode, degraded steps) runs exactly vLLM's stock CPU attention: one kernel call over the
whole batch, no Python loop, no copy of any prefix.

A full TiDAR step of a request is ``L = layout.num_tokens`` rows
``[x_last, d1..dK | K+1 mask blocks]`` after ``P`` committed tokens:

* the K+1 verify rows are causal (prefix + rows 0..i): they go to the same kernel call as
  the causal requests, as a request of K+1 query tokens with ``seq_len = P + K + 1``;
  the mask rows are left out of that call (the query is compacted once per layer);
* the mask rows of all TiDAR requests of the batch run in one SDPA over the request's
  pages up to ``P + L`` (committed prefix, then the step rows this step just wrote) with
  the additive mask from ``StepMask.mask_rows_bias`` (prefix visible, the layout's
  precomputed template over the step rows, padding hidden: one gather per step from a
  table built once). This is the only place that reads pages in torch: for TiDAR
  requests, once per layer, batched, in the layout the kernel's ISA wrote them
  (``PageLayout``: ``K^T | V`` pages as they are; an ISA that packs them, such as ``amx``
  for bf16, through one element gather found by a probe write);
* when every request of the batch is a full TiDAR step (a steady decode batch), the verify
  rows join the mask rows in that SDPA (``StepMask.step_rows_bias``, all ``L`` rows) and
  the kernel is not called: the query and output are views, no row gather or scatter;
* a mask block the model appended after a prefilling request's last row (prefill drafting,
  ``set_prefill_block``; rows past the batch's own) runs in one more SDPA over the request's
  pages up to its last prompt row and the block's own keys and values, which are never
  written to the cache.

Which requests are full TiDAR steps is decided by the model (it sees ``input_ids``) and
handed over with ``set_tidar_steps`` before the layers run; the per-step arrays (the
compacted kernel batch, its scheduler metadata, the mask-row indices and mask) are built
there once and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionImpl, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)


class TiDARCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN``'s cache, kernel and block sizes, with the TiDAR impl and builder."""

    forward_includes_kv_cache_update: bool = False
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        # Must be an AttentionBackendEnum name; the class itself is passed per layer.
        return "CPU_ATTN"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls():
        return TiDARCPUImpl

    @staticmethod
    def get_builder_cls():
        return TiDARCPUMetadataBuilder


@dataclass
class KernelBatch:
    """One ``cpu_attention_with_kv_cache`` call: its requests and scheduler metadata."""

    query_start_loc: torch.Tensor  # int32, num_reqs + 1
    seq_lens: torch.Tensor  # int32, num_reqs
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor


@dataclass
class TiDARRows:
    """Per-step arrays of a batch with TiDAR steps (built once, read by every layer).

    When every request of the batch runs a full TiDAR step, ``kernel`` is None: all ``L``
    rows of each request go to the SDPA (``bias`` covers them all) and the kernel is not
    called."""

    kernel_rows: torch.Tensor | None  # long: token rows that go to the kernel (all but mask rows)
    kernel: KernelBatch | None
    mask_rows: torch.Tensor | None  # long (T, M): mask rows of each TiDAR request
    head_pages: torch.Tensor  # long (T * Hkv * nblk,): page-heads holding each TiDAR request's prefix and step rows
    bias: torch.Tensor  # (T, 1, M or L, nblk * bs) additive mask: 0 visible, -inf hidden


@dataclass
class PrefillRows:
    """Mask blocks the model appended after prefilling requests (rows from ``first_row`` on,
    ``block_len`` per request, past the batch's own rows): each block sees its request's
    pages up to its last prompt row and its own block; its keys and values are never written."""

    first_row: int
    block_len: int
    head_pages: torch.Tensor  # long (Tp * Hkv * nblk,): page-heads of each request's prefix
    bias: torch.Tensor  # (Tp, 1, 1, nblk * bs + block_len) additive mask: 0 visible, -inf hidden


@dataclass
class _KernelParams:
    """What ``cpu_attn_get_scheduler_metadata`` needs besides the batch."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str
    window: int
    kv_cache_dtype: str


@dataclass
class TiDARCPUMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: list[int]  # host copy, num_reqs + 1
    seq_lens: list[int]  # host copy, committed + scheduled per request
    is_prefilling: list[bool]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    kernel: KernelBatch  # the whole batch, causal (vLLM's own CPU_ATTN metadata)
    params: _KernelParams
    block_size: int
    tidar: TiDARRows | None = None  # set by set_tidar_steps when the batch has TiDAR steps
    prefill: PrefillRows | None = None  # set by set_prefill_block when prefills get a mask block

    # the model's interface (same on TiDARFlexMetadata)
    def tidar_batch(self) -> tuple[list[int], list[bool]]:
        """(host query_start_loc, per-request is_prefilling) for step detection."""
        return self.query_start_loc, self.is_prefilling

    def set_tidar_steps(self, flags: torch.Tensor, step_mask) -> None:
        """Mark full TiDAR steps (bool per request) and the ``StepMask`` their mask rows use."""
        is_t = flags.to("cpu", torch.bool).numpy()  # host arrays: the CPU kernel's batch is built on the host
        self.tidar = None
        if not is_t.any():
            return
        layout = step_mask.layout
        big_l, n_verify = layout.num_tokens, layout.num_verify
        qsl = np.asarray(self.query_start_loc, dtype=np.int64)
        seq = np.asarray(self.seq_lens, dtype=np.int64)
        t_idx = np.flatnonzero(is_t)
        prefix = torch.from_numpy(seq[t_idx] - big_l)
        head_pages, width = self._request_pages(torch.from_numpy(t_idx), int(seq[t_idx].max()))
        if len(t_idx) == self.num_reqs:  # only TiDAR steps: every row in the SDPA, no kernel call
            self.tidar = TiDARRows(
                kernel_rows=None, kernel=None, mask_rows=None, head_pages=head_pages,
                bias=step_mask.step_rows_bias(prefix, width, self.params.dtype),
            )
            return
        # kernel batch: TiDAR requests keep their K+1 verify rows (causal)
        starts, lens = qsl[:-1], qsl[1:] - qsl[:-1]
        k_lens = np.where(is_t, n_verify, lens)
        k_seq = np.where(is_t, seq - big_l + n_verify, seq).astype(np.int32)
        k_qsl = np.zeros(self.num_reqs + 1, dtype=np.int32)
        np.cumsum(k_lens, out=k_qsl[1:])
        mask_rows = starts[t_idx, None] + np.arange(n_verify, big_l)
        keep = np.ones(self.num_actual_tokens, dtype=bool)
        keep[mask_rows.ravel()] = False
        self.tidar = TiDARRows(
            kernel_rows=torch.from_numpy(np.flatnonzero(keep)),
            kernel=_kernel_batch(self.params, torch.from_numpy(k_qsl), torch.from_numpy(k_seq), self.block_table),
            mask_rows=torch.from_numpy(mask_rows),
            head_pages=head_pages,
            bias=step_mask.mask_rows_bias(prefix, width, self.params.dtype),
        )

    def set_prefill_block(self, block) -> None:
        """The model appended ``block.block_len`` MASK rows after the last row of each request
        in ``block.requests`` (``model.PrefillBlock``): they attend to the request's pages up to
        ``block.ends`` and bidirectionally to their own block."""
        head_pages, width = self._request_pages(block.requests, int(block.ends.max()))
        hidden = torch.arange(width)[None, :] >= block.ends[:, None]
        bias = torch.zeros(block.requests.numel(), width + block.block_len, dtype=self.params.dtype)
        bias[:, :width].masked_fill_(hidden, float("-inf"))
        self.prefill = PrefillRows(block.first_row, block.block_len, head_pages, bias[:, None, None])

    def _request_pages(self, reqs: torch.Tensor, max_len: int) -> tuple[torch.Tensor, int]:
        """The pages holding the first ``max_len`` tokens of requests ``reqs``, as rows of the
        cache viewed per page and KV head (request-major, then head, then page), and their width
        in tokens."""
        nblk = -(-max_len // self.block_size)
        h = self.params.num_kv_heads
        pages = self.block_table[reqs, :nblk].long()
        return (pages[:, None, :] * h + torch.arange(h)[None, :, None]).flatten(), nblk * self.block_size


def _kernel_batch(p: _KernelParams, qsl: torch.Tensor, seq_lens: torch.Tensor, block_table) -> KernelBatch:
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
        seq_lens=seq_lens, dtype=p.dtype, query_start_loc=qsl, causal=True, sliding_window_size=p.window,
        isa=p.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=p.kv_cache_dtype,
    )
    return KernelBatch(qsl, seq_lens, block_table, sched)


class TiDARCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's ``CPU_ATTN`` builder (ISA choice, scheduler metadata), plus the host copies
    the model's step detection reads."""

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TiDARCPUMetadata:
        md: CPUAttentionMetadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl, prefilling = host_batch(cm)
        params = _KernelParams(self.num_heads, self.num_kv_heads, self.head_dim, self.dtype, self.isa,
                               self.window_size, self.kv_cache_dtype)
        return TiDARCPUMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=n,
            query_start_loc=qsl,
            seq_lens=cm.seq_lens[:n].tolist(),
            is_prefilling=prefilling,
            block_table=md.block_table,
            slot_mapping=md.slot_mapping,
            kernel=KernelBatch(md.query_start_loc, md.seq_lens, md.block_table, md.scheduler_metadata),
            params=params,
            block_size=self.block_size,
        )


def host_batch(cm: CommonAttentionMetadata) -> tuple[list[int], list[bool]]:
    """Host copies of ``query_start_loc`` (num_reqs + 1) and per-request ``is_prefilling``,
    what the model's TiDAR step detection reads (both TiDAR backends)."""
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    prefilling = cm.is_prefilling[:n].tolist() if cm.is_prefilling is not None else [True] * n
    return qsl, prefilling


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[nb, H, bs, 2D]`` -> key and value views ``[nb, H, bs, D]`` (``CPU_ATTN``'s split;
    the key page of a head is stored transposed, ``D x bs``)."""
    nb, h, bs, _ = kv_cache.shape
    kv = kv_cache.view(nb, h, bs * 2, -1)
    return kv[:, :, :bs], kv[:, :, bs:]


@dataclass(frozen=True)
class PageLayout:
    """Where ``CPU_ATTN`` puts each key and value element inside a page, per ISA.

    A page of one KV head is ``2 * bs * D`` elements: the key half, then the value half. The
    ``vec`` ISAs store the key half as ``K^T`` (``D x bs``) and the value half as ``V``
    (``bs x D``); others pack them for their matrix units (``amx``: bf16 pairs of dims and of
    tokens interleaved). ``key`` / ``value`` are None for the plain layout, else the offset of
    each element of ``K^T`` / ``V`` (row-major) inside its half, found once by writing a page
    through vLLM's own ``cpu_attn_reshape_and_cache`` (``probe``)."""

    key: torch.Tensor | None
    value: torch.Tensor | None

    @classmethod
    def probe(cls, isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> "PageLayout":
        bs, d = block_size, head_dim
        kv = torch.zeros(1, 1, bs, 2 * d, dtype=dtype)
        key_cache, value_cache = split_cache(kv)
        tok = torch.arange(bs)[:, None].expand(bs, d)
        dim = torch.arange(d)[None, :].expand(bs, d)

        def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # digits below 16: exact in every cache dtype
            kv.zero_()
            ops.cpu_attn_reshape_and_cache(k[:, None].to(dtype), v[:, None].to(dtype), key_cache, value_cache,
                                           torch.arange(bs), isa)
            halves = kv.view(2, bs * d).float().round().long()
            return halves[0], halves[1]

        k_hi, v_hi = write(tok // 16, dim // 16)
        k_lo, v_lo = write(tok % 16, dim % 16)
        kd_hi, vt_hi = write(dim // 16, tok // 16)
        kd_lo, vt_lo = write(dim % 16, tok % 16)
        key_code = (kd_hi * 16 + kd_lo) * bs + (k_hi * 16 + k_lo)  # element (dim, token) of K^T at each offset
        value_code = (vt_hi * 16 + vt_lo) * d + (v_hi * 16 + v_lo)  # element (token, dim) of V at each offset
        offsets = []
        for code in (key_code, value_code):
            if not torch.equal(code.sort().values, torch.arange(bs * d)):
                raise RuntimeError(f"TiDAR attention: CPU_ATTN's {isa!r} page layout is not a permutation")
            off = torch.empty_like(code)
            off[code] = torch.arange(bs * d)
            offsets.append(None if torch.equal(off, torch.arange(bs * d)) else off)
        return cls(*offsets)


_PAGE_LAYOUTS: dict[tuple, PageLayout] = {}


def page_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> PageLayout:
    key = (isa, dtype, block_size, head_dim)
    if key not in _PAGE_LAYOUTS:
        _PAGE_LAYOUTS[key] = PageLayout.probe(*key)
    return _PAGE_LAYOUTS[key]


def read_pages(kv_cache: torch.Tensor, head_pages: torch.Tensor, layout: PageLayout, num_reqs: int):
    """Keys and values of each request's pages as ``(num_reqs, H, n * bs, D)`` tensors, what SDPA
    takes: ``head_pages`` (request-major, then KV head, then page) index ``kv_cache`` viewed as
    ``(nb * H, 2, bs * D)``. Two row gathers, an element gather for an ISA whose pages are packed,
    and one copy of the keys out of ``K^T`` (SDPA on CPU is ~4x slower on the transposed layout)."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    halves = kv_cache.view(nb * h, 2, bs * d)
    k = halves[:, 0].index_select(0, head_pages)
    v = halves[:, 1].index_select(0, head_pages)
    if layout.key is not None:
        k = k[:, layout.key]
    if layout.value is not None:
        v = v[:, layout.value]
    k = k.view(num_reqs, h, -1, d, bs).transpose(-1, -2).reshape(num_reqs, h, -1, d)
    return k, v.view(num_reqs, h, -1, d)


class TiDARCPUImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap=None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name=None,
        **kwargs,
    ) -> None:
        if alibi_slopes is not None or sliding_window not in (None, -1) or logits_soft_cap:
            raise NotImplementedError("TiDAR CPU attention: no alibi, sliding window or softcap")
        if kv_cache_dtype != "auto":
            raise NotImplementedError("TiDAR CPU attention: quantized KV cache is not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = -1

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Writes the KV of vLLM's rows; mask blocks a prefill got (rows past them) keep none."""
        key_cache, value_cache = split_cache(kv_cache)
        n = slot_mapping.shape[0]
        ops.cpu_attn_reshape_and_cache(
            key[:n], value[:n], key_cache, value_cache, slot_mapping, layer.isa,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
        )

    def _kernel(self, layer, query, key_cache, value_cache, output, kb: KernelBatch) -> None:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=kb.query_start_loc, seq_lens=kb.seq_lens, scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=kb.block_table, softcap=0,
            scheduler_metadata=kb.scheduler_metadata, s_aux=None, dynamic_causal=None,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
        )

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TiDARCPUMetadata | None,
        output: torch.Tensor,
        output_scale=None,
        output_block_scale=None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up
            return output
        md = attn_metadata
        n = md.num_actual_tokens
        key_cache, value_cache = split_cache(kv_cache)
        rows = md.tidar
        if rows is None:  # no TiDAR step: vLLM's CPU attention, unchanged
            self._kernel(layer, query[:n], key_cache, value_cache, output[:n], md.kernel)
        elif rows.kernel is None:  # only TiDAR steps: all rows of each request in one SDPA
            t, big_l = rows.bias.shape[0], rows.bias.shape[2]
            o = self._template_attention(layer, query[:n].view(t, big_l, *query.shape[1:]), kv_cache, rows)
            output[:n].view(t, big_l, *output.shape[1:]).copy_(o)
        else:
            # causal rows (other requests, and the verify rows of TiDAR requests): one kernel call
            q = query.index_select(0, rows.kernel_rows)
            out = torch.empty_like(q)
            self._kernel(layer, q, key_cache, value_cache, out, rows.kernel)
            output.index_copy_(0, rows.kernel_rows, out.to(output.dtype))
            # mask rows of every TiDAR request
            output[rows.mask_rows] = self._template_attention(layer, query[rows.mask_rows], kv_cache, rows
                                                              ).to(output.dtype)
        if md.prefill is not None:
            self._prefill_block_attention(layer, query, key, value, kv_cache, output, md.prefill)
        return output

    def _prefill_block_attention(self, layer, query, key, value, kv_cache, output, pf: PrefillRows) -> None:
        """The mask blocks appended to prefills: one SDPA over each request's prefix pages and
        its own block's keys and values (taken from this forward, never written to the cache)."""
        t, bl, h, d = pf.bias.shape[0], pf.block_len, self.num_kv_heads, self.head_size
        k, v = read_pages(kv_cache, pf.head_pages, self._page_layout(layer, kv_cache), t)
        rows = slice(pf.first_row, pf.first_row + t * bl)
        k = torch.cat([k, key[rows].view(t, bl, h, d).transpose(1, 2).to(k.dtype)], 2)
        v = torch.cat([v, value[rows].view(t, bl, h, d).transpose(1, 2).to(v.dtype)], 2)
        q = query[rows].view(t, bl, self.num_heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=pf.bias.to(q.dtype),
                                           scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        output[rows] = o.transpose(1, 2).reshape(t * bl, self.num_heads, d).to(output.dtype)

    def _template_attention(self, layer, q: torch.Tensor, kv_cache: torch.Tensor, rows: TiDARRows) -> torch.Tensor:
        """Rows ``q`` (T, R, Hq, D) of the TiDAR requests: one SDPA over each request's pages
        (prefix, then this step's rows) with ``rows.bias``; returns (T, R, Hq, D)."""
        k, v = read_pages(kv_cache, rows.head_pages, self._page_layout(layer, kv_cache), q.shape[0])
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=rows.bias.to(q.dtype),
            scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.transpose(1, 2)

    def _page_layout(self, layer, kv_cache: torch.Tensor) -> PageLayout:
        return page_layout(layer.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
