"""TiDAR masks for FlexAttention over a paged, packed batch (pure torch, no vLLM import).

A batch packs the query tokens of several requests (``doc_ids[token]`` = request) and
attends to a paged KV cache. Per request, with ``prefix`` = committed tokens before this
step (vLLM's ``decode_offset`` = ``seq_len - query_len``):

* a full TiDAR step (``is_tidar[req]``) sees ``kv < prefix`` plus the layout's template
  over its own step rows: ``template[q - prefix, kv - prefix]``;
* every other request (prefill, chunk, degraded decode) is causal: ``q >= kv``.

``q`` and ``kv`` are *logical* positions in the request's sequence. The template is
``DecodeLayout.template`` (``StepMask(layout, 0, device).for_prefix(0)``), moved to the
device once and only indexed afterwards.

``tidar_logical_mask`` is what the vLLM backend (``vllm_tidar.plugin.flex_attention``)
puts behind vLLM's own physical -> logical paged mapping. ``paged_tidar_mask_mod`` is a
small stand-alone paged wrapper with the same semantics as vLLM's
``FlexAttentionMetadata._convert_physical_to_logical``, used by the tests and usable
without vLLM. ``visible_kv_blocks`` is the KV-block pruning rule: causal pruning by the
query's own position would drop the later keys that a mask row attends to inside its
block, so TiDAR tokens keep every block up to their request's last step position.
"""

from __future__ import annotations

import torch


def tidar_logical_mask(
    q_req: torch.Tensor,
    logical_q: torch.Tensor,
    logical_kv: torch.Tensor,
    is_tidar: torch.Tensor,
    prefix: torch.Tensor,
    template: torch.Tensor,
) -> torch.Tensor:
    """Bool mask for logical positions of request ``q_req`` (all broadcastable).

    ``is_tidar`` (bool) and ``prefix`` (int) are indexed by request; ``template`` is
    ``L x L`` bool. Only in-sequence keys (``kv < seq_len``) are meaningful: the caller
    ANDs this with its validity mask.
    """
    p = prefix[q_req]
    last = template.shape[0] - 1
    # clamp: the gather is evaluated for every (q, kv) pair, TiDAR or not
    tq = (logical_q - p).clamp(0, last)
    tk = (logical_kv - p).clamp(0, last)
    tidar = (logical_kv < p) | template[tq, tk]
    return torch.where(is_tidar[q_req], tidar, logical_q >= logical_kv)


def paged_tidar_mask_mod(
    doc_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    physical_to_logical: torch.Tensor,
    block_size: int,
    is_tidar: torch.Tensor,
    template: torch.Tensor,
):
    """A Flex ``mask_mod(b, h, q_idx, physical_kv_idx)`` over a packed batch and a paged
    cache (``physical_to_logical[req, physical_block]`` = logical block or -1)."""
    prefix = seq_lens - (query_start_loc[1:] - query_start_loc[:-1])

    def mask_mod(b, h, q_idx, physical_kv_idx):
        req = doc_ids[q_idx]
        logical_block = physical_to_logical[req, physical_kv_idx // block_size]
        logical_kv = logical_block * block_size + physical_kv_idx % block_size
        valid = (logical_block >= 0) & (logical_kv < seq_lens[req])
        logical_q = q_idx - query_start_loc[req] + prefix[req]
        return valid & tidar_logical_mask(req, logical_q, logical_kv, is_tidar, prefix, template)

    return mask_mod


def visible_kv_blocks(
    doc_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    is_tidar: torch.Tensor,
    num_logical_blocks: int,
    block_size: int,
) -> torch.Tensor:
    """``[num_tokens, num_logical_blocks]`` bool: logical KV blocks a query token may see.

    Causal tokens keep blocks starting at or before their own position; tokens of a TiDAR
    step keep every block of their request (up to ``seq_len - 1``, the last step row).
    """
    num_tokens = doc_ids.shape[0]
    token = torch.arange(num_tokens, device=doc_ids.device)
    req = doc_ids.long()
    prefix = (seq_lens - (query_start_loc[1:] - query_start_loc[:-1]))[req]
    logical_q = token - query_start_loc[req] + prefix
    last = torch.where(is_tidar[req], seq_lens[req] - 1, logical_q)
    starts = torch.arange(num_logical_blocks, device=doc_ids.device) * block_size
    return starts[None, :] <= last[:, None]

