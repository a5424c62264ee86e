"""Sustained mixed load and faults on ``vllm-tidar serve`` (demo checkpoint, TiDAR K = 7):
about 100 requests from vLLM's own ``vllm bench serve`` (greedy and sampled at once), then 50
streams aborted mid-stream, then SIGTERM under load (``benchmarks/soak.py``; the committed
1,000-request run is ``vllm-tidar soak``)."""

from __future__ import annotations

import pytest

from vllm_helpers import demo_checkpoint

pytestmark = pytest.mark.slow
K = 7
NUM_PROMPTS = 100
PHASES = 3
ABORTS = 50


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    demo = demo_checkpoint()
    if demo is None:
        pytest.skip("demo checkpoint not present")
    from vllm_tidar.benchmarks.soak import run

    return run(demo, NUM_PROMPTS, request_rate=16.0, out=tmp_path_factory.mktemp("soak"), tag="ci",
               aborts=ABORTS, k=K, output_len=24, max_num_seqs=16, phases=PHASES)


def test_no_errors_under_mixed_load(report):
    assert report["errors"] == 0 and report["completed"] == NUM_PROMPTS
    assert max(c["max_concurrent_requests"] for c in report["clients"]) >= 8  # batches formed


def test_greedy_equals_ar_before_and_after_the_load(report):
    n = report["greedy_prompts"]
    assert report["greedy_identical_before"] == n and report["greedy_identical_after"] == n


def test_spec_decode_metrics_consistent_under_load(report):
    sd = report["spec_decode"]
    per_pos = sd["accepted_per_position"]
    assert sd["num_drafts"] > 0 and len(per_pos) == K
    # a drafting step verifies K drafts, fewer when the token budget cut it
    assert sd["num_drafts"] <= sd["num_draft_tokens"] <= K * sd["num_drafts"]
    assert sum(per_pos) == sd["num_accepted_tokens"] <= sd["num_draft_tokens"]
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # a step accepts a prefix of its drafts


def test_memory_does_not_grow(report):
    """Memory levels off: the last of three equal load phases ends where the one before did
    (the first phases grow the process tree from its idle start to the load's working set)."""
    rss = report["rss_mib"]  # idle at start, then after each phase
    assert len(rss) == PHASES + 1
    assert rss[-1] <= 1.05 * rss[-2] + 64, rss


def test_aborted_streams_leave_the_server_idle(report):
    assert report["aborts_started"] == ABORTS
    idle = report["idle_after_aborts"]
    assert idle["num_requests_running"] == 0 and idle["num_requests_waiting"] == 0
    assert idle["kv_cache_usage_perc"] == report["kv_idle_before"]


def test_sigterm_under_load_shuts_down_cleanly(report):
    s = report["sigterm"]
    assert len(s["pids"]) >= 2  # API server + engine core
    assert s["exit_code"] is not None and s["shutdown_s"] <= 10, s
    assert s["orphans"] == []
