"""The websocket protocol our servers run under uvicorn (the engine server's, and the studio's, which
Gradio starts): uvicorn's websockets (sans-I/O) protocol, with the opening handshakes it leaves hanging
answered and closed.

websockets' parser answers a handshake whose request line or headers are too long (414 / 431) or which
is not HTTP at all by queueing its response, or an end of stream, and raising no event; uvicorn's protocol
only acts on events, so it never wrote that response: the client waited until it gave up, and the
connection, still open, made uvicorn's shutdown fail (it then tried to send a 500 on it).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class HandshakeAnsweringProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_complete and self.conn.handshake_exc is not None:
            self.refuse_handshake()

    def refuse_handshake(self) -> None:
        """Send what the parser queued (its 414 / 431 answer, or nothing for a request that is not HTTP)
        and close; marked complete so that shutdown sends nothing more on it."""
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.handshake_complete = True
        self.close_sent = True
        self.transport.close()


def make_uvicorn_default() -> None:
    """Make this uvicorn's "auto" websocket protocol, for a server that others configure (Gradio's launch
    gives no choice of protocol). Call before that server starts."""
    from uvicorn import config  # noqa: PLC0415

    config.WS_PROTOCOLS["auto"] = f"{__name__}:{HandshakeAnsweringProtocol.__name__}"
