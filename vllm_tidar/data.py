"""Training text: a folder of text/code files or a jsonl file, packed into fixed-length rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import TidarError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".json"}
JSONL_FIELDS = ("text", "content", "code")


def read_texts(source: str | Path) -> list[str]:
    """Documents from a folder (recursively, known text suffixes) or a jsonl file."""
    src = Path(source)
    if src.is_file() and src.suffix == ".jsonl":
        return _read_jsonl(src)
    if not src.is_dir():
        raise TidarError(f"training data {src} is neither a folder nor a .jsonl file")
    texts = []
    try:
        files = sorted(p for p in src.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    except OSError as e:
        raise TidarError(f"cannot read training data folder {src}: {e}") from None
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue  # unreadable single files are skipped; an empty result is an error below
        if text.strip():
            texts.append(text)
    if not texts:
        raise TidarError(
            f"no readable text files ({', '.join(sorted(TEXT_SUFFIXES))}) found in training data folder {src}"
        )
    return texts


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TidarError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TidarError(f"{path}:{n} is not valid JSON") from None
        text = next((row[k] for k in JSONL_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if text is None:
            raise TidarError(f"{path}:{n} has none of the fields {', '.join(JSONL_FIELDS)}")
        texts.append(text)
    if not texts:
        raise TidarError(f"{path} holds no documents")
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into rows of ``seq_len`` tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    rows = len(ids) // seq_len
    if rows == 0:
        raise TidarError(f"training data has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
