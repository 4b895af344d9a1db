#!/usr/bin/env python3
"""A fake Slack Web API for the benchmarks: answers like Slack and counts the calls.

Run:   python3 bench/fake_slack.py [--port 0] [--host 127.0.0.1] [--delay 0.1] [--rate-limited]

It prints "PORT <n>" as its first line on stdout, then serves until killed:
    POST /api/chat.postMessage   {"ok": true, "ts": "<unique>", "channel": ...}
    POST /api/chat.update        {"ok": true, "ts": <the ts sent>, "channel": ...}
    POST /api/reactions.add      {"ok": true}
    POST /api/auth.test          the token works (team "Fake Slack", user alert-threader): the
    POST /api/conversations.info  service's checks at start (and `check`), neither counted nor logged
    POST /api/<anything else>    {"ok": false, "error": "unknown_method"}
    GET  /count                  {"count": calls so far, "methods": {method: calls},
                                  "refused": calls answered 429, "last_at": time of the last call}
    POST /reset                  sets the counts to zero (answers the counts before)
    POST /delay                  {"seconds": S}: answer each API call S seconds late from now on
                                 (answers the delay before)
    GET  /calls                  with --rate-limited: every call so far, in order, as
                                 {"at", "method", "status", "payload", "answer", "retry_after"}

HTTP/1.1 with keep-alive, one thread per connection. By default no latency
is added: the services under test see Slack at its fastest, so what they
cost is their own. bench/run.py starts it as a process of its own so that
its CPU time is not counted in the service's, and sets a delay only for
the phase that measures latency with a slow Slack.

--rate-limited enforces Slack's limits, for bench/outage.py: about one
chat.postMessage per second per channel with bursts of 5, and about 50 per
minute for chat.update and for reactions.add (Tier 3) with bursts of 10.
Past them it answers HTTP 429 with an integer Retry-After, as Slack does.
It then also records every call, refused or not, with its JSON payload.
"""

import argparse
import http.server
import itertools
import json
import math
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple

ANSWERED_METHODS = ("chat.postMessage", "chat.update", "reactions.add")
# (tokens per second, burst) of each limited method; postMessage's bucket is per channel.
LIMITS = {"chat.postMessage": (1.0, 5), "chat.update": (50 / 60, 10), "reactions.add": (50 / 60, 10)}


class CallCounter:
    """Counts Slack calls by method; hands out unique message timestamps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: Dict[str, int] = {}
        self._refused = 0
        self._last_at = 0.0
        self._seq = itertools.count(1)
        self._base = int(time.time())

    def record(self, method: str, refused: bool = False) -> None:
        with self._lock:
            self._methods[method] = self._methods.get(method, 0) + 1
            self._refused += refused
            self._last_at = time.time()

    def next_ts(self) -> str:
        with self._lock:
            return f"{self._base}.{next(self._seq):06d}"

    def snapshot(self, reset: bool = False) -> Dict[str, Any]:
        with self._lock:
            counts = {"count": sum(self._methods.values()), "methods": dict(self._methods),
                      "refused": self._refused, "last_at": self._last_at}
            if reset:
                self._methods.clear()
                self._refused = 0
        return counts


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; a call takes one token or waits."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there (the caller holds the lock)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class RateLimits:
    """Slack's limits per method (and per channel for chat.postMessage), and the log of every call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: Dict[Tuple[str, str], TokenBucket] = {}
        self.calls: List[Dict[str, Any]] = []

    def retry_after(self, method: str, call: Dict[str, Any]) -> int:
        """0 when the call may go through, else Slack's Retry-After in whole seconds (at least 1)."""
        if method not in LIMITS:
            return 0
        scope = str(call.get("channel")) if method == "chat.postMessage" else ""
        with self._lock:
            bucket = self._buckets.get((method, scope))
            if bucket is None:
                bucket = self._buckets[(method, scope)] = TokenBucket(*LIMITS[method])
            wait = bucket.take()
        return max(1, math.ceil(wait)) if wait else 0

    def log(self, method: str, status: int, payload: Any, answer: Dict[str, Any], retry_after: int = 0) -> None:
        with self._lock:
            self.calls.append({"at": time.time(), "method": method, "status": status,
                               "payload": payload, "answer": answer, "retry_after": retry_after})

    def snapshot(self) -> List[Dict[str, Any]]:
        with self._lock:
            return list(self.calls)


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
        if self.path == "/delay":
            before = self.server.delay
            self.server.delay = float(json.loads(body)["seconds"])
            self._answer({"seconds": before})
            return
        path, _, query = self.path.partition("?")
        method = path.rsplit("/", 1)[-1]
        if method in ("auth.test", "conversations.info"):  # the service's checks at start: answered, not counted
            channel = urllib.parse.parse_qs(query).get("channel", [""])[0]
            self._answer({"ok": True, "team": "Fake Slack", "user": "alert-threader", "bot_id": "B0FAKE"}
                         if method == "auth.test" else {"ok": True, "channel": {"id": channel, "is_member": True}})
            return
        try:
            call = json.loads(body or b"{}")
        except ValueError:
            call = {}
        if not isinstance(call, dict):
            call = {}
        if self.server.delay:
            time.sleep(self.server.delay)
        limits = self.server.limits
        if limits is None:
            counter.record(method)
            self._answer(slack_answer(method, call, counter))
            return
        retry_after = limits.retry_after(method, call)
        counter.record(method, refused=retry_after > 0)
        payload = call or body.decode("utf-8", "replace")
        if retry_after:
            answer = {"ok": False, "error": "ratelimited"}
            limits.log(method, 429, payload, answer, retry_after)
            self._answer(answer, 429, {"Retry-After": str(retry_after)})
            return
        answer = slack_answer(method, call, counter)
        limits.log(method, 200, payload, answer)
        self._answer(answer)

    def do_GET(self) -> None:
        if self.path == "/count":
            self._answer(self.server.counter.snapshot())
        elif self.path == "/calls" and self.server.limits is not None:
            self._answer({"calls": self.server.limits.snapshot()})
        else:
            self._answer({"ok": True, "service": "fake-slack"})

    def _answer(self, document: Dict[str, Any], status: int = 200,
                headers: Optional[Dict[str, str]] = None) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class FakeSlackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the forwarder opens a connection per call

    def __init__(self, address: Any, delay: float = 0.0, rate_limited: bool = False) -> None:
        self.counter = CallCounter()
        self.delay = delay
        self.limits = RateLimits() if rate_limited else None
        super().__init__(address, FakeSlackHandler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one (default: 0)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="answer each API call this late (default: 0; POST /delay changes it)")
    parser.add_argument("--rate-limited", action="store_true",
                        help="enforce Slack's rate limits (429 + Retry-After) and record every call (GET /calls)")
    args = parser.parse_args(argv)
    server = FakeSlackServer((args.host, args.port), args.delay, args.rate_limited)
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
