"""The documentation holds together: every relative link in README.md, docs/*.md and the other READMEs
points at a file that exists (and, with `#anchor`, at a heading in it), and README stays a front door —
short, the two commands on its first screen, every docs page one link away.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").glob("*/README.md"),
                    REPO / "bench" / "README.md"])
FENCE = re.compile(r"^ *```.*?^ *```", re.DOTALL | re.MULTILINE)  # fenced blocks, indented ones inside lists too
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.MULTILINE)
FIRST_SCREEN = 40  # lines a reader sees before scrolling


def prose(text: str) -> str:
    """The text a reader sees as Markdown: no code blocks or code spans (a `[x](y)` there is no link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The `#anchors` GitHub gives a file's headings: lower case, punctuation dropped, spaces as '-',
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """Each relative link of `doc` whose file or anchor does not exist (or lies outside `root`), as
    'target: why'."""
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif not file.resolve().is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(root)}")
    return broken


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path):
    assert broken_links(doc) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    """The checker itself: a missing file, a missing anchor and a link inside code are told apart."""
    (tmp_path / "other.md").write_text("# Other page\n\n## The warm agent (`AGENT_PROCESS=warm`)\n\n## Notes\n\n## Notes\n")
    doc = tmp_path / "page.md"
    doc.write_text("[ok](other.md#the-warm-agent-agent_processwarm) [ok2](other.md#notes-1) [self](#top)\n"
                   "[gone](missing.md) [no anchor](other.md#warm-agent)\n"
                   "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n\n# Top\n")
    assert broken_links(doc, root=tmp_path) == ["missing.md: no such file",
                                                "other.md#warm-agent: no heading with that anchor in other.md"]
    assert broken_links(doc, root=tmp_path / "elsewhere")[0] == "other.md#the-warm-agent-agent_processwarm: outside the repository"


def test_the_readme_is_a_front_door():
    """README: at most 300 lines; the two commands (set up and train; set up and test) on its first
    screen; every docs page reachable in one link."""
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 300, len(lines)
    first_screen = "\n".join(lines[:FIRST_SCREEN])
    assert "scripts/venv && .venv/bin/python -m app train" in first_screen
    assert "bash .ci/run" in first_screen
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(prose(readme))}
    unlinked = [str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert unlinked == []
