"""Reference decoder: lossless greedy parity with AR, KV rollback, stopping, degraded steps."""

import random

import pytest
import torch

from vllm_tidar.layout import DecodeLayout
from vllm_tidar.reference import ReferenceDecoder


def random_prompts(n: int, vocab: int, mask_id: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = [i for i in range(vocab) if i != mask_id]
    prompts = [[rng.choice(ids)]]  # a 1-token prompt
    prompts += [[rng.choice(ids) for _ in range(rng.randint(2, 40))] for _ in range(n - 1)]
    return prompts


@pytest.mark.parametrize("block_length", [2, 4, 8])
def test_greedy_tidar_equals_ar_tiny(tiny, block_length):
    model, settings = tiny
    dec = ReferenceDecoder(model, settings, block_length=block_length)
    accepted = 0
    for prompt in random_prompts(20, model.config.vocab_size, settings.mask_token_id):
        ar = dec.generate(prompt, 32, mode="ar")
        td = dec.generate(prompt, 32, mode="tidar")
        assert td.token_ids == ar.token_ids, prompt
        assert ar.num_forwards == 32 and td.num_forwards <= 32
        accepted += sum(td.accepted_drafts)
    assert accepted > 0  # drafts were really accepted, not only bonus tokens


@pytest.mark.parametrize("block_length", [2, 4, 8])
def test_greedy_tidar_equals_ar_demo(demo, block_length):
    model, tok, settings = demo
    from vllm_tidar.tokens_per_forward import humaneval_prompts

    dec = ReferenceDecoder(model, settings, block_length=block_length)
    fewer = 0
    for text in humaneval_prompts(20):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ar = dec.generate(ids, 64, mode="ar", eos_token_id=tok.eos_token_id)
        td = dec.generate(ids, 64, mode="tidar", eos_token_id=tok.eos_token_id)
        assert td.token_ids == ar.token_ids and td.finish_reason == ar.finish_reason
        fewer += td.num_forwards < ar.num_forwards
    assert fewer >= 10  # the trained drafts save forwards on most prompts


def test_eos_and_max_tokens_inside_an_accepted_block(demo):
    model, tok, settings = demo
    dec = ReferenceDecoder(model, settings, block_length=8)
    prompt = tok("import os\n\ndef main(", add_special_tokens=False)["input_ids"]
    full = dec.generate(prompt, 64, mode="tidar")
    # find a step that accepted >= 2 drafts and stop inside it
    pos, cut = 1, None
    for a in full.accepted_drafts:
        if a >= 2:
            cut = pos + 1  # strictly inside the tokens committed by this step
            break
        pos += a + 1
    assert cut is not None, "no multi-token step to test with"
    short = dec.generate(prompt, cut, mode="tidar")
    assert short.token_ids == full.token_ids[:cut] and short.finish_reason == "length"
    eos = full.token_ids[cut - 1]
    first = full.token_ids.index(eos)
    stopped = dec.generate(prompt, 64, mode="tidar", eos_token_id=eos)
    assert stopped.token_ids == full.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.token_ids == dec.generate(prompt, 64, mode="ar", eos_token_id=eos).token_ids


def test_kv_rollback_keeps_exactly_committed_tokens(tiny):
    """After steps with rejections the cache equals one causal forward over the committed tokens."""
    from transformers import DynamicCache

    from vllm_tidar.reference import SamplingSettings, _Session

    model, settings = tiny
    dec = ReferenceDecoder(model, settings, block_length=4)
    s = _Session(dec, [3, 9, 27, 81 % 95], SamplingSettings(), None)
    s.prefill_tidar()
    rejected_seen = 0
    for _ in range(6):
        s.step_tidar()
        rejected_seen += s.accepted[-1] < dec.layout.num_drafts
        committed_with_kv = s.tokens[:-1]  # the newest token has no KV yet
        assert s.cache.get_seq_length() == len(committed_with_kv)
        ref = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([committed_with_kv]), past_key_values=ref, use_cache=True)
        for got, want in zip(s.cache.layers, ref.layers):
            torch.testing.assert_close(got.keys, want.keys)
            torch.testing.assert_close(got.values, want.values)
    assert rejected_seen > 0


def test_forward_count_and_tokens_per_step(tiny):
    model, settings = tiny
    dec = ReferenceDecoder(model, settings, block_length=4)
    res = dec.generate([1, 2, 3], 40, mode="tidar")
    # prefill makes one token; each step commits accepted drafts + 1 bonus
    assert res.num_forwards == 1 + len(res.accepted_drafts)
    assert 1 + sum(a + 1 for a in res.accepted_drafts) >= len(res.token_ids)
    assert all(0 <= a <= 3 for a in res.accepted_drafts)


def test_engine_style_bootstrap_is_lossless_and_costs_one_forward(tiny):
    model, settings = tiny
    paper = ReferenceDecoder(model, settings, block_length=4)
    engine = ReferenceDecoder(model, settings, block_length=4, draft_at_prefill=False)
    for prompt in random_prompts(8, model.config.vocab_size, settings.mask_token_id, seed=1):
        a, b = paper.generate(prompt, 30), engine.generate(prompt, 30)
        assert a.token_ids == b.token_ids
        assert b.accepted_drafts[0] == 0  # the all-[MASK] first drafts are always rejected


def test_degraded_steps_near_max_len(tiny):
    model, settings = tiny
    dec = ReferenceDecoder(model, settings, block_length=8, max_len=60)
    ar = dec.generate([4, 5, 6], 100, mode="ar")
    td = dec.generate([4, 5, 6], 100, mode="tidar")
    assert len(td.token_ids) == 57 and td.finish_reason == "length"
    assert td.token_ids == ar.token_ids


def test_fewer_drafts_than_block(tiny):
    model, settings = tiny
    dec = ReferenceDecoder(model, settings, block_length=8, num_drafts=3)
    assert dec.layout == DecodeLayout(8, 3)
    res = dec.generate([7, 8], 40)
    assert res.token_ids == dec.generate([7, 8], 40, mode="ar").token_ids
    assert max(res.accepted_drafts) <= 3


def test_beta_mixing_changes_only_the_bonus_rule(tiny):
    model, settings = tiny
    # beta=0 trusts the diffusion head for the bonus token: still one forward per step,
    # and the output differs from AR in general (not lossless by design)
    dec = ReferenceDecoder(model, settings, block_length=4, beta=0.0)
    res = dec.generate([1, 2, 3], 30)
    assert len(res.token_ids) == 30 and settings.mask_token_id not in res.token_ids
