"""The Live tab: talk with the model about what the camera sees, as in a video call.

Everything runs in the page (app/static/live.js): camera preview, microphone level, hands-free or
push-to-talk turns, typed turns (a call without a microphone is typed), streamed reply text, streamed speech played as it arrives and stopped at once
when the user speaks over it, a latency line, and settings (VAD threshold and silence, video window
and frames per second, voice; kept by the browser across reloads). A call whose connection drops reconnects by itself
(LiveDefaults.reconnect_*), saying so in its status line. Media goes over one websocket to the studio's own server
(app/live_proxy.py), which relays it to the engine's /v1/realtime with the engine token added
there; the token never reaches the browser. Wire it up with both halves:

    proxy = LiveProxy(lambda: (engine_url, engine_token))   # app.live_proxy
    with gr.Tab("Live"):
        build_live_tab(speech_output=False)
    demo.launch(..., app_kwargs=proxy.app_kwargs())
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr

from app.engine_link import SPEECH_OUT, EngineLink
from app.live_proxy import LIVE_WS_PATH
from app.ui.common import engine_lacks, on_engine_change, saved_voice_names

STATIC = Path(__file__).resolve().parents[1] / "static"
LIVE_ELEM_ID = "live"


@dataclass(frozen=True)
class LiveDefaults:
    """Initial settings of the tab (the user can change them in the page)."""

    mode: str = "hands_free"  # or "ptt" (push-to-talk)
    threshold: float = 0.5  # server VAD threshold: higher needs louder speech
    silence_duration_ms: int = 600
    prefix_padding_ms: int = 300
    window_seconds: float = 8.0  # video context attached to each turn
    # a typed message (the engine's own limits still apply); a longer one is refused saying so, and kept in the box (a
    # maxlength cut a pasted text at this length without a word)
    max_text_chars: int = 4000
    fps: float = 1.0
    camera: bool = True
    # a call whose connection drops (the engine restarted, a proxy closed an idle socket) is reconnected by itself:
    # up to `reconnect_tries` tries in a row, the first after `reconnect_first_wait_ms`, each wait twice the last,
    # at most `reconnect_max_wait_ms` (1 + 2 + 4 + 8 + 8 s: about 23 s before the page gives up and says what to do)
    reconnect_tries: int = 5
    reconnect_first_wait_ms: int = 1000
    reconnect_max_wait_ms: int = 8000
    # the engine's answer to the call's settings (it answers at once when up): a call still unanswered then is ended
    # (reconnected when it was up before), saying the engine did not answer
    ready_wait_ms: int = 15000


HTML = """
<div class="live-root">
  <div class="live-stage">
    <video data-role="preview" autoplay muted playsinline hidden></video>
    <div class="live-meter" title="microphone level"><div data-role="meter-level"></div></div>
  </div>
  <div class="live-controls">
    <button data-role="start" class="live-primary">Start</button>
    <button data-role="stop" disabled>Stop</button>
    <select data-role="mode" aria-label="turn taking">
      <option value="hands_free" {hands_free}>Hands-free</option>
      <option value="ptt" {ptt}>Push-to-talk</option>
    </select>
    <button data-role="talk" class="live-talk" disabled>Talk</button>
  </div>
  <div data-role="status" class="live-status" aria-live="polite">
    Press Start, then allow the microphone and camera.</div>
  <div data-role="error" class="live-error" role="alert" hidden></div>
  <div data-role="text-only" class="live-note" hidden>
    Replies are text for now: this engine has no speech output yet.</div>
  <form data-role="type-row" class="live-type-row">
    <input data-role="text" type="text" data-max-chars="{max_text}" autocomplete="off" disabled
           aria-label="Type a message" placeholder="Or type a message (Enter sends)">
    <button data-role="send" type="submit" disabled>Send</button>
  </form>
  <div data-role="latency" class="live-latency">Latency: speech end → first text … · → first audio …</div>
  <div data-role="log" class="live-log"></div>
  <details class="live-settings">
    <summary>Settings</summary>
    <!-- aria-label: a <label> names its first labelable element, here the <output> showing the value -->
    <label>VAD threshold <output data-role="threshold-out"></output>
      <input data-role="threshold" aria-label="VAD threshold"
             type="range" min="0.1" max="0.95" step="0.05" value="{threshold}"></label>
    <label>Silence that ends a turn <output data-role="silence-out"></output>
      <input data-role="silence" aria-label="Silence that ends a turn"
             type="range" min="200" max="2000" step="50" value="{silence}"></label>
    <label>Audio kept before speech <output data-role="prefix-out"></output>
      <input data-role="prefix" aria-label="Audio kept before speech"
             type="range" min="0" max="1000" step="50" value="{prefix}"></label>
    <label>Video window <output data-role="window-out"></output>
      <input data-role="window" aria-label="Video window"
             type="range" min="2" max="30" step="1" value="{window}"></label>
    <label>Frames per second
      <select data-role="fps">{fps_options}</select></label>
    <label><input data-role="camera" type="checkbox" {camera}> Camera</label>
    <label>Voice <select data-role="voice" {voice_disabled}>{voice_options}</select></label>
  </details>
</div>
"""


def _options(values: Sequence, selected, labels: Sequence | None = None) -> str:
    labels = values if labels is None else labels
    return "".join(f'<option value="{v}"{" selected" if v == selected else ""}>{label}</option>'
                   for v, label in zip(values, labels))


def live_html(defaults: LiveDefaults, voices: Sequence[str], speech_output: bool) -> str:
    if speech_output and voices:
        voice_values = voice_labels = list(voices)
    else:  # the value "" sends no voice: the engine's default voice speaks (or there is no speech)
        voice_values, voice_labels = [""], ["default voice" if speech_output else "(no speech output)"]
    return HTML.format(
        hands_free="selected" if defaults.mode == "hands_free" else "",
        ptt="selected" if defaults.mode == "ptt" else "",
        threshold=defaults.threshold, silence=defaults.silence_duration_ms, prefix=defaults.prefix_padding_ms,
        window=int(defaults.window_seconds), fps_options=_options([0.5, 1, 2], defaults.fps),
        camera="checked" if defaults.camera else "", max_text=defaults.max_text_chars,
        voice_disabled="" if speech_output and voices else "disabled",
        voice_options=_options(voice_values, voice_values[0], voice_labels))


def engine_settings(link: EngineLink) -> Callable[[], dict]:
    """The function build_live_tab's `settings` takes for an app.engine_link.EngineLink: whether the engine
    speaks and its saved voices, asked when the page loads and at each Start (a page built while the engine
    was down stayed text-only for good, and the saved voices were never offered). An engine never reached is not
    said to lack speech (the page said "this engine has no speech output" of an engine it could not ask)."""
    def live_settings(_data=None) -> dict:  # (Gradio hands a server function what the page sent: nothing)
        link.status()  # asked again if not asked lately
        return {"speech_output": not engine_lacks(link, SPEECH_OUT), "voices": saved_voice_names(link)}
    return live_settings


def follow_engine_js(elem_id: str = LIVE_ELEM_ID) -> str:
    """The page function that has the tab ask the studio what the engine serves again (live.js's followEngine)."""
    return (f"() => {{ for (const e of document.querySelectorAll('#{elem_id} *')) "
            "if (e.followEngine) e.followEngine(); }")


def build_live_tab(*, speech_output: bool = False, voices: Sequence[str] = (), defaults: LiveDefaults | None = None,
                   ws_path: str = LIVE_WS_PATH, elem_id: str = LIVE_ELEM_ID,
                   settings: Callable[[], dict] | None = None) -> gr.HTML:
    """The tab's content; call it inside `gr.Tab(...)`. `speech_output`: the engine can speak (the
    studio's capabilities); `voices`: the voices it offers; `ws_path`: where the studio serves
    app.live_proxy's route; `settings`: a function of one ignored argument returning {"speech_output",
    "voices"} as they are now (engine_settings), which the page asks when it loads, at each Start and, in a page
    with the studio's banner, whenever the engine changes (the voice list then starts with the default voice)."""
    defaults = defaults or LiveDefaults()
    if defaults.mode not in ("hands_free", "ptt"):
        raise ValueError(f"LiveDefaults.mode must be 'hands_free' or 'ptt', got {defaults.mode!r}")
    if defaults.reconnect_tries < 0 or not 0 < defaults.reconnect_first_wait_ms <= defaults.reconnect_max_wait_ms:
        raise ValueError("LiveDefaults needs reconnect_tries >= 0 and 0 < reconnect_first_wait_ms <= "
                         f"reconnect_max_wait_ms, got {defaults.reconnect_tries}, {defaults.reconnect_first_wait_ms}, "
                         f"{defaults.reconnect_max_wait_ms}")
    if defaults.ready_wait_ms <= 0:
        raise ValueError(f"LiveDefaults needs ready_wait_ms > 0, got {defaults.ready_wait_ms}")
    config = {"ws_path": ws_path, "speech_output": bool(speech_output), "voices": list(voices),
              "defaults": asdict(defaults), "settings": settings.__name__ if settings is not None else None}
    if settings is not None:  # (in the studio: its note and voices follow the engine as the other tabs' controls do)
        on_engine_change(None, [], js=follow_engine_js(elem_id))
    return gr.HTML(
        html_template=live_html(defaults, voices, speech_output),
        css_template=(STATIC / "live.css").read_text(encoding="utf-8"),
        js_on_load=(STATIC / "live.js").read_text(encoding="utf-8"),
        apply_default_css=False, elem_id=elem_id, live_config=json.dumps(config),
        server_functions=[settings] if settings is not None else None)
