"""Continued pretraining of an AR checkpoint into TiDAR (arXiv 2511.08923, §3.1).

Each row is doubled, ``[x_0..x_{S-1} | S masks]`` (``layout.TrainingLayout``): the clean
half learns next-token prediction under a causal mask, the all-mask half learns one-step
diffusion of its own block. Loss = (alpha * L_AR + L_Diff) / (1 + alpha) [+ kl_weight * L_KL],
weighted means over the step's rows (``objective``).

With ``distill_data`` (a ``vllm-tidar distill-data`` file) every micro-batch holds
``round(distill_ratio * batch_size)`` rows of the model's own continuations after its real-text
rows; real rows weigh 1 in L_AR and ``real_diff_weight`` in L_Diff, distilled rows
``distill_ar_weight`` in L_AR and 1 in L_Diff, so the AR head keeps learning real text while
the mask blocks learn to predict what the AR head says. With ``kl_weight`` the AR head is also
held to the frozen base's distribution: on real rows (row weight 1) and, with
``distill_kl_weight``, on distilled rows (the base's own continuations, where loops show).

With ``draft_adapter_rank`` the base is frozen and only a draft adapter (``draft_adapter``:
low-rank weights that the [MASK] rows alone run through) is trained: the AR model, its outputs
and its loss stay the base's exactly, and the diffusion loss teaches the mask blocks to draft.
A base that already has an adapter continues training it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import TidarSettings, check_family, ensure_mask_token, read_config, read_settings, save_tidar
from .data import pack, pack_ids, pack_targets, read_texts
from .distill import read_samples
from .draft_adapter import TARGETS, AdapterSpec, DraftAdapter, attach_hf
from .distributed import DistEnv, checkpoint_activations, full_state_dict, init_from_env, load_sharded, save_sharded, shard
from .errors import TidarError
from .layout import TrainingLayout
from .mixing import MixedBatches
from .objective import combine, row_losses

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"  # one JSON line per step (rank 0): losses of the global batch, lr, clean tokens so far


@dataclass
class TrainConfig:
    base: str  # AR (or TiDAR) checkpoint folder
    data: str  # folder of text files or a .jsonl
    out: str
    block_lengths: tuple[int, ...] = (8,)  # one per step, cycled; the first is the checkpoint default
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: float = 0.01  # fraction of steps
    alpha: float = 1.0
    weight_decay: float = 0.0
    dtype: str = "fp32"  # fp32 or bf16 (autocast)
    device: str = "cpu"
    save_every: int = 200
    seed: int = 0
    resume: bool = False
    activation_checkpointing: bool = False  # recompute decoder-layer activations in backward
    distill_data: str | None = None  # a distill-data .jsonl (token ids of prompts + the model's continuations)
    distill_ratio: float = 0.5  # fraction of each micro-batch's rows taken from distill_data
    real_diff_weight: float = 1.0  # L_Diff weight of real-text rows (their L_AR weight is 1)
    distill_ar_weight: float = 0.0  # L_AR weight of distilled rows (their L_Diff weight is 1)
    distill_kl_weight: float = 0.0  # L_KL row weight of distilled rows (real rows: 1)
    distill_min_distinct_4: float = 0.0  # drop distilled samples whose continuation loops (distinct 4-grams below this)
    distill_completion_only: bool = False  # distilled rows' diffusion loss on the continuations only, not the prompts
    kl_weight: float = 0.0  # weight of KL(frozen base || model) of the AR head on real rows
    draft_adapter_rank: int = 0  # > 0: freeze the base, train a draft adapter of this rank (mask rows only)
    draft_adapter_targets: tuple[str, ...] = TARGETS  # the projections it adapts

    def distill_rows(self) -> int:
        """Distilled rows per micro-batch (0 without distill_data)."""
        return round(self.distill_ratio * self.batch_size) if self.distill_data else 0

    def validate(self, world: int = 1) -> None:
        for bl in self.block_lengths:
            if bl < 2:
                raise TidarError(f"block length must be >= 2, got {bl}")
            if self.seq_len % bl:
                raise TidarError(f"seq_len {self.seq_len} must be a multiple of block length {bl}")
        if self.dtype not in ("fp32", "bf16"):
            raise TidarError(f"dtype must be fp32 or bf16, got {self.dtype}")
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise TidarError("steps, batch_size and grad_accum must be positive")
        if self.alpha < 0:
            raise TidarError(f"alpha must be >= 0, got {self.alpha}")
        if min(self.real_diff_weight, self.distill_ar_weight, self.kl_weight, self.distill_kl_weight) < 0:
            raise TidarError("loss weights (real diff, distill AR, KL, distill KL) must be >= 0")
        if not 0 <= self.distill_min_distinct_4 <= 1:
            raise TidarError(f"distill min distinct-4 must be in [0, 1], got {self.distill_min_distinct_4}")
        if not 0 <= self.distill_ratio <= 1:
            raise TidarError(f"distill ratio must be in [0, 1], got {self.distill_ratio}")
        if self.distill_data and self.distill_rows() == 0:
            raise TidarError(f"distill ratio {self.distill_ratio} gives no distilled row in a batch of {self.batch_size}")
        if self.kl_weight and world > 1:
            raise TidarError("--kl-weight runs in one process only (the frozen base is not sharded)")
        if self.draft_adapter_rank:
            AdapterSpec(self.draft_adapter_rank, tuple(self.draft_adapter_targets))  # one-line errors
            if self.kl_weight:
                raise TidarError("--kl-weight has nothing to anchor with --draft-adapter-rank: the base is frozen")
            if world > 1:
                raise TidarError("--draft-adapter-rank runs in one process only")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _load(cfg: TrainConfig, device: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(cfg.out if cfg.resume else cfg.base)
    if not (src / "config.json").is_file():
        what = "resume folder" if cfg.resume else "base checkpoint"
        raise TidarError(f"{what} {src} has no config.json")
    check_family(AutoConfig.from_pretrained(src, local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    mask_id = ensure_mask_token(model, tokenizer)
    return model.to(device or cfg.device), tokenizer, mask_id


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run the recipe; returns the output folder (a TiDAR checkpoint).

    Under torchrun (``WORLD_SIZE > 1``) the model is sharded with FSDP2 and each rank takes
    ``batch_size / world`` rows of every global micro-batch, so the global batch, the data order,
    the step count and the schedule (all in global tokens) are those of a 1-process run.
    """
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    env = init_from_env(cfg.device, cfg.batch_size)
    try:
        return _train(cfg, env, progress)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: DistEnv, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    texts = read_texts(cfg.data)
    model, tokenizer, mask_id = _load(cfg, env.device)
    adapter = _draft_adapter(cfg, model, mask_id)
    distilled = targets = None
    if cfg.distill_data:
        vocab = model.get_input_embeddings().weight.shape[0]
        pairs = read_samples(cfg.distill_data, vocab, cfg.distill_min_distinct_4, split=True)
        docs, eos = [p + c for p, c in pairs], tokenizer.eos_token_id
        distilled = pack_ids(docs, eos, cfg.seq_len)
        if cfg.distill_completion_only:
            targets = pack_targets(docs, [len(p) for p, _ in pairs], eos, cfg.seq_len)
    mix = MixedBatches(pack(texts, tokenizer, cfg.seq_len), distilled, cfg, targets)
    base = _frozen_base(cfg, env.device) if cfg.kl_weight else None
    layouts = [TrainingLayout(cfg.seq_len, bl) for bl in cfg.block_lengths]
    settings = TidarSettings(cfg.block_lengths[0], mask_id, block_lengths=tuple(cfg.block_lengths),
                             draft_adapter=adapter.spec if adapter is not None else None)
    on_cuda = torch.device(env.device).type == "cuda"
    fsdp_bf16 = env.world > 1 and on_cuda and cfg.dtype == "bf16"  # FSDP2 mixed precision instead of autocast
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    if env.world > 1:
        shard(model, env, bf16=fsdp_bf16)

    params = list((adapter or model).parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start = 0
    out = Path(cfg.out)
    if cfg.resume:
        state = torch.load(out / STATE_FILE, weights_only=False)
        if env.world > 1:
            load_sharded(model, opt, out)
        else:
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        start = state["step"]
    elif env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).write_text("")
    micro = cfg.batch_size * cfg.grad_accum
    local = cfg.batch_size // env.world  # this rank's rows of each global micro-batch
    mine = slice(env.rank * local, (env.rank + 1) * local)
    sources = (("real", mix.real_rows), ("distill", mix.distilled_rows)) if mix.n_distill else ()
    autocast = torch.autocast(device_type=torch.device(env.device).type, dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bf16" and not fsdp_bf16)

    # a draft adapter trains on mask rows only: the clean half needs no backward (objective.row_losses)
    frozen_clean = adapter is not None and not cfg.activation_checkpointing
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="tidar-train",
               disable=not progress or not env.is_main)
    t0, seen = time.perf_counter(), 0
    for step in bar:
        layout = layouts[step % len(layouts)]
        groups = range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
        diff_tokens = mix.diff_tokens(groups)
        norms = mix.weights.normalisers(layout, cfg.grad_accum, diff_tokens)  # the whole step's rows, all ranks
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = defaultdict(float)  # this rank's share of each loss of the step
        for g in groups:
            batch = mix.rows(g, mine).to(env.device)
            if env.world > 1:
                model.set_requires_gradient_sync(g == groups[-1])  # reduce-scatter once per step
            with autocast:
                parts = row_losses(model, batch, layout, mask_id, base, frozen_clean=frozen_clean,
                                   diff_targets=mix.targets(g, mine))
                loss, l_ar, l_diff, l_kl = combine(parts, mix.weights[mine], norms, cfg.alpha, cfg.kl_weight)
            (loss * env.world).backward()  # FSDP averages gradients over ranks; the shares add up
            for key, value in (("loss", loss), ("l_ar", l_ar), ("l_diff", l_diff), ("l_kl", l_kl)):
                logs[key] += value.item()
            with torch.no_grad():
                for name, w in sources:  # unweighted means per source
                    _, s_ar, s_diff, _ = combine(parts, w[mine], w.normalisers(layout, cfg.grad_accum, diff_tokens),
                                                 cfg.alpha)
                    logs[f"l_ar_{name}"] += s_ar.item()
                    logs[f"l_diff_{name}"] += s_diff.item()
            seen += batch.numel() * 2 * env.world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not cfg.kl_weight:
            del logs["l_kl"]
        logs = {k: env.mean(v) * env.world for k, v in logs.items()}
        tok_s = seen / (time.perf_counter() - t0)
        bar.set_postfix(ar=f"{logs['l_ar']:.3f}", diff=f"{logs['l_diff']:.3f}", tok_s=f"{tok_s:.0f}")
        if env.is_main:
            entry = {"step": step + 1, **logs, "lr": lr_at(step, cfg),
                     "clean_tokens": (step + 1) * micro * cfg.seq_len, "doubled_tokens_per_s": tok_s}
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(model, tokenizer, settings, opt, step + 1, cfg, out, env)
    model.eval()
    return out


def _draft_adapter(cfg: TrainConfig, model, mask_id: int) -> DraftAdapter | None:
    """With ``draft_adapter_rank``: freeze ``model`` and attach the adapter to train (the one the
    loaded checkpoint has, when it has one of that rank and those targets, else a fresh one)."""
    if not cfg.draft_adapter_rank:
        return None
    spec = AdapterSpec(cfg.draft_adapter_rank, tuple(cfg.draft_adapter_targets))
    src = Path(cfg.out if cfg.resume else cfg.base)
    have = read_settings(src).draft_adapter if "tidar" in read_config(src) else None
    if have is not None and have != spec:
        raise TidarError(f"{src} has a draft adapter of rank {have.rank} on {list(have.targets)}; "
                         f"--draft-adapter-rank {spec.rank} on {list(spec.targets)} asks for another")
    adapter = DraftAdapter.load(src, spec) if have is not None else DraftAdapter.fresh(model, spec, cfg.seed)
    model.requires_grad_(False)
    attach_hf(model, adapter, mask_id)
    adapter.requires_grad_(True)
    return adapter


def _frozen_base(cfg: TrainConfig, device: str):
    """The base checkpoint, frozen: the KL anchor of the AR head."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32, local_files_only=True,
                                                attn_implementation="sdpa")
    base.requires_grad_(False)
    return base.to(device).eval()


def _save(model, tokenizer, settings, opt, step: int, cfg: TrainConfig, out: Path, env: DistEnv) -> None:
    if env.world == 1:
        save_tidar(model, tokenizer, settings, out)
        state = {"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(), "config": asdict(cfg)}
        torch.save(state, out / STATE_FILE)
        return
    weights = full_state_dict(model)  # a collective: every rank takes part, rank 0 gets the tensors
    save_sharded(model, opt, out)
    if env.is_main:
        save_tidar(model, tokenizer, settings, out, state_dict=weights)
        torch.save({"step": step, "world": env.world, "config": asdict(cfg)}, out / STATE_FILE)
    env.barrier()


if __name__ == "__main__":  # torchrun --nproc-per-node N -m vllm_tidar.train [vllm-tidar train options]
    import sys

    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
