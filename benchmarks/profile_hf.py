"""The profiler's ``hf`` backend: forward latency of a plain transformers model over a StaticCache."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vllm_tidar.errors import TidarError

from .random_configs import RANDOM_CONFIGS


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


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
