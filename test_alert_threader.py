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
import contextlib
import html.parser
import http.client
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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

    @property
    def thread_ts(self) -> Optional[str]:
        return self.payload.get("thread_ts")

    @property
    def text(self) -> str:
        return visible_text(self.payload)

    def __repr__(self) -> str:
        return f"<{self.method} ts={self.ts} thread={self.thread_ts} {self.text[:60]!r}>"


def visible_text(payload: Dict[str, Any]) -> str:
    """Everything a person could read in a message: fallback text and every block's text."""
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


class FakeSlack:
    """Slack's Web API on 127.0.0.1:0. Script answers with fail(method, *answers):
    {"error": code} (ok:false), {"status": 503}, {"status": 429, "retry_after": 1},
    {"drop": True} (close without answering), {"sleep": s} (then answer ok)."""

    def __init__(self) -> None:
        self.calls: List[Call] = []
        self.lock = threading.Lock()
        self.scripts: Dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.always: Dict[str, Dict[str, Any]] = {}
        self.seq = 0
        self.barrier: Optional[threading.Barrier] = None
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                method = self.path.rsplit("/", 1)[-1]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                call = Call(method, dict(self.headers), json.loads(body or b"{}"))
                with fake.lock:
                    fake.calls.append(call)
                    answer = fake.scripts[method].popleft() if fake.scripts[method] else fake.always.get(method)
                answer = answer or {}
                if answer.get("drop"):
                    self.close_connection = True
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
                self.reply(200, {"ok": True, "ts": ts, "channel": call.payload.get("channel")})

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

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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
    """A Config through the same parser and loader main uses (settings passed as flags)."""
    argv = []
    for name, value in settings.items():
        argv += [at.flag_name(name), str(value)]
    return at.load_config(at.build_parser().parse_args(argv), {})


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

    def _start(**settings: Any) -> Running:
        values = {"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url,
                  "THREAD_STORE_FILE": str(tmp_path / "threads.json"), "HOST": "127.0.0.1", "PORT": "0",
                  "SLACK_RETRY_BUDGET": "2s", "SLACK_TIMEOUT": "1s", "LOG_LEVEL": "debug"}
        values.update({k: v for k, v in settings.items() if v is not None})
        for name in [k for k, v in settings.items() if v is None]:
            values.pop(name, None)
        config = make_config(values)
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


def run_cli(*args: str, cwd: Path, env: Optional[Dict[str, str]] = None, timeout: float = 20,
            stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """python3 alert_threader.py ARGS with only the given settings in its environment."""
    base = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    base.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "alert_threader.py"), *args], env=base, input=stdin,
                          capture_output=True, timeout=timeout, cwd=str(cwd))


def test_help_lists_every_setting_with_its_default(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    out = result.stdout.decode()
    for name, default, _ in at.SETTINGS:
        assert at.flag_name(name) in out and name in out, name
        if default is not None and name not in at.SECRET_SETTINGS:
            assert f"(default: {default})" in " ".join(out.split()), name


@pytest.mark.parametrize("variable, value, message", [
    ("THREAD_STORE", "postgres", "THREAD_STORE='postgres' is unknown"),
    ("PORT", "http", "PORT='http' is not an integer"),
    ("PORT", "70000", "PORT=70000 is out of range"),
    ("THREAD_STORE_FILE", "/nonexistent/dir/threads.json", "THREAD_STORE_FILE: directory /nonexistent/dir does not exist"),
    ("REDIS_URL", "http://localhost:6379", "REDIS_URL must be redis://"),
    ("REDIS_URL", "redis://localhost:notaport/0", "REDIS_URL is malformed"),
    ("SLACK_API_URL", "ftp://slack.example.com/", "SLACK_API_URL='ftp://slack.example.com/' must be an http(s) URL"),
    ("REOPEN_WINDOW", "soon", "REOPEN_WINDOW='soon' is not a duration"),
    ("STORM_THRESHOLD", "0", "STORM_THRESHOLD=0 is out of range"),
    ("SLACK_CHANNEL", "not a channel", "SLACK_CHANNEL='not a channel' is not a channel ID"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT='xml' must be text or json"),
])
def test_invalid_setting_stops_startup_with_one_line_naming_it(tmp_path, variable, value, message):
    result = run_cli(cwd=tmp_path, env={variable: value})
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_flag_wins_over_environment(tmp_path):
    result = run_cli("--storm-threshold", "5", "check", cwd=tmp_path, env={"STORM_THRESHOLD": "nope"})
    assert "STORM_THRESHOLD" not in result.stderr.decode()
    args = at.build_parser().parse_args(["--environment", "staging"])
    config = at.load_config(args, {"ENVIRONMENT": "production", "STORM_THRESHOLD": "7"})
    assert config.environment == "staging" and config.storm_threshold == 7


def test_token_without_channel_is_refused(tmp_path):
    result = run_cli(cwd=tmp_path, env={"SLACK_BOT_TOKEN": SLACK_TOKEN})
    assert result.returncode == 2
    assert "SLACK_CHANNEL is required" in result.stderr.decode()


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
    payload = at.render_alert(alert, "C1", "production", "firing")
    assert payload["attachments"][0]["color"] == color
    header = payload["attachments"][0]["blocks"][0]
    assert header["type"] == "header" and header["text"]["text"].startswith(emoji + " ")
    assert payload["text"].startswith(emoji + " ")


def test_message_keeps_the_seed_layout():
    alert = at.parse_webhook(json.dumps(webhook(make_alert(summary="Database Critical Failure"))).encode()).alerts[0]
    payload = at.render_alert(alert, "C1", "production", "firing",
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
    assert blocks[4]["elements"][0]["text"] == "*Started:* 2024-01-15 14:30:25 UTC"
    assert blocks[5]["elements"][0]["text"] == "env=production | alertname=DatabaseDown"
    assert payload["text"] == "🚨 [CRITICAL] Database Critical Failure (production)"
    assert "link_names" not in payload and "parse" not in payload


def test_resolved_layout():
    alert = at.parse_webhook(json.dumps(webhook(resolved(make_alert(summary="Database Critical Failure"))))
                             .encode()).alerts[0]
    payload = at.render_alert(alert, "C1", "production", "resolved", thread_ts="1.2")
    blocks = payload["attachments"][0]["blocks"]
    assert blocks[0]["text"]["text"] == "✅ RESOLVED — Database Critical Failure"
    assert payload["text"] == "✅ RESOLVED — Database Critical Failure"
    assert payload["attachments"][0]["color"] == "#2EB67D" and payload["thread_ts"] == "1.2"
    assert blocks[-2]["elements"][0]["text"] == (
        "*Started:* 2024-01-15 14:30:25 UTC | *Resolved:* 2024-01-15 14:45:30 UTC (after 15m 5s)")


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
    cleared = svc.request("DELETE", "/cache")
    assert cleared.status == 200 and cleared.json() == {"ok": True, "cleared": 1, "thread_store": "file"}
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

def test_file_store_writes_whole_valid_files_and_leaves_no_temporary_files(start, slack, tmp_path):
    svc = start()
    for i in range(5):
        svc.alert(webhook(make_alert(name=f"Alert{i}")))
    document = json.loads((tmp_path / "threads.json").read_text())
    assert len(document["threads"]) == 5
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_corrupt_state_file_is_moved_aside_and_reported(start, slack, tmp_path):
    (tmp_path / "threads.json").write_text('{"version": 1, "threads": {"half')
    svc = start()
    health = svc.get("/health").json()
    moved = health["moved_aside"]
    assert Path(moved).read_text() == '{"version": 1, "threads": {"half'
    assert "thread store file was unusable" in svc.log.getvalue()
    svc.alert(webhook(make_alert()))
    assert len(json.loads((tmp_path / "threads.json").read_text())["threads"]) == 1


def test_leftover_temporary_files_are_removed_at_start(start, slack, tmp_path):
    leftover = tmp_path / ".threads.json.tmp-abc123"
    leftover.write_text("{partial")
    start()
    assert not leftover.exists()


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


def test_slack_down_past_the_budget_answers_503_and_the_retry_posts_once(start, slack):
    svc = start(SLACK_RETRY_BUDGET="1s")
    slack.fail_always("chat.postMessage", {"status": 500})
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert answer.json()["ok"] is False and "http_500" in answer.json()["error"]
    assert slack.messages == []
    slack.fail_always("chat.postMessage", None)
    svc.alert(webhook(make_alert()))
    svc.alert(webhook(make_alert()))
    assert len(slack.messages) == 1


def test_slow_slack_past_the_timeout_answers_503(start, slack):
    svc = start(SLACK_TIMEOUT="0.3s", SLACK_RETRY_BUDGET="0.5s")
    slack.fail("chat.postMessage", {"sleep": 1.0, "status": 504})
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert "timeout after 0.3s" in answer.json()["error"]
    svc.alert(webhook(make_alert()))
    assert len(slack.messages) == 1


def test_rate_limit_waits_for_retry_after_when_it_fits_the_budget(start, slack):
    svc = start(SLACK_RETRY_BUDGET="3s")
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 1})
    started = time.monotonic()
    svc.alert(webhook(make_alert()))
    assert time.monotonic() - started >= 1.0
    assert len(slack.messages) == 1
    metrics = svc.get("/metrics").text
    assert "alert_threader_slack_rate_limit_wait_seconds_total 1" in metrics
    assert 'alert_threader_slack_requests_total{method="chat.postMessage",result="ratelimited"} 1' in metrics


def test_rate_limit_longer_than_the_budget_answers_503_not_429(start, slack):
    svc = start(SLACK_RETRY_BUDGET="1s")
    slack.fail("chat.postMessage", {"status": 429, "retry_after": 30})
    started = time.monotonic()
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert time.monotonic() - started < 1.0, "must not sleep a Retry-After that cannot fit"
    assert "ratelimited" in answer.json()["error"]
    svc.alert(webhook(make_alert()))
    assert len(slack.messages) == 1


def test_webhook_failing_half_way_is_completed_by_the_retry_without_duplicates(start, slack):
    svc = start(SLACK_RETRY_BUDGET="0.5s")
    alerts = [make_alert(name=f"Alert{i}") for i in range(4)]
    slack.fail("chat.postMessage", {}, {}, {"status": 503}, {"status": 503}, {"status": 503}, {"status": 503},
               {"status": 503}, {"status": 503}, {"status": 503}, {"status": 503})
    first = svc.alert(webhook(*alerts), expect=503).json()
    assert [r["action"] for r in first["results"]] == ["posted", "posted"]
    slack.scripts["chat.postMessage"].clear()
    second = svc.alert(webhook(*alerts)).json()
    assert [r["action"] for r in second["results"]] == ["unchanged", "unchanged", "posted", "posted"]
    svc.alert(webhook(*alerts))
    names = sorted(m.payload["text"].split("] ")[1].split(" on ")[0] for m in slack.messages)
    assert names == ["Alert0", "Alert1", "Alert2", "Alert3"]


@pytest.mark.parametrize("error, fix", [
    ("invalid_auth", "Bot User OAuth Token"), ("not_authed", "set SLACK_BOT_TOKEN"),
    ("account_inactive", "reinstall the app"), ("token_revoked", "reinstall the Slack app"),
    ("missing_scope", "chat:write"), ("channel_not_found", "channel ID"),
    ("not_in_channel", "/invite @your-app"), ("is_archived", "unarchive"),
])
def test_permanent_configuration_errors_keep_the_alert_and_say_how_to_fix(start, slack, error, fix):
    svc = start()
    slack.fail_always("chat.postMessage", {"error": error})
    answer = svc.alert(webhook(make_alert()), expect=503)
    assert error in answer.json()["error"] and fix in answer.json()["error"]
    health = svc.get("/health")
    assert health.status == 503 and health.json()["status"] == "degraded"
    assert health.json()["last_slack_error"]["error"] == error and fix in health.json()["last_slack_error"]["fix"]
    log_line = next(line for line in svc.log.getvalue().splitlines() if "Slack call failed" in line)
    assert f"error={error}" in log_line and fix in log_line
    assert len([c for c in slack.calls if c.method == "chat.postMessage"]) == 1, "permanent errors are not retried"
    slack.fail_always("chat.postMessage", None)
    svc.alert(webhook(make_alert()))
    assert len(slack.messages) == 1 and svc.get("/health").status == 200


@pytest.mark.parametrize("error", ["invalid_blocks", "invalid_attachments", "too_many_attachments",
                                   "msg_blocks_too_long"])
def test_rejected_layout_is_resent_once_as_plain_text(start, slack, error):
    svc = start()
    slack.fail("chat.postMessage", {"error": error})
    answer = svc.alert(webhook(make_alert(summary="Disk <full> & more")))
    assert answer.json()["results"][0]["action"] == "posted"
    [message] = slack.messages
    assert "attachments" not in message.payload and "blocks" not in message.payload
    text = message.payload["text"]
    assert "Disk &lt;full&gt; &amp; more" in text and "CRITICAL" in text and "db01.example.com" in text
    assert "Started: 2024-01-15 14:30:25 UTC" in text and "https://runbooks.example.com/DatabaseDown" in text
    assert "alert_threader_slack_fallbacks_total 1" in svc.get("/metrics").text
    assert f"error={error}" in svc.log.getvalue()


def test_reply_whose_parent_is_gone_starts_the_thread_again(start, slack):
    svc = start()
    a, b = make_alert(instance="db01"), make_alert(instance="db02")
    svc.alert(webhook(a))
    slack.fail("chat.postMessage", {"error": "thread_not_found"})
    svc.alert(webhook(a, b))
    old_parent, new_parent, reply = slack.messages
    assert new_parent.thread_ts is None and reply.thread_ts == new_parent.ts != old_parent.ts
    key = "DatabaseDown|critical|database|prod-eu|production"
    assert svc.get("/cache").json()["threads"][key]["ts"] == new_parent.ts
    svc.alert(webhook(resolved(a), b))
    assert slack.messages[-1].thread_ts == new_parent.ts


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


def test_unrelated_keys_are_delivered_in_parallel(start, slack):
    svc = start()
    # The fake Slack holds each postMessage until both have arrived: serialised delivery would break it.
    arrived = threading.Barrier(2, timeout=5)
    original = slack.server.RequestHandlerClass.do_POST

    def gated(handler: Any) -> None:
        if handler.path.endswith("chat.postMessage"):
            arrived.wait()
        original(handler)

    slack.server.RequestHandlerClass.do_POST = gated
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(svc.alert(webhook(make_alert(name=n)))))
               for n in ("KeyOne", "KeyTwo")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not arrived.broken and len(slack.messages) == 2


def start_process(tmp_path: Path, slack: FakeSlack, *extra: str, env: Optional[Dict[str, str]] = None
                  ) -> "tuple[subprocess.Popen, int]":
    """The real program in its own process, as systemd would run it."""
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    proc_env.update({"SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_CHANNEL": "C0ALERTS", "SLACK_API_URL": slack.url,
                     "THREAD_STORE_FILE": str(tmp_path / "threads.json"), "HOST": "127.0.0.1",
                     "PORT": str(port)})
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


def test_sigkill_at_any_moment_leaves_a_valid_state_file(tmp_path, slack):
    rng = random.Random(7)
    sent = 0
    for round_number in range(4):
        proc, port = start_process(tmp_path, slack)
        stop_sending = threading.Event()

        def keep_sending() -> None:
            nonlocal sent
            while not stop_sending.is_set():
                with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                    post_to(port, webhook(*[make_alert(name=f"Crash{sent}-{i}") for i in range(3)]), timeout=5)
                sent += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(rng.uniform(0.2, 0.6))  # kill at an arbitrary moment, not a chosen one
        proc.kill()
        proc.wait(10)
        stop_sending.set()
        sender.join(10)
        document = json.loads((tmp_path / "threads.json").read_text())
        assert isinstance(document["threads"], dict)
    proc, port = start_process(tmp_path, slack)
    try:
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["cached_threads"] >= 1
    finally:
        proc.terminate()
        proc.wait(20)
