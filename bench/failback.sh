#!/usr/bin/env bash
# bench/failback.sh — bytes compared on both sides when an old primary
# returns after a forced failover (issue 11, "compare only what may
# differ"; docs/PEER.md "Divergence").
#
#   bench/failback.sh                       # this tree (release build; BIN_NEW=path to use another)
#   BASELINE=/path/to/old/tandem bench/failback.sh   # and an older binary, side by side
#   VOLUME=8GiB WRITES=1GiB UNREPLICATED=64MiB bench/failback.sh
#
# Two sites on loopback with a `tandem witness` (lease 3 s): ny primary,
# chicago its replica. After the initial sync, replication to chicago is
# paused, ny writes UNREPLICATED bytes chicago never gets, and ny is
# SIGKILLed: chicago takes over (epoch 2) and writes WRITES bytes. Then ny
# starts again, saves its unreplicated writes to rollback, and rejoins as
# chicago's replica. Printed: the bytes chicago compared for ny (the sum of
# its "resync: comparing chunks" log lines; ny hashes the same ranges on
# its side), and with this tree the per-side counters `compare_bytes_read`
# of `tandem status --json`. Target: <= 1.5 GiB for 1 GiB of writes on an
# 8 GiB volume (a full comparison is 8 GiB per side).
#
# Not a test: run it by hand. Exits non-zero only when the run cannot be
# carried out.
set -euo pipefail

BENCH_NAME=failback
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

VOLUME=${VOLUME:-8GiB}
WRITES=${WRITES:-1GiB}
UNREPLICATED=${UNREPLICATED:-64MiB}
READY_TIMEOUT=${READY_TIMEOUT:-120}
need_cmd qemu-io qemu-utils
PY=$(bench_python)

VOLUME_BYTES=$(parse_size "$VOLUME")
WRITES_BYTES=$(parse_size "$WRITES")
UNREP_BYTES=$(parse_size "$UNREPLICATED")
MIB=$((1024 * 1024))

WORK=$(mktemp -d /tmp/tandem-failback.XXXXXX)
cleanup() {
    stop_all_pids
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_ports() { # N distinct free TCP ports on 127.0.0.1
    "$PY" - "$1" <<'PYEOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
}

status() { "$BIN" status --json --config "$RUN/$1.toml"; }

# json EXPR SITE: evaluates EXPR on the site's status document `d`.
json() {
    status "$2" 2>/dev/null | "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null || true
}

wait_for() { # wait_for WHAT TIMEOUT CMD...: until CMD succeeds
    local what=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        ((SECONDS < deadline)) || die "$what: not within ${timeout}s (logs in $RUN)"
        sleep 0.2
    done
}

is_role() { [[ "$(json "d['groups'][0]['role'], d['groups'][0]['epoch']" "$1")" == "$2" ]]; }
replica_caught_up() {
    [[ "$(json "(lambda g, r: r['state'] == 'streaming' and r['lag_bytes'] == 0 and r['applied_seq'] + 1 >= g['next_seq'])(d['groups'][0], d['groups'][0]['replicas'][0])" "$1")" == True ]]
}
map_clear() { # at most one region of ny's dirty map marked
    local n
    n=$("$PY" -c "import sys; b=open(sys.argv[1],'rb').read()[4096:]; print(sum(bin(x).count('1') for x in b))" "$RUN/ny/capture/g/v.dirty" 2>/dev/null || echo 99)
    ((n <= 1))
}

# run LABEL BIN: one failback; appends "LABEL compared_by_chicago ny_counter
# chicago_counter" to $WORK/results. (Not in a subshell: the agents it
# starts are tracked by this shell.)
run() {
    local label=$1
    BIN=$2
    RUN=$WORK/$label
    mkdir -p "$RUN"
    local ports wport
    read -r -a ports <<<"$(free_ports 5)"
    wport=${ports[4]}
    NO_COLOR=1 "$BIN" witness --listen "127.0.0.1:$wport" --data-dir "$RUN/witness" --tls off \
        </dev/null >>"$RUN/witness.log" 2>&1 &
    track_pid $!
    local s i=0 peers=""
    for s in ny chicago; do
        peers+=$(printf '[[peer]]\nname = "%s"\naddress = "127.0.0.1:%s"\n\n' "$s" "${ports[$i]}")$'\n\n'
        i=$((i + 2))
    done
    i=0
    for s in ny chicago; do
        printf '[site]\nname = "%s"\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\napi = "127.0.0.1:%s"\n\n[tls]\nmode = "off"\n\n[coordinator]\nkind = "witness"\nendpoints = ["127.0.0.1:%s"]\nlease_ttl = "3s"\n\n%s[[group]]\nname = "g"\nprimary = "ny"\nreplicas = [ { site = "chicago", priority = 1 } ]\nvolumes = [ { name = "v", size = "%s" } ]\n' \
            "$s" "$RUN/$s" "${ports[$i]}" "${ports[$((i + 1))]}" "$wport" "$peers" "$(size_for_config "$VOLUME_BYTES")" >"$RUN/$s.toml"
        i=$((i + 2))
    done
    local ny chicago
    tandem_start_agent "$BIN" "$RUN/ny.toml" "$RUN/ny.log"
    ny=$AGENT_PID
    tandem_start_agent "$BIN" "$RUN/chicago.toml" "$RUN/chicago.log"
    chicago=$AGENT_PID
    wait_for "ny primary" "$READY_TIMEOUT" is_role ny "primary 1"
    wait_for "initial sync" 600 replica_caught_up ny
    wait_for "ny's dirty map cleared after the initial sync" 60 map_clear
    log "$label: initial sync done; pausing replication, $UNREPLICATED unreplicated on ny, SIGKILL ny"
    "$BIN" bandwidth --config "$RUN/ny.toml" chicago paused >/dev/null
    qemu-io -f raw -c "write -P 0x22 64M $((UNREP_BYTES / MIB))M" -c flush \
        "$(nbd_uri "$RUN/ny/nbd/v.sock")" >/dev/null
    kill -KILL "$ny"
    wait "$ny" 2>/dev/null || true
    untrack_pid "$ny"
    wait_for "chicago primary in epoch 2" 60 is_role chicago "primary 2"
    log "$label: chicago took over; writing $WRITES there"
    qemu-io -f raw -c "write -P 0x33 1G $((WRITES_BYTES / MIB))M" -c flush \
        "$(nbd_uri "$RUN/chicago/nbd/v.sock")" >/dev/null
    local mark
    mark=$(wc -l <"$RUN/chicago.log")
    local t0=$SECONDS
    tandem_start_agent "$BIN" "$RUN/ny.toml" "$RUN/ny.log"
    ny=$AGENT_PID
    wait_for "ny replica of chicago" 120 is_role ny "replica 2"
    wait_for "ny caught up" 900 replica_caught_up chicago
    log "$label: ny rejoined and caught up in $((SECONDS - t0)) s"
    local by_log ny_counter ch_counter
    by_log=$(tail -n +"$((mark + 1))" "$RUN/chicago.log" | grep 'resync: comparing chunks' |
        grep -o 'bytes=[0-9]*' | cut -d= -f2 | awk '{s += $1} END {printf "%d", s}')
    ch_counter=$(json "d['groups'][0]['replicas'][0].get('compare_bytes_read', '-')" chicago)
    ny_counter=$(json "d['groups'][0]['replicas'][0].get('compare_bytes_read', '-')" ny)
    [[ -e "$RUN/ny/rollback" ]] || warn "$label: no rollback file on ny"
    stop_pid "$ny"
    stop_pid "$chicago"
    stop_all_pids
    printf '%s %s %s %s\n' "$label" "$by_log" "$ny_counter" "$ch_counter" >>"$WORK/results"
}

# This tree's binary: BIN_NEW, else the release build (built if missing).
# Bytes compared do not depend on the build profile: a debug binary will do.
NEW=${BIN_NEW:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/tandem}
if [[ ! -x "$NEW" ]]; then
    log "building: cargo build --release -p tandem"
    (cd "$REPO_ROOT" && cargo build --release -p tandem >&2) || die "cargo build --release -p tandem failed"
fi
[[ -x "$NEW" ]] || die "no tandem binary at $NEW"

if [[ -n "${BASELINE:-}" ]]; then
    run before "$BASELINE"
fi
run after "$NEW"

gib() { "$PY" -c "import sys; v=sys.argv[1]; print(v if not v.isdigit() else '%.3f GiB' % (int(v) / 2**30))" "$1"; }
printf '\nfailback after %s of writes on the new owner (+%s unreplicated on the old one), %s volume\n' "$WRITES" "$UNREPLICATED" "$VOLUME"
printf '%-8s %-28s %-24s %-24s\n' tree "compared (chicago's log)" "ny compare_bytes_read" "chicago compare_bytes_read"
while read -r label by_log nyc chc; do
    printf '%-8s %-28s %-24s %-24s\n' "$label" "$(gib "$by_log")" "$(gib "$nyc")" "$(gib "$chc")"
done <"$WORK/results"
printf 'target: <= 1.5 GiB per side\n'
