"""What the browser tests share: Debian's chromium and its offline flags, and the folder where their
screenshots are kept ($STUDIO_ARTIFACTS, default test-artifacts/ in the repo, git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.paths import REPO

try:
    from playwright.sync_api import expect
except ImportError:  # the browser tests skip themselves without playwright
    expect = None

CHROMIUM = Path("/usr/bin/chromium")
# Quiet and offline (see platform notes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("STUDIO_ARTIFACTS") or REPO / "test-artifacts")


def set_slider(page, elem_id: str, value: int, attempts: int = 6) -> None:
    """Type `value` into the number box of the slider `#elem_id` until its range input shows it.

    A keystroke that reaches the page before Gradio has wired the slider (a loaded machine, the page
    still mounting) is lost without an error; the range input only moves once the component took the
    value, so it is the check, and the typing is repeated until it holds (a slider that never takes
    the value fails after `attempts` tries)."""
    number = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    for attempt in range(attempts):
        number.fill(str(value))
        number.press("Tab")  # leave the box: the value is committed on input and on blur
        try:
            expect(slider).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise


def set_number(page, selector: str, value: int, attempts: int = 6) -> None:
    """Type `value` into the number box `selector` and leave it, until the box still holds it a moment later
    (a box typed into while its component mounts can be reset to the component's value)."""
    box = page.locator(selector)
    for attempt in range(attempts):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"{selector} did not keep {value}: it holds {box.input_value()!r}")


def keep_screenshot(page, name: str) -> Path:
    """A full-page screenshot of `page` kept as ARTIFACTS/<name>.png; its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
