"""Repetition of token sequences: distinct 4-grams, and the threshold below which an output
counts as a loop (the AR quality guard of ``tokens-per-forward``, and the filter ``train``
can apply to self-distilled continuations)."""

from __future__ import annotations

MIN_DISTINCT_4 = 0.25  # an output with fewer distinct 4-grams than this is a loop


def distinct_4(tokens: list[int]) -> float:
    """Distinct 4-grams / 4-grams of one output (1.0 for fewer than 4 tokens)."""
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0
