"""Serve the engine: an OpenAI-compatible HTTP API and a realtime websocket protocol on one port.

    python -m engine.server --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 8000] [--token T]

docs/protocol.md describes the protocol; engine.server.protocol is its one mapping to and from engine
events, and engine.client the matching client. The names below
are imported lazily so `python -m engine.server` can refuse bad settings before torch loads.
"""

from __future__ import annotations

_EXPORTS = {
    "ApiError": "engine.server.protocol", "Limits": "engine.server.limits",
    "StartupRefused": "engine.server.auth", "check_bind": "engine.server.auth",
    "ServerHandle": "engine.server.app", "create_app": "engine.server.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.server' has no attribute {name!r}")
