"""Shared helpers for the vLLM plugin tests: a tiny TiDAR checkpoint, built once and cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_tidar.plugin.common import close_llm, engine_runner  # noqa: F401  (close_llm re-exported for the tests)

CACHE = Path(os.environ.get("TIDAR_TEST_CACHE", "/tmp/vllm_tidar_test_cache"))
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
DEMO = Path(__file__).resolve().parents[1] / "vllm_tidar" / "checkpoints" / "demo"


def tiny_checkpoint(block_length: int = 4, seed: int = 0, family: str = "llama", beta: float = 1.0,
                    block_lengths: tuple[int, ...] = ()) -> Path:
    """A random-init 2-layer TiDAR checkpoint (vocab 8192, mask id 1, eos 0) of a family
    (``block_lengths``: the trained block lengths its config claims, besides ``block_length``)."""
    tag = (f"tiny_bl{block_length}_s{seed}" + ("" if family == "llama" else f"_{family}") + ("" if beta == 1.0 else f"_b{beta}")
           + "".join(f"_t{b}" for b in block_lengths))
    out = CACHE / tag
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers
    from transformers import AutoTokenizer

    from vllm_tidar.checkpoint import TidarSettings, save_tidar
    from vllm_tidar.demo_base import build_base

    base = CACHE / "base"
    if not (base / "config.json").is_file():
        build_base(base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(TINY)
    keep = ("vocab_size", "eos_token_id", "pad_token_id", "bos_token_id", "max_position_embeddings",
            "tie_word_embeddings", "rms_norm_eps", *TINY)
    cfg = {k: v for k, v in cfg.items() if k in keep}
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    if family == "qwen3":
        cfg["head_dim"] = 64
    config = getattr(transformers, f"{name}Config")(**cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    # larger init than HF's 0.02 so argmax margins are not razor thin (greedy parity)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    tok = AutoTokenizer.from_pretrained(base)
    tmp = out.with_name(out.name + ".tmp")
    save_tidar(model, tok, TidarSettings(block_length=block_length, mask_token_id=1, beta=beta,
                                         block_lengths=block_lengths), tmp)
    fix_architectures(tmp)
    tmp.rename(out)
    return out


def demo_checkpoint() -> Path | None:
    """The trained demo checkpoint if present (not required)."""
    return DEMO if (DEMO / "config.json").is_file() else None


def demo_without_adapter(out: Path) -> Path:
    """A copy of the demo checkpoint without its draft adapter (its stage-1 model: same AR
    weights, the drafts of stage 1), e.g. for tensor parallelism, which the adapter does not run with."""
    out.mkdir(parents=True, exist_ok=True)
    for f in DEMO.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["tidar"].pop("draft_adapter", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def fix_architectures(path: Path) -> None:
    """transformers 5.19's save_pretrained writes the class name into ``architectures``,
    overwriting the TiDAR architecture ``save_tidar`` set: put it back."""
    from vllm_tidar.checkpoint import ARCHITECTURES

    f = Path(path) / "config.json"
    cfg = json.loads(f.read_text())
    arch = ARCHITECTURES[cfg["model_type"]]
    if cfg.get("architectures") != [arch]:
        cfg["architectures"] = [arch]
        f.write_text(json.dumps(cfg, indent=2))


# --- vLLM engines (in-process, one at a time) ---------------------------------------------
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_MODEL_LEN = 512


def make_llm(model, adaptive: bool = False, **kwargs):
    """A small in-process vLLM engine for tests (CPU, eager, fp32). TiDAR drafts a fixed K
    per step unless ``adaptive`` (the product default: K chosen per batch size)."""
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    args = dict(
        model=str(model),
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        seed=0,
        disable_log_stats=False,
    )
    args.update(kwargs)
    from vllm_tidar.plugin.common import adaptive_drafting

    with adaptive_drafting(adaptive):
        return LLM(**args)


def runner_model(llm):
    """The model object inside an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return engine_runner(llm).model


def prompt_set(tokenizer_path, n: int, seed: int = 0, min_len: int = 3, max_len: int = 60) -> list[list[int]]:
    """``n`` prompts of varied length cut from a stdlib source file, as token ids."""
    import random
    import textwrap as _tw

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    ids = tok(Path(_tw.__file__).read_text())["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(0, len(ids) - length)
        out.append([t if t != 1 else 2 for t in ids[start : start + length]])
    return out


def runner(llm):
    return engine_runner(llm)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def generate(llm, prompts, sampling):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)


def proposed_drafts(llm, prompts, sampling) -> list[list[int]]:
    """The drafts the TiDAR proposer hands vLLM at each step (its first K) while ``llm`` generates ``prompts``."""
    drafter = runner(llm).drafter
    seen: list[list[int]] = []
    orig = drafter.propose

    def spy(sampled, *a, **kw):
        res = orig(sampled, *a, **kw)
        seen.append(list(res[0][: drafter.max_layout.num_drafts]))
        return res

    drafter.propose = spy
    try:
        generate(llm, prompts, sampling)
    finally:
        drafter.propose = orig
    return seen


def reference_drafts(dec, prompt, max_tokens: int) -> list[list[int]]:
    """The drafts the reference decoder ``dec`` makes at each step (model drafts only) for one prompt."""
    from vllm_tidar import reference

    seen: list[list[int]] = []
    orig = reference._Session._drafts_from

    def spy(self, logits):
        d = orig(self, logits)
        seen.append(d.tolist())
        return d

    reference._Session._drafts_from = spy
    try:
        dec.generate(prompt, max_tokens, mode="tidar")
    finally:
        reference._Session._drafts_from = orig
    return seen
