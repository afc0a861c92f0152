"""An HTTP proxy in front of an S3-compatible server that injects faults on chosen requests:
a dropped connection, a truncated body, 503 SlowDown, or a slow answer.

Tests and scripts/fault_campaign.py run it in-process and point boto3 at `proxy.url`:

    proxy = FaultProxy("http://127.0.0.1:9000")
    proxy.add(Fault("truncate", verb="GET", key=r"\\.pt$"))  # cut the next checkpoint download
    ...
    proxy.close()

Standalone, in front of the development stack's server (scripts/s3_server.py):

    python scripts/fault_proxy.py --upstream http://127.0.0.1:9000 --port 9001 \\
        --fault 'drop:DELETE:snapshot-:3' --fault '503:PUT::2'
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import http.server
import re
import threading
import time
import urllib.parse

KINDS = ("drop", "truncate", "503", "slow")
_HOP = ("transfer-encoding", "connection", "content-length")


@dataclasses.dataclass
class Fault:
    """`kind` on the next `times` requests whose verb and path match, after `skip` of them.

    drop: close the connection without an answer (the request is not forwarded);
    truncate: forward, answer with the full Content-Length but half the body, then close;
    503: answer SlowDown without forwarding; slow: wait `delay` seconds, then forward.
    """

    kind: str
    verb: str = "*"  # GET, PUT, POST, DELETE, HEAD or * for any
    key: str = ""  # a regex searched in the request path ("/bucket/key?query")
    times: int = 1  # -1: every matching request
    skip: int = 0
    delay: float = 2.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, got {self.kind!r}")

    def matches(self, verb: str, path: str) -> bool:
        return self.verb in ("*", verb) and re.search(self.key, path) is not None


class FaultProxy:
    """A threaded HTTP proxy to `upstream` that applies the first matching Fault per request."""

    def __init__(self, upstream: str, faults=(), port: int = 0):
        self.faults: list[Fault] = list(faults)
        self.served: list[tuple[str, str, str]] = []  # (verb, path, kind) of each fault
        self.requests = 0
        self.lock = threading.Lock()
        up = urllib.parse.urlparse(upstream)
        handler = type("Handler", (_Handler,), {"proxy": self, "upstream": (up.hostname, up.port)})
        self.server = _Server(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def pick(self, verb: str, path: str) -> Fault | None:
        """The fault this request gets (consuming one of its `times`), or None."""
        with self.lock:
            self.requests += 1
            for fault in self.faults:
                if not fault.matches(verb, path):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                if fault.times == 0:
                    continue
                fault.times -= fault.times > 0
                self.served.append((verb, path, fault.kind))
                return fault
            return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that give up mid-request (a timeout, a killed trainer) are expected


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy
    upstream: tuple[str, int]

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            chunk = self.rfile.read(size + 2)[:size]
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                return out
            out += chunk

    def _cut(self) -> None:
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(2)

    def _handle(self):
        body = self._body()
        fault = self.proxy.pick(self.command, self.path)
        kind = fault.kind if fault else None
        if kind == "truncate" and self.command == "HEAD":
            kind = "drop"  # a HEAD has no body to cut
        if kind == "drop":
            return self._cut()
        if kind == "503":
            payload = b"<Error><Code>SlowDown</Code><Message>injected 503</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if kind == "slow":
            time.sleep(fault.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "truncate":
            self.wfile.write(payload[: len(payload) // 2])
            return self._cut()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def _fault(text: str) -> Fault:
    """'kind:VERB:key-regex:times' (VERB, key and times optional) -> Fault."""
    kind, verb, key, times = (text.split(":", 3) + ["", "", ""])[:4]
    return Fault(kind, verb or "*", key, int(times or 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the S3 server's URL")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument(
        "--fault", type=_fault, action="append", default=[], help="kind:VERB:key-regex:times"
    )
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, args.fault, args.port)
    print(f"fault proxy at {proxy.url} -> {args.upstream}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
