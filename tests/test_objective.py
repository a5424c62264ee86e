"""The TiDAR objective's per-row weights and KL term, against cross-entropies computed by hand."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from vllm_tidar.layout import TrainingLayout
from vllm_tidar.objective import RowWeights, row_losses, tidar_loss

S, BL = 16, 4


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    mask_id = model.config.vocab_size - 1
    tokens = torch.randint(0, mask_id, (3, S), generator=torch.Generator().manual_seed(0))
    return model, mask_id, tokens


def hand_row_losses(model, tokens, mask_id, per_token=False):
    """Per-row CE sums from plain forwards: the clean half is the causal model on the row; mask
    block b is a forward of [x_0..x_{b*Bl-1}, Bl masks] whose masks see the prefix and each other.
    ``per_token``: the mask half's CE per token (B, S) instead of its sum."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        ar = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").sum(1)
        diff = []
        for b in range(S // BL):
            n = b * BL
            ids = torch.cat([tokens[:, :n], torch.full((tokens.shape[0], BL), mask_id)], 1)
            see = torch.ones(n + BL, n + BL, dtype=torch.bool).tril()
            see[n:, n:] = True
            out = model(input_ids=ids, attention_mask=see[None, None].expand(tokens.shape[0], 1, -1, -1)).logits
            diff.append(F.cross_entropy(out[:, n:].transpose(1, 2), tokens[:, n : n + BL], reduction="none"))
    diff = torch.cat(diff, 1)
    return ar, diff if per_token else diff.sum(1)


def test_row_losses_are_the_per_row_cross_entropy_sums(setup):
    model, mask_id, tokens = setup
    with torch.no_grad():
        parts = row_losses(model, tokens, TrainingLayout(S, BL), mask_id)
    ar, diff = hand_row_losses(model, tokens, mask_id)
    torch.testing.assert_close(parts.ar.double(), ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.diff.double(), diff, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_loss_is_the_weighted_token_mean_of_each_half(setup, alpha):
    model, mask_id, tokens = setup
    w_ar, w_diff = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.0])
    with torch.no_grad():
        loss, l_ar, l_diff = tidar_loss(model, tokens, TrainingLayout(S, BL), mask_id, alpha,
                                        RowWeights(w_ar, w_diff, torch.ones(3)))
    ar, diff = hand_row_losses(model, tokens, mask_id)
    want_ar = (w_ar.double() * ar).sum() / (3.0 * (S - 1))  # weights sum to 3, S-1 AR labels per row
    want_diff = (w_diff.double() * diff).sum() / (1.5 * S)
    assert l_ar.item() == pytest.approx(want_ar.item(), rel=1e-5)
    assert l_diff.item() == pytest.approx(want_diff.item(), rel=1e-5)
    assert loss.item() == pytest.approx(((alpha * want_ar + want_diff) / (1 + alpha)).item(), rel=1e-5)


def test_unweighted_loss_is_the_plain_token_mean(setup):
    model, mask_id, tokens = setup
    with torch.no_grad():
        loss, l_ar, l_diff = tidar_loss(model, tokens, TrainingLayout(S, BL), mask_id, 1.0)
    ar, diff = hand_row_losses(model, tokens, mask_id)
    assert l_ar.item() == pytest.approx(ar.sum().item() / (3 * (S - 1)), rel=1e-5)
    assert l_diff.item() == pytest.approx(diff.sum().item() / (3 * S), rel=1e-5)


def test_diffusion_targets_limit_the_mask_half_to_their_tokens(setup):
    """``diff_targets``: a row's diffusion sum runs over its target tokens only, and L_Diff is the
    weighted mean over the target tokens (normaliser sum_r d_r n_r)."""
    from vllm_tidar.objective import combine

    model, mask_id, tokens = setup
    layout = TrainingLayout(S, BL)
    targets = torch.zeros(3, S, dtype=torch.bool)
    targets[0] = True
    targets[1, 5:] = True  # a prompt of 5 tokens, then the continuation
    targets[2, 3:9] = True
    with torch.no_grad():
        parts = row_losses(model, tokens, layout, mask_id, diff_targets=targets)
    _, per_tok = hand_row_losses(model, tokens, mask_id, per_token=True)
    want = (per_tok * targets).sum(1)
    torch.testing.assert_close(parts.diff.double(), want, rtol=1e-5, atol=1e-5)
    w = RowWeights(torch.ones(3), torch.tensor([0.5, 1.0, 2.0]), torch.ones(3))
    norms = w.normalisers(layout, 1, targets.sum(1)[None].float())
    assert norms[1] == pytest.approx(0.5 * S + 1.0 * (S - 5) + 2.0 * 6)
    assert norms[0] == w.normalisers(layout)[0]
    _, _, l_diff, _ = combine(parts, w, norms, 1.0)
    assert l_diff.item() == pytest.approx(((w.diff.double() * want).sum() / norms[1]).item(), rel=1e-5)


def test_a_zero_weight_makes_a_rows_tokens_irrelevant(setup):
    model, mask_id, tokens = setup
    layout = TrainingLayout(S, BL)
    other = tokens.clone()
    other[1] = torch.randint(0, mask_id, (S,), generator=torch.Generator().manual_seed(1))
    zero_row = RowWeights(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))
    ar_only_off = RowWeights(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3), torch.ones(3))
    with torch.no_grad():
        a = tidar_loss(model, tokens, layout, mask_id, 1.0, zero_row)
        b = tidar_loss(model, other, layout, mask_id, 1.0, zero_row)
        c = tidar_loss(model, tokens, layout, mask_id, 1.0, ar_only_off)
        d = tidar_loss(model, other, layout, mask_id, 1.0, ar_only_off)
    for x, y in zip(a, b):
        assert x.item() == pytest.approx(y.item(), rel=1e-6)
    assert c[1].item() == pytest.approx(d[1].item(), rel=1e-6)  # L_AR ignores row 1
    assert abs(c[2].item() - d[2].item()) > 1e-3  # L_Diff does not


def test_kl_to_the_base_is_hand_computed_and_zero_against_itself(setup):
    model, mask_id, tokens = setup
    layout = TrainingLayout(S, BL)
    base = tiny_llama(vocab=model.config.vocab_size - 1, seed=1)  # a base without the mask token
    with torch.no_grad():
        kl_self = row_losses(model, tokens, layout, mask_id, base=model).kl
        kl = row_losses(model, tokens, layout, mask_id, base=base).kl
        p_base = base(input_ids=tokens).logits.log_softmax(-1)[:, :-1]
        logp = model(input_ids=tokens).logits.log_softmax(-1)[:, :-1, : p_base.shape[-1]]
    want = (p_base.exp() * (p_base - logp)).sum(-1).sum(1)
    assert kl_self.abs().max().item() < 1e-5
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-5)
    assert (kl > 0).all()
