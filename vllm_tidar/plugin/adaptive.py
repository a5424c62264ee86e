"""Adaptive drafting: for each engine step, the TiDAR layout (block length, drafts per
request K) or a plain AR step that gives the most tokens per second at the current batch
size, from step costs and draft acceptance measured while serving.

* ``StepCosts`` fits engine-step seconds online, ``c = a_plain + b_plain*R`` for plain steps
  and ``a_tidar + r_tidar*R + b_tidar*T`` for TiDAR steps (``R`` requests, ``T`` tokens
  scheduled in the step), by exponentially forgetting least squares with a weak prior, and
  the running mean of each step shape measured often enough. The proposer feeds it the wall
  time between its own calls (one call per engine step), skipping steps whose batch changed.
* ``Acceptance`` keeps, per draft position ``i``, P(draft i accepted | drafts before it
  accepted): a running mean of the outcomes, then a forgetting average; expected tokens per TiDAR step with K
  drafts is ``1 + sum_i prod_{j<=i} alpha_j``.
* ``DraftPolicy.choose(batch_size)`` returns the layout (block length, K) maximising
  ``B * expected_tokens / c_tidar(B * L)`` if that beats ``B / c_plain(B)`` by ``margin``,
  else None (a plain AR step); the rating is redone every ``refresh_every`` (8) calls at a
  batch size and right after a probe there, not at every step. The candidates are every K of the served block length and of
  the smaller block lengths the checkpoint was trained with (acceptance is kept per block
  length). Until ``warmup`` draft outcomes are seen for a block length it drafts with its
  largest K (the measurement needs drafting steps), then takes plain steps until the cost
  fit has ``trust_after`` of them; while drafting is off it probes every so often (two
  TiDAR steps, spaced so probes cost at most ``probe_overhead`` of the time; each probe that
  still finds plain AR faster doubles the spacing at that batch size, up to ``max_backoff``
  times, and one that finds drafting faster resets it), and while it
  drafts, one step in ``1 / probe_overhead`` is plain: a plain cost measured on a few odd
  steps (one slow step right after start) must not keep drafting on where it loses.
  A fixed schedule (``num_speculative_tokens_per_batch_size``) or ``VLLM_TIDAR_ADAPTIVE=0``
  overrides all of this.
"""

from __future__ import annotations

from ..layout import DecodeLayout
from .common import plugin_logger

logger = plugin_logger(__name__)


class StepCosts:
    """Online fit of step seconds, per kind: ``a_plain + b_plain*R`` for plain steps of ``R``
    requests, ``a_tidar + r_tidar*R + b_tidar*T`` for TiDAR steps of ``R`` requests and ``T``
    scheduled tokens (``L`` per request), each by exponentially forgetting least squares with
    a weak prior of its own (plain floats: it runs every step). The kinds do not share terms:
    a plain step grows per request (sampler, attention and output processing per request), a
    TiDAR step per request (verification, the proposer's lm_head, the mask rows' attention
    over the prefix: ~1.8 ms per request on the 2-core Xeon) and per scheduled row (~0.12 ms).
    A single slope per scheduled token for both kinds, fitted mostly from batch-1 TiDAR steps,
    predicted a Bl=4 K=3 step at batch 4 ~25% too cheap and made the policy draft where it
    lost. Until TiDAR steps at more than one batch size are measured, the per-request term is
    the prior's; and a fit whose recent steps are all of one batch size extrapolates poorly to
    others, so a step shape (kind, requests, tokens) measured ``measured_after`` times is
    predicted by the running mean of its own measurements (forgetting at the same rate), the
    fit only filling in shapes not measured yet. A kind's fit only forgets as new steps of that
    kind come: a long run of plain steps does not erase what TiDAR steps cost."""

    def __init__(self, a_plain: float = 5e-3, a_tidar: float = 7e-3, per_token: float = 1.5e-4,
                 per_request: float = 1e-3, decay: float = 0.97, prior_weight: float = 0.1, trust_after: int = 8,
                 measured_after: int = 4):
        self.decay = decay
        # per kind (False: plain, True: TiDAR): sums of x x^T and y x, and the prior's
        # pseudo-observations (never forgotten: they keep each system solvable)
        n = {False: 2, True: 3}
        self._a = {k: [[0.0] * n[k] for _ in range(n[k])] for k in (False, True)}
        self._y = {k: [0.0] * n[k] for k in (False, True)}
        self._a0 = {k: [[0.0] * n[k] for _ in range(n[k])] for k in (False, True)}
        self._y0 = {k: [0.0] * n[k] for k in (False, True)}
        prior = [(False, 1, 1, a_plain + per_token), (False, 16, 16, a_plain + 16 * per_token)]
        prior += [(True, r, t, a_tidar + per_request * (r - 1) + per_token * t)
                  for r, t in ((1, 20), (1, 72), (4, 80), (16, 1152))]
        for tidar, r, t, c in prior:
            x = self._features(tidar, r, t)
            for i in range(len(x)):
                self._y0[tidar][i] += prior_weight * c * x[i]
                for j in range(len(x)):
                    self._a0[tidar][i][j] += prior_weight * x[i] * x[j]
        self._coef = {k: _solve(self._a0[k], self._y0[k]) for k in (False, True)}
        self._stale = {False: False, True: False}  # steps added since the kind was last solved
        self._kind_seen = {False: 0, True: 0}  # steps taken into the fit, per kind
        # (kind, requests, tokens) -> (running mean of its seconds, steps seen): what a step
        # of exactly that shape costs; the fit fills in the shapes not measured yet (at most
        # max_num_seqs x (layouts + 1) keys)
        self._measured: dict[tuple[bool, int, int], tuple[float, int]] = {}
        self.trust_after = trust_after
        self.measured_after = measured_after

    @staticmethod
    def _features(tidar: bool, requests: int, tokens: int) -> tuple[float, ...]:
        return (1.0, float(requests), float(tokens)) if tidar else (1.0, float(tokens))

    @property
    def num_observed(self) -> int:
        """Steps taken into the fit."""
        return sum(self._kind_seen.values())

    def seen(self, tidar: bool) -> int:
        """Steps of one kind taken into the fit."""
        return self._kind_seen[tidar]

    @property
    def coefficients(self) -> tuple[float, ...]:
        """(a_plain, b_plain, a_tidar, r_tidar, b_tidar): seconds, per request, per scheduled token."""
        return (*self._fit(False), *self._fit(True))

    def _fit(self, tidar: bool) -> list[float]:
        """The kind's coefficients, solved when first needed after new steps (a steady batch
        size predicts from its measured shapes, so most steps need no solve)."""
        if self._stale[tidar]:
            a, y, a0, y0 = self._a[tidar], self._y[tidar], self._a0[tidar], self._y0[tidar]
            n = len(y)
            self._coef[tidar] = _solve([[a0[i][j] + a[i][j] for j in range(n)] for i in range(n)],
                                       [y0[i] + y[i] for i in range(n)])
            self._stale[tidar] = False
        return self._coef[tidar]

    def predict(self, tidar: bool, requests: int, tokens: int) -> float:
        """Predicted seconds of a step of ``requests`` requests, ``tokens`` scheduled tokens: the
        running mean of such steps once ``measured_after`` of them are measured, else the fit
        (a TiDAR step never less than a plain step of as many requests: it does all a plain
        step does and more)."""
        seen = self._measured.get((tidar, requests, tokens))
        if seen is not None and seen[1] >= self.measured_after:
            return seen[0]
        x = self._features(tidar, requests, tokens)
        c = sum(k * v for k, v in zip(self._fit(tidar), x))
        if tidar:
            c = max(c, self.predict(False, requests, requests))
        return max(c, 1e-6)

    def observe(self, tidar: bool, requests: int, tokens: int, seconds: float) -> bool:
        """Add one measured step; returns False (ignored) for an outlier such as an idle gap.
        The first ``trust_after`` steps of each kind are always taken: until then the fit is
        mostly the prior, which a larger model or a slower (or loaded) machine exceeds many
        times over, and rejecting against it would keep the fit at the prior for good."""
        if seconds <= 0:
            return False
        if self._kind_seen[tidar] >= self.trust_after and seconds > 3 * self.predict(tidar, requests, tokens) + 0.02:
            return False
        self._kind_seen[tidar] += 1
        key = (tidar, requests, tokens)
        mean, n = self._measured.get(key, (seconds, 0))
        n += 1
        self._measured[key] = (mean + max(1.0 / n, 1.0 - self.decay) * (seconds - mean), n)
        x = self._features(tidar, requests, tokens)
        d, a_k, y_k, n = self.decay, self._a[tidar], self._y[tidar], len(x)
        for i in range(n):
            y_k[i] = d * y_k[i] + seconds * x[i]
            for j in range(n):
                a_k[i][j] = d * a_k[i][j] + x[i] * x[j]
        self._stale[tidar] = True
        return True

    def state(self) -> dict:
        """What was measured (JSON-able; the prior and the settings are not part of it)."""
        kinds = ("plain", "tidar")
        return {
            "sums": {name: {"a": self._a[k], "y": self._y[k]} for name, k in zip(kinds, (False, True))},
            "seen": {name: self._kind_seen[k] for name, k in zip(kinds, (False, True))},
            "measured": [[int(t), r, n, mean, cnt] for (t, r, n), (mean, cnt) in self._measured.items()],
        }

    def load_state(self, state: dict) -> None:
        """Take over ``state()`` of an earlier engine; raises ``KeyError``/``ValueError`` on a
        malformed one and then leaves this fit as it was."""
        sums, seen, measured = {}, {}, {}
        for name, k in (("plain", False), ("tidar", True)):
            a = [[float(v) for v in row] for row in state["sums"][name]["a"]]
            y = [float(v) for v in state["sums"][name]["y"]]
            if len(y) != len(self._y[k]) or any(len(row) != len(y) for row in a) or len(a) != len(y):
                raise ValueError(f"{name} sums have the wrong shape")
            sums[k] = (a, y)
            seen[k] = int(state["seen"][name])
        for t, r, n, mean, cnt in state["measured"]:
            measured[(bool(t), int(r), int(n))] = (float(mean), int(cnt))
        for k, (a, y) in sums.items():
            self._a[k], self._y[k], self._stale[k] = a, y, True
        self._kind_seen = seen
        self._measured = measured


def _solve(a: list[list[float]], y: list[float]) -> list[float]:
    """x with a @ x = y for a small symmetric positive definite system (Gaussian elimination
    with partial pivoting; the prior keeps it regular)."""
    n = len(y)
    m = [row[:] + [y[i]] for i, row in enumerate(a)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [v - f * w for v, w in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


class Acceptance:
    """Per draft position, the conditional acceptance rate: the running mean of the outcomes
    seen so far (the prior counts as one), turning into a forgetting average once there
    are more than ``1 / (1 - decay)`` of them."""

    def __init__(self, max_drafts: int, prior: float = 0.5, decay: float = 0.99):
        self.alpha = [prior] * max_drafts
        self._seen = [0] * max_drafts
        self.decay = decay
        self.num_observed = 0

    def observe(self, num_drafts: int, accepted: int) -> None:
        """One verified step of a request: ``accepted`` of its ``num_drafts`` drafts."""
        if num_drafts <= 0:
            return
        self.num_observed += 1
        for i in range(min(accepted + 1, num_drafts)):  # positions the verifier reached
            hit = 1.0 if i < accepted else 0.0
            self._seen[i] += 1
            rate = max(1.0 / (self._seen[i] + 1), 1.0 - self.decay)
            self.alpha[i] += rate * (hit - self.alpha[i])

    def state(self) -> dict:
        return {"alpha": list(self.alpha), "seen": list(self._seen), "observed": self.num_observed}

    def load_state(self, state: dict) -> None:
        """Take over ``state()`` of an earlier engine (as many positions as both have)."""
        alpha = [min(max(float(a), 0.0), 1.0) for a in state["alpha"]]
        seen = [int(n) for n in state["seen"]]
        if len(alpha) != len(seen):
            raise ValueError("acceptance state: alpha and seen differ in length")
        m = min(len(alpha), len(self.alpha))
        self.alpha[:m], self._seen[:m] = alpha[:m], seen[:m]
        self.num_observed = int(state["observed"])

    def expected_tokens(self, k: int) -> float:
        """Tokens a TiDAR step with ``k`` drafts commits on average (1 + accepted)."""
        total, p = 1.0, 1.0
        for a in self.alpha[:k]:
            p *= a
            total += p
        return total


class _Rating:
    """``DraftPolicy.best`` at one batch size, and what it was computed from."""

    __slots__ = ("call", "costs", "best", "probe_ratio")

    def __init__(self, call: int, costs: StepCosts, best: tuple) -> None:
        self.call = call  # the choose() call it was computed at
        self.costs = costs  # the cost model it used
        self.best = best  # (layout or None, its tokens/s, plain AR tokens/s)
        self.probe_ratio: dict[DecodeLayout, float] = {}  # probe layout -> TiDAR/plain step-cost ratio


class DraftPolicy:
    """Chooses each step's layout (block length, K) or plain AR (None) from the batch size;
    see the module docstring. ``layouts``: the candidates, each a ``DecodeLayout``."""

    def __init__(self, layouts: list[DecodeLayout], schedule: list[DecodeLayout | None] | None = None,
                 costs: StepCosts | None = None, acceptance: dict[int, Acceptance] | None = None,
                 margin: float = 1.05, warmup: int = 32, probe_overhead: float = 0.02, max_backoff: int = 4,
                 refresh_every: int = 8):
        self.layouts = sorted(layouts, key=lambda lay: (lay.block_len, lay.num_drafts), reverse=True)
        self.block_lengths = sorted({lay.block_len for lay in self.layouts}, reverse=True)
        # the largest K of each block length (warm-up and probes draft with it)
        self.widest = {bl: max((lay for lay in self.layouts if lay.block_len == bl), key=lambda x: x.num_drafts)
                       for bl in self.block_lengths}
        self.schedule = schedule  # dense batch size -> layout or None (index 0 unused), or None
        self.costs = costs or StepCosts()
        self.acceptance = acceptance or {bl: Acceptance(w.num_drafts) for bl, w in self.widest.items()}
        self.margin, self.warmup, self.probe_overhead = margin, warmup, probe_overhead
        self.max_backoff = max_backoff
        self.refresh_every = refresh_every
        self._ratings: dict[int, _Rating] = {}  # batch size -> its last rating (_rated)
        self._calls = 0
        self._backoff: dict[int, int] = {}  # batch size -> probe interval factor (doubles while probes confirm plain)
        self._probed: int | None = None  # batch size of the probe pair just taken
        self._off_steps = 0  # consecutive plain steps chosen
        self._on_steps = 0  # drafting steps since the last plain one
        self._probe: list[DecodeLayout] = []
        self._probe_turn = 0
        self._logged: dict[int, tuple[int, int]] = {}

    def state(self) -> dict:
        """What the policy has measured: step costs, acceptance per block length, probe backoff."""
        return {"costs": self.costs.state(),
                "acceptance": {str(bl): acc.state() for bl, acc in self.acceptance.items()},
                "backoff": {str(b): f for b, f in self._backoff.items()}}

    def load_state(self, state: dict) -> None:
        """Start from ``state()`` of an earlier engine (a block length it did not serve starts
        cold); raises ``KeyError``/``ValueError``/``TypeError`` on a malformed state."""
        costs = StepCosts()
        costs.load_state(state["costs"])
        acceptance = {}
        for bl, acc in self.acceptance.items():
            if str(bl) in state["acceptance"]:
                fresh = Acceptance(len(acc.alpha), decay=acc.decay)
                fresh.load_state(state["acceptance"][str(bl)])
                acceptance[bl] = fresh
        backoff = {int(b): min(int(f), self.max_backoff) for b, f in state["backoff"].items()}
        self.costs.load_state(costs.state())
        for bl, acc in acceptance.items():
            self.acceptance[bl] = acc
        self._backoff = backoff
        self._ratings.clear()

    def rate(self, layout: DecodeLayout | None, batch_size: int) -> float:
        """Predicted tokens/s of a step of ``layout`` (None: plain AR) at ``batch_size``."""
        if layout is None:
            return batch_size / self.costs.predict(False, batch_size, batch_size)
        exp = self.acceptance[layout.block_len].expected_tokens(layout.num_drafts)
        return batch_size * exp / self.costs.predict(True, batch_size, batch_size * layout.num_tokens)

    def best(self, batch_size: int) -> tuple[DecodeLayout | None, float, float]:
        """(layout or None, its tokens/s, plain AR tokens/s) by the current models."""
        plain = self.rate(None, batch_size)
        best, best_rate = None, plain * self.margin
        for lay in self.layouts:
            r = self.rate(lay, batch_size)
            if r > best_rate:
                best, best_rate = lay, r
        return best, (best_rate if best is not None else plain), plain

    def _rated(self, batch_size: int) -> "_Rating":
        """The rating of ``batch_size``, redone every ``refresh_every`` calls there (and at once
        after a probe pair there, or when the cost model was replaced): rating every layout
        costs ~20 us of Python, more than the rest of a plain step's bookkeeping, and the
        models move slowly."""
        r = self._ratings.get(batch_size)
        if (r is None or self._calls - r.call >= self.refresh_every or r.costs is not self.costs
                or self._probed == batch_size):
            r = self._ratings[batch_size] = _Rating(self._calls, self.costs, self.best(batch_size))
        return r

    def choose(self, batch_size: int) -> DecodeLayout | None:
        if batch_size <= 0:
            return None
        if self.schedule is not None:
            return self.schedule[min(batch_size, len(self.schedule) - 1)]
        self._calls += 1
        cold = [bl for bl in self.block_lengths if self.acceptance[bl].num_observed < self.warmup]
        if cold:  # measure each block length's acceptance first
            return self.widest[min(cold, key=lambda bl: self.acceptance[bl].num_observed)]
        if self.costs.seen(False) < self.costs.trust_after:  # and what a plain step costs
            return None
        if self._probe:
            return self._probe.pop()
        rated = self._rated(batch_size)
        lay, rate, plain = rated.best
        if self._probed == batch_size and lay is None:  # the probe confirmed plain AR: space the next one out
            self._backoff[batch_size] = min(2 * self._backoff.get(batch_size, 1), self.max_backoff)
        self._probed = None
        if lay is None:
            self._off_steps += 1
            probe = self.widest[self.block_lengths[self._probe_turn % len(self.block_lengths)]]
            ratio = rated.probe_ratio.get(probe)
            if ratio is None:
                ratio = rated.probe_ratio[probe] = (self.costs.predict(True, batch_size, batch_size * probe.num_tokens)
                                                    / self.costs.predict(False, batch_size, batch_size))
            interval = 2 * ratio / self.probe_overhead * self._backoff.get(batch_size, 1)
            if self._off_steps >= interval:  # two probe steps per interval
                self._off_steps, self._probe_turn = 0, self._probe_turn + 1
                self._probe = [probe]
                self._probed = batch_size
                return probe
        else:
            self._off_steps = 0
            self._backoff.pop(batch_size, None)
            self._on_steps += 1
            if self._on_steps * self.probe_overhead >= 1:  # a plain step now and then keeps its cost current
                self._on_steps = 0
                return None
        key = (lay.block_len, lay.num_drafts) if lay is not None else (0, 0)
        if self._logged.get(batch_size) != key:
            self._logged[batch_size] = key
            what = "plain AR" if lay is None else f"block length {lay.block_len}, K={lay.num_drafts}"
            logger.info("TiDAR adaptive drafting: batch %d -> %s (%.0f tokens/s predicted; plain AR %.0f)",
                        batch_size, what, rate, plain)
        return lay
