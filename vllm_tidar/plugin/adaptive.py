"""Adaptive drafting: for each engine step, the drafts per request K (0 = plain AR) that
give the most tokens per second at the current batch size, from step costs and draft
acceptance measured while serving.

* ``StepCosts`` fits engine-step seconds online, ``c = a_plain + b*T`` for plain steps and
  ``a_tidar + b*T`` for TiDAR steps (``T`` = tokens scheduled in the step), by exponentially
  forgetting least squares with a weak prior. The proposer feeds it the wall time between
  its own calls (one call per engine step), skipping steps whose batch changed.
* ``Acceptance`` keeps, per draft position ``i``, the forgetting average of
  P(draft i accepted | drafts before it accepted); expected tokens per TiDAR step with K
  drafts is ``1 + sum_i prod_{j<=i} alpha_j``.
* ``DraftPolicy.choose(batch_size)`` returns the K maximising
  ``expected_tokens(K) / c_tidar(B * L(K))`` if that beats ``1 / c_plain(B)`` by ``margin``,
  else 0. Until ``warmup`` draft outcomes are seen it drafts with the largest K (the
  measurement needs drafting steps); while drafting is off it probes every so often (two
  TiDAR steps, spaced so probes cost at most ``probe_overhead`` of the time). A fixed
  schedule (``num_speculative_tokens_per_batch_size``) or ``VLLM_TIDAR_ADAPTIVE=0``
  overrides all of this.
"""

from __future__ import annotations

import torch

from vllm.logger import init_logger

from ..layout import DecodeLayout

logger = init_logger(__name__)


class StepCosts:
    """Online fit of step seconds: ``a_plain*[plain] + a_tidar*[tidar] + b*tokens``."""

    def __init__(self, a_plain: float = 5e-3, a_tidar: float = 7e-3, per_token: float = 1.5e-4,
                 decay: float = 0.97, prior_weight: float = 0.1):
        self.decay = decay
        self._a = torch.zeros(3, 3, dtype=torch.float64)
        self._y = torch.zeros(3, dtype=torch.float64)
        # prior: pseudo-observations that are never forgotten (keep the system solvable)
        self._a0 = torch.zeros(3, 3, dtype=torch.float64)
        self._y0 = torch.zeros(3, dtype=torch.float64)
        for tidar, tokens in ((False, 1), (False, 64), (True, 72), (True, 576)):
            x = self._features(tidar, tokens)
            c = (a_tidar if tidar else a_plain) + per_token * tokens
            self._a0 += prior_weight * torch.outer(x, x)
            self._y0 += prior_weight * c * x
        self._coef = torch.linalg.solve(self._a0, self._y0)
        self.num_observed = 0

    @staticmethod
    def _features(tidar: bool, tokens: int) -> torch.Tensor:
        return torch.tensor([0.0 if tidar else 1.0, 1.0 if tidar else 0.0, float(tokens)], dtype=torch.float64)

    def predict(self, tidar: bool, tokens: int) -> float:
        """Predicted seconds of a step of ``tokens`` scheduled tokens."""
        return max(float(self._features(tidar, tokens) @ self._coef), 1e-6)

    def observe(self, tidar: bool, tokens: int, seconds: float) -> bool:
        """Add one measured step; returns False (ignored) for an outlier such as an idle gap."""
        if seconds <= 0 or seconds > 4 * self.predict(tidar, tokens) + 0.05:
            return False
        x = self._features(tidar, tokens)
        self._a = self.decay * self._a + torch.outer(x, x)
        self._y = self.decay * self._y + seconds * x
        self._coef = torch.linalg.solve(self._a0 + self._a, self._y0 + self._y)
        self.num_observed += 1
        return True


class Acceptance:
    """Per draft position, the forgetting average of the conditional acceptance rate."""

    def __init__(self, max_drafts: int, prior: float = 0.5, decay: float = 0.99):
        self.alpha = [prior] * max_drafts
        self.decay = decay
        self.num_observed = 0

    def observe(self, num_drafts: int, accepted: int) -> None:
        """One verified step of a request: ``accepted`` of its ``num_drafts`` drafts."""
        if num_drafts <= 0:
            return
        self.num_observed += 1
        for i in range(min(accepted + 1, num_drafts)):  # positions the verifier reached
            hit = 1.0 if i < accepted else 0.0
            self.alpha[i] += (1.0 - self.decay) * (hit - self.alpha[i])

    def expected_tokens(self, k: int) -> float:
        """Tokens a TiDAR step with ``k`` drafts commits on average (1 + accepted)."""
        total, p = 1.0, 1.0
        for a in self.alpha[:k]:
            p *= a
            total += p
        return total


class DraftPolicy:
    """Chooses K (0..max) per step from the batch size; see the module docstring."""

    def __init__(self, block_len: int, max_drafts: int, schedule: list[int] | None = None,
                 costs: StepCosts | None = None, acceptance: Acceptance | None = None,
                 margin: float = 1.05, warmup: int = 64, probe_overhead: float = 0.02):
        self.block_len, self.max_drafts = block_len, max_drafts
        self.schedule = schedule  # dense batch size -> K (index 0 unused), or None
        self.costs = costs or StepCosts()
        self.acceptance = acceptance or Acceptance(max_drafts)
        self.margin, self.warmup, self.probe_overhead = margin, warmup, probe_overhead
        self._tokens = {k: DecodeLayout(block_len, k).num_tokens for k in range(1, max_drafts + 1)}
        self._off_steps = 0  # consecutive steps chosen K=0
        self._probe_left = 0
        self._logged: dict[int, int] = {}

    def step_tokens(self, k: int) -> int:
        """Tokens a request schedules in a step with ``k`` drafts (1 for a plain step)."""
        return 1 if k == 0 else self._tokens[k]

    def best(self, batch_size: int) -> tuple[int, float, float]:
        """(K, its tokens/s, plain AR tokens/s) by the current models."""
        plain = batch_size / self.costs.predict(False, batch_size)
        best_k, best_rate = 0, plain * self.margin
        for k in range(1, self.max_drafts + 1):
            rate = batch_size * self.acceptance.expected_tokens(k) / self.costs.predict(True, batch_size * self._tokens[k])
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, (best_rate if best_k else plain), plain

    def choose(self, batch_size: int) -> int:
        if batch_size <= 0:
            return 0
        if self.schedule is not None:
            return self.schedule[min(batch_size, len(self.schedule) - 1)]
        if self.acceptance.num_observed < self.warmup:
            return self.max_drafts
        if self._probe_left > 0:
            self._probe_left -= 1
            return self.max_drafts
        k, rate, plain = self.best(batch_size)
        if k == 0:
            self._off_steps += 1
            ratio = self.costs.predict(True, batch_size * self._tokens[self.max_drafts]) / self.costs.predict(False, batch_size)
            if self._off_steps >= 2 * ratio / self.probe_overhead:  # two probe steps per interval
                self._off_steps, self._probe_left = 0, 1
                return self.max_drafts
        else:
            self._off_steps = 0
        if self._logged.get(batch_size) != k:
            self._logged[batch_size] = k
            logger.info("TiDAR adaptive drafting: batch %d -> K=%d (%.0f tokens/s; plain AR %.0f tokens/s; "
                        "expected tokens/step %s)", batch_size, k, rate, plain,
                        " ".join(f"{self.acceptance.expected_tokens(j):.2f}" for j in range(1, self.max_drafts + 1)))
        return k
