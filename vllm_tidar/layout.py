"""The TiDAR token layouts: the one source of truth for token order, RoPE positions,
attention templates and which row predicts which position.

Pure torch, no vLLM import. The trainer, the reference decoder and the vLLM model all
use these objects. Conventions (arXiv 2511.08923, §3 and Fig. 2-3):

* A *mask block anchored at position s* is ``block_len`` mask tokens at positions
  ``s .. s+block_len-1``. It sees every committed token before ``s`` and its own block
  (bidirectionally), nothing else. Mask ``r`` predicts the token at its own position
  ``s + r`` (no label shift).
* A *causal row* at position ``p`` predicts the token at ``p + 1`` (shifted, as AR).

Decode step (``DecodeLayout``), with ``P`` the position of ``x_last`` (the last sampled
token, whose KV is not cached yet) and ``K`` drafts::

    rows   0        1..K       then K+1 blocks of block_len masks
    token  x_last   d1..dK     block j (j = 0..K) anchored at P+j+1
    sees   prefix + causal     prefix + x_last, d1..dj + own block

After ``a`` drafts are accepted the step commits ``d1..da`` plus the bonus token that
causal row ``a`` predicts (position ``P+a+1``); mask 0 of block ``a`` predicts that same
position (the beta mix); masks ``1..K`` of block ``a`` are the next step's drafts. KV of
rows ``0..a`` is kept, everything after it is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import TidarError


def _check_block_len(block_len: int) -> None:
    if not isinstance(block_len, int) or block_len < 2:
        raise ValueError(f"TiDAR block length must be an integer >= 2, got {block_len!r}")


def check_num_drafts(num_drafts, block_len: int, what: str = "num_drafts") -> int:
    """``num_drafts`` (K) if it is an integer in ``1..block_len-1``, else ``TidarError``
    (``what`` names the setting in the message)."""
    k = num_drafts
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= block_len - 1:
        raise TidarError(f"{what} must be between 1 and {block_len - 1} (block length {block_len}), got {k!r}")
    return k


@dataclass(frozen=True)
class DecodeLayout:
    """One TiDAR decode step: ``[x_last, d1..dK, block_0 .. block_K]``.

    ``num_drafts`` (K) defaults to ``block_len - 1``; a smaller K keeps blocks of
    ``block_len`` masks (as trained) but drafts and verifies only K tokens.
    """

    block_len: int
    num_drafts: int | None = None

    def __post_init__(self) -> None:
        _check_block_len(self.block_len)
        k = self.block_len - 1 if self.num_drafts is None else self.num_drafts
        object.__setattr__(self, "num_drafts", check_num_drafts(k, self.block_len))

    @classmethod
    def from_num_speculative_tokens(cls, num_spec: int, block_len: int) -> "DecodeLayout":
        """Invert ``num_speculative_tokens``: N = K + (K+1)*Bl  ->  K = (N - Bl) / (Bl + 1)."""
        k, rem = divmod(num_spec - block_len, block_len + 1)
        if rem or not 1 <= k <= block_len - 1:
            raise TidarError(
                f"num_speculative_tokens={num_spec} is not K + (K+1)*{block_len} for any "
                f"K in 1..{block_len - 1} (block length {block_len})"
            )
        return cls(block_len, k)

    @staticmethod
    def num_drafts_scheduled(num_spec: int, block_len: int) -> int:
        """K of a step to which vLLM schedules ``num_spec`` speculative tokens: 0 for none
        (a plain AR step), else the inverse of ``num_speculative_tokens``."""
        return 0 if num_spec == 0 else DecodeLayout.from_num_speculative_tokens(num_spec, block_len).num_drafts

    # --- sizes -------------------------------------------------------------------------
    @property
    def num_verify(self) -> int:
        """Causal rows: x_last plus K drafts."""
        return self.num_drafts + 1

    @property
    def num_blocks(self) -> int:
        """One mask block per acceptance outcome a = 0..K."""
        return self.num_drafts + 1

    @property
    def num_mask_slots(self) -> int:
        """MASK tokens per step: (K+1) blocks of block_len."""
        return self.num_blocks * self.block_len

    @property
    def num_tokens(self) -> int:
        """L, query tokens per step: (K+1)(1+block_len); block_len(1+block_len) for full K."""
        return self.num_verify + self.num_mask_slots

    @property
    def num_speculative_tokens(self) -> int:
        """What vLLM schedules as draft tokens per step: K drafts plus the mask slots (L - 1)."""
        return self.num_tokens - 1

    # --- row indices ---------------------------------------------------------------------
    def block_start(self, j: int) -> int:
        """Row of mask 0 of block j."""
        return self.num_verify + j * self.block_len

    def bonus_mask_row(self, a: int) -> int:
        """Mask row predicting the same position as causal row ``a`` (the beta mix)."""
        return self.block_start(a)

    def next_draft_rows(self, a: int) -> slice:
        """Rows whose predictions are the next step's K drafts after ``a`` acceptances."""
        start = self.block_start(a) + 1
        return slice(start, start + self.num_drafts)

    @cached_property
    def block_draft_index(self) -> torch.Tensor:
        """(K+1, block_len-1) long: row ``a`` holds masks 1..block_len-1 of block ``a``, the
        most drafts a block offers; the first ``k`` of them are the next ``k`` drafts for
        any next-step K ``k <= block_len - 1`` (the next step may draft more or fewer than this one)."""
        starts = torch.tensor([self.block_start(a) + 1 for a in range(self.num_blocks)])
        return starts[:, None] + torch.arange(self.block_len - 1)

    @staticmethod
    def num_kept(a: int) -> int:
        """Rows whose KV stays in the cache after ``a`` acceptances (x_last, d1..da)."""
        return a + 1

    # --- tensors (built once per layout, sliced per step) --------------------------------
    @cached_property
    def position_offsets(self) -> torch.Tensor:
        """RoPE position of each row minus P (the position of x_last)."""
        verify = torch.arange(self.num_verify)
        j = torch.arange(self.num_blocks).repeat_interleave(self.block_len)
        r = torch.arange(self.block_len).repeat(self.num_blocks)
        return torch.cat([verify, j + 1 + r])

    @cached_property
    def predicted_offsets(self) -> torch.Tensor:
        """Position (minus P) of the token each row predicts."""
        shift = (~self.is_mask).long()
        return self.position_offsets + shift

    @cached_property
    def is_mask(self) -> torch.Tensor:
        return torch.arange(self.num_tokens) >= self.num_verify

    @cached_property
    def row_group(self) -> torch.Tensor:
        """-1 for causal rows, j for rows of mask block j."""
        g = torch.full((self.num_tokens,), -1, dtype=torch.long)
        g[self.num_verify :] = torch.arange(self.num_blocks).repeat_interleave(self.block_len)
        return g

    @cached_property
    def template(self) -> torch.Tensor:
        """L x L bool, ``template[q, k]``: row q may attend to step row k."""
        idx = torch.arange(self.num_tokens)
        q, k = idx[:, None], idx[None, :]
        gq, gk = self.row_group[:, None], self.row_group[None, :]
        causal = (gq == -1) & (gk == -1) & (k <= q)
        # block j sees causal rows 0..j (x_last, d1..dj) and its own block
        mask_sees_verify = (gq >= 0) & (gk == -1) & (k <= gq)
        own_block = (gq >= 0) & (gk == gq)
        return causal | mask_sees_verify | own_block

    def input_ids(self, x_last: torch.Tensor, drafts: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """Token ids of one step; ``x_last`` shape (..., 1), ``drafts`` (..., K)."""
        masks = torch.full(
            (*drafts.shape[:-1], self.num_mask_slots),
            mask_token_id,
            dtype=drafts.dtype,
            device=drafts.device,
        )
        return torch.cat([x_last, drafts, masks], dim=-1)


class StepMask:
    """The decode template padded once to ``max_prefix`` committed tokens.

    Keys are ordered ``[committed prefix | step rows]``; ``for_prefix(P)`` returns a
    view of shape (L, P + L), with no allocation per step.
    """

    def __init__(self, layout: DecodeLayout, max_prefix: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.max_prefix = max_prefix
        full = torch.ones(layout.num_tokens, max_prefix + layout.num_tokens, dtype=torch.bool)
        full[:, max_prefix:] = layout.template
        self._full = full.to(device)
        # (L, L + 2): a committed key (visible), the template over the step rows, a padding key (hidden)
        rows = self._full[:, max_prefix:]
        ones = torch.ones(layout.num_tokens, 1, dtype=torch.bool, device=rows.device)
        self._table = torch.cat([ones, rows, ~ones], dim=1)
        self._bias_tables: dict[torch.dtype, torch.Tensor] = {}

    def for_prefix(self, num_committed: int) -> torch.Tensor:
        if not 0 <= num_committed <= self.max_prefix:
            raise ValueError(f"prefix of {num_committed} tokens exceeds {self.max_prefix}")
        return self._full[:, self.max_prefix - num_committed :]

    def _key_columns(self, num_committed: torch.Tensor, width: int) -> torch.Tensor:
        """(T, width) column of each key in ``[visible | L template columns | hidden]``: 0
        for a committed key, ``1 + i`` for step row ``i``, ``L + 1`` for padding."""
        big_l = self.layout.num_tokens
        p = num_committed.to(self._full.device)[:, None]
        rel = torch.arange(width, device=self._full.device)[None, :] - p
        return torch.where(rel < 0, 0, torch.where(rel < big_l, rel + 1, big_l + 1))

    def mask_rows_bias(self, num_committed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention bias (0 visible, -inf hidden) of the mask rows of a batch of steps
        over keys in cache order, ``[committed | step rows | rest]`` padded to ``width``: (T, 1,
        M, width). For step ``t`` key ``j`` is visible iff ``j < num_committed[t]``, or it is
        step row ``j - num_committed[t]`` and the template lets the mask row see it. One gather
        from a table built once per dtype (the template is only indexed here)."""
        return self._bias(num_committed, width, dtype, self.layout.num_verify)

    def step_rows_bias(self, num_committed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The same for all ``L`` rows of each step (verify rows causal over the prefix and
        each other, then the mask rows): (T, 1, L, width)."""
        return self._bias(num_committed, width, dtype, 0)

    def _bias(self, num_committed: torch.Tensor, width: int, dtype: torch.dtype, first_row: int) -> torch.Tensor:
        table = self._bias_tables.get(dtype)
        if table is None:
            table = self._bias_tables[dtype] = torch.zeros(self._table.shape, dtype=dtype, device=self._full.device
                                                           ).masked_fill_(~self._table, float("-inf"))
        return table[first_row:, self._key_columns(num_committed, width)].permute(1, 0, 2).unsqueeze(1)


@dataclass(frozen=True)
class BootstrapLayout:
    """``n`` causal tokens followed by one mask block anchored right after them.

    Used for the prompt (prefill + first drafts) and to restart drafting after a
    degraded step. Causal row ``n-1`` and mask 0 both predict position ``n``; masks
    ``1..block_len-1`` are the first drafts. Positions are relative to the first row.
    """

    num_causal: int
    block_len: int

    def __post_init__(self) -> None:
        _check_block_len(self.block_len)
        if self.num_causal < 1:
            raise ValueError("a bootstrap step needs at least one causal token")

    @property
    def num_tokens(self) -> int:
        return self.num_causal + self.block_len

    @property
    def position_offsets(self) -> torch.Tensor:
        return torch.arange(self.num_tokens)

    @property
    def bonus_mask_row(self) -> int:
        return self.num_causal

    def draft_rows(self, num_drafts: int) -> slice:
        return slice(self.num_causal + 1, self.num_causal + 1 + num_drafts)

    @property
    def template(self) -> torch.Tensor:
        """(n+Bl) x (n+Bl) bool: causal prompt, block sees the prompt and itself."""
        n, total = self.num_causal, self.num_tokens
        m = torch.ones(total, total, dtype=torch.bool).tril()
        m[n:, n:] = True
        return m


def causal_template(num_tokens: int) -> torch.Tensor:
    """Degraded step: plain causal rows, no mask blocks, no drafts."""
    return torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()


@dataclass(frozen=True)
class TrainingLayout:
    """Doubled sequence ``[x_0..x_{S-1} | S masks]`` for the TiDAR objective.

    The mask half reuses positions ``0..S-1``; mask block ``b`` (positions
    ``b*Bl .. (b+1)*Bl-1``) sees clean tokens ``< b*Bl`` and its own block only.
    Clean labels are shifted (NTP), mask labels unshifted.
    """

    seq_len: int
    block_len: int

    def __post_init__(self) -> None:
        _check_block_len(self.block_len)
        if self.seq_len < 2 or self.seq_len % self.block_len:
            raise ValueError(
                f"sequence length {self.seq_len} must be a positive multiple of block length {self.block_len}"
            )

    @cached_property
    def position_ids(self) -> torch.Tensor:
        pos = torch.arange(self.seq_len)
        return torch.cat([pos, pos])

    @cached_property
    def template(self) -> torch.Tensor:
        s, bl = self.seq_len, self.block_len
        pos = torch.arange(s)
        blk = pos // bl
        m = torch.zeros(2 * s, 2 * s, dtype=torch.bool)
        m[:s, :s] = pos[None, :] <= pos[:, None]
        m[s:, :s] = pos[None, :] < (blk * bl)[:, None]
        m[s:, s:] = blk[:, None] == blk[None, :]
        return m

    def input_ids(self, tokens: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """``tokens`` (B, S) -> (B, 2S) with the mask half all ``mask_token_id``."""
        return torch.cat([tokens, torch.full_like(tokens, mask_token_id)], dim=-1)

    @property
    def labelled_per_row(self) -> tuple[int, int]:
        """Labelled tokens of one row: (clean half S-1, the last has no next token; mask half S)."""
        return self.seq_len - 1, self.seq_len

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean half, mask half) of a (B, 2S, ...) tensor such as the logits."""
        return x[:, : self.seq_len], x[:, self.seq_len :]

    def labels(self, tokens: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
        """(AR labels for the clean half, diffusion labels for the mask half)."""
        ar = torch.full_like(tokens, ignore_index)
        ar[:, :-1] = tokens[:, 1:]
        return ar, tokens.clone()
