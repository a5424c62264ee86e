"""The trainer with self-distilled rows: batch composition, the configured per-row weights, resume, errors."""

import json

import pytest
import torch

from vllm_helpers import tiny_checkpoint
from vllm_tidar.cli import main
from vllm_tidar.data import pack, pack_ids, pack_targets, read_texts
from vllm_tidar.distill import read_samples
from vllm_tidar.layout import TrainingLayout
from vllm_tidar.mixing import MixedBatches
from vllm_tidar.objective import row_losses
from vllm_tidar.train import LOG_FILE, TrainConfig, _load, train

S = 32


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Six samples of token ids (ids 2.., as the distill-data command writes them)."""
    path = tmp_path_factory.mktemp("distill") / "d.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(6):
            ids = torch.randint(2, 8192, (40,), generator=g).tolist()
            f.write(json.dumps({"sample": i, "prompt_ids": ids[:10], "completion_ids": ids[10:]}) + "\n")
    return path


def _cfg(data, distilled, out, **kw):
    args = dict(base=str(tiny_checkpoint()), data=str(data), out=str(out), block_lengths=(4,), seq_len=S,
                batch_size=4, steps=1, lr=1e-3, min_lr=1e-3, warmup=0.0, save_every=100,
                distill_data=str(distilled), distill_ratio=0.5, real_diff_weight=0.25, distill_ar_weight=0.5)
    args.update(kw)
    return TrainConfig(**args)


def _log(out):
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_first_step_logs_the_configured_weighted_losses(data, distilled, tmp_path):
    cfg = _cfg(data, distilled, tmp_path / "o", kl_weight=0.1)
    model, tok, mask_id = _load(cfg)
    real = pack(read_texts(data), tok, S)
    dist = pack_ids(read_samples(distilled), tok.eos_token_id, S)
    batch = MixedBatches(real, dist, cfg).rows(0)
    # two real-text rows, then two distilled rows
    assert all((real == row).all(1).any() for row in batch[:2])
    assert all((dist == row).all(1).any() for row in batch[2:])
    with torch.no_grad():
        p = row_losses(model, batch, TrainingLayout(S, 4), mask_id, base=model)
    ar, diff = p.ar.double(), p.diff.double()
    want = {  # AR weights 1, 1, 0.5, 0.5; diffusion weights 0.25, 0.25, 1, 1; KL on real rows
        "l_ar": (ar[0] + ar[1] + 0.5 * ar[2] + 0.5 * ar[3]) / (3 * (S - 1)),
        "l_diff": (0.25 * diff[0] + 0.25 * diff[1] + diff[2] + diff[3]) / (2.5 * S),
        "l_ar_real": (ar[0] + ar[1]) / (2 * (S - 1)),
        "l_ar_distill": (ar[2] + ar[3]) / (2 * (S - 1)),
        "l_diff_real": (diff[0] + diff[1]) / (2 * S),
        "l_diff_distill": (diff[2] + diff[3]) / (2 * S),
    }
    train(cfg, progress=False)
    entry = _log(tmp_path / "o")[0]
    for key, value in want.items():
        assert entry[key] == pytest.approx(value.item(), rel=1e-5), key
    assert abs(entry["l_kl"]) < 1e-6  # the frozen base is the starting model
    assert entry["loss"] == pytest.approx((entry["l_ar"] + entry["l_diff"]) / 2 + 0.1 * entry["l_kl"], rel=1e-6)


def test_completion_only_diffusion_learns_the_continuations_not_the_prompts(data, distilled, tmp_path):
    """``--distill-completion-only``: a distilled row's diffusion targets are its samples'
    continuation tokens (not their 10 prompt tokens, not the EOS packing appends); real rows keep
    all; the logged distilled L_Diff is the mean over those targets."""
    cfg = _cfg(data, distilled, tmp_path / "o", distill_completion_only=True)
    model, tok, mask_id = _load(cfg)
    pairs = read_samples(distilled, split=True)
    assert [p + c for p, c in pairs] == read_samples(distilled)
    docs = [p + c for p, c in pairs]
    targets = pack_targets(docs, [len(p) for p, _ in pairs], tok.eos_token_id, S)
    flat = ([False] * 10 + [True] * 30 + [False]) * 6  # 10 prompt, 30 continuation tokens, the EOS
    assert targets.flatten().tolist() == flat[: targets.numel()]
    mix = MixedBatches(pack(read_texts(data), tok, S), pack_ids(docs, tok.eos_token_id, S), cfg, targets)
    batch, t = mix.rows(0), mix.targets(0)
    assert t[:2].all() and not t[2:].all() and t[2:].any()
    assert mix.diff_tokens(range(1)).tolist() == [t.sum(1).tolist()]
    with torch.no_grad():
        masked = row_losses(model, batch, TrainingLayout(S, 4), mask_id, diff_targets=t).diff.double()
        full = row_losses(model, batch, TrainingLayout(S, 4), mask_id).diff.double()
    train(cfg, progress=False)
    entry = _log(tmp_path / "o")[0]
    want = (masked[2] + masked[3]) / t[2:].sum()
    assert entry["l_diff_distill"] == pytest.approx(want.item(), rel=1e-5)
    assert entry["l_diff_distill"] != pytest.approx(((full[2] + full[3]) / (2 * S)).item(), rel=1e-3)
    assert entry["l_diff_real"] == pytest.approx(((full[0] + full[1]) / (2 * S)).item(), rel=1e-5)


def test_resume_with_distilled_rows_repeats_the_uninterrupted_run(data, distilled, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(_cfg(data, distilled, whole, steps=3), progress=False)
    train(_cfg(data, distilled, split, steps=2), progress=False)
    train(_cfg(data, distilled, split, steps=3, resume=True), progress=False)
    a, b = _log(whole), _log(split)
    assert [e["step"] for e in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "l_ar_real", "l_diff_distill"):
            assert y[key] == pytest.approx(x[key], rel=1e-5)
    wa = _load(_cfg(data, distilled, whole, resume=True))[0].state_dict()
    wb = _load(_cfg(data, distilled, split, resume=True))[0].state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


def _train_error(capsys, *args):
    assert main(["train", "--base", str(tiny_checkpoint()), "--out", "/nonexistent/o", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vllm-tidar: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err  # (stderr also has transformers' loading bar)
    return lines[0]


def test_train_distill_options_give_one_line_errors(data, distilled, tmp_path, capsys):
    common = ["--data", str(data), "--seq-len", str(S), "--batch-size", "4", "--distill-data", str(distilled)]
    assert "gives no distilled row in a batch of 4" in _train_error(capsys, *common, "--distill-ratio", "0.1")
    assert "distill ratio must be in [0, 1]" in _train_error(capsys, *common, "--distill-ratio", "1.5")
    assert "must be >= 0" in _train_error(capsys, *common, "--distill-ar-weight", "-1")
    assert "one process only" in _train_error(capsys, *common, "--kl-weight", "0.1", "--nproc", "2")
    assert "min distinct-4 must be in [0, 1]" in _train_error(capsys, *common, "--distill-min-distinct-4", "1.5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [5], "completion_ids": [99999]}) + "\n")
    assert "outside the vocabulary of 8192" in _train_error(capsys, "--data", str(data), "--seq-len", str(S),
                                                            "--distill-data", str(bad), "--out", str(tmp_path / "o"))
    bad.write_text('{"prompt_ids": [5]}\n')
    assert "needs integer lists" in _train_error(capsys, "--data", str(data), "--seq-len", str(S),
                                                 "--distill-data", str(bad), "--out", str(tmp_path / "o"))


def test_distilled_loops_are_dropped_below_the_distinct_4_threshold(tmp_path):
    """``--distill-min-distinct-4``: a continuation that loops (one 4-gram over and over) is
    left out, varied ones are kept, prompts do not count; none left is a one-line error."""
    from vllm_tidar.errors import TidarError

    path = tmp_path / "d.jsonl"
    rows = [([5, 5, 5, 5], list(range(10, 40))), ([6, 7], [9] * 30), ([8], [11, 12] * 15), ([9], list(range(50, 80)))]
    path.write_text("".join(json.dumps({"sample": i, "prompt_ids": p, "completion_ids": c}) + "\n"
                            for i, (p, c) in enumerate(rows)))
    assert read_samples(path) == [p + c for p, c in rows]
    assert read_samples(path, min_distinct_4=0.25) == [rows[0][0] + rows[0][1], rows[3][0] + rows[3][1]]
    path.write_text(json.dumps({"sample": 0, "prompt_ids": [1, 2, 3, 4], "completion_ids": [9] * 30}) + "\n")
    with pytest.raises(TidarError, match=r"no samples with distinct-4 >= 0.25 \(1 below\)"):
        read_samples(path, min_distinct_4=0.25)


def test_distill_kl_weight_sets_the_kl_row_weights(data, distilled, tmp_path):
    """KL row weights: 1 on real rows, ``distill_kl_weight`` on distilled rows (0 by default)."""
    model, tok, _ = _load(_cfg(data, distilled, tmp_path / "o"))
    real = pack(read_texts(data), tok, S)
    dist = pack_ids(read_samples(distilled), tok.eos_token_id, S)
    assert MixedBatches(real, dist, _cfg(data, distilled, tmp_path / "o")).weights.kl.tolist() == [1, 1, 0, 0]
    w = MixedBatches(real, dist, _cfg(data, distilled, tmp_path / "o", distill_kl_weight=0.5)).weights
    assert w.kl.tolist() == [1, 1, 0.5, 0.5] and w.ar.tolist() == [1, 1, 0.5, 0.5]
