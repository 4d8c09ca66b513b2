"""Plain HTTP servers on a free local port for the studio's tests: a handler class served on a thread, or one
canned JSON answer to every GET (a card, a 503 while an engine starts)."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def serving(handler, port: int = 0):
    """`handler` (a BaseHTTPRequestHandler class or factory) served on 127.0.0.1:`port` (0: any free one); yields
    its URL and shuts it down after."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True  # (a handler a test leaves hanging does not hold the shutdown)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def answering(status: int, payload, headers: dict[str, str] | None = None):
    """A handler answering every GET with `status` and `payload` as JSON, plus `headers`."""
    body = json.dumps(payload).encode()

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # (quiet)
            pass

    return Answer
