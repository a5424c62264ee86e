"""The ``custom_class`` proposer that hands TiDAR's drafts and mask slots to vLLM.

vLLM sees ``num_speculative_tokens = K + (K+1)*block_len`` draft tokens per request, so
a decode step schedules ``L`` tokens: ``[x_last, d1..dK, MASK * (K+1)*block_len]``.
vLLM's rejection sampler verifies ``d1..dK`` (MASK drafts are always rejected because
the model sets their logit to -inf), then this proposer returns, for each request,
row ``a`` (``a`` = accepted drafts = ``len(sampled) - 1``) of the ``(K+1, K)`` next-draft
tensor the model stashed in the same forward (the argmax of ``layout.next_draft_rows(a)``)
followed by the mask slots. Requests that
did not run a full TiDAR step (first step after prefill, degraded steps) get all-MASK
drafts: they are rejected and the next step's block 0 supplies real drafts. Such steps
are not spec steps in vLLM's metrics (``patches/spec_metrics_tidar.py``).
"""

from __future__ import annotations

from ..checkpoint import TidarSettings
from ..layout import DecodeLayout


class TiDARProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.settings = TidarSettings.from_hf_config(
            vllm_config.model_config.hf_config, source=vllm_config.model_config.model
        )
        self.layout = DecodeLayout.from_num_speculative_tokens(spec.num_speculative_tokens, self.settings.block_length)
        self.mask_id = self.settings.mask_token_id
        self.num_spec = spec.num_speculative_tokens
        self.model = None
        self._mask_tail = [self.mask_id] * self.layout.num_mask_slots
        self._all_mask = [self.mask_id] * self.num_spec

    def load_model(self, target_model) -> None:
        if not hasattr(target_model, "take_tidar_drafts"):
            raise TypeError(
                f"the TiDAR proposer needs a TiDAR model, got {type(target_model).__name__}"
            )
        self.model = target_model

    def propose(self, sampled_token_ids, num_tokens_no_spec=None, token_ids_cpu=None, slot_mappings=None, **kwargs):
        stash = self.model.take_tidar_drafts() if self.model is not None else {}
        layout, out = self.layout, []
        for i, toks in enumerate(sampled_token_ids):
            if not toks:  # partial prefill chunk: nothing sampled, no drafts
                out.append([])
                continue
            drafts = stash.get(i)
            a = len(toks) - 1
            if drafts is None or a > layout.num_drafts:
                out.append(list(self._all_mask))
                continue
            out.append(list(drafts[a]) + self._mask_tail)
        return out
