"""Draft adapters: low-rank weights that only the [MASK] rows of a TiDAR forward run through.

Every row that holds a real token (the prompt, ``x_last``, the drafts being verified, the
clean half of a training row) computes exactly the base model; a row whose input token is
[MASK] adds ``(x @ A) @ B`` to the output of each adapted linear layer. AR rows never attend
to mask rows (the layout's templates), so their keys, values and logits are the base's bit
for bit: training only the adapter (``vllm-tidar train --draft-adapter-rank R``) teaches the
mask blocks to draft what the AR head says while the AR model, its greedy output and its
loss stay the base's. The mask rows' KV is never kept, so KV rollback is untouched.

On disk: ``draft_adapter/adapter.safetensors`` inside the checkpoint (keys
``<HF module name>.lora_A`` (in, r) and ``.lora_B`` (r, out)), described by
``config.json["tidar"]["draft_adapter"] = {"rank": r, "targets": [...]}``. The base weights stay
in ``model.safetensors``: transformers and vLLM load them unchanged, and this module attaches
the adapter to either (``attach_hf``: rows routed by their input id; ``VLLMDraftAdapter``:
rows routed by the model's step detection, fused QKV / gate-up projections included).
PEFT's LoRA routes per sequence, not per row, hence this small module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TidarError

FOLDER = "draft_adapter"
WEIGHTS = "adapter.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM fuses these HF projections into one linear layer (outputs concatenated in this order)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
DRAFT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
RESCORED = 4  # draft-head candidates per row rescored at the model's precision (draft_ids)


def check_draft_dtype(requested: str | None) -> str:
    """The ``tidar_draft_dtype`` setting's name (None: ``auto``), or a one-line error."""
    name = "auto" if requested is None else requested
    if name not in DRAFT_DTYPES:
        raise TidarError(f"tidar_draft_dtype must be one of {', '.join(DRAFT_DTYPES)}, got {requested!r}")
    return name


def draft_dtype(requested: str | None, model_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype of the CPU merged draft weights (``hf_overrides={"tidar_draft_dtype": ...}``).

    Drafts are proposals the fp32 verify rows accept or reject, so their precision decides
    acceptance, never the output: ``auto`` (the default) takes bfloat16 for an fp32 model on a
    CPU with native bf16 dot products (AVX512-BF16 or AMX), where the mask rows' GEMMs then run
    1.2-1.7x faster (16-256 rows, demo shapes), and the model's dtype elsewhere."""
    name = check_draft_dtype(requested)
    if DRAFT_DTYPES[name] is not None:
        return DRAFT_DTYPES[name]
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cpu = torch.device(device).type == "cpu"
    return torch.bfloat16 if cpu and model_dtype == torch.float32 and native else model_dtype


@dataclass(frozen=True)
class AdapterSpec:
    """Rank and target projections of a draft adapter (``config.json["tidar"]["draft_adapter"]``)."""

    rank: int
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise TidarError(f"draft adapter rank must be a positive integer, got {self.rank!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise TidarError(f"draft adapter targets must be among {', '.join(TARGETS)}, got {list(self.targets)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @classmethod
    def from_dict(cls, raw, source: str = "checkpoint") -> "AdapterSpec":
        if not isinstance(raw, dict) or "rank" not in raw:
            raise TidarError(f"{source}: config.json 'tidar' draft_adapter must be an object with a rank")
        return cls(raw["rank"], tuple(raw.get("targets", TARGETS)))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "targets": list(self.targets)}


def _targets(model, spec: AdapterSpec) -> dict[str, nn.Linear]:
    """HF module name -> linear layer, for every adapted projection of an HF causal LM."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in spec.targets}
    if not found:
        raise TidarError(f"draft adapter: the model has none of the projections {list(spec.targets)}")
    return found


class DraftAdapter(nn.Module):
    """The low-rank pairs ``A`` (in, r), ``B`` (r, out) of every adapted projection, by HF module name."""

    def __init__(self, spec: AdapterSpec, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.spec = spec
        self.names = sorted(shapes)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for name in self.names:  # uninitialised: ``fresh`` draws them, ``load`` reads them
            n_in, n_out = shapes[name]
            self.a.append(nn.Parameter(torch.empty(n_in, spec.rank)))
            self.b.append(nn.Parameter(torch.empty(spec.rank, n_out)))

    @classmethod
    def fresh(cls, model, spec: AdapterSpec, seed: int = 0) -> "DraftAdapter":
        """A new adapter for an HF model: ``A`` random, ``B`` = 0, so it drafts exactly as the base does."""
        adapter = cls(spec, {n: (m.in_features, m.out_features) for n, m in _targets(model, spec).items()})
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            for a, b in zip(adapter.a, adapter.b):
                a.copy_(torch.randn(a.shape) / math.sqrt(a.shape[0]))
                b.zero_()
        return adapter

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (a, b) for n, a, b in zip(self.names, self.a, self.b)}

    def save(self, checkpoint: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(checkpoint) / FOLDER
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (a, b) in self.pairs().items():
            tensors[f"{name}.lora_A"] = a.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B"] = b.detach().float().contiguous().cpu()
        save_file(tensors, str(out / WEIGHTS))
        return out

    @classmethod
    def load(cls, checkpoint: str | Path, spec: AdapterSpec) -> "DraftAdapter":
        from safetensors.torch import load_file

        path = Path(checkpoint) / FOLDER / WEIGHTS
        if not path.is_file():
            raise TidarError(f"{checkpoint}: config.json names a draft adapter but {FOLDER}/{WEIGHTS} is missing")
        tensors = load_file(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        try:
            shapes = {n: (tensors[f"{n}.lora_A"].shape[0], tensors[f"{n}.lora_B"].shape[1]) for n in names}
        except KeyError as e:
            raise TidarError(f"{path}: no tensor {e.args[0]}") from None
        adapter = cls(spec, shapes)
        with torch.no_grad():
            for name, (a, b) in adapter.pairs().items():
                a_src, b_src = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
                if a_src.shape[1] != spec.rank or b_src.shape[0] != spec.rank:
                    raise TidarError(f"{path}: {name} has rank {a_src.shape[1]}, config.json says {spec.rank}")
                a.copy_(a_src)
                b.copy_(b_src)
        return adapter


def attach_hf(model, adapter: DraftAdapter, mask_token_id: int) -> None:
    """Run ``adapter`` on the [MASK] rows of every forward of an HF causal LM (``input_ids`` given).

    The adapter is kept on the model (``draft_adapter(model)``) but not registered as a
    submodule: ``save_pretrained`` writes the base weights only."""
    layers = _targets(model, adapter.spec)
    missing = set(adapter.names) - set(layers)
    if missing:
        raise TidarError(f"draft adapter names projections the model lacks: {sorted(missing)[:3]}")
    adapter.to(next(model.parameters()).device)
    model.__dict__["_tidar_draft_adapter"] = adapter
    route: dict[str, torch.Tensor] = {}

    def set_route(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise TidarError("a model with a draft adapter needs input_ids (mask rows are found by their token)")
        w = (ids == mask_token_id).unsqueeze(-1)
        route["w"] = w if bool(w.any()) else None  # no mask row (AR steps, prefill): the base alone

    model.register_forward_pre_hook(set_route, with_kwargs=True)
    for name, (a, b) in adapter.pairs().items():
        def add_delta(_module, inputs, output, a=a, b=b):
            w = route["w"]
            if w is None:
                return output
            x = inputs[0]
            return output + ((x * w.to(x.dtype)) @ a.to(x.dtype)) @ b.to(x.dtype)

        layers[name].register_forward_hook(add_delta)


def draft_adapter(model) -> DraftAdapter | None:
    """The adapter ``attach_hf`` put on an HF model, if any."""
    return model.__dict__.get("_tidar_draft_adapter")


class VLLMDraftAdapter:
    """A draft adapter on a vLLM model's linear layers (tensor parallel size 1).

    Before a forward the model names the rows to adapt: ``set_blocks(R, L, first)`` when the
    batch is ``R`` full TiDAR steps of ``L`` rows each, adapted from row ``first`` on (the
    steady state); ``set_rows(rows, weight)`` for a mixed batch (token-row indices and a 0/1
    weight per index, so padding indices add nothing); ``set_rows(None)`` runs the base.
    vLLM's fused projections get one pair: ``A`` the adapted parts' ``A`` side by side,
    ``B`` block-diagonal over the fused output (zero for parts without an adapter).

    On the CPU each adapted layer runs its mask rows through a merged weight ``W + (A B)^T``
    (``merge_base``, made once the weights are loaded and packed by vLLM's own CPU GEMM
    dispatch like the base's): one GEMM of the base's size per row instead of the base plus
    the low-rank pair, which on a CPU is FLOPs the step pays for (about 40% of the base's at
    rank 64 on the demo, 2-4x the base's at rank 256). In the steady state the verify rows run
    the base GEMM alone; in a mixed batch every row runs the base GEMM and the routed rows are
    overwritten by the merged GEMM's (found with one ``nonzero`` per forward, a host sync the
    CPU does not pay for). Elsewhere (CUDA, or no merged weights) the steady state adds the
    pair in place on a slice (``addmm_``) and a mixed batch adds ``(x @ A) @ B`` to the routed
    rows (a forward hook, no host sync). The merged copies cost one more copy of the adapted
    layers' weights; ``merged_dtype`` (``draft_dtype``) is theirs, the mask rows cast to it
    before the merged GEMM and its output back where it is placed. When that dtype is not the
    model's, the proposer's draft tokens come from a copy of the lm_head in it too, its top
    candidates rescored at the model's precision (``pack_draft_head``, ``draft_ids``); the
    verify rows' logits stay the model's."""

    def __init__(self, model, adapter: DraftAdapter, device, dtype, merged_dtype: torch.dtype | None = None):
        self.rows: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.blocks: tuple[int, int, int] | None = None
        self.device = torch.device(device)
        self.merged_dtype = merged_dtype
        self.modules: dict[str, nn.Module] = {}
        self._merged: dict[str, nn.Module] = {}  # target -> holder of the packed W + (A B)^T
        self._head: tuple[nn.Module, torch.Tensor, int] | None = None  # pack_draft_head: packed copy, weight, vocab
        self.split = False  # mask rows run on the merged weights
        self._routed: torch.Tensor | None = None
        self._hooks = []  # the low-rank path's forward hooks (removed once merged weights take over)
        modules = dict(model.named_modules())
        groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, pair in adapter.pairs().items():
            parent, leaf = name.rsplit(".", 1)
            fused = next((f for f, parts in FUSED.items() if leaf in parts and f"{parent}.{f}" in modules), leaf)
            groups.setdefault(f"{parent}.{fused}", {})[leaf] = pair
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for target, parts in groups.items():
            module = modules.get(target)
            if module is None:
                raise TidarError(f"draft adapter: the vLLM model has no layer {target}")
            leaf = target.rsplit(".", 1)[-1]
            if leaf in FUSED:
                sizes, r = list(module.output_sizes), adapter.spec.rank
                present = [part for part in FUSED[leaf] if part in parts]
                a = torch.cat([parts[part][0].detach() for part in present], 1)
                b = torch.zeros(len(present) * r, sum(sizes))
                col = 0
                for part, size in zip(FUSED[leaf], sizes):
                    if part in parts:
                        i = present.index(part)
                        b[i * r : (i + 1) * r, col : col + size] = parts[part][1].detach()
                    col += size
            else:
                a, b = (t.detach() for t in parts[leaf])
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            self.pairs[target] = (a, b)
            self.modules[target] = module
            self._hooks.append(module.register_forward_hook(self._hook(a, b)))

    def merge_base(self) -> None:
        """On the CPU, after the model's weights are loaded (vLLM's CPU GEMM dispatch then
        packs and drops them): the merged weight ``W + (A B)^T`` of every adapted layer,
        packed by the same dispatch. Layers whose base weight is not a plain loaded matrix
        (quantized, meta) keep the low-rank path."""
        if self.device.type != "cpu":
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        merged = {}
        for target, module in self.modules.items():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.is_meta or not w.is_floating_point():
                return
            a, b = self.pairs[target]
            holder = nn.Module()
            delta = (a.float() @ b.float()).t()
            holder.weight = nn.Parameter((w.detach().float() + delta).to(self.merged_dtype or w.dtype),
                                         requires_grad=False)
            dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
            merged[target] = holder
        self._merged = merged

    def merged_layers(self) -> dict[str, nn.Module]:
        """Adapted layer name -> the holder of its packed merged weights (its ``cpu_linear``
        is the GEMM the mask rows run); empty where the low-rank path runs instead."""
        return dict(self._merged)

    def pack_draft_head(self, weight: torch.Tensor | None, vocab_size: int) -> None:
        """On the CPU, with merged weights in a dtype other than the model's: the lm_head
        ``weight`` (vocab rows, possibly padded past ``vocab_size``; kept by vLLM for the
        embedding lookup) copied to that dtype and packed by vLLM's CPU GEMM dispatch, for
        ``draft_ids`` (half the bytes the fp32 head streams each step, bf16 matrix units where
        the CPU has them)."""
        self._head = None
        if self.device.type != "cpu" or not self._merged or self.merged_dtype is None:
            return
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.is_meta or not weight.is_floating_point():
            return  # no plain lm_head here (quantized, or another pipeline stage's)
        if weight.dtype == self.merged_dtype:
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = nn.Module()
        holder.weight = nn.Parameter(weight.detach().to(self.merged_dtype), requires_grad=False)
        dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
        self._head = (holder, weight, vocab_size)

    def draft_ids(self, hidden: torch.Tensor, exclude: int) -> torch.Tensor | None:
        """Greedy draft token of each row of ``hidden`` (never ``exclude``, the MASK id) through
        the packed draft head: its logits pick ``RESCORED`` candidates per row, which the model's
        own lm_head rows then score in the hidden states' dtype. The pick is the full head's
        argmax unless that token is not among the low-precision head's top candidates. None
        without a packed head (the model's ``compute_logits`` drafts then)."""
        if self._head is None:
            return None
        holder, weight, vocab = self._head
        logits = holder.cpu_linear(hidden.to(holder.weight.dtype), holder.weight, None)[:, :vocab]
        logits[:, exclude] = -torch.inf
        cand = logits.topk(min(RESCORED, vocab), dim=-1).indices  # (n, c)
        exact = torch.einsum("nd,ncd->nc", hidden, weight[cand].to(hidden.dtype))
        return cand.gather(1, exact.argmax(-1, keepdim=True)).squeeze(1)

    def _install_split(self) -> None:
        """Once, at the first forward: wrap each adapted layer's CPU GEMM
        (``cpu_linear``, set by vLLM once weights are processed) so mask rows run on the merged
        weight. Without merged weights (or ``cpu_linear``) the hook path stays."""
        if self.split or not self._merged:
            return
        if not all(hasattr(m, "cpu_linear") for m in self.modules.values()):
            self._merged = {}
            return
        # (base GEMM, wrapped GEMM) per layer: the wrapper is in place only while a step has
        # mask rows, so plain steps call vLLM's GEMM directly
        self._gemms = {target: (module.cpu_linear, self._split_linear(module.cpu_linear, self._merged[target]))
                       for target, module in self.modules.items()}
        self._wrapped = False
        self.split = True
        for hook in self._hooks:  # every row now runs through the wrapped GEMM: a forward hook
            hook.remove()         # would only cost each layer call (plain steps too) its slow path
        self._hooks = []

    def set_rows(self, rows: torch.Tensor | None, weight: torch.Tensor | None = None) -> None:
        self._install_split()  # at the first forward: plain steps then run hook-free too
        self.rows, self.weight, self.blocks = rows, weight, None
        self._routed = None  # token rows of the merged GEMM, found by the first adapted layer
        self._wrap(rows is not None)

    def set_blocks(self, num_blocks: int, block_rows: int, first: int) -> None:
        self._install_split()
        self.rows, self.weight, self.blocks = None, None, (num_blocks, block_rows, first)
        self._wrap(True)

    def _wrap(self, on: bool) -> None:
        """Put the split GEMM in place (``on``) or vLLM's own back, when that changes."""
        if self.split and on != self._wrapped:
            for target, module in self.modules.items():
                module.__dict__["cpu_linear"] = self._gemms[target][on]  # (a plain attribute: skip nn.Module.__setattr__)
            self._wrapped = on

    def _split_linear(self, base, merged: nn.Module):
        """``cpu_linear`` of one layer: in the steady state the first ``first`` rows of every
        block run the base GEMM, the rest the merged one; in a mixed batch the routed rows run
        the merged one; otherwise the base alone."""
        gemm, dtype = merged.cpu_linear, merged.weight.dtype

        def merged_linear(x, bias):
            """The merged GEMM; its output stays in the merged dtype (the ``cat`` or
            ``index_copy_`` that places it casts it back)."""
            if x.dtype == dtype:
                return gemm(x, merged.weight, bias)
            return gemm(x.to(dtype), merged.weight, None if bias is None else bias.to(dtype))

        def linear(x, weight, bias):
            blocks = self.blocks
            if blocks is None:
                out = base(x, weight, bias)
                if self.rows is not None:
                    rows = self._routed_rows(x.shape[0])
                    if rows.numel():
                        out.index_copy_(0, rows, merged_linear(x[rows], bias).to(out.dtype))
                return out
            n, big_l, first = blocks
            if n == 1:  # torch.cat promotes the merged rows to the base's dtype in its copy
                return torch.cat([base(x[:first], weight, bias), merged_linear(x[first:], bias)])
            xv = x.view(n, big_l, -1)
            head = base(xv[:, :first].reshape(n * first, -1), weight, bias)
            tail = merged_linear(xv[:, first:].reshape(n * (big_l - first), -1), bias)
            return torch.cat([head.view(n, first, -1), tail.view(n, big_l - first, -1)], 1).view(n * big_l, -1)

        return linear

    def _routed_rows(self, num_rows: int) -> torch.Tensor:
        """Distinct token rows whose ``set_rows`` weight is non-zero (an index may repeat,
        with weight 0, where a short request's rows run into the next request's)."""
        if self._routed is None:
            hit = torch.zeros(num_rows, dtype=self.weight.dtype, device=self.weight.device)
            hit.index_add_(0, self.rows, self.weight[:, 0])
            self._routed = hit.nonzero().squeeze(1)
        return self._routed

    def _hook(self, a: torch.Tensor, b: torch.Tensor):
        def add_delta(_module, inputs, output):
            blocks, rows = self.blocks, self.rows
            if blocks is None and rows is None:
                return output
            out = output[0] if isinstance(output, tuple) else output
            x = inputs[0]
            if blocks is not None:  # in place on the mask slots of each block (no merged weights)
                n, big_l, first = blocks
                if n == 1:
                    out[first:].addmm_(x[first:] @ a, b)
                else:
                    out.view(n, big_l, -1)[:, first:] += (x.view(n, big_l, -1)[:, first:] @ a) @ b
                return output
            out = out.index_add(0, rows, ((x[rows] @ a) * self.weight) @ b)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return add_delta
