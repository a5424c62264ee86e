"""The profiler's block-length recommendation: pure functions over measured latency curves."""

from __future__ import annotations

import math
import statistics

from vllm_tidar.layout import DecodeLayout

DEFAULT_TOLERANCE = 0.10
STATS = {"median": statistics.median, "min": min}


def tidar_query_tokens(block_length: int) -> int:
    """L, the query tokens per request of a full TiDAR step (``Bl * (1 + Bl)``, full K)."""
    return DecodeLayout(block_length).num_tokens


def isotonic_fit(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool-adjacent-violators) of ``values`` in order.

    Forward latency cannot really fall when query tokens are added, so a dip is noise;
    pooling it with its neighbours keeps one noisy point from either cutting the
    recommendation short (a spike) or stretching it (a low baseline)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out.extend([s / n] * int(n))
    return out


def _interp(x: float, xs: list[int], ys: list[float]) -> float | None:
    """Linear interpolation of ``ys(xs)`` at ``x`` (``xs`` increasing); None outside."""
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            if xs[i + 1] == xs[i]:
                return ys[i]
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return ys[-1]


def recommend_block_length(
    query_tokens,
    latencies,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    interpolate: bool = True,
    monotone: bool = True,
    stat: str = "median",
) -> dict:
    """Largest block length whose TiDAR step stays within ``tolerance`` of a 1-token forward.

    ``query_tokens``: the measured ``q`` values (must include 1); ``latencies``: per ``q``,
    a latency or a list of repeated samples (reduced with ``stat``: ``"median"`` (default) or
    ``"min"``). Rules:

    * noise: medians (or minima) first, then (``monotone=True``) a non-decreasing least-squares fit
      (``isotonic_fit``); the baseline is the fit at ``q = 1``;
    * ``Bl`` qualifies if ``fit(Bl*(1+Bl)) <= (1 + tolerance) * fit(1)``; a tie (exactly on
      the threshold, up to 1e-9 relative) qualifies;
    * the answer is the last ``Bl`` of the unbroken run of qualifying ``Bl = 2, 3, ...``
      (with the monotone fit this is simply the largest qualifying one);
    * ``q = Bl*(1+Bl)`` off the grid: ``interpolate=True`` (default) interpolates the fit
      linearly between the two neighbouring grid points (forward cost is close to
      piecewise linear in ``q``); ``interpolate=False`` only considers ``Bl`` whose ``L`` was
      measured. Never extrapolated: ``L`` above the largest ``q`` is not considered, so the
      grid caps the answer (``max_block_length``).

    Returns a dict: ``block_length`` (None if not even ``Bl = 2`` qualifies), ``L``,
    ``baseline_ms``, ``threshold_ms``, ``latency_at_L_ms`` (fitted), ``ratio``,
    ``measured`` (``L`` is a grid point), ``max_block_length`` (largest ``Bl`` the grid can
    judge), ``capped`` (the answer is the grid's limit, the true one may be larger),
    ``candidates`` (every ``Bl`` considered with its ``L``, fitted latency, ratio, ok) and
    ``fit`` (the fitted curve, per grid point).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pairs = sorted(zip(query_tokens, latencies), key=lambda p: p[0])
    qs = [int(q) for q, _ in pairs]
    if len(set(qs)) != len(qs):
        raise ValueError(f"duplicate query-token counts in {qs}")
    if not qs or qs[0] != 1:
        raise ValueError("the grid must include q = 1 (the baseline)")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {sorted(STATS)}, got {stat!r}")
    meds = []
    for q, lat in pairs:
        v = STATS[stat](lat) if isinstance(lat, (list, tuple)) else float(lat)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"latency at q={q} must be a positive number, got {v}")
        meds.append(v)
    fit = isotonic_fit(meds) if monotone else list(meds)
    base = fit[0]
    threshold = (1.0 + tolerance) * base
    grid = set(qs)
    candidates = []
    best = None
    max_bl = None
    bl = 2
    while tidar_query_tokens(bl) <= qs[-1]:
        big_l = tidar_query_tokens(bl)
        measured = big_l in grid
        if measured:
            lat = fit[qs.index(big_l)]
        elif interpolate:
            lat = _interp(big_l, qs, fit)
        else:
            bl += 1
            continue
        max_bl = bl
        ok = lat <= threshold * (1 + 1e-9)
        candidates.append(dict(block_length=bl, L=big_l, latency_ms=lat, ratio=lat / base, ok=ok, measured=measured))
        bl += 1
    for c in candidates:  # unbroken run from the smallest Bl
        if not c["ok"]:
            break
        best = c
    return dict(
        block_length=best["block_length"] if best else None,
        L=best["L"] if best else None,
        baseline_ms=base,
        threshold_ms=threshold,
        latency_at_L_ms=best["latency_ms"] if best else None,
        ratio=best["ratio"] if best else None,
        measured=best["measured"] if best else None,
        max_block_length=max_bl,
        capped=best is not None and best["block_length"] == max_bl,
        tolerance=tolerance,
        stat=stat,
        candidates=candidates,
        fit={q: f for q, f in zip(qs, fit)},
    )


def overall_recommendation(per_setting: dict, target=None) -> dict:
    """Overall block length from per-setting recommendations ``{(ctx, batch): rec}``.

    ``target=(ctx, batch)``: that setting's answer. Otherwise the most conservative one
    (smallest block length; a setting with none gives none)."""
    if not per_setting:
        raise ValueError("no settings measured")
    if target is not None:
        target = tuple(target)
        if target not in per_setting:
            raise ValueError(f"setting {target} was not measured (have {sorted(per_setting)})")
        rec = per_setting[target]
        return dict(block_length=rec["block_length"], L=rec["L"], setting=list(target), rule="named setting")
    key = min(per_setting, key=lambda k: (-1 if per_setting[k]["block_length"] is None else per_setting[k]["block_length"], k))
    rec = per_setting[key]
    return dict(block_length=rec["block_length"], L=rec["L"], setting=list(key), rule="most conservative over all settings")


def analyse(points: dict, tolerance: float, interpolate: bool = True, target=None, stat: str = "median") -> dict:
    """Per-setting and overall recommendations from ``{(ctx, b, q): {"samples_ms": ...}}``."""
    settings = sorted({(c, b) for c, b, _ in points})
    per = {}
    for ctx, b in settings:
        qs = sorted(q for c, bb, q in points if (c, bb) == (ctx, b))
        per[(ctx, b)] = recommend_block_length(qs, [points[(ctx, b, q)]["samples_ms"] for q in qs], tolerance,
                                               interpolate=interpolate, stat=stat)
    return dict(per_setting=per, overall=overall_recommendation(per, target))
