"""``vllm-tidar demo``: a TiDAR checkpoint (the bundled demo by default) in vLLM through the
plugin, plain AR against TiDAR on a few code prompts; ``--reference`` runs the PyTorch
reference decoder instead.

vLLM mode: one in-process engine at a time (AR: ``hf_overrides={"tidar_mode": "ar"}``, then
TiDAR), CPU, fp32 (the parity setting), ``enforce_eager``, a 1 GiB KV cache, batch 1, greedy,
``ignore_eos`` (both modes make the same number of tokens). Each engine is warmed up before
it is timed. Accounting (tokens/s, tokens per forward, acceptance per draft position, output
identity) is ``vllm-tidar bench``'s (``benchmarks/bench_stats.py``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .checkpoint import read_settings
from .errors import TidarError
from .layout import DecodeLayout, check_num_drafts

DEMO_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
# short HumanEval-like function headers (written here, not HumanEval's own: those are held out
# for the benchmarks)
DEMO_PROMPTS = (
    DEMO_PROMPT,
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same forwards and backwards."""\n',
    'def count_words(sentence: str) -> dict:\n    """Count how often each word occurs in the sentence."""\n',
    'def flatten(nested: list) -> list:\n    """Flatten a list of lists into one list, keeping the order."""\n',
    'def celsius_to_fahrenheit(celsius: float) -> float:\n    """Convert a temperature from Celsius to Fahrenheit."""\n',
)
STAGES = ("AR engine", "TiDAR engine", "AR and TiDAR in turn")


def _prompt_ids(tokenizer, prompts) -> list[list[int]]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if not ids or any(not x for x in ids):
        raise TidarError("prompt is empty: give at least one token")
    return ids


def _check(settings, max_tokens: int, num_drafts: int | None) -> DecodeLayout:
    if max_tokens <= 0:
        raise TidarError(f"max_tokens must be > 0, got {max_tokens}")
    if num_drafts is not None:
        check_num_drafts(num_drafts, settings.block_length, what="--num-drafts")
    return DecodeLayout(settings.block_length, num_drafts)


def serve_command(checkpoint, num_drafts: int | None = None) -> str:
    """The ``vllm-tidar serve`` command that serves what the demo ran."""
    cmd = f"vllm-tidar serve {checkpoint} --enforce-eager"
    if num_drafts is not None:
        cmd += f""" --speculative-config '{{"method": "tidar", "num_speculative_tokens": {num_drafts}}}'"""
    return cmd


# --- vLLM ----------------------------------------------------------------------------------
def _generate_in_turn(engines: dict, prompts: list[list[int]], max_tokens: int, bar) -> dict:
    """Batch-1 greedy run of every prompt on every engine in turn (the order alternating from
    prompt to prompt, so both modes are timed within seconds of each other on a machine whose
    speed drifts): per engine, bench_stats records and the wall time."""
    from vllm import SamplingParams

    from .benchmarks import bench_stats as st

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    runs = {label: {"records": [], "seconds": 0.0} for label in engines}
    for i, p in enumerate(prompts):
        bar.set_postfix_str(f"prompt {i + 1}/{len(prompts)}")
        for label in st.in_turn(list(engines), i):
            t0 = time.perf_counter()
            (out,) = engines[label].generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
            runs[label]["seconds"] += time.perf_counter() - t0
            runs[label]["records"].append(st.request_record(i, out))
    return runs


def _engine(checkpoint: Path, max_model_len: int, warmup: list[int], verbose: bool, **engine):
    """An in-process engine, warmed up on a few tokens of ``warmup``."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(checkpoint),
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=max_model_len,
        max_num_seqs=1,
        max_num_batched_tokens=max(2048, max_model_len),
        disable_log_stats=False,
        use_tqdm_on_load=verbose,
        **engine,
    )
    llm.generate([{"prompt_token_ids": warmup}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    return llm


def run_vllm(checkpoint, prompts=DEMO_PROMPTS, max_tokens: int = 128, num_drafts: int | None = None,
             verbose: bool = False) -> None:
    """AR and TiDAR in vLLM on ``prompts`` (both engines alive, each prompt on both in turn);
    prints the comparison table and the serve command."""
    checkpoint = Path(checkpoint)
    settings = read_settings(checkpoint)
    layout = _check(settings, max_tokens, num_drafts)
    load = os.getloadavg()[0]  # before our engines add to it
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from .benchmarks import bench_stats as st
    from .plugin.common import close_llm
    from .plugin.policy_cache import describe_start, engine_policy_start

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = _prompt_ids(tok, prompts)
    # room for the drafts vLLM checks against max_model_len (see bench.py)
    room = 2 * (layout.num_speculative_tokens + 1) + 8
    max_model_len = max(len(p) for p in ids) + max_tokens + room
    positions = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings")
    if positions and max_model_len > positions:
        raise TidarError(f"the longest prompt ({max(len(p) for p in ids)} tokens) + --max-tokens {max_tokens} + "
                         f"{room} draft slots exceed the model's {positions} positions")
    tidar_engine = {} if num_drafts is None else {
        "speculative_config": {"method": "tidar", "num_speculative_tokens": num_drafts}}
    modes = [
        ("AR", {"hf_overrides": {"tidar_mode": "ar"}}),
        (f"TiDAR (adaptive, K≤{layout.num_drafts})", {**tidar_engine, "per_request_spec_decode_metrics": "detailed"}),
    ]
    from .cpu_runtime import describe_runtime

    print(f"vllm-tidar demo: {checkpoint} in vLLM through the TiDAR plugin (CPU, fp32, enforce_eager, "
          f"{describe_runtime()}); "
          f"block length {layout.block_len}, TiDAR up to K={layout.num_drafts} ({layout.num_tokens} query tokens per step), "
          "drafting per step only where the measured step cost says it pays; "
          f"{len(ids)} prompts x {max_tokens} tokens, batch 1, greedy", flush=True)
    engines = {}
    stages = iter(STAGES)
    try:
        with tqdm(total=len(STAGES), unit="stage", dynamic_ncols=True) as bar:
            for label, engine in modes:
                bar.set_description(next(stages))
                engines[label] = _engine(checkpoint, max_model_len, ids[0], verbose, **engine)
                bar.update(1)
            start = engine_policy_start(engines[modes[1][0]])
            bar.set_description(next(stages))
            runs = _generate_in_turn(engines, ids, max_tokens, bar)
            bar.update(1)
            bar.set_postfix_str("")
    finally:
        for llm in engines.values():
            close_llm(llm)
    (ar_label, _), (tidar_label, _) = modes
    rows = {label: st.summarize(run["records"], run["seconds"], 0 if label == ar_label else layout.num_drafts)
            for label, run in runs.items()}
    outputs = {label: [r["token_ids"] for r in run["records"]] for label, run in runs.items()}
    same = st.identical_count(outputs[tidar_label], outputs[ar_label])
    print()
    print("| mode | tokens | tokens/s | speedup | tokens/forward | steps drafting | acceptance per draft position |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, row in rows.items():
        acc = " ".join(f"{a:.2f}" if a is not None else "—" for a in row["acceptance_per_position"]) or "—"
        speed = row["tokens_per_s"] / rows[ar_label]["tokens_per_s"]
        share = "—" if row["drafting_share"] is None else f"{row['drafting_share']:.0%}"
        print(f"| {label} | {row['tokens']} | {row['tokens_per_s']:.1f} | {speed:.2f}x | "
              f"{row['tokens_per_forward']:.2f} | {share} | {acc} |")
    print(f"\nTiDAR output identical to AR: {same == len(ids)} ({same}/{len(ids)} prompts)")
    if start is not None:
        print(f"Adaptive drafting started {describe_start(start)}" + (
            "." if start["restored_steps"] or start["cache"] is None else
            ": this run spent part of its steps measuring; the next run on this machine starts from what it measured."))
    cores = os.cpu_count() or 1
    if load > cores:
        print(f"(1-min load average {load:.1f} at the start on {cores} cores: other processes competed for the "
              "CPU, so tokens/s and speedup are distorted; token counts, tokens/forward, acceptance and identity "
              "are not)")
    print(f"\nPrompt 1, TiDAR output:\n{prompts[0]}{tok.decode(outputs[tidar_label][0], skip_special_tokens=True)}")
    print(f"\nNext, serve it with vLLM's OpenAI-compatible server:\n  {serve_command(checkpoint, num_drafts)}")


# --- reference decoder ---------------------------------------------------------------------
def run_reference(checkpoint, prompts=DEMO_PROMPTS, max_tokens: int = 128, num_drafts: int | None = None,
                  block_length: int | None = None) -> None:
    """AR then TiDAR with the PyTorch reference decoder (HF model, batch 1)."""
    import torch

    from .checkpoint import load_tidar
    from .reference import ReferenceDecoder

    torch.set_grad_enabled(False)
    model, tok, settings = load_tidar(checkpoint)
    dec = ReferenceDecoder(model, settings, block_length=block_length, num_drafts=num_drafts)
    ids = _prompt_ids(tok, prompts)
    print(f"vllm-tidar demo --reference: {checkpoint} (block length {dec.layout.block_len}, K={dec.layout.num_drafts}, "
          f"{dec.layout.num_tokens} query tokens per TiDAR step); {len(ids)} prompts x {max_tokens} tokens")
    outputs = {}
    for mode in ("ar", "tidar"):
        t0 = time.perf_counter()
        res = [dec.generate(p, max_tokens, mode=mode, eos_token_id=tok.eos_token_id) for p in ids]
        dt = time.perf_counter() - t0
        outputs[mode] = [r.token_ids for r in res]
        tokens, forwards = sum(len(r.token_ids) for r in res), sum(r.num_forwards for r in res)
        print(f"\n--- {mode.upper()}: {tokens} tokens, {forwards} forwards, {tokens / forwards:.2f} tokens/forward, "
              f"{tokens / dt:.1f} tokens/s")
        print(prompts[0] + tok.decode(res[0].token_ids))
    same = outputs["ar"] == outputs["tidar"]
    print(f"\nTiDAR output identical to AR: {same}")
