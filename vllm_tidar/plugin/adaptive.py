"""Adaptive drafting: for each engine step, the TiDAR layout (block length, drafts per
request K) or a plain AR step that gives the most tokens per second at the current batch
size, from step costs and draft acceptance measured while serving.

* ``StepCosts`` fits engine-step seconds online, ``c = a_plain + b_plain*T`` for plain steps
  and ``a_tidar + b_tidar*T`` for TiDAR steps (``T`` = tokens scheduled in the step), by
  exponentially forgetting least squares with a weak prior. The proposer feeds it the wall time between
  its own calls (one call per engine step), skipping steps whose batch changed.
* ``Acceptance`` keeps, per draft position ``i``, P(draft i accepted | drafts before it
  accepted): a running mean of the outcomes, then a forgetting average; expected tokens per TiDAR step with K
  drafts is ``1 + sum_i prod_{j<=i} alpha_j``.
* ``DraftPolicy.choose(batch_size)`` returns the layout (block length, K) maximising
  ``B * expected_tokens / c_tidar(B * L)`` if that beats ``B / c_plain(B)`` by ``margin``,
  else None (a plain AR step). The candidates are every K of the served block length and of
  the smaller block lengths the checkpoint was trained with (acceptance is kept per block
  length). Until ``warmup`` draft outcomes are seen for a block length it drafts with its
  largest K (the measurement needs drafting steps), then takes plain steps until the cost
  fit has ``trust_after`` of them; while drafting is off it probes every so often (two
  TiDAR steps, spaced so probes cost at most ``probe_overhead`` of the time), and while it
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
    """Online fit of step seconds, one line per kind: ``a_plain + b_plain*T`` for plain steps
    and ``a_tidar + b_tidar*T`` for TiDAR steps (``T`` = tokens scheduled in the step: the
    batch's requests for a plain step, ``L`` per request for a TiDAR step), each by
    exponentially forgetting least squares with a weak prior of its own (plain floats: it runs
    every step). The slopes are separate: a plain step grows per request (sampler, attention
    and output processing per request), a TiDAR step per scheduled row, about half as much
    per unit on our CPUs; one shared slope fitted to both mispredicted TiDAR steps at batch 4
    and made the choice flip between drafting and plain steps. A kind's fit only forgets as
    new steps of that kind come: a long run of plain steps does not erase what TiDAR steps
    cost."""

    def __init__(self, a_plain: float = 5e-3, a_tidar: float = 7e-3, per_token: float = 1.5e-4,
                 decay: float = 0.97, prior_weight: float = 0.1, trust_after: int = 8):
        self.decay = decay
        # per kind (False: plain, True: TiDAR): sums of x x^T and y x over x = (1, T), and the
        # prior's pseudo-observations (never forgotten: they keep each system solvable)
        self._a = {k: [[0.0, 0.0], [0.0, 0.0]] for k in (False, True)}
        self._y = {k: [0.0, 0.0] for k in (False, True)}
        self._a0 = {k: [[0.0, 0.0], [0.0, 0.0]] for k in (False, True)}
        self._y0 = {k: [0.0, 0.0] for k in (False, True)}
        for tidar, tokens in ((False, 1), (False, 16), (True, 72), (True, 576)):
            c = (a_tidar if tidar else a_plain) + per_token * tokens
            x = (1.0, float(tokens))
            for i in range(2):
                self._y0[tidar][i] += prior_weight * c * x[i]
                for j in range(2):
                    self._a0[tidar][i][j] += prior_weight * x[i] * x[j]
        self._coef = {k: _solve2(self._a0[k], self._y0[k]) for k in (False, True)}
        self._kind_seen = {False: 0, True: 0}  # steps taken into the fit, per kind
        self.trust_after = trust_after

    @property
    def num_observed(self) -> int:
        """Steps taken into the fit."""
        return sum(self._kind_seen.values())

    def seen(self, tidar: bool) -> int:
        """Steps of one kind taken into the fit."""
        return self._kind_seen[tidar]

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """(a_plain, b_plain, a_tidar, b_tidar): seconds, seconds per scheduled token."""
        return (*self._coef[False], *self._coef[True])

    def predict(self, tidar: bool, tokens: int) -> float:
        """Predicted seconds of a step of ``tokens`` scheduled tokens."""
        a, b = self._coef[tidar]
        return max(a + b * tokens, 1e-6)

    def observe(self, tidar: bool, tokens: int, seconds: float) -> bool:
        """Add one measured step; returns False (ignored) for an outlier such as an idle gap.
        The first ``trust_after`` steps of each kind are always taken: until then the fit is
        mostly the prior, which a larger model or a slower (or loaded) machine exceeds many
        times over, and rejecting against it would keep the fit at the prior for good."""
        if seconds <= 0:
            return False
        if self._kind_seen[tidar] >= self.trust_after and seconds > 3 * self.predict(tidar, tokens) + 0.02:
            return False
        self._kind_seen[tidar] += 1
        x = (1.0, float(tokens))
        d, a_k, y_k = self.decay, self._a[tidar], self._y[tidar]
        for i in range(2):
            y_k[i] = d * y_k[i] + seconds * x[i]
            for j in range(2):
                a_k[i][j] = d * a_k[i][j] + x[i] * x[j]
        a0, y0 = self._a0[tidar], self._y0[tidar]
        self._coef[tidar] = _solve2([[a0[i][j] + a_k[i][j] for j in range(2)] for i in range(2)],
                                    [y0[i] + y_k[i] for i in range(2)])
        return True


def _solve2(a: list[list[float]], y: list[float]) -> tuple[float, float]:
    """x with a @ x = y for a 2 x 2 system (the prior keeps it regular)."""
    det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
    return ((y[0] * a[1][1] - a[0][1] * y[1]) / det, (a[0][0] * y[1] - a[1][0] * y[0]) / det)


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

    def expected_tokens(self, k: int) -> float:
        """Tokens a TiDAR step with ``k`` drafts commits on average (1 + accepted)."""
        total, p = 1.0, 1.0
        for a in self.alpha[:k]:
            p *= a
            total += p
        return total


class DraftPolicy:
    """Chooses each step's layout (block length, K) or plain AR (None) from the batch size;
    see the module docstring. ``layouts``: the candidates, each a ``DecodeLayout``."""

    def __init__(self, layouts: list[DecodeLayout], schedule: list[DecodeLayout | None] | None = None,
                 costs: StepCosts | None = None, acceptance: dict[int, Acceptance] | None = None,
                 margin: float = 1.05, warmup: int = 32, probe_overhead: float = 0.02):
        self.layouts = sorted(layouts, key=lambda lay: (lay.block_len, lay.num_drafts), reverse=True)
        self.block_lengths = sorted({lay.block_len for lay in self.layouts}, reverse=True)
        # the largest K of each block length (warm-up and probes draft with it)
        self.widest = {bl: max((lay for lay in self.layouts if lay.block_len == bl), key=lambda x: x.num_drafts)
                       for bl in self.block_lengths}
        self.schedule = schedule  # dense batch size -> layout or None (index 0 unused), or None
        self.costs = costs or StepCosts()
        self.acceptance = acceptance or {bl: Acceptance(w.num_drafts) for bl, w in self.widest.items()}
        self.margin, self.warmup, self.probe_overhead = margin, warmup, probe_overhead
        self._off_steps = 0  # consecutive plain steps chosen
        self._on_steps = 0  # drafting steps since the last plain one
        self._probe: list[DecodeLayout] = []
        self._probe_turn = 0
        self._logged: dict[int, tuple[int, int]] = {}

    def rate(self, layout: DecodeLayout | None, batch_size: int) -> float:
        """Predicted tokens/s of a step of ``layout`` (None: plain AR) at ``batch_size``."""
        if layout is None:
            return batch_size / self.costs.predict(False, batch_size)
        exp = self.acceptance[layout.block_len].expected_tokens(layout.num_drafts)
        return batch_size * exp / self.costs.predict(True, batch_size * layout.num_tokens)

    def best(self, batch_size: int) -> tuple[DecodeLayout | None, float, float]:
        """(layout or None, its tokens/s, plain AR tokens/s) by the current models."""
        plain = self.rate(None, batch_size)
        best, best_rate = None, plain * self.margin
        for lay in self.layouts:
            r = self.rate(lay, batch_size)
            if r > best_rate:
                best, best_rate = lay, r
        return best, (best_rate if best is not None else plain), plain

    def choose(self, batch_size: int) -> DecodeLayout | None:
        if batch_size <= 0:
            return None
        if self.schedule is not None:
            return self.schedule[min(batch_size, len(self.schedule) - 1)]
        cold = [bl for bl in self.block_lengths if self.acceptance[bl].num_observed < self.warmup]
        if cold:  # measure each block length's acceptance first
            return self.widest[min(cold, key=lambda bl: self.acceptance[bl].num_observed)]
        if self.costs.seen(False) < self.costs.trust_after:  # and what a plain step costs
            return None
        if self._probe:
            return self._probe.pop()
        lay, rate, plain = self.best(batch_size)
        if lay is None:
            self._off_steps += 1
            probe = self.widest[self.block_lengths[self._probe_turn % len(self.block_lengths)]]
            ratio = self.costs.predict(True, batch_size * probe.num_tokens) / self.costs.predict(False, batch_size)
            if self._off_steps >= 2 * ratio / self.probe_overhead:  # two probe steps per interval
                self._off_steps, self._probe_turn = 0, self._probe_turn + 1
                self._probe = [probe]
                return probe
        else:
            self._off_steps = 0
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
