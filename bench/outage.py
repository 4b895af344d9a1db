#!/usr/bin/env python3
"""Outage benchmark: many Alertmanager groups at once, against Slack's rate limits.

Run:   python3 bench/outage.py              both cases, three services (a few minutes: the
                                            baselines run into the retry cap)
       python3 bench/outage.py --quick      smaller cases, short caps: a smoke run
       python3 bench/outage.py --only threader --case a --keep /tmp/outage-logs

It reproduces the worst outage: a rack goes dark, Alertmanager sends a
webhook per group at once, and Slack allows about one chat.postMessage per
second per channel. Two cases:

  a  200 groups of one alert each (group_by: [alertname, instance]):
     NodeDown for rack7-node-001:9100 ... rack7-node-200:9100
  b  20 groups of 50 alerts each (group_by: [alertname, rack]):
     NodeDown for rack01-node-001:9100 ... rack20-node-050:9100

Every alert's instance is unique and is in its summary ("Instance ... down"),
so the harness can tell which alerts Slack shows.

For each case, one service after the other, each against a fresh
bench/fake_slack.py --rate-limited (1 post per second per channel, bursts of
5; chat.update and reactions.add about 50 per minute; 429 with Retry-After
past them; every call recorded):

  threader    alert_threader.py (python3 -m alert_threader), file store in a
              temporary directory, default settings but for the Slack URL,
              the channel and the token (in a file, SLACK_BOT_TOKEN_FILE)
  forwarder   bench/forwarder.py --fail-when-refused: one post per alert,
              503 to Alertmanager when Slack refuses one
  per-group   bench/forwarder.py --fail-when-refused --per-group: one post per
              webhook listing its alerts, like Alertmanager's slack_configs

The sender plays Alertmanager: each group's webhook goes on a connection of
its own, all groups within about a second. A 5xx answer or a transport error
is sent again after Alertmanager's back-off (500 ms, x1.5 per attempt, at most
60 s, randomised by +-50% as Go's backoff package does, seeded: runs repeat);
4xx is not retried. Each request may take up to 60 s; each group gives up
after --give-up seconds (120). Once every sender is done, the case ends when
Slack has been quiet for a few seconds (or at a cap).

An alert is "named" by an accepted chat.postMessage whose JSON payload holds
its instance string; "lost" is never named; "doubled" is named by more than
one accepted post. A digest that counts alerts by alertname names none.

Targets (case a, the threader): at most 30 posts, at most 2% of Slack calls
refused, every alert named within 30 s of the first webhook, none lost, none
doubled. Exit status: 0 every target met, 1 one missed, 2 the run failed.
Details go to bench/results/outage.json.
"""

import argparse
import dataclasses
import http.client
import json
import os
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from run import (BENCH_DIR, THREADER, BenchError, Processes, compile_threader, file_sha256, free_port, get_json,
                 interpreter_version, interrupt, request, rfc3339, wait_ready)

RESULTS_FILE = os.path.join(BENCH_DIR, "results", "outage.json")
CHANNEL = "C0OUTAGE"
TOKEN = "xoxb-outage-token"
EXTERNAL_URL = "http://alertmanager.example.com:9093"
INSTANCE = re.compile(r"rack\d+-node-\d{3}:9100")
SERVICES = ("threader", "forwarder", "per-group")


# ---------------------------------------------------------------------------
# The scenario: Alertmanager (version 4) webhooks of NodeDown alerts
# ---------------------------------------------------------------------------

def fingerprint(labels: Dict[str, str]) -> str:
    """Alertmanager's fingerprint: FNV-1a 64 over the sorted labels, each name and value ending in 0xff."""
    value = 14695981039346656037
    for byte in b"".join(k.encode() + b"\xff" + labels[k].encode() + b"\xff" for k in sorted(labels)):
        value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def node_down(rack: str, node: int, starts_at: str) -> Dict[str, Any]:
    instance = f"{rack}-node-{node:03d}:9100"
    labels = {"alertname": "NodeDown", "instance": instance, "job": "node", "severity": "critical",
              "cluster": "dc1", "rack": rack}
    return {
        "status": "firing",
        "labels": labels,
        "annotations": {"summary": f"Instance {instance} down",
                        "description": f"{instance} of job node has been down for more than 1 minute."},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example.com:9090/graph?g0.expr=up%7Bjob%3D%22node%22%7D+%3D%3D+0&g0.tab=1",
        "fingerprint": fingerprint(labels),
    }


def webhook(alerts: List[Dict[str, Any]], group_by: Sequence[str]) -> bytes:
    """One group's notification, as Alertmanager's webhook notifier sends it."""
    alerts = sorted(alerts, key=lambda a: (a["labels"]["job"], a["labels"]["instance"]))
    first = alerts[0]
    common_labels = {k: v for k, v in first["labels"].items() if all(a["labels"].get(k) == v for a in alerts)}
    common_annotations = {k: v for k, v in first["annotations"].items()
                          if all(a["annotations"].get(k) == v for a in alerts)}
    group_labels = {k: first["labels"][k] for k in group_by}
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
    return json.dumps({
        "receiver": "slack-threader", "status": "firing", "alerts": alerts,
        "groupLabels": group_labels, "commonLabels": common_labels, "commonAnnotations": common_annotations,
        "externalURL": EXTERNAL_URL, "version": "4", "groupKey": group_key, "truncatedAlerts": 0,
    }).encode()


@dataclasses.dataclass
class Case:
    name: str
    title: str
    webhooks: List[bytes]
    instances: List[str]


def build_cases(rack_nodes: int, racks: int, rack_size: int) -> List[Case]:
    starts_at = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=90))
    dark = [node_down("rack7", n, starts_at) for n in range(1, rack_nodes + 1)]
    per_rack = [[node_down(f"rack{r:02d}", n, starts_at) for n in range(1, rack_size + 1)]
                for r in range(1, racks + 1)]
    return [
        Case("a", f"{rack_nodes} groups of 1 alert (a rack goes dark; group_by: [alertname, instance])",
             [webhook([alert], ("alertname", "instance")) for alert in dark],
             [a["labels"]["instance"] for a in dark]),
        Case("b", f"{racks} groups of {rack_size} alerts (racks go dark; group_by: [alertname, rack])",
             [webhook(alerts, ("alertname", "rack")) for alerts in per_rack],
             [a["labels"]["instance"] for alerts in per_rack for a in alerts]),
    ]


# ---------------------------------------------------------------------------
# The sender: Alertmanager's per-group notifiers and their retries
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Attempt:
    status: int  # -1: a transport error or a timeout, named in error
    seconds: float  # until the answer (or the error)
    error: str = ""


@dataclasses.dataclass
class Delivery:
    """One group's webhook, attempt by attempt."""

    attempts: List[Attempt] = dataclasses.field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    gave_up: bool = False


def post_once(port: int, body: bytes, timeout: float) -> Tuple[int, str]:
    """The answer's status, or -1 and the transport error's name."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        status, _ = request(conn, "POST", "/alert", body)
        return status, ""
    except (OSError, http.client.HTTPException) as e:
        return -1, type(e).__name__
    finally:
        conn.close()


def deliver(port: int, body: bytes, start_at: float, give_up: float, rng: random.Random,
            delivery: Delivery) -> None:
    """Send until an answer below 500, or until give_up seconds have passed since the first attempt."""
    time.sleep(max(0.0, start_at - time.time()))
    delivery.started = time.time()
    deadline = delivery.started + give_up
    interval = 0.5
    while True:
        # Alertmanager's context deadline bounds a request as it bounds the waits.
        sent = time.time()
        status, error = post_once(port, body, timeout=min(60.0, max(0.5, deadline - sent)))
        delivery.attempts.append(Attempt(status, time.time() - sent, error))
        if 0 < status < 500:
            break
        wait = interval * rng.uniform(0.5, 1.5)
        interval = min(interval * 1.5, 60.0)
        if time.time() + wait >= deadline:
            delivery.gave_up = True
            break
        time.sleep(wait)
    delivery.finished = time.time()


def send_all(port: int, bodies: List[bytes], spread: float, give_up: float) -> List[Delivery]:
    """Every webhook from a thread of its own, the starts spread evenly over `spread` seconds."""
    deliveries = [Delivery() for _ in bodies]
    begin = time.time() + 0.1
    senders = [threading.Thread(target=deliver, name=f"group-{i}", daemon=True,
                                args=(port, body, begin + spread * i / len(bodies), give_up,
                                      random.Random(i), deliveries[i]))
               for i, body in enumerate(bodies)]
    for sender in senders:
        sender.start()
    hard_stop = begin + spread + give_up + 65  # the last request's timeout, and some slack
    for sender in senders:
        sender.join(max(0.0, hard_stop - time.time()))
        if sender.is_alive():
            raise BenchError(f"{sender.name} is still sending after {hard_stop - begin:.0f}s")
    return deliveries


def wait_until_quiet(slack_port: int, since: float, quiet: float, cap: float) -> None:
    """Until no Slack call came for `quiet` seconds (a service may go on posting after it answered)."""
    deadline = time.time() + cap
    while time.time() < deadline:
        last = max(since, get_json(slack_port, "/count")["last_at"])
        if time.time() - last >= quiet:
            return
        time.sleep(0.2)


# ---------------------------------------------------------------------------
# What Slack shows
# ---------------------------------------------------------------------------

def payload_text(payload: Any) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload)


def analyse(case: Case, calls: List[Dict[str, Any]], deliveries: List[Delivery]) -> Dict[str, Any]:
    """The numbers of one service in one case, from fake Slack's record and the senders'."""
    t0 = min(d.started for d in deliveries)
    wanted = set(case.instances)
    named_at: Dict[str, List[float]] = {}
    named_by_update: Set[str] = set()
    posts = 0
    call_log = []
    for call in calls:
        names = sorted(set(INSTANCE.findall(payload_text(call["payload"]))) & wanted)
        accepted = call["status"] == 200 and call["answer"].get("ok") is True
        if accepted and call["method"] == "chat.postMessage":
            posts += 1
            for name in names:
                named_at.setdefault(name, []).append(call["at"] - t0)
        elif accepted and call["method"] == "chat.update":
            named_by_update.update(names)
        payload = call["payload"] if isinstance(call["payload"], dict) else {}
        call_log.append({"at": round(call["at"] - t0, 3), "method": call["method"], "status": call["status"],
                         "retry_after": call.get("retry_after", 0), "ts": call["answer"].get("ts"),
                         "thread_ts": payload.get("thread_ts"), "names": len(names)})
    attempts = [a for d in deliveries for a in d.attempts]
    statuses = [a.status for a in attempts]
    refused = sum(1 for call in calls if call["status"] == 429)
    lost = sorted(wanted - set(named_at))
    end = max([d.finished for d in deliveries] + [call["at"] for call in calls])
    return {
        "posts": posts,
        "floor_s": posts / 1.0,  # Slack's pace: one post per second per channel
        "slack_calls": len(calls),
        "refused": refused,
        "refused_pct": 100.0 * refused / len(calls) if calls else 0.0,
        "attempts": len(statuses),
        "webhook_5xx": sum(1 for s in statuses if s >= 500),
        "webhook_4xx": sum(1 for s in statuses if 400 <= s < 500),
        "transport_error_count": sum(1 for s in statuses if s < 0),
        "transport_errors": {name: sum(1 for a in attempts if a.error == name)
                             for name in sorted({a.error for a in attempts if a.error})},
        "slowest_answer_s": max([a.seconds for a in attempts if a.status > 0], default=None),
        "gave_up": sum(1 for d in deliveries if d.gave_up),
        "all_named_s": None if lost else max(min(times) for times in named_at.values()),
        "lost": len(lost),
        "doubled": sum(1 for times in named_at.values() if len(times) > 1),
        "wall_s": end - t0,
        "methods": {f"{m} {s}": sum(1 for c in calls if c["method"] == m and c["status"] == s)
                    for m, s in sorted({(c["method"], c["status"]) for c in calls})},
        "lost_named_by_update_only": len(set(lost) & named_by_update),
        "lost_instances": lost,
        "doubled_instances": sorted(name for name, times in named_at.items() if len(times) > 1),
        "groups": [{"attempts": [[a.status, round(a.seconds, 3), a.error] for a in d.attempts],
                    "started": round(d.started - t0, 3),
                    "finished": round(d.finished - t0, 3), "gave_up": d.gave_up} for d in deliveries],
        "calls": call_log,
    }


# ---------------------------------------------------------------------------
# One service through one case
# ---------------------------------------------------------------------------

def start_service(name: str, args: argparse.Namespace, processes: Processes, slack_url: str,
                  state_dir: str) -> Tuple[Any, int]:
    """The service's process and port, once it answers."""
    if name == "threader":
        token_file = os.path.join(state_dir, "slack-token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(TOKEN + "\n")
        port = free_port()
        command = args.threader_command.split() if args.threader_command else [args.python, "-m", "alert_threader"]
        process = processes.start(name, command, env={
            "HOST": "127.0.0.1", "PORT": str(port), "SLACK_API_URL": slack_url, "SLACK_CHANNEL": CHANNEL,
            "SLACK_BOT_TOKEN_FILE": token_file, "THREAD_STORE_FILE": os.path.join(state_dir, "threads.json")})
        ready_path = "/health"
    else:
        argv = [args.python, os.path.join(BENCH_DIR, "forwarder.py"), "--port", "0", "--slack-api-url", slack_url,
                "--slack-channel", CHANNEL, "--slack-bot-token", TOKEN, "--fail-when-refused"]
        process = processes.start(name, argv + (["--per-group"] if name == "per-group" else []),
                                  announces_port=True)
        port = processes.announced_port(name, process)
        ready_path = "/"
    try:
        wait_ready(port, ready_path, process)
    except BenchError as e:
        raise BenchError(f"{name} {e}\n{processes.log_tail(name)}") from None
    return process, port


def run_case(case: Case, name: str, args: argparse.Namespace, workdir: str,
             say: Callable[[str], None]) -> Dict[str, Any]:
    """A fresh rate-limited fake Slack, the service, every group's webhook; then what Slack saw."""
    run_dir = os.path.join(workdir, f"{case.name}-{name}")
    os.mkdir(run_dir)
    processes = Processes(run_dir)
    try:
        slack = processes.start("fake_slack", [args.python, os.path.join(BENCH_DIR, "fake_slack.py"),
                                               "--rate-limited"], announces_port=True)
        slack_port = processes.announced_port("fake_slack", slack)
        process, port = start_service(name, args, processes, f"http://127.0.0.1:{slack_port}/api/", run_dir)
        say(f"case {case.name}, {name}: {len(case.webhooks)} webhooks within {args.spread:g}s")
        deliveries = send_all(port, case.webhooks, args.spread, args.give_up)
        say(f"case {case.name}, {name}: every sender done; waiting for Slack to go quiet")
        wait_until_quiet(slack_port, max(d.finished for d in deliveries), args.quiet, args.settle_cap)
        exited = process.poll()
        processes.stop(process)
        calls = get_json(slack_port, "/calls")["calls"]
    finally:
        processes.stop_all()
    numbers = analyse(case, calls, deliveries)
    numbers["exited_during_case"] = exited
    if exited is not None:
        say(f"case {case.name}, {name}: the service exited with status {exited} during the case\n"
            f"{processes.log_tail(name)}")
    return numbers


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    key: str
    label: str  # may name {give_up}
    digits: int
    target: Optional[float] = None  # case a, the threader: at most this
    missing: str = "never"  # shown for None


ROWS = [
    Row("posts", "posts (accepted chat.postMessage)", 0, 30),
    Row("floor_s", "floor: those posts at 1 per second (s)", 0),
    Row("refused", "Slack calls refused (429)", 0),
    Row("refused_pct", "refused, % of all Slack calls", 1, 2.0),
    Row("webhook_5xx", "webhook 5xx answers", 0),
    Row("attempts", "webhook attempts", 0),
    Row("transport_error_count", "webhook transport errors, timeouts", 0),
    Row("slowest_answer_s", "slowest webhook answer (s)", 1, missing="none"),
    Row("gave_up", "webhooks given up (after {give_up:g}s)", 0),
    Row("all_named_s", "every alert named after (s)", 1, 30.0),
    Row("lost", "alerts lost (never named)", 0, 0),
    Row("doubled", "alerts doubled (named by 2+ posts)", 0, 0),
    Row("wall_s", "wall time of the case (s)", 1),
]


def cell(numbers: Optional[Dict[str, Any]], row: Row) -> str:
    if numbers is None:
        return "-"
    value = numbers[row.key]
    if value is None:
        return row.missing
    return f"{value:,.{row.digits}f}"


def met(numbers: Dict[str, Any], row: Row) -> bool:
    value = numbers[row.key]
    return value is not None and row.target is not None and value <= row.target


def report(case: Case, results: Dict[str, Dict[str, Any]], give_up: float,
           judged: bool) -> Tuple[str, List[Dict[str, Any]]]:
    """One case's table, and the verdicts of its targets (case a's, when the threader ran)."""
    header = (f"{'metric':<40} " + " ".join(f"{name:>10}" for name in SERVICES)
              + (f"  {'target':<8} met" if judged else ""))
    lines = [f"case {case.name}: {case.title}", header, "-" * len(header)]
    verdicts = []
    for row in ROWS:
        line = f"{row.label.format(give_up=give_up):<40} " + " ".join(f"{cell(results.get(n), row):>10}"
                                                                      for n in SERVICES)
        if judged and row.target is not None:
            ok = met(results["threader"], row)
            line += f"  {'<= ' + format(row.target, 'g'):<8} {'yes' if ok else 'NO'}"
            verdicts.append({"case": case.name, "metric": row.key, "threader": results["threader"][row.key],
                             "target": row.target, "met": ok})
        lines.append(line.rstrip())
    return "\n".join(lines), verdicts


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/outage.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8 groups of 1, 2 groups of 12, 6 s retry cap, short waits")
    parser.add_argument("--case", choices=("a", "b"), action="append",
                        help="run only this case (may be given twice; default: both)")
    parser.add_argument("--only", choices=SERVICES, action="append",
                        help="run only this service (may be given more than once; default: all three)")
    parser.add_argument("--give-up", type=float, default=120.0, metavar="SECONDS",
                        help="a group's sender stops retrying this long after its first attempt (default: 120)")
    parser.add_argument("--spread", type=float, default=1.0, metavar="SECONDS",
                        help="the groups' first attempts are spread over this long (default: 1)")
    parser.add_argument("--quiet", type=float, default=3.0, metavar="SECONDS",
                        help="after the senders, the case ends once Slack was quiet this long (default: 3)")
    parser.add_argument("--settle-cap", type=float, default=30.0, metavar="SECONDS",
                        help="... or this long after the senders at most (default: 30)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for fake Slack and the services (default: this one)")
    parser.add_argument("--threader-command", default=None, metavar="CMD",
                        help="how to start the threader instead of 'PYTHON -m alert_threader' (split on spaces)")
    parser.add_argument("--output", default=RESULTS_FILE, help=f"JSON results file (default: {RESULTS_FILE})")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep each run's logs and state in DIR (a new directory) instead of a temporary one")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = (200, 20, 50)
    if args.quick:
        sizes = (8, 2, 12)
        args.give_up, args.quiet, args.settle_cap = min(args.give_up, 6.0), min(args.quiet, 1.0), 3.0
    if min(args.give_up, args.spread, args.quiet, args.settle_cap) <= 0:
        print("outage: --give-up, --spread, --quiet and --settle-cap must be above 0", file=sys.stderr)
        return 2
    names = [n for n in SERVICES if not args.only or n in args.only]

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    cases = [c for c in build_cases(*sizes) if not args.case or c.name in args.case]
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    try:
        python_version = interpreter_version(args.python)
        compile_threader(args.python)
        if args.keep:
            os.makedirs(args.keep)
        with tempfile.TemporaryDirectory(prefix="alert-threader-outage-") as scratch:
            workdir = args.keep or scratch
            for case in cases:
                results[case.name] = {name: run_case(case, name, args, workdir, say) for name in names}
    except (BenchError, OSError, http.client.HTTPException, ValueError) as e:
        print(f"outage: FAILED: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outage: interrupted; the services were stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    print(f"\nalert-threader outage benchmark: Slack at 1 post/s per channel (bursts of 5), updates and "
          f"reactions 50/min; senders retry 5xx for {args.give_up:g}s; {os.cpu_count()} CPUs, "
          f"Python {python_version}, {elapsed:.0f}s")
    verdicts: List[Dict[str, Any]] = []
    for case in cases:
        table, case_verdicts = report(case, results[case.name], args.give_up,
                                      judged=case.name == "a" and "threader" in names)
        print("\n" + table)
        verdicts += case_verdicts
    missed = [f"case {v['case']}: {v['metric']}" for v in verdicts if not v["met"]]
    if verdicts:
        print("\nall targets met" if not missed else f"\ntargets missed: {', '.join(missed)}")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": {"cpus": os.cpu_count(), "python": python_version, "interpreter": args.python,
                               "platform": platform.platform()},
                   "settings": {"quick": args.quick, "sizes": sizes, "give_up_s": args.give_up,
                                "spread_s": args.spread, "quiet_s": args.quiet, "settle_cap_s": args.settle_cap,
                                "threader_command": args.threader_command},
                   "alert_threader_sha256": file_sha256(THREADER), "seconds": round(elapsed, 1),
                   "results": results, "rows": verdicts, "missed": missed}, f, indent=1)
        f.write("\n")
    print(f"results: {os.path.relpath(args.output)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
