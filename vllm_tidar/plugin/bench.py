"""Batch-1 A/B of one TiDAR checkpoint in vLLM: plain AR vs TiDAR (greedy).

    python -m vllm_tidar.plugin.bench CKPT [--prompts 8] [--max-tokens 128] [--dtype float32]

Runs the AR engine (``hf_overrides={"tidar_mode": "ar"}``) and then the TiDAR engine
(one at a time, in-process), on the same prompts one request at a time, and prints
tokens/s, tokens per forward and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _run(ckpt, prompts, max_tokens, dtype, max_model_len, tidar: bool, overrides: dict):
    from vllm import LLM, SamplingParams
    from .common import close_llm

    hf = dict(overrides)
    if not tidar:
        hf["tidar_mode"] = "ar"
    kw = dict(per_request_spec_decode_metrics="detailed") if tidar else {}
    llm = LLM(
        model=ckpt,
        enforce_eager=True,
        max_model_len=max_model_len,
        dtype=dtype,
        seed=0,
        hf_overrides=hf,
        disable_log_stats=False,
        **kw,
    )
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)  # warm-up
    outs, tokens, forwards, elapsed = [], 0, 0, 0.0
    for p in prompts:
        t0 = time.perf_counter()
        o = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        elapsed += time.perf_counter() - t0
        ids = list(o.outputs[0].token_ids)
        outs.append(ids)
        tokens += len(ids)
        m = o.outputs[0].spec_decode_metrics
        forwards += 1 + (len(m.per_step_accepted) if m is not None else len(ids) - 1)
    close_llm(llm)
    return outs, {"tokens_per_s": tokens / elapsed, "tokens_per_forward": tokens / forwards, "tokens": tokens}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import textwrap

    from transformers import AutoTokenizer

    from vllm_tidar.checkpoint import ARCHITECTURES

    cfg = json.load(open(os.path.join(args.checkpoint, "config.json")))
    overrides = {"architectures": [ARCHITECTURES[cfg["model_type"]]]}
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    src = open(textwrap.__file__).read()
    prompts = [tok(src[i * 900 : i * 900 + 300], add_special_tokens=False)["input_ids"] for i in range(args.prompts)]
    ar_out, ar = _run(args.checkpoint, prompts, args.max_tokens, args.dtype, args.max_model_len, False, overrides)
    td_out, td = _run(args.checkpoint, prompts, args.max_tokens, args.dtype, args.max_model_len, True, overrides)
    print(json.dumps({"ar": ar, "tidar": td, "identical": ar_out == td_out, "speedup": td["tokens_per_s"] / ar["tokens_per_s"]}))


if __name__ == "__main__":
    main()
