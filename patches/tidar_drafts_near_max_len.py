"""Patch: a request near ``max_model_len`` no longer wipes the drafts of the whole batch on a
TiDAR engine (targets vLLM 0.32.0).

Why: after each step ``GPUModelRunner._input_fits_in_drafter`` (the CPU runner inherits it)
asks whether the *longest* sequence of the batch plus ``num_speculative_tokens`` fits
``max_model_len``. If not, the drafter is not called and every request of the batch gets
drafts of token 0. That guards drafters that run a forward of their own (EAGLE, draft
models). For TiDAR, whose ``num_speculative_tokens`` is ``K + (K+1)*block_length`` (71 at
block length 8), one request within 71 tokens of the limit stopped drafting for all, and the
token-0 "drafts" were verified and counted as real drafts (0 accepted) by the metrics.

Fix: for the TiDAR proposer (drafts come from the verifying forward's stash, no drafter
forward), the check answers True whenever there is attention metadata. Per request, the
scheduler already trims the scheduled draft and mask slots to what fits under
``max_model_len``; such a truncated step runs causal in the model (a degraded step: its
leading real drafts are verified, the metrics count exactly those) and the other requests
keep their full TiDAR steps.
"""

from __future__ import annotations

import functools

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["self", "common_attn_metadata"]
_ATTR = "_vllm_tidar_patched"


def check_upstream() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    require_params("tidar_drafts_near_max_len", TARGET_VERSION, "GPUModelRunner._input_fits_in_drafter",
                   GPUModelRunner._input_fits_in_drafter, EXPECTED_PARAMS)


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    fits = GPUModelRunner._input_fits_in_drafter
    if getattr(fits, _ATTR, False):
        return
    check_upstream()

    @functools.wraps(fits)
    def patched_input_fits_in_drafter(self, common_attn_metadata):
        from vllm_tidar.plugin.common import is_tidar_proposer

        if common_attn_metadata is not None and is_tidar_proposer(self.speculative_config):
            return True
        return fits(self, common_attn_metadata)

    setattr(patched_input_fits_in_drafter, _ATTR, True)
    GPUModelRunner._input_fits_in_drafter = patched_input_fits_in_drafter
