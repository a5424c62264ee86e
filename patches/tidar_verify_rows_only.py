"""Patch: on a TiDAR engine, logits, sampler and rejection sampler see only a step's verify
rows, not its mask slots (targets vLLM 0.32.0).

Why: TiDAR hands vLLM ``N = K + (K+1)*block_length`` speculative tokens per step (71 at
block length 8): ``K`` real drafts, then MASK slots. Upstream
``GPUModelRunner._calc_spec_decode_metadata`` (the CPU runner inherits it) asks for logits
of all ``N + 1`` rows of every request, and the rejection sampler takes the argmax and
softmax of all of them, although it always stops at the first MASK draft (its logit is
-inf). At batch 16 that was 1152 x vocab logits per step for 8 x 16 rows anything used: 40%
of the step (``benchmarks/results/breakdown_cpu.md``).

What (runners whose model has ``tidar_set_sampled_rows``, i.e. TiDAR models; others are
untouched): per request, ``m`` = the leading scheduled drafts that are not MASK (``K`` on a
full TiDAR step, fewer after a block-length switch, 0 for all-MASK drafts, the leading real
ones of a degraded step). Upstream's function runs with ``m`` drafts and each request's end
moved back by ``N - m`` rows, so its logits rows are the request's first ``m + 1`` rows
(``x_last, d1..dm``) and its draft ids ``d1..dm``. The model is told ``m + 1`` per request
(it maps logits rows to requests with it), and ``apply_grammar_bitmask`` (structured
output), which assumes ``1 + len(spec tokens)`` logits rows per request, is handed the
grammar bitmask rows and spec tokens of those ``m + 1`` rows. The scheduler still rolls back the ``N - accepted``
rejected slots it scheduled; the metrics patch counts the real drafts as before.

A step with no drafts at all (the adaptive policy chose a plain AR step for the batch, or
only prefills are scheduled) takes upstream's non-speculative path: ``_prepare_inputs``
runs as on an engine without a speculative config (one logits row per request, no spec
metadata), so vLLM's plain sampler samples it instead of the rejection sampler over zero
drafts. That path cost ~0.5 ms per step at batch 4-16 (the spec metadata and the rejection
sampler), what kept a TiDAR engine that never drafts below AR of the same model.

Lossless: rows past the first MASK were never accepted, and the row after the last real
draft, formerly the row verifying a MASK draft (rejected; the recovered token sampled from
the target distribution, in which MASK has probability 0), is now the bonus row, sampled
from the same distribution. Draft token ids come from the host copy of the step's input ids
(the TiDAR proposer returns lists, so the engine runs without async scheduling).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ._upstream import require_params

TARGET_VERSION = "0.32.0"
EXPECTED_PARAMS = ["self", "num_draft_tokens", "cu_num_scheduled_tokens"]
EXPECTED_GRAMMAR_PARAMS = ["scheduler_output", "grammar_output", "input_batch", "logits"]
EXPECTED_PREPARE_PARAMS = ["self", "scheduler_output", "num_scheduled_tokens"]
_ATTR = "_vllm_tidar_patched"


def leading_real_drafts(input_ids: np.ndarray, num_draft_tokens: np.ndarray, cu_num_scheduled_tokens: np.ndarray,
                        mask_token_id: int) -> np.ndarray:
    """Per request, how many of its scheduled drafts (the last ``num_draft_tokens`` of its
    scheduled rows) precede the first MASK."""
    n = np.asarray(num_draft_tokens, dtype=np.int64)
    out = np.zeros_like(n)
    width = int(n.max()) if n.size else 0
    if width == 0:
        return out.astype(num_draft_tokens.dtype)
    first = np.asarray(cu_num_scheduled_tokens, dtype=np.int64) - n  # row of d1
    cols = np.arange(width)
    idx = np.minimum(first[:, None] + cols, len(input_ids) - 1)
    real = (input_ids[idx] != mask_token_id) & (cols < n[:, None])
    out = np.cumprod(real, axis=1).sum(axis=1)
    return out.astype(num_draft_tokens.dtype)


def check_upstream() -> None:
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    require_params("tidar_verify_rows_only", TARGET_VERSION, "GPUModelRunner._calc_spec_decode_metadata",
                   GPUModelRunner._calc_spec_decode_metadata, EXPECTED_PARAMS)
    require_params("tidar_verify_rows_only", TARGET_VERSION, "gpu_model_runner.apply_grammar_bitmask",
                   gpu_model_runner.apply_grammar_bitmask, EXPECTED_GRAMMAR_PARAMS)
    require_params("tidar_verify_rows_only", TARGET_VERSION, "GPUModelRunner._prepare_inputs",
                   GPUModelRunner._prepare_inputs, EXPECTED_PREPARE_PARAMS)


def cut_grammar_inputs(scheduler_output, grammar_output, real_drafts: dict[str, int]):
    """``(scheduler_output, grammar_output)`` as ``apply_grammar_bitmask`` must see them when
    each request's logits rows are its first ``real_drafts[req] + 1``: spec tokens cut to the
    real drafts, and the bitmask rows of the rows dropped left out."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    rows, at = [], 0
    for rid in grammar_output.structured_output_request_ids:
        n = len(spec.get(rid, ()))
        rows.extend(range(at, at + min(real_drafts.get(rid, n), n) + 1))
        at += 1 + n
    cut = {rid: toks[: real_drafts.get(rid, len(toks))] for rid, toks in spec.items()}
    acceptable = grammar_output.num_acceptable_drafts
    if acceptable is not None:
        acceptable = [min(a, len(cut.get(rid, ()))) for rid, a in
                      zip(grammar_output.structured_output_request_ids, acceptable)]
    return (dataclasses.replace(scheduler_output, scheduled_spec_decode_tokens=cut),
            dataclasses.replace(grammar_output, grammar_bitmask=grammar_output.grammar_bitmask[rows],
                                num_acceptable_drafts=acceptable))


def apply() -> None:
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calc = GPUModelRunner._calc_spec_decode_metadata
    if getattr(calc, _ATTR, False):
        return
    check_upstream()
    grammar = gpu_model_runner.apply_grammar_bitmask
    prepare = GPUModelRunner._prepare_inputs

    @functools.wraps(prepare)
    def patched_prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        spec = self.speculative_config
        if (spec is None or not hasattr(self.get_model(), "tidar_set_sampled_rows")
                or any(scheduler_output.scheduled_spec_decode_tokens.values())):
            return prepare(self, scheduler_output, num_scheduled_tokens)
        # no drafts in this batch: upstream's non-speculative inputs (its only use of the
        # config in this function is to pick that branch)
        self.speculative_config = None
        try:
            return prepare(self, scheduler_output, num_scheduled_tokens)
        finally:
            self.speculative_config = spec

    @functools.wraps(grammar)
    def patched_apply_grammar_bitmask(scheduler_output, grammar_output, input_batch, logits):
        real = getattr(input_batch, "tidar_real_drafts", None)
        if real is None or not scheduler_output.scheduled_spec_decode_tokens:
            return grammar(scheduler_output, grammar_output, input_batch, logits)
        so, go = cut_grammar_inputs(scheduler_output, grammar_output, real)
        return grammar(so, go, input_batch, logits)

    @functools.wraps(calc)
    def patched_calc_spec_decode_metadata(self, num_draft_tokens, cu_num_scheduled_tokens):
        model = self.get_model()
        tell = getattr(model, "tidar_set_sampled_rows", None)
        if tell is None:
            return calc(self, num_draft_tokens, cu_num_scheduled_tokens)
        total = int(cu_num_scheduled_tokens[-1]) if len(cu_num_scheduled_tokens) else 0
        m = leading_real_drafts(self.input_ids.np[:total], num_draft_tokens, cu_num_scheduled_tokens,
                                model.tidar_mask_id)
        tell(m + 1)
        self.input_batch.tidar_real_drafts = dict(zip(self.input_batch.req_ids, m.tolist()))
        return calc(self, m, cu_num_scheduled_tokens - (num_draft_tokens - m))

    setattr(patched_calc_spec_decode_metadata, _ATTR, True)
    setattr(patched_apply_grammar_bitmask, _ATTR, True)
    setattr(patched_prepare_inputs, _ATTR, True)
    GPUModelRunner._calc_spec_decode_metadata = patched_calc_spec_decode_metadata
    GPUModelRunner._prepare_inputs = patched_prepare_inputs
    gpu_model_runner.apply_grammar_bitmask = patched_apply_grammar_bitmask
