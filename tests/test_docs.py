"""Docs that are generated from code must be current; links between docs must resolve."""

from __future__ import annotations

import re
from pathlib import Path

from overlayd._docgen import render, render_library

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render(), "docs/configuration.md is stale: run python -m overlayd._docgen > docs/configuration.md"


def test_library_reference_is_current() -> None:
    current = (ROOT / "docs" / "library.md").read_text()
    assert current == render_library(), (
        "docs/library.md is stale: run python -m overlayd._docgen library > docs/library.md"
    )


def test_relative_links_resolve() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
