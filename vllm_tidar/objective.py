"""The TiDAR training loss with per-row weights, and an optional KL anchor to a frozen base.

Per row r of a step: ``ar_r`` and ``diff_r`` are the sums of the token cross-entropies of its
clean half (``S-1`` labelled tokens, shifted) and its mask half (``S`` tokens, unshifted; with
diffusion targets, only its ``n_r`` target tokens, else ``n_r = S``); ``kl_r`` is the sum over
the same ``S-1`` clean positions of KL(base || model). With row weights ``a_r``, ``d_r``,
``k_r`` the step's losses are weighted means over tokens::

    L_AR   = sum_r a_r ar_r / ((S-1) sum_r a_r)
    L_Diff = sum_r d_r diff_r / (sum_r d_r n_r)
    L_KL   = sum_r k_r kl_r / ((S-1) sum_r k_r)
    loss   = (alpha L_AR + L_Diff) / (1 + alpha) + kl_weight L_KL

the sums running over every row of the step (all micro-batches and ranks); a term whose
weights sum to 0 is 0. With all weights 1 this is the paper's (alpha L_AR + L_Diff)/(1+alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import TrainingLayout


@dataclass
class RowLosses:
    """Per-row sums (B,) of token losses."""

    ar: torch.Tensor
    diff: torch.Tensor
    kl: torch.Tensor | None = None  # only with a frozen base


@dataclass
class RowWeights:
    """Per-row loss weights (B,)."""

    ar: torch.Tensor
    diff: torch.Tensor
    kl: torch.Tensor

    @classmethod
    def ones(cls, rows: int) -> "RowWeights":
        one = torch.ones(rows)
        return cls(one, one, one)

    def __getitem__(self, idx) -> "RowWeights":
        return RowWeights(self.ar[idx], self.diff[idx], self.kl[idx])

    def normalisers(self, layout: TrainingLayout, repeats: int = 1,
                    diff_tokens: torch.Tensor | None = None) -> tuple[float, float, float]:
        """Weighted labelled-token counts (AR, Diff, KL) of ``repeats`` batches with these weights;
        ``diff_tokens`` (repeats, B): each row's diffusion target tokens (default: all ``S``)."""
        n_ar, n_diff = layout.labelled_per_row
        diff = (repeats * n_diff * self.diff.sum().item() if diff_tokens is None
                else (self.diff * diff_tokens).sum().item())
        return repeats * n_ar * self.ar.sum().item(), diff, repeats * n_ar * self.kl.sum().item()


def row_losses(model, tokens: torch.Tensor, layout: TrainingLayout, mask_id: int, base=None,
               frozen_clean: bool = False, diff_targets: torch.Tensor | None = None) -> RowLosses:
    """Per-row loss sums of clean rows ``tokens`` (B, S); ``base``: a frozen AR model for the KL term;
    ``diff_targets`` (B, S) bool: the tokens the mask half learns (default: all).

    ``frozen_clean``: no gradient can reach the clean half (a frozen model with a draft adapter
    that runs on mask rows only, and clean rows never attend to mask rows), so the clean half
    runs once without autograd and the mask half attends to its cached keys and values: the same
    losses and gradients as the doubled forward, without the clean half's backward."""
    dev = tokens.device
    ids = layout.input_ids(tokens, mask_id)
    pos = layout.position_ids.to(dev).expand(tokens.shape[0], -1)
    attn = layout.template.to(dev)[None, None].expand(tokens.shape[0], 1, -1, -1)
    if frozen_clean:
        s = layout.seq_len
        with torch.no_grad():
            out = model(input_ids=ids[:, :s], position_ids=pos[:, :s], attention_mask=attn[:, :, :s, :s], use_cache=True)
        clean = out.logits.float()
        masks = model(input_ids=ids[:, s:], position_ids=pos[:, s:], attention_mask=attn[:, :, s:],
                      past_key_values=out.past_key_values, use_cache=False).logits.float()
    else:
        logits = model(input_ids=ids, position_ids=pos, attention_mask=attn, use_cache=False).logits.float()
        clean, masks = layout.halves(logits)
    ar_labels, diff_labels = layout.labels(tokens)
    ar = F.cross_entropy(clean.transpose(1, 2), ar_labels, ignore_index=-100, reduction="none").sum(1)
    diff = F.cross_entropy(masks.transpose(1, 2), diff_labels, reduction="none")
    diff = (diff if diff_targets is None else diff * diff_targets.to(dev)).sum(1)
    kl = None
    if base is not None:
        with torch.no_grad():  # the clean half is causal over the clean tokens: the base's plain forward
            ref = base(input_ids=tokens, use_cache=False).logits.float().log_softmax(-1)
        logp = clean.log_softmax(-1)[..., : ref.shape[-1]]  # tokens the base lacks (the mask) have p_base = 0
        per_pos = (ref.exp() * (ref - logp)).sum(-1)
        kl = (per_pos * (ar_labels != -100)).sum(1)
    return RowLosses(ar, diff, kl)


def combine(parts: RowLosses, w: RowWeights, norms: tuple[float, float, float], alpha: float,
            kl_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, L_AR, L_Diff, L_KL) of these rows' share of a step whose normalisers are ``norms``."""
    dev = parts.ar.device

    def term(x, weight, norm):
        return (weight.to(dev) * x).sum() / norm if norm and x is not None else torch.zeros((), device=dev)

    l_ar, l_diff, l_kl = term(parts.ar, w.ar, norms[0]), term(parts.diff, w.diff, norms[1]), term(parts.kl, w.kl, norms[2])
    return (alpha * l_ar + l_diff) / (1 + alpha) + kl_weight * l_kl, l_ar, l_diff, l_kl


def tidar_loss(model, tokens: torch.Tensor, layout: TrainingLayout, mask_id: int, alpha: float,
               weights: RowWeights | None = None):
    """(loss, L_AR, L_Diff) of one batch of clean rows (B, S), normalised over this batch."""
    w = weights or RowWeights.ones(tokens.shape[0])
    loss, l_ar, l_diff, _ = combine(row_losses(model, tokens, layout, mask_id), w, w.normalisers(layout), alpha)
    return loss, l_ar, l_diff
