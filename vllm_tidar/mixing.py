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
    are fixed; a rank takes a slice of each global micro-batch."""

    def __init__(self, real: torch.Tensor, distilled: torch.Tensor | None, cfg):
        self.real, self.distilled = real, distilled
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
            n = len(self._order_distill)
            dist = [self._order_distill[(g * self.n_distill + i) % n] for i in range(self.n_distill)]
            batch = torch.cat([batch, self.distilled[dist]])
        return batch[part]
