"""The layout module against the paper's figures (arXiv 2511.08923, Fig. 2-3)."""

import pytest
import torch

from vllm_tidar.errors import TidarError
from vllm_tidar.layout import BootstrapLayout, DecodeLayout, StepMask, TrainingLayout, causal_template, check_num_drafts


def test_decode_positions_match_paper_example():
    # Paper: prefix A,B,C at 0..2 (p=3), k=3 drafts D,E,F (D already sampled) -> our
    # x_last=D, K=2 drafts, block length 3. Blocks at 4-6, 5-7, 6-8.
    lay = DecodeLayout(block_len=3)
    p = 3
    assert lay.num_tokens == 12
    assert (p + lay.position_offsets).tolist() == [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8]
    # AR rows predict the next position, masks their own
    assert (p + lay.predicted_offsets).tolist() == [4, 5, 6, 4, 5, 6, 5, 6, 7, 6, 7, 8]


def test_decode_mask_rows_match_paper_example():
    t = DecodeLayout(block_len=3).template.int().tolist()
    # columns: D E F | b0 b0 b0 | b1 b1 b1 | b2 b2 b2
    assert t[0] == [1, 0, 0] + [0] * 9  # D
    assert t[1] == [1, 1, 0] + [0] * 9  # E
    assert t[2] == [1, 1, 1] + [0] * 9  # F
    for r in range(3, 6):  # block after D sees D and itself
        assert t[r] == [1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    for r in range(6, 9):  # block after E sees D, E and itself
        assert t[r] == [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    for r in range(9, 12):  # block after F sees D, E, F and itself
        assert t[r] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("bl,length", [(4, 20), (8, 72), (16, 272)])
def test_query_length_is_bl_times_one_plus_bl(bl, length):
    assert DecodeLayout(bl).num_tokens == length


def test_next_drafts_and_bonus_rows_line_up_by_position():
    lay = DecodeLayout(block_len=8)
    pred = lay.predicted_offsets
    for a in range(lay.num_drafts + 1):
        # causal row a and mask 0 of block a predict the bonus position a+1
        assert pred[a] == pred[lay.bonus_mask_row(a)] == a + 1
        # the next drafts sit right after the bonus
        assert pred[lay.next_draft_rows(a)].tolist() == list(range(a + 2, a + 2 + lay.num_drafts))
        assert lay.num_kept(a) == a + 1


def test_fewer_drafts_keep_full_blocks():
    lay = DecodeLayout(block_len=8, num_drafts=3)
    assert lay.num_tokens == 4 + 4 * 8
    assert lay.next_draft_rows(3) == slice(4 + 3 * 8 + 1, 4 + 3 * 8 + 4)
    with pytest.raises(TidarError, match="num_drafts must be between 1 and 3"):
        DecodeLayout(block_len=4, num_drafts=4)
    with pytest.raises(ValueError, match=">= 2"):
        DecodeLayout(block_len=1)


@pytest.mark.parametrize("bl", [2, 4, 8])
def test_num_speculative_tokens_round_trip(bl):
    for k in range(1, bl):
        layout = DecodeLayout(bl, k)
        n = layout.num_speculative_tokens
        assert n == k + (k + 1) * bl == layout.num_tokens - 1
        assert layout.num_mask_slots == (k + 1) * bl
        assert DecodeLayout.from_num_speculative_tokens(n, bl) == layout
    for bad in (bl * bl + bl, bl, bl + 2):  # K = bl is too many, K = 0, not K + (K+1)*bl
        with pytest.raises(TidarError, match="is not K"):
            DecodeLayout.from_num_speculative_tokens(bad, bl)


def test_check_num_drafts():
    assert check_num_drafts(3, 4) == 3
    for bad in (0, 4, True, 2.0, None):
        with pytest.raises(TidarError, match=r"^K must be between 1 and 3 \(block length 4\), got "):
            check_num_drafts(bad, 4, what="K")


@pytest.mark.parametrize("bl,k", [(4, 3), (4, 1), (8, 5)])
def test_block_draft_index_starts_with_next_draft_rows_per_acceptance(bl, k):
    lay = DecodeLayout(bl, k)
    idx = lay.block_draft_index
    assert idx.shape == (k + 1, bl - 1) and idx.dtype == torch.long
    for a in range(k + 1):
        rows = lay.next_draft_rows(a)
        assert idx[a, :k].tolist() == list(range(rows.start, rows.stop))  # this layout's K drafts
        assert idx[a].tolist() == list(range(lay.block_start(a) + 1, lay.block_start(a) + bl))  # masks 1..Bl-1
    preds = torch.arange(lay.num_tokens) * 10  # one gather cuts every acceptance outcome
    assert preds[idx][k, :k].tolist() == [10 * r for r in range(lay.next_draft_rows(k).start, lay.next_draft_rows(k).stop)]


def test_step_mask_is_built_once_and_sliced():
    lay = DecodeLayout(4)
    sm = StepMask(lay, max_prefix=100)
    a, b = sm.for_prefix(7), sm.for_prefix(60)
    assert a.shape == (20, 27) and b.shape == (20, 80)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # views, no rebuild
    assert a[:, :7].all() and torch.equal(a[:, 7:], lay.template)
    with pytest.raises(ValueError):
        sm.for_prefix(101)


def test_training_mask_matches_paper_figure():
    # Fig. 3 left: S=6, block 3. Clean half causal; mask block 0 sees no clean token,
    # block 1 sees clean x0..x2; each block bidirectional within itself only.
    lay = TrainingLayout(seq_len=6, block_len=3)
    m = lay.template.int()
    assert torch.equal(m[:6, :6], torch.ones(6, 6, dtype=torch.int).tril())
    assert m[:6, 6:].sum() == 0  # clean never sees masks
    assert m[6:9].tolist() == [[0] * 6 + [1, 1, 1, 0, 0, 0]] * 3
    assert m[9:12].tolist() == [[1, 1, 1, 0, 0, 0] + [0, 0, 0, 1, 1, 1]] * 3
    assert lay.position_ids.tolist() == [0, 1, 2, 3, 4, 5] * 2
    ar, diff = lay.labels(torch.tensor([[10, 11, 12, 13, 14, 15]]))
    assert ar.tolist() == [[11, 12, 13, 14, 15, -100]]  # shifted
    assert diff.tolist() == [[10, 11, 12, 13, 14, 15]]  # unshifted


def test_training_and_decode_blocks_share_one_rule():
    """A mask block sees exactly the tokens before its anchor, in training and decoding."""
    bl = 4
    train = TrainingLayout(seq_len=8, block_len=bl)
    # mask at position 5 (block 1, anchor 4) sees clean positions 0..3
    assert train.template[8 + 5, :8].nonzero().flatten().tolist() == [0, 1, 2, 3]
    dec = DecodeLayout(bl)
    for j in range(bl):  # block j is anchored at P+j+1 and sees rows at P..P+j
        row = dec.block_start(j)
        assert dec.template[row, : dec.num_verify].nonzero().flatten().tolist() == list(range(j + 1))
        assert dec.position_offsets[row] == j + 1


def test_bootstrap_and_degraded_layouts():
    boot = BootstrapLayout(num_causal=3, block_len=4)
    t = boot.template.int()
    assert t[:3, :3].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]] and t[:3, 3:].sum() == 0
    assert t[3:].tolist() == [[1] * 7] * 4
    assert boot.position_offsets.tolist() == list(range(7))
    assert boot.bonus_mask_row == 3 and boot.draft_rows(3) == slice(4, 7)
    assert torch.equal(causal_template(3), torch.ones(3, 3, dtype=torch.bool).tril())
    with pytest.raises(ValueError):
        TrainingLayout(seq_len=10, block_len=4)
