#!/usr/bin/env python3
"""Tiny HTTP/1.1 origin server for the Varnish tracing demo.

Usage: demo_backend.py --port N [--log FILE]

Routes:
  /, /cached      200, Cache-Control: max-age=60, small HTML body
  /esi            200, ESI page (X-Enable-ESI: 1), Cache-Control: max-age=60
  /esi-fragment   200, Cache-Control: max-age=60, body "fragment"
  /pass/...       200, Cache-Control: private, body "uncacheable"
  /slow           sleeps 0.2 s, then 200
  /status/NNN     responds with status NNN
  anything else   404

With --log FILE, every request is appended to FILE as one JSON line:
  {"method", "path", "traceparent", "tracestate", "headers"}

Standard library only (Python 3.11+).
"""

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"

ESI_BODY = (
    '<html><body>top <esi:include src="/esi-fragment"/> end</body></html>\n'
)


class RequestLog:
    """Thread-safe JSON-lines request log (flushes after every line)."""

    def __init__(self, path):
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8") if path else None

    def write(self, record):
        if self._fh is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self):
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm the second waits for
    # the delayed ACK of the first on a reused connection (about 40 ms per response).
    disable_nagle_algorithm = True
    server_version = "demo-backend/1.0"
    request_log = None  # set in main()

    # Silence the default per-request stderr logging.
    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        pass

    def _record(self):
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            # Repeated headers are joined, as HTTP allows for most fields.
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.request_log.write({
            "method": self.command,
            "path": self.path,
            "traceparent": headers.get("traceparent"),
            "tracestate": headers.get("tracestate"),
            "headers": headers,
        })

    def _drain_body(self):
        # Consume any request body so keep-alive connections stay in sync.
        length = self.headers.get("Content-Length")
        if length:
            try:
                n = int(length)
            except ValueError:
                n = 0
            if n > 0:
                self.rfile.read(n)

    def _send(self, status, body, headers=None, content_type="text/html; charset=utf-8"):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # Always send Content-Length (1xx/204/304 must not carry a body).
        no_body = status < 200 or status in (204, 304)
        if no_body:
            data = b""
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _route(self):
        self._drain_body()
        self._record()
        path = self.path.split("?", 1)[0]
        cached = {"Cache-Control": "max-age=60"}

        if path in ("/", "/cached"):
            self._send(200, f"<html><body>hello from {path}</body></html>\n", cached)
        elif path == "/esi":
            self._send(200, ESI_BODY, {**cached, "X-Enable-ESI": "1"})
        elif path == "/esi-fragment":
            self._send(200, "fragment", cached, content_type="text/plain; charset=utf-8")
        elif path.startswith("/pass/") or path == "/pass":
            self._send(200, "uncacheable\n", {"Cache-Control": "private"},
                       content_type="text/plain; charset=utf-8")
        elif path == "/slow":
            time.sleep(0.2)
            self._send(200, "<html><body>slow</body></html>\n", cached)
        elif path.startswith("/status/"):
            code_s = path[len("/status/"):]
            if code_s.isdigit() and 200 <= int(code_s) <= 599:
                code = int(code_s)
                self._send(code, f"status {code}\n", {"Cache-Control": "no-store"},
                           content_type="text/plain; charset=utf-8")
            else:
                self._send(400, "bad status code (want 200-599)\n",
                           content_type="text/plain; charset=utf-8")
        else:
            self._send(404, "not found\n", content_type="text/plain; charset=utf-8")

    do_GET = _route
    do_HEAD = _route
    do_POST = _route
    do_PUT = _route
    do_DELETE = _route
    do_PATCH = _route
    do_OPTIONS = _route


def main(argv=None):
    parser = argparse.ArgumentParser(description="Demo origin server for the Varnish tracing demo.")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on (127.0.0.1)")
    parser.add_argument("--log", metavar="FILE", help="append one JSON line per request to FILE")
    args = parser.parse_args(argv)

    log = RequestLog(args.log)
    Handler.request_log = log

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # default listen backlog of 5 is small for load tests

    httpd = Server((HOST, args.port), Handler)
    httpd.daemon_threads = True

    def stop(signum, frame):
        # shutdown() blocks until serve_forever() returns, so run it elsewhere.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    print(f"listening on {HOST}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
