"""An HTTP proxy in front of the loopback S3 (or MLflow) server that fails every Nth request with a 503
SlowDown, as an overloaded object store does (the client's own retries must absorb it), and
answers 403 AccessDenied for the keys in ``forbidden``, as a store does for an object the job
may not read, and 503 for every request to the keys in ``down``, as a failing store does."""

from __future__ import annotations

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b'<Message>Access Denied</Message></Error>')


class FlakyProxy:
    def __init__(self, upstream: str, fail_every: int = 3, forbidden: set[str] = frozenset(),
                 down: set[str] = frozenset(), fail_write: int | None = None):
        """``fail_write``: answer the Nth write (a POST, PUT, PATCH or DELETE that is not a
        search) with a 500, as a failing MLflow server does; ``writes`` counts them."""
        target = urlparse(upstream)
        counter = itertools.count(1)
        self.failed = 0
        self.writes: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []     # (method, path with query) of every request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _error(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                """The request body, also when sent in HTTP chunks (pyarrow uploads parts so)."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()                              # the CRLF after each chunk
                while self.rfile.readline().strip():                   # trailers, up to the blank line
                    pass
                return b"".join(chunks)

            def _handle(self):
                body = self._body()
                proxy.requests.append((self.command, self.path))
                if urlparse(self.path).path.lstrip("/") in forbidden:
                    return self._error(403, ACCESS_DENIED)
                if urlparse(self.path).path.lstrip("/") in down:       # a store failing for these, always
                    return self._error(503, SLOW_DOWN)
                if self.command in ("POST", "PUT", "PATCH", "DELETE") and "/search" not in self.path:
                    proxy.writes.append((self.command, self.path))
                    if len(proxy.writes) == fail_write:
                        proxy.failed += 1
                        body = b'{"error_code": "INTERNAL_ERROR", "message": "injected failure"}'
                        self.send_response(500)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                if next(counter) % fail_every == 0:
                    proxy.failed += 1
                    return self._error(503, SLOW_DOWN)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
                headers["Host"] = target.netloc
                if body:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # A HEAD reply has no body but the object's length: pass that on, or the client
                # believes every object is empty.
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
