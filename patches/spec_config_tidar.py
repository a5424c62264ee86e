"""Patch: TiDAR speculative config from the checkpoint (targets vLLM 0.32.0).

What: wraps ``vllm.engine.arg_utils.EngineArgs.create_speculative_config`` (front-end
process; runs after plugins load, before ``VllmConfig`` is built). For a target whose
architecture is a TiDAR architecture (``TiDAR*ForCausalLM``):

* no ``speculative_config`` -> TiDAR on, K = block_length - 1;
* ``{"method": "tidar"}`` (optionally ``"num_speculative_tokens": K`` = drafts per step)
  -> rewritten to the legal ``custom_class`` config vLLM knows, with
  ``num_speculative_tokens = K + (K+1)*block_length`` (drafts + mask slots);
* ``hf_overrides={"tidar_mode": "ar"}`` -> no speculation (plain
  AR decoding of the same model class).

``{"method": "tidar"}`` on a non-TiDAR checkpoint and an out-of-range K raise
``TidarError`` with one line. The token-budget check lives in the
``MODELS_CONFIG_MAP`` hook (``vllm_tidar.plugin.config``), which sees the scheduler
config.

Why a patch: ``SpeculativeConfig.method`` is a pydantic ``Literal`` with
``extra="forbid"``, so vLLM 0.32 has no hook to add a method or default a spec config
from the model. The wrapped function's signature is checked by
``tests/test_vllm_patches.py``.
"""

from __future__ import annotations

import functools

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["self", "target_model_config", "target_parallel_config"]
_ATTR = "_vllm_tidar_patched"


def check_upstream() -> None:
    """Fail loudly if the patched function changed under us."""
    from vllm.engine.arg_utils import EngineArgs

    require_params("spec_config_tidar", TARGET_VERSION, "EngineArgs.create_speculative_config",
                   EngineArgs.create_speculative_config, EXPECTED_PARAMS)


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    if getattr(original, _ATTR, False):
        return
    check_upstream()

    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        from vllm_tidar.plugin.config import tidar_speculative_config

        self.speculative_config = tidar_speculative_config(self.speculative_config, target_model_config)
        return original(self, target_model_config, target_parallel_config)

    setattr(create_speculative_config, _ATTR, True)
    EngineArgs.create_speculative_config = create_speculative_config
