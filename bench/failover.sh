#!/usr/bin/env bash
# bench/failover.sh — failover and planned-migration benchmarks (SPEC §6),
# for both coordinator backends in one run: a `tandem witness` process and a
# single-member etcd.
#
#   bench/failover.sh                    # both backends, every part (~12 min)
#   TRIALS=5 bench/failover.sh --only witness
#   bench/failover.sh --what site-loss   # only the site-loss part, both backends
#
# Not a test: run it by hand. A figure that misses its target is a result;
# only a run that cannot be carried out (a tool missing, an agent that does
# not come up, a wait that runs out) makes the script exit non-zero.
set -euo pipefail

BENCH_NAME=failover
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/failover.sh [--only LIST] [--skip LIST] [--what LIST] [--keep] [-h]

For each backend (witness, etcd): three sites on loopback (ny primary,
chicago priority 1, seattle priority 2). The rto and migration parts use one
group "g" with one volume, a writer (bench/nbd_writer.py) writing 4 KiB FUA
blocks continuously through whichever site serves the volume's NBD socket.

  rto        TRIALS x: SIGKILL ny; time from the kill to the first write
             acknowledged by the new primary, chicago (target: median <= 3 s,
             max <= 5 s); then every acknowledged write is read back there
             (writes lost are reported, not judged: replication is async).
             Each trial runs on a fresh cluster (RESTORE=fresh), or on one
             cluster where ny is restarted, rejoins as a replica and is
             migrated home with `tandem migrate g --to ny` (RESTORE=rejoin;
             those migrations are measured too; slower).
  migration  MIG_TRIALS x, on one cluster: `tandem migrate g --to chicago`
             then back to ny, writes continuing: pause = last write
             acknowledged by the old primary -> first acknowledged by the new
             one; every acknowledged write read back on the new primary
             (target: <= 1 s, zero loss).
  site-loss  once, on its own cluster: SL_GROUPS groups g01, g02, ... (one
             volume each, primary ny, async, on_promote = "sleep SL_HOOK_S"),
             every one streaming to both replicas, one writer thread per
             group (bench/nbd_multi_writer.py, a 4 KiB FUA write every
             SL_INTERVAL_MS); SIGKILL ny; RTO of each group = kill -> first
             write acknowledged by a site other than ny (target over the
             groups: median <= 3 s, max <= 6 s).

Options:
  --only LIST   backends to run, comma-separated (default: witness,etcd)
  --skip LIST   backends to leave out
  --what LIST   parts to run for each backend, comma-separated
                (default: rto,migration,site-loss)
  --keep        keep the work directory (configs, agent/etcd logs, writer log)
  -h, --help    this text

Environment (defaults in brackets):
  TRIALS        failover trials per backend [20]
  MIG_TRIALS    migrations to chicago (each followed by one back) [TRIALS]
  VOLUME_SIZE   the volume [64MiB]
  LEASE_TTL     [coordinator] lease_ttl [3s, Tandem's default]
  INTERVAL_US   writer pace: at most one write per N us [1000]
  WAIT_TIMEOUT  limit for every wait (agent up, replica streaming, new
                primary acknowledging, read-back) [60]
  RESTORE       fresh | rejoin: how the failover trials restore (above) [fresh]
  TANDEM_LOG    agents' log filter (e.g. debug) [agent default]
  ETCD_BIN      etcd binary [/usr/bin/etcd, Debian etcd-server]
  OUT           JSON result [/tmp/tandem-bench-failover-<date>.json]
  WORK_BASE     parent of the work dir [/var/tmp]
  TANDEM_BIN    tandem binary; default: `cargo build --release -p tandem`
                and ${CARGO_TARGET_DIR:-target}/release/tandem
 site-loss:
  SL_GROUPS     groups on ny [50]
  SL_VOLUME_SIZE  each group's volume [VOLUME_SIZE]
  SL_HOOK_S     seconds of each group's on_promote hook (`sleep N`); 0: no
                hook [2]
  SL_INTERVAL_MS  writer pace per group: at most one write per N ms [50]
  SL_RETRY_MS   writer: pause between connection attempts per group [10]
  SL_WAIT_TIMEOUT  limit for every group to be written through its new
                primary after the kill [60 + SL_GROUPS x (SL_HOOK_S + 2)]
  SL_READY_TIMEOUT  limit for each step of the start: every group primary
                on ny, written through ny, streaming to both replicas
                [60 + 2 x SL_GROUPS]
EOF
}

# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
ALL_PARTS=(witness etcd)
declare -A RUN=([witness]=1 [etcd]=1)
KEEP=0
parts_list() {
    local -a l
    local x
    IFS=, read -r -a l <<<"$1"
    for x in "${l[@]}"; do
        [[ -n "${RUN[$x]+set}" ]] || die "unknown backend '$x' (backends: ${ALL_PARTS[*]})"
        RUN[$x]=$2
    done
}
ALL_WHAT=(rto migration site-loss)
declare -A WHAT=([rto]=1 [migration]=1 [site-loss]=1)
what_list() {
    local -a l
    local x
    for x in "${ALL_WHAT[@]}"; do WHAT[$x]=0; done
    IFS=, read -r -a l <<<"$1"
    for x in "${l[@]}"; do
        [[ -n "${WHAT[$x]+set}" ]] || die "unknown part '$x' (parts: ${ALL_WHAT[*]})"
        WHAT[$x]=1
    done
}
while (($# > 0)); do
    case "$1" in
    --only)
        (($# >= 2)) || die "--only needs a list (e.g. witness)"
        for x in "${ALL_PARTS[@]}"; do RUN[$x]=0; done
        parts_list "$2" 1
        shift 2
        ;;
    --only=*) set -- --only "${1#--only=}" "${@:2}" ;;
    --skip)
        (($# >= 2)) || die "--skip needs a list (e.g. etcd)"
        parts_list "$2" 0
        shift 2
        ;;
    --skip=*) set -- --skip "${1#--skip=}" "${@:2}" ;;
    --what)
        (($# >= 2)) || die "--what needs a list (e.g. site-loss)"
        what_list "$2"
        shift 2
        ;;
    --what=*) set -- --what "${1#--what=}" "${@:2}" ;;
    --keep) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
done
PARTS=()
for x in "${ALL_PARTS[@]}"; do ((RUN[$x])) && PARTS+=("$x"); done
((${#PARTS[@]} > 0)) || die "nothing left to run"
WHAT_LIST=()
for x in "${ALL_WHAT[@]}"; do ((WHAT[$x])) && WHAT_LIST+=("$x"); done
((${#WHAT_LIST[@]} > 0)) || die "--what: no part to run"

posint() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 == 0)); then die "$1 must be a positive integer (got '$2')"; fi
}
TRIALS=${TRIALS:-20}
MIG_TRIALS=${MIG_TRIALS:-$TRIALS}
VOLUME_SIZE=${VOLUME_SIZE:-64MiB}
LEASE_TTL=${LEASE_TTL:-3s}
INTERVAL_US=${INTERVAL_US:-1000}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-60}
RESTORE=${RESTORE:-fresh}
ETCD_BIN=${ETCD_BIN:-/usr/bin/etcd}
WORK_BASE=${WORK_BASE:-/var/tmp}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/tandem-bench-failover-$STAMP.json}
posint TRIALS "$TRIALS"
[[ "$MIG_TRIALS" =~ ^[0-9]+$ ]] || die "MIG_TRIALS must be an integer"
posint INTERVAL_US "$INTERVAL_US"
posint WAIT_TIMEOUT "$WAIT_TIMEOUT"
[[ "$RESTORE" == fresh || "$RESTORE" == rejoin ]] || die "RESTORE must be fresh or rejoin"
[[ "$LEASE_TTL" =~ ^[0-9.]+(ms|s|m)$ ]] || die "LEASE_TTL must be a duration like 3s or 1500ms"
VOLUME_BYTES=$(parse_size "$VOLUME_SIZE")
((VOLUME_BYTES % 1048576 == 0)) || die "VOLUME_SIZE must be a multiple of 1 MiB"
EXPORT=vol0
READY_TIMEOUT=30
SL_GROUPS=${SL_GROUPS:-50}
SL_VOLUME_SIZE=${SL_VOLUME_SIZE:-$VOLUME_SIZE}
SL_HOOK_S=${SL_HOOK_S:-2}
SL_INTERVAL_MS=${SL_INTERVAL_MS:-50}
SL_RETRY_MS=${SL_RETRY_MS:-10}
posint SL_GROUPS "$SL_GROUPS"
((SL_GROUPS <= 999)) || die "SL_GROUPS must be at most 999"
[[ "$SL_HOOK_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SL_HOOK_S must be a number of seconds (got '$SL_HOOK_S')"
posint SL_INTERVAL_MS "$SL_INTERVAL_MS"
posint SL_RETRY_MS "$SL_RETRY_MS"
SL_WAIT_TIMEOUT=${SL_WAIT_TIMEOUT:-$((60 + SL_GROUPS * (${SL_HOOK_S%.*} + 2)))}
SL_READY_TIMEOUT=${SL_READY_TIMEOUT:-$((60 + 2 * SL_GROUPS))}
posint SL_WAIT_TIMEOUT "$SL_WAIT_TIMEOUT"
posint SL_READY_TIMEOUT "$SL_READY_TIMEOUT"
SL_VOLUME_BYTES=$(parse_size "$SL_VOLUME_SIZE")
((SL_VOLUME_BYTES % 1048576 == 0)) || die "SL_VOLUME_SIZE must be a multiple of 1 MiB"
SL_WIDTH=$((${#SL_GROUPS} < 2 ? 2 : ${#SL_GROUPS}))

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
need_cmd timeout coreutils
need_cmd curl curl
[[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 not found (Debian python3)"
PY=/usr/bin/python3 # Debian's: python3-libnbd lives there, not in a pyenv
"$PY" -c 'import nbd' 2>/dev/null ||
    die "/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd"
WRITER=$REPO_ROOT/bench/nbd_writer.py
[[ -r "$WRITER" ]] || die "$WRITER not found"
MULTI_WRITER=$REPO_ROOT/bench/nbd_multi_writer.py
[[ -r "$MULTI_WRITER" ]] || die "$MULTI_WRITER not found"
if ((RUN[etcd])); then
    [[ -x "$ETCD_BIN" ]] || die "etcd not found at $ETCD_BIN: apt-get install -y etcd-server (or set ETCD_BIN)"
fi

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
for c in agent witness migrate status; do
    "$TANDEM_BIN" "$c" --help >/dev/null 2>&1 || die "'$TANDEM_BIN $c --help' fails"
done
log "tandem: $TANDEM_BIN"

# ---------------------------------------------------------------------------
# work dir and cleanup
# ---------------------------------------------------------------------------
[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-failover.XXXXXX")
PART_PID=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$PART_PID" ]] && kill -0 "$PART_PID" 2>/dev/null; then
        # the running part is its own process group: end all of it
        kill -TERM -- "-$PART_PID" 2>/dev/null || true
        local deadline=$((SECONDS + 60))
        while kill -0 "$PART_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -KILL -- "-$PART_PID" 2>/dev/null || true
        wait "$PART_PID" 2>/dev/null || true
    fi
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

# ---------------------------------------------------------------------------
# inside a part (a subshell): PDIR, BACKEND
# ---------------------------------------------------------------------------
PDIR=
BACKEND=
CDIR= # the current cluster's directory (configs, data dirs, agent logs)
SITES=(ny chicago seattle)
declare -A SITE_PID

pfail() { # the part fails: message, log tails, exit (the part only)
    local k
    printf '%s\n' "$*" >"$PDIR/error"
    warn "$BACKEND: $*"
    for k in "${SITES[@]/#/$CDIR/}" "$PDIR/witness" "$PDIR/etcd"; do
        [[ -s "$k.log" ]] || continue
        warn "last lines of $k.log:"
        tail -n 12 "$k.log" >&2 || true
    done
    exit 1
}

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

cfg() { printf '%s/%s.toml' "$CDIR" "$1"; }
sock() { printf '%s/%s/nbd/%s.sock' "$CDIR" "$1" "$EXPORT"; }

# write_configs COORDINATOR_SECTION [GROUPS]: one TOML per site in $CDIR, as
# crates/tandem/tests/common/mod.rs (Cluster::new) writes them; GROUPS (the
# [[group]] tables) defaults to the one group "g" of volume $EXPORT.
# shellcheck disable=SC2128,SC2178,SC2179 # peers is a string here (an array in lib.sh)
write_configs() {
    local section=$1 group=${2:-} ports s i=0 peers=""
    mkdir -p "$CDIR"
    read -r -a ports <<<"$(free_ports 6)"
    for s in "${SITES[@]}"; do
        peers+=$(printf '[[peer]]\nname = "%s"\naddress = "127.0.0.1:%s"\n\n' "$s" "${ports[$i]}")
        peers+=$'\n\n'
        i=$((i + 2))
    done
    [[ -n "$group" ]] ||
        group=$(printf '[[group]]\nname = "g"\nprimary = "ny"\nreplicas = [ { site = "chicago", priority = 1 }, { site = "seattle", priority = 2 } ]\nvolumes = [ { name = "%s", size = "%s" } ]\n' \
            "$EXPORT" "$(size_for_config "$VOLUME_BYTES")")
    i=0
    for s in "${SITES[@]}"; do
        printf '[site]\nname = "%s"\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\napi = "127.0.0.1:%s"\n\n[tls]\nmode = "off"\n\n[coordinator]\n%s\n\n%s%s\n' \
            "$s" "$CDIR/$s" "${ports[$i]}" "${ports[$((i + 1))]}" "$section" "$peers" "$group" >"$(cfg "$s")"
        i=$((i + 2))
    done
}

start_witness() { # sets COORD_SECTION
    local port
    port=$(free_ports 1)
    NO_COLOR=1 "$TANDEM_BIN" witness --listen "127.0.0.1:$port" --data-dir "$PDIR/witness-data" --tls off \
        </dev/null >>"$PDIR/witness.log" 2>&1 &
    local pid=$!
    track_pid "$pid"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || pfail "tandem witness exited at start"
        ((SECONDS < deadline)) || pfail "tandem witness did not listen within ${READY_TIMEOUT}s"
        sleep 0.05
    done
    COORD_SECTION=$(printf 'kind = "witness"\nendpoints = ["127.0.0.1:%s"]\nlease_ttl = "%s"' "$port" "$LEASE_TTL")
    log "$BACKEND: tandem witness on 127.0.0.1:$port"
}

start_etcd() { # sets COORD_SECTION; flags as crates/coordinator/tests/support/etcd.rs
    local ports cport pport
    read -r -a ports <<<"$(free_ports 2)"
    cport=${ports[0]} pport=${ports[1]}
    local client=http://127.0.0.1:$cport peer=http://127.0.0.1:$pport
    local -a unset_env=()
    local v
    for v in $(compgen -e); do
        [[ "$v" != ETCD_* || "$v" == ETCD_UNSUPPORTED_ARCH ]] || unset_env+=(-u "$v")
    done
    env "${unset_env[@]+"${unset_env[@]}"}" "$ETCD_BIN" --name m0 --data-dir "$PDIR/etcd-data" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "m0=$peer" --initial-cluster-state new \
        --initial-cluster-token "tandem-bench-$$" \
        --heartbeat-interval 100 --election-timeout 1000 \
        --logger zap --log-outputs stderr </dev/null >>"$PDIR/etcd.log" 2>&1 &
    local pid=$!
    track_pid "$pid"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until curl -s -m 2 "$client/health" 2>/dev/null | grep -q '"health":"true"'; do
        kill -0 "$pid" 2>/dev/null || pfail "etcd exited at start"
        ((SECONDS < deadline)) || pfail "etcd not healthy within ${READY_TIMEOUT}s"
        sleep 0.1
    done
    COORD_SECTION=$(printf 'kind = "etcd"\nendpoints = ["127.0.0.1:%s"]\nlease_ttl = "%s"' "$cport" "$LEASE_TTL")
    log "$BACKEND: etcd $("$ETCD_BIN" --version 2>/dev/null | awk 'NR == 1 { print $NF }') on 127.0.0.1:$cport"
}

start_site() { # start_site SITE: start its agent, wait until its API answers
    local s=$1
    tandem_start_agent "$TANDEM_BIN" "$(cfg "$s")" "$CDIR/$s.log"
    SITE_PID[$s]=$AGENT_PID
    tandem_wait_api "$READY_TIMEOUT" "$AGENT_PID" "$TANDEM_BIN" status --json --local --config "$(cfg "$s")" ||
        pfail "agent $s did not come up within ${READY_TIMEOUT}s"
}

# wait_group SITE ROLE [PRIMARY]: waits until SITE's status shows groups[0]
# with ROLE (and, for a replica, PRIMARY as primary and its state
# "streaming").
wait_group() {
    "$PY" - "$WAIT_TIMEOUT" "$1" "$2" "${3:-}" "$TANDEM_BIN" status --json --local --config "$(cfg "$1")" <<'PYEOF' ||
import json, subprocess, sys, time
timeout, site, role, primary, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
deadline = time.monotonic() + timeout
last = None
while True:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            g = json.loads(out.stdout)["groups"][0]
            last = {k: g.get(k) for k in ("role", "epoch", "primary")}
            last["state"] = (g.get("replicas") or [{}])[0].get("state")
            if g.get("role") == role and (role != "replica" or (
                    g.get("primary") == primary and last["state"] == "streaming")):
                sys.exit(0)
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        pass
    if time.monotonic() > deadline:
        print(f"{site}: not {role} {primary} within {timeout}s; last status {last}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.1)
PYEOF
        pfail "$1 did not become $2${3:+ of $3} within ${WAIT_TIMEOUT}s"
}

# The writer: one process for the whole part, commands through a FIFO.
WLOG=
CMD_FD=
start_writer() {
    WLOG=$PDIR/writer.log
    rm -f "$PDIR/writer.cmd"
    mkfifo "$PDIR/writer.cmd"
    [[ -e "$WLOG" ]] || : >"$WLOG"
    local -a socks=()
    local s
    for s in "${SITES[@]}"; do socks+=("$s=$(sock "$s")"); done
    "$PY" "$WRITER" --log "$WLOG" --export "$EXPORT" --interval-us "$INTERVAL_US" \
        --timeout 10 "${socks[@]}" <"$PDIR/writer.cmd" >>"$PDIR/writer.out" 2>&1 &
    WRITER_PID=$!
    track_pid "$WRITER_PID"
    exec {CMD_FD}>"$PDIR/writer.cmd"
}
wcmd() { printf '%s\n' "$*" >&"$CMD_FD"; }
stop_writer() {
    [[ -n "$CMD_FD" ]] || return 0
    wcmd quit
    exec {CMD_FD}>&-
    CMD_FD=
    stop_pid "$WRITER_PID" 15
    [[ "$STOP_STATUS" == 0 ]] || warn "$BACKEND: the writer ended with status $STOP_STATUS (see $PDIR)"
}
wlog_size() { stat -c %s "$WLOG"; }

# wait_wlog FROM_BYTE REGEX TIMEOUT_S: waits until a line of the writer log
# after byte FROM_BYTE matches REGEX (grep -E); prints it.
wait_wlog() {
    local from=$1 re=$2 to=$3 line deadline
    deadline=$(($(date +%s%N) + to * 1000000000))
    while :; do
        line=$(tail -c +"$((from + 1))" "$WLOG" | grep -m 1 -E "$re") && {
            printf '%s\n' "$line"
            return 0
        }
        kill -0 "$WRITER_PID" 2>/dev/null || pfail "the writer exited (see $PDIR/writer.out)"
        (($(date +%s%N) < deadline)) || return 1
        sleep 0.02
    done
}

# verify TAG: the writer reads the whole volume back from the serving site.
verify() {
    local from line
    from=$(wlog_size)
    wcmd verify "$1"
    line=$(wait_wlog "$from" "^V [0-9]+ [0-9]+ $1 " "$WAIT_TIMEOUT") ||
        pfail "read-back $1 did not finish within ${WAIT_TIMEOUT}s"
    VERIFY_LINE=$line
}

# migrate TAG FROM TO: `tandem migrate g --to TO` (run with FROM's config);
# waits for the first write acknowledged by TO, then the read-back.
migrate() {
    local tag=$1 from=$2 to=$3 off rc=0 t0 t1 s
    wait_group "$to" replica "$from"
    for s in "${SITES[@]}"; do
        [[ "$s" == "$from" || "$s" == "$to" ]] || wait_group "$s" replica "$from"
    done
    sleep "0.$((RANDOM % 5 + 3))"
    off=$(wlog_size)
    wcmd mark "$tag"
    t0=$(date +%s%N)
    timeout "$WAIT_TIMEOUT" "$TANDEM_BIN" migrate g --to "$to" --config "$(cfg "$from")" \
        >>"$CDIR/migrate.out" 2>&1 </dev/null || rc=$?
    t1=$(date +%s%N)
    ((rc == 0)) || pfail "$tag: tandem migrate g --to $to failed (exit $rc; see $CDIR/migrate.out)"
    wait_wlog "$off" "^A [0-9]+ $to " "$WAIT_TIMEOUT" >/dev/null ||
        pfail "$tag: no write acknowledged by $to within ${WAIT_TIMEOUT}s of the migration"
    verify "$tag"
    printf 'mig %s %s %s %d %s\n' "$tag" "$from" "$to" "$(((t1 - t0) / 1000000))" "$CDIR" >>"$PDIR/trials.txt"
    log "$BACKEND: $tag $from->$to: $(pause_of "$off" "$from" "$to") s pause; migrate took $(((t1 - t0) / 1000000)) ms; read-back: $(cut -d' ' -f5,8,9 <<<"$VERIFY_LINE")"
}

# pause_of FROM_BYTE OLD NEW: seconds from the last ack by OLD to the first by NEW.
pause_of() {
    tail -c +"$(($1 + 1))" "$WLOG" | awk -v o="$2" -v n="$3" '
        $1 == "A" && $3 == o { last = $2 }
        $1 == "A" && $3 == n { if (last) printf "%.3f", ($2 - last) / 1e9; else printf "?"; exit }'
}

# ---------------------------------------------------------------------------
# one backend
# ---------------------------------------------------------------------------
# cluster_up NAME: a fresh cluster in $PDIR/NAME (its own coordinator key
# prefix), ny primary and both replicas streaming from it, the writer
# writing to ny.
cluster_up() {
    CDIR=$PDIR/$1
    write_configs "$COORD_SECTION"$'\n'"prefix = \"/tandem-bench/$1\""
    local s
    for s in "${SITES[@]}"; do start_site "$s"; done
    wait_group ny primary
    local off
    off=$( [[ -e "$PDIR/writer.log" ]] && stat -c %s "$PDIR/writer.log" || echo 0)
    start_writer
    wait_wlog "$off" "^A [0-9]+ ny " "$WAIT_TIMEOUT" >/dev/null || pfail "no write acknowledged by ny"
    wait_group chicago replica ny
    wait_group seattle replica ny
}

# cluster_down: the writer quits, the agents are SIGKILLed (nothing of the
# cluster is measured any more); images are deleted unless --keep.
cluster_down() {
    stop_writer
    local s
    for s in "${SITES[@]}"; do
        [[ -n "${SITE_PID[$s]:-}" ]] || continue
        kill -KILL "${SITE_PID[$s]}" 2>/dev/null || true
        wait "${SITE_PID[$s]}" 2>/dev/null || true
        untrack_pid "${SITE_PID[$s]}"
        SITE_PID[$s]=
    done
    ((KEEP)) || find "$CDIR" -name '*.img' -delete 2>/dev/null || true
}

# rto_trial I: SIGKILL ny (the writer sends it, so the kill and the acks are
# timed on one clock); wait for the first write acknowledged elsewhere.
rto_trial() {
    local i=$1 off kill_line ack_line rto site
    wait_group chicago replica ny
    wait_group seattle replica ny
    # a random phase against the lease renewals (every TTL/3)
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    off=$(wlog_size)
    wcmd kill "${SITE_PID[ny]}" "rto-$i"
    ack_line=$(wait_wlog "$off" "^A [0-9]+ (chicago|seattle) " "$WAIT_TIMEOUT") ||
        pfail "rto-$i: no write acknowledged by another site within ${WAIT_TIMEOUT}s of SIGKILL"
    wait "${SITE_PID[ny]}" 2>/dev/null || true
    untrack_pid "${SITE_PID[ny]}"
    SITE_PID[ny]=
    kill_line=$(wait_wlog "$off" "^E [0-9]+ [0-9]+ kill rto-$i " 5) || pfail "rto-$i: no kill line"
    rto=$(awk -v a="${kill_line#E }" -v b="${ack_line#A }" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.3f", (y[1] - x[1]) / 1e9 }')
    site=$(cut -d' ' -f3 <<<"$ack_line")
    verify "rto-$i"
    printf 'rto rto-%d %s %s\n' "$i" "$site" "$CDIR" >>"$PDIR/trials.txt"
    log "$BACKEND: rto-$i: ${rto} s to the first write acknowledged by $site; read-back: $(cut -d' ' -f5,8,9 <<<"$VERIFY_LINE")"
    [[ "$site" == chicago ]] || pfail "rto-$i: $site took over, not chicago (priority 1)"
}

# ---------------------------------------------------------------------------
# site-loss: SL_GROUPS groups on ny, ny SIGKILLed
# ---------------------------------------------------------------------------
sl_group() { printf 'g%0*d' "$SL_WIDTH" "$1"; }

# sl_groups_toml: the [[group]] tables of the site-loss cluster.
sl_groups_toml() {
    local i hook="" size
    [[ "$SL_HOOK_S" =~ ^0+(\.0*)?$ ]] || hook=$(printf 'on_promote = "sleep %s"' "$SL_HOOK_S")
    size=$(size_for_config "$SL_VOLUME_BYTES")
    for ((i = 1; i <= SL_GROUPS; i++)); do
        printf '[[group]]\nname = "g%0*d"\nprimary = "ny"\nreplicas = [ { site = "chicago", priority = 1 }, { site = "seattle", priority = 2 } ]\nmode = "async"\n%s\nvolumes = [ { name = "g%0*d-vol0", size = "%s" } ]\n\n' \
            "$SL_WIDTH" "$i" "$hook" "$SL_WIDTH" "$i" "$size"
    done
}

# sl_wait_ready primary|streaming: waits (SL_READY_TIMEOUT) until ny's
# status shows every site-loss group primary on ny (and, for "streaming",
# with chicago and seattle both "streaming").
sl_wait_ready() {
    local t0=$SECONDS what="primary on ny"
    [[ "$1" == primary ]] || what="primary on ny, streaming to chicago and seattle"
    "$PY" - "$SL_READY_TIMEOUT" "$1" "$SL_GROUPS_CSV" "${SITE_PID[ny]}" "$TANDEM_BIN" status --json --local --config "$(cfg ny)" <<'PYEOF' ||
import json, os, subprocess, sys, time
timeout, mode, groups, pid, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), sys.argv[5:]
deadline = time.monotonic() + timeout
last = "no status yet"
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        print("ny's agent is gone", file=sys.stderr)
        sys.exit(1)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            doc = {g.get("name"): g for g in json.loads(out.stdout).get("groups", [])}
            bad = []
            for name in groups:
                g = doc.get(name)
                if g is None:
                    bad.append(f"{name} absent")
                elif g.get("role") != "primary":
                    bad.append(f"{name} {g.get('role')}")
                elif mode == "streaming":
                    st = {r.get("site"): r.get("state") for r in g.get("replicas") or []}
                    bad += [f"{name} {s} {st.get(s)}" for s in ("chicago", "seattle") if st.get(s) != "streaming"]
            if not bad:
                sys.exit(0)
            last = f"{len(bad)} not ready: " + ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
        else:
            last = out.stderr.strip()[-300:]
    except (subprocess.TimeoutExpired, ValueError, AttributeError) as e:
        last = repr(e)
    if time.monotonic() > deadline:
        print(f"ny: not every group ready ({mode}) within {timeout:.0f}s; {last}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PYEOF
        pfail "site-loss: not every group $what within ${SL_READY_TIMEOUT}s"
    log "$BACKEND: site-loss: all $SL_GROUPS groups $what (waited $((SECONDS - t0)) s)"
}

# sl_start_writer: bench/nbd_multi_writer.py, one thread per group, commands
# through a FIFO (wcmd, stop_writer and wlog_size work on it).
sl_start_writer() {
    WLOG=$PDIR/sl-writer.log
    rm -f "$PDIR/sl-writer.cmd"
    mkfifo "$PDIR/sl-writer.cmd"
    : >"$WLOG"
    local -a dirs=()
    local s
    for s in "${SITES[@]}"; do dirs+=("$s=$CDIR/$s/nbd"); done
    "$PY" "$MULTI_WRITER" --log "$WLOG" --exports "$SL_EXPORTS_CSV" --interval-ms "$SL_INTERVAL_MS" \
        --retry-ms "$SL_RETRY_MS" --timeout 10 "${dirs[@]}" <"$PDIR/sl-writer.cmd" >>"$PDIR/sl-writer.out" 2>&1 &
    WRITER_PID=$!
    track_pid "$WRITER_PID"
    exec {CMD_FD}>"$PDIR/sl-writer.cmd"
}

# sl_wait_acks FROM_BYTE MODE TIMEOUT_S: follows the multi-writer's log from
# FROM_BYTE. MODE "ny": until every group has a write acknowledged by ny.
# MODE "takeover:TAG": from the kill line TAG on, until every group has a
# write acknowledged by a site other than ny; logs each group as it comes
# (its RTO). Returns 1 at the timeout (naming the groups left), 2 if the
# writer exits.
sl_wait_acks() {
    "$PY" - "$WLOG" "$1" "$2" "$3" "$WRITER_PID" "$SL_EXPORTS_CSV" "$BENCH_NAME" "$BACKEND" <<'PYEOF'
import os, sys, time
logf, off, mode, timeout, wpid, exports, bench, backend = sys.argv[1:9]
off, timeout, wpid = int(off), float(timeout), int(wpid)
exports = exports.split(",")
todo = set(exports)
kill_tag = mode.split(":", 1)[1] if mode.startswith("takeover:") else None
kill_t = None
t0 = time.monotonic()
deadline = t0 + timeout
def say(msg):
    print(f"[{bench} {time.strftime('%H:%M:%S')}] {backend}: site-loss: {msg}", file=sys.stderr, flush=True)
with open(logf, "rb") as f:
    f.seek(off)
    part = b""
    last_note = t0
    while todo:
        data = f.read()
        if data:
            part += data
            *lines, part = part.split(b"\n")
            for raw in lines:
                w = raw.decode(errors="replace").split()
                if kill_tag is not None and kill_t is None:
                    if len(w) >= 5 and w[0] == "E" and w[3] == "kill" and w[4] == kill_tag:
                        kill_t = int(w[1])
                    continue
                if len(w) < 7 or w[0] != "A" or w[6] not in todo:
                    continue
                if kill_tag is None:
                    if w[2] == "ny":
                        todo.discard(w[6])
                elif w[2] != "ny" and int(w[1]) > kill_t:
                    todo.discard(w[6])
                    n = len(exports) - len(todo)
                    say(f"{w[6].rsplit('-', 1)[0]} written through {w[2]} (epoch {w[3]}) "
                        f"{(int(w[1]) - kill_t) / 1e9:.3f} s after the kill ({n}/{len(exports)})")
            continue
        try:
            os.kill(wpid, 0)
        except OSError:
            say("the writer exited")
            sys.exit(2)
        now = time.monotonic()
        if now > deadline:
            left = sorted(todo)
            what = "no kill line" if kill_tag and kill_t is None else f"{len(left)} group(s) left: {' '.join(left)}"
            say(f"timeout after {timeout:.0f}s: {what}")
            sys.exit(1)
        if kill_tag is None and now - last_note > 15:
            last_note = now
            say(f"waiting for the first writes through ny: {len(todo)} group(s) left")
        time.sleep(0.05)
PYEOF
}

# site_loss: its own cluster, SL_GROUPS groups streaming to both replicas
# and written continuously; ny SIGKILLed (by the writer: one clock); waits
# until every group has a write acknowledged by its new primary.
site_loss() {
    CDIR=$PDIR/sl
    local i g s off rc=0 tag=site-loss
    SL_GROUPS_CSV=''
    SL_EXPORTS_CSV=''
    for ((i = 1; i <= SL_GROUPS; i++)); do
        g=$(sl_group "$i")
        SL_GROUPS_CSV+=${SL_GROUPS_CSV:+,}$g
        SL_EXPORTS_CSV+=${SL_EXPORTS_CSV:+,}$g-vol0
    done
    write_configs "$COORD_SECTION"$'\n'"prefix = \"/tandem-bench/sl\"" "$(sl_groups_toml)"
    log "$BACKEND: site-loss: $SL_GROUPS groups of $SL_VOLUME_SIZE on ny, on_promote sleep $SL_HOOK_S s; starting the sites"
    for s in "${SITES[@]}"; do start_site "$s"; done
    sl_wait_ready primary
    sl_start_writer
    sl_wait_acks 0 ny "$SL_READY_TIMEOUT" ||
        pfail "site-loss: not every group written through ny within ${SL_READY_TIMEOUT}s (see $PDIR/sl-writer.out)"
    log "$BACKEND: site-loss: every group written through ny"
    sl_wait_ready streaming
    # a random phase against the lease renewals (every TTL/3)
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    off=$(wlog_size)
    printf 'sl %s %s ny %s %s\n' "$tag" "$CDIR" "$SL_HOOK_S" "$SL_EXPORTS_CSV" >>"$PDIR/trials.txt"
    wcmd kill "${SITE_PID[ny]}" "$tag"
    log "$BACKEND: site-loss: ny SIGKILLed; waiting up to ${SL_WAIT_TIMEOUT}s for every group to be written through its new primary"
    sl_wait_acks "$off" "takeover:$tag" "$SL_WAIT_TIMEOUT" || rc=$?
    # the end of the measured window (agents' log lines after it are teardown)
    ! kill -0 "$WRITER_PID" 2>/dev/null || wcmd mark "$tag-end"
    wait "${SITE_PID[ny]}" 2>/dev/null || true
    untrack_pid "${SITE_PID[ny]}"
    SITE_PID[ny]=
    for s in chicago seattle; do
        timeout 15 "$TANDEM_BIN" status --json --local --config "$(cfg "$s")" >"$PDIR/sl-status-$s.json" 2>&1 </dev/null || true
    done
    ((rc != 2)) || pfail "site-loss: the writer exited (see $PDIR/sl-writer.out)"
    ((rc == 0)) || pfail "site-loss: not every group written through a new primary within ${SL_WAIT_TIMEOUT}s of SIGKILL"
    cluster_down
    log "$BACKEND: site-loss: every group written through its new primary"
}

part() {
    : >"$PDIR/trials.txt"
    case "$BACKEND" in
    witness) start_witness ;;
    etcd) start_etcd ;;
    esac
    local i j up=0
    if ((WHAT[rto])) && [[ "$RESTORE" == fresh ]]; then
        for ((i = 1; i <= TRIALS; i++)); do
            cluster_up "t$i"
            rto_trial "$i"
            cluster_down
        done
    elif ((WHAT[rto])); then
        cluster_up main
        up=1
        log "$BACKEND: cluster up, writer writing to ny"
        for ((i = 1; i <= TRIALS; i++)); do
            rto_trial "$i"
            # restore: ny rejoins as chicago's replica, then migrates home
            start_site ny
            wait_group ny replica chicago
            migrate "back-$i" chicago ny
        done
    fi
    if ((WHAT[migration])); then
        ((up)) || cluster_up mig
        up=1
        for ((j = 1; j <= MIG_TRIALS; j++)); do
            migrate "mig-$j" ny chicago
            migrate "migback-$j" chicago ny
        done
    fi
    ((up == 0)) || cluster_down
    ((WHAT[site-loss] == 0)) || site_loss
    log "$BACKEND: done"
}

# ---------------------------------------------------------------------------
# analysis of one backend (runs even when the part failed half way)
# ---------------------------------------------------------------------------
analyse() {
    "$PY" - "$1" "$2" "$LEASE_TTL" <<'PYEOF'
import datetime, json, os, re, statistics, sys
pdir, backend, ttl = sys.argv[1], sys.argv[2], sys.argv[3]
ttl_ms = float(ttl[:-2]) if ttl.endswith("ms") else float(ttl[:-1]) * (60000 if ttl.endswith("m") else 1000)
every_ms = ttl_ms / 3

def rd(name):
    try:
        return open(os.path.join(pdir, name), errors="replace").read()
    except OSError:
        return ""

trials = [l.split() for l in rd("trials.txt").splitlines() if l.strip()]
acks = []           # (mono, site, epoch, counter)
events = {}         # tag -> (mono, real)
verifies = {}       # tag -> dict
offset = None       # real - mono
for l in rd("writer.log").splitlines():
    f = l.split()
    if not f:
        continue
    if f[0] == "A" and len(f) >= 6:
        acks.append((int(f[1]), f[2], int(f[3]), int(f[4])))
    elif f[0] == "E" and len(f) >= 5:
        events[f[4]] = (int(f[1]), int(f[2]))
        if offset is None:
            offset = int(f[2]) - int(f[1])
    elif f[0] == "V" and len(f) >= 6:
        kv = dict(x.split("=", 1) for x in f[7:] if "=" in x)
        verifies[f[3]] = {"ok": f[4] == "ok", "site": f[5], "epoch": f[6],
                          "checked": int(kv.get("checked", 0)), "lost": int(kv.get("lost", 0)),
                          "torn": int(kv.get("torn", 0))}
ack_t = [a[0] for a in acks]

import bisect
def first_ack_after(t, sites):
    i = bisect.bisect_right(ack_t, t)
    for a in acks[i:]:
        if a[1] in sites:
            return a
    return None

def last_ack_before(t, site, since):
    i = bisect.bisect_left(ack_t, t) - 1
    while i >= 0 and acks[i][0] >= since:
        if acks[i][1] == site:
            return acks[i]
        i -= 1
    return None

# agents' log lines of interest: (real ns, message)
TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z?\s")
def parse_ts(s):
    frac = s.split(".")[1] if "." in s else "0"
    base = datetime.datetime.strptime(s.split(".")[0], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return int(base.timestamp()) * 10**9 + int(frac.ljust(9, "0")[:9])
logs = {}
def site_log(cdir, site):
    if (cdir, site) not in logs:
        lines = []
        try:
            text = open(os.path.join(cdir, f"{site}.log"), errors="replace").read()
        except OSError:
            text = ""
        for l in text.splitlines():
            if ("DEBUG" in l[:40] or "TRACE" in l[:40]) and not (
                    "response 200" in l and "keepalive" in l):
                continue
            l = re.sub(r"\x1b\[[0-9;]*m", "", l)
            m = TS.match(l)
            if m:
                lines.append((parse_ts(m.group(1)), l))
        logs[(cdir, site)] = lines
    return logs[(cdir, site)]

def log_before(cdir, site, t_real, needles):
    last = None
    for t, l in site_log(cdir, site):
        if t > t_real:
            break
        if all(n in l for n in needles):
            last = t
    return last

def log_after(cdir, site, t_real, needle, until=None):
    for t, l in site_log(cdir, site):
        if t >= t_real and needle in l and (until is None or t <= until):
            return t
    return None

def ms(x):
    return None if x is None else round(x / 1e6, 1)

rto, mig = [], []
for t in trials:
    kind, tag = t[0], t[1]
    v = verifies.get(tag)
    if kind == "rto":
        ev = events.get(tag)
        if not ev:
            continue
        a = first_ack_after(ev[0], {"chicago", "seattle"})
        if not a:
            continue
        kreal = ev[1]
        areal = a[0] + offset
        cdir = t[3]
        claim = log_after(cdir, a[1], kreal - 10**8, "failover: this site takes the group over", areal)
        opened = log_after(cdir, a[1], kreal - 10**8, "promoted: NBD export open", areal)
        # ny's last lease renewal before the kill: logged only at debug and
        # only by the witness client (its keep-alive responses); otherwise
        # estimated from the grant: renewals every TTL/3 from then on
        renewed = log_before(cdir, "ny", kreal, ["response 200", "keepalive"])
        estimated = False
        if renewed is None or kreal - renewed > every_ms * 1.2e6:
            granted = log_before(cdir, "ny", kreal, ["coordinator lease granted"])
            if granted is not None:
                renewed = granted + int((kreal - granted) // (every_ms * 1e6) * every_ms * 1e6)
                estimated = True
        rto.append({"tag": tag, "site": a[1], "epoch": a[2], "rto_s": (a[0] - ev[0]) / 1e9,
                    "kill_to_claim_ms": ms(claim - kreal) if claim else None,
                    "last_renewal_to_kill_ms": ms(kreal - renewed) if renewed else None,
                    "renewal_estimated": estimated,
                    "claim_to_open_ms": ms(opened - claim) if claim and opened else None,
                    "open_to_ack_ms": ms(areal - opened) if opened else None,
                    "lost_acked_writes": v["lost"] if v else None, "torn": v["torn"] if v else None,
                    "verified": v is not None})
    elif kind == "mig":
        frm, to, cmd_ms, cdir = t[2], t[3], int(t[4]), t[5]
        ev = events.get(tag)
        if not ev:
            continue
        a1 = first_ack_after(ev[0], {to})
        if not a1:
            continue
        a0 = last_ack_before(a1[0], frm, ev[0] - 10 * 10**9)
        mreal = ev[1]
        r0 = a0[0] + offset if a0 else None
        r1 = a1[0] + offset
        handing = log_after(cdir, frm, mreal - 10**8, "migration: handing the group over", r1)
        handed = log_after(cdir, frm, mreal - 10**8, "migration: handed over", r1 + 30 * 10**9)
        opened = log_after(cdir, to, mreal - 10**8, "promoted: NBD export open", r1)
        mig.append({"tag": tag, "from": frm, "to": to, "epoch": a1[2],
                    "pause_s": (a1[0] - a0[0]) / 1e9 if a0 else None,
                    "migrate_cmd_ms": cmd_ms,
                    "mark_to_handing_ms": ms(handing - mreal) if handing else None,
                    "last_ack_to_handing_ms": ms(handing - r0) if handing and r0 else None,
                    "handing_to_open_ms": ms(opened - handing) if handing and opened else None,
                    "handing_to_demoted_ms": ms(handed - handing) if handing and handed else None,
                    "open_to_ack_ms": ms(r1 - opened) if opened else None,
                    "lost_acked_writes": v["lost"] if v else None, "torn": v["torn"] if v else None,
                    "checked_blocks": v["checked"] if v else None, "verified": v is not None})

def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "median": statistics.median(xs), "max": max(xs), "min": min(xs)}

def med_breakdown(rows, keys):
    out = {}
    for k in keys:
        m = (stats([r[k] for r in rows]) or {}).get("median")
        out[k] = "?" if m is None else round(m)
    return out

rows = []
s = stats([r["rto_s"] for r in rto])
if s:
    lost = sum(r["lost_acked_writes"] or 0 for r in rto)
    for r in rto:
        # lease left at the kill, and the claim's lag behind the expiry
        r["lease_left_at_kill_ms"] = (round(ttl_ms - r["last_renewal_to_kill_ms"], 1)
                                      if r["last_renewal_to_kill_ms"] is not None else None)
        r["expiry_to_claim_ms"] = (round(r["kill_to_claim_ms"] - r["lease_left_at_kill_ms"], 1)
                                   if r["lease_left_at_kill_ms"] is not None and r["kill_to_claim_ms"] is not None
                                   else None)
    b = med_breakdown(rto, ["kill_to_claim_ms", "claim_to_open_ms", "open_to_ack_ms",
                            "lease_left_at_kill_ms", "expiry_to_claim_ms"])
    est = " (est. from its grant + TTL/3 renewals)" if any(r["renewal_estimated"] for r in rto) else ""
    rows.append({"backend": backend, "metric": f"failover RTO, SIGKILL ny -> chicago acks ({s['n']} trials)",
                 "median": s["median"], "max": s["max"], "target": "median <= 3 s, max <= 5 s",
                 "ok": s["median"] <= 3.0 and s["max"] <= 5.0,
                 "note": f"median breakdown: kill->claim {b['kill_to_claim_ms']} ms (ny's lease had "
                         f"{b['lease_left_at_kill_ms']} ms left{est}, its expiry->claim {b['expiry_to_claim_ms']} ms), "
                         f"claim->export open {b['claim_to_open_ms']} ms, open->first ack {b['open_to_ack_ms']} ms; "
                         f"acked writes lost at SIGKILL (async, informational): {lost} in total"})
for frm, to, what in (("ny", "chicago", "migration pause ny -> chicago"),
                      ("chicago", "ny", "migration pause chicago -> ny")):
    sel = [r for r in mig if r["from"] == frm and r["to"] == to]
    s = stats([r["pause_s"] for r in sel])
    if not s:
        continue
    lost = sum(r["lost_acked_writes"] or 0 for r in sel) + sum(r["torn"] or 0 for r in sel)
    unverified = sum(1 for r in sel if not r["verified"])
    b = med_breakdown(sel, ["last_ack_to_handing_ms", "handing_to_open_ms", "open_to_ack_ms",
                            "mark_to_handing_ms", "handing_to_demoted_ms"])
    rows.append({"backend": backend, "metric": f"{what} ({s['n']} trials)", "median": s["median"], "max": s["max"],
                 "target": "<= 1 s, zero loss", "ok": s["max"] <= 1.0 and lost == 0 and unverified == 0,
                 "note": f"lost acked writes: {lost}" + (f", {unverified} not read back" if unverified else "")
                         + f"; median breakdown: last ack on old -> old logs 'handing over' {b['last_ack_to_handing_ms']} ms, "
                           f"-> new's export open {b['handing_to_open_ms']} ms, -> first ack on new {b['open_to_ack_ms']} ms "
                           f"(migrate request -> 'handing over' {b['mark_to_handing_ms']} ms; 'handing over' -> old "
                           f"logs 'handed over' {b['handing_to_demoted_ms']} ms)"})
# --- site-loss: one kill, many groups
site_loss = None
for t in trials:
    if t[0] != "sl" or len(t) < 6:
        continue
    tag, cdir, old, hook_s, exports = t[1], t[2], t[3], float(t[4]), t[5].split(",")
    sl_acks = {}      # export -> [(mono, site, epoch)]
    sl_kill = None    # (mono, real)
    sl_end = None     # real
    for l in rd("sl-writer.log").splitlines():
        f = l.split()
        if not f:
            continue
        if f[0] == "A" and len(f) >= 7:
            sl_acks.setdefault(f[6], []).append((int(f[1]), f[2], int(f[3])))
        elif f[0] == "E" and len(f) >= 5 and f[3] == "kill" and f[4] == tag:
            sl_kill = (int(f[1]), int(f[2]))
        elif f[0] == "E" and len(f) >= 5 and f[3] == "mark" and f[4] == tag + "-end":
            sl_end = int(f[2])
    if sl_kill is None:
        continue
    kmono, kreal = sl_kill
    # per-group agent log lines, by (site, group): [(real ns, line)]
    GRP = re.compile(r'group="?([A-Za-z0-9._-]+)"?')
    def group_times(site, needle):
        out = {}
        for t_, l in site_log(cdir, site):
            if t_ >= kreal - 10**8 and needle in l:
                m = GRP.search(l)
                if m and m.group(1) not in out:
                    out[m.group(1)] = t_
        return out
    marks = {}
    for site in ("chicago", "seattle"):
        marks[site] = {k: group_times(site, n) for k, n in (
            ("claim", "failover: this site takes the group over"),
            ("open", "promoted: NBD export open"),
            ("hook", "hook succeeded"))}
    groups = []
    for e in exports:
        g = e.rsplit("-", 1)[0]
        a = next((x for x in sl_acks.get(e, []) if x[0] > kmono and x[1] != old), None)
        row = {"group": g, "export": e, "site": a[1] if a else None, "epoch": a[2] if a else None,
               "rto_s": round((a[0] - kmono) / 1e9, 4) if a else None}
        if a:
            m = marks.get(a[1], {})
            claim, opened, hook = (m.get(k, {}).get(g) for k in ("claim", "open", "hook"))
            areal = a[0] - kmono + kreal
            row.update({"kill_to_claim_ms": ms(claim - kreal) if claim else None,
                        "claim_to_open_ms": ms(opened - claim) if claim and opened else None,
                        "open_to_ack_ms": ms(areal - opened) if opened else None,
                        "kill_to_hook_done_ms": ms(hook - kreal) if hook else None})
        groups.append(row)
    got = sorted(r["rto_s"] for r in groups if r["rto_s"] is not None)
    missing = [r["group"] for r in groups if r["rto_s"] is None]
    def pct(p):
        return got[min(len(got) - 1, int(round(p / 100 * (len(got) - 1))))] if got else None
    spread = {"n": len(got), "min": got[0] if got else None, "p10": pct(10), "p25": pct(25),
              "median": statistics.median(got) if got else None, "p75": pct(75), "p90": pct(90),
              "max": got[-1] if got else None}
    steps = [b - a for a, b in zip(got, got[1:])]
    step = statistics.median(steps) if steps else None
    sites = {}
    for r in groups:
        if r["site"]:
            sites[r["site"]] = sites.get(r["site"], 0) + 1
    # warnings and errors the agents logged from the kill to the end of the
    # wait (later ones are the teardown's)
    issues = {}
    end = sl_end if sl_end is not None else kreal + 3600 * 10**9
    for site in ("ny", "chicago", "seattle"):
        for t_, l in site_log(cdir, site):
            if t_ < kreal - 10**8 or t_ > end or not re.search(r"\b(WARN|ERROR)\b", l[:60]):
                continue
            msg = re.sub(r"^\S+\s+", "", l)
            msg = GRP.sub('group=*', msg)
            msg = re.sub(r"\d+", "N", msg)[:240]
            k = (site, msg)
            if k not in issues:
                issues[k] = {"site": site, "message": msg, "count": 0, "first_after_kill_ms": ms(t_ - kreal)}
            issues[k]["count"] += 1
    issues = sorted(issues.values(), key=lambda x: -x["count"])
    site_loss = {"tag": tag, "groups_total": len(exports), "groups_recovered": len(got), "missing": missing,
                 "on_promote_s": hook_s, "new_primaries": sites, "rto_spread_s": spread,
                 "median_step_between_groups_s": step, "groups": groups, "log_issues": issues}
    if got:
        b = med_breakdown([r for r in groups if r["rto_s"] is not None],
                          ["kill_to_claim_ms", "claim_to_open_ms", "open_to_ack_ms"])
        first = min((r for r in groups if r["rto_s"] is not None), key=lambda r: r["rto_s"])
        note = (f"RTO spread over {len(got)} groups: min {spread['min']:.2f}, p10 {spread['p10']:.2f}, "
                f"p25 {spread['p25']:.2f}, median {spread['median']:.2f}, p75 {spread['p75']:.2f}, "
                f"p90 {spread['p90']:.2f}, max {spread['max']:.2f} s; sorted RTOs {step:.2f} s apart (median step); "
                if step is not None else
                f"RTO of the one group: {spread['min']:.2f} s; ")
        note += (f"new primaries: {', '.join(f'{k} {v}' for k, v in sorted(sites.items()))}; "
                 f"on_promote sleep {hook_s:g} s; first group ({first['group']}): kill->claim "
                 f"{first.get('kill_to_claim_ms')} ms; median per group: kill->claim {b['kill_to_claim_ms']} ms, "
                 f"claim->export open {b['claim_to_open_ms']} ms, open->first ack {b['open_to_ack_ms']} ms")
        if missing:
            note += f"; NOT written through a new primary: {' '.join(missing)}"
        if issues:
            note += (f"; agents logged {sum(i['count'] for i in issues)} warning/error line(s) between the kill "
                     f"and the end of the wait (JSON: site_loss.log_issues)")
        rows.append({"backend": backend,
                     "metric": f"site-loss RTO, SIGKILL ny -> each group's first ack by its new primary ({len(got)}/{len(exports)} groups)",
                     "median": spread["median"], "max": spread["max"],
                     "target": "median <= 3 s, max <= 6 s",
                     "ok": not missing and spread["median"] <= 3.0 and spread["max"] <= 6.0,
                     "note": note})
doc = {"backend": backend, "rows": rows, "rto_trials": rto, "migration_trials": mig,
       "writes_acked": len(acks)}
if site_loss is not None:
    doc["site_loss"] = site_loss
json.dump(doc, sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# running the parts
# ---------------------------------------------------------------------------
run_part() {
    local b=$1 rc=0
    mkdir -p "$WORK/$b"
    local what=""
    ((WHAT[rto] == 0)) || what+=", $TRIALS failover trials"
    ((WHAT[migration] == 0)) || what+=", $MIG_TRIALS migrations to chicago (and back)"
    ((WHAT[site-loss] == 0)) || what+=", site loss with $SL_GROUPS groups"
    log "=== $b: ${what#, } ==="
    local t0=$SECONDS
    set -m
    (
        set +m
        set -e
        PDIR=$WORK/$b
        BACKEND=$b
        trap 'stop_all_pids' EXIT
        trap 'exit 143' TERM INT
        part
    ) &
    PART_PID=$!
    set +m
    wait "$PART_PID" || rc=$?
    PART_PID=
    printf '%s\n' "$((SECONDS - t0))" >"$WORK/$b/elapsed"
    if ((rc != 0)); then
        [[ -s "$WORK/$b/error" ]] || printf 'exit status %d\n' "$rc" >"$WORK/$b/error"
        warn "$b failed: $(head -n 1 "$WORK/$b/error")"
    fi
    analyse "$WORK/$b" "$b" >"$WORK/$b/result.json" || warn "$b: analysis failed"
    log "$b: $((SECONDS - t0))s"
}

log "backends: ${PARTS[*]}; parts: ${WHAT_LIST[*]}; work dir $WORK"
for b in "${PARTS[@]}"; do run_part "$b"; done

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
if tandem_rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || tandem_rev="$tandem_rev+dirty"
else
    tandem_rev=none
fi
etcd_ver=none
if ((RUN[etcd])); then etcd_ver=$("$ETCD_BIN" --version 2>/dev/null | sed -n 1p) || true; fi
mkdir -p "$(dirname "$OUT")"
"$PY" - "$WORK" "$OUT" "$tandem_rev" "$etcd_ver" "$(nproc)" "${PARTS[*]}" \
    "TRIALS=$TRIALS" "MIG_TRIALS=$MIG_TRIALS" "VOLUME_SIZE=$VOLUME_SIZE" "LEASE_TTL=$LEASE_TTL" \
    "INTERVAL_US=$INTERVAL_US" "WAIT_TIMEOUT=$WAIT_TIMEOUT" "RESTORE=$RESTORE" "TANDEM_BIN=$TANDEM_BIN" \
    "WHAT=$(IFS=,; printf '%s' "${WHAT_LIST[*]}")" "SL_GROUPS=$SL_GROUPS" "SL_VOLUME_SIZE=$SL_VOLUME_SIZE" \
    "SL_HOOK_S=$SL_HOOK_S" "SL_INTERVAL_MS=$SL_INTERVAL_MS" "SL_RETRY_MS=$SL_RETRY_MS" \
    "SL_WAIT_TIMEOUT=$SL_WAIT_TIMEOUT" "SL_READY_TIMEOUT=$SL_READY_TIMEOUT" <<'PYEOF'
import datetime, json, os, sys
work, out_path, rev, etcd_ver, ncpu, parts = sys.argv[1:7]
params = dict(a.split("=", 1) for a in sys.argv[7:])
rows, results = [], {}
for b in parts.split():
    d = os.path.join(work, b)
    def rd(n):
        try:
            return open(os.path.join(d, n)).read()
        except OSError:
            return None
    res = json.loads(rd("result.json") or "{}") or {"rows": []}
    res["elapsed_s"] = int((rd("elapsed") or "0").strip() or 0)
    err = rd("error")
    if err:
        res["error"] = err.strip()
    results[b] = res
    for r in res.get("rows", []):
        rows.append([b, r["metric"], f"{r['median']:.3f} s", f"{r['max']:.3f} s", r["target"],
                     "OK" if r["ok"] else "MISSED", r.get("note", "")])
    if err:
        rows.append([b, "(run)", "-", "-", "-", "FAILED", err.strip().splitlines()[0]])
head = ["backend", "metric", "median", "max", "target", "ok?"]
w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
line = lambda r: "  ".join(str(c).ljust(x) for c, x in zip(r, w)).rstrip()
print()
print(line(head))
print(line(["-" * x for x in w]))
for r in rows:
    print(line(r[:6]))
print()
print("notes:")
for r in rows:
    if r[6]:
        print(f"  {r[0]}, {r[1]}: {r[6]}")
for b, res in results.items():
    sl = res.get("site_loss")
    if not sl:
        continue
    print()
    print(f"site-loss RTO per group, {b} (s; '-': not written through a new primary):")
    cells = [f"{g['group']} {g['rto_s']:.2f}" if g["rto_s"] is not None else f"{g['group']} -" for g in sl["groups"]]
    for i in range(0, len(cells), 8):
        print("  " + "  ".join(c.ljust(10) for c in cells[i:i + 8]).rstrip())
    for i in sl["log_issues"][:8]:
        print(f"  log: {i['site']} x{i['count']}: {i['message'][:150]}")
doc = {"benchmark": "failover",
       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
       "tandem_rev": rev, "tandem_bin": params.pop("TANDEM_BIN"), "etcd": etcd_ver, "cpus": int(ncpu), "params": params, "backends": results,
       "note": "figures from one run; machines are noisy"}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
print(f"results (every trial, with its breakdown): {out_path}")
print("(figures from one run; machines are noisy)")
PYEOF

failed=()
for b in "${PARTS[@]}"; do [[ ! -s "$WORK/$b/error" ]] || failed+=("$b"); done
((${#failed[@]} == 0)) || die "backend(s) failed: ${failed[*]} (see above)"
