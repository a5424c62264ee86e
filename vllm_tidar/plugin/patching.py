"""Applies the monkey-patches kept in the repository's top-level ``patches/`` folder
(installed as the ``vllm_tidar.patches`` package)."""

from __future__ import annotations

import importlib

PATCHES = ["spec_config_tidar", "cpu_expand_batch_to_tokens", "spec_metrics_tidar", "rebind_kernels_skip_llvmlite",
           "spec_refuse_logprob_token_ids", "tidar_drafts_near_max_len", "tidar_verify_rows_only",
           "shutdown_fails_pending_requests"]


def load_patch_module(name: str):
    return importlib.import_module(f"vllm_tidar.patches.{name}")


def apply_patches() -> None:
    for name in PATCHES:
        load_patch_module(name).apply()
