"""Memory of one training step, plain AR (S tokens) vs TiDAR (doubled, 2S), with and without activation checkpointing.

Measured with torch's own ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which follows
every tensor the step allocates and labels it (parameters, gradients, activations, temporaries), on
any device, CPU included. ``python -m vllm_tidar.activation_memory --config CKPT`` prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from .distributed import checkpoint_activations
from .layout import TrainingLayout
from .objective import tidar_loss

MIB = 2**20


def step_memory(model, tokens: torch.Tensor, mode: str, block_len: int, mask_id: int) -> dict:
    """MiB: ``kept`` (activations alive after the forward, i.e. saved for backward) and ``peak`` (all
    tracked tensors, parameters and gradients included, at the step's high-water mark)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        if mode == "tidar":
            loss = tidar_loss(model, tokens, TrainingLayout(tokens.shape[1], block_len), mask_id, 1.0)[0]
        else:
            logits = model(input_ids=tokens, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        (after_forward,) = tracker.get_tracker_snapshot("current").values()  # one device
        loss.backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return {"kept": after_forward[_MemRefType.ACT] / MIB, "peak": peak["Total"] / MIB}


def measure(model, seq_len: int, batch_size: int, block_len: int, mask_id: int) -> list[dict]:
    """One row per (mode, activation checkpointing) on copies of ``model``."""
    tokens = torch.randint(2, model.config.vocab_size, (batch_size, seq_len))
    rows = []
    for ac in (False, True):
        m = copy.deepcopy(model).train()
        if ac:
            checkpoint_activations(m)
        for mode in ("ar", "tidar"):
            m.zero_grad(set_to_none=True)
            rows.append({"mode": mode, "activation_checkpointing": ac, **step_memory(m, tokens, mode, block_len, mask_id)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    p = argparse.ArgumentParser(prog="python -m vllm_tidar.activation_memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="checkpoint folder (its config.json; weights are random-init)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-length", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.config, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    rows = measure(model, args.seq_len, args.batch_size, args.block_length, mask_id=1)
    print(f"{args.config}: seq_len {args.seq_len}, batch {args.batch_size}, fp32, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters\n")
    print("| step | activation checkpointing | activations kept for backward (MiB) | step peak, all tensors (MiB) |")
    print("|---|---|---:|---:|")
    for r in rows:
        step = "plain AR (S tokens)" if r["mode"] == "ar" else "TiDAR (2S tokens)"
        print(f"| {step} | {'on' if r['activation_checkpointing'] else 'off'} | {r['kept']:.1f} | {r['peak']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
