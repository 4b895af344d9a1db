#!/usr/bin/env bash
# install.sh: install, upgrade or remove alert-threader as a hardened systemd service.
#
#   sudo ./install.sh                 asks for the store, Slack token, channel, environment
#   sudo ./install.sh --yes --token-file /root/slack.token --channel C0123456789
#   sudo ./install.sh --uninstall [--purge]
#   ./install.sh --root /tmp/stage --yes ...   stage the files only (packaging, tests)
#
# Safe to re-run: an upgrade replaces the code and the unit, keeps every
# setting that is not passed as a flag, and restarts the service.
# ./install.sh --help lists every flag.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly SERVICE=alert-threader
readonly SOURCE_CODE=$SCRIPT_DIR/alert_threader.py
readonly SOURCE_UNIT=$SCRIPT_DIR/alert-threader.service
readonly DEFAULT_PORT=9009
readonly DEFAULT_REDIS_URL=redis://127.0.0.1:6379/0
readonly REDIS_DROPIN=/etc/redis/alert-threader.conf
readonly REDIS_INCLUDE="include $REDIS_DROPIN"
readonly REDIS_INCLUDE_COMMENT="# alert-threader: local Redis settings (install.sh)"
# Order of the variables in a freshly written settings file.
readonly ENV_ORDER=(SLACK_BOT_TOKEN SLACK_CHANNEL ENVIRONMENT THREAD_STORE REDIS_URL WEBHOOK_TOKEN HOST PORT
    SLACK_SIGNING_SECRET ALERTMANAGER_URL ALERTMANAGER_AUTH)

# Options; empty means "not given".
OPT_YES=0
OPT_UNINSTALL=0
OPT_PURGE=0
OPT_STORE=""
OPT_TOKEN_FILE=""
OPT_CHANNEL=""
OPT_ENVIRONMENT=""
OPT_WEBHOOK_TOKEN_FILE=""
OPT_WEBHOOK=""          # generate | none | (empty: ask, or keep)
OPT_LOCAL_REDIS=0
OPT_REDIS_URL=""
OPT_PORT=""
OPT_HOST=""
OPT_SIGNING_SECRET_FILE=""
OPT_ALERTMANAGER_URL=""
OPT_ALERTMANAGER_AUTH_FILE=""
OPT_ROOT=""
STAGING=0               # 1 with --root: write files only, run no systemctl/apt-get/curl

# Target paths, prefixed with the staging root by set_paths.
ROOT=""
CODE_DIR="" CODE_FILE="" CONF_DIR="" ENV_FILE="" UNIT_FILE="" UNIT_DROPINS=""
STATE_DIRS=()

declare -A EXISTING=()  # settings found in an existing env file (upgrade)
declare -A NEW=()       # settings to write: flags, answers, fresh-install defaults

usage() {
    cat <<'EOF'
Usage: sudo ./install.sh [options]

Installs alert-threader (the alert_threader.py and alert-threader.service next
to this script) as a systemd service: code in /opt/alert-threader, settings in
/etc/alert-threader/alert-threader.env (root-only), state in
/var/lib/alert-threader. Without --yes it asks for what no flag gave. Re-running
upgrades: the code and unit are replaced, settings not given as flags are kept.

Settings:
  --store file|redis          where thread state lives (default: file)
  --token-file PATH           read the Slack bot token (xoxb-...) from PATH, or
                              from stdin with "-"; aliases --slack-token-file,
                              --slack-bot-token-file. The token itself is never
                              taken on the command line. No token means dry-run:
                              the service logs what it would post, posts nothing.
  --channel ID                default Slack channel ID, like C0123456789
  --environment NAME          shown in messages, part of the thread key
                              (default: production)
  --webhook-token-file PATH   require this bearer token on POST /alert
  --generate-webhook-token    generate a new random webhook token (the default
                              on a fresh install)
  --no-webhook-token          accept webhooks without a token
  --redis-url URL             redis://[:password@]host:port/db (implies
                              --store redis; default redis://127.0.0.1:6379/0);
                              a password here shows in shell history: prefer
                              the prompt, or edit the settings file afterwards
  --local-redis               install redis-server on this machine, listening
                              on localhost only, persistent, never evicting
                              keys (implies --store redis)
  --port N                    listen port (default: 9009)
  --host ADDRESS              listen address (default: 0.0.0.0, every IPv4
                              address); e.g. 127.0.0.1 behind a local proxy or
                              an Alertmanager on this machine, :: for IPv6 too

Silence and Ack from Slack (optional; docs/slack.md: "Silence and Ack from Slack"):
  --signing-secret-file PATH  the Slack app's signing secret (Basic Information
                              > App Credentials), from PATH or stdin with "-":
                              turns POST /slack/actions on
  --alertmanager-url URL      Alertmanager's address for silences, like
                              http://alertmanager:9093
  --alertmanager-auth-file PATH
                              Alertmanager's credentials: user:password or
                              "Bearer TOKEN"
  Secrets given this way are written into the settings file, which systemd
  reads as root: the service itself never needs to read a file under /etc.

Actions:
  --yes, -y                   ask nothing; defaults for anything not given
  --uninstall                 stop and remove the service and its code; keep
                              the settings (with the tokens) and the thread state
  --purge                     with --uninstall: remove the settings, the
                              thread state and this script's Redis settings too
  --root DIR                  write the files under DIR instead of /, without
                              running systemctl, apt-get or curl (packaging)
  --help, -h                  show this help
EOF
}

info() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

# Runs a command that changes the system, or in staging mode says it would.
# Never pass a secret to it: arguments show in `ps` and in this output.
run() {
    if ((STAGING)); then
        info "    would run: $*"
    else
        info "    + $*"
        "$@"
    fi
}

# The path as it will be on the target system (without the staging root).
target() { printf '%s' "${1#"$ROOT"}"; }

# ---------------------------------------------------------------------------
# Arguments and validation (nothing is written before all of this passes)
# ---------------------------------------------------------------------------

parse_args() {
    local flag value has_value
    while (($#)); do
        flag=$1
        has_value=0
        value=""
        if [[ $flag == --*=* ]]; then
            value=${flag#*=}
            flag=${flag%%=*}
            has_value=1
        fi
        case $flag in
            --store | --token-file | --slack-token-file | --slack-bot-token-file | --channel | --environment | \
                --webhook-token-file | --redis-url | --port | --host | --root | --signing-secret-file | \
                --alertmanager-url | --alertmanager-auth-file)
                if ((!has_value)); then
                    (($# >= 2)) || die "$flag needs a value (see --help)"
                    value=$2
                    shift
                fi
                ;;
            --token | --slack-token | --slack-bot-token | --webhook-token | --signing-secret | --alertmanager-auth)
                die "$flag is refused: a secret on the command line lands in shell history and ps. Use ${flag}-file PATH (or --token-file -), or answer the hidden prompt"
                ;;
            *)
                ((!has_value)) || die "$flag takes no value"
                ;;
        esac
        case $flag in
            -h | --help) usage; exit 0 ;;
            -y | --yes) OPT_YES=1 ;;
            --uninstall) OPT_UNINSTALL=1 ;;
            --purge) OPT_PURGE=1 ;;
            --store) OPT_STORE=$value ;;
            --token-file | --slack-token-file | --slack-bot-token-file) OPT_TOKEN_FILE=$value ;;
            --channel) OPT_CHANNEL=$value ;;
            --environment) OPT_ENVIRONMENT=$value ;;
            --webhook-token-file) OPT_WEBHOOK_TOKEN_FILE=$value ;;
            --generate-webhook-token) set_webhook_mode generate ;;
            --no-webhook-token) set_webhook_mode none ;;
            --local-redis) OPT_LOCAL_REDIS=1 ;;
            --redis-url) OPT_REDIS_URL=$value ;;
            --port) OPT_PORT=$value ;;
            --host) OPT_HOST=$value ;;
            --signing-secret-file) OPT_SIGNING_SECRET_FILE=$value ;;
            --alertmanager-url) OPT_ALERTMANAGER_URL=$value ;;
            --alertmanager-auth-file) OPT_ALERTMANAGER_AUTH_FILE=$value ;;
            --root) OPT_ROOT=$value ;;
            *) die "unknown option: $flag (see --help)" ;;
        esac
        shift
    done
    if [[ -n $OPT_WEBHOOK_TOKEN_FILE ]]; then
        set_webhook_mode file
    fi
}

set_webhook_mode() {
    if [[ -n $OPT_WEBHOOK && $OPT_WEBHOOK != "$1" ]]; then
        die "choose one of --webhook-token-file, --generate-webhook-token and --no-webhook-token"
    fi
    OPT_WEBHOOK=$1
}

valid_store() { [[ $1 == file || $1 == redis ]]; }
# Channel IDs only (as the service's SLACK_CHANNEL accepts them): names change, IDs do not.
valid_channel() { [[ $1 =~ ^[A-Z0-9][A-Z0-9_-]{1,79}$ ]]; }
# The service refuses '|' (it separates the thread key); the rest keeps the env file plain.
valid_environment() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]]; }
valid_slack_token() { [[ $1 =~ ^xox[a-z]-[A-Za-z0-9-]+$ ]]; }
valid_webhook_token() { [[ $1 =~ ^[A-Za-z0-9._~+/=-]{16,512}$ ]]; }
# No quotes, backslashes, '$', backticks or spaces: the value is safe unquoted
# in a systemd EnvironmentFile (which expands $VAR and unescapes \).
valid_redis_url() { [[ $1 =~ ^(redis|rediss|unix)://[A-Za-z0-9._~%!*+,:@/?\&=-]+$ ]]; }
valid_signing_secret() { [[ $1 =~ ^[A-Za-z0-9]{16,128}$ ]]; }
valid_http_url() { [[ $1 =~ ^https?://[A-Za-z0-9._~%!*+,:@/?\&=-]+$ ]]; }
valid_alertmanager_auth() { [[ $1 =~ ^(Bearer\ [A-Za-z0-9._~+/=-]{8,4096}|[A-Za-z0-9._~+-]+:[A-Za-z0-9._~+/=!@%^*,:-]+)$ ]]; }
valid_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
# An IPv4 or IPv6 address or a host name, as the service's HOST takes it (no brackets, spaces or quotes).
valid_host() { [[ $1 =~ ^[0-9A-Za-z][0-9A-Za-z.:%_-]{0,252}$ || $1 =~ ^::[0-9A-Fa-f.:]*$ ]]; }

validate_options() {
    ((OPT_PURGE && !OPT_UNINSTALL)) && die "--purge only goes with --uninstall"
    if [[ -n $OPT_ROOT ]]; then
        STAGING=1
        ROOT=$(realpath -m -- "$OPT_ROOT")
        if [[ $ROOT == / ]]; then
            ROOT=""
        fi
    fi
    require_root
    ((OPT_UNINSTALL)) && return 0

    if [[ -n $OPT_STORE ]] && ! valid_store "$OPT_STORE"; then
        die "--store must be file or redis, not '$OPT_STORE'"
    fi
    if ((OPT_LOCAL_REDIS)) || [[ -n $OPT_REDIS_URL ]]; then
        [[ $OPT_STORE == file ]] && die "--local-redis and --redis-url need --store redis, not --store file"
        OPT_STORE=redis
    fi
    if [[ -n $OPT_REDIS_URL ]] && ! valid_redis_url "$OPT_REDIS_URL"; then
        die "--redis-url must look like redis://[:password@]host:port/db (no quotes, spaces, \$ or backslashes)"
    fi
    if [[ -n $OPT_CHANNEL ]] && ! valid_channel "$OPT_CHANNEL"; then
        die "--channel must be a Slack channel ID like C0123456789 (not a #name), not '$OPT_CHANNEL'"
    fi
    if [[ -n $OPT_ENVIRONMENT ]] && ! valid_environment "$OPT_ENVIRONMENT"; then
        die "--environment may hold letters, digits, '.', '_' and '-' only (no spaces or '|'), not '$OPT_ENVIRONMENT'"
    fi
    if [[ -n $OPT_HOST ]] && ! valid_host "$OPT_HOST"; then
        die "--host must be an IP address (like 127.0.0.1 or ::) or a host name, without brackets, not '$OPT_HOST'"
    fi
    if [[ -n $OPT_PORT ]]; then
        valid_port "$OPT_PORT" || die "--port must be a number from 1 to 65535, not '$OPT_PORT'"
        OPT_PORT=$((10#$OPT_PORT))
        ((OPT_PORT >= 1024)) ||
            warn "port $OPT_PORT is privileged and the unit grants no CAP_NET_BIND_SERVICE; the service may fail to bind it"
    fi
    if [[ -n $OPT_TOKEN_FILE ]]; then
        SLACK_TOKEN=$(read_secret_file "$OPT_TOKEN_FILE" --token-file)
        if [[ -n $SLACK_TOKEN ]] && ! valid_slack_token "$SLACK_TOKEN"; then
            die "--token-file: $OPT_TOKEN_FILE does not hold a Slack token (expected xoxb-...)"
        fi
    fi
    if [[ -n $OPT_WEBHOOK_TOKEN_FILE ]]; then
        WEBHOOK_TOKEN=$(read_secret_file "$OPT_WEBHOOK_TOKEN_FILE" --webhook-token-file)
        valid_webhook_token "$WEBHOOK_TOKEN" ||
            die "--webhook-token-file: the token must be 16-512 characters of A-Z a-z 0-9 . _ ~ + / = -"
    fi
    if [[ -n $OPT_SIGNING_SECRET_FILE ]]; then
        SIGNING_SECRET=$(read_secret_file "$OPT_SIGNING_SECRET_FILE" --signing-secret-file)
        valid_signing_secret "$SIGNING_SECRET" ||
            die "--signing-secret-file: expected the app's signing secret (16-128 letters and digits)"
    fi
    if [[ -n $OPT_ALERTMANAGER_URL ]] && ! valid_http_url "$OPT_ALERTMANAGER_URL"; then
        die "--alertmanager-url must look like http://alertmanager:9093 (no quotes, spaces, \$ or backslashes)"
    fi
    [[ $OPT_ALERTMANAGER_URL != *@* ]] ||
        die "--alertmanager-url must not carry credentials: give them with --alertmanager-auth-file"
    if [[ -n $OPT_ALERTMANAGER_AUTH_FILE ]]; then
        ALERTMANAGER_AUTH=$(read_secret_file "$OPT_ALERTMANAGER_AUTH_FILE" --alertmanager-auth-file)
        valid_alertmanager_auth "$ALERTMANAGER_AUTH" ||
            die "--alertmanager-auth-file: expected user:password or 'Bearer TOKEN' on one line (no quotes, spaces, \$ or backslashes)"
    fi
    [[ -f $SOURCE_CODE ]] || die "$SOURCE_CODE not found: run install.sh from the alert-threader repository"
    [[ -f $SOURCE_UNIT ]] || die "$SOURCE_UNIT not found: run install.sh from the alert-threader repository"
}

SLACK_TOKEN=""
WEBHOOK_TOKEN=""
SIGNING_SECRET=""
ALERTMANAGER_AUTH=""

# Prints the file's content without surrounding whitespace ("-" reads stdin).
read_secret_file() {
    local path=$1 flag=$2 content
    if [[ $path == - ]]; then
        content=$(cat)
    else
        [[ -f $path && -r $path ]] || die "$flag: cannot read $path"
        content=$(<"$path")
    fi
    trim "$content"
}

trim() {
    if [[ $1 =~ ^[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]]; then
        printf '%s' "${BASH_REMATCH[1]}"
    fi
}

set_paths() {
    CODE_DIR=$ROOT/opt/alert-threader
    CODE_FILE=$CODE_DIR/alert_threader.py
    CONF_DIR=$ROOT/etc/alert-threader
    ENV_FILE=$CONF_DIR/alert-threader.env
    UNIT_FILE=$ROOT/etc/systemd/system/$SERVICE.service
    UNIT_DROPINS=$UNIT_FILE.d
    # With DynamicUser=yes the state lives in /var/lib/private/alert-threader
    # and /var/lib/alert-threader is a symlink to it.
    STATE_DIRS=("$ROOT/var/lib/$SERVICE" "$ROOT/var/lib/private/$SERVICE")
}

require_root() {
    ((STAGING)) && return 0
    ((EUID == 0)) || die "run as root (sudo ./install.sh ...), or stage the files with --root DIR"
}

# ---------------------------------------------------------------------------
# Settings: existing file, flags, questions
# ---------------------------------------------------------------------------

# Reads KEY=value lines without sourcing the file (it is data, not a script).
load_existing() {
    local line key value
    [[ -f $ENV_FILE ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key=${BASH_REMATCH[2]}
        value=$(trim "${BASH_REMATCH[3]}")
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        EXISTING[$key]=$value
    done <"$ENV_FILE"
}

# The value the service will see: new, else existing, else the given default.
effective() {
    if [[ -v NEW[$1] ]]; then
        printf '%s' "${NEW[$1]}"
    elif [[ -v EXISTING[$1] ]]; then
        printf '%s' "${EXISTING[$1]}"
    else
        printf '%s' "${2:-}"
    fi
}

interactive() { ((!OPT_YES)); }

# ask VAR "question" default: reads an answer (the default when empty) into VAR.
ask() {
    local reply
    read -r -p "$2 [$3]: " reply || die "no answer (end of input)"
    printf -v "$1" '%s' "${reply:-$3}"
}

# ask_yes_no "question" y|n: succeeds for yes.
ask_yes_no() {
    local reply hint=y/N
    [[ $2 == y ]] && hint=Y/n
    read -r -p "$1 [$hint]: " reply || die "no answer (end of input)"
    reply=${reply:-$2}
    [[ $reply == [yY]* ]]
}

generate_token() {
    # 32 random bytes as 64 hex characters: safe in any config file or header.
    od -An -vtx1 -N32 /dev/urandom | tr -d ' \n'
}

gather_settings() {
    local fresh=1 keep=0
    [[ -f $ENV_FILE ]] && fresh=0
    if interactive; then
        [[ -t 0 ]] || die "no terminal to ask questions on: pass --yes with the settings as flags (see --help)"
        if ((!fresh)); then
            info "Existing settings: $(target "$ENV_FILE") (store=$(effective THREAD_STORE file), channel=$(effective SLACK_CHANNEL none), environment=$(effective ENVIRONMENT production))"
            ask_yes_no "Keep them (flags given still apply)?" y && keep=1
        fi
    fi
    if interactive && ((!keep)); then
        ask_settings "$fresh"
    fi

    # Flags win over everything.
    [[ -n $OPT_STORE ]] && NEW[THREAD_STORE]=$OPT_STORE
    [[ -n $OPT_CHANNEL ]] && NEW[SLACK_CHANNEL]=$OPT_CHANNEL
    [[ -n $OPT_ENVIRONMENT ]] && NEW[ENVIRONMENT]=$OPT_ENVIRONMENT
    [[ -n $OPT_PORT ]] && NEW[PORT]=$OPT_PORT
    [[ -n $OPT_HOST ]] && NEW[HOST]=$OPT_HOST
    [[ -n $OPT_TOKEN_FILE ]] && NEW[SLACK_BOT_TOKEN]=$SLACK_TOKEN
    [[ -n $OPT_REDIS_URL ]] && NEW[REDIS_URL]=$OPT_REDIS_URL
    [[ -n $OPT_SIGNING_SECRET_FILE ]] && NEW[SLACK_SIGNING_SECRET]=$SIGNING_SECRET
    [[ -n $OPT_ALERTMANAGER_URL ]] && NEW[ALERTMANAGER_URL]=$OPT_ALERTMANAGER_URL
    [[ -n $OPT_ALERTMANAGER_AUTH_FILE ]] && NEW[ALERTMANAGER_AUTH]=$ALERTMANAGER_AUTH
    case $OPT_WEBHOOK in
        file) NEW[WEBHOOK_TOKEN]=$WEBHOOK_TOKEN ;;
        generate) NEW[WEBHOOK_TOKEN]=$(generate_token) ;;
        none) NEW[WEBHOOK_TOKEN]="" ;;
    esac

    if ((fresh)); then
        # Defaults of a first install; an upgrade keeps whatever the file says.
        [[ -v NEW[SLACK_BOT_TOKEN] ]] || NEW[SLACK_BOT_TOKEN]=""
        [[ -v NEW[SLACK_CHANNEL] ]] || NEW[SLACK_CHANNEL]=""
        [[ -v NEW[ENVIRONMENT] ]] || NEW[ENVIRONMENT]=production
        [[ -v NEW[THREAD_STORE] ]] || NEW[THREAD_STORE]="file"
        [[ -v NEW[PORT] ]] || NEW[PORT]=$DEFAULT_PORT
        # Secure by default: only Alertmanager, holding the token, may post.
        [[ -v NEW[WEBHOOK_TOKEN] ]] || NEW[WEBHOOK_TOKEN]=$(generate_token)
    fi
    if [[ $(effective THREAD_STORE file) == redis ]] && [[ -z $(effective REDIS_URL) ]]; then
        NEW[REDIS_URL]=$DEFAULT_REDIS_URL
    fi
    # --local-redis points the service at this machine's Redis, unless it already does.
    if ((OPT_LOCAL_REDIS)) && [[ ! -v NEW[REDIS_URL] ]] &&
        [[ ! $(effective REDIS_URL) =~ ^redis://([^@/]*@)?(127\.0\.0\.1|localhost|\[::1\])(:6379)?(/[0-9]*)?$ ]]; then
        NEW[REDIS_URL]=$DEFAULT_REDIS_URL
    fi

    if [[ -n $(effective SLACK_BOT_TOKEN) && -z $(effective SLACK_CHANNEL) ]]; then
        die "a Slack token needs a channel: pass --channel C0123456789"
    fi
    if [[ -n $(effective SLACK_SIGNING_SECRET) && -z $(effective ALERTMANAGER_URL) ]]; then
        die "a signing secret needs --alertmanager-url: silences from Slack go to the Alertmanager you name"
    fi
    local was=${EXISTING[ENVIRONMENT]:-production}
    if ((!fresh)) && [[ $(effective ENVIRONMENT production) != "$was" ]]; then
        warn "ENVIRONMENT changes from '$was' to '$(effective ENVIRONMENT production)': it is part of the thread" \
            "key, so alerts firing now open new threads, and their old threads close only after THREAD_RETENTION"
    fi
}

ask_settings() {
    local fresh=$1 answer token
    info "Answer each question, or press Enter for the value in [brackets]."
    if [[ -z $OPT_STORE ]]; then
        while :; do
            ask answer "Thread store (file or redis)" "$(effective THREAD_STORE file)"
            valid_store "$answer" && break
            info "  Please answer file or redis."
        done
        OPT_STORE=$answer
        if [[ $OPT_STORE == redis && -z $OPT_REDIS_URL ]] && ((!OPT_LOCAL_REDIS)); then
            if ask_yes_no "Install and configure a local Redis server (redis-server) on this machine?" y; then
                OPT_LOCAL_REDIS=1
            else
                while :; do
                    ask answer "Redis URL" "$(effective REDIS_URL "$DEFAULT_REDIS_URL")"
                    valid_redis_url "$answer" && break
                    info "  Please give redis://[:password@]host:port/db (no quotes, spaces, \$ or backslashes)."
                done
                OPT_REDIS_URL=$answer
            fi
        fi
    fi
    if [[ -z $OPT_TOKEN_FILE ]]; then
        local keep_hint="empty: dry-run, nothing is posted"
        ((fresh)) || keep_hint="empty: keep the current one"
        while :; do
            read -r -s -p "Slack bot token, xoxb-... (input hidden; $keep_hint): " token || die "no answer (end of input)"
            printf '\n'
            token=$(trim "$token")
            if [[ -z $token ]]; then
                ((fresh)) && info "  No token: the service runs in dry-run mode, logging what it would post."
                break
            fi
            valid_slack_token "$token" && break
            info "  That is not a Slack bot token (expected xoxb-...)."
        done
        if [[ -n $token ]] || ((fresh)); then
            NEW[SLACK_BOT_TOKEN]=$token
        fi
    fi
    if [[ -z $OPT_CHANNEL ]]; then
        local current
        current=$(effective SLACK_CHANNEL)
        while :; do
            ask answer "Slack channel ID (C0123456789; '-' for none)" "${current:--}"
            if [[ $answer == - ]]; then
                answer=""
                break
            fi
            valid_channel "$answer" && break
            info "  Please give the channel ID (channel details > About), like C0123456789."
        done
        NEW[SLACK_CHANNEL]=$answer
    fi
    if [[ -z $OPT_ENVIRONMENT ]]; then
        while :; do
            ask answer "Environment name" "$(effective ENVIRONMENT production)"
            valid_environment "$answer" && break
            info "  Letters, digits, '.', '_' and '-' only."
        done
        OPT_ENVIRONMENT=$answer
    fi
    if [[ -z $OPT_WEBHOOK ]]; then
        if [[ -n $(effective WEBHOOK_TOKEN) ]]; then
            ask_yes_no "Replace the webhook token with a new random one?" n && OPT_WEBHOOK=generate
        else
            if ask_yes_no "Generate a webhook token, so only Alertmanager can post alerts?" y; then
                OPT_WEBHOOK=generate
            else
                OPT_WEBHOOK=none
            fi
        fi
    fi
    return 0
}

# ---------------------------------------------------------------------------
# Installation steps
# ---------------------------------------------------------------------------

# dpkg's answer where there is dpkg, else a look for what the package provides.
package_installed() {
    local status
    if command -v dpkg-query >/dev/null; then
        status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
        [[ $status == "install ok installed" ]]
        return
    fi
    case $1 in
        python3) [[ -x /usr/bin/python3 ]] ;;
        python3-redis) /usr/bin/python3 -c 'import redis' 2>/dev/null ;;
        redis-server) command -v redis-server >/dev/null ;;
        *) return 1 ;;
    esac
}

apt_install() {
    local missing=() pkg
    if ((STAGING)); then
        info "    would install with apt-get (if missing): $*"
        return 0
    fi
    for pkg in "$@"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        info "    already installed: $*"
        return 0
    fi
    command -v apt-get >/dev/null ||
        die "apt-get not found: install ${missing[*]} yourself (Python 3.9+ as /usr/bin/python3), then re-run"
    run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_packages() {
    step "Packages"
    local packages=(python3)
    # Debian's Python refuses a system-wide pip install (PEP 668): use the distribution's redis client.
    [[ $(effective THREAD_STORE file) == redis ]] && packages+=(python3-redis)
    apt_install "${packages[@]}"
    ((STAGING)) && return 0
    [[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 is missing (the unit runs it)"
    /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
        die "/usr/bin/python3 is older than 3.9; alert-threader needs 3.9 or newer"
    if [[ $(effective THREAD_STORE file) == redis ]]; then
        /usr/bin/python3 -c 'import redis' 2>/dev/null ||
            die "/usr/bin/python3 cannot import redis: install python3-redis"
    fi
}

# Local Redis: localhost only, persistent, never evicting. Debian's redis.conf
# has no include directory, so one include line is appended to it (once); a
# later directive wins in Redis, so the drop-in overrides the defaults above it.
setup_local_redis() {
    step "Local Redis"
    local fresh_redis=0 redis_conf=$ROOT/etc/redis/redis.conf dropin=$ROOT$REDIS_DROPIN
    ((STAGING)) || package_installed redis-server || fresh_redis=1
    apt_install redis-server
    mkdir -p -- "$(dirname -- "$dropin")"
    cat >"$dropin.tmp" <<EOF
# Written by alert-threader's install.sh; included at the end of redis.conf.
# Only this machine may connect: Redis has no password by default.
$(redis_bind_line)
protected-mode yes
# Thread state must survive a restart or a crash: log every write, fsync
# once a second (at most one second of thread state lost on power failure).
appendonly yes
appendfsync everysec
# Never evict: an evicted thread key would split an alert's thread in two.
# Writes fail loudly instead when memory runs out (the service then degrades).
maxmemory-policy noeviction
EOF
    chmod 0644 "$dropin.tmp"
    mv -f -- "$dropin.tmp" "$dropin"
    info "    wrote $REDIS_DROPIN"
    if [[ -f $redis_conf ]]; then
        if grep -qxF -- "$REDIS_INCLUDE" "$redis_conf"; then
            info "    $(target "$redis_conf") already includes it"
        else
            printf '\n%s\n%s\n' "$REDIS_INCLUDE_COMMENT" "$REDIS_INCLUDE" >>"$redis_conf"
            info "    appended '$REDIS_INCLUDE' to /etc/redis/redis.conf"
        fi
    elif ((STAGING)); then
        info "    would append '$REDIS_INCLUDE' to /etc/redis/redis.conf"
    else
        die "/etc/redis/redis.conf not found after installing redis-server"
    fi
    ((STAGING)) && { info "    would run: systemctl enable redis-server && systemctl restart redis-server"; return 0; }

    run systemctl enable redis-server
    if ((fresh_redis)) || ! systemctl is-active --quiet redis-server; then
        run systemctl restart redis-server
    elif ! apply_redis_settings_live; then
        # Restarting a Redis < 7 that holds data with appendonly newly on would
        # start from an empty append-only file: leave the restart to the admin.
        warn "could not apply the settings to the running redis-server (password set?): they take effect at its next restart; on Redis < 7 first run: redis-cli CONFIG SET appendonly yes"
    fi
    wait_for_redis
}

# Redis 6.2+ understands "-::1" (skip ::1 where IPv6 is off, instead of failing
# to start); Redis 6.0 (Debian 11, Ubuntu 22.04) would refuse that line.
redis_bind_line() {
    local version major=7 minor=0
    version=$(redis-server --version 2>/dev/null || true)
    if [[ $version =~ v=([0-9]+)\.([0-9]+) ]]; then
        major=${BASH_REMATCH[1]}
        minor=${BASH_REMATCH[2]}
    fi
    if ((major > 6 || (major == 6 && minor >= 2))); then
        printf 'bind 127.0.0.1 -::1'
    else
        printf 'bind 127.0.0.1 ::1'
    fi
}

# A running Redis with data: switch it over live (it rewrites its AOF from memory).
apply_redis_settings_live() {
    local setting
    for setting in "appendonly yes" "appendfsync everysec" "maxmemory-policy noeviction"; do
        # shellcheck disable=SC2086 # word splitting into name and value is intended
        [[ $(redis-cli -h 127.0.0.1 -p 6379 CONFIG SET $setting 2>&1) == OK ]] || return 1
        info "    + redis-cli CONFIG SET $setting"
    done
    info "    (bind takes effect at the next restart of redis-server)"
}

wait_for_redis() {
    local i
    for ((i = 0; i < 20; i++)); do
        # NOAUTH also proves it runs (a password set by the admin).
        if [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>&1) == @(PONG|NOAUTH*) ]]; then
            info "    redis-server answers on 127.0.0.1:6379"
            return 0
        fi
        sleep 0.5
    done
    warn "redis-server does not answer on 127.0.0.1:6379 yet: see journalctl -u redis-server"
}

# Copies a file into place atomically with the given mode, owned by root.
install_file() {
    local source=$1 destination=$2 mode=$3
    mkdir -p -- "$(dirname -- "$destination")"
    cp -- "$source" "$destination.tmp"
    chmod "$mode" "$destination.tmp"
    ((EUID == 0)) && chown root:root "$destination.tmp"
    mv -f -- "$destination.tmp" "$destination"
    info "    $(target "$destination") (mode $mode)"
}

# The unit runs `python3 -m alert_threader`, which uses this bytecode: compiling the
# source at every start costs time and leaves about 8 MB of compiler memory behind.
compile_code() {
    local python=/usr/bin/python3
    [[ -n $ROOT ]] && python=$(command -v python3 || true)
    if [[ -z $python || ! -x $python ]]; then
        warn "no python3 to compile $(target "$CODE_FILE"): the service compiles it at each start instead"
        return
    fi
    rm -rf -- "$CODE_DIR/__pycache__"
    "$python" -m compileall -q -d /opt/alert-threader "$CODE_DIR" >/dev/null
    chmod -R go-w,a+rX "$CODE_DIR/__pycache__"
    info "    $(target "$CODE_DIR")/__pycache__ (bytecode)"
}

install_files() {
    step "Files"
    mkdir -p -- "$CODE_DIR"
    chmod 0755 "$CODE_DIR"
    install_file "$SOURCE_CODE" "$CODE_FILE" 0644
    compile_code
    install_file "$SOURCE_UNIT" "$UNIT_FILE" 0644
    if [[ -d $UNIT_DROPINS ]]; then
        warn "$(target "$UNIT_DROPINS") has drop-ins that still apply (values in the env file win over their Environment= lines)"
    fi
}

# Rewrites the env file with the NEW values: lines of other keys, comments and
# order are kept; new keys are appended. printf is a builtin, so no secret
# ever appears in a process's arguments.
write_env_file() {
    step "Settings"
    local tmp line key
    local -A written=()
    mkdir -p -- "$CONF_DIR"
    chmod 0700 "$CONF_DIR"
    ((EUID == 0)) && chown root:root "$CONF_DIR"
    if ((${#NEW[@]} == 0)); then
        info "    kept $(target "$ENV_FILE") as it is"
        return 0
    fi
    tmp=$(umask 077 && mktemp "$CONF_DIR/.alert-threader.env.XXXXXX")
    {
        if [[ -f $ENV_FILE ]]; then
            while IFS= read -r line || [[ -n $line ]]; do
                if [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)= ]] &&
                    [[ -v NEW[${BASH_REMATCH[2]}] ]]; then
                    key=${BASH_REMATCH[2]}
                    [[ -v written[$key] ]] || printf '%s=%s\n' "$key" "${NEW[$key]}"
                    written[$key]=1
                else
                    printf '%s\n' "$line"
                fi
            done <"$ENV_FILE"
        else
            cat <<'EOF'
# alert-threader settings: KEY=value, no quotes needed.
# systemd reads this file as root (EnvironmentFile=) before the service drops
# privileges; keep it root-only (0600): it holds the Slack token.
# Every setting: python3 /opt/alert-threader/alert_threader.py --help
# Apply changes: systemctl restart alert-threader
EOF
        fi
        for key in "${ENV_ORDER[@]}"; do
            if [[ -v NEW[$key] && ! -v written[$key] ]]; then
                printf '%s=%s\n' "$key" "${NEW[$key]}"
                written[$key]=1
            fi
        done
    } >"$tmp"
    chmod 0600 "$tmp"
    ((EUID == 0)) && chown root:root "$tmp"
    mv -f -- "$tmp" "$ENV_FILE"
    local changed=()
    for key in "${ENV_ORDER[@]}"; do
        [[ -v written[$key] ]] && changed+=("$key")
    done
    info "    $(target "$ENV_FILE") (mode 0600): set ${changed[*]}"
}

start_service() {
    step "Service"
    run systemctl daemon-reload
    run systemctl enable "$SERVICE"
    # restart, not start: an upgrade must load the new code and settings.
    run systemctl restart "$SERVICE"
}

health_address() {
    local host
    host=$(effective HOST 0.0.0.0)
    case $host in
        "" | 0.0.0.0 | :: | "[::]") printf '127.0.0.1' ;;
        *:*) printf '[%s]' "$host" ;;
        *) printf '%s' "$host" ;;
    esac
}

# Prints "STATUS BODY" of a GET, with curl or, lacking it, Python.
http_get() {
    if command -v curl >/dev/null; then
        local body code
        body=$(mktemp)
        code=$(curl -sS --max-time 2 -o "$body" -w '%{http_code}' "$1" 2>/dev/null) || code=000
        printf '%s %s' "$code" "$(cat "$body")"
        rm -f -- "$body"
    else
        /usr/bin/python3 - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status, r.read().decode("utf-8", "replace"), end="")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode("utf-8", "replace"), end="")
except OSError:
    print("000", end="")
EOF
    fi
}

check_health() {
    local url answer i
    url="http://$(health_address):$(effective PORT "$DEFAULT_PORT")/health"
    if ((STAGING)); then
        info "    would check GET $url"
        return 0
    fi
    for ((i = 0; i < 20; i++)); do
        answer=$(http_get "$url")
        case ${answer%% *} in
            200)
                info "    GET $url: ${answer#* }"
                return 0
                ;;
            503)
                warn "GET $url: ${answer#* }"
                if [[ $(effective THREAD_STORE file) == redis ]]; then
                    warn "the service runs but cannot reach Redis: check REDIS_URL and redis-server"
                else
                    warn "the service runs but cannot write its state file: check /var/lib/$SERVICE"
                fi
                return 0
                ;;
        esac
        sleep 0.5
    done
    systemctl --no-pager status "$SERVICE" || true
    journalctl --no-pager -n 20 -u "$SERVICE" || true
    die "the service does not answer on $url after 10s (see the log above; settings: $(target "$ENV_FILE"))"
}

print_next_steps() {
    local port host token_note store
    port=$(effective PORT "$DEFAULT_PORT")
    store=$(effective THREAD_STORE file)
    case $(effective HOST 0.0.0.0) in
        "" | 0.0.0.0 | :: | "[::]")
            # uname, not hostname -f: no DNS lookup just to print an example.
            host=$(uname -n)
            [[ $host =~ ^[A-Za-z0-9.-]+$ ]] || host=this-host
            ;;
        *) host=$(health_address) ;;  # it listens there only
    esac
    local env_path=/etc/alert-threader/alert-threader.env
    step "Done: alert-threader (store=$store, port=$port)"
    if [[ -z $(effective SLACK_BOT_TOKEN) ]]; then
        info "    No Slack token: DRY-RUN mode, nothing is posted (see GET /preview and the journal)."
        info "    To post, re-run with --token-file FILE --channel C0123456789."
    fi
    info ""
    info "Alertmanager receiver (alertmanager.yml; use 127.0.0.1 if Alertmanager runs here):"
    info ""
    info "  receivers:"
    info "    - name: slack-threads"
    info "      webhook_configs:"
    info "        - url: http://$host:$port/alert"
    info "          send_resolved: true"
    if [[ -n $(effective WEBHOOK_TOKEN) ]]; then
        info "          http_config:"
        info "            authorization:"
        info "              type: Bearer"
        info "              credentials_file: /etc/alertmanager/alert-threader.token"
        info ""
        info "The webhook token is WEBHOOK_TOKEN in $env_path (not printed here)."
        info "Give it to Alertmanager (Debian's runs as user prometheus):"
        info ""
        info "  sudo install -m 0640 -o root -g prometheus /dev/null /etc/alertmanager/alert-threader.token"
        info "  sudo sed -n 's/^WEBHOOK_TOKEN=//p' $env_path | sudo tee /etc/alertmanager/alert-threader.token >/dev/null"
        token_note=$'\n'"    -H \"Authorization: Bearer \$(sudo sed -n 's/^WEBHOOK_TOKEN=//p' $env_path)\" \\"
    else
        warn "no WEBHOOK_TOKEN: anyone who reaches port $port can post alerts (re-run with --generate-webhook-token)"
        token_note=""
    fi
    info ""
    info "Smoke test:"
    info ""
    info "  curl -sS http://127.0.0.1:$port/health"
    local status started
    started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for status in firing resolved; do
        [[ $status == resolved ]] && info "  # and close its thread again:"
        info "  curl -sS -X POST http://127.0.0.1:$port/alert -H 'Content-Type: application/json' \\${token_note}"
        info "    -d '{\"status\":\"$status\",\"alerts\":[{\"status\":\"$status\",\"labels\":{\"alertname\":\"InstallSmokeTest\",\"severity\":\"info\"},\"annotations\":{\"summary\":\"alert-threader smoke test\"},\"startsAt\":\"$started\"}]}'"
    done
    if [[ -n $(effective SLACK_SIGNING_SECRET) ]]; then
        info ""
        info "Silence and Ack from Slack are on: the app's Interactivity Request URL must reach"
        info "POST /slack/actions on port $port over HTTPS (a reverse proxy; docs/slack.md: Silence and Ack from Slack)."
    fi
    info ""
    info "Logs: journalctl -u $SERVICE -f    Settings: $env_path    Remove: sudo ./install.sh --uninstall"
}

do_install() {
    if ((STAGING)); then
        step "Staging alert-threader under ${ROOT:-/} (systemctl, apt-get and curl are only shown)"
    else
        step "Installing alert-threader"
    fi
    load_existing
    gather_settings
    install_packages
    if ((OPT_LOCAL_REDIS)); then
        setup_local_redis
    fi
    install_files
    write_env_file
    start_service
    step "Health"
    check_health
    print_next_steps
}

# ---------------------------------------------------------------------------
# Uninstall
# ---------------------------------------------------------------------------

do_uninstall() {
    if ((STAGING)); then
        step "Removing alert-threader from the staging root ${ROOT:-/}"
    else
        step "Removing alert-threader"
    fi
    if ((OPT_PURGE)) && interactive && [[ -t 0 ]]; then
        ask_yes_no "Also delete the thread state (open Slack threads will not be continued)?" n ||
            die "nothing removed"
    fi
    if ((STAGING)) || command -v systemctl >/dev/null; then
        run systemctl disable --now "$SERVICE" || warn "could not stop $SERVICE (not installed?)"
    fi
    local path state=()
    for path in "$UNIT_FILE" "$CODE_DIR"; do
        if [[ -e $path ]]; then
            rm -rf -- "$path"
            info "    removed $(target "$path")"
        fi
    done
    for path in "${STATE_DIRS[@]}"; do
        [[ -e $path ]] && state+=("$path")
    done
    if ((OPT_PURGE)); then
        if [[ -e $CONF_DIR ]]; then
            rm -rf -- "$CONF_DIR"
            info "    removed the settings and tokens in $(target "$CONF_DIR")"
        fi
        rm -rf -- "$UNIT_DROPINS"
        if ((${#state[@]})); then
            rm -rf -- "${state[@]}"
            info "    removed the thread state ($(target "${state[0]}"))"
        fi
        purge_redis_settings
    else
        if [[ -e $CONF_DIR ]]; then
            info "    kept the settings and tokens in $(target "$CONF_DIR") (a reinstall uses them again;"
            info "    remove them with --uninstall --purge)"
        fi
        if ((${#state[@]})); then
            info "    kept the thread state in $(target "${state[0]}") (remove it with --uninstall --purge)"
        fi
    fi
    if ((STAGING)) || command -v systemctl >/dev/null; then
        run systemctl daemon-reload
    fi
    info "Packages are left installed (python3, and python3-redis or redis-server if the Redis store used them)."
}

# Drops the include line first, then the file, so Redis never has an include of a missing file.
purge_redis_settings() {
    local redis_conf=$ROOT/etc/redis/redis.conf tmp
    if [[ -f $redis_conf ]] && grep -qxF -- "$REDIS_INCLUDE" "$redis_conf"; then
        tmp=$(mktemp "$redis_conf.XXXXXX")
        grep -vxF -e "$REDIS_INCLUDE" -e "$REDIS_INCLUDE_COMMENT" -- "$redis_conf" >"$tmp" || true
        chmod --reference="$redis_conf" "$tmp"
        chown --reference="$redis_conf" "$tmp" 2>/dev/null || true
        mv -f -- "$tmp" "$redis_conf"
        info "    removed the include of $REDIS_DROPIN from /etc/redis/redis.conf"
    fi
    if [[ -f $ROOT$REDIS_DROPIN ]]; then
        rm -f -- "$ROOT$REDIS_DROPIN"
        info "    removed $REDIS_DROPIN (redis-server keeps its current settings until restarted;"
        info "    thread keys remain: redis-cli --scan --pattern 'threader:ts:*' | xargs -r redis-cli del)"
    fi
}

main() {
    parse_args "$@"
    validate_options
    set_paths
    if ((OPT_UNINSTALL)); then
        do_uninstall
    else
        do_install
    fi
}

# Sourcing the script (tests) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
