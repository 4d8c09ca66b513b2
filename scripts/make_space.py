"""Write a Hugging Face Space that serves the UI-only studio and drives your engine server:

    python scripts/make_space.py OUT_DIR

OUT_DIR gets exactly what a UI-only studio imports (app/, launch.py, and of the engine only its client,
the event types and the wire mapping), `requirements.txt` (= requirements-ui.txt: no torch) and a
README.md with the Space's front matter. Push OUT_DIR to a Gradio Space and set its secrets
ENGINE_URL (e.g. wss://gpu-box.example.org:8000) and ENGINE_TOKEN (the engine server's --token);
optionally STUDIO_AUTH=user:password to require a login on top of the Space's own visibility.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What `python launch.py --engine ...` imports (checked by tests/scripts/test_make_space.py).
# engine/server/auth.py: launch.py checks with it that the studio's address can be bound, before anything else;
# engine/command.py: how launch.py ends on SIGTERM; engine/server/stalled_peers.py, lingering.py, limits.py,
# small_reads.py: ws_protocol's flow control, refusals, its limit on fragments and its pause after tiny reads.
FILES = ["launch.py", "engine/__init__.py", "engine/command.py", "engine/events.py", "engine/errors.py",
         "engine/server/__init__.py", "engine/server/auth.py", "engine/server/protocol.py",
         "engine/server/limits.py", "engine/server/lingering.py", "engine/server/stalled_peers.py",
         "engine/server/small_reads.py", "engine/server/ws_protocol.py"]
FOLDERS = ["app", "engine/client"]
FRONT_MATTER = """---
title: Ming Omni Studio
emoji: 🎙️
sdk: gradio
sdk_version: 6.31.0
app_file: launch.py
python_version: "3.11"
pinned: false
---

# Ming Omni Studio (UI only)

This Space serves the studio page and drives a Ming-flash-omni engine server running elsewhere
(`python -m engine.server --model ... --host 0.0.0.0 --token T` on a GPU box). Set the secrets
`ENGINE_URL` and `ENGINE_TOKEN`; the token stays on the Space's server, the page never sees it.
The real model (about 238 GB of weights) cannot run on ZeroGPU: the Space only serves the page.
"""


def make_space(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for rel in FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, out / rel)
    for rel in FOLDERS:
        if (out / rel).exists():
            shutil.rmtree(out / rel)
        shutil.copytree(REPO / rel, out / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "requirements-ui.txt", out / "requirements.txt")
    (out / "README.md").write_text(FRONT_MATTER, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the Space's folder (created)")
    args = ap.parse_args(argv)
    out = make_space(args.out)
    print(f"wrote the Space to {out}: push it to a Gradio Space, then set the secrets ENGINE_URL and ENGINE_TOKEN")
    return 0


if __name__ == "__main__":
    sys.exit(main())
