"""Run by tests/test_vllm_parallel.py in a subprocess (vLLM's TP/PP workers are separate processes, so the
in-process engine of ``make_llm`` cannot be used): greedy outputs and spec-decode counts of one engine
per parallel setting, written as JSON.

``python tests/vllm_tp_run.py CKPT OUT.json PROMPTS.json SETTING [SETTING ...]``, a SETTING being a JSON
object of extra ``vllm.LLM`` arguments (e.g. ``{"tensor_parallel_size": 2}``).
"""

from __future__ import annotations

import json
import sys
import time

from vllm_helpers import MAX_MODEL_LEN, close_llm

MAX_TOKENS = 32
COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def run(ckpt: str, prompts: list[list[int]], extra: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    args = dict(model=ckpt, enforce_eager=True, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
                disable_log_stats=False)
    llm = LLM(**{**args, **extra})
    try:
        started = time.perf_counter() - t0
        out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
        counts = {name: metrics[name].value for name in COUNTERS if name in metrics}
        per_pos = metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos")
        spec = llm.llm_engine.vllm_config.speculative_config
        return {
            "setting": extra,
            "tokens": [list(o.outputs[0].token_ids) for o in out],
            "counts": counts,
            "per_pos": per_pos.values if per_pos is not None else None,
            "num_speculative_tokens": spec.num_speculative_tokens if spec else 0,
            "startup_s": started,
        }
    finally:
        close_llm(llm)


if __name__ == "__main__":
    ckpt, out_path, prompts_path, *settings = sys.argv[1:]
    prompts = json.loads(open(prompts_path).read())
    results = [run(ckpt, prompts, json.loads(s)) for s in settings]
    with open(out_path, "w") as f:
        json.dump(results, f)
