#!/usr/bin/env python3
"""Benchmark: alert_threader.py against the bare forwarder (bench/forwarder.py), in one run.

Run:   python3 bench/run.py              five rounds, medians (about 4 minutes on 2 cores)
       python3 bench/run.py --quick      one round with fewer alerts: a smoke run
       python3 bench/run.py --alerts 3000 --storm 2000 --concurrency 8 --rounds 5 --chunks 5

It starts bench/fake_slack.py (a fake Slack answering at once, in its own
process), then in each round both services as fresh subprocesses on loopback
ports, the threader on its file store in a new temporary directory (as its
systemd unit runs it: python3 -m alert_threader, from compiled bytecode; the
Slack token in a file named by SLACK_BOT_TOKEN_FILE), and measures, for each
(the CPU phases in --chunks turns, 5 by default, that alternate the services,
so that the machine's drift falls on both):

  idle RSS        VmRSS from /proc/PID/status once the service answers
  CPU per alert   utime+stime of the service process (/proc/PID/stat) over
                  N one-alert webhooks of distinct keys sent at concurrency C
  p50 / p99       latency of those webhooks, seen by the client
  slow Slack      p50 / p99 of 160 more one-alert webhooks at concurrency C
                  while fake Slack answers each call 100 ms late
  storm           one webhook of 2,000 firing alerts of distinct keys: the
                  time until every alert is in Slack (the threader answers
                  within DELIVERY_WAIT and tells the rest after: until its
                  outbox in /health is empty) and the Slack calls meanwhile
  CPU per alert   N more one-alert webhooks, now with 2,000+ threads stored
  (stored)
  peak RSS        VmHWM from /proc/PID/status at the end

After the rounds, a memory pass starts the threader once more, as the README's
quick start runs it (python3 alert_threader.py, a script), sends it one
round's webhooks and reads its idle and peak RSS.

The load generator runs in this process, so its CPU is never counted as the
service's. Each number is the median of the rounds. Ratios are forwarder /
threader: above 1.0 the threader is cheaper or faster. A table goes to stdout,
every round's numbers to bench/results/latest.json.

Speed must not come from answering before state is safe: after each of a few
webhooks, before the clock starts, and again at the end, the harness copies
the threader's state directory and loads it with alert_threader.FileStore, as
a restarted threader would, and looks for the threads the answers named. A
run where that fails, or where any webhook is not answered 200, exits 2.

Exit status: 0 every target met, 1 some target missed, 2 the run failed.
"""

import argparse
import dataclasses
import functools
import hashlib
import http.client
import importlib.util
import itertools
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
THREADER = os.path.join(REPO_DIR, "alert_threader.py")
RESULTS_FILE = os.path.join(BENCH_DIR, "results", "latest.json")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHANNEL = "C0BENCH"
TOKEN = "xoxb-bench-token"


class BenchError(Exception):
    """The run cannot go on: a process did not start, or a service gave a wrong answer."""


# ---------------------------------------------------------------------------
# Reading a process from /proc
# ---------------------------------------------------------------------------

def cpu_times(pid: int) -> Tuple[float, float]:
    """User and system CPU seconds of every thread of the process so far."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: count fields after its ')'.
        fields = f.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return utime / CLOCK_TICKS, stime / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (resident at peak) of the process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel writes kB
    raise BenchError(f"/proc/{pid}/status has no {field}")


# ---------------------------------------------------------------------------
# Alertmanager webhooks (version 4), one distinct thread key per alert
# ---------------------------------------------------------------------------

EXTERNAL_URL = "http://alertmanager.example.com:9093"


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def bench_alert(tag: str, i: int, starts_at: str) -> Dict[str, Any]:
    """A firing alert shaped like Alertmanager's; its service label makes its thread key unique."""
    service = f"checkout-{tag}-{i:05d}"
    labels = {"alertname": "HighRequestLatency", "severity": "warning", "service": service,
              "cluster": "prod-eu-1", "namespace": "shop", "job": "checkout",
              "instance": f"10.20.{i // 250 % 256}.{i % 250 + 1}:8080", "prometheus": "monitoring/k8s"}
    canonical = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return {
        "status": "firing",
        "labels": labels,
        "annotations": {
            "summary": f"p99 latency of {service} is above 500ms",
            "description": f"{service} has answered 1% of requests slower than 500ms for 10 minutes "
                           f"on instance {labels['instance']}.",
            "runbook_url": "https://runbooks.example.com/checkout/high-request-latency",
        },
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example.com:9090/graph?g0.expr=histogram_quantile%280.99%2C"
                        "+rate%28http_request_duration_seconds_bucket%5B5m%5D%29%29+%3E+0.5&g0.tab=1",
        "fingerprint": hashlib.sha256(canonical.encode()).hexdigest()[:16],
    }


def bench_webhook(alerts: List[Dict[str, Any]], group: str) -> bytes:
    common = {"alertname": "HighRequestLatency", "severity": "warning", "cluster": "prod-eu-1"}
    return json.dumps({
        "receiver": "slack-threader", "status": "firing", "alerts": alerts,
        "groupLabels": {"alertname": "HighRequestLatency", "group": group},
        "commonLabels": common, "commonAnnotations": {},
        "externalURL": EXTERNAL_URL, "version": "4",
        "groupKey": '{}/{severity="warning"}:{alertname="HighRequestLatency", group="' + group + '"}',
        "truncatedAlerts": 0,
    }).encode()


@dataclasses.dataclass
class Workload:
    """Every request body of a run, built before any clock starts; both services get the same."""

    warmup: List[bytes]
    probes: List[bytes]
    first: List[bytes]
    storm: bytes
    storm_alerts: int
    second: List[bytes]
    slow_slack: List[bytes]

    @classmethod
    def build(cls, alerts: int, storm: int, warmup: int, probes: int, slow_slack: int) -> "Workload":
        starts_at = rfc3339(datetime.now(timezone.utc) - timedelta(minutes=5))

        def singles(tag: str, count: int) -> List[bytes]:
            return [bench_webhook([bench_alert(tag, i, starts_at)], f"{tag}-{i}") for i in range(count)]

        return cls(warmup=singles("warm", warmup), probes=singles("probe", probes), first=singles("a", alerts),
                   storm=bench_webhook([bench_alert("storm", i, starts_at) for i in range(storm)], "storm"),
                   storm_alerts=storm, second=singles("b", alerts), slow_slack=singles("slow", slow_slack))

    def everything(self) -> List[List[bytes]]:
        """Every batch in the order a round sends them (the storm as a batch of one)."""
        return [self.warmup, self.probes, self.first, self.slow_slack, [self.storm], self.second]


# ---------------------------------------------------------------------------
# Processes: fake Slack and the services, always stopped at the end
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interpreter_version(python: str) -> str:
    try:
        return subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"cannot run {python}: {e}") from None


def child_environment() -> Dict[str, str]:
    """This environment without proxy settings (urllib would send loopback calls through a proxy)
    and without the threader's settings (say STORM_THRESHOLD): its flags alone configure it."""
    settings = {name for name, _, _ in load_threader_module().SETTINGS}
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in settings}


class Processes:
    """The subprocesses of one run; stop_all() ends each of them, whatever happened."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._started: List[Tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: List[str], announces_port: bool = False,
              env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start argv with this environment cleaned (see child_environment) plus `env`."""
        with open(self.log_path(name), "wb") as log:
            # A session of its own: a Ctrl-C reaches this harness only, which then stops the child.
            process = subprocess.Popen(argv, cwd=REPO_DIR, env={**child_environment(), **(env or {})},
                                       start_new_session=True,
                                       stdout=subprocess.PIPE if announces_port else log, stderr=log)
        self._started.append((name, process))
        return process

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, name + ".log")

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def announced_port(self, name: str, process: subprocess.Popen, timeout: float = 15.0) -> int:
        """The port a child prints as 'PORT <n>' on its first line."""
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline().decode(errors="replace") if readable else ""
        if not line.startswith("PORT "):
            raise BenchError(f"{name} did not announce its port (got {line.strip()!r})\n{self.log_tail(name)}")
        return int(line.split()[1])

    def stop(self, process: subprocess.Popen, timeout: float = 10.0) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stop_all(self) -> None:
        for _, process in reversed(self._started):
            self.stop(process)


# ---------------------------------------------------------------------------
# HTTP from the harness: kept-alive connections, as Alertmanager's client does
# ---------------------------------------------------------------------------

def request(conn: http.client.HTTPConnection, method: str, path: str,
            body: Optional[bytes] = None) -> Tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    return response.status, response.read()


def get_json(port: int, path: str) -> Dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, body = request(conn, "GET", path)
    finally:
        conn.close()
    if status != 200:
        raise BenchError(f"GET {path} on port {port} answered {status}: {body[:200]!r}")
    return json.loads(body)


def wait_outbox_empty(port: int, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until every alert the threader took is in Slack: its outbox, in /health, is empty."""
    deadline = time.monotonic() + timeout
    while get_json(port, "/health").get("outbox", {}).get("waiting", 0):
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"the threader's outbox was not empty within {timeout:.0f} s")
        time.sleep(0.02)


def wait_ready(port: int, path: str, process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Poll GET `path` until it answers 200, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"exited with status {process.returncode} before answering GET {path}")
        try:
            get_json(port, path)
            return
        except (OSError, http.client.HTTPException, BenchError, ValueError):
            time.sleep(0.05)
    raise BenchError(f"did not answer GET {path} within {timeout:g}s")


@dataclasses.dataclass
class Load:
    """What the client saw of one batch of webhooks."""

    latencies: List[float]
    statuses: List[int]
    wall: float

    def failures(self) -> int:
        return sum(1 for status in self.statuses if status != 200)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, in seconds."""
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def send_webhooks(port: int, bodies: Sequence[bytes], concurrency: int,
                  connections: Optional[List[http.client.HTTPConnection]] = None) -> Load:
    """POST every body to /alert from `concurrency` threads, each on one kept-alive connection.

    With `connections` (one per thread), those are used and left open for the next batch."""
    latencies = [0.0] * len(bodies)
    statuses = [0] * len(bodies)
    order = itertools.count()
    order_lock = threading.Lock()

    def worker(n: int) -> None:
        conn = connections[n] if connections else http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with order_lock:
                    i = next(order)
                if i >= len(bodies):
                    return
                started = time.perf_counter()
                try:
                    statuses[i], _ = request(conn, "POST", "/alert", bodies[i])
                except (OSError, http.client.HTTPException):
                    statuses[i] = -1  # counted as a failure; the next request reconnects
                    conn.close()
                latencies[i] = time.perf_counter() - started
        finally:
            if not connections:
                conn.close()

    workers = [threading.Thread(target=worker, args=(n,), name=f"client-{n}", daemon=True)
               for n in range(concurrency)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return Load(latencies, statuses, time.perf_counter() - started)


# ---------------------------------------------------------------------------
# Measuring one service
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Service:
    name: str
    argv: List[str]
    ready_path: str
    announces_port: bool
    store_file: Optional[str] = None  # the threader's: checked for durability
    env: Dict[str, str] = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def load_threader_module() -> Any:
    """alert_threader.py as a module (importing it does nothing but define things)."""
    spec = importlib.util.spec_from_file_location("alert_threader", THREADER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_on_disk(store_file: str, scratch: str) -> Tuple[Dict[str, Any], Set[str]]:
    """What a threader restarted now would load, its own FileStore reading a copy of the state: the threads,
    and the thread keys of the alerts waiting in the outbox.

    Reading through FileStore, not the JSON, keeps this check true to whatever
    the store's on-disk format becomes; the copy keeps the live files untouched.
    """
    state_dir = os.path.dirname(store_file)
    copy_dir = os.path.join(scratch, "state-copy")
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(state_dir, copy_dir)
    module = load_threader_module()
    try:
        store = module.FileStore(os.path.join(copy_dir, os.path.basename(store_file)), module.Metrics())
        threads = store.items()
        waiting = {item.thread_key for item in store.waiting(CHANNEL)}
        store.close()
    except (AttributeError, TypeError) as e:
        raise BenchError(f"bench/run.py reads the state through alert_threader.FileStore(path, Metrics()): "
                         f".items() and .waiting(channel), which no longer work ({e}): update state_on_disk()") \
            from None
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)
    return threads, waiting


def threads_on_disk(store_file: str, scratch: str) -> Dict[str, Any]:
    return state_on_disk(store_file, scratch)[0]


def durability_probe(port: int, store_file: str, bodies: Sequence[bytes], scratch: str) -> None:
    """Each answer must name what is already on disk when it arrives: the thread it names, or (queued) the
    alert in the outbox."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for body in bodies:
            status, answer = request(conn, "POST", "/alert", body)
            threads, waiting = state_on_disk(store_file, scratch)
            if status != 200:
                raise BenchError(f"probe webhook answered {status}: {answer[:300]!r}")
            for result in json.loads(answer)["results"]:
                stored = threads.get(result["key"])
                told = stored and stored.get("ts") == result["thread_ts"]
                if not told and not (result["action"] == "queued" and result["key"] in waiting):
                    raise BenchError(f"answered 200 before alert {result['key']!r} was on disk "
                                     f"in {os.path.dirname(store_file)}")
    finally:
        conn.close()


def cpu_phase(pid: int, port: int, bodies: Sequence[bytes], concurrency: int,
              connections: Optional[List[http.client.HTTPConnection]] = None) -> Tuple[float, float, Load]:
    """User and system CPU seconds the service spent on these webhooks, and what the client saw."""
    user, system = cpu_times(pid)
    load = send_webhooks(port, bodies, concurrency, connections)
    user_after, system_after = cpu_times(pid)
    return user_after - user, system_after - system, load


def check_answers(name: str, phase: str, load: Load) -> None:
    if load.failures():
        raise BenchError(f"{name}: {load.failures()} of {len(load.statuses)} webhooks in the {phase} phase "
                         f"were not answered 200 (statuses {sorted(set(load.statuses))})")


class Measured:
    """One service in one round: its process, and its numbers as the phases add them."""

    def __init__(self, service: Service, processes: Processes, slack_port: int, concurrency: int,
                 say: Callable[[str], None]) -> None:
        self.service, self.processes, self.slack_port = service, processes, slack_port
        self.concurrency, self.say = concurrency, say
        self.process = processes.start(service.name, service.argv, service.announces_port, service.env)
        self.port = (processes.announced_port(service.name, self.process) if service.announces_port
                     else int(service.argv[service.argv.index("--port") + 1]))
        try:
            wait_ready(self.port, service.ready_path, self.process)
        except BenchError as e:
            raise BenchError(f"{service.name} {e}\n{processes.log_tail(service.name)}") from None
        self.pid = self.process.pid
        time.sleep(0.2)  # let start-up work settle before calling the process idle
        self.numbers: Dict[str, Any] = {"rss_idle_mb": memory_mb(self.pid, "VmRSS"), "rss_peak_mb_after": {}}
        self.phases: Dict[str, Tuple[float, float, Load]] = {}  # phase -> user, system, what the client saw
        # The CPU phases' clients: kept alive from turn to turn, like Alertmanager's.
        self.connections = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                            for _ in range(concurrency)]

    @property
    def name(self) -> str:
        return self.service.name

    def peak(self, phase: str) -> None:
        self.numbers["rss_peak_mb_after"][phase] = memory_mb(self.pid, "VmHWM")  # which phase set the peak

    def warm_up(self, workload: Workload) -> None:
        # On the connections the CPU phases use: those measure alerts, not connection set-up.
        check_answers(self.name, "warm-up", send_webhooks(self.port, workload.warmup, self.concurrency,
                                                          self.connections))
        if self.service.store_file:
            durability_probe(self.port, self.service.store_file, workload.probes, self.processes.log_dir)
            self.numbers["probes_passed"] = len(workload.probes)
            self.numbers["stored_threads_first"] = get_json(self.port, "/health")["cached_threads"]
        else:
            check_answers(self.name, "warm-up", send_webhooks(self.port, workload.probes, 1))
        self.peak("warmup")

    def cpu_chunk(self, phase: str, bodies: Sequence[bytes]) -> None:
        """Part of a CPU phase; the parts add up (see interleaved)."""
        user, system, load = cpu_phase(self.pid, self.port, bodies, self.concurrency, self.connections)
        check_answers(self.name, phase, load)
        if phase in self.phases:
            user_before, system_before, before = self.phases[phase]
            user, system = user_before + user, system_before + system
            load = Load(before.latencies + load.latencies, before.statuses + load.statuses, before.wall + load.wall)
        self.phases[phase] = (user, system, load)

    def storm(self, workload: Workload) -> None:
        self.say(f"{self.name}: one webhook of {workload.storm_alerts} alerts")
        calls_before = get_json(self.slack_port, "/count")["count"]
        cpu_before = cpu_seconds(self.pid)
        started = time.perf_counter()
        load = send_webhooks(self.port, [workload.storm], 1)
        check_answers(self.name, "storm", load)
        if self.service.store_file:  # answered within DELIVERY_WAIT: the sender tells the rest after
            wait_outbox_empty(self.port, self.process)
        self.numbers.update(storm_wall_s=time.perf_counter() - started, storm_answer_s=load.wall,
                            storm_cpu_ms_per_alert=(cpu_seconds(self.pid) - cpu_before) / workload.storm_alerts * 1000,
                            storm_slack_calls=get_json(self.slack_port, "/count")["count"] - calls_before)
        self.peak("storm")
        if self.service.store_file:
            self.numbers["stored_threads"] = get_json(self.port, "/health")["cached_threads"]

    def slow_slack(self, bodies: Sequence[bytes]) -> None:
        """Latency of one-alert webhooks while fake Slack answers late (the caller sets its delay)."""
        load = send_webhooks(self.port, bodies, self.concurrency, self.connections)
        check_answers(self.name, "slow Slack", load)
        self.numbers.update(p50_ms_slow_slack=load.percentile(0.50) * 1000,
                            p99_ms_slow_slack=load.percentile(0.99) * 1000)
        self.peak("slow_slack")

    def replay(self, workload: Workload) -> None:
        """A round's webhooks, without measuring CPU or latency: for the memory they take."""
        for bodies in workload.everything():
            check_answers(self.name, "memory", send_webhooks(self.port, bodies, self.concurrency, self.connections))
        self.peak("end")

    def finish(self) -> Dict[str, Any]:
        """The numbers of both CPU phases, peak memory, and the final check of the state on disk."""
        for phase, suffix, user_key, system_key in (("first", "", "cpu_user_s_first", "cpu_sys_s_first"),
                                                     ("stored", "_stored", "cpu_user_s_second", "cpu_sys_s_second")):
            user, system, load = self.phases[phase]
            alerts = len(load.statuses)
            self.numbers.update({f"cpu_ms_per_alert{suffix}": (user + system) / alerts * 1000,
                                 user_key: user, system_key: system,
                                 f"p50_ms{suffix}": load.percentile(0.50) * 1000,
                                 f"p99_ms{suffix}": load.percentile(0.99) * 1000})
            if phase == "first":
                self.numbers["webhooks_per_s"] = alerts / load.wall
        self.peak("stored")
        self.numbers["rss_peak_mb"] = self.numbers["rss_peak_mb_after"]["stored"]
        if self.service.store_file:
            on_disk = len(threads_on_disk(self.service.store_file, self.processes.log_dir))
            self.numbers["threads_on_disk"] = on_disk
            state_dir = os.path.dirname(self.service.store_file)
            self.numbers["state_dir_mb"] = sum(entry.stat().st_size for entry in os.scandir(state_dir)) / 1e6
            served = get_json(self.port, "/health")["cached_threads"]
            if on_disk != served:
                raise BenchError(f"{self.name}: {served} threads in memory but {on_disk} in {self.service.store_file}")
        return self.numbers

    def stop(self) -> None:
        for conn in self.connections:
            conn.close()
        self.processes.stop(self.process)


def interleaved(services: List[Measured], phase: str, bodies: Sequence[bytes], chunks: int) -> None:
    """A CPU phase for every service, in `chunks` turns: A B, B A, A B, ...

    This machine's speed drifts by ±10% over seconds; measured one after the
    other, one service could get the slow seconds. In turns, both share them.
    """
    chunks = min(chunks, len(bodies))
    for n in range(chunks):
        start, end = n * len(bodies) // chunks, (n + 1) * len(bodies) // chunks
        for service in (services if n % 2 == 0 else services[::-1]):
            service.cpu_chunk(phase, bodies[start:end])


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def median_numbers(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Each number (and each number of a nested dict) as its median over the rounds."""
    merged: Dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, dict):
            merged[key] = median_numbers([r[key] for r in rounds])
        else:
            merged[key] = statistics.median(r[key] for r in rounds)
    return merged


@dataclasses.dataclass
class Row:
    key: str
    label: str  # may name {storm}, the size of the big webhook, and {delay}, slow Slack's in ms
    digits: int
    target: Optional[Tuple[str, float]] = None  # ("ratio", at least) or ("max", threader at most)


ROWS = [
    Row("cpu_ms_per_alert", "CPU per alert (ms)", 3, ("ratio", 0.333)),
    Row("p50_ms", "p50 latency, 1-alert webhook (ms)", 2),
    Row("p99_ms", "p99 latency, 1-alert webhook (ms)", 2),
    Row("p50_ms_slow_slack", "p50 latency, Slack at {delay:g} ms (ms)", 1),
    Row("p99_ms_slow_slack", "p99 latency, Slack at {delay:g} ms (ms)", 1),
    Row("storm_wall_s", "{storm:,}-alert webhook: all in Slack (s)", 3, ("ratio", 1.0)),
    Row("storm_slack_calls", "{storm:,}-alert webhook: Slack calls", 0),
    Row("storm_cpu_ms_per_alert", "{storm:,}-alert webhook: CPU per alert (ms)", 3),
    Row("stored_threads", "threads stored after it", 0),
    Row("cpu_ms_per_alert_stored", "CPU per alert, {storm:,}+ stored (ms)", 3, ("ratio", 0.333)),
    Row("p50_ms_stored", "p50 latency, {storm:,}+ stored (ms)", 2),
    Row("rss_idle_mb", "RSS idle (MB), unit: -m, bytecode", 1, ("max", 40.0)),
    Row("rss_peak_mb", "RSS peak (MB), unit: -m, bytecode", 1, ("max", 60.0)),
    Row("rss_idle_mb_script", "RSS idle (MB), script", 1, ("max", 40.0)),
    Row("rss_peak_mb_script", "RSS peak (MB), script", 1, ("max", 60.0)),
]


def judge(row: Row, forwarder: Optional[float],
          threader: Optional[float]) -> Tuple[Optional[float], str, Optional[bool]]:
    """The ratio forwarder / threader, the target in words, and whether it is met."""
    ratio = forwarder / threader if forwarder is not None and threader else None
    if row.target is None:
        return ratio, "", None
    kind, bound = row.target
    if kind == "ratio":
        return ratio, f"ratio >= {bound:g}", None if ratio is None else ratio >= bound
    return ratio, f"threader <= {bound:g}", None if threader is None else threader <= bound


def report(results: Dict[str, Dict[str, Any]], storm: int, delay_ms: float) -> Tuple[str, List[Dict[str, Any]]]:
    """The table as text, and each row's judgement for the JSON file."""
    def cell(value: Optional[float], digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    header = f"{'metric':<40} {'forwarder':>10} {'threader':>10} {'fwd/thr':>8}  {'target':<16} met"
    lines = [header, "-" * len(header)]
    verdicts = []
    for row in ROWS:
        forwarder, threader = results["forwarder"].get(row.key), results["threader"].get(row.key)
        ratio, target, met = judge(row, forwarder, threader)
        label = row.label.format(storm=storm, delay=delay_ms)
        lines.append(f"{label:<40} {cell(forwarder, row.digits):>10} {cell(threader, row.digits):>10} "
                     f"{cell(ratio, 2):>8}  {target:<16} {'' if met is None else 'yes' if met else 'NO'}".rstrip())
        verdicts.append({"metric": row.key, "forwarder": forwarder, "threader": threader, "ratio": ratio,
                         "target": target or None, "met": met})
    return "\n".join(lines), verdicts


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=1000,
                        help="one-alert webhooks in each CPU phase (default: 1000)")
    parser.add_argument("--storm", type=int, default=2000, help="alerts in the one big webhook (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="client connections at once (default: 8)")
    parser.add_argument("--chunks", type=int, default=5,
                        help="turns each CPU phase is taken in, alternating the services (default: 5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="fresh start-ups of each service; the table shows medians (default: 5)")
    parser.add_argument("--slow-slack-alerts", type=int, default=160,
                        help="one-alert webhooks in the phase with a slow Slack (default: 160)")
    parser.add_argument("--slack-delay", type=float, default=100.0, metavar="MS",
                        help="how late fake Slack answers in that phase, in ms (default: 100)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one round, 300 alerts per CPU phase, 80 behind the slow Slack")
    parser.add_argument("--only", choices=("forwarder", "threader"),
                        help="measure one service (no ratios; for profiling)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the fake Slack and both services (default: this one)")
    parser.add_argument("--threader-command", default=None, metavar="CMD",
                        help="how to start the threader in the rounds instead of 'PYTHON -m alert_threader' "
                             "(split on spaces; the process it starts is measured); the memory pass always "
                             "runs 'PYTHON alert_threader.py'")
    parser.add_argument("--output", default=RESULTS_FILE, help=f"JSON results file (default: {RESULTS_FILE})")
    return parser


def threader_service(name: str, command: List[str], slack_url: str, state_dir: str, storm: int) -> Service:
    """The threader on its file store in state_dir; the token from a file, as the service wants secrets."""
    store_file = os.path.join(state_dir, "threads.json")
    token_file = os.path.join(os.path.dirname(state_dir), "slack-token")  # the state dir holds the state only
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(TOKEN + "\n")
    return Service(name, command + [
        "--port", str(free_port()), "--host", "127.0.0.1", "--slack-api-url", slack_url,
        "--slack-channel", CHANNEL, "--thread-store-file", store_file,
        # The harness's connections wait through the other service's turns: keep them open.
        "--client-timeout", "3600", "--log-level", "warning",
        # What is compared is the work per alert, one message each as the forwarder posts: no pacing (this
        # fake Slack has no limits; bench/outage.py measures the pacing against one that has), and a storm
        # only for the one big webhook, not for the CPU phases' hundreds of webhooks a second.
        "--slack-pace", "0", "--storm-threshold", str(storm - 1), "--storm-window", "1s"],
        ready_path="/health", announces_port=False, store_file=store_file,
        env={"SLACK_BOT_TOKEN_FILE": token_file})


def make_services(args: argparse.Namespace, slack_url: str, state_dir: str) -> List[Service]:
    """How to start each service of a round; the threader keeps its state in state_dir."""
    # As its systemd unit runs it: a module with bytecode compiled at install (see compile_threader).
    threader_command = args.threader_command.split() if args.threader_command else [args.python, "-m", "alert_threader"]
    forwarder = Service("forwarder", [args.python, os.path.join(BENCH_DIR, "forwarder.py"), "--port", "0",
                                      "--slack-api-url", slack_url, "--slack-bot-token", TOKEN,
                                      "--slack-channel", CHANNEL], ready_path="/", announces_port=True)
    threader = threader_service("threader", threader_command, slack_url, state_dir, args.storm)
    return [s for s in (forwarder, threader) if args.only in (None, s.name)]


def set_slack_delay(slack_port: int, seconds: float) -> None:
    """From now on, fake Slack answers every API call `seconds` late."""
    conn = http.client.HTTPConnection("127.0.0.1", slack_port, timeout=10)
    try:
        status, body = request(conn, "POST", "/delay", json.dumps({"seconds": seconds}).encode())
    finally:
        conn.close()
    if status != 200:
        raise BenchError(f"fake Slack refused a delay of {seconds}s: {status} {body[:200]!r}")


def script_memory_pass(args: argparse.Namespace, workload: Workload, workdir: str, processes: Processes,
                       slack_url: str, slack_port: int, say: Callable[[str], None]) -> Dict[str, Any]:
    """The threader as the README's quick start runs it, as a script, through one round's webhooks.

    A script is compiled from source at every start and the compiler's memory
    stays: only the RSS of this way of running differs from the unit's, and
    memory moves little from round to round, so one pass does."""
    state_dir = os.path.join(workdir, "state-script")
    os.mkdir(state_dir)
    service = threader_service("threader-script", [args.python, THREADER], slack_url, state_dir, args.storm)
    say("memory pass: the threader as a script, through one round's webhooks")
    measured = Measured(service, processes, slack_port, args.concurrency, say)
    try:
        measured.replay(workload)
        return {"rss_idle_mb_script": measured.numbers["rss_idle_mb"],
                "rss_peak_mb_script": measured.numbers["rss_peak_mb_after"]["end"]}
    finally:
        measured.stop()


def run_rounds(args: argparse.Namespace, workload: Workload, workdir: str,
               say: Callable[[str], None]) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Any]]:
    """Every round: both services started fresh, measured phase by phase in turns; then the
    threader's memory pass as a script. All processes are stopped at the end."""
    processes = Processes(workdir)
    rounds: Dict[str, List[Dict[str, Any]]] = {"forwarder": [], "threader": []}
    script: Dict[str, Any] = {}
    try:
        slack = processes.start("fake_slack", [args.python, os.path.join(BENCH_DIR, "fake_slack.py")],
                                announces_port=True)
        slack_port = processes.announced_port("fake_slack", slack)
        slack_url = f"http://127.0.0.1:{slack_port}/api/"
        for n in range(1, args.rounds + 1):
            state_dir = os.path.join(workdir, f"state-{n}")  # the threader's alone: the probe copies it whole
            os.mkdir(state_dir)
            measured: List[Measured] = []
            try:
                for service in make_services(args, slack_url, state_dir):
                    measured.append(Measured(service, processes, slack_port, args.concurrency, say))
                if n % 2 == 0:
                    measured.reverse()  # alternate who goes first, so that drift favours neither
                names = " and ".join(m.name for m in measured)
                say(f"round {n} of {args.rounds}: {names}, warm-up and durability probe")
                for m in measured:
                    m.warm_up(workload)
                say(f"round {n}: {len(workload.first)} one-alert webhooks each at concurrency {args.concurrency}, "
                    f"in {args.chunks} turns")
                interleaved(measured, "first", workload.first, args.chunks)
                for m in measured:
                    m.peak("first")
                say(f"round {n}: {len(workload.slow_slack)} one-alert webhooks each, "
                    f"fake Slack answering after {args.slack_delay:g} ms")
                set_slack_delay(slack_port, args.slack_delay / 1000)
                for m in measured:
                    m.slow_slack(workload.slow_slack)
                set_slack_delay(slack_port, 0.0)
                for m in measured:
                    m.storm(workload)
                time.sleep(1.1)  # the storm's count leaves the threader's STORM_WINDOW before the next phase
                stored = {m.name: m.numbers["stored_threads"] for m in measured if "stored_threads" in m.numbers}
                say(f"round {n}: {len(workload.second)} more one-alert webhooks each"
                    + (f", {stored['threader']} threads stored in the threader" if "threader" in stored else ""))
                interleaved(measured[::-1], "stored", workload.second, args.chunks)  # the other goes first
                for m in measured:
                    rounds[m.name].append(m.finish())
            finally:
                for m in measured:
                    m.stop()
        if args.only != "forwarder":
            script = script_memory_pass(args, workload, workdir, processes, slack_url, slack_port, say)
    finally:
        processes.stop_all()
    return rounds, script


def file_sha256(path: str) -> str:
    """Which alert_threader.py was measured: the file changes more often than commits are made."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM takes the way out that Ctrl-C takes, through the clean-up in run_rounds."""
    raise KeyboardInterrupt


def compile_threader(python: str) -> None:
    """Bytecode for `python -m alert_threader`, as install.sh compiles it for the unit."""
    try:
        subprocess.run([python, "-m", "compileall", "-q", THREADER], check=True, timeout=60,
                       capture_output=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"cannot compile {THREADER}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.alerts, args.rounds, args.slow_slack_alerts = min(args.alerts, 300), 1, min(args.slow_slack_alerts, 80)
    if min(args.alerts, args.storm, args.concurrency, args.rounds, args.chunks, args.slow_slack_alerts) < 1:
        print("bench: --alerts, --storm, --concurrency, --rounds, --chunks and --slow-slack-alerts must be "
              "at least 1", file=sys.stderr)
        return 2
    if args.slack_delay < 0:
        print("bench: --slack-delay must not be negative", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    try:
        python_version = interpreter_version(args.python)
        compile_threader(args.python)
        workload = Workload.build(args.alerts, args.storm, warmup=3 * args.concurrency, probes=5,
                                  slow_slack=args.slow_slack_alerts)
        with tempfile.TemporaryDirectory(prefix="alert-threader-bench-") as workdir:
            rounds, script = run_rounds(args, workload, workdir, say)
    except (BenchError, OSError, http.client.HTTPException) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; the services were stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    results = {name: median_numbers(numbers) if numbers else {} for name, numbers in rounds.items()}
    results["threader"].update(script)
    if results["forwarder"]:  # the forwarder runs as a script in every round
        results["forwarder"].update(rss_idle_mb_script=results["forwarder"]["rss_idle_mb"],
                                    rss_peak_mb_script=results["forwarder"]["rss_peak_mb"])
    table, verdicts = report(results, args.storm, args.slack_delay)
    print(f"\nalert-threader benchmark: medians of {args.rounds} round{'s' * (args.rounds > 1)}; "
          f"{args.alerts:,} one-alert webhooks per CPU phase at concurrency {args.concurrency} "
          f"in {args.chunks} alternating turns, "
          f"one webhook of {args.storm:,} alerts, {args.slow_slack_alerts} behind a Slack at {args.slack_delay:g} ms; "
          f"{os.cpu_count()} CPUs, Python {python_version}, {elapsed:.0f}s\n")
    print(table)
    if rounds["threader"] and rounds["forwarder"]:
        print("\nCPU ratio fwd/thr in each round (the machine's noise):")
        for key, label in (("cpu_ms_per_alert", "one-alert webhooks"), ("cpu_ms_per_alert_stored", "with threads stored")):
            ratios = [fwd[key] / thr[key] for fwd, thr in zip(rounds["forwarder"], rounds["threader"]) if thr[key]]
            print(f"  {label:<22} " + "  ".join(f"{r:.2f}" for r in ratios))
    if rounds["threader"]:
        print(f"\nthreader state on disk when answered: {sum(r['probes_passed'] for r in rounds['threader'])} "
              f"probes passed; at the end, every thread in memory was on disk in each round")
    missed = [v["metric"] for v in verdicts if v["met"] is False]
    if not args.only:
        print("\nall targets met" if not missed else f"\ntargets missed: {', '.join(missed)}")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": {"cpus": os.cpu_count(), "python": python_version, "interpreter": args.python,
                               "platform": platform.platform()},
                   "settings": {"alerts": args.alerts, "storm": args.storm, "concurrency": args.concurrency,
                                "rounds": args.rounds, "chunks": args.chunks,
                                "slow_slack_alerts": args.slow_slack_alerts, "slack_delay_ms": args.slack_delay,
                                "threader_command": args.threader_command},
                   "alert_threader_sha256": file_sha256(THREADER),
                   "seconds": round(elapsed, 1), "medians": results, "rounds": rounds, "script_pass": script,
                   "rows": verdicts, "missed": missed}, f, indent=2)
        f.write("\n")
    print(f"results: {os.path.relpath(args.output)}")
    if args.only:
        return 0
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
