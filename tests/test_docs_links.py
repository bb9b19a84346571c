"""Every reference a reader follows resolves inside the repository.

Docstrings, comments and docs once cited planning documents that were never part of the
repository; a newcomer could not follow them.  These checks keep it that way: no file
names those documents, every relative markdown link in the docs points at a file that
exists (and, with ``#anchor``, at a heading it has, slugged as GitHub does), and every
``docs/*.md`` path cited in code exists with its anchor.  Files only, no network.
"""
from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Folders that are not the project's sources (environments, caches, build and run outputs,
#: as in .gitignore).
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "wandb"}
SKIP_PATHS = {ROOT / "bench" / "out"}
SOURCE_SUFFIXES = {".py", ".md", ".sh", ".cfg", ".toml", ".txt", ".cu", ".cpp", ".h", ".yaml", ".yml"}
#: Files without a suffix that are sources all the same.
EXTRA_FILES = (ROOT / ".ci" / "run",)

# Spelled in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("METHODS" + ".md", "DESIGN" + ".md", "../" + "shared")


def project_files(suffixes: set[str] = SOURCE_SUFFIXES, extra: bool = True) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and here / d not in SKIP_PATHS
        )
        found += [here / f for f in sorted(files) if Path(f).suffix in suffixes]
    return found + [f for f in EXTRA_FILES if extra and f.exists()]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------- slugs
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def without_code_blocks(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks (a ``# comment`` in a shell
    block is no heading, a ``[x](y)`` in a code sample no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (markup dropped) lower-cased, every
    character but letters, digits, spaces, hyphens and underscores removed, spaces made
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor of a markdown file, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in without_code_blocks(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(out)


def test_slugs_follow_github():
    assert github_slug("Where we differ from `galore_torch`") == "where-we-differ-from-galore_torch"
    assert github_slug("The step engine (for contributors)") == "the-step-engine-for-contributors"
    assert github_slug("Memory of every optimizer (`bench/bench_memory.py`, `bench/bench_qgalore.py`)") == (
        "memory-of-every-optimizer-benchbench_memorypy-benchbench_qgalorepy"
    )
    assert github_slug("1. Every optimizer against every peer (`bench/compare.py`)") == (
        "1-every-optimizer-against-every-peer-benchcomparepy"
    )


# ----------------------------------------------------------------------------- checks
def test_no_file_cites_documents_outside_the_repository():
    offenders = []
    for path in project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            offenders += [f"{relative(path)}:{number}: {name}" for name in OUTSIDE_REFERENCES if name in line]
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def markdown_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in enumerate(without_code_blocks(path.read_text(encoding="utf-8")), 1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            links.append((number, match.group(1) or match.group(2)))
    return links


def check_target(source: Path, base: Path, target: str, root: Path = ROOT) -> str | None:
    """Why ``target`` (``path``, ``path#anchor`` or ``#anchor``, relative to ``base``) does
    not resolve inside ``root``, or None."""
    path_part, _, anchor = target.partition("#")
    file = (base / path_part).resolve() if path_part else source
    if not file.exists():
        return f"{path_part} does not exist"
    if not file.is_relative_to(root):
        return f"{path_part} lies outside the repository"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{file.relative_to(root).as_posix()} has no heading with anchor #{anchor}"
    return None


MARKDOWN = project_files({".md"}, extra=False)


@pytest.mark.parametrize("path", MARKDOWN, ids=[relative(p) for p in MARKDOWN])
def test_relative_markdown_links_resolve(path):
    broken = []
    for number, target in markdown_links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        reason = check_target(path, path.parent, target)
        if reason:
            broken.append(f"{relative(path)}:{number}: ({target}) {reason}")
    assert not broken, "\n".join(broken)


DOC_PATH = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(#[\w-]+)?")
CODE = project_files(SOURCE_SUFFIXES - {".md"})


def test_docs_paths_cited_in_code_resolve():
    cited, broken = 0, []
    for path in CODE:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in DOC_PATH.finditer(line):
                cited += 1
                target = match.group(1) + (match.group(2) or "")
                reason = check_target(path, ROOT, target)
                if reason:
                    broken.append(f"{relative(path)}:{number}: {target}: {reason}")
    assert cited > 10  # the docstrings do cite the docs: the pattern still finds them
    assert not broken, "\n".join(broken)


def test_checks_catch_what_they_guard(tmp_path):
    """The checks themselves: a missing file, a missing anchor and a heading inside a code
    block are caught; a repeated heading gets GitHub's numbered anchor."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part\n\n## Part\n\n```bash\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"title", "part", "part-1"}
    assert check_target(page, tmp_path, "page.md#part-1", root=tmp_path) is None
    assert "no heading" in check_target(page, tmp_path, "page.md#not-a-heading", root=tmp_path)
    assert "does not exist" in check_target(page, tmp_path, "missing.md", root=tmp_path)
    assert "no heading" in check_target(page, tmp_path, "#nowhere", root=tmp_path)
    assert "outside" in check_target(page, tmp_path / "sub", "../page.md", root=tmp_path / "sub")
