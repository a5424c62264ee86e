"""Where speculative decoding meets its limits on a TiDAR engine (demo checkpoint, K = 7):
a request near ``max_model_len`` next to short ones, ``logprob_token_ids`` (refused with a
one-line error), structured outputs. Output stays AR-identical and the spec-decode metrics
count exactly the drafts that were verified."""

from __future__ import annotations

import pytest

from vllm_helpers import MAX_MODEL_LEN, close_llm, demo_checkpoint, generate, make_llm, prompt_set, token_ids

pytestmark = pytest.mark.slow

K = 7
MAX_TOKENS = 40
LONG = MAX_MODEL_LEN - MAX_TOKENS + 2  # ends at max_model_len: within K + 8*(K+1) slots of it throughout


@pytest.fixture(scope="module")
def demo():
    path = demo_checkpoint()
    if path is None:
        pytest.skip("demo checkpoint not present")
    return path


STRUCTURED_PROMPT = 'config = {"name": "'


def _structured_params():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams as S

    kinds = [S(json_object=True), S(json={"type": "object", "properties": {"name": {"type": "string"}}}),
             S(regex=r"[a-z_]+\(\d+\)"), S(choice=["alpha", "beta", "gamma"])]
    return [SamplingParams(temperature=0, max_tokens=48, structured_outputs=so) for so in kinds]


def _counts(llm) -> dict[str, object]:
    m = {x.name: x for x in llm.get_metrics()}
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    out: dict[str, object] = {n: m[f"vllm:spec_decode_{n}"].value if f"vllm:spec_decode_{n}" in m else 0 for n in names}
    pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    out["per_pos"] = list(pos.values) if pos is not None else [0] * K
    return out


def _delta(a, b):
    return {k: ([y - x for x, y in zip(a[k], b[k])] if isinstance(b[k], list) else b[k] - a[k]) for k in b}


def _error_of(llm, sp):
    try:
        llm.generate(["x = 1"], sp, use_tqdm=False)
    except Exception as e:  # noqa: BLE001  (the test checks type and message)
        return e
    return None


@pytest.fixture(scope="module")
def runs(demo):
    """AR and TiDAR outputs of (a) one long prompt + 3 short ones in one batch, (b) one
    request per structured-output kind; on TiDAR also the short prompts alone, the metric
    deltas of (a) and (b), and the logprob requests."""
    from vllm import SamplingParams

    prompts = prompt_set(demo, 1, seed=2, min_len=LONG, max_len=LONG) + prompt_set(demo, 3, seed=4, min_len=20, max_len=40)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    structured = _structured_params()
    res = {}
    llm = make_llm(demo, hf_overrides={"tidar_mode": "ar"})
    try:
        res["ar_near"] = generate(llm, prompts, sp)
        res["ar_structured"] = llm.generate([STRUCTURED_PROMPT] * len(structured), structured, use_tqdm=False)
    finally:
        close_llm(llm)
    llm = make_llm(demo, per_request_spec_decode_metrics="detailed")
    try:
        c0 = _counts(llm)
        res["tidar_near"] = generate(llm, prompts, sp)
        c1 = _counts(llm)
        res["short_alone"] = generate(llm, prompts[1:], sp)
        c2 = _counts(llm)
        res["tidar_structured"] = llm.generate([STRUCTURED_PROMPT] * len(structured), structured, use_tqdm=False)
        res["near_metrics"], res["structured_metrics"] = _delta(c0, c1), _delta(c2, _counts(llm))
        res["logprob_ids_error"] = _error_of(llm, SamplingParams(max_tokens=4, logprobs=1, logprob_token_ids=[5]))
        res["topk_logprobs"] = llm.generate(["x = 1"], SamplingParams(max_tokens=4, logprobs=2, temperature=0), use_tqdm=False)
    finally:
        close_llm(llm)
    return res


@pytest.fixture(scope="module")
def near_limit(runs):
    return token_ids(runs["ar_near"]), runs["tidar_near"], runs["near_metrics"], runs["short_alone"]


def test_near_max_model_len_output_equals_ar(near_limit):
    want, out, _, _ = near_limit
    assert len(want[0]) == MAX_MODEL_LEN - LONG  # the long request really runs into max_model_len
    assert token_ids(out) == want


def test_short_requests_keep_drafting_next_to_a_long_one(near_limit):
    """The short requests draft and accept exactly as they do without the long neighbour (vLLM
    alone would hand every request token-0 drafts once the long one is within 71 slots of
    max_model_len). Every decode step after the first is a full TiDAR step with K real drafts:
    tokens = prefill (with its mask block) + sum(1 + accepted) over drafting steps."""
    _, out, _, alone = near_limit
    for o, a in zip(out[1:], alone):
        m, m_alone = o.outputs[0].spec_decode_metrics, a.outputs[0].spec_decode_metrics
        assert (m.per_step_drafted, m.per_step_accepted) == (m_alone.per_step_drafted, m_alone.per_step_accepted)
        assert sum(m.per_step_accepted) > 0
    for o in out[1:]:
        m = o.outputs[0].spec_decode_metrics
        n = len(o.outputs[0].token_ids)
        assert m.per_step_drafted and set(m.per_step_drafted) == {K}
        sampled = 1 + len(m.per_step_accepted) + sum(m.per_step_accepted)
        assert n == MAX_TOKENS and sampled - (1 + m.per_step_accepted[-1]) < n <= sampled


def test_metrics_count_only_verified_drafts(near_limit):
    """The long request's steps are cut by max_model_len: they verify fewer than K drafts and
    count just those; engine counters are the sum of the per-request ones."""
    _, out, metrics, _ = near_limit
    steps = [o.outputs[0].spec_decode_metrics for o in out]
    long = steps[0]
    assert all(1 <= d <= K for d in long.per_step_drafted)
    assert all(a <= d for a, d in zip(long.per_step_accepted, long.per_step_drafted))
    _assert_engine_equals_requests(metrics, steps)


def _assert_engine_equals_requests(metrics, steps):
    assert metrics["num_drafts"] == sum(len(m.per_step_drafted) for m in steps)
    assert metrics["num_draft_tokens"] == sum(m.num_draft_tokens for m in steps) == sum(sum(m.per_step_drafted) for m in steps)
    assert metrics["num_accepted_tokens"] == sum(sum(m.per_step_accepted) for m in steps)
    assert metrics["per_pos"] == [sum(a > i for m in steps for a in m.per_step_accepted) for i in range(K)]


def test_structured_outputs_equal_ar(runs):
    assert token_ids(runs["tidar_structured"]) == token_ids(runs["ar_structured"])


def test_structured_outputs_draft_what_the_grammar_accepts(runs):
    """vLLM's grammar check cuts each step's drafts (MASK slots included) at the first token the
    grammar refuses: JSON requests draft (inside strings the grammar accepts the drafts and the
    MASK slots); regex and choice ones here draft at most in their first decode step (the
    prefill block's leading drafts up to the first refused token: a cut step, after which the
    drafts are all MASK, which these grammars refuse). Metrics count the drafts verified."""
    steps = [o.outputs[0].spec_decode_metrics for o in runs["tidar_structured"]]
    json_object, json_schema, regex, choice = steps
    assert len(json_object.per_step_drafted) > 1 and len(json_schema.per_step_drafted) > 1
    assert len(regex.per_step_drafted) <= 1 and len(choice.per_step_drafted) <= 1
    for m in steps:
        assert all(1 <= d <= K for d in m.per_step_drafted)
        assert all(a <= d for a, d in zip(m.per_step_accepted, m.per_step_drafted))
    _assert_engine_equals_requests(runs["structured_metrics"], steps)


def test_logprob_token_ids_refused_in_one_line(runs):
    """vLLM's spec-decode sampler ignores logprob_token_ids (a 500 in the server): refused
    up front like min_p (patch spec_refuse_logprob_token_ids); top-k logprobs still work."""
    from vllm.exceptions import VLLMValidationError

    err = runs["logprob_ids_error"]
    assert isinstance(err, VLLMValidationError)
    assert "logprob_token_ids sampling parameter is not yet supported with speculative decoding" in str(err)
    assert "\n" not in str(err)
    assert len(runs["topk_logprobs"][0].outputs[0].logprobs) == 4
