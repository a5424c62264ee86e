"""Exact sampling: TiDAR's rejection sampling reproduces AR's token distribution."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from vllm_tidar.checkpoint import TidarSettings
from vllm_tidar.reference import ReferenceDecoder, SamplingSettings

from conftest import tiny_llama

VOCAB, MASK, PROMPT, N_NEW, N_SAMPLES = 9, 8, [1, 2, 3], 3, 3000


def exact_ar_joint(model, sampling: SamplingSettings) -> dict[tuple, float]:
    """P(t1, t2, t3 | prompt) under AR sampling, by enumeration."""
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB - 1), repeat=N_NEW - 1):
            logits = model(input_ids=torch.tensor([PROMPT + list(seq)])).logits[0, len(PROMPT) - 1 :]
            logits[:, MASK] = -torch.inf
            p = sampling.probs(logits)
            head = p[0, seq[0]] * p[1, seq[1]]
            for t3 in range(VOCAB - 1):
                probs[seq + (t3,)] = float(head * p[2, t3])
    return probs


def tidar_counts(dec, sampling) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(N_SAMPLES):
        out = tuple(dec.generate(PROMPT, N_NEW, sampling=sampling, generator=gen).token_ids)
        counts[out] = counts.get(out, 0) + 1
    return counts


def chi_square_pvalue(counts, probs) -> float:
    keys = sorted(probs, key=probs.get, reverse=True)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        e = probs[k] * N_SAMPLES
        if e >= 5:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            rest_o += counts.get(k, 0)
            rest_e += e
    obs.append(rest_o)
    exp.append(rest_e)
    return chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=1, hidden_size=32, initializer_range=0.5)


@pytest.mark.parametrize("sampling", [SamplingSettings(1.0), SamplingSettings(0.8, 0.9)], ids=["t1", "t0.8-p0.9"])
def test_tidar_sampling_matches_ar_distribution(model, sampling):
    dec = ReferenceDecoder(model, TidarSettings(4, MASK))
    probs = exact_ar_joint(model, sampling)
    counts = tidar_counts(dec, sampling)
    assert MASK not in {t for k in counts for t in k}
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_chi_square_detects_a_biased_verifier(model, monkeypatch):
    """The same check fails for a verifier that accepts every draft (it can fail)."""
    from vllm_tidar import reference

    def accept_all(self, logits):
        k = self.dec.layout.num_drafts
        return k, self._sample(logits[k])

    monkeypatch.setattr(reference._Session, "_verify", accept_all)
    sampling = SamplingSettings(1.0)
    dec = ReferenceDecoder(model, TidarSettings(4, MASK))
    assert chi_square_pvalue(tidar_counts(dec, sampling), exact_ar_joint(model, sampling)) < 1e-6
