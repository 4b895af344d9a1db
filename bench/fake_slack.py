#!/usr/bin/env python3
"""A fake Slack Web API for the benchmark: answers every call at once and counts them.

Run:   python3 bench/fake_slack.py [--port 0] [--host 127.0.0.1]

It prints "PORT <n>" as its first line on stdout, then serves until killed:
    POST /api/chat.postMessage   {"ok": true, "ts": "<unique>", "channel": ...}
    POST /api/chat.update        {"ok": true, "ts": <the ts sent>, "channel": ...}
    POST /api/reactions.add      {"ok": true}
    POST /api/<anything else>    {"ok": false, "error": "unknown_method"}
    GET  /count                  {"count": calls so far, "methods": {method: calls}}
    POST /reset                  sets the counts to zero (answers the counts before)

HTTP/1.1 with keep-alive, one thread per connection, no latency added: the
services under test see Slack at its fastest, so what they cost is their own.
bench/run.py starts it as a process of its own so that its CPU time is not
counted in the service's.
"""

import argparse
import http.server
import itertools
import json
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence

ANSWERED_METHODS = ("chat.postMessage", "chat.update", "reactions.add")


class CallCounter:
    """Counts Slack calls by method; hands out unique message timestamps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: Dict[str, int] = {}
        self._seq = itertools.count(1)
        self._base = int(time.time())

    def record(self, method: str) -> None:
        with self._lock:
            self._methods[method] = self._methods.get(method, 0) + 1

    def next_ts(self) -> str:
        with self._lock:
            return f"{self._base}.{next(self._seq):06d}"

    def snapshot(self, reset: bool = False) -> Dict[str, Any]:
        with self._lock:
            counts = {"count": sum(self._methods.values()), "methods": dict(self._methods)}
            if reset:
                self._methods.clear()
        return counts


def slack_answer(method: str, call: Dict[str, Any], counter: CallCounter) -> Dict[str, Any]:
    """What Slack answers to a successful call of `method`."""
    if method == "chat.postMessage":
        return {"ok": True, "ts": counter.next_ts(), "channel": call.get("channel")}
    if method == "chat.update":
        return {"ok": True, "ts": call.get("ts"), "channel": call.get("channel")}
    if method == "reactions.add":
        return {"ok": True}
    return {"ok": False, "error": "unknown_method"}


class FakeSlackHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Slack's API does
    # Headers and body go out in two writes; without TCP_NODELAY the body waits
    # for the client's delayed ACK (40 ms on Linux) and every call looks slow.
    disable_nagle_algorithm = True
    server: "FakeSlackServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per call would cost more than the answer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        counter = self.server.counter
        if self.path == "/reset":
            self._answer(counter.snapshot(reset=True))
            return
        method = self.path.rsplit("/", 1)[-1]
        try:
            call = json.loads(body or b"{}")
        except ValueError:
            call = {}
        counter.record(method)
        self._answer(slack_answer(method, call if isinstance(call, dict) else {}, counter))

    def do_GET(self) -> None:
        if self.path == "/count":
            self._answer(self.server.counter.snapshot())
        else:
            self._answer({"ok": True, "service": "fake-slack"})

    def _answer(self, document: Dict[str, Any]) -> None:
        payload = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class FakeSlackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the forwarder opens a connection per call

    def __init__(self, address: Any) -> None:
        self.counter = CallCounter()
        super().__init__(address, FakeSlackHandler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one (default: 0)")
    args = parser.parse_args(argv)
    server = FakeSlackServer((args.host, args.port))
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
