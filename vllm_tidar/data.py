"""Training text (a folder of text/code files or a jsonl file) and token-id documents, packed into fixed-length rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import TidarError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".json"}
JSONL_FIELDS = ("text", "content", "code")


def read_texts(source: str | Path, what: str = "training data") -> list[str]:
    """Documents from a folder (recursively, known text suffixes) or a jsonl file."""
    return [text for _, text in read_documents(source, what)]


def read_documents(source: str | Path, what: str = "training data") -> list[tuple[Path, str]]:
    """``(file, text)`` of every document (a .jsonl's documents all name the .jsonl);
    ``what`` names the source in error messages."""
    src = Path(source)
    if src.is_file() and src.suffix == ".jsonl":
        return [(src, text) for text in _read_jsonl(src)]
    if not src.is_dir():
        raise TidarError(f"{what} {src} is neither a folder nor a .jsonl file")
    docs = []
    try:
        files = sorted(p for p in src.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    except OSError as e:
        raise TidarError(f"cannot read {what} folder {src}: {e}") from None
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue  # unreadable single files are skipped; an empty result is an error below
        if text.strip():
            docs.append((path, text))
    if not docs:
        raise TidarError(
            f"no readable text files ({', '.join(sorted(TEXT_SUFFIXES))}) found in {what} folder {src}"
        )
    return docs


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
    return pack_ids([tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
                    tokenizer.eos_token_id, seq_len)


def pack_ids(docs: list[list[int]], eos: int | None, seq_len: int) -> torch.Tensor:
    """Join token-id documents, each ended by ``eos`` (unless it already ends with it), and cut
    into rows of ``seq_len`` tokens (the tail shorter than a row is dropped)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(doc)
        if eos is not None and (not doc or doc[-1] != eos):
            ids.append(eos)
    return _rows(ids, seq_len, torch.long)


def pack_targets(docs: list[list[int]], first: list[int], eos: int | None, seq_len: int) -> torch.Tensor:
    """The (rows, seq_len) bool tensor, aligned with ``pack_ids(docs, eos, seq_len)``, of the
    tokens at or after index ``first[i]`` of document ``i`` (a distilled sample's continuation
    after its prompt); an EOS that packing appends is not one."""
    flags: list[bool] = []
    for doc, start in zip(docs, first, strict=True):
        flags.extend(i >= start for i in range(len(doc)))
        if eos is not None and (not doc or doc[-1] != eos):
            flags.append(False)
    return _rows(flags, seq_len, torch.bool)


def _rows(values: list, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    rows = len(values) // seq_len
    if rows == 0:
        raise TidarError(f"training data has {len(values)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(values[: rows * seq_len], dtype=dtype).view(rows, seq_len)
