"""Batch-1 tokens/s of plain AR vs TiDAR with the PyTorch reference decoder on a GPU.

    python -m vllm_tidar.benchmarks.gpu.reference_speed [--checkpoint CKPT] [--prompts 16]
        [--max-tokens 128] [--dtypes float32,bfloat16] [--attention sdpa,flex] [--out FILE.json]

Same checkpoint, prompts (HumanEval) and decoder for both modes; greedy, no EOS stop.
Prints tokens/s, tokens per forward (TPF), the speedup and the conversion ratio
speedup / TPF (the paper reports 0.63-0.72), and how many outputs equal AR's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vllm_tidar.checkpoint import DEMO_CHECKPOINT, load_tidar
from vllm_tidar.reference import ReferenceDecoder
from vllm_tidar.tokens_per_forward import humaneval_prompts

DEMO = str(DEMO_CHECKPOINT)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run(checkpoint: str, prompts: list[str], max_tokens: int, dtype: str, attention: str, device: str) -> dict:
    model, tok, settings = load_tidar(checkpoint, dtype=getattr(torch, dtype), device=device, attention=attention)
    dec = ReferenceDecoder(model, settings)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for mode in ("ar", "tidar"):  # warm-up (and flex compilation)
        dec.generate(ids[0], 16, mode=mode)
    row = {"dtype": dtype, "attention": attention, "device": torch.cuda.get_device_name() if device == "cuda" else device}
    outs = {}
    for mode in ("ar", "tidar"):
        tokens = forwards = 0
        elapsed = 0.0
        outs[mode] = []
        for p in ids:
            _sync(dec.device)
            t0 = time.perf_counter()
            res = dec.generate(p, max_tokens, mode=mode)
            _sync(dec.device)
            elapsed += time.perf_counter() - t0
            tokens += len(res.token_ids)
            forwards += res.num_forwards
            outs[mode].append(res.token_ids)
        row[mode] = {"tokens_per_s": tokens / elapsed, "tokens_per_forward": tokens / forwards,
                     "ms_per_forward": 1e3 * elapsed / forwards, "tokens": tokens}
    row["speedup"] = row["tidar"]["tokens_per_s"] / row["ar"]["tokens_per_s"]
    row["conversion_ratio"] = row["speedup"] / row["tidar"]["tokens_per_forward"]
    row["identical_to_ar"] = sum(a == b for a, b in zip(outs["ar"], outs["tidar"]))
    row["prompts"] = len(ids)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=DEMO)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--attention", default="sdpa,flex")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prompts = humaneval_prompts(args.prompts)
    rows = []
    for dtype in args.dtypes.split(","):
        for attention in args.attention.split(","):
            row = run(args.checkpoint, prompts, args.max_tokens, dtype, attention, args.device)
            rows.append(row)
            print(f"{row['device']} {dtype:8s} {attention:4s} | AR {row['ar']['tokens_per_s']:7.1f} tok/s "
                  f"({row['ar']['ms_per_forward']:.2f} ms/fwd) | TiDAR {row['tidar']['tokens_per_s']:7.1f} tok/s "
                  f"({row['tidar']['ms_per_forward']:.2f} ms/fwd, TPF {row['tidar']['tokens_per_forward']:.2f}) | "
                  f"speedup {row['speedup']:.2f}x, conversion {row['conversion_ratio']:.2f} | "
                  f"identical to AR {row['identical_to_ar']}/{row['prompts']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
