"""Accounting for ``vllm-tidar bench`` and ``vllm-tidar demo``: per-request records from vLLM's
outputs, and pure functions over them (no vLLM import).

Conventions (one request, ``n`` output tokens, greedy):
* a *forward* is one target-model step: the prefill (it yields the first token) plus every
  decode step; a decode step with drafts is a *verify step* and yields ``1 + a`` tokens
  (``a`` accepted drafts + the bonus token), a decode step without drafts yields 1 token;
* ``per_step_accepted`` / ``per_step_drafted`` are vLLM's per-request detailed spec-decode
  metrics (one entry per verify step). ``drafted`` may count TiDAR's mask slots as drafts; the
  accounting here only looks at the first ``k`` positions, so it is right either way;
* the last verify step may accept more drafts than ``max_tokens`` lets through (vLLM trims the
  output afterwards), so draft-less steps are ``max(0, (n - 1) - sum(1 + a))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def in_turn(items: list, turn: int) -> list:
    """``items`` starting at ``turn % len(items)`` and wrapping round: the order in which the
    engines of an A/B run take batch ``turn``, so no engine always runs first or after the same
    other one."""
    k = turn % len(items) if items else 0
    return items[k:] + items[:k]


def request_record(index: int, out) -> dict:
    """The record of one finished ``vllm.RequestOutput`` (prompt ``index``) that the functions below read."""
    comp = out.outputs[0]
    m = out.metrics
    sd = comp.spec_decode_metrics
    return {
        "prompt": index,
        "token_ids": list(comp.token_ids),
        "num_tokens": len(comp.token_ids),
        "ttft": getattr(m, "first_token_latency", None),
        "first_token_ts": getattr(m, "first_token_ts", 0.0),
        "last_token_ts": getattr(m, "last_token_ts", 0.0),
        "per_step_accepted": list(sd.per_step_accepted) if sd is not None else [],
        "per_step_drafted": list(sd.per_step_drafted) if sd is not None else [],
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if len(values) else None


def tokens_per_s(num_tokens: int, seconds: float) -> float:
    """Output tokens per wall-clock second."""
    if seconds <= 0:
        raise ValueError(f"elapsed time must be positive, got {seconds}")
    return num_tokens / seconds


def request_tpot(first_token_ts: float, last_token_ts: float, num_tokens: int) -> float | None:
    """Time per output token after the first: (last - first) / (n - 1); None for n < 2."""
    if num_tokens < 2:
        return None
    return (last_token_ts - first_token_ts) / (num_tokens - 1)


def request_forwards(num_tokens: int, per_step_accepted: Sequence[int] = ()) -> int:
    """Target forwards that produced ``num_tokens`` tokens: prefill + verify steps + draft-less steps."""
    if num_tokens <= 0:
        return 0
    from_verify = sum(1 + a for a in per_step_accepted)
    plain = max(0, (num_tokens - 1) - from_verify)
    return 1 + len(per_step_accepted) + plain


def tokens_per_forward(num_tokens: int, num_forwards: int) -> float | None:
    return num_tokens / num_forwards if num_forwards else None


def mean_acceptance_length(per_step_accepted_lists: Sequence[Sequence[int]]) -> float | None:
    """vLLM's definition: 1 + mean accepted drafts per verify step (tokens per verify step)."""
    steps = [a for lst in per_step_accepted_lists for a in lst]
    return 1.0 + sum(steps) / len(steps) if steps else None


def acceptance_per_position(
    per_step_accepted_lists: Sequence[Sequence[int]],
    k: int,
    per_step_drafted_lists: Sequence[Sequence[int]] | None = None,
) -> list[float | None]:
    """Rate at which draft position i (1..k) is accepted: steps with ``a >= i`` over steps that
    drafted at least ``i`` tokens (all steps when ``drafted`` is not given). Greedy verification
    accepts a prefix, so the rates are non-increasing in i."""
    hits = [0] * k
    tries = [0] * k
    for r, accepted in enumerate(per_step_accepted_lists):
        drafted = per_step_drafted_lists[r] if per_step_drafted_lists is not None else None
        for s, a in enumerate(accepted):
            d = min(k, drafted[s]) if drafted is not None else k
            for i in range(d):
                tries[i] += 1
                hits[i] += a > i
    return [h / t if t else None for h, t in zip(hits, tries)]


def acceptance_histogram(per_step_accepted_lists: Sequence[Sequence[int]], k: int) -> list[int]:
    """Counts of verify steps by accepted drafts 0..k (so tokens per step 1..k+1)."""
    hist = [0] * (k + 1)
    for lst in per_step_accepted_lists:
        for a in lst:
            hist[min(a, k)] += 1
    return hist


def summarize(requests: Sequence[dict], seconds: float, k: int = 0) -> dict:
    """One table row from one (method, batch size) run.

    ``requests``: dicts with ``num_tokens``, ``ttft`` (s), ``first_token_ts``, ``last_token_ts``
    and, for speculative methods, ``per_step_accepted`` / ``per_step_drafted``. ``seconds``: wall
    time of the whole run (all batches). ``k``: draft positions to report (0 for plain AR).
    """
    n_tokens = sum(r["num_tokens"] for r in requests)
    tpots = [t for r in requests if (t := request_tpot(r["first_token_ts"], r["last_token_ts"], r["num_tokens"])) is not None]
    ttfts = [r["ttft"] for r in requests if r.get("ttft") is not None]
    accepted = [r.get("per_step_accepted") or [] for r in requests]
    drafted = [r.get("per_step_drafted") or [k] * len(a) for r, a in zip(requests, accepted)]
    forwards = sum(request_forwards(r["num_tokens"], a) for r, a in zip(requests, accepted))
    ms = lambda x: None if x is None else 1000.0 * x  # noqa: E731
    return {
        "requests": len(requests),
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s(n_tokens, seconds),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tpot_p95_ms": ms(percentile(tpots, 95)),
        "ttft_mean_ms": ms(mean(ttfts)),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "forwards": forwards,
        "tokens_per_forward": tokens_per_forward(n_tokens, forwards),
        "verify_steps": sum(len(a) for a in accepted),
        # decode steps (forwards after the prefill) that verified drafts
        "drafting_share": (sum(len(a) for a in accepted) / (forwards - len(requests))) if k and forwards > len(requests) else None,
        "mean_drafted": mean([d for lst in drafted for d in lst]) if k else None,
        "mean_acceptance_length": mean_acceptance_length(accepted),
        "acceptance_per_position": acceptance_per_position(accepted, k, drafted) if k else [],
        "acceptance_histogram": acceptance_histogram(accepted, k) if k else [],
    }


def identical_count(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> int:
    """How many outputs equal the reference outputs (same prompt order)."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs vs {len(reference)} reference outputs")
    return sum(list(a) == list(b) for a, b in zip(outputs, reference))
