"""Other model families and beta mixing: TiDAR in vLLM equals the reference decoder
(tokens, forwards and accepted drafts per step). One engine per case, started in turn."""

from __future__ import annotations

import pytest

from vllm_helpers import close_llm, generate, make_llm, prompt_set, runner_model, tiny_checkpoint

pytestmark = pytest.mark.slow
MAX_TOKENS = 32


@pytest.mark.parametrize(
    "family,beta,arch",
    [
        ("qwen2", 1.0, "TiDARQwen2ForCausalLM"),
        ("qwen3", 1.0, "TiDARQwen3ForCausalLM"),
        ("llama", 0.5, "TiDARLlamaForCausalLM"),
    ],
)
def test_family_matches_reference(family, beta, arch):
    from vllm import SamplingParams

    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    ckpt = tiny_checkpoint(block_length=4, family=family, beta=beta)
    prompts = prompt_set(ckpt, 8, seed=7)
    llm = make_llm(ckpt, per_request_spec_decode_metrics="detailed")
    try:
        assert type(runner_model(llm)).__name__ == arch
        out = generate(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        close_llm(llm)
    model, _, settings = load_tidar(ckpt)
    assert settings.beta == beta
    dec = ReferenceDecoder(model, settings, max_len=512)
    for p, o in zip(prompts, out):
        ref = dec.generate(p, MAX_TOKENS, mode="tidar")
        m = o.outputs[0].spec_decode_metrics
        assert list(o.outputs[0].token_ids) == ref.token_ids
        assert 1 + len(m.per_step_accepted) == ref.num_forwards  # prefill (with its mask block) + drafting steps
        assert m.per_step_accepted == ref.accepted_drafts
