"""Small helpers shared by the plugin's model, proposer and config hooks (no vLLM import)."""

from __future__ import annotations

from ..checkpoint import TidarSettings
from ..errors import TidarError
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


def num_speculative_tokens(layout: DecodeLayout) -> int:
    """vLLM's spec-token count for a layout: K drafts plus (K+1)*block_len mask slots."""
    return layout.num_tokens - 1


def layout_from_num_spec(num_spec: int, block_len: int) -> DecodeLayout:
    """Invert ``num_speculative_tokens``: N = K + (K+1)*Bl  ->  K = (N - Bl) / (Bl + 1)."""
    k, rem = divmod(num_spec - block_len, block_len + 1)
    if rem or not 1 <= k <= block_len - 1:
        raise TidarError(
            f"num_speculative_tokens={num_spec} is not K + (K+1)*{block_len} for any "
            f"K in 1..{block_len - 1} (block length {block_len})"
        )
    return DecodeLayout(block_len, k)


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
    layout = layout_from_num_spec(spec_config.num_speculative_tokens, settings.block_length)
    return layout.num_drafts, settings.mask_token_id


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
