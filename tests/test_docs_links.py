"""Every relative link in the README and the docs points to a file that exists, and every
``#anchor`` to a heading of that file (GitHub's anchors), so a newcomer never follows a dead
link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "protocol" / "PROTOCOL.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.M)
CODE_BLOCK = re.compile(r"^```.*?^```", re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(CODE_BLOCK.sub("", page.read_text()))}


def test_anchor_follows_github():
    assert anchor("5. The demo model's preset") == "5-the-demo-models-preset"
    assert anchor("The `fast` preset") == "the-fast-preset"
    assert anchor("Speed and work") == "speed-and-work"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = CODE_BLOCK.sub("", page.read_text())
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        found = linked.exists() and (not fragment or linked.suffix != ".md"
                                     or fragment in anchors(linked))
        if not found:
            dead.append(target)
    assert dead == []
