# bench/lib.sh — shared helpers for Tandem's benchmark scripts.
# Source it from a bench script (bash, set -euo pipefail):
#   . "$(dirname "$0")/lib.sh"
# shellcheck shell=bash

BENCH_NAME=${BENCH_NAME:-bench}

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[%s] warning: %s\n' "$BENCH_NAME" "$*" >&2; }
die() {
    printf '[%s] error: %s\n' "$BENCH_NAME" "$*" >&2
    exit 1
}

# need_cmd CMD [PACKAGE]: fail with a clear message when CMD is missing.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 ||
        die "required tool '$1' not found${2:+ (Debian package $2; scripts/test installs it)}"
}

# A python3 for JSON handling; prefers Debian's over a pyenv shim.
bench_python() {
    if [[ -x /usr/bin/python3 ]]; then
        printf '/usr/bin/python3'
    elif command -v python3 >/dev/null 2>&1; then
        command -v python3
    else
        die "python3 not found"
    fi
}

# parse_size SIZE -> bytes. Accepts N, NK/NKiB, NM/NMiB, NG/NGiB, NT/NTiB
# (binary units, as SPEC §4.1).
parse_size() {
    local s=$1 n unit mult
    if [[ ! "$s" =~ ^([0-9]+)([KMGTkmgt]?)(i?[Bb])?$ ]]; then
        die "bad size '$s' (use e.g. 2GiB, 512MiB, 1G)"
    fi
    n=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[2]^^}
    case "$unit" in
    "") mult=1 ;;
    K) mult=1024 ;;
    M) mult=$((1024 ** 2)) ;;
    G) mult=$((1024 ** 3)) ;;
    T) mult=$((1024 ** 4)) ;;
    esac
    printf '%d' $((n * mult))
}

# size_for_config BYTES -> "<n>MiB" (Tandem config syntax); BYTES must be a
# multiple of 1 MiB.
size_for_config() {
    local b=$1
    (((b % (1024 * 1024)) == 0)) || die "size $b is not a multiple of 1 MiB"
    printf '%dMiB' $((b / 1024 / 1024))
}

# ---------------------------------------------------------------------------
# Process tracking: every background process a bench starts is registered
# here and ended (by its PID only) when the script exits or is interrupted.
# ---------------------------------------------------------------------------
BENCH_PIDS=()

track_pid() { BENCH_PIDS+=("$1"); }

untrack_pid() {
    local p
    local -a keep=()
    for p in "${BENCH_PIDS[@]+"${BENCH_PIDS[@]}"}"; do
        [[ "$p" == "$1" ]] || keep+=("$p")
    done
    BENCH_PIDS=("${keep[@]+"${keep[@]}"}")
}

# stop_pid PID [TIMEOUT_S]: SIGTERM, wait up to TIMEOUT_S (default 10) for it
# to exit, then SIGKILL. Sets STOP_STATUS to the exit status, or "killed".
# Call it directly, not in $(...): only the shell that started PID can wait
# for it.
STOP_STATUS=
# shellcheck disable=SC2034 # STOP_STATUS is read by the scripts that source this file
stop_pid() {
    local pid=$1 timeout=${2:-10} deadline rc=0
    STOP_STATUS=
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + timeout))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            untrack_pid "$pid"
            STOP_STATUS=killed
            return 0
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    untrack_pid "$pid"
    STOP_STATUS=$rc
}

stop_all_pids() {
    local p
    for p in "${BENCH_PIDS[@]+"${BENCH_PIDS[@]}"}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10)) alive
    while ((SECONDS < deadline)); do
        alive=0
        for p in "${BENCH_PIDS[@]+"${BENCH_PIDS[@]}"}"; do
            kill -0 "$p" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${BENCH_PIDS[@]+"${BENCH_PIDS[@]}"}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    BENCH_PIDS=()
}

# ---------------------------------------------------------------------------
# NBD helpers
# ---------------------------------------------------------------------------

# nbd_uri SOCKET [EXPORT]
nbd_uri() { printf 'nbd+unix:///%s?socket=%s' "${2:-}" "$1"; }

# wait_nbd_ready PID SOCKET EXPORT TIMEOUT_S LOGFILE
# Polls until SOCKET exists and nbdinfo can open EXPORT on it. Fails early
# if PID dies; fails after TIMEOUT_S. Prints the log tail on failure.
wait_nbd_ready() {
    local pid=$1 sock=$2 export=$3 timeout=$4 logf=$5
    local deadline=$((SECONDS + timeout))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            warn "server (pid $pid) exited before $sock was ready; last log lines ($logf):"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        if [[ -S "$sock" ]] && timeout 5 nbdinfo --size "$(nbd_uri "$sock" "$export")" >/dev/null 2>&1; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            warn "server (pid $pid) did not serve $sock (export '$export') within ${timeout}s; last log lines ($logf):"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# drop_caches: flush dirty data and drop the page cache so no server starts a
# measurement with another's writeback pending or its data cached.
DROP_CACHES_WARNED=0
drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        if ((DROP_CACHES_WARNED == 0)); then
            warn "cannot write /proc/sys/vm/drop_caches (not root?); page cache is not dropped between runs"
            DROP_CACHES_WARNED=1
        fi
    fi
}

# proc_cpu_ticks PID -> utime+stime of the whole process, in clock ticks.
proc_cpu_ticks() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || {
        printf '0'
        return 0
    }
    # fields after "(comm)": state is field 3; utime/stime are fields 14/15.
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    printf '%d' $((${12} + ${13}))
}

# proc_rss_kib PID [FIELD] -> VmRSS (or FIELD, e.g. VmHWM) in KiB.
proc_rss_kib() {
    local field=${2:-VmRSS}
    awk -v f="$field:" '$1 == f { print $2 }' "/proc/$1/status"
}

# ---------------------------------------------------------------------------
# Tandem helpers
# ---------------------------------------------------------------------------

# build_tandem REPO_ROOT -> path of the release binary (build log on stderr).
build_tandem() {
    local root=$1
    need_cmd cargo
    log "building: cargo build --release -p tandem"
    (cd "$root" && cargo build --release -p tandem >&2) ||
        die "cargo build --release -p tandem failed"
    local bin="$root/target/release/tandem"
    [[ -x "$bin" ]] || die "$bin not found after build"
    if ! "$bin" agent --help >/dev/null 2>&1; then
        die "'$bin agent --help' fails: the tandem binary has no working 'agent' command yet"
    fi
    printf '%s' "$bin"
}
