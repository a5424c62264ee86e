"""Function headers of Python source: a ``def`` line with the docstring right after it.

This is the prompt shape of HumanEval and of the held-out code prompts
(``tokens_per_forward.source_prompts``), and what ``distill-data --prompt-kind headers``
cuts its prompts at, so the drafts learn the continuations that evaluation and serving ask for.
"""

from __future__ import annotations

import re

_DEF = re.compile(r"\s*def \w+\(")
MAX_DOC_LINES = 11  # docstring lines kept after the def line (a header is at most 12 lines)


def function_headers(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the headers in ``text``: from the start of a def line
    (top-level or method) to just after the newline that ends its docstring, or after
    ``MAX_DOC_LINES`` docstring lines when it runs longer. The def line must be followed by a
    line holding ``\"\"\"``."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    spans = []
    for i, line in enumerate(lines):
        if _DEF.match(line) and i + 1 < len(lines) and '"""' in lines[i + 1]:
            last = min(i + MAX_DOC_LINES, len(lines) - 1)
            for j in range(i + 1, last + 1):
                if lines[j].count('"""') >= (2 if j == i + 1 else 1):  # the docstring closes
                    last = j
                    break
            spans.append((starts[i], starts[last + 1]))
    return spans


def header_text(text: str, span: tuple[int, int]) -> str:
    """The header as a prompt: its lines, each ending in one newline."""
    return "".join(line.rstrip("\r\n") + "\n" for line in text[span[0] : span[1]].splitlines())
