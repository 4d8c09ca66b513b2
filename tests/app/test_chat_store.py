"""The Chat tab's store of conversations in the browser (app/static/chats.js), run in Chromium on a page of its own
(no studio): two tabs saving at the same instant both keep their conversation, conversations kept by the version
before (one list) are carried over once, the store keeps the most recent when it is full."""

from __future__ import annotations

import json
import time

import pytest

from tests.app.browser import CHROMIUM
from tests.paths import REPO

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

CHATS_JS = (REPO / "app" / "static" / "chats.js").read_text(encoding="utf-8").strip()
ORIGIN = "http://studio.test/"  # answered by the test itself (a real origin has localStorage; about:blank has none)
LIST_KEY = "ming-studio-chats"  # where the version before kept them all, as one list
TAB_KEY = "ming-studio-chat-id"


def turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]


def new_tab(context):
    """A tab of the browser `context` on ORIGIN (the tabs of one context share its localStorage)."""
    page = context.new_page()
    page.route("**/*", lambda route: route.fulfill(status=200, content_type="text/html", body="<html></html>"))
    page.goto(ORIGIN)
    return page


def until(tab, js: str, tab_id: str | None = None, timeout: float = 5_000) -> None:
    """Wait until `js` (an expression over chats.js, as the tab `tab_id` where one is given) is true in `tab`: what
    another tab wrote reaches this one's localStorage a moment later when the two run in different processes."""
    as_tab = f"sessionStorage.setItem({TAB_KEY!r}, {tab_id!r});" if tab_id else ""
    tab.wait_for_function(f"() => {{ {as_tab} const chats = ({CHATS_JS})(); return Boolean({js}); }}",
                          polling=20, timeout=timeout)


@pytest.fixture(scope="module")
def page(chromium):
    context = chromium().new_context()  # (a context of its own: a test opens a second tab beside it)
    try:
        yield new_tab(context)
    finally:
        context.close()


@pytest.fixture()
def store(page):
    """The page with empty stores; `as_tab(id, call)` runs `call` on chats.js as the browser tab `id` would."""
    page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")

    def as_tab(tab_id: str, call: str):
        return page.evaluate(f"""() => {{
            sessionStorage.setItem({TAB_KEY!r}, {tab_id!r});
            const chats = ({CHATS_JS})();
            return {call};
        }}""")
    return as_tab


def test_two_tabs_saving_at_the_same_instant_both_keep_their_conversation(page, store):
    """Each tab read the one list, changed its own entry and wrote the list back: a tab that saved between another's
    read and write lost its conversation. Here tab A saves while tab B is between its read and its write."""
    store("A", f"chats.keep({json.dumps(turn('A first'))})")
    store("B", f"chats.keep({json.dumps(turn('B first'))})")
    page.evaluate(f"""() => {{
        const real = Storage.prototype.getItem;
        let fired = false;
        Storage.prototype.getItem = function (key) {{  // B's first read of the store lets A save meanwhile
            const value = real.call(this, key);
            if (!fired && this === localStorage && key.startsWith({LIST_KEY!r})) {{
                fired = true;
                sessionStorage.setItem({TAB_KEY!r}, "A");
                ({CHATS_JS})().keep({json.dumps(turn('A second'))});
                sessionStorage.setItem({TAB_KEY!r}, "B");
            }}
            return value;
        }};
        try {{
            sessionStorage.setItem({TAB_KEY!r}, "B");
            ({CHATS_JS})().keep({json.dumps(turn('B second'))});
        }} finally {{ Storage.prototype.getItem = real; }}
    }}""")
    assert store("A", "chats.mine()") == turn("A second")
    assert store("B", "chats.mine()") == turn("B second")


def test_conversations_kept_as_one_list_by_the_version_before_are_carried_over_once(page, store):
    kept = [{"id": "A", "at": 2, "messages": turn("mine, kept before")},
            {"id": "C", "at": 1, "messages": turn("a closed tab's")}, {"id": 7, "messages": "not a conversation"}]
    page.evaluate(f"() => localStorage.setItem({LIST_KEY!r}, {json.dumps(json.dumps(kept))})")
    assert store("A", "chats.mine()") == turn("mine, kept before")
    assert [c["id"] for c in store("A", "chats.earlier()")] == ["C"]
    store("A", f"chats.keep({json.dumps(turn('mine, now'))})")
    assert store("A", "chats.mine()") == turn("mine, now")  # (the list of before is not read again over it)
    assert [c["id"] for c in store("B", "chats.earlier()")] == ["A", "C"]


def test_a_full_store_lets_the_oldest_conversations_go_not_this_tabs(page, store):
    for i in range(3):
        store(f"old{i}", f"chats.keep({json.dumps(turn(f'old {i}'))})")
    page.evaluate(f"""() => {{  // the store refuses anything more than ~2 conversations of this size
        const real = Storage.prototype.setItem;
        Storage.prototype.setItem = function (key, value) {{
            let used = 0;
            for (let i = 0; i < this.length; i++) if (this.key(i) !== key) used += this.getItem(this.key(i)).length;
            if (this === localStorage && used + value.length > 400) throw new DOMException("full", "QuotaExceeded");
            return real.call(this, key, value);
        }};
        sessionStorage.setItem({TAB_KEY!r}, "new");
        try {{ ({CHATS_JS})().keep({json.dumps(turn('new'))}); }} finally {{ Storage.prototype.setItem = real; }}
    }}""")
    assert store("new", "chats.mine()") == turn("new")
    assert [c["id"] for c in store("new", "chats.earlier()")][0] == "old2"  # the most recent of the others stays


def test_the_unreadable_conversation_of_before_per_tab_chats_is_reported_once(page, store):
    page.evaluate("() => localStorage.setItem('ming-studio-chat', 'U2FsdGVkX1+x')")  # (Gradio's AES text)
    assert store("A", "chats.legacy()") is True
    assert store("A", "chats.legacy()") is False


def test_a_conversation_open_in_another_tab_is_listed_so_and_not_opened_twice(page, store):
    """Earlier conversations listed the conversations of tabs still open: opened there, two tabs wrote the same
    conversation and the later write lost the other's turns. Two tabs of one browser here: the conversation tab A
    holds is listed as open in another tab and not opened by B, a duplicate of A (its sessionStorage copied) writes a
    conversation of its own, and once A has gone (or a holder died long ago) the conversation opens in B."""
    a, b = new_tab(page.context), page

    def call(tab, js: str):
        return tab.evaluate(f"() => {{ const chats = ({CHATS_JS})(); {js} }}")

    call(a, f"chats.hold(); chats.keep({json.dumps(turn('A'))});")
    a_id = a.evaluate(f"() => sessionStorage.getItem({TAB_KEY!r})")
    until(b, f"chats.heldElsewhere({a_id!r}) && localStorage.getItem('ming-studio-chats/' + {a_id!r})")  # (A's writes)
    call(b, "chats.hold();")
    [listed] = call(b, "return chats.earlier();")
    assert listed["id"] == a_id and listed["held"] and listed["label"].endswith("(open in another tab)")
    assert call(b, f"return [chats.open({a_id!r}), chats.heldElsewhere({a_id!r})];") == [None, True]
    b.evaluate(f"() => sessionStorage.setItem({TAB_KEY!r}, {a_id!r})")  # B as a duplicate of A
    call(b, f"chats.keep({json.dumps(turn('duplicate'))});")
    assert call(a, "return chats.mine();") == turn("A")
    assert b.evaluate(f"() => sessionStorage.getItem({TAB_KEY!r})") != a_id
    b.evaluate(f"""() => {{  // a conversation whose page died without a word, two minutes ago
        const dead = {{id: "dead", at: 1, messages: {json.dumps(turn('D'))}}};
        localStorage.setItem("ming-studio-chats/dead", JSON.stringify(dead));
        localStorage.setItem("ming-studio-chat-open/dead", JSON.stringify({{holder: "x", at: Date.now() - 120000}}));
    }}""")
    a.close(run_before_unload=True)  # (its pagehide releases its claim)
    deadline = time.monotonic() + 10  # (a close that runs the unload handlers is not waited for: wait until it is done)
    while not a.is_closed() and time.monotonic() < deadline:
        b.wait_for_timeout(20)
    until(b, f"!chats.heldElsewhere({a_id!r})")  # (A's release reaching B)
    assert not any(c["held"] for c in call(b, "return chats.earlier();"))
    assert call(b, f"return chats.open({a_id!r});") == turn("A")
    assert call(b, "return chats.open('dead');") == turn("D")


def test_the_conversation_of_a_page_that_died_hidden_is_free_within_half_a_minute(page, store):
    """A page that died without a word (crashed, killed) held its conversation "(open in another tab)" for 25 s when it
    was shown, 90 s when hidden (a phone's tab killed in the background: no pagehide): a hidden page's own timers may
    run once a minute. Its claim is refreshed by a worker's timer, which the page's throttled timers do not hold back,
    so every claim expires after 25 s; a page about to be frozen releases it and takes it again if it resumes."""
    for id_, ago in (("died", 30000), ("alive", 20000)):
        page.evaluate(f"""() => localStorage.setItem("ming-studio-chat-open/{id_}",
                          JSON.stringify({{holder: "x", at: Date.now() - {ago}, hidden: true}}))""")
    assert [store("two", f"chats.heldElsewhere({i!r})") for i in ("died", "alive")] == [False, True]  # (the first: 30 s ago)
    hidden = new_tab(page.context)
    try:
        hidden.evaluate(f"""() => {{
            sessionStorage.setItem({TAB_KEY!r}, "hidden");
            window.setInterval = () => 0;  // the page's own timers, throttled: they never run here
            ({CHATS_JS})(localStorage, sessionStorage, globalThis, {{refreshMs: 50, expiresMs: 25000}}).hold();
        }}""")
        claim = "JSON.parse(localStorage.getItem('ming-studio-chat-open/hidden'))"
        until(page, claim)  # (the hidden tab's claim reaching this one: CI once read it as null at once)
        claimed = page.evaluate(f"() => {claim}.at")
        until(page, f"{claim}.at > {claimed}")  # (refreshed by the worker)
        hidden.evaluate("() => document.dispatchEvent(new Event('freeze'))")
        until(page, "!chats.heldElsewhere('hidden')", tab_id="two")  # released (within 5 s, not the claim's 25)
        hidden.evaluate("() => document.dispatchEvent(new Event('resume'))")
        until(page, "chats.heldElsewhere('hidden')", tab_id="two")  # and taken again
    finally:
        hidden.close()
