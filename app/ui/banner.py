"""The banner at the top of the studio: what model the engine serves, a plain warning when it is
the tiny random demo checkpoint (meaningless output), and a plain error while the engine is not
answering (refreshed every few seconds, so it recovers by itself)."""

from __future__ import annotations

import html

import gradio as gr
from gradio.context import Context

from app.engine_link import EngineLink, LinkStatus
from app.ui.common import ENGINE_UP_ATTR
from engine.client import ModelInfo

BANNER_ELEM_ID = "model-banner"
DEMO_HEADLINE = "RANDOM DEMO WEIGHTS"
# The command the banner shows as code, copyable as it is (the hint "(or a local checkpoint directory)" inside it
# went along with a copy and broke the command); where else the model can come from is said before it.
REAL_MODEL_COMMAND = "python launch.py --model inclusionAI/Ming-flash-omni-2.0"
# The same for a studio driving a remote engine (launch.py --engine, a Space): the model loads on the engine's machine,
# where the banner's "python launch.py --model" would start a second studio, not change what the engine serves.
REMOTE_MODEL_COMMAND = "python -m engine.server --model inclusionAI/Ming-flash-omni-2.0 --host 0.0.0.0 --token T"
CAPABILITY_NAMES = {"text": "text", "image_in": "images in", "video_in": "video in", "audio_in": "audio in",
                    "speech_out": "speech out", "image_out": "images out",
                    "transcription": "speech recognition", "realtime": "live sessions"}


def human_count(n: int) -> str:
    """2306320 -> '2.31 M', 103_000_000_000 -> '103 B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def banner_parts(info: ModelInfo, remote: bool = False) -> tuple[str, str, str | None]:
    """(headline, details, command hint or None): the single source of what the banner says. `remote`: the engine
    runs elsewhere (EngineLink.remote), so the real model is loaded by restarting its server."""
    shape = f"{human_count(info.parameters)} parameters, {info.dtype} on {info.device}"
    can = ", ".join(CAPABILITY_NAMES.get(c, c) for c in sorted(info.capabilities))
    if info.is_demo:
        how = ("To serve the real model, restart the engine server on its machine with (--model also takes a local "
               "checkpoint directory):", REMOTE_MODEL_COMMAND) if remote else (
            "To load the real model, run (or give --model a local checkpoint directory):", REAL_MODEL_COMMAND)
        return (DEMO_HEADLINE,
                f"the engine serves the tiny, randomly initialised demo checkpoint '{info.name}' ({shape}; {can}). "
                f"Its replies, speech and images are meaningless; it only shows that the studio works. {how[0]}",
                how[1])
    details = f"release {info.release} · {shape} · {can}"
    if info.placement and info.placement != f"everything on {info.device}":  # a plan, or what did not fit
        details += f" · placement: {info.placement}"
    return f"Model: {info.name}", details, None


def held_back_html(note: str | None) -> str:
    """The line under the banner saying that a proxy holds the engine's streams back (EngineLink.held_back), if so."""
    if not note:
        return ""
    return ('<div style="border:1px solid #d97706;background:#fef3c7;color:#78350f;padding:6px 14px;margin-top:6px;'
            f'border-radius:8px;font-size:14px"><strong>⚠ Streaming held back</strong>: {html.escape(note)}.</div>')


def banner_html(status: LinkStatus, remote: bool = False, held_back: str | None = None) -> str:
    """The banner: the engine unavailable, the demo weights, or the model served; `held_back` (EngineLink.held_back)
    adds the line saying that a proxy holds its streams back."""
    return _status_html(status, remote) + held_back_html(held_back)


def _status_html(status: LinkStatus, remote: bool) -> str:
    if not status.ok:
        known = f" (last seen serving '{html.escape(status.info.name)}')" if status.info else ""
        # a refused token does not pass by itself ("until it is back" read as if waiting would do)
        until = "then" if status.code == "unauthorized" else "it is back"
        return ('<div style="border:2px solid #b91c1c;background:#fee2e2;color:#7f1d1d;padding:10px 14px;'
                'border-radius:8px;font-size:15px"><strong>⚠ ENGINE UNAVAILABLE</strong>: '
                f'{html.escape(status.problem or "unknown problem")}{known}. Requests fail until {until}; '
                'this page checks again every few seconds.</div>')
    headline, details, hint = (html.escape(p) if p else p for p in banner_parts(status.info, remote))
    if status.info.is_demo:
        # a phone broke "--model" at its hyphens ("(or give -" / "-model a local checkpoint directory)")
        details = details.replace("--model", '<code style="white-space:nowrap">--model</code>')
        # the command too ("python launch.py --" / "model", "inclusionAI/Ming-flash-omni-" / "2.0"): it breaks only
        # between its words
        hint = " ".join(f'<span style="white-space:nowrap">{word}</span>' for word in hint.split(" "))
        return ('<div style="border:2px solid #d97706;background:#fef3c7;color:#78350f;padding:10px 14px;'
                'border-radius:8px;font-size:15px">'
                f'<strong>⚠ {headline}</strong>: {details}<br><code>{hint}</code></div>')
    return ('<div style="border:1px solid #9ca3af;padding:8px 14px;border-radius:8px;font-size:15px">'
            f'<strong>{headline}</strong> · {details}</div>')


ENGINE_DOWN = "down"


def engine_state(status: LinkStatus) -> str:
    """What the page's engine-dependent controls follow, as one value that changes whenever they must be set again:
    the engine going away or coming back, and an engine that came back with other parts between two checks (a talker
    or an image generator more or less, another model or its limits: a restart within the banner's few seconds left
    the tabs as the page had found the engine, "no talker" and all, until a reload)."""
    if not status.ok or status.info is None:
        return ENGINE_DOWN
    info = status.info
    return (f"up: {info.name} {info.release} {sorted(info.capabilities)} {sorted(info.limits.items())} "
            f"{sorted(info.image_defaults.items())}")


def build_banner(link: EngineLink) -> gr.HTML:
    """The banner, refreshed every few seconds from the engine's status. Inside the studio's Blocks it also keeps
    the engine's state (engine_state: whether it answers, and with which parts; a hidden box at Blocks.engine_up, see
    app.ui.common.on_engine_change): the controls that depend on the engine are set again when that changes."""
    # (computed per page load)
    banner = gr.HTML(lambda: banner_html(link.status(), link.remote, link.held_back), elem_id=BANNER_ELEM_ID)
    # hidden: its change event is the page's (a gr.State set by an unqueued tick never fired its own)
    engine_up = gr.Textbox(lambda: engine_state(link.status()), visible=False, label="The engine's state",
                           elem_id="engine-up")
    setattr(Context.root_block, ENGINE_UP_ATTR, engine_up)

    def tick():
        status = link.status()
        return banner_html(status, link.remote, link.held_back), engine_state(status)
    timer = gr.Timer(link.recheck_s)
    timer.tick(tick, None, [banner, engine_up], queue=False, show_progress="hidden", api_visibility="private")
    return banner
