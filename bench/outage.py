#!/usr/bin/env python3
"""Outage benchmark: Alertmanager's groups in a storm, against Slack's rate limits.

Run:   python3 bench/outage.py              every case; the threader, and the baselines where they
                                            tell something (about 13 minutes on 2 cores)
       python3 bench/outage.py --quick      small cases, short caps: a smoke run (about 45 s)
       python3 bench/outage.py --only threader --case spread --keep /tmp/outage-logs

It replays an outage: racks go dark, Alertmanager sends a webhook per group,
and Slack allows about one chat.postMessage per second per channel. The
cases (sizes of the full run):

  once      200 groups of one alert (group_by: [alertname, instance]), a
            thread key each: every first attempt in the same instant
  pool      the same 200 groups through a pool of 32 senders
  spread    the same 200 groups, their first attempts spread evenly over 60 s
  busy      200 such groups of ONE thread key (no service label), over 60 s
  racks     20 groups of 50 alerts (group_by: [alertname, rack]), one thread
            key, all at once
  big       1,000 alerts of distinct keys in one webhook
  resolves  500 resolved alerts of distinct keys, never seen, in one webhook

Every alert's instance (rack7-node-017:9100) is unique and is in its summary,
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

The sender plays Alertmanager 0.25 with group_interval 10s. A notification
lives in a context of 10 s (max(group_interval, 10s)); within it a 5xx answer
or a transport error is sent again after Alertmanager's back-off (500 ms, x1.5,
at most 60 s, +-50% jitter, seeded: runs repeat), and a request unanswered when
the context ends is abandoned. A notification that ends without a 2xx failed
(alertmanager_notifications_failed_total); the group is notified again at the
next group_interval, with a fresh context, until one succeeds or --give-up
seconds (120) have passed. 4xx is not retried within a notification.

An alert is "named" by an accepted chat.postMessage whose JSON payload holds
its instance string; its time to named runs from its group's first attempt.
"Lost" is never named; "doubled" is named by more than one accepted post.

Targets are the threader's, per case (see bench/README.md). Exit status: 0
every target met, 1 one missed, 2 the run failed. Details go to
bench/results/outage.json.
"""

import argparse
import collections
import dataclasses
import http.client
import json
import math
import os
import platform
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from run import (BENCH_DIR, THREADER, BenchError, Processes, compile_threader, file_sha256, free_port, get_json,
                 interpreter_version, interrupt, rfc3339, wait_ready)

RESULTS_FILE = os.path.join(BENCH_DIR, "results", "outage.json")
CHANNEL = "C0OUTAGE"
TOKEN = "xoxb-outage-token"
EXTERNAL_URL = "http://alertmanager.example.com:9093"
INSTANCE = re.compile(r"rack\d+-node-\d{3}:9100")
SERVICES = ("threader", "forwarder", "per-group")
MIN_CONTEXT = 10.0  # Alertmanager's notify.MinTimeout: a notification's context is at least this long
DELIVERY_WAIT = 2.0  # the threader's: how long a webhook may wait for Slack before it is answered


# ---------------------------------------------------------------------------
# The scenario: Alertmanager (version 4) webhooks of NodeDown alerts
# ---------------------------------------------------------------------------

def fingerprint(labels: Dict[str, str]) -> str:
    """Alertmanager's fingerprint: FNV-1a 64 over the sorted labels, each name and value ending in 0xff."""
    value = 14695981039346656037
    for byte in b"".join(k.encode() + b"\xff" + labels[k].encode() + b"\xff" for k in sorted(labels)):
        value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def node_down(rack: str, node: int, starts_at: str, keyed: bool = True,
              ends_at: Optional[str] = None) -> Dict[str, Any]:
    """A NodeDown alert; `keyed` gives it a service label, and so a thread key of its own."""
    host = f"{rack}-node-{node:03d}"
    instance = host + ":9100"
    labels = {"alertname": "NodeDown", "instance": instance, "job": "node", "severity": "critical",
              "cluster": "dc1", "rack": rack}
    if keyed:
        labels["service"] = host
    return {
        "status": "resolved" if ends_at else "firing",
        "labels": labels,
        "annotations": {"summary": f"Instance {instance} down",
                        "description": f"{instance} of job node has been down for more than 1 minute."},
        "startsAt": starts_at,
        "endsAt": ends_at or "0001-01-01T00:00:00Z",
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
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return json.dumps({
        "receiver": "slack-threader", "status": status, "alerts": alerts,
        "groupLabels": group_labels, "commonLabels": common_labels, "commonAnnotations": common_annotations,
        "externalURL": EXTERNAL_URL, "version": "4", "groupKey": group_key, "truncatedAlerts": 0,
    }).encode()


@dataclasses.dataclass
class Group:
    """One Alertmanager group: its webhook and the instances of its alerts."""

    body: bytes
    instances: List[str]


def group_of(alerts: List[Dict[str, Any]], group_by: Sequence[str]) -> Group:
    return Group(webhook(alerts, group_by), [a["labels"]["instance"] for a in alerts])


@dataclasses.dataclass
class Case:
    name: str
    title: str
    groups: List[Group]
    arrival: str  # once: every first attempt in one instant; pool: through --pool senders; spread: over --spread s
    services: Tuple[str, ...]  # run by default; --only overrides
    targets: Dict[str, float]  # the threader's: metric key -> at most this

    def instances(self) -> List[str]:
        return [instance for group in self.groups for instance in group.instances]


@dataclasses.dataclass
class Sizes:
    groups: int  # one-alert groups of the once, pool, spread and busy cases
    racks: int
    rack_size: int
    big: int  # alerts in the big webhook
    resolves: int  # alerts in the resolves webhook


FULL = Sizes(groups=200, racks=20, rack_size=50, big=1000, resolves=500)
QUICK = Sizes(groups=8, racks=2, rack_size=6, big=40, resolves=30)

# The threader's targets (issue 21) for 200 one-alert groups of distinct keys, whatever their arrival.
GROUP_TARGETS = {"posts": 30, "top_level": 12, "refused_pct": 2.0, "webhook_5xx": 0,
                 "answer_p99": DELIVERY_WAIT + 0.2, "named_max": 15.0}


def spread_nodes(count: int, first_rack: int) -> List[Tuple[str, int]]:
    """(rack, node) of `count` nodes, 50 to a rack from rack `first_rack` on."""
    return [(f"rack{first_rack + i // 50:02d}", i % 50 + 1) for i in range(count)]


def build_cases(sizes: Sizes, spread: float, pool: int) -> List[Case]:
    now = datetime.now(timezone.utc)
    starts_at = rfc3339(now - timedelta(seconds=90))
    n = sizes.groups
    singles = [group_of([node_down("rack7", i, starts_at)], ("alertname", "instance")) for i in range(1, n + 1)]
    shared = [group_of([node_down("rack7", i, starts_at, keyed=False)], ("alertname", "instance"))
              for i in range(1, n + 1)]
    racks = [group_of([node_down(f"rack{r:02d}", i, starts_at, keyed=False) for i in range(1, sizes.rack_size + 1)],
                      ("alertname", "rack")) for r in range(1, sizes.racks + 1)]
    big = group_of([node_down(rack, i, starts_at) for rack, i in spread_nodes(sizes.big, 1)], ("alertname",))
    ended = rfc3339(now - timedelta(seconds=30))
    resolves = group_of([node_down(rack, i, starts_at, ends_at=ended) for rack, i in spread_nodes(sizes.resolves, 41)],
                        ("alertname",))
    one = "group_by: [alertname, instance]; a thread key each"
    return [
        Case("once", f"{n} groups of 1 alert, all at once ({one})", singles, "once",
             ("threader", "forwarder"), dict(GROUP_TARGETS, named_max=30.0)),
        Case("pool", f"{n} groups of 1 alert through {pool} senders ({one})", singles, "pool",
             ("threader",), GROUP_TARGETS),
        Case("spread", f"{n} groups of 1 alert over {spread:g} s ({one})", singles, "spread",
             ("threader", "forwarder"), GROUP_TARGETS),
        Case("busy", f"{n} groups of 1 alert over {spread:g} s, one thread key (no service label: one busy thread)",
             shared, "spread", ("threader",), {}),
        Case("racks", f"{sizes.racks} groups of {sizes.rack_size} alerts, all at once "
                      "(group_by: [alertname, rack]; one thread key)", racks, "once", SERVICES, {}),
        Case("big", f"{sizes.big:,} alerts in one webhook (group_by: [alertname]; a thread key each)", [big], "once",
             ("threader", "per-group"),
             {"posts": 60, "not_2xx_first": 0, "answer_max": DELIVERY_WAIT + 0.5, "named_max": 70.0}),
        Case("resolves", f"{sizes.resolves:,} resolves of alerts never seen, in one webhook (a thread key each)",
             [resolves], "once", ("threader", "per-group"), {"posts": 30, "not_2xx_first": 0, "lost": 0}),
    ]


# ---------------------------------------------------------------------------
# The sender: Alertmanager's aggregation groups, notifications and retries
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Attempt:
    at: float  # when it was sent
    status: int  # -1: no HTTP answer, named in error
    seconds: float  # until the answer, the error, or the context's end
    error: str = ""  # why not 2xx: the answer's start, the transport error, or "timeout" (the context ended)


@dataclasses.dataclass
class Delivery:
    """One group's notifications, attempt by attempt."""

    attempts: List[Attempt] = dataclasses.field(default_factory=list)
    notifications: int = 0
    failed: int = 0  # notifications that ended without a 2xx
    started: float = 0.0
    finished: float = 0.0
    gave_up: bool = False


@dataclasses.dataclass
class Notifier:
    """How Alertmanager notifies a group: the service's port and the timing of group_interval."""

    port: int
    group_interval: float
    context: float  # a notification's time, max(group_interval, 10s) in Alertmanager
    give_up: float


def post_once(port: int, body: bytes, deadline: float) -> Tuple[int, str]:
    """The answer's status and, unless 2xx, the start of its body; or -1 and why there was no answer.

    A request still unanswered at `deadline` is abandoned, as the context's end abandons it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(0.01, deadline - time.time()))
    try:
        conn.request("POST", "/alert", body, {"Content-Type": "application/json"})
        assert conn.sock is not None
        conn.sock.settimeout(max(0.01, deadline - time.time()))  # the context bounds the wait, not each step
        response = conn.getresponse()
        answer = response.read()
        return response.status, "" if 200 <= response.status < 300 else answer[:120].decode(errors="replace")
    except socket.timeout:
        return -1, "timeout"
    except (OSError, http.client.HTTPException) as e:
        return -1, type(e).__name__
    finally:
        conn.close()


def notify(notifier: Notifier, body: bytes, rng: random.Random, delivery: Delivery) -> bool:
    """One notification: Alertmanager's retry stage within its context; True once answered 2xx."""
    deadline = time.time() + notifier.context
    interval = 0.5
    while time.time() < deadline:
        sent = time.time()
        status, error = post_once(notifier.port, body, deadline)
        delivery.attempts.append(Attempt(sent, status, time.time() - sent, error))
        if 200 <= status < 300:
            return True
        if 0 < status < 500:
            return False  # Alertmanager retries 5xx and transport errors only
        # backoff.Ticker times the next attempt from this one's start: a slow 503 is sent again at once.
        next_at = sent + interval * rng.uniform(0.5, 1.5)
        interval = min(interval * 1.5, 60.0)
        time.sleep(max(0.0, min(next_at, deadline) - time.time()))
    return False


def deliver(notifier: Notifier, body: bytes, rng: random.Random, delivery: Delivery) -> None:
    """A group as Alertmanager's dispatcher runs it: a notification each group_interval until one succeeds."""
    delivery.started = time.time()
    while True:
        time.sleep(max(0.0, delivery.started + delivery.notifications * notifier.group_interval - time.time()))
        delivery.notifications += 1
        if notify(notifier, body, rng, delivery):
            break
        delivery.failed += 1
        if delivery.notifications * notifier.group_interval >= notifier.give_up:
            delivery.gave_up = True
            break
    delivery.finished = time.time()


def send_case(case: Case, notifier: Notifier, spread: float, pool: int) -> List[Delivery]:
    """Every group's webhook, arriving as the case says; back when every group succeeded or gave up."""
    bodies = [group.body for group in case.groups]
    deliveries = [Delivery() for _ in bodies]
    n = len(bodies)
    per_group = notifier.give_up + notifier.context
    if case.arrival == "pool":
        queue = iter(range(n))
        queue_lock = threading.Lock()

        def sender() -> None:
            while True:
                with queue_lock:
                    i = next(queue, None)
                if i is None:
                    return
                deliver(notifier, bodies[i], random.Random(i), deliveries[i])

        senders = [threading.Thread(target=sender, name=f"sender-{k}", daemon=True) for k in range(min(pool, n))]
        longest = math.ceil(n / len(senders)) * per_group
    else:
        barrier = threading.Barrier(n) if case.arrival == "once" else None
        begin = time.time() + 0.5

        def group(i: int) -> None:
            if barrier is not None:
                barrier.wait()
            else:
                time.sleep(max(0.0, begin + spread * i / n - time.time()))
            deliver(notifier, bodies[i], random.Random(i), deliveries[i])

        senders = [threading.Thread(target=group, name=f"group-{i}", args=(i,), daemon=True) for i in range(n)]
        longest = (spread if case.arrival == "spread" else 0.0) + per_group
    hard_stop = time.time() + longest + 30
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(max(0.0, hard_stop - time.time()))
        if thread.is_alive():
            raise BenchError(f"{thread.name} is still sending after {longest + 30:.0f}s")
    return deliveries


# ---------------------------------------------------------------------------
# What Slack shows
# ---------------------------------------------------------------------------

def payload_text(payload: Any) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload)


def accepted_post(call: Dict[str, Any]) -> bool:
    return call["status"] == 200 and call["answer"].get("ok") is True and call["method"] == "chat.postMessage"


def named_in(call: Dict[str, Any]) -> Set[str]:
    """The instances a call's payload names."""
    return set(INSTANCE.findall(payload_text(call["payload"])))


def wait_until_settled(slack_port: int, instances: Set[str], since: float, quiet: float, linger: float,
                       cap: float) -> None:
    """Until Slack has had no call for `quiet` s with every alert named, or for `linger` s without; `cap` at most.

    A service may go on posting long after it answered, and may pause between posts."""
    deadline = time.time() + cap
    checked_last = None
    all_named = False
    while time.time() < deadline:
        last = max(since, get_json(slack_port, "/count")["last_at"])
        silent = time.time() - last
        if silent >= quiet and checked_last != last:
            calls = get_json(slack_port, "/calls")["calls"]
            all_named = instances <= set().union(*(named_in(c) for c in calls if accepted_post(c)))
            checked_last = last
        if silent >= (quiet if all_named else linger):
            return
        time.sleep(0.2)


def percentile(values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile; None when there are no values or it falls on one that never came (inf)."""
    if not values:
        return None
    value = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    return None if math.isinf(value) else value


def analyse(case: Case, calls: List[Dict[str, Any]], deliveries: List[Delivery]) -> Dict[str, Any]:
    """The numbers of one service in one case, from fake Slack's record and the senders'."""
    t0 = min(d.started for d in deliveries)
    group_of_instance = {instance: i for i, group in enumerate(case.groups) for instance in group.instances}
    named_at: Dict[str, List[float]] = {}
    posts = top_level = 0
    call_log = []
    for call in calls:
        payload = call["payload"] if isinstance(call["payload"], dict) else {}
        names = sorted(named_in(call) & group_of_instance.keys())
        if accepted_post(call):
            posts += 1
            top_level += not payload.get("thread_ts")
            for name in names:
                named_at.setdefault(name, []).append(call["at"])
        call_log.append({"at": round(call["at"] - t0, 3), "method": call["method"], "status": call["status"],
                         "retry_after": call.get("retry_after", 0), "ts": call["answer"].get("ts"),
                         "thread_ts": payload.get("thread_ts"), "names": len(names)})
    to_named = [min(named_at[name]) - deliveries[i].started if name in named_at else math.inf
                for name, i in group_of_instance.items()]
    attempts = [a for d in deliveries for a in d.attempts]
    # An attempt abandoned at the context's end waited that long at least: it counts, as a lower bound.
    answer_times = [a.seconds for a in attempts if a.status > 0 or a.error == "timeout"]
    refused = sum(1 for call in calls if call["status"] == 429)
    lost = sorted(set(group_of_instance) - set(named_at))
    end = max([d.finished for d in deliveries] + [call["at"] for call in calls])
    return {
        "posts": posts,
        "top_level": top_level,
        "floor_s": posts / 1.0,  # Slack's pace: one post per second per channel
        "slack_calls": len(calls),
        "refused": refused,
        "refused_pct": 100.0 * refused / len(calls) if calls else 0.0,
        "attempts": len(attempts),
        "webhook_5xx": sum(1 for a in attempts if a.status >= 500),
        "webhook_4xx": sum(1 for a in attempts if 400 <= a.status < 500),
        "transport_error_count": sum(1 for a in attempts if a.status < 0),
        "transport_errors": dict(collections.Counter(a.error for a in attempts if a.status < 0)),
        "refusals": dict(collections.Counter(f"{a.status} {a.error}" for a in attempts
                                             if a.status > 0 and not 200 <= a.status < 300)),
        "failed_notifications": sum(d.failed for d in deliveries),
        "not_2xx_first": sum(1 for d in deliveries if not 200 <= d.attempts[0].status < 300),
        "gave_up": sum(1 for d in deliveries if d.gave_up),
        "answer_p50": percentile(answer_times, 0.50),
        "answer_p99": percentile(answer_times, 0.99),
        "answer_max": max(answer_times, default=None),
        "named_p50": percentile(to_named, 0.50),
        "named_p99": percentile(to_named, 0.99),
        "named_max": percentile(to_named, 1.0),
        "lost": len(lost),
        "doubled": sum(1 for times in named_at.values() if len(times) > 1),
        "wall_s": end - t0,
        "methods": {f"{m} {s}": sum(1 for c in calls if c["method"] == m and c["status"] == s)
                    for m, s in sorted({(c["method"], c["status"]) for c in calls})},
        "lost_instances": lost,
        "doubled_instances": sorted(name for name, times in named_at.items() if len(times) > 1),
        "groups": [{"started": round(d.started - t0, 3), "finished": round(d.finished - t0, 3),
                    "notifications": d.notifications, "failed": d.failed, "gave_up": d.gave_up,
                    "attempts": [[round(a.at - t0, 3), a.status, round(a.seconds, 3), a.error] for a in d.attempts]}
                   for d in deliveries],
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
        say(f"case {case.name}, {name}: {len(case.groups)} groups ({case.arrival})")
        notifier = Notifier(port, args.group_interval, args.context, args.give_up)
        deliveries = send_case(case, notifier, args.spread, args.pool)
        say(f"case {case.name}, {name}: every group done; waiting for Slack to go quiet")
        wait_until_settled(slack_port, set(case.instances()), max(d.finished for d in deliveries), args.quiet,
                           args.linger, args.settle_cap)
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
    missing: str = "never"  # shown for None


ROWS = [
    Row("posts", "posts (accepted chat.postMessage)", 0),
    Row("top_level", "top-level posts (no thread_ts)", 0),
    Row("floor_s", "floor: the posts at 1 per second (s)", 0),
    Row("slack_calls", "Slack calls", 0),
    Row("refused", "Slack calls answered 429", 0),
    Row("refused_pct", "429s, % of Slack calls", 1),
    Row("attempts", "webhook attempts", 0),
    Row("webhook_5xx", "webhook answers 5xx", 0),
    Row("transport_error_count", "webhook transport errors, timeouts", 0),
    Row("failed_notifications", "failed notifications (Alertmanager's count)", 0),
    Row("not_2xx_first", "groups not answered 2xx at the first attempt", 0),
    Row("gave_up", "groups given up (after {give_up:g}s)", 0),
    Row("answer_p50", "answer time p50 (s)", 2, "none"),
    Row("answer_p99", "answer time p99 (s)", 2, "none"),
    Row("answer_max", "answer time max (s)", 2, "none"),
    Row("named_p50", "time to named p50 (s)", 1),
    Row("named_p99", "time to named p99 (s)", 1),
    Row("named_max", "time to named max (s)", 1),
    Row("lost", "alerts lost (never named)", 0),
    Row("doubled", "alerts doubled (named by 2+ posts)", 0),
    Row("wall_s", "wall time of the case (s)", 1),
]


def cell(numbers: Optional[Dict[str, Any]], row: Row) -> str:
    if numbers is None:
        return "-"
    value = numbers[row.key]
    if value is None:
        return row.missing
    return f"{value:,.{row.digits}f}"


def report(case: Case, results: Dict[str, Dict[str, Any]], give_up: float) -> Tuple[str, List[Dict[str, Any]]]:
    """One case's table, and the verdicts of its targets (when the threader ran and the case has targets)."""
    names = [name for name in SERVICES if name in results]
    judged = "threader" in results and bool(case.targets)
    header = (f"{'metric':<45} " + " ".join(f"{name:>10}" for name in names)
              + (f"  {'target':<8} met" if judged else ""))
    lines = [f"case {case.name}: {case.title}", header, "-" * len(header)]
    verdicts = []
    for row in ROWS:
        line = f"{row.label.format(give_up=give_up):<45} " + " ".join(f"{cell(results[n], row):>10}" for n in names)
        target = case.targets.get(row.key)
        if judged and target is not None:
            value = results["threader"][row.key]
            ok = value is not None and value <= target
            line += f"  {'<= ' + format(target, 'g'):<8} {'yes' if ok else 'NO'}"
            verdicts.append({"case": case.name, "metric": row.key, "threader": value, "target": target, "met": ok})
        lines.append(line.rstrip())
    return "\n".join(lines), verdicts


def json_safe(value: Any) -> Any:
    """The results with inf (an alert never named) as null: JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def measured_file(threader_command: Optional[str]) -> str:
    """The alert_threader.py that ran: the .py a --threader-command names, else the repository's."""
    for word in (threader_command or "").split():
        if word.endswith(".py") and os.path.isfile(word):
            return word
    return THREADER


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

CASE_NAMES = ("once", "pool", "spread", "busy", "racks", "big", "resolves")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/outage.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8 groups, 2 racks of 6, 40 and 30 alerts, a 3 s group_interval "
                             "and context, 6 s retry cap, short waits, the baselines in the racks case only")
    parser.add_argument("--case", choices=CASE_NAMES, action="append",
                        help="run only this case (may be given more than once; default: every case)")
    parser.add_argument("--only", choices=SERVICES, action="append",
                        help="run exactly these services in every case (may be given more than once; default: the "
                             "threader everywhere, the baselines in the cases they are run in)")
    parser.add_argument("--give-up", type=float, default=120.0, metavar="SECONDS",
                        help="a group gets no new notification this long after its first attempt (default: 120)")
    parser.add_argument("--group-interval", type=float, default=10.0, metavar="SECONDS",
                        help="Alertmanager's group_interval: a failed notification is sent again this much later; "
                             "a notification's context is max(this, 10s) (default: 10)")
    parser.add_argument("--spread", type=float, default=60.0, metavar="SECONDS",
                        help="the spread and busy cases' first attempts come evenly over this long (default: 60)")
    parser.add_argument("--pool", type=int, default=32, metavar="N",
                        help="the pool case's concurrent senders (default: 32)")
    parser.add_argument("--quiet", type=float, default=5.0, metavar="SECONDS",
                        help="after the senders, the case ends once Slack had no call this long and every alert "
                             "is named (default: 5)")
    parser.add_argument("--linger", type=float, default=15.0, metavar="SECONDS",
                        help="... or no call this long with alerts not named (default: 15)")
    parser.add_argument("--settle-cap", type=float, default=90.0, metavar="SECONDS",
                        help="... or this long after the senders at most (default: 90)")
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
    sizes = FULL
    args.context = max(args.group_interval, MIN_CONTEXT)
    if args.quick:
        sizes = QUICK
        args.give_up, args.quiet, args.linger = min(args.give_up, 6.0), min(args.quiet, 1.0), min(args.linger, 5.0)
        args.settle_cap = min(args.settle_cap, 15.0)
        args.spread, args.pool = min(args.spread, 3.0), min(args.pool, 4)
        args.group_interval = args.context = min(args.group_interval, 3.0)  # shorter than Alertmanager allows
    if min(args.give_up, args.group_interval, args.spread, args.pool, args.quiet, args.linger, args.settle_cap) <= 0:
        print("outage: --give-up, --group-interval, --spread, --pool, --quiet, --linger and --settle-cap must be "
              "above 0", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    cases = [c for c in build_cases(sizes, args.spread, args.pool) if not args.case or c.name in args.case]
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    try:
        python_version = interpreter_version(args.python)
        if not args.threader_command:
            compile_threader(args.python)
        if args.keep:
            os.makedirs(args.keep)
        with tempfile.TemporaryDirectory(prefix="alert-threader-outage-") as scratch:
            workdir = args.keep or scratch
            for case in cases:
                chosen = args.only or (("threader",) if args.quick and case.name != "racks" else case.services)
                names = [n for n in SERVICES if n in chosen]
                results[case.name] = {name: run_case(case, name, args, workdir, say) for name in names}
    except (BenchError, OSError, http.client.HTTPException, ValueError, SyntaxError) as e:
        print(f"outage: FAILED: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outage: interrupted; the services were stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    print(f"\nalert-threader outage benchmark: Slack at 1 post/s per channel (bursts of 5), updates and "
          f"reactions 50/min; Alertmanager: group_interval {args.group_interval:g}s, context {args.context:g}s, "
          f"give-up {args.give_up:g}s; {os.cpu_count()} CPUs, Python {python_version}, {elapsed:.0f}s")
    verdicts: List[Dict[str, Any]] = []
    for case in cases:
        table, case_verdicts = report(case, results[case.name], args.give_up)
        print("\n" + table)
        verdicts += case_verdicts
    missed = [f"{v['case']}: {v['metric']}" for v in verdicts if not v["met"]]
    if verdicts:
        print("\nall targets met" if not missed else f"\ntargets missed: {', '.join(missed)}")

    measured = measured_file(args.threader_command)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(json_safe({
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": python_version, "interpreter": args.python,
                        "platform": platform.platform()},
            "settings": {"quick": args.quick, "sizes": dataclasses.asdict(sizes), "give_up_s": args.give_up,
                         "group_interval_s": args.group_interval, "context_s": args.context,
                         "spread_s": args.spread, "pool": args.pool, "quiet_s": args.quiet,
                         "linger_s": args.linger, "settle_cap_s": args.settle_cap, "threader_command": args.threader_command},
            "threader_file": measured, "alert_threader_sha256": file_sha256(measured),
            "seconds": round(elapsed, 1), "results": results, "rows": verdicts, "missed": missed}), f, indent=1)
        f.write("\n")
    print(f"results: {os.path.relpath(args.output)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
