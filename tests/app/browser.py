"""What the browser tests share: Debian's chromium and its offline flags, and the folder where their
screenshots are kept ($STUDIO_ARTIFACTS, default test-artifacts/ in the repo, git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.paths import REPO

CHROMIUM = Path("/usr/bin/chromium")
# Quiet and offline (see platform notes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("STUDIO_ARTIFACTS") or REPO / "test-artifacts")


def keep_screenshot(page, name: str) -> Path:
    """A full-page screenshot of `page` kept as ARTIFACTS/<name>.png; its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
