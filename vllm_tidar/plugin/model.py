"""TiDAR model classes for vLLM: vLLM's own Llama / Qwen2 / Qwen3 (layers and weight
loaders unchanged) plus what a TiDAR step needs.

A full TiDAR step for a request is ``L = layout.num_tokens`` scheduled tokens
``[x_last, d1..dK, MASK * (K+1)*block_len]`` while decoding (the proposer hands the
mask slots to vLLM as extra draft tokens). For such requests the model

* remaps RoPE positions: vLLM gives ``P..P+L-1``; rows get ``P + layout.position_offsets``
  (the KV slot of each row stays vLLM's, so rollback of rejected rows is untouched);
* marks the request in the attention metadata (``set_tidar_steps``) so the TiDAR
  attention backend applies the layout's template instead of a causal mask;
* in ``forward`` stashes, per TiDAR request, the hidden states of the draft rows of every
  block (``layout.block_draft_index``: ``(K+1, K_max)`` rows); the proposer, once the
  sampler has decided how many drafts ``a`` were accepted, asks for block ``a`` only
  (``tidar_next_drafts``): the lm_head runs on ``K`` rows per request, not ``(K+1)*K``;
* with a draft adapter in the checkpoint (``vllm_tidar.draft_adapter``), runs the rows of
  TiDAR steps whose input is MASK through it (the AR rows compute the base exactly; on the
  CPU, steady-state steps run the mask rows on merged weights made in ``load_weights``, and
  the proposer's draft tokens from an lm_head copy in the same draft dtype, rescored);
* in ``compute_logits`` sees only each request's verify rows ``x_last, d1..dm`` (``m`` real
  drafts; ``patches/tidar_verify_rows_only.py`` tells the model ``m + 1`` per request via
  ``tidar_set_sampled_rows``), optionally mixes in the bonus-mask logits with ``beta``, and
  sets ``logits[:, mask_token_id] = -inf`` so MASK is never sampled nor accepted.

The layout may change from step to step (adaptive drafting: K, and the block length among
those the checkpoint was trained with): the proposer calls ``tidar_use_layout(layout)`` for
the step it proposes, and the model detects steps of that layout (its tensors are built once
per layout).

Prefills, partial prefills and degraded steps (fewer than L tokens scheduled, e.g.
near max_model_len or under token-budget pressure) run plain causal attention. On the CPU
backend each prefilling request also gets one mask block appended after its last row inside
the forward (``PrefillBlock``, the paper's prefill drafting: vLLM schedules only the prompt):
the block sees the prompt and itself, writes no KV, its masks 1.. are the first drafts and
mask 0 the beta-mix partner of the first token; the forward returns vLLM's rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from ..checkpoint import TidarSettings
from ..draft_adapter import DraftAdapter, VLLMDraftAdapter, draft_dtype
from ..errors import TidarError
from ..layout import DecodeLayout, StepMask
from .attention import TiDARCPUBackend
from .common import is_tidar_proposer, plugin_logger

logger = plugin_logger(__name__)


def _tidar_attention_backend(device: torch.device):
    """The attention backend every layer of a TiDAR model runs on.

    CPU: ``TiDARCPUBackend`` (vLLM's ``CPU_ATTN`` kernel, batched SDPA for mask rows). CUDA: ``TiDARFlexBackend`` (vLLM's
    FlexAttention with the TiDAR mask_mod). ``VLLM_TIDAR_ATTENTION=flex`` forces the Flex
    backend on CPU too (debugging: eager flex, pure-torch KV write, slow).
    """
    import os

    choice = os.environ.get("VLLM_TIDAR_ATTENTION", "").strip().lower()
    if choice not in ("", "cpu", "flex"):
        raise ValueError(f"VLLM_TIDAR_ATTENTION must be 'cpu' or 'flex', got {choice!r}")
    if device.type == "cuda" or choice == "flex":
        from .flex_attention import TiDARFlexBackend

        return TiDARFlexBackend
    if device.type != "cpu":
        raise NotImplementedError(f"TiDAR attention: no backend for device {device.type!r} (CPU and CUDA only)")
    return TiDARCPUBackend


@dataclass(frozen=True)
class TiDARStep:
    """What the model's step detection saw in its last forward, per request in batch order."""

    query_start_loc: list[int]  # host copy, num_reqs + 1 entries
    tidar: torch.Tensor  # bool per request: ran a full TiDAR step (template attention, drafts stashed)
    prefilling: list[bool]
    starts: torch.Tensor  # first row of each request in the forward's token rows (device)
    drafted: torch.Tensor  # bool per request: drafts stashed (a full TiDAR step, or a prefill's mask block)


@dataclass(frozen=True)
class PrefillBlock:
    """One mask block appended after the last row of each prefilling request (the paper's
    prefill drafting): rows ``first_row + j * block_len + r`` of the forward, past vLLM's own."""

    requests: torch.Tensor  # long: batch rows of the requests that got a block
    ends: torch.Tensor  # long: each one's committed + scheduled tokens (the block's first position)
    first_row: int
    block_len: int


@dataclass(frozen=True)
class _StepTensors:
    """Device tensors of one decode layout (block length, K), built once, sliced per step."""

    layout: DecodeLayout
    step_mask: StepMask  # the bare L x L template (CPU: mask rows; Flex: indexed in mask_mod)
    rows: torch.Tensor  # arange(L)
    position_shift: torch.Tensor  # layout RoPE offset of each row minus its row index
    bonus_rows: torch.Tensor  # beta mixing: mask row predicting the same position as verify row i
    draft_index: torch.Tensor  # (K+1, K_max): draft rows of each block, as many as the proposer may take
    mask_slots: torch.Tensor  # bool (L,): the layout's mask slots (what a draft adapter runs on)

    @classmethod
    def build(cls, layout: DecodeLayout, device, max_drafts: int) -> "_StepTensors":
        rows = torch.arange(layout.num_tokens)
        draft_index = layout.block_draft_index[:, :max_drafts]
        bonus = torch.tensor([layout.bonus_mask_row(i) for i in range(layout.num_verify)])
        return cls(
            layout=layout,
            step_mask=StepMask(layout, 0, device),
            rows=rows.to(device),
            position_shift=(layout.position_offsets - rows).to(device),
            bonus_rows=bonus.to(device),
            draft_index=draft_index.to(device),
            mask_slots=layout.is_mask.to(device),
        )


class _StepState:
    """The model's per-forward TiDAR state (a plain object: attribute writes on an
    ``nn.Module`` go through its slow ``__setattr__``, and these change every step)."""

    __slots__ = ("last", "rows", "rows_next", "draft_hidden", "bonus_hidden", "expect", "prefill")

    def __init__(self) -> None:
        self.last: TiDARStep | None = None  # step detection of the last forward
        # logits rows per request: of the last forward, of the step being prepared
        self.rows: np.ndarray | None = None
        self.rows_next: np.ndarray | None = None
        # hidden states of the last forward's draft rows (R, K+1, K_max, H) and bonus rows (R, K+1, H)
        self.draft_hidden: torch.Tensor | None = None
        self.bonus_hidden: torch.Tensor | None = None
        # the next forward may hold TiDAR steps (False after the proposer chose a plain step:
        # nothing scheduled holds MASK then, so step detection is skipped)
        self.expect = True
        self.prefill: PrefillBlock | None = None  # mask blocks the last forward appended to prefills


class _TiDARMixin:
    """Adds TiDAR steps to a vLLM causal LM. Call ``_tidar_setup`` after ``__init__``."""

    def _tidar_setup(self, vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        self.tidar_settings = TidarSettings.from_hf_config(hf_config, source=vllm_config.model_config.model)
        self.tidar_mask_id = self.tidar_settings.mask_token_id
        spec = vllm_config.speculative_config
        self.tidar_layout = None
        if is_tidar_proposer(spec):
            self.tidar_layout = DecodeLayout.from_num_speculative_tokens(
                spec.num_speculative_tokens, self.tidar_settings.block_length
            )
        device = torch.device(vllm_config.device_config.device)
        backend = _tidar_attention_backend(device)
        self._tidar_device = device
        self._tidar_tensors: dict[tuple[int, int], _StepTensors] = {}
        self._tidar_adapter = None
        if self.tidar_layout is not None and self.tidar_settings.draft_adapter is not None:
            adapter = DraftAdapter.load(vllm_config.model_config.model, self.tidar_settings.draft_adapter)
            self._tidar_adapter_dtype = vllm_config.model_config.dtype
            merged = draft_dtype(getattr(hf_config, "tidar_draft_dtype", None), self._tidar_adapter_dtype, device)
            self._tidar_adapter = VLLMDraftAdapter(self, adapter, device, self._tidar_adapter_dtype, merged)
        self._tidar_max_drafts = self.tidar_layout.num_drafts if self.tidar_layout is not None else 0
        self._tidar_max_len = vllm_config.model_config.max_model_len
        self._tidar_state = _StepState()
        if self.tidar_layout is not None:
            self.tidar_use_layout(self.tidar_layout)
        # every attention layer runs through the TiDAR backend (plain AR mode too, so
        # both modes share one attention implementation)
        n = 0
        for module in self.modules():
            if isinstance(module, Attention):
                impl = module.impl
                sizes = backend.get_supported_head_sizes()
                if sizes and impl.head_size not in sizes:
                    raise TidarError(f"{backend.__name__} (vLLM's {backend.get_name()} kernel) supports head sizes "
                                     f"{sizes}; this model's attention head size is {impl.head_size}")
                module.attn_backend = backend
                module.backend = AttentionBackendEnum[backend.get_name()]
                module.impl = backend.get_impl_cls()(
                    impl.num_heads,
                    impl.head_size,
                    impl.scale,
                    impl.num_kv_heads,
                    None,
                    None,
                    module.kv_cache_dtype,
                    None,
                    module.attn_type,
                    getattr(module, "kv_sharing_target_layer_name", None),
                )
                n += 1
        logger.info(
            "TiDAR model: block_length=%d mask_token_id=%d %s (%d attention layers on %s)",
            self.tidar_settings.block_length,
            self.tidar_mask_id,
            f"K={self.tidar_layout.num_drafts} L={self.tidar_layout.num_tokens}" if self.tidar_layout else "plain AR",
            n,
            backend.__name__,
        )

    # --- forward -------------------------------------------------------------------------
    def _tidar_prepare(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """Step detection, vectorised over the batch (no host sync per request): a request
        runs a full TiDAR step iff it decodes ``L`` tokens whose mask slots hold MASK. Its
        rows get the layout's RoPE positions, and the attention metadata is told. Every
        prefilling request gets one mask block appended after its last row (``_prefill_block``).
        Skipped when the proposer chose a plain step (``tidar_use_layout(None)``). Returns the
        forward's ``(input_ids, positions)``, with the appended rows."""
        st = self._tidar_state
        st.last = st.prefill = None
        st.rows, st.rows_next = st.rows_next, None
        adapter = self._tidar_adapter
        if adapter is not None:
            adapter.set_rows(None)
        layout = self.tidar_layout
        if layout is None or not st.expect or input_ids is None or not is_forward_context_available():
            return input_ids, positions
        md_all = get_forward_context().attn_metadata
        if isinstance(md_all, list):
            md_all = md_all[0] if md_all else None
        if not md_all:
            return input_ids, positions
        # TiDARCPUMetadata / TiDARFlexMetadata: tidar_batch() and set_tidar_steps()
        mds = {id(m): m for m in md_all.values() if hasattr(m, "set_tidar_steps")}
        if not mds:
            return input_ids, positions
        qsl, prefilling = next(iter(mds.values())).tidar_batch()
        scheduled = {e - s for s, e in zip(qsl[:-1], qsl[1:])}  # tokens per request, host side
        dev = input_ids.device
        num_reqs = len(qsl) - 1
        qsl_t = torch.tensor(qsl, dtype=torch.long, device=dev)
        starts = qsl_t[:-1]
        flags = torch.zeros(num_reqs, dtype=torch.bool, device=dev)
        rows = None  # (R, L) token rows of each request's would-be TiDAR step
        steady = False
        tt = self._tidar_t
        if layout.num_tokens in scheduled:  # some request scheduled L tokens: detect TiDAR steps
            lens = qsl_t[1:] - starts
            rows = (starts[:, None] + tt.rows).clamp_(max=input_ids.shape[0] - 1)  # (R, L)
            slots_masked = (input_ids[rows[:, layout.num_verify :]] == self.tidar_mask_id).all(-1)
            decoding = ~torch.tensor(prefilling, dtype=torch.bool, device=dev)
            flags = (lens == layout.num_tokens) & decoding & slots_masked
            # vLLM gave rows P..P+L-1; TiDAR rows sit at P + position_offsets
            shift = flags[:, None].long() * tt.position_shift
            positions = positions.index_add(0, rows.flatten(), shift.flatten())
            for m in mds.values():
                m.set_tidar_steps(flags, tt.step_mask)
            # steady state: R blocks of L rows, adapted from num_verify on
            steady = qsl[-1] == input_ids.shape[0] and scheduled == {layout.num_tokens} and bool(flags.all())
        drafted = flags
        block = self._prefill_block(mds, prefilling, input_ids.shape[0], layout.block_len)
        if block is not None:
            bl = block.block_len
            extra = block.requests.numel() * bl
            input_ids = torch.cat([input_ids, input_ids.new_full((extra,), self.tidar_mask_id)])
            positions = torch.cat([positions, (block.ends.to(dev)[:, None] + torch.arange(bl, device=dev)).flatten()])
            drafted = flags.clone()
            drafted[block.requests] = True
            st.prefill = block
        if rows is None and block is None:
            return input_ids, positions
        if adapter is not None:  # the mask slots of TiDAR steps and prefill blocks
            if steady and block is None:
                adapter.set_blocks(num_reqs, layout.num_tokens, layout.num_verify)
            else:  # token rows and 0/1 weights
                routed = []
                if rows is not None:
                    routed.append((rows.flatten(), (flags[:, None] & tt.mask_slots).flatten()))
                if block is not None:
                    n = block.first_row
                    routed.append((torch.arange(n, input_ids.shape[0], device=dev),
                                   torch.ones(input_ids.shape[0] - n, dtype=torch.bool, device=dev)))
                idx, weight = (torch.cat(t) for t in zip(*routed))
                adapter.set_rows(idx, weight[:, None].to(self._tidar_adapter_dtype))
        st.last = TiDARStep(qsl, flags, prefilling, starts, drafted)
        return input_ids, positions

    def _prefill_block(self, mds: dict, prefilling: list[bool], first_row: int, block_len: int) -> PrefillBlock | None:
        """Which prefilling requests get a mask block after their last row in this forward
        (the paper's prefill drafting: the first token and the first drafts from one forward),
        told to the attention metadata. Backends without ``set_prefill_block`` (Flex) and
        requests within ``block_len`` of ``max_model_len`` draft from MASK placeholders at
        their first decode step instead."""
        if not any(prefilling) or not all(hasattr(m, "set_prefill_block") for m in mds.values()):
            return None
        seq_lens = next(iter(mds.values())).seq_lens
        reqs = [i for i, p in enumerate(prefilling) if p and seq_lens[i] + block_len <= self._tidar_max_len]
        if not reqs:
            return None
        block = PrefillBlock(torch.tensor(reqs, dtype=torch.long), torch.tensor([seq_lens[i] for i in reqs]),
                             first_row, block_len)
        for m in mds.values():
            m.set_prefill_block(block)
        return block

    def tidar_use_layout(self, layout: DecodeLayout | None) -> None:
        """Detect TiDAR steps of ``layout`` from the next forward on (the proposer's choice for
        the step it just proposed: the served block length or a smaller trained one, K <= the
        configured K); None: the proposer chose a plain step (no MASK drafts), so the next
        forward skips step detection."""
        self._tidar_state.expect = layout is not None
        if layout is None:
            return
        key = (layout.block_len, layout.num_drafts)
        t = self._tidar_tensors.get(key)
        if t is None:
            t = self._tidar_tensors[key] = _StepTensors.build(
                layout, self._tidar_device, self._tidar_max_drafts
            )
        self._tidar_t = t
        self.tidar_layout = t.layout

    def tidar_last_step(self) -> TiDARStep | None:
        """Step detection of the last forward (None when it had no TiDAR attention metadata)."""
        return self._tidar_state.last

    def tidar_set_sampled_rows(self, counts: np.ndarray) -> None:
        """Logits rows per request (batch order) of the step being prepared: ``m + 1`` for
        ``m`` real drafts (``patches/tidar_verify_rows_only.py``)."""
        self._tidar_state.rows_next = counts

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        input_ids, positions = self._tidar_prepare(input_ids, positions)
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        st = self._tidar_state
        st.draft_hidden = st.bonus_hidden = None
        last, block = st.last, st.prefill
        if last is None or not isinstance(hidden, torch.Tensor):
            return hidden
        # draft (and bonus) rows of every request; rows of requests without a TiDAR step
        # are clamped junk, dropped by the flags
        tt, top = self._tidar_t, (hidden.shape[0] if block is None else block.first_row) - 1
        mix = self.tidar_settings.beta != 1.0
        st.draft_hidden = hidden[(last.starts[:, None, None] + tt.draft_index).clamp_(max=top)]
        if mix:
            st.bonus_hidden = hidden[(last.starts[:, None] + tt.bonus_rows).clamp_(max=top)]
        if block is None:
            return hidden
        # a prefill's block stands where block 0 of a TiDAR step would: its masks 1.. are
        # the drafts after the first token (accepted count 0), mask 0 predicts that token
        blocks = hidden[block.first_row :].view(-1, block.block_len, hidden.shape[-1])
        width = min(st.draft_hidden.shape[2], block.block_len - 1)
        st.draft_hidden[block.requests, 0, :width] = blocks[:, 1 : 1 + width]
        if mix:
            st.bonus_hidden[block.requests, 0] = blocks[:, 0]
        return hidden[: block.first_row]

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._tidar_adapter is not None:  # base weights are in; vLLM packs them next
            self._tidar_adapter.merge_base()
            self._tidar_adapter.pack_draft_head(getattr(self.lm_head, "weight", None),
                                                self.logits_processor.org_vocab_size)
        return loaded

    # --- logits --------------------------------------------------------------------------
    def compute_logits(self, hidden_states: torch.Tensor):
        logits = super().compute_logits(hidden_states)
        if logits is None:
            return logits
        logits[:, self.tidar_mask_id] = -torch.inf
        st = self._tidar_state
        bonus = st.bonus_hidden
        if bonus is None:
            return logits
        # beta mixing: verify row i of a TiDAR request with the mask row predicting the same token
        counts = st.rows
        if counts is None:  # a step without drafts (prefills, plain steps): one logits row per request
            counts = np.ones(len(st.last.query_start_loc) - 1, dtype=np.int64)
        if int(counts.sum()) != logits.shape[0]:
            raise RuntimeError(f"TiDAR: {logits.shape[0]} logits rows, the step scheduled {int(counts.sum())}")
        dev = logits.device
        req = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(dev)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = torch.from_numpy(np.arange(logits.shape[0]) - np.repeat(first, counts)).to(dev)
        pos = pos.clamp_(max=bonus.shape[1] - 1)
        beta = self.tidar_settings.beta
        mixed = beta * logits + (1.0 - beta) * super().compute_logits(bonus[req, pos])
        logits = torch.where(st.last.drafted[req][:, None], mixed, logits)
        logits[:, self.tidar_mask_id] = -torch.inf
        return logits

    def tidar_next_drafts(self, accepted: list[int | None], num_drafts: int) -> dict[int, list[int]]:
        """Drafts for the next step from the last forward's stash, by batch row: for a row that
        ran a full TiDAR step and accepted ``a`` drafts, the argmax of block ``a``'s first
        ``num_drafts`` draft rows (fewer when that step's block length drafts fewer). The
        stash is used up; ``num_drafts = 0`` just drops it."""
        st = self._tidar_state
        hid, st.draft_hidden = st.draft_hidden, None
        last = st.last
        if hid is None or last is None or num_drafts <= 0:
            return {}
        rows = [i for i, a in enumerate(accepted[: hid.shape[0]]) if a is not None and 0 <= a < hid.shape[1]]
        if not rows:
            return {}
        dev = hid.device
        ri = torch.tensor(rows, device=dev)
        h = hid[ri, torch.tensor([accepted[i] for i in rows], device=dev), :num_drafts].flatten(0, 1)  # (n * k, H)
        ad = self._tidar_adapter
        ids = ad.draft_ids(h, self.tidar_mask_id) if ad is not None else None  # argmax only: the
        if ids is None:  # logits processor's scale and soft cap keep it
            logits = super().compute_logits(h)
            logits[:, self.tidar_mask_id] = -torch.inf
            ids = logits.argmax(-1)
        ids = ids.view(len(rows), -1).tolist()
        return {r: d for r, d, f in zip(rows, ids, last.drafted[ri].tolist()) if f}


class TiDARLlamaForCausalLM(_TiDARMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tidar_setup(vllm_config)


class TiDARQwen2ForCausalLM(_TiDARMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tidar_setup(vllm_config)


class TiDARQwen3ForCausalLM(_TiDARMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._tidar_setup(vllm_config)
