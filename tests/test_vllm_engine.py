"""End-to-end TiDAR in vLLM (CPU, tiny random checkpoint, in-process engines).

One engine at a time: the plain-AR baseline engine runs all its generations first (a
module fixture that closes it), then one TiDAR engine is shared by the tests.
"""

from __future__ import annotations

import pytest

from vllm_helpers import (
    MAX_MODEL_LEN,
    close_llm,
    generate,
    make_llm,
    prompt_set,
    proposed_drafts,
    reference_drafts,
    runner,
    runner_model,
    tiny_checkpoint,
    token_ids,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
NUM_PROMPTS = 32
REF_TOKENS = 48


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(block_length=4)


@pytest.fixture(scope="module")
def prompts(ckpt):
    return prompt_set(ckpt, NUM_PROMPTS, seed=1)


@pytest.fixture(scope="module")
def batch8(ckpt):
    ps = prompt_set(ckpt, 8, seed=2, min_len=2, max_len=90)
    assert len({len(p) for p in ps}) == 8
    return ps


@pytest.fixture(scope="module")
def long_prompt(ckpt):
    # leaves 22 positions under max_model_len: the last steps cannot fit a full layout
    return prompt_set(ckpt, 1, seed=3, min_len=MAX_MODEL_LEN - 22, max_len=MAX_MODEL_LEN - 22)[0]


def _greedy(max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def ar_results(ckpt, prompts, batch8, long_prompt):
    """Plain AR runs of the same checkpoint and class (hf_overrides tidar_mode='ar')."""
    llm = make_llm(ckpt, hf_overrides={"tidar_mode": "ar"})
    try:
        assert llm.llm_engine.vllm_config.speculative_config is None
        res = {
            "prompts": token_ids(generate(llm, prompts, _greedy())),
            "batch8": token_ids(generate(llm, batch8, _greedy())),
            "long": token_ids(generate(llm, [long_prompt], _greedy(100)))[0],
        }
    finally:
        close_llm(llm)
    return res


@pytest.fixture(scope="module")
def tidar_llm(ckpt, ar_results):  # ar_results first: one engine at a time
    llm = make_llm(ckpt, per_request_spec_decode_metrics="detailed")
    yield llm
    close_llm(llm)


def test_tidar_enabled_from_checkpoint(tidar_llm):
    spec = tidar_llm.llm_engine.vllm_config.speculative_config
    assert spec is not None and spec.method == "custom_class"
    assert spec.num_speculative_tokens == 3 + 4 * 4  # K + (K+1)*block_len, L = 20
    model = runner_model(tidar_llm)
    assert type(model).__name__ == "TiDARLlamaForCausalLM"
    assert model.tidar_layout.num_tokens == 20


def test_greedy_parity_with_ar_32_prompts(tidar_llm, prompts, ar_results):
    out = generate(tidar_llm, prompts, _greedy())
    assert token_ids(out) == ar_results["prompts"]
    # the prefill drafts too (a mask block after the prompt): every decode step verified K drafts
    for o in out:
        m = o.outputs[0].spec_decode_metrics
        assert m is not None and set(m.per_step_drafted) == {3}
        assert 1 + sum(a + 1 for a in m.per_step_accepted) >= MAX_TOKENS


def test_greedy_parity_batch_of_8_lengths(tidar_llm, batch8, ar_results):
    """Also: the lm_head, sampler and rejection sampler see only the K+1 verify rows of a
    TiDAR step (patches/tidar_verify_rows_only.py), not its 20 scheduled rows."""
    model = runner_model(tidar_llm)
    seen = []
    orig = model.compute_logits

    def spy(hidden_states):
        step = model.tidar_last_step()
        if step is not None:
            seen.append((hidden_states.shape[0], int(step.tidar.sum()), len(step.query_start_loc) - 1))
        return orig(hidden_states)

    model.compute_logits = spy
    try:
        assert token_ids(generate(tidar_llm, batch8, _greedy())) == ar_results["batch8"]
    finally:
        del model.compute_logits
    k = model.tidar_layout.num_drafts
    full = [(rows, reqs) for rows, tidar, reqs in seen if tidar == reqs == 8]
    assert full, seen  # steps where all 8 requests ran a full TiDAR step
    # the prefill drafted too, so from the first decode step on: K+1 rows each
    assert all(rows == 8 * (k + 1) for rows, _ in full), full


def test_matches_reference_decoder(tidar_llm, ckpt, prompts):
    """Same tokens, same forwards per request and same accepted-draft count per step as
    ReferenceDecoder (which drafts at prefill, as the paper does); same drafts at batch 1."""
    from vllm_tidar import reference
    from vllm_tidar.checkpoint import load_tidar

    model, _, settings = load_tidar(ckpt)
    dec = reference.ReferenceDecoder(model, settings, max_len=MAX_MODEL_LEN)
    subset = prompts
    out = generate(tidar_llm, subset, _greedy(REF_TOKENS))
    seen_a = set()
    for p, o in zip(subset, out):
        ref = dec.generate(p, REF_TOKENS, mode="tidar")
        m = o.outputs[0].spec_decode_metrics
        assert list(o.outputs[0].token_ids) == ref.token_ids
        vllm_forwards = 1 + len(m.per_step_accepted)  # prefill (with its mask block) + drafting steps
        assert vllm_forwards == ref.num_forwards
        assert m.per_step_accepted == ref.accepted_drafts
        seen_a.update(m.per_step_accepted)
    # even the random tiny model falls into loops where drafts get accepted: every
    # acceptance count (so every mask block) is exercised
    assert seen_a == {0, 1, 2, 3}

    # drafts proposed per step at batch 1 equal the reference's drafts
    drafter = runner(tidar_llm).drafter
    seen_vllm = proposed_drafts(tidar_llm, [subset[0]], _greedy(REF_TOKENS))
    seen_ref = reference_drafts(dec, subset[0], REF_TOKENS)
    mask = settings.mask_token_id
    # vLLM's last call may be one extra
    assert len(seen_ref) >= 10 and len(seen_vllm) >= len(seen_ref)
    assert seen_vllm[: len(seen_ref)] == seen_ref


def test_prefix_caching_same_outputs(tidar_llm, prompts, ar_results):
    assert tidar_llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    # run twice: the second run reuses cached prompt blocks
    first = token_ids(generate(tidar_llm, prompts[:8], _greedy()))
    second = token_ids(generate(tidar_llm, prompts[:8], _greedy()))
    assert first == second == ar_results["prompts"][:8]
    shared = prompts[0] * 3  # longer than one KV block: blocks hit across requests
    a = token_ids(generate(tidar_llm, [shared, shared + prompts[1]], _greedy()))
    b = token_ids(generate(tidar_llm, [shared + prompts[1]], _greedy()))
    assert a[1] == b[0]


def test_runs_into_max_model_len(tidar_llm, long_prompt, ar_results):
    out = generate(tidar_llm, [long_prompt], _greedy(100))[0]
    ids = list(out.outputs[0].token_ids)
    assert len(long_prompt) + len(ids) == MAX_MODEL_LEN
    assert out.outputs[0].finish_reason == "length"
    assert ids == ar_results["long"]


def test_seeded_sampling_reproducible(tidar_llm, prompts):
    from vllm import SamplingParams

    sp = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=MAX_TOKENS, seed=100 + i, ignore_eos=True) for i in range(6)]
    reqs = [{"prompt_token_ids": p} for p in prompts[:6]]
    a = token_ids(tidar_llm.generate(reqs, sp, use_tqdm=False))
    b = token_ids(tidar_llm.generate(reqs, sp, use_tqdm=False))
    assert a == b
    assert all(len(x) == MAX_TOKENS for x in a)
    mask = runner_model(tidar_llm).tidar_mask_id
    assert all(mask not in x for x in a)
