#!/usr/bin/env bash
# bench/scale.sh — one agent with many groups and volumes, side by side with
# one group: start, idle cost, clean stop, failover of every group.
# See bench/README.md (`bench/scale.sh`) and `bench/scale.sh -h`.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2034 # read by lib.sh
BENCH_NAME=scale
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
Usage: bench/scale.sh [--keep] [-h]

Two sizes, one after the other, each on a fresh cluster on loopback (TLS off,
a `tandem witness`): the primary `ny` and the replica `dr`, every group
primary at ny with one replica at dr, N_SMALL (1) and N_GROUPS (200)
groups of VOLUMES (5) sparse volumes of VOLUME_SIZE (1GiB) each. For each:

  start      both agents started at once; time until each API answers, and
             until every group is primary at ny with dr "streaming"
  idle       after IDLE_SETTLE s: RSS, threads (/proc/PID/task, by name),
             fds (/proc/PID/fd) of both agents; CPU of both over IDLE_S s
             (utime+stime, % of one core)
  failover   SIGKILL of ny: per group, time until dr shows it primary
             (polled every POLL_MS); median / max RTO over the groups
  restart    ny started again (a replica now): time until every group
             streams to it again
  sigterm    SIGTERM of the primary (dr now), then of the replica (ny):
             time until each exited (and its exit status)

Figures are from one run; nothing fails on a figure (only on a wait that
runs out or an agent that exits). Every wait is bounded.

Environment (defaults in brackets):
  N_GROUPS      groups of the large size [200]
  N_SMALL       groups of the small size; 0 skips it [1]
  VOLUMES       volumes per group [5]
  VOLUME_SIZE   each volume (sparse) [1GiB]
  LEASE_TTL     [coordinator] lease_ttl [3s]
  IDLE_SETTLE   seconds between all streaming and the idle samples [5]
  IDLE_S        seconds of the idle CPU sample [20]
  POLL_MS       status poll interval of the failover part [100]
  WAIT_TIMEOUT  limit for each wait [max(120, 2 x N_GROUPS x VOLUMES / 10)]
  OUT           JSON result [/tmp/tandem-bench-scale-<date>.json]
  WORK_BASE     parent of the work dir [/var/tmp]
  TANDEM_BIN    tandem binary; default: `cargo build --release -p tandem`
EOF
}

KEEP=0
while (($# > 0)); do
    case "$1" in
    --keep) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
done

posint() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 == 0)); then die "$1 must be a positive integer (got '$2')"; fi
}
N_GROUPS=${N_GROUPS:-200}
N_SMALL=${N_SMALL:-1}
VOLUMES=${VOLUMES:-5}
VOLUME_SIZE=${VOLUME_SIZE:-1GiB}
LEASE_TTL=${LEASE_TTL:-3s}
IDLE_SETTLE=${IDLE_SETTLE:-5}
IDLE_S=${IDLE_S:-20}
POLL_MS=${POLL_MS:-100}
posint N_GROUPS "$N_GROUPS"
[[ "$N_SMALL" =~ ^[0-9]+$ ]] || die "N_SMALL must be an integer"
posint VOLUMES "$VOLUMES"
posint IDLE_S "$IDLE_S"
posint POLL_MS "$POLL_MS"
[[ "$IDLE_SETTLE" =~ ^[0-9]+$ ]] || die "IDLE_SETTLE must be an integer"
((N_GROUPS <= 9999 && N_SMALL <= 9999 && VOLUMES <= 99)) || die "at most 9999 groups of 99 volumes"
[[ "$LEASE_TTL" =~ ^[0-9.]+(ms|s|m)$ ]] || die "LEASE_TTL must be a duration like 3s"
VOLUME_BYTES=$(parse_size "$VOLUME_SIZE")
VOLUME_CFG=$(size_for_config "$VOLUME_BYTES")
default_wait=$((2 * N_GROUPS * VOLUMES / 10))
WAIT_TIMEOUT=${WAIT_TIMEOUT:-$((default_wait > 120 ? default_wait : 120))}
posint WAIT_TIMEOUT "$WAIT_TIMEOUT"
WORK_BASE=${WORK_BASE:-/var/tmp}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/tandem-bench-scale-$STAMP.json}
SIZES=()
((N_SMALL == 0)) || SIZES+=("$N_SMALL")
SIZES+=("$N_GROUPS")

need_cmd timeout coreutils
PY=$(bench_python)
CLK_TCK=$(getconf CLK_TCK)

if [[ -n "${TANDEM_BIN:-}" ]]; then
    [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not executable"
else
    need_cmd cargo
    log "building: cargo build --release -p tandem"
    (cd "$REPO_ROOT" && cargo build --release -p tandem >&2) || die "cargo build --release -p tandem failed"
    TANDEM_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/tandem
    [[ "$TANDEM_BIN" = /* ]] || TANDEM_BIN=$REPO_ROOT/$TANDEM_BIN
    [[ -x "$TANDEM_BIN" ]] || die "$TANDEM_BIN not found after the build"
fi
for c in agent witness status; do
    "$TANDEM_BIN" "$c" --help >/dev/null 2>&1 || die "'$TANDEM_BIN $c --help' fails"
done
log "tandem: $TANDEM_BIN"

[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-scale.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all_pids
    if ((KEEP)); then
        log "work dir kept: $WORK"
    else
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() { # free_ports N: N distinct TCP ports free on 127.0.0.1 now
    "$PY" - "$1" <<'PYEOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
}

CDIR=
fail() { # fail MESSAGE: log tails, exit 1
    local k
    warn "$*"
    for k in ny dr witness; do
        [[ -s "$CDIR/$k.log" ]] || continue
        warn "last lines of $CDIR/$k.log:"
        tail -n 15 "$CDIR/$k.log" >&2 || true
    done
    exit 1
}

cfg() { printf '%s/%s.toml' "$CDIR" "$1"; }

# write_configs N_GROUPS WITNESS_PORT: ny.toml and dr.toml in $CDIR.
write_configs() {
    local n=$1 wport=$2 ports s i g v vols
    read -r -a ports <<<"$(free_ports 4)"
    local groups_toml=$CDIR/groups.toml
    : >"$groups_toml"
    for ((g = 1; g <= n; g++)); do
        vols=""
        for ((v = 0; v < VOLUMES; v++)); do
            vols+="${vols:+, }{ name = \"$(printf 'g%04d-v%02d' "$g" "$v")\", size = \"$VOLUME_CFG\" }"
        done
        printf '[[group]]\nname = "%s"\nprimary = "ny"\nreplicas = [ { site = "dr", priority = 1 } ]\nvolumes = [ %s ]\n\n' \
            "$(printf 'g%04d' "$g")" "$vols" >>"$groups_toml"
    done
    i=0
    for s in ny dr; do
        {
            printf '[site]\nname = "%s"\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\napi = "127.0.0.1:%s"\n\n' \
                "$s" "$CDIR/$s" "${ports[$i]}" "${ports[$((i + 1))]}"
            printf '[tls]\nmode = "off"\n\n'
            printf '[coordinator]\nkind = "witness"\nendpoints = ["127.0.0.1:%s"]\nlease_ttl = "%s"\n\n' "$wport" "$LEASE_TTL"
            printf '[[peer]]\nname = "ny"\naddress = "127.0.0.1:%s"\n\n' "${ports[0]}"
            printf '[[peer]]\nname = "dr"\naddress = "127.0.0.1:%s"\n\n' "${ports[2]}"
            cat "$groups_toml"
        } >"$(cfg "$s")"
        i=$((i + 2))
    done
}

start_witness() { # sets WITNESS_PORT
    WITNESS_PORT=$(free_ports 1)
    NO_COLOR=1 "$TANDEM_BIN" witness --listen "127.0.0.1:$WITNESS_PORT" --data-dir "$CDIR/witness-data" --tls off \
        </dev/null >>"$CDIR/witness.log" 2>&1 &
    local pid=$!
    track_pid "$pid"
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$WITNESS_PORT") 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || fail "tandem witness exited at start"
        ((SECONDS < deadline)) || fail "tandem witness did not listen within 30s"
        sleep 0.05
    done
}

# poll MODE ARGS...: the status poller (python). Modes:
#   api TIMEOUT PID CFG               seconds until the API answers
#   streaming TIMEOUT PIDS CFG N      seconds until CFG's site is primary of
#                                     N groups, each replica "streaming"
#   promoted TIMEOUT POLL_MS CFG N T0 per group, seconds from T0 (epoch
#                                     seconds) until CFG's site shows it
#                                     primary; prints a JSON list
poll() {
    "$PY" - "$TANDEM_BIN" "$@" <<'PYEOF'
import json, os, subprocess, sys, time
bin_, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
def status(cfg):
    out = subprocess.run([bin_, "status", "--json", "--local", "--config", cfg],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip()[-300:])
    return json.loads(out.stdout)
def alive(pids):
    for p in pids:
        try:
            os.kill(p, 0)
        except OSError:
            sys.exit(f"agent pid {p} is gone")
t0 = time.monotonic()
last = None
if mode == "api":
    timeout, pid, cfg = float(args[0]), int(args[1]), args[2]
    while True:
        alive([pid])
        try:
            status(cfg)
            print("%.3f" % (time.monotonic() - t0))
            sys.exit(0)
        except (subprocess.TimeoutExpired, ValueError) as e:
            last = repr(e)
        if time.monotonic() - t0 > timeout:
            sys.exit(f"API did not answer within {timeout:.0f}s: {last}")
        time.sleep(0.05)
elif mode == "streaming":
    timeout, pids, cfg, n = float(args[0]), [int(p) for p in args[1].split(",")], args[2], int(args[3])
    while True:
        alive(pids)
        try:
            doc = status(cfg)
            ok = [g for g in doc.get("groups", []) if g.get("role") == "primary"
                  and g.get("replicas") and all(r.get("state") == "streaming" for r in g["replicas"])]
            last = f"{len(ok)} of {n} groups primary and streaming"
            if len(ok) >= n:
                print("%.3f" % (time.monotonic() - t0))
                sys.exit(0)
        except (subprocess.TimeoutExpired, ValueError) as e:
            last = repr(e)
        if time.monotonic() - t0 > timeout:
            sys.exit(f"not all streaming within {timeout:.0f}s: {last}")
        time.sleep(0.2)
elif mode == "promoted":
    timeout, poll_s, cfg, n, kill_t = float(args[0]), int(args[1]) / 1000, args[2], int(args[3]), float(args[4])
    seen = {}
    while True:
        try:
            doc = status(cfg)
            now = time.time()
            for g in doc.get("groups", []):
                if g.get("role") == "primary" and g["name"] not in seen:
                    seen[g["name"]] = now - kill_t
            last = f"{len(seen)} of {n} groups primary"
            if len(seen) >= n:
                print(json.dumps(sorted(seen.values())))
                sys.exit(0)
        except (subprocess.TimeoutExpired, ValueError) as e:
            last = repr(e)
        if time.monotonic() - t0 > timeout:
            sys.exit(f"failover not complete within {timeout:.0f}s: {last}")
        time.sleep(poll_s)
PYEOF
}

# threads_by_name PID -> JSON object {name prefix: count}; a thread's name
# loses its group/site/number suffix (ship-g0001-dr -> ship, nbd-worker-3 ->
# nbd-worker).
threads_by_name() {
    "$PY" - "$1" <<'PYEOF'
import collections, json, os, re, sys
pid = sys.argv[1]
c = collections.Counter()
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            name = f.read().strip()
    except OSError:
        continue
    name = re.sub(r"-(g\d+.*|\d+)$", "", name)
    c[name] += 1
print(json.dumps(dict(c.most_common())))
PYEOF
}

# thread_ticks PID (bench/lib.sh) -> JSON object {name prefix: utime+stime ticks}

# tick_delta BEFORE AFTER SECONDS -> JSON {name: % of a core}, busiest first
tick_delta() {
    "$PY" - "$1" "$2" "$3" "$CLK_TCK" <<'PYEOF'
import json, sys
a, b, secs, hz = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
d = {k: round(100 * (v - a.get(k, 0)) / hz / secs, 2) for k, v in b.items()}
print(json.dumps(dict(sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1]))))
PYEOF
}

count_dir() { find "$1" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

RESULTS=()

run_size() { # run_size N
    local n=$1 vols=$(($1 * VOLUMES))
    CDIR=$WORK/n$n
    mkdir -p "$CDIR"
    log "size $n groups x $VOLUMES volumes = $vols volumes of $VOLUME_SIZE"
    start_witness
    write_configs "$n" "$WITNESS_PORT"
    local t0 ny dr
    t0=$(date +%s.%N)
    tandem_start_agent "$TANDEM_BIN" "$(cfg dr)" "$CDIR/dr.log"
    dr=$AGENT_PID
    tandem_start_agent "$TANDEM_BIN" "$(cfg ny)" "$CDIR/ny.log"
    ny=$AGENT_PID
    local api_ny api_dr start_s
    api_ny=$(poll api "$WAIT_TIMEOUT" "$ny" "$(cfg ny)") || fail "ny: API did not come up"
    api_dr=$(poll api "$WAIT_TIMEOUT" "$dr" "$(cfg dr)") || fail "dr: API did not come up"
    poll streaming "$WAIT_TIMEOUT" "$ny,$dr" "$(cfg ny)" "$n" >/dev/null || fail "not all streaming"
    start_s=$("$PY" -c "import time; print('%.3f' % (time.time() - $t0))")
    log "  all $n groups streaming ${start_s}s after start (APIs answered after ${api_ny}s / ${api_dr}s of polling)"
    sleep "$IDLE_SETTLE"
    local rss_ny rss_dr thr_ny thr_dr fd_ny fd_dr names_ny names_dr c0_ny c0_dr c1_ny c1_dr cpu_ny cpu_dr
    rss_ny=$(proc_rss_kib "$ny") rss_dr=$(proc_rss_kib "$dr")
    thr_ny=$(count_dir "/proc/$ny/task") thr_dr=$(count_dir "/proc/$dr/task")
    fd_ny=$(count_dir "/proc/$ny/fd") fd_dr=$(count_dir "/proc/$dr/fd")
    names_ny=$(threads_by_name "$ny") names_dr=$(threads_by_name "$dr")
    local t0_ny t0_dr cpu_names_ny cpu_names_dr
    t0_ny=$(thread_ticks "$ny") t0_dr=$(thread_ticks "$dr")
    c0_ny=$(proc_cpu_ticks "$ny") c0_dr=$(proc_cpu_ticks "$dr")
    sleep "$IDLE_S"
    c1_ny=$(proc_cpu_ticks "$ny") c1_dr=$(proc_cpu_ticks "$dr")
    cpu_names_ny=$(tick_delta "$t0_ny" "$(thread_ticks "$ny")" "$IDLE_S")
    cpu_names_dr=$(tick_delta "$t0_dr" "$(thread_ticks "$dr")" "$IDLE_S")
    cpu_ny=$("$PY" -c "print('%.2f' % (100 * ($c1_ny - $c0_ny) / $CLK_TCK / $IDLE_S))")
    cpu_dr=$("$PY" -c "print('%.2f' % (100 * ($c1_dr - $c0_dr) / $CLK_TCK / $IDLE_S))")
    log "  idle: RSS ny ${rss_ny} KiB, dr ${rss_dr} KiB; threads ny $thr_ny, dr $thr_dr; fds ny $fd_ny, dr $fd_dr; CPU ny ${cpu_ny}%, dr ${cpu_dr}%"
    log "  threads ny: $names_ny"
    log "  threads dr: $names_dr"
    log "  idle CPU by thread name (% of a core): ny $cpu_names_ny"
    log "  idle CPU by thread name (% of a core): dr $cpu_names_dr"
    # failover
    local kill_t rtos
    kill_t=$(date +%s.%N)
    kill -KILL "$ny"
    wait "$ny" 2>/dev/null || true
    untrack_pid "$ny"
    rtos=$(poll promoted "$WAIT_TIMEOUT" "$POLL_MS" "$(cfg dr)" "$n" "$kill_t") || fail "failover incomplete"
    local summary
    summary=$("$PY" -c "
import json, statistics
r = json.loads('$rtos')
print('%.3f %.3f %.3f' % (statistics.median(r), max(r), min(r)))")
    local rto_med rto_max rto_min
    read -r rto_med rto_max rto_min <<<"$summary"
    log "  SIGKILL of ny: every group primary at dr; RTO median ${rto_med}s, max ${rto_max}s, min ${rto_min}s"
    # the old primary comes back as a replica
    local ts te restart_s
    ts=$(date +%s.%N)
    tandem_start_agent "$TANDEM_BIN" "$(cfg ny)" "$CDIR/ny.log"
    ny=$AGENT_PID
    poll streaming "$WAIT_TIMEOUT" "$ny,$dr" "$(cfg dr)" "$n" >/dev/null || fail "not all streaming to ny after its restart"
    restart_s=$("$PY" -c "import time; print('%.3f' % (time.time() - $ts))")
    log "  restart of ny (a replica now): all streaming again after ${restart_s}s"
    # clean stop of the primary (dr now), then of the replica
    local term_s term_rc rterm_s rterm_rc
    ts=$(date +%s.%N)
    stop_pid "$dr" 300
    te=$(date +%s.%N)
    term_rc=$STOP_STATUS
    term_s=$("$PY" -c "print('%.3f' % ($te - $ts))")
    log "  SIGTERM of the primary (dr): exited after ${term_s}s (status $term_rc)"
    ts=$(date +%s.%N)
    stop_pid "$ny" 300
    te=$(date +%s.%N)
    rterm_rc=$STOP_STATUS
    rterm_s=$("$PY" -c "print('%.3f' % ($te - $ts))")
    log "  SIGTERM of the replica (ny): exited after ${rterm_s}s (status $rterm_rc)"
    stop_all_pids
    RESULTS+=("$("$PY" - <<PYEOF
import json
print(json.dumps({
    "groups": $n, "volumes": $vols,
    "start_to_streaming_s": $start_s, "api_ny_s": $api_ny, "api_dr_s": $api_dr,
    "rss_kib": {"ny": $rss_ny, "dr": $rss_dr},
    "threads": {"ny": $thr_ny, "dr": $thr_dr},
    "threads_by_name": {"ny": $names_ny, "dr": $names_dr},
    "fds": {"ny": $fd_ny, "dr": $fd_dr},
    "idle_cpu_pct": {"ny": $cpu_ny, "dr": $cpu_dr},
    "idle_cpu_pct_by_thread": {"ny": $cpu_names_ny, "dr": $cpu_names_dr},
    "sigterm_s": $term_s, "sigterm_status": "$term_rc",
    "replica_sigterm_s": $rterm_s, "replica_sigterm_status": "$rterm_rc",
    "restart_to_streaming_s": $restart_s,
    "rto_s": {"median": $rto_med, "max": $rto_max, "min": $rto_min, "all": json.loads('$rtos')},
}))
PYEOF
)")
    ((KEEP)) || rm -rf -- "$CDIR"
}

for n in "${SIZES[@]}"; do
    run_size "$n"
done

printf '%s\n' "${RESULTS[@]}" >"$WORK/results.jsonl"
"$PY" - "$OUT" "$VOLUMES" "$VOLUME_SIZE" "$WORK/results.jsonl" <<'PYEOF'
import json, sys
out, volumes, vsize = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(sys.argv[4]) as f:
    runs = [json.loads(l) for l in f if l.strip()]
with open(out, "w") as f:
    json.dump({"volumes_per_group": volumes, "volume_size": vsize, "runs": runs}, f, indent=1)
cols = [f"{r['groups']} x {volumes} = {r['volumes']} vol" for r in runs]
rows = [
    ("start -> all streaming (s)", lambda r: "%.1f" % r["start_to_streaming_s"], "<= 60"),
    ("API answers after (ny / dr, s)", lambda r: "%.1f / %.1f" % (r["api_ny_s"], r["api_dr_s"]), ""),
    ("idle RSS ny (MiB)", lambda r: "%.1f" % (r["rss_kib"]["ny"] / 1024), ""),
    ("idle RSS dr (MiB)", lambda r: "%.1f" % (r["rss_kib"]["dr"] / 1024), ""),
    ("RSS per volume ny / dr (MiB, over 64 MiB)", lambda r: "%.2f / %.2f" % tuple(
        max(0, r["rss_kib"][s] / 1024 - 64) / r["volumes"] for s in ("ny", "dr")), "<= 1"),
    ("threads ny / dr", lambda r: "%d / %d" % (r["threads"]["ny"], r["threads"]["dr"]), "report"),
    ("fds ny / dr", lambda r: "%d / %d" % (r["fds"]["ny"], r["fds"]["dr"]), "report"),
    ("idle CPU ny / dr (% core)", lambda r: "%.2f / %.2f" % (r["idle_cpu_pct"]["ny"], r["idle_cpu_pct"]["dr"]), "< 1"),
    ("SIGKILL ny -> primary at dr: RTO median / max (s)", lambda r: "%.2f / %.2f" % (r["rto_s"]["median"], r["rto_s"]["max"]), "report"),
    ("restart ny (replica) -> all streaming (s)", lambda r: "%.1f" % r["restart_to_streaming_s"], "<= 60"),
    ("SIGTERM of the primary, dr (s, status)", lambda r: "%.2f (%s)" % (r["sigterm_s"], r["sigterm_status"]), "<= 5"),
    ("SIGTERM of the replica, ny (s, status)", lambda r: "%.2f (%s)" % (r["replica_sigterm_s"], r["replica_sigterm_status"]), "<= 5"),
]
w0 = max(len(r[0]) for r in rows)
ws = [max(len(c), 16) for c in cols]
print()
print("figure".ljust(w0), *[c.rjust(w) for c, w in zip(cols, ws)], " target", sep=" | ")
for name, f, target in rows:
    print(name.ljust(w0), *[f(r).rjust(w) for r, w in zip(runs, ws)], " " + target, sep=" | ")
print()
for r in runs:
    print(f"threads by name at {r['groups']} groups: ny {r['threads_by_name']['ny']}")
    print(f"{' ' * len('threads by name at ')}{' ' * len(str(r['groups']))} groups: dr {r['threads_by_name']['dr']}")
for r in runs:
    print(f"idle CPU by thread at {r['groups']} groups (% of a core): ny {r['idle_cpu_pct_by_thread']['ny']}")
    print(f"{' ' * len('idle CPU by thread at ')}{' ' * len(str(r['groups']))} groups (% of a core): dr {r['idle_cpu_pct_by_thread']['dr']}")
print(f"\nJSON: {out}")
PYEOF
