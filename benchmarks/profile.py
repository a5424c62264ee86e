"""``vllm-tidar profile``: the free-token-slot profiler (forward latency vs query tokens).

A TiDAR decode step runs ``L = Bl*(1+Bl)`` query tokens per request through one forward
(block length ``Bl``). That only pays if, on the hardware at hand, a forward with ``L``
query tokens costs about what a forward with one costs (the paper's Fig. 1: latency vs
query tokens is flat up to some point, then grows). This command measures that curve and
recommends a block length:

* for each context ``ctx`` (``--contexts``), batch size ``b`` (``--batch-sizes``) and number
  of query tokens per request ``q`` (``--query-tokens``): the latency of one forward that
  runs ``q`` new tokens for each of ``b`` requests, each over its own ``ctx`` cached tokens;
* the recommended block length of a setting: the largest ``Bl >= 2`` whose
  ``L = Bl*(1+Bl)`` keeps the latency within ``--tolerance`` (default 10 %) of the latency
  at ``q = 1`` (``recommend_block_length``: a pure function, see its docstring for how
  noise and grids without ``q = L`` are handled); overall: the most conservative one over
  all settings, or the one of ``--recommend-for CTX:BATCH``;
* writes ``NAME.md`` (tables), ``NAME.json`` (every sample) and ``NAME.png`` (the curves,
  one panel per batch size, one line per context; needs matplotlib) to ``--out``.

Backends (``--backend``):

``vllm`` (default): the vLLM model runner that serves TiDAR, in-process, with the TiDAR
    model class and attention backend of this plugin (the checkpoint is served with
    ``tidar_mode="ar"``: same class and attention backend, no proposer, so that the
    scheduled step is exactly what is asked for). Prefix caching puts ``ctx`` tokens of
    context in the paged KV cache: ``b`` distinct random prompts of ``max(ctx)`` tokens are
    prefilled once; then each measurement submits, for each of the ``b`` requests, its own
    first ``ctx`` tokens + ``q`` fresh random tokens (``max_tokens=1``), so the scheduled
    step computes exactly ``q`` query tokens per request over ``ctx`` cached ones (checked:
    the forward must see ``b*q`` tokens and every request ``ctx`` cached tokens; ``ctx``
    must be a multiple of the KV block size). Timed: the model forward
    (``model_runner._model_forward``) plus ``compute_logits`` over all ``b*q`` rows (a
    TiDAR step needs the logits of every row; vLLM itself only computes the last row of a
    prefill, so the profiler runs ``compute_logits`` once more on all rows, timed
    separately and added). Positions beyond the checkpoint's ``max_position_embeddings``
    are allowed through ``hf_overrides`` (outputs there are meaningless; the cost is real).
``hf``: a plain transformers model (no vLLM import; works where vLLM is absent, e.g. a GPU
    machine with torch + transformers only), ``--checkpoint`` or a random-init model from
    ``--random-config NAME`` (built from a config, nothing downloaded), on ``--device``
    (``cuda``: ``torch.cuda.synchronize()`` around each timed forward). For each
    ``(ctx, b, q)`` a ``StaticCache`` of exactly ``ctx + q`` slots is prefilled with ``ctx``
    tokens (untimed); the timed forward writes the ``q`` new tokens in place and computes
    logits for all rows. Attention is causal (HF has no TiDAR template mask; the cost of a
    dense mask of the same shape is the same). Eager HF on a GPU is launch-bound at small
    ``q``: ``--cuda-graph`` captures each forward in a CUDA graph (falls back to eager if
    capture fails; the mode used is recorded).

Each point: ``--warmup`` untimed runs, then ``--repeats`` timed runs; the table shows the
median. On the vLLM backend the repeats go round-robin over ``q`` so that slow drifts of
a shared machine spread over all points.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a script: keep benchmarks/ off sys.path (it would shadow stdlib `profile`)
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.errors import TidarError

DEFAULT_QUERY_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEFAULT_CONTEXTS = (1024, 2048, 4096)
DEFAULT_BATCH_SIZES = (1, 4)
DEFAULT_TOLERANCE = 0.10

# Random-init model configs (sizes of the public models; nothing is downloaded).
RANDOM_CONFIGS: dict[str, dict] = {
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1e6, max_position_embeddings=32768),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1e6, max_position_embeddings=32768),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                     rope_theta=1e6, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=5e5, max_position_embeddings=131072),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=5e5, max_position_embeddings=131072),
    # for tests
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                       max_position_embeddings=4096),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                       max_position_embeddings=4096),
}


# =========================================================================================
# Recommendation (pure functions, no torch)
# =========================================================================================
STATS = {"median": statistics.median, "min": min}


def tidar_query_tokens(block_length: int) -> int:
    """L, the query tokens per request of a full TiDAR step: ``Bl * (1 + Bl)``."""
    return block_length * (1 + block_length)


def isotonic_fit(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool-adjacent-violators) of ``values`` in order.

    Forward latency cannot really fall when query tokens are added, so a dip is noise;
    pooling it with its neighbours keeps one noisy point from either cutting the
    recommendation short (a spike) or stretching it (a low baseline)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out.extend([s / n] * int(n))
    return out


def _interp(x: float, xs: list[int], ys: list[float]) -> float | None:
    """Linear interpolation of ``ys(xs)`` at ``x`` (``xs`` increasing); None outside."""
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            if xs[i + 1] == xs[i]:
                return ys[i]
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return ys[-1]


def recommend_block_length(
    query_tokens,
    latencies,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    interpolate: bool = True,
    monotone: bool = True,
    stat: str = "median",
) -> dict:
    """Largest block length whose TiDAR step stays within ``tolerance`` of a 1-token forward.

    ``query_tokens``: the measured ``q`` values (must include 1); ``latencies``: per ``q``,
    a latency or a list of repeated samples (reduced with ``stat``: ``"median"`` (default) or
    ``"min"``). Rules:

    * noise: medians (or minima) first, then (``monotone=True``) a non-decreasing least-squares fit
      (``isotonic_fit``); the baseline is the fit at ``q = 1``;
    * ``Bl`` qualifies if ``fit(Bl*(1+Bl)) <= (1 + tolerance) * fit(1)``; a tie (exactly on
      the threshold, up to 1e-9 relative) qualifies;
    * the answer is the last ``Bl`` of the unbroken run of qualifying ``Bl = 2, 3, ...``
      (with the monotone fit this is simply the largest qualifying one);
    * ``q = Bl*(1+Bl)`` off the grid: ``interpolate=True`` (default) interpolates the fit
      linearly between the two neighbouring grid points (forward cost is close to
      piecewise linear in ``q``); ``interpolate=False`` only considers ``Bl`` whose ``L`` was
      measured. Never extrapolated: ``L`` above the largest ``q`` is not considered, so the
      grid caps the answer (``max_block_length``).

    Returns a dict: ``block_length`` (None if not even ``Bl = 2`` qualifies), ``L``,
    ``baseline_ms``, ``threshold_ms``, ``latency_at_L_ms`` (fitted), ``ratio``,
    ``measured`` (``L`` is a grid point), ``max_block_length`` (largest ``Bl`` the grid can
    judge), ``capped`` (the answer is the grid's limit, the true one may be larger),
    ``candidates`` (every ``Bl`` considered with its ``L``, fitted latency, ratio, ok) and
    ``fit`` (the fitted curve, per grid point).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pairs = sorted(zip(query_tokens, latencies), key=lambda p: p[0])
    qs = [int(q) for q, _ in pairs]
    if len(set(qs)) != len(qs):
        raise ValueError(f"duplicate query-token counts in {qs}")
    if not qs or qs[0] != 1:
        raise ValueError("the grid must include q = 1 (the baseline)")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {sorted(STATS)}, got {stat!r}")
    meds = []
    for q, lat in pairs:
        v = STATS[stat](lat) if isinstance(lat, (list, tuple)) else float(lat)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"latency at q={q} must be a positive number, got {v}")
        meds.append(v)
    fit = isotonic_fit(meds) if monotone else list(meds)
    base = fit[0]
    threshold = (1.0 + tolerance) * base
    grid = set(qs)
    candidates = []
    best = None
    max_bl = None
    bl = 2
    while tidar_query_tokens(bl) <= qs[-1]:
        big_l = tidar_query_tokens(bl)
        measured = big_l in grid
        if measured:
            lat = fit[qs.index(big_l)]
        elif interpolate:
            lat = _interp(big_l, qs, fit)
        else:
            bl += 1
            continue
        max_bl = bl
        ok = lat <= threshold * (1 + 1e-9)
        candidates.append(dict(block_length=bl, L=big_l, latency_ms=lat, ratio=lat / base, ok=ok, measured=measured))
        bl += 1
    for c in candidates:  # unbroken run from the smallest Bl
        if not c["ok"]:
            break
        best = c
    return dict(
        block_length=best["block_length"] if best else None,
        L=best["L"] if best else None,
        baseline_ms=base,
        threshold_ms=threshold,
        latency_at_L_ms=best["latency_ms"] if best else None,
        ratio=best["ratio"] if best else None,
        measured=best["measured"] if best else None,
        max_block_length=max_bl,
        capped=best is not None and best["block_length"] == max_bl,
        tolerance=tolerance,
        stat=stat,
        candidates=candidates,
        fit={q: f for q, f in zip(qs, fit)},
    )


def overall_recommendation(per_setting: dict, target=None) -> dict:
    """Overall block length from per-setting recommendations ``{(ctx, batch): rec}``.

    ``target=(ctx, batch)``: that setting's answer. Otherwise the most conservative one
    (smallest block length; a setting with none gives none)."""
    if not per_setting:
        raise ValueError("no settings measured")
    if target is not None:
        target = tuple(target)
        if target not in per_setting:
            raise ValueError(f"setting {target} was not measured (have {sorted(per_setting)})")
        rec = per_setting[target]
        return dict(block_length=rec["block_length"], L=rec["L"], setting=list(target), rule="named setting")
    key = min(per_setting, key=lambda k: (-1 if per_setting[k]["block_length"] is None else per_setting[k]["block_length"], k))
    rec = per_setting[key]
    return dict(block_length=rec["block_length"], L=rec["L"], setting=list(key), rule="most conservative over all settings")


# =========================================================================================
# Timing helpers
# =========================================================================================
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    return int(float(t) * mult)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(_parse_size(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (1k = 1024 allowed), got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(vals)))


def _setting(text: str) -> tuple[int, int]:
    try:
        ctx, b = text.replace("x", ":").split(":")
        return _parse_size(ctx), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CTX:BATCH (e.g. 2k:4), got {text!r}") from None


def _torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise TidarError(f"unknown dtype {name!r} (use one of {', '.join(table)})")
    return table[name]


# --- HF backend --------------------------------------------------------------------------
def build_random_model(name: str, dtype, device: str = "cpu", seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-init causal LM of one of ``RANDOM_CONFIGS`` (nothing downloaded)."""
    import torch
    import transformers

    if name not in RANDOM_CONFIGS:
        raise TidarError(f"unknown --random-config {name!r} (have {', '.join(RANDOM_CONFIGS)})")
    spec = dict(RANDOM_CONFIGS[name])
    family = spec.pop("model_type")
    cls_cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cls_model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    rope_theta = spec.pop("rope_theta", None)
    cfg = cls_cfg(**spec, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if rope_theta is not None:
        rp = getattr(cfg, "rope_parameters", None)
        if isinstance(rp, dict):
            rp["rope_theta"] = rope_theta
        else:
            cfg.rope_theta = rope_theta
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls_model(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def load_hf_model(checkpoint: str, dtype, device: str, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise TidarError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval()


def _hf_forward_fn(model, cache, new_ids, ctx, q, device, cuda_graph: bool):
    """Return ``(run, reset, mode)``: ``run()`` is one timed forward that writes the ``q``
    new tokens at ``ctx..ctx+q-1`` of ``cache`` in place; ``reset()`` (untimed, before each
    run) puts the cache's write position back to ``ctx`` where the transformers version
    tracks it in the layers (``cumulative_length``; older versions use ``cache_position``)."""
    import torch

    cache_position = torch.arange(ctx, ctx + q, device=device)
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    int_layers = [layer for layer in getattr(cache, "layers", [])
                  if isinstance(getattr(layer, "cumulative_length", None), int)]

    def reset():
        for c in counters:
            c.fill_(ctx)
        for layer in int_layers:
            layer.cumulative_length = ctx

    def run():
        return model(input_ids=new_ids, past_key_values=cache, cache_position=cache_position, use_cache=True).logits

    if not cuda_graph:
        return run, reset, "eager"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                reset()
                run()
        torch.cuda.current_stream().wait_stream(s)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        torch.cuda.synchronize()
        return graph.replay, reset, "cuda-graph"
    except Exception as e:  # noqa: BLE001  (capture is best effort)
        print(f"profile: CUDA graph capture failed at ctx={ctx} q={q} ({type(e).__name__}: {str(e)[:200]}); eager",
              file=sys.stderr)
        torch.cuda.synchronize()
        return run, reset, "eager"


def time_hf(model, contexts, batch_sizes, query_tokens, repeats, warmup, device, seed=0, cuda_graph=False, log=None):
    """Latency samples (ms) of an HF model forward of ``q`` new tokens per request over a KV
    cache of ``ctx`` tokens: ``{(ctx, b, q): {"samples_ms": [...], "mode": ...}}``."""
    import torch
    from transformers import StaticCache

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.inference_mode():
        for ctx in contexts:
            for b in batch_sizes:
                prefix = torch.randint(0, vocab, (b, ctx), generator=gen).to(device)
                t0 = time.perf_counter()
                for q in query_tokens:
                    cache = StaticCache(config=model.config, max_cache_len=ctx + q)
                    model(input_ids=prefix, past_key_values=cache, cache_position=torch.arange(ctx, device=device),
                          use_cache=True, logits_to_keep=1)
                    new_ids = torch.randint(0, vocab, (b, q), generator=gen).to(device)
                    fn, reset, mode = _hf_forward_fn(model, cache, new_ids, ctx, q, device, cuda_graph)
                    if cuda_graph and mode != "cuda-graph":
                        cuda_graph = False  # capture does not work for this model: eager from here on
                    for _ in range(warmup):
                        reset()
                        fn()
                    samples = []
                    for _ in range(repeats):
                        reset()
                        _sync(device)
                        t = time.perf_counter()
                        fn()
                        _sync(device)
                        samples.append((time.perf_counter() - t) * 1e3)
                    out[(ctx, b, q)] = dict(samples_ms=samples, mode=mode)
                    del cache, fn
                if log:
                    log(f"ctx {ctx} batch {b}: {len(query_tokens)} points in {time.perf_counter() - t0:.1f} s")
    return out


# --- vLLM backend ------------------------------------------------------------------------
class _ForwardTimer:
    """Wraps ``model_runner._model_forward``: times the forward, then ``compute_logits``
    over every row (what a TiDAR step needs), and records the number of tokens."""

    def __init__(self, runner, device="cpu"):
        self.runner, self.model, self.device = runner, runner.model, device
        self.orig = runner._model_forward
        self.records: list[dict] = []
        runner._model_forward = self

    def __call__(self, *args, **kwargs):
        import torch

        ids = kwargs.get("input_ids")
        n = int(ids.shape[0]) if ids is not None else None
        _sync(self.device)
        t0 = time.perf_counter()
        hidden = self.orig(*args, **kwargs)
        _sync(self.device)
        t1 = time.perf_counter()
        logits_s = None
        if isinstance(hidden, torch.Tensor):
            saved = getattr(self.model, "_tidar_last", None)
            self.model.compute_logits(hidden)
            _sync(self.device)
            logits_s = time.perf_counter() - t1
            if hasattr(self.model, "_tidar_last"):
                self.model._tidar_last = saved
        self.records.append(dict(tokens=n, forward_ms=(t1 - t0) * 1e3,
                                 logits_ms=None if logits_s is None else logits_s * 1e3,
                                 threads=torch.get_num_threads()))
        return hidden

    def restore(self):
        self.runner._model_forward = self.orig


def _vllm_runner(llm):
    core = llm.llm_engine.engine_core.engine_core  # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    return core.model_executor.driver_worker.worker.model_runner


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
    from vllm import LLM, SamplingParams

    from vllm_tidar.plugin.common import close_llm

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
        runner = _vllm_runner(llm)
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
            vllm_version=_version("vllm"),
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


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def describe_machine(device: str = "cpu") -> str:
    """E.g. '2-core AMD EPYC CPU (x86_64)' or 'NVIDIA H200 GPU (+ 16-core ... CPU)'."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    cores = os.cpu_count()
    text = f"{cores}-core {cpu} CPU ({platform.machine()})"
    if str(device).startswith("cuda"):
        try:
            import torch

            text = f"{torch.cuda.get_device_name()} GPU, host {text}"
        except Exception:  # noqa: BLE001
            pass
    return text


# =========================================================================================
# Output
# =========================================================================================
def analyse(points: dict, tolerance: float, interpolate: bool = True, target=None, stat: str = "median") -> dict:
    """Per-setting and overall recommendations from ``{(ctx, b, q): {"samples_ms": ...}}``."""
    settings = sorted({(c, b) for c, b, _ in points})
    per = {}
    for ctx, b in settings:
        qs = sorted(q for c, bb, q in points if (c, bb) == (ctx, b))
        per[(ctx, b)] = recommend_block_length(qs, [points[(ctx, b, q)]["samples_ms"] for q in qs], tolerance,
                                               interpolate=interpolate, stat=stat)
    return dict(per_setting=per, overall=overall_recommendation(per, target))


def _fmt_bl(rec) -> str:
    if rec["block_length"] is None:
        return "none"
    return f"{rec['block_length']}" + (" (grid limit)" if rec["capped"] else "")


def write_markdown(result: dict, path: Path) -> None:
    meta, points, an = result["meta"], result["points_by_key"], result["analysis"]
    contexts = sorted({c for c, _, _ in points})
    batches = sorted({b for _, b, _ in points})
    qs = sorted({q for _, _, q in points})
    tol, stat = meta["tolerance"], meta["stat"]
    lines = [
        f"# Free token slots: forward latency vs query tokens per request ({meta['backend']} backend)",
        "",
        f"- Machine: **{meta['machine']}**",
        f"- Model: {meta['model']} ({meta['dtype']}); backend `{meta['backend']}`"
        + (f", model class `{meta['model_class']}`, attention `{meta['attention_backend']}`" if meta.get("model_class") else ""),
        f"- Measured {meta['date']}: {meta['repeats']} timed runs per point ({meta['stat']} shown), {meta['warmup']} warm-up; "
        f"{meta['elapsed_s']:.0f} s in all; torch threads in the forward: {meta.get('torch_threads_in_forward')}"
        + (f"; load average (1/5/15 min) {meta['load_average']['start']} at start, {meta['load_average']['end']} at end"
           if (meta.get("load_average") or {}).get("start") else ""),
        f"- Latency = {meta['timed']}",
        f"- Command: `{meta['command']}`",
    ]
    if meta.get("beyond_trained_length"):
        lines.append(f"- Positions beyond the checkpoint's trained length ({meta['trained_max_position_embeddings']}) "
                     "were enabled (hf_overrides): outputs there are meaningless, the cost is real.")
    if meta.get("note"):
        lines.append(f"- {meta['note']}")
    lines += ["", "Latency in ms (x = ratio to q = 1). TiDAR's L = Bl(1+Bl): " + ", ".join(
        f"Bl={bl}: {tidar_query_tokens(bl)}" for bl in range(2, 23) if tidar_query_tokens(bl) <= max(qs)) + "."]
    for b in batches:
        lines += ["", f"## Batch {b}", "", "| q | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
                  "|---:|" + "---:|" * len(contexts)]
        for q in qs:
            cells = []
            for c in contexts:
                p = points.get((c, b, q))
                if p is None:
                    cells.append("")
                    continue
                base = STATS[stat](points[(c, b, qs[0])]["samples_ms"])
                med = STATS[stat](p["samples_ms"])
                cells.append(f"{med:.2f} ({med / base:.2f}x)")
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
    lines += ["", f"## Recommended block length (tolerance {tol:.0%})", "",
              f"Largest Bl with latency(q = Bl(1+Bl)) <= (1 + {tol:g}) x latency(q = 1), on a non-decreasing fit of "
              f"the {stat} latencies; q = L between grid points is " + ("interpolated linearly." if meta["interpolate"] else
                                                             "not judged (grid points only)."),
              "", "| context | batch | latency q=1 (ms) | Bl | L | latency at L (ms) | ratio | next Bl: ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (c, b), rec in sorted(an["per_setting"].items()):
        nxt = next((x for x in rec["candidates"] if not x["ok"]), None)
        lat = "" if rec["latency_at_L_ms"] is None else f"{rec['latency_at_L_ms']:.2f}" + ("" if rec["measured"] else " (interp.)")
        ratio = "" if rec["ratio"] is None else f"{rec['ratio']:.2f}"
        nxt_s = f"Bl={nxt['block_length']}: {nxt['ratio']:.2f}" if nxt else "-"
        lines.append(f"| {c} | {b} | {rec['baseline_ms']:.2f} | {_fmt_bl(rec)} | {rec['L'] or ''} | {lat} | {ratio} | {nxt_s} |")
    ov = an["overall"]
    if ov["block_length"] is None:
        verdict = ("**none**: even Bl = 2 (L = 6) costs more than the tolerance over a 1-token forward in "
                   f"setting ctx {ov['setting'][0]}, batch {ov['setting'][1]}: no free token slots here")
    else:
        verdict = f"**Bl = {ov['block_length']}** (L = {ov['L']}), set by ctx {ov['setting'][0]}, batch {ov['setting'][1]}"
    lines += ["", f"**Overall ({ov['rule']}):** {verdict}.", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta, points, an = result["meta"], result["points_by_key"], result["analysis"]
    contexts = sorted({c for c, _, _ in points})
    batches = sorted({b for _, b, _ in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    ov = an["overall"]
    for ax, b in zip(axes[0], batches):
        for c in contexts:
            qs = sorted(q for cc, bb, q in points if (cc, bb) == (c, b))
            meds = [STATS[meta["stat"]](points[(c, b, q)]["samples_ms"]) for q in qs]
            (line,) = ax.plot(qs, meds, marker="o", ms=3, label=f"ctx {c}")
            rec = an["per_setting"][(c, b)]
            ax.axhline(rec["threshold_ms"], color=line.get_color(), ls=":", lw=0.8)
            if rec["block_length"] is not None:
                ax.plot([rec["L"]], [rec["latency_at_L_ms"]], marker="*", ms=12, color=line.get_color(),
                        markeredgecolor="black", zorder=5)
        if ov["L"]:
            ax.axvline(ov["L"], color="gray", ls="--", lw=1, label=f"recommended L={ov['L']} (Bl={ov['block_length']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("query tokens per request (q)")
        ax.set_ylabel("forward latency (ms)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['model']} on {meta['machine']} ({meta['backend']}, {meta['dtype']}); "
                 f"* = largest Bl within {meta['tolerance']:.0%} (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(result: dict) -> dict:
    stat = STATS[result["meta"]["stat"]]
    pts = [dict(context=c, batch=b, q=q, latency_ms=stat(p["samples_ms"]), min_ms=min(p["samples_ms"]), **p)
           for (c, b, q), p in sorted(result["points_by_key"].items())]
    per = []
    for (c, b), rec in sorted(result["analysis"]["per_setting"].items()):
        r = dict(rec)
        r["fit"] = [dict(q=q, latency_ms=v) for q, v in rec["fit"].items()]
        per.append(dict(context=c, batch=b, **r))
    return dict(meta=result["meta"], points=pts, recommendations=per, overall=result["analysis"]["overall"])


def write_outputs(result: dict, out_dir, name: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / f"{name}.md", "json": out / f"{name}.json", "png": out / f"{name}.png"}
    (files["json"]).write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    write_markdown(result, files["md"])
    if not write_plot(result, files["png"]):
        print("profile: matplotlib is not installed: no plot", file=sys.stderr)
        del files["png"]
    return files


# =========================================================================================
# CLI
# =========================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--checkpoint", default=None, help="default: the demo checkpoint (unless --random-config)")
    p.add_argument("--random-config", default=None, choices=sorted(RANDOM_CONFIGS),
                   help="hf backend: a random-init model of this size (nothing downloaded)")
    p.add_argument("--device", default=None, help="hf backend: cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="default: float32 (vllm, and hf on cpu), bfloat16 (hf on cuda)")
    p.add_argument("--query-tokens", type=_sizes, default=DEFAULT_QUERY_TOKENS,
                   help="q grid, must include 1 (default: %(default)s)")
    p.add_argument("--contexts", type=_sizes, default=DEFAULT_CONTEXTS, help="cached tokens per request (default: 1k,2k,4k)")
    p.add_argument("--batch-sizes", type=_sizes, default=DEFAULT_BATCH_SIZES, help="requests per forward (default: 1,4)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per point first")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed slowdown vs q=1 (default 0.10)")
    p.add_argument("--recommend-for", type=_setting, default=None, metavar="CTX:BATCH",
                   help="overall recommendation for this setting (default: the most conservative one)")
    p.add_argument("--stat", choices=sorted(STATS), default="median",
                   help="statistic of the repeated runs of a point (default: median)")
    p.add_argument("--no-interpolate", action="store_true",
                   help="judge only block lengths whose L = Bl(1+Bl) is on the q grid")
    p.add_argument("--cuda-graph", action="store_true", help="hf backend on cuda: replay each forward as a CUDA graph")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="hf backend: transformers attention implementation (default: sdpa)")
    p.add_argument("--out", default="profile_out", help="output folder (default: %(default)s)")
    p.add_argument("--name", default="profile", help="file name stem: NAME.md, NAME.json, NAME.png")
    p.add_argument("--machine", default=None, help="machine description for the header (default: detected)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> dict:
    """Measure and analyse; returns the result dict (``write_outputs`` writes it)."""
    if 1 not in args.query_tokens:
        raise TidarError("--query-tokens must include 1 (the baseline)")
    if args.repeats < 1 or args.warmup < 0:
        raise TidarError("--repeats must be >= 1 and --warmup >= 0")
    if args.recommend_for is not None and (args.recommend_for[0] not in args.contexts
                                           or args.recommend_for[1] not in args.batch_sizes):
        raise TidarError(f"--recommend-for {args.recommend_for} is not among the measured contexts/batch sizes")

    def log(msg):
        print(f"profile: {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    load_start = _loadavg()
    meta = dict(backend=args.backend, tolerance=args.tolerance, stat=args.stat, interpolate=not args.no_interpolate,
                repeats=args.repeats, warmup=args.warmup,
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                command="vllm-tidar profile " + " ".join(getattr(args, "argv", []) or []),
                torch_version=_version("torch"), transformers_version=_version("transformers"))
    if args.backend == "vllm":
        if args.random_config:
            raise TidarError("--random-config needs --backend hf (the vLLM backend serves a checkpoint)")
        if args.device not in (None, "cpu"):
            raise TidarError("the vLLM backend of this plugin runs on CPU only (use --backend hf for cuda)")
        ckpt = args.checkpoint or str(DEMO_CHECKPOINT)
        if not (Path(ckpt) / "config.json").is_file():
            raise TidarError(f"{ckpt} is not a checkpoint folder (no config.json)")
        dtype = args.dtype or "float32"
        points, vmeta = time_vllm(ckpt, args.contexts, args.batch_sizes, args.query_tokens, args.repeats, args.warmup,
                                  dtype=dtype, seed=args.seed, log=log)
        meta.update(vmeta)
        meta.update(model=_model_name(ckpt), dtype=dtype, device="cpu",
                    timed="vLLM model forward (`model_runner._model_forward`) + `compute_logits` on all b*q rows, "
                          "one scheduled step of q query tokens per request over ctx prefix-cached tokens")
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TidarError("--device cuda but torch sees no CUDA device")
        dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        dtype = _torch_dtype(dtype_name)
        if args.random_config:
            model = build_random_model(args.random_config, dtype, device, seed=args.seed,
                                       attn_implementation=args.attn_implementation)
            name = f"random-init {args.random_config}"
        else:
            ckpt = args.checkpoint or str(DEMO_CHECKPOINT)
            model = load_hf_model(ckpt, dtype, device, attn_implementation=args.attn_implementation)
            name = _model_name(ckpt)
        nparams = sum(p.numel() for p in model.parameters())
        cuda_graph = bool(args.cuda_graph and device.startswith("cuda"))
        points = time_hf(model, args.contexts, args.batch_sizes, args.query_tokens, args.repeats, args.warmup,
                         device, seed=args.seed, cuda_graph=cuda_graph, log=log)
        modes = sorted({p["mode"] for p in points.values()})
        meta.update(model=f"{name} ({nparams / 1e6:.1f}M params)", dtype=dtype_name, device=device,
                    torch_threads_in_forward=torch.get_num_threads() if device == "cpu" else None,
                    attn_implementation=args.attn_implementation,
                    timed=f"HF `model(...)` forward ({'/'.join(modes)}, attention {args.attn_implementation}) of q new "
                          "tokens per request with a StaticCache "
                          "of ctx+q slots prefilled with ctx tokens, logits for all rows"
                          + ("; torch.cuda.synchronize() around each run" if device.startswith("cuda") else ""))
        notes = []
        if device.startswith("cuda") and not cuda_graph:
            notes.append("Eager HF forwards on a GPU are launch-bound at small q (Python and kernel-launch "
                         "overhead), which flattens the curve; compare with --cuda-graph.")
        if device.startswith("cuda"):
            notes.append("HF passes an explicit causal mask over the cache to the attention for every q; a step in "
                         "latency between q = 1 and q = 2 that grows with the context is the kernel PyTorch picks for "
                         "one query row vs several (and GEMV vs GEMM at batch 1), not the work itself: read the "
                         "curve from q = 2 on too, and try --attn-implementation.")
        if notes:
            meta["note"] = " ".join(notes)
    meta["machine"] = args.machine or describe_machine(meta["device"])
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["load_average"] = dict(start=load_start, end=_loadavg())
    target = tuple(args.recommend_for) if args.recommend_for else None
    analysis = analyse(points, args.tolerance, interpolate=not args.no_interpolate, target=target, stat=args.stat)
    return dict(meta=meta, points_by_key=points, analysis=analysis)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _model_name(ckpt) -> str:
    p = Path(ckpt).resolve()
    return "demo checkpoint (vllm_tidar/checkpoints/demo)" if p == DEMO_CHECKPOINT.resolve() else str(ckpt)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    files = write_outputs(result, args.out, args.name)
    print(Path(files["md"]).read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TidarError as e:
        print(f"vllm-tidar profile: error: {e}", file=sys.stderr)
        sys.exit(2)
