#!/usr/bin/env python3
"""Redraw examples/preview-silenced.png: a thread silenced and acknowledged from Slack, as /preview shows it.

Starts a real Alertmanager (Debian: prometheus-alertmanager) and alert-threader in dry-run mode with a
signing secret, both on free loopback ports with throw-away state, posts two example webhooks, then
sends the two signed clicks Slack would send (Ack by alice, Silence for 4h by bob) and screenshots
/preview with headless Chromium (apt-get install chromium fonts-noto-color-emoji fonts-liberation2).

Usage: python3 examples/screenshot_silenced.py [OUTPUT.png]
"""
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict

HERE = Path(__file__).resolve().parent
SECRET = "screenshot-signing-secret-0123"  # a throw-away secret for this run only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"screenshot_silenced.py: timed out waiting for {what}")


def post(url: str, body: bytes, headers: Dict[str, str]) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST")) as r:
        return r.read()


def get(url: str) -> str:
    with urllib.request.urlopen(url) as r:
        return r.read().decode()


def click(service: str, ts: str, action_id: str, user: str, value: str = "") -> None:
    """POST /slack/actions the block_actions payload Slack sends for a click on the card, signed."""
    action: Dict[str, Any] = {"action_id": action_id, "block_id": "card", "action_ts": str(time.time())}
    if value:
        action.update(type="static_select",
                      selected_option={"text": {"type": "plain_text", "text": value}, "value": value})
    else:
        action.update(type="button", value=action_id)
    payload = {"type": "block_actions", "user": {"id": "U0" + user.upper(), "username": user, "name": user},
               "team": {"id": "T0TEAM", "domain": "acme"}, "channel": {"id": "C0123456789", "name": "alerts"},
               "container": {"type": "message", "message_ts": ts, "channel_id": "C0123456789"},
               "message": {"ts": ts, "type": "message"}, "actions": [action]}
    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    stamp = str(int(time.time()))
    signature = hmac.new(SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    post(f"{service}/slack/actions", body, {"Content-Type": "application/x-www-form-urlencoded",
                                            "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": "v0=" + signature})


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "preview-silenced.png").resolve()
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("google-chrome")
    if not alertmanager or not chromium:
        sys.exit("screenshot_silenced.py: needs prometheus-alertmanager and chromium (apt-get install them)")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "am.yml").write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
        am_url = f"http://127.0.0.1:{free_port()}"
        am = subprocess.Popen([alertmanager, f"--config.file={tmp}/am.yml", f"--storage.path={tmp}/am",
                               f"--web.listen-address={am_url[7:]}", f"--cluster.listen-address=127.0.0.1:{free_port()}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "WEBHOOK_", "ALERTMANAGER_"))}
        env.update(SLACK_SIGNING_SECRET=SECRET, ALERTMANAGER_URL=am_url, SLACK_CHANNEL="C0123456789",
                   THREAD_STORE_FILE=f"{tmp}/threads.json", HOST="127.0.0.1", PORT="0")
        log = Path(tmp, "service.log")
        with log.open("w") as log_file:
            service_proc = subprocess.Popen([sys.executable, str(HERE.parent / "alert_threader.py")], env=env,
                                            stdout=log_file, stderr=log_file)
        try:
            wait_for(lambda: get(f"{am_url}/-/ready"), "Alertmanager")
            found = wait_for(lambda: re.search(r"\((http://127\.0\.0\.1:\d+) from", log.read_text()), "the service")
            service = found.group(1)
            for name in ("firing", "second-instance"):
                post(f"{service}/alert", (HERE / f"{name}.json").read_bytes(), {"Content-Type": "application/json"})
            [thread] = json.loads(get(f"{service}/cache"))["threads"].values()
            click(service, thread["ts"], "ack", "alice")
            wait_for(lambda: "Acknowledged</b> by alice" in get(f"{service}/preview"), "the ack on the card")
            click(service, thread["ts"], "silence", "bob", "4h")
            wait_for(lambda: "Unsilence" in get(f"{service}/preview"), "the silence on the card")
            flags = ["--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp}/chromium",
                     "--hide-scrollbars", "--window-size=900,940", f"--screenshot={out}"]
            if os.geteuid() == 0:  # Chromium's sandbox refuses root; a loopback page is all that is at stake
                flags.append("--no-sandbox")
            subprocess.run([chromium, *flags, f"{service}/preview"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120, check=True)
        finally:
            service_proc.terminate()
            am.terminate()
            service_proc.wait()
            am.wait()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
