"""Is seeded sampling reproducible under preemption? Plain AR, TiDAR and vLLM's n-gram method
on the demo checkpoint: ``python -m vllm_tidar.benchmarks.seeded_repro [--out DIR]``.

Per method: 12 seeded requests (T = 0.8) run as one batch on an engine whose KV cache is too
small for them (preemptions), then the first 6 are re-sent one at a time, twice. Then the same
with a KV cache large enough for the batch (no preemption). Counted: re-sent outputs that
differ from the batch output, and re-sent outputs that differ between the two solo runs.

Why speculative methods differ: vLLM draws a request's random numbers from one generator per
request, and how many it draws per step depends on the step's shape (how many drafts were
scheduled, whether the step ran drafts at all). A preempted request is recomputed and resumes
with a different sequence of step shapes, so later tokens see different random numbers:
every token is still an exact sample, but not the same sample. Plain AR draws once per token
whatever the schedule, so it reproduces.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT

from .bench import machine_name

NUM_REQUESTS, NUM_RESENT, MAX_TOKENS = 12, 6, 96
SMALL_KV_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN = 14, 32, 320  # 448 KV slots for 12 x ~150 tokens

METHODS = {
    "AR (TiDAR class, tidar_mode=ar)": {"hf_overrides": {"tidar_mode": "ar"}},
    "TiDAR K=3": {"speculative_config": {"method": "tidar", "num_speculative_tokens": 3}},
    "n-gram N=3 (stock Llama)": {
        "hf_overrides": {"architectures": ["LlamaForCausalLM"]},
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                               "prompt_lookup_max": 3},
    },
}


def _prompts(checkpoint, n: int) -> list[list[int]]:
    import random
    import textwrap

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tok(Path(textwrap.__file__).read_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(3)
    out = []
    for _ in range(n):
        length = rng.randint(20, 60)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out


def measure(checkpoint, engine_kwargs: dict, kv_blocks: int | None) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_tidar.plugin.common import close_llm

    prompts = _prompts(checkpoint, NUM_REQUESTS)
    kw = dict(model=str(checkpoint), enforce_eager=True, dtype="float32", seed=0, disable_log_stats=False,
              max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, max_num_seqs=NUM_REQUESTS, **engine_kwargs)
    if kv_blocks is not None:
        kw["num_gpu_blocks_override"] = kv_blocks
    llm = LLM(**kw)
    try:
        sps = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(NUM_REQUESTS)]

        def gen(idx: list[int]) -> list[list[int]]:
            out = llm.generate([{"prompt_token_ids": prompts[i]} for i in idx], [sps[i] for i in idx], use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in out]

        batch = gen(list(range(NUM_REQUESTS)))
        preemptions = {m.name: m for m in llm.get_metrics()}["vllm:num_preemptions"].value
        solo1 = [gen([i])[0] for i in range(NUM_RESENT)]
        solo2 = [gen([i])[0] for i in range(NUM_RESENT)]
    finally:
        close_llm(llm)
    return {"preemptions": int(preemptions), "solo_differs_from_batch": sum(a != b for a, b in zip(solo1, batch)),
            "solo_runs_differ": sum(a != b for a, b in zip(solo1, solo2)), "resent": NUM_RESENT}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_tidar.benchmarks.seeded_repro", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    load = os.getloadavg()[0]
    rows = []
    for name, kw in METHODS.items():
        for label, blocks in (("small KV (preempts)", SMALL_KV_BLOCKS), ("ample KV", None)):
            rows.append({"method": name, "kv": label, **measure(args.checkpoint, kw, blocks)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_name(), "load_average": [load, os.getloadavg()[0]], "temperature": 0.8,
            "requests": NUM_REQUESTS, "max_tokens": MAX_TOKENS}
    (out / "seeded_repro_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Seeded sampling under preemption ({meta['machine']}, load average {load:.2f} -> {os.getloadavg()[0]:.2f})", "",
             f"{NUM_REQUESTS} seeded requests at T=0.8 x {MAX_TOKENS} tokens in one batch, then {NUM_RESENT} re-sent alone twice.", "",
             "| method | KV cache | preemptions | solo != batch | solo run 1 != run 2 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['kv']} | {r['preemptions']} | {r['solo_differs_from_batch']}/{r['resent']} | "
              f"{r['solo_runs_differ']}/{r['resent']} |" for r in rows]
    (out / "seeded_repro_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
