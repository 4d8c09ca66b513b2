"""Shared helpers for the media tests: where the reference fixtures live."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "ming_ref"
REAL_CONFIGS = SHARED / "fixtures" / "real_configs"


@pytest.fixture
def fixture_root() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES
