"""vLLM parallelism on CPU: TiDAR at tensor_parallel_size=2 equals TP=1 (outputs and spec-decode counts),
the default thread binding that makes TP=2 start, and one-line errors for pipeline parallelism."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from vllm_helpers import (close_llm, demo_checkpoint, demo_without_adapter, generate, make_llm, prompt_set,
                          tiny_checkpoint, token_ids)

from vllm_tidar.errors import TidarError
from vllm_tidar.plugin import cpu_threads

K = 7  # demo checkpoint: block length 8
NUM_PROMPTS = 8
MAX_TOKENS = 32
COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def _greedy_run(ckpt, prompts, **kwargs):
    from vllm import SamplingParams

    llm = make_llm(ckpt, **kwargs)
    try:
        out = token_ids(generate(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)))
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        close_llm(llm)
    counts = [metrics[name].value for name in COUNTERS]
    return out, counts, metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values


@pytest.mark.slow
def test_tp2_equals_tp1_with_the_same_drafts(monkeypatch, tmp_path):
    """In-process engine core (make_llm); at TP=2 vLLM's executor still runs one worker process per rank.
    The demo without its draft adapter (an adapter runs at TP 1 only: a one-line error, tests/test_draft_adapter.py)."""
    if demo_checkpoint() is None:
        pytest.skip("demo checkpoint not present")
    demo = demo_without_adapter(tmp_path / "demo")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores (one per rank)")
    monkeypatch.setenv(cpu_threads.ENV, "")  # restored after the test
    monkeypatch.delenv(cpu_threads.ENV)  # the plugin's default binding makes TP=2 start
    prompts = prompt_set(demo, NUM_PROMPTS, seed=3)
    tp2 = _greedy_run(demo, prompts, tensor_parallel_size=2)
    tp1 = _greedy_run(demo, prompts)
    assert cpu_threads.ENV not in os.environ  # TP=1 after TP=2: the default binding was taken back
    assert tp2[0] == tp1[0]
    assert tp2[1:] == tp1[1:]
    drafts, draft_tokens, accepted = tp2[1]
    assert drafts > 0 and accepted > 0
    assert draft_tokens == K * drafts
    assert sum(tp2[2]) == accepted


def _config(tp=1, pp=1, dp=1):
    parallel = SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                               local_world_size=tp * pp)
    return SimpleNamespace(parallel_config=parallel)


@pytest.fixture
def one_numa_node(monkeypatch):
    import vllm.utils.cpu_resource_utils as cr_utils

    monkeypatch.setenv(cpu_threads.ENV, "")  # restored after the test
    monkeypatch.delenv(cpu_threads.ENV)
    monkeypatch.setattr(cpu_threads, "_ours", None)
    monkeypatch.setattr(cr_utils, "get_visible_memory_node", lambda: [0])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_default_binding_splits_the_cores_over_the_ranks(one_numa_node):
    cpu_threads.default_thread_binding(_config(tp=2))
    assert os.environ[cpu_threads.ENV] == "0,1|2,3"


def test_default_binding_leaves_one_rank_and_the_users_setting_alone(one_numa_node, monkeypatch):
    cpu_threads.default_thread_binding(_config(tp=2))
    cpu_threads.default_thread_binding(_config())  # our own earlier default is taken back
    assert cpu_threads.ENV not in os.environ
    monkeypatch.setenv(cpu_threads.ENV, "nobind")
    cpu_threads.default_thread_binding(_config(tp=2, pp=2))
    assert os.environ[cpu_threads.ENV] == "nobind"


def test_more_ranks_than_cores_is_one_line(one_numa_node):
    with pytest.raises(TidarError, match="8 CPU ranks, but only 4 CPU cores") as info:
        cpu_threads.default_thread_binding(_config(tp=4, pp=2))
    assert "\n" not in str(info.value)


def _expect_error(match, model, **kwargs):
    with pytest.raises(TidarError, match=match) as info:
        close_llm(make_llm(model, **kwargs))
    assert "\n" not in str(info.value)


def test_pipeline_parallel_drafting_is_refused_in_one_line():
    _expect_error("does not run with pipeline_parallel_size=2", tiny_checkpoint(4), pipeline_parallel_size=2)


def test_pipeline_parallel_eager_on_cpu_is_refused_in_one_line():
    _expect_error("drop enforce_eager", tiny_checkpoint(4), pipeline_parallel_size=2,
                  hf_overrides={"tidar_mode": "ar"})
