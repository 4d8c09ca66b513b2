"""Data flows one way (UI -> client -> server -> engine -> models -> kernels): the studio reaches the
engine only through engine.client and engine.events, and no model file imports the server, the
client or the studio. Checked on the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO

STUDIO_MAY_IMPORT = ("engine.client", "engine.events")


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "engine"]
    return found


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _allowed_for_studio(module: str) -> bool:
    if module != "engine" and not module.startswith("engine."):
        return True
    return any(module == m or module.startswith(m + ".") for m in STUDIO_MAY_IMPORT)


def test_the_studio_imports_only_the_client_and_the_events():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("app")
           for line, mod in imports_of(p) if not _allowed_for_studio(mod)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["engine/models", "engine/kernels", "engine/placement", "engine/media"])
def test_model_and_kernel_code_never_imports_the_server_client_or_studio(folder):
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files(folder) for line, mod in imports_of(p)
           if mod.startswith(("engine.server", "engine.client", "app.", "gradio")) or mod == "app"]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef f():\n    from engine.runtime import Engine\n")
    assert [m for _, m in imports_of(f) if not _allowed_for_studio(m)] == ["engine.runtime"]
