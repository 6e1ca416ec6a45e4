"""docs/architecture.md stays true: every module it names exists, and every server and
protocol module is named there (and the README links to it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_module_the_page_names_exists():
    names = set(re.findall(r"([\w/.-]+\.py)\b", DOC))
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    basenames = {Path(f).name for f in files}
    missing = [n for n in names if n not in files and Path(n).name not in basenames]
    assert not missing, missing


def test_every_server_and_protocol_module_is_placed():
    modules = [*(ROOT / "backend" / "server").glob("*.py"), *(ROOT / "protocol").glob("*.py")]
    for path in modules:
        if path.name != "__init__.py":
            assert path.name in DOC, path.name
    # The README is a product page: it points to the architecture page rather than copy it.
    assert "(docs/architecture.md)" in README
