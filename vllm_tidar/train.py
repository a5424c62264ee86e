"""Continued pretraining of an AR checkpoint into TiDAR (arXiv 2511.08923, §3.1).

Each row is doubled, ``[x_0..x_{S-1} | S masks]`` (``layout.TrainingLayout``): the clean
half learns next-token prediction under a causal mask, the all-mask half learns one-step
diffusion of its own block. Loss = (alpha * mean L_AR + mean L_Diff) / (1 + alpha).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import TidarSettings, check_family, ensure_mask_token, save_tidar
from .data import pack, read_texts
from .distributed import DistEnv, checkpoint_activations, full_state_dict, init_from_env, load_sharded, save_sharded, shard
from .errors import TidarError
from .layout import TrainingLayout

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

    def validate(self) -> None:
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def tidar_loss(model, tokens: torch.Tensor, layout: TrainingLayout, mask_id: int, alpha: float):
    """(total, L_AR, L_Diff) for a batch of clean rows (B, S)."""
    dev = tokens.device
    ids = layout.input_ids(tokens, mask_id)
    pos = layout.position_ids.to(dev).expand(tokens.shape[0], -1)
    attn = layout.template.to(dev)[None, None].expand(tokens.shape[0], 1, -1, -1)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=attn, use_cache=False).logits.float()
    s = layout.seq_len
    ar_labels, diff_labels = layout.labels(tokens)
    l_ar = F.cross_entropy(logits[:, :s].flatten(0, 1), ar_labels.flatten(), ignore_index=-100)
    l_diff = F.cross_entropy(logits[:, s:].flatten(0, 1), diff_labels.flatten())
    return (alpha * l_ar + l_diff) / (1 + alpha), l_ar, l_diff


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
    cfg.validate()
    env = init_from_env(cfg.device, cfg.batch_size)
    try:
        return _train(cfg, env, progress)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: DistEnv, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    texts = read_texts(cfg.data)
    model, tokenizer, mask_id = _load(cfg, env.device)
    rows = pack(texts, tokenizer, cfg.seq_len)
    layouts = [TrainingLayout(cfg.seq_len, bl) for bl in cfg.block_lengths]
    settings = TidarSettings(cfg.block_lengths[0], mask_id)
    on_cuda = torch.device(env.device).type == "cuda"
    fsdp_bf16 = env.world > 1 and on_cuda and cfg.dtype == "bf16"  # FSDP2 mixed precision instead of autocast
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    if env.world > 1:
        shard(model, env, bf16=fsdp_bf16)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
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
    order = _row_order(len(rows), cfg.seed)
    micro = cfg.batch_size * cfg.grad_accum
    local = cfg.batch_size // env.world  # this rank's rows of each global micro-batch
    autocast = torch.autocast(device_type=torch.device(env.device).type, dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bf16" and not fsdp_bf16)

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="tidar-train",
               disable=not progress or not env.is_main)
    t0, seen = time.perf_counter(), 0
    for step in bar:
        layout = layouts[step % len(layouts)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        l_ar_sum = l_diff_sum = 0.0
        for m in range(cfg.grad_accum):
            first = step * micro + m * cfg.batch_size + env.rank * local
            idx = [order[(first + i) % len(order)] for i in range(local)]
            batch = rows[idx].to(env.device)
            if env.world > 1:
                model.set_requires_gradient_sync(m == cfg.grad_accum - 1)  # reduce-scatter once per step
            with autocast:
                loss, l_ar, l_diff = tidar_loss(model, batch, layout, mask_id, cfg.alpha)
            (loss / cfg.grad_accum).backward()
            l_ar_sum += l_ar.item() / cfg.grad_accum
            l_diff_sum += l_diff.item() / cfg.grad_accum
            seen += batch.numel() * 2 * env.world
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        l_ar_sum, l_diff_sum = env.mean(l_ar_sum), env.mean(l_diff_sum)
        tok_s = seen / (time.perf_counter() - t0)
        bar.set_postfix(ar=f"{l_ar_sum:.3f}", diff=f"{l_diff_sum:.3f}", tok_s=f"{tok_s:.0f}")
        if env.is_main:
            entry = {"step": step + 1, "l_ar": l_ar_sum, "l_diff": l_diff_sum, "lr": lr_at(step, cfg),
                     "clean_tokens": (step + 1) * micro * cfg.seq_len, "doubled_tokens_per_s": tok_s}
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(model, tokenizer, settings, opt, step + 1, cfg, out, env)
    model.eval()
    return out


def _row_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


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
