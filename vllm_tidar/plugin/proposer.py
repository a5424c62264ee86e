"""The ``custom_class`` proposer that hands TiDAR's drafts and mask slots to vLLM, with
the drafts per step chosen for the batch size (``adaptive.DraftPolicy``).

With ``k`` drafts a decode step schedules ``L(k)`` tokens ``[x_last, d1..dk, MASK *
(k+1)*block_len]``: the proposer returns ``num_speculative_tokens(k) = L(k) - 1`` draft
tokens per request. vLLM's rejection sampler verifies ``d1..dk`` (MASK drafts are always
rejected because the model sets their logit to -inf); then, for each request, the first
``k_next`` draft rows of block ``a`` (``a`` = accepted drafts = ``len(sampled) - 1``), whose
hidden states the model stashed in the same forward, followed by the mask slots of ``k_next``.
``k_next = 0`` means a plain AR step (no drafts). After a prefill ``a = 0`` and the drafts
come from the mask block the model appended to the prompt (``model.PrefillBlock``).
Requests that did not run a full TiDAR step nor a prefill with a block (the step after a
plain step, degraded steps) get all-MASK drafts: they are rejected and the next step's
block 0 supplies real drafts. Such steps are not spec steps in vLLM's metrics
(``patches/spec_metrics_tidar.py``).

The wall time between two calls is one engine step: it feeds the policy's cost model
(only steps that ran exactly what was proposed last time: every batch row grew by just its
sampled tokens, so prefills, new requests and idle gaps are skipped), and the accepted
counts of real drafts feed its acceptance model; both persist per machine
(``policy_cache``). The lm_head runs on the next drafts only
after the layout is chosen, on block ``a`` of each request (``model.tidar_next_drafts``), and
not at all before a plain AR step.
"""

from __future__ import annotations

import atexit
import os
import time

import numpy as np

from ..checkpoint import TidarSettings
from ..errors import TidarError
from ..layout import DecodeLayout
from .adaptive import DraftPolicy
from .policy_cache import PolicyCache


def draft_schedule(vllm_config, block_len: int, max_drafts: int) -> list[DecodeLayout | None] | None:
    """Dense batch size -> layout (None: plain AR) from ``num_speculative_tokens_per_batch_size``
    (vLLM's field, in vLLM's spec-token units, converted back to K at the served block
    length), the largest K everywhere when ``VLLM_TIDAR_ADAPTIVE=0``, else None (adaptive)."""
    spec = vllm_config.speculative_config
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    table = getattr(spec, "num_speculative_tokens_per_batch_size", None)
    if table:
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        dense = build_dynamic_sd_schedule_lookup(table, max_seqs, spec.num_speculative_tokens)
        ks = [DecodeLayout.num_drafts_scheduled(n, block_len) for n in dense]
        return [DecodeLayout(block_len, k) if k else None for k in ks]
    flag = os.environ.get("VLLM_TIDAR_ADAPTIVE", "1").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return [DecodeLayout(block_len, max_drafts)] * (max_seqs + 1)
    if flag not in ("1", "true", "on", "yes", ""):
        raise TidarError(f"VLLM_TIDAR_ADAPTIVE must be 0 or 1, got {flag!r}")
    return None


def candidate_layouts(settings: TidarSettings, max_layout: DecodeLayout) -> list[DecodeLayout]:
    """Every layout a step may use: K = 1..K_max at each served block length (the served one
    and the smaller ones the checkpoint was trained with), within the tokens vLLM schedules."""
    out = []
    for bl in settings.served_block_lengths():
        for k in range(1, min(max_layout.num_drafts, bl - 1) + 1):
            lay = DecodeLayout(bl, k)
            if lay.num_tokens <= max_layout.num_tokens:
                out.append(lay)
    return out


class TiDARProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.settings = TidarSettings.from_hf_config(
            vllm_config.model_config.hf_config, source=vllm_config.model_config.model
        )
        bl = self.settings.block_length
        self.max_layout = DecodeLayout.from_num_speculative_tokens(spec.num_speculative_tokens, bl)
        k_max = self.max_layout.num_drafts
        self.policy = DraftPolicy(candidate_layouts(self.settings, self.max_layout),
                                  schedule=draft_schedule(vllm_config, bl, k_max))
        # adaptive: start from what an earlier engine measured on this machine (policy_cache)
        self.cache = PolicyCache.for_engine(vllm_config, bl) if self.policy.schedule is None else None
        if self.cache is not None:
            self.cache.restore(self.policy)
            atexit.register(self.cache.save, self.policy)
        self.mask_id = self.settings.mask_token_id
        self.model = None
        self._layout: DecodeLayout | None = self.max_layout  # of the step being verified now
        self._real: list[bool] = []  # per batch row: that step's drafts were real (not all MASK)
        self._last: tuple[bool, int, int, int] | None = None  # (TiDAR step, requests, tokens, batch rows) proposed last
        self._t = 0.0
        self._num_tokens: list[int] | None = None  # per batch row, tokens (no drafts) at the last call

    def load_model(self, target_model) -> None:
        if not hasattr(target_model, "tidar_next_drafts"):
            raise TypeError(
                f"the TiDAR proposer needs a TiDAR model, got {type(target_model).__name__}"
            )
        self.model = target_model

    def propose(self, sampled_token_ids, num_tokens_no_spec=None, token_ids_cpu=None, slot_mappings=None, **kwargs):
        now = time.perf_counter()
        n = len(sampled_token_ids)
        # plain Python on these short per-row lists: this runs every step, plain ones too
        # (with numpy calls on a few ints and the policy rating every layout each step it
        # took ~0.11-0.16 ms of a ~5 ms plain batch-4 step on 2 cores; now ~0.06 ms).
        # tolist copies: vLLM reuses its buffer
        grew = [len(t) for t in sampled_token_ids]
        num_tokens = np.asarray(num_tokens_no_spec[:n]).tolist() if num_tokens_no_spec is not None else None
        prev, last = self._num_tokens, self._last
        # the step just run is the one proposed last time iff every row only grew by what it
        # sampled (a new request in a row, a prefill or a preemption breaks that)
        steady = (last is not None and last[3] == n and num_tokens is not None and prev is not None
                  and len(prev) == n and 0 not in grew
                  and all(a - b == g for a, b, g in zip(num_tokens, prev, grew)))
        self._num_tokens = num_tokens
        if steady:  # measure it
            self.policy.costs.observe(*last[:3], now - self._t)
            acc = self.policy.acceptance.get(self._layout.block_len) if self._layout is not None else None
            if acc is not None:
                k = self._layout.num_drafts
                for g, real in zip(grew, self._real):
                    if real:
                        acc.observe(k, g - 1)
            if self.cache is not None:
                self.cache.maybe_save(self.policy)
        active = n - grew.count(0)
        nxt = self.policy.choose(active)
        if nxt is None:  # a plain AR step next: no drafts
            if self._layout is not None and self.model is not None:  # after a TiDAR step: drop its stash
                self.model.tidar_next_drafts([], 0)
                self.model.tidar_use_layout(None)
            self._layout, self._real = None, []
            self._last = (False, active, active, n)
            self._t = now
            return [[] for _ in range(n)]
        accepted = [len(t) - 1 if t else None for t in sampled_token_ids]
        stash = self.model.tidar_next_drafts(accepted, nxt.num_drafts) if self.model is not None else {}
        out, real = [], []
        mask = self.mask_id
        for i, toks in enumerate(sampled_token_ids):
            if not toks:  # a partial prefill chunk
                out.append([])
                real.append(False)
                continue
            d = stash.get(i)  # a smaller block than the next step's gives fewer drafts
            if d is None:
                out.append([mask] * nxt.num_speculative_tokens)
                real.append(False)
                continue
            out.append(d + [mask] * (nxt.num_speculative_tokens - len(d)))
            real.append(True)
        if self.model is not None:
            self.model.tidar_use_layout(nxt)
        self._layout = nxt
        self._real = real
        self._last = (True, active, active * nxt.num_tokens, n)
        self._t = now
        return out
