#!/usr/bin/env python3
"""The bare forwarder: the cheapest possible Alertmanager-to-Slack bridge, the benchmark's floor.

Run:   python3 bench/forwarder.py --port 0 --slack-api-url http://127.0.0.1:PORT/api/

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
"""

import argparse
import http.server
import json
import sys
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
        for alert in hook["alerts"]:
            text = f"{alert['labels'].get('alertname', '')}: {alert['annotations'].get('summary', '')}"
            request = urllib.request.Request(
                self.server.slack_api_url + "chat.postMessage",
                data=json.dumps({"channel": self.server.channel, "text": text}).encode(),
                headers={"Authorization": "Bearer " + self.server.token,
                         "Content-Type": "application/json; charset=utf-8"})
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        self._answer(b'{"ok": true}')

    def do_GET(self) -> None:
        self._answer(b'{"ok": true}')

    def _answer(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ForwarderServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Any, slack_api_url: str, token: str, channel: str) -> None:
        self.slack_api_url = slack_api_url
        self.token = token
        self.channel = channel
        super().__init__(address, ForwarderHandler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one (default: 0)")
    parser.add_argument("--slack-api-url", required=True, help="Slack Web API base URL, ending in /")
    parser.add_argument("--slack-bot-token", default="xoxb-bench-token", help="bearer token sent to Slack")
    parser.add_argument("--slack-channel", default="C0BENCH", help="channel ID of every message")
    args = parser.parse_args(argv)
    server = ForwarderServer((args.host, args.port), args.slack_api_url, args.slack_bot_token, args.slack_channel)
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
