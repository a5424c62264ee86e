"""Patch: spec-decode metrics count TiDAR's K drafts, not its mask slots (targets vLLM 0.32.0).

Why: TiDAR hands vLLM ``N = K + (K+1)*block_length`` speculative tokens per step (K drafts,
then MASK slots that the rejection sampler always rejects, their logit being -inf). Upstream
counts all N as drafts: ``vllm:spec_decode_num_draft_tokens`` is inflated, the draft
acceptance rate diluted, and the per-position vectors have N entries, the last N-K always 0.

What (engines whose speculative config is the TiDAR proposer only; others are untouched):

* ``Scheduler.update_from_output``: before upstream runs, set
  ``scheduler_output.num_invalid_spec_tokens[req] = N - real``, ``real`` being the leading
  scheduled spec tokens among the first K that are neither MASK nor -1 (grammar-invalid).
  Upstream already subtracts that dict (its grammar path) from the drafted count of both
  the engine stats and the per-request metrics, so both count ``real`` drafts (K on a
  full step). The dict is read by nothing else.
* ``Scheduler.make_spec_decoding_stats``: ``SpecDecodingStats`` with K positions; a step
  with no real draft is skipped.
* ``Scheduler.add_request``: per-request metrics (``per_request_spec_decode_metrics``)
  sized for K, whose ``observe`` skips a step with no real draft.
* ``SpecDecodingProm.__init__`` (front-end): K per-position counters.

Steps whose drafts are all MASK (the step after a degraded or plain one; on the Flex
backend the first decode step after prefill) proposed nothing: like an n-gram step that found no match they are not spec
steps. So ``num_draft_tokens == K * num_drafts`` on full steps, the mean acceptance length
is ``1 + accepted / drafting steps`` and per-position rates are over drafting steps. A
request's output length is ``1 + plain steps + drafting steps + accepted`` (less what
``max_tokens`` or a stop string cut off the last step).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from dataclasses import dataclass

from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

from ._upstream import params

TARGET_VERSION = "0.32.0"
_ATTR = "_vllm_tidar_patched"
EXPECTED_PARAMS = {
    "update_from_output": ["self", "scheduler_output", "model_runner_output"],
    "make_spec_decoding_stats": [
        "self", "spec_decoding_stats", "num_draft_tokens", "num_accepted_tokens", "num_invalid_spec_tokens", "request_id",
    ],
    "add_request": ["self", "request"],
}
# upstream lines the patch relies on (source of Scheduler.update_from_output)
EXPECTED_SOURCE = [
    "num_draft_tokens = len(scheduled_spec_token_ids)",
    "num_invalid_spec_tokens=scheduler_output.num_invalid_spec_tokens",
    "scheduler_output.num_invalid_spec_tokens.get(req_id, 0)",
    "request.spec_decode_metrics.observe(",
]


@dataclass
class TiDARRequestSpecDecodeMetrics(RequestSpecDecodeMetrics):
    """Per-request metrics that ignore steps without real drafts (all-MASK steps)."""

    def observe(self, num_draft_tokens: int, num_accepted: int, detailed: bool = False) -> None:
        if num_draft_tokens > 0:
            super().observe(num_draft_tokens, num_accepted, detailed)


def num_real_drafts(spec_token_ids, k: int, mask_id: int) -> int:
    """Leading tokens of ``spec_token_ids[:k]`` that are real drafts (not MASK, not -1)."""
    n = 0
    for t in spec_token_ids[:k]:
        if t == mask_id or t < 0:
            break
        n += 1
    return n


def _tidar(scheduler) -> tuple[int, int] | None:
    """``(K, mask id)`` for a TiDAR engine's scheduler, else None (cached on the scheduler)."""
    if "_tidar_metrics" not in scheduler.__dict__:
        from vllm_tidar.plugin.common import tidar_drafts_and_mask

        cfg = scheduler.vllm_config
        scheduler._tidar_metrics = tidar_drafts_and_mask(cfg.speculative_config, cfg.model_config.hf_config)
    return scheduler._tidar_metrics


def check_upstream() -> None:
    """Fail loudly if the patched vLLM code changed under us."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    problems = []
    for name, expected in EXPECTED_PARAMS.items():
        found = params(getattr(Scheduler, name))
        if found != expected:
            problems.append(f"Scheduler.{name}{tuple(found)}")
    observe = params(RequestSpecDecodeMetrics.observe)
    if observe != ["self", "num_draft_tokens", "num_accepted", "detailed"]:
        problems.append(f"RequestSpecDecodeMetrics.observe{tuple(observe)}")
    source = inspect.getsource(inspect.unwrap(Scheduler.update_from_output))
    problems += [f"update_from_output lacks {line!r}" for line in EXPECTED_SOURCE if line not in source]
    init_source = inspect.getsource(inspect.unwrap(SpecDecodingProm.__init__))
    if set(re.findall(r"speculative_config\.(\w+)", init_source)) != {"num_speculative_tokens"}:
        problems.append("SpecDecodingProm.__init__ reads more than speculative_config.num_speculative_tokens")
    if problems:
        raise RuntimeError(f"vllm-tidar patch spec_metrics_tidar targets vLLM {TARGET_VERSION}: " + "; ".join(problems))


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

    if getattr(Scheduler.update_from_output, _ATTR, False):
        return
    check_upstream()
    update_from_output = Scheduler.update_from_output
    make_spec_decoding_stats = Scheduler.make_spec_decoding_stats
    add_request = Scheduler.add_request
    prom_init = SpecDecodingProm.__init__

    @functools.wraps(update_from_output)
    def patched_update_from_output(self, scheduler_output, model_runner_output):
        tidar = _tidar(self)
        if tidar is not None and scheduler_output.scheduled_spec_decode_tokens:
            k, mask_id = tidar
            invalid = dict(scheduler_output.num_invalid_spec_tokens or {})
            for req_id, spec in scheduler_output.scheduled_spec_decode_tokens.items():
                invalid[req_id] = len(spec) - num_real_drafts(spec, k, mask_id)
            scheduler_output.num_invalid_spec_tokens = invalid
        return update_from_output(self, scheduler_output, model_runner_output)

    @functools.wraps(make_spec_decoding_stats)
    def patched_make_spec_decoding_stats(
        self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id
    ):
        tidar = _tidar(self)
        if tidar is not None and self.log_stats:
            if num_draft_tokens - (num_invalid_spec_tokens or {}).get(request_id, 0) <= 0:
                return spec_decoding_stats  # all-MASK step: no drafts proposed
            if spec_decoding_stats is None:
                spec_decoding_stats = SpecDecodingStats.new(tidar[0])
        return make_spec_decoding_stats(
            self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id
        )

    @functools.wraps(add_request)
    def patched_add_request(self, request):
        add_request(self, request)
        tidar = _tidar(self)
        if tidar is not None and type(request.spec_decode_metrics) is RequestSpecDecodeMetrics:
            request.spec_decode_metrics = TiDARRequestSpecDecodeMetrics.new(tidar[0])

    @functools.wraps(prom_init)
    def patched_prom_init(self, speculative_config, *args, **kwargs):
        from vllm_tidar.plugin.common import is_tidar_proposer, tidar_drafts_and_mask

        if is_tidar_proposer(speculative_config):
            k, _ = tidar_drafts_and_mask(speculative_config, speculative_config.target_model_config.hf_config)
            speculative_config = types.SimpleNamespace(num_speculative_tokens=k)
        prom_init(self, speculative_config, *args, **kwargs)

    for fn in (patched_update_from_output, patched_make_spec_decoding_stats, patched_add_request, patched_prom_init):
        setattr(fn, _ATTR, True)
    Scheduler.update_from_output = patched_update_from_output
    Scheduler.make_spec_decoding_stats = patched_make_spec_decoding_stats
    Scheduler.add_request = patched_add_request
    SpecDecodingProm.__init__ = patched_prom_init
