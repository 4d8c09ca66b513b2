"""Where the shared ground truth lives (../shared beside the repo, or $MING_SHARED_DIR); tests
that need it skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MING_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "ming_ref"
REAL_CONFIGS = SHARED / "fixtures" / "real_configs"


def fixture_case(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"reference fixture {path} is not available")
    return path


def real_config(release: str) -> Path:
    path = REAL_CONFIGS / release
    if not path.is_dir():
        pytest.skip(f"real config {path} is not available")
    return path
