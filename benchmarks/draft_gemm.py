"""Mask-row GEMMs of a draft adapter in fp32 against bf16 (``tidar_draft_dtype``) on the CPU.

For each of the demo's four projection shapes (vLLM's fused qkv, o, fused gate-up, down) and
16, 64 and 256 rows (the mask rows of batch 1 / 4 / 16 at Bl=4 K=3, or batch 1 / 4 at Bl=8 K=7),
times vLLM's own CPU GEMM dispatch (``dispatch_cpu_unquantized_gemm``, as the merged weights
are packed) on fp32 weights and on bf16 weights with the fp32 rows cast in and out, and prints
microseconds per call (best of three runs of 300 calls), the ratio and the largest difference.

    python -m benchmarks.draft_gemm
"""

from __future__ import annotations

import time

import torch
from torch import nn

SHAPES = {"qkv": (256, 512), "o": (256, 256), "gate_up": (256, 1536), "down": (768, 256)}  # (in, out)
ROWS = (16, 64, 256)


def _packed(w: torch.Tensor) -> nn.Module:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = nn.Module()
    holder.weight = nn.Parameter(w.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    return holder


def _us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main() -> None:
    from vllm_tidar.cpu_runtime import cpu_model

    torch.manual_seed(0)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}")
    print("| shape | rows | fp32 us | bf16 us (with casts) | fp32 / bf16 | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = {}
    for rows in ROWS:
        for name, (k, n) in SHAPES.items():
            w = torch.randn(n, k) * 0.05
            h32, h16 = _packed(w), _packed(w.to(torch.bfloat16))
            x = torch.randn(rows, k)

            def f32():
                return h32.cpu_linear(x, h32.weight, None)

            def f16():
                return h16.cpu_linear(x.to(torch.bfloat16), h16.weight, None).float()

            diff = (f32() - f16()).abs().max().item()
            a, b = _us(f32), _us(f16)
            t = totals.setdefault(rows, [0.0, 0.0])
            t[0] += a
            t[1] += b
            print(f"| {name} | {rows} | {a:.1f} | {b:.1f} | {a / b:.2f} | {diff:.3g} |")
    for rows, (a, b) in totals.items():
        print(f"| one layer's four | {rows} | {a:.0f} | {b:.0f} | {a / b:.2f} | |")


if __name__ == "__main__":
    main()
