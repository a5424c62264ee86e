"""``vllm-tidar breakdown``: where one vLLM engine step's time goes, AR against TiDAR.

Runs each method in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on HumanEval prompts
at each batch size (all engines alive at once, each batch size on every engine in turn),
wraps the engine's per-step functions with wall-clock timers (CPU: everything is
synchronous, so the timers are exact), and reports the median over decode steps (every
request decoding, none prefilling) of:

* ``schedule`` – ``Scheduler.schedule``;
* ``update`` – ``Scheduler.update_from_output`` (includes the spec-metrics patch);
* ``inputs`` – the runner's ``_update_states`` + ``_prepare_inputs`` (input and attention
  metadata preparation);
* ``attention`` – every attention layer's ``impl.forward`` (the kernel, inside the forward);
* ``forward`` – the rest of ``_model_forward`` (linear layers, norms, RoPE, step detection,
  draft-row stash);
* ``logits`` – ``model.compute_logits`` on the rows vLLM samples (verify rows; mask suppression);
* ``sample`` – ``_sample`` (vLLM's sampler, or the rejection sampler over the real drafts);
* ``propose`` – ``propose_draft_token_ids`` (the proposer, with the lm_head on the accepted
  block's draft rows);
* ``other`` – the rest of ``EngineCore.step`` (bookkeeping, output processing).

A second table splits the linear layers' GEMMs out of ``forward``: per projection, the
wall time of its CPU GEMM calls per step summed over the layers (``base``: vLLM's GEMM on the
layer's own weights; ``merged``: a draft adapter's merged weights, which only mask rows run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.errors import TidarError
from vllm_tidar.plugin.common import engine_runner

from .bench_stats import in_turn

PARTS = ("schedule", "inputs", "attention", "forward", "logits", "sample", "propose", "update", "other")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GEMMS = tuple(f"{p} {kind}" for kind in ("base", "merged") for p in PROJECTIONS)


class StepTimers:
    """Wall-clock timers on the engine's per-step functions; one record per engine step."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore
        self.runner = engine_runner(llm)
        self.acc: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []
        self._undo: list[tuple[object, str, object, bool]] = []
        self._wrap(core, "step_fn", "step")
        self._wrap(core.scheduler, "schedule", "schedule")
        self._wrap(core.scheduler, "update_from_output", "update")
        r = self.runner
        for name in ("_update_states", "_prepare_inputs"):
            self._wrap(r, name, "inputs")
        self._wrap(r, "_model_forward", "forward_all")
        self._wrap(r.model, "compute_logits", "logits")
        self._wrap(r, "_sample", "sample")
        self._wrap(r, "propose_draft_token_ids", "propose")
        from vllm.model_executor.layers.attention import Attention

        for m in r.model.modules():
            if isinstance(m, Attention):
                self._wrap(m.impl, "forward", "attention")
        # the projections' CPU GEMMs (before the first forward: a draft adapter takes the
        # layer's GEMM and its merged weights' GEMM into its split linear then)
        for name, m in r.model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in PROJECTIONS and "cpu_linear" in vars(m):
                self._wrap(m, "cpu_linear", f"{leaf} base")
        adapter = getattr(r.model, "_tidar_adapter", None)
        for target, holder in (adapter.merged_layers() if adapter is not None else {}).items():
            self._wrap(holder, "cpu_linear", f"{target.rsplit('.', 1)[-1]} merged")
        self._scheduled = 0

    def _wrap(self, obj, name: str, label: str) -> None:
        orig = getattr(obj, name)
        had = name in vars(obj)
        acc = self.acc

        if label == "step":
            def timed(*a, **k):
                acc.clear()
                t0 = time.perf_counter()
                out = orig(*a, **k)
                self._record((time.perf_counter() - t0) * 1e3)
                return out
        else:
            def timed(*a, **k):
                t0 = time.perf_counter()
                out = orig(*a, **k)
                acc[label] += (time.perf_counter() - t0) * 1e3
                if label == "schedule":
                    self._last_sched = out
                return out

        setattr(obj, name, timed)
        self._undo.append((obj, name, orig, had))

    def _record(self, total_ms: float) -> None:
        so = getattr(self, "_last_sched", None)
        a = dict(self.acc)
        if so is None or not so.total_num_scheduled_tokens:
            return
        fwd = a.get("forward_all", 0.0)
        att = a.get("attention", 0.0)
        rec = {p: a.get(p, 0.0) for p in ("schedule", "inputs", "logits", "sample", "propose", "update")}
        rec["attention"] = att
        rec["forward"] = fwd - att
        rec["other"] = total_ms - sum(rec.values())
        rec.update({g: a.get(g, 0.0) for g in GEMMS})  # inside "forward"
        rec["total"] = total_ms
        rec["num_reqs"] = len(so.num_scheduled_tokens)
        rec["tokens"] = so.total_num_scheduled_tokens
        rec["decode"] = not so.scheduled_new_reqs and all(
            n <= 1 + len(so.scheduled_spec_decode_tokens.get(r, ())) for r, n in so.num_scheduled_tokens.items()
        )
        self._last_sched = None
        self.steps.append(rec)

    def restore(self) -> None:
        for obj, name, orig, had in reversed(self._undo):
            if had:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)


def method_engines(ckpt: Path, tidar: list[tuple[int, int]]) -> list[tuple[str, dict]]:
    """(label, engine kwargs): stock AR, AR in the TiDAR class, then TiDAR at fixed
    (block length, K) pairs (a block length other than the checkpoint's is an hf override;
    K = 0: a TiDAR engine with the block's largest K whose schedule takes plain AR steps
    only, what adaptive drafting runs when drafting loses)."""
    from vllm_tidar.plugin.common import BASE_ARCHITECTURES

    info = json.loads((ckpt / "config.json").read_text())
    stock = [BASE_ARCHITECTURES[a] for a in info["architectures"]]
    rows = [("AR (stock)", {"hf_overrides": {"architectures": stock}}),
            ("AR (TiDAR class)", {"hf_overrides": {"tidar_mode": "ar"}})]
    for bl, k in tidar:
        spec = {"method": "tidar", "num_speculative_tokens": k or bl - 1}
        if k == 0:
            spec["num_speculative_tokens_per_batch_size"] = [[1, 1 << 16, 0]]
        engine = {"speculative_config": spec}
        if bl != info["tidar"]["block_length"]:
            engine["hf_overrides"] = {"tidar": {**info["tidar"], "block_length": bl}}
        rows.append((f"TiDAR Bl={bl} K={k}" + (" (drafting off)" if k == 0 else ""), engine))
    return rows


def build(ckpt: Path, engine: dict, batch_sizes, dtype: str):
    """One engine of a method (fixed K: adaptive drafting off)."""
    from vllm import LLM

    from vllm_tidar.layout import DecodeLayout
    from vllm_tidar.plugin.common import adaptive_drafting

    max_batch = max(batch_sizes)
    k = engine.get("speculative_config", {}).get("num_speculative_tokens")
    bl = engine.get("hf_overrides", {}).get("tidar", json.loads((ckpt / "config.json").read_text())["tidar"])["block_length"]
    big_l = DecodeLayout(bl, k).num_tokens if k else 1
    with adaptive_drafting(False):  # each TiDAR row keeps its K
        return LLM(model=str(ckpt), enforce_eager=True, dtype=dtype, seed=0, max_model_len=1024,
                   max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch * big_l),
                   use_tqdm_on_load=False, **engine)


def measure(ckpt: Path, engines: list[tuple[str, dict]], prompts, batch_sizes, max_tokens: int, dtype: str, log) -> dict:
    """{label: {batch_size: medians}}. All engines are built first and stay alive; each batch
    size then runs on every engine in turn (the order rotating), so the methods are timed
    within seconds of each other on a machine whose speed drifts."""
    from vllm import SamplingParams

    from vllm_tidar.plugin.common import close_llm

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    live: dict[str, tuple[object, StepTimers]] = {}
    out: dict[str, dict] = {label: {} for label, _ in engines}
    try:
        for label, engine in engines:
            llm = build(ckpt, engine, batch_sizes, dtype)
            live[label] = (llm, StepTimers(llm))
            # warm-up: the first batch size once in full, so the timed steps are not the engine's first
            llm.generate([{"prompt_token_ids": p} for p in prompts[: batch_sizes[0]]], sp, use_tqdm=False)
        for n, b in enumerate(batch_sizes):
            for label in in_turn(list(live), n):
                llm, timers = live[label]
                timers.steps.clear()
                llm.generate([{"prompt_token_ids": p} for p in prompts[:b]], sp, use_tqdm=False)
                dec = [s for s in timers.steps if s["decode"] and s["num_reqs"] == b]
                if not dec:
                    continue
                med = {p: statistics.median(s[p] for s in dec) for p in (*PARTS, *GEMMS, "total")}
                med["steps"] = len(dec)
                med["tokens_per_step"] = statistics.median(s["tokens"] for s in dec)
                out[label][b] = med
                log(f"{label:18s} batch {b:3d}: step {med['total']:.1f} ms over {len(dec)} decode steps")
    finally:
        for llm, timers in live.values():
            timers.restore()
            close_llm(llm)
    return out


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Engine step breakdown: {meta['machine']}", "",
             f"Command: `{meta['command']}`; vLLM in-process, `enforce_eager`, {meta['dtype']}; checkpoint `{meta['checkpoint']}`; "
             f"{meta['max_tokens']} greedy tokens per request; load average {meta['load_start']} at the start, {meta['load_end']} at the end.",
             "", "Median over decode steps, ms per engine step (see `benchmarks/breakdown.py` for what each column times).", "",
             "| method | batch | tokens/step | " + " | ".join(PARTS) + " | total | × AR (TiDAR class) |",
             "|---|---:|---:|" + "---:|" * (len(PARTS) + 2)]
    for label, per_b in results.items():
        for b, med in per_b.items():
            ar = results.get("AR (TiDAR class)", {}).get(b)
            ratio = f"{med['total'] / ar['total']:.2f}" if ar else ""
            lines.append(f"| {label} | {b} | {med['tokens_per_step']:.0f} | " + " | ".join(f"{med[p]:.2f}" for p in PARTS)
                         + f" | {med['total']:.2f} | {ratio} |")
    lines += ["", "The linear layers' GEMMs inside `forward`: ms per engine step, summed over the layers (median over decode "
              "steps; `base`: the layer's weights, `merged`: the draft adapter's merged weights, mask rows only).", "",
              "| method | batch | " + " | ".join(GEMMS) + " | all GEMMs |", "|---|---:|" + "---:|" * (len(GEMMS) + 1)]
    for label, per_b in results.items():
        for b, med in per_b.items():
            lines.append(f"| {label} | {b} | " + " | ".join(f"{med.get(g, 0.0):.2f}" for g in GEMMS)
                         + f" | {sum(med.get(g, 0.0) for g in GEMMS):.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--tidar", default="8:7,4:3",
                   help="TiDAR steps to profile as BLOCK_LENGTH:K pairs (default 8:7,4:3: L = 72 and 20; "
                        "K=0: the TiDAR engine taking plain AR steps only)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default="all", help="comma-separated labels' first words: stock,class,tidar (default all)")
    p.add_argument("--out", default="breakdown_out")
    p.add_argument("--name", default="breakdown_cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = build_parser().parse_args(argv)
    from vllm_tidar.benchmarks.bench import load_prompts, machine_name

    ckpt = Path(args.checkpoint)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    try:
        tidar = [(int(a), int(b)) for a, b in (x.split(":") for x in args.tidar.split(",") if x)]
    except ValueError:
        raise TidarError(f"--tidar: expected BLOCK_LENGTH:K pairs, got {args.tidar!r}") from None
    texts, _ = load_prompts(None, max(batch_sizes))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [tok(t)["input_ids"] for t in texts]
    while len(prompts) < max(batch_sizes):
        prompts += prompts
    engines = method_engines(ckpt, tidar)
    if args.methods != "all":
        keep = {"stock": "AR (stock)", "class": "AR (TiDAR class)", "tidar": "TiDAR"}
        want = [keep[m] for m in args.methods.split(",")]
        engines = [(lab, e) for lab, e in engines if any(lab.startswith(w) for w in want)]
    load_start = round(os.getloadavg()[0], 2)
    results = measure(ckpt, engines, prompts, batch_sizes, args.max_tokens, args.dtype, print)
    meta = dict(machine=machine_name(), command="vllm-tidar breakdown " + " ".join(argv or []), dtype=args.dtype,
                checkpoint=ckpt.name, max_tokens=args.max_tokens, load_start=load_start, load_end=round(os.getloadavg()[0], 2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, meta)
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(md)
    return 0
