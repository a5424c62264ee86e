"""Small helpers shared by the plugin's model, proposer and config hooks (no vLLM import)."""

from __future__ import annotations

import contextlib
import logging
import os

from ..checkpoint import TidarSettings
from ..layout import DecodeLayout

PROPOSER_PATH = "vllm_tidar.plugin.proposer.TiDARProposer"

# architecture name -> "module:Class" of the vLLM implementation
MODEL_CLASSES = {
    "TiDARLlamaForCausalLM": "vllm_tidar.plugin.model:TiDARLlamaForCausalLM",
    "TiDARQwen2ForCausalLM": "vllm_tidar.plugin.model:TiDARQwen2ForCausalLM",
    "TiDARQwen3ForCausalLM": "vllm_tidar.plugin.model:TiDARQwen3ForCausalLM",
}
# TiDAR architecture -> the stock vLLM architecture it builds on (plain AR serving)
BASE_ARCHITECTURES = {
    "TiDARLlamaForCausalLM": "LlamaForCausalLM",
    "TiDARQwen2ForCausalLM": "Qwen2ForCausalLM",
    "TiDARQwen3ForCausalLM": "Qwen3ForCausalLM",
}


def plugin_logger(name: str) -> logging.Logger:
    """The logger of plugin module ``name``, named under vLLM's ``vllm`` logger so that its
    handlers and level (``VLLM_LOGGING_LEVEL``) apply; a ``vllm_tidar.*`` logger sits outside
    vLLM's logging configuration and its INFO lines are dropped."""
    return logging.getLogger(f"vllm.{name}")


def is_tidar_proposer(spec_config) -> bool:
    return (
        spec_config is not None
        and getattr(spec_config, "method", None) == "custom_class"
        and getattr(spec_config, "model", None) == PROPOSER_PATH
    )


def tidar_drafts_and_mask(spec_config, hf_config) -> tuple[int, int] | None:
    """``(K, mask_token_id)`` when ``spec_config`` runs the TiDAR proposer, else ``None``."""
    if not is_tidar_proposer(spec_config):
        return None
    settings = TidarSettings.from_hf_config(hf_config)
    layout = DecodeLayout.from_num_speculative_tokens(spec_config.num_speculative_tokens, settings.block_length)
    return layout.num_drafts, settings.mask_token_id


def engine_runner(llm):
    """The model runner of an in-process ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def close_llm(llm) -> None:
    """Shut an in-process ``vllm.LLM`` down and free its distributed state."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@contextlib.contextmanager
def adaptive_drafting(on: bool):
    """``VLLM_TIDAR_ADAPTIVE`` set for an engine built inside the block (the proposer reads it
    once, at start), then restored."""
    saved = os.environ.get("VLLM_TIDAR_ADAPTIVE")
    os.environ["VLLM_TIDAR_ADAPTIVE"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_TIDAR_ADAPTIVE", None)
        else:
            os.environ["VLLM_TIDAR_ADAPTIVE"] = saved
