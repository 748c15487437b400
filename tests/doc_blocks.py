"""The fenced code blocks of README.md and docs/*.md, by name, for the tests that run them.

Every block has a language. A ``text`` block is output, a diagram or a formula, and runs
nowhere. Every other block (``python``, ``bash``, ``yaml``, ``json``) is named by the line
``<!-- block: NAME -->`` right above its fence, and some test loads it with
``doc_block("NAME")`` and runs it (tests/test_docs_code.py checks both rules), so a renamed
function or flag breaks the suite instead of a reader's first try.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME_LINE = re.compile(r"^<!-- block: ([a-z0-9][a-z0-9-]*) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class DocBlock:
    path: Path  # the Markdown file, relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    name: str | None
    text: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def markdown_files() -> list[Path]:
    return [Path("README.md"), *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[DocBlock]:
    lines = (ROOT / path).read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: a code fence that is never closed")
        named = NAME_LINE.match(lines[index - 1]) if index else None
        found.append(DocBlock(path, index + 1, opening.group(1),
                              named.group(1) if named else None,
                              "\n".join(lines[index + 1:end]) + "\n"))
        index = end + 1
    return found


def all_blocks() -> list[DocBlock]:
    return [block for path in markdown_files() for block in blocks_of(path)]


def doc_block(name: str) -> DocBlock:
    """The block named ``name``; KeyError naming the known names when there is none."""
    named = {block.name: block for block in all_blocks() if block.name}
    if name not in named:
        raise KeyError(f"no block named {name!r} in README.md or docs/; known: {sorted(named)}")
    return named[name]
