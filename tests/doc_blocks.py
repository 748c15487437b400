"""The fenced code blocks of README.md and docs/*.md, by name, for the tests that run them.

Every block has a language. A ``text`` block is output, a diagram or a formula, and runs
nowhere. Every other block (``python``, ``bash``, ``yaml``, ``json``) is named by the line
``<!-- block: NAME -->`` right above its fence, and some test loads it with
``doc_block("NAME")`` and runs it (tests/test_docs_code.py checks both rules), so a renamed
function or flag breaks the suite instead of a reader's first try.

``substituted`` cuts a block's sizes for a test (each cut must still occur in the text) and
``run_block`` runs a bash or python block in a folder.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from torchrun_helpers import WORKER_ENV, free_port

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


def substituted(text: str, substitutions: dict[str, str]) -> str:
    """`text` with each key replaced by its value; a key that no longer occurs fails the test,
    so a block edited out of its cut is noticed rather than run at full size."""
    for old, new in substitutions.items():
        assert old in text, f"the block no longer holds {old!r}, which its test substitutes"
        text = text.replace(old, new)
    return text


def run_block(language: str, text: str, cwd: Path, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a bash (-euo pipefail) or python block in `cwd`; it must exit 0."""
    command = (["bash", "-euo", "pipefail", "-c", text] if language == "bash"
               else [sys.executable, "-c", text])
    # torchrun as written takes port 29500 (quickstart.sh 29517): a free one each, since other
    # test files run at the same time.
    port = str(free_port())
    env = dict(env or WORKER_ENV, PET_MASTER_PORT=port, MASTER_PORT=port)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
        f"--- stderr\n{done.stderr[-4000:]}")
    return done
