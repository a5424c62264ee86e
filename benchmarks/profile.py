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
  at ``q = 1`` (``profile_analysis.recommend_block_length``: a pure function, see its docstring for how
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
    (``model_runner._model_forward``) plus ``compute_logits`` over all ``b*q`` rows (an
    upper bound: the engine runs the lm_head on a TiDAR step's ``2K+1`` verify and accepted
    draft rows, not all ``L``; vLLM itself only computes the last row of a prefill, so the
    profiler runs ``compute_logits`` once more on all rows, timed separately and added). Positions beyond the checkpoint's ``max_position_embeddings``
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

Code: this module (options, orchestration); ``profile_vllm.py`` and ``profile_hf.py`` (the
backends), ``random_configs.py``, ``profile_analysis.py`` (the recommendation),
``profile_report.py`` (the output files).
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a script: keep benchmarks/ off sys.path (it would shadow stdlib `profile`)
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from vllm_tidar.benchmarks.profile_analysis import DEFAULT_TOLERANCE, STATS, analyse
from vllm_tidar.benchmarks.profile_hf import build_random_model, load_hf_model, time_hf
from vllm_tidar.benchmarks.profile_report import write_outputs
from vllm_tidar.benchmarks.profile_vllm import time_vllm
from vllm_tidar.benchmarks.random_configs import RANDOM_CONFIGS
from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.errors import TidarError

DEFAULT_QUERY_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEFAULT_CONTEXTS = (1024, 2048, 4096)
DEFAULT_BATCH_SIZES = (1, 4)


# =========================================================================================
# Option parsing
# =========================================================================================
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


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def describe_machine(device: str = "cpu") -> str:
    """E.g. '2-core AMD EPYC CPU (x86_64)' or 'NVIDIA H200 GPU (+ 16-core ... CPU)'."""
    from vllm_tidar.cpu_runtime import cpu_model

    cpu = cpu_model() or platform.processor() or "unknown"
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
