"""Patch: refuse ``logprob_token_ids`` under speculative decoding with a 400, as vLLM refuses
``min_p`` and ``logit_bias`` (targets vLLM 0.32.0).

Bug: vLLM 0.32's rejection sampler returns top-k logprobs and ignores
``SamplingParams.logprob_token_ids``; the OpenAI server then indexes the missing entries and
answers ``500 list index out of range`` (``serving.py`` ``_create_completion_logprobs``).
That holds for every speculative method (n-gram too), but a TiDAR engine always drafts, so
every such request to it failed.

Fix: ``SamplingParams._validate_spec_decode`` (called by ``SamplingParams.verify`` in the
front-end whenever a speculative config is set) also raises ``VLLMValidationError`` for
``logprob_token_ids``: the server answers 400 with a one-line message and the offline
``LLM`` raises before the request is queued. Plain ``logprobs=N`` keeps working.
"""

from __future__ import annotations

import functools

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["self", "speculative_config"]
_ATTR = "_vllm_tidar_patched"
MESSAGE = (
    "The logprob_token_ids sampling parameter is not yet supported with speculative decoding "
    "(use logprobs=N, or serve without speculative decoding)."
)


def check_upstream() -> None:
    from vllm.sampling_params import SamplingParams

    require_params("spec_refuse_logprob_token_ids", TARGET_VERSION, "SamplingParams._validate_spec_decode",
                   SamplingParams._validate_spec_decode, EXPECTED_PARAMS)


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    validate = SamplingParams._validate_spec_decode
    if getattr(validate, _ATTR, False):
        return
    check_upstream()

    @functools.wraps(validate)
    def patched_validate_spec_decode(self, speculative_config):
        validate(self, speculative_config)
        if speculative_config is not None and self.logprob_token_ids is not None:
            raise VLLMValidationError(MESSAGE, parameter="logprob_token_ids", value=self.logprob_token_ids)

    setattr(patched_validate_spec_decode, _ATTR, True)
    SamplingParams._validate_spec_decode = patched_validate_spec_decode
