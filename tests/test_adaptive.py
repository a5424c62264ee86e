"""Adaptive drafting: the policy's cost and acceptance models, its K choice (K=0 where the
measured cost says drafting loses), and an engine whose K changes mid-run keeping output
identical to AR and the spec-decode metrics consistent."""

from __future__ import annotations

import pytest

from vllm_tidar.layout import DecodeLayout

pytest.importorskip("vllm")

from vllm_tidar.plugin.adaptive import Acceptance, DraftPolicy, StepCosts  # noqa: E402


def _costs(a_plain, a_tidar, per_token, n=200):
    """Steps costing ``a + per_token * tokens`` (no per-request term), TiDAR ones at L = 72 and 20."""
    c = StepCosts()
    steps = [(False, 1, 1), (False, 4, 4), (False, 16, 16), (True, 1, 72), (True, 4, 288), (True, 16, 1152),
             (True, 1, 20), (True, 4, 80)]
    for i in range(n):
        tidar, requests, tokens = steps[i % len(steps)]
        c.observe(tidar, requests, tokens, (a_tidar if tidar else a_plain) + per_token * tokens)
    return c


def test_step_costs_fit_measured_steps_and_skip_idle_gaps():
    c = _costs(4e-3, 6e-3, 2e-4)
    assert c.predict(False, 16, 16) == pytest.approx(4e-3 + 16 * 2e-4, rel=1e-2)
    assert c.coefficients == pytest.approx((4e-3, 2e-4, 6e-3, 0.0, 2e-4), rel=5e-2, abs=5e-5)  # the weak prior pulls a little
    assert c.predict(True, 8, 576) == pytest.approx(6e-3 + 576 * 2e-4, rel=1e-2)
    n = c.num_observed
    assert not c.observe(False, 1, 1, 5.0)  # the engine sat idle between two requests
    assert c.num_observed == n


def test_tidar_steps_cost_per_request_and_per_row():
    """Measured in bench runs 8-9 on the 2-core Xeon (per step, with the output processing): a
    plain step ~9.8 ms + 0.37 ms per request, a TiDAR step ~17.8 ms + 1.8 ms per request + 0.12
    ms per scheduled row. The fit learns both, and at batch 4 the policy keeps plain AR (Bl=4
    K=3 ran at 0.78-0.79x there). One slope per scheduled token for both kinds, fitted mostly
    from batch-1 steps, predicted that step ~25% too cheap and drafted where it lost."""
    c = StepCosts()
    for i in range(600):
        b = [1, 4, 16][i % 3]
        c.observe(False, b, b, 9.8e-3 + 0.37e-3 * b)
        for t in (20 * b, 72 * b):
            c.observe(True, b, t, 17.8e-3 + 1.8e-3 * b + 0.12e-3 * t)
    for b in (1, 4, 16):
        assert c.predict(False, b, b) == pytest.approx(9.8e-3 + 0.37e-3 * b, rel=1e-2)
        assert c.predict(True, b, 20 * b) == pytest.approx(17.8e-3 + 1.8e-3 * b + 0.12e-3 * 20 * b, rel=1e-2)
    acc = {4: Acceptance(3, prior=0.5)}
    acc[4].alpha, acc[4].num_observed = [0.72, 0.82, 0.84], 1000  # 2.8 tokens per step
    p = DraftPolicy(_layouts(4), costs=c, acceptance=acc)
    assert p.best(1)[0] == DecodeLayout(4, 3) and p.best(4)[0] is None and p.best(16)[0] is None


def test_measured_step_shapes_override_the_fit_and_tidar_is_never_below_plain():
    c = StepCosts()
    for _ in range(50):  # batch 1 only
        c.observe(False, 1, 1, 10e-3)
        c.observe(True, 1, 72, 20e-3)
        c.observe(True, 1, 20, 8e-3)
    # the TiDAR line through 20 and 72 rows goes under a plain step at 10 rows: floored there
    assert c.predict(True, 1, 10) == pytest.approx(c.predict(False, 1, 1))
    assert c.predict(True, 4, 80) < 30e-3  # batch 4 from batch-1 steps: the prior's per-request term
    for _ in range(c.measured_after):
        c.observe(True, 4, 80, 40e-3 + 1e-3)
    c.observe(True, 4, 80, 40e-3 - 4e-3)
    # measured often enough: the running mean of its own steps, whatever the fit says
    assert c.predict(True, 4, 80) == pytest.approx(40e-3, rel=1e-6)
    assert c.predict(True, 1, 20) == pytest.approx(8e-3, rel=1e-6)


def test_step_costs_learn_steps_far_above_the_prior():
    """A large model or a loaded machine: steps 20x what the prior predicts are the measurements
    (not outliers) until the fit has seen a few of each kind; then idle gaps are dropped again."""
    c = StepCosts()
    for _ in range(30):
        assert c.observe(False, 1, 1, 0.2)
        assert c.observe(True, 1, 20, 0.5)
    assert c.predict(False, 1, 1) == pytest.approx(0.2, rel=0.05)
    assert c.predict(True, 1, 20) == pytest.approx(0.5, rel=0.05)
    assert not c.observe(False, 1, 1, 5.0)


def test_plain_steps_do_not_erase_what_tidar_steps_cost():
    c = _costs(4e-3, 6e-3, 1e-4)
    tidar_20 = c.predict(True, 1, 20)
    for _ in range(2000):  # drafting off for a long while: only plain steps are measured
        c.observe(False, 1, 1, 4e-3 + 1e-4)
    assert c.predict(True, 1, 20) == pytest.approx(tidar_20, rel=1e-3)


def test_acceptance_is_the_sample_mean_early_on():
    """The prior counts as one outcome: after 9 outcomes (3 accepted) the rate is (0.5 + 3) / 10,
    not still mostly the prior as a plain forgetting average would leave it."""
    acc = Acceptance(2, prior=0.5, decay=0.99)
    for a in [1, 0, 0, 1, 0, 0, 1, 0, 0]:
        acc.observe(2, a)
    assert acc.alpha[0] == pytest.approx((0.5 + 3) / 10)
    assert acc.alpha[1] == pytest.approx((0.5 + 0) / 4)  # reached 3 times, never accepted


def test_acceptance_tracks_conditional_rates():
    acc = Acceptance(3, prior=0.5, decay=0.9)
    for _ in range(300):
        acc.observe(3, 1)  # always exactly one draft accepted
    assert acc.alpha[0] == pytest.approx(1.0, abs=1e-6) and acc.alpha[1] == pytest.approx(0.0, abs=1e-6)
    assert acc.alpha[2] == 0.5  # never reached: stays at the prior
    assert acc.expected_tokens(3) == pytest.approx(2.0, abs=1e-5)
    assert acc.expected_tokens(0) == 1.0


def _layouts(*bls, k_max=7):
    return [DecodeLayout(bl, k) for bl in bls for k in range(1, min(k_max, bl - 1) + 1)]


def _policy(per_token, alpha, warm=True, bls=(8,)):
    acc = {bl: Acceptance(bl - 1, prior=alpha) for bl in bls}
    for a in acc.values():
        a.num_observed = 1000 if warm else 0
    return DraftPolicy(_layouts(*bls), costs=_costs(4e-3, 6e-3, per_token), acceptance=acc)


def test_policy_turns_drafting_off_where_it_loses():
    # cheap extra tokens and good drafts: draft at batch 1; at batch 16 the long steps cost
    # more than their extra tokens bring: plain AR
    p = _policy(per_token=5e-5, alpha=0.8)
    assert p.choose(1) is not None
    assert p.choose(16) is None
    lay, rate, plain = p.best(1)
    assert rate > plain * p.margin
    # poor drafts never pay, even at batch 1
    assert _policy(per_token=5e-5, alpha=0.05).choose(1) is None


def test_policy_rerates_every_few_steps_and_when_its_cost_model_is_replaced():
    """Rating every layout is redone every ``refresh_every`` calls at a batch size (it costs
    more than the rest of a plain step's bookkeeping), so a change in the measured acceptance
    takes effect within that many steps; other batch sizes keep their own rating."""
    p = _policy(per_token=5e-5, alpha=0.8)
    assert p.refresh_every == 8
    assert p.choose(1) is not None and p.choose(16) is None
    for acc in p.acceptance.values():  # the drafts turn bad
        acc.alpha = [0.05] * len(acc.alpha)
    picks = [p.choose(1) for _ in range(p.refresh_every)]
    assert picks[0] is not None and picks[-1] is None, picks
    assert p.choose(16) is None
    for acc in p.acceptance.values():  # good again, and a new cost model: rated at once
        acc.alpha = [0.8] * len(acc.alpha)
    p.costs = _costs(4e-3, 6e-3, 5e-5)
    assert p.choose(1) is not None


def test_policy_picks_the_smaller_block_where_long_steps_cost_too_much():
    """Block length 8 drafts a little better, but its long steps cost too much next to a
    20-token step of block length 4: the policy serves block length 4."""
    p = _policy(per_token=1e-4, alpha=0.7, bls=(8, 4))
    p.acceptance[8].alpha = [0.75] * 7
    lay = p.choose(1)
    assert lay is not None and lay.block_len == 4, lay
    assert p.rate(lay, 1) > max(p.rate(x, 1) for x in p.layouts if x.block_len == 8)


def test_policy_drafts_first_then_probes_while_off():
    p = _policy(per_token=2e-4, alpha=0.3, warm=False, bls=(8, 4))
    first = p.choose(4)
    assert first == DecodeLayout(8, 7)  # no acceptance measured yet: draft to measure it
    p.acceptance[8].num_observed = 1000
    assert p.choose(4) == DecodeLayout(4, 3)  # then the other block length
    p.acceptance[4].num_observed = 1000
    picks = [p.choose(4) for _ in range(5000)]
    probes = [i for i, x in enumerate(picks) if x is not None]
    assert picks[0] is None and 0 < len(probes) <= 0.02 * len(picks) + 4
    assert all(picks[i + 1] == picks[i] for i in probes[::2])  # probes come in pairs
    assert {picks[i].block_len for i in probes} == {8, 4}  # taking turns


def test_policy_spaces_probes_out_while_they_confirm_plain_ar():
    """Each probe pair that still finds plain AR faster doubles the gap to the next one at that
    batch size, up to ``max_backoff``; once drafting wins there the gap starts over."""
    p = _policy(per_token=2e-4, alpha=0.3, bls=(4,))
    assert p.max_backoff == 4
    picks = [p.choose(4) for _ in range(12000)]
    starts = [i for i, x in enumerate(picks) if x is not None][::2]  # first step of each pair
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 3
    unit = starts[0]  # plain steps before the first probe: the interval without backoff
    assert [round(g / unit) for g in gaps[:3]] == [2, 4, 4]
    slow = p.costs
    p.costs, p.acceptance[4].alpha = _costs(4e-3, 4e-3, 1e-6), [0.95] * 3  # now drafting wins at batch 4
    assert [p.choose(4) for _ in range(3)][-1] == DecodeLayout(4, 3)  # (the first may end a probe pair)
    p.costs, p.acceptance[4].alpha = slow, [0.3] * 3
    picks = [p.choose(4) for _ in range(2 * unit + 10)]
    # (the first pick may finish a pair begun before the switch)
    first = next(i for i in range(1, len(picks)) if picks[i] is not None and picks[i - 1] is None)
    assert abs(first - unit) <= 2  # the first probe after that comes after one plain interval


def test_policy_measures_plain_steps_before_trusting_and_while_drafting():
    """A plain cost fitted from one slow plain step (say, the first after start) would keep
    drafting on where it loses: the policy first takes plain steps until the fit has
    ``trust_after`` of them, and while it drafts one step in ``1 / probe_overhead`` is plain."""
    costs = StepCosts()
    for _ in range(50):
        costs.observe(True, 1, 20, 12e-3)
    costs.observe(False, 1, 1, 11e-3)  # one slow plain step: fit says a plain step costs ~11 ms
    acc = {4: Acceptance(3, prior=0.7)}
    acc[4].num_observed = 1000
    p = DraftPolicy(_layouts(4), costs=costs, acceptance=acc)
    assert p.best(4)[0] is not None  # on that fit, drafting looks better at batch 4
    picks = []
    for _ in range(costs.trust_after - 1):  # the proposer feeds back each measured step
        picks.append(p.choose(4))
        costs.observe(False, 4, 4, 5e-3)
    assert picks == [None] * (costs.trust_after - 1)
    assert p.choose(4) is None  # real plain steps (5 ms for 4 tokens): drafting loses
    # where drafting wins (batch 1), about 2% of the steps stay plain
    picks = [p.choose(1) for _ in range(1000)]
    plain = sum(x is None for x in picks)
    assert all(x == DecodeLayout(4, 3) for x in picks if x is not None) and 10 <= plain <= 30


def _trained_policy():
    """A policy that has measured plain AR winning at batch 4 and drafting winning at batch 1."""
    p = _policy(per_token=2e-4, alpha=0.3, bls=(8, 4))
    for bl in (8, 4):
        p.acceptance[bl] = Acceptance(bl - 1, prior=0.6)
        for i in range(400):
            p.acceptance[bl].observe(bl - 1, i % bl)
    p._backoff[4] = 2
    return p


def test_policy_state_round_trips_and_a_restored_policy_needs_no_warmup():
    import json

    p = _trained_policy()
    state = json.loads(json.dumps(p.state()))  # what the cache file holds
    q = DraftPolicy(_layouts(8, 4))
    assert q.choose(4) == DecodeLayout(8, 7)  # cold: drafts to measure acceptance first
    q = DraftPolicy(_layouts(8, 4))
    q.load_state(state)
    assert q.state() == json.loads(json.dumps(p.state()))
    assert q.costs.coefficients == pytest.approx(p.costs.coefficients)
    for b in (1, 2, 4, 8, 16):
        assert q.best(b) == p.best(b)
        assert q.costs.predict(True, b, 20 * b) == p.costs.predict(True, b, 20 * b)
    assert q.choose(4) == p.choose(4) is None  # no warm-up: plain AR at batch 4 right away
    assert q._backoff == {4: 2}
    # a state for fewer block lengths: the missing one starts cold, the rest is taken
    state["acceptance"].pop("4")
    r = DraftPolicy(_layouts(8, 4))
    r.load_state(state)
    assert r.acceptance[4].num_observed == 0 and r.acceptance[8].alpha == p.acceptance[8].alpha


def test_malformed_policy_state_leaves_the_policy_as_it_was():
    p = _trained_policy()
    state = p.state()
    state["costs"]["sums"]["tidar"]["y"] = [1.0, 2.0]  # wrong shape
    q = DraftPolicy(_layouts(8, 4))
    before = q.state()
    with pytest.raises(ValueError):
        q.load_state(state)
    assert q.state() == before


def _cache(folder, **identity):
    from vllm_tidar.plugin.policy_cache import PolicyCache

    ident = {"machine": {"cpu": "x"}, "checkpoint": {"model": "/ckpt/demo"}, "engine": {"dtype": "float32"}}
    ident.update(identity)
    return PolicyCache(folder, ident)


def test_policy_cache_saves_restores_and_keys_by_identity(tmp_path):
    p = _trained_policy()
    c = _cache(tmp_path)
    c.save(p)
    assert c.path.parent == tmp_path and c.path.name.startswith("demo-") and c.path.suffix == ".json"
    q = DraftPolicy(_layouts(8, 4))
    assert _cache(tmp_path).restore(q)
    assert q.state() == p.state()
    other = _cache(tmp_path, machine={"cpu": "y"})  # another machine: another file, cold
    assert other.path != c.path and not other.restore(DraftPolicy(_layouts(8, 4)))
    # saves only every save_every seconds, and only after new measurements
    mtime = c.path.stat().st_mtime_ns
    c.maybe_save(p, now=c._saved_at + 1e6)
    assert c.path.stat().st_mtime_ns == mtime  # nothing new measured
    p.costs.observe(False, 4, 4, 5e-3)
    c.maybe_save(p, now=c._saved_at + 1)
    assert _cache(tmp_path).restore(q) and q.costs.num_observed == p.costs.num_observed - 1
    c.maybe_save(p, now=c._saved_at + c.save_every)
    assert _cache(tmp_path).restore(q) and q.costs.num_observed == p.costs.num_observed
    assert not list(tmp_path.glob(".*.tmp"))


def test_policy_cache_ignores_a_bad_file_and_survives_an_unwritable_folder(tmp_path, caplog):
    import logging

    # vLLM's logging config stops the "vllm" logger propagating to pytest's root handler once an
    # engine has run in this process: listen on it directly
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(caplog.handler)
    try:
        _bad_file_and_unwritable_folder(tmp_path, caplog)
    finally:
        vllm_logger.removeHandler(caplog.handler)


def _bad_file_and_unwritable_folder(tmp_path, caplog):
    import logging

    c = _cache(tmp_path)
    tmp_path.joinpath(c.path.name).write_text("{not json")
    q = DraftPolicy(_layouts(8, 4))
    before = q.state()
    with caplog.at_level(logging.WARNING, logger="vllm"):
        assert not c.restore(q)
    assert q.state() == before and "ignoring the cached policy" in caplog.text
    c.save(_trained_policy())  # the next save replaces it
    assert _cache(tmp_path).restore(q)
    blocked = tmp_path / "file"
    blocked.write_text("")
    bad = _cache(blocked / "sub")  # its folder cannot be made
    with caplog.at_level(logging.WARNING, logger="vllm"):
        bad.save(_trained_policy())
    assert "cannot write the policy cache" in caplog.text and not bad.path.exists()


def test_policy_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    from vllm_tidar.plugin.policy_cache import cache_dir

    monkeypatch.setenv("VLLM_TIDAR_POLICY_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    for off in ("0", "off"):
        monkeypatch.setenv("VLLM_TIDAR_POLICY_CACHE", off)
        assert cache_dir() is None
    monkeypatch.delenv("VLLM_TIDAR_POLICY_CACHE")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "root"))
    assert cache_dir() == tmp_path / "root" / "tidar_policy"


def test_fixed_schedule_overrides_the_policy():
    seven, three = DecodeLayout(8, 7), DecodeLayout(8, 3)
    p = DraftPolicy(_layouts(8), schedule=[None, seven, three, three, None])
    assert [p.choose(b) for b in (1, 2, 3, 4, 9)] == [seven, three, three, None, None]


def _ar_outputs(ckpt, prompts, sampling):
    """Greedy token ids of the same checkpoint served as plain AR (the lossless reference)."""
    from vllm_helpers import close_llm, make_llm, token_ids

    llm = make_llm(ckpt, hf_overrides={"tidar_mode": "ar"})
    try:
        return token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False))
    finally:
        close_llm(llm)


@pytest.mark.slow
def test_engine_k_changes_with_batch_size_output_equals_ar_metrics_consistent():
    """Requests of different lengths finish one by one, so the batch shrinks 4 -> 1 and a
    schedule moves K 0 -> 1 -> 2 -> 3: output stays AR's, every drafting step counts its own
    K, engine and per-request counters agree, and the K=0 steps (no drafts in the batch)
    run vLLM's plain sampler on one logits row per request, not the rejection sampler.
    After the proposer chose a plain step the model skips step detection, and it detects
    TiDAR steps again once drafts come back."""
    from vllm import SamplingParams

    from vllm_helpers import close_llm, make_llm, prompt_set, runner, runner_model, tiny_checkpoint, token_ids

    ckpt = tiny_checkpoint(block_length=4)
    prompts = prompt_set(ckpt, 4, seed=3)
    lengths = [12, 24, 36, 60]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    want = _ar_outputs(ckpt, prompts, params)
    sched = [[1, 1, 3], [2, 2, 2], [3, 3, 1], [4, 8, 0]]
    llm = make_llm(ckpt, per_request_spec_decode_metrics="detailed",
                   speculative_config={"method": "tidar", "num_speculative_tokens": 3,
                                       "num_speculative_tokens_per_batch_size": sched})
    engine = runner(llm)
    samples = []  # per sampled step: (spec metadata?, logits rows, requests)
    orig_sample = engine._sample
    engine._sample = lambda logits, md: (samples.append((md is not None, logits.shape[0], engine.input_batch.num_reqs)),
                                         orig_sample(logits, md))[1]
    model = runner_model(llm)
    forwards = []  # per forward: (step detection ran, a TiDAR step was detected)
    orig_prepare = model._tidar_prepare

    def prepare(input_ids, positions):
        expected = model._tidar_state.expect
        out = orig_prepare(input_ids, positions)
        last = model.tidar_last_step()
        forwards.append((expected, last is not None and bool(last.tidar.any())))
        return out

    model._tidar_prepare = prepare
    try:
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        close_llm(llm)
    assert token_ids(out) == want
    plain = [s for s in samples if s[2] == 4]
    assert len(plain) >= 10 and all(not spec and rows == 4 for spec, rows, _ in plain), plain
    assert any(spec for spec, _, n in samples if n < 4)
    assert len(forwards) == len(samples)
    assert [found for _, found in forwards] == [spec for spec, _, _ in samples]  # every drafting step detected
    assert sum(not ran for ran, _ in forwards) >= len(plain) - 1  # plain steps after the first skip detection
    steps = [o.outputs[0].spec_decode_metrics for o in out]
    seen = set().union(*(set(m.per_step_drafted) for m in steps))
    assert seen == {1, 2, 3}, seen
    for m in steps:
        assert all(a <= d for a, d in zip(m.per_step_accepted, m.per_step_drafted))
    assert sum(m.num_draft_tokens for m in steps) == metrics["vllm:spec_decode_num_draft_tokens"].value
    assert sum(sum(m.per_step_drafted) for m in steps) == metrics["vllm:spec_decode_num_draft_tokens"].value
    assert sum(len(m.per_step_accepted) for m in steps) == metrics["vllm:spec_decode_num_drafts"].value
    assert sum(sum(m.per_step_accepted) for m in steps) == metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    assert [sum(a > i for m in steps for a in m.per_step_accepted) for i in range(3)] == per_pos


@pytest.mark.slow
def test_engine_adaptive_default_is_lossless(tmp_path, monkeypatch):
    """The product default (adaptive, K chosen from measured costs) on a mixed-length batch:
    greedy output identical to AR; what the policy measured is cached for this machine and
    checkpoint, and a proposer built again for the engine restores it."""
    from vllm import SamplingParams

    from vllm_helpers import close_llm, generate, make_llm, prompt_set, runner, tiny_checkpoint, token_ids

    ckpt = tiny_checkpoint(block_length=4)
    prompts = prompt_set(ckpt, 6, seed=4)
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = _ar_outputs(ckpt, prompts, sp)
    monkeypatch.setenv("VLLM_TIDAR_POLICY_CACHE", str(tmp_path))
    llm = make_llm(ckpt, adaptive=True)
    try:
        engine = runner(llm)
        drafter = engine.drafter
        assert drafter.policy.schedule is None
        assert drafter.cache is not None and not drafter.cache.path.exists()  # a cold start
        got = token_ids(generate(llm, prompts, sp))
        assert drafter.policy.costs.num_observed > 0 and drafter.policy.acceptance[4].num_observed > 0
        drafter.cache.save(drafter.policy)  # (what the exit hook does)
        # an engine started again on this machine with this checkpoint starts where this one stopped
        from vllm_tidar.plugin.proposer import TiDARProposer

        again = TiDARProposer(engine.vllm_config)
        assert again.cache.path == drafter.cache.path
        assert again.policy.state() == drafter.policy.state()
    finally:
        close_llm(llm)
    assert got == want
    assert drafter.policy.layouts == [DecodeLayout(4, k) for k in (3, 2, 1)]
    ident = __import__("json").loads(drafter.cache.path.read_text())["identity"]
    assert ident["checkpoint"]["model"] == str(ckpt.resolve()) and ident["engine"]["block_length"] == 4


@pytest.mark.slow
def test_engine_switches_block_length_lossless():
    """A checkpoint trained with block lengths 4 and 2: adaptive drafting measures both
    (block length 4, then 2, while warming up) and whatever it then picks, greedy output is
    AR's and every drafting step counts the K of its own layout (3 or 1)."""
    from vllm import SamplingParams

    from vllm_helpers import close_llm, generate, make_llm, prompt_set, runner_model, tiny_checkpoint, token_ids

    ckpt = tiny_checkpoint(block_length=4, block_lengths=(2,))
    prompts = prompt_set(ckpt, 6, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = _ar_outputs(ckpt, prompts, sp)
    llm = make_llm(ckpt, adaptive=True, per_request_spec_decode_metrics="detailed")
    try:
        model = runner_model(llm)
        seen = []
        orig = model.tidar_use_layout
        model.tidar_use_layout = lambda lay: (seen.append(lay.block_len if lay else 0), orig(lay))
        out = generate(llm, prompts, sp)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        close_llm(llm)
    assert token_ids(out) == want
    assert seen[0] == 4 and 2 in seen  # (0: a plain step next)
    steps = [o.outputs[0].spec_decode_metrics for o in out]
    assert set().union(*(set(m.per_step_drafted) for m in steps)) <= {1, 3}
    assert sum(m.num_draft_tokens for m in steps) == metrics["vllm:spec_decode_num_draft_tokens"].value
