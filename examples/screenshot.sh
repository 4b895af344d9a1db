#!/usr/bin/env bash
# Redraw examples/preview.png: one alert's thread as GET /preview shows it.
#
# Starts alert-threader in dry-run mode (no Slack token: nothing leaves this
# machine) on a free loopback port with a throw-away state file, posts the
# example webhooks (firing, a second instance, both resolved) and screenshots
# /preview with headless Chromium (Debian: apt-get install chromium
# fonts-noto-color-emoji fonts-liberation2; without an emoji font the 🚨 and ✅ come
# out as boxes, and without a sans font the emoji font draws the digits and spaces).
#
# Usage: examples/screenshot.sh [OUTPUT.png]    (default examples/preview.png)
#        CHROMIUM=/path/to/chrome examples/screenshot.sh
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname -- "$here")
out=${1:-$here/preview.png}
[[ $out == /* ]] || out=$PWD/$out

die() { printf 'screenshot.sh: %s\n' "$*" >&2; exit 1; }

chromium=${CHROMIUM:-}
if [[ -z $chromium ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null; then chromium=$candidate; break; fi
    done
fi
[[ -n $chromium ]] || die "no Chromium found (apt-get install chromium, or set CHROMIUM=)"
for tool in python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
# U+1F6A8 is the 🚨 of critical alerts.
if command -v fc-list >/dev/null && [[ -z $(fc-list ':charset=1f6a8' family) ]]; then
    echo "screenshot.sh: warning: no emoji font (apt-get install fonts-noto-color-emoji): emoji will be boxes" >&2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/alert-threader-screenshot.XXXXXX")
service_pid=""
cleanup() {
    if [[ -n $service_pid ]]; then
        kill "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
    rm -rf -- "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Port 0: the service binds a free port itself and logs it, so there is no
# window in which another process can take a port picked for it. The env -u
# list keeps a caller's real Slack token or webhook token out of this run.
env -u SLACK_BOT_TOKEN -u SLACK_BOT_TOKEN_FILE -u WEBHOOK_TOKEN -u WEBHOOK_TOKEN_FILE \
    -u SLACK_CHANNELS -u ALERTMANAGER_URL \
    python3 "$repo/alert_threader.py" serve \
    --host 127.0.0.1 --port 0 \
    --thread-store file --thread-store-file "$tmp/threads.json" \
    --slack-channel C0123456789 --environment production \
    --log-format text --log-level info \
    >"$tmp/service.log" 2>&1 &
service_pid=$!

url=""
for _ in $(seq 100); do
    if [[ $(<"$tmp/service.log") =~ \((http://127\.0\.0\.1:[0-9]+)\ from\ this\ machine\) ]]; then
        url=${BASH_REMATCH[1]}
        break
    fi
    kill -0 "$service_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $url ]] || ! curl -sSf -o /dev/null "$url/health"; then
    cat "$tmp/service.log" >&2
    die "alert-threader did not start"
fi
echo "alert-threader (dry-run) on $url"

for example in firing second-instance resolved; do
    printf 'POST %s.json: ' "$example"
    curl -sS --fail-with-body -X POST "$url/alert" \
        -H 'Content-Type: application/json' --data-binary "@$here/$example.json"
    echo
done
# A card is edited just after its webhook is answered: wait until it shows the thread resolved.
for _ in $(seq 100); do
    if curl -sS "$url/preview" | grep -q 'alerts resolved after'; then break; fi
    sleep 0.1
done

flags=(--headless --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --user-data-dir="$tmp/chromium-profile" --hide-scrollbars
    "--window-size=900,1560" --screenshot="$out")
# --screenshot captures the window only: 1560 px fits the example thread
# (a parent and three replies) with a margin.
# Chromium's sandbox refuses to run as root; a throw-away profile on a
# loopback page is what is at stake here.
((EUID != 0)) || flags+=(--no-sandbox)
if ! timeout 120 "$chromium" "${flags[@]}" "$url/preview" >"$tmp/chromium.log" 2>&1 || [[ ! -s $out ]]; then
    cat "$tmp/chromium.log" >&2
    die "Chromium did not write $out"
fi
echo "wrote $out"
