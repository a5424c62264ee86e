"""Loads the monkey-patches kept in the repository's top-level ``patches/`` folder."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"
PATCHES = ["spec_config_tidar", "cpu_expand_batch_to_tokens"]


def load_patch_module(name: str):
    mod_name = f"vllm_tidar_patches.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = PATCH_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"vllm-tidar patch {path} is missing")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def apply_patches() -> None:
    for name in PATCHES:
        try:
            module = load_patch_module(name)
        except FileNotFoundError as e:
            logger.warning("%s; vllm-tidar runs without it", e)
            continue
        module.apply()
