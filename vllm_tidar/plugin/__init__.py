"""vLLM plugin side of vllm_tidar (imports vLLM lazily; see ``register``)."""

from __future__ import annotations

from .common import MODEL_CLASSES, PROPOSER_PATH, plugin_logger

logger = plugin_logger(__name__)
_registered = False


def register() -> None:
    """``vllm.general_plugins`` entry point: idempotent, cheap, no device work.

    Registers the TiDAR architectures with vLLM's ``ModelRegistry`` as lazy
    ``"module:Class"`` strings and applies the monkey-patches in ``patches/``.
    """
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, path in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import TiDARConfigHook

    for arch in MODEL_CLASSES:
        MODELS_CONFIG_MAP.setdefault(arch, TiDARConfigHook)
    from .patching import apply_patches

    apply_patches()
    _registered = True


__all__ = ["register", "PROPOSER_PATH"]
