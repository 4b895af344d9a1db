#!/usr/bin/env python3
"""The bare forwarder: the cheapest possible Alertmanager-to-Slack bridge, the benchmark's floor.

Run:   python3 bench/forwarder.py --port 0 --slack-api-url http://127.0.0.1:PORT/api/
       [--fail-when-refused] [--per-group]

POST /alert takes an Alertmanager webhook and, for each alert, POSTs one
{"channel": C, "text": "<alertname>: <summary>"} to SLACK_API_URL +
"chat.postMessage" with urllib, then answers 200 {"ok": true}. Any GET
answers 200 (bench/run.py polls it to see that the forwarder is up). It
prints "PORT <n>" on stdout once listening.

On purpose it keeps no state, formats nothing and checks nothing (not even
Slack's "ok"): it is what alert_threader.py is compared against, not a
service to run. Incoming connections are kept alive (HTTP/1.1) like the
threader's, so the comparison is about the work per alert, not about
connection handling.

For bench/outage.py, two flags make it the naive bridges people run:
--fail-when-refused answers 503 as soon as Slack refuses a message (HTTP
429 or 5xx, or "ok": false), so that Alertmanager sends the webhook again
(and the messages before the refused one with it); --per-group posts one
message per webhook that lists all its alerts, as Alertmanager's own
slack_configs does.
"""

import argparse
import http.server
import json
import sys
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence


class ForwarderHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The answer's headers and body are two writes: without TCP_NODELAY the body
    # waits for the client's delayed ACK (40 ms on Linux), a stall, not work.
    disable_nagle_algorithm = True
    server: "ForwarderServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        hook = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = [f"{alert['labels'].get('alertname', '')}: {alert['annotations'].get('summary', '')}"
                 for alert in hook["alerts"]]
        if self.server.per_group:
            texts = ["\n".join([f"[{str(hook.get('status', '')).upper()}:{len(texts)}]"] + texts)]
        for text in texts:
            if not self._post(text) and self.server.fail_when_refused:
                self._answer(b'{"ok": false, "error": "Slack refused a message"}', 503)
                return
        self._answer(b'{"ok": true}')

    def _post(self, text: str) -> bool:
        """Post one message; False when Slack refused it (its "ok" is read only with --fail-when-refused)."""
        request = urllib.request.Request(
            self.server.slack_api_url + "chat.postMessage",
            data=json.dumps({"channel": self.server.channel, "text": text}).encode(),
            headers={"Authorization": "Bearer " + self.server.token,
                     "Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = response.read()
        except urllib.error.HTTPError:
            return False
        return not self.server.fail_when_refused or json.loads(answer).get("ok") is True

    def do_GET(self) -> None:
        self._answer(b'{"ok": true}')

    def _answer(self, payload: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ForwarderServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Any, slack_api_url: str, token: str, channel: str,
                 fail_when_refused: bool = False, per_group: bool = False) -> None:
        self.slack_api_url = slack_api_url
        self.token = token
        self.channel = channel
        self.fail_when_refused = fail_when_refused
        self.per_group = per_group
        super().__init__(address, ForwarderHandler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one (default: 0)")
    parser.add_argument("--slack-api-url", required=True, help="Slack Web API base URL, ending in /")
    parser.add_argument("--slack-bot-token", default="xoxb-bench-token", help="bearer token sent to Slack")
    parser.add_argument("--slack-channel", default="C0BENCH", help="channel ID of every message")
    parser.add_argument("--fail-when-refused", action="store_true",
                        help="answer 503 when Slack refuses a message, so that Alertmanager retries")
    parser.add_argument("--per-group", action="store_true",
                        help="one message per webhook listing its alerts, as Alertmanager's slack_configs")
    args = parser.parse_args(argv)
    server = ForwarderServer((args.host, args.port), args.slack_api_url, args.slack_bot_token, args.slack_channel,
                             args.fail_when_refused, args.per_group)
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
