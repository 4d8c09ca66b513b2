"""Client of the engine server (`python -m engine.server`): what the studio, tests and benchmarks use to
reach an engine in this process, on this machine or elsewhere. Imports neither torch nor the server.

    from engine.client import EngineClient
    from engine.events import TextDelta, Done, Error

    with EngineClient("ws://127.0.0.1:8000", token=None) as client:   # or EngineClient.from_env()
        print(client.info().name, client.info().capabilities)
        for ev in client.chat([{"role": "user", "content": "Hi"}], max_tokens=64, cancel=stop_event):
            ...  # QueuePosition, TextDelta, AudioChunk, ImagePreview, ImageDone, Progress; then Done or Error

`AsyncEngineClient` has the same methods (awaited; chat() and transcribe() are async iterators).
`RealtimeClient` / `AsyncRealtimeClient` drive one realtime session by hand (settings, items, audio
and webcam buffers, responses, reconnect). Errors of a streamed request end it with an `Error`
event carrying the server's code (a dropped connection: "connection_lost"); the other calls raise
`ServerError` (with `code`, `status`). `IMAGE_FORMATS`: the picture formats the engine decodes. `subtitles` writes a transcript's .srt or .vtt file exactly as the
server answers `response_format` srt / vtt.
"""

from engine.client.aio import AsyncEngineClient, AsyncRealtimeClient
from engine.client.core import ConnectionLost, Endpoints, ModelInfo, ServerError, is_loopback_host
from engine.client.sync import EngineClient, RealtimeClient
from engine.errors import IMAGE_FORMATS, image_formats_named, unread_picture
from engine.server.protocol import subtitles

__all__ = ["IMAGE_FORMATS", "AsyncEngineClient", "AsyncRealtimeClient", "ConnectionLost", "EngineClient", "Endpoints",
           "ModelInfo", "RealtimeClient", "ServerError", "image_formats_named", "is_loopback_host", "subtitles",
           "unread_picture"]
