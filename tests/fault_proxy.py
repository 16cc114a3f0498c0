"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server, switchable while a run uses it.

Why a proxy and not botocore-level injection: the run under test is a separate process (``python -m
runner``), and it talks to S3 through several boto3 clients (the syncer's, and those that look for
checkpoints and history at the start). A proxy on the endpoint URL reaches them all, from outside, without
a seam in runner/, and what the client sees is what a real outage or a flaky store looks like on the wire:
refused or dropped connections, 5xx answers, a slow link.

Modes (``proxy.mode = ...`` from the test, at any time):

- ``pass``: forward every request.
- ``down``: drop every connection without an answer (the client sees the connection closed).
- ``errors``: answer a seeded fraction ``error_rate`` of requests with an S3 ``503 SlowDown`` (or ``500
  InternalError``) without forwarding them; the rest pass. ``error_budget`` caps how many are injected so
  the run is guaranteed to converge.
- ``slow``: request bodies (uploads) are read at ``bytes_per_s``; a PUT is only forwarded once its whole
  body arrived, so a client killed mid-upload leaves nothing on the server (as with real S3).

Counters (``puts_in_flight``, ``injected``, ``requests``) let a test wait for "an upload is in flight".
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = [
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
]


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.error_rate = 0.3
        self.error_budget = 10**9
        self.bytes_per_s = 256 << 10
        self.injected = 0
        self.requests = 0
        self.puts_in_flight: set[str] = set()
        self.puts_done: list[str] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- one request
    def _inject_error(self) -> bool:
        with self._lock:
            self.requests += 1
            if self.mode != "errors" or self.injected >= self.error_budget:
                return False
            if self._rng.random() >= self.error_rate:
                return False
            self.injected += 1
            return True

    def _drop(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes | None:
        """The request body (de-chunked), throttled in ``slow`` mode; None if the client went away."""
        chunks: list[bytes] = []
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = h.rfile.readline()
                if not line:
                    return None
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = h.rfile.read(size)
                h.rfile.readline()
                if len(data) < size:
                    return None
                chunks.append(data)
            return b"".join(chunks)
        left = int(h.headers.get("Content-Length", "0") or 0)
        while left > 0:
            slow = self.mode == "slow"
            n = min(left, 16 << 10 if slow else 1 << 20)
            data = h.rfile.read(n)
            if not data:
                return None
            chunks.append(data)
            left -= len(data)
            if slow:
                time.sleep(len(data) / self.bytes_per_s)
        return b"".join(chunks)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if self.mode == "down":
            self._drop(h)
            return
        key = f"{h.command} {h.path.split('?')[0]}"
        is_put = h.command in ("PUT", "POST")
        if is_put:
            with self._lock:
                self.puts_in_flight.add(key)
        try:
            body = self._read_body(h)
            if body is None or self.mode == "down":
                self._drop(h)
                return
            if self._inject_error():
                status, code, message = self._rng.choice(_ERRORS)
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>"
                ).encode()
                h.send_response(status)
                h.send_header("Content-Type", "application/xml")
                h.send_header("Content-Length", str(len(payload)))
                h.end_headers()
                h.wfile.write(payload)
                return
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            if body or is_put:
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
            try:
                conn.request(h.command, h.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except OSError:
                self._drop(h)  # the upstream itself is gone: the client sees a dropped connection
                return
            finally:
                conn.close()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                    h.send_header(k, v)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except (ConnectionError, TimeoutError):
            h.close_connection = True
        finally:
            if is_put:
                with self._lock:
                    self.puts_in_flight.discard(key)
                    self.puts_done.append(key)
