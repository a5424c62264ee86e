"""The rows of each training micro-batch, real text then self-distilled continuations, and their loss weights."""

from __future__ import annotations

import random

import torch

from .objective import RowWeights


def row_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of ``range(n)``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


class MixedBatches:
    """Global micro-batch ``g``: ``n_real`` real-text rows then ``n_distill`` distilled rows, each
    source read in its own seeded order and cycled. Every micro-batch has the same composition,
    so its row weights (``weights``, and the per-source indicators ``real`` and ``distilled``)
    are fixed; a rank takes a slice of each global micro-batch. ``distilled_targets`` (bool, like
    ``distilled``): the distilled tokens the mask half learns (the continuations, not their
    prompts); without it every token of every row is a diffusion target."""

    def __init__(self, real: torch.Tensor, distilled: torch.Tensor | None, cfg,
                 distilled_targets: torch.Tensor | None = None):
        self.real, self.distilled, self.distilled_targets = real, distilled, distilled_targets
        self.n_distill = cfg.distill_rows()
        self.n_real = cfg.batch_size - self.n_distill
        self._order_real = row_order(len(real), cfg.seed)
        self._order_distill = row_order(len(distilled), cfg.seed + 1) if distilled is not None else []
        is_d = torch.arange(cfg.batch_size) >= self.n_real
        real_row = (~is_d).float()
        self.weights = RowWeights(ar=torch.where(is_d, cfg.distill_ar_weight, 1.0),
                                  diff=torch.where(is_d, 1.0, cfg.real_diff_weight),
                                  kl=torch.where(is_d, cfg.distill_kl_weight, 1.0))
        self.real_rows = RowWeights(real_row, real_row, real_row)
        self.distilled_rows = RowWeights(is_d.float(), is_d.float(), is_d.float())

    def rows(self, g: int, part: slice = slice(None)) -> torch.Tensor:
        """Rows ``part`` of global micro-batch ``g`` (B, S)."""
        real = [self._order_real[(g * self.n_real + i) % len(self._order_real)] for i in range(self.n_real)]
        batch = self.real[real]
        if self.n_distill:
            batch = torch.cat([batch, self.distilled[self._distilled(g)]])
        return batch[part]

    def targets(self, g: int, part: slice = slice(None)) -> torch.Tensor | None:
        """Diffusion targets (B, S) bool of rows ``part`` of global micro-batch ``g`` (None: all tokens)."""
        if self.distilled_targets is None:
            return None
        real = torch.ones(self.n_real, self.real.shape[1], dtype=torch.bool)
        return torch.cat([real, self.distilled_targets[self._distilled(g)]])[part]

    def diff_tokens(self, groups: range) -> torch.Tensor | None:
        """Diffusion target tokens per row (len(groups), B) of these global micro-batches (None: all)."""
        if self.distilled_targets is None:
            return None
        return torch.stack([self.targets(g).sum(1) for g in groups]).float()

    def _distilled(self, g: int) -> list[int]:
        n = len(self._order_distill)
        return [self._order_distill[(g * self.n_distill + i) % n] for i in range(self.n_distill)]
