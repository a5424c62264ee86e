"""The profiler's ``vllm`` backend: forward latency through the vLLM model runner that serves TiDAR."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

from vllm_tidar.errors import TidarError


class _ForwardTimer:
    """Wraps ``model_runner._model_forward``: times the forward, then ``compute_logits``
    over every row (an upper bound of what a TiDAR step needs), and records the number of tokens (CPU: no
    device sync)."""

    def __init__(self, runner):
        self.runner, self.model = runner, runner.model
        self.orig = runner._model_forward
        self.records: list[dict] = []
        runner._model_forward = self

    def __call__(self, *args, **kwargs):
        import torch

        ids = kwargs.get("input_ids")
        n = int(ids.shape[0]) if ids is not None else None
        t0 = time.perf_counter()
        hidden = self.orig(*args, **kwargs)
        t1 = time.perf_counter()
        logits_s = None
        if isinstance(hidden, torch.Tensor):
            self.model.compute_logits(hidden)  # leaves the step detection vLLM's own call reads
            logits_s = time.perf_counter() - t1
        self.records.append(dict(tokens=n, forward_ms=(t1 - t0) * 1e3,
                                 logits_ms=None if logits_s is None else logits_s * 1e3,
                                 threads=torch.get_num_threads()))
        return hidden

    def restore(self):
        self.runner._model_forward = self.orig


def vllm_max_model_len(max_ctx: int, max_q: int, multiple: int = 128) -> int:
    """max_model_len for prompts of ``max_ctx + max_q`` tokens plus the one output token
    vLLM requires room for (``max_tokens=1``), rounded up to ``multiple``."""
    need = max_ctx + max_q + 1
    return -(-need // multiple) * multiple


def time_vllm(checkpoint, contexts, batch_sizes, query_tokens, repeats, warmup, dtype="float32", seed=0, log=None,
              kv_cache_gib=None):
    """Latency samples through the vLLM runner that serves TiDAR (see the module docstring).

    Returns ``(points, meta)``; ``points[(ctx, b, q)] = {"samples_ms", "forward_ms", "logits_ms"}``."""
    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    max_ctx, max_q, max_b = max(contexts), max(query_tokens), max(batch_sizes)
    trained_len = int(cfg.get("max_position_embeddings", 0) or 0)
    max_len = vllm_max_model_len(max_ctx, max_q)
    hf_overrides: dict = {}
    if "tidar" in cfg:
        hf_overrides["tidar_mode"] = "ar"
    if trained_len and max_len > trained_len:
        hf_overrides["max_position_embeddings"] = max_len
    # KV cache: max_b prompts of max_ctx tokens + the fresh tokens of one step, with room to spare
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elt = 4 if dtype in ("float32", "fp32") else 2
    kv_bytes = cfg["num_hidden_layers"] * 2 * heads * head_dim * elt * max_b * (max_ctx + 2 * max_q)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if kv_cache_gib is None:
        kv_cache_gib = max(1, math.ceil(3 * kv_bytes / 2**30))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    import vllm
    from vllm import LLM, SamplingParams

    from vllm_tidar.plugin.common import close_llm, engine_runner

    llm = LLM(
        model=str(checkpoint),
        enforce_eager=True,
        max_model_len=max_len,
        dtype=dtype,
        seed=seed,
        enable_prefix_caching=True,
        max_num_batched_tokens=max(max_b * max_q, max_len),
        max_num_seqs=max(max_b, 1),
        hf_overrides=hf_overrides or None,
    )
    timer = None
    try:
        vcfg = llm.llm_engine.vllm_config
        block = vcfg.cache_config.block_size
        bad = [c for c in contexts if c % block]
        if bad:
            raise TidarError(f"--contexts must be multiples of the KV block size {block} (prefix caching caches "
                             f"whole blocks); got {bad}")
        runner = engine_runner(llm)
        model = runner.model
        vocab = vcfg.model_config.hf_config.vocab_size
        mask_id = (cfg.get("tidar") or {}).get("mask_token_id")
        rng = random.Random(seed)

        def fresh(n):
            out = []
            while len(out) < n:
                t = rng.randrange(2, vocab)
                if t != mask_id:
                    out.append(t)
            return out

        sp = SamplingParams(max_tokens=1, temperature=0.0)
        prompts = [fresh(max_ctx) for _ in range(max_b)]  # each request has its own context
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        if log:
            log(f"prefilled {max_b} x {max_ctx} tokens in {time.perf_counter() - t0:.1f} s")
        timer = _ForwardTimer(runner)

        def measure(ctx, b, q):
            timer.records.clear()
            reqs = [{"prompt_token_ids": prompts[i][:ctx] + fresh(q)} for i in range(b)]
            outs = llm.generate(reqs, sp, use_tqdm=False)
            cached = [o.num_cached_tokens for o in outs]
            recs = [r for r in timer.records if r["tokens"] == b * q]
            if len(timer.records) != 1 or not recs or any(c != ctx for c in cached):
                raise TidarError(
                    f"ctx={ctx} batch={b} q={q}: expected one forward of {b * q} tokens over {ctx} cached tokens per "
                    f"request, got forwards of {[r['tokens'] for r in timer.records]} tokens and cached {cached} "
                    "(KV cache too small? raise VLLM_CPU_KVCACHE_SPACE)"
                )
            return recs[0]

        points = {}
        for ctx in contexts:
            for b in batch_sizes:
                t0 = time.perf_counter()
                for _ in range(warmup):
                    for q in query_tokens:
                        measure(ctx, b, q)
                raw = {q: [] for q in query_tokens}
                for _ in range(repeats):  # round-robin over q: drifts spread over all points
                    for q in query_tokens:
                        raw[q].append(measure(ctx, b, q))
                for q, recs in raw.items():
                    points[(ctx, b, q)] = dict(
                        samples_ms=[r["forward_ms"] + (r["logits_ms"] or 0.0) for r in recs],
                        forward_ms=[r["forward_ms"] for r in recs],
                        logits_ms=[r["logits_ms"] for r in recs],
                        mode="eager",
                    )
                if log:
                    log(f"ctx {ctx} batch {b}: {len(query_tokens)} points in {time.perf_counter() - t0:.1f} s")
        threads = timer.records[-1]["threads"] if timer.records else None
        meta = dict(
            block_size=block,
            max_model_len=max_len,
            hf_overrides=hf_overrides,
            trained_max_position_embeddings=trained_len or None,
            beyond_trained_length=bool(trained_len and max_ctx + max_q > trained_len),
            architecture=(cfg.get("architectures") or [None])[0],
            model_class=f"{type(model).__module__}.{type(model).__name__}",
            attention_backend=_attention_backend_name(model),
            torch_threads_in_forward=threads,
            kv_cache_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            vllm_version=vllm.__version__,
        )
        return points, meta
    finally:
        if timer is not None:
            timer.restore()
        close_llm(llm)


def _attention_backend_name(model) -> str | None:
    for m in model.modules():
        impl = getattr(m, "impl", None)
        if impl is not None and hasattr(m, "attn_backend"):
            b = m.attn_backend
            return f"{b.__module__}.{b.__name__}"
    return None
