"""What every tab shares: the requests in flight per browser session (so Stop reaches exactly that
visitor's request, queued or running, through the server's one queue), the figures and status lines
shown under each tab's output, and turning a stream's failure into a message (never a traceback)."""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import threading
import uuid
from typing import Any

import gradio as gr
from gradio.context import Context

from app.cache_dir import studio_cache_dir
from app.engine_link import SPEECH_OUT, TOKEN_ADVICE, EngineLink
from app.media_check import media_problem
from engine.events import Done, Error, GenerationStats, QueuePosition

GENERATING = "Generating…"
# Stop pressed between Make it and the run's start (InFlight.announce): said, nothing sent
STOPPED_BEFORE_START = "Stopped before it started: nothing was sent to the engine."
# The Blocks attribute holding the banner's hidden "engine's state" box (app/ui/banner.py), if there is one.
ENGINE_UP_ATTR = "engine_up"
# The most a page load waits for the engine's saved voices (an engine hung on the list held it 60 s, the client's timeout)
VOICE_LIST_TIMEOUT_S = 5.0
# The seed boxes' "a new random seed each time": a Number box cannot show empty (Gradio draws None as 0, which
# then went out as seed 0, every time), so -1, as other generation UIs have it.
RANDOM_SEED = -1
# The largest seed a seed box sends: the largest whole number the page's number box holds exactly (JavaScript's
# Number.MAX_SAFE_INTEGER). The engine takes seeds up to 2**63 - 1, but the browser rounds a longer number typed in the
# box before the studio sees it (9007199254740993 arrives as ...992): a seed above this would run as another seed
# without a word, while every number typed up to it arrives as typed and every one above it arrives above it and is
# refused (seed_problem). The boxes stopped at 2**31 - 1 before, refusing seeds the engine takes.
SEED_MAX = 2**53 - 1
SEED_RANGE = (f"Seed: {RANDOM_SEED} for a random one, or 0 to {SEED_MAX} (the largest whole number the page's number "
              "box holds exactly).")
# The largest seed the studio draws itself (the Image tab's dice and its random seeds): short enough to read and type
# again, as the engine's own draws are (below 2**31).
DRAWN_SEED_MAX = 2**31 - 1


# Ctrl+Enter (Cmd+Enter on a Mac) in a text box marked RUNS_TAB presses its tab's button marked RUN_BUTTON
# (app/static/a11y.js): Chat sends on Enter, but a keyboard-only user had no key to run Image, Voice or Speech.
RUN_BUTTON, RUNS_TAB = "studio-run", "studio-runs-tab"


def run_button(label: str, elem_id: str) -> gr.Button:
    """A tab's primary button (Make it, Transcribe), pressed by Ctrl+Enter in the tab's text boxes made with
    runs_tab()."""
    return gr.Button(label, variant="primary", elem_id=elem_id, elem_classes=[RUN_BUTTON])


def runs_tab(say: str | None = None) -> dict:
    """The keyword arguments of a gr.Textbox in which Ctrl+Enter presses its tab's run_button: the class the page
    script looks for and, with `say` (the button's label), an info line saying so (on the tab's main box)."""
    return {"elem_classes": [RUNS_TAB], **({"info": f"Ctrl+Enter: {say}"} if say else {})}


def seed_box(**kwargs) -> gr.Number:
    """A seed box starting at RANDOM_SEED, saying so. It has no Gradio minimum or maximum: Gradio would refuse a
    value out of range with its own words and an Error badge; the tab says SEED_RANGE instead (seed_problem)."""
    return gr.Number(value=RANDOM_SEED, precision=0, label=f"Seed ({RANDOM_SEED} = random)", **kwargs)


def seed_problem(value) -> str | None:
    """SEED_RANGE when a seed box's value (or an API caller's) is not RANDOM_SEED, empty or 0..SEED_MAX; else None."""
    if value in (None, ""):
        return None
    try:
        seed = int(value)
    except (TypeError, ValueError):
        return SEED_RANGE
    return None if seed == RANDOM_SEED or 0 <= seed <= SEED_MAX else SEED_RANGE


def chosen_seed(value) -> int | None:
    """The seed a box (or an API caller) asks for; None for a random one: RANDOM_SEED or any negative value,
    empty or None."""
    if value in (None, ""):
        return None
    seed = int(value)
    return None if seed < 0 else seed


def toolbar(*names: str) -> list[str]:
    """A media component's toolbar buttons: `names`, and Gradio's "share" only on a Hugging Face Space (SPACE_ID
    set), the one place it works. Gradio shows it by default: anywhere else a press said only "Must be on
    Spaces to share." (and the browser logged a ShareError)."""
    return [*names, "share"] if os.environ.get("SPACE_ID") else list(names)


# The path of the Share button's icon (Gradio's "Community" icon), the one mark of the button in every language the
# page speaks: its label is translated ("Teilen" in German).
SHARE_ICON_PATH = "M23,20a5,5,0,0,0-3.89,1.89"


def share_css() -> str:
    """CSS hiding Gradio's Share buttons off a Hugging Face Space (SPACE_ID unset), where toolbar() cannot: the Chatbot
    gives each picture, clip or recording in a message a Share button whatever its own buttons (hard-coded there),
    and a press said "Must be on Spaces to share." (the browser logged a ShareError). Empty on a Space."""
    if os.environ.get("SPACE_ID"):
        return ""
    return (f'.gradio-container button[aria-label="Share"], .gradio-container button:has(path[d^="{SHARE_ICON_PATH}"])'
            " { display: none !important; }\n")


def no_audio() -> dict:
    """What a generator yields to a streaming gr.Audio that has nothing to play: the player emptied. A bare None
    opens a stream (Gradio starts one at a streaming output's first value that is not an update) with no audio
    in it: the player showed a pause button at 0:00 / 0:00 with a download of nothing, and the browser logged
    "HLS error ... No Segments found in Playlist" (a text-only chat reply, a Voice message such as "Type the
    text to speak first")."""
    return gr.update(value=None)


def engine_lacks(link: EngineLink, capability: str) -> bool:
    """The engine was reached (now or earlier) and does not serve `capability`. False while it was never
    reached: nothing is known of what it serves (the banner says it is unavailable), so no tab claims it
    lacks anything."""
    return link.status().info is not None and not link.has(capability)


def engine_limits(link: EngineLink) -> dict:
    """The limits the engine's model card reports (max_image_pixels, max_audio_seconds, ...); empty when unknown."""
    info = link.status().info
    return dict(getattr(info, "limits", None) or {}) if info is not None else {}


def note_text(link: EngineLink, capability: str, text: str) -> str:
    """`text` while the engine lacks `capability`, followed by the engine's own reason when its card gives one
    (e.g. which file of a partly downloaded image generator is missing)."""
    if not engine_lacks(link, capability):
        return ""
    why = (getattr(link.status().info, "unavailable", None) or {}).get(capability)
    return f"{text} The engine says: {markdown_escaped(why)}" if why else text


def markdown_escaped(text: str) -> str:
    """`text` shown as written in a Markdown block (its underscores and asterisks are not emphasis)."""
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


_MARKDOWN_SPECIAL = re.compile(r"[\\`*_\[\]<>#|]")  # (a reason quoting a path such as talker/llm_config.json)


def capability_note(link: EngineLink, capability: str, text: str) -> gr.Markdown:
    """`text` (why a tab cannot do its work) while the engine lacks `capability`, worked out at each page
    load and whenever the engine's state changes (on_engine_change): a studio started before its engine said "no
    talker" (and the like) for good, even after the engine came back with one."""
    note = gr.Markdown(lambda: note_text(link, capability, text))
    on_engine_change(lambda: note_text(link, capability, text), [note])
    return note


def from_json(text: str | None) -> Any:
    """A value the page kept as JSON (in the browser's storage); None for anything else."""
    try:
        return json.loads(text or "null")
    except ValueError:
        return None


def on_page_load(fn, outputs: list, inputs: list | None = None, js: str | None = None):
    """Run `fn` (of `inputs`, usually none; it returns updates for `outputs`) at each page load, for what
    depends on the engine's capabilities or lists (a page loaded after the engine came back shows what it
    serves now) or on what the browser kept (`js`: a page function whose values replace the inputs' first). Call
    inside the studio's Blocks; the event is returned (a step to run after it: .then)."""
    return Context.root_block.load(fn, inputs, outputs, queue=False, show_progress="hidden", api_visibility="private",
                                   js=js)


def on_engine_change(fn, outputs: list, inputs: list | None = None, js: str | None = None) -> None:
    """Run `fn` (of `inputs`, usually none; updates for `outputs`) whenever the banner sees the engine come back, go
    away or come back with other parts (the hidden box at Blocks.engine_up, app/ui/banner.py): a page opened while the
    engine was down kept "Answer with speech too" disabled ("the engine is not reachable") and the Voice tab's
    instruction lists empty after the banner showed the model again, until a reload. `fn` None with `js`: a page
    function only (what a tab drawn by its own script asks again). Call inside the studio's Blocks, after
    build_banner."""
    engine_up = getattr(Context.root_block, ENGINE_UP_ATTR, None)
    if engine_up is not None:
        engine_up.change(fn, inputs, outputs, queue=False, show_progress="hidden", api_visibility="private", js=js)


def interrupted_note(button: str) -> str:
    return (f"Your last request was interrupted (the page was reloaded or closed before it was finished). What you "
            f"asked is back: press \"{button}\" to make it again.")


BROWSER_SECRET_FILE = "studio-browser-secret"  # in the studio cache: the key of what the browser keeps for a tab
_browser_secret: str | None = None


def browser_secret() -> str:
    """The key Gradio encrypts a tab's browser-kept state with (gr.BrowserState), the same at every start: left to
    Gradio it is drawn anew when the studio starts, so after a restart (an upgrade, a crash) every page's kept
    request could no longer be read and was silently gone. Kept in the studio cache, readable by its owner only;
    a cache that cannot be written gives a key for this run, and says so once."""
    global _browser_secret
    if _browser_secret is None:
        path = studio_cache_dir() / BROWSER_SECRET_FILE
        try:
            _browser_secret = path.read_text().strip() if path.is_file() else ""
            if not _browser_secret:
                path.parent.mkdir(parents=True, exist_ok=True)
                _browser_secret = secrets.token_urlsafe(24)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(_browser_secret)
        except OSError as e:
            _browser_secret = secrets.token_urlsafe(24)
            print(f"[studio] cannot keep the browser key in {path} ({e}): the requests the tabs keep in the "
                  "browser will not be read back after a restart (set MING_STUDIO_CACHE to a writable folder)",
                  file=sys.stderr, flush=True)
    return _browser_secret


def browser_kept(storage_key: str) -> gr.BrowserState:
    """A tab's state kept in the browser under `storage_key` (a dict; {} when nothing is kept), readable after a
    page reload and after the studio restarts (browser_secret)."""
    return gr.BrowserState({}, storage_key=storage_key, secret=browser_secret())


def kept_request(*values, names: tuple[str, ...]) -> dict:
    """What a tab keeps in the browser when its Make it is pressed (a reload lost the text typed, and the run,
    without a word): the fields `names` with their `values`, not finished yet, and an id of this press."""
    return {**dict(zip(names, values)), "id": uuid.uuid4().hex, "done": False}


def request_done(kept, mine=None) -> dict:
    """The kept request, marked finished (made, failed or stopped: nothing to say at the next load). `mine`: the
    request this tab's press kept, when `kept` is the browser's copy read afresh: a request another tab kept since is
    left as it is (this tab's, written over it finished, lost that tab's words at its reload)."""
    if isinstance(mine, dict):
        if isinstance(kept, dict) and kept.get("id") != mine.get("id"):
            return kept  # another tab's (or none: nothing of this tab's to mark)
        kept = mine
    return {**kept, "done": True} if isinstance(kept, dict) else {}


def browser_storage(key: str, empty: str) -> tuple[str, str]:
    """(a JavaScript expression reading the browser's localStorage entry `key`, `empty` when there is none; a page
    function writing its one argument there): what every tab of the browser shares, read afresh each time."""
    return (f"(localStorage.getItem({key!r}) || {empty!r})",
            f"(value) => {{ try {{ localStorage.setItem({key!r}, value); }} catch {{}} return []; }}")


class BrowserRequest:
    """A tab's last request, kept in the browser (localStorage `key`, as JSON) across a reload: written when its
    button is pressed, marked finished when the run ends (only while it is still this tab's: two tabs of a browser
    share the entry), and given back at page load with a note when it was not finished (restore_request). `runs`: the
    tab's requests in flight and its name: the press is announced there at once (InFlight.announce), so that Stop
    pressed before the run has begun stops it."""

    def __init__(self, key: str, names: tuple[str, ...], button: str, runs: tuple[InFlight, str] | None = None):
        self.names, self.button, self.runs = names, button, runs
        self.read, self.write = browser_storage(key, "{}")
        self.mine = gr.Textbox(visible="hidden")    # the request this tab's press kept
        self.stored = gr.Textbox(visible="hidden")  # the browser's, read afresh

    def on_press(self, button, inputs: list, keep=None):
        """The first step of `button`'s click: the request (`inputs`, named `names`) kept, and the press announced;
        chain the run on it. `keep`: what makes the kept request of the inputs' values (kept_request of the names when
        None)."""
        keep = keep or (lambda *values: kept_request(*values, names=self.names))

        def pressed(request: gr.Request, *values) -> str:
            if self.runs is not None:
                self.runs[0].announce(session_of(request), self.runs[1])
            return json.dumps(keep(*values))
        return button.click(pressed, inputs, [self.mine], **HIDDEN_STEP).then(None, [self.mine], None, js=self.write,
                                                                            **HIDDEN_STEP)

    def when_done(self, event):
        """After the run (`event`): the browser's request marked finished when it is still this tab's, and the press's
        announcement dropped when no run took it up (InFlight.settle)."""
        def done(request: gr.Request, stored, mine) -> str:
            if self.runs is not None:
                self.runs[0].settle(session_of(request), self.runs[1])
            return json.dumps(request_done(from_json(stored), from_json(mine)))
        return event.then(None, None, [self.stored], js=f"() => {self.read}", **HIDDEN_STEP).then(
            done, [self.stored, self.mine], [self.stored], **HIDDEN_STEP).then(None, [self.stored], None,
                                                                              js=self.write, **HIDDEN_STEP)

    def restore_at_load(self, outputs: list) -> None:
        """At page load: the kept request's fields into `outputs` (one per name, then the status line)."""
        on_page_load(lambda stored: restore_request(from_json(stored), self.names, self.button), outputs,
                     inputs=[self.stored], js=f"() => [{self.read}]")


HIDDEN_STEP = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}  # a step the page runs unseen


def restore_request(kept, names: tuple[str, ...], button: str) -> tuple:
    """At page load: (each of `names` as kept, the status line): the request's fields come back, and a request that
    was not finished says so (interrupted_note); nothing kept: nothing changes."""
    if not isinstance(kept, dict) or not any(isinstance(kept.get(n), str) and kept.get(n) for n in names):
        return (*(gr.skip() for _ in names), gr.skip())
    fields = tuple(kept[n] if isinstance(kept.get(n), str) else gr.skip() for n in names)
    return (*fields, gr.skip() if kept.get("done") else interrupted_note(button))


def check_on_upload(link: EngineLink, component, kind: str, status, upload: bool = False,
                    max_seconds: float | None = None) -> None:
    """Say at once on `status` what is wrong with a file given to `component` (app.media_check): a text file renamed
    .wav was taken without a word, and only the button pressed later said it was not audio. A file that looks
    fine leaves the status line as it is."""
    def check(value):
        paths = [getattr(v, "name", None) or (v.get("path") if isinstance(v, dict) else v)
                 for v in (value if isinstance(value, list) else [value]) if v]
        limits = engine_limits(link)
        problem = next(filter(None, (media_problem(p, kind, limits, upload, max_seconds) for p in paths if p)), None)
        if problem:
            gr.Warning(problem)
        return problem or gr.skip()
    # queued: Gradio drops the toast of an unqueued event
    component.upload(check, [component], [status], concurrency_limit=None, show_progress="hidden",
                     api_visibility="private")


# A file given to an upload box that Gradio's page refuses by its type (a video on an audio box, a PDF on the Image
# tab's references) got Gradio's own "Invalid file type: talk.mp4. Only audio/* allowed.", a MIME-type list. The page
# script (app/static/uploads.js) stops such a file in a box with the class SAYS_REFUSED and writes its name and type
# into the box's hidden twin (the box's elem_id + REFUSED_SUFFIX), whose change says it in the tab's words
# (say_refused_files).
SAYS_REFUSED, REFUSED_SUFFIX = "studio-says-refused", "-refused-file"


def says_refused(elem_id: str) -> dict:
    """The keyword arguments of an upload component whose refused files are said by say_refused_files."""
    return {"elem_id": elem_id, "elem_classes": [SAYS_REFUSED]}


def say_refused_files(elem_id: str, status, sentence) -> None:
    """Make the hidden twin of the upload box `elem_id` (made with says_refused()): a file the page refused there is said
    on `status` and in a toast, in the words `sentence(name, is_video)` gives."""
    twin = gr.Textbox(visible="hidden", elem_id=elem_id + REFUSED_SUFFIX)

    def said(value):
        try:
            given = json.loads(value or "")
            name, mime = str(given["name"]), str(given["type"])
        except (ValueError, TypeError, KeyError):  # emptied, or not what the page script writes
            return gr.skip()
        text = sentence(name, mime.startswith("video/"))
        gr.Warning(text)
        return text
    twin.change(said, [twin], [status], concurrency_limit=None, show_progress="hidden", api_visibility="private")


def saved_voice_names(link: EngineLink) -> list[str]:
    """The names of the voices saved in the engine's voice library (empty when it has no talker or cannot say; not
    asked while the link finds the engine down: an engine that hung held each page load's list, and Live's Start, for
    the client's whole request timeout; one found up but hung on the list holds it VOICE_LIST_TIMEOUT_S at most, or
    the link's check timeout where shorter)."""
    try:
        up = link.status().ok and link.has(SPEECH_OUT)
        timeout = min(VOICE_LIST_TIMEOUT_S, link.check_timeout_s)
        return [v["name"] for v in link.client.voices(timeout=timeout)] if up else []
    except Exception:  # noqa: BLE001  (the lists then stay empty; Refresh asks again)
        return []


def wire_stop(button: gr.Button, stop, **kwargs):
    """Wire a tab's Stop button to `stop` (a controller's stop: it cancels this visitor's request, or says with
    gr.Info that nothing is running). Queued: Gradio drops gr.Info from an event with queue=False, so Stop
    pressed with nothing running showed nothing at all; with no concurrency limit it never waits behind the
    work it stops."""
    return button.click(stop, None, None, concurrency_limit=None, **kwargs)


def session_of(request: gr.Request | None) -> str:
    session = getattr(request, "session_hash", None) if request is not None else None
    return session or f"anonymous-{uuid.uuid4().hex}"


class InFlight:
    """The cancel flag of each visitor's request per tab. It is not a queue: requests wait in the
    engine server's one line (which reports positions); this only lets Stop / Clear find them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[tuple[str, str], threading.Event] = {}

    def begin(self, session: str, tab: str) -> threading.Event:
        """A new request of this visitor in this tab; an earlier one still going is cancelled. The request of a press
        announced (announce) takes up its flag, set already when Stop came first."""
        flag = threading.Event()
        with self._lock:
            previous = self._flags.get((session, tab))
            if previous is not None and getattr(previous, "announced", False):
                previous.announced = False  # type: ignore[attr-defined]
                return previous
            if previous is not None:
                previous.set()
            self._flags[(session, tab)] = flag
        return flag

    def announce(self, session: str, tab: str) -> None:
        """A press of this visitor in this tab whose request is on its way (the page runs steps before it; the Voice
        tab asks the engine its options): Stop pressed meanwhile found nothing ("Nothing is being made.") and the run
        then ran whole. Stop finds it from now on. A request still going is left alone (the page does not start a
        second run of the tab while one runs: the press is ignored, and must not stop it)."""
        flag = threading.Event()
        flag.announced = True  # type: ignore[attr-defined]
        with self._lock:
            self._flags.setdefault((session, tab), flag)

    def settle(self, session: str, tab: str) -> None:
        """The steps of an announced press have ended: its flag is dropped when no request took it up (one refused
        before it began)."""
        with self._lock:
            flag = self._flags.get((session, tab))
            if flag is not None and getattr(flag, "announced", False):
                del self._flags[(session, tab)]

    def end(self, session: str, tab: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get((session, tab)) is flag:
                del self._flags[(session, tab)]

    def cancel(self, session: str, tab: str, clear: bool = False) -> bool:
        """Cancel this visitor's request in this tab (`clear`: the visitor also emptied the tab, so
        nothing is to be shown or given back); False when there is none."""
        with self._lock:
            flag = self._flags.get((session, tab))
        if flag is None:
            return False
        if clear:
            flag.cleared = True  # type: ignore[attr-defined]
        flag.set()
        return True

    def running(self, session: str, tab: str) -> bool:
        with self._lock:
            return (session, tab) in self._flags

    def __len__(self) -> int:
        with self._lock:
            return len(self._flags)


FINISH_REASONS = {"stop": "stop (complete)", "length": "length (the token limit was reached)",
                  "cancelled": "cancelled (stopped)"}


def figures_line(done: Done) -> str:
    """One line of figures for a finished response (the modalities it had) and why it ended."""
    reason = FINISH_REASONS.get(done.finish_reason, done.finish_reason)
    stats: GenerationStats = done.stats
    waited = f" · waited {stats.queue_wait_s:.1f} s in line" if stats.queue_wait_s >= 0.05 else ""
    if stats == GenerationStats():  # nothing measured (a stream Stop closed): no "prompt tokens 0, 0.0 tokens/s"
        return f"finish reason: {reason}"
    return f"{stats.summary()}{waited} · finish reason: {reason}"


def queue_line(event: QueuePosition) -> str:
    if event.position <= 0:
        return GENERATING
    ahead = event.position - 1
    return (f"Waiting for the engine: {ahead} request{'s' if ahead != 1 else ''} ahead of yours "
            f"({event.waiting} waiting in all). Stop withdraws it.") if ahead else \
        f"Waiting for the engine: yours is next ({event.waiting} waiting). Stop withdraws it."


# The engine went away (stopped, restarted, the network dropped) before or while a request ran: said in the page's
# words, with what to do (a chat reply cut by a restart read "the connection to the server was lost: connection
# closed: received 1012 (service restart); then sent 1012 (service restart)", and nothing said what next).
ENGINE_GONE = {"connection_lost": "The engine stopped answering in the middle of this request (it was stopped or "
                                  "restarted, or the network dropped)",
               "connect_failed": "The engine is not reachable right now (it is stopped, restarting or unreachable)",
               "server_shutting_down": "The engine is shutting down (stopped or restarted) and took no new work"}
RETRY_WHEN_BACK = ("Try again once the banner at the top shows the model again (the page checks every few seconds; "
                   "nothing needs restarting here)")


def error_text(error: Error) -> str:
    """What went wrong, for the page: the engine's own message, or, when the engine went away, what that means and
    what to do (its technical detail after it)."""
    if error.code == "unauthorized":  # the engine's own words tell a client program which header to send
        return f"The engine refused this studio's token: {TOKEN_ADVICE}."
    gone = ENGINE_GONE.get(error.code)
    return f"{gone}. {RETRY_WHEN_BACK}. Detail: {error.message}" if gone else error.message


def error_line(error: Error) -> str:
    return f"Error ({error.code}): {error_text(error)}"


def failure(exc: BaseException) -> Error:
    """An exception raised while talking to the engine, as the Error event a user sees: the server's own
    error as it sent it (ServerError: its message and code, not "ServerError: code: message" again), any
    other exception with its type."""
    to_event = getattr(exc, "to_event", None)
    if callable(to_event):
        return to_event()
    return Error(f"{type(exc).__name__}: {exc}", code=getattr(exc, "code", None) or "studio_error")
