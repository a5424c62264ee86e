"""FlexAttention for the reference decoder (the paper's PyTorch + FlexAttention setup).

``load_tidar(..., attention="flex")`` loads the HF model with the attention function
registered here (``"tidar_flex"``). The decoder keeps building its masks from
``vllm_tidar.layout`` (``StepMask.for_prefix(P)`` is a view of the template built once);
``block_mask`` turns that (T, P+T) view into a FlexAttention ``BlockMask`` whose
``mask_mod`` reads it, so the layout stays the one source of truth.

On CUDA ``flex_attention`` is compiled once with dynamic shapes (the KV length grows
every step); on CPU it runs eagerly (correct, slow: for tests).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ATTN_NAME = "tidar_flex"
_compiled = None
_registered = False


def _flex(device: torch.device):
    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def block_mask(mask: torch.Tensor) -> BlockMask:
    """A BlockMask for a dense (T, S) bool mask (True = attend); the mask is not copied."""
    t, s = mask.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    return create_block_mask(mask_mod, None, None, t, s, device=mask.device, _compile=False)


def tidar_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (B, H, T, D) in, (B, T, H, D) out."""
    if not isinstance(attention_mask, BlockMask):
        raise TypeError("tidar_flex attention needs a BlockMask (use vllm_tidar.hf_flex.block_mask)")
    out = _flex(query.device)(
        query,
        key,
        value,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``"tidar_flex"`` with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, tidar_flex_attention)
        _registered = True
    return ATTN_NAME
