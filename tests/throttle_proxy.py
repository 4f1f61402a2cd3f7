"""A real HTTP server in front of the S3 server that throttles: the answers a busy store gives.

``ThrottlingProxy(upstream)`` listens on a free 127.0.0.1 port. While ``refuse`` is above zero it
answers each request with ``status`` (429 ``SlowDown`` by default, the S3 throttling answer, or a
503) and counts it down; every other request is forwarded to ``upstream`` with its headers as
sent (the Host header too, so the server checks the same request signature) and the answer is
relayed. Point ``AWS_ENDPOINT_URL`` at ``proxy.endpoint`` to go through it.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# What S3 answers when it throttles (429 or 503 SlowDown) and when it fails (500 InternalError).
ERROR_XML = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>'
ANSWERS = {
    "SlowDown": ERROR_XML.format("SlowDown", "Please reduce your request rate."),
    "InternalError": ERROR_XML.format("InternalError", "We encountered an internal error. Please try again."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class ThrottlingProxy:
    """Throttle the next ``refuse`` requests, forward the rest to ``upstream``; ``refused`` counts them."""

    def __init__(self, upstream: str, refuse: int = 0, status: int = 429) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.refuse, self.status, self.refused, self.forwarded = refuse, status, 0, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def throttle(self, refuse: int, status: int = 429) -> None:
        """Answer the next ``refuse`` requests with ``status``; the counts start again from 0."""
        with self.lock:
            self.refuse, self.status, self.refused, self.forwarded = refuse, status, 0, 0

    def take(self) -> int | None:
        """The status to answer this request with, or None to forward it."""
        with self.lock:
            if self.refuse > 0:
                self.refuse -= 1
                self.refused += 1
                return self.status
            self.forwarded += 1
            return None

    def __enter__(self) -> ThrottlingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: ThrottlingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
            pass

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            status = proxy.take()
            if status is not None:
                body = ANSWERS["SlowDown" if status in (429, 503) else "InternalError"].encode()
                self.answer(status, {"Content-Type": "application/xml"}, body)
                return
            conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                reply = conn.getresponse()
                data = reply.read()
                headers = {k: v for k, v in reply.getheaders() if k.lower() not in HOP_BY_HOP}
                if self.command == "HEAD":
                    headers["Content-Length"] = reply.getheader("Content-Length", "0")
                self.answer(reply.status, headers, data)
            finally:
                conn.close()

        def answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one  # noqa: N815 - http.server's names

    return Handler
