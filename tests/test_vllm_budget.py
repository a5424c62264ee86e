"""TiDAR under token-budget pressure: chunked prefills mixed with TiDAR steps and
degraded (truncated) steps must still give exactly the AR greedy output."""

from __future__ import annotations

import pytest

from vllm_helpers import close_llm, generate, make_llm, prompt_set, runner_model, tiny_checkpoint, token_ids

pytestmark = pytest.mark.slow
MAX_TOKENS = 32


def test_small_budget_parity_with_reference_ar():
    from vllm import SamplingParams

    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    ckpt = tiny_checkpoint(block_length=4)
    prompts = prompt_set(ckpt, 8, seed=5, min_len=20, max_len=150)
    model, _, settings = load_tidar(ckpt)
    dec = ReferenceDecoder(model, settings, max_len=512)
    want = [dec.generate(p, MAX_TOKENS, mode="ar").token_ids for p in prompts]

    # 8 requests x 20 tokens per TiDAR step > 64: steps are cut short, prompts chunked
    llm = make_llm(ckpt, max_num_batched_tokens=64, max_num_seqs=8, per_request_spec_decode_metrics="detailed")
    try:
        m = runner_model(llm)
        seen = {"tidar": 0, "other_decode": 0}
        orig = m._tidar_prepare

        def spy(input_ids, positions):
            out = orig(input_ids, positions)
            step = m.tidar_last_step()
            if step is not None:
                qsl = step.query_start_loc
                for i, f in enumerate(step.tidar):
                    if f:
                        seen["tidar"] += 1
                    elif not step.prefilling[i] and 1 < qsl[i + 1] - qsl[i] < 20:
                        seen["other_decode"] += 1
            return out

        m._tidar_prepare = spy
        out = generate(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        close_llm(llm)
    assert token_ids(out) == want
    assert seen["tidar"] > 0 and seen["other_decode"] > 0  # both full and degraded steps ran
