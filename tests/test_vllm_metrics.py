"""vLLM's spec-decode metrics count TiDAR's K drafts per drafting step, not its mask slots
(patch ``spec_metrics_tidar``), on the demo checkpoint (block length 8, K = 7)."""

from __future__ import annotations

import pytest

from vllm_helpers import close_llm, demo_checkpoint, generate, make_llm, prompt_set

pytestmark = pytest.mark.slow

K = 7
NUM_PROMPTS = 4
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def run():
    """(outputs, {metric name: metric}) of one greedy batch on the demo checkpoint."""
    demo = demo_checkpoint()
    if demo is None:
        pytest.skip("demo checkpoint not present")
    from vllm import SamplingParams

    prompts = prompt_set(demo, NUM_PROMPTS, seed=1)
    llm = make_llm(demo, disable_log_stats=False, per_request_spec_decode_metrics="detailed")
    try:
        spec = llm.llm_engine.vllm_config.speculative_config
        assert spec.num_speculative_tokens == K + (K + 1) * 8  # vLLM still schedules the mask slots
        out = generate(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        close_llm(llm)
    return out, metrics


def _engine_counts(metrics):
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    draft_tokens = metrics["vllm:spec_decode_num_draft_tokens"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    return drafts, draft_tokens, accepted, per_pos


def test_engine_counts_k_drafts_per_drafting_step(run):
    _, metrics = run
    drafts, draft_tokens, accepted, per_pos = _engine_counts(metrics)
    assert drafts > 0
    assert draft_tokens == K * drafts
    assert len(per_pos) == K
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos  # greedy accepts a prefix
    assert sum(per_pos) == accepted <= draft_tokens
    assert per_pos[0] <= drafts
    assert per_pos[1] > 0  # the trained drafts get accepted past the first position


def test_per_request_metrics_agree_with_engine(run):
    out, metrics = run
    drafts, draft_tokens, accepted, per_pos = _engine_counts(metrics)
    steps = [o.outputs[0].spec_decode_metrics for o in out]
    assert all(set(m.per_step_drafted) == {K} for m in steps)
    assert sum(len(m.per_step_accepted) for m in steps) == drafts
    assert sum(m.num_draft_tokens for m in steps) == draft_tokens
    assert sum(sum(m.per_step_accepted) for m in steps) == accepted
    assert [sum(a > i for m in steps for a in m.per_step_accepted) for i in range(K)] == per_pos
    for m in steps:
        d = m.to_dict()
        assert d["num_spec_tokens"] == K and len(d["acceptance_histogram"]) == K + 1
        assert d["num_spec_steps"] == len(m.per_step_accepted)


def test_tokens_equal_steps_plus_accepted(run):
    """Per request: prefill (1 token, and the first drafts from its mask block) + drafting
    steps (1 + a tokens each); only the last step may overshoot ``max_tokens``."""
    out, metrics = run
    for o in out:
        m = o.outputs[0].spec_decode_metrics
        n = len(o.outputs[0].token_ids)
        sampled = 1 + len(m.per_step_accepted) + sum(m.per_step_accepted)
        assert n == MAX_TOKENS
        assert sampled - (1 + m.per_step_accepted[-1]) < n <= sampled
    assert metrics["vllm:generation_tokens"].value == NUM_PROMPTS * MAX_TOKENS
