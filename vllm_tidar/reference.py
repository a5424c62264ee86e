"""Reference TiDAR decoder in plain PyTorch over a Hugging Face model (batch 1).

One forward per step over ``[x_last, d1..dK, K+1 mask blocks]`` (``layout.DecodeLayout``).
The KV cache keeps x_last and accepted drafts and crops everything else; nothing is
recomputed. Verification is greedy argmax matching or exact speculative rejection
sampling (drafts are one-hot proposals). ``mode="ar"`` decodes the same checkpoint one
token per forward, for parity checks and A/B numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import hf_flex
from .checkpoint import TidarSettings
from .errors import TidarError
from .layout import BootstrapLayout, DecodeLayout, StepMask, causal_template


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TidarError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TidarError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Target distribution over the vocabulary (temperature, then nucleus)."""
        p = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = p.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p  # always keeps the top token
            p = torch.zeros_like(p).scatter(-1, order, sorted_p * keep)
            p = p / p.sum(-1, keepdim=True)
        return p


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens or max_len)
    num_forwards: int
    accepted_drafts: list[int] = field(default_factory=list)  # per TiDAR decode step

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.num_forwards, 1)


class ReferenceDecoder:
    """TiDAR (``mode="tidar"``) or plain AR (``mode="ar"``) decoding of one checkpoint."""

    def __init__(
        self,
        model,
        settings: TidarSettings,
        *,
        block_length: int | None = None,
        num_drafts: int | None = None,
        beta: float | None = None,
        max_len: int | None = None,
        draft_at_prefill: bool = True,
    ):
        self.model = model
        self.settings = settings
        self.mask_id = settings.mask_token_id
        try:
            self.layout = DecodeLayout(block_length or settings.block_length, num_drafts)
        except ValueError as e:
            raise TidarError(str(e)) from None
        self.beta = settings.beta if beta is None else beta
        if not 0.0 <= self.beta <= 1.0:
            raise TidarError(f"beta must be in [0, 1], got {self.beta}")
        self.max_len = max_len or model.config.max_position_embeddings
        # False: plain prefill, then a first step whose drafts are all [MASK] (always
        # rejected; block 0 drafts), which is what an engine that cannot append masks to
        # the prompt does. Costs one forward per request.
        self.draft_at_prefill = draft_at_prefill
        self.device = next(model.parameters()).device
        self.step_mask = StepMask(self.layout, self.max_len, self.device)
        self._offsets = self.layout.position_offsets.to(self.device)
        self._flex = getattr(model.config, "_attn_implementation", None) == hf_flex.ATTN_NAME

    # --- model call ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """Logits (T, V) in float32 for T new tokens; ``mask`` is (T, cached + T) bool."""
        ids = torch.as_tensor(ids, device=self.device).view(1, -1)
        if self._flex:
            attn_mask = hf_flex.block_mask(mask)
        else:
            attn_mask = mask[None, None]
        out = self.model(
            input_ids=ids,
            position_ids=positions.view(1, -1),
            attention_mask=attn_mask,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[0]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits[:, self.mask_id] = -torch.inf  # the mask token is never sampled nor accepted
        return logits

    def _mix(self, ar: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        if self.beta == 1.0:
            return ar
        mixed = self.beta * ar + (1.0 - self.beta) * diff
        mixed[..., self.mask_id] = -torch.inf  # 0 * -inf would be nan
        return mixed

    # --- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        mode: str = "tidar",
        sampling: SamplingSettings = SamplingSettings(),
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> GenerationResult:
        """``stop``: called with the tokens generated so far (within ``max_tokens``) after
        every forward; True ends decoding (e.g. a stop sequence in the text)."""
        if not prompt_ids:
            raise TidarError("prompt is empty: give at least one token")
        if max_tokens <= 0:
            raise TidarError(f"max_tokens must be > 0, got {max_tokens}")
        if mode not in ("tidar", "ar"):
            raise TidarError(f"mode must be 'tidar' or 'ar', got {mode!r}")
        if len(prompt_ids) >= self.max_len:
            raise TidarError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_len={self.max_len}")
        budget = min(max_tokens, self.max_len - len(prompt_ids))
        session = _Session(self, list(prompt_ids), sampling, generator)
        if mode == "ar":
            session.prefill_ar()
            step = session.step_ar
        else:
            session.prefill_tidar()
            step = session.step_tidar
        while not session.done(budget, eos_token_id) and not (stop and stop(session.generated[:budget])):
            step()
        return session.result(budget, eos_token_id)


class _Session:
    """State of one request: committed tokens (the last has no KV yet), drafts, KV cache."""

    def __init__(self, dec: ReferenceDecoder, prompt: list[int], sampling: SamplingSettings, generator):
        self.dec, self.sampling, self.generator = dec, sampling, generator
        self.num_prompt = len(prompt)
        self.tokens = prompt
        self.drafts: torch.Tensor | None = None
        self.cache = DynamicCache(config=dec.model.config)
        self.num_forwards = 0
        self.accepted: list[int] = []

    # --- bookkeeping ---------------------------------------------------------------------
    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    def done(self, budget: int, eos: int | None) -> bool:
        gen = self.generated
        return len(gen) >= budget or (eos is not None and eos in gen)

    def result(self, budget: int, eos: int | None) -> GenerationResult:
        gen = self.generated
        if eos is not None and eos in gen[:budget]:
            return GenerationResult(gen[: gen.index(eos) + 1], "stop", self.num_forwards, self.accepted)
        return GenerationResult(gen[:budget], "length", self.num_forwards, self.accepted)

    def _run(self, ids, positions, mask) -> torch.Tensor:
        self.num_forwards += 1
        return self.dec.forward(ids, positions, mask, self.cache)

    def _sample(self, logits: torch.Tensor) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(self.sampling.probs(logits), 1, generator=self.generator))

    def _drafts_from(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)  # one-step diffusion drafts (mask logit already -inf)

    # --- plain AR ------------------------------------------------------------------------
    def prefill_ar(self) -> None:
        n = self.num_prompt
        dev = self.dec.device
        logits = self._run(self.tokens, torch.arange(n, device=dev), causal_template(n).to(dev))
        self.tokens.append(self._sample(logits[-1]))

    def step_ar(self) -> None:
        p = len(self.tokens) - 1  # position of the token without KV
        dev = self.dec.device
        mask = torch.ones(1, p + 1, dtype=torch.bool, device=dev)
        logits = self._run(self.tokens[-1:], torch.tensor([p], device=dev), mask)
        self.tokens.append(self._sample(logits[-1]))

    # --- TiDAR ---------------------------------------------------------------------------
    def prefill_tidar(self) -> None:
        """Prompt causally plus one mask block: first token and first drafts in one forward."""
        dec, n = self.dec, self.num_prompt
        boot = BootstrapLayout(n, dec.layout.block_len)
        if not dec.draft_at_prefill:
            self.prefill_ar()
            self.drafts = torch.full((dec.layout.num_drafts,), dec.mask_id, device=dec.device)
            return
        if boot.num_tokens > dec.max_len:  # no room for a mask block: plain prefill
            return self.prefill_ar()
        ids = self.tokens + [dec.mask_id] * dec.layout.block_len
        logits = self._run(ids, boot.position_offsets.to(dec.device), boot.template.to(dec.device))
        _truncate(self.cache, n)
        target = dec._mix(logits[n - 1], logits[boot.bonus_mask_row])
        self.tokens.append(self._sample(target))
        self.drafts = self._drafts_from(logits[boot.draft_rows(dec.layout.num_drafts)])

    def step_tidar(self) -> None:
        dec, layout = self.dec, self.dec.layout
        p = len(self.tokens) - 1  # position of x_last
        if self.drafts is None or p + layout.num_tokens > dec.max_len:
            self.drafts = None  # degraded: too close to max_len for the full layout
            return self.step_ar()
        x_last = torch.tensor([self.tokens[-1]], device=dec.device)
        ids = layout.input_ids(x_last, self.drafts, dec.mask_id)
        logits = self._run(ids, p + dec._offsets, dec.step_mask.for_prefix(p))
        a, bonus = self._verify(logits)
        self.tokens.extend(self.drafts[:a].tolist() + [bonus])
        self.accepted.append(a)
        _truncate(self.cache, p + layout.num_kept(a))
        self.drafts = self._drafts_from(logits[layout.next_draft_rows(a)])

    def _verify(self, logits: torch.Tensor) -> tuple[int, int]:
        """Accepted draft count ``a`` and the bonus token at position P+a+1."""
        dec, layout = self.dec, self.dec.layout
        for i, d in enumerate(self.drafts.tolist()):
            target = dec._mix(logits[i], logits[layout.bonus_mask_row(i)])
            if self.sampling.greedy:
                v = int(target.argmax())
                if v != d:
                    return i, v
                continue
            p = self.sampling.probs(target)
            u = torch.rand((), generator=self.generator, dtype=torch.float64, device=p.device)
            if u >= p[d]:  # reject the one-hot proposal: resample from p with d removed
                p[d] = 0.0
                return i, int(torch.multinomial(p / p.sum(), 1, generator=self.generator))
        k = layout.num_drafts
        return k, self._sample(dec._mix(logits[k], logits[layout.bonus_mask_row(k)]))


def _truncate(cache: DynamicCache, keep: int) -> None:
    """Roll the cache back to its first ``keep`` tokens (no copy, no recompute)."""
    drop = cache.get_seq_length() - keep
    if drop > 0:
        cache.crop(-drop)
