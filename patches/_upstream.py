"""What the patches check of the vLLM code they wrap: its signatures."""

from __future__ import annotations

import inspect


def params(fn) -> list[str]:
    """Parameter names of ``fn``, looking through ``functools.wraps`` wrappers."""
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def require_params(patch: str, target_version: str, name: str, fn, expected: list[str]) -> None:
    """Raise (naming the patch and the vLLM version it targets) if ``fn``'s parameters changed."""
    found = params(fn)
    if found != expected:
        raise RuntimeError(f"vllm-tidar patch {patch} targets vLLM {target_version}: {name}{tuple(found)} changed")
