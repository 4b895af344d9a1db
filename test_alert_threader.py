"""Tests for alert_threader.py: real sockets, a fake Slack on loopback, real Redis and Alertmanager.

Run: python3 -m pytest -q test_alert_threader.py   (or `bash .ci/run`, which installs everything first)

A fake Slack (a real HTTP server on 127.0.0.1:0) records every call and answers
from a script. The service is started the way `main` starts it, on port 0.
Tests that need redis-server, prometheus-alertmanager, amtool, promtool,
shellcheck or systemd-analyze skip on a laptop without them, and fail in CI
(ALERT_THREADER_CI=1, set by .ci/run).
"""

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import html.parser
import http.client
import http.server
import io
import itertools
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import pytest

import alert_threader as at

REPO = Path(__file__).resolve().parent
IN_CI = os.environ.get("ALERT_THREADER_CI") == "1"
SLACK_TOKEN = "xoxb-1111-2222-SecretSlackToken"
WEBHOOK_TOKEN = "wh-Secret-Webhook-Token-0123456789"


def require_binary(name: str) -> str:
    """The path of a program the test needs: skip without it on a laptop, fail in CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: see .ci/run)"
    if IN_CI:
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)


def require_module(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"Python package {name} is missing; CI must install it")
        pytest.skip(f"Python package {name} is not installed")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# A fake Slack: a real HTTP server that records calls and answers from a script
# ---------------------------------------------------------------------------

class Call:
    def __init__(self, method: str, headers: Dict[str, str], payload: Dict[str, Any]) -> None:
        self.method = method
        self.headers = headers
        self.payload = payload
        self.accepted = False
        self.ts: Optional[str] = None
        self.at = time.monotonic()  # when it arrived

    @property
    def thread_ts(self) -> Optional[str]:
        return self.payload.get("thread_ts")

    @property
    def text(self) -> str:
        return visible_text(self.payload)

    def __repr__(self) -> str:
        return f"<{self.method} ts={self.ts} thread={self.thread_ts} {self.text[:60]!r}>"


def visible_text(payload: Dict[str, Any]) -> str:
    """Everything a person could read in a message: fallback text and every block's text (dates as written)."""
    return at.slack_tokens_drawn(raw_text(payload))


def raw_text(payload: Dict[str, Any]) -> str:
    """Every text of a message as sent: fallback text and every block's text."""
    parts = [payload.get("text", "")]
    for attachment in payload.get("attachments", []):
        for block in attachment.get("blocks", []):
            if "text" in block and isinstance(block["text"], dict):
                parts.append(block["text"]["text"])
            for item in block.get("fields", []) + block.get("elements", []):
                if isinstance(item.get("text"), dict):
                    parts.append(item["text"]["text"])
                elif isinstance(item.get("text"), str):
                    parts.append(item["text"])
    return "\n".join(parts)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """The fakes' HTTP server: a client that hangs up mid-answer (the service timing a call out, a test
    dropping a connection) is what some tests do on purpose, so it is not printed as a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeSlack:
    """Slack's Web API on 127.0.0.1:0. Script answers with fail(method, *answers):
    {"error": code} (ok:false), {"status": 503}, {"status": 429, "retry_after": 1},
    {"drop": True} (close without answering), {"partial": True} (accept, send half an answer, close),
    {"drip": s} (an answer one byte every s seconds),
    {"sleep": s} (then answer ok),
    {"chunked": True} (answer ok in chunks), {"close": True} (answer ok, then close the connection),
    {"close_header": True} (answer ok with Connection: close), {"answer": {...}} (take it, answer that)."""

    def __init__(self, tls: Any = None) -> None:
        self.calls: List[Call] = []
        self.checks: List[Call] = []  # auth.test and conversations.info: the service's checks, not alerts' calls
        self.members = True  # conversations.info: is the bot in the channel
        self.lock = threading.Lock()
        self.scripts: Dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.always: Dict[str, Dict[str, Any]] = {}
        self.seq = 0
        self.barrier: Optional[threading.Barrier] = None
        self.limits: Dict[str, Any] = {}  # method -> (per second, burst), enforced as Slack does: 429 past it
        self.turns: Dict[str, float] = {}
        self.refused: List[Call] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 65536  # one send per answer, like a real server: no Nagle stalls

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                path, _, query = self.path.partition("?")
                method = path.rsplit("/", 1)[-1]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                call = Call(method, dict(self.headers), {**json.loads(body or b"{}"),
                                                         **dict(urllib.parse.parse_qsl(query))})
                with fake.lock:
                    (fake.checks if method in ("auth.test", "conversations.info") else fake.calls).append(call)
                    answer = fake.scripts[method].popleft() if fake.scripts[method] else fake.always.get(method)
                    wait = fake.over_limit(call)
                if wait:
                    fake.refused.append(call)
                    return self.reply(429, {"ok": False, "error": "ratelimited"},
                                      {"Retry-After": str(max(1, int(wait + 0.999)))})
                answer = answer or {}
                if answer.get("drop"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer.get("drip"):  # a whole answer, a byte every `drip` seconds
                    data = b'{"ok": true, "ts": "1700000000.999999", "channel": "C0ALERTS"}'
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(data))
                    for byte in data:
                        with contextlib.suppress(OSError):
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        time.sleep(answer["drip"])
                    return
                if answer.get("partial"):  # Slack has taken it: the head of an answer, then the line drops
                    with fake.lock:
                        fake.seq += 1
                        call.accepted, call.ts = True, f"1700000000.{fake.seq:06d}"
                    self.close_connection = True
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 80\r\n\r\n{\"ok\": true, \"ts\": ")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer.get("sleep"):
                    time.sleep(answer["sleep"])
                if "status" in answer:
                    headers = {"Retry-After": str(answer["retry_after"])} if "retry_after" in answer else {}
                    return self.reply(answer["status"], {"ok": False, "error": "http"}, headers)
                if "error" in answer:
                    return self.reply(200, {"ok": False, "error": answer["error"]})
                with fake.lock:
                    fake.seq += 1
                    ts = call.payload.get("ts") or f"1700000000.{fake.seq:06d}"
                    call.accepted, call.ts = True, ts
                if method == "auth.test":
                    return self.reply(200, {"ok": True, "team": "Test Team", "user": "threader"})
                if method == "conversations.info":
                    return self.reply(200, {"ok": True, "channel": {"id": call.payload.get("channel"),
                                                                    "is_member": fake.members}})
                if answer.get("chunked"):
                    return self.reply_chunked({"ok": True, "ts": ts, "channel": call.payload.get("channel")})
                headers = {"Connection": "close"} if answer.get("close_header") else {}
                self.reply(200, answer.get("answer") or {"ok": True, "ts": ts, "channel": call.payload.get("channel")},
                           headers)
                if answer.get("close") or answer.get("close_header"):
                    self.wfile.flush()
                    self.close_connection = True

            def reply(self, status: int, body: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have timed out and left
                    self.wfile.write(data)

            def reply_chunked(self, body: Dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(data), 7):
                    piece = data[i:i + 7]
                    self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # an ssl.SSLContext: HTTPS, as the real Slack speaks
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/api/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def over_limit(self, call: Call) -> float:
        """A token bucket per method and channel, like Slack's: the seconds until a turn, 0 if there is one."""
        if call.method not in self.limits:
            return 0.0
        per_second, burst = self.limits[call.method]
        bucket = call.method + "|" + str(call.payload.get("channel", ""))
        now = time.monotonic()
        due = max(self.turns.get(bucket, now), now)
        if due - (burst - 1) / per_second > now:
            return due - (burst - 1) / per_second - now
        self.turns[bucket] = due + 1 / per_second
        return 0.0

    def fail(self, method: str, *answers: Dict[str, Any]) -> None:
        with self.lock:
            self.scripts[method].extend(answers)

    def fail_always(self, method: str, answer: Optional[Dict[str, Any]]) -> None:
        with self.lock:
            if answer is None:
                self.always.pop(method, None)
            else:
                self.always[method] = answer

    def accepted(self, method: str = "chat.postMessage") -> List[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method and c.accepted]

    @property
    def messages(self) -> List[Call]:
        return self.accepted("chat.postMessage")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack():
    fake = FakeSlack()
    yield fake
    fake.close()


# ---------------------------------------------------------------------------
# The service, started as main starts it
# ---------------------------------------------------------------------------

def make_config(settings: Dict[str, str]) -> at.Config:
    """A Config through the same parser and loader main uses (settings passed as flags, secrets as variables)."""
    argv, environ = [], {}
    for name, value in settings.items():
        if name in at.SECRET_SETTINGS or name == "REDIS_URL":  # what may carry a password: never as a flag
            environ[name] = str(value)
        else:
            argv += [at.flag_name(name), str(value)]
    return at.load_config(at.build_parser().parse_args(argv), environ)


class Running:
    """A started service and what a test needs to talk to it."""

    def __init__(self, service: at.Service, log: io.StringIO) -> None:
        self.service = service
        self.log = log
        self.port = service.port

    def request(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
                raw: Optional[bytes] = None) -> "Answer":
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            all_headers = {"Content-Type": "application/json"} if data is not None else {}
            all_headers.update(headers or {})
            conn.request(method, path, data, all_headers)
            response = conn.getresponse()
            return Answer(response.status, response.read(), dict(response.headers))
        finally:
            conn.close()

    def alert(self, webhook: Dict[str, Any], channel: Optional[str] = None, token: Optional[str] = None,
              expect: Optional[int] = 200) -> "Answer":
        path = "/alert" + (f"?channel={channel}" if channel else "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = self.request("POST", path, webhook, headers)
        if expect is not None:
            assert answer.status == expect, answer.text
        return answer

    def get(self, path: str, **kwargs: Any) -> "Answer":
        return self.request("GET", path, **kwargs)


class Answer:
    def __init__(self, status: int, body: bytes, headers: Dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def start(tmp_path, slack):
    """start(**settings) -> Running; defaults: fake Slack, file store in tmp_path, port 0."""
    started: List[Running] = []

    def _start(overrides: Optional[Dict[str, Any]] = None, **settings: Any) -> Running:
        """`overrides` replace fields of the Config that no setting reaches (a short Redis lease)."""
        values = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url,
                  "THREAD_STORE_FILE": str(tmp_path / "threads.json"), "HOST": "127.0.0.1", "PORT": "0",
                  "DELIVERY_WAIT": "10s", "SLACK_TIMEOUT": "1s", "LOG_LEVEL": "debug",
                  "SLACK_PACE": "0"}  # pacing has tests of its own; the others need not wait for it
        values.update({k: v for k, v in settings.items() if v is not None})
        for name in [k for k, v in settings.items() if v is None]:
            values.pop(name, None)
        config = dataclasses.replace(make_config(values), **(overrides or {}))
        log = io.StringIO()
        at.setup_logging(config, log)
        running = Running(at.start_service(config), log)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.service.stop(timeout=5)


def stop(running: Running) -> None:
    running.service.stop(timeout=5)


def settled(svc: Running, timeout: float = 20.0, cards: bool = True) -> None:
    """Wait until the service has told everything in its outbox and (unless cards is False) drawn its cards."""
    wait_for(lambda: not svc.service.store.outbox_summary() and svc.service.delivery.senders.idle(cards),
             timeout=timeout, what="the outbox to be told and the cards drawn")


# ---------------------------------------------------------------------------
# Alertmanager payloads
# ---------------------------------------------------------------------------

def make_alert(name: str = "DatabaseDown", status: str = "firing", severity: str = "critical",
               instance: str = "db01.example.com", starts: str = "2024-01-15T14:30:25Z",
               ends: Optional[str] = None, fingerprint: Optional[str] = None,
               summary: Optional[str] = None, **labels: str) -> Dict[str, Any]:
    all_labels = {"alertname": name, "severity": severity, "service": "database", "cluster": "prod-eu",
                  "instance": instance, "job": "mysql"}
    all_labels.update(labels)
    alert = {"status": status, "labels": all_labels,
             "annotations": {"summary": summary or f"{name} on {instance}",
                             "description": f"{name} has fired on {instance}.",
                             "runbook_url": "https://runbooks.example.com/" + name},
             "startsAt": starts,
             "endsAt": ends or ("2024-01-15T14:45:30Z" if status == "resolved" else at.ZERO_TIME),
             "generatorURL": "http://prometheus.example.com:9090/graph?g0.expr=up%3D%3D0",
             "fingerprint": fingerprint or at.label_fingerprint(all_labels)}
    return alert


def resolved(alert: Dict[str, Any], ends: str = "2024-01-15T14:45:30Z") -> Dict[str, Any]:
    copy = json.loads(json.dumps(alert))
    copy["status"], copy["endsAt"] = "resolved", ends
    return copy


def webhook(*alerts: Dict[str, Any], group_key: str = '{}:{alertname="DatabaseDown"}') -> Dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"version": "4", "groupKey": group_key, "truncatedAlerts": 0, "status": status,
            "receiver": "slack-threads", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager.example.com:9093", "alerts": list(alerts)}


# ---------------------------------------------------------------------------
# Configuration and the command line
# ---------------------------------------------------------------------------

SETTING_NAMES = {name for name, _, _ in at.SETTINGS}
MS = at.MessageSettings()  # the defaults, environment production
PROD = at.MessageSettings(environment="prod")


def run_cli(*args: str, cwd: Path, env: Optional[Dict[str, str]] = None, timeout: float = 20,
            stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """python3 alert_threader.py ARGS with only the given settings in its environment."""
    base = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    base.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "alert_threader.py"), *args], env=base, input=stdin,
                          capture_output=True, timeout=timeout, cwd=str(cwd))


# ---------------------------------------------------------------------------
# Documentation that cannot drift: the settings page, the links, the README's size
# ---------------------------------------------------------------------------

DOCS = REPO / "docs"


def settings_page_rows() -> Dict[str, str]:
    """docs/configuration.md's table: each setting's default as the page writes it (— for none)."""
    rows = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        match = re.match(r"\| `([A-Z][A-Z0-9_]*)` \| (.*?) \|", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} has two rows"
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_setting_the_code_reads_has_one_row_in_the_configuration_page_with_its_default():
    rows = settings_page_rows()
    read = {name for name, _, _ in at.SETTINGS}
    assert sorted(read - set(rows)) == [], "settings the code reads that docs/configuration.md lacks"
    assert sorted(set(rows) - read) == [], "rows of docs/configuration.md for settings the code does not read"
    for name, default, _ in at.SETTINGS:
        written = rows[name].strip("`").replace("\\|", "|")
        assert written == ("—" if default is None else default), (name, rows[name], default)
    # Variables read from the environment beside the settings (systemd's) are named on the page too.
    page = (DOCS / "configuration.md").read_text()
    for name in set(re.findall(r"environ(?:\.get\(|\[)\"([A-Z][A-Z0-9_]*)\"", (REPO / "alert_threader.py").read_text())):
        assert name in read or f"`{name}`" in page, name


def markdown_anchors(text: str) -> Set[str]:
    """The anchors GitHub makes of a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def relative_links(path: Path) -> List[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img src=\"([^\"]+)\"", text)
    return [link for link in links if not re.match(r"[a-z]+:", link)]


def test_every_relative_link_in_the_readme_and_docs_reaches_its_file_and_heading():
    pages = [REPO / "README.md", REPO / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) >= 10, "the README, bench/README.md and the docs pages"
    broken = []
    for page in pages:
        for link in relative_links(page):
            target, _, anchor = link.partition("#")
            file = (page.parent / target).resolve() if target else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {link} (no such file)")
            elif anchor and anchor not in markdown_anchors(file.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {link} (no such heading)")
    assert broken == []


def test_the_readme_fits_a_screen_s_scroll_and_the_docstring_points_at_the_docs():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    doc = at.__doc__ or ""
    assert len(doc.splitlines()) <= 25 and "--help" in doc and "docs/configuration.md" in doc
    assert not re.search(r"\b(SLACK_PACE|STORM_WINDOW|OUTBOX_LIMIT|MAX_CONNECTIONS)\b", doc), "no list of settings"


def test_help_lists_every_setting_with_its_default(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    out = result.stdout.decode()
    for name, default, _ in at.SETTINGS:
        assert at.flag_name(name) in out and name in out, name
        if default is not None and name not in at.SECRET_SETTINGS:
            assert f"(default: {default})" in " ".join(out.split()), name


@pytest.mark.parametrize("variable, value, message", [
    ("THREAD_STORE", "postgres", "THREAD_STORE: 'postgres' is unknown (use file or redis)"),
    ("PORT", "http", "PORT: 'http' is not an integer (use a whole number within 0..65535)"),
    ("PORT", "70000", "PORT: 70000 is out of range (use a value within 0..65535)"),
    ("THREAD_STORE_FILE", "/nonexistent/dir/threads.json", "THREAD_STORE_FILE: directory /nonexistent/dir does not exist"),
    ("REDIS_URL", "http://localhost:6379", "REDIS_URL: not a Redis URL (use redis://"),
    ("REDIS_URL", "redis://localhost:notaport/0", "REDIS_URL: cannot be read: a port that is no number"),
    ("REDIS_URL", "redis://localhost:6379/abc", "REDIS_URL: the database 'abc' is not a number"),
    ("SLACK_API_URL", "ftp://slack.example.com/", "SLACK_API_URL: 'ftp://slack.example.com/' is not an http(s) URL"),
    ("REOPEN_WINDOW", "soon", "REOPEN_WINDOW: 'soon' is not a duration"),
    ("STORM_THRESHOLD", "0", "STORM_THRESHOLD: 0 is out of range"),
    ("SLACK_CHANNEL", "not a channel", "SLACK_CHANNEL: 'not a channel' is not a channel ID"),
    ("SLACK_CHANNEL", "c0123456789", "SLACK_CHANNEL: 'c0123456789' looks like a channel ID in lower case (write it "
                                     "as Slack shows it: C0123456789)"),
    ("SLACK_CHANNEL", "#alerts", "SLACK_CHANNEL: '#alerts' is a channel name; give its ID instead (in Slack: "
                                 "the channel's name > About, at the bottom: Channel ID, like C0123456789)"),
    ("SLACK_CHANNELS", "C0ALERTS,alerts-db", "SLACK_CHANNELS: 'alerts-db' is a channel name; give its ID"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT: 'xml' is not a choice (use text or json)"),
    ("SLACK_SIGNING_SECRET", "8f742231b10e8888abcd99yyyzzz85a5", "SLACK_SIGNING_SECRET: set without ALERTMANAGER_URL"),
    ("ALERTMANAGER_URL", "http://admin:AMpassw0rd@am:9093", "ALERTMANAGER_URL: carries credentials"),
    ("ALERTMANAGER_URL", "http://am:9093/?token=AMpassw0rd", "ALERTMANAGER_URL: carries a query string"),
    ("WEBHOOK_TOKEN", "short", "WEBHOOK_TOKEN: too short or with spaces"),
    ("ENVIRONMENT", "prod|eu", "ENVIRONMENT: empty, unprintable or with '|'"),
    ("THREAD_KEY_LABELS", ",", "THREAD_KEY_LABELS: names no label"),
    ("SILENCE_DURATIONS", "10s", "SILENCE_DURATIONS: 10s is too short or too long (use 1m to 366d)"),
    ("REDIS_URL", "redis+sentinel://127.0.0.1:26379,127.0.0.1:x/svc/0", "REDIS_URL: Sentinel 2's HOST[:PORT] cannot be read"),
    ("REDIS_URL", "redis+sentinel://127.0.0.1:26379/", "REDIS_URL: no service name"),
    ("REDIS_URL", "redis+sentinel://127.0.0.1:26379/svc/abc", "REDIS_URL: the database is not a number"),
    ("REDIS_URL", "redis+sentinel://127.0.0.1:26379/svc/0?sentinel_pw=x", "REDIS_URL: the only option is sentinel_password=, once"),
    ("REDIS_MIN_REPLICAS_ACK", "some", "REDIS_MIN_REPLICAS_ACK: 'some' is not a count"),
    ("SLACK_API_URL", "http://[::1", "SLACK_API_URL: 'http://[::1' is not an http(s) URL"),
    ("SLACK_API_URL", "https://slack.example.com:abc/", "SLACK_API_URL: 'https://slack.example.com:abc/' is not"),
    ("ALERTMANAGER_URL", "http://am:99999/", "ALERTMANAGER_URL: 'http://am:99999/' is not an http(s) URL"),
    ("SLACK_CHANNEL", "xoxb-1111-2222-MixedUpToken", "SLACK_CHANNEL: this is a Slack token, not a channel ID"),
])
def test_invalid_setting_stops_startup_and_check_with_one_line_naming_it(tmp_path, variable, value, message):
    """alert-threader: SETTING: what is wrong (how to fix), exit code 2: the same line from the service and check."""
    for command in ((), ("check",)):
        result = run_cli(*command, cwd=tmp_path, env={variable: value})
        assert result.returncode == 2, command
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert re.fullmatch(rf"alert-threader: {variable}: \S.* \(.+\)", lines[0]), lines[0]
        assert "Traceback" not in result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize("args", [["--port"], ["--nonsense"], ["bogus"]])
def test_a_command_line_it_cannot_read_is_refused_in_one_line(tmp_path, args):
    result = run_cli(*args, cwd=tmp_path)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("alert-threader: "), lines
    assert lines[0].endswith("(python3 alert_threader.py --help lists the flags)")


def test_a_token_given_as_the_channel_is_never_echoed(tmp_path):
    for command in ((), ("check",)):
        result = run_cli(*command, cwd=tmp_path, env={"SLACK_CHANNEL": "xoxb-1111-2222-MixedUpToken"})
        assert result.returncode == 2 and "MixedUpToken" not in (result.stdout + result.stderr).decode()


def test_flag_wins_over_environment(tmp_path):
    result = run_cli("--storm-threshold", "5", "check", cwd=tmp_path, env={"STORM_THRESHOLD": "nope"})
    assert "STORM_THRESHOLD" not in result.stderr.decode()
    args = at.build_parser().parse_args(["--environment", "staging"])
    config = at.load_config(args, {"ENVIRONMENT": "production", "STORM_THRESHOLD": "7"})
    assert config.environment == "staging" and config.storm_threshold == 7


def test_token_without_channel_is_refused(tmp_path):
    result = run_cli(cwd=tmp_path, env={"SLACK_BOT_TOKEN": SLACK_TOKEN})
    assert result.returncode == 2
    assert "SLACK_CHANNEL: not set, and SLACK_BOT_TOKEN is (set it to the channel's ID" in result.stderr.decode()


def test_default_store_file_prefers_systemd_state_directory(tmp_path):
    assert at.default_store_file({"STATE_DIRECTORY": str(tmp_path)}) == str(tmp_path / "threads.json")


def test_dry_run_serves_logs_the_payload_and_says_so(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "alert_threader.py"), "--port", str(port),
                             "--host", "127.0.0.1"], cwd=str(tmp_path), stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k not in SETTING_NAMES})
    try:
        def health() -> bool:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            return False
        wait_for(health, what="the dry-run service to answer /health")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/alert", json.dumps(webhook(make_alert())), {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        assert answer["ok"] and answer["results"][0]["action"] == "posted"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    log = err.decode()
    assert proc.returncode == 0
    assert "DRY-RUN: no SLACK_BOT_TOKEN is set" in log
    line = next(l for l in log.splitlines() if "dry-run: would call chat.postMessage" in l)
    payload = json.loads(line.split("chat.postMessage ", 1)[1])
    assert payload["attachments"][0]["color"] == "#E01E5A"
    assert "DatabaseDown on db01.example.com" in visible_text(payload)
    assert (tmp_path / "threads.json").exists()


# ---------------------------------------------------------------------------
# The thread lifecycle (SPEC "Thread key and lifecycle")
# ---------------------------------------------------------------------------

def test_first_firing_alert_posts_a_parent_message(start, slack):
    svc = start()
    answer = svc.alert(webhook(make_alert())).json()
    [parent] = slack.messages
    assert parent.thread_ts is None and parent.payload["channel"] == "C0ALERTS"
    assert parent.headers["Authorization"] == f"Bearer {SLACK_TOKEN}"
    assert "DatabaseDown on db01.example.com" in parent.text
    assert answer == {"ok": True, "count": 1, "status": "firing", "group_key": '{}:{alertname="DatabaseDown"}',
                      "thread_store": "file", "results": [{
                          "key": "DatabaseDown|critical|database|prod-eu|production", "thread_ts": parent.ts,
                          "status": "firing", "alertname": "DatabaseDown", "severity": "critical",
                          "action": "posted"}]}


def test_further_alert_of_the_key_is_a_reply_in_its_thread(start, slack):
    svc = start()
    first, second = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(first))
    answer = svc.alert(webhook(first, second)).json()
    parent, reply = slack.messages
    assert reply.thread_ts == parent.ts
    assert "DatabaseDown on db02" in reply.text and "db02" in reply.text
    assert [r["action"] for r in answer["results"]] == ["unchanged", "replied"]
    assert all(r["thread_ts"] == parent.ts for r in answer["results"])


def test_alertmanager_repeats_post_nothing(start, slack):
    svc = start()
    alert = make_alert()
    for _ in range(4):  # group changes, repeat_interval and retries re-send the same alert
        svc.alert(webhook(alert))
    assert len(slack.messages) == 1


def test_resolved_alert_replies_and_closes_the_thread(start, slack):
    svc = start()
    alert = make_alert()
    svc.alert(webhook(alert))
    answer = svc.alert(webhook(resolved(alert))).json()
    parent, reply = slack.messages
    assert reply.thread_ts == parent.ts
    assert reply.payload["text"].startswith("✅ RESOLVED — DatabaseDown on db01.example.com")
    assert reply.payload["attachments"][0]["color"] == "#2EB67D"
    assert "Resolved:* 2024-01-15 14:45:30 UTC (after 15m 5s)" in reply.text
    assert answer["results"][0]["action"] == "replied"
    thread = svc.get("/cache").json()["threads"]["DatabaseDown|critical|database|prod-eu|production"]
    assert thread["status"] == "closed"


def test_thread_closes_only_when_its_last_alert_resolves(start, slack):
    svc = start(REOPEN_WINDOW="0")
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a, b))
    svc.alert(webhook(resolved(a), b))
    key = "DatabaseDown|critical|database|prod-eu|production"
    assert svc.get("/cache").json()["threads"][key]["status"] == "open"
    svc.alert(webhook(resolved(a), resolved(b)))
    assert svc.get("/cache").json()["threads"][key]["status"] == "closed"
    # The same key firing after the close starts a new thread.
    again = make_alert(instance="db01", starts="2024-01-15T18:00:00Z")
    answer = svc.alert(webhook(again)).json()
    messages = slack.messages
    assert answer["results"][0]["action"] == "posted"
    assert messages[-1].thread_ts is None and messages[-1].ts != messages[0].ts
    assert [m.thread_ts for m in messages[1:-1]] == [messages[0].ts] * 3


def test_resolved_alert_with_no_known_thread_is_posted_standalone(start, slack):
    svc = start()
    answer = svc.alert(webhook(resolved(make_alert()))).json()
    [message] = slack.messages
    assert message.thread_ts is None
    assert message.payload["text"].startswith("✅ RESOLVED — ")
    assert answer["results"][0]["action"] == "standalone"
    svc.alert(webhook(resolved(make_alert())))  # Alertmanager re-sends it: nothing new
    assert len(slack.messages) == 1


def test_the_whole_story_makes_exactly_four_messages(start, slack):
    """fire → re-sent 3× → second instance → both resolved → re-sent resolved."""
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a))
    for _ in range(3):
        svc.alert(webhook(a))
    svc.alert(webhook(a, b))
    svc.alert(webhook(resolved(a), resolved(b)))
    svc.alert(webhook(resolved(a), resolved(b)))
    parent, reply, done_a, done_b = slack.messages
    assert parent.thread_ts is None and "DatabaseDown on db01" in parent.text
    assert reply.thread_ts == parent.ts and "DatabaseDown on db02" in reply.text
    assert done_a.thread_ts == done_b.thread_ts == parent.ts
    assert done_a.payload["text"] == "✅ RESOLVED — DatabaseDown on db01"
    assert done_b.payload["text"] == "✅ RESOLVED — DatabaseDown on db02"


def test_restart_between_firing_and_resolved_keeps_the_thread(start, slack):
    svc = start()
    alert = make_alert()
    svc.alert(webhook(alert))
    stop(svc)
    svc = start()
    svc.alert(webhook(alert))
    svc.alert(webhook(resolved(alert)))
    parent, done = slack.messages
    assert done.thread_ts == parent.ts and done.payload["text"].startswith("✅ RESOLVED")


def test_threads_are_told_apart_by_the_seed_key(start, slack):
    svc = start()
    svc.alert(webhook(make_alert(severity="critical"), make_alert(severity="warning"),
                      make_alert(name="DiskFull")))
    assert [m.thread_ts for m in slack.messages] == [None, None, None]
    keys = set(svc.get("/cache").json()["threads"])
    assert keys == {"DatabaseDown|critical|database|prod-eu|production",
                    "DatabaseDown|warning|database|prod-eu|production",
                    "DiskFull|critical|database|prod-eu|production"}


def test_missing_fingerprint_is_computed_from_the_labels(start, slack):
    svc = start()
    alert = make_alert()
    del alert["fingerprint"]
    svc.alert(webhook(alert))
    svc.alert(webhook(alert))
    assert len(slack.messages) == 1


# ---------------------------------------------------------------------------
# Messages (SPEC "Messages")
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("severity, emoji, color", [
    ("critical", "🚨", "#E01E5A"), ("warning", "⚠️", "#ECB22E"), ("info", "ℹ️", "#2EB67D"),
    ("error", "❌", "#E01E5A"), ("debug", "🐛", "#36C5F0"),
])
def test_colour_and_emoji_follow_the_severity(severity, emoji, color):
    alert = at.parse_webhook(json.dumps(webhook(make_alert(severity=severity))).encode()).alerts[0]
    payload = at.render_alert(alert, "C1", MS, "firing")
    assert payload["attachments"][0]["color"] == color
    header = payload["attachments"][0]["blocks"][0]
    assert header["type"] == "header" and header["text"]["text"].startswith(emoji + " ")
    assert payload["text"].startswith(emoji + " ")


def test_message_keeps_the_seed_layout():
    alert = at.parse_webhook(json.dumps(webhook(make_alert(summary="Database Critical Failure"))).encode()).alerts[0]
    payload = at.render_alert(alert, "C1", MS, "firing",
                              external_url="http://alertmanager.example.com:9093")
    blocks = payload["attachments"][0]["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "section", "actions", "context", "context"]
    assert blocks[0]["text"] == {"type": "plain_text", "text": "🚨 Database Critical Failure", "emoji": True}
    assert [f["text"] for f in blocks[1]["fields"]] == [
        "*Severity:*\nCRITICAL", "*Environment:*\nproduction", "*Service:*\ndatabase",
        "*Cluster:*\nprod-eu", "*Instance:*\ndb01.example.com"]
    assert blocks[2]["text"]["text"] == "*Description:*\nDatabaseDown has fired on db01.example.com."
    assert [(e["text"]["text"], e["url"].split("?")[0].split("#")[0]) for e in blocks[3]["elements"]] == [
        ("View Runbook", "https://runbooks.example.com/DatabaseDown"),
        ("Silence", "http://alertmanager.example.com:9093/"),
        ("Source", "http://prometheus.example.com:9090/graph")]
    assert blocks[4]["elements"][0]["text"] == ("*Started:* <!date^1705329025^{date_short_pretty} {time_secs}|"
                                                "2024-01-15 14:30:25 UTC>"), "each reader's own time zone"
    assert blocks[5]["elements"][0]["text"] == "env=production | alertname=DatabaseDown"
    assert payload["text"] == "🚨 [CRITICAL] Database Critical Failure (production)"
    assert "link_names" not in payload and "parse" not in payload


def test_resolved_layout():
    alert = at.parse_webhook(json.dumps(webhook(resolved(make_alert(summary="Database Critical Failure"))))
                             .encode()).alerts[0]
    payload = at.render_alert(alert, "C1", MS, "resolved", thread_ts="1.2")
    blocks = payload["attachments"][0]["blocks"]
    assert blocks[0]["text"]["text"] == "✅ RESOLVED — Database Critical Failure"
    assert payload["text"] == "✅ RESOLVED — Database Critical Failure"
    assert payload["attachments"][0]["color"] == "#2EB67D" and payload["thread_ts"] == "1.2"
    assert at.slack_tokens_drawn(blocks[-2]["elements"][0]["text"]) == (
        "*Started:* 2024-01-15 14:30:25 UTC | *Resolved:* 2024-01-15 14:45:30 UTC (after 15m 5s)")
    buttons = next(b for b in blocks if b["type"] == "actions")["elements"]
    assert [b["text"]["text"] for b in buttons] == ["View Runbook", "Source"], "nothing left to silence"


# ---------------------------------------------------------------------------
# HTTP interface
# ---------------------------------------------------------------------------

def test_health_and_stats_have_the_seed_fields(start, slack):
    svc = start()
    svc.alert(webhook(make_alert()))
    health = svc.get("/health")
    assert health.status == 200
    body = health.json()
    assert {k: body[k] for k in ("status", "environment", "channel", "thread_store", "cached_threads")} == {
        "status": "healthy", "environment": "production", "channel": "C0ALERTS", "thread_store": "file",
        "cached_threads": 1}
    assert re.match(r"\d{4}-\d\d-\d\dT", body["timestamp"])
    stats = svc.get("/stats").json()
    assert stats["cached_threads"] == 1 and stats["thread_store"] == "file"
    assert stats["environment"] == "production" and re.match(r"\d{4}-", stats["uptime"])
    assert stats["alerts"]["posted"] == 1 and stats["slack"]["calls_ok"] == 1 and stats["slack"]["calls_failed"] == 0


def test_cache_lists_and_clears_threads(start, slack):
    svc = start()
    svc.alert(webhook(make_alert()))
    cache = svc.get("/cache").json()
    thread = cache["threads"]["DatabaseDown|critical|database|prod-eu|production"]
    assert cache["cached_threads"] == 1 and thread["ts"] == slack.messages[0].ts
    assert cache["outbox"]["waiting"] == 0 and cache["outbox"]["limit"] == 20000
    cleared = svc.request("DELETE", "/cache")
    assert cleared.status == 200 and cleared.json() == {"ok": True, "cleared": 1, "thread_store": "file",
                                                        "outbox_kept": 0}
    assert svc.get("/cache").json()["threads"] == {}
    assert svc.get("/health").json()["cached_threads"] == 0


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nowhere", 404), ("GET", "/alert", 405), ("PUT", "/health", 405), ("POST", "/cache", 405),
    ("PATCH", "/alert", 405),
])
def test_unknown_routes_and_methods_get_json_errors(start, slack, method, path, status):
    svc = start()
    answer = svc.request(method, path)
    assert answer.status == status
    body = answer.json()
    assert body["ok"] is False and body["error"]
    if status == 405:
        assert "Allow" in answer.headers


# ---------------------------------------------------------------------------
# File store
# ---------------------------------------------------------------------------

def on_disk(tmp_path: Path) -> Dict[str, Any]:
    """The threads a restart would find (snapshot plus journal), read without writing."""
    return at.FileStore.read(str(tmp_path / "threads.json"))


def state_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (tmp_path / "threads.json", tmp_path / "threads.json.journal")
                    if p.exists())


def test_every_answered_change_is_on_disk_and_no_temporary_files_are_left(start, slack, tmp_path):
    svc = start()
    for i in range(5):
        answer = svc.alert(webhook(make_alert(name=f"Alert{i}"))).json()
        assert on_disk(tmp_path)[answer["results"][0]["key"]]["ts"] == answer["results"][0]["thread_ts"]
    assert json.loads((tmp_path / "threads.json").read_text())["version"] == 1, "the snapshot is whole JSON"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    stop(svc)
    document = json.loads((tmp_path / "threads.json").read_text())
    assert len(document["threads"]) == 5, "a clean stop folds the journal into threads.json"
    assert (tmp_path / "threads.json.journal").read_bytes() == b""


def test_journal_is_folded_into_the_snapshot_when_it_outgrows_it(tmp_path):
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    big = {"ts": "1.1", "status": "open", "alerts": {}, "first": {"annotations": {"description": "x" * 3000}}}
    for i in range(30):
        store.put(f"key{i}", dict(big, ts=f"{i}.1"))
        journal, snapshot = (tmp_path / "threads.json.journal").stat().st_size, (tmp_path / "threads.json").stat().st_size
        assert journal <= max(snapshot, at.GroupCommit.FOLD_BYTES) + 3200, "never much larger than the state it holds"
    snapshot = json.loads((tmp_path / "threads.json").read_text())["threads"]
    assert 0 < len(snapshot) < 30, "folded as the journal outgrew the snapshot, then appended again"
    assert set(on_disk(tmp_path)) == {f"key{i}" for i in range(30)}
    store.close()


def test_incomplete_last_journal_line_from_a_crash_is_ignored(tmp_path):
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    store.put("kept", {"ts": "1.1", "status": "open", "alerts": {}})
    with open(tmp_path / "threads.json.journal", "ab") as journal:
        journal.write(b'{"put":{"torn":{"ts":"2.2","sta')  # the crash came mid-append
    log = io.StringIO()
    at.setup_logging(make_config({"LOG_LEVEL": "info"}), log)
    again = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    assert set(again.items()) == {"kept"}
    assert "ignored an incomplete last journal entry" in log.getvalue()
    assert again.files.moved_aside is None and json.loads((tmp_path / "threads.json").read_text())["threads"]["kept"]


def test_a_crash_between_a_folds_rename_and_its_journal_truncation_replays_nothing_twice(tmp_path):
    """kill -9 after a fold put its snapshot in place, before it emptied the journal: the journal's lines are
    older than the snapshot, so a restart skips them. A resolve told is not told again; its thread stays closed."""
    path = str(tmp_path / "threads.json")
    store = at.FileStore(path, at.Metrics())
    key = "Disk|critical|database|prod-eu|production"
    store.put(key, {"ts": "1.1", "channel": "C1", "status": "open", "alerts": {"fp": ["f", 1.0, None, None]}})
    [(item_id, _)] = store.enqueue([outbox_item_of("Disk", "resolved")], limit=10)
    journal_then = (tmp_path / "threads.json.journal").read_bytes()  # the thread open, its resolve waiting
    store.complete("C1", {key: {"ts": "1.1", "channel": "C1", "status": "closed", "closed": 3.0,
                                "alerts": {"fp": ["r", 1.0, 2.0, None]}}}, {item_id: ("replied", "1.1")})
    store.journal.fold()
    store.close()
    (tmp_path / "threads.json.journal").write_bytes(journal_then)  # as the crash left it
    again = at.FileStore(path, at.Metrics())
    assert again.get(key)["status"] == "closed" and again.waiting("C1") == []
    again.put("later", {"ts": "2.2", "status": "open", "alerts": {}})  # the new journal's lines are replayed
    again.close()
    assert at.FileStore(path, at.Metrics()).get("later")["ts"] == "2.2"


def test_a_journal_of_1_1_0_without_fold_names_is_replayed_over_its_snapshot(tmp_path):
    (tmp_path / "threads.json").write_text(json.dumps({"version": 1, "threads": {
        "old": {"ts": "1.1", "status": "open", "alerts": {}}}, "outbox": []}))
    (tmp_path / "threads.json.journal").write_text('{"put":{"new":{"ts":"2.2","status":"open","alerts":{}}}}\n'
                                                  '{"del":["old"]}\n')
    assert set(at.FileStore(str(tmp_path / "threads.json"), at.Metrics()).items()) == {"new"}


def test_short_and_failed_journal_writes_never_leave_a_torn_line(tmp_path, monkeypatch):
    """A nearly full disk: writes that take part of the data, then one that fails."""
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    store.put("before", {"ts": "1.1", "status": "open", "alerts": {}})
    real_write, mode = os.write, {"short": True, "fail": False}

    def disk_nearly_full(fd: int, data: Any) -> int:
        if fd == store.files._journal_fd and mode["fail"]:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        if fd == store.files._journal_fd and mode["short"]:
            return real_write(fd, bytes(data[:7]))  # the kernel may take only part of a write
        return real_write(fd, data)

    monkeypatch.setattr(at.os, "write", disk_nearly_full)
    store.put("short", {"ts": "2.2", "status": "open", "alerts": {}, "note": "x" * 100})
    assert store.write_error is None
    assert set(at.FileStore.read(str(tmp_path / "threads.json"))) == {"before", "short"}
    mode["fail"] = True
    with pytest.raises(at.StoreError, match="No space left"):
        store.put("failed", {"ts": "3.3", "status": "open", "alerts": {}})
    assert "No space left" in store.write_error
    mode["fail"] = False
    store.put("after", {"ts": "4.4", "status": "open", "alerts": {}})  # folds: the torn bytes are gone
    assert store.write_error is None
    monkeypatch.undo()
    again = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    assert set(again.items()) == {"before", "short", "failed", "after"} and again.files.moved_aside is None
    store.close()


def test_a_disk_with_room_for_lines_but_not_for_a_snapshot_takes_writes_again(tmp_path, monkeypatch):
    """A small disk filled, then partly freed: too little room to write the whole snapshot again, enough for the
    journal's lines. The store writes again at once (the journal takes the lines), and folds once it can."""
    log = io.StringIO()
    at.setup_logging(make_config({"LOG_LEVEL": "info"}), log)
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    big = {"ts": "1.1", "status": "open", "alerts": {}, "first": {"annotations": {"description": "x" * 3000}}}
    count = 0
    while store.files.journal_bytes <= max(store.files.snapshot_bytes, at.GroupCommit.FOLD_BYTES):
        store.put(f"key{count}", dict(big, ts=f"{count}.1"))  # until a fold is due at the next write
        count += 1
    real_write = os.write

    def no_room(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_room_for_the_journal(fd: int, data: Any) -> int:
        if fd == store.files._journal_fd:
            return no_room()
        return real_write(fd, data)

    monkeypatch.setattr(at.os, "write", no_room_for_the_journal)  # full
    monkeypatch.setattr(at.tempfile, "mkstemp", no_room)
    with pytest.raises(at.StoreError):
        store.put("refused", {"ts": "8.1", "status": "open", "alerts": {}})
    monkeypatch.setattr(at.os, "write", real_write)  # room for lines again, not for a whole snapshot
    store.put("taken", {"ts": "9.1", "status": "open", "alerts": {}})
    store.put("taken too", {"ts": "9.2", "status": "open", "alerts": {}})
    assert store.write_error is None and store.health()["ok"]
    assert log.getvalue().count("cannot fold the journal into a new snapshot") == 1, "tried again FOLD_RETRY later"
    assert "needs_free_kb=" in log.getvalue()
    assert set(on_disk(tmp_path)) == {f"key{i}" for i in range(count)} | {"refused", "taken", "taken too"}
    monkeypatch.undo()
    store.journal._fold_after = 0.0  # FOLD_RETRY has passed
    store.put("folded", {"ts": "10.1", "status": "open", "alerts": {}})
    assert len(json.loads((tmp_path / "threads.json").read_text())["threads"]) == count + 4, "folded once it could"
    store.close()


def small_disk(monkeypatch: Any, directory: Path, capacity: List[int]) -> None:
    """The store's directory as a disk of capacity[0] bytes, for the free space the store asks statvfs for (the
    writes themselves are not limited: what is tested is that the store stops before the disk would be full)."""
    real = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        disk = real(path)
        used = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        free = max(0, capacity[0] - used) // 4096
        return os.statvfs_result((4096, 4096, capacity[0] // 4096, free, free) + tuple(disk)[5:])

    monkeypatch.setattr(at.os, "statvfs", statvfs)


def test_the_journal_never_takes_the_room_its_fold_needs_and_webhooks_stop_before_the_senders_records(
        tmp_path, monkeypatch):
    capacity = [600_000]
    small_disk(monkeypatch, tmp_path, capacity)
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    taken = []
    with pytest.raises(at.StoreError, match="the disk is nearly full: .* free at least"):
        for n in range(100_000):
            [(item_id, _)] = store.enqueue([outbox_item_of(f"Filling{n}")], limit=1_000_000)
            taken.append(item_id)
    assert len(taken) > 100 and store.health()["ok"] is False  # refused: /health says why
    with pytest.raises(at.StoreError):
        store.enqueue([outbox_item_of(f"Refused{n}") for n in range(3)], limit=1_000_000)
    assert len(store.waiting("C1")) == len(taken), "a refused webhook leaves nothing behind"
    assert store.health()["file_status"] == "nearly full" and "free at least" in store.health()["store_error"]
    used = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert used + store.files.snapshot_bytes + store.files.journal_bytes <= capacity[0], "a fold still fits"
    store.ready()  # the sender may still post: what Slack takes can be recorded in the reserve
    for item_id in taken[:50]:
        store.complete("C1", {}, {item_id: ("posted", "1.1")})
    store.journal.fold()  # and the fold the journal kept room for is made
    assert len(store.waiting("C1")) == len(taken) - 50
    capacity[0] *= 2  # space returns
    store.enqueue([outbox_item_of("AfterSpaceReturned")], limit=1_000_000)
    store.close()
    again = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    assert len(again.waiting("C1")) == len(taken) - 50 + 1


def test_nothing_is_posted_while_the_disk_has_no_room_to_record_it(start, slack, tmp_path, monkeypatch):
    svc = start()
    capacity = [10_000_000]
    small_disk(monkeypatch, tmp_path, capacity)
    filler = tmp_path / "filler"  # someone else's file fills the disk but for 40 KB
    filler.write_bytes(b"\0" * (capacity[0] - sum(f.stat().st_size for f in tmp_path.iterdir()) - 40_000))
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert "the disk is nearly full" in answer.json()["error"] and "free at least" in answer.json()["error"]
    health = svc.get("/health")
    assert health.status == 503 and health.json()["file_status"] == "nearly full"
    assert "the disk is nearly full: webhooks are answered 503" in health.json()["problems"]
    assert "ERROR the disk is nearly full: webhooks are answered 503" in svc.log.getvalue()
    with pytest.raises(at.StoreError, match="the disk is full"):
        svc.service.store.ready()  # what the sender asks before each post
    assert not slack.calls
    filler.unlink()
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "posted"
    assert len(slack.messages) == 1 and svc.get("/health").json()["file_status"] == "ok"
    assert "room on the disk again: webhooks are taken" in svc.log.getvalue()


def test_a_disk_too_small_for_the_store_says_so(tmp_path, monkeypatch):
    small_disk(monkeypatch, tmp_path, [65536])
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    with pytest.raises(at.StoreError, match="the file system holds 64 KB in all: give THREAD_STORE_FILE one of"):
        store.enqueue([outbox_item_of("TooSmall")], limit=10)
    store.close()


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_failed_state_write_answers_503_until_the_disk_recovers(start, slack, tmp_path, monkeypatch, error):
    svc = start()
    real_write = os.write

    def broken(*args: Any) -> None:
        raise OSError(error, os.strerror(error))

    def broken_write(fd: int, data: Any) -> int:
        if fd == svc.service.store.files._journal_fd:
            raise OSError(error, os.strerror(error))
        return real_write(fd, data)

    monkeypatch.setattr(at.os, "write", broken_write)
    monkeypatch.setattr(at.os, "fsync", broken)
    monkeypatch.setattr(at.os, "fdatasync", broken)
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert "thread store: cannot write" in answer.json()["error"] and os.strerror(error) in answer.json()["error"]
    health = svc.get("/health")
    assert health.status == 503 and health.json()["status"] == "degraded"
    assert os.strerror(error) in health.json()["store_error"]
    svc.service.delivery.senders.wake("C0ALERTS")
    wait_for(lambda: "nothing is posted until it can" in svc.log.getvalue(), what="the sender to find it cannot")
    again = svc.alert(webhook(make_alert()), expect=503)  # Alertmanager's retry
    assert again.json()["results"] == [] and slack.messages == [], "nothing is posted that could not be recorded"
    monkeypatch.undo()  # the disk recovers
    assert svc.get("/health").status == 200
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] in ("posted", "unchanged")
    wait_for(lambda: len(slack.messages) == 1, what="the alert, once it can be recorded")
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "unchanged"
    assert len(slack.messages) == 1, "posted once, whatever the disk did"
    assert list(at.FileStore.read(str(tmp_path / "threads.json"))) == [
        "DatabaseDown|critical|database|prod-eu|production"]
    assert svc.log.getvalue().count("cannot write thread store") == 1


def test_a_damaged_journal_line_is_set_aside_and_reported_and_the_rest_is_read(tmp_path):
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    store.put("first", {"ts": "1.1", "status": "open", "alerts": {}})
    with open(tmp_path / "threads.json.journal", "ab") as journal:
        journal.write(b"garbage that is not a change\n" + b'{"put":{"later":{"ts":"3.3"}}}\n')
    again = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    assert set(again.items()) == {"first", "later"}
    [aside] = (tmp_path / "threads.json.damaged").read_text().splitlines()
    assert json.loads(aside)["entry"] == "garbage that is not a change" and "line 3" in json.loads(aside)["reason"]
    assert again.health()["damaged_entries"] == {"count": 1, "set_aside_in": str(tmp_path / "threads.json.damaged")}
    assert again.files.moved_aside is None


@pytest.mark.parametrize("bad", [{"ts": 123}, {"ts": None}, {"ts": "1.1", "alerts": 5},
                                 {"ts": "1.1", "status": "exploded"}, {"ts": "1.1", "alerts": {"fp": "f"}}])
def test_a_malformed_thread_in_the_snapshot_is_set_aside_alone_and_the_rest_is_read(tmp_path, bad):
    """One record no planning can rely on (a Slack answer's ts that was no text, a hand edit) costs that thread,
    not every thread and the whole outbox."""
    waiting = at.outbox_item(parsed(make_alert()), "C0ALERTS", "k", "k", "", {}, 1.0)
    waiting.id = "1000-1"
    (tmp_path / "threads.json").write_text(json.dumps({"version": 1, "threads": {
        "good": {"ts": "1.1", "status": "open", "alerts": {}}, "bad": bad},
        "outbox": [dict(at.item_document(waiting), id=waiting.id)]}))
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    assert set(store.items()) == {"good"} and [i.id for i in store.waiting("C0ALERTS")] == ["1000-1"]
    [aside] = (tmp_path / "threads.json.damaged").read_text().splitlines()
    assert json.loads(aside)["entry"] == {"key": "bad", "thread": bad} and store.files.moved_aside is None
    assert store.health()["damaged_entries"]["count"] == 1


def test_corrupt_state_file_is_moved_aside_and_reported(start, slack, tmp_path):
    (tmp_path / "threads.json").write_text('{"version": 1, "threads": {"half')
    svc = start()
    health = svc.get("/health").json()
    moved = health["moved_aside"]
    assert Path(moved).read_text() == '{"version": 1, "threads": {"half'
    assert "thread store file was unusable" in svc.log.getvalue()
    svc.alert(webhook(make_alert()))
    assert len(on_disk(tmp_path)) == 1


def test_leftover_temporary_files_are_removed_at_start(start, slack, tmp_path):
    leftover = tmp_path / ".threads.json.tmp-abc123"
    leftover.write_text("{partial")
    start()
    assert not leftover.exists()


def listing(root: Path) -> Dict[str, bytes]:
    """Every file under root (or root itself) with its content, and every directory, as a comparable dict."""
    if root.is_file():
        return {str(root): root.read_bytes()}
    return {str(p): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def a_working_directory(d: Path) -> Path:
    (d / "work").mkdir()
    (d / "work" / "notes.txt").write_text("mine\n")
    return d / "work"


def a_text_file(d: Path) -> Path:
    (d / "todo.txt").write_text("buy milk\n")
    return d / "todo.txt"


def another_json_file(d: Path) -> Path:
    (d / "config.json").write_text('{"name": "app", "port": 8080}')
    return d / "config.json"


def a_symbolic_link(d: Path) -> Path:
    (d / "real.json").write_text("{}")
    os.symlink(d / "real.json", d / "link.json")
    return d / "link.json"


@pytest.mark.parametrize("make, why", [
    (a_working_directory, "is a directory: name a file, e.g."),
    (a_text_file, "is not a thread-state file this service wrote (it is not JSON)"),
    (another_json_file, "is not a thread-state file this service wrote (its JSON is neither"),
    (a_symbolic_link, "is a symbolic link"),
])
def test_a_thread_store_file_the_service_did_not_write_stops_the_start_and_is_left_untouched(tmp_path, make, why):
    target = make(tmp_path)
    before = listing(tmp_path)
    result = run_cli(cwd=tmp_path, env={"THREAD_STORE_FILE": str(target), "PORT": "0"})
    assert result.returncode == 2
    [error] = result.stderr.decode().splitlines()
    assert error.startswith(f"alert-threader: THREAD_STORE_FILE: {target} ") and why in error, error
    assert "nothing was changed" in error
    assert listing(tmp_path) == before, "a file or directory was added, changed or moved"


def test_an_empty_thread_store_file_is_an_empty_store(start, slack, tmp_path):
    (tmp_path / "threads.json").write_text("")  # touch threads.json before the first start
    svc = start()
    svc.alert(webhook(make_alert()))
    assert len(on_disk(tmp_path)) == 1 and "moved_aside" not in svc.get("/health").json()


def test_seed_format_state_file_is_read(start, slack, tmp_path):
    key = "DatabaseDown|critical|database|prod-eu|production"
    (tmp_path / "threads.json").write_text(json.dumps({key: "1699999999.000100"}))
    svc = start()
    svc.alert(webhook(make_alert()))
    [reply] = slack.messages
    assert reply.thread_ts == "1699999999.000100"


# ---------------------------------------------------------------------------
# Delivery: nothing lost, nothing doubled
# ---------------------------------------------------------------------------

def test_transient_slack_failures_are_retried_within_the_webhook(start, slack):
    svc = start()
    slack.fail("chat.postMessage", {"status": 503}, {"drop": True}, {"error": "internal_error"})
    answer = svc.alert(webhook(make_alert()))
    assert answer.json()["results"][0]["action"] == "posted"
    assert len(slack.messages) == 1
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 4


@pytest.mark.parametrize("error", ["fatal_error", "rate_limited", "message_limit_exceeded", "team_added_to_org"])
def test_slack_errors_that_pass_are_waited_out_never_dropped(start, slack, error):
    """Slack's own list of chat.postMessage errors: these pass (fatal_error "may" have been done, so it is the
    one window of a lost answer); they are tried again until Slack takes the alert, which is never dropped."""
    svc = start(DELIVERY_WAIT="0.2s")
    slack.fail("chat.postMessage", *[{"error": error}] * 3)
    svc.alert(webhook(make_alert()))
    settled(svc)
    assert len(slack.messages) == 1 and named(slack, "DatabaseDown") == 1
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 4
    assert svc.get("/stats").json()["dropped"] == 0


@pytest.mark.parametrize("lost", [{"partial": True}, {"sleep": 1.0}], ids=["half-an-answer", "answer-too-late"])
def test_a_post_whose_answer_was_lost_is_sent_once_more_and_then_never_again(start, slack, lost):
    """Slack has read the whole request, so it may have posted it, and it takes no idempotency key: the sender
    posts it once more, the one window the README names, and records that one."""
    svc = start(SLACK_TIMEOUT="0.3s")
    slack.fail("chat.postMessage", lost)
    posts = lambda: [c for c in slack.calls if c.method == "chat.postMessage"]  # noqa: E731
    answer = svc.alert(webhook(make_alert()))
    assert answer.json()["results"][0]["action"] == "posted" and len(posts()) == 2
    error = svc.get("/health").json()["last_slack_error"]["error"]
    assert error.startswith(("invalid_response", "timeout", "network")), error
    svc.alert(webhook(make_alert()))  # Alertmanager's repeats
    svc.alert(webhook(make_alert()))
    settled(svc)
    assert len(posts()) == 2, "one post more for the lost answer, then none"


def test_slack_answers_in_chunks_or_closing_the_connection_are_read(start, slack):
    svc = start()
    slack.fail("chat.postMessage", {"chunked": True}, {"close_header": True}, {"close": True}, {"chunked": True})
    for name in ("One", "Two", "Three", "Four", "Five"):
        assert svc.alert(webhook(make_alert(name=name))).json()["results"][0]["action"] == "posted"
    assert len(slack.messages) == 5
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 5, "no retries were needed"
    threads = svc.get("/cache").json()["threads"]
    assert sorted(t["ts"] for t in threads.values()) == sorted(m.ts for m in slack.messages)
    # Slack closes a kept-alive connection after answering: the next call goes out again on a new one.
    slack.fail("chat.postMessage", {"close": True}, {})
    answer = svc.alert(webhook(make_alert(name="Six"), make_alert(name="Seven"))).json()
    assert [r["action"] for r in answer["results"]] == ["posted", "posted"]
    assert len(slack.messages) == 7 and len([c for c in slack.calls if c.method == "chat.postMessage"]) == 7


def make_tls_slack(tmp_path: Path, monkeypatch: Any) -> FakeSlack:
    """A fake Slack over HTTPS with a throw-away certificate for 127.0.0.1, trusted through SSL_CERT_FILE."""
    import ssl
    cert, key = tmp_path / "slack-cert.pem", tmp_path / "slack-key.pem"
    subprocess.run([require_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the service's default context trusts only this
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return FakeSlack(tls=context)


@pytest.fixture
def tls_slack(tmp_path, monkeypatch):
    fake = make_tls_slack(tmp_path, monkeypatch)
    yield fake
    fake.close()


@pytest.fixture(params=["http", "https"])
def any_slack(request, tmp_path, monkeypatch):
    """The fake Slack over plain HTTP, then over TLS as the real one speaks."""
    fake = FakeSlack() if request.param == "http" else make_tls_slack(tmp_path, monkeypatch)
    yield fake
    fake.close()


def test_slack_over_https_posts_replies_and_keeps_its_connection(start, tls_slack):
    assert tls_slack.url.startswith("https://127.0.0.1:")
    svc = start(SLACK_API_URL=tls_slack.url, SLACK_TIMEOUT="2s")
    first = svc.alert(webhook(make_alert())).json()["results"][0]
    svc.alert(webhook(make_alert(instance="db02.example.com")))
    tls_slack.fail("chat.postMessage", {"close": True}, {"chunked": True})
    svc.alert(webhook(make_alert(name="Two")))
    svc.alert(webhook(make_alert(name="Three")))
    posted = tls_slack.messages
    assert len(posted) == 4 and posted[1].payload["thread_ts"] == first["thread_ts"]
    assert posted[1].headers["Authorization"] == f"Bearer {SLACK_TOKEN}"
    assert len([c for c in tls_slack.calls if c.method == "chat.postMessage"]) == 4, "no retries were needed"
    # A slow answer over TLS is a timeout, not a hang: the alert waits in the outbox and goes again.
    tls_slack.fail("chat.postMessage", {"sleep": 3.0})
    answer = svc.alert(webhook(make_alert(name="Slow")))
    assert answer.json()["results"][0]["action"] == "posted"
    assert svc.get("/health").json()["last_slack_error"]["error"] == "timeout after 2s"


def test_slack_down_webhooks_are_answered_at_once_and_their_alerts_delivered_once_it_returns(start, slack):
    svc = start(DELIVERY_WAIT="0.5s")
    slack.fail_always("chat.postMessage", {"status": 500})
    started = time.monotonic()
    answer = svc.alert(webhook(make_alert()))
    assert time.monotonic() - started < 2.0, "answered after DELIVERY_WAIT, not after Slack"
    assert answer.json()["ok"] is True and answer.json()["results"][0]["action"] == "queued"
    assert answer.json()["results"][0]["thread_ts"] is None
    health = svc.get("/health")
    assert health.status == 503 and health.json()["outbox"]["waiting"] == 1
    assert "http_500" in health.json()["last_slack_error"]["error"] and health.json()["slack_status"] == "failing"
    assert any("Slack has refused or failed every post" in p for p in health.json()["problems"])
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "queued"  # the repeat joins it
    assert slack.messages == []
    slack.fail_always("chat.postMessage", None)
    wait_for(lambda: len(slack.messages) == 1, timeout=20, what="the alert once Slack is back")
    wait_for(lambda: svc.get("/health").status == 200, what="/health to be healthy again")
    assert svc.get("/health").json()["slack_status"] == "ok", "last_slack_error stays, as history"
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "unchanged"
    assert len(slack.messages) == 1


def test_a_message_slack_refuses_for_good_is_dropped_named_in_the_log_and_the_channel_goes_on(start, slack):
    svc = start(DELIVERY_WAIT="5s")
    slack.fail("chat.postMessage", {"error": "some_new_refusal"}, {"error": "some_new_refusal"})
    answer = svc.alert(webhook(make_alert(name="NeverTaken")))
    assert answer.json()["results"][0]["action"] == "refused" and answer.json()["results"][0]["thread_ts"] is None
    refused = [c for c in slack.calls if c.method == "chat.postMessage"]
    assert len(refused) == 2 and "attachments" not in refused[1].payload, "laid out, then as plain text"
    assert svc.alert(webhook(make_alert(name="Taken"))).json()["results"][0]["action"] == "posted"
    health = svc.get("/health")
    assert health.status == 503 and "Slack refused 1 alerts for good (some_new_refusal); the log names them" in \
        health.json()["problems"]
    log = svc.log.getvalue()
    assert "its alerts are dropped" in log and "names=NeverTaken" in log and "error=some_new_refusal" in log
    metrics = svc.get("/metrics").text.splitlines()
    assert "alert_threader_alerts_dropped_total 1" in metrics and "alert_threader_alerts_delivered_total 1" in metrics
    assert 'alert_threader_slack_requests_total{method="chat.postMessage",result="other"} 2' in metrics, \
        "Slack's unknown words are not a label of their own"
    assert svc.get("/stats").json()["dropped"] == 1


def test_alerts_arriving_while_slack_fails_do_not_restart_the_backoff(start, slack):
    svc = start(DELIVERY_WAIT="0.2s", SLACK_PACE="1s")  # paced, arrivals are gathered before a plan
    slack.fail_always("chat.postMessage", {"status": 503})
    svc.alert(webhook(make_alert()))
    wait_for(lambda: len(slack.calls) >= 3, what="three failed posts (0.25 s, then 0.5 s apart)")
    for i in range(5):  # an outage's webhooks keep coming
        svc.alert(webhook(make_alert(name=f"Meanwhile{i}")))
    wait_for(lambda: len(slack.calls) >= 6, timeout=30, what="three more failed posts")
    gaps = [later.at - earlier.at for earlier, later in zip(slack.calls, slack.calls[1:])]
    assert all(gap >= 0.8 * wait for gap, wait in zip(gaps, [0.25, 0.5, 1.0, 2.0, 4.0])), gaps
    assert "Slack did not answer" not in svc.log.getvalue()
    slack.fail_always("chat.postMessage", None)


def test_a_slack_slower_than_slack_timeout_is_named_as_such(start, slack):
    svc = start(DELIVERY_WAIT="0.2s", SLACK_TIMEOUT="0.3s")
    slack.fail("chat.postMessage", {"sleep": 1.0})
    svc.alert(webhook(make_alert()))
    wait_for(lambda: len(slack.messages) >= 1, what="the post once Slack answers in time")
    health = svc.get("/health").json()
    assert "Slack did not answer within SLACK_TIMEOUT: it may be slow" in health["last_slack_error"]["fix"]


def test_a_message_dropped_while_the_disk_is_full_is_dropped_once(start, slack, monkeypatch):
    """Slack refuses a message for good while the store cannot record that: once it can, the drop is recorded,
    and the alerts are not offered to Slack, and dropped, a second time."""
    svc = start(DELIVERY_WAIT="0.2s", SLACK_TIMEOUT="5s")  # the refusal held back 1 s is an answer, not a timeout
    slack.fail("chat.postMessage", {"error": "some_new_refusal"}, {"error": "some_new_refusal", "sleep": 1.0})
    svc.alert(webhook(make_alert(name="NeverTaken")))
    wait_for(lambda: len(slack.calls) == 2, what="the plain-text try")

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(at.os, "fdatasync", full)
    monkeypatch.setattr(at.os, "fsync", full)
    wait_for(lambda: "cannot write thread store" in svc.log.getvalue(), what="the drop's record to fail")
    monkeypatch.undo()
    svc.alert(webhook(make_alert(name="Taken")))
    settled(svc)
    assert [named(slack, "NeverTaken"), named(slack, "Taken")] == [0, 1]
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 3
    assert svc.get("/stats").json()["dropped"] == 1


@pytest.mark.parametrize("answer", [{"ok": True}, {"ok": True, "ts": 123}, {"ok": True, "ts": None},
                                    {"ok": True, "ts": "not a ts"}])
def test_a_post_slack_answers_without_a_valid_ts_stands_alone_and_the_state_stays_readable(start, slack, tmp_path,
                                                                                             answer):
    """A broken proxy's answer: the message is in Slack, but there is no thread to carry on in."""
    svc = start()
    slack.fail("chat.postMessage", {"answer": answer})
    first = svc.alert(webhook(make_alert())).json()["results"][0]
    assert first["action"] == "posted" and first["thread_ts"] is None and len(slack.messages) == 1
    assert "its answer has no valid ts" in svc.log.getvalue()
    second = svc.alert(webhook(make_alert(instance="db02"))).json()["results"][0]
    assert second["action"] == "posted" and second["thread_ts"] == slack.messages[1].ts, "a thread of its own"
    stop(svc)
    again = start()
    assert again.get("/health").json().get("moved_aside") is None and again.get("/health").status == 200
    assert again.alert(webhook(make_alert(instance="db02"))).json()["results"][0]["action"] == "unchanged"


def test_slack_api_url_answering_404_is_a_configuration_problem_and_what_waits_goes_once_it_is_fixed(start,
                                                                                                      slack):
    svc = start(DELIVERY_WAIT="0.3s")
    slack.fail_always("chat.postMessage", {"status": 404})
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "queued"
    health = svc.get("/health").json()
    assert health["last_slack_error"]["error"] == "http_404" and "SLACK_API_URL" in health["last_slack_error"]["fix"]
    assert "Slack refuses the configuration (last_slack_error has the fix)" in health["problems"]
    slack.fail_always("chat.postMessage", None)
    wait_for(lambda: len(slack.messages) == 1, timeout=20, what="the alert, once the URL answers")
    assert slack.messages[0].payload["text"].startswith("🚨 [CRITICAL] ")


def test_rate_limit_waits_for_retry_after_and_delivers(start, slack):
    svc = start()
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 1})
    started = time.monotonic()
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "posted"
    assert time.monotonic() - started >= 1.0
    assert len(slack.messages) == 1
    metrics = svc.get("/metrics").text
    waited = float(re.search(r"^alert_threader_slack_rate_limit_wait_seconds_total (\S+)$", metrics, re.M).group(1))
    assert 0.9 <= waited <= 1.1
    assert 'alert_threader_slack_refused_total{method="chat.postMessage"} 1' in metrics
    assert 'alert_threader_slack_requests_total{method="chat.postMessage",result="ratelimited"} 1' in metrics


def test_a_long_retry_after_holds_the_channel_back_while_webhooks_are_answered_queued(start, slack):
    svc = start(DELIVERY_WAIT="0.5s")
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 3})
    started = time.monotonic()
    first = svc.alert(webhook(make_alert())).json()["results"][0]
    other = svc.alert(webhook(make_alert(name="Other"))).json()["results"][0]
    assert first["action"] == other["action"] == "queued" and time.monotonic() - started < 2.0
    wait_for(lambda: len(slack.messages) == 2, timeout=10, what="both alerts once the Retry-After has passed")
    assert time.monotonic() - started >= 3.0
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 3, "nothing sent into the pause"


def test_alerts_slack_took_are_never_posted_again_when_the_rest_of_the_webhook_fails(start, slack):
    svc = start(DELIVERY_WAIT="0.5s")
    alerts = [make_alert(name=f"Alert{i}") for i in range(4)]
    slack.fail("chat.postMessage", {}, {}, *[{"status": 503}] * 4)
    first = svc.alert(webhook(*alerts)).json()
    assert [r["action"] for r in first["results"]] == ["posted", "posted", "queued", "queued"]
    second = svc.alert(webhook(*alerts)).json()  # Alertmanager's repeat, while two still wait
    assert [r["action"] for r in second["results"]][:2] == ["unchanged", "unchanged"]
    wait_for(lambda: len(slack.messages) == 4, timeout=20, what="the two that waited")
    svc.alert(webhook(*alerts))
    settled(svc)
    names = sorted(m.payload["text"].split("] ")[1].split(" on ")[0] for m in slack.messages)
    assert names == ["Alert0", "Alert1", "Alert2", "Alert3"]


@pytest.mark.parametrize("error, fix", [
    ("invalid_auth", "Bot User OAuth Token"), ("not_authed", "set SLACK_BOT_TOKEN"),
    ("account_inactive", "reinstall the app"), ("token_revoked", "reinstall the Slack app"),
    ("missing_scope", "chat:write"), ("channel_not_found", "channel ID"),
    ("not_in_channel", "/invite @your-app"), ("is_archived", "unarchive"),
    ("team_access_not_granted", "installation"), ("restricted_action_read_only_channel", "read-only"),
])
def test_permanent_configuration_errors_keep_the_alert_and_say_how_to_fix(start, slack, error, fix):
    svc = start(DELIVERY_WAIT="0.3s")
    slack.fail_always("chat.postMessage", {"error": error})
    answer = svc.alert(webhook(make_alert()))
    assert answer.json()["results"][0]["action"] == "queued"
    health = svc.get("/health")
    assert health.status == 503 and health.json()["status"] == "degraded"
    assert health.json()["last_slack_error"]["error"] == error and fix in health.json()["last_slack_error"]["fix"]
    log_line = next(line for line in svc.log.getvalue().splitlines() if "Slack call failed" in line)
    assert f"error={error}" in log_line and fix in log_line
    arrivals = itertools.count()

    def attempts() -> Optional[List[float]]:  # meanwhile new alerts keep arriving: they must not cut a wait short
        svc.alert(webhook(make_alert(name=f"Arriving{next(arrivals)}")))
        tries = [c.at for c in slack.calls if c.method == "chat.postMessage"]
        return tries[:3] if len(tries) >= 3 else None
    tried = wait_for(attempts, what="three attempts")
    first_wait, second_wait = tried[1] - tried[0], tried[2] - tried[1]
    assert first_wait >= 0.2 and second_wait >= 1.5 * first_wait, "tried again ever more slowly, not hammered"
    arrived = next(arrivals)
    slack.fail_always("chat.postMessage", None)  # the operator fixes it: the alerts go, once
    wait_for(lambda: all(named(slack, f"Arriving{i}") for i in range(arrived)) and named(slack, "DatabaseDown"),
             timeout=30, what="the alerts once Slack takes them")
    assert all(named(slack, f"Arriving{i}") == 1 for i in range(arrived))
    wait_for(lambda: svc.get("/health").status == 200, what="/health to be healthy again")


@pytest.mark.parametrize("error", ["invalid_blocks", "invalid_attachments", "too_many_attachments",
                                   "msg_blocks_too_long", "an_error_slack_adds_some_day"])
def test_rejected_layout_is_resent_once_as_plain_text(start, slack, error):
    svc = start()
    slack.fail("chat.postMessage", {"error": error})
    answer = svc.alert(webhook(make_alert(summary="Disk <full> & more")))
    assert answer.json()["results"][0]["action"] == "posted"
    [message] = slack.messages
    assert "attachments" not in message.payload and "blocks" not in message.payload
    text = at.slack_tokens_drawn(message.payload["text"])
    assert "Disk &lt;full&gt; &amp; more" in text and "CRITICAL" in text and "db01.example.com" in text
    assert "Started: 2024-01-15 14:30:25 UTC" in text and "https://runbooks.example.com/DatabaseDown" in text
    assert "alert_threader_slack_fallbacks_total 1" in svc.get("/metrics").text
    assert f"error={error}" in svc.log.getvalue()


@pytest.mark.parametrize("error", ["thread_not_found", "restricted_action_thread_locked"])
def test_reply_whose_parent_is_gone_starts_the_thread_again(start, slack, error):
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a))
    slack.fail("chat.postMessage", {"error": error})
    svc.alert(webhook(a, b))
    old_parent, new_parent, reply = slack.messages
    assert new_parent.thread_ts is None and reply.thread_ts == new_parent.ts != old_parent.ts
    key = "DatabaseDown|critical|database|prod-eu|production"
    assert svc.get("/cache").json()["threads"][key]["ts"] == new_parent.ts
    svc.alert(webhook(resolved(a), b))
    assert slack.messages[-1].thread_ts == new_parent.ts


def test_a_thread_started_again_stays_there_when_the_reply_into_it_fails_once(start, slack):
    """The parent was deleted: the reply starts the thread again, then meets a 503. Sent again, it goes into the
    new thread, and the thread is kept there: no third parent, nothing into the deleted one."""
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a))
    slack.fail("chat.postMessage", {"error": "thread_not_found"}, {}, {"status": 503})
    svc.alert(webhook(a, b))
    settled(svc)
    old_parent, new_parent, reply = slack.messages
    assert new_parent.thread_ts is None and reply.thread_ts == new_parent.ts != old_parent.ts
    key = "DatabaseDown|critical|database|prod-eu|production"
    assert svc.get("/cache").json()["threads"][key]["ts"] == new_parent.ts
    svc.alert(webhook(resolved(a), b))
    settled(svc)
    assert slack.messages[-1].thread_ts == new_parent.ts and len(slack.messages) == 4


def test_changed_channel_starts_a_new_thread_there(start, slack, tmp_path):
    svc = start()
    svc.alert(webhook(make_alert()))
    stop(svc)
    svc = start(SLACK_CHANNEL="C0NEWCHAN")
    svc.alert(webhook(make_alert(instance="db02")))
    first, second = slack.messages
    assert second.payload["channel"] == "C0NEWCHAN" and second.thread_ts is None


def test_concurrent_webhooks_with_the_same_new_alert_make_one_parent(start, slack):
    svc = start()
    barrier = threading.Barrier(6)
    answers = []

    def send() -> None:
        barrier.wait()
        answers.append(svc.alert(webhook(make_alert()), expect=None))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [a.status for a in answers] == [200] * 6
    assert len(slack.messages) == 1
    assert sorted(a.json()["results"][0]["action"] for a in answers) == ["posted"] + ["unchanged"] * 5


def start_process(tmp_path: Path, slack: FakeSlack, *extra: str, env: Optional[Dict[str, str]] = None
                  ) -> "tuple[subprocess.Popen, int]":
    """The real program in its own process, as systemd would run it."""
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    proc_env.update({"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url,
                     "THREAD_STORE_FILE": str(tmp_path / "threads.json"), "HOST": "127.0.0.1",
                     "PORT": str(port), "SLACK_PACE": "0"})
    proc_env.update(env or {})
    log = open(tmp_path / "service.log", "ab")
    proc = subprocess.Popen([sys.executable, str(REPO / "alert_threader.py"), *extra], env=proc_env,
                            stdout=log, stderr=log, cwd=str(tmp_path))

    def ready() -> bool:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            return conn.getresponse().status in (200, 503)
        assert proc.poll() is None, (tmp_path / "service.log").read_text()
        return False

    wait_for(ready, what="the service to start")
    return proc, port


def get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def post_to(port: int, body: Dict[str, Any], timeout: float = 30) -> "tuple[int, Dict[str, Any]]":
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/alert", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_sigterm_finishes_the_webhook_in_flight_and_exits_0(tmp_path, slack):
    proc, port = start_process(tmp_path, slack)
    slack.fail("chat.postMessage", {"sleep": 1.5})
    outcome: Dict[str, Any] = {}
    sender = threading.Thread(target=lambda: outcome.update(answer=post_to(port, webhook(make_alert()))))
    sender.start()
    wait_for(lambda: slack.calls, what="the webhook to reach Slack")
    proc.send_signal(signal.SIGTERM)
    sender.join(20)
    assert proc.wait(20) == 0
    status, body = outcome["answer"]
    assert status == 200 and body["results"][0]["action"] == "posted"
    stored = json.loads((tmp_path / "threads.json").read_text())["threads"]
    assert list(stored) == ["DatabaseDown|critical|database|prod-eu|production"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    log = (tmp_path / "service.log").read_text()
    assert "stopping: finishing webhooks in flight" in log and "stopped" in log


def test_a_card_edit_due_when_the_service_was_killed_is_made_after_the_restart(tmp_path, slack):
    """Which cards wait for an edit lives in memory: after a kill -9 the cards of lately changed threads are
    drawn again, so a thread that closed meanwhile does not show 🔥 for ever."""
    proc, port = start_process(tmp_path, slack)
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    assert post_to(port, webhook(a))[0] == 200
    slack.fail_always("chat.update", {"error": "internal_error"})
    slack.fail_always("reactions.add", {"error": "internal_error"})
    for hook in (webhook(a, b), webhook(resolved(a), resolved(b))):
        assert post_to(port, hook)[0] == 200
    wait_for(lambda: any("RESOLVED" in c.payload.get("text", "") for c in slack.calls if c.method == "chat.update"),
             what="the closing card's edit, refused")
    proc.kill()
    proc.wait(10)
    slack.fail_always("chat.update", None)
    slack.fail_always("reactions.add", None)
    parent = slack.messages[0]
    proc, port = start_process(tmp_path, slack)
    try:
        edit = wait_for(lambda: [u for u in slack.accepted("chat.update") if u.payload["ts"] == parent.ts],
                        what="the card drawn again after the restart")[-1]
        assert edit.payload["text"].startswith("✅ RESOLVED") and "2 alerts resolved" in edit.text
        wait_for(lambda: [r for r in slack.accepted("reactions.add") if r.payload["timestamp"] == parent.ts],
                 what="the ✅ on the closed thread")
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigkill_at_any_moment_loses_nothing_that_was_answered(tmp_path, slack):
    """Every alert answered 200 before a kill -9 is on disk, in its thread or in the outbox, and told after the
    restart; Slack shows one twice at most for each kill (a post the kill cut from its record)."""
    rng = random.Random(7)
    answered: Dict[str, Optional[str]] = {}  # alertname -> the ts its answer named (None: queued)
    env = {"SLACK_PACE": "0.05s", "DELIVERY_WAIT": "0.05s", "STORM_THRESHOLD": "100000"}  # the outbox fills up
    kills, sent = 4, 0
    for round_number in range(kills):
        proc, port = start_process(tmp_path, slack, env=env)
        stop_sending = threading.Event()

        def keep_sending() -> None:
            nonlocal sent
            while not stop_sending.is_set():
                with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                    status, body = post_to(port, webhook(*[make_alert(name=f"Crash{sent}-{i}") for i in range(3)]),
                                           timeout=5)
                    if status == 200:
                        answered.update({r["alertname"]: r["thread_ts"] if r["action"] != "queued" else None
                                         for r in body["results"]})
                sent += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(rng.uniform(0.2, 0.6))  # kill at an arbitrary moment, not a chosen one
        proc.kill()
        proc.wait(10)
        stop_sending.set()
        sender.join(10)
        document = json.loads((tmp_path / "threads.json").read_text())
        assert isinstance(document["threads"], dict) and isinstance(document["outbox"], list)
        found = at.FileStore(str(tmp_path / "threads.json"), at.Metrics(), read_only=True)  # as a restart finds it
        threads = found.items()
        waiting = {item.alert.alertname for item in found.waiting("C0ALERTS")}
        missing = [name for name in answered
                   if f"{name}|critical|database|prod-eu|production" not in threads and name not in waiting]
        assert not missing, f"answered 200, then lost in round {round_number}: {missing[:3]}"
        assert all(threads[f"{name}|critical|database|prod-eu|production"]["ts"] == ts
                   for name, ts in answered.items() if ts is not None)
    assert len(answered) >= 12 and None in answered.values(), "the kills came while nothing waited: no proof"
    proc, port = start_process(tmp_path, slack, env=env)
    try:
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
        wait_for(lambda: all(named(slack, name) for name in answered), timeout=60,
                 what="every answered alert to be told after the restart")
        doubled = [name for name in answered if named(slack, name) > 1]
        assert len(doubled) <= kills, f"told twice: {doubled}"
        assert get_json(port, "/health")["cached_threads"] >= len(answered)
    finally:
        proc.terminate()
        proc.wait(20)


# ---------------------------------------------------------------------------
# Hostile input: validation before any side effect
# ---------------------------------------------------------------------------

def with_change(change: Callable[[Dict[str, Any]], None]) -> bytes:
    body = webhook(make_alert(), make_alert(instance="db02"), make_alert(instance="db03"))
    change(body)
    return json.dumps(body).encode()


BAD_BODIES = [
    (b"[1, 2]", "body must be a JSON object"),
    (b'{"alerts": "many"}', "alerts must be a list"),
    (b'{"status": "firing"}', "alerts must be a list"),
    (with_change(lambda b: b["alerts"].__setitem__(1, "alert")), "alerts[1] must be an object"),
    (with_change(lambda b: b["alerts"][2]["labels"].__setitem__("severity", 5)),
     "alerts[2].labels.severity must be a string"),
    (with_change(lambda b: b["alerts"][0].__setitem__("labels", ["a"])), "alerts[0].labels must be an object"),
    (with_change(lambda b: b["alerts"][0].pop("labels")), "alerts[0].labels must be an object"),
    (with_change(lambda b: b["alerts"][1]["annotations"].__setitem__("summary", None)),
     "alerts[1].annotations.summary must be a string"),
    (with_change(lambda b: b["alerts"][0].__setitem__("status", "burning")),
     "alerts[0].status must be 'firing' or 'resolved'"),
    (with_change(lambda b: b.__setitem__("status", 1)), "status must be 'firing' or 'resolved'"),
    (with_change(lambda b: b["alerts"][1].__setitem__("startsAt", "yesterday")),
     "alerts[1].startsAt must be an RFC 3339 time"),
    (with_change(lambda b: b["alerts"][1].__setitem__("endsAt", 1705329025)),
     "alerts[1].endsAt must be an RFC 3339 time"),
    (with_change(lambda b: b["alerts"][0].__setitem__("startsAt", "2024-13-45T99:00:00Z")),
     "alerts[0].startsAt must be an RFC 3339 time"),
    (with_change(lambda b: b["alerts"][0].__setitem__("startsAt", "2024-01-01T00:00:00+99:99")),
     "alerts[0].startsAt must be an RFC 3339 time"),
    (with_change(lambda b: b["alerts"][0].__setitem__("startsAt", "\u0662\u0660\u0662\u0664-01-15T14:30:25Z")),
     "alerts[0].startsAt must be an RFC 3339 time"),
    (with_change(lambda b: b["alerts"][0].__setitem__("generatorURL", {"u": 1})),
     "alerts[0].generatorURL must be a string"),
    (with_change(lambda b: b.__setitem__("groupKey", [])), "groupKey must be a string"),
    (b'{"alerts": [', "body is not valid JSON"),
    (b'{"alerts": [], "x": NaN}', "body is not valid JSON"),
    (b'\xff\xfe{"alerts": []}', "body is not UTF-8"),
    (b'\xef\xbb\xbf{"alerts": []}', "starts with a byte order mark"),
    (b'{"alerts": [], "deep": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),
    (b'{"alerts": [], "deeper": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested deeper than 32"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": "\\ud800"}}]}', "alerts[0].labels.a is not valid Unicode"),
    (b'{"version": "1", "orgId": 1, "alerts": [{"status": "firing", "labels": {"alertname": "Big"}, "values": {"B": '
     + b"9" * 400 + b"}}]}", "alerts[0].values must be an object of numbers"),
    (b'{"version": "1", "orgId": 1, "alerts": [{"status": "firing", "labels": {"alertname": "Inf"}, "values": {"B": '
     b"1e999}}]}", "alerts[0].values must be an object of numbers"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_bad_webhook_gets_400_naming_the_field_and_changes_nothing(start, slack, tmp_path, body, message):
    svc = start()
    svc.alert(webhook(make_alert(name="Existing")))
    before = state_bytes(tmp_path)
    calls = len(slack.calls)
    answer = svc.request("POST", "/alert", raw=body)
    assert answer.status == 400
    assert answer.json()["ok"] is False and message in answer.json()["error"]
    assert len(slack.calls) == calls and state_bytes(tmp_path) == before


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_is_400(start, slack, content_type):
    svc = start()
    answer = svc.request("POST", "/alert", raw=json.dumps(webhook(make_alert())).encode(),
                         headers={"Content-Type": content_type})
    assert answer.status == 400 and "Content-Type must be application/json" in answer.json()["error"]
    assert slack.calls == []


def test_alertmanager_time_formats_and_unknown_fields_are_accepted():
    alert = make_alert(starts="2024-01-15T14:30:25.123456789+02:00")
    alert["endsAt"] = "0001-01-01T00:00:00Z"
    alert["someFutureField"] = {"nested": [1, 2, 3]}
    body = webhook(alert)
    body["anotherNewField"] = True
    [parsed] = at.parse_webhook(json.dumps(body).encode()).alerts
    assert parsed.starts_at == pytest.approx(1705321825.123456789)
    assert parsed.ends_at is None


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return all the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received


def test_body_over_the_limit_is_413_without_reading_it(start, slack):
    svc = start(MAX_BODY_BYTES="4096")
    started = time.monotonic()
    answer = raw_exchange(svc.port, b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 50000000\r\n\r\n" + b"{" * 1000)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"MAX_BODY_BYTES" in answer
    assert time.monotonic() - started < 3 and slack.calls == []


@pytest.mark.parametrize("headers, status, message", [
    (b"", b"411", b"Content-Length is required"),
    (b"Transfer-Encoding: chunked\r\n", b"411", b"chunked bodies are not accepted"),
    (b"Content-Length: lots\r\n", b"400", b"Content-Length must be a non-negative integer"),
    (b"Content-Length: -5\r\n", b"400", b"Content-Length must be a non-negative integer"),
])
def test_missing_or_bad_content_length_is_answered_cleanly(start, slack, headers, status, message):
    svc = start()
    answer = raw_exchange(svc.port, b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + headers + b"\r\n{}")
    assert answer.startswith(b"HTTP/1.1 " + status) and message in answer
    assert slack.calls == [] and "Traceback" not in svc.log.getvalue()


def test_body_shorter_than_its_content_length_is_400(start, slack):
    svc = start(CLIENT_TIMEOUT="5s")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as sock:
        sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"alerts\": [")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"body ended before" in answer


def test_silent_clients_are_dropped_after_the_client_timeout(start, slack):
    svc = start(CLIENT_TIMEOUT="0.5s")
    for partial in (b"", b"POST /alert HTTP/1.1\r\nHost: x\r\n",
                    b"POST /alert HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"):
        started = time.monotonic()
        raw_exchange(svc.port, partial, timeout=10)  # returns when the server closes the connection
        assert time.monotonic() - started < 5
    assert svc.get("/health").status == 200 and slack.calls == []


def test_a_request_read_as_its_connection_timed_out_is_not_served(start, slack, monkeypatch):
    """An idle kept-alive connection's deadline passes just as a request arrives on it: the server has shut the
    connection, so it can answer nothing; it must not store the webhook (and count a 200) either."""
    svc = start(CLIENT_TIMEOUT="0.5s")
    read_head = at.read_head

    def read_then_stall(rfile: Any) -> Any:
        head = read_head(rfile)
        time.sleep(1.0)  # the scheduler ran other threads meanwhile: the deadline passed with the head in hand
        return head
    monkeypatch.setattr(at, "read_head", read_then_stall)
    body = json.dumps(webhook(make_alert())).encode()
    answer = raw_exchange(svc.port, b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
    monkeypatch.undo()
    assert answer == b"", "the connection was shut: no answer can reach the client"
    assert svc.get("/health").status == 200  # a request served after it proves the first one's handler is done
    wait_for(lambda: svc.service.server._slots._value == svc.service.config.max_connections,
             what="every connection's handler to end")
    assert svc.service.store.outbox_summary() == {} and slack.calls == []
    assert webhooks_answered(svc) == 0


def test_connections_past_the_limit_get_503(start, slack):
    svc = start(MAX_CONNECTIONS="2", CLIENT_TIMEOUT="10s")
    # Two requests in the middle of their bodies: busy, not idle, so neither makes way.
    busy = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(2)]
    try:
        for sock in busy:
            sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
        wait_for(lambda: svc.service.server._slots._value == 0, what="both slots to be taken")
        time.sleep(at.ThreaderServer.HEAD_GRACE + 0.2)  # past the grace: still they are not idle
        answer = raw_exchange(svc.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"MAX_CONNECTIONS" in answer
        # A refused client that reads its 503 and stays: closing it would free no slot, so it is never taken
        # for an idle connection, and the next newcomers are refused at once (no wait for a slot per one).
        stays = socket.create_connection(("127.0.0.1", svc.port))
        busy.append(stays)
        stays.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stays.recv(65536).startswith(b"HTTP/1.1 503 ")
        started = time.monotonic()
        for _ in range(4):
            assert raw_exchange(svc.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503 ")
        assert time.monotonic() - started < 0.8, "each refused at once, not after a second's wait for a slot"
    finally:
        for sock in busy:
            sock.close()
    wait_for(lambda: svc.get("/health").status == 200, what="the slots to free up")


def test_clients_holding_every_slot_with_half_a_request_line_cannot_lock_alertmanager_out(start, slack):
    svc = start(MAX_CONNECTIONS="4", CLIENT_TIMEOUT="30s", WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    holders = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(6)]
    try:
        for sock in holders:
            sock.sendall(b"POST /al")
        wait_for(lambda: svc.service.server._slots._value == 0, what="every slot to be held")
        time.sleep(at.ThreaderServer.HEAD_GRACE + 0.2)
        for i in range(3):  # Alertmanager's webhooks, one after the other, each on a new connection
            answer = svc.request("POST", "/alert", webhook(make_alert(instance=f"db{i}")),
                                 headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
            assert answer.status == 200, answer.body
        assert len(slack.messages) == 3
        evicted = re.search(r"^alert_threader_connections_evicted_total (\S+)$", svc.get("/metrics").text, re.M)
        assert evicted and float(evicted.group(1)) >= 1, "a holder made way (a webhook's slot is free again after it)"
    finally:
        for sock in holders:
            sock.close()


def test_refused_requests_lingering_in_every_slot_cannot_lock_alertmanager_out(start, slack):
    """Each holder is answered 401 and keeps dripping its body, so that its close lingers (up to 10 s)."""
    svc = start(MAX_CONNECTIONS="4", CLIENT_TIMEOUT="30s", WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    holders = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(4)]
    try:
        for sock in holders:
            sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
        for sock in holders:
            sock.settimeout(5)
            assert sock.recv(65536).split(b"\r\n")[0].endswith(b" 401 Unauthorized")
        wait_for(lambda: svc.service.server._slots._value == 0, what="every slot to be held by a lingering close")
        for sock in holders:
            sock.sendall(b"x" * 1000)  # still sending: the linger goes on
        for i in range(3):
            answer = svc.request("POST", "/alert", webhook(make_alert(instance=f"db{i}")),
                                 headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
            assert answer.status == 200, answer.body
            for sock in holders:
                with contextlib.suppress(OSError):
                    sock.sendall(b"x" * 1000)
        assert len(slack.messages) == 3
    finally:
        for sock in holders:
            sock.close()


# ---------------------------------------------------------------------------
# Fuzzing: thousands of mutated webhooks, seeded
# ---------------------------------------------------------------------------

ODD_STRINGS = ["", " ", "\x00", "\x1b[31mred", "\u202egnp.exe", "a\u0301" * 50, "🚨" * 300, "<!channel>",
               "<!here|here>", "<@U024BE7LH>", "<!subteam^S0123>", "&amp;&lt;", "x" * 70000, "\ud7ff\ue000",
               "line\nbreak\r\n", "*bold* _it_ ~s~ `c`", "\\", '"', "null", "0001-01-01T00:00:00Z"]
ODD_VALUES: List[Any] = [None, True, 0, -1, 1.5e308, [], {}, [[[]]], {"a": {"b": {}}}, "x"]


def odd_value(rng: random.Random) -> Any:
    return json.loads(json.dumps(rng.choice(ODD_VALUES)))  # a fresh copy: mutations must not share objects


def mutate(rng: random.Random, document: Any, depth: int = 0) -> Any:
    """One random change somewhere in the document: remove, swap a type, odd strings, nesting."""
    if isinstance(document, dict) and document and rng.random() < 0.7:
        key = rng.choice(list(document))
        roll = rng.random()
        if roll < 0.2:
            document.pop(key)
        elif roll < 0.35:
            document[key] = odd_value(rng) if rng.random() < 0.5 else rng.choice(ODD_STRINGS)
        elif roll < 0.45:
            document[rng.choice(ODD_STRINGS)[:40]] = rng.choice(ODD_STRINGS)
        else:
            document[key] = mutate(rng, document[key], depth + 1)
        return document
    if isinstance(document, list) and document and rng.random() < 0.7:
        i = rng.randrange(len(document))
        roll = rng.random()
        if roll < 0.2:
            document.pop(i)
        elif roll < 0.3:
            document.append(odd_value(rng))
        else:
            document[i] = mutate(rng, document[i], depth + 1)
        return document
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(ODD_STRINGS)
    if roll < 0.6:
        return odd_value(rng)
    if roll < 0.7:
        nested: Any = "deep"
        for _ in range(rng.choice([5, 31, 40, 200])):
            nested = [nested]
        return nested
    if isinstance(document, str):
        return document + rng.choice(ODD_STRINGS)
    return document


def test_fuzzed_webhooks_never_5xx_never_traceback_never_change_state_when_rejected(start, slack, tmp_path):
    svc = start(STORM_THRESHOLD="1000", LOG_LEVEL="info")
    rng = random.Random(20261127)
    base = webhook(*[make_alert(instance=f"db{i}", name=f"Fuzz{i}") for i in range(3)])
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    statuses: collections.Counter = collections.Counter()
    for i in range(2500):
        document = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 4)):
            document = mutate(rng, document)
        body = json.dumps(document).encode()
        if i % 10 == 0:
            body = body[: rng.randrange(len(body))]  # truncated
        settled(svc)  # what an earlier webhook caused is done (its card edits follow its answer)
        before_state = state_bytes(tmp_path)
        before_calls = len(slack.calls)
        conn.request("POST", "/alert", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        statuses[response.status] += 1
        assert response.status in (200, 400, 413), (response.status, answer)
        if response.status != 200:
            assert answer["ok"] is False and answer["error"]
            assert len(slack.calls) == before_calls
            assert state_bytes(tmp_path) == before_state
        if response.getheader("Connection") == "close":
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    log = svc.log.getvalue()
    assert "Traceback" not in log and "internal error" not in log
    assert statuses[400] > 1000 and statuses[200] > 100, statuses
    assert svc.get("/health").status == 200
    for call in slack.calls:
        assert_within_slack_limits(call.payload)


# ---------------------------------------------------------------------------
# Slack-safe rendering
# ---------------------------------------------------------------------------

SERVICE_DATE = re.compile(r"<!date\^-?[0-9]+\^\{date_short_pretty\} \{time_secs\}\|[0-9 :-]+ [A-Z+0-9-]+>")


def assert_mrkdwn_safe(text: str, where: str) -> None:
    """No raw < or > (mentions, links) but the service's own date tokens; every & starts one of the entities."""
    text = SERVICE_DATE.sub("", text)
    assert "<" not in text and ">" not in text, f"{where}: unescaped angle bracket in {text[:200]!r}"
    assert not re.search("&(?!amp;|lt;|gt;)", text), f"{where}: bare & in {text[:200]!r}"


def assert_within_slack_limits(payload: Dict[str, Any]) -> None:
    """Slack's documented limits for chat.postMessage / chat.update payloads, and our escaping."""
    assert "link_names" not in payload and payload.get("parse") != "full"
    text = payload.get("text", "")
    assert 0 < len(text) <= 4000
    assert_mrkdwn_safe(text, "text")
    attachments = payload.get("attachments", [])
    assert len(attachments) <= 100
    blocks_total = 0
    for attachment in attachments:
        assert re.fullmatch(r"#[0-9A-F]{6}", attachment["color"])
        blocks = attachment["blocks"]
        blocks_total += len(blocks)
        for block in blocks:
            kind = block["type"]
            assert len(block.get("block_id", "")) <= 255
            if kind == "header":
                assert block["text"]["type"] == "plain_text" and 0 < len(block["text"]["text"]) <= 150
            elif kind == "section":
                assert "text" in block or "fields" in block
                if "text" in block:
                    assert 0 < len(block["text"]["text"]) <= 3000
                    assert_mrkdwn_safe(block["text"]["text"], "section")
                fields = block.get("fields", [])
                assert len(fields) <= 10
                for field in fields:
                    assert 0 < len(field["text"]) <= 2000
                    assert_mrkdwn_safe(field["text"], "field")
            elif kind == "context":
                assert 0 < len(block["elements"]) <= 10
                for element in block["elements"]:
                    assert 0 < len(element["text"]) <= 3000
                    assert_mrkdwn_safe(element["text"], "context")
            elif kind == "actions":
                assert 0 < len(block["elements"]) <= 25
                for element in block["elements"]:
                    assert len(element["action_id"]) <= 255
                    if element["type"] == "static_select":
                        assert 0 < len(element["options"]) <= 100 and len(element["placeholder"]["text"]) <= 150
                        assert all(len(o["text"]["text"]) <= 75 and len(o["value"]) <= 150 for o in element["options"])
                        continue
                    assert element["type"] == "button" and 0 < len(element["text"]["text"]) <= 75
                    if "url" in element:
                        assert len(element["url"]) <= 3000 and at.is_http_url(element["url"])
                    else:
                        assert 0 < len(element["value"]) <= 2000
            elif kind == "image":
                assert at.is_http_url(block["image_url"]) and 0 < len(block["alt_text"]) <= 2000
            else:
                pytest.fail(f"unexpected block type {kind}")
    assert blocks_total <= 50


def hostile_alert(rng: random.Random, status: str = "firing") -> Dict[str, Any]:
    def value() -> str:
        pieces = [rng.choice(ODD_STRINGS) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2:
            pieces.append("y" * rng.choice([149, 150, 151, 1999, 2000, 2001, 2999, 3000, 3001, 5000]))
        if rng.random() < 0.2:
            pieces.append("&" * rng.randint(1, 3000))
        return "".join(pieces)

    labels = {name: value() for name in ("alertname", "severity", "service", "cluster", "instance")}
    labels.update({value()[:50] or "k": value() for _ in range(rng.randint(0, 30))})
    annotations = {"summary": value(), "description": value(),
                   "runbook_url": rng.choice(["https://ok.example.com/rb", "javascript:alert(1)",
                                              "https://evil.example.com/a|b", "https://x.example.com/<script>",
                                              "http://" + "a" * 3000 + ".com", value()])}
    return {"status": status, "labels": labels, "annotations": annotations, "startsAt": "2024-01-15T14:30:25Z",
            "endsAt": "2024-01-15T15:30:25Z" if status == "resolved" else at.ZERO_TIME,
            "generatorURL": rng.choice(["http://prom:9090/graph?g0.expr=up", "ftp://nope", value()])}


def test_every_message_kind_stays_within_slack_limits_for_hostile_alerts():
    rng = random.Random(5)
    for _ in range(300):
        alert = at.parse_webhook(json.dumps({"alerts": [hostile_alert(rng)]}).encode()).alerts[0]
        done = at.parse_webhook(json.dumps({"alerts": [hostile_alert(rng, "resolved")]}).encode()).alerts[0]
        external = rng.choice(["http://am.example.com:9093", "https://am.example.com/" + "p" * 2990])
        for kind in ("firing", "refire"):
            assert_within_slack_limits(at.render_alert(alert, "C1", PROD, kind, "1.2", external))
        assert_within_slack_limits(at.render_alert(done, "C1", PROD, "resolved", "1.2", external))
        record = {"ts": "1.2", "status": rng.choice(["open", "closed"]), "reopened": rng.randint(0, 3),
                  "ended": 1705332625.0, "first": at.first_alert(alert, external),
                  "alerts": {"a": ["f", 1.0, None], "b": ["r", 1.0, 2.0]}}
        assert_within_slack_limits(at.render_card(record, "C1", PROD))
        assert_within_slack_limits(at.render_batch([alert, done] * 10, "C1", PROD, "1.2", resolved=False))
        assert_within_slack_limits(at.render_batch([done] * 20, "C1", PROD, None, resolved=True, note=" · orphans"))
    storm = {"ts": "1.2", "status": "open", "firing": 3000, "resolved": 10, "started": 1705329025.0,
             "by_name": {"<!channel>" + str(i) * 500: i for i in range(200)},
             "by_severity": {"<@U1>" * 100 + str(i): i for i in range(20)},
             "members": {str(i): ["f", "<!here>" * 20 + str(i), "<@U1>" * 8] for i in range(3000)}}
    assert_within_slack_limits(at.render_digest(storm, "C1", at.MessageSettings(environment="<!here>")))


def test_no_alert_value_can_mention_or_disguise_a_link(start, slack):
    svc = start()
    alert = make_alert(name="<!channel> Evil", instance="<@U024BE7LH>", summary="<!here> <https://evil.com|Google>",
                       cluster="<!subteam^S0123|@oncall>", service="<!everyone>")
    alert["annotations"]["description"] = "Click <https://evil.example.com|https://good.example.com> & go"
    svc.alert(webhook(alert))
    [parent] = slack.messages
    assert_within_slack_limits(parent.payload)
    text = parent.text
    assert "&lt;!channel&gt; Evil" in text and "&lt;@U024BE7LH&gt;" in text
    assert "&lt;https://evil.example.com|https://good.example.com&gt; &amp; go" in text


@pytest.mark.parametrize("url, shown", [
    ("https://runbooks.example.com/db", True), ("http://wiki/db?x=1&y=2", True),
    ("javascript:alert(1)", False), ("https://evil.example.com/a|b", False), ("https://x/<b>", False),
    ("data:text/html,hi", False), ("https://" + "a" * 3000, False), ("not a url", False), ("//no-scheme", False),
])
def test_links_are_used_only_when_they_are_safe_http_urls(url, shown):
    alert = make_alert()
    alert["annotations"]["runbook_url"] = url
    parsed = at.parse_webhook(json.dumps(webhook(alert)).encode()).alerts[0]
    blocks = at.render_alert(parsed, "C1", PROD, "firing")["attachments"][0]["blocks"]
    buttons = [e for b in blocks if b["type"] == "actions" for e in b["elements"] if e["action_id"] == "runbook"]
    assert bool(buttons) == shown
    if shown:
        assert buttons[0]["url"] == url


# ---------------------------------------------------------------------------
# Webhook authentication and secrets
# ---------------------------------------------------------------------------

def test_webhook_token_guards_alert_cache_and_preview(start, slack):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    for method, path in (("POST", "/alert"), ("GET", "/cache"), ("DELETE", "/cache"), ("GET", "/preview")):
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                        {"Authorization": WEBHOOK_TOKEN}, {"Authorization": f"Basic {WEBHOOK_TOKEN}"}):
            answer = svc.request(method, path, webhook(make_alert()) if method == "POST" else None, headers)
            assert answer.status == 401, (method, path, headers)
            assert answer.json() == {"ok": False, "error": "missing or wrong bearer token (WEBHOOK_TOKEN)"}
            assert "WWW-Authenticate" in answer.headers
    assert slack.calls == []
    svc.alert(webhook(make_alert()), token=WEBHOOK_TOKEN)
    assert len(slack.messages) == 1
    assert svc.get("/cache", headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}).status == 200
    basic = base64.b64encode(f"anyone:{WEBHOOK_TOKEN}".encode()).decode()
    assert svc.get("/preview", headers={"Authorization": f"Basic {basic}"}).status == 200
    assert svc.get("/health").status == 200 and svc.get("/metrics").status == 200


def test_secrets_never_reach_logs_errors_endpoints_or_help(tmp_path, slack, start):
    (tmp_path / "slack-token").write_text(SLACK_TOKEN + "\n")
    (tmp_path / "webhook-token").write_text(WEBHOOK_TOKEN + "\n")
    svc = start(SLACK_BOT_TOKEN=None, SLACK_BOT_TOKEN_FILE=str(tmp_path / "slack-token"),
                WEBHOOK_TOKEN_FILE=str(tmp_path / "webhook-token"), LOG_FORMAT="json")
    auth = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    svc.alert(webhook(make_alert()), token=WEBHOOK_TOKEN)
    assert slack.messages[0].headers["Authorization"] == f"Bearer {SLACK_TOKEN}", "the file's token is used"
    slack.fail_always("chat.postMessage", {"error": "invalid_auth"})
    svc.alert(webhook(make_alert(name="Second")), token=WEBHOOK_TOKEN)
    wait_for(lambda: "invalid_auth" in svc.log.getvalue(), what="the failure in the log")
    svc.request("POST", "/alert", raw=b"{bad", headers=auth)
    seen = [svc.log.getvalue()]
    for path in ("/", "/health", "/stats", "/cache", "/metrics", "/preview"):
        seen.append(svc.get(path, headers=auth).text)
    seen.append(repr(svc.service.config))
    seen.append(run_cli("--help", cwd=tmp_path).stdout.decode())
    for bad in ({"SLACK_BOT_TOKEN": "not-a-token-" + SLACK_TOKEN}, {"WEBHOOK_TOKEN": "short " + WEBHOOK_TOKEN}):
        seen.append(run_cli(cwd=tmp_path, env=bad).stderr.decode())
    everything = "\n".join(seen)
    assert "invalid_auth" in everything  # the failure itself is visible...
    for secret in (SLACK_TOKEN, WEBHOOK_TOKEN, "SecretSlackToken", "Secret-Webhook"):
        assert secret not in everything  # ...the secrets are not
    for setting in ("SLACK_API_URL", "ALERTMANAGER_URL"):  # nor a URL's password, in a refusal of the URL
        for url in ("ftp://user:UrlPassword@example.com/", "user:UrlPassword@example.com"):
            refused = run_cli(cwd=tmp_path, env={setting: url})
            assert refused.returncode == 2 and f"alert-threader: {setting}: " in refused.stderr.decode()
            assert "UrlPassword" not in refused.stderr.decode()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_an_exception_quotes_is_redacted_in_its_logged_traceback(log_format):
    log = io.StringIO()
    settings = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "LOG_FORMAT": log_format}
    at.setup_logging(make_config(settings), log)
    try:
        raise ValueError(f"a library quoting its input: {SLACK_TOKEN}")
    except ValueError:
        at.log.exception("something failed")
    assert "ValueError: a library quoting its input" in log.getvalue() and "Traceback" in log.getvalue()
    assert SLACK_TOKEN not in log.getvalue()


@pytest.mark.parametrize("flag, value", [("--slack-bot-token", SLACK_TOKEN), ("--webhook-token", WEBHOOK_TOKEN)])
def test_secrets_are_refused_as_flag_values_which_ps_shows(tmp_path, flag, value):
    result = run_cli(flag, value, "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.decode()
    assert f"{flag}: a secret on the command line is visible to every user in ps; use {flag}-file FILE" in message
    assert value not in message + result.stdout.decode()


@pytest.mark.parametrize("url, password", [
    ("redis://:pw-one-SECRET@127.0.0.1:{port}/0", "pw-one-SECRET"),
    ("redis://alice:pw-two-SECRET@127.0.0.1:{port}/0", "pw-two-SECRET"),
    ("redis://127.0.0.1:{port}/0?password=pw-three-SECRET", "pw-three-SECRET"),
    ("redis://127.0.0.1:{port}/0?db=0&password=pw%2Dfour%2DSECRET", "pw-four-SECRET"),
])
def test_redis_password_is_redacted_in_every_form_the_url_carries_it(start, slack, tmp_path, url, password):
    url = url.format(port=free_port())  # nothing listens: the start-up line, the outage and check all name it
    svc = start(THREAD_STORE="redis", REDIS_URL=url)
    log_text = svc.log.getvalue()
    assert "listening on" in log_text and "redis unreachable" in log_text.split("listening on", 1)[1], \
        "an unreachable Redis is said at start"
    seen = [log_text, svc.get("/health").text, svc.get("/stats").text]
    result = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": url})
    seen += [result.stdout.decode(), result.stderr.decode()]
    assert result.returncode == 1
    assert result.stdout.decode().splitlines()[1].startswith("store: FAILED: cannot use Redis at redis://")
    assert "alerts are still posted" not in result.stdout.decode() + result.stderr.decode(), \
        "check reads as a check, not as the service's outage message"
    everything = "\n".join(seen)
    assert "***" in everything
    assert password not in everything and "SECRET" not in everything


def test_without_a_webhook_token_stored_alerts_answer_only_this_machine(start, slack):
    svc = start()
    svc.alert(webhook(make_alert()))
    assert "no WEBHOOK_TOKEN: POST /alert takes webhooks from anyone" in svc.log.getvalue()
    assert "/cache and /preview answer only loopback (127.0.0.1, ::1)" in svc.log.getvalue()
    assert svc.get("/cache").json()["cached_threads"] == 1  # the seed's curl smoke tests on localhost
    app = svc.service.app
    for method, path in (("GET", "/cache"), ("DELETE", "/cache"), ("GET", "/preview")):
        for client in ("192.0.2.10", "2001:db8::1", "::ffff:192.0.2.10"):
            request = at.Request.parse(method, path, http.client.HTTPMessage(), 0, client)
            status, body, _ = app.route(request, lambda: b"")
            assert status == 403 and "WEBHOOK_TOKEN" in body["error"], (method, path, client)
        for client in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.8.9.10"):
            assert app.refusal(at.Request.parse(method, path, http.client.HTTPMessage(), 0, client)) is None
    health = at.Request.parse("GET", "/health", http.client.HTTPMessage(), 0, "192.0.2.10")
    assert app.route(health, lambda: b"")[0] == 200
    assert svc.get("/cache").json()["cached_threads"] == 1, "nothing was cleared"


# ---------------------------------------------------------------------------
# install.sh and the systemd unit (every install.sh run is staged with --root)
# ---------------------------------------------------------------------------

INSTALL_SH = REPO / "install.sh"
UNIT = REPO / "alert-threader.service"

INSTALL_SLACK_TOKEN = "xoxb-1111-2222-InstallTestSecret"
INSTALL_WEBHOOK_TOKEN = "wh-token-0123456789abcdef"
VERIFY_NOISE = re.compile(r"No such file|not executable|Cannot add dependency")


def run_install(root: Path, *args: str, input: Optional[str] = None, timeout: float = 60,
                path_env: Optional[str] = None) -> subprocess.CompletedProcess:
    env = {"PATH": path_env or os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", str(INSTALL_SH), "--root", str(root), *args],
                          input=input, capture_output=True, text=True, timeout=timeout, env=env)


def read_env(path: Path) -> dict:
    """KEY=value lines as systemd's EnvironmentFile= reads the plain ones install.sh writes."""
    return read_env_text(path.read_text())


def read_env_text(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def token_files(tmp_path):
    slack = tmp_path / "slack.token"
    slack.write_text(INSTALL_SLACK_TOKEN + "\n")
    webhook = tmp_path / "webhook.token"
    webhook.write_text(INSTALL_WEBHOOK_TOKEN + "\n")
    return slack, webhook


@pytest.fixture
def installed(tmp_path, token_files):
    """A staged file-store install with every setting given as a flag."""
    root = tmp_path / "root"
    slack, webhook = token_files
    result = run_install(root, "--yes", "--token-file", str(slack), "--channel", "C0123456789",
                         "--environment", "staging", "--port", "9100",
                         "--webhook-token-file", str(webhook))
    assert result.returncode == 0, result.stderr
    return root, result


def test_install_writes_layout_modes_and_settings(installed):
    root, result = installed
    code = root / "opt/alert-threader/alert_threader.py"
    env_file = root / "etc/alert-threader/alert-threader.env"
    unit = root / "etc/systemd/system/alert-threader.service"
    assert code.read_bytes() == (REPO / "alert_threader.py").read_bytes()
    assert unit.read_bytes() == UNIT.read_bytes()
    assert file_mode(code) == 0o644
    [bytecode] = (code.parent / "__pycache__").glob("alert_threader.*.pyc")
    assert file_mode(bytecode) == 0o644, "the unit runs python3 -m alert_threader from this bytecode"
    assert file_mode(unit) == 0o644
    assert file_mode(env_file) == 0o600
    assert file_mode(env_file.parent) == 0o700
    if os.geteuid() == 0:
        assert (env_file.stat().st_uid, env_file.stat().st_gid) == (0, 0)
    assert read_env(env_file) == {
        "SLACK_BOT_TOKEN": INSTALL_SLACK_TOKEN, "SLACK_CHANNEL": "C0123456789", "ENVIRONMENT": "staging",
        "THREAD_STORE": "file", "WEBHOOK_TOKEN": INSTALL_WEBHOOK_TOKEN, "PORT": "9100",
    }
    assert not list(env_file.parent.glob(".*")), "a temporary file was left behind"
    # Staged: systemctl and curl are only shown, never run.
    assert "would run: systemctl restart alert-threader" in result.stdout
    assert "would check GET http://127.0.0.1:9100/health" in result.stdout


def test_install_host_sets_the_listen_address_and_an_upgrade_keeps_it(tmp_path, token_files):
    root = tmp_path / "root"
    slack, _ = token_files
    first = run_install(root, "--yes", "--token-file", str(slack), "--channel", "C0123456789", "--host", "127.0.0.1")
    assert first.returncode == 0, first.stderr
    env_file = root / "etc/alert-threader/alert-threader.env"
    assert read_env(env_file)["HOST"] == "127.0.0.1"
    assert load_service_config(env_file, tmp_path).host == "127.0.0.1"
    assert "would check GET http://127.0.0.1:9009/health" in first.stdout
    assert "- url: http://127.0.0.1:9009/alert" in first.stdout, "the receiver names where it listens"
    upgrade = run_install(root, "--yes")
    assert upgrade.returncode == 0, upgrade.stderr
    assert read_env(env_file)["HOST"] == "127.0.0.1"
    ipv6 = run_install(root, "--yes", "--host", "::1")
    assert ipv6.returncode == 0, ipv6.stderr
    assert read_env(env_file)["HOST"] == "::1" and "would check GET http://[::1]:9009/health" in ipv6.stdout


def test_secrets_never_reach_the_output(installed):
    _, result = installed
    output = result.stdout + result.stderr
    assert INSTALL_SLACK_TOKEN not in output
    assert INSTALL_WEBHOOK_TOKEN not in output
    # ...but the Alertmanager receiver and the smoke test are there.
    assert "url: http://" in output and ":9100/alert" in output
    assert "send_resolved: true" in output
    assert "type: Bearer" in output and "credentials_file:" in output
    assert 'curl -sS -X POST http://127.0.0.1:9100/alert' in output
    assert "Authorization: Bearer" in output


def load_service_config(env_file: Path, state_directory: Path) -> at.Config:
    """The service's Config from an env file, as systemd would start it."""
    environ = read_env(env_file)
    environ["STATE_DIRECTORY"] = str(state_directory)  # as systemd sets it for StateDirectory=
    return at.load_config(at.build_parser().parse_args([]), environ)


def test_env_file_is_accepted_by_the_service(installed, tmp_path):
    root, _ = installed
    config = load_service_config(root / "etc/alert-threader/alert-threader.env", tmp_path)
    assert config.slack_bot_token == INSTALL_SLACK_TOKEN
    assert config.slack_channel == "C0123456789"
    assert config.environment == "staging"
    assert config.port == 9100
    assert config.webhook_token == INSTALL_WEBHOOK_TOKEN
    assert config.thread_store_file == str(tmp_path / "threads.json")


def test_fresh_unattended_install_defaults_to_dry_run_and_a_generated_webhook_token(tmp_path):
    root = tmp_path / "root"
    result = run_install(root, "--yes")
    assert result.returncode == 0, result.stderr
    settings = read_env(root / "etc/alert-threader/alert-threader.env")
    assert settings["SLACK_BOT_TOKEN"] == ""
    assert settings["THREAD_STORE"] == "file"
    assert settings["ENVIRONMENT"] == "production"
    assert settings["PORT"] == "9009"
    assert re.fullmatch(r"[0-9a-f]{64}", settings["WEBHOOK_TOKEN"])
    assert settings["WEBHOOK_TOKEN"] not in result.stdout + result.stderr
    assert "DRY-RUN" in result.stdout
    config = load_service_config(root / "etc/alert-threader/alert-threader.env", tmp_path)
    assert config.dry_run and config.slack_channel is None
    assert config.webhook_token == settings["WEBHOOK_TOKEN"]


def test_no_webhook_token_is_allowed_with_a_warning(tmp_path):
    root = tmp_path / "root"
    result = run_install(root, "--yes", "--no-webhook-token")
    assert result.returncode == 0, result.stderr
    assert read_env(root / "etc/alert-threader/alert-threader.env")["WEBHOOK_TOKEN"] == ""
    assert "anyone who reaches port 9009 can post alerts" in result.stderr
    assert "Authorization" not in result.stdout


def test_token_file_dash_reads_stdin(tmp_path):
    root = tmp_path / "root"
    result = run_install(root, "--yes", "--token-file", "-", "--channel", "C0123456789",
                         input=INSTALL_SLACK_TOKEN + "\n")
    assert result.returncode == 0, result.stderr
    assert read_env(root / "etc/alert-threader/alert-threader.env")["SLACK_BOT_TOKEN"] == INSTALL_SLACK_TOKEN
    assert INSTALL_SLACK_TOKEN not in result.stdout + result.stderr


def test_rerun_without_flags_keeps_every_setting(installed):
    root, _ = installed
    env_file = root / "etc/alert-threader/alert-threader.env"
    with env_file.open("a") as f:
        f.write("# local tweak\nLOG_LEVEL=debug\n")
    before = env_file.read_text()
    code = root / "opt/alert-threader/alert_threader.py"
    code.write_text("# old version\n")

    result = run_install(root, "--yes")
    assert result.returncode == 0, result.stderr
    assert env_file.read_text() == before
    assert code.read_bytes() == (REPO / "alert_threader.py").read_bytes(), "upgrade replaces the code"
    assert "would run: systemctl restart alert-threader" in result.stdout


def test_rerun_with_a_flag_changes_only_that_setting(installed):
    root, _ = installed
    env_file = root / "etc/alert-threader/alert-threader.env"
    before = read_env(env_file)

    result = run_install(root, "--yes", "--environment", "prod-eu")
    assert result.returncode == 0, result.stderr
    after = read_env(env_file)
    assert after == dict(before, ENVIRONMENT="prod-eu")
    assert file_mode(env_file) == 0o600
    assert "ENVIRONMENT changes from 'staging' to 'prod-eu': it is part of the thread key" in result.stderr
    again = run_install(root, "--yes", "--environment", "prod-eu")
    assert again.returncode == 0 and "ENVIRONMENT changes" not in again.stderr, "only a change is worth a warning"


def test_the_smoke_test_install_prints_opens_and_closes_a_thread(installed, start, slack):
    _, result = installed
    bodies = re.findall(r"-d '(\{.*\})'", result.stdout)
    assert [json.loads(b)["status"] for b in bodies] == ["firing", "resolved"]
    svc = start()
    assert svc.alert(json.loads(bodies[0])).json()["results"][0]["action"] == "posted"
    assert svc.alert(json.loads(bodies[1])).json()["results"][0]["action"] == "replied"
    [thread] = svc.get("/cache").json()["threads"].values()
    assert thread["status"] == "closed", "the smoke test leaves nothing firing"


def test_silence_and_ack_settings_go_into_the_env_file_the_service_reads_as_root(installed, tmp_path):
    """A *_FILE under /etc/alert-threader is unreadable to the unit's DynamicUser: the values go in the env file."""
    root, _ = installed
    (tmp_path / "signing").write_text("8f742231b10e8888abcd99ffffeeee85\n")
    (tmp_path / "am-auth").write_text("Bearer am-token-0123456789\n")
    result = run_install(root, "--yes", "--signing-secret-file", str(tmp_path / "signing"),
                         "--alertmanager-url", "http://alertmanager.example.com:9093",
                         "--alertmanager-auth-file", str(tmp_path / "am-auth"))
    assert result.returncode == 0, result.stderr
    env_file = root / "etc/alert-threader/alert-threader.env"
    settings = read_env(env_file)
    assert settings["SLACK_SIGNING_SECRET"] == "8f742231b10e8888abcd99ffffeeee85"
    assert settings["ALERTMANAGER_URL"] == "http://alertmanager.example.com:9093"
    assert settings["ALERTMANAGER_AUTH"] == "Bearer am-token-0123456789"
    assert "8f742231b10e8888abcd99ffffeeee85" not in result.stdout + result.stderr
    assert "am-token-0123456789" not in result.stdout + result.stderr
    assert "POST /slack/actions" in result.stdout
    config = load_service_config(env_file, tmp_path)
    assert config.interactive and config.alertmanager_auth == "Bearer am-token-0123456789"
    assert config.alertmanager_url == "http://alertmanager.example.com:9093"


def test_switching_to_redis_adds_its_url(installed):
    root, _ = installed
    result = run_install(root, "--yes", "--store", "redis")
    assert result.returncode == 0, result.stderr
    settings = read_env(root / "etc/alert-threader/alert-threader.env")
    assert settings["THREAD_STORE"] == "redis"
    assert settings["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert settings["SLACK_BOT_TOKEN"] == INSTALL_SLACK_TOKEN
    assert "python3-redis" in result.stdout


def test_local_redis_is_configured_once_and_purged_cleanly(tmp_path):
    root = tmp_path / "root"
    redis_conf = root / "etc/redis/redis.conf"
    redis_conf.parent.mkdir(parents=True)
    original = "bind 127.0.0.1 -::1\nport 6379\nappendonly no\n"
    redis_conf.write_text(original)

    for _ in range(2):
        result = run_install(root, "--yes", "--local-redis")
        assert result.returncode == 0, result.stderr
    conf = redis_conf.read_text()
    assert conf.count("include /etc/redis/alert-threader.conf") == 1
    assert conf.startswith(original)
    assert conf.rstrip().endswith("include /etc/redis/alert-threader.conf"), "an include must come last to win"
    dropin = (root / "etc/redis/alert-threader.conf").read_text()
    directives = [line for line in dropin.splitlines() if line and not line.startswith("#")]
    assert directives[0] in ("bind 127.0.0.1 -::1", "bind 127.0.0.1 ::1")
    for wanted in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", "protected-mode yes"):
        assert wanted in directives
    settings = read_env(root / "etc/alert-threader/alert-threader.env")
    assert settings["THREAD_STORE"] == "redis"
    assert settings["REDIS_URL"] == "redis://127.0.0.1:6379/0"

    result = run_install(root, "--uninstall", "--purge", "--yes")
    assert result.returncode == 0, result.stderr
    assert redis_conf.read_text().rstrip("\n") == original.rstrip("\n")
    assert not (root / "etc/redis/alert-threader.conf").exists()


def make_state(root: Path) -> Path:
    """The layout DynamicUser=yes leaves: the state in private/, a symlink to it."""
    private = root / "var/lib/private/alert-threader"
    private.mkdir(parents=True)
    (private / "threads.json").write_text("{}")
    (root / "var/lib/alert-threader").symlink_to("private/alert-threader")
    return private


def test_uninstall_removes_the_service_and_keeps_the_settings_and_state(installed):
    root, _ = installed
    private = make_state(root)
    settings = (root / "etc/alert-threader/alert-threader.env").read_text()
    result = run_install(root, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (root / "opt/alert-threader").exists()
    assert not (root / "etc/systemd/system/alert-threader.service").exists()
    assert (root / "etc/alert-threader/alert-threader.env").read_text() == settings, "the tokens are kept"
    assert "kept the settings and tokens in" in result.stdout and "--uninstall --purge" in result.stdout
    assert (private / "threads.json").read_text() == "{}"
    assert (root / "var/lib/alert-threader/threads.json").exists()
    assert "kept the thread state in" in result.stdout
    assert "would run: systemctl disable --now alert-threader" in result.stdout
    again = run_install(root, "--yes")  # a reinstall finds the settings it had
    assert again.returncode == 0, again.stderr
    assert read_env(root / "etc/alert-threader/alert-threader.env") == read_env_text(settings)


def test_uninstall_says_nothing_of_state_that_was_never_there(tmp_path):
    root = tmp_path / "root"
    result = run_install(root, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert "thread state" not in result.stdout and "kept the settings" not in result.stdout


def test_uninstall_purge_removes_the_state(installed):
    root, _ = installed
    make_state(root)
    result = run_install(root, "--uninstall", "--purge", "--yes")
    assert result.returncode == 0, result.stderr
    assert not (root / "var/lib/private/alert-threader").exists()
    assert not os.path.lexists(root / "var/lib/alert-threader")
    assert not (root / "etc/alert-threader").exists()


@pytest.mark.parametrize("args, message", [
    (["--store", "bogus"], "--store must be file or redis"),
    (["--channel", "general"], "--channel must be a Slack channel ID"),
    (["--channel", "#alerts"], "--channel must be a Slack channel ID"),
    (["--channel", "C0123$(touch /tmp/x)"], "--channel must be a Slack channel ID"),
    (["--environment", "prod eu"], "--environment may hold"),
    (["--environment", "prod|eu"], "--environment may hold"),
    (["--port", "0"], "--port must be a number from 1 to 65535"),
    (["--port", "65536"], "--port must be a number from 1 to 65535"),
    (["--port", "90a"], "--port must be a number from 1 to 65535"),
    (["--host", "0.0.0.0 8080"], "--host must be an IP address"),
    (["--host", "[::1]"], "--host must be an IP address"),
    (["--host", "h$(touch /tmp/x)"], "--host must be an IP address"),
    (["--redis-url", "redis://h:6379/0\nSLACK_BOT_TOKEN=x"], "--redis-url must look like"),
    (["--store", "file", "--local-redis"], "need --store redis"),
    (["--token", INSTALL_SLACK_TOKEN], "lands in shell history"),
    (["--slack-token=" + INSTALL_SLACK_TOKEN], "lands in shell history"),
    (["--token-file", "/nonexistent/slack.token"], "--token-file: cannot read"),
    (["--generate-webhook-token", "--no-webhook-token"], "choose one of"),
    (["--purge"], "--purge only goes with --uninstall"),
    (["--bogus"], "unknown option: --bogus"),
    (["--channel"], "--channel needs a value"),
    (["--signing-secret", "8f742231b10e8888abcd99yyyzzz85a5"], "lands in shell history"),
    (["--alertmanager-auth", "ops:pw"], "lands in shell history"),
    (["--alertmanager-url", "http://am:9093/$(reboot)"], "--alertmanager-url must look like"),
    (["--alertmanager-url", "am:9093"], "--alertmanager-url must look like"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, args, message):
    root = tmp_path / "root"
    result = run_install(root, "--yes", *args)
    assert result.returncode != 0
    assert "install.sh: error:" in result.stderr and message in result.stderr
    assert not root.exists()
    assert INSTALL_SLACK_TOKEN not in result.stdout + result.stderr.replace(f"--slack-token={INSTALL_SLACK_TOKEN}", "")


@pytest.mark.parametrize("content, message", [
    ("not-a-token\n", "does not hold a Slack token"),
    ("xoxb-abc def\n", "does not hold a Slack token"),
])
def test_bad_token_file_is_refused(tmp_path, content, message):
    token = tmp_path / "slack.token"
    token.write_text(content)
    root = tmp_path / "root"
    result = run_install(root, "--yes", "--token-file", str(token), "--channel", "C0123456789")
    assert result.returncode != 0 and message in result.stderr
    assert not root.exists()


def test_bad_webhook_token_file_is_refused(tmp_path):
    token = tmp_path / "webhook.token"
    token.write_text("short\n")
    result = run_install(tmp_path / "root", "--yes", "--webhook-token-file", str(token))
    assert result.returncode != 0 and "--webhook-token-file" in result.stderr
    assert not (tmp_path / "root").exists()


def test_a_slack_token_needs_a_channel(tmp_path, token_files):
    slack, _ = token_files
    result = run_install(tmp_path / "root", "--yes", "--token-file", str(slack))
    assert result.returncode != 0 and "needs a channel" in result.stderr
    assert not (tmp_path / "root").exists()


def test_questions_need_a_terminal(tmp_path):
    result = run_install(tmp_path / "root", input="")
    assert result.returncode != 0 and "pass --yes" in result.stderr
    assert not (tmp_path / "root").exists()


def test_real_install_needs_root():
    # A copy in a world-readable directory: a root's checkout (and pytest's tmp_path) may be 0700.
    public = Path(tempfile.mkdtemp(prefix="install-as-nobody-"))
    try:
        public.chmod(0o755)
        for name in ("install.sh", "alert_threader.py", "alert-threader.service"):
            shutil.copy(REPO / name, public / name)
            (public / name).chmod(0o644)
        command = ["bash", str(public / "install.sh"), "--yes"]
        if os.geteuid() == 0:
            setpriv = require_binary("setpriv")
            command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=str(public),
                                env={"PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(public)
    assert result.returncode != 0
    assert "run as root" in result.stderr


def test_help_lists_every_flag():
    result = subprocess.run(["bash", str(INSTALL_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--yes", "--store", "--token-file", "--slack-token-file", "--channel", "--environment",
                 "--webhook-token-file", "--generate-webhook-token", "--no-webhook-token", "--local-redis",
                 "--redis-url", "--port", "--host", "--root", "--uninstall", "--purge", "--help"):
        assert flag in result.stdout


class PtySession:
    """install.sh on a pseudo-terminal, answered prompt by prompt."""

    def __init__(self, args, env):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                         start_new_session=True)
        os.close(slave)
        self.output = ""

    def expect(self, text, timeout=20.0):
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} in:\n{self.output}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"install.sh ended before {text!r}:\n{self.output}"
                self.output += chunk.decode("utf-8", "replace")
        position = self.output.index(text) + len(text)
        seen, self.output = self.output[:position], self.output[position:]
        return seen

    def answer(self, prompt, reply):
        self.expect(prompt)
        os.write(self.master, reply.encode() + b"\r")

    def finish(self, timeout=30.0):
        rest = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                rest.append(chunk.decode("utf-8", "replace"))
            elif self.process.poll() is not None:
                break
        os.close(self.master)
        self.output += "".join(rest)
        return self.process.wait(timeout=5)


def test_interactive_install_asks_and_hides_the_token(tmp_path):
    root = tmp_path / "root"
    session = PtySession(["bash", str(INSTALL_SH), "--root", str(root)],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
    transcript = ""
    try:
        session.answer("Thread store (file or redis) [file]:", "file")
        transcript += session.expect("input hidden")
        session.answer(":", INSTALL_SLACK_TOKEN)
        session.answer("Slack channel ID", "C0123456789")
        session.answer("Environment name [production]:", "qa")
        session.answer("Generate a webhook token", "")
        code = session.finish()
    finally:
        if session.process.poll() is None:
            session.process.kill()
    transcript += session.output
    assert code == 0, transcript
    assert INSTALL_SLACK_TOKEN not in transcript, "the token was echoed"
    settings = read_env(root / "etc/alert-threader/alert-threader.env")
    assert settings["SLACK_BOT_TOKEN"] == INSTALL_SLACK_TOKEN
    assert settings["SLACK_CHANNEL"] == "C0123456789"
    assert settings["ENVIRONMENT"] == "qa"
    assert re.fullmatch(r"[0-9a-f]{64}", settings["WEBHOOK_TOKEN"])

    # Re-run interactively: keeping the settings asks nothing more.
    session = PtySession(["bash", str(INSTALL_SH), "--root", str(root)],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
    try:
        session.answer("Keep them (flags given still apply)? [Y/n]:", "")
        code = session.finish()
    finally:
        if session.process.poll() is None:
            session.process.kill()
    assert code == 0, session.output
    assert "Thread store" not in session.output
    assert read_env(root / "etc/alert-threader/alert-threader.env") == settings


class HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b'{"status": "healthy"}' if self.status == 200 else b'{"status": "degraded"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("client", ["curl", "python"])
@pytest.mark.parametrize("status", [200, 503])
def test_health_probe_reports_status_and_body(tmp_path, client, status):
    handler = type("Handler", (HealthHandler,), {"status": status})
    server = LoopbackServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        if client == "curl":
            require_binary("curl")
            path = os.environ.get("PATH", "/usr/bin:/bin")
        else:
            path = str(tmp_path)  # no curl on PATH: install.sh falls back to /usr/bin/python3
            if not os.access("/usr/bin/python3", os.X_OK):
                pytest.skip("/usr/bin/python3 is missing")
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        result = subprocess.run(["/bin/bash", "-c", f'source "{INSTALL_SH}" && http_get "{url}"'],
                                capture_output=True, text=True, timeout=30, env={"PATH": path})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    code, _, body = result.stdout.partition(" ")
    assert code == str(status)
    assert '"status": "healthy"' in body if status == 200 else '"degraded"' in body


def test_shellcheck_is_clean():
    shellcheck = require_binary("shellcheck")
    result = subprocess.run([shellcheck, "-S", "warning", str(INSTALL_SH)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_unit_verifies_cleanly(installed):
    analyze = require_binary("systemd-analyze")
    root, _ = installed
    unit = root / "etc/systemd/system/alert-threader.service"
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and not VERIFY_NOISE.search(line)]
    assert problems == [], "\n".join(problems)


def test_installed_unit_is_hardened(installed):
    analyze = require_binary("systemd-analyze")
    root, _ = installed
    unit = root / "etc/systemd/system/alert-threader.service"
    result = subprocess.run([analyze, "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout


def test_unit_runs_the_installed_code_unprivileged_with_graceful_stop():
    directives = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    assert directives["ExecStart"] == ["/usr/bin/python3 -m alert_threader"]
    assert directives["WorkingDirectory"] == ["/opt/alert-threader"]
    assert directives["EnvironmentFile"] == ["/etc/alert-threader/alert-threader.env"]
    assert directives["DynamicUser"] == ["yes"]
    assert directives["StateDirectory"] == ["alert-threader"]
    assert directives["KillSignal"] == ["SIGTERM"]
    assert directives["Restart"] == ["on-failure"]
    assert directives["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    # The stop timeout must outlast the service's own SHUTDOWN_TIMEOUT (20s by default).
    assert int(directives["TimeoutStopSec"][0].rstrip("s")) > 20


# ---------------------------------------------------------------------------
# Redis: a real redis-server per test, on a free port
# ---------------------------------------------------------------------------

class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.binary = require_binary("redis-server")
        self.redis = require_module("redis")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # A unix socket's path must be short (108 bytes): not under pytest's long tmp_path.
        self.socket_dir = tempfile.mkdtemp(prefix="redis-", dir="/tmp")
        self.unix_url = f"unix://{self.socket_dir}/redis.sock?db=0"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.directory),
                                      "--unixsocket", f"{self.socket_dir}/redis.sock", "--unixsocketperm", "700"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, what="redis-server to answer PING")

    def ping(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.client().ping())
        return False

    def client(self) -> Any:
        return self.redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)

    def pause(self) -> None:
        """Out of reach, its data kept: it takes connections and answers nothing."""
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.remove()


class SentinelCluster:
    """A primary, a replica and three Sentinels (redis-server --sentinel), each on a free loopback port, with a
    data password and a different one for the Sentinels."""

    DATA_PASSWORD, SENTINEL_PASSWORD, SERVICE = "data-Pass-7f3a", "sentinel-Pass-91c2", "threader"

    def __init__(self, directory: Path) -> None:
        self.binary = require_binary("redis-server")
        self.redis = require_module("redis")
        self.directory = directory
        self.procs: Dict[int, subprocess.Popen] = {}
        self.primary, self.replica = free_port(), free_port()
        auth = ["--requirepass", self.DATA_PASSWORD, "--masterauth", self.DATA_PASSWORD]
        for port, extra in ((self.primary, []), (self.replica, ["--replicaof", "127.0.0.1", str(self.primary)])):
            data = directory / f"redis-{port}"
            data.mkdir()
            self.spawn(port, [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(data), *auth, *extra])
        self.sentinels = [free_port() for _ in range(3)]
        for port in self.sentinels:
            conf = directory / f"sentinel-{port}.conf"  # Sentinel rewrites its file: one each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\nrequirepass {self.SENTINEL_PASSWORD}\n"
                            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary} 2\n"
                            f"sentinel auth-pass {self.SERVICE} {self.DATA_PASSWORD}\n"
                            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                            f"sentinel failover-timeout {self.SERVICE} 10000\n")
            self.spawn(port, [self.binary, str(conf), "--sentinel"])
        wait_for(lambda: self.data(self.replica).info("replication").get("master_link_status") == "up",
                 timeout=20, what="the replica to sync")
        wait_for(lambda: all(self.known(port) for port in self.sentinels), timeout=30,
                 what="every Sentinel to know the replica and the other Sentinels")
        self.url = (f"redis+sentinel://:{self.DATA_PASSWORD}@" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
                    + f"/{self.SERVICE}/0")

    def spawn(self, port: int, command: List[str]) -> None:
        self.procs[port] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.answers(port), what=f"redis-server on {port} to answer")

    def answers(self, port: int) -> bool:
        for password in (self.DATA_PASSWORD, self.SENTINEL_PASSWORD):
            with contextlib.suppress(Exception):
                return bool(self.redis.Redis(port=port, password=password, socket_timeout=1).ping())
        return False

    def data(self, port: int) -> Any:
        return self.redis.Redis(port=port, password=self.DATA_PASSWORD, decode_responses=True, socket_timeout=2)

    def sentinel(self, port: int) -> Any:
        return self.redis.Redis(port=port, password=self.SENTINEL_PASSWORD, decode_responses=True, socket_timeout=2)

    def known(self, port: int) -> bool:
        with contextlib.suppress(Exception):
            master = self.sentinel(port).execute_command("SENTINEL", "MASTER", self.SERVICE)
            fields = dict(zip(master[::2], master[1::2])) if isinstance(master, list) else master
            return int(fields["num-slaves"]) >= 1 and int(fields["num-other-sentinels"]) >= 2
        return False

    def primary_port(self) -> Optional[int]:
        """The primary the Sentinels name now."""
        for port in self.sentinels:
            with contextlib.suppress(Exception):
                address = self.sentinel(port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
                return int(address[1])
        return None

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(10)


@pytest.fixture
def sentinels(tmp_path):
    cluster = SentinelCluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["file", "redis", "redis-unix"])
def store(request, tmp_path):
    """Each store, twice over the same backing state (to test what survives a restart)."""
    made: List[at.ThreadStore] = []
    if request.param.startswith("redis"):
        server = RedisServer(tmp_path)
        request.addfinalizer(server.remove)
        url = server.unix_url if request.param == "redis-unix" else server.url

        def make() -> at.ThreadStore:
            made.append(at.RedisStore(url, "threader:ts", at.Metrics(), retention=3600, lease=5))
            return made[-1]
    else:
        def make() -> at.ThreadStore:
            made.append(at.FileStore(str(tmp_path / "threads.json"), at.Metrics(), retention=3600))
            return made[-1]
    yield make
    for s in made:
        s.close()


def record(ts: str, status: str = "open", closed: Optional[float] = None) -> Dict[str, Any]:
    return {"ts": ts, "channel": "C1", "status": status, "closed": closed, "alerts": {"fp": ["f", 1.0, None]}}


def test_store_contract_read_write_survive_restart(store):
    s = store()
    assert s.get_many(["a", "b"]) == {} and s.get("a") is None
    s.put("a", record("1.1"))
    s.put_many({"b": record("2.2", "closed", time.time()), "c|x": record("3.3")})
    assert s.get_many(["a", "b", "nope"]) == {"a": record("1.1"), "b": record("2.2", "closed", s.get("b")["closed"])}
    copy = s.get("a")
    copy["alerts"]["other"] = ["r", 1.0, 2.0]
    assert s.get("a") == record("1.1"), "what get returns is a copy"
    assert s.count() == 3 and s.open_count() == 2
    assert set(s.items()) == {"a", "b", "c|x"}
    again = store()
    assert again.get("c|x") == record("3.3") and again.count() == 3
    assert again.clear() == 3 and again.count() == 0 and again.items() == {}
    assert s.health()["ok"]


def test_store_contract_lock_serialises_one_key_not_others(store):
    s = store()
    holding, released = threading.Event(), threading.Event()
    order: List[str] = []

    def holder() -> None:
        with s.locked(["k"]):
            holding.set()
            released.wait(5)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)
    with s.locked(["other"]):
        order.append("other key not blocked")
    waiter = threading.Thread(target=lambda: (s.locked(["k"]).__enter__(), order.append("second got k")))
    waiter.start()
    wait_for(lambda: s._key_locks._entries.get("k", [None, 0])[1] == 2 or len(order) > 1,
             what="the second worker to wait for k")
    assert order == ["other key not blocked"] and waiter.is_alive()
    released.set()
    thread.join(5)
    waiter.join(5)
    assert order == ["other key not blocked", "first done", "second got k"]


def test_store_contract_closed_threads_expire_open_ones_do_not(store, redis_server=None):
    s = store()
    s.put_many({"open": record("1.1"), "closed-new": record("2.2", "closed", time.time()),
                "closed-old": record("3.3", "closed", time.time() - 7200)})
    if isinstance(s, at.FileStore):
        assert s.prune(time.time()) == 1
        assert set(s.items()) == {"open", "closed-new"}
        assert set(at.FileStore.read(s.path)) == {"open", "closed-new"}
    else:
        client = s.redis.client
        assert client.ttl("threader:ts:open") == -1
        assert 3500 < client.ttl("threader:ts:closed-new") <= 3600
        s.put("closed-new", record("2.2"))  # reopened: the expiry goes away
        assert client.ttl("threader:ts:closed-new") == -1


def outbox_item_of(name: str, status: str = "firing", channel: str = "C1") -> at.Item:
    alert = make_alert(name=name)
    key = f"{name}|critical|database|prod-eu|production"
    return at.outbox_item(parsed(resolved(alert) if status == "resolved" else alert), channel, key, key,
                          "http://am.example.com", {}, time.time())


def test_store_contract_the_outbox_keeps_items_in_order_joins_copies_and_survives_restart(store):
    s = store()
    first = s.enqueue([outbox_item_of("One"), outbox_item_of("Two")], limit=10)
    assert [joined for _, joined in first] == [False, False]
    again = s.enqueue([outbox_item_of("Two"), outbox_item_of("Three")], limit=10)  # a retry, one alert more
    assert again[0] == (first[1][0], True) and again[1][1] is False
    assert [i.alert.alertname for i in s.waiting("C1")] == ["One", "Two", "Three"]
    assert [i.alert.alertname for i in s.waiting("C1", after=first[0][0])] == ["Two", "Three"]
    assert s.tail("C1") == again[1][0] and s.waiting("C2") == [] and s.tail("C2") is None
    s.enqueue([outbox_item_of("Elsewhere", channel="C2")], limit=10)
    summary = s.outbox_summary()
    assert summary["C1"][0] == 3 and summary["C2"][0] == 1 and summary["C1"][1] <= time.time()
    restarted = store()
    assert [i.alert.alertname for i in restarted.waiting("C1")] == ["One", "Two", "Three"]
    item = restarted.waiting("C1")[0]
    assert item.alert.labels["instance"] == "db01.example.com" and item.external_url == "http://am.example.com"
    with pytest.raises(at.OutboxFull):
        restarted.enqueue([outbox_item_of("Four")], limit=3)
    with pytest.raises(at.OutboxFull):
        restarted.enqueue([outbox_item_of("Four"), outbox_item_of("Five")], limit=5)  # with C2's: 6, over 5
    assert len(restarted.waiting("C1")) == 3, "refused: nothing added"
    # At the limit, copies of waiting alerts (Alertmanager's retry, an HA peer's) still join them: only what
    # they would add counts.
    copies = restarted.enqueue([outbox_item_of("One"), outbox_item_of("Two"), outbox_item_of("Three")], limit=4)
    assert [joined for _, joined in copies] == [True, True, True]
    with pytest.raises(at.OutboxFull):
        restarted.enqueue([outbox_item_of("One"), outbox_item_of("Four")], limit=4)


def test_store_contract_completing_writes_records_takes_items_out_and_keeps_results_in_one_step(store):
    s = store()
    [(one, _), (two, _)] = s.enqueue([outbox_item_of("One"), outbox_item_of("Two")], limit=10)
    assert s.hold_sender("C1")
    s.complete("C1", {"One|critical|database|prod-eu|production": record("9.9")}, {one: ("posted", "9.9")})
    assert [i.id for i in s.waiting("C1")] == [two]
    assert s.results("C1", [one, two]) == {one: ("posted", "9.9")} and s.results("C2", [one]) == {}
    assert s.get("One|critical|database|prod-eu|production")["ts"] == "9.9"
    assert s.enqueue([outbox_item_of("One")], limit=10)[0][1] is False, "told: a new copy is stored anew"
    restarted = store()
    assert [i.alert.alertname for i in restarted.waiting("C1")] == ["Two", "One"]
    assert restarted.get("One|critical|database|prod-eu|production")["ts"] == "9.9"


def test_redis_keys_keep_the_seed_layout(start, slack, redis_server):
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.url)
    svc.alert(webhook(make_alert()))
    client = redis_server.client()
    assert client.keys("threader:ts:*") == ["threader:ts:DatabaseDown|critical|database|prod-eu|production"]
    value = json.loads(client.get("threader:ts:DatabaseDown|critical|database|prod-eu|production"))
    assert value["ts"] == slack.messages[0].ts
    stats = svc.get("/stats").json()
    assert set(stats["redis"]) == {"connected_clients", "used_memory_human", "keyspace_hits", "keyspace_misses"}
    assert stats["thread_store"] == "redis" and stats["cached_threads"] == 1
    health = svc.get("/health").json()
    assert health["redis_status"] == "connected" and health["thread_store"] == "redis"


def test_a_thread_the_seed_stored_in_redis_as_a_bare_ts_is_replied_in(start, slack, redis_server):
    """Upgrading from the original: its values were the ts alone, not our JSON record."""
    key = "DatabaseDown|critical|database|prod-eu|production"
    redis_server.client().set(f"threader:ts:{key}", "1705329025.000100")
    redis_server.client().set("threader:ts:Broken|x", "{not json")
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.url)
    answer = svc.alert(webhook(make_alert())).json()["results"][0]
    assert answer["action"] == "replied" and answer["thread_ts"] == "1705329025.000100"
    [reply] = slack.messages
    assert reply.thread_ts == "1705329025.000100"
    assert set(svc.get("/cache").json()["threads"]) == {key}, "an unreadable value is no thread"


def test_redis_url_with_password_and_database(start, slack, tmp_path):
    server = RedisServer(tmp_path)
    try:
        server.client().config_set("requirepass", "s3cret-redis-pass")
        url = f"redis://:s3cret-redis-pass@127.0.0.1:{server.port}/3"
        svc = start(THREAD_STORE="redis", REDIS_URL=url)
        svc.alert(webhook(make_alert()))
        db3 = server.redis.Redis(host="127.0.0.1", port=server.port, db=3, password="s3cret-redis-pass",
                                 decode_responses=True)
        assert db3.keys("threader:ts:*") == ["threader:ts:DatabaseDown|critical|database|prod-eu|production"]
        assert "s3cret-redis-pass" not in svc.log.getvalue() + svc.get("/health").text + svc.get("/stats").text
    finally:
        server.remove()


def test_a_wrong_redis_password_is_named_with_its_fix_in_check_and_the_log(start, tmp_path):
    server = RedisServer(tmp_path)
    try:
        server.client().config_set("requirepass", "s3cret-redis-pass")
        for url in (f"redis://:not-the-pass@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0"):
            result = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": url})
            out = result.stdout.decode()
            assert result.returncode == 1, out
            assert "store: FAILED" in out and "Redis refuses the credentials: put its password in REDIS_URL" in out
            assert "not-the-pass" not in out + result.stderr.decode()
        svc = start(THREAD_STORE="redis", REDIS_URL=f"redis://:not-the-pass@127.0.0.1:{server.port}/0")
        wait_for(lambda: "redis unreachable" in svc.log.getvalue())
        assert "Redis refuses the credentials" in svc.log.getvalue()
        assert "not-the-pass" not in svc.log.getvalue()
        health = svc.get("/health").json()
        assert "Fix: Redis refuses the credentials: put its password in REDIS_URL" in health["store_error"]
        refused = svc.alert(webhook(make_alert()), expect=503).json()  # nowhere to keep it: Alertmanager does
        assert "thread store: redis unreachable" in refused["error"] and refused["results"] == []
        for method in ("GET", "DELETE"):  # nothing to show or to forget: said as the other endpoints say it
            cache = svc.request(method, "/cache")
            assert cache.status == 503 and "the thread store cannot be read now" in cache.json()["error"]
            assert "not-the-pass" not in cache.text
    finally:
        server.remove()


def test_a_password_for_a_redis_without_one_says_to_take_it_out(redis_server, tmp_path):
    """redis-py 4.3 sends AUTH and Redis refuses it; newer redis-py gets in all the same. Never 'start redis-server'."""
    result = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis",
                                                 "REDIS_URL": f"redis://:extra-pass@127.0.0.1:{redis_server.port}/0"})
    out = result.stdout.decode()
    assert "store: OK" in out or "this Redis has no password: take it out of REDIS_URL" in out, out
    assert "start redis-server" not in out and "extra-pass" not in out


def test_redis_over_a_unix_socket_serves_webhooks_and_check(start, slack, redis_server, tmp_path):
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.unix_url)
    posted = svc.alert(webhook(make_alert())).json()["results"][0]
    assert posted["action"] == "posted"
    stored = redis_server.client().get("threader:ts:DatabaseDown|critical|database|prod-eu|production")
    assert json.loads(stored)["ts"] == posted["thread_ts"]
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "unchanged"
    assert svc.get("/health").json()["redis_status"] == "connected"
    result = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": redis_server.unix_url,
                                                 "SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS",
                                                 "SLACK_API_URL": slack.url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"store: OK ({redis_server.unix_url})" in result.stdout.decode()


def test_redis_key_prefix_is_configurable(start, slack, redis_server):
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.url, REDIS_KEY_PREFIX="team-a:threads")
    svc.alert(webhook(make_alert()))
    assert redis_server.client().keys("team-a:threads:*") == [
        "team-a:threads:DatabaseDown|critical|database|prod-eu|production"]


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:6390/0?password=SecretRedisPass&db=x", "Invalid value for"),
    ("redis://127.0.0.1:6390/abc", "the database 'abc' is not a number"),
    ("redis://:SecretPass@127.0.0.1:6390/0?db=x", "must be %-encoded"),
    ("redis://:Secret/RedisPass@127.0.0.1:6390/0", "REDIS_URL: cannot be read: a port that is no number"),
    ("http://127.0.0.1:6390/0", "REDIS_URL: not a Redis URL"),
])
def test_a_redis_url_redis_py_cannot_read_stops_startup_and_check_with_one_line(tmp_path, url, says):
    require_module("redis")
    for command in (("check",), ("--port", "0")):
        result = run_cli(*command, cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": url})
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("alert-threader: REDIS_URL"), lines
        assert says in lines[0] and "Secret" not in lines[0] and "Traceback" not in lines[0]


def test_a_redis_url_without_the_redis_store_is_said_at_start(start, slack):
    svc = start(REDIS_URL="redis://127.0.0.1:6390/0")
    assert "REDIS_URL is set but THREAD_STORE is file: Redis is not used" in svc.log.getvalue()
    assert svc.get("/health").json()["thread_store"] == "file"


def test_missing_redis_package_stops_startup_with_the_install_hint(tmp_path):
    code = ("import sys; sys.modules['redis'] = None; sys.path.insert(0, sys.argv[1]); import alert_threader; "
            "sys.exit(alert_threader.main(['--thread-store', 'redis', '--port', '0']))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, timeout=30,
                            cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k not in SETTING_NAMES})
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "apt install python3-redis" in lines[0], lines


def test_replicas_on_one_redis_make_one_parent_and_one_reply_per_alert(start, slack, redis_server):
    replicas = [start(THREAD_STORE="redis", REDIS_URL=redis_server.url) for _ in range(2)]
    for alerts in ([make_alert(instance="db01")], [make_alert(instance="db01"), make_alert(instance="db02")]):
        barrier = threading.Barrier(6)
        statuses: List[int] = []

        def deliver(replica: Running) -> None:
            barrier.wait()
            statuses.append(replica.alert(webhook(*alerts), expect=None).status)

        # Each replica gets the webhook three times at once (Alertmanager HA peers deliver twice too).
        threads = [threading.Thread(target=deliver, args=(replicas[i % 2],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [200] * 6
    parent, reply = slack.messages
    assert parent.thread_ts is None and reply.thread_ts == parent.ts and "db02" in reply.text


def sentinel_service(start: Callable[..., Running], cluster: SentinelCluster, **settings: str) -> Running:
    return start(THREAD_STORE="redis", REDIS_URL=cluster.url, SENTINEL_PASSWORD=cluster.SENTINEL_PASSWORD, **settings)


def test_a_sentinel_url_reaches_the_primary_and_check_and_health_name_it(start, slack, sentinels, tmp_path):
    svc = sentinel_service(start, sentinels)
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] == "posted"
    assert sentinels.data(sentinels.primary).keys("threader:ts:*") == [
        "threader:ts:DatabaseDown|critical|database|prod-eu|production"]
    health = svc.get("/health").json()
    assert health["redis_primary"] == f"127.0.0.1:{sentinels.primary} (primary of 'threader', through Sentinel)"
    for env in ({"SENTINEL_PASSWORD": sentinels.SENTINEL_PASSWORD},  # or in the URL: both redacted
                {"REDIS_URL": f"{sentinels.url}?sentinel_password={sentinels.SENTINEL_PASSWORD}"}):
        checked = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": sentinels.url, **env})
        out = checked.stdout.decode() + checked.stderr.decode()
        assert "store: OK (redis+sentinel://:***@127.0.0.1:" in out, out
        assert f"primary now 127.0.0.1:{sentinels.primary} (primary of 'threader', through Sentinel)" in out
        assert sentinels.DATA_PASSWORD not in out and sentinels.SENTINEL_PASSWORD not in out
    wrong = run_cli("check", cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": sentinels.url,
                                                "SENTINEL_PASSWORD": "not-the-password"})
    assert wrong.returncode == 1 and "store: FAILED" in wrong.stdout.decode()
    assert "SENTINEL_PASSWORD if the Sentinels have a requirepass" in wrong.stdout.decode(), "the fix, not 'start it'"
    assert "not-the-password" not in wrong.stdout.decode() + wrong.stderr.decode()
    log_text = svc.log.getvalue()
    assert sentinels.DATA_PASSWORD not in log_text and sentinels.SENTINEL_PASSWORD not in log_text


def test_an_outbox_write_no_replica_acknowledges_is_answered_503_and_its_retry_joins_it(start, slack, sentinels):
    svc = sentinel_service(start, sentinels)
    replica = sentinels.procs[sentinels.replica]
    replica.send_signal(signal.SIGSTOP)  # connected still, acknowledging nothing
    try:
        refused = svc.alert(webhook(make_alert()), expect=503).json()
        assert "only 0 of 1 Redis replicas acknowledged" in refused["error"]
    finally:
        replica.send_signal(signal.SIGCONT)
    assert svc.alert(webhook(make_alert())).json()["results"][0]["action"] in ("posted", "unchanged")
    settled(svc)
    assert named(slack, "DatabaseDown on db01.example.com") == 1, "stored once, told once, though answered 503"


@pytest.mark.parametrize("url", [
    "redis+sentinel://:Sekr3t#PW@127.0.0.1:1/svc",  # an unencoded # in the password
    "redis+sentinel://user:Sekr3tPW/cd@127.0.0.1:1/svc",  # an unencoded / in it
    "redis+sentinel://127.0.0.1:1/svc?sentinel%5Fpassword=Sekr3tPW",  # the option's name encoded
    "redis+sentinel://127.0.0.1:1/svc?sentinel_password=ab&Sekr3tPW=cd",  # an unknown option
    "redis+sentinel://fe80::Sekr3t/svc",  # an IPv6 address without [ ]
])
def test_a_sentinel_url_that_cannot_be_read_is_refused_without_echoing_any_part_of_a_password(tmp_path, url):
    for command in ((), ("check",)):
        result = run_cli(*command, cwd=tmp_path, env={"THREAD_STORE": "redis", "REDIS_URL": url})
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("alert-threader: REDIS_URL: ")
        assert "Sekr3t" not in (result.stdout + result.stderr).decode()


def test_a_sentinel_url_reads_a_host_without_a_port_ipv6_and_a_plus_in_its_password():
    target = at.parse_sentinel_url("redis+sentinel://:p%40ss@sentinel-a,[::1]:26380/threader/2"
                                   "?sentinel_password=a+b%2B")
    assert target.sentinels == (("sentinel-a", 26379), ("::1", 26380)) and target.db == 2
    assert (target.password, target.sentinel_password, target.service) == ("p@ss", "a+b+", "threader")
    assert at.redact_url("redis+sentinel://:Sek?ret@h:1/svc?sentinel_password=x") == \
        "redis+sentinel://:***@h:1/svc?sentinel_password=***"


class OddSentinel:
    """A TCP server on loopback that answers every command with an integer: RESP, but not what a Sentinel says."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    @staticmethod
    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):
                conn.sendall(b":1\r\n")

    def close(self) -> None:
        self.sock.close()


def test_sentinels_out_of_reach_or_answering_nonsense_get_a_quick_503_never_a_500(start, slack):
    require_module("redis")
    odd = OddSentinel()
    try:
        for url in (f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/threader",
                    f"redis+sentinel://127.0.0.1:{odd.port}/threader"):
            svc = start(THREAD_STORE="redis", REDIS_URL=url)
            for _ in range(2):
                began = time.monotonic()
                answer = svc.alert(webhook(make_alert()), expect=None)
                assert answer.status == 503 and "thread store" in answer.json()["error"], answer.text
                assert time.monotonic() - began < 4, "redis-py's retries are off towards the Sentinels too"
            assert svc.get("/health").status == 503
            assert "Traceback" not in svc.log.getvalue()
            stop(svc)
    finally:
        odd.close()


def test_killing_the_primary_in_a_storm_loses_and_doubles_nothing(start, slack, sentinels):
    """Alertmanager's part is played by senders that retry every 503 (as it does) until it is answered 200."""
    svc = sentinel_service(start, sentinels, STORM_THRESHOLD="500")  # a thread each: a parent per key to count
    count, answered, codes, lock = 60, [], collections.Counter(), threading.Lock()
    alerts = [make_alert(name=f"Failover{i:02d}", instance=f"host-{i:02d}") for i in range(count)]

    def deliver(alert: Dict[str, Any]) -> None:
        for _ in range(200):
            status = svc.alert(webhook(alert), expect=None).status
            with lock:
                codes[status] += 1
            if status == 200:
                with lock:
                    answered.append(alert["labels"]["alertname"])
                return
            time.sleep(0.2)

    killed = threading.Event()
    senders = []
    for i, alert in enumerate(alerts):
        if i == count // 3:
            sentinels.kill(sentinels.primary)
            killed.set()
        thread = threading.Thread(target=deliver, args=(alert,))
        thread.start()
        senders.append(thread)
        time.sleep(0.05)
    promoted = wait_for(lambda: sentinels.primary_port() == sentinels.replica, timeout=60,
                        what="a Sentinel to promote the replica")
    assert promoted
    since = time.monotonic()
    wait_for(lambda: svc.get("/health").json().get("redis_primary", "").startswith(f"127.0.0.1:{sentinels.replica}"),
             timeout=30, what="/health to name the new primary")
    healthy_after = time.monotonic() - since
    for thread in senders:
        thread.join(60)
    assert sorted(answered) == sorted(a["labels"]["alertname"] for a in alerts), "every alert answered 200 at last"
    assert codes[500] == 0 and set(codes) <= {200, 503}, codes
    settled(svc, timeout=60)
    assert all(named(slack, f"host-{i:02d}") == 1 for i in range(count)), "each alert in Slack once"
    parents = {m.ts: m for m in slack.messages if m.thread_ts is None}
    assert len(parents) == count, "no key has a second parent"
    svc.alert(webhook(*[resolved(a) for a in alerts]))
    settled(svc, timeout=60)
    done = [m for m in slack.messages if m.payload["text"].startswith("✅ RESOLVED")]
    assert len(done) == count and all(m.thread_ts in parents for m in done), "each resolve in its own thread"
    print(f"failover: {count} alerts, {codes[503]} answers 503, healthy {healthy_after:.1f} s after the "
          f"promotion, {len(slack.messages)} Slack messages")


def test_replicas_renew_a_short_lease_through_long_work_and_never_post_two_parents(start, slack, redis_server):
    """Each Slack call is slower than half the lease, a webhook's work longer than the whole lease."""
    replicas = [start(THREAD_STORE="redis", REDIS_URL=redis_server.url, overrides={"redis_lease": 0.5})
                for _ in range(2)]
    slack.fail_always("chat.postMessage", {"sleep": 0.3})
    slack.fail_always("chat.update", {"sleep": 0.3})
    barrier = threading.Barrier(4)
    statuses: List[int] = []

    def deliver(replica: Running) -> None:
        barrier.wait()
        statuses.append(replica.alert(webhook(make_alert(instance="db01"), make_alert(instance="db02")),
                                      expect=None).status)

    threads = [threading.Thread(target=deliver, args=(replicas[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 4
    parent, reply = slack.messages
    assert parent.thread_ts is None and reply.thread_ts == parent.ts


def test_a_sender_that_lost_its_channel_writes_nothing_over_the_replica_that_took_it(start, slack, redis_server):
    """A replica stalls past its sender lease mid-post (paused, say): the other takes the channel over, and the
    stalled one's late answer changes nothing it wrote."""
    stalled, taker = (start(THREAD_STORE="redis", REDIS_URL=redis_server.url, SLACK_TIMEOUT="5s",
                            DELIVERY_WAIT="0.2s", overrides={"sender_lease": 0.5}) for _ in range(2))
    wait_for(lambda: stalled.service.store.hold_sender("C0ALERTS") or taker.service.store.hold_sender("C0ALERTS"),
             what="one replica to hold the channel")
    holds = "C0ALERTS" in stalled.service.store.outbox.senders.sending
    holder, other = (stalled, taker) if holds else (taker, stalled)
    slack.fail("chat.postMessage", {"sleep": 2.0}, {})  # the holder's post stalls
    holder.alert(webhook(make_alert()))
    wait_for(lambda: slack.calls, what="the holder's post to reach Slack")
    holder.service.store.outbox.senders.closed.set()  # its lease keeper stops, as in a paused process
    wait_for(lambda: len(slack.calls) >= 2, timeout=10, what="the other replica to take the channel and post")
    taken = wait_for(lambda: redis_server.client().get(
        "threader:ts:DatabaseDown|critical|database|prod-eu|production"), what="the new holder's thread")
    # Its post's late answer comes back, and what it would write is refused: it no longer sends for the channel.
    wait_for(lambda: holder.service.metrics.total("alert_threader_slack_requests_total", result="ok") >= 1
             and "C0ALERTS" not in holder.service.delivery.senders.sending(), what="the stalled one to give up")
    stored = json.loads(redis_server.client().get("threader:ts:DatabaseDown|critical|database|prod-eu|production"))
    assert stored["ts"] == json.loads(taken)["ts"] == slack.calls[1].ts, "the stalled replica wrote nothing"
    assert other.alert(webhook(make_alert())).json()["results"][0]["action"] == "unchanged"
    assert redis_server.client().xlen("threader:ts-outbox:C0ALERTS") == 0


def test_a_sender_paused_past_its_lease_drops_its_plan_even_when_the_lease_is_free_again(start, slack,
                                                                                             redis_server):
    """A replica stalls mid-plan; the other takes the channel, tells everything and stops (a rolling restart),
    which frees the lease. The stalled one wakes to a free lease: its holding is over all the same, and it
    plans again from Redis. Only the message it was posting shows twice."""
    stalled, taker = (start(THREAD_STORE="redis", REDIS_URL=redis_server.url, SLACK_TIMEOUT="8s",
                            DELIVERY_WAIT="0.2s", overrides={"sender_lease": 0.5}) for _ in range(2))
    wait_for(lambda: stalled.service.store.hold_sender("C0ALERTS") or taker.service.store.hold_sender("C0ALERTS"),
             what="one replica to hold the channel")
    holds = "C0ALERTS" in stalled.service.store.outbox.senders.sending
    holder, other = (stalled, taker) if holds else (taker, stalled)
    slack.fail("chat.postMessage", {"sleep": 3.0})  # the holder's first post stalls
    holder.alert(webhook(*[make_alert(name=f"Down{i}") for i in range(3)]))
    wait_for(lambda: slack.calls, what="the holder's post to reach Slack")
    holder.service.store.outbox.senders.closed.set()  # its lease keeper stops, as in a paused process
    wait_for(lambda: len(slack.messages) >= 3, timeout=10, what="the other replica to tell all three")
    settled(other)
    other.service.stop(timeout=5)  # it gives its lease up
    assert redis_server.client().get("threader:ts-sender:C0ALERTS") is None
    wait_for(lambda: holder.service.metrics.total("alert_threader_slack_requests_total", result="ok") >= 1,
             what="the stalled post's late answer")
    wait_for(lambda: "C0ALERTS" in holder.service.delivery.senders.sending(), what="the holder to send again")
    settled(holder)
    parents = sorted(m.payload["text"] for m in slack.messages if m.thread_ts is None)
    assert len(parents) == 4 and len(set(parents)) == 3, parents
    for i in range(3):
        record = json.loads(redis_server.client().get(f"threader:ts:Down{i}|critical|database|prod-eu|production"))
        assert record["ts"] in {m.ts for m in slack.messages}


def test_a_replica_killed_while_it_sends_is_taken_over_and_nothing_is_lost_or_doubled(slack, redis_server, tmp_path):
    """Two real processes on one Redis; the one sending for the channel is killed (-9) while Slack is down.
    The other takes the channel within seconds and delivers everything either answered 200, once."""
    env = {"THREAD_STORE": "redis", "REDIS_URL": redis_server.url, "SLACK_PACE": "0.1s", "DELIVERY_WAIT": "0.2s"}
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(start_process(tmp_path / name, slack, env=env))
    try:
        slack.fail_always("chat.postMessage", {"status": 503})
        bodies = storm_of_groups(40, prefix="Killed")
        assert [post_to(procs[i % 2][1], body)[0] for i, body in enumerate(bodies)] == [200] * 40
        sending = wait_for(lambda: [(proc, port) for proc, port in procs
                                    if "C0ALERTS" in get_json(port, "/health")["sending_for"]], what="a sender")
        [(victim, _)] = sending
        [(_, survivor)] = [(proc, port) for proc, port in procs if proc is not victim]
        wait_for(lambda: slack.calls, what="the sender to try Slack")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        slack.fail_always("chat.postMessage", None)
        wait_for(lambda: "C0ALERTS" in get_json(survivor, "/health")["sending_for"], timeout=15,
                 what="the survivor to take the channel over")
        took_over = time.monotonic() - killed_at
        wait_for(lambda: all(named(slack, f"Killed-host-{i:03d}:9100") for i in range(40)), timeout=40,
                 what="every alert after the takeover")
        assert took_over < at.Config.sender_lease + 2, f"taken over after {took_over:.1f}s"
        for i in range(40):
            assert named(slack, f"Killed-host-{i:03d}:9100") == 1, f"host {i} told more than once"
        assert len([m for m in slack.messages if m.thread_ts is None]) <= 12
        assert post_to(survivor, webhook(*bodies[0]["alerts"]))[1]["results"][0]["action"] == "unchanged"
        # Slack has the last message before it is recorded and leaves the outbox: wait for that step
        wait_for(lambda: redis_server.client().xlen("threader:ts-outbox:C0ALERTS") == 0, what="an empty outbox")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_replicas_share_one_sender_per_channel_and_see_one_storm(start, slack, redis_server):
    paced_slack(slack)
    replicas = [start(THREAD_STORE="redis", REDIS_URL=redis_server.url, SLACK_PACE="0.2s", STORM_THRESHOLD="10",
                      DELIVERY_WAIT="0.5s") for _ in range(2)]
    barrier = threading.Barrier(16)
    statuses: List[int] = []

    def deliver(i: int) -> None:
        barrier.wait()
        alert = make_alert(name="Shared", instance=f"shared-host-{i:02d}", service=f"svc-{i:02d}")
        statuses.append(replicas[i % 2].alert(webhook(alert), expect=None).status)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 16
    wait_for(lambda: all(named(slack, f"shared-host-{i:02d}") for i in range(16)), timeout=30, what="every alert")
    assert slack.refused == [], "two replicas together stayed within one channel's limit"
    assert all(named(slack, f"shared-host-{i:02d}") == 1 for i in range(16))
    parents = [m for m in slack.messages if m.thread_ts is None]
    digests = [m for m in parents if m.payload["text"].startswith("🌩️ Alert storm")]
    assert len(parents) <= 11 and len(digests) == 1, "the storm was seen across both replicas"


def test_a_storm_of_webhooks_on_redis_is_taken_whole_not_mistaken_for_redis_out_of_reach(start, slack, redis_server):
    """200 groups at once, each waiting for its alerts and asking Redis for them: more requests talking to Redis
    at the same moment than a client's default pool holds."""
    paced_slack(slack)
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.url, SLACK_PACE="0.2s", DELIVERY_WAIT="2s",
                STORM_THRESHOLD="1000")
    outcomes = like_alertmanager(svc.port, storm_of_groups(200, prefix="Pool"))
    assert [(o["status"], o["attempts"]) for o in outcomes] == [(200, 1)] * 200
    assert svc.service.metrics.total("alert_threader_store_errors_total") == 0
    assert "redis unreachable" not in svc.log.getvalue()


def test_redis_out_of_reach_refuses_webhooks_keeps_the_outbox_and_recovers_by_itself(start, slack, redis_server):
    svc = start(THREAD_STORE="redis", REDIS_URL=redis_server.url, DELIVERY_WAIT="0.3s")
    svc.alert(webhook(make_alert(name="BeforeOutage")))
    slack.fail_always("chat.postMessage", {"status": 503})
    assert svc.alert(webhook(make_alert(name="Waiting"))).json()["results"][0]["action"] == "queued"
    redis_server.pause()  # out of reach (a network split, a stalled server): answers time out
    try:
        answer = svc.alert(webhook(make_alert(name="DuringOutage")), expect=503).json()
        assert "redis unreachable" in answer["error"], "nowhere to keep it: Alertmanager keeps it and retries"
        health = svc.get("/health")
        assert health.status == 503
        assert health.json()["status"] == "degraded" and health.json()["redis_status"] == "disconnected"
        assert "redis unreachable" in svc.log.getvalue()
        slack.fail_always("chat.postMessage", None)  # Slack is back; still nothing is posted that cannot be recorded
        tried = svc.service.metrics.total("alert_threader_store_errors_total", op="sender")
        wait_for(lambda: svc.service.metrics.total("alert_threader_store_errors_total", op="sender") >= tried + 2,
                 what="the sender to try Redis again, twice, after Slack came back")
        assert named(slack, "Waiting") == 0
    finally:
        redis_server.resume()
    wait_for(lambda: svc.get("/health").status == 200, what="the service to reconnect by itself")
    assert svc.alert(webhook(make_alert(name="DuringOutage"))).json()["results"][0]["action"] == "posted"
    wait_for(lambda: named(slack, "Waiting") == 1, what="the alert that waited in the outbox")
    settled(svc)
    assert [named(slack, name) for name in ("BeforeOutage", "Waiting", "DuringOutage")] == [1, 1, 1]


# ---------------------------------------------------------------------------
# End to end with a real Alertmanager
# ---------------------------------------------------------------------------

class Alertmanager:
    """Debian's prometheus-alertmanager on a free port, sending webhooks to the threader."""

    def __init__(self, directory: Path, threader_port: int, token: Optional[str] = None,
                 group_interval: str = "2s", repeat_interval: str = "4s", port: Optional[int] = None,
                 group_by: str = "alertname") -> None:
        binary = require_binary("prometheus-alertmanager")
        self.port = port or free_port()
        auth = (f"\n        http_config:\n          authorization:\n            type: Bearer\n"
                f"            credentials: {token}" if token else "")
        config = directory / "alertmanager.yml"
        self.log_path = directory / "alertmanager.log"
        config.write_text(f"""
route:
  receiver: threader
  group_by: [{group_by}]
  group_wait: 1s
  group_interval: {group_interval}
  repeat_interval: {repeat_interval}
receivers:
  - name: threader
    webhook_configs:
      - url: http://127.0.0.1:{threader_port}/alert
        send_resolved: true{auth}
""")
        (directory / "am-data").mkdir()
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={directory / 'am-data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
                                     stdout=self.log, stderr=self.log)
        wait_for(self.ready, timeout=30, what="Alertmanager to be ready")

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/-/ready")
            return conn.getresponse().status == 200
        return False

    def push(self, *alerts: Dict[str, Any]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", "/api/v2/alerts", json.dumps(list(alerts)), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()

    def counter(self, name: str) -> float:
        """One of Alertmanager's own counters for its webhook integration, summed over its series."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        return sum(float(value) for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
                   if 'integration="webhook"' in labels)

    def failure_reasons(self) -> Dict[str, int]:
        """Why Alertmanager gave notifications up, from its log."""
        self.log.flush()
        reasons: Dict[str, int] = collections.Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if 'msg="Notify for alerts failed"' in line:
                error = re.search(r'err="(.*)"$', line)
                reasons[re.sub(r"after \d+ attempts", "after N attempts", error.group(1) if error else line)] += 1
        return dict(reasons)

    def assert_nothing_failed(self) -> None:
        failed = self.counter("alertmanager_notifications_failed_total")
        if failed:
            pytest.fail(f"Alertmanager counted {failed:g} failed notifications: {self.failure_reasons()}")

    def settle(self, group_interval: float, timeout: float = 120) -> None:
        """Until Alertmanager's webhook counters stand still longer than a notification may last: nothing is in
        flight then, and no failed group waits for its next group_interval."""
        names = ("alertmanager_notifications_total", "alertmanager_notifications_failed_total",
                 "alertmanager_notification_requests_total")
        seen: Dict[str, Any] = {"values": None, "since": time.monotonic()}

        def still() -> bool:
            self.assert_nothing_failed()
            values = [self.counter(name) for name in names]
            if values != seen["values"]:
                seen["values"], seen["since"] = values, time.monotonic()
            time.sleep(0.5)
            return time.monotonic() - seen["since"] > group_interval + 2

        wait_for(still, timeout=timeout, what="Alertmanager's notification counters to stop moving")

    def watch(self, seconds: float) -> None:
        """Let `seconds` pass (a span the test sets, like an outage), checking all along that nothing failed."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.assert_nothing_failed()
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def am_alert(instance: str, ended: bool = False) -> Dict[str, Any]:
    alert = {"labels": {"alertname": "DiskFull", "severity": "warning", "service": "storage",
                        "cluster": "prod-eu", "instance": instance},
             "annotations": {"summary": f"Disk full on {instance}", "description": "Less than 1% free."},
             "generatorURL": "http://prometheus.example.com:9090/graph"}
    if ended:
        alert["endsAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    return alert


def webhooks_answered(svc: Running, code: str = "200") -> float:
    return svc.service.metrics.value("alert_threader_webhooks_total", code=code)


def test_alertmanager_group_changes_repeats_and_resolves_make_exactly_four_messages(start, slack, tmp_path):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    am = Alertmanager(tmp_path, svc.port, token=WEBHOOK_TOKEN)
    try:
        am.push(am_alert("node1"))
        wait_for(lambda: len(slack.messages) == 1, timeout=30, what="the parent message")
        am.push(am_alert("node1"), am_alert("node2"))  # a group change
        wait_for(lambda: len(slack.messages) == 2, timeout=30, what="the reply for node2")
        seen = webhooks_answered(svc)
        wait_for(lambda: webhooks_answered(svc) >= seen + 3, timeout=40, what="several repeat notifications")
        am.push(am_alert("node1", ended=True), am_alert("node2", ended=True))
        wait_for(lambda: len(slack.messages) == 4, timeout=30, what="both resolved replies")
        am.settle(group_interval=2)  # nothing in flight, nothing failed: no re-send can come
        parent, reply, *done = slack.messages
        assert len(slack.messages) == 4
        assert parent.thread_ts is None and reply.thread_ts == parent.ts
        assert sorted(m.payload["text"] for m in done) == ["✅ RESOLVED — Disk full on node1",
                                                             "✅ RESOLVED — Disk full on node2"]
        assert all(m.thread_ts == parent.ts for m in done)
        assert webhooks_answered(svc, "401") == 0
    finally:
        am.stop()


def test_while_slack_is_down_alertmanager_is_answered_200_and_every_alert_arrives_once(start, slack, tmp_path):
    svc = start(DELIVERY_WAIT="0.5s")
    slack.fail_always("chat.postMessage", {"status": 503})
    am = Alertmanager(tmp_path, svc.port)
    try:
        am.push(am_alert("node1"), am_alert("node2"), am_alert("node3"))
        wait_for(lambda: webhooks_answered(svc) >= 2, timeout=40, what="Alertmanager's notifications, taken")
        assert slack.messages == [] and webhooks_answered(svc, "503") == 0
        slack.fail_always("chat.postMessage", None)
        wait_for(lambda: len(slack.messages) == 3, timeout=60, what="every alert after Slack is back")
        seen = webhooks_answered(svc)
        wait_for(lambda: webhooks_answered(svc) >= seen + 2, timeout=40, what="later repeat notifications")
        texts = sorted(m.text.splitlines()[0] for m in slack.messages)
        assert len(slack.messages) == 3 and len(set(texts)) == 3
        assert webhooks_answered(svc, "503") == 0, "Alertmanager never had to retry"
    finally:
        am.stop()


def limited_like_slack(slack: FakeSlack) -> None:
    """Slack's own limits: one message a second per channel with a burst of 5; edits and reactions 50 a minute."""
    slack.limits = {"chat.postMessage": (1.0, 5), "chat.update": (50 / 60, 5), "reactions.add": (50 / 60, 5)}


def host_alert(alertname: str, instance: str, service: str, summary: str, resolved: bool = False) -> Dict[str, Any]:
    alert = {"labels": {"alertname": alertname, "severity": "critical", "service": service, "cluster": "prod-eu",
                        "instance": instance},
             "annotations": {"summary": summary, "description": f"{alertname} on {instance}."},
             "generatorURL": "http://prometheus.example.com:9090/graph"}
    if resolved:
        alert["endsAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    return alert


def wait_until_named(slack: FakeSlack, am: Alertmanager, names: List[str], timeout: float, what: str) -> None:
    """Poll until every name is in an accepted message; fail at once if Alertmanager gives a notification up."""
    def done() -> bool:
        am.assert_nothing_failed()
        time.sleep(0.2)
        return all(named(slack, name) for name in names)

    wait_for(done, timeout=timeout, what=what)


def test_a_200_group_storm_from_alertmanager_fails_no_notification_and_names_each_host_once(start, slack, tmp_path):
    """Alertmanager abandons a webhook not answered within its notification context (10 s with group_interval 10s)
    and counts it in alertmanager_notifications_failed_total, which kube-prometheus-stack alerts on."""
    limited_like_slack(slack)
    svc = start(SLACK_PACE="1s", DELIVERY_WAIT=None, SLACK_TIMEOUT=None)  # as deployed: the defaults
    am = Alertmanager(tmp_path, svc.port, group_interval="10s", repeat_interval="1h", group_by="alertname, instance")
    try:
        hosts = [f"rack7-host-{i:03d}:9100" for i in range(200)]
        am.push(*[host_alert("NodeDown", host, f"node-{i:03d}", f"Node down: {host}") for i, host in enumerate(hosts)])
        # As Alertmanager really sends a storm: every group's first notification at once, group_wait after the push.
        wait_for(lambda: am.counter("alertmanager_notifications_total") >= 200, timeout=10,
                 what="Alertmanager to start notifying all 200 groups")
        wait_until_named(slack, am, hosts, timeout=150, what="every host to be named in Slack")
        am.settle(group_interval=10)
        assert am.counter("alertmanager_notifications_failed_total") == 0, am.failure_reasons()
        assert {host: n for host in hosts if (n := named(slack, host)) != 1} == {}, "each host is told exactly once"
        assert len([m for m in slack.messages if m.thread_ts is None]) <= 12 and len(slack.messages) <= 30
    finally:
        am.stop()


def test_a_60s_slack_outage_fails_no_notification_and_every_alert_arrives_once_after(start, slack, tmp_path):
    limited_like_slack(slack)
    svc = start(SLACK_PACE="1s", DELIVERY_WAIT=None, SLACK_TIMEOUT=None)
    am = Alertmanager(tmp_path, svc.port, group_interval="10s", repeat_interval="1h", group_by="alertname, instance")

    def disk(n: int, service: str, resolved: bool = False) -> Dict[str, Any]:
        return host_alert("DiskFull", f"outage-host-{n:02d}:9100", service, f"Disk full on outage-host-{n:02d}",
                          resolved)

    def naming(messages: List[Call], n: int) -> Call:
        return next(m for m in messages if f"outage-host-{n:02d}:" in json.dumps(m.payload))

    try:
        am.push(disk(1, "db"), disk(2, "web"), disk(3, "cache"))
        wait_until_named(slack, am, [f"outage-host-{n:02d}:" for n in (1, 2, 3)], timeout=30,
                         what="the three threads before the outage")
        posted_before = len(slack.messages)
        parent_of = {service: naming(slack.messages, n) for service, n in (("db", 1), ("web", 2), ("cache", 3))}
        slack.fail_always("chat.postMessage", {"status": 503})
        began = time.monotonic()
        notified_before = am.counter("alertmanager_notifications_total")
        waves = [[disk(4, "queue"), disk(5, "db")],  # a new thread, and a new alert in db's thread
                 [disk(6, "search"), disk(2, "web", resolved=True)],  # a new thread, and web's alert resolves
                 [disk(7, "cache"), disk(8, "mail")]]
        for i, wave in enumerate(waves):  # at 0 s, 20 s and 40 s into the outage
            am.watch(began + i * 60 / len(waves) - time.monotonic())
            am.push(*wave)
        am.watch(began + 60 - time.monotonic())
        assert am.counter("alertmanager_notifications_total") - notified_before >= 6, "notified through the outage"
        health = svc.get("/health").json()
        assert health["status"] == "degraded" and health["outbox"]["waiting"] == 6
        slack.fail_always("chat.postMessage", None)
        wait_until_named(slack, am, [f"outage-host-{n:02d}:" for n in (4, 5, 6, 7, 8)], timeout=90,
                         what="every alert of the outage after Slack is back")
        wait_for(lambda: am.assert_nothing_failed() or named(slack, "outage-host-02:") >= 2, timeout=30,
                 what="web's resolve")
        am.settle(group_interval=10)
        assert am.counter("alertmanager_notifications_failed_total") == 0, am.failure_reasons()
        assert [named(slack, f"outage-host-{n:02d}:") for n in range(1, 9)] == [1, 2, 1, 1, 1, 1, 1, 1]
        after = slack.messages[posted_before:]
        assert naming(after, 5).thread_ts == parent_of["db"].ts, "db's new alert is a reply in db's thread"
        assert naming(after, 7).thread_ts == parent_of["cache"].ts, "so is cache's, in cache's"
        resolve = naming(after, 2)
        assert resolve.thread_ts == parent_of["web"].ts and resolve.payload["text"].startswith("✅")
        assert [naming(after, n).thread_ts for n in (4, 6, 8)] == [None] * 3, "three new threads"
    finally:
        am.stop()


def test_alertmanager_with_the_wrong_token_is_refused(start, slack, tmp_path):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    am = Alertmanager(tmp_path, svc.port, token="not-the-right-token-at-all")
    try:
        am.push(am_alert("node1"))
        wait_for(lambda: webhooks_answered(svc, "401") >= 1, timeout=30, what="a refused webhook")
        assert slack.calls == []
    finally:
        am.stop()


# ---------------------------------------------------------------------------
# The parent as a live status card, reactions, links
# ---------------------------------------------------------------------------

def card_status_line(call: Call) -> str:
    """The card's status as a reader sees it (dates by their written form)."""
    return at.slack_tokens_drawn(next(b["text"]["text"] for b in call.payload["attachments"][0]["blocks"]
                                      if b["type"] == "section"
                                      and b.get("text", {}).get("text", "").startswith("*Status:*")))


def test_status_card_follows_fire_resolve_one_resolve_both_and_reopen(start, slack):
    svc = start(REOPEN_WINDOW="30m")
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a, b))
    parent = slack.messages[0]
    assert card_status_line(parent) == "*Status:* 🔥 1 firing · 0 resolved · since 2024-01-15 14:30:25 UTC"
    settled(svc)
    svc.alert(webhook(resolved(a), b))
    settled(svc)
    svc.alert(webhook(resolved(a), resolved(b)))
    settled(svc)
    reopened = make_alert(instance="db01", starts="2024-01-15T14:50:00Z")  # 4.5 min after the close
    answer = svc.alert(webhook(reopened)).json()
    assert answer["results"][0]["action"] == "reopened"
    settled(svc)
    updates = slack.accepted("chat.update")
    assert [u.payload["ts"] for u in updates] == [parent.ts] * 4
    assert [card_status_line(u) for u in updates] == [
        "*Status:* 🔥 2 firing · 0 resolved · since 2024-01-15 14:30:25 UTC",
        "*Status:* 🔥 1 firing · 1 resolved · since 2024-01-15 14:30:25 UTC",
        "*Status:* ✅ 2 alerts resolved after 15m 5s",
        "*Status:* 🔥 1 firing · 1 resolved · since 2024-01-15 14:30:25 UTC · reopened 1×"]
    assert [u.payload["attachments"][0]["color"] for u in updates] == ["#E01E5A", "#E01E5A", "#2EB67D", "#E01E5A"]
    closed_header = updates[2].payload["attachments"][0]["blocks"][0]["text"]["text"]
    assert closed_header == "✅ RESOLVED — DatabaseDown on db01"
    assert "*Instance:*\ndb01" in updates[2].text, "the card keeps the first alert's details"
    [reaction] = slack.accepted("reactions.add")
    assert reaction.payload == {"channel": "C0ALERTS", "timestamp": parent.ts, "name": "white_check_mark"}
    refire = slack.messages[-1]
    assert refire.thread_ts == parent.ts and refire.payload["text"].startswith("🚨 FIRING AGAIN — ")
    assert len(slack.messages) == 5  # parent, reply, two resolved, firing again


def test_status_card_failures_never_fail_the_delivery(start, slack):
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a))
    slack.fail_always("chat.update", {"status": 500})
    slack.fail_always("reactions.add", {"error": "missing_scope"})
    assert svc.alert(webhook(a, b)).json()["results"][1]["action"] == "replied"
    svc.alert(webhook(resolved(a), resolved(b)))
    svc.alert(webhook(make_alert(name="Other")))
    svc.alert(webhook(resolved(make_alert(name="Other"))))
    settled(svc, cards=False)  # the cards Slack cannot edit now stay due: they are tried again later
    assert len(slack.messages) == 6
    assert svc.get("/health").status == 200
    wait_for(lambda: len([c for c in slack.calls if c.method == "reactions.add"]) >= 2, what="both ✅ tried")
    log = svc.log.getvalue()
    assert log.count("give the Slack app the reactions:write scope") == 1, "said once, not per thread"


@pytest.mark.parametrize("error", ["channel_not_found", "not_in_channel", "is_archived"])
def test_cards_slack_can_never_edit_show_on_health_with_the_fix(start, slack, error):
    svc = start()
    slack.fail_always("chat.update", {"error": error})
    svc.alert(webhook(make_alert(instance="db01")))
    assert svc.alert(webhook(make_alert(instance="db02"))).json()["results"][0]["action"] == "replied"
    settled(svc)
    health = svc.get("/health")
    assert health.status == 503 and health.json()["status"] == "degraded"
    problem = health.json()["card_updates"]
    assert problem["method"] == "chat.update" and problem["error"] == error
    assert problem["fix"] == at.CONFIGURATION_ERRORS[error]
    assert f"Slack refuses to edit the status cards; they stay as first posted method=chat.update error={error}" \
        in svc.log.getvalue()
    slack.fail_always("chat.update", None)  # fixed (the bot invited back): the next edit clears it
    svc.alert(webhook(make_alert(instance="db03")))
    settled(svc)
    assert svc.get("/health").status == 200


def test_reopen_outside_the_window_starts_a_new_thread(start, slack):
    svc = start(REOPEN_WINDOW="30m")
    alert = make_alert()
    svc.alert(webhook(alert))
    svc.alert(webhook(resolved(alert)))
    later_alert = make_alert(starts="2024-01-15T15:16:00Z")  # 30.5 min after 14:45:30
    assert svc.alert(webhook(later_alert)).json()["results"][0]["action"] == "posted"
    assert slack.messages[-1].thread_ts is None and len(slack.messages) == 3


def test_reopen_window_is_measured_by_alert_times_not_arrival(start, slack):
    svc = start(REOPEN_WINDOW="30m")
    alert = make_alert()
    svc.alert(webhook(alert))
    svc.alert(webhook(resolved(alert)))
    inside = make_alert(starts="2024-01-15T15:15:00Z")  # 29.5 min after the end, however late it arrives
    assert svc.alert(webhook(inside)).json()["results"][0]["action"] == "reopened"
    assert slack.messages[-1].thread_ts == slack.messages[0].ts


def test_late_copy_of_a_resolved_alert_does_not_reopen(start, slack):
    svc = start()
    alert = make_alert()
    svc.alert(webhook(alert))
    svc.alert(webhook(resolved(alert)))
    svc.alert(webhook(alert))  # an HA peer's stale copy of the same episode
    assert len(slack.messages) == 2


def test_silence_button_prefills_the_alert_labels_even_with_special_characters():
    labels = {"alertname": 'Disk "full"', "instance": "host:9100", "path": "C:\\data", "team": "a&b=c{d}#e",
              "note": "über 100%"}
    url = at.silence_url("http://am.example.com:9093/", labels)
    assert url.startswith("http://am.example.com:9093/#/silences/new?filter=")
    assert at.is_http_url(url)
    matchers = urllib.parse.unquote(url.split("filter=", 1)[1])
    assert matchers == ('{alertname="Disk \\"full\\"", instance="host:9100", note="über 100%", '
                        'path="C:\\\\data", team="a&b=c{d}#e"}')
    assert at.silence_url("javascript:alert(1)", labels) is None
    huge = dict(labels, blob="x" * 5000)
    short = urllib.parse.unquote(at.silence_url("http://am:9093", huge).split("filter=", 1)[1])
    assert short == '{alertname="Disk \\"full\\"", instance="host:9100"}'


def silence_matchers(payload: Dict[str, Any]) -> str:
    buttons = next(b for b in payload["attachments"][0]["blocks"] if b["type"] == "actions")
    url = next(e["url"] for e in buttons["elements"] if e["action_id"] == "silence")
    return urllib.parse.unquote(url.split("filter=", 1)[1])


def test_a_cards_silence_link_covers_every_alert_of_its_thread_not_only_the_first(start, slack):
    svc = start()
    svc.alert(webhook(make_alert(instance="db01.example.com")))
    parent = slack.messages[0]
    assert 'instance="db01.example.com"' in silence_matchers(parent.payload), "one alert: that alert exactly"
    svc.alert(webhook(make_alert(instance="db02.example.com")))
    settled(svc)
    card = [u for u in slack.accepted("chat.update") if u.payload["ts"] == parent.ts][-1]
    assert "2 firing" in card.text
    assert silence_matchers(card.payload) == ('{alertname="DatabaseDown", cluster="prod-eu", service="database", '
                                              'severity="critical"}'), "the thread's key: db01 and db02 alike"
    reply = slack.messages[1]
    assert 'instance="db02.example.com"' in silence_matchers(reply.payload), "a reply silences its own alert"


def test_alertmanager_url_setting_overrides_external_url(start, slack):
    svc = start(ALERTMANAGER_URL="https://alertmanager.public.example.com")
    svc.alert(webhook(make_alert()))
    buttons = next(b for b in slack.messages[0].payload["attachments"][0]["blocks"] if b["type"] == "actions")
    silence = next(e for e in buttons["elements"] if e["action_id"] == "silence")
    assert silence["url"].startswith("https://alertmanager.public.example.com/#/silences/new?filter=")


# ---------------------------------------------------------------------------
# Channel routing
# ---------------------------------------------------------------------------

def test_channel_routing_posts_to_allowed_channels_with_threads_per_channel(start, slack):
    svc = start(SLACK_CHANNELS="C0DBTEAM,C0NETTEAM")
    alert = make_alert()
    svc.alert(webhook(alert))
    svc.alert(webhook(alert), channel="C0DBTEAM")
    svc.alert(webhook(resolved(alert)), channel="C0DBTEAM")
    default_parent, team_parent, team_resolved = slack.messages
    assert default_parent.payload["channel"] == "C0ALERTS" and default_parent.thread_ts is None
    assert team_parent.payload["channel"] == "C0DBTEAM" and team_parent.thread_ts is None
    assert team_resolved.payload["channel"] == "C0DBTEAM" and team_resolved.thread_ts == team_parent.ts
    threads = svc.get("/cache").json()["threads"]
    assert threads["DatabaseDown|critical|database|prod-eu|production"]["status"] == "open"
    assert threads["C0DBTEAM:DatabaseDown|critical|database|prod-eu|production"]["status"] == "closed"


def test_channel_not_in_the_allow_list_is_400_naming_it(start, slack):
    svc = start(SLACK_CHANNELS="C0DBTEAM")
    answer = svc.alert(webhook(make_alert()), channel="C0SECRET", expect=400)
    assert answer.json() == {"ok": False, "error": "channel 'C0SECRET' is not in SLACK_CHANNELS"}
    assert slack.calls == []


# ---------------------------------------------------------------------------
# Storms
# ---------------------------------------------------------------------------

def storm_alerts(count: int, prefix: str = "Storm") -> List[Dict[str, Any]]:
    return [make_alert(name=f"{prefix}{i:04d}", instance=f"node{i % 7}", severity=("critical", "warning")[i % 2])
            for i in range(count)]


def test_storm_of_1000_alerts_is_one_digest_thread(start, slack):
    svc = start(STORM_THRESHOLD="10")
    alerts = storm_alerts(1000)
    answer = svc.alert(webhook(*alerts)).json()
    messages = slack.messages
    parent, replies = messages[0], messages[1:]
    assert len(messages) == 51 and len(slack.calls) == 51
    assert parent.thread_ts is None and all(r.thread_ts == parent.ts for r in replies)
    assert parent.payload["text"].startswith("🌩️ Alert storm: 1,000 alerts")
    assert "🚨 critical: 500" in parent.text and "⚠️ warning: 500" in parent.text
    listed = "\n".join(r.text for r in replies)
    for alert in alerts:
        assert listed.count(f"*{alert['labels']['alertname']}*") == 1
    assert {r["action"] for r in answer["results"]} == {"digest"}
    assert {r["thread_ts"] for r in answer["results"]} == {parent.ts}
    for reply in replies:
        assert_within_slack_limits(reply.payload)
    assert_within_slack_limits(parent.payload)
    svc.alert(webhook(*alerts))  # Alertmanager repeats the group
    assert len(slack.calls) == 51


def test_storm_of_2000_alerts_costs_about_a_hundred_calls_and_resolves_in_the_digest(start, slack):
    svc = start()
    alerts = storm_alerts(2000)
    svc.alert(webhook(*alerts))
    assert len(slack.messages) == 101
    parent = slack.messages[0]
    # A plan sees the oldest PLAN_WINDOW (1,000) alerts: the parent counts those, its card catches up.
    assert parent.payload["text"].startswith("🌩️ Alert storm: 1,000 alerts")
    wait_for(lambda: "2,000 alerts" in card_of(slack, parent.ts), what="the card counting them all")
    answer = svc.alert(webhook(*[resolved(a) for a in alerts])).json()
    resolves = slack.messages[101:]
    assert len(resolves) == 100 and all(m.thread_ts == parent.ts for m in resolves)
    assert all(m.text.startswith("✅ 20 resolved") for m in resolves)
    assert {r["action"] for r in answer["results"]} == {"replied"}
    settled(svc)
    # The digest's card is edited once its alerts are told, not after each of its replies.
    update = slack.accepted("chat.update")[-1]
    assert len(slack.accepted("chat.update")) <= 3, "not an edit per reply"
    assert update.payload["ts"] == parent.ts and update.payload["attachments"][0]["color"] == "#2EB67D"
    assert "Alert storm over: all 2,000 alerts resolved" in update.text
    assert [r.payload["timestamp"] for r in slack.accepted("reactions.add")] == [parent.ts]
    assert len(slack.calls) < 210


def test_a_storm_over_a_threshold_above_the_planning_window_is_still_one_digest(start, slack):
    # A plan sees the oldest 1,000 alerts; with STORM_THRESHOLD at 1,500 it must see more, or 2,000 new
    # alerts would never be more than the threshold and each would open a thread.
    svc = start(STORM_THRESHOLD="1500")
    svc.alert(webhook(*storm_alerts(2000)))
    settled(svc)
    tops = [m for m in slack.messages if m.thread_ts is None]
    assert len(tops) == 1 and tops[0].payload["text"].startswith("🌩️ Alert storm: 2,000 alerts")
    assert len(slack.messages) == 101


def test_storm_interrupted_by_slack_is_finished_when_it_returns_without_repeating(start, slack):
    svc = start(DELIVERY_WAIT="0.5s")
    alerts = storm_alerts(300)
    slack.fail("chat.postMessage", *([{}] * 6))
    slack.fail_always("chat.postMessage", {"status": 503})
    # After six accepted messages (parent and five batches) Slack goes down.
    first = svc.alert(webhook(*alerts)).json()
    wait_for(lambda: not slack.scripts["chat.postMessage"], what="the six messages before Slack went down")
    assert len(slack.messages) == 6
    assert {r["action"] for r in first["results"]} <= {"digest", "queued"}
    repeat = svc.alert(webhook(*alerts)).json()  # Alertmanager's repeat while Slack is down
    assert sum(r["action"] == "unchanged" for r in repeat["results"]) == 100, "the told ones are told already"
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    assert {r["action"] for r in svc.alert(webhook(*alerts)).json()["results"]} == {"unchanged"}
    parent, *replies = slack.messages
    assert len(replies) == 15 and all(r.thread_ts == parent.ts for r in replies)
    listed = "\n".join(r.text for r in replies)
    assert all(listed.count(f"*{a['labels']['alertname']}*") == 1 for a in alerts)
    # The parent was drawn with every alert waiting for it: the card already told the storm's size.
    assert "300 alerts firing" in parent.text and slack.accepted("chat.update") == []


def test_few_new_alerts_are_not_a_storm(start, slack):
    svc = start(STORM_THRESHOLD="10")
    svc.alert(webhook(*storm_alerts(10)))
    assert len(slack.messages) == 10 and all(m.thread_ts is None for m in slack.messages)


# ---------------------------------------------------------------------------
# The worst outage: one pacer per channel, storms across webhooks, resolves in bulk
# ---------------------------------------------------------------------------

def make_record(status: str = "open", alerts: Optional[Dict[str, List[Any]]] = None, ended: Optional[float] = None,
                digest: Optional[str] = None) -> Dict[str, Any]:
    record: Dict[str, Any] = {"ts": "1.1", "channel": "C0ALERTS", "key": "k", "status": status,
                              "alerts": alerts or {}, "ended": ended}
    if digest:
        record["digest"] = digest
    return record


def parsed(alert: Dict[str, Any]) -> at.Alert:
    return at.parse_webhook(json.dumps({"alerts": [alert]}).encode()).alerts[0]


STARTS = at.parse_time("2024-01-15T14:30:25Z")
ENDS = at.parse_time("2024-01-15T14:45:30Z")
FIRING_A = make_alert(fingerprint="aaaa")


@pytest.mark.parametrize("record, alert, window, step", [
    (None, FIRING_A, 1800, at.POST),
    (None, resolved(FIRING_A), 1800, at.ORPHAN),
    (make_record(), FIRING_A, 1800, at.REPLY),
    (make_record(alerts={"aaaa": ["f", STARTS, None]}), FIRING_A, 1800, at.UNCHANGED),
    (make_record(alerts={"aaaa": ["f", STARTS, None]}), make_alert(fingerprint="aaaa", starts="2024-01-15T15:00:00Z"),
     1800, at.REFIRE),
    (make_record(alerts={"aaaa": ["f", STARTS, None]}), resolved(FIRING_A), 1800, at.RESOLVE),
    (make_record(alerts={"aaaa": ["r", STARTS, ENDS]}), resolved(FIRING_A), 1800, at.UNCHANGED),
    (make_record(alerts={"aaaa": ["f", STARTS + 600, None]}), resolved(FIRING_A), 1800, at.UNCHANGED),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS), FIRING_A, 1800, at.UNCHANGED),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS),
     make_alert(fingerprint="aaaa", starts="2024-01-15T15:00:00Z"), 1800, at.REOPEN),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS),
     make_alert(fingerprint="aaaa", starts="2024-01-15T15:16:00Z"), 1800, at.POST),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS),
     make_alert(fingerprint="aaaa", starts="2024-01-15T15:00:00Z"), 0, at.POST),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS), make_alert(fingerprint="bbbb", starts=
     "2024-01-15T14:50:00Z"), 1800, at.REOPEN),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS, digest="storm|C0ALERTS"),
     make_alert(fingerprint="aaaa", starts="2024-01-15T15:00:00Z"), 1800, at.REOPEN),
    (make_record("closed", {"aaaa": ["r", STARTS, ENDS]}, ENDS), resolved(make_alert(fingerprint="bbbb")), 1800,
     at.RESOLVE),
])
def test_what_one_alert_does_to_its_thread_is_decided_from_the_record_alone(record, alert, window, step):
    assert at.decide(record, parsed(alert), window) == step


# ---------------------------------------------------------------------------
# The plan: what a channel's backlog does, decided by pure functions (no socket, no clock)
# ---------------------------------------------------------------------------

ITEM_IDS = iter(range(1, 1_000_000))
PLANNED_AT = 1_800_000_000.0  # "now" for the plans below
RULES = at.Rules(MS, storm_threshold=10, storm_window=60.0, pace=1.0)


def waiting_item(name: str = "DatabaseDown", status: str = "firing", instance: str = "db01",
                 received: float = PLANNED_AT - 1, starts: str = "2024-01-15T14:30:25Z") -> at.Item:
    """An alert as it waits in the outbox of C0ALERTS."""
    alert = make_alert(name=name, instance=instance, starts=starts)
    parsed_alert = parsed(resolved(alert) if status == "resolved" else alert)
    key = "|".join([parsed_alert.labels.get(n, "") for n in at.KEY_LABELS] + ["production"])
    item = at.outbox_item(parsed_alert, "C0ALERTS", key, key, "http://am.example.com", {}, received)
    item.id = f"{int(received * 1000)}-{next(ITEM_IDS)}"
    return item


def thread_of(*items: at.Item) -> Dict[str, Any]:
    """The stored record of a thread that told these alerts already."""
    record = at.new_record(items[0].alert, items[0].thread_key, "C0ALERTS", "", PLANNED_AT - 600)
    record["ts"] = "1700000000.000001"
    for item in items:
        at.apply_step(record, item.alert, at.REPLY if item.alert.status == "firing" else at.RESOLVE, PLANNED_AT - 600)
    return record


def open_digest() -> Dict[str, Any]:
    message = at.digest_parent("storm|C0ALERTS", "C0ALERTS", [], MS, PLANNED_AT - 60)
    return dict(message.records["storm|C0ALERTS"], ts="1700000000.000009")


def plan(backlog: List[at.Item], records: Optional[Dict[str, Any]] = None, state: Optional[at.ChannelState] = None,
         now: float = PLANNED_AT, **rules: Any) -> at.Plan:
    return at.plan_turn(backlog, records or {}, "C0ALERTS", state or at.ChannelState(),
                        dataclasses.replace(RULES, **rules), now)


def kinds(planned: at.Plan) -> List[str]:
    return [message.kind for message in planned.messages]


@pytest.mark.parametrize("was_storm, waiting, arrived, storm", [
    (False, 0, 0, False), (False, 10, 10, False), (False, 11, 0, True), (False, 0, 11, True),
    (True, 6, 0, True), (True, 0, 6, True), (True, 5, 5, False), (True, 0, 0, False)])
def test_storm_mode_starts_on_the_backlog_or_the_arrivals_and_ends_only_when_both_have_fallen(
        was_storm, waiting, arrived, storm):
    assert at.storm_mode(was_storm, waiting, arrived, threshold=10) is storm


def test_the_plan_gives_a_few_new_alerts_of_a_quiet_channel_threads_of_their_own():
    backlog = [waiting_item(f"New{i}") for i in range(3)]
    planned = plan(backlog)
    assert kinds(planned) == ["open"] * 3 and not planned.storm
    assert [[(item.id, action) for item, action in m.done] for m in planned.messages] == [
        [(item.id, "posted")] for item in backlog]
    assert [m.records[m.target]["status"] for m in planned.messages] == ["open"] * 3
    assert all(m.payload["text"].startswith("🚨 [CRITICAL] New") and "thread_ts" not in m.payload
               for m in planned.messages)


def test_a_backlog_of_more_new_threads_than_the_threshold_opens_the_digest_then_joins_it():
    backlog = [waiting_item(f"New{i:02d}") for i in range(11)]
    first = plan(backlog)
    assert first.storm and kinds(first) == ["digest"] and first.messages[0].done == []
    assert first.messages[0].payload["text"].startswith("🌩️ Alert storm: 11 alerts")
    digest = dict(first.messages[0].records["storm|C0ALERTS"], ts="1700000000.000009")
    second = plan(backlog, {"storm|C0ALERTS": digest}, at.ChannelState(storm=True, arrivals=first.arrivals))
    [joined] = second.messages
    assert joined.kind == "lines" and joined.payload["thread_ts"] == digest["ts"]
    assert [(item.id, action) for item, action in joined.done] == [(item.id, "digest") for item in backlog]
    members = {key: record for key, record in joined.records.items() if key != "storm|C0ALERTS"}
    assert len(members) == 11 and {m["digest"] for m in members.values()} == {"storm|C0ALERTS"}
    assert len(joined.records["storm|C0ALERTS"]["members"]) == 11


def test_new_threads_arriving_faster_than_the_threshold_are_a_storm_even_when_few_wait():
    arrivals = {f"Earlier{i}|critical|database|prod-eu|production": PLANNED_AT - 30 for i in range(10)}
    planned = plan([waiting_item("Newcomer")], state=at.ChannelState(arrivals=arrivals))
    assert planned.storm and kinds(planned) == ["digest"]
    assert len(planned.arrivals) == 11


def test_the_storm_does_not_end_because_the_digest_took_its_alerts_only_when_the_window_passed():
    members = {f"Member{i}|critical|database|prod-eu|production": PLANNED_AT - 50 for i in range(11)}
    during = plan([waiting_item("Late")], {"storm|C0ALERTS": open_digest()}, at.ChannelState(True, members))
    assert during.storm and kinds(during) == ["lines"], "a newcomer joins the digest while they still count"
    gone = {key: PLANNED_AT - 61 for key in members}
    after = plan([waiting_item("Later")], {"storm|C0ALERTS": open_digest()}, at.ChannelState(True, gone))
    assert not after.storm and kinds(after) == ["open"] and after.arrivals == {
        "Later|critical|database|prod-eu|production": PLANNED_AT - 1}


def test_a_digest_held_open_for_weeks_keeps_its_counts_but_not_every_resolved_member(monkeypatch):
    """One alert that never resolves keeps the channel's digest open through later storms: their resolved alerts
    become counts, so that the record (rewritten at every digest post) stays the size of what still fires."""
    monkeypatch.setattr(at, "DIGEST_MEMBERS_KEPT", 50)
    digest = dict(open_digest(), members={f"fp{i}": ["r" if i else "f", f"Old{i % 3}", "warning"] for i in range(60)})
    before = at.digest_counts(digest)
    late = waiting_item("Late")
    arrivals = {f"Member{i}|critical|database|prod-eu|production": PLANNED_AT - 50 for i in range(11)}
    [message] = plan([late], {"storm|C0ALERTS": digest}, at.ChannelState(True, arrivals)).messages
    stored = message.records["storm|C0ALERTS"]
    assert set(stored["members"]) == {"fp0", late.alert.fingerprint}
    total, resolved, by_name, by_severity = at.digest_counts(stored)
    assert (total, resolved) == (before[0] + 1, before[1]) == (61, 59)
    assert by_name == {**before[2], "Late": 1} and by_severity == {"warning": 60, "critical": 1}
    assert stored["status"] == "open" and "61 alerts" in json.dumps(at.render_digest(stored, "C0ALERTS", MS))


def test_an_alert_that_fired_and_resolved_while_waiting_is_told_once_as_both():
    fired, gone = waiting_item("Flap"), waiting_item("Flap", status="resolved")
    [parent] = plan([fired, gone]).messages
    assert parent.kind == "open" and parent.records[fired.key]["status"] == "closed"
    assert parent.payload["text"].startswith("✅ RESOLVED — ") and parent.cards == {fired.key: (False, True)}
    assert sorted(item.id for item, _ in parent.done) == sorted([fired.id, gone.id])
    first = waiting_item("Flap", instance="db00")
    again, again_gone = waiting_item("Flap", instance="db02"), waiting_item("Flap", status="resolved", instance="db02")
    [reply] = plan([again, again_gone], {first.key: thread_of(first)}).messages
    assert reply.kind == "reply" and reply.payload["text"].startswith("✅ RESOLVED — Flap on db02")
    assert "Fired and resolved before it could be posted" in visible_text(reply.payload)
    assert [action for _, action in reply.done] == ["replied", "replied"]
    assert reply.records[first.key]["status"] == "open", "db00 still fires"


def test_a_busy_thread_holds_its_next_alerts_to_share_one_compact_reply():
    first = waiting_item("Busy", instance="db00")
    records = {first.key: thread_of(first)}
    state = at.ChannelState(sent={first.key: [(PLANNED_AT - 3, False), (PLANNED_AT - 2, False),
                                              (PLANNED_AT - 1, False)]})
    backlog = [waiting_item("Busy", instance=f"db{i:02d}", received=PLANNED_AT - 1) for i in (1, 2)]
    held = plan(backlog, records, state)
    assert held.messages == [] and held.wake_at == PLANNED_AT - 1 + at.HOLD
    due = plan(backlog, records, state, now=held.wake_at)
    assert kinds(due) == ["compact"] and len(due.messages[0].done) == 2
    full = [waiting_item("Busy", instance=f"db{i:02d}", received=PLANNED_AT - 1) for i in range(1, 21)]
    assert kinds(plan(full, records, state)) == ["compact"], "twenty lines make a message: it goes at once"
    assert kinds(plan(backlog, records, state, pace=0.0)) == ["reply", "reply"], "with pacing off nothing is busy"
    after_compact = at.ChannelState(sent={first.key: [(PLANNED_AT - 8, True)]})
    assert plan(backlog, records, after_compact).messages == [], "after a compact reply it stays busy a while"
    quiet = at.ChannelState(sent={first.key: [(PLANNED_AT - 11, True)]})
    assert kinds(plan(backlog, records, quiet)) == ["reply", "reply"], "quiet for BUSY_WINDOW: replies again"


@pytest.mark.parametrize("count, expected", [(1, ["reply"]), (3, ["reply"] * 3), (4, ["compact"]),
                                             (45, ["compact"] * 3)])
def test_a_quiet_thread_takes_a_few_alerts_as_replies_of_their_own_and_more_as_compact_ones(count, expected):
    first = waiting_item("Many", instance="db000")
    backlog = [waiting_item("Many", instance=f"db{i:03d}") for i in range(1, count + 1)]
    planned = plan(backlog, {first.key: thread_of(first)})
    assert kinds(planned) == expected
    assert sum(len(m.done) for m in planned.messages) == count
    assert planned.messages[-1].records[first.key]["alerts"].keys() == {a.alert.fingerprint
                                                                        for a in [first, *backlog]}


def test_copies_of_a_new_alert_waiting_together_open_one_thread():
    """Two Alertmanagers that are not clustered send the same alert, their startsAt a second apart."""
    first, copy = waiting_item("Twice"), waiting_item("Twice", starts="2024-01-15T14:30:24Z")
    assert first.alert.fingerprint == copy.alert.fingerprint
    for backlog in ([first, copy], [copy, first]):
        planned = plan(backlog)
        assert kinds(planned) == ["open"]
        told = [item.id for item, _ in planned.messages[0].done] + [item.id for item, _ in planned.unchanged]
        assert sorted(told) == sorted([first.id, copy.id]), "each copy is told once: posted or unchanged"


def test_a_resolve_and_a_new_episode_waiting_together_close_the_thread_then_open_a_new_one():
    """Slack was away while the alert resolved and, past REOPEN_WINDOW, fired again."""
    told = waiting_item("Episode")
    record = thread_of(told)
    gone = waiting_item("Episode", status="resolved")
    again = waiting_item("Episode", starts="2024-01-15T16:00:00Z")  # 75 min after it ended: a new thread
    first = plan([gone, again], {told.key: record})
    assert kinds(first) == ["reply"] and [item.id for item, _ in first.messages[0].done] == [gone.id]
    assert first.messages[0].records[told.key]["status"] == "closed" and first.unchanged == []
    second = plan([again], {told.key: dict(first.messages[0].records[told.key])})
    assert kinds(second) == ["open"] and [item.id for item, _ in second.messages[0].done] == [again.id]


def test_a_message_that_cannot_be_drawn_is_sent_as_plain_text_naming_its_alerts():
    logged = io.StringIO()
    at.setup_logging(make_config({}), logged)
    item = waiting_item("Undrawable", instance="<!channel>")

    def fails() -> at.Drawn:
        raise ValueError("a layout bug")
    reply = at.Message("reply", item.key, fails, {item.key: thread_of(item)}, [(item, "replied")])
    plain = at.drawable(reply, "C0ALERTS")
    assert plain.done == [(item, "standalone")] and plain.records == {} and "thread_ts" not in plain.payload
    assert plain.payload["text"].startswith("⚠️ alert-threader could not lay out 1 alert")
    assert "alertname=Undrawable" in plain.payload["text"] and "instance=&lt;!channel&gt;" in plain.payload["text"]
    parent = at.drawable(at.Message("digest", "storm|C0ALERTS", fails, {"storm|C0ALERTS": open_digest()}),
                         "C0ALERTS")
    assert parent.records == {"storm|C0ALERTS": open_digest()} and "could not lay out" in parent.payload["text"]
    assert logged.getvalue().count("ValueError: a layout bug") == 2, "each failure is logged with its traceback"
    many = [waiting_item(f"Undrawable{i:02d}", status=status, instance="x" * 500) for i in range(20)
            for status in ("firing", "resolved")]  # a compact reply's most: 20 alerts, fired and resolved
    plain = at.drawable(at.Message("compact", "k", fails, {}, [(i, "replied") for i in many]), "C0ALERTS")
    text = plain.payload["text"]
    assert all(f"alertname=Undrawable{i:02d}" in text for i in range(20)) and len(text) <= 3900
    assert text.count("🔥") == text.count("✅") == 20


@pytest.mark.parametrize("name", ["storm", "orphans"])
def test_an_alert_named_like_the_digest_or_the_standalone_resolves_is_told_in_its_own_thread(name):
    """Apache Storm's alerts: a thread key "storm|critical|…" is a thread, not the digest."""
    first = waiting_item(name, instance="db00")
    records = {first.key: thread_of(first)}
    second, gone = waiting_item(name, instance="db01"), waiting_item(name, status="resolved", instance="db00")
    planned = plan([second, gone], records)
    assert kinds(planned) == ["reply", "reply"] and first.key.startswith(f"{name}|critical|")
    assert [m.payload["thread_ts"] for m in planned.messages] == [records[first.key]["ts"]] * 2
    assert planned.messages[0].payload["text"].startswith(f"🚨 [CRITICAL] {name} on db01")
    assert planned.messages[1].payload["text"].startswith("✅ RESOLVED — ")
    assert set(planned.messages[-1].records[first.key]["alerts"]) == {a.alert.fingerprint for a in (first, second)}


def test_alerts_a_plan_fails_for_only_together_are_all_told_as_plain_text(monkeypatch):
    logged = io.StringIO()
    at.setup_logging(make_config({}), logged)
    real_plan = at.plan_turn

    def plan_turn(backlog: List[at.Item], *args: Any) -> at.Plan:
        if len(backlog) > 1:
            raise RuntimeError("a bug that needs two alerts")
        return real_plan(backlog, *args)
    monkeypatch.setattr(at, "plan_turn", plan_turn)
    backlog = [waiting_item("One"), waiting_item("Two")]
    planned = at.plan_sparing(backlog, {}, "C0ALERTS", at.ChannelState(), RULES, PLANNED_AT)
    [plain] = planned.messages
    assert [item.id for item, _ in plain.done] == [item.id for item in backlog]
    assert "alertname=One" in plain.payload["text"] and "alertname=Two" in plain.payload["text"]
    assert logged.getvalue().count("RuntimeError: a bug that needs two alerts") == 2


def test_repeats_are_told_already_and_resolves_without_a_thread_go_standalone():
    told = waiting_item("Told")
    record = thread_of(told)
    planned = plan([told], {told.key: record})
    assert planned.messages == [] and planned.unchanged == [(told, record["ts"])]
    [lone] = plan([waiting_item("Lone", status="resolved")]).messages
    assert lone.kind == "standalone" and lone.payload["text"].startswith("✅ RESOLVED — Lone")
    many = plan([waiting_item(f"Gone{i:02d}", status="resolved") for i in range(25)])
    assert kinds(many) == ["standalone", "standalone"]
    assert many.messages[0].payload["text"].startswith("✅ 20 resolved")


def test_broadcast_and_mentions_are_the_plans_choices():
    ms = dataclasses.replace(MS, broadcast=("resolve",), mentions=at.parse_mentions("severity=critical:<!here>"))
    first = waiting_item("Loud")
    [resolve] = plan([waiting_item("Loud", status="resolved")], {first.key: thread_of(first)}, messages=ms).messages
    assert resolve.payload.get("reply_broadcast") is True
    [parent] = plan([waiting_item("Louder")], messages=ms).messages
    assert parent.payload["text"].startswith("<!here> ")


def paced_slack(slack: FakeSlack, per_second: float = 5.0) -> None:
    """Slack's limits, five times faster (the service is paced five times faster too: SLACK_PACE=0.2s)."""
    slack.limits = {"chat.postMessage": (per_second, 5), "chat.update": (per_second * 50 / 60, 5),
                    "reactions.add": (per_second * 50 / 60, 5)}


def like_alertmanager(port: int, bodies: List[Dict[str, Any]], path: str = "/alert",
                      cap: float = 60.0, spread: float = 0.0) -> List[Dict[str, Any]]:
    """Post every body at once (or their starts spread evenly over `spread` seconds), each on its own
    connection; re-send on a 5xx after Alertmanager's back-off."""
    outcomes: List[Dict[str, Any]] = [{"attempts": 0, "status": None} for _ in bodies]
    begin = time.monotonic()

    def send(i: int) -> None:
        time.sleep(max(0.0, begin + spread * i / len(bodies) - time.monotonic()))
        started, backoff = time.monotonic(), 0.5
        while time.monotonic() - started < cap:
            outcomes[i]["attempts"] += 1
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", path, json.dumps(bodies[i]), {"Content-Type": "application/json"})
                response = conn.getresponse()
                outcomes[i]["status"], outcomes[i]["body"] = response.status, json.loads(response.read())
                conn.close()
            except (OSError, http.client.HTTPException, ValueError):
                outcomes[i]["status"] = "error"
            if outcomes[i]["status"] == 200:
                return
            time.sleep(backoff)
            backoff = min(backoff * 1.5, 60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(cap + 60)
    return outcomes


def named(slack: FakeSlack, name: str) -> int:
    """In how many accepted messages an alert's unique name appears."""
    return sum(name in json.dumps(m.payload) for m in slack.messages)


def test_posts_to_a_channel_take_turns_shared_by_every_worker(start, slack):
    paced_slack(slack)
    svc = start(SLACK_PACE="0.2s", STORM_THRESHOLD="100")
    barrier = threading.Barrier(12)
    answers: List[Answer] = []

    def send(i: int) -> None:
        barrier.wait()
        answers.append(svc.alert(webhook(make_alert(name=f"Turn{i:02d}")), expect=None))

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(a.status for a in answers) == [200] * 12
    assert len(slack.messages) == 12 and slack.refused == [], "Slack never had to refuse one"
    assert time.monotonic() - started >= (12 - 3) * 0.2 * 0.9, "at most a burst of 3, then one every 0.2s"
    metrics = svc.get("/metrics").text
    waited = re.search(r'alert_threader_slack_wait_seconds_total\{bucket="post:C0ALERTS"\} (\S+)', metrics)
    assert waited and float(waited.group(1)) > 1.0


def test_a_429_holds_the_channel_back_for_every_worker_within_the_budget(start, slack):
    svc = start(SLACK_PACE="0.01s", STORM_THRESHOLD="100")
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 1})
    barrier = threading.Barrier(5)
    answers: List[Answer] = []

    def send(i: int) -> None:
        barrier.wait()
        answers.append(svc.alert(webhook(make_alert(name=f"Held{i}")), expect=None))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(5)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(a.status for a in answers) == [200] * 5 and len(slack.messages) == 5
    posts = [c for c in slack.calls if c.method == "chat.postMessage"]
    refused_at = next(i for i, c in enumerate(posts) if not c.accepted)
    assert len(posts) == 6, "the 429 was the only refusal: no worker went on sending into it"
    assert time.monotonic() - started >= 1.0 and refused_at < 5
    assert 'alert_threader_slack_refused_total{method="chat.postMessage"} 1' in svc.get("/metrics").text


def storm_of_groups(count: int, prefix: str = "Rack") -> List[Dict[str, Any]]:
    """A rack going dark: one Alertmanager group, and one webhook, per host."""
    return [webhook(make_alert(name="NodeDown", instance=f"{prefix}-host-{i:03d}:9100", service=f"node-{i:03d}"),
                    group_key=f'{{}}:{{alertname="NodeDown", instance="{prefix}-host-{i:03d}:9100"}}')
            for i in range(count)]


def test_a_storm_across_200_webhooks_is_one_calm_digest_and_nothing_is_lost_or_doubled(start, slack, tmp_path):
    paced_slack(slack)
    svc = start(SLACK_PACE="0.2s", MAX_CONNECTIONS="256", DELIVERY_WAIT="0.4s")
    bodies = storm_of_groups(200)
    outcomes = like_alertmanager(svc.port, bodies)
    assert [o["status"] for o in outcomes] == [200] * 200
    assert all(o["attempts"] == 1 for o in outcomes), "each answered at once, never told to retry"
    on_disk = at.FileStore(str(tmp_path / "threads.json"), at.Metrics(), read_only=True)
    waiting = {item.key for item in on_disk.waiting("C0ALERTS")}
    assert all(o["body"]["results"][0]["key"] in set(on_disk.items()) | waiting for o in outcomes), \
        "answered 200 only once on disk: in a thread, or in the outbox"
    settled(svc, timeout=60)
    posts = slack.messages
    assert len(posts) <= 30, f"{len(posts)} messages in the channel"
    assert slack.refused == [] or len(slack.refused) <= 0.02 * len(slack.calls)
    for i in range(200):
        assert named(slack, f"Rack-host-{i:03d}:9100") == 1, f"host {i} told {named(slack, f'Rack-host-{i:03d}:9100')}x"
    parents = [m for m in posts if m.thread_ts is None]
    digest = next(m for m in parents if m.payload["text"].startswith("🌩️ Alert storm"))
    assert len(parents) <= 12, "a few threads of their own, then the storm's digest"
    members = 200 - (len(parents) - 1)
    wait_for(lambda: f"{members} alerts firing" in card_of(slack, digest.ts), what="the digest card to count them all")
    # The rack comes back: 200 resolves from 200 webhooks land in batches, and the digest closes.
    outcomes = like_alertmanager(svc.port, [webhook(*[resolved(a) for a in b["alerts"]], group_key=b["groupKey"])
                                            for b in bodies])
    assert [o["status"] for o in outcomes] == [200] * 200
    settled(svc, timeout=60)
    replies = [m for m in slack.messages[len(posts):] if m.thread_ts == digest.ts]
    assert 10 <= len(replies) <= 25 and all(m.text.startswith("✅ ") for m in replies)
    assert len(slack.messages) - len(posts) <= 30
    wait_for(lambda: f"Alert storm over: all {members} alerts resolved" in card_of(slack, digest.ts),
             what="the digest card to close")
    assert digest.ts in [r.payload["timestamp"] for r in slack.accepted("reactions.add")]


def card_of(slack: FakeSlack, ts: str) -> str:
    """What a parent shows now: its last edit, or the message as posted."""
    edits = [u for u in slack.accepted("chat.update") if u.payload.get("ts") == ts]
    if edits:
        return edits[-1].text
    return next(m.text for m in slack.messages if m.ts == ts)


def test_the_storm_ends_when_the_rate_falls(start, slack):
    svc = start(STORM_THRESHOLD="3", STORM_WINDOW="1s")
    svc.alert(webhook(*storm_alerts(5)))
    assert slack.messages[0].payload["text"].startswith("🌩️ Alert storm")
    time.sleep(1.2)  # the window passes with no new alert
    answer = svc.alert(webhook(make_alert(name="AfterTheStorm"))).json()
    assert answer["results"][0]["action"] == "posted" and slack.messages[-1].thread_ts is None


def test_a_digest_member_firing_again_reopens_into_its_digest(start, slack):
    svc = start(STORM_THRESHOLD="3", REOPEN_WINDOW="30m")
    alerts = storm_alerts(5)
    svc.alert(webhook(*alerts))
    digest = slack.messages[0]
    svc.alert(webhook(*[resolved(a) for a in alerts]))
    wait_for(lambda: "Alert storm over: all 5 alerts resolved" in card_of(slack, digest.ts), what="the close")
    again = make_alert(name="Storm0002", instance="node2", severity="critical", starts="2024-01-15T14:50:00Z")
    answer = svc.alert(webhook(again)).json()
    assert answer["results"][0]["action"] == "reopened" and answer["results"][0]["thread_ts"] == digest.ts
    refire = slack.messages[-1]
    assert refire.thread_ts == digest.ts and "*Storm0002*" in refire.text and "firing again" in refire.text
    wait_for(lambda: "1 alerts firing" in card_of(slack, digest.ts) and "reopened 1×" in card_of(slack, digest.ts),
             what="the digest to reopen")


def test_the_digest_counts_stay_right_when_a_member_joins_a_storm_waiting_for_slack(start, slack):
    svc = start(STORM_THRESHOLD="10", DELIVERY_WAIT="0.3s")
    alerts = storm_alerts(12)
    slack.fail("chat.postMessage", {})
    slack.fail_always("chat.postMessage", {"status": 503})
    svc.alert(webhook(*alerts[:11]))  # the digest's parent is posted, then Slack goes down
    wait_for(lambda: len(slack.messages) == 1, what="the digest's parent")
    svc.alert(webhook(*alerts))  # Alertmanager's next notification, one more alert in the group by now
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    answer = svc.alert(webhook(*alerts)).json()
    assert {(r["action"], r["thread_ts"]) for r in answer["results"]} == {("unchanged", slack.messages[0].ts)}
    digest, *lines = slack.messages
    assert all(m.thread_ts == digest.ts for m in lines)
    assert all(sum(f"*{a['labels']['alertname']}*" in m.text for m in lines) == 1 for a in alerts)
    wait_for(lambda: "12 alerts firing" in card_of(slack, digest.ts), what="the card to count the newcomer")
    svc.alert(webhook(*[resolved(a) for a in alerts]))
    wait_for(lambda: "Alert storm over: all 12 alerts resolved" in card_of(slack, digest.ts), what="the close")
    assert "✅ 12 resolved" in card_of(slack, digest.ts)


def test_500_orphan_resolves_cost_at_most_30_messages_and_each_alert_is_named(start, slack):
    paced_slack(slack)
    svc = start(SLACK_PACE="0.2s")
    alerts = [resolved(make_alert(name=f"Lost{i:03d}")) for i in range(500)]
    assert {r["action"] for r in svc.alert(webhook(*alerts)).json()["results"]} == {"standalone"}
    assert len(slack.messages) <= 30 and all(m.thread_ts is None for m in slack.messages)
    assert all(named(slack, f"Lost{i:03d}") == 1 for i in range(500))
    assert svc.alert(webhook(*alerts)).json()["results"][0]["action"] == "unchanged"
    # From many webhooks at once, as after a restart without state:
    many = [webhook(resolved(make_alert(name=f"Gone{i:03d}")), group_key=f"g{i}") for i in range(120)]
    before = len(slack.messages)
    outcomes = like_alertmanager(svc.port, many)
    assert [o["status"] for o in outcomes] == [200] * 120
    settled(svc)
    assert len(slack.messages) - before <= 30 and all(named(slack, f"Gone{i:03d}") == 1 for i in range(120))


def test_one_resolve_with_no_thread_is_still_a_message_of_its_own(start, slack):
    svc = start()
    svc.alert(webhook(resolved(make_alert())))
    [message] = slack.messages
    assert message.payload["text"].startswith("✅ RESOLVED — ") and "*Instance:*" in message.text


# ---------------------------------------------------------------------------
# The outbox: answered at once, told at Slack's pace, nothing lost
# ---------------------------------------------------------------------------

def test_a_new_alert_of_a_known_thread_is_answered_queued_with_its_thread_while_slack_is_down(start, slack):
    svc = start(DELIVERY_WAIT="0.3s")
    svc.alert(webhook(make_alert(instance="db01")))
    parent = slack.messages[0]
    slack.fail_always("chat.postMessage", {"status": 503})
    answer = svc.alert(webhook(make_alert(instance="db01"), make_alert(instance="db02"))).json()
    assert [(r["action"], r["thread_ts"]) for r in answer["results"]] == [("unchanged", parent.ts),
                                                                         ("queued", parent.ts)]
    stats = svc.get("/stats").json()
    assert stats["outbox"]["waiting"] == 1 and stats["outbox"]["channels"]["C0ALERTS"]["waiting"] == 1
    assert stats["delivered"] == 1 and stats["alerts"]["posted"] == 1
    [waiting] = svc.get("/cache").json()["outbox"]["channels"]["C0ALERTS"]["alerts"]
    assert waiting["key"] == "DatabaseDown|critical|database|prod-eu|production" and waiting["status"] == "firing"
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    assert len(slack.messages) == 2, "the reply, once Slack is back"
    assert slack.messages[1].thread_ts == parent.ts and "db02" in slack.messages[1].text
    stats = svc.get("/stats").json()
    assert stats["outbox"]["waiting"] == 0 and stats["delivered"] == 2 and stats["alerts"]["replied"] == 1


def test_an_alert_that_fired_and_resolved_while_slack_was_down_is_one_message(start, slack):
    svc = start(DELIVERY_WAIT="0.2s")
    slack.fail_always("chat.postMessage", {"status": 503})
    flap = make_alert(name="Flapping")
    assert svc.alert(webhook(flap)).json()["results"][0]["action"] == "queued"
    assert svc.alert(webhook(resolved(flap))).json()["results"][0]["action"] == "queued"
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    [message] = slack.messages
    assert message.thread_ts is None and message.payload["text"].startswith("✅ RESOLVED — Flapping")
    assert "✅ 1 alert resolved after 15m 5s" in message.text and message.payload["attachments"][0]["color"] == "#2EB67D"
    assert [r.payload["timestamp"] for r in slack.accepted("reactions.add")] == [message.ts]
    assert svc.alert(webhook(resolved(flap))).json()["results"][0]["action"] == "unchanged"


def test_an_alert_the_plan_fails_for_is_told_as_plain_text_and_the_rest_of_the_channel_goes_on(start, slack,
                                                                                                monkeypatch):
    """A bug in planning, met by one alert, must not stop its channel for ever (the bug is put in here)."""
    real_decide = at.decide

    def decide(record: Optional[Dict[str, Any]], alert: at.Alert, window: float) -> str:
        if alert.alertname == "Unreadable":
            raise RuntimeError("a planning bug")
        return real_decide(record, alert, window)
    monkeypatch.setattr(at, "decide", decide)
    svc = start()
    answer = svc.alert(webhook(make_alert(name="Unreadable", instance="db01")))
    assert answer.status == 200 and answer.json()["results"][0]["action"] == "standalone"
    [plain] = slack.messages
    assert plain.thread_ts is None and plain.payload["text"].startswith("⚠️ alert-threader could not plan 1 alert")
    assert "alertname=Unreadable" in plain.payload["text"] and "instance=db01" in plain.payload["text"]
    assert svc.alert(webhook(make_alert(name="Fine"))).json()["results"][0]["action"] == "posted"
    assert slack.messages[-1].payload["text"].startswith("🚨 [CRITICAL] ") and svc.get("/health").status == 200
    assert svc.log.getvalue().count("cannot plan some alerts of channel C0ALERTS") == 1
    assert "RuntimeError: a planning bug" in svc.log.getvalue()


def test_a_backlog_longer_than_a_plan_takes_is_told_window_after_window_each_alert_once(start, slack, monkeypatch):
    """A plan looks at the oldest PLAN_WINDOW alerts only (its cost must not grow with the backlog): the rest are
    told in the turns after, in the same thread."""
    monkeypatch.setattr(at, "PLAN_WINDOW", 7)
    svc = start()
    answer = svc.alert(webhook(*[make_alert(instance=f"window-{i:02d}") for i in range(30)]))
    assert {r["thread_ts"] for r in answer.json()["results"]} == {slack.messages[0].ts}
    [parent] = [m for m in slack.messages if m.thread_ts is None]
    assert all(named(slack, f"window-{i:02d}") == 1 for i in range(30))
    assert all(m.thread_ts == parent.ts for m in slack.messages[1:]) and len(slack.messages) <= 1 + 30 // 6


def test_a_thread_whose_alerts_keep_coming_gets_its_card_edited_at_most_every_few_seconds(start, slack):
    svc = start(SLACK_PACE="0.2s")  # a card at most every 3 paces: 0.6 s
    paced_slack(slack)
    svc.alert(webhook(make_alert(instance="db00")))
    parent = slack.messages[0]
    began = time.monotonic()
    for i in range(1, 16):
        svc.alert(webhook(make_alert(instance=f"db{i:02d}")))
    settled(svc)
    elapsed = time.monotonic() - began
    edits = [u.at for u in slack.accepted("chat.update") if u.payload["ts"] == parent.ts]
    assert all(later - earlier >= 0.6 * 0.95 for earlier, later in zip(edits, edits[1:])), edits
    assert len(edits) <= 1 + elapsed / 0.6 and "16 firing" in card_of(slack, parent.ts)


def test_alerts_of_one_thread_arriving_spread_out_share_replies_once_it_is_busy(start, slack):
    paced_slack(slack, per_second=10)
    svc = start(SLACK_PACE="0.1s", DELIVERY_WAIT="0.2s")  # busy: 3 messages in 1 s; then held up to 0.5 s
    bodies = [webhook(make_alert(name="NodeDown", instance=f"spread-{i:02d}")) for i in range(40)]
    assert [o["status"] for o in like_alertmanager(svc.port, bodies, spread=2.0)] == [200] * 40  # over 2 s
    settled(svc)
    assert all(named(slack, f"spread-{i:02d}") == 1 for i in range(40))
    [parent] = [m for m in slack.messages if m.thread_ts is None]
    assert len(slack.messages) <= 15, f"{len(slack.messages)} messages for 40 alerts, not one each"
    assert any(m.text.startswith("🔥 ") for m in slack.messages), "the busy thread's alerts shared compact replies"


def test_a_storm_arriving_spread_out_is_one_digest_and_ends_only_when_the_rate_falls(start, slack):
    paced_slack(slack, per_second=10)
    svc = start(SLACK_PACE="0.1s", STORM_THRESHOLD="5", STORM_WINDOW="3s", DELIVERY_WAIT="0.2s")
    bodies = [webhook(make_alert(name="Spread", service=f"svc-{i:02d}", instance=f"host-{i:02d}")) for i in range(30)]
    assert [o["status"] for o in like_alertmanager(svc.port, bodies, spread=1.5)] == [200] * 30  # more than 5 in 3 s
    settled(svc)
    parents = [m for m in slack.messages if m.thread_ts is None]
    digests = [m for m in parents if m.payload["text"].startswith("🌩️ Alert storm")]
    assert len(digests) == 1 and len(parents) <= 7, [m.payload["text"] for m in parents]
    assert all(named(slack, f"host-{i:02d}") == 1 for i in range(30))
    # The digest took every alert, yet the storm goes on while they arrived within STORM_WINDOW:
    svc.alert(webhook(make_alert(name="StillStorming", service="svc-late")))
    last_arrival = time.monotonic()
    settled(svc)
    assert svc.service.delivery.senders.storming() == ["C0ALERTS"]
    assert slack.messages[-1].thread_ts == digests[0].ts, "a newcomer during the storm joins the digest"
    time.sleep(max(0.0, last_arrival + 3.2 - time.monotonic()))  # STORM_WINDOW passes with no new thread
    svc.alert(webhook(make_alert(name="AfterTheStorm", service="svc-after")))
    settled(svc)
    assert slack.messages[-1].thread_ts is None and "AfterTheStorm" in slack.messages[-1].text
    assert "alert storm over" in svc.log.getvalue()


def test_in_a_storm_webhooks_are_answered_as_soon_as_stored(start, slack):
    """Its alerts go out in the digest's rhythm, seconds apart: holding the connection DELIVERY_WAIT would only
    pile connections up (one per Alertmanager group)."""
    paced_slack(slack, per_second=10)
    svc = start(SLACK_PACE="0.1s", STORM_THRESHOLD="5", DELIVERY_WAIT="5s")
    svc.alert(webhook(*[make_alert(name="Storm", service=f"svc-{i}", instance=f"host-{i}") for i in range(10)]))
    wait_for(lambda: svc.get("/health").json()["storm"] == ["C0ALERTS"], what="the storm")
    began = time.monotonic()
    answer = svc.alert(webhook(make_alert(name="Storm", service="svc-late", instance="host-late"))).json()
    assert time.monotonic() - began < 1.0 and answer["results"][0]["action"] in ("queued", "digest")
    settled(svc)
    assert named(slack, "host-late") == 1


def test_past_outbox_limit_and_only_then_webhooks_get_503(start, slack):
    svc = start(OUTBOX_LIMIT="3", DELIVERY_WAIT="0.2s")
    slack.fail_always("chat.postMessage", {"status": 503})
    assert svc.alert(webhook(*[make_alert(name=f"Fits{i}") for i in range(2)])).status == 200
    too_many = svc.alert(webhook(make_alert(name="Refused"), make_alert(name="OverTheTop")), expect=503).json()
    assert too_many["ok"] is False and "OUTBOX_LIMIT" in too_many["error"] and too_many["results"] == []
    assert svc.alert(webhook(make_alert(name="Fits2"))).status == 200, "2 waiting and 1 more: 3, the limit"
    assert svc.alert(webhook(make_alert(name="Refused")), expect=503).json()["results"] == []
    never = svc.alert(webhook(*[make_alert(name=f"Huge{i}") for i in range(4)]), expect=413).json()
    assert never["ok"] is False and "4 new alerts in one webhook, more than the outbox holds" in never["error"]
    health = svc.get("/health").json()
    assert health["outbox"]["waiting"] == 3 and any("alerts wait for Slack" in p for p in health["problems"])
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    assert svc.alert(webhook(make_alert(name="Refused"))).json()["results"][0]["action"] == "posted"
    assert "alert_threader_alerts_refused_total 7" in svc.get("/metrics").text.splitlines()


def test_slack_refusing_everything_for_a_while_loses_nothing_and_tells_the_backlog_in_order(start, slack):
    paced_slack(slack, per_second=10)
    svc = start(SLACK_PACE="0.1s", DELIVERY_WAIT="0.2s", STORM_THRESHOLD="10")
    bodies = [webhook(make_alert(name="Backlog", service=f"svc-{i:02d}", instance=f"b-{i:02d}")) for i in range(30)]
    slack.fail_always("chat.postMessage", {"status": 429, "retry_after": 1})
    assert [o["status"] for o in like_alertmanager(svc.port, bodies[:15], spread=0.5)] == [200] * 15
    slack.fail_always("chat.postMessage", {"status": 502})
    assert [o["status"] for o in like_alertmanager(svc.port, bodies[15:], spread=0.5)] == [200] * 15
    assert slack.messages == [] and svc.get("/health").json()["outbox"]["waiting"] == 30
    slack.fail_always("chat.postMessage", None)
    settled(svc, timeout=40)
    assert all(named(slack, f"b-{i:02d}") == 1 for i in range(30))
    first_named = [next(n for n, m in enumerate(slack.messages) if f"b-{i:02d}" in json.dumps(m.payload))
                   for i in range(30)]
    assert first_named == sorted(first_named), "told oldest first"
    assert len(slack.messages) <= 4, "a backlog of 30 new threads is one digest, twenty to a reply"


def test_a_damaged_outbox_entry_is_set_aside_and_reported_and_the_rest_delivered(start, slack, tmp_path):
    store = at.FileStore(str(tmp_path / "threads.json"), at.Metrics())
    good = at.outbox_item(parsed(make_alert(name="Good")), "C0ALERTS", "Good|critical|database|prod-eu|production",
                          "Good|critical|database|prod-eu|production", "", {}, time.time())
    store.enqueue([good], 100)
    store.close()
    epoch = json.loads((tmp_path / "threads.json").read_text())["epoch"]  # the line follows the last fold
    with open(tmp_path / "threads.json.journal", "ab") as journal:
        damaged = {"id": "1-1", "channel": "C0ALERTS", "key": "Bad", "alert": {"status": "exploded"}}
        journal.write(b'{"epoch":%d}\n' % epoch + json.dumps({"enq": [damaged]}).encode() + b"\n")
    svc = start()
    wait_for(lambda: named(slack, "Good") == 1, what="the good alert")
    health = svc.get("/health").json()
    assert health["damaged_entries"]["count"] == 1
    [aside] = (tmp_path / "threads.json.damaged").read_text().splitlines()
    assert json.loads(aside)["entry"]["key"] == "Bad" and "outbox item 1-1" in json.loads(aside)["reason"]
    assert "set aside, the rest is read" in svc.log.getvalue()


def test_what_waits_in_the_outbox_at_a_stop_is_told_after_the_restart(start, slack, tmp_path):
    svc = start(DELIVERY_WAIT="0.2s")
    slack.fail_always("chat.postMessage", {"status": 503})
    assert svc.alert(webhook(make_alert(name="Kept"))).json()["results"][0]["action"] == "queued"
    stop(svc)
    slack.fail_always("chat.postMessage", None)
    again = start()
    wait_for(lambda: named(slack, "Kept") == 1, what="the kept alert after the restart")
    settled(again)
    assert named(slack, "Kept") == 1


def test_start_up_on_a_full_disk_serves_degraded_with_one_clear_line_and_no_traceback(start, slack, tmp_path,
                                                                                    monkeypatch):
    first = start()
    first.alert(webhook(make_alert()))
    stop(first)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(at.os, "fsync", full)
    monkeypatch.setattr(at.os, "fdatasync", full)
    svc = start()
    lines = [line for line in svc.log.getvalue().splitlines() if "cannot write the thread store at start" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in svc.log.getvalue()
    assert svc.get("/health").status == 503
    assert svc.alert(webhook(make_alert(name="Refused")), expect=503).json()["results"] == []
    monkeypatch.undo()
    wait_for(lambda: svc.get("/health").status == 200, what="the store to be written again")
    # The retry is told once: the refused webhook's alert, kept in memory, may have gone out already.
    assert svc.alert(webhook(make_alert(name="Refused"))).json()["results"][0]["action"] in ("posted", "unchanged")
    settled(svc)
    assert named(slack, "Refused") == 1


def test_a_post_slack_took_while_the_disk_filled_is_recorded_once_space_returns_and_never_sent_twice(
        start, slack, tmp_path, monkeypatch):
    """The resolve is stored (its journal line fits), Slack takes it, then the disk is full for its record."""
    svc = start(DELIVERY_WAIT="0.3s")
    alert = make_alert()
    svc.alert(webhook(alert))
    parent = slack.messages[0]
    real = os.fdatasync
    syncs = {"allowed": 1}  # the resolve's own line goes; the record of its post does not

    def filling(fd: int) -> None:
        if syncs["allowed"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        syncs["allowed"] -= 1
        real(fd)

    monkeypatch.setattr(at.os, "fdatasync", filling)
    monkeypatch.setattr(at.os, "fsync", filling)
    assert svc.alert(webhook(resolved(alert))).json()["results"][0]["action"] == "queued"
    wait_for(lambda: any(m.text.startswith("✅ RESOLVED") for m in slack.messages), what="Slack to take it")
    svc.alert(webhook(resolved(alert)), expect=503)  # the store still cannot be written: Alertmanager keeps it
    monkeypatch.undo()  # space returns
    wait_for(lambda: svc.get("/health").status == 200, what="the store to be written again")
    svc.alert(webhook(resolved(alert)))
    settled(svc)
    resolves = [m for m in slack.messages if m.text.startswith("✅ RESOLVED")]
    assert len(resolves) == 1 and resolves[0].thread_ts == parent.ts, "posted once, recorded once space returned"
    stored = at.FileStore.read(str(tmp_path / "threads.json"))
    assert stored["DatabaseDown|critical|database|prod-eu|production"]["status"] == "closed"


def test_a_resolve_refused_on_a_full_disk_lands_in_its_thread_once_space_returns(start, slack, tmp_path, monkeypatch):
    svc = start()
    alert = make_alert()
    svc.alert(webhook(alert))
    parent = slack.messages[0]

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(at.os, "fdatasync", full)
    monkeypatch.setattr(at.os, "fsync", full)
    svc.alert(webhook(resolved(alert)), expect=503)
    svc.alert(webhook(resolved(alert)), expect=503)  # Alertmanager retries
    monkeypatch.undo()
    assert svc.alert(webhook(resolved(alert))).status == 200
    settled(svc)
    resolves = [m for m in slack.messages if m.payload["text"].startswith("✅ RESOLVED")]
    assert len(resolves) == 1 and resolves[0].thread_ts == parent.ts
    assert "✅ 1 alert resolved" in card_of(slack, parent.ts)


# ---------------------------------------------------------------------------
# /preview: the threads drawn as Slack would, without Slack
# ---------------------------------------------------------------------------

class PageText(html.parser.HTMLParser):
    """Text per CSS class, and the links, of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.by_class: Dict[str, List[str]] = collections.defaultdict(list)
        self.links: List[str] = []
        self.stack: List[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: List[Any]) -> None:
        attributes = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "a":
            self.links.append(attributes.get("href", ""))
        if tag not in ("br", "meta"):
            self.stack.append(attributes.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("br", "meta") and self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        for cls in self.stack:
            if cls:
                self.by_class[cls].append(data)


def test_preview_shows_the_threads_that_were_sent(start, slack):
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02", summary="<script>alert(1)</script>")
    svc.alert(webhook(a, b))
    svc.alert(webhook(resolved(a), resolved(b)))
    settled(svc)
    answer = svc.get("/preview")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/html")
    page = PageText()
    page.feed(answer.text)
    assert page.scripts == 0, "alert text never becomes markup"
    headers = page.by_class["h"]
    assert headers[0] == "✅ RESOLVED — DatabaseDown on db01", "the parent shows its latest card"
    assert "🚨 <script>alert(1)</script> · db02" in headers
    assert "✅ RESOLVED — <script>alert(1)</script> · db02" in headers
    assert any("3 replies" in m for m in page.by_class["meta"])
    assert page.by_class["reaction"] == ["✅ 1"]
    assert "https://runbooks.example.com/DatabaseDown" in page.links


def test_preview_in_dry_run_shows_what_would_have_been_sent(tmp_path):
    config = make_config({"PORT": "0", "HOST": "127.0.0.1", "THREAD_STORE_FILE": str(tmp_path / "t.json")})
    at.setup_logging(config, io.StringIO())
    running = Running(at.start_service(config), io.StringIO())
    try:
        running.alert(webhook(make_alert()))
        page = PageText()
        page.feed(running.get("/preview").text)
        assert "Dry-run" in "".join(page.by_class["banner"])
        assert page.by_class["h"] == ["🚨 DatabaseDown on db01.example.com"]
    finally:
        stop(running)


FAKE_CHROMIUM = """#!/usr/bin/env python3
# Stands in for headless Chromium: saves the page's HTML where the screenshot would go.
import sys, urllib.request
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--screenshot="))
open(out, "wb").write(urllib.request.urlopen(sys.argv[-1]).read())
"""


@pytest.mark.parametrize("script", ["screenshot.sh", "screenshot_silenced.py"])
def test_the_screenshot_scripts_draw_the_threads_the_readme_shows(tmp_path, script):
    """The scripts behind the pictures of the README and docs/slack.md still run: the service starts, the clicks land, /preview is fetched."""
    fake = tmp_path / "chromium"
    fake.write_text(FAKE_CHROMIUM.replace("python3", sys.executable, 1))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(CHROMIUM=str(fake), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
    if script.endswith(".py"):
        require_binary("prometheus-alertmanager")
        command = [sys.executable, str(REPO / "examples" / script), str(tmp_path / "shot.png")]
    else:
        require_binary("curl")
        command = ["bash", str(REPO / "examples" / script), str(tmp_path / "shot.png")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    page = PageText()
    page.feed((tmp_path / "shot.png").read_text())
    if script.endswith(".py"):
        card = " ".join(" ".join(page.by_class["ctx"]).split())
        assert "Silenced until" in card and "by bob" in card and "Acknowledged by alice" in card, card
    else:
        assert page.by_class["h"][0] == "✅ RESOLVED — Database Critical Failure", page.by_class["h"]


# ---------------------------------------------------------------------------
# Operations: metrics, logs and the command line
# ---------------------------------------------------------------------------

def test_metrics_count_what_happened_and_pass_promtool(start, slack):
    promtool = require_binary("promtool")
    svc = start(OUTBOX_LIMIT="1", DELIVERY_WAIT="0.3s")
    alert = make_alert()
    svc.alert(webhook(alert))
    svc.alert(webhook(alert, make_alert(instance="db02")))
    settled(svc)
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 0})
    slack.fail_always("chat.postMessage", {"error": "not_in_channel"})
    assert svc.alert(webhook(make_alert(name="Blocked"))).json()["results"][0]["action"] == "queued"
    svc.alert(webhook(make_alert(name="Refused")), expect=503)  # the outbox holds OUTBOX_LIMIT (1) alert
    wait_for(lambda: 'result="not_in_channel"' in svc.get("/metrics").text, what="the refused post counted")
    text = svc.get("/metrics").text
    assert 'alert_threader_outbox_alerts{channel="C0ALERTS"} 1' in text.splitlines()
    oldest = re.search(r'^alert_threader_outbox_oldest_seconds\{channel="C0ALERTS"\} (\S+)$', text, re.M)
    assert oldest and 0 < float(oldest.group(1)) < 30
    slack.fail_always("chat.postMessage", None)
    settled(svc)
    svc.request("POST", "/alert", raw=b"{")
    text = svc.get("/metrics").text
    for line in ('alert_threader_webhooks_total{code="200"} 3', 'alert_threader_webhooks_total{code="503"} 1',
                 'alert_threader_webhooks_total{code="400"} 1',
                 'alert_threader_alerts_total{action="posted",status="firing"} 2',
                 'alert_threader_alerts_total{action="replied",status="firing"} 1',
                 'alert_threader_alerts_total{action="unchanged",status="firing"} 1',
                 "alert_threader_alerts_delivered_total 3", "alert_threader_alerts_refused_total 1",
                 "alert_threader_alerts_dropped_total 0", "alert_threader_delivery_seconds_count 3",
                 'alert_threader_outbox_alerts{channel="C0ALERTS"} 0',
                 'alert_threader_outbox_oldest_seconds{channel="C0ALERTS"} 0',
                 'alert_threader_slack_requests_total{method="chat.postMessage",result="ok"} 3',
                 'alert_threader_slack_requests_total{method="chat.postMessage",result="ratelimited"} 1',
                 'alert_threader_slack_requests_total{method="chat.update",result="ok"} 1',
                 "alert_threader_open_threads 2", "alert_threader_stored_threads 2"):
        assert line in text.splitlines(), line
    assert re.search(r'^alert_threader_build_info\{python="[\d.]+",store="file",version="[\d.]+"\} 1$', text, re.M)
    assert re.search(r'^alert_threader_store_operations_total\{op="append",store="file"\} \d+$', text, re.M)
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == b"", checked.stdout + checked.stderr


def test_one_log_line_per_webhook_and_at_most_one_a_second_per_refusal_or_failure(start, slack):
    svc = start(LOG_LEVEL="info", DELIVERY_WAIT="0.3s", OUTBOX_LIMIT="2")
    svc.alert(webhook(make_alert(), make_alert(instance="db02"), group_key="group-42"))
    slack.fail_always("chat.postMessage", {"error": "not_in_channel"})
    began = time.monotonic()
    svc.alert(webhook(make_alert(name="Blocked"), make_alert(name="Blocked", instance="db02"), group_key="group-43"))
    for _ in range(30):  # Alertmanager retries a 503 at once: thirty refusals
        svc.alert(webhook(make_alert(name="Refused"), group_key="group-44"), expect=503)
    wait_for(lambda: len([c for c in slack.calls if c.method == "chat.postMessage"]) >= 5,
             what="the sender to try the blocked alert a few times")
    elapsed = time.monotonic() - began
    lines = svc.log.getvalue().splitlines()
    hooks = [line for line in lines if " INFO webhook " in line]
    assert len(hooks) == 2
    assert re.search(r"webhook group_key=group-42 channel=C0ALERTS alerts=2 posted=1 replied=1 code=200 "
                     r"duration_ms=[\d.]+$", hooks[0]), hooks[0]
    assert "group_key=group-43" in hooks[1] and "queued=2 code=200" in hooks[1]
    refused = [line for line in lines if "webhook refused" in line]
    assert 1 <= len(refused) <= 1 + elapsed and "code=503" in refused[0] and "outbox full" in refused[0]
    failed = [line for line in lines if "Slack call failed" in line]
    assert 1 <= len(failed) <= 1 + elapsed
    assert "method=chat.postMessage error=not_in_channel" in failed[0] and "/invite @your-app" in failed[0]


def test_json_log_format_for_log_shippers(start, slack):
    svc = start(LOG_FORMAT="json", LOG_LEVEL="info")
    svc.alert(webhook(make_alert(), group_key="g1"))
    entries = [json.loads(line) for line in svc.log.getvalue().splitlines()]
    [hook] = [e for e in entries if e["message"] == "webhook"]
    assert hook["level"] == "info" and hook["group_key"] == "g1" and hook["alerts"] == 1 and hook["code"] == 200
    assert hook["posted"] == 1 and isinstance(hook["duration_ms"], float) and "time" in hook


def test_under_journald_lines_carry_no_timestamp_and_log_level_filters(tmp_path, slack):
    proc, port = start_process(tmp_path, slack, env={"JOURNAL_STREAM": "8:12345", "LOG_LEVEL": "warning"})
    post_to(port, webhook(make_alert()))
    slack.fail("chat.postMessage", {"error": "is_archived"})
    post_to(port, webhook(make_alert(name="Archived")))
    proc.terminate()
    proc.wait(20)
    lines = (tmp_path / "service.log").read_text().splitlines()
    assert lines and all(re.match(r"(WARNING|ERROR) ", line) for line in lines), lines
    assert any("error=is_archived" in line for line in lines)


def test_render_prints_the_exact_payloads_without_network_or_state(start, slack, tmp_path):
    alerts = [make_alert(), make_alert(instance="db02")]
    (tmp_path / "hook.json").write_text(json.dumps(webhook(*alerts)))
    closed_port = free_port()
    result = run_cli("render", str(tmp_path / "hook.json"), cwd=tmp_path,
                     env={"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS",
                          "SLACK_API_URL": f"http://127.0.0.1:{closed_port}/api/"})
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout)
    assert [c["method"] for c in calls] == ["chat.postMessage", "chat.postMessage", "chat.update"]
    assert not (tmp_path / "threads.json").exists()
    svc = start()
    svc.alert(webhook(*alerts))
    settled(svc)
    sent = [c.payload for c in slack.calls]
    rendered = [c["payload"] for c in calls]
    for payload in sent + rendered:
        payload.pop("thread_ts", None)
        payload.pop("ts", None)
    assert rendered == sent


def test_render_prints_every_call_and_one_payload_for_block_kit_builder(tmp_path):
    alerts = [make_alert(name=f"Many{i:03d}") for i in range(350)]
    (tmp_path / "hook.json").write_text(json.dumps(webhook(*alerts)))
    result = run_cli("render", str(tmp_path / "hook.json"), cwd=tmp_path, env={"STORM_THRESHOLD": "1000"})
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout)
    assert len(calls) == 350, "every call, not only the last 300"
    assert "Many000" in visible_text(calls[0]["payload"]) and "Many349" in visible_text(calls[-1]["payload"])
    one = run_cli("render", str(tmp_path / "hook.json"), "--payload", "2", cwd=tmp_path,
                  env={"STORM_THRESHOLD": "1000"})
    builder = json.loads(one.stdout)
    assert set(builder) == {"attachments"} and builder["attachments"] == calls[1]["payload"]["attachments"]
    wrong = run_cli("render", str(tmp_path / "hook.json"), "--payload", "351", cwd=tmp_path,
                    env={"STORM_THRESHOLD": "1000"})
    assert wrong.returncode == 2 and "the webhook makes 350 calls" in wrong.stderr.decode()
    first = run_cli("render", "--payload", "1", str(tmp_path / "hook.json"), cwd=tmp_path,
                    env={"STORM_THRESHOLD": "1000"})
    assert first.returncode == 0 and json.loads(first.stdout)["attachments"] == calls[0]["payload"]["attachments"]


def test_render_tells_several_webhooks_in_order_as_the_thread_unfolds(tmp_path):
    files = [str(REPO / "examples" / f"{name}.json") for name in ("firing", "second-instance", "resolved")]
    result = run_cli("render", *files, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout)
    posts = [c for c in calls if c["method"] == "chat.postMessage"]
    parent = posts[0]
    assert parent["webhook"] == files[0] and "thread_ts" not in parent["payload"]
    replies = posts[1:]
    assert [c["webhook"] for c in replies] == [files[1], files[2], files[2]]
    assert len({c["payload"]["thread_ts"] for c in replies}) == 1, "every reply in the one thread"
    assert "RESOLVED" in replies[-1]["payload"]["text"] and calls[-1]["method"] == "reactions.add"
    assert [c["webhook"] for c in calls] == sorted((c["webhook"] for c in calls), key=files.index), "in order"
    single = json.loads(run_cli("render", files[0], cwd=tmp_path).stdout)
    assert "webhook" not in single[0], "one file: the output keeps its shape"


def test_render_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`render FILE | head`: the pipe closes after the first lines; no traceback, exit 0."""
    (tmp_path / "hook.json").write_text(json.dumps(webhook(*[make_alert(name=f"Many{i:03d}") for i in range(200)])))
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env["STORM_THRESHOLD"] = "1000"
    proc = subprocess.Popen([sys.executable, str(REPO / "alert_threader.py"), "render", str(tmp_path / "hook.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), env=env)
    assert proc.stdout.read(100).startswith(b"[")
    proc.stdout.close()  # far more than a pipe's buffer is still to come
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_render_refuses_a_bad_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"alerts": [{"labels": {"severity": 1}}]}')
    result = run_cli("render", str(tmp_path / "bad.json"), cwd=tmp_path)
    assert result.returncode == 1 and "alerts[0].labels.severity must be a string" in result.stderr.decode()
    assert run_cli("render", cwd=tmp_path).returncode == 2


def test_start_asks_slack_whether_the_token_works_and_the_bot_is_in_the_channel(start, slack, tmp_path):
    svc = start()
    assert [(c.method, c.payload.get("channel")) for c in slack.checks] == [
        ("auth.test", None), ("conversations.info", "C0ALERTS")]
    assert 'Slack token works team="Test Team" bot=threader' in svc.log.getvalue()
    assert "not a member" not in svc.log.getvalue() and not slack.calls, "a check is no alert's call"
    slack.members = False
    outside = start(THREAD_STORE_FILE=str(tmp_path / "other.json"))
    assert ("WARNING threader is not a member of SLACK_CHANNEL C0ALERTS: invite it with /invite @threader"
            in outside.log.getvalue())


@pytest.mark.parametrize("error", ["invalid_auth", "not_authed", "account_inactive"])
def test_a_token_slack_refuses_stops_the_start_with_the_fix(slack, tmp_path, error):
    slack.fail("auth.test", {"error": error})
    env = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url, "PORT": "0"}
    result = run_cli(cwd=tmp_path, env=env)
    assert result.returncode == 2
    fix = at.CONFIGURATION_ERRORS[error]
    assert result.stderr.decode().splitlines() == [
        f"alert-threader: SLACK_BOT_TOKEN: Slack refuses it: {error} ({fix})"]
    assert not (tmp_path / "threads.json").exists() and SLACK_TOKEN not in result.stderr.decode()


def test_a_slack_out_of_reach_at_start_is_a_warning_and_the_service_starts(start, tmp_path):
    svc = start(SLACK_API_URL=f"http://127.0.0.1:{free_port()}/api/", DELIVERY_WAIT="0.5s")
    assert "WARNING cannot check the Slack token now; starting anyway" in svc.log.getvalue()
    answer = svc.alert(webhook(make_alert()))
    assert answer.status == 200 and answer.json()["results"][0]["action"] == "queued"


def test_a_user_token_is_named_at_start(start, slack):
    svc = start(SLACK_BOT_TOKEN="xoxp-1234-5678-abcdefabcdef")
    assert "SLACK_BOT_TOKEN is not a bot token (xoxb-)" in svc.log.getvalue()


def test_dry_run_with_a_token_checks_it_posts_nothing_paces_nothing_and_counts_no_slack_success(start, slack):
    svc = start(DRY_RUN="true", SLACK_PACE="1s", DELIVERY_WAIT="2s")
    assert [c.method for c in slack.checks] == ["auth.test", "conversations.info"]
    assert "DRY-RUN: DRY_RUN is set, so nothing is posted to Slack" in svc.log.getvalue()
    # Eight new threads at once: paced, the sixth and later would wait past DELIVERY_WAIT and be "queued".
    barrier = threading.Barrier(8)

    def send(i: int) -> Any:
        barrier.wait()
        return svc.alert(webhook(make_alert(name=f"DryRun{i}"))).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert [a["results"][0]["action"] for a in answers] == ["posted"] * 8
    assert not slack.calls, "nothing reaches Slack"
    stats = svc.get("/stats").json()["slack"]
    assert stats["calls_ok"] == 0 and stats["calls_dry_run"] >= 8 and stats["calls_failed"] == 0
    metrics = svc.get("/metrics").text
    assert 'alert_threader_slack_requests_total{method="chat.postMessage",result="dry_run"}' in metrics
    assert 'result="ok"' not in metrics
    assert svc.get("/health").json()["slack_status"] == "dry-run"


def test_dry_run_must_be_true_or_false(tmp_path):
    result = run_cli(cwd=tmp_path, env={"DRY_RUN": "maybe"})
    assert result.returncode == 2 and result.stderr.decode().splitlines() == [
        "alert-threader: DRY_RUN: 'maybe' is not true or false (use 1 or 0)"]


def test_check_asks_slack_whether_the_token_works(slack, tmp_path):
    env = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url}
    ok = run_cli("check", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stdout
    assert "slack: OK: the token works (team Test Team, bot user threader)" in ok.stdout.decode()
    assert "WARNING" not in ok.stdout.decode()
    assert [c.method.split("?")[0] for c in slack.checks] == ["auth.test", "conversations.info"] and not slack.calls
    # What start-up warns about, check reports too (and fails): a bot outside the channel, a person's token.
    slack.members = False
    outside = run_cli("check", cwd=tmp_path, env=env)
    assert outside.returncode == 1 and ("slack: WARNING: threader is not a member of SLACK_CHANNEL C0ALERTS: invite "
                                        "it with /invite @threader") in outside.stdout.decode(), outside.stdout
    slack.members = True
    person = run_cli("check", cwd=tmp_path, env=dict(env, SLACK_BOT_TOKEN="xoxp-1111-2222-PersonToken"))
    assert person.returncode == 1 and "slack: WARNING: SLACK_BOT_TOKEN is not a bot token" in person.stdout.decode()
    slack.fail("auth.test", {"error": "invalid_auth"})
    bad = run_cli("check", cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert "slack: FAILED: invalid_auth. Fix: copy the app's Bot User OAuth Token" in bad.stdout.decode()
    dry = run_cli("check", cwd=tmp_path)
    assert dry.returncode == 1 and "dry-run" in dry.stdout.decode() and "set SLACK_BOT_TOKEN" in dry.stdout.decode()
    assert SLACK_TOKEN not in (ok.stdout + bad.stdout + ok.stderr + bad.stderr).decode()
    # Every part is checked, whatever the others say: a user fixes them all in one round.
    both = run_cli("check", cwd=tmp_path, env=dict(env, SLACK_SIGNING_SECRET=SIGNING_SECRET,
                                                   ALERTMANAGER_URL=f"http://127.0.0.1:{free_port()}"))
    assert both.returncode == 1 and "alertmanager: FAILED" in both.stdout.decode()
    assert "slack: OK: the token works" in both.stdout.decode()


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.decode().strip() == f"alert-threader {at.__version__}"


def test_storm_whose_digest_parent_was_deleted_continues_under_a_new_digest(start, slack):
    svc = start()
    alerts = storm_alerts(30)
    svc.alert(webhook(*alerts))
    old_parent = slack.messages[0]
    slack.fail("chat.postMessage", {"error": "thread_not_found"})
    svc.alert(webhook(*[resolved(a) for a in alerts]))
    new_parent, *resolves = slack.messages[3:]
    assert new_parent.thread_ts is None and new_parent.payload["text"].startswith("🌩️ Alert storm")
    assert len(resolves) == 2 and all(m.thread_ts == new_parent.ts != old_parent.ts for m in resolves)


def test_storm_message_with_a_rejected_layout_is_resent_as_plain_text(start, slack):
    svc = start()
    slack.fail("chat.postMessage", {}, {"error": "invalid_blocks"})
    svc.alert(webhook(*storm_alerts(15)))
    parent, plain = slack.messages
    assert "attachments" not in plain.payload and plain.thread_ts == parent.ts
    assert "*Storm0000*" in plain.payload["text"] and "*Storm0014*" in plain.payload["text"]
    assert_mrkdwn_safe(plain.payload["text"], "plain")


def test_benchmark_runs_end_to_end_and_checks_durability(tmp_path):
    """A smoke run of bench/run.py: it works and reports; how fast is the benchmark's own business."""
    output = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--rounds", "1", "--alerts", "40",
                          "--storm", "60", "--chunks", "2", "--output", str(output)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode in (0, 1), run.stderr[-2000:]  # 1: a target missed on a busy machine, not a failure
    for row in ("CPU per alert (ms)", "60-alert webhook: Slack calls", "RSS peak (MB)", "CPU ratio fwd/thr"):
        assert row in run.stdout
    results = json.loads(output.read_text())
    threader, forwarder = results["rounds"]["threader"][0], results["rounds"]["forwarder"][0]
    assert threader["probes_passed"] == 5 and threader["threads_on_disk"] == threader["stored_threads"] + 40
    assert forwarder["storm_slack_calls"] == 60 and threader["storm_slack_calls"] < 10
    assert threader["cpu_ms_per_alert"] > 0 and forwarder["cpu_ms_per_alert"] > 0, "CPU read from the services"
    assert results["settings"]["chunks"] == 2 and 0 < threader["p50_ms"] <= threader["p99_ms"]


# ---------------------------------------------------------------------------
# examples/: the Alertmanager config, the sample webhooks, the screenshot script
# ---------------------------------------------------------------------------

EXAMPLES = REPO / "examples"
PAYLOADS = ("firing.json", "second-instance.json", "resolved.json")


def render(payload_file: Path) -> List[Dict[str, Any]]:
    """The Slack calls `alert_threader.py render FILE` prints, from a clean dry-run environment."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLACK_", "WEBHOOK_", "THREAD_", "REDIS_", "ALERTMANAGER_"))
           and k not in ("ENVIRONMENT", "REOPEN_WINDOW", "STORM_THRESHOLD")}
    result = subprocess.run([sys.executable, str(REPO / "alert_threader.py"), "render", str(payload_file)],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("amtool"), *args], capture_output=True, text=True, timeout=30)


def test_example_alertmanager_config_passes_amtool():
    result = amtool("check-config", str(EXAMPLES / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "2 receivers" in result.stdout


@pytest.mark.parametrize("labels, receiver", [
    (["alertname=TestCritical", "service=database"], "slack-threads"),
    (["alertname=TestCritical", "team=database"], "slack-database-team"),
])
def test_example_alertmanager_config_routes_database_team_to_its_channel(labels, receiver):
    config = f"--config.file={EXAMPLES / 'alertmanager.yml'}"
    result = amtool("config", "routes", "test", config, f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_example_alertmanager_config_posts_to_the_threader_with_the_token():
    text = (EXAMPLES / "alertmanager.yml").read_text()
    assert "url: http://127.0.0.1:9009/alert\n" in text
    assert "url: http://127.0.0.1:9009/alert?channel=C0DBTEAM01\n" in text
    assert text.count("send_resolved: true") == 2
    assert text.count("credentials_file: /etc/alertmanager/alert-threader.token") == 2


@pytest.mark.parametrize("name", PAYLOADS)
def test_example_payload_renders_to_slack_calls(name):
    calls = render(EXAMPLES / name)
    assert calls and calls[0]["method"] == "chat.postMessage"
    assert calls[0]["payload"]["text"] == "🚨 [CRITICAL] Database Critical Failure (production)" or name == "resolved.json"


def test_readme_smoke_sequence_with_the_example_payloads(start, slack):
    """docs/operations.md's curl steps: firing, second instance, resolved, with the actions it documents."""
    svc = start()
    actions = []
    for name in PAYLOADS:
        answer = svc.request("POST", "/alert", raw=(EXAMPLES / name).read_bytes())
        assert answer.status == 200, answer.text
        actions.append([r["action"] for r in answer.json()["results"]])
    assert actions == [["posted"], ["unchanged", "replied"], ["replied", "replied"]]
    parent, *replies = slack.messages
    assert len(replies) == 3 and all(r.thread_ts == parent.ts for r in replies)

def test_the_readme_smoke_sequence_pasted_at_once_on_a_paced_channel_ends_with_the_card_closed(start, slack):
    """Pasted as one block after the quick start: DELETE /cache forgets how busy the old thread was, and a card
    edit still pending when the last DELETE comes is drawn all the same."""
    paced_slack(slack)
    svc = start(SLACK_PACE="0.2s")  # busy: 3 messages within 2 s; a card at most every 0.6 s
    svc.request("POST", "/alert", raw=(EXAMPLES / "firing.json").read_bytes())  # the quick start
    assert svc.request("DELETE", "/cache").status == 200
    actions = []
    for name in PAYLOADS:
        answer = svc.request("POST", "/alert", raw=(EXAMPLES / name).read_bytes())
        actions.append([r["action"] for r in answer.json()["results"]])
    assert svc.request("DELETE", "/cache").json()["cleared"] == 1
    assert actions == [["posted"], ["unchanged", "replied"], ["replied", "replied"]]
    parent = slack.messages[1]
    replies = slack.messages[2:]
    assert len(replies) == 3 and all(m.thread_ts == parent.ts for m in replies)
    assert [m.payload["text"].startswith("✅ RESOLVED — ") for m in replies] == [False, True, True], "not compact"
    wait_for(lambda: parent.ts in [r.payload["timestamp"] for r in slack.accepted("reactions.add")],
             what="the closed card's ✅")
    card = card_of(slack, parent.ts)
    assert card.startswith("✅ RESOLVED — ") and "✅ 2 alerts resolved" in card, card


def test_the_payloads_the_readme_shows_are_the_ones_sent(start, slack):
    """docs/how-it-works.md's thread of the three example webhooks, call for call (the ts values aside)."""
    page = (REPO / "docs" / "how-it-works.md").read_text()
    region = page[page.index("The payloads behind it"):page.index("Messages follow the original's layout")]
    shown = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", region, re.S)]
    svc = start(SLACK_CHANNEL="C0123456789")
    for name in PAYLOADS:
        svc.request("POST", "/alert", raw=(EXAMPLES / name).read_bytes())
        settled(svc)

    def without_ts(payload: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in payload.items() if k not in ("ts", "thread_ts", "timestamp")}

    assert [without_ts(c.payload) for c in slack.calls] == [without_ts(p) for p in shown]


@pytest.mark.parametrize("name", PAYLOADS)
def test_example_payload_is_a_full_alertmanager_v4_webhook(name):
    hook = json.loads((EXAMPLES / name).read_text())
    assert {"version", "groupKey", "status", "receiver", "groupLabels", "commonLabels", "commonAnnotations",
            "externalURL", "alerts"} <= set(hook)
    assert hook["version"] == "4"
    assert hook["externalURL"] == "http://alertmanager.example.com:9093"
    for alert in hook["alerts"]:
        assert {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"} <= set(alert)
        assert alert["status"] == hook["status"]
        assert alert["endsAt"] == ("0001-01-01T00:00:00Z" if alert["status"] == "firing" else "2024-01-15T14:45:30Z")


def test_example_payloads_tell_one_alert_key_with_two_instances():
    firing, second, resolved = (json.loads((EXAMPLES / name).read_text()) for name in PAYLOADS)
    first_alert = firing["alerts"][0]
    assert first_alert["labels"] == {"alertname": "TestCritical", "severity": "critical", "service": "database",
                                     "cluster": "production", "instance": "db01.example.com"}
    assert first_alert["startsAt"] == "2024-01-15T14:30:25Z"
    # Alertmanager re-sends the whole group: the first alert comes again, unchanged, with the new one.
    assert second["alerts"][0] == first_alert
    for hook in (second, resolved):
        a, b = hook["alerts"]
        assert [a["labels"][k] for k in at.KEY_LABELS] == [b["labels"][k] for k in at.KEY_LABELS]
        assert (a["labels"]["instance"], b["labels"]["instance"]) == ("db01.example.com", "db02.example.com")
        assert a["fingerprint"] != b["fingerprint"]
    assert [a["fingerprint"] for a in resolved["alerts"]] == [a["fingerprint"] for a in second["alerts"]]


def test_screenshot_script_is_shellcheck_clean():
    result = subprocess.run([require_binary("shellcheck"), "-S", "warning", str(EXAMPLES / "screenshot.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("request_head, status", [
    (b"POST /alert HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", b"400"),
    (b"POST /alert HTTP/1.1\r\nX-Folded: a\r\n  continued\r\nContent-Length: 2\r\n\r\n{}", b"400"),
    (b"POST /alert HTTP/1.1\r\nNo colon here\r\n\r\n", b"400"),
    (b"GET /health HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /health\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", b"431"),
])
def test_malformed_requests_are_refused_with_json(start, slack, request_head, status):
    svc = start()
    answer = raw_exchange(svc.port, request_head)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    assert b'"ok": false' in answer and slack.calls == []
    assert svc.get("/health").status == 200


def test_expect_100_continue_as_curl_sends_it_for_large_bodies(start, slack):
    svc = start()
    body = json.dumps(webhook(*[make_alert(name=f"Big{i}") for i in range(3)])).encode()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as sock:
        sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and len(slack.messages) == 3


def test_keep_alive_serves_several_requests_on_one_connection(start, slack):
    svc = start()
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=5)
    for name in ("A", "B", "C"):
        conn.request("POST", "/alert", json.dumps(webhook(make_alert(name=name))),
                     {"Content-Type": "application/json", "Connection": "keep-alive"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Connection") != "close"
        response.read()
    conn.request("GET", "/health", headers={"Connection": "close"})
    assert conn.getresponse().getheader("Connection") == "close"
    assert len(slack.messages) == 3


# ---------------------------------------------------------------------------
# Messages for real label sets: fields, thread keys, templates, Grafana, time, mentions, text edges
# ---------------------------------------------------------------------------

CORPUS = EXAMPLES / "alerts"


def drawn(payload: Dict[str, Any]) -> Dict[str, Any]:
    """A message as a reader sees it: header, status, fields by title, description, buttons, context, image."""
    seen: Dict[str, Any] = {"text": at.slack_tokens_drawn(payload.get("text", "")), "fields": {}, "buttons": {},
                            "sections": [], "context": [], "images": []}
    for block in payload.get("attachments", [{}])[0].get("blocks", []):
        if block["type"] == "header":
            seen["header"] = block["text"]["text"]
        elif block["type"] == "section" and "fields" in block:
            for field in block["fields"]:
                title, _, value = field["text"].partition(":*\n")
                seen["fields"][title.strip("*")] = value
        elif block["type"] == "section":
            seen["sections"].append(at.slack_tokens_drawn(block["text"]["text"]))
        elif block["type"] == "actions":
            seen["buttons"] = {e["text"]["text"]: e.get("url") for e in block["elements"]}
        elif block["type"] == "context":
            seen["context"] += [at.slack_tokens_drawn(e["text"]) for e in block["elements"]]
        elif block["type"] == "image":
            seen["images"].append(block["image_url"])
    return seen


def render_with(payload_file: Path, **settings: str) -> List[Dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(settings)
    result = subprocess.run([sys.executable, str(REPO / "alert_threader.py"), "render", str(payload_file)],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_kube_prometheus_stack_alert_shows_its_namespace_pod_and_container_and_no_noise():
    parent, reply, update = render_with(CORPUS / "kube-pod-crashlooping.json")
    card = drawn(parent["payload"])
    assert card["header"] == "⚠️ Pod is crash looping."
    assert card["fields"] == {"Severity": "WARNING", "Environment": "production", "Namespace": "shop",
                              "Pod": "api-7f9c6d5b8-9wzrn", "Container": "api", "Reason": "CrashLoopBackOff"}
    assert "Cluster" not in card["fields"], "a label the alert lacks is never shown as -"
    assert drawn(reply["payload"])["fields"]["Pod"] == "api-7f9c6d5b8-x2k4q", "each pod told in its own reply"
    assert card["buttons"]["View Runbook"].startswith("https://runbooks.prometheus-operator.dev/runbooks/")
    assert update["method"] == "chat.update"


@pytest.mark.parametrize("name, header, fields", [
    ("seed.json", "🚨 Database Critical Failure",
     {"Severity": "CRITICAL", "Environment": "production", "Service": "database", "Cluster": "production",
      "Instance": "db01.example.com"}),
    ("node-filesystem-space-filling-up.json",
     "⚠️ Filesystem is predicted to run out of space within the next 24 hours.",
     {"Severity": "WARNING", "Instance": "10.0.0.31:9100", "Device": "/dev/nvme0n1p1", "Mountpoint": "/"}),
    ("node-filesystem-almost-out-of-space.json", None, {"Severity": "CRITICAL", "Mountpoint": None}),
    ("blackbox-probe-failed.json", "🚨 Blackbox probe failed (instance https://shop.example.com)",
     {"Instance": "https://shop.example.com", "Module": "http_2xx"}),
    ("blackbox-ssl-cert-expiring.json", None, {"Instance": None}),
    ("kube-deployment-replicas-mismatch.json", None, {"Namespace": None, "Deployment": None}),
    ("kube-pvc-filling-up.json", None, {"Namespace": None, "PVC": None}),
    ("kube-target-down.json", None, {"Namespace": None}),
    ("alertmanager-0.34.json", None, {"Namespace": "payments"}),
])
def test_every_example_renders_what_a_reader_needs(name, header, fields):
    calls = render_with(CORPUS / name)
    assert calls and calls[0]["method"] == "chat.postMessage"
    for call in calls:
        assert_within_slack_limits(call["payload"])
    card = drawn(calls[0]["payload"])
    if header:
        assert card["header"] == header
    for title, value in fields.items():
        assert title in card["fields"], (title, card["fields"])
        assert value is None or card["fields"][title] == value
    assert not {"Prometheus", "Endpoint", "Uid", "Job", "Alertname"} & set(card["fields"]), card["fields"]
    assert all(v and v != "-" for v in card["fields"].values()) and len(card["fields"]) <= 10


def test_the_seed_example_renders_exactly_as_before():
    [parent] = render_with(CORPUS / "seed.json")
    blocks = parent["payload"]["attachments"][0]["blocks"]
    assert [f["text"] for f in blocks[2]["fields"]] == [
        "*Severity:*\nCRITICAL", "*Environment:*\nproduction", "*Service:*\ndatabase", "*Cluster:*\nproduction",
        "*Instance:*\ndb01.example.com"]
    assert blocks[-1]["elements"][0]["text"] == "env=production | alertname=TestCritical"


KUBE_ALERTS_SEEN = [  # kube-prometheus-stack's own label sets (examples/alerts): fields in order, and notification text
    ("kube-pod-crashlooping.json",
     [("Severity", "WARNING"), ("Environment", "production"), ("Namespace", "shop"), ("Pod", "api-7f9c6d5b8-9wzrn"),
      ("Container", "api"), ("Reason", "CrashLoopBackOff")],
     "⚠️ [WARNING] Pod is crash looping. · shop/api-7f9c6d5b8-9wzrn (production)"),
    ("kube-deployment-replicas-mismatch.json",
     [("Severity", "WARNING"), ("Environment", "production"), ("Namespace", "shop"), ("Deployment", "checkout")],
     "⚠️ [WARNING] Deployment has not matched the expected number of replicas. · shop/checkout (production)"),
    ("kube-pvc-filling-up.json",
     [("Severity", "WARNING"), ("Environment", "production"), ("Namespace", "shop"), ("PVC", "data-postgres-0"),
      ("Node", "worker-2")],
     "⚠️ [WARNING] PersistentVolume is filling up. · shop/data-postgres-0 (production)"),
    ("node-filesystem-space-filling-up.json",
     [("Severity", "WARNING"), ("Environment", "production"), ("Instance", "10.0.0.31:9100"),
      ("Device", "/dev/nvme0n1p1"), ("Mountpoint", "/"), ("Fstype", "ext4")],
     "⚠️ [WARNING] Filesystem is predicted to run out of space within the next 24 hours. · 10.0.0.31:9100 "
     "(production)"),
    ("kube-target-down.json",
     [("Severity", "WARNING"), ("Environment", "production"), ("Namespace", "payments"), ("Service", "payments-api")],
     "⚠️ [WARNING] One or more targets are unreachable. · payments/payments-api (production)"),
]


@pytest.mark.parametrize("name, fields, text", KUBE_ALERTS_SEEN)
def test_a_kubernetes_alert_leads_with_its_workload_and_never_shows_its_exporter_as_broken(name, fields, text):
    card = drawn(render_with(CORPUS / name)[0]["payload"])
    assert list(card["fields"].items()) == fields
    assert card["text"] == text
    exporter = ("kube-state-metrics", "10.42.0.17:8080", "-kubelet", "10.0.0.32:10250", "node-exporter", "metrics")
    assert not [v for v in card["fields"].values() if any(e in v for e in exporter)], card["fields"]


def test_crash_loops_in_two_namespaces_get_threads_of_their_own_and_never_reopen_each_other(start, slack):
    svc = start()
    shop = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())
    shop["alerts"] = shop["alerts"][:1]
    payments = json.loads(json.dumps(shop).replace('"shop"', '"payments"').replace("shop/", "payments/"))
    payments["alerts"][0]["labels"]["pod"] = "ledger-5c8d7-q4k2m"
    payments["alerts"][0]["startsAt"] = "2024-01-15T15:00:00Z"  # after the shop thread closed, within REOPEN_WINDOW
    for alert in payments["alerts"]:
        alert["fingerprint"] = at.label_fingerprint(alert["labels"])
    first = svc.alert(shop).json()["results"]
    done = svc.alert({**shop, "status": "resolved", "alerts": [resolved(shop["alerts"][0])]}).json()["results"]
    other = svc.alert(payments).json()["results"]
    assert [r["action"] for r in first + done + other] == ["posted", "replied", "posted"]
    assert first[0]["key"] == "KubePodCrashLooping|warning|kube-prometheus-stack-kube-state-metrics||shop|production"
    assert other[0]["key"] == (
        "KubePodCrashLooping|warning|kube-prometheus-stack-kube-state-metrics||payments|production")
    shop_card, shop_resolve, payments_card = slack.messages
    assert payments_card.thread_ts is None and payments_card.ts != shop_card.ts
    assert drawn(payments_card.payload)["fields"]["Namespace"] == "payments"
    assert drawn(payments_card.payload)["fields"]["Pod"] == "ledger-5c8d7-q4k2m"
    assert svc.get("/cache").json()["threads"][first[0]["key"]]["status"] == "closed"


def test_thread_key_labels_given_without_namespace_let_namespaces_share_a_thread(start, slack):
    svc = start(THREAD_KEY_LABELS="alertname,severity,service,cluster")
    shop = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())
    payments = json.loads(json.dumps(shop).replace('"shop"', '"payments"'))
    for alert in payments["alerts"]:
        alert["fingerprint"] = at.label_fingerprint(alert["labels"])
    svc.alert(shop)
    answer = svc.alert(payments).json()["results"]
    assert [r["action"] for r in answer] == ["replied", "replied"]
    assert answer[0]["key"] == "KubePodCrashLooping|warning|kube-prometheus-stack-kube-state-metrics||production"
    assert {m.thread_ts for m in slack.messages[1:]} == {slack.messages[0].ts}


def test_a_crash_loop_told_before_namespaces_were_in_keys_resolves_in_its_old_thread(start, slack, tmp_path):
    hook = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())
    told, later = hook["alerts"]
    old_key = "KubePodCrashLooping|warning|kube-prometheus-stack-kube-state-metrics||production"
    threads = {old_key: {"ts": "1700000000.000042", "channel": "C0ALERTS", "key": old_key, "status": "open",
                         "created": 1.0, "updated": 1.0, "closed": None, "ended": None, "reopened": 0,
                         "first": {"labels": told["labels"], "annotations": told["annotations"],
                                   "startsAt": 1705329025.0},
                         "alerts": {told["fingerprint"]: ["f", at.parse_time(told["startsAt"]), None]}}}
    (tmp_path / "threads.json").write_text(json.dumps({"version": 1, "threads": threads}))
    svc = start()
    repeat = svc.alert({**hook, "alerts": [told]}).json()["results"]
    new = svc.alert({**hook, "alerts": [told, later]}).json()["results"]  # a new pod: a thread of the namespace
    again = svc.alert({**hook, "alerts": [told, later]}).json()["results"]  # Alertmanager's repeat
    done = svc.alert({**hook, "status": "resolved", "alerts": [resolved(told), later]}).json()["results"]
    assert [(r["action"], r["key"]) for r in repeat + new[:1] + again[:1] + done[:1]] == [
        ("unchanged", old_key), ("unchanged", old_key), ("unchanged", old_key), ("replied", old_key)]
    assert new[1]["action"] == "posted" and new[1]["key"] != old_key and "|shop|" in new[1]["key"]
    assert [r["action"] for r in again[1:] + done[1:]] == ["unchanged", "unchanged"]
    parent, resolve = slack.messages
    assert parent.thread_ts is None and resolve.thread_ts == "1700000000.000042", "resolved in its own thread"
    assert svc.get("/cache").json()["threads"][old_key]["status"] == "closed"


def test_every_reply_names_what_tells_its_alert_apart_and_a_lone_alert_keeps_the_seed_layout(start, slack):
    svc = start(REOPEN_WINDOW="0")
    db01, db02 = make_alert(instance="db01", summary="Database down"), make_alert(instance="db02",
                                                                                   summary="Database down")
    again = make_alert(instance="db02", summary="Database down", starts="2024-01-15T15:00:00Z")
    for hook in (webhook(db01), webhook(db01, db02), webhook(db01, resolved(db02)), webhook(db01, again),
                 webhook(resolved(db01), again)):
        svc.alert(hook)
    _, *replies = slack.messages
    assert [(drawn(m.payload)["header"], m.payload["text"]) for m in replies] == [
        ("🚨 Database down · db02", "🚨 [CRITICAL] Database down · db02 (production)"),
        ("✅ RESOLVED — Database down · db02", "✅ RESOLVED — Database down · db02"),
        ("🚨 FIRING AGAIN — Database down · db02", "🚨 FIRING AGAIN — [CRITICAL] Database down · db02 (production)"),
        ("✅ RESOLVED — Database down · db01", "✅ RESOLVED — Database down · db01")]
    alone = make_alert(instance="db09", summary="Database down", service="cache")
    svc.alert(webhook(alone))
    svc.alert(webhook(resolved(alone)))
    assert (drawn(slack.messages[-1].payload)["header"], slack.messages[-1].payload["text"]) == (
        "✅ RESOLVED — Database down", "✅ RESOLVED — Database down"), "the seed's layout, alone in its thread"


def test_a_reply_names_the_pod_and_compact_replies_name_the_label_that_differs(start, slack):
    svc = start()
    _, reply, _ = render_with(CORPUS / "kube-pod-crashlooping.json")
    assert drawn(reply["payload"])["header"] == "⚠️ Pod is crash looping. · api-7f9c6d5b8-x2k4q"
    assert reply["payload"]["text"] == "⚠️ [WARNING] Pod is crash looping. · api-7f9c6d5b8-x2k4q (production)"
    node = json.loads((CORPUS / "node-filesystem-space-filling-up.json").read_text())
    first = node["alerts"][0]
    mounts = [json.loads(json.dumps(first)) for _ in range(5)]
    for i, alert in enumerate(mounts):
        alert["labels"]["mountpoint"] = f"/data{i}"
        alert["fingerprint"] = at.label_fingerprint(alert["labels"])
    svc.alert({**node, "alerts": [first]})
    svc.alert({**node, "alerts": [first] + mounts})
    compact = slack.messages[-1]
    lines = [line for line in drawn(compact.payload)["sections"][0].splitlines()[1:]]
    assert [line.split(" · ")[1:3] for line in lines] == [["10.0.0.31:9100", f"mountpoint=/data{i}"]
                                                           for i in range(5)], lines


def test_a_card_of_several_alerts_says_since_the_earliest_and_names_what_they_share():
    _, _, update = render_with(CORPUS / "kube-pod-crashlooping.json")  # the second pod started 8 s before the first
    card = drawn(update["payload"])
    assert card["sections"][0] == "*Status:* 🔥 2 firing · 0 resolved · since 2026-12-01 08:41:59 UTC"
    assert card["text"] == "⚠️ [WARNING] Pod is crash looping. · shop (production)", "not the first pod alone"
    calls = render_with(CORPUS / "grafana-multi.json", THREAD_KEY_LABELS="alertname,severity,grafana_folder")
    parent, reply, update = (drawn(c["payload"]) for c in calls)
    assert "Silence" in parent["buttons"] and "Silence" in reply["buttons"], "each alert: Grafana's own Silence"
    assert "Silence" not in update["buttons"], "a card of two: no Silence that would leave the other firing"


def test_a_pipe_in_a_label_cannot_make_another_namespace_s_thread_key():
    ms = at.MessageSettings()

    def key(**labels: str) -> str:
        alert = at.parse_alert(make_alert(name="KubeQuotaExceeded", **{"service": "", "cluster": "", **labels}),
                               "alerts[0]", None, False)
        return ms.thread_key(alert)
    assert key(namespace="shop") != key(cluster="|shop"), "a | in a value cannot stand for the key's separator"
    assert key(cluster="c|shop", namespace="production") != key(cluster="c", namespace="shop|production")
    assert key(namespace="shop") == "KubeQuotaExceeded|critical|||shop|production", "plain values: as before"


def test_an_app_named_like_an_exporter_keeps_its_namespace_and_pod():
    alert = at.parse_alert(make_alert(name="CheckoutDown", namespace="payments", pod="checkout-7d9f-x2k4q",
                                      service="checkout-node-exporter-bridge", job="checkout-kube-state-metrics-sync"),
                           "alerts[0]", None, False)
    fields = dict(at.field_pairs(alert, at.MessageSettings()))
    assert fields["Namespace"] == "payments" and fields["Pod"] == "checkout-7d9f-x2k4q"
    assert fields["Service"] == "checkout-node-exporter-bridge" and fields["Instance"] == "db01.example.com"


def test_a_thread_keyed_before_namespaces_is_silenced_as_its_key_covers_every_namespace_in_it():
    ms = at.MessageSettings()
    first = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())["alerts"][0]
    alert = at.parse_alert(first, "alerts[0]", None, False)
    record = at.new_record(alert, ms.legacy_key(alert) or "", "C0ALERTS", "", 1.0)
    assert "namespace" not in at.thread_labels(record, ms), "the 1.1 thread held every namespace's crash loops"
    record = at.new_record(alert, ms.thread_key(alert), "C0ALERTS", "", 1.0)
    assert at.thread_labels(record, ms)["namespace"] == "shop"


def test_pods_whose_long_names_differ_at_the_end_stay_apart_in_their_replies():
    base = "kafka-connect-cluster-eu-west-1-analytics-ingest-pipeline-worker-"
    hook = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())
    for i, alert in enumerate(hook["alerts"]):
        alert["labels"]["pod"] = base + str(i)
        alert["fingerprint"] = at.label_fingerprint(alert["labels"])
    ms, alerts = at.MessageSettings(), [at.parse_alert(a, "a", None, False) for a in hook["alerts"]]
    record = at.new_record(alerts[0], ms.thread_key(alerts[0]), "C0ALERTS", "", 1.0)
    for alert in alerts:
        at.remember_alert(record, alert, at.FIRING)
    headers = [drawn(at.render_alert(a, "C0ALERTS", ms, "firing", what=at.told_apart(a, record, ms)))["header"]
               for a in alerts]
    assert headers[0] != headers[1] and all(h.endswith(f"worker-{i}") for i, h in enumerate(headers)), headers


def test_a_message_of_many_long_escaped_labels_stays_within_slack_s_whole_text_limit():
    labels = {"alertname": "A", "severity": "critical", "namespace": "&" * 200, "pod": "&" * 5000,
              "instance": "&" * 5000, "mountpoint": "&" * 5000, "device": "&" * 5000,
              **{f"l{i}": "&" * 300 for i in range(20)}}  # a few long fields, the rest short: they shrink unequally
    alert = at.parse_alert({"status": "firing", "labels": labels, "annotations": {"summary": "x"},
                            "startsAt": "2024-01-15T14:30:25Z"}, "alerts[0]", None, False)
    payload = at.render_alert(alert, "C0ALERTS", at.MessageSettings(), "firing")
    assert_within_slack_limits(payload)
    assert at.text_length(payload["attachments"][0]["blocks"]) <= at.TEXT_BUDGET


def test_message_fields_and_hidden_labels_replace_the_defaults():
    [parent, _, _] = render_with(CORPUS / "kube-pod-crashlooping.json", MESSAGE_FIELDS="namespace,pod,severity,team")
    assert list(drawn(parent["payload"])["fields"].items()) == [
        ("Namespace", "shop"), ("Pod", "api-7f9c6d5b8-9wzrn"), ("Severity", "WARNING")]
    [parent, _, _] = render_with(CORPUS / "kube-pod-crashlooping.json", HIDDEN_LABELS="none")
    fields = drawn(parent["payload"])["fields"]
    assert {"Endpoint", "Job"} <= set(fields) and len(fields) == 10, "the noise shown, and at most 10 fields"


def test_thread_key_labels_split_crash_loops_by_namespace(start, slack):
    svc = start(THREAD_KEY_LABELS="alertname,namespace")
    shop = json.loads((CORPUS / "kube-pod-crashlooping.json").read_text())
    other = json.loads(json.dumps(shop).replace('"shop"', '"billing"').replace("shop/", "billing/"))
    for alert in other["alerts"]:
        alert["fingerprint"] = at.label_fingerprint(alert["labels"])
    first = svc.alert(shop).json()["results"]
    second = svc.alert(other).json()["results"]
    assert [r["action"] for r in first + second] == ["posted", "replied", "posted", "replied"]
    assert first[0]["key"] == "KubePodCrashLooping|shop|production"
    assert second[0]["key"] == "KubePodCrashLooping|billing|production"
    card = drawn(slack.messages[0].payload)
    assert card["fields"]["Namespace"] == "shop", "a workload's namespace is shown first, key label or not"
    assert card["context"][-1] == "env=production | alertname=KubePodCrashLooping", "and once"


def test_thread_by_group_makes_one_thread_per_alertmanager_group_with_a_reply_per_alert(start, slack):
    svc = start(THREAD_BY="group")
    first = svc.alert(webhook(make_alert(name="DiskFull", instance="a"), make_alert(name="CPUHigh", instance="b"),
                              group_key='{}:{team="db"}')).json()["results"]
    assert [r["action"] for r in first] == ["posted", "replied"]
    assert first[0]["key"] == first[1]["key"] == 'group|{}:{team="db"}|production'
    again = svc.alert(webhook(make_alert(name="DiskFull", instance="c"), group_key='{}:{team="web"}')).json()
    assert again["results"][0]["action"] == "posted" and len(slack.messages) == 3


def test_threads_stored_before_the_upgrade_carry_on_with_the_default_key(start, slack, tmp_path):
    key = "DatabaseDown|critical|database|prod-eu|production"
    old = make_alert()
    threads = {key: {"ts": "1700000000.000042", "channel": "C0ALERTS", "key": key, "status": "open",
                     "created": 1.0, "updated": 1.0, "closed": None, "ended": None, "reopened": 0,
                     "first": {"labels": old["labels"], "annotations": old["annotations"],
                               "startsAt": 1705329025.0}, "alerts": {old["fingerprint"]: ["f", 1705329025.0, None]}}}
    (tmp_path / "threads.json").write_text(json.dumps({"version": 1, "threads": threads}))
    svc = start()
    answer = svc.alert(webhook(old, make_alert(instance="db02"))).json()["results"]
    assert [r["action"] for r in answer] == ["unchanged", "replied"] and slack.messages[0].thread_ts == \
        "1700000000.000042"


def test_title_and_text_templates_take_labels_and_annotations_and_escape_them(start, slack):
    svc = start(TITLE_TEMPLATE='{{ labels.namespace }}/{{ labels.pod | "?" }}: {{ annotations.summary }}',
                TEXT_TEMPLATE="{{ annotations.description }} (owner: {{ labels.team | \"nobody\" }})")
    alert = make_alert(summary="Pod <b> crashes & burns", namespace="shop", pod="api-1")
    svc.alert(webhook(alert))
    card = drawn(slack.messages[0].payload)
    assert card["header"] == "🚨 shop/api-1: Pod <b> crashes & burns"  # a header is plain text: shown as written
    assert card["text"] == "🚨 [CRITICAL] shop/api-1: Pod &lt;b&gt; crashes &amp; burns (production)"
    assert card["sections"][1] == "*Description:*\nDatabaseDown has fired on db01.example.com. (owner: nobody)"


@pytest.mark.parametrize("variable, value, message", [
    ("TITLE_TEMPLATE", "{{ labels.a.b }}", "TITLE_TEMPLATE: {{labels.a.b}} is not a placeholder"),
    ("TITLE_TEMPLATE", "{{ __import__('os').system('id') }}", "is not a placeholder"),
    ("TEXT_TEMPLATE", "{{ annotations.summary", "TEXT_TEMPLATE: unbalanced {{ or }}"),
    ("TEXT_TEMPLATE", "{{ }}", "TEXT_TEMPLATE: an empty {{ }}"),
    ("THREAD_KEY_LABELS", "alertname,na-me", "THREAD_KEY_LABELS: 'na-me' is not a label name"),
    ("THREAD_BY", "rack", "THREAD_BY: 'rack' is not a choice (use labels or group)"),
    ("TIME_ZONE", "Mars/Olympus", "TIME_ZONE: 'Mars/Olympus' is not a time zone this machine knows"),
    ("MENTIONS", "severity=critical:@oncall", "MENTIONS: '@oncall' is not a Slack mention"),
    ("MENTIONS", "<!channel>", "is not matcher:mention"),
    ("MENTIONS", "team=~(db:<@U1>", "is not a regular expression"),
    ("BROADCAST", "resolve,everything", "BROADCAST: 'everything' is not a transition (use new, refire, reopen, "
                                        "resolve, close)"),
])
def test_an_invalid_message_setting_stops_startup_naming_it(tmp_path, variable, value, message):
    result = run_cli(cwd=tmp_path, env={variable: value, "PORT": "0"})
    assert result.returncode == 2 and message in result.stderr.decode(), result.stderr


@pytest.mark.parametrize("name", ["grafana-single.json", "grafana-multi.json"])
def test_grafana_alerts_get_grafanas_silence_dashboard_panel_image_and_value(name):
    document = json.loads((CORPUS / name).read_text())
    calls = [c for c in render_with(CORPUS / name) if c["method"] == "chat.postMessage"]
    assert len(calls) == len(document["alerts"])
    for call, alert in zip(calls, document["alerts"]):
        seen = drawn(call["payload"])
        assert seen["buttons"]["Silence"] == alert["silenceURL"], "Grafana's own silence page"
        assert "/#/silences/new" not in json.dumps(call["payload"]), "never Alertmanager's form"
        assert seen["buttons"]["Dashboard"] == alert["dashboardURL"] and seen["buttons"]["Panel"] == alert["panelURL"]
        values = ", ".join(f"{k}={v:g}" for k, v in alert["values"].items())
        assert seen["fields"]["Value"] == values
        assert seen["images"] == ([alert["imageURL"]] if alert.get("imageURL") else [])


def test_message_fields_can_show_grafanas_value():
    [call] = [c for c in render_with(CORPUS / "grafana-single.json", MESSAGE_FIELDS="severity,value,grafana_folder")
              if c["method"] == "chat.postMessage"]
    alert = json.loads((CORPUS / "grafana-single.json").read_text())["alerts"][0]
    fields = drawn(call["payload"])["fields"]
    assert list(fields)[:2] == ["Severity", "Value"]
    assert fields["Value"] == ", ".join(f"{k}={v:g}" for k, v in alert["values"].items())


def test_a_grafana_resolve_and_alertmanagers_newer_fields_are_accepted():
    calls = render_with(CORPUS / "grafana-resolved.json")
    assert calls and all(drawn(c["payload"])["text"].startswith("✅ RESOLVED") for c in calls)
    assert "Silence" not in drawn(calls[0]["payload"])["buttons"], "nothing left to silence"
    document = json.loads((CORPUS / "alertmanager-0.34.json").read_text())
    assert document["notification_reason"] and document["routeLabels"]
    assert render_with(CORPUS / "alertmanager-0.34.json")[0]["method"] == "chat.postMessage"


def test_times_are_slack_date_tokens_written_in_time_zone_for_the_fallback(start, slack):
    svc = start(TIME_ZONE="Europe/Berlin")
    svc.alert(webhook(make_alert()))
    svc.alert(webhook(resolved(make_alert(), ends="2024-01-15T14:20:00Z")))  # ends before it starts
    card = slack.messages[0].payload["attachments"][0]["blocks"]
    assert card[-2]["elements"][0]["text"] == (
        "*Started:* <!date^1705329025^{date_short_pretty} {time_secs}|2024-01-15 15:30:25 CET>")
    assert "(after -10m 25s)" in visible_text(slack.messages[1].payload), "a negative duration as it is"
    page = svc.get("/preview").text
    assert "15:30:25 CET" in page and "&lt;!date" not in page and "<!date" not in page


def test_mentions_go_on_a_new_or_reopened_parent_only(start, slack):
    svc = start(MENTIONS="severity=critical:<!subteam^S0ONCALL>;team=db,instance=~db0[12]:<@U012AB3CD>",
                REOPEN_WINDOW="30m")
    a, b = make_alert(instance="db01", team="db"), make_alert(instance="db02")
    svc.alert(webhook(a))
    svc.alert(webhook(a, b))
    svc.alert(webhook(resolved(a), resolved(b)))
    svc.alert(webhook(make_alert(instance="db01", team="db", starts="2024-01-15T14:50:00Z")))  # reopens
    parent, reply, resolve_a, resolve_b, reopen = slack.messages
    assert parent.payload["text"].startswith("<!subteam^S0ONCALL> <@U012AB3CD> 🚨 [CRITICAL]")
    assert reopen.payload["text"].startswith("<!subteam^S0ONCALL> <@U012AB3CD> 🚨 FIRING AGAIN")
    for quiet in [reply, resolve_a, resolve_b] + slack.accepted("chat.update"):
        assert "<!subteam" not in json.dumps(quiet.payload) and "<@U" not in json.dumps(quiet.payload), quiet
    svc.alert(webhook(make_alert(name="Quiet", severity="warning")))
    assert "<!" not in slack.messages[-1].payload["text"] and "<@" not in slack.messages[-1].payload["text"]


def test_a_storm_digest_mentions_once_and_its_lines_never(start, slack):
    svc = start(MENTIONS="severity=critical:<!here>", STORM_THRESHOLD="3")
    svc.alert(webhook(*storm_alerts(10)))
    digest, *lines = slack.messages
    assert digest.payload["text"].startswith("<!here> 🌩️ Alert storm")
    assert all("<!here>" not in json.dumps(m.payload) for m in lines)


def test_labels_still_cannot_mention_anyone_with_mentions_configured(start, slack):
    svc = start(MENTIONS="severity=critical:<!subteam^S0ONCALL>")
    svc.alert(webhook(make_alert(summary="<!channel> <@U999> <!subteam^SEVIL>", team="<!here>")))
    payload = slack.messages[0].payload
    assert payload["text"].startswith("<!subteam^S0ONCALL> ")  # the one mention configured
    mrkdwn_texts = payload["text"].split(" ", 1)[1] + raw_text(payload)[len(payload["text"]):]
    header = payload["attachments"][0]["blocks"][0]["text"]
    mrkdwn_texts = mrkdwn_texts.replace(header["text"], "")  # plain_text: Slack never pings from a header
    assert header["type"] == "plain_text"
    assert_mrkdwn_safe(mrkdwn_texts, "message")


def test_broadcast_sends_the_chosen_replies_to_the_channel_too(start, slack, tmp_path):
    svc = start(BROADCAST="close,reopen", REOPEN_WINDOW="30m")
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a, b))
    svc.alert(webhook(resolved(a)))
    svc.alert(webhook(resolved(b)))
    svc.alert(webhook(make_alert(instance="db01", starts="2024-01-15T14:50:00Z")))
    flags = [m.payload.get("reply_broadcast", False) for m in slack.messages[1:]]
    assert flags == [False, False, True, True], "the new alert no, the first resolve no, the close and reopen yes"
    quiet = start(SLACK_CHANNEL="C0QUIET", THREAD_STORE_FILE=str(tmp_path / "quiet.json"))
    quiet.alert(webhook(make_alert(name="Q"), make_alert(name="Q", instance="x")))
    assert "reply_broadcast" not in slack.messages[-1].payload, "the default is none"


def test_headers_count_utf16_units_and_cuts_never_split_a_character():
    for summary in ["x" * 148, "y" * 400, "👍🏽" * 100, "👨‍👩‍👧‍👦" * 40, "🇩🇪🇫🇷" * 50, "e\u0301" * 200]:
        alert = parsed(make_alert(summary=summary))
        header = at.render_alert(alert, "C1", MS, "firing")["attachments"][0]["blocks"][0]["text"]["text"]
        assert at.utf16_units(header) <= 150, (summary[:10], at.utf16_units(header))
        body = header[2:-1] if header.endswith("…") else header[2:]
        assert summary.startswith(body), "cut at a boundary, not inside a character"
        if header.endswith("…"):
            rest = summary[len(body):]
            assert at.grapheme_boundary(summary, len(body)) == len(body) and rest, "a whole character was cut"


def test_control_characters_and_bidi_overrides_are_removed_from_alert_text():
    alert = parsed(make_alert(summary="a\x00b\x1b[31mred\u202eexe.txt\u2066x\x7f\x85 end", team="t\u202e1"))
    payload = at.render_alert(alert, "C1", MS, "firing")
    text = json.dumps(payload, ensure_ascii=False)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text)
    assert drawn(payload)["header"] == "🚨 ab[31mredexe.txtx end" and drawn(payload)["fields"]["Team"] == "t1"


def test_a_thread_of_endless_distinct_alerts_keeps_a_record_of_bounded_size():
    """The attacker's flood: thousands of alerts of one key, each with labels of its own (2.5 KB: kept whole)."""
    first = parsed(make_alert(instance="i0", blob="x" * 2500))
    record = at.new_record(first, "k", "C1", "", 0.0)
    for i in range(at.THREAD_ALERTS_MAX + 300):
        alert = parsed(make_alert(instance=f"i{i}", blob=f"{i}" + "x" * 2500))
        if i % 3 == 0:
            alert = parsed(resolved(make_alert(instance=f"i{i}", blob=f"{i}" + "x" * 2500)))
        at.apply_step(record, alert, at.REPLY, float(i))
    assert len(record["alerts"]) == at.THREAD_ALERTS_MAX
    assert at.THREAD_LABELS_BUDGET - 3000 <= record["label_chars"] <= at.THREAD_LABELS_BUDGET
    assert len(at.compact_json(record)) < 2 * at.THREAD_LABELS_BUDGET + 100 * at.THREAD_ALERTS_MAX
    latest = parsed(make_alert(instance=f"i{at.THREAD_ALERTS_MAX + 299}", blob=f"{at.THREAD_ALERTS_MAX + 299}"
                               + "x" * 2500))
    assert at.decide(record, latest, 0) == at.UNCHANGED, "the latest alerts are remembered: repeats stay quiet"
    firing = [e for e in record["alerts"].values() if e[0] == at.FIRING]
    assert len(firing) == 2 * (at.THREAD_ALERTS_MAX + 300) // 3, "the resolved went first, every firing one stayed"


def test_invisible_characters_cannot_make_one_value_look_like_another():
    alert = parsed(make_alert(instance="db01\u200b\u2060\ufeff\u3164\u2028", summary="Disk\u200b full"))
    shown = drawn(at.render_alert(alert, "C1", MS, "firing"))
    assert shown["fields"]["Instance"] == "db01" and shown["header"] == "🚨 Disk full"
    family = parsed(make_alert(summary="👨\u200d👩\u200d👧 family"))  # the joiner that makes one emoji stays
    assert "👨\u200d👩\u200d👧" in drawn(at.render_alert(family, "C1", MS, "firing"))["header"]


def test_every_unseen_character_is_removed_even_alone_in_otherwise_plain_text():
    unseen = [chr(c) for c in range(0x110000) if at.UNSEEN.match(chr(c))]
    assert "\u3164" in unseen and "\u202e" in unseen and "\x00" in unseen
    for c in unseen:
        assert at.clean_text(f"db01{c}x") == "db01x", f"U+{ord(c):04X} is shown"
    assert at.clean_text("db01\tdisk é 🚨\n") == "db01\tdisk é 🚨\n", "tabs, newlines and letters stay"


def test_a_message_stays_within_slacks_text_limit_the_description_shortened_first():
    labels = {f"label{i}": "v" * 1900 for i in range(10)}
    alert = make_alert(summary="Big", **labels)
    alert["annotations"]["description"] = "d" * 5000
    payload = at.render_alert(parsed(alert), "C1", at.MessageSettings(fields=tuple(labels)), "firing")
    blocks = payload["attachments"][0]["blocks"]
    assert at.text_length(blocks) <= 12000
    assert not any(b.get("text", {}).get("text", "").startswith("*Description:*") for b in blocks if b["type"] ==
                   "section"), "the description gave way first"
    assert len(drawn(payload)["fields"]) == 10
    small = make_alert(summary="Small")
    small["annotations"]["description"] = "d" * 5000
    kept = drawn(at.render_alert(parsed(small), "C1", MS, "firing"))
    assert kept["sections"][0].startswith("*Description:*\nddd"), "clipped to its own limit, not dropped"


# ---------------------------------------------------------------------------
# HTTP edges: a refused body is never read as the next request; 413 and 401 reach every client
# ---------------------------------------------------------------------------

SMUGGLED = b"DELETE /cache HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def answers_in(data: bytes) -> List[bytes]:
    """The status lines of every answer in what a connection received."""
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*\r\n", data)


@pytest.mark.parametrize("head, status", [
    (b"POST /alert HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", b"401"),
    (b"POST /nowhere HTTP/1.1\r\nAuthorization: Bearer " + WEBHOOK_TOKEN.encode() + b"\r\nContent-Length: %d\r\n",
     b"404"),
    (b"PUT /alert HTTP/1.1\r\nAuthorization: Bearer " + WEBHOOK_TOKEN.encode() + b"\r\nContent-Length: %d\r\n",
     b"405"),
    (b"POST /alert?channel=C0NOTALLOWED HTTP/1.1\r\nAuthorization: Bearer " + WEBHOOK_TOKEN.encode()
     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", b"400"),
    (b"POST /alert HTTP/1.1\r\nAuthorization: Bearer " + WEBHOOK_TOKEN.encode()
     + b"\r\nContent-Type: application/json\r\nX-Length: %d\r\n", b"411"),
    (b"POST /alert HTTP/1.1\r\nAuthorization: Bearer " + WEBHOOK_TOKEN.encode()
     + b"\r\nContent-Type: application/json\r\nContent-Length: 9999%d\r\n", b"413"),
    (b"GET /health HTTP/1.1\r\nContent-Length: %d\r\n", b"200"),
])
def test_a_body_left_unread_is_never_parsed_as_the_next_request(start, slack, tmp_path, head, status):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN, MAX_BODY_BYTES="4096")
    svc.alert(webhook(make_alert()), token=WEBHOOK_TOKEN)
    before = state_bytes(tmp_path)
    answer = raw_exchange(svc.port, head % len(SMUGGLED) + b"Host: x\r\n\r\n" + SMUGGLED)
    assert answers_in(answer) and answers_in(answer)[0].startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert len(answers_in(answer)) == 1, f"the body was answered as a request of its own: {answer!r}"
    assert b"Connection: close" in answer
    assert state_bytes(tmp_path) == before
    assert svc.get("/cache", headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}).json()["cached_threads"] == 1


def test_a_refused_webhook_carrying_a_request_gets_one_answer(start, slack):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    inner = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_exchange(svc.port, b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(inner) + inner)
    assert [line[:12] for line in answers_in(answer)] == [b"HTTP/1.1 401"]


@pytest.mark.parametrize("settings, head, status", [
    ({"WEBHOOK_TOKEN": WEBHOOK_TOKEN}, b"", b"401"),
    ({"MAX_BODY_BYTES": "4096"}, b"", b"413"),
    ({}, b"", b"100"),
])
def test_expect_100_continue_is_answered_only_for_a_request_that_will_be_taken(start, slack, settings, head,
                                                                              status):
    svc = start(**settings)
    body = json.dumps(webhook(make_alert())).encode()
    size = 10000 if "MAX_BODY_BYTES" in settings else len(body)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as sock:
        sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
        first = sock.recv(65536)  # before any byte of the body is sent
        assert first.startswith(b"HTTP/1.1 " + status), first[:100]
        if status == b"100":
            sock.sendall(body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        else:
            assert b'"ok": false' in first and b"Connection: close" in first
    assert len(slack.messages) == (1 if status == b"100" else 0)


def test_413_reaches_clients_that_write_the_whole_body_before_reading(start, slack):
    """urllib, http.client and Go's net/http send everything first; a close with unread data would reset them."""
    svc = start()
    body = b'{"alerts": [' + b" " * (20 << 20) + b"]}"
    request = urllib.request.Request(f"http://127.0.0.1:{svc.port}/alert", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert "MAX_BODY_BYTES" in json.loads(refused.value.read())["error"]
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    conn.request("POST", "/alert", body, {"Content-Type": "application/json"})
    assert conn.getresponse().status == 413
    assert slack.calls == [] and svc.get("/health").status == 200


@pytest.mark.parametrize("request_head", [
    b"POST /alert HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /alert HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /alert HTTP/1.1\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nContent-Length: 0x2\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nContent-Length: \xd9\xa2\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /alert HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}",
    b"POST  HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n",
    b"POST /alert HTTP/1.1\r\nContent-Length: 50\r\nContent-Type: application/json\r\n\r\n{\"alerts\": [",
])
def test_bad_framing_is_refused_and_changes_nothing(start, slack, tmp_path, request_head):
    svc = start()
    svc.alert(webhook(make_alert()))
    before = state_bytes(tmp_path)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as sock:
        sock.sendall(request_head)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    if answer:
        assert re.match(rb"HTTP/1\.1 4\d\d ", answer), answer[:100]
        assert b'"ok": false' in answer and len(answers_in(answer)) == 1
    assert state_bytes(tmp_path) == before and len(slack.calls) == 1
    assert svc.get("/health").status == 200 and "Traceback" not in svc.log.getvalue()


def slack_client(url: str, timeout: float = 2.0) -> at.SlackClient:
    return at.SlackClient(url, SLACK_TOKEN, timeout, at.Metrics())


def test_a_half_received_answer_is_never_sent_again(any_slack):
    client = slack_client(any_slack.url)
    client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "first"})  # the connection is kept
    any_slack.fail("chat.postMessage", {"partial": True})
    with pytest.raises(at.SlackError) as failed:
        client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "second"})
    assert failed.value.kind == at.TRANSIENT
    assert [c.payload["text"] for c in any_slack.calls] == ["first", "second"], "sent once, not re-sent"
    assert client.metrics.total("alert_threader_slack_resends_total") == 0


def test_a_kept_connection_closed_by_slack_is_used_for_nothing_more(any_slack):
    client = slack_client(any_slack.url)
    any_slack.fail("chat.postMessage", {"close": True})  # answered, then Slack closes the idle connection
    client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "one"})
    wait_for(lambda: at.peer_closed(client._local.conn.sock), what="Slack's close to arrive")
    client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "two"})
    assert [c.payload["text"] for c in any_slack.calls] == ["one", "two"]
    assert client.metrics.total("alert_threader_slack_resends_total") == 0


def test_a_request_closed_without_a_byte_of_answer_is_sent_once_more_and_counted(any_slack):
    client = slack_client(any_slack.url)
    client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "one"})
    any_slack.fail("chat.postMessage", {"drop": True})  # closed with no answer: the idle-connection race
    assert client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "two"})["ok"]
    assert [c.payload["text"] for c in any_slack.calls] == ["one", "two", "two"]
    assert client.metrics.total("alert_threader_slack_resends_total") == 1
    any_slack.fail("chat.postMessage", {"drop": True}, {"drop": True})  # a fresh connection is never re-sent
    client._drop_connection()
    with pytest.raises(at.SlackError):
        client.call("chat.postMessage", {"channel": "C0ALERTS", "text": "three"})
    assert [c.payload["text"] for c in any_slack.calls][3:] == ["three"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_hostile_megabyte_values_cost_kilobytes_of_memory_and_state(tmp_path, slack):
    proc, port = start_process(tmp_path, slack, env={"MAX_BODY_BYTES": str(16 << 20), "STORM_THRESHOLD": "1000"})
    try:
        post_to(port, webhook(make_alert(name="Warm")))
        baseline = rss_mb(proc.pid)
        state_before = sum(p.stat().st_size for p in tmp_path.glob("threads.json*"))
        for i in range(120):
            huge = f"{i:04d}" + "x" * (1 << 20)
            alert = make_alert(name=f"Huge{i}", service="svc-" + huge, instance="host-" + huge, team="t" + huge,
                               summary=f"Huge {i}", fingerprint=f"{i:016x}")
            alert["annotations"]["runbook_url"] = "https://runbooks.example.com/" + huge
            alert["generatorURL"] = "http://prometheus.example.com/graph?g0.expr=" + huge
            status, body = post_to(port, webhook(alert, group_key="{}:{x=\"" + huge + "\"}"), timeout=60)
            assert status == 200 and body["results"][0]["action"] == "posted"
            assert len(body["results"][0]["key"]) < 1000
        grown = rss_mb(proc.pid) - baseline
        state_grown = sum(p.stat().st_size for p in tmp_path.glob("threads.json*")) - state_before
    finally:
        proc.terminate()
        proc.wait(20)
    assert grown < 120, f"resident memory grew by {grown:.0f} MB"
    assert state_grown < 120 * 64 * 1024, f"the state grew by {state_grown / 1e6:.1f} MB"
    assert len(slack.messages) == 121


# ---------------------------------------------------------------------------
# Silence and Acknowledge from Slack: signed interactions
# ---------------------------------------------------------------------------

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def signed(body: bytes, secret: str = SIGNING_SECRET, timestamp: Optional[int] = None) -> Dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": "v0=" + digest}


def block_action(message: Call, action_id: str, block_id: str = "card", value: Optional[str] = None,
                 user: str = "alice", thread_ts: Optional[str] = None) -> Dict[str, Any]:
    """A block_actions payload as Slack sends it when someone uses a control of `message`."""
    action: Dict[str, Any] = {"action_id": action_id, "block_id": block_id, "action_ts": str(time.time())}
    if action_id == "silence":
        action.update(type="static_select", selected_option={"text": {"type": "plain_text", "text": value},
                                                             "value": value})
    else:
        action.update(type="button", value=value or action_id)
    channel = message.payload["channel"]
    return {"type": "block_actions", "user": {"id": f"U0{user.upper()}", "username": user, "name": user},
            "team": {"id": "T0TEAM", "domain": "acme"}, "api_app_id": "A0APP", "trigger_id": "1.2.3",
            "channel": {"id": channel, "name": "alerts"}, "response_url": "https://hooks.slack.com/actions/x",
            "container": {"type": "message", "message_ts": message.ts, "channel_id": channel,
                          "is_ephemeral": False, **({"thread_ts": thread_ts} if thread_ts else {})},
            "message": {"ts": message.ts, "type": "message", **({"thread_ts": thread_ts} if thread_ts else {})},
            "actions": [action]}


def click(svc: Running, payload: Dict[str, Any], **signing: Any) -> Answer:
    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    return svc.request("POST", "/slack/actions", raw=body, headers=signed(body, **signing))


class FakeAlertmanager:
    """Alertmanager's silences API on 127.0.0.1:0: records what it is asked, answers from `answer`."""

    def __init__(self) -> None:
        self.requests: List[Tuple[str, str, Any, Dict[str, str]]] = []
        self.answer: Dict[str, Any] = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer_with(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body, dict(self.headers)))
                if fake.answer.get("status"):
                    return self.answer_with(fake.answer["status"], "silence invalid: bad matchers")
                self.answer_with(200, {"silenceID": f"5e1d1e0c-0000-4000-8000-{len(fake.requests):012d}"})

            def do_DELETE(self) -> None:
                fake.requests.append(("DELETE", self.path, None, dict(self.headers)))
                self.answer_with(200, None)

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_am():
    am = FakeAlertmanager()
    yield am
    am.close()


def interactive(start: Callable[..., Running], am_url: str, **settings: str) -> Running:
    return start(SLACK_SIGNING_SECRET=SIGNING_SECRET, ALERTMANAGER_URL=am_url, **settings)


def test_without_a_signing_secret_there_is_no_endpoint_and_the_buttons_are_links(start, slack):
    svc = start()
    svc.alert(webhook(make_alert()))
    elements = next(b for b in slack.messages[0].payload["attachments"][0]["blocks"] if b["type"] == "actions")
    assert all(e["type"] == "button" and "url" in e for e in elements["elements"])
    assert click(svc, block_action(slack.messages[0], "ack")).status == 404


def test_with_a_signing_secret_the_card_offers_silence_durations_and_ack(start, slack, fake_am):
    svc = interactive(start, fake_am.url, SILENCE_DURATIONS="30m,4h")
    svc.alert(webhook(make_alert(), make_alert(instance="db02")))
    card, reply = slack.messages
    controls = next(b for b in card.payload["attachments"][0]["blocks"] if b["type"] == "actions")
    assert controls["block_id"] == "card"
    menu = next(e for e in controls["elements"] if e["action_id"] == "silence")
    assert menu["type"] == "static_select" and [o["value"] for o in menu["options"]] == ["30m", "4h"]
    assert any(e["action_id"] == "ack" for e in controls["elements"])
    assert not any("/#/silences/new" in e.get("url", "") for e in controls["elements"])
    reply_controls = next(b for b in reply.payload["attachments"][0]["blocks"] if b["type"] == "actions")
    assert reply_controls["block_id"].startswith("alert:") and \
        [e["action_id"] for e in reply_controls["elements"] if e["type"] == "static_select"] == ["silence"]
    for call in slack.messages:
        assert_within_slack_limits(call.payload)


def test_preview_draws_the_interactive_controls_as_labels_and_keeps_links_as_links(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    page = svc.get("/preview").text
    assert '<span class="btn">🔕 Silence… ▾</span>' in page and '<span class="btn">👀 Ack</span>' in page
    assert '<a class="btn" href="https://runbooks.example.com/DatabaseDown" rel="noopener noreferrer">View Runbook</a>' \
        in page


@pytest.mark.parametrize("how", ["unsigned", "forged", "stale", "other secret"])
def test_forged_stale_and_unsigned_interactions_are_refused_and_change_nothing(start, slack, fake_am, how):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    body = urllib.parse.urlencode({"payload": json.dumps(block_action(slack.messages[0], "silence",
                                                                      value="4h"))}).encode()
    headers = {"unsigned": {"Content-Type": "application/x-www-form-urlencoded"},
               "forged": dict(signed(body), **{"X-Slack-Signature": "v0=" + "0" * 64}),
               "stale": signed(body, timestamp=int(time.time()) - 400),
               "other secret": signed(body, secret="another-apps-signing-secret")}[how]
    before = svc.get("/cache").json()["threads"]
    answer = svc.request("POST", "/slack/actions", raw=body, headers=headers)
    assert answer.status == 401 and answer.json()["ok"] is False
    assert svc.service.metrics.value("alert_threader_interactions_total", action="silence") == 0, "no work begun"
    assert fake_am.requests == [] and len(slack.calls) == 1 and svc.get("/cache").json()["threads"] == before


def test_a_replayed_interaction_does_nothing_a_second_time(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    body = urllib.parse.urlencode({"payload": json.dumps(block_action(slack.messages[0], "ack"))}).encode()
    headers = signed(body)
    first = svc.request("POST", "/slack/actions", raw=body, headers=headers)
    assert first.status == 200 and first.body == b""
    wait_for(lambda: any("Acknowledged by alice" in m.text for m in slack.messages), what="the ack's reply")
    again = svc.request("POST", "/slack/actions", raw=body, headers=headers)
    assert again.status == 200 and "taken already" in again.json()["done"]
    counted = svc.service.metrics.by_label("alert_threader_interactions_total", "action")
    assert {action: n for action, n in counted.items() if n} == {"ack": 1, "replayed": 1}
    assert sum("Acknowledged" in m.text for m in slack.messages) == 1


def test_a_click_replayed_after_a_restart_does_nothing_either(start, slack, fake_am):
    """The file store keeps which requests were taken in memory: a restarted service takes no request signed
    before it started (within the five minutes a signature stays good, its predecessor may have taken it)."""
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    body = urllib.parse.urlencode({"payload": json.dumps(block_action(slack.messages[0], "ack"))}).encode()
    headers = signed(body)
    assert svc.request("POST", "/slack/actions", raw=body, headers=headers).status == 200
    wait_for(lambda: any("Acknowledged by alice" in m.text for m in slack.messages), what="the ack's reply")
    stop(svc)
    time.sleep(1.1)  # the restart comes a second or more later, as any real one does
    again = interactive(start, fake_am.url)
    replayed = again.request("POST", "/slack/actions", raw=body, headers=headers)
    assert replayed.status == 200 and "taken already" in replayed.json()["done"]
    fresh = urllib.parse.urlencode({"payload": json.dumps(block_action(slack.messages[0], "ack", user="bob"))})
    assert again.request("POST", "/slack/actions", raw=fresh.encode(), headers=signed(fresh.encode())).status == 200
    wait_for(lambda: any("Acknowledged by bob" in m.text for m in slack.messages), what="a new click, taken")
    assert sum("Acknowledged by alice" in m.text for m in slack.messages) == 1


def test_acks_are_recorded_shown_on_the_card_and_kept_after_the_thread_closes(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    card = slack.messages[0]
    assert click(svc, block_action(card, "ack", user="alice")).status == 200
    wait_for(lambda: any("Acknowledged by alice" in m.text for m in slack.messages), what="alice's ack")
    assert click(svc, block_action(card, "ack", user="bob")).status == 200
    wait_for(lambda: "alice" in card_of(slack, card.ts) and "bob" in card_of(slack, card.ts), what="both on the card")
    record = svc.get("/cache").json()["threads"]["DatabaseDown|critical|database|prod-eu|production"]
    assert [a["name"] for a in record["acks"]] == ["alice", "bob"] and all(a["at"] > 0 for a in record["acks"])
    ack_replies = [m for m in slack.messages if "Acknowledged by" in m.text]
    assert [m.thread_ts for m in ack_replies] == [card.ts, card.ts]
    svc.alert(webhook(resolved(make_alert())))
    settled(svc)
    closed = card_of(slack, card.ts)
    assert "RESOLVED" in closed and "Acknowledged* by alice" in closed and "bob" in closed


def test_a_silence_alertmanager_refuses_or_cannot_take_is_told_to_the_clicker_only(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    fake_am.answer = {"status": 400}
    click(svc, block_action(slack.messages[0], "silence", value="4h"))
    ephemeral = wait_for(lambda: slack.accepted("chat.postEphemeral"), what="the ephemeral error")[0]
    assert ephemeral.payload["user"] == "U0ALICE" and "Alertmanager refused: HTTP 400" in ephemeral.payload["text"]
    record = svc.get("/cache").json()["threads"]["DatabaseDown|critical|database|prod-eu|production"]
    assert "silences" not in record and len(slack.messages) == 1, "nothing half-done"
    fake_am.close()  # now Alertmanager is gone altogether
    click(svc, block_action(slack.messages[0], "silence", value="4h"))
    wait_for(lambda: len(slack.accepted("chat.postEphemeral")) == 2, what="the second ephemeral error")
    assert "cannot reach Alertmanager" in slack.accepted("chat.postEphemeral")[1].payload["text"]


def test_silencing_one_alert_from_its_reply_matches_exactly_its_labels(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert(), make_alert(instance="db02", team="db")))
    card, reply = slack.messages
    block_id = next(b for b in reply.payload["attachments"][0]["blocks"] if b["type"] == "actions")["block_id"]
    click(svc, block_action(reply, "silence", block_id=block_id, value="1h", thread_ts=card.ts))
    wait_for(lambda: fake_am.requests, what="the silence to reach Alertmanager")
    method, path, body, headers = fake_am.requests[0]
    assert (method, path) == ("POST", "/api/v2/silences")
    labels = make_alert(instance="db02", team="db")["labels"]
    assert body["matchers"] == [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                                for k, v in sorted(labels.items())]
    assert body["createdBy"] == "alice"
    assert body["comment"] == (f"Silenced from Slack by alice: https://acme.slack.com/archives/C0ALERTS/p"
                               f"{card.ts.replace('.', '')}")
    wait_for(lambda: any("This alert silenced for 1h by alice" in m.text for m in slack.messages), what="the reply")


def test_alertmanager_credentials_come_from_a_file(start, slack, fake_am, tmp_path):
    (tmp_path / "am-auth").write_text("threader:s3cret-pass\n")
    svc = interactive(start, fake_am.url, ALERTMANAGER_AUTH_FILE=str(tmp_path / "am-auth"))
    svc.alert(webhook(make_alert()))
    click(svc, block_action(slack.messages[0], "silence", value="4h"))
    wait_for(lambda: fake_am.requests, what="the silence")
    assert fake_am.requests[0][3]["Authorization"] == "Basic " + base64.b64encode(b"threader:s3cret-pass").decode()
    assert "s3cret-pass" not in svc.log.getvalue()


@pytest.mark.parametrize("value, header", [("Bearer am-t0ken-SECRET", "Bearer am-t0ken-SECRET"),
                                           ("ops:am-pass-SECRET", "Basic " + base64.b64encode(b"ops:am-pass-SECRET")
                                            .decode())])
def test_alertmanager_credentials_in_the_environment_as_the_env_file_gives_them(start, slack, fake_am, value,
                                                                                  header):
    """install.sh writes them into the env file, which systemd reads as root: the service needs no file access."""
    svc = interactive(start, fake_am.url, ALERTMANAGER_AUTH=value)
    svc.alert(webhook(make_alert()))
    click(svc, block_action(slack.messages[0], "silence", value="4h"))
    wait_for(lambda: fake_am.requests, what="the silence")
    assert fake_am.requests[0][3]["Authorization"] == header
    fake_am.answer["status"] = 401
    click(svc, block_action(slack.messages[0], "silence", value="1h"))
    wait_for(lambda: any("ALERTMANAGER_AUTH" in c.payload.get("text", "") for c in slack.calls
                         if c.method == "chat.postEphemeral"), what="the ephemeral error")
    shown = svc.log.getvalue() + json.dumps([c.payload for c in slack.calls])
    assert "SECRET" not in shown and base64.b64encode(b"ops:am-pass-SECRET").decode() not in shown


def test_credentials_in_a_webhooks_external_url_never_reach_slack(start, slack):
    hook = webhook(make_alert())
    hook["externalURL"] = "http://admin:AMpassw0rd@alertmanager.example.com:9093"
    start().alert(hook)
    sent = json.dumps(slack.messages[0].payload)
    assert "AMpassw0rd" not in sent and "admin@" not in sent
    assert "http://alertmanager.example.com:9093/#/silences/new?filter=" in sent


def test_credentials_in_an_alerts_own_links_never_reach_slack_nor_the_disk(start, slack, tmp_path):
    alert = make_alert()
    alert["generatorURL"] = "http://prom:PromPassw0rd@prometheus.example.com:9090/graph?g0.expr=up"
    alert["annotations"]["runbook_url"] = "https://wiki:WikiSecret@wiki.example.com/runbooks/db"  # the rule's own
    grafana = {"status": "firing", "version": "1", "orgId": 1, "alerts": [dict(make_alert(name="FromGrafana"),
               dashboardURL="https://viewer:GrafPassw0rd@grafana.example.com/d/abc")]}
    svc = start()
    svc.alert(webhook(alert))
    svc.alert(grafana)
    sent = json.dumps([m.payload for m in slack.messages])
    assert "Passw0rd" not in sent and "prometheus.example.com:9090/graph" in sent
    assert "https://grafana.example.com/d/abc" in sent
    assert "WikiSecret" not in sent and "https://wiki.example.com/runbooks/db" in sent
    stop(svc)
    assert not [f for f in tmp_path.iterdir() if f.is_file() and b"Passw0rd" in f.read_bytes()]


def test_credentials_in_a_webhooks_external_url_are_neither_stored_nor_shown(start, slack, tmp_path):
    hook = webhook(make_alert())
    hook["externalURL"] = "http://admin:AMpassw0rd@alertmanager.example.com:9093"
    svc = start()
    assert svc.alert(hook).status == 200
    assert "AMpassw0rd" not in svc.get("/cache").text
    assert "alertmanager.example.com:9093" in svc.get("/cache").text  # the link itself is kept
    assert not [f for f in tmp_path.iterdir() if f.is_file() and b"AMpassw0rd" in f.read_bytes()]


def test_an_interaction_with_a_timestamp_of_other_digits_is_a_401_not_a_500(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    body = b"payload=x"
    answer = svc.request("POST", "/slack/actions", raw=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": "\u00b2".encode("latin-1"),
        "X-Slack-Signature": "v0=x"})
    assert answer.status == 401 and "Traceback" not in svc.log.getvalue()


@pytest.mark.parametrize("change", ["user as text", "channel as a list"])
def test_a_signed_payload_of_the_wrong_shape_is_a_400_and_does_nothing(start, slack, fake_am, change):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    payload = block_action(slack.messages[0], "silence", value="4h")
    if change == "user as text":
        payload["user"] = "alice"
    else:
        payload["channel"] = ["C0ALERTS"]
    answer = click(svc, payload)
    assert answer.status == 400 and answer.json()["error"] == "not a block_actions payload"
    assert svc.service.metrics.value("alert_threader_interactions_total", action="silence") == 0, "no work begun"
    assert fake_am.requests == [] and "Traceback" not in svc.log.getvalue()


def test_a_silence_from_an_unknown_block_is_the_cards_and_is_recorded(start, slack, fake_am):
    svc = interactive(start, fake_am.url)
    svc.alert(webhook(make_alert()))
    card = slack.messages[0]
    assert click(svc, block_action(card, "silence", value="4h", block_id="odd-block")).status == 200
    wait_for(lambda: any("This thread silenced for 4h" in m.text for m in slack.messages), what="the silence's reply")
    record = svc.get("/cache").json()["threads"]["DatabaseDown|critical|database|prod-eu|production"]
    assert [s["scope"] for s in record["silences"]] == ["thread"]


def test_alertmanager_credentials_are_refused_as_a_flag(tmp_path):
    result = run_cli("check", "--alertmanager-auth", "ops:pw", cwd=tmp_path)
    assert result.returncode == 2 and "--alertmanager-auth-file" in result.stderr.decode()


def am_get(am: "Alertmanager", path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", am.port, timeout=10)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def test_a_silence_from_the_card_reaches_a_real_alertmanager_and_mutes_the_thread(start, slack, tmp_path):
    am_port = free_port()
    svc = interactive(start, f"http://127.0.0.1:{am_port}")
    am = Alertmanager(tmp_path, svc.port, port=am_port)
    try:
        am.push(am_alert("db01"))
        card = wait_for(lambda: slack.messages, timeout=20, what="Alertmanager's first webhook")[0]
        assert click(svc, block_action(card, "silence", value="4h", user="alice")).status == 200
        wait_for(lambda: [s for s in am_get(am, "/api/v2/silences") if s["status"]["state"] == "active"],
                 what="the silence in Alertmanager")
        [silence] = am_get(am, "/api/v2/silences")
        assert silence["createdBy"] == "alice" and "https://acme.slack.com/archives/C0ALERTS/p" in silence["comment"]
        assert sorted((m["name"], m["value"], m["isEqual"], m["isRegex"]) for m in silence["matchers"]) == [
            ("alertname", "DiskFull", True, False), ("cluster", "prod-eu", True, False),
            ("service", "storage", True, False), ("severity", "warning", True, False)]
        reply = wait_for(lambda: [m for m in slack.messages if "silenced for 4h by alice" in m.text],
                         what="the silence's reply")[0]
        assert reply.thread_ts == card.ts and "This thread silenced for 4h by alice (until " in reply.text
        wait_for(lambda: "Silenced* until" in card_of(slack, card.ts), what="the card to show the silence")
        unsilence = next(e for u in slack.accepted("chat.update") for b in u.payload["attachments"][0]["blocks"]
                         if b["type"] == "actions" for e in b["elements"] if e["action_id"] == "unsilence")
        assert unsilence["value"] == silence["id"]
        # A new instance of the thread's alert: silenced, so Alertmanager tells no one.
        am.push(am_alert("db01"), am_alert("db02"))
        wait_for(lambda: any(a["labels"]["instance"] == "db02" and a["status"]["state"] == "suppressed"
                             for a in am_get(am, "/api/v2/alerts")), what="db02 to be suppressed")
        # An alert of the same group that no silence covers: the notification that brings it is the group's,
        # and would carry db02 too, were it not muted.
        witness = am_alert("web01")
        witness["labels"]["service"] = "web"
        am.push(am_alert("db01"), am_alert("db02"), witness)
        wait_for(lambda: any("web01" in m.text for m in slack.messages), timeout=20, what="the group's next webhook")
        assert not any("db02" in json.dumps(m.payload) for m in slack.messages)
        # Unsilence from the card expires it in Alertmanager.
        click(svc, block_action(card, "unsilence", value=silence["id"], user="bob"))
        wait_for(lambda: am_get(am, "/api/v2/silences")[0]["status"]["state"] == "expired", what="the expiry")
        wait_for(lambda: any("Silence lifted by bob" in m.text for m in slack.messages), what="bob's reply")
        log_text = svc.log.getvalue()
        assert "Silence and Ack from Slack are on" in log_text
        assert "silenced from Slack thread=" in log_text and f"silence={silence['id']}" in log_text
        assert "silence lifted from Slack" in log_text and "user=bob" in log_text
        env = {"SLACK_SIGNING_SECRET": SIGNING_SECRET, "THREAD_STORE_FILE": str(tmp_path / "check.json")}
        ok = run_cli("check", cwd=tmp_path, env=dict(env, ALERTMANAGER_URL=f"http://127.0.0.1:{am_port}"))
        assert f"alertmanager: OK (http://127.0.0.1:{am_port}, version " in ok.stdout.decode(), ok.stdout
        dead = run_cli("check", cwd=tmp_path, env=dict(env, ALERTMANAGER_URL=f"http://127.0.0.1:{free_port()}"))
        assert dead.returncode == 1 and "alertmanager: FAILED: cannot reach Alertmanager" in dead.stdout.decode()
    finally:
        am.stop()


# ---------------------------------------------------------------------------
# Found by an attacker: heads that are too big or too slow, drips, bare CRs, collisions, rebinding
# ---------------------------------------------------------------------------

def test_request_heads_larger_than_32_kib_are_refused_before_they_take_memory(start, slack):
    svc = start()
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
    answer = raw_exchange(svc.port, head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"32 KiB" in answer
    assert svc.get("/health").status == 200


def test_a_head_that_trickles_in_is_dropped_after_client_timeout_in_all(start, slack):
    svc = start(CLIENT_TIMEOUT="1s")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /alert HTTP/1.1\r\nX-Slow: ")
        closed = False
        try:
            while time.monotonic() - started < 6:
                sock.sendall(b"a")  # a byte well within each read's timeout
                time.sleep(0.25)
                if select.select([sock], [], [], 0)[0] and not sock.recv(1024):
                    closed = True
                    break
        except OSError:
            closed = True  # a send into a connection the service closed
        assert closed and time.monotonic() - started < 3, "held for as long as the client trickles"
    assert svc.get("/health").status == 200


def test_bursts_of_connections_are_all_answered_not_reset(start, slack):
    svc = start()
    answers: List[bytes] = []

    def connect() -> None:
        with contextlib.suppress(OSError):
            answers.append(raw_exchange(svc.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                        timeout=20))

    threads = [threading.Thread(target=connect) for _ in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 150 and all(a.startswith(b"HTTP/1.1 200 ") for a in answers), \
        f"{sum(not a for a in answers)} empty, {150 - len(answers)} reset"
    assert svc.service.server.request_queue_size >= 128


def test_a_slack_answer_that_drips_times_out_after_slack_timeout_in_all(start, slack):
    svc = start(SLACK_TIMEOUT="1s")
    slack.fail("chat.postMessage", {"drip": 0.2})  # 60 bytes: 12 s for the whole answer
    started = time.monotonic()
    answer = svc.alert(webhook(make_alert()))
    assert answer.json()["results"][0]["action"] == "posted" and time.monotonic() - started < 4
    assert svc.get("/health").json()["last_slack_error"]["error"] == "timeout after 1s"


def test_a_webhook_of_too_many_json_values_is_refused_unparsed(start, slack):
    svc = start(MAX_BODY_BYTES=str(8 << 20))
    body = b'{"alerts": [' + b",".join([b"{}"] * 300_000) + b"]}"
    answer = svc.request("POST", "/alert", raw=body)
    assert answer.status == 413 and "more than 250,000 JSON values" in answer.json()["error"]
    started = time.monotonic()
    assert at.label_fingerprint({"huge": "x" * (8 << 20)}).startswith("s") and time.monotonic() - started < 1


@pytest.mark.parametrize("header", [b"X-Note: a\rAuthorization: Bearer " + WEBHOOK_TOKEN.encode(),
                                    b"X-Note: a\rContent-Length: 34", b"X-Note: a\x00b"])
def test_a_bare_cr_or_nul_in_a_header_is_refused_not_split_into_headers(start, slack, header):
    svc = start(WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    answer = raw_exchange(svc.port, b"GET /cache HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
                                    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers_in(answer) == [b"HTTP/1.1 400 Bad Request\r\n"] and b"bare CR or a NUL" in answer


def test_a_lone_surrogate_in_a_key_gets_a_readable_400(start, slack):
    svc = start()
    answer = svc.request("POST", "/alert", raw=b'{"alerts": [{"labels": {"a\\udc00": "x"}}]}')
    assert answer.status == 400 and answer.json()["error"] == \
        "alerts[0].labels.a\\udc00 is not valid Unicode (lone surrogate)"
    assert "Traceback" not in svc.log.getvalue()


def test_an_alert_of_one_channel_cannot_take_over_another_channels_thread(start, slack):
    svc = start(SLACK_CHANNELS="C0ALERTS,C0OTHER")
    svc.alert(webhook(make_alert(name="Foo")), channel="C0OTHER")
    evil = make_alert(name="C0OTHER:Foo")
    svc.alert(webhook(evil))  # its thread key starts like C0OTHER's store key for Foo
    answer = svc.alert(webhook(resolved(make_alert(name="Foo"))), channel="C0OTHER").json()
    assert answer["results"][0]["action"] == "replied" and slack.messages[-1].thread_ts == slack.messages[0].ts
    keys = svc.get("/cache").json()["threads"]
    assert "C0OTHER:Foo|critical|database|prod-eu|production" in keys
    assert "\\C0OTHER:Foo|critical|database|prod-eu|production" in keys


def test_a_redis_password_is_refused_as_a_flag(tmp_path):
    result = run_cli("--redis-url", "redis://:hunter2-secret@127.0.0.1:6379/0", cwd=tmp_path)
    assert result.returncode == 2 and "--redis-url: a password on the command line" in result.stderr.decode()
    assert "hunter2" not in result.stderr.decode()


def test_alert_text_cannot_forge_a_log_line(start, slack):
    svc = start(LOG_FORMAT="text")
    svc.alert(webhook(make_alert(), group_key="x\x1b[2K\rERROR\tSlack call failed\nINFO forged"))
    line = next(l for l in svc.log.getvalue().splitlines() if " webhook " in l)
    assert "\x1b" not in line and "\r" not in line and "\\u001b[2K\\rERROR\\tSlack call failed\\nINFO forged" in line
    svc.alert(webhook(make_alert(), group_key="exe.\u202etxt"))
    line = [l for l in svc.log.getvalue().splitlines() if " webhook " in l][-1]
    assert "\u202e" not in line and "exe.\\u202etxt" in line, "a bidi override reversing the log line is escaped"


def test_a_body_slower_than_twice_client_timeout_is_a_408_saying_so(start, slack):
    svc = start(CLIENT_TIMEOUT="0.5s")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 40\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            for _ in range(12):
                sock.sendall(b" ")
                time.sleep(0.2)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1s" in answer, answer[:200]


@pytest.mark.parametrize("length", [b"34\x0b", b"\x0c34", b"34\xa0"])
def test_content_length_takes_digits_spaces_and_tabs_only(start, slack, length):
    svc = start()
    answer = raw_exchange(svc.port, b"POST /alert HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length" in answer


def test_100_mib_from_a_client_that_writes_before_it_reads_still_gets_its_413(start, slack):
    svc = start()
    request = urllib.request.Request(f"http://127.0.0.1:{svc.port}/alert", data=b"{" + b" " * (100 << 20) + b"}",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413


def test_stored_alerts_answer_no_name_rebound_to_this_machine_and_webhooks_need_json(start, slack):
    svc = start()
    svc.alert(webhook(make_alert()))
    rebound = svc.get("/cache", headers={"Host": "rebind.attacker.example:9009"})
    assert rebound.status == 403 and "WEBHOOK_TOKEN" in rebound.json()["error"]
    assert svc.request("DELETE", "/cache", headers={"Host": "rebind.attacker.example"}).status == 403
    assert svc.get("/cache", headers={"Host": f"localhost:{svc.port}"}).json()["cached_threads"] == 1
    untyped = svc.request("POST", "/alert", raw=json.dumps(webhook(make_alert(name="X"))).encode(),
                          headers={"Content-Type": ""})
    assert untyped.status == 400 and "Content-Type must be application/json" in untyped.json()["error"]


def test_a_retry_after_of_hours_holds_a_channel_back_five_minutes_at_most():
    metrics = at.Metrics()
    slack = FakeSlack()
    try:
        slack.fail("chat.postMessage", {"status": 429, "retry_after": 99999})
        client = at.SlackClient(slack.url, SLACK_TOKEN, 2, metrics)
        with pytest.raises(at.SlackError) as refused:
            client.call("chat.postMessage", {"channel": "C1", "text": "x"})
        assert refused.value.retry_after == 300
    finally:
        slack.close()


# ---------------------------------------------------------------------------
# Never touch the state of a service that is already running
# ---------------------------------------------------------------------------

def test_check_reads_a_running_services_store_without_writing_it(start, slack, tmp_path):
    svc = start()
    svc.alert(webhook(make_alert()))
    before = state_bytes(tmp_path)
    env = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url,
           "THREAD_STORE_FILE": str(tmp_path / "threads.json")}
    result = run_cli("check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout
    assert f"store: OK ({tmp_path / 'threads.json'}, 1 thread, 0 alerts waiting for Slack)" in result.stdout.decode()
    assert state_bytes(tmp_path) == before, "check must not fold or rewrite the live store"


def test_a_second_instance_stops_before_touching_the_running_ones_state(start, slack, tmp_path):
    svc = start()
    svc.alert(webhook(make_alert()))
    before = state_bytes(tmp_path)
    env = {"THREAD_STORE_FILE": str(tmp_path / "threads.json"), "HOST": "127.0.0.1"}
    same_port = run_cli("--port", str(svc.port), cwd=tmp_path, env=env)
    assert same_port.returncode == 2
    assert same_port.stderr.decode().splitlines() == [
        "alert-threader: PORT: cannot listen on 127.0.0.1:%d: Address already in use (choose another PORT or "
        "HOST)" % svc.port]
    other_port = run_cli("--port", "0", cwd=tmp_path, env=env)
    assert other_port.returncode == 2
    assert other_port.stderr.decode().splitlines() == [
        f"alert-threader: THREAD_STORE_FILE: {tmp_path / 'threads.json'} is in use by another running alert-threader "
        "(stop it, or name another file)"]
    assert state_bytes(tmp_path) == before
    stop(svc)
    svc = start()  # the lock goes with the service that held it
    assert svc.get("/cache").json()["cached_threads"] == 1


def test_alert_without_fingerprint_is_the_same_alert_alertmanager_sends(start, slack):
    """docs/operations.md's smoke tests in order: the seed's curl alert, then the real Alertmanager payloads."""
    svc = start()
    seed = json.loads((EXAMPLES / "firing.json").read_text())["alerts"][0]
    curl_alert = {"labels": seed["labels"], "annotations": seed["annotations"], "startsAt": seed["startsAt"]}
    assert at.label_fingerprint(seed["labels"]) == seed["fingerprint"] == "0e1cd657711730e5"
    first = svc.alert({"status": "firing", "alerts": [curl_alert]}).json()
    actions = [[r["action"] for r in first["results"]]]
    for name in PAYLOADS:
        answer = svc.request("POST", "/alert", raw=(EXAMPLES / name).read_bytes()).json()
        actions.append([r["action"] for r in answer["results"]])
    assert actions == [["posted"], ["unchanged"], ["unchanged", "replied"], ["replied", "replied"]]
    assert svc.get("/cache").json()["threads"]["TestCritical|critical|database|production|production"][
        "status"] == "closed"


def test_a_digest_stored_before_members_were_kept_takes_its_resolves(start, slack, tmp_path):
    """An upgrade finds an open digest of the old shape (counters, keyed by Alertmanager group): it carries on."""
    alerts = storm_alerts(12)
    digest_key = "storm|C0ALERTS|fafcef8d0aa1ef38"
    threads = {digest_key: {"ts": "1700000000.000001", "channel": "C0ALERTS", "key": digest_key, "storm": True,
                            "status": "open", "created": 1.0, "updated": 1.0, "closed": None, "ended": None,
                            "started": 1705329025.0, "firing": 12, "resolved": 0,
                            "by_name": {a["labels"]["alertname"]: 1 for a in alerts},
                            "by_severity": {"critical": 6, "warning": 6}, "alerts": {}}}
    for a in alerts:
        key = "|".join([a["labels"]["alertname"], a["labels"]["severity"], "database", "prod-eu", "production"])
        threads[key] = {"ts": "1700000000.000001", "channel": "C0ALERTS", "key": key, "status": "open",
                        "digest": digest_key, "created": 1.0, "updated": 1.0, "closed": None, "ended": None,
                        "alerts": {a["fingerprint"]: ["f", 1705329025.0, None]}}
    (tmp_path / "threads.json").write_text(json.dumps({"version": 1, "threads": threads}))
    svc = start()
    answer = svc.alert(webhook(*[resolved(a) for a in alerts])).json()
    assert {r["action"] for r in answer["results"]} == {"replied"}
    settled(svc)
    [batch] = slack.messages
    assert batch.thread_ts == "1700000000.000001" and batch.text.startswith("✅ 12 resolved")
    [update] = slack.accepted("chat.update")
    assert "Alert storm over: all 12 alerts resolved" in update.text and "✅ 12 resolved" in update.text


def test_alert_rule_series_exist_from_the_start(start, slack):
    svc = start()
    text = svc.get("/metrics").text.splitlines()
    for line in ('alert_threader_webhooks_total{code="200"} 0', 'alert_threader_webhooks_total{code="503"} 0',
                 'alert_threader_store_errors_total{op="write",store="file"} 0',
                 "alert_threader_slack_fallbacks_total 0", "alert_threader_slack_resends_total 0",
                 "alert_threader_connections_refused_total 0", "alert_threader_connections_evicted_total 0",
                 'alert_threader_slack_refused_total{method="chat.postMessage"} 0'):
        assert line in text, line
    assert "alert_threader_interactions_total{" not in svc.get("/metrics").text, "no clicks without the secret"
    stop(svc)
    interactive = start(SLACK_SIGNING_SECRET=SIGNING_SECRET,
                        ALERTMANAGER_URL="http://alertmanager.invalid:9093").get("/metrics").text.splitlines()
    for action in ("silence", "unsilence", "ack", "failed"):
        assert f'alert_threader_interactions_total{{action="{action}"}} 0' in interactive, action


def test_check_says_when_slack_cannot_be_reached(tmp_path):
    env = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS",
           "SLACK_API_URL": f"http://127.0.0.1:{free_port()}/api/"}
    result = run_cli("check", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "cannot reach Slack at SLACK_API_URL: check the URL, DNS, proxy and firewall" in result.stdout.decode()
