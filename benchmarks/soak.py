"""``vllm-tidar soak``: sustained mixed load on ``vllm-tidar serve`` with vLLM's own benchmark
client (``vllm bench serve``), then faults: aborted streams and SIGTERM under load.

What one run does (the demo checkpoint by default, TiDAR on, fp32, ``--max-model-len 1024``):

1. starts the server, checks greedy completions against plain AR (the PyTorch reference
   decoder of the same checkpoint) and records the server's resident memory;
2. runs two ``vllm bench serve`` clients at once, so greedy and sampled requests share the
   batches: half the requests from vLLM's ``random`` dataset at temperature 0, half from a
   ShareGPT-format file of stdlib text with ShareGPT-like (log-normal) prompt and output
   lengths at temperature 0.8 / top-p 0.95; Poisson arrivals at ``--request-rate``; in
   ``--phases`` equal phases, memory recorded when the server is idle after each (a leak shows
   as growth in later phases; the first also warms up to the load's working set);
3. reads the spec-decode counters and re-checks greedy parity;
4. aborts ``--aborts`` streaming requests mid-stream (client closes the socket) and checks
   that running / waiting return to 0 and KV usage to its idle value;
5. sends SIGTERM while requests are in flight and checks the whole process tree is gone
   within 10 s.

Writes ``soak_<tag>.md`` and ``soak_<tag>.json`` to ``--out``. ``tests/test_vllm_soak.py``
runs the same steps with about 100 requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from vllm_tidar.checkpoint import DEMO_CHECKPOINT
from vllm_tidar.layout import DecodeLayout

from .server_harness import Server, prometheus_samples, prometheus_value, vllm_tidar_cli

SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
GREEDY_PROMPTS = [  # the parity probe before and after the load
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
]


def server_args(max_model_len: int, k: int | None, extra: list[str] | None = None) -> list[str]:
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len), "--seed", "0"]
    if k is not None:
        args += ["--speculative-config", json.dumps({"method": "tidar", "num_speculative_tokens": k})]
    return args + list(extra or [])


# --- data -----------------------------------------------------------------------------------
def sharegpt_like_file(tokenizer_path, n: int, path: Path, seed: int = 0, median_output: int = 120,
                       max_prompt: int = 512, max_output: int = 256) -> Path:
    """A ShareGPT-format JSON (``conversations``: human prompt, gpt reply) of ``n`` entries cut
    from the Python standard library's sources, lengths log-normal like ShareGPT's (median
    prompt ~100 tokens, reply ``median_output``), clipped to ``max_prompt`` / ``max_output``."""
    import textwrap

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    src_dir = Path(textwrap.__file__).parent
    ids: list[int] = []
    for name in ("textwrap.py", "argparse.py", "functools.py", "pathlib/__init__.py", "json/encoder.py"):
        f = src_dir / name
        if f.is_file():
            ids += tok(f.read_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        p = int(min(max_prompt, max(8, rng.lognormvariate(math.log(100), 0.8))))
        o = int(min(max_output, max(8, rng.lognormvariate(math.log(median_output), 0.7))))
        start = rng.randrange(0, len(ids) - p - o)
        entries.append({"id": f"soak-{i}", "conversations": [
            {"from": "human", "value": tok.decode(ids[start : start + p])},
            {"from": "gpt", "value": tok.decode(ids[start + p : start + p + o])},
        ]})  # fmt: skip
    path.write_text(json.dumps(entries))
    return path


# --- checks ---------------------------------------------------------------------------------
def ar_reference(checkpoint, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy plain-AR token ids of the PyTorch reference decoder (fp32)."""
    import torch

    from vllm_tidar.checkpoint import load_tidar
    from vllm_tidar.reference import ReferenceDecoder

    torch.set_grad_enabled(False)
    model, tok, settings = load_tidar(checkpoint)
    dec = ReferenceDecoder(model, settings)
    return [dec.generate(tok(p, add_special_tokens=False)["input_ids"], max_tokens, mode="ar").token_ids for p in prompts]


def post_json(base: str, path: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read().decode() or "{}")
    finally:
        conn.close()


def greedy_token_ids(server: Server, model: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    out = []
    for p in prompts:
        status, body = post_json(server.base, "/v1/completions", {
            "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
        })  # fmt: skip
        if status != 200:
            raise RuntimeError(f"greedy request failed with {status}: {body}")
        out.append(list(body["choices"][0]["token_ids"]))
    return out


def spec_counters(metrics_text: str) -> dict[str, float]:
    return {c: prometheus_value(metrics_text, f"vllm:spec_decode_{c}_total") for c in SPEC_COUNTERS}


def accepted_per_position(metrics_text: str) -> list[float]:
    """``vllm:spec_decode_num_accepted_tokens_per_pos`` by position (summed over engines)."""
    import re

    per: dict[int, float] = {}
    for labels, v in prometheus_samples(metrics_text, "vllm:spec_decode_num_accepted_tokens_per_pos_total"):
        pos = int(re.search(r'position="(\d+)"', labels).group(1))
        per[pos] = per.get(pos, 0.0) + v
    return [per[i] for i in sorted(per)]


def abort_streams(server: Server, model: str, n: int, prompt: str = GREEDY_PROMPTS[0]) -> int:
    """Open ``n`` streaming completions one after another and drop each after its first chunk
    (the client closes the socket mid-stream). Returns how many streams had started."""
    started = 0
    for i in range(n):
        conn = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
        body = {"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0.8, "seed": i,
                "stream": True, "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 200 and r.readline():
            started += 1
        conn.sock.close()  # abort: no more reads, socket gone
        conn.close()
    return started


def sigterm_under_load(server: Server, model: str, concurrent: int = 8, wait: float = 60.0) -> dict:
    """SIGTERM the server while ``concurrent`` requests run; wait up to ``wait`` s for the whole
    process tree (API server, engine core) to exit. Returns what happened: the pids, the exit
    code, the seconds until the last process was gone, survivors, each client's result."""
    results: list[int | str] = []

    def one(i: int) -> None:
        try:
            status, body = post_json(server.base, "/v1/completions", {
                "model": model, "prompt": GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)], "max_tokens": 256,
                "temperature": 0, "ignore_eos": True}, timeout=wait)  # fmt: skip
            choice = (body.get("choices") or [{}])[0]
            results.append(f"{status} finish_reason={choice.get('finish_reason')}" if status == 200 else str(status))
        except Exception as e:  # the server goes away mid-request: expected here
            results.append(type(e).__name__)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(concurrent)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while prometheus_value(server.metrics(), "vllm:num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = server.pids()
    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    while time.monotonic() - t0 < wait and (server.proc.poll() is None or any(_alive(p) for p in pids)):
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(timeout=wait)
    return {"pids": pids, "exit_code": server.proc.poll(), "shutdown_s": round(elapsed, 2),
            "orphans": [p for p in pids if _alive(p)], "client_results": sorted(map(str, results)),
            "log_tail": server.log_tail(1500) if elapsed > 10 else ""}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the load -------------------------------------------------------------------------------
def bench_clients(server: Server, checkpoint, model: str, num_prompts: int, request_rate: float, out: Path,
                  tag: str, output_len: int, seed: int = 0) -> list[dict]:
    """Two concurrent ``vllm bench serve`` runs (greedy random + sampled ShareGPT-like, outputs
    of about ``output_len`` tokens, ShareGPT-like ones up to 2x); their result JSONs. Files are
    named ``soak_<tag>_<client>``."""
    data = sharegpt_like_file(checkpoint, num_prompts, out / f"soak_{tag}_sharegpt_like.json", seed=seed,
                              median_output=output_len, max_output=2 * output_len)
    common = ["--backend", "vllm", "--base-url", server.base, "--endpoint", "/v1/completions", "--model", model,
              "--tokenizer", str(checkpoint), "--request-rate", str(request_rate / 2), "--seed", str(seed),
              "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
              "--save-result", "--result-dir", str(out), "--disable-tqdm", "--ready-check-timeout-sec", "60"]
    half = num_prompts // 2
    runs = {
        "greedy_random": ["--dataset-name", "random", "--num-prompts", str(half), "--random-input-len", "200",
                          "--random-output-len", str(output_len), "--random-range-ratio", "0.8", "--temperature", "0"],
        "sampled_sharegpt": ["--dataset-name", "sharegpt", "--dataset-path", str(data),
                             "--num-prompts", str(num_prompts - half), "--temperature", "0.8", "--top-p", "0.95"],
    }
    procs = {}
    for name, args in runs.items():
        log = open(out / f"soak_{tag}_{name}.log", "w")
        cmd = vllm_tidar_cli() + ["bench-serve", *common, *args, "--result-filename", f"soak_{tag}_{name}.json"]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    results = []
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0:
            raise RuntimeError(f"vllm bench serve ({name}) exited with {rc}:\n{(out / f'soak_{tag}_{name}.log').read_text()[-3000:]}")
        res = json.loads((out / f"soak_{tag}_{name}.json").read_text())
        res["name"] = name
        results.append(res)
    return results


def run(checkpoint, num_prompts: int, request_rate: float, out: Path, tag: str, aborts: int, k: int | None,
        output_len: int = 96, max_model_len: int = 1024, greedy_tokens: int = 32, max_num_seqs: int = 32,
        phases: int = 2) -> dict:
    from vllm_tidar.checkpoint import read_settings

    out.mkdir(parents=True, exist_ok=True)
    if k is None:
        k = DecodeLayout(read_settings(checkpoint).block_length).num_drafts
    want = ar_reference(checkpoint, GREEDY_PROMPTS, greedy_tokens)
    report: dict = {"checkpoint": str(checkpoint), "num_prompts": num_prompts, "request_rate": request_rate,
                    "max_num_seqs": max_num_seqs, "k": k, "output_len": output_len, "phases": phases}
    with Server(checkpoint, server_args(max_model_len, k, ["--max-num-seqs", str(max_num_seqs)])) as server:
        server.wait_healthy()
        model = server.model_id()
        report["greedy_identical_before"] = sum(a == b for a, b in zip(greedy_token_ids(server, model, GREEDY_PROMPTS, greedy_tokens), want))
        idle = server.wait_idle()
        report["rss_mib"], report["rss_by_process_mib"] = [], []  # idle at start, then after each load phase
        _record_memory(report, server)
        before = server.metrics()
        t0 = time.monotonic()
        # equal phases: memory after a later phase against after the first separates a leak from
        # the warm-up to the working set of this load
        report["clients"] = []
        for phase in range(1, phases + 1):
            n = num_prompts // phases + (1 if phase <= num_prompts % phases else 0)
            for c in bench_clients(server, checkpoint, model, n, request_rate, out, f"{tag}_phase{phase}", output_len,
                                   seed=phase):
                c["name"] = f"{c['name']} (phase {phase})"
                report["clients"].append(c)
            after_idle = server.wait_idle()
            _record_memory(report, server)
        report["load_s"] = time.monotonic() - t0
        after = server.metrics()
        c0, c1 = spec_counters(before), spec_counters(after)
        report["spec_decode"] = {c: c1[c] - c0[c] for c in SPEC_COUNTERS}
        per0, per1 = accepted_per_position(before), accepted_per_position(after)
        report["spec_decode"]["accepted_per_position"] = [b - a for a, b in zip(per0 or [0] * len(per1), per1)]
        report["idle_after_load"] = after_idle
        report["greedy_identical_after"] = sum(a == b for a, b in zip(greedy_token_ids(server, model, GREEDY_PROMPTS, greedy_tokens), want))
        report["greedy_prompts"] = len(GREEDY_PROMPTS)
        report["aborts_started"] = abort_streams(server, model, aborts)
        report["idle_after_aborts"] = server.wait_idle()
        report["kv_idle_before"] = idle["kv_cache_usage_perc"]
        report["sigterm"] = sigterm_under_load(server, model)
    report["errors"] = sum(c["failed"] for c in report["clients"])
    report["completed"] = sum(c["completed"] for c in report["clients"])
    return report


def _record_memory(report: dict, server: Server) -> None:
    """Append one snapshot of the server's resident memory: the tree's total and per process (MiB)."""
    by_process = server.rss_by_process()
    report["rss_mib"].append(sum(by_process.values()) / 2**20)
    report["rss_by_process_mib"].append({name: round(b / 2**20, 1) for name, b in by_process.items()})


# --- report ---------------------------------------------------------------------------------
def write_report(report: dict, out: Path, tag: str, header: str) -> Path:
    keep = ("completed", "failed", "duration", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms",
            "p99_tpot_ms", "total_output_tokens", "max_concurrent_requests")
    slim = {**report, "clients": [{k: c.get(k) for k in ("name", *keep)} for c in report["clients"]]}
    (out / f"soak_{tag}.json").write_text(json.dumps(slim, indent=2))
    sd = report["spec_decode"]
    lines = [f"# Soak: {report['num_prompts']} requests through `vllm-tidar serve`", "", header, "",
             "| client | completed | failed | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | max concurrent |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in slim["clients"]:
        lines.append(f"| {c['name']} | {c['completed']} | {c['failed']} | {c['output_throughput']:.1f} | "
                     f"{c['p50_ttft_ms']:.0f} / {c['p99_ttft_ms']:.0f} | {c['p50_tpot_ms']:.1f} / {c['p99_tpot_ms']:.1f} | "
                     f"{c.get('max_concurrent_requests')} |")
    drafts = sd["num_drafts"] or 1
    lines += [
        "",
        f"- errors: **{report['errors']}** of {report['num_prompts']} (completed {report['completed']}); load phase {report['load_s']:.0f} s",
        f"- spec decode over the load: {sd['num_drafts']:.0f} drafting steps, {sd['num_draft_tokens']:.0f} draft tokens "
        f"(= K x steps: {sd['num_draft_tokens'] == (report['k'] or 0) * sd['num_drafts']}), {sd['num_accepted_tokens']:.0f} accepted, "
        f"mean acceptance length {1 + sd['num_accepted_tokens'] / drafts:.2f}, per position "
        + " ".join(f"{a / drafts:.2f}" for a in sd["accepted_per_position"]),
        "- server resident memory (process tree, idle): " + ", ".join(
            f"{m:.0f} MiB " + ("at start" if i == 0 else f"after phase {i}") for i, m in enumerate(report["rss_mib"])),
        "- by process (MiB, same points): " + "; ".join(
            f"{name.split(':')[0]} " + " / ".join(f"{snap.get(name, 0):.0f}" for snap in report["rss_by_process_mib"])
            for name in report["rss_by_process_mib"][0]),
        f"- greedy == plain AR (reference decoder): {report['greedy_identical_before']}/{report['greedy_prompts']} before, "
        f"{report['greedy_identical_after']}/{report['greedy_prompts']} after",
        f"- idle after load: {report['idle_after_load']}",
        f"- {report['aborts_started']} streams aborted mid-stream; then {report['idle_after_aborts']} "
        f"(KV usage when idle before: {report['kv_idle_before']})",
        f"- SIGTERM under load: exit code {report['sigterm']['exit_code']}, process tree gone in {report['sigterm']['shutdown_s']} s, "
        f"orphans {report['sigterm']['orphans']} (of pids {report['sigterm']['pids']})",
    ]
    path = out / f"soak_{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-tidar soak", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=8.0, help="requests/s over both clients (Poisson)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--output-len", type=int, default=96, help="random requests' output tokens; ShareGPT-like median")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="TiDAR K (default: the checkpoint's Bl-1)")
    p.add_argument("--aborts", type=int, default=50)
    p.add_argument("--phases", type=int, default=2, help="equal load phases, memory recorded after each")
    p.add_argument("--out", default="soak_out")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    from .bench import machine_name

    out = Path(args.out)
    load_start = os.getloadavg()[0]
    report = run(args.checkpoint, args.num_prompts, args.request_rate, out, args.tag, args.aborts,
                 args.num_speculative_tokens, output_len=args.output_len, max_num_seqs=args.max_num_seqs,
                 phases=args.phases)
    command = " ".join(["vllm-tidar soak", *(argv if argv is not None else [])])
    header = (f"Machine: {machine_name()}; command `{command}`; load average {load_start:.2f} at start, "
              f"{os.getloadavg()[0]:.2f} at the end.")
    report["machine"], report["command"] = machine_name(), command
    path = write_report(report, out, args.tag, header)
    print(path.read_text())
    return 0 if report["errors"] == 0 else 1
