#!/usr/bin/env python3
"""alert-threader: Prometheus Alertmanager webhooks as one Slack thread per alert.

Each alert key gets a parent message in Slack, kept up to date as a status
card; further alerts of the key, their resolves and re-fires are replies in
its thread. Alertmanager's repeats and retries post nothing twice. A webhook's
alerts go into a durable outbox and the webhook is answered at once; one
sender per channel tells them at Slack's pace, a storm as one digest.

Run:   python3 alert_threader.py               serve webhooks on :9009 (POST /alert)
       python3 alert_threader.py render F...   print the Slack payloads webhook files make
       python3 alert_threader.py check         check the settings, the store and Slack

Without a Slack token it runs in dry-run mode: it logs the payloads it would
post and shows them on GET /preview. Every setting is an environment variable
mirrored by a flag: `python3 alert_threader.py --help` lists them with their
defaults, and docs/configuration.md explains each.
"""

import argparse
import base64
import bisect
import contextlib
import dataclasses
import email.errors
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import math
import logging
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import zoneinfo
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

__version__ = "1.2.0"

log = logging.getLogger("alert_threader")


class ThreaderError(Exception):
    """Root of the errors this module raises on purpose."""


class ConfigError(ThreaderError):
    """A setting is invalid; start-up stops with this one line."""


class StoreError(ThreaderError):
    """The thread store cannot be read or written."""


class BadRequest(ThreaderError):
    """A request the service refuses; carries the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Text, time and URL helpers
# ---------------------------------------------------------------------------

ELLIPSIS = "…"
ZERO_TIME = "0001-01-01T00:00:00Z"
FIRST_EPOCH = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
LAST_EPOCH = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})",
                     re.ASCII)  # digits 0-9 only, as RFC 3339 writes them
DRY_RUN_CHANNEL = "C0DRYRUN"  # where dry-run "posts" when no SLACK_CHANNEL is set


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def chunks(items: List[Any], size: int) -> Iterator[List[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# The encoders of what this service writes, made once: json.dumps() with options makes a new one per call.
# Nothing written refers to itself, so neither needs the check for cycles.
STORED_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
SLACK_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)  # Slack's API takes ASCII-escaped JSON
ANSWER_JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False)  # this service's HTTP answers


def compact_json(value: Any) -> str:
    """JSON as stored: no spaces, Unicode as it is."""
    return STORED_JSON.encode(value)


def escape_mrkdwn(text: str) -> str:
    """Escape the three characters Slack's mrkdwn gives meaning to (mentions, links)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Characters that show nothing or turn the text around: C0 controls but tab and newline, DEL, C1 controls,
# the bidirectional overrides and isolates (a label written "gnp.exe" backwards), and the invisible characters
# that make one value look like another (zero-width space, word joiner, BOM, line separators, the Hangul filler).
UNSEEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u180e\u200b\u2028\u2029\u202a-\u202e\u2060-\u2064"
                    "\u2066-\u2069\ufeff\u3164]")


def clean_text(text: str) -> str:
    """Alert text as it is shown: without control characters and bidi overrides."""
    # The usual text has none of them, and str.isprintable() refuses every one but the Hangul filler.
    if text.isprintable() and "\u3164" not in text:
        return text
    return UNSEEN.sub("", text)


def utf16_units(text: str) -> int:
    """Length as Slack counts it: in UTF-16 code units (an emoji beyond the BMP is two)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _joins_previous(c: str) -> bool:
    """Is c part of the character before it, as readers see it (a mark, a modifier, a joiner)?"""
    return (unicodedata.category(c) in ("Mn", "Me", "Mc") or c == "\u200d" or "\ufe00" <= c <= "\ufe0f"
            or "\U0001f3fb" <= c <= "\U0001f3ff" or "\U000e0020" <= c <= "\U000e007f"
            or "\U000e0100" <= c <= "\U000e01ef" or "\u1160" <= c <= "\u11ff" or "\ud7b0" <= c <= "\ud7ff")


def _regional(c: str) -> bool:
    return "\U0001f1e6" <= c <= "\U0001f1ff"  # two of these make a flag


def grapheme_boundary(text: str, i: int) -> int:
    """The largest cut at or before i that splits no character as readers see it.

    Keeps together combining marks, emoji modifiers, variation selectors, tag
    sequences, whatever a zero-width joiner joins, Hangul syllables written in
    jamo, and the two halves of a flag."""
    while 0 < i < len(text):
        if _joins_previous(text[i]) or text[i - 1] == "\u200d":
            i -= 1
        elif _regional(text[i]) and _regional(text[i - 1]):
            run = 0
            while run < i and _regional(text[i - 1 - run]):
                run += 1
            if run % 2 == 0:
                break  # text[i] starts a new flag
            i -= 1
        else:
            break
    return i


def truncate_middle(text: str, limit: int) -> str:
    """At most `limit` characters, cut in the middle: names that differ at their end (pods) stay apart."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + ELLIPSIS + text[len(text) - (limit - 1 - head):]


def truncate(text: str, limit: int, utf16: bool = False) -> str:
    """At most `limit` characters (or UTF-16 units), ending in an ellipsis when cut, whole characters only."""
    if (utf16_units(text) if utf16 else len(text)) <= limit:
        return text
    cut, used = 0, 0
    for c in text:
        used += 2 if utf16 and ord(c) > 0xFFFF else 1
        if used > limit - 1:
            break
        cut += 1
    return text[:grapheme_boundary(text, cut)] + ELLIPSIS


def clip_escaped(escaped: str, limit: int) -> str:
    """Already-escaped mrkdwn within `limit` characters, never cutting an entity like &amp; or a character in half."""
    if len(escaped) <= limit:
        return escaped
    cut = grapheme_boundary(escaped, limit - 1)
    amp = escaped.rfind("&", max(0, cut - 4), cut)
    if amp != -1 and ";" not in escaped[amp:cut]:
        cut = amp
    return escaped[:cut] + ELLIPSIS


def mrkdwn(text: str, limit: int) -> str:
    """An alert-supplied value as escaped mrkdwn within `limit` characters, its unseen characters removed."""
    # Escaping only lengthens, so the first limit+1 characters that are shown decide the result.
    return clip_escaped(escape_mrkdwn(clean_text(text[: 4 * limit + 4])[: limit + 1]), limit)


URL_BREAKERS = re.compile(r'[<>|"` ]')  # characters that would end or break a link in mrkdwn


def is_http_url(url: Any, max_length: int = 3000) -> bool:
    """An absolute http(s) URL that Slack can show as a link or button."""
    if not isinstance(url, str) or not 0 < len(url) <= max_length:
        return False
    if URL_BREAKERS.search(url) or not url.isprintable():
        return False
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def without_credentials(url: str) -> str:
    """The URL without the user:password@ it may carry (a webhook's externalURL, an alert's generatorURL):
    they must go nowhere. (Not urlsplit: it caches what it parses, and an alert's URL may be a megabyte.)"""
    start = url.find("://") + 3
    if start < 3:
        return url
    end = min([i for i in (url.find(c, start) for c in "/?#\\") if i != -1] + [len(url)])
    if "@" not in url[start:end]:
        return url
    return url[:start] + url[start:end].rpartition("@")[2] + url[end:]


def shown_url(url: str) -> str:
    """A URL setting as an error quotes it: never with what may be a password."""
    url = without_credentials(url)
    return repr(url) if "@" not in url else "(a value with an @ in it, not shown)"


def parse_time(text: str) -> Optional[float]:
    """Epoch seconds of an RFC 3339 time as Alertmanager writes it; None for its zero time."""
    match = RFC3339.fullmatch(text)
    if not match:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year = int(match.group(1))
    if year <= 1:  # Alertmanager's zero time, 0001-01-01T00:00:00Z: no time
        return None
    month, day, hour, minute, second = map(int, match.groups()[1:6])
    try:
        moment = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"not a valid date: {text!r}") from None
    epoch = moment.timestamp() + float(match.group(7) or 0)
    zone = match.group(8)
    if zone not in "Zz":
        sign, hours, minutes = 1 if zone[0] == "+" else -1, int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"not a valid time zone offset: {text!r}")
        epoch -= sign * (hours * 3600 + minutes * 60)
    # Past the end of year 9999 (by rounding, or by an offset) no date can be written: the last second stands in.
    return min(epoch, LAST_EPOCH)


def format_time(epoch: Optional[float], zone: Any = timezone.utc) -> str:
    """2024-01-15 14:30:25 UTC, in the given time zone (UTC where that zone cannot write the moment)."""
    if epoch is None:
        return "unknown"
    epoch = max(FIRST_EPOCH, min(epoch, LAST_EPOCH))
    if zone is timezone.utc:  # the usual case, without a datetime; rounded to the microsecond as datetime does
        second = math.floor(epoch)
        second += round((epoch - second) * 1e6) // 1000000
        return "%04d-%02d-%02d %02d:%02d:%02d UTC" % time.gmtime(second)[:6]
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    with contextlib.suppress(OverflowError, ValueError):
        moment = moment.astimezone(zone)
    return f"{moment.year:04d}-{moment:%m-%d %H:%M:%S} {moment.tzname()}"


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 15m 5s, 3h 2m, 2d 4h; a negative one keeps its sign."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---------------------------------------------------------------------------
# Alertmanager webhooks: validation and the alert model
# ---------------------------------------------------------------------------

MAX_JSON_DEPTH = 32
MAX_JSON_VALUES = 250_000  # about 5,000 alerts of fifty labels and annotations each
KEY_LABELS = ("alertname", "severity", "service", "cluster")
# Labels kept whole when an alert's labels are clipped for storing: the thread key's, and what tells alerts apart.
KEPT_LABELS = KEY_LABELS + ("namespace", "instance")


MAX_KEY_LENGTH = 512


def bounded_key(key: str) -> str:
    """A store key of at most MAX_KEY_LENGTH characters: a longer one keeps its start and a digest of the whole."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return key[:MAX_KEY_LENGTH - 33] + "#" + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclasses.dataclass
class Alert:
    """One alert of a webhook, validated and normalised."""

    status: str
    labels: Dict[str, str]
    annotations: Dict[str, str]
    starts_at: Optional[float]
    ends_at: Optional[float]
    generator_url: str
    fingerprint: str
    labels_whole: bool = True  # False for a stored first alert whose labels were clipped
    grafana: bool = False  # sent by Grafana alerting: its silences are Grafana's, not Alertmanager's
    links: Dict[str, str] = dataclasses.field(default_factory=dict)  # Grafana's: silence, dashboard, panel, image
    value: str = ""  # Grafana's values (or valueString), as shown

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")


@dataclasses.dataclass
class Webhook:
    status: str
    group_key: str
    external_url: str
    receiver: str
    alerts: List[Alert]
    group_labels: Dict[str, str] = dataclasses.field(default_factory=dict)


class Template:
    """A message template: text with placeholders that take a value from the alert, nothing more.

    {{ labels.NAME }}, {{ annotations.NAME }} and {{ environment }} are
    replaced by that value; {{ a | b | "text" }} by the first that is not
    empty. A missing value renders empty. No code runs and no attribute can be
    reached: a placeholder is one of these names, or it is refused at start.
    """

    PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
    CHOICE = re.compile(r'\s*(?:"([^"{}]*)"|(labels|annotations)\.([A-Za-z_][A-Za-z0-9_]*)|(environment))\s*(\||$)')

    def __init__(self, setting: str, text: str) -> None:
        self.parts: List[Any] = []  # literal strings and lists of choices
        position = 0
        for match in self.PLACEHOLDER.finditer(text):
            self.parts.append(self._literal(setting, text[position:match.start()]))
            self.parts.append(self._choices(setting, match.group(1)))
            position = match.end()
        self.parts.append(self._literal(setting, text[position:]))

    @staticmethod
    def _literal(setting: str, text: str) -> str:
        if "{{" in text or "}}" in text:
            raise ConfigError(f"{setting}: unbalanced {{{{ or }}}} in {truncate(text, 60)!r}")
        return text

    def _choices(self, setting: str, inside: str) -> List[Tuple[str, str]]:
        if not inside.strip():
            raise ConfigError(f"{setting}: an empty {{{{ }}}}")
        choices, position = [], 0
        while position < len(inside):
            match = self.CHOICE.match(inside, position)
            if not match or match.end() == position:
                raise ConfigError(f"{setting}: {{{{{truncate(inside.strip(), 60)}}}}} is not a placeholder "
                                  '(use labels.NAME, annotations.NAME, environment or "text", joined by |)')
            literal, kind, name, environment, _ = match.groups()
            choices.append(("text", literal) if literal is not None else
                           ("environment", "") if environment else (kind, name))
            position = match.end()
        return choices

    def render(self, alert: "Alert", environment: str) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            for kind, name in part:
                value = (name if kind == "text" else environment if kind == "environment"
                         else (alert.labels if kind == "labels" else alert.annotations).get(name, ""))
                if value.strip():
                    out.append(value.strip())
                    break
        return "".join(out)


DEFAULT_TITLE = '{{ annotations.summary | annotations.message | annotations.title | labels.alertname | "Alert" }}'
DEFAULT_TEXT = "{{ annotations.description }}"


@dataclasses.dataclass(frozen=True)
class LabelMatcher:
    """name=value, name!=value, name=~regex or name!~regex, as Alertmanager's matchers."""

    name: str
    op: str
    value: str

    def matches(self, labels: Dict[str, str]) -> bool:
        value = labels.get(self.name, "")
        if self.op in ("=", "!="):
            return (value == self.value) == (self.op == "=")
        return bool(re.fullmatch(self.value, value)) == (self.op == "=~")


MENTION = re.compile(r"<!subteam\^[A-Z0-9]+>|<@[UW][A-Z0-9]+>|<!here>|<!channel>")


@dataclasses.dataclass(frozen=True)
class MentionRule:
    matchers: Tuple[LabelMatcher, ...]
    mentions: Tuple[str, ...]


def parse_mentions(text: str) -> Tuple[MentionRule, ...]:
    """MENTIONS: rules 'matcher[,matcher]:mention[ mention]' separated by ';'. Only Slack's mention syntax."""
    rules = []
    for rule in (r.strip() for r in text.split(";")):
        if not rule:
            continue
        matchers_text, colon, mentions_text = rule.rpartition(":")
        if not colon or not matchers_text.strip():
            raise ConfigError(f"MENTIONS: {truncate(rule, 80)!r} is not matcher:mention "
                              "(e.g. severity=critical:<!subteam^S0ONCALL>)")
        mentions = tuple(mentions_text.split())
        for mention in mentions:
            if not MENTION.fullmatch(mention):
                raise ConfigError(f"MENTIONS: {truncate(mention, 60)!r} is not a Slack mention (use <!subteam^ID>, "
                                  "<@USERID>, <!here> or <!channel>)")
        if not mentions:
            raise ConfigError(f"MENTIONS: {truncate(rule, 80)!r} names no one to mention (add <!subteam^ID> or "
                              "<@USERID>)")
        matchers = []
        for part in matchers_text.split(","):
            match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*", part)
            if not match:
                raise ConfigError(f"MENTIONS: {truncate(part, 60)!r} is not a matcher (use one like severity=critical)")
            name, op, value = match.groups()
            value = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
            if op in ("=~", "!~"):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ConfigError(f"MENTIONS: {truncate(value, 60)!r} is not a regular expression ({e})") from None
            matchers.append(LabelMatcher(name, op, value))
        rules.append(MentionRule(tuple(matchers), mentions))
    return tuple(rules)


# The transitions whose thread reply BROADCAST can also send to the channel.
BROADCASTS = ("new", "refire", "reopen", "resolve", "close")
# Labels a message does not show as fields unless MESSAGE_FIELDS names them: Prometheus's and the
# operator's own, and what the header and the context line show already.
DEFAULT_HIDDEN = ("alertname", "severity", "prometheus", "prometheus_replica", "endpoint", "uid", "job",
                  "grafana_folder")
# Where the default fields put the labels Kubernetes and node exporters carry, before the rest.
LABEL_ORDER = ("namespace", "pod", "container", "node", "deployment", "statefulset", "daemonset", "job_name",
               "persistentvolumeclaim", "device", "mountpoint", "fstype", "module", "reason")
LABEL_RANK = {name: rank for rank, name in enumerate(LABEL_ORDER)}


@dataclasses.dataclass(frozen=True)
class MessageSettings:
    """What a message shows and how: the settings the message builders take."""

    environment: str = "production"
    fields: Tuple[str, ...] = ()  # MESSAGE_FIELDS: labels in order; empty: the seed's, then the rest
    hidden: Tuple[str, ...] = DEFAULT_HIDDEN
    key_labels: Tuple[str, ...] = KEY_LABELS  # THREAD_KEY_LABELS; the thread key appends ENVIRONMENT
    by_namespace: bool = True  # THREAD_KEY_LABELS not set: an alert with a namespace label adds it to its key
    thread_by: str = "labels"  # or "group": one thread per Alertmanager group
    title: Template = dataclasses.field(default_factory=lambda: Template("TITLE_TEMPLATE", DEFAULT_TITLE))
    text: Template = dataclasses.field(default_factory=lambda: Template("TEXT_TEMPLATE", DEFAULT_TEXT))
    time_zone: Any = timezone.utc  # a tzinfo
    mentions: Tuple[MentionRule, ...] = ()
    broadcast: Tuple[str, ...] = ()
    interactive: bool = False  # Silence and Ack act from Slack (SLACK_SIGNING_SECRET): not plain links
    silence_durations: Tuple[Tuple[str, float], ...] = (("1h", 3600.0), ("4h", 14400.0), ("24h", 86400.0),
                                                        ("7d", 604800.0))

    def key_names(self, labels: Dict[str, str]) -> Tuple[str, ...]:
        """The labels that make the thread key of an alert with these labels: THREAD_KEY_LABELS, and by default
        its namespace when it has one (two namespaces never share a thread; the seed's alerts have none)."""
        if self.by_namespace and labels.get("namespace") and "namespace" not in self.key_labels:
            return self.key_labels + ("namespace",)
        return self.key_labels

    def thread_key(self, alert: Alert, group_key: str = "") -> str:
        """The seed's key by default, alertname|severity|service|cluster|ENVIRONMENT (or the group's); an alert
        with a namespace label: alertname|severity|service|cluster|namespace|ENVIRONMENT."""
        if self.thread_by == "group" and group_key:
            return bounded_key(f"group|{group_key}|{self.environment}")
        # A | or \ in a value is escaped, so that no value can make another alert's key (a | in a cluster
        # label and a namespace one part shorter); values without them give the seed's key exactly.
        return self._joined(alert, self.key_names(alert.labels), escape=True)

    def legacy_key(self, alert: Alert, group_key: str = "") -> Optional[str]:
        """The key this alert had before namespaces were part of it (1.1): its thread may still be open."""
        if self.thread_by == "group" and group_key or self.key_names(alert.labels) == self.key_labels:
            return None
        return self._joined(alert, self.key_labels, escape=False)  # as 1.1 wrote it: unescaped

    def _joined(self, alert: Alert, names: Sequence[str], escape: bool) -> str:
        parts = [alert.labels.get(name, "") for name in names]
        if escape:
            parts = [part.replace("\\", "\\\\").replace("|", "\\|") for part in parts]
        return bounded_key("|".join(parts + [self.environment]))

    def mentions_for(self, alerts: Iterable[Alert]) -> str:
        """Who to mention for these alerts: every rule whose matchers all match one of them, once each."""
        found: List[str] = []
        for alert in alerts:
            for rule in self.mentions:
                if all(m.matches(alert.labels) for m in rule.matchers):
                    found += [mention for mention in rule.mentions if mention not in found]
        return " ".join(found)


FNV64_OFFSET, FNV64_PRIME = 14695981039346656037, 1099511628211


def fnv1a64(data: bytes, value: int = FNV64_OFFSET) -> int:
    for byte in data:
        value = ((value ^ byte) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


def label_fingerprint(labels: Dict[str, str]) -> str:
    """Alertmanager's own fingerprint of a label set, for senders that leave it out.

    Prometheus' labelSetToFingerprint: FNV-1a 64 over the labels sorted by name,
    each name and value followed by a 0xff byte. Computing the same value means
    a curl-posted alert and the same alert from Alertmanager are one alert. FNV-1a runs
    byte by byte in Python: labels longer than any real alert's are hashed with SHA-256."""
    data = b"".join(name.encode() + b"\xff" + labels[name].encode() + b"\xff" for name in sorted(labels))
    if len(data) > 65536:
        return "s" + hashlib.sha256(data).hexdigest()[:15]
    return f"{fnv1a64(data):016x}"


def _json_depth_ok(value: Any, limit: int) -> bool:
    """No container nested deeper than limit (only containers are visited: labels are mostly strings)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate_path(value: Any, path: str) -> Optional[str]:
    """Where a JSON \\ud800-style escape left a string that is not valid Unicode, if anywhere."""
    if isinstance(value, str):
        return path.encode("utf-8", "backslashreplace").decode() if re.search("[\ud800-\udfff]", value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        where = f"{path}[{name}]" if isinstance(name, int) else (f"{path}.{name}" if path else str(name))
        if isinstance(name, str) and re.search("[\ud800-\udfff]", name):
            return where.encode("utf-8", "backslashreplace").decode()  # a message must be valid text itself
        found = _lone_surrogate_path(item, where)
        if found:
            return found
    return None


def read_document(body: bytes, content_type: Optional[str]) -> Dict[str, Any]:
    """The body as a JSON object, refused with the reason when it is not valid, plain JSON."""
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise BadRequest(f"Content-Type must be application/json, not {truncate(media_type, 60)!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8 (byte {e.start})") from None
    if text.startswith("\ufeff"):
        raise BadRequest("body is not valid JSON: it starts with a byte order mark (send UTF-8 without one)")
    # Parsed JSON takes far more memory than its text: a body of millions of tiny values is refused unread.
    if text.count(",") > MAX_JSON_VALUES:
        raise BadRequest(f"the webhook holds more than {MAX_JSON_VALUES:,} JSON values; send fewer alerts at a time "
                         "(Alertmanager's max_alerts)", 413)
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise BadRequest(f"body is not valid JSON: {truncate(str(e), 200)}") from None
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object with an 'alerts' list")
    # Nesting takes brackets: a body with fewer of them than the limit needs no walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and not _json_depth_ok(document, MAX_JSON_DEPTH):
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):  # only an escape can leave half a surrogate pair
        where = _lone_surrogate_path(document, "")
        if where:
            raise BadRequest(f"{truncate(where, 200)} is not valid Unicode (lone surrogate)")
    return document


def optional_string(container: Dict[str, Any], name: str, where: str) -> str:
    value = container.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{where}{name} must be a string")
    return value


def string_map(container: Dict[str, Any], name: str, where: str, required: bool = False) -> Dict[str, str]:
    value = container.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}{name} must be an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise BadRequest(f"{where}{name}.{truncate(k, 100)} must be a string")
    return value


def finite_number(value: Any) -> bool:
    """A JSON number a float can hold: not a bool, not 1e999, not an integer of hundreds of digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def grafana_value(raw: Dict[str, Any], where: str) -> str:
    """Grafana's evaluated values as a message shows them: values ("B=95.2, C=1"), else valueString."""
    values = raw.get("values")
    if values is not None:
        if not isinstance(values, dict) or not all(finite_number(v) for v in values.values()):
            raise BadRequest(f"{where}values must be an object of numbers")
        if values:
            return ", ".join(f"{name}={number:g}" for name, number in values.items())
    return optional_string(raw, "valueString", where)


def parse_alert(raw: Any, where: str, top_status: Optional[str], grafana: bool) -> Alert:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object")
    labels = string_map(raw, "labels", where + ".", required=True)
    annotations = string_map(raw, "annotations", where + ".")
    status = raw.get("status", top_status)
    if status not in ("firing", "resolved"):
        raise BadRequest(f"{where}.status must be 'firing' or 'resolved'")
    times: Dict[str, Optional[float]] = {}
    for name in ("startsAt", "endsAt"):
        value = raw.get(name)
        if value is None or value == "":
            times[name] = None
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{where}.{name} must be an RFC 3339 time string")
        try:
            times[name] = parse_time(value)
        except ValueError:
            raise BadRequest(f"{where}.{name} must be an RFC 3339 time like 2024-01-15T14:30:25Z") from None
    fingerprint = optional_string(raw, "fingerprint", where + ".")
    if len(fingerprint) > 128:
        raise BadRequest(f"{where}.fingerprint is longer than 128 characters")
    links = {name: optional_string(raw, field, where + ".") for name, field in GRAFANA_LINKS}
    return Alert(status=status, labels=labels, annotations=annotations, starts_at=times["startsAt"],
                 ends_at=times["endsAt"],
                 generator_url=without_credentials(optional_string(raw, "generatorURL", where + ".")),
                 fingerprint=fingerprint or label_fingerprint(labels), grafana=grafana,
                 links={name: without_credentials(url) for name, url in links.items() if url},
                 value=grafana_value(raw, where + ".") if grafana else "")


# Grafana alerting's own links, per alert: what each becomes in a message.
GRAFANA_LINKS = (("silence", "silenceURL"), ("dashboard", "dashboardURL"), ("panel", "panelURL"),
                 ("image", "imageURL"))


def parse_webhook(body: bytes, content_type: Optional[str] = "application/json") -> Webhook:
    """Validate an Alertmanager (or Grafana alerting) webhook body; BadRequest names the first offending field.

    content_type None (a file, for render) is not checked; anything but JSON, or none, is refused.

    Fields neither uses are ignored (Alertmanager 0.32+'s notification_reason, 0.34's routeLabels)."""
    document = read_document(body, content_type)
    top_status = document.get("status")
    if top_status is not None and top_status not in ("firing", "resolved"):
        raise BadRequest("status must be 'firing' or 'resolved'")
    raw_alerts = document.get("alerts")
    if not isinstance(raw_alerts, list):
        raise BadRequest("alerts must be a list")
    # Grafana's webhook contact point: version "1" and an orgId (Alertmanager's is version "4").
    grafana = document.get("version") == "1" or "orgId" in document
    alerts = [parse_alert(raw, f"alerts[{i}]", top_status, grafana) for i, raw in enumerate(raw_alerts)]
    status = top_status or ("firing" if any(a.status == "firing" for a in alerts) else "resolved")
    return Webhook(status=status, group_key=optional_string(document, "groupKey", ""),
                   external_url=without_credentials(optional_string(document, "externalURL", "")),
                   receiver=optional_string(document, "receiver", ""), alerts=alerts,
                   group_labels=string_map(document, "groupLabels", ""))


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus-style duration: 90, 90s, 30m, 1h30m, 7d, 250ms."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 30m, 1h, 7d)")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def default_store_file(environ: Dict[str, str]) -> str:
    """systemd's StateDirectory, else /var/lib/alert-threader if writable, else ./threads.json."""
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return os.path.join(state_dir, "threads.json")
    system_dir = "/var/lib/alert-threader"
    if os.path.isdir(system_dir) and os.access(system_dir, os.W_OK):
        return os.path.join(system_dir, "threads.json")
    return os.path.abspath("threads.json")


# (variable, default, help); the flag is the variable in lower case with dashes.
SETTINGS: Tuple[Tuple[str, Optional[str], str], ...] = (
    ("SLACK_BOT_TOKEN", None, "Slack bot token (xoxb-...); none means dry-run mode"),
    ("SLACK_BOT_TOKEN_FILE", None, "read the Slack bot token from this file"),
    ("DRY_RUN", "false", "true: post nothing, log each payload and show it on /preview, unpaced (a token is still "
                         "checked at start); without a token the service always runs dry"),
    ("SLACK_CHANNEL", None, "default Slack channel ID (C0123456789)"),
    ("SLACK_CHANNELS", None, "comma-separated channels allowed for ?channel= (default: SLACK_CHANNEL)"),
    ("ENVIRONMENT", "production", "shown in messages and part of the thread key"),
    ("THREAD_STORE", "file", "where thread state lives: file or redis"),
    ("THREAD_STORE_FILE", None,
     "file store path (default $STATE_DIRECTORY/threads.json, /var/lib/alert-threader/threads.json, ./threads.json)"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0",
     "redis://[:PASSWORD@]HOST:PORT/DB, rediss:// (TLS), unix:///path/redis.sock?db=0, or through Sentinel: "
     "redis+sentinel://[:PASSWORD@]HOST:26379,HOST:26379,HOST:26379/SERVICE/DB (rediss+sentinel:// for TLS)"),
    ("SENTINEL_PASSWORD", None, "the Sentinels' own password, when it differs from the data password (or "
                                "?sentinel_password= in REDIS_URL)"),
    ("SENTINEL_PASSWORD_FILE", None, "read the Sentinels' password from this file"),
    ("REDIS_MIN_REPLICAS_ACK", "auto", "replicas that must hold an alert before its webhook is answered 200 "
                                       "(WAIT); auto: 1 when the primary has replicas, else 0"),
    ("REDIS_KEY_PREFIX", "threader:ts", "Redis keys are PREFIX:THREAD_KEY"),
    ("HOST", "0.0.0.0", "listen address"),
    ("PORT", "9009", "listen port (0 picks a free one)"),
    ("SLACK_API_URL", "https://slack.com/api/", "Slack Web API base URL"),
    ("WEBHOOK_TOKEN", None, "bearer token required on POST /alert, /cache and /preview"),
    ("WEBHOOK_TOKEN_FILE", None, "read the webhook token from this file"),
    ("REOPEN_WINDOW", "30m", "a key firing again this soon after its thread closed reopens it (0 disables)"),
    ("STORM_THRESHOLD", "10", "more new threads than this waiting for one channel, or arriving within STORM_WINDOW: "
                              "new alerts join the channel's storm digest"),
    ("STORM_WINDOW", "60s", "the window STORM_THRESHOLD counts arriving new threads in"),
    ("THREAD_RETENTION", "24h", "how long closed threads are kept (for dedupe and reopen)"),
    ("SLACK_TIMEOUT", "10s", "timeout of one Slack API call"),
    ("DELIVERY_WAIT", "2s", "longest a webhook's answer waits for its alerts to reach Slack; after it they are "
                            "answered \"queued\" and delivered from the outbox"),
    ("OUTBOX_LIMIT", "20000", "alerts waiting for Slack, all channels together, past which webhooks get 503"),
    ("SLACK_PACE", "1s", "least time between two messages to one channel (Slack allows about one a second, with "
                         "short bursts); edits get 50 a minute at 1s. 0 turns pacing off"),
    ("MAX_BODY_BYTES", "8388608", "largest webhook body accepted (413 past it)"),
    ("MAX_CONNECTIONS", "256", "concurrent connections served (503 past it); a storm holds one per Alertmanager group"),
    ("CLIENT_TIMEOUT", "30s", "how long a client may stay silent, idle or mid-request, before it is dropped"),
    ("SHUTDOWN_TIMEOUT", "20s", "on SIGTERM, how long in-flight webhooks may take to finish"),
    ("ALERTMANAGER_URL", None, "Alertmanager URL for Silence links (default: the webhook's externalURL); "
                               "where silences from Slack go (required with SLACK_SIGNING_SECRET)"),
    ("SLACK_SIGNING_SECRET", None, "the Slack app's signing secret: turns Silence and Ack in Slack on (POST "
                                   "/slack/actions)"),
    ("SLACK_SIGNING_SECRET_FILE", None, "read the signing secret from this file"),
    ("ALERTMANAGER_AUTH", None, "credentials for Alertmanager's API: user:password (basic auth) or 'Bearer TOKEN'"),
    ("ALERTMANAGER_AUTH_FILE", None, "read Alertmanager's credentials from this file"),
    ("SILENCE_DURATIONS", "1h,4h,24h,7d", "the durations a Silence menu in Slack offers"),
    ("THREAD_KEY_LABELS", ",".join(KEY_LABELS), "labels that make the thread key (ENVIRONMENT is appended); "
                          "unset, an alert with a namespace label also has it in its key"),
    ("THREAD_BY", "labels", "labels: a thread per thread key; group: a thread per Alertmanager group (groupKey)"),
    ("MESSAGE_FIELDS", None, "comma-separated labels shown as fields, in order (default: severity, environment, "
                             "service, cluster, instance when present, then the alert's other labels; a Kubernetes "
                             "workload's namespace, pod, ... first, its exporter's labels left out); value: "
                             "Grafana's value"),
    ("HIDDEN_LABELS", ", ".join(DEFAULT_HIDDEN), "labels the default fields leave out (none: leave out none)"),
    ("TITLE_TEMPLATE", DEFAULT_TITLE, "the title: {{ labels.NAME }}, {{ annotations.NAME }}, {{ environment }}, "
                                      '{{ a | b | "text" }} for the first that is not empty'),
    ("TEXT_TEMPLATE", DEFAULT_TEXT, "the description, in the same syntax"),
    ("TIME_ZONE", "UTC", "IANA time zone of the times written out (Slack shows each reader their own)"),
    ("MENTIONS", None, "who a new or reopened thread mentions: matcher[,matcher]:mention;... e.g. "
                       "severity=critical:<!subteam^S0ONCALL>;team=db:<@U012AB3CD>"),
    ("BROADCAST", None, "thread replies also sent to the channel: any of new, refire, reopen, resolve, close"),
    ("LOG_LEVEL", "info", "debug, info, warning or error"),
    ("LOG_FORMAT", "text", "text or json"),
)

SECRET_SETTINGS = frozenset({"SLACK_BOT_TOKEN", "WEBHOOK_TOKEN", "SLACK_SIGNING_SECRET", "ALERTMANAGER_AUTH",
                             "SENTINEL_PASSWORD"})


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings, read once at start-up and passed explicitly."""

    slack_bot_token: Optional[str] = dataclasses.field(default=None, repr=False)
    slack_channel: Optional[str] = None
    slack_channels: Tuple[str, ...] = ()
    environment: str = "production"
    thread_store: str = "file"
    thread_store_file: str = "threads.json"
    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6379/0", repr=False)
    sentinel_password: Optional[str] = dataclasses.field(default=None, repr=False)
    redis_min_acks: Optional[int] = None  # REDIS_MIN_REPLICAS_ACK; None: auto
    redis_key_prefix: str = "threader:ts"
    host: str = "0.0.0.0"
    port: int = 9009
    slack_api_url: str = "https://slack.com/api/"
    webhook_token: Optional[str] = dataclasses.field(default=None, repr=False)
    slack_signing_secret: Optional[str] = dataclasses.field(default=None, repr=False)
    alertmanager_auth: Optional[str] = dataclasses.field(default=None, repr=False)  # an Authorization value
    reopen_window: float = 1800.0
    storm_threshold: int = 10
    storm_window: float = 60.0
    thread_retention: float = 86400.0
    slack_timeout: float = 10.0
    delivery_wait: float = 2.0
    outbox_limit: int = 20000
    slack_pace: float = 1.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_connections: int = 256
    # Not settings: a Redis lease on a thread covers one record's read, change and write (a click's, or a
    # sender's); a channel's sender holds a lease of its own, renewed every second, that another replica takes
    # over once its holder is gone.
    redis_lease: float = 30.0
    sender_lease: float = 5.0
    client_timeout: float = 30.0
    shutdown_timeout: float = 20.0
    alertmanager_url: Optional[str] = None
    messages: MessageSettings = dataclasses.field(default_factory=MessageSettings)
    log_level: str = "info"
    log_format: str = "text"

    dry_run_asked: bool = False  # DRY_RUN=true: post nothing, even with a token

    @property
    def dry_run(self) -> bool:
        return self.dry_run_asked or not self.slack_bot_token

    @property
    def interactive(self) -> bool:
        return bool(self.slack_signing_secret)

    def secrets(self) -> List[str]:
        auth = self.alertmanager_auth or ""
        kind, _, credential = auth.partition(" ")
        plain = base64.b64decode(credential).decode(errors="replace") if kind == "Basic" else ""
        return [s for s in (self.slack_bot_token, self.webhook_token, self.slack_signing_secret, auth, credential,
                            plain, plain.partition(":")[2], *redis_passwords(self.redis_url),
                            self.sentinel_password) if s]


QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)(?:sentinel_)?password=)([^&]*)")


def sentinel_url_secrets(url: str) -> List[str]:
    """The passwords a redis+sentinel:// URL carries, as written: its userinfo's, and every query value (only
    sentinel_password is read, but a value is never shown whatever its name)."""
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")  # a / or ? in an unencoded password is still its (more is no harm)
    found = [userinfo.partition(":")[2]] if at else []
    found += [part.partition("=")[2] for part in re.split(r"[?&#]", rest)[1:] if "=" in part]
    return [value for value in found if value]


def redis_passwords(url: str) -> List[str]:
    """Every form in which a Redis URL carries a password (user:pw@ and ?password=), raw and decoded."""
    if url.startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES)):
        found = sentinel_url_secrets(url)
        return found + [urllib.parse.unquote(p) for p in found]
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password] if password else []
    found += [match.group(2) for match in QUERY_PASSWORD.finditer(parts.query) if match.group(2)]
    return found + [urllib.parse.unquote(p) for p in found]


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs, endpoints and check."""
    if url.startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES)):
        for secret in sorted(sentinel_url_secrets(url), key=len, reverse=True):
            url = url.replace(secret, "***")
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a malformed URL)"
    if password is not None:
        user, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    parts = parts._replace(query=QUERY_PASSWORD.sub(lambda m: m.group(1) + "***", parts.query))
    redacted = urllib.parse.urlunsplit(parts)
    if not parts.netloc and url.startswith(parts.scheme + "://"):  # unix:///path: urlunsplit drops the //
        redacted = parts.scheme + "://" + redacted[len(parts.scheme) + 1:]
    return redacted


def flag_name(variable: str) -> str:
    return "--" + variable.lower().replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each flag wins over its environment variable)")
    for variable, default, help_text in SETTINGS:
        shown = "" if default is None or variable in SECRET_SETTINGS else f" (default: {default})"
        if variable in SECRET_SETTINGS:
            shown = f" (as a variable only: the flag is refused, use {flag_name(variable + '_FILE')})"
        group.add_argument(flag_name(variable), dest=variable, metavar="VALUE",
                           help=f"{variable}: {help_text}{shown}")


def _read_secret_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{variable}: cannot read {path}: {e.strerror} (the service's user must be able to "
                          "read it)") from None
    if not value:
        raise ConfigError(f"{variable}: {path} is empty (write the secret into it)")
    return value


def check_channel_id(variable: str, channel: str) -> None:
    """Slack takes a channel's name for posting but only its ID for edits and reactions: IDs only."""
    if re.fullmatch(r"[A-Z0-9][A-Z0-9_-]{1,79}", channel):
        return
    if channel.startswith("xox"):  # never echoed: it is a secret
        raise ConfigError(f"{variable}: this is a Slack token, not a channel ID (give the channel's ID, like "
                          "C0123456789; the token goes in SLACK_BOT_TOKEN)")
    if re.fullmatch(r"[cgd][a-z0-9]{8,}", channel) and re.search(r"[0-9]", channel):
        raise ConfigError(f"{variable}: {channel!r} looks like a channel ID in lower case (write it as Slack shows "
                          f"it: {channel.upper()})")
    if re.fullmatch(r"#?[a-z0-9][a-z0-9._-]{0,79}", channel):
        raise ConfigError(f"{variable}: {channel!r} is a channel name; give its ID instead (in Slack: the channel's "
                          "name > About, at the bottom: Channel ID, like C0123456789)")
    raise ConfigError(f"{variable}: {truncate(channel, 40)!r} is not a channel ID (use one like C0123456789)")


class RawSettings:
    """The settings as given: each flag, else its environment variable, else its default; read and checked."""

    def __init__(self, args: argparse.Namespace, environ: Dict[str, str]) -> None:
        self.args, self.environ = args, environ
        self.values: Dict[str, Optional[str]] = {}
        for variable, default, _ in SETTINGS:
            flag_value = getattr(args, variable, None)
            value = flag_value if flag_value is not None else environ.get(variable)
            self.values[variable] = value if value not in (None, "") else default

    def __getitem__(self, variable: str) -> Optional[str]:
        return self.values[variable]

    def given(self, variable: str) -> bool:
        """Was this setting given (a flag or a non-empty variable), rather than left at its default?"""
        return getattr(self.args, variable, None) is not None or bool(self.environ.get(variable))

    def text(self, variable: str) -> str:
        return self.values[variable] or ""

    def number(self, variable: str, low: float, high: float, integer: bool = False) -> Any:
        text = self.text(variable)
        try:
            value = int(text) if integer else parse_duration(text)
        except ValueError:
            fix = f"a whole number within {low}..{high}" if integer else "a duration such as 30s or 5m"
            raise ConfigError(f"{variable}: {truncate(text, 40)!r} is not {'an integer' if integer else 'a duration'} "
                              f"(use {fix})") from None
        if not low <= value <= high:
            bounds = f"{low}..{high}" if integer else f"{low:g}s..{high:g}s"
            raise ConfigError(f"{variable}: {text} is out of range (use a value within {bounds})")
        return value

    def choice(self, variable: str, options: Sequence[str]) -> str:
        value = self.text(variable).lower()
        if value not in options:
            raise ConfigError(f"{variable}: {truncate(self.text(variable), 40)!r} is not a choice (use "
                              f"{', '.join(options[:-1])} or {options[-1]})")
        return value

    def redis_url(self) -> str:
        url = self.text("REDIS_URL")
        if getattr(self.args, "REDIS_URL", None) is not None and redis_passwords(url):
            raise ConfigError("--redis-url: a password on the command line is visible to every user in ps; put "
                              "REDIS_URL in the environment (the unit's env file) instead")
        return url

    def secret(self, variable: str) -> Optional[str]:
        """A secret from its variable or its _FILE; as a flag it is refused (every user sees it in ps)."""
        if getattr(self.args, variable, None) is not None:
            raise ConfigError(f"{flag_name(variable)}: a secret on the command line is visible to every user in ps; "
                              f"use {flag_name(variable + '_FILE')} FILE, or the {variable}_FILE or {variable} "
                              "variable")
        path = self.values.get(variable + "_FILE")
        if path:
            if self.values[variable]:
                raise ConfigError(f"{variable}: set as well as {variable}_FILE (set one of them, not both)")
            return _read_secret_file(variable + "_FILE", path)
        return self.values[variable]


def channel_settings(raw: RawSettings, token: Optional[str]) -> Tuple[Optional[str], Tuple[str, ...]]:
    """The default channel and every channel ?channel= may name (the default one included)."""
    channel = raw["SLACK_CHANNEL"]
    if channel:
        check_channel_id("SLACK_CHANNEL", channel)
    if not channel and token:
        raise ConfigError("SLACK_CHANNEL: not set, and SLACK_BOT_TOKEN is (set it to the channel's ID, like "
                          "C0123456789)")
    channels = tuple(c.strip() for c in raw.text("SLACK_CHANNELS").split(",") if c.strip())
    for c in channels:
        check_channel_id("SLACK_CHANNELS", c)
    if channel and channel not in channels:
        channels = (channel,) + channels
    return channel, channels


def store_settings(raw: RawSettings, environ: Dict[str, str]) -> Dict[str, Any]:
    store = raw.text("THREAD_STORE").lower()
    if store not in ("file", "redis"):
        raise ConfigError(f"THREAD_STORE: {truncate(raw.text('THREAD_STORE'), 40)!r} is unknown (use file or redis)")
    store_file = raw.text("THREAD_STORE_FILE") or default_store_file(environ)
    if store == "file":
        directory = os.path.dirname(os.path.abspath(store_file))
        if not os.path.isdir(directory):
            raise ConfigError(f"THREAD_STORE_FILE: directory {directory} does not exist (create it, or name "
                              "another file)")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"THREAD_STORE_FILE: directory {directory} is not writable (give the service's user "
                              "write access, or name another file)")
        for path in (store_file, f"{store_file}.journal"):
            refuse_unless_file(path)
    redis_url = raw.redis_url()
    try:
        parts = urllib.parse.urlsplit(redis_url)
        if parts.scheme not in SENTINEL_SCHEMES:  # several HOST:PORT, read by parse_sentinel_url
            parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError("REDIS_URL: cannot be read: a port that is no number, or not a URL at all (the form is "
                          "redis://[[USER]:PASSWORD@]HOST:PORT/DB)") from None
    if parts.scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(redis_url)
        except ValueError as e:
            raise ConfigError(f"REDIS_URL: {e} (the form is redis+sentinel://[[USER]:PASSWORD@]HOST:26379,"
                              "HOST:26379/SERVICE/DB)") from None
    elif parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ConfigError("REDIS_URL: not a Redis URL (use redis://[:password@]host:port/db, rediss://..., "
                          "unix:///path or redis+sentinel://HOST:26379,.../SERVICE/DB)")
    else:
        check_redis_url(redis_url)
    acks = raw.text("REDIS_MIN_REPLICAS_ACK").strip().lower()
    if acks != "auto" and not (acks.isdigit() and int(acks) <= 16):
        raise ConfigError(f"REDIS_MIN_REPLICAS_ACK: {truncate(acks, 20)!r} is not a count (use auto, 0 to refuse "
                          "no webhook for want of a replica, or 1..16)")
    prefix = raw.text("REDIS_KEY_PREFIX")
    if not prefix or any(c in prefix for c in "*?[] "):
        raise ConfigError("REDIS_KEY_PREFIX: empty, or with spaces or glob characters (use a name like alert-thread)")
    return {"thread_store": store, "thread_store_file": os.path.abspath(store_file), "redis_url": redis_url,
            "redis_key_prefix": prefix, "redis_min_acks": None if acks == "auto" else int(acks),
            "sentinel_password": raw.secret("SENTINEL_PASSWORD")}


def refuse_unless_file(path: str) -> None:
    """The store's files are replaced by rename: a directory, a symbolic link or a device in their place would
    be replaced too, so the service refuses to start rather than touch what it did not create."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        problem = "is a symbolic link (a new snapshot would replace the link): name its target instead"
    elif os.path.isdir(path):
        problem = (f"is a directory: name a file, e.g. {os.path.join(path, 'threads.json')}, or leave the setting "
                   "unset for /var/lib/alert-threader/threads.json")
    elif not os.path.isfile(path):
        problem = "is not a regular file: name a new file"
    else:
        return
    raise ConfigError(f"THREAD_STORE_FILE: {path} {problem} (nothing was changed)")


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclasses.dataclass(frozen=True)
class SentinelTarget:
    """A redis+sentinel:// URL, read: the Sentinels to ask, the primary's service name, and how to reach it."""

    sentinels: Tuple[Tuple[str, int], ...]
    service: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    sentinel_password: Optional[str] = None
    tls: bool = False


SENTINELS_MAX = 16


def parse_sentinel_url(url: str) -> SentinelTarget:
    """redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT],HOST[:PORT]/SERVICE[/DB][?sentinel_password=...]; raises
    ValueError saying what is wrong, in words that quote nothing a password could be part of."""
    if "#" in url:
        raise ValueError("a # must be written %23 (in a password too)")
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    sentinels = []
    for number, host in enumerate((h.strip() for h in hosts.split(",")), 1):
        if host.startswith("["):  # [IPv6]:PORT
            name, _, port = host[1:].partition("]")
            port = port[1:] if port.startswith(":") else ("x" if port else "")
        else:
            name, _, port = host.partition(":") if host.count(":") <= 1 else ("", "", "")
        digits = port.isascii() and port.isdigit()
        if not name or "@" in name or (port and not digits) or not 0 < int(port if digits else 26379) < 65536:
            raise ValueError(f"Sentinel {number}'s HOST[:PORT] cannot be read (an IPv6 address goes in [ ], and "
                             "/ ? # @ in a password must be %-encoded)")
        sentinels.append((name, int(port if digits else 26379)))
    if len(sentinels) > SENTINELS_MAX:
        raise ValueError(f"more than {SENTINELS_MAX} Sentinels")
    parts = path.split("/")
    if not parts[0]:
        raise ValueError("no service name: the path names the primary as Sentinel knows it (sentinel monitor NAME)")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] and not (parts[1].isascii() and parts[1].isdigit()
                                                                and int(parts[1]) < 1 << 16)):
        raise ValueError("the database is not a number")
    options = [option.partition("=") for option in query.split("&") if option]
    if any(name != "sentinel_password" or not eq for name, eq, _ in options) or len(options) > 1:
        raise ValueError("the only option is sentinel_password=, once (its name written as is)")
    unquote = urllib.parse.unquote
    return SentinelTarget(tuple(sentinels), unquote(parts[0]), int(parts[1]) if len(parts) == 2 and parts[1] else 0,
                          unquote(username) or None, unquote(password) or None,
                          unquote(options[0][2]) if options else None, scheme == "rediss+sentinel")


def check_redis_url(url: str) -> None:
    """REDIS_URL as redis-py will read it: its refusals at start, in one line (and a database that is no number,
    which it would ignore)."""
    try:
        from redis.connection import parse_url
    except ImportError:  # the file store needs no redis package; the Redis store says so itself
        return
    try:
        parse_url(url)
        database = url.split("?", 1)[0].split("/", 3)[3:] if url.startswith(("redis://", "rediss://")) else []
        if database and database[0] and not database[0].isdigit():
            raise ValueError(f"the database {database[0][:40]!r} is not a number")
    except (ValueError, TypeError) as e:  # redis-py's words may quote a piece of a password: not then
        detail = "it cannot be read (in a password, / ? # @ must be %-encoded)" if "@" in url else str(e)
        raise ConfigError(f"REDIS_URL: {detail} (the form is redis://[[USER]:PASSWORD@]HOST:PORT/DB, DB a "
                          "number)") from None


def has_port_or_none(url: str) -> bool:
    """Does the URL read, its port (if any) a number within 1..65535? urlsplit raises on both, later."""
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - raises ValueError on a bad port or a broken [IPv6]
    except ValueError:
        return False
    return True


def url_settings(raw: RawSettings) -> Dict[str, Any]:
    api_url = raw.text("SLACK_API_URL")
    if not is_http_url(api_url) or not has_port_or_none(api_url):
        raise ConfigError(f"SLACK_API_URL: {shown_url(api_url)} is not an http(s) URL (the default is "
                          "https://slack.com/api/)")
    am_url = raw["ALERTMANAGER_URL"]
    if am_url and not (is_http_url(am_url) and has_port_or_none(am_url)):
        raise ConfigError(f"ALERTMANAGER_URL: {shown_url(am_url)} is not an http(s) URL (like "
                          "http://alertmanager:9093)")
    if am_url and urllib.parse.urlsplit(am_url).query:
        raise ConfigError("ALERTMANAGER_URL: carries a query string, which would show in every Silence link and "
                          "log line (put credentials in ALERTMANAGER_AUTH or ALERTMANAGER_AUTH_FILE)")
    if am_url and "@" in urllib.parse.urlsplit(am_url).netloc:
        raise ConfigError("ALERTMANAGER_URL: carries credentials, which would show in every Silence link (put "
                          "them in ALERTMANAGER_AUTH or ALERTMANAGER_AUTH_FILE)")
    if raw["SLACK_SIGNING_SECRET"] or raw["SLACK_SIGNING_SECRET_FILE"]:
        if not am_url:
            raise ConfigError("SLACK_SIGNING_SECRET: set without ALERTMANAGER_URL (set it: silences from Slack go to "
                              "the Alertmanager you name, never to an address a webhook claims)")
    return {"slack_api_url": api_url if api_url.endswith("/") else api_url + "/", "alertmanager_url": am_url}


def label_list(raw: RawSettings, variable: str) -> Tuple[str, ...]:
    names = tuple(n.strip() for n in raw.text(variable).split(",") if n.strip())
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{variable}: {truncate(name, 60)!r} is not a label name (letters, digits and _, "
                              "comma-separated)")
    return names


def silence_durations(raw: RawSettings) -> Tuple[Tuple[str, float], ...]:
    durations = []
    for text in (d.strip() for d in raw.text("SILENCE_DURATIONS").split(",") if d.strip()):
        try:
            seconds = parse_duration(text)
        except ValueError:
            raise ConfigError(f"SILENCE_DURATIONS: {truncate(text, 30)!r} is not a duration such as 4h or 7d") from None
        if not 60 <= seconds <= 366 * 86400:
            raise ConfigError(f"SILENCE_DURATIONS: {text} is too short or too long (use 1m to 366d)")
        durations.append((text, seconds))
    if not 1 <= len(durations) <= 10:
        raise ConfigError("SILENCE_DURATIONS: none, or more than 10 (name 1 to 10 durations, e.g. 1h,4h,24h,7d)")
    return tuple(durations)


def alertmanager_auth(raw: RawSettings) -> Optional[str]:
    """The Authorization header value for Alertmanager's API, from ALERTMANAGER_AUTH (or its file)."""
    value = (raw.secret("ALERTMANAGER_AUTH") or "").strip()
    if not value:
        return None
    if value.lower().startswith("bearer "):
        return "Bearer " + value[7:].strip()
    if ":" not in value or "\n" in value:
        raise ConfigError("ALERTMANAGER_AUTH: not credentials (put user:password or 'Bearer TOKEN' on one line, in "
                          "the variable or its file)")
    return "Basic " + base64.b64encode(value.encode()).decode()


def message_settings(raw: RawSettings, environment: str, interactive: bool) -> MessageSettings:
    key_labels = label_list(raw, "THREAD_KEY_LABELS")
    if not key_labels:
        raise ConfigError("THREAD_KEY_LABELS: names no label (name at least one; the default is alertname,severity,"
                          "service,cluster)")
    zone_name = raw.text("TIME_ZONE")
    try:
        zone = zoneinfo.ZoneInfo(zone_name) if zone_name not in ("UTC", "utc", "Z") else timezone.utc
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"TIME_ZONE: {truncate(zone_name, 40)!r} is not a time zone this machine knows (an IANA "
                          "name like Europe/Berlin; Debian's tzdata package holds them)") from None
    broadcast = tuple(b.strip().lower() for b in raw.text("BROADCAST").split(",") if b.strip())
    for name in broadcast:
        if name not in BROADCASTS:
            raise ConfigError(f"BROADCAST: {truncate(name, 40)!r} is not a transition (use {', '.join(BROADCASTS)})")
    return MessageSettings(
        environment=environment, fields=label_list(raw, "MESSAGE_FIELDS"),
        hidden=() if raw.text("HIDDEN_LABELS").strip().lower() == "none" else label_list(raw, "HIDDEN_LABELS"),
        key_labels=key_labels, by_namespace=not raw.given("THREAD_KEY_LABELS"),
        thread_by=raw.choice("THREAD_BY", ("labels", "group")),
        title=Template("TITLE_TEMPLATE", raw.text("TITLE_TEMPLATE")),
        text=Template("TEXT_TEMPLATE", raw.text("TEXT_TEMPLATE")), time_zone=zone,
        mentions=parse_mentions(raw.text("MENTIONS")), broadcast=broadcast,
        interactive=interactive, silence_durations=silence_durations(raw))


def load_config(args: argparse.Namespace, environ: Dict[str, str]) -> Config:
    """Settings from flags (winning) and the environment, validated; raises ConfigError."""
    raw = RawSettings(args, environ)
    token, webhook_token = raw.secret("SLACK_BOT_TOKEN"), raw.secret("WEBHOOK_TOKEN")
    signing_secret = raw.secret("SLACK_SIGNING_SECRET")
    if signing_secret and (len(signing_secret) < 16 or not signing_secret.isprintable() or " " in signing_secret):
        raise ConfigError("SLACK_SIGNING_SECRET: not a signing secret (copy the app's from Basic Information > App "
                          "Credentials: 16 or more printable characters)")
    if token and not re.fullmatch(r"xox[a-z]-[A-Za-z0-9-]+", token):
        raise ConfigError("SLACK_BOT_TOKEN: not a Slack token (use the bot token, xoxb-..., from OAuth & Permissions)")
    if webhook_token and (len(webhook_token) < 16 or not webhook_token.isprintable() or " " in webhook_token):
        raise ConfigError("WEBHOOK_TOKEN: too short or with spaces (use 16 or more printable characters, e.g. "
                          "openssl rand -hex 32)")
    channel, channels = channel_settings(raw, token)
    environment = raw.text("ENVIRONMENT")
    if not environment or "|" in environment or not environment.isprintable():
        raise ConfigError("ENVIRONMENT: empty, unprintable or with '|' (use a name like production)")
    slack_timeout = raw.number("SLACK_TIMEOUT", 0.1, 300)
    dry_run = raw.text("DRY_RUN").strip().lower()
    if dry_run not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        raise ConfigError(f"DRY_RUN: {truncate(dry_run, 20)!r} is not true or false (use 1 or 0)")
    return Config(
        dry_run_asked=dry_run in ("true", "1", "yes", "on"), slack_bot_token=token, slack_channel=channel,
        slack_channels=channels, environment=environment,
        host=raw.text("HOST"), port=raw.number("PORT", 0, 65535, integer=True), webhook_token=webhook_token,
        slack_signing_secret=signing_secret, alertmanager_auth=alertmanager_auth(raw),
        reopen_window=raw.number("REOPEN_WINDOW", 0, 30 * 86400),
        storm_threshold=raw.number("STORM_THRESHOLD", 1, 100000, integer=True),
        storm_window=raw.number("STORM_WINDOW", 1, 86400),
        thread_retention=raw.number("THREAD_RETENTION", 60, 365 * 86400),
        slack_timeout=slack_timeout, redis_lease=2 * slack_timeout + 10,
        slack_pace=raw.number("SLACK_PACE", 0, 60), delivery_wait=raw.number("DELIVERY_WAIT", 0, 60),
        outbox_limit=raw.number("OUTBOX_LIMIT", 1, 10_000_000, integer=True),
        max_body_bytes=raw.number("MAX_BODY_BYTES", 1024, 1 << 30, integer=True),
        max_connections=raw.number("MAX_CONNECTIONS", 1, 10000, integer=True),
        client_timeout=raw.number("CLIENT_TIMEOUT", 0.1, 3600),
        shutdown_timeout=raw.number("SHUTDOWN_TIMEOUT", 0, 3600),
        messages=message_settings(raw, environment, bool(signing_secret)),
        log_level=raw.choice("LOG_LEVEL", ("debug", "info", "warning", "error")),
        log_format=raw.choice("LOG_FORMAT", ("text", "json")),
        **store_settings(raw, environ), **url_settings(raw))


# ---------------------------------------------------------------------------
# Logging and metrics
# ---------------------------------------------------------------------------

def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Last line of defence: no secret leaves through a log record."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def _redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        fields = getattr(record, "fields", None) or {}
        if any(s in message for s in self.secrets) or any(s in str(v) for v in fields.values() for s in self.secrets):
            record.msg, record.args = self._redact(message), None
            record.fields = {k: self._redact(v) if isinstance(v, str) else v for k, v in fields.items()}
            record.event = self._redact(getattr(record, "event", ""))
        if record.exc_info:  # a traceback's messages too (what an exception quotes is not ours to choose)
            text = logging.Formatter().formatException(record.exc_info)
            if any(s in text for s in self.secrets):
                record.exc_text, record.exc_info = self._redact(text), None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "message": getattr(record, "event", None) or record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(config: Config, stream: Any = None) -> logging.Handler:
    """One handler on our logger; journald adds timestamps itself, so we add none there."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(config.secrets()))
    # No line shows a thread's or a process's name (the logging HOWTO's "Optimization"): records skip them.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(config.log_level.upper())
    log.propagate = False
    return handler


def log_event(level: int, message: str, **fields: Any) -> None:
    """A log line with key=value fields in text, or as JSON keys in the json format."""
    if not log.isEnabledFor(level):
        return
    text = message + "".join(f" {k}={_logfmt(v)}" for k, v in fields.items())
    log.log(level, "%s", text, extra={"fields": fields, "event": message})


LOGFMT_QUOTED = re.compile('[ "=]')  # a value holding one of these is written as a JSON string


def _logfmt(value: Any) -> str:
    text = str(value)
    if text == "" or LOGFMT_QUOTED.search(text) or not text.isprintable():  # no line of its own, no escapes
        return json.dumps(text, ensure_ascii=not text.isprintable())  # unseen characters escaped
    return text


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# From intake to Slack: an instant on a calm channel, minutes when Slack is down.
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """Counters, gauges and histograms rendered in the Prometheus text format."""

    HELP = {
        "alert_threader_webhooks_total": ("counter", "Webhook requests answered, by HTTP code."),
        "alert_threader_alerts_total": ("counter", "Alerts told in Slack (or found told already: unchanged), by "
                                                   "status and action."),
        "alert_threader_alerts_delivered_total": ("counter", "Alerts posted to Slack from the outbox."),
        "alert_threader_alerts_dropped_total": ("counter", "Alerts whose message Slack refused for good, also as "
                                                           "plain text: they left the outbox untold (the log names "
                                                           "them)."),
        "alert_threader_alerts_refused_total": ("counter", "Alerts refused because the outbox was full: 503 past "
                                                           "OUTBOX_LIMIT (Alertmanager retries), 413 for a webhook "
                                                           "larger than it could ever hold."),
        "alert_threader_delivery_seconds": ("histogram", "Time from a webhook's intake to its alert's post in Slack."),
        "alert_threader_outbox_alerts": ("gauge", "Alerts waiting in the outbox for Slack, per channel."),
        "alert_threader_outbox_oldest_seconds": ("gauge", "Age of the oldest alert waiting in the outbox, per "
                                                          "channel (0: none waits)."),
        "alert_threader_slack_requests_total": ("counter", "Slack API calls, by method and result (ok or the Slack error)."),
        "alert_threader_slack_request_duration_seconds": ("histogram", "Slack API call latency."),
        "alert_threader_slack_rate_limit_wait_seconds_total": ("counter", "Seconds spent waiting out Slack's "
                                                                          "Retry-After after a 429."),
        "alert_threader_slack_wait_seconds_total": ("counter", "Seconds spent waiting for a turn at Slack, by "
                                                               "bucket (post:CHANNEL, edit:METHOD)."),
        "alert_threader_slack_refused_total": ("counter", "Slack calls refused with HTTP 429, by method."),
        "alert_threader_interactions_total": ("counter", "Clicks in Slack taken, by action (silence, unsilence, "
                                                         "ack; replayed and failed)."),
        "alert_threader_slack_fallbacks_total": ("counter", "Messages re-sent as plain text after Slack rejected the layout."),
        "alert_threader_slack_resends_total": ("counter", "Requests sent once more because Slack had closed a "
                                                          "kept-alive connection without answering a byte."),
        "alert_threader_store_operations_total": ("counter", "Thread store operations, by store and operation."),
        "alert_threader_store_errors_total": ("counter", "Thread store errors, by store and operation."),
        "alert_threader_connections_refused_total": ("counter", "Connections refused past MAX_CONNECTIONS."),
        "alert_threader_connections_evicted_total": ("counter", "Connections with no request in hand (or "
                                                                 "lingering), closed past MAX_CONNECTIONS for a new one."),
        "alert_threader_open_threads": ("gauge", "Threads with at least one firing alert."),
        "alert_threader_stored_threads": ("gauge", "Threads in the store, open and closed."),
        "alert_threader_build_info": ("gauge", "Version of the running threader."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
        self._histograms: Dict[str, List[float]] = {}
        self._gauges: Dict[str, Tuple[Optional[str], Callable[[], Any]]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())) if labels else ())
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    @staticmethod
    def buckets(name: str) -> Tuple[float, ...]:
        return DELIVERY_BUCKETS if name == "alert_threader_delivery_seconds" else LATENCY_BUCKETS

    def observe(self, name: str, value: float) -> None:
        bounds = self.buckets(name)
        bucket = bisect.bisect_left(bounds, value)  # the first bound >= value; past them all: +Inf
        with self._lock:
            counts = self._histograms.get(name)
            if counts is None:
                counts = self._histograms[name] = [0.0] * (len(bounds) + 2)
            counts[bucket] += 1  # per bucket here; cumulative in render()
            counts[-1] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def gauge(self, name: str, read: Callable[[], Any], label: Optional[str] = None) -> None:
        """A gauge read at each scrape: one value, or with a label a value for each of its values."""
        self._gauges[name] = (label, read)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, label: str) -> Dict[str, float]:
        """A counter's values keyed by one of its labels (summed over the others)."""
        with self._lock:
            found: Dict[str, float] = {}
            for (n, labels), v in self._values.items():
                key = dict(labels).get(label)
                if n == name and key is not None:
                    found[key] = found.get(key, 0.0) + v
            return found

    def total(self, name: str, **match: str) -> float:
        with self._lock:
            return sum(v for (n, labels), v in self._values.items()
                       if n == name and all(dict(labels).get(k) == x for k, x in match.items()))

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
            histograms = {k: list(v) for k, v in self._histograms.items()}
        gauges: Dict[str, List[Tuple[Tuple[Tuple[str, str], ...], float]]] = {}
        for name, (label, read) in self._gauges.items():
            try:
                value = read()
            except ThreaderError:
                continue
            gauges[name] = ([(((label, str(k)),), float(v)) for k, v in sorted(value.items())] if label
                            else [((), float(value))])
        lines: List[str] = []
        for name, (kind, help_text) in self.HELP.items():
            samples = [(labels, v) for (n, labels), v in sorted(values.items()) if n == name]
            if kind == "histogram":
                counts = histograms.get(name)
                if counts is None:
                    continue
            elif kind == "gauge" and name in gauges:
                samples = gauges[name]
            elif not samples:
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            if kind == "histogram":
                cumulative = 0.0
                for bound, count in zip(self.buckets(name), counts):
                    cumulative += count
                    lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative:g}')
                cumulative += counts[-2]
                lines.append(f'{name}_bucket{{le="+Inf"}} {cumulative:g}')
                lines.append(f"{name}_sum {counts[-1]!r}")
                lines.append(f"{name}_count {cumulative:g}")
                continue
            for labels, v in samples:
                label_text = ",".join(f'{k}="{_label_escape(x)}"' for k, x in labels)
                lines.append(f"{name}{{{label_text}}} {v:g}" if label_text else f"{name} {v:g}")
        return "\n".join(lines) + "\n"


def _label_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ---------------------------------------------------------------------------
# Thread stores: the threads, and the outbox of alerts on their way to Slack
# ---------------------------------------------------------------------------
#
# A store holds records, JSON objects by key, whose fields are named here, once:
#
# A thread (key: the thread key, or CHANNEL:THREAD_KEY outside the default channel):
#   ts        the parent message's ts          channel   where it lives (an ID)
#   key       the thread key                   status    "open" (an alert firing) or "closed"
#   alerts    {fingerprint: [state "f"|"r", startsAt, endsAt, its labels or None]}
#   created, updated, closed   wall-clock seconds     ended    the alerts' last endsAt
#   reopened  times it fired again after closing      first    the first alert, for the status card
#   digest    the storm digest's key, for an alert that joined one (its ts is the digest's)
#   acks, silences   what people did from Slack: written by clicks (CLICK_FIELDS); every other field is
#             written by the channel's sender alone
# A storm digest (key: storm|CHANNEL; before 1.1 also storm|CHANNEL|GROUP):
#   storm: true, ts, channel, key, status, created, updated, closed, ended, started, reopened,
#   members   {fingerprint: [state, alertname, severity]}: every count on its card comes from these
#
# And the outbox: for each channel, the alerts taken from webhooks and not yet told in Slack
# (Item), oldest first. An item leaves it in the same durable step that records what telling it did.
#
# The interface both stores share is ThreadStore's; RedisStore shares its locks, Slack's turns and
# each channel's sender between replicas through Redis.

CLICK_FIELDS = ("acks", "silences")

# A stored alert keeps only what its messages can show, so that hostile megabyte values cost kilobytes.
# A value longer than any link may be (3,000) is clipped to one character past it: still shown as far as
# a field shows, never usable as a link or a silence matcher.
RECORD_VALUE_MAX = 3001
RECORD_NAME_MAX = 200
RECORD_TEXT_BUDGET = 16384  # characters of label (or annotation) names and values kept per alert


def clip_for_record(values: Dict[str, str], first: Sequence[str]) -> Tuple[Dict[str, str], bool]:
    """The values a record keeps, the names in `first` before the rest; and whether all were kept whole."""
    names, texts = [len(n) for n in values], [len(v) for v in values.values()]
    if (sum(names) + sum(texts) <= RECORD_TEXT_BUDGET and max(names, default=0) <= RECORD_NAME_MAX
            and max(texts, default=0) <= RECORD_VALUE_MAX):
        return dict(values), True  # the usual alert: it all fits
    kept: Dict[str, str] = {}
    whole, budget = True, RECORD_TEXT_BUDGET
    for name in [n for n in first if n in values] + sorted(n for n in values if n not in first):
        value = values[name]
        if len(value) > RECORD_VALUE_MAX:
            value, whole = value[:RECORD_VALUE_MAX - 1] + ELLIPSIS, False
        if len(name) > RECORD_NAME_MAX or len(name) + len(value) > budget:
            whole = False
            continue
        kept[name] = value
        budget -= len(name) + len(value)
    return kept, whole


@dataclasses.dataclass(eq=False)
class Item:
    """One alert in its channel's outbox: all that telling it needs, as intake stored it."""

    channel: str
    key: str  # the store key of its thread
    thread_key: str  # the thread key, as answers show it
    alert: Alert
    external_url: str
    received: float  # when intake took it (wall clock)
    group_labels: Dict[str, str] = dataclasses.field(default_factory=dict)  # THREAD_BY=group: the group's
    id: str = ""  # given by the store

    @functools.cached_property
    def identity(self) -> str:
        """Items of one identity tell the same thing: one waiting is enough (a retry, a repeat, an HA twin)."""
        return compact_json([self.key, self.alert.fingerprint, self.alert.status, self.alert.starts_at])


def outbox_item(alert: Alert, channel: str, key: str, thread_key: str, external_url: str,
                group_labels: Dict[str, str], received: float) -> Item:
    """An alert as the outbox keeps it: clipped to what a message can show."""
    labels, whole = clip_for_record(alert.labels, KEPT_LABELS)
    annotations, _ = clip_for_record(alert.annotations, ("summary", "description", "runbook_url"))
    kept = dataclasses.replace(
        alert, labels=labels, annotations=annotations, labels_whole=alert.labels_whole and whole,
        generator_url=alert.generator_url if len(alert.generator_url) < RECORD_VALUE_MAX else "",
        links={name: url for name, url in alert.links.items() if len(url) < RECORD_VALUE_MAX},
        value=truncate(alert.value, 2000))
    group, _ = clip_for_record(group_labels, ())
    return Item(channel, key, thread_key, kept, external_url if len(external_url) < RECORD_VALUE_MAX else "",
                received, group)


def item_document(item: Item) -> Dict[str, Any]:
    """An item as the outbox stores it (JSON); its id is the store's business."""
    a = item.alert
    alert: Dict[str, Any] = {"status": a.status, "labels": a.labels, "annotations": a.annotations,
                             "startsAt": a.starts_at, "endsAt": a.ends_at, "generatorURL": a.generator_url,
                             "fingerprint": a.fingerprint}
    if not a.labels_whole:
        alert["labels_whole"] = False
    if a.grafana:
        alert["grafana"] = True
    if a.links:
        alert["links"] = a.links
    if a.value:
        alert["value"] = a.value
    document: Dict[str, Any] = {"channel": item.channel, "key": item.key, "thread_key": item.thread_key,
                                "received": item.received, "external_url": item.external_url, "alert": alert}
    if item.group_labels:
        document["group_labels"] = item.group_labels
    return document


def _strings(value: Any, what: str) -> Dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{what} is not an object of strings")
    return value


def _time(value: Any, what: str) -> Optional[float]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{what} is not a time")
    return value


def item_from_document(document: Any, item_id: str) -> Item:
    """An item read back from the outbox; ValueError says what is damaged."""
    if not isinstance(document, dict) or not isinstance(document.get("alert"), dict):
        raise ValueError("not an outbox item")
    raw = document["alert"]
    texts = [document.get(name) for name in ("channel", "key", "thread_key", "external_url")]
    texts += [raw.get(name) for name in ("status", "generatorURL", "fingerprint")] + [raw.get("value", "")]
    if not all(isinstance(text, str) for text in texts) or raw["status"] not in ("firing", "resolved"):
        raise ValueError("a field of the item is missing or not text")
    if not document["channel"] or not document["key"] or _time(document.get("received"), "received") is None:
        raise ValueError("the item names no channel, thread or time")
    alert = Alert(status=raw["status"], labels=_strings(raw.get("labels"), "labels"),
                  annotations=_strings(raw.get("annotations"), "annotations"),
                  starts_at=_time(raw.get("startsAt"), "startsAt"), ends_at=_time(raw.get("endsAt"), "endsAt"),
                  generator_url=raw["generatorURL"], fingerprint=raw["fingerprint"],
                  labels_whole=raw.get("labels_whole", True) is not False, grafana=raw.get("grafana") is True,
                  links=_strings(raw.get("links", {}), "links"), value=raw.get("value", ""))
    return Item(document["channel"], document["key"], document["thread_key"], alert, document["external_url"],
                float(document["received"]), _strings(document.get("group_labels", {}), "group_labels"), item_id)


def item_order(item_id: str) -> Tuple[int, int]:
    """Where an outbox id ("milliseconds-sequence", as Redis streams write them) stands among the others."""
    ms, _, seq = item_id.partition("-")
    return int(ms), int(seq or 0)


class OutboxFull(StoreError):
    """OUTBOX_LIMIT alerts are waiting for Slack: Alertmanager must keep this webhook for now."""


class NotReplicated(StoreError):
    """No replica acknowledged an outbox write in time: answered 200, the alerts would live on one machine."""


class LeaseLost(StoreError):
    """Another replica took a thread or a channel over while this one worked on it: this one writes nothing."""


class LocalLimits:
    """Shared turns (rate limits) and claims, for the workers of this process.

    A turn is taken the GCRA way: each bucket keeps the moment its next turn is
    due; up to `burst` turns may be taken early, then one per `interval`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: Dict[str, float] = {}  # bucket -> monotonic time the next turn is due
        self._claims: Dict[str, float] = {}  # name -> when its claim ends (monotonic)

    def reserve(self, bucket: str, interval: float, burst: int, max_wait: float) -> Optional[float]:
        now = time.monotonic()
        with self._lock:
            due = max(self._due.get(bucket, now), now)
            wait = max(0.0, due - (burst - 1) * interval - now)
            if wait > max_wait:
                return None
            self._due[bucket] = due + interval
            return wait

    def hold_off(self, bucket: str, seconds: float, interval: float, burst: int) -> None:
        now = time.monotonic()
        with self._lock:  # the first turn comes `seconds` from now, and no burst after it
            self._due[bucket] = max(self._due.get(bucket, now), now + seconds + (burst - 1) * interval)

    def claim(self, name: str, seconds: float) -> bool:
        now = time.monotonic()
        with self._lock:
            for old in [n for n, until in self._claims.items() if until <= now]:
                del self._claims[old]
            if name in self._claims:
                return False
            self._claims[name] = now + seconds
            return True


class KeyLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[str, List[Any]] = {}

    def hold(self, keys: Iterable[str], timeout: float) -> "HeldKeys":
        """A context manager holding every key's lock, taken in one global order (no deadlocks)."""
        return HeldKeys(self, sorted(set(keys)), timeout)

    def _acquire(self, key: str, deadline: float) -> bool:
        with self._lock:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        if entry[0].acquire(timeout=max(0.0, deadline - time.monotonic())):
            return True
        self._forget(key)
        return False

    def _release(self, key: str) -> None:
        self._entries[key][0].release()
        self._forget(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            entry = self._entries[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[key]


class HeldKeys:
    """The locks of some keys, held for the duration of a with block."""

    def __init__(self, locks: KeyLocks, keys: List[str], timeout: float) -> None:
        self.locks, self.keys, self.timeout = locks, keys, timeout
        self.held: List[str] = []

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.timeout
        for key in self.keys:
            if not self.locks._acquire(key, deadline):
                self.__exit__()
                raise StoreError(f"timed out after {self.timeout:g}s waiting for thread {key!r}")
            self.held.append(key)

    def __exit__(self, *exc_info: Any) -> None:
        while self.held:
            self.locks._release(self.held.pop())


Result = Tuple[str, Optional[str]]  # what became of an item: (action, the ts of the thread it was told in)
# An item's result stays this long to be read (a webhook waits DELIVERY_WAIT at most), the newest this many.
RESULTS_KEPT, RESULTS_MAX = 300.0, 100_000


class ThreadStore:
    """What both stores do and promise. Records are JSON objects (fields above); items are Items.

    Unless a method says otherwise it may raise StoreError, and then it has
    changed nothing durable. Durable on return means: the file store's journal
    fdatasync'd, or Redis written. Records handed out are copies, which the
    caller may change freely."""

    name = "none"
    shared = False  # True: other processes (replicas) take webhooks into the same outbox

    def __init__(self, metrics: Metrics, lock_timeout: float) -> None:
        self.metrics = metrics
        self.lock_timeout = lock_timeout
        self._key_locks = KeyLocks()
        self._limits = LocalLimits()
        # (channel, id) -> result and when it came: on Redis ids are per channel (each stream numbers its own)
        self._results: "OrderedDict[Tuple[str, str], Tuple[Result, float]]" = OrderedDict()
        self._told = threading.Lock()  # guards the results, their waiters and the storms
        self._waiters: Dict[Tuple[str, str], List[threading.Event]] = {}  # (channel, id) -> webhooks waiting
        self._storms: Dict[str, bool] = {}  # channel -> in a storm (its sender says)

    # -- threads ----------------------------------------------------------------

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.get_many([key]).get(key)

    def put(self, key: str, record: Dict[str, Any]) -> None:
        self.put_many({key: record})

    def get_many(self, keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """The records of those keys that exist."""
        raise NotImplementedError

    def put_many(self, records: Dict[str, Dict[str, Any]]) -> None:
        """Store these records, durable on return.

        Inside locked(), a record is written only while this worker still holds
        its keys: LeaseLost (nothing written) if another replica took them over."""
        raise NotImplementedError

    def locked(self, keys: Sequence[str]) -> Any:
        """A context manager holding those keys for this worker alone (across replicas on Redis).

        Keys are taken in one order, so two workers never deadlock; StoreError
        after lock_timeout. Hold them only for a read, a change and a write."""
        return self._key_locks.hold(keys, self.lock_timeout)

    def items(self) -> Dict[str, Dict[str, Any]]:
        """Every record, by key (for /cache)."""
        raise NotImplementedError

    def find_thread(self, channel: str, ts: str) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The thread whose parent is the message `ts` in `channel` (a scan: for a person's click, not per alert)."""
        for key, record in self.items().items():
            if record.get("ts") == ts and record.get("channel", channel) == channel and not record.get("digest"):
                return key, record
        return None

    def count(self) -> int:
        return len(self.items())

    def open_count(self) -> int:
        return sum(1 for r in self.items().values() if r.get("status") == "open")

    def clear(self) -> int:
        """Forget every thread (the outbox stays: its alerts are still told); returns how many there were."""
        raise NotImplementedError

    def generation(self) -> int:
        """A number that changes whenever clear() forgets the threads: copies of records made before are stale."""
        return 0

    def prune(self, now: float) -> int:
        """Forget closed threads past the retention; returns how many."""
        return 0

    # -- the outbox ---------------------------------------------------------------

    def enqueue(self, items: List[Item], limit: int) -> List[Tuple[str, bool]]:
        """Add the items (all of one channel) to its outbox, durable on return: (id, joined) for each.

        An item whose identity is waiting already is not added again: it joins the
        one waiting (joined True, that one's id). OutboxFull, adding nothing, when
        the items it would add would make more than `limit` wait in all the channels together."""
        raise NotImplementedError

    def waiting(self, channel: str, after: Optional[str] = None) -> List[Item]:
        """The channel's items waiting, oldest first; after an id: only those added after it.

        A damaged entry is moved aside (reported by health(), and logged) and left out."""
        raise NotImplementedError

    def tail(self, channel: str) -> Optional[str]:
        """The id of the channel's newest waiting item (None: nothing waits)."""
        raise NotImplementedError

    def complete(self, channel: str, records: Dict[str, Dict[str, Any]], done: Dict[str, Result]) -> None:
        """In one durable step: write the records, take the done items out of the outbox, keep their results.

        Only the holder of the channel's sender lease may (LeaseLost otherwise).
        When that step fails (StoreError) it happens later in whole, or not at all."""
        raise NotImplementedError

    def outbox_summary(self) -> Dict[str, Tuple[int, Optional[float]]]:
        """Per channel with items waiting: (how many, when the oldest was taken)."""
        raise NotImplementedError

    def results(self, channel: str, ids: Sequence[str]) -> Dict[str, Result]:
        """What became of those items of the channel that are told (by any replica), for RESULTS_KEPT seconds."""
        with self._told:
            return {i: self._results[channel, i][0] for i in ids if (channel, i) in self._results}

    def wait_told(self, channel: str, ids: Sequence[str], timeout: float) -> None:
        """Until one of these items is told in this process (or timeout): each webhook is woken by its own."""
        told = threading.Event()
        keys = [(channel, item_id) for item_id in ids]
        with self._told:
            if any(key in self._results for key in keys):
                return
            for key in keys:
                self._waiters.setdefault(key, []).append(told)
        try:
            told.wait(timeout)
        finally:
            with self._told:
                for key in keys:
                    self._waiters[key] = [other for other in self._waiters.get(key, []) if other is not told]
                    if not self._waiters[key]:
                        del self._waiters[key]

    def _keep_results(self, channel: str, done: Dict[str, Result]) -> None:
        now = time.monotonic()
        with self._told:
            for item_id, result in done.items():
                self._results[channel, item_id] = (result, now)
                for told in self._waiters.get((channel, item_id), ()):
                    told.set()
            while self._results and (len(self._results) > RESULTS_MAX
                                     or next(iter(self._results.values()))[1] < now - RESULTS_KEPT):
                self._results.popitem(last=False)

    # -- senders ------------------------------------------------------------------

    def hold_sender(self, channel: str) -> Optional[str]:
        """Keep or take the channel's sender lease: a token, new at each taking (what was known is stale), or None."""
        return "local"

    def still_sending(self, channel: str) -> None:
        """LeaseLost unless this process still holds the channel's lease (asked before each post)."""

    def release_sender(self, channel: str) -> None:
        """Give the channel's lease up (at stop), so that another replica takes over at once."""

    def note_storm(self, channel: str, storm: bool) -> None:
        """The channel's sender says whether it is in a storm (every replica's intake answers accordingly)."""
        with self._told:
            self._storms[channel] = storm

    def storming(self, channel: str) -> bool:
        with self._told:
            return self._storms.get(channel, False)

    # -- what replicas share besides records ----------------------------------------

    def reserve(self, bucket: str, interval: float, burst: int, max_wait: float) -> Optional[float]:
        """Take a turn of a rate limit shared by every worker: the seconds to wait for it.

        None, taking nothing, when the turn is further off than max_wait."""
        return self._limits.reserve(bucket, interval, burst, max_wait)

    def hold_off(self, bucket: str, seconds: float, interval: float, burst: int) -> None:
        """No turn of this bucket for anyone before `seconds` from now (Slack's Retry-After)."""
        self._limits.hold_off(bucket, seconds, interval, burst)

    def claim(self, name: str, seconds: float) -> bool:
        """True the first time `name` is claimed within `seconds`, by any worker (a replayed request: False)."""
        return self._limits.claim(name, seconds)

    # -- the store itself -------------------------------------------------------------

    def ready(self) -> None:
        """Return only if a write can be made durable now (StoreError otherwise): nothing goes to Slack before."""

    def flush(self) -> None:
        """Every change durable on return; raises StoreError when that cannot be done."""

    def health(self) -> Dict[str, Any]:
        """{"ok": bool, and what /health shows of the store}; never raises."""
        return {"ok": True}

    def stats(self) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def _count(self, op: str, error: bool = False) -> None:
        self.metrics.inc("alert_threader_store_errors_total" if error else "alert_threader_store_operations_total",
                         store=self.name, op=op)


SLACK_TS = re.compile(r"[0-9]{1,15}\.[0-9]{1,9}")
WRITTEN_HERE = re.compile(rb'\s*\{\s*"version"\s*:')  # how every snapshot this service writes begins


def thread_record(value: Any) -> Optional[Dict[str, Any]]:
    """A stored thread with its defaults; the seed's bare ts is an open thread. None if it is no thread (or
    a thread whose shape the planning cannot rely on)."""
    if isinstance(value, str):  # the seed stored key -> ts
        value = {"ts": value, "status": "open", "alerts": {}}
    if not isinstance(value, dict) or not isinstance(value.get("ts"), str) or not SLACK_TS.fullmatch(value["ts"]):
        return None
    value = {"alerts": {}, "status": "open", **value}
    alerts = value["alerts"]
    if value["status"] not in ("open", "closed") or not isinstance(alerts, dict) or not all(
            isinstance(e, list) and len(e) >= 2 and e[0] in ("f", "r") for e in alerts.values()):
        return None
    if not all(isinstance(value.get(name, {}), dict) for name in ("members", "first")):
        return None
    return value


DROPPED_SHOWN = 900.0  # seconds /health stays degraded after Slack refused a message for good
OUTBOX_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,15}")


class StateFiles:
    """threads.json and its journal on disk: appended to, replaced atomically, and what cannot be read put aside.

    The snapshot holds the threads and the outbox, and is only ever replaced
    whole (a temporary file in the same directory, fsync, rename, fsync of the
    directory). The journal takes one line per change (threads written, items
    added to the outbox or taken from it), written in full and fdatasync'd. A
    crash leaves the old or the new snapshot and a journal whose last line may
    be incomplete; that line belongs to a webhook that was never answered.
    Reading them back is StateReader's.
    """

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.journal_path = f"{path}.journal"
        self.damaged_path = f"{path}.damaged"
        self.read_only = read_only
        self.snapshot_bytes = 0
        self.journal_bytes = 0
        self.moved_aside: Optional[str] = None
        self.damaged = 0  # entries set aside at start
        self.epoch = 0  # the snapshot's fold; only journal lines written after it are its changes
        self._journal_epoch: Optional[int] = None  # the fold the journal's last lines follow
        self.torn = False  # the journal may end in a line cut short: only a fold (which empties it) may write
        self._journal_fd: Optional[int] = None

    def remove_temp_files(self) -> None:
        directory = os.path.dirname(self.path) or "."
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.startswith(self._temp_prefix()):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))
                        log_event(logging.INFO, "removed temporary file left by a crash", file=name)

    # -- what cannot be read ------------------------------------------------------

    def set_aside(self, entry: Any, reason: str) -> None:
        """Copy a damaged entry to threads.json.damaged, say so, and go on without it."""
        self.damaged += 1
        log_event(logging.ERROR, "thread store entry damaged; set aside, the rest is read", file=self.path,
                  reason=reason, set_aside_in=self.damaged_path)
        if self.read_only:
            return
        line = compact_json({"at": iso_now(), "reason": reason, "entry": entry}) + "\n"
        try:
            fd = os.open(self.damaged_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "backslashreplace"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log_event(logging.ERROR, "cannot write the damaged entry aside", file=self.damaged_path,
                      error=e.strerror or str(e))

    def set_apart(self) -> Dict[str, Any]:
        """What /health shows of what could not be read at start: a file moved aside, entries set aside."""
        shown: Dict[str, Any] = {"moved_aside": self.moved_aside} if self.moved_aside else {}
        if self.damaged:
            shown["damaged_entries"] = {"count": self.damaged, "set_aside_in": self.damaged_path}
        return shown

    def move_aside(self, path: str, reason: str) -> None:
        """A whole file that cannot be used: renamed to PATH.corrupt-STAMP (read-only: StoreError)."""
        if self.read_only:
            raise StoreError(f"{path} {reason}")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = f"{path}.corrupt-{stamp}"
        try:
            os.replace(path, target)
        except OSError as e:
            raise ConfigError(f"THREAD_STORE_FILE: {path} {reason} and cannot be moved aside: {e.strerror}") from None
        self.moved_aside = target
        log_event(logging.ERROR, "thread store file was unusable; moved aside, starting without what it held",
                  file=path, reason=reason, moved_to=target)

    # -- writing ----------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Journal lines, durable on return (with none: a write that shows one can be made). A short write (a
        full disk) is finished; a failed one is cut off again, or else `torn` says that only a fold may write
        next. The first lines after a fold name it, so that lines from before it are never replayed over it."""
        if self._journal_fd is None:
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._fsync_directory()  # the journal's own name must survive a crash too
        if self._journal_epoch != self.epoch or not data:
            data = b'{"epoch":%d}\n' % self.epoch + data
        size = os.fstat(self._journal_fd).st_size
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    count = os.write(self._journal_fd, view[written:])
                    if count <= 0:
                        raise OSError("the journal write made no progress")
                    written += count
            os.fdatasync(self._journal_fd)
        except OSError:
            try:
                os.ftruncate(self._journal_fd, size)  # shrinking needs no space
            except OSError:
                self.torn = True
            raise
        self.journal_bytes += len(data)
        self._journal_epoch = self.epoch

    def replace(self, threads: List[str], outbox: List[str]) -> None:
        """A new snapshot of these '"key":{record}' fragments and outbox entries, then an empty journal."""
        self.snapshot_bytes = self._write_snapshot(threads, outbox, self.epoch + 1)
        self.epoch += 1
        # After the rename, the journal's lines are of an older fold: a restart before this truncation skips them.
        self.torn = True  # until it is empty: a line cut short there must not swallow the new fold's first
        if self._journal_fd is not None:
            os.ftruncate(self._journal_fd, 0)
            os.fsync(self._journal_fd)
        elif os.path.exists(self.journal_path):
            os.truncate(self.journal_path, 0)
        self.journal_bytes, self._journal_epoch, self.torn = 0, None, False

    def _temp_prefix(self) -> str:
        return "." + os.path.basename(self.path) + ".tmp-"

    def _write_snapshot(self, threads: List[str], outbox: List[str], epoch: int) -> int:
        """Temporary file in the same directory, fsync, rename, fsync the directory; returns its size.

        Written fragment by fragment, so that a large store is never held twice in memory."""
        fd, temp_path = tempfile.mkstemp(prefix=self._temp_prefix(), dir=os.path.dirname(self.path) or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                for opening, fragments in (('{"version":1,"epoch":%d,"threads":{' % epoch, threads),
                                           ('},"outbox":[', outbox)):
                    f.write(opening)
                    for i, fragment in enumerate(fragments):
                        if i:
                            f.write(",")
                        f.write(fragment)
                f.write("]}\n")
                f.flush()
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            os.replace(temp_path, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
        self._fsync_directory()
        return size

    def _fsync_directory(self) -> None:
        dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None


class StateReader:
    """What a restart finds in threads.json and its journal: the threads, and the outbox's entries.

    A snapshot that cannot be used is moved aside and named in moved_aside; a
    damaged journal line or outbox entry is set aside in threads.json.damaged,
    reported, and left out, and the rest is read. An incomplete last journal
    line is a crash in the middle of an append, for a webhook never answered."""

    def __init__(self, files: StateFiles) -> None:
        self.files = files

    def load(self) -> Tuple[Dict[str, Dict[str, Any]], List[Tuple[str, Any]]]:
        """The threads and the outbox (id, document) a restart finds: the snapshot, then the journal's changes."""
        threads, entries = self.snapshot()
        outbox = OrderedDict(entries)
        epoch, skipped = 0, 0  # the journal's lines before a fold's first name none (as 1.1.0 wrote them)
        for change in self.changes():
            if "epoch" in change:
                epoch = change["epoch"]
                continue
            if epoch != self.files.epoch:  # a line the snapshot holds already: a crash ended its fold
                skipped += 1
                continue
            if change.get("clear"):
                threads.clear()
            for key in change.get("del", []):
                threads.pop(key, None)
            threads.update(change.get("put", {}))
            for document in change.get("enq", []):
                item_id = self._entry_id(document)
                if item_id:
                    outbox[item_id] = document
            for item_id in change.get("ack", []):
                outbox.pop(item_id, None)
        if skipped:
            log_event(logging.INFO, "skipped journal lines that the snapshot already holds (a stop during a fold)",
                      file=self.files.journal_path, lines=skipped)
        return threads, list(outbox.items())

    def snapshot(self) -> Tuple[Dict[str, Dict[str, Any]], List[Tuple[str, Any]]]:
        """The threads and outbox entries in threads.json (none if it is missing or had to be moved aside).

        Only a file this service (or the original) wrote is ever moved aside: any other file stops the start."""
        path = self.files.path
        refuse_unless_file(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}, []
        except OSError as e:
            raise ConfigError(f"THREAD_STORE_FILE: {path} cannot be read ({e.strerror}; nothing was changed)") from None
        if not raw.strip():
            return {}, []  # created empty (touch): nothing in it to keep
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            if not WRITTEN_HERE.match(raw):
                raise self.foreign(path, "it is not JSON") from None
            self.files.move_aside(path, f"is not valid JSON ({truncate(str(e), 120)})")
            return {}, []
        outbox: Any = []
        if isinstance(document, dict) and isinstance(document.get("threads"), dict) and "version" in document:
            epoch = document.get("epoch", 0)
            self.files.epoch = epoch if type(epoch) is int and epoch >= 0 else 0
            document, outbox = document["threads"], document.get("outbox", [])
        elif not isinstance(document, dict) or not all(isinstance(v, str) and SLACK_TS.fullmatch(v)
                                                       for v in document.values()):
            raise self.foreign(path, "its JSON is neither this service's snapshot nor the original's key -> ts")
        threads = self.threads(document)
        if not isinstance(outbox, list):
            self.files.set_aside(outbox, "the snapshot's outbox is not a list")
            outbox = []
        entries = [(item_id, entry) for item_id, entry in ((self._entry_id(e), e) for e in outbox) if item_id]
        self.files.snapshot_bytes = len(raw)
        return threads, entries

    @staticmethod
    def foreign(path: str, why: str) -> ConfigError:
        return ConfigError(f"THREAD_STORE_FILE: {path} is not a thread-state file this service wrote ({why}); "
                           "nothing was changed: name a new file, or move this one away yourself")

    def threads(self, document: Any) -> Dict[str, Dict[str, Any]]:
        """Validated records from a JSON object of them (or the seed's key -> ts); a malformed one is set aside
        (its next alert starts a new thread), the rest are read."""
        if not isinstance(document, dict):
            raise ValueError("threads that are not a JSON object")
        threads = {}
        for key, value in document.items():
            record = thread_record(value)
            if record is None:
                self.files.set_aside({"key": key, "thread": value}, f"a malformed thread {truncate(key, 80)!r}")
            else:
                threads[key] = record
        return threads

    def changes(self) -> Iterator[Dict[str, Any]]:
        """The journal's changes since the snapshot, in order."""
        path = self.files.journal_path
        refuse_unless_file(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"THREAD_STORE_FILE: {path} cannot be read ({e.strerror}; nothing was changed)") from None
        self.files.journal_bytes, lines = len(raw), raw.split(b"\n")
        applied = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                change = self._change(line)
            except (UnicodeDecodeError, ValueError, TypeError, AttributeError, RecursionError) as e:
                if number < len(lines):  # a whole line, newline and all, that is not a change: damage
                    self.files.set_aside(line.decode("utf-8", "backslashreplace"),
                                         f"journal line {number} is damaged ({truncate(str(e), 100)})")
                    continue
                log_event(logging.WARNING, "ignored an incomplete last journal entry (a crash during a write; "
                          "that webhook was never answered, so Alertmanager sent it again)", file=path)
                break
            applied += 1
            yield change
        if applied:
            log_event(logging.INFO, "thread store journal replayed", file=path, changes=applied)

    def _change(self, line: bytes) -> Dict[str, Any]:
        change = json.loads(line.decode("utf-8"))
        if not isinstance(change, dict):
            raise ValueError("not a change")
        if "epoch" in change and (type(change["epoch"]) is not int or len(change) > 1):
            raise ValueError("a fold's name that is not a number alone")
        change["put"] = self.threads(change.get("put", {}))
        for name in ("del", "ack", "enq"):
            if not isinstance(change.get(name, []), list):
                raise ValueError(f"{name} is not a list")
        if not all(isinstance(v, str) for name in ("del", "ack") for v in change.get(name, [])):
            raise ValueError("a key or id that is not text")
        return change

    def _entry_id(self, document: Any) -> Optional[str]:
        """An outbox entry's id, or None (and the entry set aside) when it has none."""
        item_id = document.get("id") if isinstance(document, dict) else None
        if isinstance(item_id, str) and OUTBOX_ID.fullmatch(item_id):
            return item_id
        self.files.set_aside(document, "an outbox entry without a valid id")
        return None


class OutboxMemory:
    """The file store's outbox in memory: each channel's items in order, with their JSON, and their identities.

    Not locked itself: the file store changes it under its own lock."""

    def __init__(self) -> None:
        self.channels: Dict[str, "OrderedDict[str, Tuple[Item, str]]"] = {}  # channel -> id -> (item, its JSON)
        self._channel_of: Dict[str, str] = {}  # item id -> its channel
        self._identities: Dict[str, str] = {}  # identity -> the id of the item waiting with it
        self.count = 0
        self._last_id = (0, 0)

    def hold(self, item: Item, text: str) -> None:
        self.channels.setdefault(item.channel, OrderedDict())[item.id] = (item, text)
        self._channel_of[item.id] = item.channel
        self._identities[item.identity] = item.id
        self.count += 1
        self._last_id = max(self._last_id, item_order(item.id))

    def new(self, items: List[Item]) -> int:
        """How many of these items would be added, not joined to one waiting."""
        return len({item.identity for item in items} - self._identities.keys())

    def add(self, item: Item) -> Tuple[str, Optional[str]]:
        """The item in, with a new id: (its id, its journal text); or (the waiting one's id, None) if one is."""
        joined = self._identities.get(item.identity)
        if joined is not None:
            return joined, None
        ms, seq = self._last_id
        now = int(time.time() * 1000)
        item.id = "%d-%d" % ((now, 0) if now > ms else (ms, seq + 1))
        text = compact_json({"id": item.id, **item_document(item)})
        self.hold(item, text)
        return item.id, text

    def take(self, item_id: str) -> bool:
        """The item out (told); False if it was not waiting."""
        channel = self._channel_of.pop(item_id, None)
        if channel is None:
            return False
        item, _ = self.channels[channel].pop(item_id)
        if not self.channels[channel]:
            del self.channels[channel]
        if self._identities.get(item.identity) == item_id:
            del self._identities[item.identity]
        self.count -= 1
        return True

    def waiting(self, channel: str, after: Optional[str]) -> List[Item]:
        since = item_order(after) if after else (-1, -1)
        newer = []
        entries = self.channels.get(channel, {})
        for item_id in reversed(entries):
            if item_order(item_id) <= since:
                break
            newer.append(entries[item_id][0])
        newer.reverse()
        return newer

    def texts(self) -> List[str]:
        return [text for entries in self.channels.values() for _, text in entries.values()]


class GroupCommit:
    """The file store's way to disk: journal lines made durable together, and folds into a new snapshot.

    Concurrent writers share one append and one fdatasync. When the journal
    outgrows the snapshot (or FOLD_BYTES, on a small store) it is folded, so
    that neither grows beyond about the state they hold. A write that fails
    raises StoreError and keeps its lines, for the next commit to write; a
    fold that fails is tried again FOLD_RETRY later (or as soon as there is
    room for it), the journal taking the lines meanwhile. The journal never
    takes the room its fold needs: an append that would leave less free than
    the snapshot and journal together fails as a full disk does, and a
    webhook is refused while RESERVE more is not free, so that what Slack
    takes can always be recorded."""

    FOLD_BYTES = 16384
    FOLD_RETRY = 30.0
    RECORD_ROOM = 32768  # room to record one message (twice that must be free beyond the fold's before a post)
    RESERVE = 131072  # room only the sender's records may use: a webhook is refused (503) before it is taken
    WEBHOOK = 2048  # the journal lines of a one-alert webhook, about: /health asks whether one would be taken

    def __init__(self, files: StateFiles, lock: threading.Lock,
                 snapshot: Callable[[], Tuple[List[str], List[str]]], count: Callable[..., None]) -> None:
        self.files = files
        self._lock = lock  # the store's: pending lines are taken with the memory they describe
        self._snapshot = snapshot  # what the store holds, taken under that lock
        self._count = count
        self._commit_lock = threading.Lock()  # one writer of the files at a time
        self._pending: List[str] = []  # journal lines not yet written
        self._version = 0  # changes made in memory
        self._durable = 0  # changes on disk
        self._fold_after = 0.0  # when a fold that failed is tried again (monotonic)
        self.write_error: Optional[str] = None
        self._short = False  # webhooks are refused to keep room (said once when it starts, once when it ends)

    def change(self, line: str) -> int:
        """Queue one journal line (caller holds the store's lock); returns the version that makes it durable."""
        self._pending.append(line)
        self._version += 1
        return self._version

    @property
    def version(self) -> int:
        return self._version

    def commit(self, version: int) -> None:
        """Make every change up to `version` durable; one append and fdatasync serves all waiting writers. After
        a failure, a write is made even with nothing to write: it tells whether the disk takes one again."""
        with self._commit_lock:
            if self._durable >= version and self.write_error is None:
                return  # a concurrent writer's commit carried this change too
            try:
                version = self._write_locked()
            except OSError as e:
                self._failed(e)
                raise StoreError(f"cannot write {self.files.path}: {e.strerror or e}") from None
            self._durable = max(self._durable, version)
            if self.write_error is not None:
                log_event(logging.INFO, "thread store written again", file=self.files.path)
            self.write_error = None

    def room(self, size: int, reserve: int = 0) -> None:
        """OSError (ENOSPC) unless `size` more bytes of journal, and `reserve`, leave room for a fold."""
        try:
            disk = os.statvfs(os.path.dirname(self.files.path) or ".")
        except OSError:
            return
        if not disk.f_blocks:
            return  # a file system that does not tell its size
        free, held = disk.f_bavail * disk.f_frsize, self.files.snapshot_bytes + self.files.journal_bytes
        if free >= held + 2 * size + reserve:
            return
        whole = held + 2 * size + self.RESERVE  # what webhooks need: the figure that ends every refusal
        where = os.path.dirname(self.files.path) or "."
        if disk.f_blocks * disk.f_frsize < whole:
            fix = f"the file system holds {disk.f_blocks * disk.f_frsize // 1024:,} KB in all: give " \
                  f"THREAD_STORE_FILE one of a few MB at least"
        else:
            fix = f"free at least {whole // 1024 + 1:,} KB in {where}"
        raise OSError(errno.ENOSPC, f"{free // 1024:,} KB free; the journal may grow only while a new snapshot "
                                    f"fits beside it: {fix}")

    def admit(self, size: int) -> Optional[str]:
        """Why a webhook's `size` bytes of lines are refused (None: taken): they must leave RESERVE free beyond
        the fold's room."""
        try:
            self.room(size, self.RESERVE)
        except OSError as e:
            if not self._short:
                log_event(logging.ERROR, "the disk is nearly full: webhooks are answered 503 (Alertmanager "
                          "retries them) until there is room again", file=self.files.path, error=e.strerror)
            self._short = True
            return f"the disk is nearly full: {e.strerror}"
        if self._short:
            log_event(logging.INFO, "room on the disk again: webhooks are taken", file=self.files.path)
        self._short = False
        return None

    def ready(self) -> None:
        """StoreError unless what Slack is about to take can be recorded: writes succeed, and there is room."""
        self.flush()
        try:
            self.room(self.RECORD_ROOM)
        except OSError as e:
            raise StoreError(f"the disk is full: {e.strerror}") from None

    def status(self) -> Dict[str, Any]:
        """What /health says of the disk: the write that fails, or else why a webhook would be refused now."""
        if self.write_error is not None:
            return {"ok": False, "file_status": "write failing", "store_error": self.write_error}
        try:
            self.room(self.WEBHOOK, self.RESERVE)
        except OSError as e:  # it writes, but keeps the room a fold and Slack's records need
            return {"ok": False, "file_status": "nearly full", "store_error": e.strerror,
                    "problem": "the disk is nearly full: webhooks are answered 503"}
        return {"ok": True, "file_status": "ok"}

    def _write_locked(self) -> int:
        """Fold, when due and possible, else append the pending lines; returns the version now durable."""
        due = self.files.journal_bytes > max(self.files.snapshot_bytes, self.FOLD_BYTES)
        if self.files.torn or (due and time.monotonic() >= self._fold_after):
            try:
                return self._fold_locked()
            except OSError as e:
                if self.files.torn:
                    raise
                self._fold_after = time.monotonic() + self.FOLD_RETRY
                log_event(logging.WARNING, "cannot fold the journal into a new snapshot; the journal takes the "
                          "changes meanwhile", file=self.files.path, error=e.strerror or str(e),
                          needs_free_kb=(self.files.snapshot_bytes + self.files.journal_bytes) // 1024 + 1)
        with self._lock:
            version, lines = self._version, list(self._pending)
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        try:
            self.room(len(data))
        except OSError:
            if not due:
                raise
            return self._fold_locked()  # the room kept for the fold is there: fold now, not FOLD_RETRY later
        self.files.append(data)
        self._count("append")
        with self._lock:
            del self._pending[:len(lines)]
        return version

    def _failed(self, e: OSError) -> None:
        first = self.write_error is None
        self.write_error = f"{e.strerror or e} ({self.files.path})"
        self._count("write", error=True)
        if first:
            log_event(logging.ERROR, "cannot write thread store; webhooks are answered 503 (Alertmanager retries "
                      "them) and nothing is posted until a write succeeds", file=self.files.path,
                      error=e.strerror or str(e))

    def fold(self) -> None:
        """Fold the journal into a new snapshot now (start-up, clean stop); OSError if it cannot."""
        with self._commit_lock:
            self._durable = max(self._durable, self._fold_locked())

    def _fold_locked(self) -> int:
        """Snapshot everything in memory (caller holds _commit_lock); returns the version it holds."""
        with self._lock:
            version, taken = self._version, len(self._pending)
            threads, outbox = self._snapshot()  # references only: the text is written piece by piece
        self.files.replace(threads, outbox)
        with self._lock:
            del self._pending[:taken]  # all in the snapshot
        self._count("write")
        return version

    def start(self) -> None:
        """Fold what was read at start; on a full or failing disk, serve and say so once."""
        try:
            self.fold()
        except OSError as e:
            self.write_error = f"{e.strerror or e} ({self.files.path})"
            log_event(logging.ERROR, "cannot write the thread store at start; serving, but webhooks are answered "
                      "503 (Alertmanager retries them) and nothing is posted until a write succeeds",
                      file=self.files.path, error=e.strerror or str(e))

    def flush(self) -> None:
        """Every change durable now (after a failed write: retried); StoreError if it cannot be."""
        with self._lock:
            version = self._version
        if version > self._durable or self.write_error is not None:
            self.commit(version)


class FileStore(ThreadStore):
    """Threads and the outbox in memory, made durable in threads.json and a journal beside it.

    Each change is a journal line, durable before the method returns (GroupCommit): a write costs one change,
    not the whole store. With path None the store is memory-only."""

    name = "file"

    def __init__(self, path: Optional[str], metrics: Metrics, retention: float = 86400.0,
                 lock_timeout: float = 60.0, read_only: bool = False) -> None:
        super().__init__(metrics, lock_timeout)
        self.path = path
        self.retention = retention
        self.files = StateFiles(path, read_only) if path else None
        self._lock = threading.Lock()  # guards the fields below
        # key -> '"key":{record json}': snapshots are joined from these, journal lines built of them
        self._fragments: Dict[str, str] = {}
        # key -> (status, closed): what prune and the gauges need without parsing records
        self._summary: Dict[str, Tuple[str, Any]] = {}
        self.outbox = OutboxMemory()
        self._generation = 0
        self.journal = GroupCommit(self.files, self._lock, lambda: (list(self._fragments.values()),
                                                                    self.outbox.texts()), self._count) \
            if self.files else None
        if self.files:
            if not read_only:
                self.files.remove_temp_files()
            threads, entries = StateReader(self.files).load()
            for key, record in threads.items():
                self._remember(key, record)
            for item_id, document in entries:
                try:
                    item = item_from_document(document, item_id)
                except ValueError as e:
                    self.files.set_aside(document, f"outbox item {item_id}: {e}")
                    continue
                self.outbox.hold(item, compact_json(document))
            if threads or self.outbox.count:
                log_event(logging.INFO, "thread store loaded", file=path, threads=len(threads),
                          outbox=self.outbox.count)
            if not read_only and self.journal:
                self.journal.start()

    @property
    def write_error(self) -> Optional[str]:
        return self.journal.write_error if self.journal else None

    @classmethod
    def read(cls, path: str) -> Dict[str, Dict[str, Any]]:
        """The threads a restart would find at path (snapshot plus journal), without writing anything."""
        return cls(path, Metrics(), read_only=True).items()

    # -- changes ----------------------------------------------------------------

    def _remember(self, key: str, record: Dict[str, Any]) -> str:
        fragment = compact_json(key) + ":" + compact_json(record)
        self._fragments[key] = fragment
        self._summary[key] = (record.get("status", "open"), record.get("closed"))
        return fragment

    def _change(self, line: Optional[str]) -> int:
        """Queue a journal line (caller holds _lock; None: no change); the version that makes it durable."""
        if self.journal is None:
            return 0
        return self.journal.change(line) if line is not None else self.journal.version

    def _commit(self, version: int) -> None:
        if self.journal is not None:
            self.journal.commit(version)

    def get_many(self, keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            fragments = [(k, self._fragments.get(k)) for k in keys]
        # Parsed afresh: callers may change what they get without touching the store.
        return {k: json.loads(f[len(compact_json(k)) + 1:]) for k, f in fragments if f}

    def put_many(self, records: Dict[str, Dict[str, Any]]) -> None:
        with self._lock:
            fragments = [self._remember(key, record) for key, record in records.items()]
            version = self._change('{"put":{' + ",".join(fragments) + "}}")
        self._commit(version)

    def enqueue(self, items: List[Item], limit: int) -> List[Tuple[str, bool]]:
        with self._lock:
            adding = self.outbox.new(items)  # a copy of a waiting alert (a retry, an HA peer's) joins it
            if adding and self.outbox.count + adding > limit:
                raise OutboxFull(f"{self.outbox.count:,} alerts are waiting for Slack and {adding:,} more "
                                 f"would pass OUTBOX_LIMIT ({limit:,})")
            added = [self.outbox.add(item) for item in items]
            texts = [text for _, text in added if text is not None]
            refusal = self.journal.admit(sum(map(len, texts))) if texts and self.journal else None
            if refusal:  # taken back: the webhook is answered 503, and Alertmanager keeps it
                for item_id, text in added:
                    if text is not None:
                        self.outbox.take(item_id)
                raise StoreError(refusal)
            version = self._change('{"enq":[' + ",".join(texts) + "]}" if texts else None)
        self._commit(version)  # also when every item joined one waiting: that one must be durable too
        return [(item_id, text is None) for item_id, text in added]

    def waiting(self, channel: str, after: Optional[str] = None) -> List[Item]:
        with self._lock:
            return self.outbox.waiting(channel, after)

    def tail(self, channel: str) -> Optional[str]:
        with self._lock:
            entries = self.outbox.channels.get(channel)
            return next(reversed(entries)) if entries else None

    def complete(self, channel: str, records: Dict[str, Dict[str, Any]], done: Dict[str, Result]) -> None:
        with self._lock:
            fragments = [self._remember(key, record) for key, record in records.items()]
            acked = [item_id for item_id in done if self.outbox.take(item_id)]
            change = '{"put":{' + ",".join(fragments) + '},"ack":' + compact_json(acked) + "}"
            version = self._change(change if fragments or acked else None)
        self._commit(version)
        self._keep_results(channel, done)  # an answer that says "posted" is never ahead of the disk

    def outbox_summary(self) -> Dict[str, Tuple[int, Optional[float]]]:
        with self._lock:
            return {channel: (len(entries), next(iter(entries.values()))[0].received)
                    for channel, entries in self.outbox.channels.items()}

    # -- the rest of the interface ----------------------------------------------

    def ready(self) -> None:
        if self.journal is not None:
            self.journal.ready()

    def flush(self) -> None:
        if self.journal is not None:
            self.journal.flush()

    def items(self) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            return json.loads("{" + ",".join(self._fragments.values()) + "}")

    def count(self) -> int:
        with self._lock:
            return len(self._fragments)

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for status, _ in self._summary.values() if status == "open")

    def clear(self) -> int:
        self._count("clear")
        with self._lock:
            removed = len(self._fragments)
            self._fragments.clear()
            self._summary.clear()
            self._generation += 1
            version = self._change('{"clear":true}')
        self._commit(version)
        return removed

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def prune(self, now: float) -> int:
        with self._lock:
            # Closed past the retention; open threads are kept however old (their resolve is still due).
            stale = [k for k, (status, closed) in self._summary.items()
                     if status == "closed" and isinstance(closed, (int, float)) and closed + self.retention < now]
            for key in stale:
                del self._fragments[key], self._summary[key]
            version = self._change(compact_json({"del": stale}) if stale else None)
        if stale:
            self._count("prune")
            self._commit(version)
        else:
            self.flush()
        return len(stale)

    def health(self) -> Dict[str, Any]:
        with contextlib.suppress(StoreError):
            self.flush()  # a disk that has recovered shows so at once
        status = self.journal.status() if self.journal else {"ok": True, "file_status": "ok"}
        return {**status, **(self.files.set_apart() if self.files else {})}

    def stats(self) -> Dict[str, Any]:
        files = self.files
        return {"file": self.path, "file_bytes": files.snapshot_bytes, "journal_bytes": files.journal_bytes} \
            if files else {"file": None}

    def close(self) -> None:
        """Fold the journal, so that a stopped service leaves everything in threads.json."""
        if not self.files or not self.journal:
            return
        try:
            self.journal.fold()
        except OSError as e:
            log_event(logging.ERROR, "cannot write thread store at stop; the journal keeps the changes",
                      file=self.path, error=e.strerror or str(e))
        self.files.close()


RELEASE_LOCK_LUA = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# KEYS: n leases, then the records; ARGV: n, lease ms, n tokens, then per record its JSON and expiry (0: none).
# Writes nothing unless every lease is still ours: a replica that lost a thread never writes over it.
GUARDED_WRITE_LUA = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('get', KEYS[i]) ~= ARGV[i + 2] then return 0 end
end
for i = 1, n do redis.call('pexpire', KEYS[i], ARGV[2]) end
for i = n + 1, #KEYS do
  local value, ttl = ARGV[n + 3 + 2 * (i - n - 1)], tonumber(ARGV[n + 4 + 2 * (i - n - 1)])
  if ttl > 0 then redis.call('set', KEYS[i], value, 'EX', ttl) else redis.call('set', KEYS[i], value) end
end
return 1
"""
# KEYS[1]: a channel's sender lease; ARGV: the token of this holding, lease ms, "1" to take a free lease
# (a new holding) rather than renew one. 1 if this holding has the lease now. A lease that lapsed is never
# renewed: whoever held it starts a new holding, with a new token, from what the outbox and records say.
HOLD_SENDER_LUA = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if held or ARGV[3] ~= '1' then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the channel's outbox (a stream), its identity map (identity -> id), the set of channels with an
# outbox, then every such channel's outbox (for the limit); ARGV: the channel, the limit, how many alerts
# the webhook adds in all (0: a later part of it, checked already), then per item its identity and JSON.
# Per item its id, "=" before it when an item of that identity was waiting already; -1 (nothing added) when
# they would pass the limit.
ENQUEUE_LUA = """
local waiting = 0
for i = 4, #KEYS do waiting = waiting + redis.call('xlen', KEYS[i]) end
local adding = tonumber(ARGV[3])
if adding > 0 and waiting + adding > tonumber(ARGV[2]) then return -1 end
redis.call('sadd', KEYS[3], ARGV[1])
local ids = {}
for i = 4, #ARGV, 2 do
  local id = redis.call('hget', KEYS[2], ARGV[i])
  if id and #redis.call('xrange', KEYS[1], id, id) > 0 then
    ids[#ids + 1] = '=' .. id
  else
    id = redis.call('xadd', KEYS[1], '*', 'item', ARGV[i + 1], 'identity', ARGV[i])
    redis.call('hset', KEYS[2], ARGV[i], id)
    ids[#ids + 1] = id
  end
end
return ids
"""
# KEYS: the channel's sender lease, its outbox, its identity map, n thread leases, r records, then the
# result key of each item done; ARGV: the sender's token, its lease ms, n, thread lease ms, r, result
# seconds, n thread tokens, per record its JSON and expiry (0: none), per item done its id and result.
# Nothing is written unless the sender's lease (this holding's token) and every thread lease are still ours.
COMPLETE_LUA = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local n, r = tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, n do
  if redis.call('get', KEYS[3 + i]) ~= ARGV[6 + i] then return 0 end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 1, n do redis.call('pexpire', KEYS[3 + i], ARGV[4]) end
for i = 1, r do
  local value, ttl = ARGV[6 + n + 2 * i - 1], tonumber(ARGV[6 + n + 2 * i])
  if ttl > 0 then redis.call('set', KEYS[3 + n + i], value, 'EX', ttl)
  else redis.call('set', KEYS[3 + n + i], value) end
end
local base = 6 + n + 2 * r
for i = 1, #KEYS - 3 - n - r do
  local id = ARGV[base + 2 * i - 1]
  local entry = redis.call('xrange', KEYS[2], id, id)
  if #entry > 0 then
    local fields = entry[1][2]
    for f = 1, #fields, 2 do
      if fields[f] == 'identity' and redis.call('hget', KEYS[3], fields[f + 1]) == id then
        redis.call('hdel', KEYS[3], fields[f + 1])
      end
    end
    redis.call('xdel', KEYS[2], id)
  end
  redis.call('set', KEYS[3 + n + r + i], ARGV[base + 2 * i], 'EX', ARGV[6])
end
return 1
"""
# Redis's own clock, so that replicas on several machines agree. Before Redis 7 a script must ask
# for its effects to be replicated before it may write after reading the time.
NOW_MS_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS[1]: the bucket; ARGV: interval ms, burst, max wait ms. The wait in ms, or -1 (nothing taken).
RESERVE_TURN_LUA = NOW_MS_LUA + """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = tonumber(redis.call('get', KEYS[1]) or now)
if due < now then due = now end
local wait = due - (burst - 1) * interval - now
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[3]) then return -1 end
redis.call('set', KEYS[1], due + interval, 'PX', due + interval - now + 60000)
return wait
"""
# KEYS[1]: the bucket; ARGV: pause ms, interval ms, burst.
HOLD_OFF_LUA = NOW_MS_LUA + """
local due = now + tonumber(ARGV[1]) + (tonumber(ARGV[3]) - 1) * tonumber(ARGV[2])
if due > tonumber(redis.call('get', KEYS[1]) or 0) then
  redis.call('set', KEYS[1], due, 'PX', due - now + 60000)
end
return 1
"""


class RedisConnection:
    """One redis-py client that fails fast, and the outage it is in: one log line when it starts and ends."""

    def __init__(self, url: str, timeout: float, count: Callable[[str, bool], None], connections: int = 300,
                 sentinel_password: Optional[str] = None) -> None:
        try:
            import redis  # imported here: only this store needs the package
        except ImportError:
            raise ConfigError("THREAD_STORE: redis needs the Python redis package (apt install python3-redis on "
                              "Debian/Ubuntu, or pip install redis)") from None
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.errors: Tuple[type, ...] = (redis.exceptions.RedisError, OSError)
        self.url = url
        self._count = count
        # No client-side retries: an outage must fail fast, into a 503 that Alertmanager retries
        # (newer redis-py retries three times with backoff by default).
        timeouts = {"socket_timeout": timeout}
        if not url.startswith("unix:"):  # a unix socket connects at once; redis-py 4.3 refuses this there
            timeouts["socket_connect_timeout"] = timeout
        self.sentinel: Any = None
        if url.startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES)):
            # A Sentinel answering in a shape redis-py does not expect, or naming a host that cannot be
            # encoded, raises these from inside redis-py: an outage of the store (503), not a crash (500).
            self.errors += (TypeError, AttributeError, ValueError, IndexError, KeyError)
            self.target = parse_sentinel_url(url)
            self.client = self._through_sentinel(redis, self.target, timeouts, connections, sentinel_password,
                                                 Retry(NoBackoff(), 0))
            self.pool = self.client.connection_pool
        else:
            # A connection for every request that may run at once (a storm's groups) and every worker: past a
            # pool's own limit, newer redis-py fails a request as if Redis were gone.
            self.pool = redis.BlockingConnectionPool.from_url(url, max_connections=connections, timeout=timeout,
                                                              decode_responses=True, retry=Retry(NoBackoff(), 0),
                                                              **timeouts)
            self.client = redis.Redis(connection_pool=self.pool)
        self._lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._next_probe = 0.0
        self.last_error: Optional[str] = None

    def _through_sentinel(self, redis: Any, target: SentinelTarget, timeouts: Dict[str, float], connections: int,
                          sentinel_password: Optional[str], retry: Any) -> Any:
        """A client of the primary the Sentinels name: each new connection asks them again, so after a
        failover the next request reaches the promoted replica."""
        from redis.sentinel import Sentinel
        tls = {"ssl": True} if target.tls else {}
        self.sentinel = Sentinel(
            list(target.sentinels), sentinel_kwargs={"password": target.sentinel_password or sentinel_password,
                                                     "retry": retry, **timeouts, **tls},
            password=target.password, username=target.username, db=target.db, retry=retry, **timeouts, **tls)
        return self.sentinel.master_for(target.service, decode_responses=True, max_connections=connections)

    def primary(self) -> str:
        """Where the data lives now: the primary the Sentinels name (HOST:PORT), else the URL's host."""
        if self.sentinel is None:
            return redact_url(self.url)
        host, port = self.sentinel.discover_master(self.target.service)
        return f"{host}:{port} (primary of {self.target.service!r}, through Sentinel)"

    @property
    def connected(self) -> bool:
        return self._down_since is None

    def script(self, source: str) -> Any:
        return self.client.register_script(source)

    def run(self, op: str, action: Callable[[], Any]) -> Any:
        """Run one Redis operation; raise StoreError (and remember the outage) when Redis is unreachable."""
        if self._down_since is not None and time.monotonic() < self._next_probe:
            raise StoreError("redis unreachable")
        try:
            result = action()
        except self.errors as e:
            self._count(op, True)
            self.went_down(e)
            raise StoreError("redis unreachable") from None
        self._count(op, False)
        if self._down_since is not None:  # the first success after an outage (checked again under the lock)
            with self._lock:
                outage, self._down_since = (time.monotonic() - self._down_since if self._down_since else None), None
            if outage is not None:
                log_event(logging.INFO, "redis reachable again", outage=format_duration(outage))
        return result

    def went_down(self, e: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._next_probe = time.monotonic() + 1.0
            self.last_error = f"{type(e).__name__}. Fix: {redis_fix(e)}"
        if first:
            log_event(logging.ERROR, "redis unreachable; webhooks are answered 503 (Alertmanager retries them) and "
                      "nothing is posted until it returns", redis=redact_url(self.url), error=type(e).__name__,
                      fix=redis_fix(e))

    def probe(self) -> Optional[str]:
        """Why Redis cannot be used now (None if it answers), without the outage bookkeeping."""
        try:
            self.client.ping()
        except self.errors as e:
            return f"{type(e).__name__}: {truncate(str(e), 200).rstrip('.')}. Fix: {redis_fix(e)}"
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
            self.pool.disconnect()


def redis_fix(e: BaseException) -> str:
    """What to do about a Redis error, in words an operator can act on."""
    if type(e).__name__ == "MasterNotFoundError":
        return ("no Sentinel named a primary for the service in REDIS_URL: check its name (sentinel monitor NAME), "
                "SENTINEL_PASSWORD if the Sentinels have a requirepass, and that one of them answers "
                "(redis-cli -p 26379 sentinel get-master-addr-by-name NAME)")
    if "without any password configured" in str(e):
        return "this Redis has no password: take it out of REDIS_URL (or set requirepass in redis.conf)"
    if type(e).__name__ == "AuthenticationError" or any(word in str(e) for word in ("NOAUTH", "WRONGPASS")):
        return ("Redis refuses the credentials: put its password in REDIS_URL (redis://:PASSWORD@HOST:6379/0, "
                "or redis://USER:PASSWORD@… for an ACL user), as requirepass or the ACL has it; through Sentinel, "
                "the Sentinels' own goes in SENTINEL_PASSWORD if the Sentinels have a requirepass")
    return ("start redis-server, or correct REDIS_URL; redis-cli -h HOST -p PORT ping (-s SOCKET for a unix "
            "socket, with REDISCLI_AUTH=PASSWORD in its environment if Redis has one) tells whether it answers")


class RedisLeases:
    """Keys held across replicas: a lease each (SET NX PX), released only by its holder."""

    def __init__(self, redis: RedisConnection, prefix: str, lease: float, timeout: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self.timeout = timeout
        self._release = redis.script(RELEASE_LOCK_LUA)
        self._held = threading.local()

    def held(self) -> Dict[str, str]:
        """The leases this worker holds: lease key -> its token."""
        return getattr(self._held, "tokens", {})

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}-lock:{key}"  # outside PREFIX:* so KEYS PREFIX:* lists threads only

    @contextlib.contextmanager
    def hold(self, keys: Sequence[str]) -> Iterator[None]:
        tokens: Dict[str, str] = {}
        outer = self.held()  # held by an enclosing hold()
        deadline = time.monotonic() + self.timeout
        try:
            for key in sorted(set(keys)):
                lease_key, token = self._lease_key(key), os.urandom(12).hex()
                while not self.redis.run("lock", lambda: self.redis.client.set(lease_key, token, nx=True,
                                                                                px=int(self.lease * 1000))):
                    if time.monotonic() > deadline:
                        raise StoreError(f"timed out waiting for another replica on thread {key!r}")
                    time.sleep(0.01)
                tokens[lease_key] = token
            self._held.tokens = {**outer, **tokens}
            yield
        finally:
            self._held.tokens = outer
            for lease_key, token in tokens.items():
                with contextlib.suppress(StoreError):
                    self.redis.run("unlock", lambda: self._release(keys=[lease_key], args=[token]))


def redis_record(value: Optional[str]) -> Optional[Dict[str, Any]]:
    """The thread a Redis value holds: our JSON record, or the seed's bare ts ("1705329025.000100")."""
    if value is None or re.fullmatch(r"\d+\.\d+", value):
        return thread_record(value)
    try:
        return thread_record(json.loads(value))
    except (ValueError, RecursionError):
        return None


class SenderLeases:
    """Who sends for each channel: PREFIX-sender:CHANNEL, held by one replica at a time under a token of its
    holding, which this process renews every second for the channels it holds. A lease that lapsed is never
    renewed: its holding is over, and the next one starts from what Redis holds."""

    def __init__(self, redis: RedisConnection, prefix: str, lease: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self._hold = redis.script(HOLD_SENDER_LUA)
        self._release = redis.script(RELEASE_LOCK_LUA)
        self._lock = threading.Lock()
        self.sending: Dict[str, str] = {}  # the channels this process holds the lease of: their holdings' tokens
        self._keeper: Optional[threading.Thread] = None
        self.closed = threading.Event()

    def key(self, channel: str) -> str:
        return f"{self.prefix}-sender:{channel}"

    def token(self, channel: str) -> Optional[str]:
        with self._lock:
            return self.sending.get(channel)

    def hold(self, channel: str) -> Optional[str]:
        """Renew this process's holding of the channel's lease, or take the lease if it is free: the holding's
        token, or None."""
        token = self.token(channel)
        fresh = token is None
        token = token or os.urandom(12).hex()
        try:
            held = self.redis.run("sender", lambda: self._hold(
                keys=[self.key(channel)], args=[token, int(self.lease * 1000), int(fresh)]))
        except StoreError:
            held = 0
        if not held:
            self.lost(channel, token)
            return None
        with self._lock:
            self.sending[channel] = token
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, daemon=True, name="alert-threader-sender-leases")
                self._keeper.start()
        return token

    def check(self, channel: str) -> None:
        """LeaseLost unless this process's holding of the channel's lease goes on (asked of Redis itself: a
        process that was paused learns it here, before it posts)."""
        token = self.token(channel)
        if token is None or self.redis.run("sender", lambda: self.redis.client.get(self.key(channel))) != token:
            self.lost(channel, token)
            raise LeaseLost(f"another replica may send for {channel} now (this one's lease ran out)")

    def lost(self, channel: str, token: Optional[str]) -> None:
        with self._lock:
            if token is not None and self.sending.get(channel) == token:
                del self.sending[channel]

    def _keep(self) -> None:
        """Renew the leases of the channels this process sends for, every second, whatever the senders do."""
        while not self.closed.wait(min(1.0, self.lease / 3)):
            with self._lock:
                channels = list(self.sending)
            for channel in channels:
                try:
                    if not self.hold(channel) and not self.closed.is_set():
                        log_event(logging.WARNING, "this replica lost its lease on the channel", channel=channel)
                except Exception:  # the senders' leases lapse without it: never let one surprise stop it
                    log.exception("cannot renew the lease on channel %s", channel)

    def release(self, channel: str) -> None:
        with self._lock:
            token = self.sending.pop(channel, None)
        if token is not None:
            with contextlib.suppress(StoreError):
                self.redis.run("sender", lambda: self._release(keys=[self.key(channel)], args=[token]))

    def close(self) -> None:
        self.closed.set()
        if self._keeper is not None:
            self._keeper.join(5)  # it uses the client: not while it is closed
        for channel in list(self.sending):
            self.release(channel)


class RedisOutbox:
    """The channels' outboxes in Redis, and who sends for each.

    A stream per channel (PREFIX-outbox:CHANNEL) holds its items, an identity
    map beside it (PREFIX-outbox-ids:CHANNEL) the item waiting for each
    identity, and PREFIX-outbox-channels the channels that have one. A told
    item's result stays PREFIX-done:CHANNEL:ID for RESULTS_KEPT, for whichever replica
    took its webhook. A completion checks the channel's sender lease
    (SenderLeases) in the same script that writes."""

    ENQUEUE_PART = 1000  # items per enqueue script: about 60 ms of Redis's time
    REPLICAS_CHECKED_EVERY = 5.0  # seconds: how long "the primary has replicas" is taken as known

    def __init__(self, redis: RedisConnection, prefix: str, leases: RedisLeases, sender_lease: float,
                 min_acks: Optional[int] = None, ack_timeout: float = 0.5) -> None:
        self.min_acks, self.ack_timeout = min_acks, ack_timeout
        self._replicas: Tuple[float, int] = (-1e9, 0)  # (when seen, how many)
        self.redis = redis
        self.prefix = prefix
        self.leases = leases
        self.senders = SenderLeases(redis, prefix, sender_lease)
        self._enqueue = redis.script(ENQUEUE_LUA)
        self._complete = redis.script(COMPLETE_LUA)
        self.damaged = 0  # entries set aside since start

    def _key(self, channel: str, part: str = "") -> str:
        return f"{self.prefix}-outbox{part}:{channel}"  # outside PREFIX:*, like the leases

    def _channels_key(self) -> str:
        return f"{self.prefix}-outbox-channels"

    def enqueue(self, items: List[Item], limit: int) -> List[Tuple[str, bool]]:
        if not items:
            return []
        channel = items[0].channel
        assert all(item.channel == channel for item in items), "a webhook's alerts go to one channel"

        def add(part: List[Item], adding: int) -> Any:
            channels = set(self.redis.client.smembers(self._channels_key())) | {channel}
            args: List[Any] = [channel, limit, adding]
            for item in part:
                args += [item.identity, compact_json(item_document(item))]
            keys = [self._key(channel), self._key(channel, "-ids"), self._channels_key(),
                    *map(self._key, sorted(channels))]
            acks = self.acks_needed()
            if not acks:
                return self._enqueue(keys=keys, args=args)
            # WAIT counts the replicas that hold this connection's writes: the same connection, so a pipeline.
            pipe = self.redis.client.pipeline(transaction=False)
            self._enqueue(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", acks, max(1, int(self.ack_timeout * 1000)))
            added, acked = pipe.execute()
            if int(acked) < acks:
                raise NotReplicated(f"only {acked} of {acks} Redis replicas acknowledged the outbox write within "
                                    f"{self.ack_timeout:g}s (REDIS_MIN_REPLICAS_ACK)")
            return added
        ids: List[str] = []
        # Those that would join one waiting (a retry, an HA peer's copy) do not count against the limit.
        identities = sorted({item.identity for item in items})
        known = self.redis.run("enqueue", lambda: self.redis.client.hmget(self._key(channel, "-ids"), identities))
        adding = sum(1 for found in known if not found)
        # In parts, each a script short enough that Redis (single-threaded) serves the others meanwhile and
        # answers within its timeout. Should Redis fail between two, the webhook is answered 503 and its
        # retry finds the first parts waiting (it joins them): nothing is doubled.
        for start in range(0, len(items), self.ENQUEUE_PART):
            part = items[start:start + self.ENQUEUE_PART]
            added = self.redis.run("enqueue", lambda: add(part, 0 if start else adding))
            if added == -1:
                raise OutboxFull(f"{adding:,} more alerts would pass OUTBOX_LIMIT ({limit:,}) alerts waiting "
                                 "for Slack")
            ids += added
        taken = [(i[1:], True) if i.startswith("=") else (i, False) for i in ids]
        for item, (item_id, _) in zip(items, taken):
            item.id = item_id
        return taken

    def acks_needed(self) -> int:
        """Replicas that must acknowledge an outbox write: REDIS_MIN_REPLICAS_ACK, or (auto) 1 while the
        primary has any (INFO replication, looked at every few seconds)."""
        if self.min_acks is not None:
            return self.min_acks
        seen, count = self._replicas
        if time.monotonic() - seen > self.REPLICAS_CHECKED_EVERY:
            info = self.redis.client.info("replication")
            count = int(info.get("connected_slaves", 0)) if info.get("role") == "master" else 0
            self._replicas = (time.monotonic(), count)
        return 1 if count else 0

    def waiting(self, channel: str, after: Optional[str] = None) -> List[Item]:
        key = self._key(channel)
        entries = self.redis.run("outbox", lambda: self.redis.client.xrange(key, min=after or "-", max="+"))
        items = []
        for entry_id, fields in entries:
            if entry_id == after:
                continue
            try:
                item = item_from_document(json.loads(fields.get("item", "")), entry_id)
                if item.channel != channel:
                    raise ValueError(f"an item of channel {truncate(item.channel, 40)!r} in this one's outbox")
            except (ValueError, RecursionError) as e:
                self._set_aside(channel, entry_id, fields, str(e))
                continue
            items.append(item)
        return items

    def _set_aside(self, channel: str, entry_id: str, fields: Dict[str, str], reason: str) -> None:
        self.damaged += 1
        damaged = self._key(channel, "-damaged")
        entry = compact_json({"at": iso_now(), "id": entry_id, "reason": reason, "entry": fields})
        log_event(logging.ERROR, "outbox entry damaged; set aside, the rest is delivered", channel=channel,
                  id=entry_id, reason=truncate(reason, 200), set_aside_in=damaged)
        with contextlib.suppress(StoreError):
            self.redis.run("outbox", lambda: self.redis.client.pipeline().lpush(damaged, entry)
                           .xdel(self._key(channel), entry_id).execute())

    def tail(self, channel: str) -> Optional[str]:
        key = self._key(channel)
        newest = self.redis.run("outbox", lambda: self.redis.client.xrevrange(key, max="+", min="-", count=1))
        return newest[0][0] if newest else None

    def complete(self, channel: str, records: List[Tuple[str, str, int]], done: Dict[str, Result]) -> None:
        """Write the records (key, JSON, expiry) and take the done items out, if this process still sends."""
        held, token = self.leases.held(), self.senders.token(channel)
        args: List[Any] = [token or "", int(self.senders.lease * 1000), len(held), int(self.leases.lease * 1000),
                           len(records), int(RESULTS_KEPT), *held.values()]
        for _, text, expiry in records:
            args += [text, expiry]
        for item_id, result in done.items():
            args += [item_id, compact_json(result)]
        keys = [self.senders.key(channel), self._key(channel), self._key(channel, "-ids"), *held,
                *(key for key, _, _ in records), *(f"{self.prefix}-done:{channel}:{item_id}" for item_id in done)]
        if not self.redis.run("complete", lambda: self._complete(keys=keys, args=args)):
            self.senders.lost(channel, token)
            raise LeaseLost(f"another replica sends for {channel} now (this one's lease ran out); it wrote nothing")

    def summary(self) -> Dict[str, Tuple[int, Optional[float]]]:
        def read() -> Dict[str, Tuple[int, Optional[float]]]:
            channels = sorted(self.redis.client.smembers(self._channels_key()))
            pipe = self.redis.client.pipeline(transaction=False)
            for channel in channels:
                pipe.xlen(self._key(channel))
                pipe.xrange(self._key(channel), min="-", max="+", count=1)
            answers = pipe.execute()
            summary = {}
            for channel, length, oldest in zip(channels, answers[::2], answers[1::2]):
                if length:
                    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
                        summary[channel] = (length, float(json.loads(oldest[0][1]["item"])["received"]))
                    summary.setdefault(channel, (length, None))
            return summary
        return self.redis.run("outbox", read)

    def told(self, channel: str, ids: Sequence[str]) -> Dict[str, Result]:
        """The results of those items of the channel that were told (by any replica)."""
        if not ids:
            return {}
        values = self.redis.run("results", lambda: self.redis.client.mget(
            [f"{self.prefix}-done:{channel}:{item_id}" for item_id in ids]))
        found = {}
        for item_id, value in zip(ids, values):
            with contextlib.suppress(ValueError, TypeError):  # damaged: as if not told (yet)
                action, ts = json.loads(value)
                found[item_id] = (action, ts)
        return found


class RedisStore(ThreadStore):
    """Threads as JSON strings under PREFIX:KEY and each channel's outbox as a stream, shared by every replica.

    Work on a thread is serialised across processes by a lease (RedisLeases); a write checks it in the same
    Lua script, so a replica that lost a key never writes over another's thread. Each channel has one sender
    at a time, the replica holding PREFIX-sender:CHANNEL, which this process renews every second while it
    sends; a completion checks that lease in the script that writes it, so a replica paused past its lease
    writes nothing. Slack's turns live in Redis too. While Redis is unreachable nothing is taken or sent:
    webhooks are answered 503, and Alertmanager keeps them until it returns."""

    name = "redis"
    shared = True

    def __init__(self, url: str, prefix: str, metrics: Metrics, retention: float = 86400.0,
                 lock_timeout: float = 60.0, lease: float = 60.0, timeout: float = 1.0,
                 sender_lease: float = 5.0, connections: int = 300, sentinel_password: Optional[str] = None,
                 min_acks: Optional[int] = None) -> None:
        super().__init__(metrics, lock_timeout)
        self.redis = RedisConnection(url, timeout, lambda op, error: self._count(op, error), connections,
                                     sentinel_password)
        self.prefix = prefix
        self.retention = retention
        self.leases = RedisLeases(self.redis, prefix, lease, lock_timeout)
        self.outbox = RedisOutbox(self.redis, prefix, self.leases, sender_lease, min_acks, timeout / 2)
        self._guarded_write = self.redis.script(GUARDED_WRITE_LUA)
        self._reserve_turn = self.redis.script(RESERVE_TURN_LUA)
        self._hold_off = self.redis.script(HOLD_OFF_LUA)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def _expiry(self, record: Dict[str, Any]) -> int:
        """Seconds a record lives: closed threads for the retention, open ones for ever (0)."""
        return max(1, int(self.retention)) if record.get("status") == "closed" else 0

    # -- threads ----------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        keys = list(keys)
        if not keys:
            return {}
        values = self.redis.run("get", lambda: self.redis.client.mget([self._key(k) for k in keys]))
        records = {key: redis_record(value) for key, value in zip(keys, values)}
        return {key: record for key, record in records.items() if record is not None}

    def put_many(self, records: Dict[str, Dict[str, Any]]) -> None:
        held = self.leases.held()
        args: List[Any] = [len(held), int(self.leases.lease * 1000), *held.values()]
        for record in records.values():
            args += [compact_json(record), self._expiry(record)]
        if not self.redis.run("put", lambda: self._guarded_write(keys=[*held, *map(self._key, records)], args=args)):
            raise LeaseLost(f"another replica took over {truncate(', '.join(records), 200)} (this one's lease "
                            "ran out); nothing was written")

    @contextlib.contextmanager
    def locked(self, keys: Sequence[str]) -> Iterator[None]:
        with self._key_locks.hold(keys, self.lock_timeout), self.leases.hold(keys):
            yield

    def _scan(self) -> List[str]:
        return list(self.redis.client.scan_iter(match=self._key("*"), count=1000))

    def items(self) -> Dict[str, Dict[str, Any]]:
        def read() -> Dict[str, Dict[str, Any]]:
            names, found, strip = self._scan(), {}, len(self.prefix) + 1
            for part in chunks(names, 500):
                for name, value in zip(part, self.redis.client.mget(part)):
                    record = redis_record(value)
                    if record is not None:
                        found[name[strip:]] = record
            return found
        return self.redis.run("scan", read)

    def count(self) -> int:
        return self.redis.run("scan", lambda: len(self._scan()))

    def clear(self) -> int:
        def delete_all() -> int:
            names = self._scan()
            for part in chunks(names, 500):
                self.redis.client.delete(*part)
            self.redis.client.incr(f"{self.prefix}-generation")
            return len(names)
        return self.redis.run("clear", delete_all)

    def generation(self) -> int:
        return int(self.redis.run("get", lambda: self.redis.client.get(f"{self.prefix}-generation")) or 0)

    # -- the outbox (RedisOutbox) ------------------------------------------------

    def enqueue(self, items: List[Item], limit: int) -> List[Tuple[str, bool]]:
        return self.outbox.enqueue(items, limit)

    def waiting(self, channel: str, after: Optional[str] = None) -> List[Item]:
        return self.outbox.waiting(channel, after)

    def tail(self, channel: str) -> Optional[str]:
        return self.outbox.tail(channel)

    def complete(self, channel: str, records: Dict[str, Dict[str, Any]], done: Dict[str, Result]) -> None:
        self.outbox.complete(channel, [(self._key(key), compact_json(record), self._expiry(record))
                                       for key, record in records.items()], done)
        self._keep_results(channel, done)

    def outbox_summary(self) -> Dict[str, Tuple[int, Optional[float]]]:
        return self.outbox.summary()

    def results(self, channel: str, ids: Sequence[str]) -> Dict[str, Result]:
        found = super().results(channel, ids)
        return {**found, **self.outbox.told(channel, [i for i in ids if i not in found])}

    def wait_told(self, channel: str, ids: Sequence[str], timeout: float) -> None:
        super().wait_told(channel, ids, min(timeout, 0.1))  # another replica's news comes only by asking Redis again

    def hold_sender(self, channel: str) -> Optional[str]:
        return self.outbox.senders.hold(channel)

    def still_sending(self, channel: str) -> None:
        self.outbox.senders.check(channel)

    def release_sender(self, channel: str) -> None:
        self.outbox.senders.release(channel)

    def note_storm(self, channel: str, storm: bool) -> None:
        super().note_storm(channel, storm)
        key = f"{self.prefix}-storm:{channel}"  # short-lived: a sender that is gone leaves no storm behind
        with contextlib.suppress(StoreError):
            self.redis.run("storm", lambda: self.redis.client.set(key, "1", ex=30) if storm
                           else self.redis.client.delete(key))

    def storming(self, channel: str) -> bool:
        try:
            return bool(self.redis.run("storm", lambda: self.redis.client.exists(f"{self.prefix}-storm:{channel}")))
        except StoreError:
            return super().storming(channel)

    # -- what replicas share besides records --------------------------------------

    def reserve(self, bucket: str, interval: float, burst: int, max_wait: float) -> Optional[float]:
        try:
            wait = self.redis.run("turn", lambda: self._reserve_turn(
                keys=[f"{self.prefix}-turn:{bucket}"], args=[int(interval * 1000), burst, int(max_wait * 1000)]))
        except StoreError:
            return super().reserve(bucket, interval, burst, max_wait)
        return None if wait < 0 else wait / 1000

    def hold_off(self, bucket: str, seconds: float, interval: float, burst: int) -> None:
        super().hold_off(bucket, seconds, interval, burst)
        with contextlib.suppress(StoreError):
            self.redis.run("turn", lambda: self._hold_off(keys=[f"{self.prefix}-turn:{bucket}"],
                                                          args=[int(seconds * 1000), int(interval * 1000), burst]))

    def claim(self, name: str, seconds: float) -> bool:
        try:
            return bool(self.redis.run("claim", lambda: self.redis.client.set(
                f"{self.prefix}-claim:{name}", "1", nx=True, px=int(seconds * 1000))))
        except StoreError:
            return super().claim(name, seconds)

    # -- health ---------------------------------------------------------------------

    def ready(self) -> None:
        self.redis.run("ping", self.redis.client.ping)

    def health(self) -> Dict[str, Any]:
        with contextlib.suppress(StoreError):
            self.redis.run("ping", self.redis.client.ping)
        connected = self.redis.connected
        status: Dict[str, Any] = {"ok": connected, "redis_status": "connected" if connected else "disconnected"}
        if connected and self.redis.sentinel is not None:
            with contextlib.suppress(*self.redis.errors):
                status["redis_primary"] = self.redis.primary()
        if not connected:
            status["store_error"] = f"redis unreachable: {self.redis.last_error}"
        if self.outbox.damaged:
            status["damaged_entries"] = {"count": self.outbox.damaged,
                                         "set_aside_in": f"{self.prefix}-outbox-damaged:CHANNEL"}
        return status

    def warn_if_volatile(self) -> None:
        """Say at start when Redis keeps nothing on disk: a Redis restart would forget answered alerts."""
        with contextlib.suppress(StoreError):
            info = self.redis.run("info", lambda: self.redis.client.info("persistence"))
            if str(info.get("aof_enabled", "1")) == "0":
                log_event(logging.WARNING, "redis runs without its append-only file (appendonly no): a Redis "
                          "restart forgets the threads and the alerts waiting in the outbox, though they were "
                          "answered 200. Set appendonly yes (docs/redis.md: Redis settings)", redis=redact_url(self.redis.url))

    def stats(self) -> Dict[str, Any]:
        try:
            info = self.redis.run("info", self.redis.client.info)
        except StoreError:
            return {"redis": {"status": "disconnected"}}
        fields = ("connected_clients", "used_memory_human", "keyspace_hits", "keyspace_misses")
        return {"redis": {name: info.get(name) for name in fields}}

    def close(self) -> None:
        self.outbox.senders.close()
        self.redis.close()


# ---------------------------------------------------------------------------
# Slack client
# ---------------------------------------------------------------------------

TRANSIENT, RATE_LIMITED, CONFIGURATION, LAYOUT, THREAD_GONE, OTHER = (
    "transient", "rate_limited", "configuration", "layout", "thread_gone", "other")

TRANSIENT_ERRORS = frozenset({"internal_error", "service_unavailable", "request_timeout", "ratelimited",
                              "rate_limited", "message_limit_exceeded", "team_added_to_org", "fatal_error"})
MAYBE_DONE_ERRORS = frozenset({"fatal_error"})  # Slack: "some aspect of the operation" may have succeeded
LAYOUT_ERRORS = frozenset({"invalid_blocks", "invalid_blocks_format", "invalid_attachments", "too_many_attachments",
                           "msg_blocks_too_long", "msg_too_long", "no_text", "invalid_arguments"})
THREAD_GONE_ERRORS = frozenset({"message_not_found", "thread_not_found", "cant_update_message",
                                "restricted_action_thread_locked", "cannot_reply_to_message"})
# Permanent configuration problems, each with what the operator should do.
CONFIGURATION_ERRORS = {
    "invalid_auth": "copy the app's Bot User OAuth Token (xoxb-...) again: Slack rejects this one",
    "not_authed": "no token reached Slack: set SLACK_BOT_TOKEN or SLACK_BOT_TOKEN_FILE",
    "account_inactive": "the Slack app or its workspace was deactivated: reinstall the app and update the token",
    "token_revoked": "the token was revoked: reinstall the Slack app and update SLACK_BOT_TOKEN",
    "token_expired": "the token expired: reinstall the Slack app or turn off token rotation",
    "missing_scope": "the app lacks a scope: add chat:write (and reactions:write) and reinstall it",
    "no_permission": "the token may not post here: check the app's scopes and the channel's posting rules",
    "restricted_action": "a workspace setting forbids this post: ask a Slack admin",
    "channel_not_found": "check SLACK_CHANNEL: use the channel ID (C0123456789); for a private channel invite the bot first",
    "not_in_channel": "invite the bot: /invite @your-app in the channel",
    "is_archived": "the channel is archived: unarchive it or point SLACK_CHANNEL at another one",
    "ekm_access_denied": "Slack EKM denies access: ask a Slack admin",
    "team_access_not_granted": "the token is not granted to this workspace: check the app's installation",
    "access_denied": "Slack denies the token access: check the app's installation and scopes",
    "enterprise_is_restricted": "an Enterprise Grid policy forbids this post: ask a Slack admin",
    "restricted_action_read_only_channel": "the channel is read-only for the bot: allow it to post, or change "
                                           "SLACK_CHANNEL",
    "restricted_action_non_threadable_channel": "the channel does not allow threads: choose another SLACK_CHANNEL",
    "two_factor_setup_required": "the workspace requires two-factor setup for this token's user: ask a Slack admin",
    "accesslimited": "Slack limits access from this network: check the workspace's IP allowlist",
    "not_allowed_token_type": "this token type may not post: use the app's Bot User OAuth Token (xoxb-...)",
    "org_login_required": "the workspace is moving into an Enterprise Grid org: wait for it, or ask a Slack admin",
}


KNOWN_ERRORS = (TRANSIENT_ERRORS | LAYOUT_ERRORS | THREAD_GONE_ERRORS | set(CONFIGURATION_ERRORS)
                | {"invalid_response", "unknown_error"})


def metric_error(error: str) -> str:
    """A Slack error as a metric's label: Slack's own words are any text, so an unknown one is "other"."""
    if error in KNOWN_ERRORS or re.fullmatch(r"http_\d{3}|timeout after [\d.e+-]+s|network: \w{1,40}", error):
        return error
    return "other"


def classify_slack_error(error: str) -> str:
    if error in TRANSIENT_ERRORS:
        return TRANSIENT
    if error in CONFIGURATION_ERRORS:
        return CONFIGURATION
    if error in LAYOUT_ERRORS:
        return LAYOUT
    if error in THREAD_GONE_ERRORS:
        return THREAD_GONE
    return OTHER


class SlackError(ThreaderError):
    """A Slack call that did not succeed: transport failure, HTTP error or ok:false."""

    def __init__(self, method: str, error: str, kind: str, retry_after: float = 0.0, maybe_done: bool = False) -> None:
        super().__init__(f"Slack {method}: {error}")
        self.method = method
        self.error = error
        self.kind = kind
        self.retry_after = retry_after
        self.maybe_done = maybe_done  # the request reached Slack and its answer was lost: it may have been done
        self.for_good = False  # a post Slack refused as laid out and again as plain text: it never will take it

    @property
    def hint(self) -> str:
        if self.kind == CONFIGURATION:
            return CONFIGURATION_ERRORS.get(self.error, f"Slack's API answered {self.error}: check SLACK_API_URL "
                                                        "and any proxy on the way (the alerts wait in the outbox)")
        if self.error.startswith("timeout") and self.maybe_done:
            return ("Slack did not answer within SLACK_TIMEOUT: it may be slow, or a proxy on the way; the post may "
                    "have gone through and is sent again (raise SLACK_TIMEOUT if Slack is only slow)")
        if self.error.startswith(("network", "timeout")):
            return ("cannot reach Slack at SLACK_API_URL: check the URL, DNS, proxy and firewall "
                    "(the alerts wait in the outbox meanwhile)")
        if self.kind == RATE_LIMITED:
            return "Slack is rate limiting; the channel waits its Retry-After"
        if self.kind == TRANSIENT:
            return "Slack is having trouble; the alerts wait in the outbox and are sent again"
        if self.kind == LAYOUT:
            return "Slack rejected the message layout; sent as plain text instead"
        return "see https://api.slack.com/methods/" + self.method


class SlackAPI:
    """Calls Slack's Web API; keeps the recent calls for /preview."""

    SUCCESS = "ok"  # the result a call that went through counts as

    def __init__(self, metrics: Metrics, keep: Optional[int] = 300) -> None:
        self.metrics = metrics
        # (time, method, the JSON body sent, the answer's ts): bytes, not dicts, so that
        # the history costs little memory and nothing to the garbage collector.
        self.recent: deque = deque(maxlen=keep)

    def close(self) -> None:
        """Close what connections it keeps (none here)."""

    def call(self, method: str, payload: Dict[str, Any]) -> Dict[str, Any]:
        body = SLACK_JSON.encode(payload).encode()
        start = time.monotonic()
        try:
            response = self._call(method, body)
        except SlackError as e:
            self.metrics.inc("alert_threader_slack_requests_total", method=method, result=metric_error(e.error))
            raise
        finally:
            self.metrics.observe("alert_threader_slack_request_duration_seconds", time.monotonic() - start)
        self.metrics.inc("alert_threader_slack_requests_total", method=method, result=self.SUCCESS)
        self.recent.append((time.time(), method, body, str(response.get("ts", ""))))
        return response

    def recent_calls(self) -> List[Tuple[float, str, Dict[str, Any], str]]:
        """The recent calls with their payloads decoded: (time, method, payload, ts answered)."""
        return [(at, method, json.loads(body), ts) for at, method, body, ts in list(self.recent)]

    def _call(self, method: str, body: bytes) -> Dict[str, Any]:
        raise NotImplementedError


class DryRunSlack(SlackAPI):
    """Logs what would be sent and answers like Slack would, with a ts of the moment it was sent."""

    SUCCESS = "dry_run"  # never counted as a call Slack took

    def __init__(self, metrics: Metrics, quiet: bool = False, keep: Optional[int] = 300) -> None:
        super().__init__(metrics, keep)
        self.quiet = quiet
        self._seq = itertools.count(1)

    def _call(self, method: str, body: bytes) -> Dict[str, Any]:
        payload = json.loads(body)
        if not self.quiet:
            log_event(logging.INFO, f"dry-run: would call {method} {json.dumps(payload, ensure_ascii=False)}")
        ts = f"{int(time.time())}.{next(self._seq) % 1000000:06d}"  # unique, like Slack's, and the send time
        return {"ok": True, "ts": payload.get("ts", ts), "channel": payload.get("channel")}


class Deadlines:
    """Sockets that must be done by a moment; past it, a watcher shuts them down.

    A socket timeout bounds each read, so a peer that sends a byte now and then
    never trips it. This bounds the whole exchange: a request's head, one call
    to Slack or to Alertmanager.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: Dict[int, Tuple[float, Any]] = {}  # id(socket) -> (when, socket)
        self._late: set = set()  # shut down for being late, until unwatched
        self._thread: Optional[threading.Thread] = None
        self._wakes_at = math.inf  # when the reaper looks next, unless told sooner

    def watch(self, sock: Any, seconds: float) -> None:
        due = time.monotonic() + seconds
        with self._changed:
            self._due[id(sock)] = (due, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="alert-threader-deadlines")
                self._thread.start()
            if due < self._wakes_at:  # most deadlines fall after one already due: no need to wake the reaper
                self._changed.notify()

    def unwatch(self, sock: Any) -> bool:
        """Watch it no more; True if it was shut down for being late."""
        with self._changed:
            self._due.pop(id(sock), None)
            late = id(sock) in self._late
            self._late.discard(id(sock))
            return late

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for key, (due, sock) in list(self._due.items()):
                    if due <= now:
                        del self._due[key]
                        self._late.add(key)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                soonest = min((due for due, _ in self._due.values()), default=math.inf)
                self._wakes_at = max(now + 0.05, soonest)
                self._changed.wait(None if soonest == math.inf else self._wakes_at - now)


def peer_closed(sock: Any) -> bool:
    """Has the peer of an idle kept-alive connection closed it (or sent something unasked)?"""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After (a proxy's, a bug's) holds a channel back no longer


class SlackClient(SlackAPI):
    """Slack's Web API over http.client: one kept-alive connection per worker thread, every call timed out.

    A request is sent a second time only when a connection kept from an earlier
    call turns out to have been closed by Slack before any byte of the answer
    came back (the idle-connection race every HTTP client has): Slack cannot
    have acted on it. Once any part of an answer has arrived, a failure is
    reported, never retried here.
    """

    MAX_ANSWER = 1 << 20

    def __init__(self, api_url: str, token: str, timeout: float, metrics: Metrics) -> None:
        super().__init__(metrics)
        parts = urllib.parse.urlsplit(api_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = parts.path
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8",
                         "User-Agent": f"alert-threader/{__version__}"}
        self._local = threading.local()
        self._open: Set[http.client.HTTPConnection] = set()  # every thread's kept-alive connection, for close()
        self._open_lock = threading.Lock()
        self._ssl_context: Any = None
        self._deadlines = Deadlines()  # SLACK_TIMEOUT bounds a whole call, however slowly an answer drips

    def _connection(self) -> Tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it carried an earlier call."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and not peer_closed(conn.sock):
            return conn, True
        if conn is not None:
            self._forget(conn)
        if self._https:
            if self._ssl_context is None:
                import ssl  # only when talking TLS
                self._ssl_context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._ssl_context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._local.conn = conn
        with self._open_lock:
            self._open.add(conn)
        return conn, False

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._open_lock:
            self._open.discard(conn)

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self._forget(conn)

    def close(self) -> None:
        """Close every thread's kept-alive connection (the service stops; a check is done)."""
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()

    def _exchange(self, method: str, body: bytes) -> Tuple[int, Optional[str], bytes]:
        """One request and its whole answer, within SLACK_TIMEOUT in all: (status, Retry-After, body)."""
        for attempt in (1, 2):
            conn, reused = self._connection()
            sock, sent, late = None, False, False
            try:
                if conn.sock is None:
                    conn.connect()
                sock = conn.sock
                self._deadlines.watch(sock, self._timeout)
                try:
                    conn.request("POST", self._path + method, body, self._headers)
                    sent = True
                    response = conn.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                        ConnectionAbortedError) as e:
                    # Only a request that could not be sent, or one answered by a close without a
                    # single byte, is known not to have been acted on; any other failure may have been.
                    untouched = not sent or isinstance(e, http.client.RemoteDisconnected)
                    late = self._deadlines.unwatch(sock)
                    if late or not (untouched and reused and attempt == 1):
                        raise
                    self._drop_connection()
                    self.metrics.inc("alert_threader_slack_resends_total")
                    log_event(logging.INFO, "Slack had closed a kept-alive connection; sent once more on a new one",
                              method=method, error=type(e).__name__)
                    continue
                answer = response.read(self.MAX_ANSWER + 1)
                if len(answer) > self.MAX_ANSWER:
                    raise ValueError("answer too large")
                if self._deadlines.unwatch(sock):
                    raise socket.timeout("the answer took longer than SLACK_TIMEOUT")
                if response.will_close:
                    self._drop_connection()
                return response.status, response.getheader("Retry-After"), answer
            except (OSError, ValueError, http.client.HTTPException) as e:
                late = self._deadlines.unwatch(sock) or late or isinstance(e, socket.timeout)
                self._drop_connection()
                if late:
                    raise SlackError(method, f"timeout after {self._timeout:g}s", TRANSIENT, maybe_done=sent) from None
                raise SlackError(method, f"network: {type(e).__name__}", TRANSIENT, maybe_done=sent) from None
        raise AssertionError("unreachable: the loop returns or raises")

    def _call(self, method: str, body: bytes) -> Dict[str, Any]:
        status, retry_after, raw = self._exchange(method, body)
        if status == 429:
            try:
                wait = float(retry_after or "1")
            except ValueError:
                wait = 1.0
            raise SlackError(method, "ratelimited", RATE_LIMITED, max(0.0, min(wait, MAX_RETRY_AFTER)))
        if status >= 500:  # but a 503's, the request may have been carried out before the error
            raise SlackError(method, f"http_{status}", TRANSIENT, maybe_done=status != 503)
        if status >= 400:  # a wrong SLACK_API_URL, a proxy in the way: what waits is told once it is fixed
            raise SlackError(method, f"http_{status}", CONFIGURATION)
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SlackError(method, "invalid_response", TRANSIENT, maybe_done=True) from None
        if not isinstance(document, dict):
            raise SlackError(method, "invalid_response", TRANSIENT, maybe_done=True)
        if not document.get("ok"):
            error = str(document.get("error") or "unknown_error")[:80]
            raise SlackError(method, error, classify_slack_error(error), maybe_done=error in MAYBE_DONE_ERRORS)
        return document


# ---------------------------------------------------------------------------
# Alertmanager client: silences made from Slack
# ---------------------------------------------------------------------------

class AlertmanagerError(ThreaderError):
    """Alertmanager did not do what was asked; the message says why, for the person who asked."""


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class AlertmanagerClient:
    """Alertmanager's API v2 for silences: one request per call, over http.client with a timeout."""

    def __init__(self, auth: Optional[str], timeout: float) -> None:
        self._auth = auth
        self._timeout = timeout

    def create_silence(self, base_url: str, matchers: List[Dict[str, Any]], starts: float, ends: float,
                       created_by: str, comment: str) -> str:
        body = {"matchers": matchers, "startsAt": rfc3339(starts), "endsAt": rfc3339(ends),
                "createdBy": created_by, "comment": comment}
        document = self._request(base_url, "POST", "/api/v2/silences", body)
        silence_id = document.get("silenceID") if isinstance(document, dict) else None
        if not isinstance(silence_id, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,100}", silence_id):
            raise AlertmanagerError("Alertmanager answered without a silence ID")
        return silence_id

    def expire_silence(self, base_url: str, silence_id: str) -> None:
        self._request(base_url, "DELETE", "/api/v2/silence/" + urllib.parse.quote(silence_id, safe=""))

    def version(self, base_url: str) -> str:
        """Alertmanager's version, from GET /api/v2/status (for check): it answers, and takes the credentials."""
        document = self._request(base_url, "GET", "/api/v2/status")
        info = document.get("versionInfo") if isinstance(document, dict) else None
        return str(info.get("version", "unknown")) if isinstance(info, dict) else "unknown"

    def _request(self, base_url: str, method: str, path: str, body: Any = None) -> Any:
        parts = urllib.parse.urlsplit(base_url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=self._timeout)
        headers = {"Content-Type": "application/json", "User-Agent": f"alert-threader/{__version__}"}
        if self._auth:
            headers["Authorization"] = self._auth
        try:
            conn.request(method, parts.path.rstrip("/") + path, json.dumps(body) if body is not None else None, headers)
            response = conn.getresponse()
            answer = response.read(1 << 20)
        except socket.timeout:
            raise AlertmanagerError(f"Alertmanager at {base_url} did not answer within {self._timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise AlertmanagerError(f"cannot reach Alertmanager at {base_url} ({type(e).__name__}); check "
                                    "ALERTMANAGER_URL") from None
        finally:
            conn.close()
        if response.status in (401, 403):
            raise AlertmanagerError(f"Alertmanager refused the credentials (HTTP {response.status}); check "
                                    "ALERTMANAGER_AUTH")
        if response.status >= 400:
            detail = answer.decode("utf-8", "replace").strip().strip('"')
            raise AlertmanagerError(f"Alertmanager refused: HTTP {response.status} {truncate(detail, 200)}")
        if not answer.strip():
            return None
        try:
            return json.loads(answer)
        except ValueError:
            raise AlertmanagerError("Alertmanager answered something that is not JSON") from None


# ---------------------------------------------------------------------------
# Message building: plain functions from alerts and thread records to Slack payloads
# ---------------------------------------------------------------------------

SEVERITY_STYLE = {
    "critical": ("🚨", "#E01E5A"),
    "error": ("❌", "#E01E5A"),
    "warning": ("⚠️", "#ECB22E"),
    "info": ("ℹ️", "#2EB67D"),
    "debug": ("🐛", "#36C5F0"),
}
UNKNOWN_STYLE = ("🔔", "#ECB22E")
FIRING, RESOLVED = "f", "r"  # an alert's state in a stored record
RESOLVED_STYLE = ("✅", "#2EB67D")
STORM_EMOJI = "🌩️"
SEVERITY_RANK = {"critical": 0, "error": 1, "warning": 2, "info": 3, "debug": 4}

HEADER_MAX, SECTION_MAX, FIELD_MAX, CONTEXT_MAX, BUTTON_TEXT_MAX, URL_MAX = 150, 3000, 2000, 10, 75, 3000
FIELDS_MAX = 10
# Slack refuses a message whose blocks carry about 12,000 characters of text in all (msg_blocks_too_long).
TEXT_BUDGET = 11000
LINES_PER_DIGEST_MESSAGE = 20
DIGEST_MEMBERS_KEPT = 5000  # past this, a digest's resolved members are kept as counts


def severity_style(severity: str) -> Tuple[str, str]:
    return SEVERITY_STYLE.get(severity.lower(), UNKNOWN_STYLE)


def alert_title(alert: Alert, ms: MessageSettings) -> str:
    return clean_text(ms.title.render(alert, ms.environment)).strip() or "Alert"


def slack_time(epoch: Optional[float], ms: MessageSettings) -> str:
    """A time in mrkdwn: a Slack date token, so each reader sees their own time zone; TIME_ZONE's as fallback."""
    written = format_time(epoch, ms.time_zone)
    if epoch is None or epoch < 0:
        return written
    return f"<!date^{int(epoch)}^{{date_short_pretty}} {{time_secs}}|{written}>"


def matcher(name: str, value: str) -> str:
    """name="value", a silence matcher as Alertmanager's filter syntax writes it."""
    return name + '="' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def silence_url(base: str, labels: Dict[str, str], whole: bool = True,
                fallback: Sequence[str] = KEPT_LABELS) -> Optional[str]:
    """Alertmanager's new-silence form pre-filled with matchers for these labels.

    Every label when they fit (and all of them are known: `whole`), else the thread key's and the instance."""
    if not is_http_url(base):
        return None
    base = without_credentials(base)  # a record stored before webhooks were stripped of them may hold some
    prefix = base.rstrip("/") + "/#/silences/new?filter="
    fallback_names = [n for n in dict.fromkeys(fallback) if n in labels]
    for names in ((sorted(labels), fallback_names) if whole else (fallback_names,)):
        matchers = [matcher(name, labels[name]) for name in names]
        # Percent-encoding only lengthens: a filter already too long as text cannot fit.
        if not matchers or len(prefix) + sum(len(text) + 2 for text in matchers) > URL_MAX:
            continue
        url = prefix + urllib.parse.quote("{" + ", ".join(matchers) + "}", safe="")
        if len(url) <= URL_MAX:
            return url
    return None


def header_block(text: str) -> Dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": truncate(clean_text(text), HEADER_MAX, utf16=True),
                                       "emoji": True}}


def section_block(text: str) -> Dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip_escaped(text, SECTION_MAX)}}


def context_block(*texts: str) -> Dict[str, Any]:
    return {"type": "context",
            "elements": [{"type": "mrkdwn", "text": clip_escaped(t, SECTION_MAX)} for t in texts[:CONTEXT_MAX]]}


def link_button(label: str, action_id: str, url: str) -> Dict[str, Any]:
    return {"type": "button", "action_id": action_id, "url": url,
            "text": {"type": "plain_text", "text": label, "emoji": True}}


def link_buttons(*candidates: Tuple[str, str, Any]) -> List[Dict[str, Any]]:
    """Link buttons for the (label, action_id, url) whose url is safe http(s), without a user:password@."""
    return [link_button(label, action_id, without_credentials(url)) for label, action_id, url in candidates
            if is_http_url(url)]


def silence_menu(ms: MessageSettings) -> Dict[str, Any]:
    """The Silence control when Slack's interactivity is on: a duration to choose."""
    return {"type": "static_select", "action_id": "silence",
            "placeholder": {"type": "plain_text", "text": "🔕 Silence…", "emoji": True},
            "options": [{"text": {"type": "plain_text", "text": f"for {label}"}, "value": label}
                        for label, _ in ms.silence_durations]}


def alert_buttons(alert: Alert, ms: MessageSettings, external_url: str, silence: bool = True,
                  controls: Optional[List[Dict[str, Any]]] = None, block_id: str = "",
                  silence_labels: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """Runbook, Silence (pointless once resolved), Grafana's dashboard and panel, and Source: safe http(s) only.

    With interactivity on, `controls` (a Silence menu, Ack) take the place of the Silence link, but for
    Grafana's alerts, which only Grafana can silence. The link silences `silence_labels` if given (a card of
    several alerts: its thread), else the alert."""
    runbook = alert.annotations.get("runbook_url", "")
    if alert.grafana:  # Grafana's own silence page (one alert's: none on a card of several, whose replies have
        # theirs); Alertmanager's form could not silence a Grafana alert
        link = alert.links.get("silence")
        silence_link = link if silence and silence_labels is None and is_http_url(link) else None
    elif controls is not None:
        silence_link = None
    elif silence:  # built from a checked base URL and percent-encoded matchers: safe by construction
        labels, whole, fallback = ((silence_labels, True, tuple(silence_labels)) if silence_labels is not None
                                   else (alert.labels, alert.labels_whole, ms.key_names(alert.labels) + ("instance",)))
        silence_link = silence_url(external_url, labels, whole, fallback)
    else:
        silence_link = None
    silencing = [link_button("Silence", "silence", silence_link)] if silence_link else []
    silencing += [c for c in controls or () if not (alert.grafana and c.get("action_id") == "silence")]
    elements = link_buttons(("View Runbook", "runbook", runbook)) + silencing + link_buttons(
        ("Dashboard", "dashboard", alert.links.get("dashboard")), ("Panel", "panel", alert.links.get("panel")),
        ("Source", "source", alert.generator_url))
    if not elements:
        return None
    block: Dict[str, Any] = {"type": "actions", "elements": elements}
    if block_id:
        block["block_id"] = block_id
    return block


FIELD_TITLES = {"persistentvolumeclaim": "PVC", "statefulset": "StatefulSet",
                "daemonset": "DaemonSet"}
# The labels that name a Kubernetes workload, in the order a message shows them, and those of them that name it.
WORKLOAD_LABELS = ("namespace", "pod", "deployment", "statefulset", "daemonset", "job_name", "persistentvolumeclaim",
                   "container", "node")
WORKLOAD_NAMES = ("pod", "deployment", "statefulset", "daemonset", "job_name", "persistentvolumeclaim")
# The exporters whose scrape target is not what an alert is about: kube-state-metrics and the kubelet report on
# workloads; node_exporter on its node (its instance), not on the pod it runs in.
SCRAPE_LABELS = ("service", "instance", "job", "endpoint", "metrics_path")


def exporter_labels(labels: Dict[str, str]) -> Set[str]:
    """The labels of an alert that describe the exporter that reported it, not the thing that is broken: the
    scrape target's of kube-state-metrics and the kubelet, and node_exporter's pod (kube-prometheus-stack)."""
    job, service = labels.get("job", ""), labels.get("service", "")
    if job in ("kube-state-metrics", "kubelet") or service.endswith(("kube-state-metrics", "-kubelet")):
        # A metric without its own pod or container label keeps the exporter's (honorLabels): not the workload.
        own = {n for n in ("pod", "container") if "kube-state-metrics" in labels.get(n, "")}
        return set(SCRAPE_LABELS) | own
    if job == "node-exporter" or service.endswith("node-exporter"):
        return (set(SCRAPE_LABELS) - {"instance"}) | {"pod", "container", "namespace"}
    return set()


def workload_labels(labels: Dict[str, str], exporter: Optional[Set[str]] = None) -> List[str]:
    """The workload labels of an alert that name what it is about (not its exporter), in WORKLOAD_LABELS order."""
    if not any(labels.get(n) for n in WORKLOAD_LABELS):
        return []
    exporter = exporter_labels(labels) if exporter is None else exporter
    return [n for n in WORKLOAD_LABELS if labels.get(n) and n not in exporter]


def subject(labels: Dict[str, str]) -> str:
    """What an alert is about, in a few words: namespace/pod (or deployment, ...), the node, namespace/job, or
    the instance; "" for an alert shaped like the seed's, whose title and fields say it."""
    exporter = exporter_labels(labels)
    workload = workload_labels(labels, exporter)
    if not workload:
        return labels.get("instance", "") if exporter and "instance" not in exporter else ""
    name = next((labels[n] for n in WORKLOAD_NAMES if n in workload), "")
    if not name and "node" in workload:
        return labels["node"]
    if not name and labels.get("job") and "job" not in exporter:
        name = labels["job"]  # a scrape job's own alert (TargetDown): the job is what is down
    namespace = labels.get("namespace", "") if "namespace" in workload else ""
    return "/".join(part for part in (namespace, name) if part)


# The labels that tell a thread's alerts apart, in the order a reply names them (the first two by value alone).
APART_ORDER = ("pod", "instance") + WORKLOAD_NAMES[1:] + ("container", "node", "device", "mountpoint")
APART_RANK = {name: rank for rank, name in enumerate(APART_ORDER)}


def about(alert: Alert, ms: MessageSettings) -> str:
    """What an alert is about (its subject), unless its title says so already."""
    what = subject(alert.labels)
    return "" if what in alert_title(alert, ms) else what


LabelSpread = Tuple[int, Dict[str, Dict[str, int]]]


def label_spread(record: Dict[str, Any]) -> LabelSpread:
    """How many of a thread's alerts have their labels kept, and for each label how many have each value: what
    told_apart compares with, counted once for a message however many of its lines it tells apart."""
    kept, counts = 0, {}  # type: Tuple[int, Dict[str, Dict[str, int]]]
    for entry in record.get("alerts", {}).values():
        labels = entry[3] if len(entry) > 3 else None  # an entry stored before 1.1 has no labels
        if labels:
            kept += 1
            for name, value in labels.items():
                values = counts.setdefault(name, {})
                values[value] = values.get(value, 0) + 1
    return kept, counts


def told_apart(alert: Alert, record: Dict[str, Any], ms: MessageSettings,
               spread: Optional[LabelSpread] = None) -> str:
    """What tells this alert apart from the other alerts of its thread: the labels whose values differ between
    them (a pod or instance by its value, others as name=value), else what it is about; what its title says
    already is not said again, and an alert alone in its thread is told as the seed tells it."""
    alerts = record.get("alerts", {})
    others = len(alerts) - (alert.fingerprint in alerts)
    kept, counts = spread or label_spread(record)
    own = alerts.get(alert.fingerprint)
    own_labels = own[3] if own and len(own) > 3 and own[3] else {}
    kept_others = kept - bool(own_labels)

    def differs(name: str) -> bool:  # some other alert whose labels are kept has another value, or none
        value = alert.labels[name]
        same = counts.get(name, {}).get(value, 0) - (own_labels.get(name) == value)
        return same < kept_others

    skip = exporter_labels(alert.labels) | set(ms.hidden)
    names = sorted((n for n in alert.labels if n not in skip and not n.startswith("__") and differs(n)),
                   key=lambda n: (APART_RANK.get(n, 99), n))
    if not names:
        what = subject(alert.labels) or (alert.labels.get("instance", "") if others else "")
        return "" if what in alert_title(alert, ms) else what
    # The pod or instance leads even when the others share it: the next alert to join may not.
    identity = next((n for n in APART_ORDER[:2] if alert.labels.get(n) and n not in skip), None)
    if identity and identity not in names:
        names.insert(0, identity)
    title = alert_title(alert, ms)
    parts = [f"{n}={alert.labels[n]}" if n not in APART_ORDER[:2] else alert.labels[n] if alert.labels[n] not in title
             else "" for n in names[:3]]  # a pod or instance the title names already is not said twice
    return truncate_middle(" · ".join(part for part in parts if part), 100)


def field_title(name: str) -> str:
    return FIELD_TITLES.get(name) or name.replace("_", " ").capitalize()


def field_pairs(alert: Alert, ms: MessageSettings) -> List[Tuple[str, str]]:
    """The fields a message shows: MESSAGE_FIELDS, or the seed's when the alert has them, then its other labels.

    An alert about a Kubernetes workload shows that first (namespace, pod, ...), and not the exporter that
    reported it; an alert shaped like the seed's keeps the seed's layout."""
    labels = alert.labels
    if ms.fields:  # a label; else "environment" is ENVIRONMENT and "value" Grafana's evaluated value
        pairs = [(field_title(n), labels.get(n) or {"environment": ms.environment, "value": alert.value}.get(n, ""))
                 for n in ms.fields]
        return [(t, v.upper() if t == "Severity" else v) for t, v in pairs if v][:FIELDS_MAX]
    reporter = exporter_labels(labels)
    exporter = reporter if ms.hidden else set()  # HIDDEN_LABELS=none: every label is shown
    workload = workload_labels(labels, reporter)
    seed = [(n, labels.get(n, "")) for n in ("service", "cluster", "instance") if n not in exporter]
    seed = [(n, labels[n]) for n in workload] + seed
    pairs = [("Severity", alert.severity.upper()), ("Environment", ms.environment)]
    pairs += [(field_title(n), v) for n, v in seed] + [("Value", alert.value)]
    shown = {"severity", "service", "cluster", "instance", *workload, *exporter, *ms.hidden, *ms.key_labels}
    rest = sorted((n for n in labels if n not in shown and not n.startswith("__")),
                  key=lambda n: (LABEL_RANK.get(n, len(LABEL_ORDER)), n))
    pairs += [(field_title(n), labels[n]) for n in rest[:FIELDS_MAX]]
    return [(t, v) for t, v in pairs if v][:FIELDS_MAX]


def fields_block(pairs: List[Tuple[str, str]], value_max: int = FIELD_MAX - 120) -> Dict[str, Any]:
    return {"type": "section", "fields": [
        {"type": "mrkdwn", "text": f"*{mrkdwn(title, 100)}:*\n" + mrkdwn(value, value_max)} for title, value in pairs]}


def time_line(alert: Alert, ms: MessageSettings, resolved: bool) -> str:
    line = f"*Started:* {slack_time(alert.starts_at, ms)}"
    if resolved:
        ended = alert.ends_at if alert.ends_at is not None else time.time()
        line += f" | *Resolved:* {slack_time(ended, ms)}"
        if alert.starts_at is not None:
            line += f" (after {format_duration(ended - alert.starts_at)})"
    return line


def context_text(alert: Alert, ms: MessageSettings) -> str:
    """env=… | alertname=…, and the other labels of the thread key that no field shows."""
    shown = {"severity", "service", "cluster", "instance", "alertname", *workload_labels(alert.labels)}
    extra = [f"{n}={alert.labels[n]}" for n in ms.key_labels if n not in shown and alert.labels.get(n)]
    return mrkdwn(" | ".join([f"env={ms.environment}", f"alertname={alert.alertname}"] + extra), 1000)


def text_length(blocks: List[Dict[str, Any]]) -> int:
    """The characters of text a message's blocks carry, as Slack adds them up (msg_blocks_too_long)."""
    total = 0
    for block in blocks:
        text = block.get("text")
        if isinstance(text, dict):
            total += len(text["text"])
        for item in block.get("fields") or block.get("elements") or ():
            text = item.get("text")
            total += len(text["text"] if isinstance(text, dict) else text or "")
    return total


def alert_blocks(alert: Alert, ms: MessageSettings, title: str, external_url: str,
                 status_line: Optional[str] = None, resolved: bool = False, silence: bool = True,
                 controls: Optional[List[Dict[str, Any]]] = None, block_id: str = "",
                 notes: Sequence[str] = (), silence_labels: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """The seed's layout: header, fields, description, links, times, context; within Slack's whole-text limit."""
    pairs = field_pairs(alert, ms)
    description = clean_text(ms.text.render(alert, ms.environment)).strip()

    def build(description_max: int, value_max: int) -> List[Dict[str, Any]]:
        blocks = [header_block(title)]
        if status_line:
            blocks.append(section_block(status_line))
        if notes:
            blocks.append(context_block(*notes))
        if pairs:
            blocks.append(fields_block(pairs, value_max))
        if description and description_max > 0:
            blocks.append(section_block("*Description:*\n" + mrkdwn(description, description_max)))
        if alert.links.get("image") and is_http_url(alert.links["image"]):
            blocks.append({"type": "image", "image_url": alert.links["image"], "alt_text": truncate(title, 100)})
        buttons = alert_buttons(alert, ms, external_url, silence and not resolved, controls, block_id, silence_labels)
        if buttons:
            blocks.append(buttons)
        blocks.append(context_block(time_line(alert, ms, resolved)))
        blocks.append(context_block(context_text(alert, ms)))
        return blocks

    blocks = build(SECTION_MAX - 20, FIELD_MAX - 120)
    excess = text_length(blocks) - TEXT_BUDGET
    if excess > 0:  # the description gives way first, then each field alike
        blocks = build(max(0, SECTION_MAX - 20 - excess), FIELD_MAX - 120)
        excess = text_length(blocks) - TEXT_BUDGET
        value_max = FIELD_MAX - 120
        for _ in range(12):  # then the fields, the long ones (only they shrink) by their share of the excess
            if excess <= 0 or value_max <= 20:
                break
            long_fields = sum(1 for _, value in pairs if len(mrkdwn(value, value_max)) >= value_max // 2) or 1
            value_max = max(20, value_max - excess // long_fields - 1)
            blocks = build(0, value_max)
            excess = text_length(blocks) - TEXT_BUDGET
    return blocks


def message(channel: str, text: str, color: str, blocks: List[Dict[str, Any]],
            thread_ts: Optional[str] = None) -> Dict[str, Any]:
    """A chat.postMessage payload: fallback text plus one coloured attachment of blocks."""
    payload: Dict[str, Any] = {"channel": channel, "text": text,
                               "attachments": [{"color": color, "blocks": blocks}],
                               "unfurl_links": False, "unfurl_media": False}
    if thread_ts:
        payload["thread_ts"] = thread_ts
    return payload


def fallback_text(alert: Alert, ms: MessageSettings, kind: str, mention: str = "",
                  summary: Optional[str] = None, what: Optional[str] = None) -> str:
    """The message's text: what notifications show (and, first, whom it mentions); `summary`: alert_title's, if
    made; `what`: what the alert is about or what tells it apart in its thread (default: its subject)."""
    summary = mrkdwn(alert_title(alert, ms) if summary is None else summary, 500)
    what = about(alert, ms) if what is None else what
    summary += f" · {mrkdwn(what, 100)}" if what else ""
    if kind == "resolved":
        return f"✅ RESOLVED — {summary}"
    emoji = severity_style(alert.severity)[0]
    prefix = "FIRING AGAIN — " if kind == "refire" else ""
    text = (f"{emoji} {prefix}[{mrkdwn(alert.severity.upper() or 'ALERT', 50)}] {summary} "
            f"({mrkdwn(ms.environment, 80)})")
    return f"{mention} {text}" if mention else text


def render_alert(alert: Alert, channel: str, ms: MessageSettings, kind: str, thread_ts: Optional[str] = None,
                 external_url: str = "", mention: str = "", broadcast: bool = False,
                 notes: Sequence[str] = (), what: Optional[str] = None) -> Dict[str, Any]:
    """A reply or standalone message for one alert; kind is firing, refire or resolved; notes go under its title.

    Its title and text name `what` tells it apart from its thread's other alerts (default: what it is about)."""
    summary = alert_title(alert, ms)
    what = clean_text(about(alert, ms) if what is None else what).strip()
    if kind == "resolved":
        emoji, color = RESOLVED_STYLE
        title = f"{emoji} RESOLVED — "
    else:
        emoji, color = severity_style(alert.severity)
        title = f"{emoji} {'FIRING AGAIN — ' if kind == 'refire' else ''}"
    if what:  # the summary gives way, so that the header keeps what tells the alert apart
        what = truncate_middle(what, 60)
        title += truncate(summary, HEADER_MAX - utf16_units(title + what) - 3, utf16=True) + " · " + what
    else:
        title += summary
    interactive = ms.interactive and kind != "resolved"
    blocks = alert_blocks(alert, ms, title, external_url, resolved=kind == "resolved",
                          controls=[silence_menu(ms)] if interactive else None,
                          block_id=f"alert:{alert.fingerprint}" if interactive and alert.fingerprint else "",
                          notes=notes)
    payload = message(channel, fallback_text(alert, ms, kind, mention, summary, what), color, blocks, thread_ts)
    if broadcast and thread_ts:
        payload["reply_broadcast"] = True
    return payload


def render_plain(alert: Alert, channel: str, ms: MessageSettings, kind: str,
                 thread_ts: Optional[str] = None, what: Optional[str] = None) -> Dict[str, Any]:
    """The plain-text message sent when Slack rejects a layout: just the essentials, escaped."""
    lines = [fallback_text(alert, ms, kind, what=what),
             f"Severity: {mrkdwn(alert.severity.upper() or '-', 50)} | "
             f"Instance: {mrkdwn(alert.labels.get('instance', '-'), 300)}",
             time_line(alert, ms, kind == "resolved").replace("*", "")]
    runbook = alert.annotations.get("runbook_url", "")
    if is_http_url(runbook):
        lines.append("Runbook: " + escape_mrkdwn(without_credentials(runbook)))
    payload: Dict[str, Any] = {"channel": channel, "text": "\n".join(lines),
                               "unfurl_links": False, "unfurl_media": False}
    if thread_ts:
        payload["thread_ts"] = thread_ts
    return payload


def plain_version(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Any message as plain text: its fallback and every mrkdwn text of its blocks (already escaped)."""
    lines = [payload.get("text", "")]
    for attachment in payload.get("attachments", []):
        for block in attachment.get("blocks", []):
            if block.get("type") in ("section", "context"):
                items = [block["text"]] if "text" in block else []
                items += block.get("fields", []) + block.get("elements", [])
                lines += [item["text"] for item in items if item.get("type") == "mrkdwn"]
    plain = {k: v for k, v in payload.items() if k not in ("attachments", "blocks")}
    plain["text"] = clip_escaped("\n".join(line for line in lines if line), 3900)
    return plain


def alert_from_record(first: Dict[str, Any]) -> Alert:
    return Alert(status="firing", labels=first.get("labels", {}), annotations=first.get("annotations", {}),
                 starts_at=first.get("startsAt"), ends_at=None, generator_url=first.get("generatorURL", ""),
                 fingerprint="", labels_whole=not first.get("labels_clipped"), grafana=bool(first.get("grafana")),
                 links=first.get("links", {}), value=first.get("value", ""))


def card_status(record: Dict[str, Any], ms: MessageSettings) -> str:
    states = [entry[0] for entry in record.get("alerts", {}).values()]
    firing, resolved = states.count("f"), states.count("r")
    reopened = record.get("reopened", 0)
    again = f" · reopened {reopened}×" if reopened else ""
    starts = [e[1] for e in record.get("alerts", {}).values() if e[1] is not None]
    since = min(starts) if starts else record.get("first", {}).get("startsAt")  # the earliest, not the first told
    if record.get("status") == "closed":
        first = since
        after = f" after {format_duration(record['ended'] - first)}" if record.get("ended") and first else ""
        noun = "alert" if resolved == 1 else "alerts"
        return f"*Status:* ✅ {resolved} {noun} resolved{after}{again}"
    since_text = f" · since {slack_time(since, ms)}" if since else ""
    return f"*Status:* 🔥 {firing} firing · {resolved} resolved{since_text}{again}"


def active_silence(record: Dict[str, Any], scope: str = "thread") -> Optional[Dict[str, Any]]:
    """The silence made from Slack that still holds for this scope (the thread, or one alert's fingerprint)."""
    for silence in reversed(record.get("silences", [])):
        if silence.get("scope") == scope and not silence.get("expired") and silence.get("until", 0) > time.time():
            return silence
    return None


def card_controls(record: Dict[str, Any], ms: MessageSettings) -> List[Dict[str, Any]]:
    """A card's controls with interactivity on: Silence (or Unsilence) and Ack."""
    silence = active_silence(record)
    if silence:
        first = {"type": "button", "action_id": "unsilence", "value": silence["id"],
                 "text": {"type": "plain_text", "text": "🔔 Unsilence", "emoji": True}}
    else:
        first = silence_menu(ms)
    return [first, {"type": "button", "action_id": "ack", "value": "ack",
                    "text": {"type": "plain_text", "text": "👀 Ack", "emoji": True}}]


def card_notes(record: Dict[str, Any], ms: MessageSettings) -> List[str]:
    """What was done from Slack, under the card's status: who silenced it until when, who acknowledged it."""
    notes = []
    silence = active_silence(record)
    if silence:
        notes.append(f"🔕 *Silenced* until {slack_time(silence['until'], ms)} by {mrkdwn(silence['by'], 80)}")
    acks = record.get("acks", [])
    if acks:
        notes.append("👀 *Acknowledged* by " + ", ".join(
            f"{mrkdwn(ack['name'], 80)} ({slack_time(ack['at'], ms)})" for ack in acks[:10]))
    return notes


def render_card(record: Dict[str, Any], channel: str, ms: MessageSettings, mention: str = "") -> Dict[str, Any]:
    """The parent message as a status card: the first alert's details under the thread's state."""
    alert = alert_from_record(record.get("first", {}))
    closed = record.get("status") == "closed"
    emoji, color = RESOLVED_STYLE if closed else severity_style(alert.severity)
    summary = alert_title(alert, ms)
    title = f"{emoji} {'RESOLVED — ' if closed else ''}{summary}"
    controls = card_controls(record, ms) if ms.interactive and not closed else None
    several = len(record.get("alerts", {})) > 1  # its Silence covers every alert of the thread, not the first
    blocks = alert_blocks(alert, ms, title, record.get("first", {}).get("externalURL", ""),
                          status_line=card_status(record, ms), silence=not closed, controls=controls,
                          block_id="card" if controls else "", notes=card_notes(record, ms),
                          silence_labels=thread_labels(record, ms) if several else None)
    # Several alerts: the text names what they share (the namespace of their key), not the first one's pod.
    shared = thread_labels(record, ms).get("namespace", "") if several else None
    text = fallback_text(alert, ms, "resolved" if closed else "firing", mention, summary,
                         None if shared is None or shared in summary else shared)
    payload = message(channel, text, color, blocks)
    if record.get("ts"):
        payload["ts"] = record["ts"]
    return payload


def thread_labels(record: Dict[str, Any], ms: MessageSettings) -> Dict[str, str]:
    """The labels every alert of a thread shares: its group's (THREAD_BY=group), else the thread key's."""
    first = record.get("first", {})
    labels = first.get("labels", {})
    names = ms.key_names(labels)
    if names != ms.key_labels and record.get("key") == ms.legacy_key(alert_from_record(first)):
        names = ms.key_labels  # a thread keyed before namespaces were (1.1) may hold several namespaces
    return first.get("group_labels") or {name: labels.get(name, "") for name in names}


def count_lines(counts: Dict[str, int], limit: int, label: Callable[[str], str]) -> List[str]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    lines = [f"• {label(name)}: {n:,}" for name, n in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"• … and {len(ordered) - limit:,} more")
    return lines


def pack_sections(head: str, lines: List[str]) -> List[Dict[str, Any]]:
    """Lines into as few sections as Slack's 3000-character limit allows."""
    blocks, text = [], head
    for line in lines:
        if len(text) + len(line) + 1 > SECTION_MAX:
            blocks.append(section_block(text))
            text = line
        else:
            text = f"{text}\n{line}" if text else line
    if text:
        blocks.append(section_block(text))
    return blocks[:45]


def digest_counts(storm: Dict[str, Any]) -> Tuple[int, int, Dict[str, int], Dict[str, int]]:
    """(alerts, resolved, by alertname, by severity) of a storm digest, counted from its members."""
    members = list(storm.get("members", {}).values())
    # A digest stored before members were kept carries counters instead.
    total = storm.get("firing", 0) + len(members)
    resolved = storm.get("resolved", 0) + sum(1 for state, _, _ in members if state == RESOLVED)
    by_name, by_severity = dict(storm.get("by_name", {})), dict(storm.get("by_severity", {}))
    for _, name, severity in members:
        by_name[name] = by_name.get(name, 0) + 1
        by_severity[severity] = by_severity.get(severity, 0) + 1
    return total, resolved, by_name, by_severity


def render_digest(storm: Dict[str, Any], channel: str, ms: MessageSettings, mention: str = "") -> Dict[str, Any]:
    """The parent of a storm digest: counts by alertname and severity, and its state."""
    total, resolved, by_name_counts, severities = digest_counts(storm)
    closed = storm.get("status") == "closed"
    worst = min(severities, key=lambda s: SEVERITY_RANK.get(s, 5), default="")
    color = RESOLVED_STYLE[1] if closed else severity_style(worst)[1]
    again = f" · reopened {storm['reopened']}×" if storm.get("reopened") else ""
    if closed:
        title = f"✅ Alert storm over: all {total:,} alerts resolved"
        status = f"*Status:* ✅ {resolved:,} resolved"
        if storm.get("ended") and storm.get("started"):
            status += f" after {format_duration(storm['ended'] - storm['started'])}"
    else:
        title = f"{STORM_EMOJI} Alert storm: {total - resolved:,} alerts firing"
        status = f"*Status:* 🔥 {total - resolved:,} firing · {resolved:,} resolved"
        if storm.get("started"):
            status += f" · since {slack_time(storm['started'], ms)}"
    by_name = count_lines(by_name_counts, 30, lambda n: "*" + mrkdwn(n or "(no alertname)", 120) + "*")
    by_severity = count_lines(severities, 10, lambda s: f"{severity_style(s)[0]} {mrkdwn(s or 'none', 40)}")
    blocks = [header_block(title), section_block(status + again)]
    blocks += pack_sections("*By alertname:*", by_name)
    blocks += pack_sections("*By severity:*", by_severity)
    blocks.append(context_block(mrkdwn(f"env={ms.environment} | {total:,} alerts", 500),
                                "So many new alerts at once that they are listed in this thread instead of "
                                "opening threads of their own; their resolves land here too."))
    text = f"{STORM_EMOJI} Alert storm: {total:,} alerts ({mrkdwn(ms.environment, 80)})"
    text = f"{mention} {text}" if mention else text
    payload = message(channel, text, color, blocks)
    if storm.get("ts"):
        payload["ts"] = storm["ts"]
    return payload


def digest_line(alert: Alert, ms: MessageSettings, note: str = "", what: Optional[str] = None) -> str:
    """One alert on one line of a compact message; `note` (plain words) after it, like "firing again"; `what`
    tells it apart from its thread's other alerts (default: its instance, namespace and pod)."""
    emoji = RESOLVED_STYLE[0] if alert.status == "resolved" else severity_style(alert.severity)[0]
    parts = [f"*{mrkdwn(alert.alertname or '-', 60)}*"]
    names = ("instance", "namespace", "pod") if what is None else ()
    parts += [mrkdwn(what, 100)] if what else []
    for name in names:
        if alert.labels.get(name):
            parts.append(mrkdwn(alert.labels[name], 50))
    parts.append(mrkdwn(alert_title(alert, ms), 80))
    if note:
        parts.append(note)
    return clip_escaped(f"{emoji} " + " · ".join(parts), 160)


def render_batch(alerts: List[Alert], channel: str, ms: MessageSettings, thread_ts: Optional[str], resolved: bool,
                 notes: Sequence[str] = (), note: str = "", broadcast: bool = False,
                 whats: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A compact message listing up to twenty alerts, one line each (`notes`: a word for each, or none)."""
    n = len(alerts)
    head = (f"*✅ {n} resolved*" if resolved else f"*🔥 {n} firing*") + note
    color = RESOLVED_STYLE[1] if resolved else severity_style(
        min((a.severity for a in alerts), key=lambda s: SEVERITY_RANK.get(s, 5), default=""))[1]
    names = ", ".join(sorted({mrkdwn(a.alertname or "-", 60) for a in alerts}))
    text = clip_escaped(f"{'✅' if resolved else '🔥'} {n} {'resolved' if resolved else 'firing'}: {names}", 500)
    lines = [digest_line(a, ms, notes[i] if i < len(notes) else "", whats[i] if whats else None)
             for i, a in enumerate(alerts)]
    payload = message(channel, text, color, pack_sections(head, lines), thread_ts)
    if broadcast and thread_ts:
        payload["reply_broadcast"] = True
    return payload


# ---------------------------------------------------------------------------
# The plan: what the waiting alerts do to their threads (pure functions)
# ---------------------------------------------------------------------------
#
# A channel's sender takes everything waiting in its outbox and plans from that
# backlog, the stored records and the settings. decide() says what one alert
# does to its thread, decide_lines() does it for the whole backlog in order,
# storm_mode() says whether the channel is in a storm, and plan_turn() makes
# messages of it all, each carrying the records as they will be once Slack has
# taken it. Nothing here calls Slack, writes a record or reads a clock.

# What one alert does to its thread.
POST, REPLY, REFIRE, REOPEN, RESOLVE, ORPHAN, UNCHANGED = (
    "post", "reply", "refire", "reopen", "resolve", "orphan", "unchanged")
# How each step is reported in the answer's results (action).
ACTIONS = {POST: "posted", REPLY: "replied", REFIRE: "replied", REOPEN: "reopened", RESOLVE: "replied",
           ORPHAN: "standalone", UNCHANGED: "unchanged"}
# How a single alert's reply is drawn, by step, and which BROADCAST transition it is.
REPLY_KINDS = {REPLY: "firing", REFIRE: "refire", REOPEN: "refire", RESOLVE: "resolved"}
TRANSITIONS = {REPLY: "new", REFIRE: "refire", REOPEN: "reopen", RESOLVE: "resolve"}
FIRED_AND_RESOLVED = "fired and resolved before it could be posted"


def closes(record: Dict[str, Any], alert: Alert) -> bool:
    """Would this alert's resolve close the thread (every other alert of it resolved already)?"""
    return alert.status == "resolved" and record.get("status") == "open" and all(
        entry[0] == RESOLVED for fingerprint, entry in record["alerts"].items() if fingerprint != alert.fingerprint)


def alert_entry(alert: Alert, state: str) -> List[Any]:
    """An alert as its thread keeps it: [state, startsAt, endsAt, its labels (None if too long to keep whole)]."""
    labels, whole = clip_for_record(alert.labels, ())
    whole = whole and alert.labels_whole
    return [state, alert.starts_at, alert.ends_at if state == RESOLVED else None, labels if whole else None]


def first_alert(alert: Alert, external_url: str) -> Dict[str, Any]:
    """What the status card needs of the thread's first alert, clipped to what it can show."""
    labels, whole = clip_for_record(alert.labels, KEPT_LABELS)
    annotations, _ = clip_for_record(alert.annotations, ("summary", "description", "runbook_url"))
    first: Dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": alert.starts_at}
    if not (whole and alert.labels_whole):
        first["labels_clipped"] = True  # matchers built from these labels would silence too much
    if is_http_url(alert.generator_url):
        first["generatorURL"] = alert.generator_url
    if is_http_url(external_url):
        first["externalURL"] = external_url
    if alert.grafana:
        first["grafana"] = True
    links = {name: url for name, url in alert.links.items() if is_http_url(url)}
    if links:
        first["links"] = links
    if alert.value:
        first["value"] = truncate(alert.value, FIELD_MAX)
    return first


def later(a: Optional[float], b: Optional[float]) -> bool:
    """Is start time a clearly after start time b (a new episode of the same alert)?"""
    return a is not None and b is not None and a > b + 1.0


def reopenable(record: Dict[str, Any], alert: Alert, window: float) -> bool:
    """Fired again within `window` of closing, measured by the alerts' own times (replays change nothing)."""
    if window <= 0 or record.get("ended") is None:
        return False
    starts = alert.starts_at if alert.starts_at is not None else time.time()
    return starts - record["ended"] <= window


def decide(record: Optional[Dict[str, Any]], alert: Alert, reopen_window: float) -> str:
    """What one alert does to its thread, from the stored record alone (a pure function)."""
    entry = record["alerts"].get(alert.fingerprint) if record else None
    if alert.status == "firing":
        if record is None:
            return POST
        if entry and not later(alert.starts_at, entry[1]):
            return UNCHANGED  # told already: a repeat, a retry, or a late copy of an episode that resolved
        if record["status"] == "open":
            return REFIRE if entry else REPLY
        return REOPEN if reopenable(record, alert, reopen_window) else POST
    if record is None:
        return ORPHAN
    if entry and (entry[0] == RESOLVED or later(entry[1], alert.starts_at)):
        return UNCHANGED  # resolved already, or the resolve of an older episode than the one told
    return RESOLVE


def close_record(record: Dict[str, Any], alert: Alert, now: float) -> None:
    ends = [e[2] for e in record["alerts"].values() if e[0] == RESOLVED and e[2] is not None]
    record["status"], record["closed"] = "closed", now
    record["ended"] = max(ends) if ends else (alert.ends_at or now)


# A thread remembers at most this many alerts (past it the oldest resolved go first), and keeps whole labels,
# for a reply's Silence, for at most this many characters across them: however many alerts share a key, its
# record stays a size that is cheap to rewrite on every change.
THREAD_ALERTS_MAX = 2000
THREAD_LABELS_BUDGET = 256 * 1024


def entry_chars(entry: Optional[List[Any]]) -> int:
    labels = entry[3] if entry and len(entry) > 3 else None
    return sum(map(len, labels)) + sum(map(len, labels.values())) if labels else 0


def remember_alert(record: Dict[str, Any], alert: Alert, state: str) -> None:
    """Store the alert's entry in its thread's record, within THREAD_ALERTS_MAX and THREAD_LABELS_BUDGET."""
    alerts = record["alerts"]
    entry = alert_entry(alert, state)
    kept, size = record.get("label_chars", 0) - entry_chars(alerts.get(alert.fingerprint)), entry_chars(entry)
    if kept + size > THREAD_LABELS_BUDGET:
        entry[3], size = None, 0  # its reply's Silence then says to silence it in Alertmanager
    alerts[alert.fingerprint] = entry
    kept += size
    while len(alerts) > THREAD_ALERTS_MAX:
        oldest = next((fp for fp, e in alerts.items() if e[0] == RESOLVED and fp != alert.fingerprint),
                      next(fp for fp in alerts if fp != alert.fingerprint))
        kept -= entry_chars(alerts.pop(oldest))
    record["label_chars"] = kept


def apply_step(record: Dict[str, Any], alert: Alert, step: str, now: float) -> bool:
    """Change the record as `step` does (in place); True when it closed the thread."""
    record["updated"] = now
    if alert.status == "firing":
        remember_alert(record, alert, FIRING)
        if step == REOPEN:
            record["status"], record["closed"] = "open", None
            record["reopened"] = record.get("reopened", 0) + 1
        return False
    remember_alert(record, alert, RESOLVED)
    if record["status"] == "open" and all(e[0] == RESOLVED for e in record["alerts"].values()):
        close_record(record, alert, now)
        return True
    return False


def new_record(alert: Alert, thread_key: str, channel: str, external_url: str, now: float) -> Dict[str, Any]:
    return {"ts": "", "channel": channel, "key": thread_key, "status": "open",
            "created": now, "updated": now, "closed": None, "ended": None, "reopened": 0,
            "first": first_alert(alert, external_url), "alerts": {}}


def usable(record: Optional[Dict[str, Any]], channel: str) -> Optional[Dict[str, Any]]:
    """A stored thread, unless it lives in another channel (the channel changed): then none."""
    if record is None or record.get("channel", channel) != channel:
        return None
    return record


def copied(record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A record to change without changing the one it was made from."""
    return json.loads(STORED_JSON.encode(record)) if record is not None else None


FULL_REPLIES = 3  # up to this many alerts of a quiet thread are replies of their own; more share compact ones
# A turn plans for the oldest PLAN_WINDOW alerts waiting (50 compact messages, at Slack's pace 50 s of posts):
# a plan is made again after each message while alerts arrive, so its cost must not grow with the backlog.
# With a STORM_THRESHOLD near it or above, the window is twice the threshold: a storm must fit in it to be seen.
PLAN_WINDOW = 1000
# A target (a thread, the digest, the channel's standalone resolves) that took BUSY_MESSAGES messages, or a
# compact one, within BUSY_WINDOW is busy: its next alerts wait up to HOLD to share a compact message, until
# it has been quiet for BUSY_WINDOW. A card is edited at most every CARD_EVERY. All in SLACK_PACEs: with
# pacing off, nothing waits.
BUSY_MESSAGES, BUSY_WINDOW, HOLD, CARD_EVERY = 3, 10, 5, 3


@dataclasses.dataclass(frozen=True)
class Rules:
    """The settings a plan follows, SLACK_PACE's rhythms in seconds."""

    messages: MessageSettings = dataclasses.field(default_factory=MessageSettings)
    reopen_window: float = 1800.0
    storm_threshold: int = 10
    storm_window: float = 60.0
    pace: float = 1.0

    @classmethod
    def of(cls, config: Config) -> "Rules":
        return cls(config.messages, config.reopen_window, config.storm_threshold, config.storm_window,
                   config.slack_pace)

    @property
    def hold(self) -> float:
        return HOLD * self.pace

    @property
    def busy_window(self) -> float:
        return BUSY_WINDOW * self.pace

    @property
    def card_every(self) -> float:
        return CARD_EVERY * self.pace

    @property
    def plan_window(self) -> int:
        """How many of the oldest waiting alerts a turn plans for."""
        return max(PLAN_WINDOW, 2 * (self.storm_threshold + 1))


@dataclasses.dataclass
class ChannelState:
    """What a channel's sender remembers between turns (in memory: a restart or a takeover starts afresh)."""

    storm: bool = False
    arrivals: Dict[str, float] = dataclasses.field(default_factory=dict)  # new threads' keys -> when they came
    # target -> its recent messages: (when, whether it was compact)
    sent: Dict[str, List[Tuple[float, bool]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Line:
    """An alert to tell, what it does to its thread, and where it is told."""

    item: Item  # the alert told: when it fired and resolved while waiting, its resolve
    step: str
    target: str  # its thread's store key, the channel's digest (storm|C) or its standalone resolves (orphans|C)
    fired: Optional[Item] = None  # its firing, waiting before its resolve: both are told as one

    @property
    def items(self) -> List[Item]:
        return [self.fired, self.item] if self.fired else [self.item]

    @property
    def note(self) -> str:
        if self.fired:
            return FIRED_AND_RESOLVED
        return "firing again" if self.step in (REFIRE, REOPEN) else ""


# A message as Slack gets it: its payload (thread_ts set for a reply), what to send instead if Slack refuses
# the layout (None: plain_version of it), and for a reply its thread's parent, posted again if the thread is gone.
Drawn = Tuple[Dict[str, Any], Optional[Dict[str, Any]], Optional[Dict[str, Any]]]


@dataclasses.dataclass
class Message:
    """One chat.postMessage of a plan, and all that follows once Slack has taken it.

    It is drawn (its Block Kit made) only when it is about to be sent: a plan made again for every alert
    that arrives meanwhile draws only the message it sends."""

    kind: str  # open, reply, compact, digest (the storm digest's parent), lines (in a digest), standalone
    target: str
    draw: Callable[[], Drawn]
    records: Dict[str, Dict[str, Any]]  # as they are once it is posted; a "ts" of "" takes the post's own
    done: List[Tuple[Item, str]] = dataclasses.field(default_factory=list)  # the items it tells, their action
    before: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)  # a reply's thread before it
    cards: Dict[str, Tuple[bool, bool]] = dataclasses.field(default_factory=dict)  # key -> (edit, ✅ due)
    _drawn: Optional[Drawn] = dataclasses.field(default=None, repr=False)

    def drawn(self) -> Drawn:
        if self._drawn is None:
            self._drawn = self.draw()
        return self._drawn

    @property
    def payload(self) -> Dict[str, Any]:
        return self.drawn()[0]

    @property
    def plain(self) -> Optional[Dict[str, Any]]:
        return self.drawn()[1]

    @property
    def parent(self) -> Optional[Dict[str, Any]]:
        return self.drawn()[2]


@dataclasses.dataclass
class Plan:
    """What one turn does: alerts told already, the messages to post in order, the channel's storm state."""

    unchanged: List[Tuple[Item, Optional[str]]]  # told already (a repeat): the item, its thread's ts
    messages: List[Message]
    storm: bool
    arrivals: Dict[str, float]
    wake_at: Optional[float] = None  # when alerts held back to share a message are due (None: none are)
    # digest key -> {fingerprint: member entry} of the alerts on their way into it: its card counts them too
    coming: Dict[str, Dict[str, List[str]]] = dataclasses.field(default_factory=dict)


def storm_mode(was_storm: bool, waiting: int, arrived: int, threshold: int) -> bool:
    """Is the channel in a storm? It starts when more new threads than the threshold wait to be opened, or
    arrived within STORM_WINDOW; it ends only when both have fallen to half of it, so that it cannot flicker."""
    return max(waiting, arrived) > (threshold // 2 if was_storm else threshold)


def fired_before(items: List[Item]) -> Dict[str, Item]:
    """For each waiting resolve, the firing of the same episode waiting before it: told together, as one."""
    firing: Dict[str, Item] = {}
    pairs: Dict[str, Item] = {}
    for item in items:
        alert = item.alert
        if alert.status == "firing":
            firing[alert.fingerprint] = item
            continue
        fired = firing.pop(alert.fingerprint, None)
        if fired and not later(alert.starts_at, fired.alert.starts_at) and not later(fired.alert.starts_at,
                                                                                     alert.starts_at):
            pairs[item.id] = fired
    return pairs


def decide_lines(backlog: List[Item], records: Dict[str, Dict[str, Any]], channel: str, window: float,
                 now: float) -> Tuple[List[Line], List[Tuple[Item, Optional[str]]]]:
    """What each waiting alert does, in order, deciding on a copy of its thread's record as the steps change it.

    A new thread's lines are told in it (or, in a storm, in the digest: plan_turn's choice); a digest member's,
    in the digest; a resolve with no thread, standalone."""
    by_key: Dict[str, List[Item]] = {}
    for item in backlog:
        by_key.setdefault(item.key, []).append(item)
    lines: List[Line] = []
    unchanged: List[Tuple[Item, Optional[str]]] = []
    for key, items in by_key.items():
        stored = usable(records.get(key), channel)
        scratch = copied(stored)
        pairs = fired_before(items)
        paired = {fired.id for fired in pairs.values()}
        told = False
        for item in items:
            if item.id in paired:
                continue
            fired = pairs.get(item.id)
            if fired is not None and decide(scratch, fired.alert, window) == UNCHANGED:
                unchanged.append((fired, scratch.get("ts") if scratch else None))  # its firing was told already
                fired = None
            step = decide(scratch, (fired or item).alert, window)
            if step == UNCHANGED:  # a repeat: of what Slack has, or of a copy about to open the thread (no ts yet)
                unchanged.append((item, scratch.get("ts") if scratch else None))
                continue
            if step == POST:
                if told:
                    break  # after news of this key (its thread's close, a standalone resolve): the new thread
                    # opens in the next turn, once the news is recorded
                scratch = {"status": "open", "alerts": {}}  # what decide reads of the thread it opens
            told = True
            if scratch is None:
                lines.append(Line(item, step, f"orphans|{channel}"))
                continue
            for alert, its_step in ([(fired.alert, step), (item.alert, RESOLVE)] if fired else [(item.alert, step)]):
                apply_step(scratch, alert, its_step, now)
            member = step != POST and stored is not None and stored.get("digest")
            if member and member not in records:
                member = f"storm|{channel}"  # its digest is gone: the channel's takes its news
            lines.append(Line(item, step, member or key, fired))
    return lines, unchanged


def recent_arrivals(known: Dict[str, float], new: Dict[str, float], now: float, window: float,
                    cap: int) -> Dict[str, float]:
    """The keys of new threads that arrived within the window (at most cap of them: the newest)."""
    arrivals = {key: at for key, at in known.items() if at > now - window}
    for key, at in new.items():
        if key not in arrivals and at > now - window:
            arrivals[key] = at
    if len(arrivals) > cap:
        arrivals = dict(sorted(arrivals.items(), key=lambda kv: kv[1])[-cap:])
    return arrivals


def is_digest(target: str, records: Dict[str, Dict[str, Any]], channel: str) -> bool:
    """Is this target a digest: the channel's (storm|C), or one from before 1.1? Known by what it is, not by
    its name, which a thread's key may share ("storm|critical|…" for an alert named storm)."""
    return target == f"storm|{channel}" or bool(records.get(target, {}).get("storm"))


def plan_turn(backlog: List[Item], records: Dict[str, Dict[str, Any]], channel: str, state: ChannelState,
              rules: Rules, now: float) -> Plan:
    """The messages a turn posts, in order: new threads first, then every target whose alerts are due.

    A target that opens this turn (a thread, the digest) gets only its parent: its other alerts go in the
    next turn's plan, in the thread the parent started."""
    lines, unchanged = decide_lines(backlog, records, channel, rules.reopen_window, now)
    new = {}
    for line in lines:
        if line.step == POST:
            new.setdefault(line.item.key, line.item.received)
    arrivals = recent_arrivals(state.arrivals, new, now, rules.storm_window, rules.storm_threshold + 1)
    storm = storm_mode(state.storm, len(new), len(arrivals), rules.storm_threshold)
    digest_key = f"storm|{channel}"
    joining = {line.item.key for line in lines if storm and line.step == POST}
    targets: Dict[str, List[Line]] = {}
    for line in lines:
        if line.item.key in joining and line.target == line.item.key:
            line.target = digest_key  # a new thread in a storm joins the digest, and so do its other alerts
        targets.setdefault(line.target, []).append(line)
    opening, rest, wake_at = [], [], None
    for target, its_lines in targets.items():
        if target == digest_key:
            digest = usable(records.get(digest_key), channel)
            if digest is None or (digest["status"] == "closed" and any(ln.step == POST for ln in its_lines)):
                opening.append(digest_parent(digest_key, channel, its_lines, rules.messages, now))
                continue
        elif its_lines[0].step == POST:
            opening.append(open_thread(its_lines[0], channel, rules.messages, now))
            continue
        recent = [compact for at, compact in state.sent.get(target, ()) if at > now - rules.busy_window]
        busy = len(recent) >= BUSY_MESSAGES or any(recent)
        due = min(ln.item.received for ln in its_lines) + rules.hold
        if busy and due > now and len(its_lines) < LINES_PER_DIGEST_MESSAGE:
            wake_at = due if wake_at is None else min(wake_at, due)  # held back, to share one message later
            continue
        rest.append((due, target, its_lines, busy))
    messages = opening
    for _, target, its_lines, busy in sorted(rest, key=lambda entry: entry[0]):
        if is_digest(target, records, channel):
            messages += digest_messages(records[target], records, its_lines, channel, rules.messages, now)
        elif target == f"orphans|{channel}":
            messages += standalone_messages(its_lines, channel, rules.messages, busy, now)
        else:
            messages += thread_messages(records[target], target, its_lines, channel, rules.messages, busy, now)
    coming = {target: {ln.item.alert.fingerprint: member_entry(ln.item.alert) for ln in its_lines}
              for target, its_lines in targets.items() if is_digest(target, records, channel)}
    return Plan(unchanged, messages, storm, arrivals, wake_at, coming)


def open_thread(line: Line, channel: str, ms: MessageSettings, now: float) -> Message:
    """A new thread's parent: the status card, drawn for its first alert (closed, when it resolved already)."""
    item, first = line.item, line.fired or line.item
    record = new_record(first.alert, item.thread_key, channel, item.external_url, now)
    if item.group_labels:  # what a silence of the whole thread matches
        record["first"]["group_labels"] = item.group_labels
    for told, step in ([(line.fired, POST), (item, RESOLVE)] if line.fired else [(item, POST)]):
        apply_step(record, told.alert, step, now)
    closed = record["status"] == "closed"

    def draw() -> Drawn:
        card = render_card(record, channel, ms, mention="" if closed else ms.mentions_for([item.alert]))
        return card, render_plain(item.alert, channel, ms, "resolved" if closed else "firing"), None
    return Message("open", item.key, draw, {item.key: record}, [(i, "posted") for i in line.items],
                   cards={item.key: (False, True)} if closed else {})


def thread_messages(record: Dict[str, Any], key: str, lines: List[Line], channel: str, ms: MessageSettings,
                    busy: bool, now: float) -> List[Message]:
    """A thread's news: a reply each for a few alerts of a quiet thread, else compact replies of twenty."""
    full = len(lines) <= FULL_REPLIES and not busy
    if full:
        groups = [[line] for line in lines]
    else:
        groups = [part for resolved in (False, True)
                  for part in chunks([ln for ln in lines if (ln.item.alert.status == "resolved") == resolved],
                                     LINES_PER_DIGEST_MESSAGE)]
    messages = []
    for group in groups:
        message = (reply_message if full else compact_reply)(record, key, group, channel, ms, now)
        messages.append(message)
        record = message.records[key]
    return messages


def told_in(record: Dict[str, Any], lines: List[Line], now: float) -> Tuple[Dict[str, Any], bool]:
    """The record once these lines are told in it, and whether that closed it."""
    after = copied(record)
    assert after is not None
    was_open = after["status"] == "open"
    for line in lines:
        for told, step in ([(line.fired, line.step), (line.item, RESOLVE)] if line.fired else
                           [(line.item, line.step)]):
            apply_step(after, told.alert, step, now)
    return after, was_open and after["status"] == "closed"


def new_parent(record: Dict[str, Any], item: Item, ms: MessageSettings) -> Dict[str, Any]:
    """A thread's parent, drawn again for a thread whose first one is gone."""
    if record.get("first"):
        return render_card(record, item.channel, ms)
    return render_alert(item.alert, item.channel, ms, "firing", external_url=item.external_url)


def reply_message(record: Dict[str, Any], key: str, lines: List[Line], channel: str, ms: MessageSettings,
                  now: float) -> Message:
    """One alert's reply of its own in its thread."""
    line = lines[0]
    item, alert, step = line.item, line.item.alert, line.step
    after, closing = told_in(record, lines, now)
    transition = "resolve" if line.fired else TRANSITIONS[step]
    broadcast = transition in ms.broadcast or ("close" in ms.broadcast and closes(record, alert))
    kind = "resolved" if line.fired else REPLY_KINDS[step]

    def draw() -> Drawn:
        mention = ms.mentions_for([alert]) if step == REOPEN and not line.fired else ""
        what = told_apart(alert, after, ms)
        payload = render_alert(alert, channel, ms, kind, record["ts"], item.external_url, mention=mention,
                               broadcast=broadcast, notes=[line.note.capitalize()] if line.fired else (), what=what)
        plain_kind = "resolved" if alert.status == "resolved" else "firing"
        return (payload, render_plain(alert, channel, ms, plain_kind, record["ts"], what),
                new_parent(record, item, ms))
    return Message("reply", key, draw, {key: after}, [(i, ACTIONS[step]) for i in line.items], {key: record},
                   {key: (True, closing)})


def compact_reply(record: Dict[str, Any], key: str, lines: List[Line], channel: str, ms: MessageSettings,
                  now: float) -> Message:
    """Up to twenty alerts of one thread in one reply, a line each."""
    resolved = lines[0].item.alert.status == "resolved"
    after, closing = told_in(record, lines, now)
    transitions = {"resolve" if ln.fired else TRANSITIONS[ln.step] for ln in lines} | ({"close"} if closing else set())

    def draw() -> Drawn:
        spread = label_spread(after)
        payload = render_batch([ln.item.alert for ln in lines], channel, ms, record["ts"], resolved,
                               notes=[ln.note for ln in lines], broadcast=bool(transitions & set(ms.broadcast)),
                               whats=[told_apart(ln.item.alert, after, ms, spread) for ln in lines])
        reopened = ms.mentions_for([ln.item.alert for ln in lines if ln.step == REOPEN and not ln.fired])
        if reopened:
            payload["text"] = f"{reopened} {payload['text']}"
        return payload, None, new_parent(record, lines[0].item, ms)
    return Message("compact", key, draw, {key: after}, [(i, ACTIONS[ln.step]) for ln in lines for i in ln.items],
                   {key: record}, {key: (True, closing)})


def fold_resolved_members(storm: Dict[str, Any]) -> None:
    """A digest kept open for weeks by one alert that never resolves gathers every later storm's members: its
    resolved ones become counters (as a digest of before 1.1 keeps them), so that it stays the size of what
    still fires. Its counts stay as they were."""
    members, resolved = {}, storm.get("resolved", 0)
    by_name, by_severity = dict(storm.get("by_name", {})), dict(storm.get("by_severity", {}))
    for fingerprint, (state, name, severity) in storm["members"].items():
        if state != RESOLVED:
            members[fingerprint] = [state, name, severity]
            continue
        resolved += 1
        by_name[name] = by_name.get(name, 0) + 1
        by_severity[severity] = by_severity.get(severity, 0) + 1
    storm["firing"] = storm.get("firing", 0) + len(storm["members"]) - len(members)
    storm.update(members=members, resolved=resolved, by_name=by_name, by_severity=by_severity)


def member_entry(alert: Alert) -> List[str]:
    """A digest's note of one of its alerts: [state, alertname, severity]."""
    state = RESOLVED if alert.status == "resolved" else FIRING
    return [state, truncate(alert.alertname, 120), truncate(alert.severity.lower(), 40)]


def digest_parent(digest_key: str, channel: str, lines: List[Line], ms: MessageSettings, now: float) -> Message:
    """The storm digest's parent, drawn counting every alert on its way into it."""
    starts = [ln.item.alert.starts_at for ln in lines if ln.item.alert.starts_at is not None]
    storm = {"ts": "", "channel": channel, "key": digest_key, "storm": True, "status": "open", "created": now,
             "updated": now, "closed": None, "ended": None, "reopened": 0, "started": min(starts, default=now),
             "members": {}}
    counted = dict(storm, members={ln.item.alert.fingerprint: member_entry(ln.item.alert) for ln in lines})

    def draw() -> Drawn:
        return render_digest(counted, channel, ms, mention=ms.mentions_for(ln.item.alert for ln in lines)), None, None
    return Message("digest", digest_key, draw, {digest_key: storm})


def digest_messages(storm: Dict[str, Any], records: Dict[str, Dict[str, Any]], lines: List[Line], channel: str,
                    ms: MessageSettings, now: float) -> List[Message]:
    """A digest's news, twenty alerts to a compact reply: members joining, firing again, resolving."""
    messages = []
    for resolved in (False, True):
        group = [ln for ln in lines if (ln.item.alert.status == "resolved") == resolved]
        for part in chunks(group, LINES_PER_DIGEST_MESSAGE):
            message = digest_lines(storm, records, part, channel, ms, now)
            messages.append(message)
            storm = message.records[storm["key"]]
            records = {**records, **message.records}
    return messages


def digest_lines(storm: Dict[str, Any], records: Dict[str, Dict[str, Any]], lines: List[Line], channel: str,
                 ms: MessageSettings, now: float) -> Message:
    """One compact reply in the digest; its members and the digest as they are once it is posted."""
    digest_key = storm["key"]
    # Its member table is shared with the digest as it was, entry by entry (entries are replaced, never changed):
    # a storm of thousands is a plan of a hundred messages, not a hundred copies of thousands.
    storm = dict(storm, members=dict(storm.get("members", {})))
    if storm["status"] == "closed":  # members firing again: the storm is back
        storm["status"], storm["closed"] = "open", None
        storm["reopened"] = storm.get("reopened", 0) + 1
    changed: Dict[str, Dict[str, Any]] = {}
    for line in lines:
        key, alert = line.item.key, line.item.alert
        member = changed.get(key) or (copied(records.get(key)) if line.step != POST else None)
        if member is None or not member.get("digest"):
            member = {"ts": storm["ts"], "channel": channel, "key": line.item.thread_key, "status": "open",
                      "digest": digest_key, "created": now, "updated": now, "closed": None, "ended": None,
                      "alerts": {}}
        for told, step in ([(line.fired, line.step), (line.item, RESOLVE)] if line.fired else
                           [(line.item, line.step)]):
            apply_step(member, told.alert, step, now)
        member["ts"] = storm["ts"]
        changed[key] = member
        known = storm.setdefault("members", {})
        if alert.status == "resolved" and "firing" in storm and alert.fingerprint not in known:
            storm["resolved"] = storm.get("resolved", 0) + 1  # a digest of before 1.1 counts its own
        else:
            known[alert.fingerprint] = member_entry(alert)
        if alert.status == "resolved" and alert.ends_at is not None:
            storm["ended"] = max(storm.get("ended") or 0, alert.ends_at)
    if len(storm["members"]) > DIGEST_MEMBERS_KEPT:
        fold_resolved_members(storm)
    total, told_resolved, _, _ = digest_counts(storm)
    closing = storm["status"] == "open" and told_resolved >= total
    if closing:
        storm["status"], storm["closed"] = "closed", now
        storm["ended"] = storm.get("ended") or now
    storm["updated"] = now
    resolved = lines[0].item.alert.status == "resolved"

    def draw() -> Drawn:
        payload = render_batch([ln.item.alert for ln in lines], channel, ms, storm["ts"], resolved,
                               notes=[ln.note for ln in lines])
        return payload, None, render_digest(storm, channel, ms)
    done = [(i, "digest" if ln.step in (POST, REPLY, REFIRE) else ACTIONS[ln.step]) for ln in lines for i in ln.items]
    return Message("lines", digest_key, draw, {**changed, digest_key: storm}, done, {digest_key: records[digest_key]},
                   {digest_key: (True, closing)})


def standalone_messages(lines: List[Line], channel: str, ms: MessageSettings, busy: bool,
                        now: float) -> List[Message]:
    """Resolves with no known thread: one of its own for a single one, else twenty to a message."""
    return [standalone(part, channel, ms, len(lines) == 1 and not busy, now)
            for part in chunks(lines, LINES_PER_DIGEST_MESSAGE)]


def standalone(lines: List[Line], channel: str, ms: MessageSettings, alone: bool, now: float) -> Message:
    """One message of resolves with no known thread: the alert's own layout when alone, else a list."""
    def draw() -> Drawn:
        if alone:
            alert = lines[0].item.alert
            return (render_alert(alert, channel, ms, "resolved", None, lines[0].item.external_url),
                    render_plain(alert, channel, ms, "resolved"), None)
        return render_batch([ln.item.alert for ln in lines], channel, ms, None, True,
                            note=" · no thread was known for these"), None, None
    records: Dict[str, Dict[str, Any]] = {}
    for line in lines:
        item = line.item
        record = records.get(item.key)
        if record is None:
            record = records[item.key] = new_record(item.alert, item.thread_key, channel, item.external_url, now)
            if not alone:
                del record["first"]  # a list of many: never to be redrawn as one alert's card
        apply_step(record, item.alert, ORPHAN, now)
    return Message("standalone", f"orphans|{channel}", draw, records, [(ln.item, "standalone") for ln in lines])


def untold(items: List[Item], channel: str, why: str) -> Message:
    """Alerts this code failed to plan or lay out (a bug, or a record it cannot read), told as plain text
    without their thread: one bad alert must not hold its channel's outbox back for ever."""
    def draw() -> Drawn:
        lines = [f"⚠️ alert-threader could not {why} {len(items)} alert{'s' if len(items) != 1 else ''} (its log "
                 "says why); as received:"]
        room = max(60, 3600 // max(1, len(items)))  # every alert named, the most important labels first
        for item in items:
            alert = item.alert
            labels = ", ".join(f"{name}={value}" for name, value in sorted(
                alert.labels.items(), key=lambda label: (label[0] not in KEY_LABELS + ("instance",), label[0])))
            lines.append(f"{'✅' if alert.status == 'resolved' else '🔥'} {mrkdwn(labels, room)}")
        return {"channel": channel, "text": clip_escaped("\n".join(lines), 3900)}, None, None
    return Message("standalone", f"orphans|{channel}", draw, {}, [(item, "standalone") for item in items])


def plan_sparing(backlog: List[Item], records: Dict[str, Dict[str, Any]], channel: str, state: ChannelState,
                 rules: Rules, now: float) -> Plan:
    """plan_turn; should it fail, the plan for every thread it does not fail for, and the alerts of those
    it fails for told as plain text."""
    try:
        return plan_turn(backlog, records, channel, state, rules, now)
    except Exception:
        log.exception("cannot plan some alerts of channel %s; they are told as plain text, without a thread", channel)
    by_key: Dict[str, List[Item]] = {}
    for item in backlog:
        by_key.setdefault(item.key, []).append(item)
    failing: List[Item] = []
    for items in by_key.values():
        try:
            plan_turn(items, records, channel, ChannelState(), rules, now)
        except Exception:
            failing += items
    ids = {item.id for item in failing}
    rest = [item for item in backlog if item.id not in ids]
    planned = Plan([], [], state.storm, state.arrivals)
    try:
        if rest:
            planned = plan_turn(rest, records, channel, state, rules, now)
    except Exception:  # it fails only with them all: every one is told as plain text
        log.exception("cannot plan the alerts of channel %s together either", channel)
        failing = backlog
    planned.messages[:0] = [untold(part, channel, "plan") for part in chunks(failing, LINES_PER_DIGEST_MESSAGE)]
    return planned


def drawable(message: Message, channel: str) -> Message:
    """The message, drawn; should drawing fail, its alerts as plain text (or, for a digest's parent, a plain
    parent)."""
    try:
        message.drawn()
        return message
    except Exception:
        log.exception("cannot lay out a %s message in channel %s; it is sent as plain text", message.kind, channel)
    if message.done:
        return untold([item for item, _ in message.done], channel, "lay out")
    text = "⚠️ alert-threader could not lay out this message (its log says why)"
    return dataclasses.replace(message, draw=lambda: ({"channel": channel, "text": text}, None, None), _drawn=None)


# ---------------------------------------------------------------------------
# The executor: the only code that calls Slack and writes records
# ---------------------------------------------------------------------------

class Stopping(ThreaderError):
    """The service is stopping: the sender leaves what it was waiting to send in the outbox."""


class Unrecorded(StoreError):
    """Slack took a post that the store could not then record: nothing more is posted until it is recorded."""

    def __init__(self, cause: StoreError, posted: bool, told: bool) -> None:
        super().__init__(str(cause))
        self.posted = posted  # the message itself went (else only the new parent of its moved thread did)
        self.told = told  # its alerts leave the outbox with the record held back (posted, or dropped)


class LogLimiter:
    """At most one log line a second per reason; the lines held back are counted on the next one."""

    def __init__(self, every: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._every = every
        self._last: Dict[str, Tuple[float, int]] = {}  # reason -> (when last written, held back since)

    def log(self, level: int, reason: str, message: str, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(reason, (-math.inf, 0))
            if now - last < self._every:
                self._last[reason] = (last, held + 1)
                return
            self._last[reason] = (now, 0)
            while len(self._last) > 1000:  # reasons carry what an outside party said: keep them bounded
                del self._last[next(iter(self._last))]
        log_event(level, message, **fields, **({"repeated": held} if held else {}))


class Poster:
    """Slack's Web API for the lifecycle: each call in its turn, and what Slack says of it remembered.

    Turns are shared by every worker (and every replica on Redis): about one
    chat.postMessage a second per channel with a short burst, and a budget of
    their own for chat.update and reactions.add (Tier 3, about 50 a minute).
    A 429's Retry-After holds the turn back for everyone. A call is made once:
    what a failure means is the caller's business.
    """

    POST_EVERY, POST_BURST = 1.0, 3
    EDIT_EVERY, EDIT_BURST = 60 / 50, 5
    LONGEST_TURN = 3600.0

    def __init__(self, slack: SlackAPI, store: ThreadStore, metrics: Metrics, pace: float,
                 stopping: threading.Event) -> None:
        self.slack = slack
        self.store = store
        self.metrics = metrics
        self.stopping = stopping
        self.post_every, self.edit_every = pace * self.POST_EVERY, pace * self.EDIT_EVERY
        self._lock = threading.Lock()
        self.last_error: Optional[Dict[str, Any]] = None
        # False while Slack refuses our configuration (token, scope, channel): /health says so, with the fix.
        self.delivering = True
        self.failing_since: Optional[float] = None  # when posts began to fail (monotonic), None while they go
        # An edit Slack can never take (channel_not_found, not_in_channel, is_archived), with its fix.
        self.edit_problem: Optional[Dict[str, Any]] = None
        self.dropped: Optional[Tuple[int, str, float]] = None  # alerts Slack refused for good: how many, why, when
        self._warned_reactions = False
        self._log = LogLimiter()

    def _bucket(self, method: str, payload: Dict[str, Any]) -> Tuple[str, float, int]:
        if method in ("chat.postMessage", "chat.postEphemeral"):
            return f"post:{payload.get('channel', '')}", self.post_every, self.POST_BURST
        return f"edit:{method}", self.edit_every, self.EDIT_BURST

    def call(self, method: str, payload: Dict[str, Any], wait: bool = True,
             guard: Optional[Callable[[], Any]] = None) -> Optional[Dict[str, Any]]:
        """One call in its turn; with wait False only if a turn is free now (None if not). SlackError if it fails.
        `guard` is asked once the turn has come, just before the call (it raises to stop it)."""
        bucket, every, burst = self._bucket(method, payload)
        turn = self.store.reserve(bucket, every, burst, self.LONGEST_TURN if wait else 0.0)
        if turn is None:
            return None
        if turn > 0:
            self.metrics.inc("alert_threader_slack_wait_seconds_total", turn, bucket=bucket)
            if self.stopping.wait(turn):
                raise Stopping("stopping")
        if guard is not None:
            guard()
        try:
            response = self.slack.call(method, payload)
        except SlackError as e:
            if e.kind == RATE_LIMITED:
                self.metrics.inc("alert_threader_slack_refused_total", method=method)
                self.metrics.inc("alert_threader_slack_rate_limit_wait_seconds_total", e.retry_after)
                self.store.hold_off(bucket, e.retry_after, every, burst)  # for every worker, not only this one
            if method == "chat.postMessage":
                self.note_error(e)
                if e.maybe_done:  # the one window in which a message can show twice: said where it happens
                    self._log.log(logging.WARNING, "maybe_done", "Slack may have taken a post whose answer was "
                                  "lost; it is sent again and may show twice", error=e.error)
            raise
        if method == "chat.postMessage":
            with self._lock:
                self.delivering, self.failing_since = True, None
        return response

    def post(self, payload: Dict[str, Any], plain: Optional[Dict[str, Any]] = None,
             guard: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
        """chat.postMessage; once more as plain text if Slack refuses the layout (or refuses it for a reason
        this service does not know: a message Slack never takes must not hold its channel's outbox back)."""
        try:
            return self._with_ts(self.call("chat.postMessage", payload, guard=guard))
        except SlackError as e:
            if e.kind not in (LAYOUT, OTHER):
                raise
            self.metrics.inc("alert_threader_slack_fallbacks_total")
            self._log.log(logging.WARNING, f"fallback|{e.error}", "Slack refused the message; sending plain text",
                          error=e.error)
        try:
            return self._with_ts(self.call("chat.postMessage", plain or plain_version(payload), guard=guard))
        except SlackError as e:
            e.for_good = e.kind in (LAYOUT, OTHER)
            raise

    def _with_ts(self, answer: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Slack's answer to a post, its ts None if it has none that can be threaded in (a broken proxy)."""
        assert answer is not None  # a post waits for its turn
        ts = answer.get("ts")
        if isinstance(ts, str) and SLACK_TS.fullmatch(ts):
            return answer
        self._log.log(logging.ERROR, "bad_ts", "Slack took a message but its answer has no valid ts: the message "
                      "stands alone, nothing can be threaded in it", ts=truncate(repr(ts), 40))
        return dict(answer, ts=None)

    def note_dropped(self, count: int, error: str) -> None:
        with self._lock:
            self.dropped = (self.dropped[0] + count if self.dropped else count, error, time.monotonic())

    def post_within(self, deadline: float, payload: Dict[str, Any]) -> Dict[str, Any]:
        """A post for a person's click: retried on Slack's passing trouble until the deadline (monotonic)."""
        backoff = 0.25
        while True:
            try:
                return self.post(payload)
            except SlackError as e:
                if e.kind not in (TRANSIENT, RATE_LIMITED) or time.monotonic() + backoff > deadline:
                    raise
            if self.stopping.wait(backoff):
                raise Stopping("stopping")
            backoff = min(backoff * 2, 4.0)

    def edit(self, payload: Dict[str, Any]) -> bool:
        """chat.update, best effort: False when it has to be made later (no turn now, or Slack's trouble)."""
        return self._best_effort("chat.update", payload)

    def react(self, channel: str, ts: str) -> bool:
        return self._best_effort("reactions.add", {"channel": channel, "timestamp": ts, "name": "white_check_mark"})

    def ephemeral(self, channel: str, user: str, thread_ts: str, text: str) -> bool:
        """A message only `user` sees (chat.postEphemeral), best effort."""
        payload = {"channel": channel, "user": user, "text": text}
        if thread_ts:
            payload["thread_ts"] = thread_ts
        return self._best_effort("chat.postEphemeral", payload)

    def _best_effort(self, method: str, payload: Dict[str, Any]) -> bool:
        try:
            if self.call(method, payload, wait=False) is None:
                return False
        except SlackError as e:
            if e.error == "already_reacted":
                return True
            if e.kind != RATE_LIMITED:
                self._note_edit_error(method, e)
            return e.kind not in (TRANSIENT, RATE_LIMITED)  # a passing failure is tried again; the rest never works
        if self.edit_problem and self.edit_problem["method"] == method:
            with self._lock:
                self.edit_problem = None
        return True

    def _note_edit_error(self, method: str, e: SlackError) -> None:
        if e.error == "missing_scope" and method == "reactions.add":
            if not self._warned_reactions:
                self._warned_reactions = True
                log_event(logging.WARNING, "cannot add ✅ reactions: give the Slack app the reactions:write scope")
            return
        if e.kind == CONFIGURATION:
            with self._lock:
                self.edit_problem = {"method": method, "error": e.error, "fix": e.hint, "at": iso_now()}
            self._log.log(logging.ERROR, f"edit|{method}|{e.error}", "Slack refuses to edit the status cards; "
                          "they stay as first posted", method=method, error=e.error, fix=e.hint)
            return
        self._log.log(logging.WARNING, f"edit|{method}|{e.error}", "Slack call failed; the thread itself is fine",
                      method=method, error=e.error)

    def note_error(self, e: SlackError) -> None:
        entry = {"method": e.method, "error": e.error, "kind": e.kind, "fix": e.hint, "at": iso_now()}
        with self._lock:
            self.last_error = entry
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            if e.kind == CONFIGURATION:
                self.delivering = False
        level = logging.ERROR if e.kind in (CONFIGURATION, OTHER) else logging.WARNING
        self._log.log(level, f"post|{e.error}", "Slack call failed", method=e.method, error=e.error, fix=e.hint)


class Executor:
    """Carries a plan's messages out: posts each, then writes what it did and takes its items out of the outbox.

    A message goes in its channel's turn (Poster); a layout Slack refuses goes
    again as plain text, and a reply whose parent is gone starts the thread
    again. Once Slack has taken it, its records are written and its items leave
    the outbox in one durable step, before the next message is sent: a crash
    in between can show that one message twice, never lose it. The fields clicks
    write (CLICK_FIELDS) are kept from the stored record.
    """

    def __init__(self, config: Config, store: ThreadStore, poster: Poster, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.poster = poster
        self.metrics = metrics
        self._drawn: "OrderedDict[str, str]" = OrderedDict()  # card key -> its card as last drawn
        self._lock = threading.Lock()
        # channel -> what Slack took and the store could not record yet: written before anything else is posted
        self._unrecorded: Dict[str, Tuple[Dict[str, Dict[str, Any]], List[Tuple[Item, Result]], bool]] = {}

    def record_pending(self, channel: str) -> None:
        """Write what Slack took and the store could not record; StoreError while it still cannot."""
        pending = self._unrecorded.get(channel)
        if pending is None:
            return
        try:
            self.complete(channel, *pending)
        except LeaseLost:
            del self._unrecorded[channel]  # another replica sends now: what it finds in the outbox, it tells
            raise
        del self._unrecorded[channel]

    def _record(self, channel: str, records: Dict[str, Dict[str, Any]], done: List[Tuple[Item, Result]],
                new: bool, posted: bool) -> None:
        try:
            self.complete(channel, records, done, new)
        except LeaseLost:
            raise
        except StoreError as e:
            self._unrecorded[channel] = (records, done, new)
            raise Unrecorded(e, posted, bool(done)) from None

    def send(self, channel: str, message: Message) -> bool:
        """Post the message and record it (message.records end up as written, the post's ts in them).

        True when the thread it replied in had to be started again: the plan's later messages name the old one.
        Unrecorded when Slack took it and the store could not record it (it is, before the next post)."""
        self.record_pending(channel)
        thread_ts = message.payload.get("thread_ts")
        try:
            ts = (self._post(channel, message.payload, message.plain)["ts"] if thread_ts is None
                  else self._reply(channel, message, thread_ts))
        except SlackError as e:
            if not (e.for_good and message.done):
                raise
            self._drop(channel, message, e)
            return False
        if thread_ts is None and message.kind == "digest":
            self._remember_drawn(message.target, message.payload)
        for record in message.records.values():
            if record.get("ts") == "":
                record["ts"] = ts
        # A post Slack answered without a ts stands alone: the threads it would have started are not kept.
        message.records = {key: record for key, record in message.records.items() if record.get("ts")}
        self._record(channel, message.records, [(item, (action, ts)) for item, action in message.done],
                     message.kind in ("open", "digest", "standalone"), posted=True)
        return thread_ts is not None and ts != thread_ts

    def _drop(self, channel: str, message: Message, e: SlackError) -> None:
        """A message Slack refuses for good: its alerts leave the outbox, named in the log, so that they do not
        hold the channel back for ever."""
        items = [item for item, _ in message.done]
        log_event(logging.ERROR, "Slack refused a message for good, as laid out and as plain text; its alerts are "
                  "dropped", channel=channel, error=e.error, alerts=len(items),
                  names=truncate(", ".join(sorted({item.alert.alertname for item in items})), 300))
        self.poster.note_dropped(len(items), e.error)
        self._record(channel, {}, [(item, ("refused", None)) for item in items], False, posted=False)

    def _post(self, channel: str, payload: Dict[str, Any], plain: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A sender's post, made only if, once its turn has come (up to a second later), the store can still
        record it and this process still sends for the channel: a failover or a lost lease meanwhile stops
        it, instead of a post no one can record that the next sender makes again."""
        def guard() -> None:
            self.store.ready()
            self.store.still_sending(channel)
        return self.poster.post(payload, plain, guard)

    def _reply(self, channel: str, message: Message, thread_ts: str) -> str:
        try:
            self._post(channel, message.payload, message.plain)
            return thread_ts
        except SlackError as e:
            if e.kind != THREAD_GONE or message.parent is None:
                raise
        log_event(logging.WARNING, "thread parent is gone; starting the thread again", key=message.target,
                  old_ts=thread_ts)
        parent = {k: v for k, v in message.parent.items() if k not in ("ts", "thread_ts")}
        ts = self._post(channel, parent)["ts"]
        if ts is None:  # a new parent that cannot be threaded in: try again (a broken proxy; it may show twice)
            raise SlackError("chat.postMessage", "invalid_response", TRANSIENT)
        self._record(channel, {k: dict(r, ts=ts) for k, r in message.before.items()}, [], False, posted=False)
        for record in message.records.values():
            if record.get("ts") == thread_ts:
                record["ts"] = ts
        for payload in (message.payload, message.plain):
            if payload:
                payload["thread_ts"] = ts
        self._post(channel, message.payload, message.plain)
        return ts

    def complete(self, channel: str, records: Dict[str, Dict[str, Any]], done: List[Tuple[Item, Result]],
                 new: bool = False) -> None:
        """Write the records (keeping what clicks wrote to them: new ones have none yet) and take the done items
        out of the outbox, in one step."""
        with self.store.locked(list(records)):
            stored = {} if new else self.store.get_many(list(records))
            for key, record in records.items():
                for field in CLICK_FIELDS:
                    if field in stored.get(key, {}):
                        record[field] = stored[key][field]
            self.store.complete(channel, records, {item.id: result for item, result in done})
        now = time.time()
        for item, (action, _) in done:
            self.metrics.inc("alert_threader_alerts_total", status=item.alert.status, action=action)
            if action == "refused":
                self.metrics.inc("alert_threader_alerts_dropped_total")
            elif action != "unchanged":
                self.metrics.inc("alert_threader_alerts_delivered_total")
                self.metrics.observe("alert_threader_delivery_seconds", max(0.0, now - item.received))

    # -- cards ----------------------------------------------------------------

    def _remember_drawn(self, key: str, card: Dict[str, Any]) -> None:
        with self._lock:
            self._drawn[key] = self._card_text(card)
            self._drawn.move_to_end(key)
            while len(self._drawn) > 1000:
                self._drawn.popitem(last=False)

    @staticmethod
    def _card_text(card: Dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in card.items() if k not in ("ts", "text")}, sort_keys=True)

    def refresh_card(self, key: str, edit: bool = True, react: bool = False,
                     coming: Optional[Dict[str, List[str]]] = None,
                     forgotten: Optional[Dict[str, Any]] = None) -> Tuple[bool, bool]:
        """Edit a thread's parent to show its state as stored now (a digest's, with the alerts coming into it),
        and add its ✅: (edited, reacted), best effort. A thread cleared since its last message is drawn as that
        message left it (forgotten), so that its card does not stay behind its replies."""
        record = self.store.get(key) or copied(forgotten)
        if record is None or not record.get("ts"):
            return True, True  # forgotten meanwhile, and not known here: nothing left to draw
        if coming and record.get("storm") and "firing" not in record:  # (a digest of before 1.1 keeps counts)
            record["members"] = {**record.get("members", {}), **coming}
        channel, ms = record.get("channel", ""), self.config.messages
        edited = reacted = True
        if edit:
            card = (render_digest(record, channel, ms) if record.get("storm") else
                    render_card(record, channel, ms) if record.get("first") else None)
            with self._lock:
                drawn = card is None or self._drawn.get(key) == self._card_text(card)
            if not drawn:
                edited = self.poster.edit(card)  # type: ignore[arg-type]
                if edited:
                    self._remember_drawn(key, card)  # type: ignore[arg-type]
        if react:
            reacted = self.poster.react(channel, record["ts"])
        return edited, reacted

    # -- what clicks do -------------------------------------------------------

    def change_record(self, key: str, change: Callable[[Dict[str, Any]], bool]) -> Optional[Dict[str, Any]]:
        """Change a stored thread's CLICK_FIELDS under its lock: the record as written, None if change() said no."""
        with self.store.locked([key]):
            record = self.store.get(key)
            if record is None:
                raise AlertmanagerError("this thread is no longer known to alert-threader")
            if not change(record):
                return None
            record["updated"] = time.time()
            self.store.put(key, record)
        return record

    def tell(self, deadline: float, key: str, record: Dict[str, Any], text: str) -> None:
        """What a click did, as a reply in the thread, and on the card."""
        self.poster.post_within(deadline, {"channel": record["channel"], "thread_ts": record["ts"], "text": text,
                                           "unfurl_links": False, "unfurl_media": False})
        self.refresh_card(key)


# ---------------------------------------------------------------------------
# Senders: one per channel, draining its outbox at Slack's pace
# ---------------------------------------------------------------------------

def recent_cards(records: Dict[str, Dict[str, Any]], channel: str, now: float, within: float = 600.0,
                 most: int = 50) -> Dict[str, Tuple[bool, bool]]:
    """The cards of a channel's threads changed in the last `within` seconds (the `most` newest) to draw
    again, and the ✅ of those closed."""
    recent = [(key, r) for key, r in records.items()
              if r.get("channel") == channel and r.get("ts") and now - r.get("updated", 0) <= within]
    recent.sort(key=lambda kr: -kr[1].get("updated", 0))
    return {key: (True, r.get("status") == "closed") for key, r in recent[:most]}


class Cards:
    """A channel's card edits (and ✅) waiting their turn: each card is edited at most every CARD_EVERY, with
    what its thread holds then; one Slack gave no turn to, or failed to edit, is tried again CARD_RETRY later."""

    CARD_RETRY = 2.0

    def __init__(self, executor: Executor, every: float) -> None:
        self.executor = executor
        self.every = every
        self.due: Dict[str, Tuple[bool, bool]] = {}  # key -> (edit due, ✅ due)
        self.next: Dict[str, float] = {}  # key -> when its card may be edited next (monotonic)
        self.coming: Dict[str, Dict[str, List[str]]] = {}  # the last plan's: what a digest's card counts too
        self.forgotten: Dict[str, Dict[str, Any]] = {}  # cleared threads' records, for their pending edits

    def add(self, cards: Dict[str, Tuple[bool, bool]]) -> None:
        for key, (edit, react) in cards.items():
            was_edit, was_react = self.due.get(key, (False, False))
            self.due[key] = (was_edit or edit, was_react or react)

    def redraw_recent(self, store: "ThreadStore", channel: str) -> None:
        """A card edit that was due when the last sender stopped (killed) is known nowhere: draw again the cards
        of the threads that changed lately (an edit to what a card shows already changes nothing)."""
        with contextlib.suppress(StoreError):
            self.add(recent_cards(store.items(), channel, time.time()))

    def forget(self, records: Dict[str, Optional[Dict[str, Any]]]) -> None:
        """The threads were cleared: keep what their pending cards will show."""
        self.forgotten = {key: record for key, record in records.items() if record and key in self.due}

    def edit(self, records: Dict[str, Optional[Dict[str, Any]]]) -> float:
        """Edit the cards that are due (a cleared thread's as `records` last had it); the seconds until the
        next is due."""
        now, soonest = time.monotonic(), math.inf
        for key, (edit, react) in list(self.due.items()):
            due = self.next.get(key, -math.inf)
            if due > now:
                soonest = min(soonest, due - now)
                continue
            edited, reacted = self.executor.refresh_card(key, edit, react, self.coming.get(key),
                                                         self.forgotten.get(key) or records.get(key))
            left = (edit and not edited, react and not reacted)
            if any(left):
                self.due[key] = left
                self.next[key] = now + max(self.every, self.CARD_RETRY)
                soonest = min(soonest, self.next[key] - now)
            else:
                del self.due[key]
                self.next[key] = now + self.every if edit else due
        self.next = {key: at for key, at in self.next.items() if at > now or key in self.due}
        self.forgotten = {key: record for key, record in self.forgotten.items() if key in self.due}
        return soonest


class Sender:
    """One channel's outbox, told at Slack's pace by one worker: the only one that plans for the channel.

    At each turn it reads what waits, plans from that backlog and the records,
    and posts the plan's messages one after another; when more alerts arrive
    meanwhile it plans again with them, so that they share messages. Cards are
    edited between messages, at most every CARD_EVERY. A failure is waited out
    (Slack's Retry-After, else a growing backoff) and the plan made again:
    nothing leaves the outbox before Slack has it. On Redis, only the replica
    holding the channel's sender lease sends; the others wait to take over.
    """

    BACKOFF_MAX = 15.0
    GATHER, GATHER_MAX = 0.05, 0.25  # a burst of webhooks is planned for once it pauses, or after GATHER_MAX
    IDLE = 1.0  # seconds between tries for the lease of a channel another replica sends for
    POLL = 0.25  # seconds between looks at a shared outbox, which other replicas' intake fills unseen

    def __init__(self, channel: str, rules: Rules, store: ThreadStore, executor: Executor,
                 stopping: threading.Event) -> None:
        self.channel, self.rules, self.store, self.executor, self.stopping = channel, rules, store, executor, stopping
        self.state = ChannelState()
        self.backlog: "OrderedDict[str, Item]" = OrderedDict()  # id -> item, as the outbox holds them
        self.last_id: Optional[str] = None
        self.holding: Optional[str] = None  # the token of this process's holding of the channel's lease
        self.cache: Dict[str, Optional[Dict[str, Any]]] = {}  # records as this sender last read or wrote them
        self.generation = -1
        self.cards = Cards(executor, rules.card_every)
        self.failures = 0
        self.gathering_since: Optional[float] = None  # when the burst being gathered began (monotonic)
        self.woken = threading.Event()
        self._log = LogLimiter()

    def wake(self) -> None:
        self.woken.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            failed = True  # a failure's wait is not cut short by arrivals: they would hammer Slack or the store
            try:
                wait = self.turn()
                failed = False
            except Stopping:
                break
            except SlackError as e:  # a 429's wait is the turn's (Retry-After); the rest back off
                self.failures += e.kind != RATE_LIMITED
                wait = 0.0 if e.kind == RATE_LIMITED else min(self.BACKOFF_MAX, 0.25 * 2 ** (self.failures - 1))
            except LeaseLost as e:
                log_event(logging.WARNING, "this replica no longer sends for the channel", channel=self.channel,
                          reason=str(e))
                self.holding, wait = None, self.IDLE
            except StoreError as e:  # the store logs its own outage, once: nothing more to say here
                log_event(logging.DEBUG, "the store cannot be written; nothing is posted until it can",
                          channel=self.channel, error=str(e))
                wait = self.IDLE
            except Exception:
                log.exception("the sender of %s failed; it carries on", self.channel)
                wait = 5.0
            if wait:
                (self.stopping if failed else self.woken).wait(wait)
            self.woken.clear()
        if self.holding:
            self.store.release_sender(self.channel)

    def turn(self) -> float:
        """Plan from what waits and post what is due; the seconds until the next turn is due."""
        holding = self.store.hold_sender(self.channel)
        if not holding:
            if self.holding:  # paused or cut off past its lease: another replica sends now
                log_event(logging.WARNING, "this replica no longer sends for the channel", channel=self.channel,
                          reason="another holding of its lease is live until it lapses (another replica's, or "
                          "this one's from before a Redis failover)")
            self.holding = None
            return self.IDLE
        if holding != self.holding:  # this replica (re)starts sending: what it knew may have changed meanwhile
            self.holding, self.backlog, self.last_id, self.cache = holding, OrderedDict(), None, {}
            self.cards.redraw_recent(self.store, self.channel)
            if self.store.shared:
                log_event(logging.INFO, "this replica sends for the channel now", channel=self.channel)
        self.executor.record_pending(self.channel)
        gathering = self.refresh()
        if gathering:
            return gathering  # alerts are pouring in: plan once with them all, not once for each
        wait = self.POLL if self.store.shared else 60.0
        if self.backlog:
            now = time.time()
            window = list(itertools.islice(self.backlog.values(), self.rules.plan_window))
            plan = plan_sparing(window, self.records(window), self.channel, self.state, self.rules, now)
            self.cards.coming = plan.coming
            self.storm(plan.storm)
            self.state.arrivals = plan.arrivals
            if plan.unchanged:
                self.executor.complete(self.channel, {}, [(item, ("unchanged", ts)) for item, ts in plan.unchanged])
                for item, _ in plan.unchanged:
                    self.backlog.pop(item.id, None)
            for message in plan.messages:  # each post checks, once its turn has come, that it can be recorded
                message = drawable(message, self.channel)  # and that this replica still sends (Executor._post)
                try:
                    moved = self.executor.send(self.channel, message)
                except Unrecorded as e:  # Slack has it; the store will, before anything else is posted
                    if e.posted:
                        self.sent(message)
                    elif e.told:  # dropped: planned again, they would be dropped (and counted) again
                        for item, _ in message.done:
                            self.backlog.pop(item.id, None)
                    self.cache = {}  # what the store holds now is what to plan from
                    raise
                except BaseException:  # a thread may have been started again before the failure: the same
                    self.cache = {}
                    raise
                self.sent(message)
                if moved:
                    self.cache = {}
                # Plan again: with the thread where it is now; with the alerts that arrived meanwhile, to share
                # messages with them (with pacing off, nothing waits to be shared: the plan goes on).
                if moved or (self.rules.pace and self.arrived()):
                    break
            if plan.unchanged or plan.messages:
                wait = 0.0
            elif plan.wake_at is not None:
                wait = min(wait, max(0.0, plan.wake_at - now))
        else:
            self.cards.coming = {}
        if not self.backlog and self.state.storm:  # the storm ends once the arrivals within STORM_WINDOW fall
            now = time.time()
            self.state.arrivals = recent_arrivals(self.state.arrivals, {}, now, self.rules.storm_window,
                                                  self.rules.storm_threshold + 1)
            self.storm(storm_mode(True, 0, len(self.state.arrivals), self.rules.storm_threshold))
            wait = min(wait, 1.0)
        return min(wait, self.cards.edit(self.cache))

    def arrived(self) -> bool:
        """Has an alert arrived since the backlog was read?"""
        tail = self.store.tail(self.channel)
        return tail is not None and (self.last_id is None or item_order(tail) > item_order(self.last_id))

    def refresh(self) -> float:
        """Read what arrived since; while alerts keep arriving (a burst), the seconds to wait for the rest."""
        now, arrived = time.monotonic(), self.store.waiting(self.channel, self.last_id)
        for item in arrived:
            self.backlog[item.id] = item
            self.last_id = item.id
        if not arrived or self.rules.pace == 0:
            self.gathering_since = None
            return 0.0
        if self.gathering_since is None:
            self.gathering_since = now
        return self.GATHER if now - self.gathering_since < self.GATHER_MAX else 0.0

    def records(self, items: List[Item]) -> Dict[str, Dict[str, Any]]:
        """The records these items' threads have now (and their digests): this sender's own copies, and the
        store's for the rest."""
        generation = self.store.generation()
        if generation != self.generation:  # the threads were cleared: forget them, and how busy they were
            self.cards.forget(self.cache)
            self.cache, self.generation = {}, generation
            self.state.sent.clear()
            self.state.arrivals.clear()
        keys = {item.key for item in items} | {f"storm|{self.channel}"}
        self.cache = {key: record for key, record in self.cache.items() if key in keys}
        for _ in range(2):  # the threads, then the digests some of them are members of
            missing = [key for key in keys if key not in self.cache]
            found = self.store.get_many(missing)
            self.cache.update({key: found.get(key) for key in missing})
            keys = {record["digest"] for record in self.cache.values() if record and record.get("digest")}
        return {key: record for key, record in self.cache.items() if record is not None}

    def sent(self, message: Message) -> None:
        now = time.time()
        self.failures = 0  # only a message Slack took ends the backoff: alerts arriving meanwhile do not
        self.cache.update(message.records)
        for item, _ in message.done:
            self.backlog.pop(item.id, None)
        recent = [(at, compact) for at, compact in self.state.sent.get(message.target, ())
                  if at > now - self.rules.busy_window]
        self.state.sent[message.target] = recent + [(now, message.kind in ("compact", "lines", "standalone")
                                                     and len(message.done) > 1)]
        for target in [t for t, times in self.state.sent.items() if times[-1][0] <= now - self.rules.busy_window]:
            del self.state.sent[target]
        self.cards.add(message.cards)

    def storm(self, storm: bool) -> None:
        if storm != self.state.storm:
            log_event(logging.WARNING if storm else logging.INFO,
                      "alert storm: new alerts join the channel's digest" if storm else
                      "alert storm over: new alerts get threads of their own again", channel=self.channel)
        if storm or storm != self.state.storm:
            self.store.note_storm(self.channel, storm)  # renewed at every turn of a storm
        self.state.storm = storm

    def drain(self) -> None:
        """Tell everything waiting, and draw its cards, now (the render command: with pacing off, nothing waits)."""
        for _ in range(100000):
            self.turn()
            if not self.backlog and not self.cards.due:
                return
        raise AssertionError("the plan made no progress")  # pragma: no cover


class Senders:
    """This process's senders: a thread per channel, started when the channel first has alerts."""

    def __init__(self, config: Config, store: ThreadStore, executor: Executor, stopping: threading.Event,
                 threaded: bool = True) -> None:
        self.rules = Rules.of(config)
        self.store = store
        self.executor = executor
        self.stopping = stopping
        self.threaded = threaded  # False: no threads, the caller drains (the render command)
        self._lock = threading.Lock()
        self._senders: Dict[str, Sender] = {}
        self._threads: List[threading.Thread] = []

    def sender(self, channel: str) -> Sender:
        with self._lock:
            sender = self._senders.get(channel)
            if sender is None:
                sender = self._senders[channel] = Sender(channel, self.rules, self.store, self.executor, self.stopping)
                if self.threaded:
                    thread = threading.Thread(target=sender.run, daemon=True, name=f"alert-threader-send-{channel}")
                    thread.start()
                    self._threads.append(thread)
        return sender

    def wake(self, channel: str) -> None:
        self.sender(channel).wake()

    def idle(self, cards: bool = True) -> bool:
        """Has every sender told what it took from the outbox (and drawn its cards)?"""
        with self._lock:
            senders = list(self._senders.values())
        return all(not sender.backlog and not (cards and sender.cards.due) for sender in senders)

    def sending(self) -> List[str]:
        """The channels this process sends for (on Redis, those whose lease it holds)."""
        with self._lock:
            return sorted(channel for channel, sender in self._senders.items() if sender.holding)

    def storming(self) -> List[str]:
        with self._lock:
            return sorted(channel for channel, sender in self._senders.items() if sender.state.storm)

    def stop(self, timeout: float) -> None:
        """Stop sending (a Slack call in flight ends and is recorded); what waits stays in the outbox."""
        self.stopping.set()
        with self._lock:
            senders, threads = list(self._senders.values()), list(self._threads)
        for sender in senders:
            sender.wake()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------
# Intake: webhooks into the outbox, answered once told or after DELIVERY_WAIT
# ---------------------------------------------------------------------------

class Intake:
    """Takes a validated webhook: its alerts into their channel's outbox, durably, and an answer in the seed's shape.

    Alerts told already (Alertmanager's repeats) are answered "unchanged" at
    once and stored nowhere. The rest are answered as their sender tells them,
    or "queued" once DELIVERY_WAIT has passed. When the outbox is full or the
    store cannot be written, the answer is 503 and nothing was stored.
    """

    def __init__(self, config: Config, store: ThreadStore, senders: Senders, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.senders = senders
        self.metrics = metrics
        self.default_channel = config.slack_channel or DRY_RUN_CHANNEL

    def store_key(self, thread_key: str, channel: str) -> str:
        """The seed's key in the default channel; other channels are prefixed with their ID.

        A default-channel key that looks like another channel's (or starts with the escape) is escaped with a
        backslash, so that no alert of one channel can take over another's thread."""
        if channel != self.default_channel:
            return f"{channel}:{thread_key}"
        if thread_key.startswith("\\") or any(thread_key.startswith(c + ":") for c in self.config.slack_channels):
            return "\\" + thread_key
        return thread_key

    def take(self, hook: Webhook, channel: Optional[str] = None,
             since: Optional[float] = None) -> Tuple[int, Dict[str, Any]]:
        """Store the webhook's alerts and answer: 200 with each alert's result, or 503 (nothing stored).

        The answer waits DELIVERY_WAIT at most from `since` (when the request came: monotonic), or from now."""
        deadline = (time.monotonic() if since is None else since) + self.config.delivery_wait
        channel = channel or self.default_channel
        body: Dict[str, Any] = {"ok": True, "count": len(hook.alerts), "status": hook.status,
                                "group_key": hook.group_key, "thread_store": self.store.name, "results": []}
        try:
            items, results = self.items(hook, channel)
            if len(items) > self.config.outbox_limit:  # never to fit: a retry would not help
                self.metrics.inc("alert_threader_alerts_refused_total", len(items))
                return 413, dict(body, ok=False, error=f"{len(items):,} new alerts in one webhook, more than the "
                                 f"outbox holds (OUTBOX_LIMIT {self.config.outbox_limit:,}): raise OUTBOX_LIMIT, "
                                 "or split the route's groups")
            if items:
                taken = self.store.enqueue([item for _, item, _ in items], self.config.outbox_limit)
            else:  # told already: stores nothing, but says so only if what told it can be made durable
                taken = []
                self.store.ready()
        except OutboxFull as e:
            self.metrics.inc("alert_threader_alerts_refused_total", len(items))
            return 503, dict(body, ok=False, error=f"outbox full: {e}; Alertmanager keeps the alerts and retries")
        except StoreError as e:
            return 503, dict(body, ok=False, error=f"thread store: {e}; Alertmanager retries")
        if items:
            self.senders.wake(channel)
        if self.config.slack_pace and self.store.storming(channel):
            deadline = 0.0  # in a storm its alerts go out in the digest's rhythm: waiting would only hold a connection
        told = self.told(channel, [item_id for item_id, _ in taken], deadline)
        for (index, item, thread_ts), (item_id, joined) in zip(items, taken):
            action, ts = told.get(item_id, ("queued", thread_ts))
            results[index] = (item.thread_key, "unchanged" if joined and action != "queued" else action, ts)
        body["results"] = [{"key": key, "thread_ts": ts, "status": alert.status, "alertname": alert.alertname,
                            "severity": alert.severity, "action": action}
                           for alert, (key, action, ts) in zip(hook.alerts, results)]
        return 200, body

    def items(self, hook: Webhook, channel: str) -> Tuple[List[Tuple[int, Item, Optional[str]]],
                                                            List[Tuple[str, str, Optional[str]]]]:
        """The webhook's alerts to store, firing first: (index, item, its thread's ts if known); and the results
        of those told already (by index; the rest are filled in once known)."""
        ms, window, now = self.config.messages, self.config.reopen_window, time.time()
        thread_keys = [ms.thread_key(alert, hook.group_key) for alert in hook.alerts]
        keys = [self.store_key(thread_key, channel) for thread_key in thread_keys]
        legacy = [ms.legacy_key(alert, hook.group_key) for alert in hook.alerts]
        old_keys = [self.store_key(key, channel) if key else "" for key in legacy]
        stored = self.store.get_many(list(dict.fromkeys(keys + [k for k in old_keys if k])))  # the sender decides
        for i, alert in enumerate(hook.alerts):  # told before namespaces were in keys: its thread goes on
            new = usable(stored.get(keys[i]), channel)
            told_here = new is not None and alert.fingerprint in new["alerts"]
            old = usable(stored.get(old_keys[i]), channel) if old_keys[i] and not told_here else None
            if old is not None and alert.fingerprint in old["alerts"] and (
                    old["status"] == "open" or alert.status == "resolved" or decide(old, alert, window) == UNCHANGED):
                thread_keys[i], keys[i] = legacy[i] or "", old_keys[i]
        external_url = self.config.alertmanager_url or hook.external_url
        group_labels = hook.group_labels if ms.thread_by == "group" else {}
        results: List[Tuple[str, str, Optional[str]]] = [("", "", None)] * len(hook.alerts)
        items = []
        for i in sorted(range(len(hook.alerts)), key=lambda i: hook.alerts[i].status != "firing"):
            alert, record = hook.alerts[i], usable(stored.get(keys[i]), channel)
            ts = record["ts"] if record else None
            if record is not None and decide(record, alert, window) == UNCHANGED:
                results[i] = (thread_keys[i], "unchanged", ts)
                self.metrics.inc("alert_threader_alerts_total", status=alert.status, action="unchanged")
                continue
            items.append((i, outbox_item(alert, channel, keys[i], thread_keys[i], external_url, group_labels, now), ts))
        return items, results

    def told(self, channel: str, ids: List[str], deadline: float) -> Dict[str, Result]:
        """The results of the channel's items told by the deadline (monotonic; the rest are queued)."""
        found: Dict[str, Result] = {}
        while ids:
            with contextlib.suppress(StoreError):  # stored durably already: an answer without results will do
                found = self.store.results(channel, ids)
            remaining = deadline - time.monotonic()
            if len(found) == len(ids) or remaining <= 0:
                break
            self.store.wait_told(channel, [i for i in ids if i not in found], min(remaining, 0.5))
        return found


class Delivery:
    """The lifecycle's parts, wired: intake, the channels' senders, the executor and its Slack poster."""

    def __init__(self, config: Config, store: ThreadStore, slack: SlackAPI, metrics: Metrics,
                 threaded: bool = True) -> None:
        self.stopping = threading.Event()
        if config.dry_run:  # nothing reaches Slack: nothing to pace
            config = dataclasses.replace(config, slack_pace=0)
        self.poster = Poster(slack, store, metrics, config.slack_pace, self.stopping)
        self.executor = Executor(config, store, self.poster, metrics)
        self.senders = Senders(config, store, self.executor, self.stopping, threaded)
        self.intake = Intake(config, store, self.senders, metrics)


# ---------------------------------------------------------------------------
# Slack interactivity: Silence and Ack from the message itself
# ---------------------------------------------------------------------------

Response = Tuple[int, Any, Dict[str, str]]  # an HTTP answer: status, body (JSON or text), headers


class Interactions:
    """Signed block_actions requests from Slack: verified, answered at once, their work done in the background.

    A request is verified as Slack documents it (v0 HMAC-SHA256 of
    'v0:timestamp:body' with the signing secret, compared in constant time,
    the timestamp within five minutes), and each signed request is taken
    once: a replay does nothing. Silences go to Alertmanager's API; acks to
    the thread's record, so every replica sees them. The outcome is told in
    the thread; a failure only to whoever clicked (an ephemeral message).
    """

    MAX_AGE = 300  # seconds a signed request stays good
    WORK_SECONDS = 30  # a click's Slack and Alertmanager calls, all told

    def __init__(self, config: Config, store: ThreadStore, executor: Executor, alertmanager: AlertmanagerClient,
                 metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.executor = executor
        self.alertmanager = alertmanager
        self.metrics = metrics
        self.started = time.time()

    # -- the request ------------------------------------------------------------

    def verify(self, headers: Any, body: bytes) -> bool:
        """Raise BadRequest (401) unless Slack signed this request; False for a replay of one."""
        timestamp, signature = headers.get("X-Slack-Request-Timestamp"), headers.get("X-Slack-Signature")
        if not timestamp or not signature:
            raise BadRequest("unsigned request: Slack signs every request (X-Slack-Signature)", 401)
        if not re.fullmatch(r"[0-9]{1,12}", timestamp) or abs(time.time() - int(timestamp)) > self.MAX_AGE:
            raise BadRequest("the request's timestamp is more than 5 minutes off (a replay, or a wrong clock)", 401)
        secret = (self.config.slack_signing_secret or "").encode()
        expected = "v0=" + hmac.new(secret, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise BadRequest("the signature does not match SLACK_SIGNING_SECRET", 401)
        if not self.store.shared and int(timestamp) < self.started - 1:
            return False  # signed before this process began: it may have been taken by the one before, unseen here
        return self.store.claim("slack-request|" + signature, 2 * self.MAX_AGE)

    def handle(self, headers: Any, body: bytes) -> Response:
        media_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media_type != "application/x-www-form-urlencoded":
            raise BadRequest("Slack's interactions are application/x-www-form-urlencoded")
        if not self.verify(headers, body):
            self.metrics.inc("alert_threader_interactions_total", action="replayed")
            return 200, {"ok": True, "done": "nothing: this request was taken already"}, {}
        try:
            payload = json.loads(urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True)["payload"][0])
            actions = payload["actions"] if payload.get("type") == "block_actions" else []
            action = actions[0] if actions else {}
            name = action.get("action_id", "")
            if not all(isinstance(payload.get(part, {}), dict) for part in ("user", "container", "channel",
                                                                             "message", "team")):
                raise TypeError("a part of the payload that is not an object")
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BadRequest("not a block_actions payload") from None
        if name in ("silence", "unsilence", "ack"):
            self.metrics.inc("alert_threader_interactions_total", action=name)
            threading.Thread(target=self.act, args=(payload, action), daemon=True, name="alert-threader-click").start()
        return 200, "", {"Content-Type": "text/plain"}  # Slack wants an answer within 3 s; the rest follows

    # -- the work, in the background --------------------------------------------

    def act(self, payload: Dict[str, Any], action: Dict[str, Any]) -> None:
        deadline = time.monotonic() + self.WORK_SECONDS
        user = payload.get("user") or {}
        who = str(user.get("username") or user.get("name") or user.get("id") or "someone")[:80]
        container = payload.get("container") or {}
        channel = str((payload.get("channel") or {}).get("id") or container.get("channel_id") or "")
        parent_ts = str(container.get("thread_ts") or (payload.get("message") or {}).get("thread_ts")
                        or container.get("message_ts") or "")
        try:
            found = self.store.find_thread(channel, parent_ts)
            if found is None:
                raise AlertmanagerError("this thread is no longer known to alert-threader (past THREAD_RETENTION, "
                                        "or its state was cleared)")
            key, _ = found
            if action.get("action_id") == "ack":
                self.ack(deadline, key, who, str(user.get("id", "")))
            elif action.get("action_id") == "silence":
                self.silence(deadline, key, action, who, payload)
            else:
                self.unsilence(deadline, key, str(action.get("value", "")), who)
        except Exception as e:  # whatever went wrong, the person who clicked is told
            if isinstance(e, (AlertmanagerError, StoreError, SlackError, Stopping)):
                reason = str(e)
            else:
                log.exception("Slack action failed unexpectedly")
                reason = "alert-threader could not do this (its log says why)"
            log_event(logging.WARNING, "Slack action failed", action=action.get("action_id"), user=who,
                      error=reason)
            self.metrics.inc("alert_threader_interactions_total", action="failed")
            self.executor.poster.ephemeral(channel, str(user.get("id", "")), parent_ts, f"⚠️ {escape_mrkdwn(reason)}")

    def ack(self, deadline: float, key: str, who: str, user_id: str) -> None:
        def add(record: Dict[str, Any]) -> bool:
            acks = record.setdefault("acks", [])
            if any(a.get("user") == user_id for a in acks):
                return False  # acknowledged by this person already
            acks.append({"user": user_id, "name": who, "at": time.time()})
            del acks[:-20]
            return True
        record = self.executor.change_record(key, add)
        if record is not None:
            log_event(logging.INFO, "acknowledged from Slack", thread=key, user=who)
            self.executor.tell(deadline, key, record, f"👀 Acknowledged by {escape_mrkdwn(who)}")

    def silence(self, deadline: float, key: str, action: Dict[str, Any], who: str, payload: Dict[str, Any]) -> None:
        ms = self.config.messages
        label = str((action.get("selected_option") or {}).get("value", ""))
        seconds = dict(ms.silence_durations).get(label)
        if seconds is None:
            raise AlertmanagerError(f"{truncate(label, 20)!r} is not one of SILENCE_DURATIONS")
        record = self.store.get(key) or {}
        scope = str(action.get("block_id", ""))
        scope = scope if scope.startswith("alert:") else "card"
        matchers, what = self.matchers(record, scope)
        starts = time.time()
        channel, ts = str(record.get("channel", "")), str(record.get("ts", ""))
        domain = str((payload.get("team") or {}).get("domain") or "")
        link = f"https://{domain + '.' if re.fullmatch(r'[a-z0-9-]+', domain) else ''}slack.com/archives/" \
               f"{channel}/p{ts.replace('.', '')}"
        silence_id = self.alertmanager.create_silence(
            self.alertmanager_url(), matchers, starts, starts + seconds, who,
            f"Silenced from Slack by {who}: {link}")

        def add(record: Dict[str, Any]) -> bool:
            silences = record.setdefault("silences", [])
            silences.append({"id": silence_id, "scope": "thread" if scope == "card" else scope.split(":", 1)[1],
                             "until": starts + seconds, "by": who, "at": starts})
            del silences[:-20]
            return True
        try:
            record = self.executor.change_record(key, add)
        except AlertmanagerError:  # forgotten meanwhile: undo, so that nothing is left half-done
            self.alertmanager.expire_silence(self.alertmanager_url(), silence_id)
            raise AlertmanagerError("this thread was forgotten meanwhile; the silence was taken back") from None
        assert record is not None
        log_event(logging.INFO, "silenced from Slack", thread=key, user=who, duration=label, silence=silence_id,
                  matchers=len(matchers))
        self.executor.tell(deadline, key, record, f"🔕 {what} silenced for {label} by {escape_mrkdwn(who)} "
                                                  f"(until {slack_time(starts + seconds, ms)})")

    def unsilence(self, deadline: float, key: str, silence_id: str, who: str) -> None:
        record = self.store.get(key) or {}
        if not any(s.get("id") == silence_id for s in record.get("silences", [])):
            raise AlertmanagerError("this silence was not made from this thread")
        self.alertmanager.expire_silence(self.alertmanager_url(), silence_id)

        def lift(record: Dict[str, Any]) -> bool:
            for silence in record.get("silences", []):
                if silence.get("id") == silence_id:
                    silence["expired"] = True
            return True
        record = self.executor.change_record(key, lift)
        assert record is not None
        log_event(logging.INFO, "silence lifted from Slack", thread=key, user=who, silence=silence_id)
        self.executor.tell(deadline, key, record, f"🔔 Silence lifted by {escape_mrkdwn(who)}")

    # -- helpers ------------------------------------------------------------------

    def alertmanager_url(self) -> str:
        """ALERTMANAGER_URL, never a webhook's externalURL: credentials and requests go only where the operator said."""
        assert self.config.alertmanager_url, "load_config requires it with a signing secret"
        return self.config.alertmanager_url

    def matchers(self, record: Dict[str, Any], scope: str) -> Tuple[List[Dict[str, Any]], str]:
        """What a silence from here matches: the thread key's labels (the card), or one alert's labels (a reply)."""
        if scope.startswith("alert:"):
            entry = record.get("alerts", {}).get(scope.split(":", 1)[1])
            labels = entry[3] if entry and len(entry) > 3 else None
            if not labels:
                raise AlertmanagerError("this alert's labels are not known whole (too long to keep): silence it "
                                        "in Alertmanager")
            what = "This alert"
        else:
            first = record.get("first", {})
            labels = thread_labels(record, self.config.messages)
            if first.get("labels_clipped") and any(len(v) >= RECORD_VALUE_MAX for v in labels.values()):
                raise AlertmanagerError("this thread's labels are too long to silence from Slack: use Alertmanager")
            what = "This thread"
        if not any(labels.values()):
            raise AlertmanagerError("nothing to match a silence on: the thread key's labels are all empty")
        return [{"name": name, "value": value, "isRegex": False, "isEqual": True}
                for name, value in sorted(labels.items())], what


# ---------------------------------------------------------------------------
# Preview: recent threads drawn roughly as Slack draws them
# ---------------------------------------------------------------------------

PREVIEW_STYLE = """
body{font:15px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif,'Apple Color Emoji','Segoe UI Emoji',
'Noto Color Emoji';background:#f8f8f8;color:#1d1c1d;margin:0}
header{background:#3f0e40;color:#fff;padding:12px 24px}header b{font-size:18px}
.banner{background:#fff4d6;border-bottom:1px solid #ecb22e;padding:8px 16px}.banner div{max-width:828px;margin:0 auto}
main{max-width:860px;margin:0 auto;padding:16px}
.thread{background:#fff;border:1px solid #ddd;border-radius:8px;margin:16px 0;padding:12px 16px}
.meta{color:#616061;font-size:12px;margin-bottom:4px}
.msg{display:flex;margin:6px 0}.bar{width:4px;border-radius:4px;flex:none;margin-right:12px;background:#ddd}
.body{flex:1;min-width:0}.h{font-weight:800;font-size:17px;margin:2px 0 6px}
.fields{display:grid;grid-template-columns:1fr 1fr;gap:6px 24px;margin:6px 0}
.ctx{color:#616061;font-size:12px;margin:4px 0}.sec{margin:6px 0;white-space:normal;overflow-wrap:anywhere}
.btn{display:inline-block;border:1px solid #bbb;border-radius:4px;padding:2px 10px;margin:4px 6px 4px 0;
color:#1d1c1d;text-decoration:none;font-weight:600;font-size:13px}
.replies{margin-left:28px}.reactions{margin:0 0 6px 16px}
.reaction{display:inline-block;background:#eef5ff;border:1px solid #1d9bd1;border-radius:12px;padding:0 8px;font-size:13px}
.text{white-space:normal;overflow-wrap:anywhere}
"""


# What Slack draws for the tokens this service writes: a date by its fallback, a mention as @name.
SLACK_TOKEN = re.compile(r"<!date\^[0-9]+\^[^|>]*\|([^>]*)>|<!subteam\^([A-Z0-9]+)>|<@([UW][A-Z0-9]+)>|<!(here|channel)>")


def slack_tokens_drawn(text: str) -> str:
    def drawn(match: Any) -> str:
        date, group, user, everyone = match.groups()
        return date if date is not None else "@" + (group or user or everyone)
    return SLACK_TOKEN.sub(drawn, text)


def mrkdwn_html(text: str) -> str:
    """Slack mrkdwn (already &-escaped) as safe HTML: bold, line breaks, dates and mentions, nothing else."""
    plain = slack_tokens_drawn(text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    safe = html.escape(plain)
    safe = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<b>\1</b>", safe)
    return safe.replace("\n", "<br>")


def blocks_html(blocks: List[Dict[str, Any]]) -> str:
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            parts.append(f'<div class="h">{html.escape(block["text"]["text"])}</div>')
        elif kind == "section" and "fields" in block:
            cells = "".join(f"<div>{mrkdwn_html(f['text'])}</div>" for f in block["fields"])
            parts.append(f'<div class="fields">{cells}</div>')
        elif kind == "section":
            parts.append(f'<div class="sec">{mrkdwn_html(block["text"]["text"])}</div>')
        elif kind == "context":
            parts.append('<div class="ctx">' + " ".join(mrkdwn_html(e.get("text", "")) for e in block["elements"])
                         + "</div>")
        elif kind == "image" and is_http_url(block.get("image_url")):
            parts.append(f'<div class="ctx">🖼 <a href="{html.escape(block["image_url"], quote=True)}" '
                         f'rel="noopener noreferrer">{html.escape(block.get("alt_text", "image"))}</a></div>')
        elif kind == "actions":
            parts.append("<div>" + "".join(control_html(e) for e in block["elements"]) + "</div>")
    return "".join(parts)


def control_html(element: Dict[str, Any]) -> str:
    """A link button as a link; Slack's interactive buttons and menus as what they show (they act only in Slack)."""
    if is_http_url(element.get("url")):
        return (f'<a class="btn" href="{html.escape(element["url"], quote=True)}" rel="noopener noreferrer">'
                f'{html.escape(element["text"]["text"])}</a>')
    label = (element.get("text") or element.get("placeholder") or {}).get("text", "")
    arrow = " ▾" if element.get("type") == "static_select" else ""
    return f'<span class="btn">{html.escape(label)}{arrow}</span>' if label else ""


def message_html(payload: Dict[str, Any], reactions: Sequence[str] = ()) -> str:
    attachments = payload.get("attachments") or []
    if not attachments:
        inner = f'<div class="text">{mrkdwn_html(payload.get("text", ""))}</div>'
        color = "#ddd"
    else:
        inner = "".join(blocks_html(a.get("blocks", [])) for a in attachments)
        color = attachments[0].get("color", "#ddd")
    if not re.fullmatch(r"#[0-9A-Fa-f]{6}", color):
        color = "#ddd"
    badges = "".join(f'<span class="reaction">{"✅" if r == "white_check_mark" else html.escape(r)} 1</span>'
                     for r in reactions)
    reactions_html = f'<div class="reactions">{badges}</div>' if badges else ""
    return (f'<div class="msg"><div class="bar" style="background:{color}"></div><div class="body">{inner}</div></div>'
            + reactions_html)


def render_preview(calls: Iterable[Tuple[float, str, Dict[str, Any], str]], dry_run: bool,
                   zone: Any = timezone.utc) -> str:
    """One self-contained HTML page of the recent threads, from the payloads sent."""
    threads: Dict[Tuple[str, str], Dict[str, Any]] = OrderedDict()

    def thread(channel: str, ts: str, at: float) -> Dict[str, Any]:
        entry = threads.setdefault((channel, ts), {"parent": None, "replies": [], "reactions": [], "at": at})
        entry["at"] = max(entry["at"], at)
        return entry

    for at, method, payload, answered_ts in calls:
        channel = str(payload.get("channel", ""))
        if method == "chat.postMessage":
            if payload.get("thread_ts"):
                thread(channel, payload["thread_ts"], at)["replies"].append(payload)
            else:
                thread(channel, answered_ts, at)["parent"] = payload
        elif method == "chat.update":
            thread(channel, str(payload.get("ts", "")), at)["parent"] = payload
        elif method == "reactions.add":
            thread(channel, str(payload.get("timestamp", "")), at)["reactions"].append(payload.get("name", ""))
    sections = []
    for (channel, ts), entry in sorted(threads.items(), key=lambda kv: -kv[1]["at"]):
        parent = (message_html(entry["parent"], entry["reactions"]) if entry["parent"]
                  else '<div class="meta">(parent no longer in the recent history)</div>')
        replies = "".join(message_html(r) for r in entry["replies"])
        count = len(entry["replies"])
        try:
            when = format_time(float(ts), zone)
        except ValueError:
            when = "unknown time"
        sections.append(
            f'<section class="thread"><div class="meta" title="ts {html.escape(ts)}">#{html.escape(channel)} · '
            f'{when} · {count} repl{"y" if count == 1 else "ies"}</div>{parent}'
            + (f'<div class="replies">{replies}</div>' if replies else "") + "</section>")
    banner = ('<div class="banner"><div>Dry-run: no SLACK_BOT_TOKEN, so nothing was sent to Slack. '
              'These are exactly the messages it would have sent.</div></div>' if dry_run else "")
    body = "".join(sections) or "<p>No messages yet. POST an Alertmanager webhook to /alert.</p>"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>alert-threader preview</title>"
            f'<meta name="viewport" content="width=device-width"><style>{PREVIEW_STYLE}</style></head><body>'
            f"<header><b>alert-threader</b> · recent threads</header>{banner}<main>{body}</main></body></html>")


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

ROUTES = {"/alert": ("POST",), "/health": ("GET", "HEAD"), "/stats": ("GET",), "/cache": ("GET", "DELETE"),
          "/metrics": ("GET", "HEAD"), "/preview": ("GET",), "/slack/actions": ("POST",), "/": ("GET", "HEAD")}
PROTECTED = {("POST", "/alert"), ("GET", "/cache"), ("DELETE", "/cache"), ("GET", "/preview")}
# What shows or changes the stored alerts: with no WEBHOOK_TOKEN, only for clients on this machine.
LOCAL_ONLY = {("GET", "/cache"), ("DELETE", "/cache"), ("GET", "/preview")}
TAKES_BODY = {("POST", "/alert"), ("POST", "/slack/actions")}
LARGE_BODY = 1 << 20


def is_local_host(host_header: str) -> bool:
    """Does a Host header name this machine by its loopback name or address (not a name rebound to it)?"""
    host = host_header.strip().lower()
    host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in ("", "localhost") or host.endswith(".localhost") or is_loopback(host)


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@dataclasses.dataclass
class Request:
    """What the routes need of one HTTP request, its body aside."""

    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Any  # http.client.HTTPMessage: case-insensitive get()
    length: Optional[int]  # the declared Content-Length, None without one
    client: str = "127.0.0.1"  # the peer's address
    came: float = dataclasses.field(default_factory=time.monotonic)  # when its first line was read

    @classmethod
    def parse(cls, method: str, target: str, headers: Any, length: Optional[int], client: str,
              came: Optional[float] = None) -> "Request":
        parts = urllib.parse.urlsplit(target)
        return cls(method=method, path=parts.path.rstrip("/") or "/",
                   query=urllib.parse.parse_qs(parts.query) if parts.query else {}, headers=headers, length=length,
                   client=client, came=time.monotonic() if came is None else came)


def error(status: int, message: str, **headers: str) -> Response:
    return status, {"ok": False, "error": message}, headers


OUTBOX_WARNING = 0.5  # /health turns degraded when the outbox holds this share of OUTBOX_LIMIT


def outbox_view(store: ThreadStore, limit: int, now: float) -> Dict[str, Any]:
    """What waits in the outbox, for /health, /stats and /cache: how many alerts, and for how long."""
    summary = store.outbox_summary()
    oldest = min((at for _, at in summary.values() if at is not None), default=None)
    return {"waiting": sum(n for n, _ in summary.values()), "limit": limit,
            "oldest_seconds": round(now - oldest, 1) if oldest is not None else None,
            "channels": {channel: {"waiting": n, "oldest_seconds": round(now - at, 1) if at is not None else None}
                         for channel, (n, at) in sorted(summary.items())}}


def cache_answer(store: ThreadStore, outbox_limit: int, clear: bool) -> Response:
    """The stored threads and what waits in the outbox; or the threads forgotten (the outbox stays)."""
    try:
        if clear:
            cleared = store.clear()
            log_event(logging.WARNING, "thread cache cleared", threads=cleared)
            return 200, {"ok": True, "cleared": cleared, "thread_store": store.name,
                         "outbox_kept": outbox_view(store, outbox_limit, time.time())["waiting"]}, {}
        threads = store.items()
        outbox = outbox_view(store, outbox_limit, time.time())
        for channel, view in outbox["channels"].items():
            view["alerts"] = [{"id": item.id, "key": item.thread_key, "status": item.alert.status,
                               "alertname": item.alert.alertname, "received": item.received}
                              for item in store.waiting(channel)[:1000]]
        return 200, {"ok": True, "thread_store": store.name, "cached_threads": len(threads),
                     "threads": threads, "outbox": outbox}, {}
    except StoreError as e:  # Redis out of reach: /health says more
        return error(503, f"the thread store cannot be read now ({e}); see GET /health")


class App:
    """Routes requests to intake and the status endpoints; knows nothing of sockets."""

    def __init__(self, config: Config, store: ThreadStore, slack: SlackAPI, delivery: Delivery,
                 metrics: Metrics, interactions: Optional[Interactions] = None) -> None:
        self.config = config
        self.store = store
        self.slack = slack
        self.delivery = delivery
        self.metrics = metrics
        self.interactions = interactions  # Slack's clicks, with SLACK_SIGNING_SECRET set
        self.started = time.time()
        # Parsed JSON takes several times the size of its text: large webhooks are taken two at a time.
        self._large = threading.BoundedSemaphore(2)
        self.stopping = False
        self._inflight = 0
        self._idle = threading.Condition()
        self._refusals = LogLimiter()

    # -- bookkeeping for graceful stop --------------------------------------

    def begin_request(self) -> None:
        with self._idle:
            self._inflight += 1

    def end_request(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    # -- routing --------------------------------------------------------------

    def authorized(self, headers: Any, allow_basic: bool) -> bool:
        token = self.config.webhook_token
        if not token:
            return True
        value = headers.get("Authorization") or ""
        scheme, _, credential = value.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(credential.strip().encode(), token.encode())
        if allow_basic and scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(credential.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(password.encode(), token.encode())
        return False

    def refusal(self, request: Request) -> Optional[Response]:
        """The answer to a request that goes no further, decided before its body is read (or continued)."""
        path, method = request.path, request.method
        allowed = ROUTES.get(path)
        if allowed is None or (path == "/slack/actions" and self.interactions is None):
            return error(404, f"no such endpoint: {truncate(path, 100)}")
        if method not in allowed:
            return error(405, f"{method} is not allowed on {path}", Allow=", ".join(allowed))
        if (method, path) in PROTECTED and not self.authorized(request.headers, allow_basic=path == "/preview"):
            challenge = 'Basic realm="alert-threader"' if path == "/preview" else 'Bearer realm="alert-threader"'
            return error(401, "missing or wrong bearer token (WEBHOOK_TOKEN)", **{"WWW-Authenticate": challenge})
        if (method, path) in LOCAL_ONLY and not self.config.webhook_token and not (
                is_loopback(request.client) and is_local_host(request.headers.get("Host", ""))):
            return error(403, f"{path} shows the stored alerts: with no WEBHOOK_TOKEN set it answers only loopback "
                              "(127.0.0.1, ::1, as localhost); set WEBHOOK_TOKEN to use it from elsewhere")
        if path == "/alert" and "channel" in request.query:
            channel = request.query["channel"][-1]
            if channel not in self.config.slack_channels:
                return error(400, f"channel {truncate(channel, 80)!r} is not in SLACK_CHANNELS")
        if (method, path) in TAKES_BODY:
            if request.length is None:
                return error(411, "Content-Length is required")
            if request.length > self.config.max_body_bytes:
                return error(413, f"body of {request.length} bytes is over the "
                                  f"{self.config.max_body_bytes}-byte limit (MAX_BODY_BYTES)")
        return None

    def route(self, request: Request, read_body: Callable[[], bytes]) -> Response:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        path = request.path
        if path == "/alert":
            return self.alert(request, read_body)
        if path == "/slack/actions":
            assert self.interactions is not None
            return self.interactions.handle(request.headers, read_body())
        if path == "/health":
            return self.health()
        if path == "/stats":
            return 200, self.stats(), {}
        if path == "/cache":
            return self.cache(request.method == "DELETE")
        if path == "/metrics":
            return 200, self.metrics.render(), {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        if path == "/preview":
            page = render_preview(self.slack.recent_calls(), self.config.dry_run, self.config.messages.time_zone)
            return 200, page, {"Content-Type": "text/html; charset=utf-8",
                               "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
        return 200, {"ok": True, "service": "alert-threader", "version": __version__,
                     "endpoints": sorted(f"{m} {p}" for p, ms in ROUTES.items() for m in ms if m != "HEAD"
                                         and (p != "/slack/actions" or self.interactions))}, {}

    def alert(self, request: Request, read_body: Callable[[], bytes]) -> Response:
        started = time.monotonic()
        channel = request.query["channel"][-1] if "channel" in request.query else None
        with self._large if (request.length or 0) > LARGE_BODY else contextlib.nullcontext():
            hook = parse_webhook(read_body(), request.headers.get("Content-Type", ""))
            if self.stopping:
                return error(503, "shutting down; Alertmanager will retry", Connection="close")
            status, body = self.delivery.intake.take(hook, channel, since=request.came)
        if status == 200 and log.isEnabledFor(logging.INFO):  # a line's fields are worked out only if it is written
            actions: Dict[str, int] = {}
            for result in body["results"]:
                actions[result["action"]] = actions.get(result["action"], 0) + 1
            log_event(logging.INFO, "webhook", group_key=truncate(hook.group_key, 200),
                      channel=channel or self.delivery.intake.default_channel, alerts=len(hook.alerts), **actions,
                      code=status, duration_ms=round((time.monotonic() - started) * 1000, 1))
        elif status != 200:  # in an outage Alertmanager retries at once: one line a second says it all
            self._refusals.log(logging.WARNING, body["error"].split(":", 1)[0], "webhook refused",
                               code=status, error=body["error"])
        return status, body, {}

    def health(self) -> Response:
        store = self.store.health()
        poster = self.delivery.poster
        body: Dict[str, Any] = {
            "status": "healthy", "environment": self.config.environment,
            "channel": self.delivery.intake.default_channel, "thread_store": self.store.name,
            "cached_threads": None, "timestamp": iso_now(), "version": __version__,
            "dry_run": self.config.dry_run, "last_slack_error": poster.last_error}
        body.update({k: v for k, v in store.items() if k not in ("ok", "problem")})
        problems = [] if store["ok"] else [store.get("problem", "the thread store cannot be written")]
        with contextlib.suppress(StoreError):
            body["cached_threads"] = self.store.count()
            body["outbox"] = outbox_view(self.store, self.config.outbox_limit, time.time())
            if body["outbox"]["waiting"] >= OUTBOX_WARNING * self.config.outbox_limit:
                problems.append(f"{body['outbox']['waiting']:,} alerts wait for Slack (OUTBOX_LIMIT "
                                f"{self.config.outbox_limit:,})")
        failing = poster.failing_since is not None or not poster.delivering
        body["slack_status"] = "dry-run" if self.config.dry_run else "failing" if failing else "ok"
        if poster.failing_since is not None:
            problems.append(f"Slack has refused or failed every post for {time.monotonic() - poster.failing_since:.0f}s")
        if not poster.delivering:
            problems.append("Slack refuses the configuration (last_slack_error has the fix)")
        if poster.dropped and time.monotonic() - poster.dropped[2] < DROPPED_SHOWN:
            problems.append(f"Slack refused {poster.dropped[0]:,} alerts for good ({poster.dropped[1]}); the log "
                            "names them")
        if poster.edit_problem:
            body["card_updates"] = poster.edit_problem  # cards that can never be edited: the fix is in it
            problems.append("Slack refuses to edit the status cards")
        body["sending_for"], body["storm"] = self.delivery.senders.sending(), self.delivery.senders.storming()
        if problems:
            body["status"], body["problems"] = "degraded", problems
            return 503, body, {}
        return 200, body, {}

    def cache(self, clear: bool) -> Response:
        return cache_answer(self.store, self.config.outbox_limit, clear)

    def stats(self) -> Dict[str, Any]:
        value = self.metrics.total
        stats: Dict[str, Any] = {
            "cached_threads": None, "thread_store": self.store.name, "environment": self.config.environment,
            "uptime": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "uptime_seconds": round(time.time() - self.started), "open_threads": None,
            "alerts": {action: int(value("alert_threader_alerts_total", action=action))
                       for action in ("posted", "replied", "reopened", "standalone", "digest", "unchanged")},
            "delivered": int(value("alert_threader_alerts_delivered_total")),
            "refused": int(value("alert_threader_alerts_refused_total")),
            "dropped": int(value("alert_threader_alerts_dropped_total")),
            "slack": {"calls_ok": int(value("alert_threader_slack_requests_total", result="ok")),
                      "calls_dry_run": int(value("alert_threader_slack_requests_total", result="dry_run")),
                      "calls_failed": int(value("alert_threader_slack_requests_total")
                                          - value("alert_threader_slack_requests_total", result="ok")
                                          - value("alert_threader_slack_requests_total", result="dry_run")),
                      "fallbacks": int(value("alert_threader_slack_fallbacks_total")),
                      "rate_limit_wait_seconds": value("alert_threader_slack_rate_limit_wait_seconds_total")},
            "webhooks": {code: int(n) for code, n in self.metrics.by_label("alert_threader_webhooks_total",
                                                                            "code").items()},
        }
        with contextlib.suppress(StoreError):
            stats["cached_threads"], stats["open_threads"] = self.store.count(), self.store.open_count()
            stats["outbox"] = outbox_view(self.store, self.config.outbox_limit, time.time())
        stats.update(self.store.stats())
        return stats


CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
HEADER_SYNTAX_DEFECTS = (email.errors.MissingHeaderBodySeparatorDefect, email.errors.InvalidHeaderDefect,
                         email.errors.FirstHeaderLineIsContinuationDefect)
# Headers that frame or authorise a request: a second copy is a smuggling attempt, never a mistake.
SINGLE_HEADERS = ("Content-Length", "Transfer-Encoding", "Authorization", "Content-Type", "Host", "Expect")
# After answering a request whose body is left unread, the connection is closed; until the client
# stops sending, what it sends is read and dropped, so that the close does not reset the answer away.
LINGER_SECONDS, LINGER_IDLE_SECONDS, LINGER_BYTES = 10.0, 2.0, 256 << 20
# A request's head: at most this much in all, whatever http.server would take (100 lines of 64 KiB each).
HEAD_MAX, HEAD_LINES = 32 << 10, 100
BODY_METHODS = ("POST", "PUT", "PATCH")


def linger(sock: socket.socket) -> None:
    """Half-close, then read and drop what the client still sends, within a bound of time and size."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
        while dropped < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(min(remaining, LINGER_IDLE_SECONDS))
            chunk = sock.recv(65536)
            if not chunk:
                return
            dropped += len(chunk)


def read_head(rfile: BinaryIO) -> Optional[bytes]:
    """A request's header lines up to the blank one: at most HEAD_MAX bytes and HEAD_LINES lines, no bare CR or NUL."""
    lines: List[bytes] = []
    size = 0
    while True:
        line = rfile.readline(HEAD_MAX + 1)
        if not line.endswith(b"\n"):
            if len(line) > HEAD_MAX:
                raise BadRequest("request headers longer than 32 KiB", 431)
            return None
        size += len(line)
        if size > HEAD_MAX or len(lines) >= HEAD_LINES:
            raise BadRequest(f"request headers over 32 KiB or {HEAD_LINES} lines", 431)
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in text or b"\0" in text:  # email's parser would start a new header at a bare CR
            raise BadRequest("a header line holds a bare CR or a NUL", 400)
        lines.append(line)
        if not text:
            return b"".join(lines)


class Handler(http.server.BaseHTTPRequestHandler):
    """Thin: http.server parses, App decides, the answer is JSON (or the text App returns).

    What it adds to http.server: JSON error bodies; a bounded head; framing headers checked (no duplicates,
    no chunked bodies, a plain Content-Length); Expect: 100-continue answered only once the request would be
    accepted; and a connection whose body was left unread is closed after the answer (lingering), so that
    the body is never read as the next request."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # every answer, refusals of bad request lines too, has a status line
    wbufsize = 65536  # an answer's head and body leave in one write
    disable_nagle_algorithm = True  # and a longer one's last piece without waiting for a delayed ACK
    holds_slot = True  # one of MAX_CONNECTIONS (idle, it makes way for a newcomer)
    server: "ThreaderServer"

    def setup(self) -> None:
        self.timeout = self.server.app.config.client_timeout  # each read and write; set by setup()
        super().setup()
        self.unread = 0  # declared body bytes not read
        self.lingering = False
        self.request_info: Optional[Request] = None

    def version_string(self) -> str:
        return f"alert-threader/{__version__}"

    def handle_one_request(self) -> None:
        # The request line and headers must arrive within CLIENT_TIMEOUT in all, not only between bytes.
        self.server.awaiting_head(self.connection, self.timeout, self.holds_slot)
        try:
            super().handle_one_request()
        finally:
            self.server.head_arrived(self.connection)

    def parse_request(self) -> bool:
        """http.server's parsing, of a head first read here within limits of its own."""
        self.came = time.monotonic()  # the request line is in: DELIVERY_WAIT counts from here
        self.command, self.request_version = None, self.default_request_version  # for a refusal's answer
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        late = False
        try:
            head = read_head(self.rfile)
        except BadRequest as e:
            self.send_error(e.status, str(e))
            return False
        finally:
            late = self.server.head_arrived(self.connection)  # the head is in: the body has a limit of its own
        if head is None or late:  # the client went, or was too slow (a head read as it was shut: not served)
            self.close_connection = True
            return False
        real, self.rfile = self.rfile, io.BytesIO(head)
        try:
            return super().parse_request()
        finally:
            self.rfile = real

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s", self.address_string(), format % args)

    # -- before the body ------------------------------------------------------

    def framing_refusal(self) -> Optional[Response]:
        """Refuse what http.server accepts but this service does not; else note the request."""
        self.unread = -1  # until the framing is known to be sound, where this request ends is not
        if len(self.requestline.split()) != 3:  # http.server would take "GET /path" as HTTP/0.9
            return error(400, "malformed request line (expected METHOD /path HTTP/1.1)")
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            return error(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers = self.headers
        raw = list(headers.raw_items())  # as received, without the email package's per-value processing
        if (any(isinstance(d, HEADER_SYNTAX_DEFECTS) for d in headers.defects) or headers.get_payload()
                or any("\n" in v or "\r" in v for _, v in raw)):
            return error(400, "malformed header line (a line without a colon, or a folded line)")
        names = [name.lower() for name, _ in raw]
        for name in SINGLE_HEADERS:
            if names.count(name.lower()) > 1:
                return error(400, f"duplicate {name} header")
        if "transfer-encoding" in names:
            return error(411, "chunked bodies are not accepted; send Content-Length")
        length = next((value for name, value in raw if name.lower() == "content-length"), None)
        if length is not None and not CONTENT_LENGTH.fullmatch(length.strip(" \t")):
            return error(400, "Content-Length must be a non-negative integer")
        self.unread = int(length) if length is not None else 0
        self.request_info = Request.parse(self.command, self.path, headers,
                                          int(length) if length is not None else None, self.client_address[0],
                                          self.came)
        return None

    def refusal(self) -> Optional[Response]:
        return self.framing_refusal() or self.server.app.refusal(self.request_info)  # type: ignore[arg-type]

    def handle_expect_100(self) -> bool:
        """100 Continue only for a request that will be taken; anything else gets its answer at once."""
        refused = self.refusal()
        if refused is not None:
            self.write_answer(*refused)
            return False
        super().handle_expect_100()
        self.wfile.flush()  # the client waits for it before it sends the body
        return True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (request line, headers) as JSON, on a connection then closed."""
        self.unread = -1  # where the request ends is unknown
        self.write_answer(*error(code, message or http.HTTPStatus(code).phrase))

    # -- the request ----------------------------------------------------------

    def read_body(self) -> bytes:
        """The declared body, within CLIENT_TIMEOUT for each read and twice that for the whole."""
        parts, remaining = [], self.unread
        deadline = time.monotonic() + 2 * self.timeout
        while remaining > 0:
            chunk = self.rfile.read1(min(remaining, 65536))
            if not chunk:
                raise BadRequest("body ended before Content-Length bytes arrived")
            if time.monotonic() > deadline:
                raise BadRequest(f"the body did not arrive within {2 * self.timeout:g}s (2 x CLIENT_TIMEOUT)", 408)
            parts.append(chunk)
            remaining -= len(chunk)
            self.unread = remaining
        return b"".join(parts)

    def dispatch(self) -> None:
        app = self.server.app
        app.begin_request()  # counted, so that a graceful stop waits for this request
        try:
            self.write_answer(*self.answer(app))
        finally:
            app.end_request()

    def answer(self, app: App) -> Response:
        refused = self.framing_refusal()
        if refused is not None:
            return refused
        assert self.request_info is not None
        try:
            status, body, headers = app.route(self.request_info, self.read_body)
        except BadRequest as e:
            status, body, headers = error(e.status, str(e))
        except (socket.timeout, ConnectionError):
            self.unread = -1
            status, body, headers = error(408, "the request did not arrive in time (CLIENT_TIMEOUT)")
        except Exception:
            log.exception("internal error on %s %s", self.command, truncate(self.path, 200))
            status, body, headers = error(500, "internal error (see the service log)")
        if self.request_info.path == "/alert":
            app.metrics.inc("alert_threader_webhooks_total", code=str(status))
        return status, body, headers

    def write_answer(self, status: int, body: Any, headers: Dict[str, str]) -> None:
        if isinstance(body, (dict, list)):
            payload = ANSWER_JSON.encode(body).encode("utf-8", "backslashreplace")
            headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        else:
            payload = str(body).encode("utf-8", "backslashreplace")
        # A body still on the wire, or a refused request that may have carried one without saying so:
        # what follows on this connection cannot be trusted to be a request of its own.
        if self.unread or (status >= 400 and self.command in BODY_METHODS):
            self.lingering = self.close_connection = True
        if self.server.app.stopping or headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        try:
            self.send_response(status)
            for name, value in headers.items():
                if name != "Connection":
                    self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            self.lingering = False

    def finish(self) -> None:
        super().finish()
        if self.lingering:
            self.server.linger(self.connection, self.holds_slot)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = dispatch


class RefusingHandler(Handler):
    """For a connection past MAX_CONNECTIONS: one request, answered 503, and closed."""

    holds_slot = False

    def setup(self) -> None:
        super().setup()
        self.timeout = min(self.timeout, 5.0)
        self.connection.settimeout(self.timeout)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # the 503 is the final answer: no body is wanted

    def dispatch(self) -> None:
        self.lingering = True
        self.write_answer(*error(503, "too many connections (MAX_CONNECTIONS); retry later", Connection="close"))

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = dispatch


class ThreaderServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent connections (503 past it)."""

    daemon_threads = True
    allow_reuse_address = True
    REFUSALS = 16  # connections answered 503 at once; past those, closed unanswered
    HEAD_GRACE = 0.02  # a connection accepted this instant is left to send its head

    app: App  # attached once the port is ours (see Service): requests only arrive after that

    def __init__(self, address: Tuple[str, int], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusals = threading.BoundedSemaphore(self.REFUSALS)
        self.deadlines = Deadlines()
        # id(socket) -> (since, socket): connections waiting for a head, and lingering ones (since -inf: first to go)
        self._waiting: Dict[int, Tuple[float, Any]] = {}
        self._evicted: Dict[int, Any] = {}  # shut down to make room, until their handlers know
        self._waiting_lock = threading.Lock()
        # Connections waiting to be accepted: a storm's burst must reach the 503 past MAX_CONNECTIONS, not a reset.
        self.request_queue_size = max(128, max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def awaiting_head(self, sock: Any, seconds: float, slot: bool = True) -> None:
        """A connection now waits for a request's head: within `seconds`, and (if it holds a slot) first to go
        when slots run out."""
        self.deadlines.watch(sock, seconds)
        if slot:
            with self._waiting_lock:
                self._waiting[id(sock)] = (time.monotonic(), sock)

    def head_arrived(self, sock: Any) -> bool:
        """True if the connection was shut down meanwhile, for being slow or to make room: whatever was read
        on it, nothing can be answered, so nothing may be done."""
        with self._waiting_lock:
            self._waiting.pop(id(sock), None)
            evicted = self._evicted.pop(id(sock), None) is not None
        return self.deadlines.unwatch(sock) or evicted

    def linger(self, sock: Any, slot: bool = True) -> None:
        """Linger on a closing connection, the first of all to make way when slots run out: it holds no request.
        (A refused one holds no slot either: closing it would make no room.)"""
        if slot:
            with self._waiting_lock:
                self._waiting[id(sock)] = (-math.inf, sock)
        try:
            linger(sock)
        finally:
            self.head_arrived(sock)

    def evict_idlest(self) -> bool:
        """Make room: close the connection that has waited longest for a request (not one accepted this instant)."""
        with self._waiting_lock:
            if not self._waiting:
                return False
            key = min(self._waiting, key=lambda k: self._waiting[k][0])
            since, sock = self._waiting[key]
            if time.monotonic() - since < self.HEAD_GRACE:
                return False
            del self._waiting[key]
            self._evicted[key] = sock
        self.deadlines.unwatch(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # its handler ends at once and gives its slot back
        self.app.metrics.inc("alert_threader_connections_evicted_total")
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        # Past MAX_CONNECTIONS, the connection that has waited longest for a request (an idle keep-alive, or a
        # client holding slots with half a request line) makes way for one that just arrived, so that such
        # clients cannot lock Alertmanager out; only when every connection is busy is the newcomer refused.
        if self._slots.acquire(blocking=False) or (self.evict_idlest() and self._slots.acquire(timeout=1.0)):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise
            return
        self.app.metrics.inc("alert_threader_connections_refused_total")
        if not self._refusals.acquire(blocking=False):
            self.shutdown_request(request)
            return
        threading.Thread(target=self._refuse, args=(request, client_address), daemon=True,
                         name="alert-threader-refuse").start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: Any, client_address: Any) -> None:
        try:
            RefusingHandler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._refusals.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request's own handling: logged, never printed raw."""
        error_type = sys.exc_info()[0]
        if error_type is not None and issubclass(error_type, (ConnectionError, socket.timeout)):
            log_event(logging.DEBUG, "connection dropped", client=client_address[0], error=error_type.__name__)
        else:
            log.exception("error on a connection from %s", client_address[0])


# ---------------------------------------------------------------------------
# Running the service, and the command line
# ---------------------------------------------------------------------------

def open_store(config: Config, metrics: Metrics) -> ThreadStore:
    # A thread is held for a read, a change and a write; a click may wait behind a sender's Slack call.
    lock_timeout = 2 * config.slack_timeout + 30
    if config.thread_store == "redis":
        return RedisStore(config.redis_url, config.redis_key_prefix, metrics, config.thread_retention,
                          lock_timeout=lock_timeout, lease=config.redis_lease, sender_lease=config.sender_lease,
                          connections=config.max_connections + 32, sentinel_password=config.sentinel_password,
                          min_acks=config.redis_min_acks)
    return FileStore(config.thread_store_file, metrics, config.thread_retention, lock_timeout=lock_timeout)


def make_slack(config: Config, metrics: Metrics) -> SlackAPI:
    if config.dry_run:
        return DryRunSlack(metrics)
    assert config.slack_bot_token
    return SlackClient(config.slack_api_url, config.slack_bot_token, config.slack_timeout, metrics)


def lock_state_file(path: str) -> int:
    """An exclusive lock beside the state file: two services writing one store would corrupt it."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ConfigError(f"THREAD_STORE_FILE: cannot create {path}.lock: {e.strerror} (its directory must be "
                          "writable)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"THREAD_STORE_FILE: {path} is in use by another running alert-threader (stop it, or name "
                          "another file)") from None
    return fd


class Service:
    """The running threader: store, Slack client, HTTP server and housekeeping, as main starts them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        # The port first, then the store: a second instance started by mistake must stop
        # before it touches the state of the one already running.
        try:
            self.server = ThreaderServer((config.host, config.port), config.max_connections)
        except (OSError, OverflowError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ConfigError(f"PORT: cannot listen on {config.host}:{config.port}: {reason} (choose another PORT or "
                              "HOST)") from None
        self._state_lock: Optional[int] = None
        lock_path = f"{config.thread_store_file}.lock"
        new_lock = config.thread_store == "file" and not os.path.lexists(lock_path)
        try:
            if config.thread_store == "file":
                self._state_lock = lock_state_file(config.thread_store_file)
            self.store = open_store(config, self.metrics)
        except ConfigError:
            self.server.server_close()
            if new_lock and self._state_lock is not None:  # a refused start leaves nothing behind
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            self._unlock_state()
            raise
        self.slack = make_slack(config, self.metrics)
        self.delivery = Delivery(config, self.store, self.slack, self.metrics)
        interactions = Interactions(config, self.store, self.delivery.executor,
                                    AlertmanagerClient(config.alertmanager_auth, config.slack_timeout),
                                    self.metrics) if config.interactive else None
        self.app = App(config, self.store, self.slack, self.delivery, self.metrics, interactions)
        self.server.app = self.app
        self.port: int = self.server.server_address[1]
        self.metrics.set("alert_threader_build_info", 1, version=__version__,
                         python=".".join(map(str, sys.version_info[:3])), store=self.store.name)
        # Series that alert rules use exist from the start at 0, so that increase() sees the first event.
        for code in ("200", "503"):
            self.metrics.inc("alert_threader_webhooks_total", 0, code=code)
        for op in (("write", "append") if self.store.name == "file" else ("get", "put", "lock")):
            self.metrics.inc("alert_threader_store_errors_total", 0, store=self.store.name, op=op)
        self.metrics.inc("alert_threader_slack_fallbacks_total", 0)
        for name in ("slack_resends", "slack_rate_limit_wait_seconds", "connections_refused", "connections_evicted",
                     "alerts_delivered", "alerts_dropped", "alerts_refused"):
            self.metrics.inc(f"alert_threader_{name}_total", 0)
        self.metrics.inc("alert_threader_slack_refused_total", 0, method="chat.postMessage")
        if interactions is not None:
            for action in ("silence", "unsilence", "ack", "failed"):
                self.metrics.inc("alert_threader_interactions_total", 0, action=action)
        self.metrics.gauge("alert_threader_open_threads", self.store.open_count)
        self.metrics.gauge("alert_threader_stored_threads", self.store.count)
        self.channels = config.slack_channels or (self.delivery.intake.default_channel,)
        self.metrics.gauge("alert_threader_outbox_alerts", lambda: self._outbox(0), label="channel")
        self.metrics.gauge("alert_threader_outbox_oldest_seconds", lambda: self._outbox(1), label="channel")
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    @property
    def url(self) -> str:
        """Where to reach the service from this machine."""
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _outbox(self, part: int) -> Dict[str, float]:
        """Per channel: how many alerts wait (part 0), or for how many seconds the oldest has (part 1)."""
        now, values = time.time(), {channel: 0.0 for channel in self.channels}
        for channel, (waiting, oldest) in self.store.outbox_summary().items():
            values[channel] = float(waiting) if part == 0 else max(0.0, now - oldest) if oldest else 0.0
        return values

    def start(self) -> "Service":
        for target, name in ((lambda: self.server.serve_forever(poll_interval=0.2), "http"),
                             (self._housekeeping, "housekeeping")):
            thread = threading.Thread(target=target, name=f"alert-threader-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # A sender for every channel: to tell what the outbox kept from before a restart, and on Redis to take
        # a channel over when the replica sending for it is gone.
        with contextlib.suppress(StoreError):
            self.channels = tuple(dict.fromkeys([*self.channels, *self.store.outbox_summary()]))
        for channel in self.channels:
            self.delivery.senders.wake(channel)
        return self

    def _housekeeping(self) -> None:
        while not self._stop.wait(30):
            with contextlib.suppress(StoreError):
                pruned = self.store.prune(time.time())
                if pruned:
                    log_event(logging.INFO, "pruned closed threads past THREAD_RETENTION", threads=pruned)

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop accepting, answer the webhooks in flight, let the senders finish their Slack call, flush the store.

        What waits in the outbox stays there for the next start (or, on Redis, another replica). True if every
        webhook in flight was answered."""
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.app.stopping = True
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        drained = self.app.wait_idle(timeout)
        self.delivery.senders.stop(max(0.0, deadline - time.monotonic()))
        self.store.close()
        self.slack.close()
        self._unlock_state()
        return drained

    def _unlock_state(self) -> None:
        if self._state_lock is not None:
            os.close(self._state_lock)  # closing the descriptor releases the flock
            self._state_lock = None


TOKEN_REFUSED = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})


def check_slack_at_start(config: Config) -> None:
    """Ask Slack, once, whether the token works and the bot is in SLACK_CHANNEL. A token Slack refuses stops
    the start (ConfigError); a Slack out of reach does not: the alerts wait in the outbox for it."""
    if not config.slack_bot_token:
        return
    client = SlackClient(config.slack_api_url, config.slack_bot_token, min(config.slack_timeout, 5.0), Metrics())
    try:
        identity = client.call("auth.test", {})
        bot = str(identity.get("user") or "the bot")[:80]
        log_event(logging.INFO, "Slack token works", team=str(identity.get("team"))[:80], bot=bot)
        for level, text in slack_problems(config, client, bot):
            log_event(level, text)
    except SlackError as e:
        if e.error in TOKEN_REFUSED:
            raise ConfigError(f"SLACK_BOT_TOKEN: Slack refuses it: {e.error} ({e.hint})") from None
        log_event(logging.WARNING, "cannot check the Slack token now; starting anyway, the alerts wait in the "
                  "outbox until Slack answers", error=e.error, fix=e.hint)
    finally:
        client.close()


def slack_problems(config: Config, client: Any, bot: str) -> List[Tuple[int, str]]:
    """What start-up and check say about a token Slack took: not a bot's, or a bot outside SLACK_CHANNEL."""
    found = []
    if not (config.slack_bot_token or "").startswith("xoxb-"):
        found.append((logging.WARNING, "SLACK_BOT_TOKEN is not a bot token (xoxb-): messages would be posted as "
                      "the person it belongs to; use the app's Bot User OAuth Token"))
    channel = config.slack_channel or ""
    try:  # a read method: its argument goes in the query string
        info = client.call("conversations.info?channel=" + urllib.parse.quote(channel), {})
    except SlackError as e:
        if e.error == "channel_not_found":
            found.append((logging.WARNING, f"SLACK_CHANNEL {channel} is not visible to {bot}: invite it (/invite "
                          f"@{bot}) if it is a private channel, or check the channel ID"))
        elif e.error == "missing_scope":
            found.append((logging.INFO, f"cannot tell whether {bot} is in SLACK_CHANNEL {channel} (the token "
                          "lacks channels:read); if not, the first alert's error says how to fix it"))
        return found
    if isinstance(info.get("channel"), dict) and info["channel"].get("is_member") is False:
        found.append((logging.WARNING, f"{bot} is not a member of SLACK_CHANNEL {channel}: invite it with /invite "
                      f"@{bot} in the channel, or its posts will fail (not_in_channel)"))
    return found


def start_service(config: Config) -> Service:
    """Build and start the service exactly as main does (tests use this with PORT=0)."""
    check_slack_at_start(config)
    service = Service(config)  # the port is bound: what connects now waits for start()
    where = ({"file": config.thread_store_file} if config.thread_store == "file"
             else {"redis": redact_url(config.redis_url)})
    log_event(logging.INFO, f"alert-threader {__version__} listening on {config.host or '*'}:{service.port} "
              f"({service.url} from this machine)", store=config.thread_store, **where,
              channel=service.delivery.intake.default_channel, environment=config.environment)
    if config.webhook_token:
        log_event(logging.INFO, "WEBHOOK_TOKEN is set: POST /alert, /cache and /preview need it; "
                  "/health, /metrics and /stats are open")
    else:
        log_event(logging.WARNING, f"no WEBHOOK_TOKEN: POST /alert takes webhooks from anyone who can reach "
                  f"{config.host or '*'}:{service.port}; /cache and /preview answer only loopback (127.0.0.1, ::1)")
    service.store.health()  # a store out of reach is said now, not when the first alert arrives
    if config.thread_store == "file" and config.redis_url != {n: d for n, d, _ in SETTINGS}["REDIS_URL"]:
        log_event(logging.WARNING, "REDIS_URL is set but THREAD_STORE is file: Redis is not used; set "
                  "THREAD_STORE=redis to use it")
    if isinstance(service.store, RedisStore):
        service.store.warn_if_volatile()
    if config.interactive:
        log_event(logging.INFO, "Silence and Ack from Slack are on: POST /slack/actions takes Slack's signed "
                  "requests", alertmanager=config.alertmanager_url)
    if config.dry_run:
        why = "DRY_RUN is set" if config.slack_bot_token else "no SLACK_BOT_TOKEN is set"
        log_event(logging.WARNING, f"DRY-RUN: {why}, so nothing is posted to Slack; "
                  f"every payload is logged and shown on {service.url}/preview")
    return service.start()


class OneLineParser(argparse.ArgumentParser):
    """A command line it cannot read is refused like a bad setting: one line, exit code 2."""

    def error(self, message: str) -> Any:
        # An argument's value may be a secret given to a mistyped flag: never echoed.
        message = re.sub(r"invalid choice: '[^']*'", "invalid choice", re.sub(r"=\S*", "=…", message))
        self.exit(2, f"alert-threader: {message} (python3 alert_threader.py --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="alert_threader.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "render", "check"),
                        help="serve (default), render FILE, or check")
    parser.add_argument("file", nargs="*", help="for render: Alertmanager webhook JSON files, told in order (- for "
                                                "stdin)")
    parser.add_argument("--payload", type=int, metavar="N",
                        help="for render: print only the Nth call's message, as Block Kit Builder takes it")
    parser.add_argument("--version", action="version", version=f"alert-threader {__version__}")
    add_setting_flags(parser)
    return parser


def cmd_render(config: Config, paths: Sequence[str], payload: Optional[int] = None) -> int:
    """Print the Slack calls webhook files would cause, one after the other, on an empty store: no network, no
    state. With several files, each call names the file whose webhook caused it."""
    if not paths:
        print("alert-threader: render needs a webhook JSON file (or - for stdin), or several in order", file=sys.stderr)
        return 2
    hooks = []
    for path in paths:
        try:
            if path == "-":
                raw = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as f:
                    raw = f.read()
        except OSError as e:
            print(f"alert-threader: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
        try:
            hooks.append(parse_webhook(raw, content_type=None))
        except BadRequest as e:
            print(f"alert-threader: {path}: {e}", file=sys.stderr)
            return 1
    metrics = Metrics()
    slack = DryRunSlack(metrics, quiet=True, keep=None)  # every call, however many
    delivery = Delivery(dataclasses.replace(config, slack_pace=0, delivery_wait=0), FileStore(None, metrics), slack,
                        metrics, threaded=False)
    calls: List[Dict[str, Any]] = []
    for path, hook in zip(paths, hooks):
        delivery.intake.take(hook)
        delivery.senders.sender(delivery.intake.default_channel).drain()
        made = [{"method": method, "payload": sent} for _, method, sent, _ in slack.recent_calls()[len(calls):]]
        calls += [dict(call, webhook=path) for call in made] if len(paths) > 1 else made
    if payload is None:
        print(json.dumps(calls, indent=2, ensure_ascii=False))
        return 0
    messages = [n for n, call in enumerate(calls, 1) if {"blocks", "attachments"} & set(call["payload"])]
    if payload not in messages:
        print(f"alert-threader: --payload {payload}: the webhook makes {plural(len(calls), 'call')}; "
              f"pick one that posts or updates a message: {', '.join(map(str, messages)) or 'none'}", file=sys.stderr)
        return 2
    message = calls[payload - 1]["payload"]
    print(json.dumps({k: message[k] for k in ("blocks", "attachments") if k in message}, indent=2,
                     ensure_ascii=False))
    return 0


def cmd_check(config: Config) -> int:
    """Validate the settings, reach the store, and ask Slack whether the token works: every part is checked,
    whatever the others say."""
    failed = False
    channel = config.slack_channel or f"{DRY_RUN_CHANNEL} (dry-run)"
    print(f"settings: OK (store={config.thread_store}, channel={channel}, environment={config.environment})")
    metrics = Metrics()
    # Read-only: the running service may own this store, and check must never rewrite it.
    try:
        if config.thread_store == "file":
            found = FileStore(config.thread_store_file, metrics, read_only=True)
            waiting = sum(n for n, _ in found.outbox_summary().values())
            where = (f"{config.thread_store_file}, {plural(found.count(), 'thread')}, "
                     f"{plural(waiting, 'alert')} waiting for Slack")
        else:
            store = open_store(config, metrics)
            try:
                problem = store.redis.probe()  # type: ignore[attr-defined]
                if problem:
                    raise StoreError(f"cannot use Redis at {redact_url(config.redis_url)}: {problem}")
                where = redact_url(config.redis_url)
                if store.redis.sentinel is not None:  # type: ignore[attr-defined]
                    with contextlib.suppress(*store.redis.errors):  # type: ignore[attr-defined]
                        where += f"; primary now {store.redis.primary()}"  # type: ignore[attr-defined]
            finally:
                store.close()
    except (ConfigError, StoreError) as e:
        print(f"store: FAILED: {redact(str(e), config.secrets())}")
        failed = True
    else:
        print(f"store: OK ({where})")
    if config.interactive and config.alertmanager_url:  # load_config requires the URL with a signing secret
        try:
            client = AlertmanagerClient(config.alertmanager_auth, config.slack_timeout)
            version = client.version(config.alertmanager_url)
        except AlertmanagerError as e:
            print(f"alertmanager: FAILED: {redact(str(e), config.secrets())}")
            failed = True
        else:
            print(f"alertmanager: OK ({config.alertmanager_url}, version {version}): silences from Slack can be made")
    if config.dry_run:
        print("slack: no SLACK_BOT_TOKEN: the service would run in dry-run mode and post nothing. "
              "Fix: set SLACK_BOT_TOKEN or SLACK_BOT_TOKEN_FILE to the app's xoxb- token")
        return 1
    slack = make_slack(config, metrics)
    try:
        identity = slack.call("auth.test", {})
    except SlackError as e:
        print(f"slack: FAILED: {e.error}. Fix: {e.hint}")
        return 1
    print(f"slack: OK: the token works (team {identity.get('team')}, bot user {identity.get('user')})")
    client = SlackClient(config.slack_api_url, config.slack_bot_token or "", min(config.slack_timeout, 5.0), metrics)
    for level, text in slack_problems(config, client, str(identity.get("user") or "the bot")[:80]):
        print(f"slack: {'WARNING' if level >= logging.WARNING else 'NOTE'}: {text}")
        failed = failed or level >= logging.WARNING
    client.close()
    slack.close()
    return int(failed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        config = load_config(args, dict(os.environ))
    except ConfigError as e:
        print(f"alert-threader: {e}", file=sys.stderr)
        return 2
    if args.command in ("render", "check"):
        try:
            return cmd_render(config, args.file, args.payload) if args.command == "render" else cmd_check(config)
        except BrokenPipeError:  # `render … | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    setup_logging(config)
    try:
        service = start_service(config)
    except ConfigError as e:  # in the same one-line form as a setting refused before the start
        print(f"alert-threader: {redact(str(e), config.secrets())}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log_event(logging.INFO, "stopping: finishing webhooks in flight", timeout=f"{config.shutdown_timeout:g}s")
    drained = service.stop()
    log_event(logging.INFO if drained else logging.WARNING,
              "stopped" if drained else "stopped before every webhook finished (Alertmanager will retry them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
