"""The built-in plugins are written like third-party ones: they import overlayd only through
``overlayd.sdk`` (docs/writing-a-plugin.md).  import-linter forbids the upper layers; this holds
the finer rule that even the lower modules are reached through the SDK."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FILES = sorted(
    [*ROOT.glob("backends/*.py"), *ROOT.glob("stores/*.py"), *ROOT.glob("examples/*/overlayd_*/*.py")]
)


def overlayd_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "overlayd":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "overlayd"]
    return found


def test_there_are_plugin_files_to_check() -> None:
    assert len([p for p in PLUGIN_FILES if p.name != "__init__.py"]) >= 4


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_overlayd_only_through_the_sdk(path: Path) -> None:
    bad = [name for name in overlayd_imports(path) if name != "overlayd.sdk"]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; import these names from overlayd.sdk"
