"""The studio in a real browser (Debian's chromium driven by Playwright): type a message, press
Send, see the reply and its figures. Skips when /usr/bin/chromium or playwright is missing.
The screenshot is kept in test-artifacts/ (tests/app/browser.py)."""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest

from tests.app.browser import CHROMIUM, keep_screenshot, set_slider
from tests.app.test_chat_store import CHATS_JS

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@contextmanager
def desktop_page(new_context, studio):
    """The studio open in a desktop-sized page of a fresh context of the shared browser (tests/app/conftest.py)."""
    page = new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.goto(studio, wait_until="load", timeout=60_000)
    yield page


def wait_until_kept(page, condition: str) -> None:
    """Wait until this tab's conversation as the browser keeps it (chats.js's mine(): its messages, null when none)
    meets `condition` (a JS expression of `kept`)."""
    page.wait_for_function(f"() => {{ const kept = ({CHATS_JS})().mine(); return {condition}; }}", timeout=10_000)


def send_and_wait(page, text: str) -> None:
    """Type `text` in the Chat box, press Enter (Shift+Enter would add a line), wait until the reply ends."""
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")
    sync_api.expect(page.locator("#chat-figures")).to_contain_text("finish reason", timeout=60_000)


def test_type_send_and_see_the_reply(new_context, studio):
    with desktop_page(new_context, studio) as page:
        banner = page.locator("#model-banner")
        sync_api.expect(banner).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
        sync_api.expect(banner).to_contain_text("--model inclusionAI/Ming-flash-omni-2.0")

        send_and_wait(page, "Hello from the browser")
        history = page.locator("#chat-history")
        sync_api.expect(history).to_contain_text("Hello from the browser")
        assert page.locator("#chat-input textarea").input_value() == ""
        bot = history.locator("[data-testid='bot']")
        assert bot.count() >= 1 and bot.last.inner_text().strip(), "no assistant reply shown"

        assert keep_screenshot(page, "chat-desktop").stat().st_size > 10_000

        # Arabic in the box and in the conversation read left to right (Gradio sets every text 'ltr'), its question
        # mark on the wrong side: each text takes the direction of its own words
        direction = "e => getComputedStyle(e).direction"
        box = page.locator("#chat-input textarea")
        box.fill("مرحبا، كيف حالك؟ 👋")
        assert box.evaluate(direction) == "rtl"
        box.press("Enter")
        sent = history.locator("[data-testid='user'] .message-content").last
        sync_api.expect(sent).to_contain_text("كيف حالك", timeout=30_000)
        sync_api.expect(sent).to_have_attribute("dir", "auto", timeout=10_000)
        assert sent.evaluate(direction) == "rtl"
        assert history.locator("[data-testid='user'] .message-content").first.evaluate(direction) == "ltr"

        # HTML typed in a message was rendered (sanitised: "<b>x</b>" showed a bold x, a snippet's tags vanished), and
        # Markdown too ("*word*" in italics, a snippet's indentation gone): a message reads as it was typed
        typed = "<b>x</b> and a < b > c, *not italic*\n<div>\n    <p class=\"x\">hi &amp; bye</p>\n</div>\n# no heading"
        box.fill(typed)
        box.press("Enter")
        sent = history.locator("[data-testid='user'] .message-content").last
        sync_api.expect(sent).to_have_text(typed, use_inner_text=True, timeout=30_000)  # (what is in sight)
        page.locator("#chat-stop").click()


def test_stop_withdraws_a_queued_message_in_the_browser(new_context, studio):
    """Two visitors: Alice's long reply holds the engine; Bob sends, sees his request wait, presses Stop.
    When Alice stops, Bob's request ends without generating and his message is back in the box, before what he typed
    meanwhile (which the message replaced)."""
    alice, bob = new_context().new_page(), new_context().new_page()
    for page in (alice, bob):
        page.goto(studio, wait_until="load", timeout=60_000)
    alice.locator("#chat-advanced").click()  # open the accordion to reach the token limit
    # the slider holds the typed value before the message goes (the default limit, 256 tokens,
    # would end Alice's reply before the Stops below)
    set_slider(alice, "chat-max-tokens", 4000)
    alice.locator("#chat-input textarea").fill("Count slowly")  # greedy: thousands of tokens
    alice.locator("#chat-input textarea").press("Enter")
    sync_api.expect(alice.locator("#chat-figures")).to_contain_text("Generating", timeout=30_000)

    bob.locator("#chat-input textarea").fill("Bob's question")
    bob.locator("#chat-input textarea").press("Enter")
    sync_api.expect(bob.locator("#chat-figures")).to_contain_text("Waiting for the engine", timeout=30_000)
    bob.locator("#chat-input textarea").fill("a second thought")  # typed while it waits: kept too
    bob.locator("#chat-stop").click()
    bob.wait_for_timeout(500)
    alice.locator("#chat-stop").click()
    sync_api.expect(alice.locator("#chat-figures")).to_contain_text("cancelled", timeout=30_000)
    sync_api.expect(bob.locator("#chat-figures")).to_contain_text("Stopped before it started", timeout=30_000)
    assert bob.locator("#chat-input textarea").input_value() == "Bob's question\n\na second thought"
    assert bob.locator("#chat-history [data-testid='bot']").count() == 0


def test_the_conversation_survives_a_page_reload(new_context, studio):
    """A page reload lost the chat history: the browser keeps it (app/static/chats.js) and the page shows it again."""
    with desktop_page(new_context, studio) as page:
        send_and_wait(page, "Remember me after a reload")
        bot = page.locator("#chat-history [data-testid='bot']")
        sync_api.expect(bot).to_have_count(1, timeout=10_000)
        reply = bot.last.inner_text().strip()
        wait_until_kept(page, "kept?.some((m) => m.role === 'assistant')")  # (written once the reply is complete)
        page.reload(wait_until="load")
        history = page.locator("#chat-history")
        sync_api.expect(history).to_contain_text("Remember me after a reload", timeout=30_000)
        sync_api.expect(history.locator("[data-testid='bot']").last).to_have_text(reply)
        page.locator("#chat-clear").click()  # cleared: nothing comes back
        sync_api.expect(history.locator("[data-testid='user']")).to_have_count(0, timeout=10_000)
        wait_until_kept(page, "kept === null")
        page.reload(wait_until="load")
        sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
        page.wait_for_timeout(2_000)
        assert page.locator("#chat-history [data-testid='user']").count() == 0


def test_a_message_sent_just_before_a_reload_is_not_lost(new_context, studio):
    """A reload while the reply was streaming lost the question and the reply without a word (the browser kept
    the conversation only once a reply was complete): the question comes back in the box, saying why."""
    with desktop_page(new_context, studio) as page:
        page.locator("#chat-advanced").click()
        set_slider(page, "chat-max-tokens", 4000)  # a reply long enough to reload in the middle of it
        page.locator("#chat-input textarea").fill("A question worth keeping")
        page.locator("#chat-input textarea").press("Enter")
        sync_api.expect(page.locator("#chat-history [data-testid='bot']")).to_have_count(1, timeout=30_000)
        page.reload(wait_until="load")
        sync_api.expect(page.locator("#chat-input textarea")).to_have_value("A question worth keeping", timeout=30_000)
        sync_api.expect(page.locator("#chat-figures")).to_contain_text("interrupted")
        page.locator("#chat-clear").click()



def chat_shown(page, text: str, timeout_s: float = 30) -> str:
    """The Chat tab's conversation and input box as text, once `text` is in one of them (the box holds a message
    whose reply a reload cut)."""
    shown = ""
    for _ in range(int(timeout_s * 2)):
        shown = page.locator("#chat-history").inner_text() + "\n" + page.locator("#chat-input textarea").input_value()
        if text in shown:
            return shown
        page.wait_for_timeout(500)
    raise AssertionError(f"{text!r} is not in the Chat tab: {shown!r}")


def test_two_tabs_keep_their_own_conversations_and_a_new_tab_can_open_either(new_context, studio):
    """Two tabs of one browser shared one kept conversation: at the next reload the one written last came back in both,
    the other was gone. Each tab keeps its own across a reload (here a message sent just before it: back in the box);
    a tab opened later offers both under Earlier conversations and opens the one chosen once its tab is closed (one
    still open in another tab is listed so, and not opened twice: two tabs wrote it, the later write lost turns)."""
    context = new_context(viewport={"width": 1280, "height": 1000})
    tabs = {"first tab's question": context.new_page(), "second tab's question": context.new_page()}
    for text, page in tabs.items():
        page.goto(studio, wait_until="load", timeout=60_000)
        page.locator("#chat-input textarea").fill(text)
        page.locator("#chat-input textarea").press("Enter")
        sync_api.expect(page.locator("#chat-history [data-testid='user']")).to_have_count(1, timeout=30_000)
    for text, page in tabs.items():  # (the reply cut, or ended before: the message is in the box or above it)
        page.reload(wait_until="load")
        shown = chat_shown(page, text)
        assert not any(other in shown for other in tabs if other != text), shown
    tabs["second tab's question"].close(run_before_unload=True)
    later = context.new_page()
    later.goto(studio, wait_until="load", timeout=60_000)
    later.locator("#chat-earlier input").click()
    sync_api.expect(later.get_by_role("option")).to_have_count(2, timeout=30_000)
    sync_api.expect(later.get_by_role("option", name=re.compile("first tab's question"))).to_contain_text(
        "(open in another tab)")
    later.get_by_role("option", name=re.compile("second tab's question")).click()
    assert "first tab's question" not in chat_shown(later, "second tab's question")
