"""The Hugging Face Space folder holds everything a UI-only studio imports and nothing that needs
torch: its launch.py starts against an engine URL from the environment (as the Space's secrets give it)
with only the Space's own files on the import path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from scripts.make_space import make_space


def test_the_space_starts_the_ui_only_studio_from_its_own_files(tmp_path):
    """launch.run (what `python launch.py` calls) runs in the Space up to binding its port (held here, so it stops there and says so): the Space's
    launch.py imported engine.server.auth at that step, which the Space did not ship (ModuleNotFoundError at start).
    Then without its ENGINE_URL secret: that was a local load, a ModuleNotFoundError traceback (engine.runtime is not
    shipped; a UI-only install has no torch) instead of what to set."""
    space = make_space(tmp_path / "space")
    assert not [line for line in (space / "requirements.txt").read_text().splitlines() if line.startswith("torch")]
    assert (space / "README.md").read_text().startswith("---\ntitle: Ming Omni Studio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = ("import sys, launch, app.studio; "
                f"code = launch.run(['--port', '{port}']); "
                "assert all(m.split('.')[0] != 'torch' for m in sys.modules), 'torch was imported'; "
                "print(code, sorted(m for m in sys.modules if m.startswith('engine'))); "
                "import os; del os.environ['ENGINE_URL']; print('without ENGINE_URL:', launch.run(['--port', '0']))")
        env = {**os.environ, "PYTHONPATH": str(space), "ENGINE_URL": "ws://127.0.0.1:9",
               "GRADIO_ANALYTICS_ENABLED": "False"}
        r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(space)!r}); {code}"],
                           cwd=space, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("1 ") and f"--port {port}" in r.stderr and "in use" in r.stderr  # said as such
    assert "engine.client" in r.stdout and "engine.runtime" not in r.stdout
    assert "without ENGINE_URL: 2" in r.stdout and "ENGINE_URL and ENGINE_TOKEN (on a Space: its secrets)" in r.stderr


def test_every_engine_module_the_space_ships_imports_from_the_space_alone(tmp_path):
    """engine/errors.py is copied into the Space; when it imported engine.command (not copied) it would fail there."""
    space = make_space(tmp_path / "space")
    modules = sorted(".".join(p.relative_to(space).with_suffix("").parts) for p in (space / "engine").rglob("*.py")
                     if p.name != "__init__.py")
    code = f"import importlib, sys; sys.path.insert(0, {str(space)!r}); [importlib.import_module(m) for m in {modules!r}]"
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=space, capture_output=True, text=True, timeout=120)
    assert "engine.errors" in modules and r.returncode == 0, r.stderr[-3000:]

