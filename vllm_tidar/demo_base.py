"""The demo's base model: a small Llama and a byte-level BPE tokenizer trained offline on the
Python standard library's own sources (present on every Python install, no download).

``build_base`` writes a randomly initialised AR checkpoint; ``vllm-tidar train`` then trains
it with the TiDAR objective (whose AR half is ordinary next-token pretraining).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from .checkpoint import MASK_TOKEN

EOS = "<|endoftext|>"
DEMO_MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
VOCAB_SIZE = 8192
# TiDAR training of the base into vllm_tidar/checkpoints/demo (README, "How the demo was trained")
DEMO_RECIPE = dict(block_lengths=(8, 4), seq_len=256, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=0.03, save_every=100)
# self-distillation stage (`build-demo --distill-steps N`; README, "How the demo was trained"):
# the stage-1 model's own greedy AR continuations of stdlib prompts (distill-data), then a
# frozen stage-1 model with a draft adapter trained on them (diffusion loss on the
# continuations only): the AR model and its output stay stage 1's exactly. Run r2k of
# benchmarks/results/self_distill_cpu.md. Prompts overlapping HumanEval or the held-out
# evaluation source (``held_out_source``) are refused.
DEMO_DISTILL = dict(num_samples=6000, prompt_lengths=(32, 96), completion_len=160)
DEMO_DISTILL_RECIPE = dict(block_lengths=(8, 4), seq_len=256, batch_size=8, lr=1e-3, min_lr=1e-4, warmup=0.03,
                           save_every=200, distill_ratio=1.0, draft_adapter_rank=256)
DEMO_DISTILL_STEPS = 2000
# stage 3 (`build-demo --headers-steps N`; run hd3 of benchmarks/results/self_distill_cpu.md):
# prompts that end at a function header (the shape of HumanEval and code-completion requests),
# continued by the same AR model; the stage-2 adapter then continues on the stage-2 samples and
# these, its diffusion loss on the continuations only (not the prompts' corpus text)
DEMO_HEADERS = dict(num_samples=4000, prompt_lengths=(32, 192), completion_len=160, prompt_kind="headers")
DEMO_HEADERS_RECIPE = dict(block_lengths=(8, 4), seq_len=256, batch_size=8, lr=3e-4, min_lr=3e-5, warmup=0.03,
                           save_every=200, distill_ratio=1.0, draft_adapter_rank=256, distill_completion_only=True)
DEMO_HEADERS_STEPS = 800


def stdlib_corpus() -> Path:
    """Folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_source() -> str:
    """The held-out code the demo is evaluated on (README): jinja2's sources, installed with vLLM."""
    import jinja2

    return str(Path(jinja2.__file__).parent)


def corpus_files(root: Path) -> list[str]:
    """Stdlib .py files without the test suites and vendored packages."""
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    return sorted(str(p) for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def build_tokenizer(files: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, additional_special_tokens=[MASK_TOKEN]
    )


def build_base(out: str | Path, seed: int = 0) -> Path:
    """Write a random-init Llama AR checkpoint with a stdlib-trained tokenizer to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    files = corpus_files(stdlib_corpus())
    tokenizer = build_tokenizer(files)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **DEMO_MODEL,
    )
    model = LlamaForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_corpus(out: str | Path) -> Path:
    """The demo's training data as a jsonl (one stdlib source file a line)."""
    import json

    out = Path(out)
    with out.open("w") as f:
        for name in corpus_files(stdlib_corpus()):
            text = Path(name).read_text(encoding="utf-8", errors="ignore")
            f.write(json.dumps({"text": text}) + "\n")
    return out
