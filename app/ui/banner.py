"""The banner at the top of the studio: what model is loaded, and a plain warning when it is the
tiny random demo checkpoint (which produces meaningless text)."""

from __future__ import annotations

import html

import gradio as gr

from engine.runtime import REAL_MODEL_HINT, Engine, EngineInfo

BANNER_ELEM_ID = "model-banner"
DEMO_HEADLINE = "RANDOM DEMO WEIGHTS"


def human_count(n: int) -> str:
    """2306320 -> '2.31 M', 103_000_000_000 -> '103 B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def banner_parts(info: EngineInfo) -> tuple[str, str, str | None]:
    """(headline, details, command hint or None): the single source of what the banner says."""
    shape = f"{human_count(info.parameters)} parameters, {info.dtype} on {info.device}"
    if info.is_demo:
        return (DEMO_HEADLINE,
                f"this is the tiny, randomly initialised demo checkpoint '{info.name}' ({shape}). "
                "It produces meaningless text and only shows that the studio works. "
                "To load the real model, run:", REAL_MODEL_HINT)
    details = f"release {info.release} · {shape}"
    details += " · components: " + ", ".join(info.components)
    if info.placement and not info.placement.startswith("everything on"):
        details += f" · placement: {info.placement}"
    return f"Model: {info.name}", details, None


def banner_text(info: EngineInfo) -> str:
    headline, details, hint = banner_parts(info)
    return f"{headline}: {details}" + (f" {hint}" if hint else "")


def banner_html(info: EngineInfo) -> str:
    headline, details, hint = (html.escape(p) if p else p for p in banner_parts(info))
    if info.is_demo:
        return ('<div style="border:2px solid #d97706;background:#fef3c7;color:#78350f;padding:10px 14px;'
                'border-radius:8px;font-size:15px">'
                f'<strong>⚠ {headline}</strong>: {details}<br><code>{hint}</code></div>')
    return ('<div style="border:1px solid #9ca3af;padding:8px 14px;border-radius:8px;font-size:15px">'
            f'<strong>{headline}</strong> · {details}</div>')


def build_banner(engine: Engine) -> gr.HTML:
    return gr.HTML(banner_html(engine.info()), elem_id=BANNER_ELEM_ID)
