"""Every pointer from the code into docs/algorithms.md names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "algorithms.md"
# "algorithms.md §2", "algorithms.md §1, Inversion", "algorithms.md §1: Schedule, Inversion, …"
REF = re.compile(r"algorithms\.md §(\d)([^)\n]*)")


def _sources() -> list[Path]:
    return sorted((ROOT / "backend").rglob("*.py"))


def test_no_code_points_to_a_spec_file_outside_the_repository():
    stale = [str(p.relative_to(ROOT)) for p in _sources() if "drag-methods.md" in p.read_text()]
    assert stale == []


def test_every_reference_to_the_algorithms_page_names_an_existing_section():
    text = DOC.read_text()
    numbered = set(re.findall(r"^## (\d)\. ", text, re.M))
    named = set(re.findall(r"^### (.+)$", text, re.M))
    refs = [(p.name, m) for p in _sources() for m in REF.finditer(p.read_text())]
    assert len(refs) >= 9
    for where, match in refs:
        assert match.group(1) in numbered, (where, match.group(0))
        # Names after the section number ("§1, Inversion") are its subsection headings;
        # lower-case words ("step 2.4", "border clamping") point inside a section's text.
        for name in re.split(r"[,:]\s*", match.group(2)):
            if name[:1].isupper():
                assert name in named, (where, match.group(0))
