#!/usr/bin/env bash
# bench/replication.sh — replication benchmarks (SPEC §6), side by side in
# one run: Tandem with a live replica vs without, async lag, sync latency,
# goodput over a shaped link, resync wire bytes, first sync vs rsync.
# Not a test: run it by hand, as root.
#
#   bench/replication.sh                 # everything (~15 min with the defaults)
#   bench/replication.sh --only a,c      # just some parts
#   LAG_RUNTIME=120 bench/replication.sh --only b
#
# See bench/README.md for what it measures and the targets.
set -euo pipefail

BENCH_NAME=replication
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/replication.sh [--only LIST] [--skip LIST] [--keep] [-h]

Parts (SPEC §6 replication targets), each against its peer figure:
  a  what one async replica costs the primary, 4k randwrite QD16 and 1M seq
     write QD8 through it, one live async replica vs none (issue 13):
     a1 the primary agent's CPU per write (target <= 1.3x 4k, <= 1.2x 1M)
     a2 throughput (target >= 0.9x), with fio and the primary pinned to
        CPU 0, the replica agent pinned to CPU 1 with its data on tmpfs
     a0 the floor: CPU 0's cost of sending the same writes over loopback
        TCP to a reader on CPU 1, beside Tandem's extra CPU per write
     and, informational: the replica's CPU per record, its device bytes
     per replicated byte, the same jobs with nothing pinned (co-located)
  b  async lag under sustained 50 MiB/s random writes (4k-64k), lag_seconds
     sampled every 100 ms (target p99 <= 1 s)
  c  sync mode 4k write latency (QD1) vs no replica
     (target p50 <= local p50 + RTT + 200 us)
  d  goodput over a 100 Mbit/s tbf-shaped veth link between two network
     namespaces, incompressible data (target >= 90% of the link)
  e  resync after 1 GiB of 4 KiB random writes while the replica was down,
     8 GiB volume: wire bytes vs changed bytes (target <= 1.1x)
  f  first sync of a 4 GiB image whose replica copy differs in 10% of its
     64 KiB chunks, vs rsync --inplace --no-whole-file (target >= 2x faster)

Options:
  --only LIST   comma-separated parts to run (default: a,b,c,d,e,f)
  --skip LIST   comma-separated parts to leave out
  --keep        keep the work directory (configs, agent logs, samples)
  -h, --help    this text

Environment (defaults give a ~15 minute run):
  RUNTIME         a: seconds per fio job (20)        RAMP: fio ramp (2)
  COLOC_RUNTIME   a: seconds per fio job of the co-located runs (10)
  A_COLOC         a: 0 leaves the co-located runs out (1)
  A_PERF          a: 1 records perf profiles of the agents in each isolated run (off)
  A_QUEUE_MEMORY  a: queue_memory of the isolated primary (Tandem's default)
  SIZE            a, b, c: volume size (2GiB)
  ISO_HISTORY_MAX a: history_max of the isolated replica, in memory (1GiB)
  LAG_RUNTIME     b: seconds of sustained writes (60)
  LAG_RATE        b: fio --rate (50m = 50 MiB/s)
  LAT_RUNTIME     c: seconds per fio job (20)
  WAN_BYTES       d: random data written (400MiB)    WAN_SIZE: volume (1GiB)
  WAN_RATE        d: tbf rate (100mbit)
  WAN_QUEUE_MEMORY d: group queue_memory (default: Tandem's default)
  RESYNC_SIZE     e: volume size (8GiB)   RESYNC_WRITES: changed data (1GiB)
  FIRST_SIZE      f: image size (4GiB)    FIRST_DIFF_PCT: % chunks differing (10)
  WAIT_TIMEOUT    limit for any wait for replication to catch up (300 s)
  OUT             JSON result (default /tmp/tandem-bench-replication-<date>.json)
  WORK_BASE       parent of the work dir (default /var/tmp; a real disk)
  PORT_BASE       first TCP port (default 18450; parts use PORT_BASE..+119)
  TANDEM_BIN      use this tandem binary instead of building one
EOF
}

# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
ALL_PARTS=(a b c d e f)
declare -A RUN=([a]=1 [b]=1 [c]=1 [d]=1 [e]=1 [f]=1)
KEEP=0
parts_list() { # parts_list LIST VALUE: sets RUN[x]=VALUE for each listed part
    local -a l
    local x
    IFS=, read -r -a l <<<"$1"
    for x in "${l[@]}"; do
        [[ -n "${RUN[$x]+set}" ]] || die "unknown part '$x' (parts: ${ALL_PARTS[*]})"
        RUN[$x]=$2
    done
}
while (($# > 0)); do
    case "$1" in
    --only)
        (($# >= 2)) || die "--only needs a list (e.g. a,b)"
        for x in "${ALL_PARTS[@]}"; do RUN[$x]=0; done
        parts_list "$2" 1
        shift 2
        ;;
    --only=*) set -- --only "${1#--only=}" "${@:2}" ;;
    --skip)
        (($# >= 2)) || die "--skip needs a list (e.g. d,f)"
        parts_list "$2" 0
        shift 2
        ;;
    --skip=*) set -- --skip "${1#--skip=}" "${@:2}" ;;
    --keep) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
done
PARTS=()
for x in "${ALL_PARTS[@]}"; do ((RUN[$x])) && PARTS+=("$x"); done
((${#PARTS[@]} > 0)) || die "nothing left to run"
want() { ((RUN[$1])); }

posint() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 == 0)); then die "$1 must be a positive integer (got '$2')"; fi
}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
COLOC_RUNTIME=${COLOC_RUNTIME:-10}
A_COLOC=${A_COLOC:-1}
A_PERF=${A_PERF:-}
A_QUEUE_MEMORY=${A_QUEUE_MEMORY:-}
SIZE=${SIZE:-2GiB}
LAG_RUNTIME=${LAG_RUNTIME:-60}
LAG_RATE=${LAG_RATE:-50m}
LAT_RUNTIME=${LAT_RUNTIME:-20}
WAN_BYTES=${WAN_BYTES:-400MiB}
WAN_SIZE=${WAN_SIZE:-1GiB}
WAN_RATE=${WAN_RATE:-100mbit}
WAN_QUEUE_MEMORY=${WAN_QUEUE_MEMORY:-}
RESYNC_SIZE=${RESYNC_SIZE:-8GiB}
RESYNC_WRITES=${RESYNC_WRITES:-1GiB}
FIRST_SIZE=${FIRST_SIZE:-4GiB}
FIRST_DIFF_PCT=${FIRST_DIFF_PCT:-10}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-300}
WORK_BASE=${WORK_BASE:-/var/tmp}
ISO_HISTORY_MAX=${ISO_HISTORY_MAX:-1GiB}
PORT_BASE=${PORT_BASE:-18450}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/tandem-bench-replication-$STAMP.json}
posint RUNTIME "$RUNTIME"
posint COLOC_RUNTIME "$COLOC_RUNTIME"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be an integer (seconds)"
posint LAG_RUNTIME "$LAG_RUNTIME"
posint LAT_RUNTIME "$LAT_RUNTIME"
posint WAIT_TIMEOUT "$WAIT_TIMEOUT"
posint PORT_BASE "$PORT_BASE"
if ! [[ "$FIRST_DIFF_PCT" =~ ^[0-9]+$ ]] || ((FIRST_DIFF_PCT > 100)); then die "FIRST_DIFF_PCT must be 0..100"; fi
[[ "$WAN_RATE" =~ ^[0-9]+mbit$ ]] || die "WAN_RATE must be like 100mbit"
[[ "$LAG_RATE" =~ ^[0-9]+[km]?$ ]] || die "LAG_RATE must be a fio rate like 50m"
SIZE_BYTES=$(parse_size "$SIZE")
WAN_BYTES_N=$(parse_size "$WAN_BYTES")
WAN_SIZE_BYTES=$(parse_size "$WAN_SIZE")
RESYNC_SIZE_BYTES=$(parse_size "$RESYNC_SIZE")
RESYNC_WRITES_BYTES=$(parse_size "$RESYNC_WRITES")
FIRST_SIZE_BYTES=$(parse_size "$FIRST_SIZE")
ISO_HISTORY_MAX_BYTES=$(parse_size "$ISO_HISTORY_MAX")
((WAN_BYTES_N <= WAN_SIZE_BYTES)) || die "WAN_BYTES ($WAN_BYTES) is larger than WAN_SIZE ($WAN_SIZE)"
((RESYNC_WRITES_BYTES <= RESYNC_SIZE_BYTES)) || die "RESYNC_WRITES is larger than RESYNC_SIZE"
((FIRST_SIZE_BYTES % 65536 == 0)) || die "FIRST_SIZE must be a multiple of 64 KiB"
READY_TIMEOUT=30
EXPORT=vol0

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
need_cmd timeout coreutils
need_cmd nbdinfo libnbd-bin
if want a || want b || want c || want e; then
    need_cmd fio fio
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (fio --enghelp=nbd fails)"
fi
want d && need_cmd nbdcopy libnbd-bin
want f && need_cmd rsync rsync
want f && need_cmd cmp diffutils
want a && need_cmd taskset util-linux
want a && need_cmd findmnt util-linux
if want d; then
    need_cmd ip iproute2
    need_cmd tc iproute2
fi
PY=$(bench_python)
[[ $(id -u) -eq 0 ]] || warn "not root: page cache cannot be dropped, and part d (network namespaces) will fail"

if [[ -n "${TANDEM_BIN:-}" ]]; then
    [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not executable"
    "$TANDEM_BIN" agent --help >/dev/null 2>&1 || die "'$TANDEM_BIN agent --help' fails"
else
    TANDEM_BIN=$(build_tandem "$REPO_ROOT")
fi
"$TANDEM_BIN" status --help >/dev/null 2>&1 || die "'$TANDEM_BIN status --help' fails: no status command"
log "tandem: $TANDEM_BIN"

# ---------------------------------------------------------------------------
# work dir, namespaces and cleanup
# ---------------------------------------------------------------------------
[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-replication.XXXXXX")
# Part a: the replica standing in for another host keeps its data on a
# tmpfs this script mounts (TMPFS_DIR), and the co-located replica's device
# bytes are counted in a blkio cgroup of its own (BLKIO_GROUP); both are
# removed at exit.
TMPFS_DIR=
TMPFS_MOUNTED=0
BLKIO_GROUP=
# Network namespaces of part d (named after this script's PID, so that only
# ours are ever deleted).
NS_A="tndb$$a"
NS_B="tndb$$b"
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
    [[ -z "$BLKIO_GROUP" ]] || blkio_group_remove "$BLKIO_GROUP"
    if ((TMPFS_MOUNTED)); then
        umount "$TMPFS_DIR" 2>/dev/null || umount -l "$TMPFS_DIR" || warn "could not unmount the tmpfs on $TMPFS_DIR"
    fi
    local ns
    for ns in "$NS_A" "$NS_B"; do
        if [[ -e "/run/netns/$ns" ]]; then
            # processes still inside (there should be none) would keep it alive
            ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || warn "could not delete network namespace $ns"
        fi
    done
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

fstype=$(stat -f -c %T "$WORK")
case "$fstype" in
tmpfs | ramfs) warn "$WORK is on $fstype, not a real disk: figures will not mean much (set WORK_BASE)" ;;
esac
need_kib=$((1024 * 1024))
want a && need_kib=$((need_kib + 3 * SIZE_BYTES / 1024))
want f && need_kib=$((need_kib + 3 * FIRST_SIZE_BYTES / 1024))
want e && need_kib=$((need_kib + 3 * RESYNC_WRITES_BYTES / 1024))
# part a's co-located replica keeps history (default retention, history_max
# 10 GiB) on this disk
want a && need_kib=$((need_kib + 10 * 1024 * 1024))
avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
((avail_kib >= need_kib)) ||
    die "not enough free space in $WORK_BASE: need ~$((need_kib / 1024)) MiB, have $((avail_kib / 1024)) MiB"
if want a; then
    [[ $(id -u) -eq 0 ]] || die "part a needs root: it mounts a tmpfs and uses a blkio cgroup"
    # The isolated replica's image, its history (capped at ISO_HISTORY_MAX)
    # and its journal, in memory. 4 KiB pages: a random 4 KiB write into a
    # huge-page tmpfs costs ~3.5x more CPU. (A tmpfs walks every page
    # for SEEK_HOLE; Tandem's images remember the data run it last
    # reported, so a resync no longer asks chunk by chunk.) A resync's
    # undo data can take the history past its cap until the resync ends
    # (up to the volume's size): room for the image, that, the cap, the
    # journal and slack. Memory is used only as files grow.
    need_kib=$(((2 * SIZE_BYTES + ISO_HISTORY_MAX_BYTES) / 1024 + 4 * 1024 * 1024))
    mem_kib=$(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo)
    ((mem_kib >= need_kib + 2 * 1024 * 1024)) ||
        die "not enough memory for part a's tmpfs: need ~$((need_kib / 1024)) MiB + 2 GiB, have $((mem_kib / 1024)) MiB (set ISO_HISTORY_MAX or SIZE lower)"
    TMPFS_DIR=$WORK/tmpfs
    mkdir "$TMPFS_DIR"
    mount -t tmpfs -o "size=${need_kib}k,mode=0700,huge=never" tandem-bench "$TMPFS_DIR" || die "cannot mount a tmpfs on $TMPFS_DIR"
    TMPFS_MOUNTED=1
    if ! blkio_group_new "tandem-bench-replication-$$" "$WORK"; then
        warn "no cgroup-v1 blkio hierarchy (or not root): part a reports no replica device bytes"
    fi
fi

# ---------------------------------------------------------------------------
# sites (inside a part: PDIR, PORT are set by run_part)
# ---------------------------------------------------------------------------
PDIR=
PORT=
declare -A SITE_CFG SITE_DATA SITE_LOG SITE_NS SITE_PID SITE_ROLE
# Set by a part before it creates or starts a site KEY: SITE_DATA_BASE[KEY]
# the parent of its data dir (default $PDIR), SITE_CPUS[KEY] the CPU list it
# is pinned to (taskset -c; default none), SITE_CGROUP[KEY] a cgroup-v1
# directory its agent is moved into once started (default none).
declare -A SITE_DATA_BASE SITE_CPUS SITE_CGROUP
SITES=()

# new_site KEY NETNS KEY=VALUE...: config $PDIR/KEY.toml, data dir
# ${SITE_DATA_BASE[KEY]:-$PDIR}/KEY, log $PDIR/KEY.log (see
# tandem_site_config for the keys).
new_site() {
    local key=$1 ns=$2
    shift 2
    SITE_CFG[$key]=$PDIR/$key.toml
    SITE_DATA[$key]=${SITE_DATA_BASE[$key]:-$PDIR}/$key
    SITE_LOG[$key]=$PDIR/$key.log
    SITE_NS[$key]=$ns
    mkdir -p "${SITE_DATA[$key]}"
    tandem_site_config "${SITE_CFG[$key]}" data="${SITE_DATA[$key]}" "$@"
    SITES+=("$key")
}

# status_cmd KEY: sets STATUS_CMD to the status command of site KEY.
STATUS_CMD=()
status_cmd() {
    STATUS_CMD=()
    [[ -z "${SITE_NS[$1]}" ]] || STATUS_CMD=(ip netns exec "${SITE_NS[$1]}")
    STATUS_CMD+=("$TANDEM_BIN" status --json --local --config "${SITE_CFG[$1]}")
}

status_json() { # status_json KEY -> the status document
    status_cmd "$1"
    timeout 10 "${STATUS_CMD[@]}"
}

# pfail MSG: the part fails: message, agent log tails, exit (the part only).
pfail() {
    local k
    printf '%s\n' "$*" >"$PDIR/error"
    warn "part failed: $*"
    for k in "${SITES[@]+"${SITES[@]}"}"; do
        [[ -s "${SITE_LOG[$k]}" ]] || continue
        warn "last lines of $k's log (${SITE_LOG[$k]}):"
        tail -n 15 "${SITE_LOG[$k]}" >&2 || true
    done
    exit 1
}

start_site() { # start_site KEY: start its agent, wait until its API answers
    local k=$1
    tandem_start_agent "$TANDEM_BIN" "${SITE_CFG[$k]}" "${SITE_LOG[$k]}" "${SITE_NS[$k]}" "${SITE_CPUS[$k]:-}"
    SITE_PID[$k]=$AGENT_PID
    if [[ -n "${SITE_CGROUP[$k]:-}" ]]; then
        echo "$AGENT_PID" >"${SITE_CGROUP[$k]}/cgroup.procs" ||
            pfail "cannot move agent $k into ${SITE_CGROUP[$k]}"
    fi
    status_cmd "$k"
    tandem_wait_api "$READY_TIMEOUT" "$AGENT_PID" "${STATUS_CMD[@]}" ||
        pfail "agent $k did not come up within ${READY_TIMEOUT}s"
}

# Deliberate stops: log warnings from these intervals (a peer going away) are
# reported apart from the others. quiet_begin / quiet_end mark one.
utc_now() { date -u +%Y-%m-%dT%H:%M:%S.%6NZ; }
quiet_begin() { printf 'begin %s\n' "$(utc_now)" >>"$PDIR/quiet"; }
quiet_end() { sleep 1 && printf 'end %s\n' "$(utc_now)" >>"$PDIR/quiet"; }

stop_site() { # stop_site KEY: SIGTERM; a non-clean exit is noted as a problem
    local k=$1
    [[ -n "${SITE_PID[$k]:-}" ]] || return 0
    quiet_begin
    stop_pid "${SITE_PID[$k]}" 30
    quiet_end
    if [[ "$STOP_STATUS" != 0 ]]; then
        warn "agent $k did not exit cleanly on SIGTERM (status $STOP_STATUS); log ${SITE_LOG[$k]}"
        printf '%s: exit status %s on SIGTERM\n' "$k" "$STOP_STATUS" >>"$PDIR/stop-problems"
    fi
    SITE_PID[$k]=
}

nbd_sock() { printf '%s/nbd/%s.sock' "${SITE_DATA[$1]}" "$EXPORT"; }
site_uri() { nbd_uri "$(nbd_sock "$1")" "$EXPORT"; }

wait_nbd() { # wait_nbd KEY
    wait_nbd_ready "${SITE_PID[$1]}" "$(nbd_sock "$1")" "$EXPORT" "$READY_TIMEOUT" "${SITE_LOG[$1]}" ||
        pfail "agent $1 did not serve $EXPORT within ${READY_TIMEOUT}s"
}

# wait_repl PRIMARY_KEY TIMEOUT WHAT: waits until replicated; sets REPL_S to
# the seconds waited.
REPL_S=
wait_repl() {
    local k=$1 to=$2 what=$3 pids="" s
    for s in "${SITES[@]}"; do
        [[ -z "${SITE_PID[$s]:-}" ]] || pids+="${pids:+,}${SITE_PID[$s]}"
    done
    status_cmd "$k"
    REPL_S=$(tandem_wait_replicated "$to" "${pids:--}" "${STATUS_CMD[@]}") ||
        pfail "$what: not replicated within ${to}s (or an agent died)"
}

# pair_sites MODE VOLSIZE [NETNS_A NETNS_B ADDR_A ADDR_B TLSDIR] [KEY=VALUE...]:
# sites "ny" (primary) and "dr" (its replica) on loopback, or in two network
# namespaces; extra KEY=VALUEs go into both configs. Their keys are
# $PAIR_PRIMARY and $PAIR_REPLICA (default ny and dr; the site names stay
# ny and dr).
PAIR_PRIMARY=ny
PAIR_REPLICA=dr
pair_sites() {
    local mode=$1 vsize=$2
    shift 2
    local nsa="" nsb="" ha=127.0.0.1 hb=127.0.0.1 tls=() pa=$PORT pb=$((PORT + 2))
    if [[ "${1:-}" == netns ]]; then
        nsa=$2 nsb=$3 ha=$4 hb=$5 tls=("tls=$6") pb=$PORT
        shift 6
    fi
    PORT=$((PORT + 4))
    local common=(peer="ny@$ha:$pa" peer="dr@$hb:$pb" primary=ny replicas=dr mode="$mode"
        volume="$EXPORT:$vsize" "${tls[@]+"${tls[@]}"}" "$@")
    new_site "$PAIR_PRIMARY" "$nsa" site=ny listen="$ha:$pa" api="127.0.0.1:$((pa + 1))" "${common[@]}"
    new_site "$PAIR_REPLICA" "$nsb" site=dr listen="$hb:$pb" api="127.0.0.1:$((pb + 1))" "${common[@]}"
    SITE_ROLE[$PAIR_REPLICA]=replica
}

# local_site KEY VOLSIZE: the same primary with no replica (replicas = []).
local_site() {
    local key=$1 vsize=$2
    new_site "$key" "" site=ny listen="127.0.0.1:$PORT" api="127.0.0.1:$((PORT + 1))" \
        peer="ny@127.0.0.1:$PORT" peer="dr@127.0.0.1:$((PORT + 2))" primary=ny \
        volume="$EXPORT:$vsize"
    PORT=$((PORT + 4))
}

stop_sites() { # stop every started site, replicas last
    local k
    quiet_begin
    for k in "${SITES[@]+"${SITES[@]}"}"; do [[ "${SITE_ROLE[$k]:-}" == replica ]] || stop_site "$k"; done
    for k in "${SITES[@]+"${SITES[@]}"}"; do [[ "${SITE_ROLE[$k]:-}" != replica ]] || stop_site "$k"; done
    quiet_end
}

# cfg_size BYTES -> a Tandem config size
cfg_size() { size_for_config "$1"; }

# gen_random FILE BYTES: incompressible data (AES-CTR keystream if openssl is
# there, else /dev/urandom).
gen_random() {
    local f=$1 n=$2
    if command -v openssl >/dev/null 2>&1; then
        { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:tandem-bench-$RANDOM$RANDOM" </dev/zero 2>/dev/null || true; } |
            head -c "$n" >"$f"
    else
        head -c "$n" /dev/urandom >"$f"
    fi
    [[ $(stat -c %s "$f") == "$n" ]] || die "could not write $n random bytes to $f"
}

# cmp_blocks A B BLOCK -> number of BLOCK-sized blocks that differ between
# two files of the same size; only the data extents of either file are read
# (SEEK_DATA/SEEK_HOLE), holes read as zeroes.
cmp_blocks() {
    "$PY" - "$@" <<'PYEOF'
import os, sys
a, b, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
size = os.fstat(fa).st_size
if os.fstat(fb).st_size != size:
    sys.exit(f"{a} and {b} differ in size")
def extents(fd):
    out, pos = [], 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d - d % bs, min(size, -(-h // bs) * bs)))
        pos = h
    return out
ranges = sorted(extents(fa) + extents(fb))
merged = []
for s, e in ranges:
    if merged and s <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], e)
    else:
        merged.append([s, e])
diff = 0
step = 1 << 20
for s, e in merged:
    pos = s
    while pos < e:
        n = min(step, e - pos)
        x, y = os.pread(fa, n, pos), os.pread(fb, n, pos)
        if x != y:
            for i in range(0, n, bs):
                if x[i:i + bs] != y[i:i + bs]:
                    diff += 1
        pos += n
print(diff)
PYEOF
}

# cpu_pct TICKS0 TICKS1 T0 T1 -> % of one core used between two samples
CLK_TCK=$(getconf CLK_TCK)
cpu_pct() {
    "$PY" -c 'import sys; a,b,t0,t1,hz=map(float,sys.argv[1:]); print("%.1f" % (100*(b-a)/hz/max(t1-t0,1e-9)))' \
        "$1" "$2" "$3" "$4" "$CLK_TCK"
}

# snapshot KEY LABEL: status of site KEY into $PDIR/status-LABEL.json
snapshot() { status_json "$1" >"$PDIR/status-$2.json" 2>/dev/null || true; }

# ---------------------------------------------------------------------------
# part a: what one async replica costs the primary
# ---------------------------------------------------------------------------
# Two phases on fresh sites each, then the result:
#   isolated (a0, a1, a2, replica CPU per record): fio and the primary
#     pinned to core 0, the replica agent pinned to core 1 with its data
#     dir on tmpfs (another host's CPU and disk, as far as one machine
#     allows); the same jobs on the same primary configuration without a
#     replica (pinned the same way); then the loopback TCP floor;
#   co-located (informational, and the replica's device bytes): the old
#     measurement, nothing pinned, every data dir on WORK_BASE's disk.
A_JOBS=("randwrite-4k-qd16 randwrite 4k 16" "write-1m-qd8 write 1M 8")
A_CPU_PRIMARY=0
A_CPU_REPLICA=1
A_COLOC_DONE=0 # set when the co-located replica did not catch up

now() { date +%s.%N; }

# arec KEY=VALUE...: one JSON line of figures into $PDIR/runs.jsonl (values
# that parse as numbers are numbers)
arec() {
    "$PY" - "$@" >>"$PDIR/runs.jsonl" <<'PYEOF'
import json, sys
d = {}
for a in sys.argv[1:]:
    k, v = a.split("=", 1)
    for conv in (int, float):
        try:
            d[k] = conv(v)
            break
        except ValueError:
            pass
    else:
        d[k] = v
print(json.dumps(d))
PYEOF
}

# a_blkio -> bytes the co-located replica's cgroup wrote to its disk (0
# without the cgroup)
a_blkio() {
    if [[ -n "$BLKIO_GROUP" ]]; then blkio_group_written "$BLKIO_GROUP" "$BLKIO_GROUP_DEV"; else echo 0; fi
}

# a_prefill KEY CPUS: the whole volume of site KEY, sequential 1M QD8
a_prefill() {
    local k=$1 cpus=$2 t0=$SECONDS
    log "a: prefill $k: $SIZE sequential 1M QD8"
    bench_fio_on "$cpus" "$PDIR/prefill-$k.json" --name=prefill --ioengine=nbd --uri="$(site_uri "$k")" \
        --rw=write --bs=1M --iodepth=8 --numjobs=1 --size="$SIZE_BYTES" ||
        pfail "prefill of $k failed"
    log "a: prefill $k: $((SECONDS - t0))s"
}

# a_run PHASE KEY REPLICA_KEY|- JOB RW BS QD: one measured fio run through
# site KEY. iso: fio pinned to core 0, no ramp (every operation fio
# completes is counted, so CPU per write divides the whole window); coloc:
# not pinned, COLOC_RUNTIME s after RAMP s of ramp. The primary's status is sampled
# every 0.5 s while fio runs. With a replica: the run ends once it has
# caught up (CPU is counted until then, the writes' shipping included); in
# the co-located phase the replica is restarted cleanly at the end, so its
# cgroup has the device bytes of everything it wrote.
a_run() {
    local ph=$1 k=$2 r=$3 jname=$4 rw=$5 bs=$6 qd=$7
    local tag="$ph-$k-$jname" out c0 c1 c2 d0=0 d1=0 d2=0 t0 t1 t2 b0=0 b1=0 catch=- cpus="" sampler tsampler
    local -a timing=(--time_based --runtime="$RUNTIME")
    out="$PDIR/$tag.json"
    if [[ $ph == iso ]]; then
        cpus=$A_CPU_PRIMARY
    else
        timing=(--time_based --runtime="$COLOC_RUNTIME" --ramp_time="$RAMP")
    fi
    [[ $r == - ]] || wait_repl "$k" "$WAIT_TIMEOUT" "before $jname"
    drop_caches
    log "a ($ph): $jname on $k ($([[ $r == - ]] && echo 'no replica' || echo "live async replica $r"))"
    snapshot "$k" "$tag-before"
    status_cmd "$k"
    tandem_sample_status 0.5 $((RUNTIME + RAMP + 60)) "$PDIR/$tag.samples.jsonl" "${STATUS_CMD[@]}"
    sampler=$SAMPLER_PID
    thread_sampler "${SITE_PID[$k]}" 0.5 "$PDIR/$tag.threads.jsonl"
    tsampler=$THREAD_SAMPLER_PID
    [[ $r == - ]] || { d0=$(proc_cpu_ticks "${SITE_PID[$r]}") && b0=$(a_blkio); }
    c0=$(proc_cpu_ticks "${SITE_PID[$k]}")
    t0=$(now)
    if [[ -n $A_PERF && $ph == iso ]]; then # a profile of the agent, 5 s from the 3rd second
        (sleep 3 && perf record -F 999 -g -o "$PDIR/$tag.perf.data" -p "${SITE_PID[$k]}" -- sleep 5) >"$PDIR/$tag.perf.log" 2>&1 &
        track_pid $!
        if [[ $r != - ]]; then
            (sleep 3 && perf record -F 999 -g -o "$PDIR/$tag.replica.perf.data" -p "${SITE_PID[$r]}" -- sleep 5) >"$PDIR/$tag.replica.perf.log" 2>&1 &
            track_pid $!
        fi
    fi
    bench_fio_on "$cpus" "$out" --name="$jname" --ioengine=nbd --uri="$(site_uri "$k")" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 "${timing[@]}" \
        --size="$SIZE_BYTES" --norandommap || pfail "$jname on $k failed"
    t1=$(now)
    c1=$(proc_cpu_ticks "${SITE_PID[$k]}")
    [[ $r == - ]] || d1=$(proc_cpu_ticks "${SITE_PID[$r]}")
    stop_pid "$tsampler" 5
    stop_pid "$sampler" 5
    snapshot "$k" "$tag-end"
    c2=$c1 d2=$d1 t2=$t1
    if [[ $r != - ]]; then
        if [[ $ph == coloc ]]; then
            # informational: a replica that does not catch up is a result
            # (the phase's remaining runs are left out), not a failure
            local pids
            pids="${SITE_PID[$k]},${SITE_PID[$r]}"
            status_cmd "$k"
            if catch=$(tandem_wait_replicated "$WAIT_TIMEOUT" "$pids" "${STATUS_CMD[@]}" 2>"$PDIR/$tag.wait.err"); then
                :
            else
                if ! kill -0 "${SITE_PID[$k]}" 2>/dev/null || ! kill -0 "${SITE_PID[$r]}" 2>/dev/null; then
                    pfail "an agent died while the replica caught up after $jname"
                fi
                warn "a (co-located): the replica did not catch up within ${WAIT_TIMEOUT}s after $jname: the phase's other runs are left out"
                catch=timeout
                A_COLOC_DONE=1
            fi
        else
            wait_repl "$k" "$WAIT_TIMEOUT" "catching up after $jname"
            catch=$REPL_S
        fi
        t2=$(now)
        c2=$(proc_cpu_ticks "${SITE_PID[$k]}")
        d2=$(proc_cpu_ticks "${SITE_PID[$r]}")
        snapshot "$k" "$tag-after"
        if [[ $ph == coloc && $catch != timeout ]]; then
            # a clean stop: the replica syncs what it wrote, in its cgroup
            quiet_begin
            stop_site "$r"
            b1=$(a_blkio)
            start_site "$r"
            wait_repl "$k" "$WAIT_TIMEOUT" "replica restarted after $jname"
            quiet_end
        fi
    fi
    arec phase="$ph" site="$k" replica="$r" job="$jname" t0="$t0" t1="$t1" t2="$t2" \
        c0="$c0" c1="$c1" c2="$c2" d0="$d0" d1="$d1" d2="$d2" b0="$b0" b1="$b1" catchup_s="$catch"
    "$PY" - "$PDIR/runs.jsonl" "$out" "$CLK_TCK" <<'PYEOF' >&2
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
t = open(sys.argv[2]).read()
w = json.loads(t[t.index("{"):])["jobs"][0]["write"]
hz = float(sys.argv[3])
us = (r["c2"] - r["c0"]) / hz * 1e6 / w["total_ios"] if w["total_ios"] else 0
msg = f"    {w['iops']:.0f} IOPS, {w['bw'] / 1024:.0f} MiB/s; primary CPU {us:.1f} us per write"
if r["replica"] != "-":
    msg += f"; replica agent CPU {100 * (r['d1'] - r['d0']) / hz / (r['t1'] - r['t0']):.0f}%"
    msg += f"; caught up {r['catchup_s']}s after fio"
print(msg)
PYEOF
}

part_a() {
    local vs j jname rw bs qd k order n batch
    vs=$(cfg_size "$SIZE_BYTES")
    : >"$PDIR/runs.jsonl"
    taskset -c "$A_CPU_REPLICA" true 2>/dev/null ||
        pfail "cannot pin to CPU $A_CPU_REPLICA (taskset -c $A_CPU_REPLICA): part a needs two CPUs"
    cat /proc/loadavg >"$PDIR/loadavg-start"

    # --- isolated: a1, a2 (one set of runs), replica CPU per record -------
    SITE_CPUS[local]=$A_CPU_PRIMARY
    SITE_CPUS[ny]=$A_CPU_PRIMARY
    SITE_CPUS[dr]=$A_CPU_REPLICA
    SITE_DATA_BASE[dr]=$TMPFS_DIR
    local_site local "$vs"
    pair_sites async "$vs" history_max="$(cfg_size "$ISO_HISTORY_MAX_BYTES")" ${A_QUEUE_MEMORY:+queue_memory="$A_QUEUE_MEMORY"}
    start_site local
    start_site dr
    start_site ny
    wait_nbd local
    wait_nbd ny
    wait_repl ny "$WAIT_TIMEOUT" "initial sync"
    log "a (isolated): fio and the primary on CPU $A_CPU_PRIMARY, the replica on CPU $A_CPU_REPLICA with its data on the tmpfs $TMPFS_DIR"
    a_prefill local "$A_CPU_PRIMARY"
    a_prefill ny "$A_CPU_PRIMARY"
    wait_repl ny "$WAIT_TIMEOUT" "catching up after prefill"
    for ((j = 0; j < ${#A_JOBS[@]}; j++)); do
        read -r jname rw bs qd <<<"${A_JOBS[$j]}"
        if ((j % 2 == 0)); then order=(local ny); else order=(ny local); fi
        for k in "${order[@]}"; do
            if [[ $k == ny ]]; then a_run iso ny dr "$jname" "$rw" "$bs" "$qd"; else a_run iso local - "$jname" "$rw" "$bs" "$qd"; fi
        done
    done
    stop_sites
    ((KEEP)) || rm -rf -- "${SITE_DATA[dr]}" # frees its memory

    # --- a0: the loopback floor, as many messages as fio wrote -----------
    for ((j = 0; j < ${#A_JOBS[@]}; j++)); do
        read -r jname rw bs qd <<<"${A_JOBS[$j]}"
        n=$("$PY" -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["total_ios"])' \
            "$PDIR/iso-ny-$jname.json") || pfail "cannot read $PDIR/iso-ny-$jname.json"
        log "a0: loopback TCP floor for $jname: $n messages of $bs, writer on CPU $A_CPU_PRIMARY, reader on CPU $A_CPU_REPLICA (3 times)"
        for _ in 1 2 3; do
            loopback_floor "$n" "$(parse_size "$bs")" "$A_CPU_PRIMARY" "$A_CPU_REPLICA" >>"$PDIR/floor-$jname.jsonl" ||
                pfail "the loopback floor for $jname failed"
        done
        # the best a sender can do: the messages gathered into sends of
        # the link writer's piece (256 KiB), as Tandem's link writer sends
        batch=$(((256 << 10) / $(parse_size "$bs")))
        ((batch >= 1)) || batch=1
        log "a0: the same, $batch messages per send (3 times)"
        for _ in 1 2 3; do
            loopback_floor "$n" "$(parse_size "$bs")" "$A_CPU_PRIMARY" "$A_CPU_REPLICA" "$batch" >>"$PDIR/floor-batched-$jname.jsonl" ||
                pfail "the batched loopback floor for $jname failed"
        done
    done
    a_result
    if ((!A_COLOC)); then
        log "a: co-located runs left out (A_COLOC=0)"
        return 0
    fi

    # --- co-located (informational) and the replica's device bytes --------
    SITE_CGROUP[cl-dr]=$BLKIO_GROUP
    local_site cl-local "$vs"
    PAIR_PRIMARY=cl-ny PAIR_REPLICA=cl-dr
    pair_sites async "$vs"
    start_site cl-local
    start_site cl-dr
    start_site cl-ny
    wait_nbd cl-local
    wait_nbd cl-ny
    wait_repl cl-ny "$WAIT_TIMEOUT" "initial sync"
    log "a (co-located, informational): nothing pinned, every data dir on $WORK_BASE"
    a_prefill cl-local ""
    a_prefill cl-ny ""
    wait_repl cl-ny "$WAIT_TIMEOUT" "catching up after prefill"
    # a clean restart: the prefill's writes are synced now, outside the windows
    quiet_begin
    stop_site cl-dr
    start_site cl-dr
    wait_repl cl-ny "$WAIT_TIMEOUT" "replica restarted after the prefill"
    quiet_end
    for ((j = 0; j < ${#A_JOBS[@]}; j++)); do
        read -r jname rw bs qd <<<"${A_JOBS[$j]}"
        if ((j % 2 == 0)); then order=(cl-local cl-ny); else order=(cl-ny cl-local); fi
        for k in "${order[@]}"; do
            ((!A_COLOC_DONE)) || break 2
            if [[ $k == cl-ny ]]; then a_run coloc cl-ny cl-dr "$jname" "$rw" "$bs" "$qd"; else a_run coloc cl-local - "$jname" "$rw" "$bs" "$qd"; fi
        done
    done
    stop_sites
    cat /proc/loadavg >"$PDIR/loadavg-end"
    a_result
}

# a_result: $PDIR/result.json from what part a has measured so far (written
# after the isolated phase too, so that a failure in the co-located phase
# does not lose it).
a_result() {
    "$PY" - "$PDIR" "$CLK_TCK" "$BLKIO_GROUP" "$ISO_HISTORY_MAX" "$WAIT_TIMEOUT" >"$PDIR/result.json.new" <<'PYEOF'
import json, os, sys
pdir, hz, blkio, iso_hmax, wait_timeout = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
M = 2 ** 20
JOBS = [("randwrite-4k-qd16", "4k randwrite QD16", 1.3), ("write-1m-qd8", "1M seq write QD8", 1.2)]

def load(name):
    try:
        with open(os.path.join(pdir, name)) as f:
            t = f.read()
        return json.loads(t[t.index("{"):])
    except (OSError, ValueError):
        return None

def rep(doc):
    try:
        return doc["groups"][0]["replicas"][0]
    except (TypeError, KeyError, IndexError):
        return None

def grp(doc):
    try:
        return doc["groups"][0]
    except (TypeError, KeyError, IndexError):
        return None

runs = {}
for l in open(os.path.join(pdir, "runs.jsonl")):
    r = json.loads(l)
    tag = f"{r['phase']}-{r['site']}-{r['job']}"
    fj = load(tag + ".json")["jobs"][0]
    w = fj["write"]
    ops = w["total_ios"]
    d = {"iops": w["iops"], "bw_mib_s": w["bw"] / 1024, "ops": ops, "fio_bytes": w["io_bytes"],
         "fio_cpu_pct": fj.get("usr_cpu", 0) + fj.get("sys_cpu", 0),
         "clat_p50_us": w.get("clat_ns", {}).get("percentile", {}).get("50.000000", 0) / 1e3,
         "clat_p99_us": w.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1e3,
         "fio_s": r["t1"] - r["t0"], "window_s": r["t2"] - r["t0"],
         "primary_cpu_s": (r["c2"] - r["c0"]) / hz, "primary_cpu_s_fio_only": (r["c1"] - r["c0"]) / hz,
         "primary_cpu_pct_fio": 100 * (r["c1"] - r["c0"]) / hz / (r["t1"] - r["t0"])}
    # CPU per write: fio's operations over the whole window (iso: no ramp,
    # every completed write is counted; coloc: ramp writes are not, as before)
    d["primary_cpu_us_per_write"] = d["primary_cpu_s"] * 1e6 / ops if ops else None
    d["primary_cpu_us_per_write_fio_only"] = d["primary_cpu_s_fio_only"] * 1e6 / ops if ops else None
    # by thread: the first and last samples taken while fio ran (threads
    # that end with fio's connection are in the last one)
    try:
        ts = [json.loads(l) for l in open(os.path.join(pdir, tag + ".threads.jsonl"))]
    except (OSError, ValueError):
        ts = []
    ts = [x for x in ts if r["t0"] <= x["t"] <= r["t1"]]
    if len(ts) >= 2:
        a, b = ts[0]["ticks"], ts[-1]["ticks"]
        by = {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0) > 0}
        tot = sum(by.values())
        d["primary_cpu_share_by_thread"] = {"seconds": ts[-1]["t"] - ts[0]["t"], "shares": dict(sorted(
            ((k, round(v / tot, 3)) for k, v in by.items()), key=lambda kv: -kv[1]))} if tot else None
    if r["replica"] != "-":
        before, end, after = (load(f"status-{tag}-{x}.json") for x in ("before", "end", "after"))
        states, resyncing, errs, n = {}, 0, 0, 0
        try:
            samples = open(os.path.join(pdir, tag + ".samples.jsonl")).read().splitlines()
        except OSError:
            samples = []
        for line in samples:
            s = json.loads(line)
            if not (r["t0"] <= s["t"] <= r["t1"]):
                continue
            if "doc" not in s:
                errs += 1
                continue
            x = rep(s["doc"]) or {}
            n += 1
            st = x.get("state", "none")
            states[st] = states.get(st, 0) + 1
            resyncing += 1 if x.get("resyncing") else 0
        streamed = n > 0 and set(states) == {"streaming"} and resyncing == 0
        re_, ge = rep(end) or {}, grp(end) or {}
        records = (grp(after) or {}).get("next_seq", 0) - (grp(before) or {}).get("next_seq", 0)
        applied_fio = (re_.get("applied_seq") or 0) - ((rep(before) or {}).get("applied_seq") or 0)
        raw = (rep(after) or {}).get("raw_bytes", 0) - (rep(before) or {}).get("raw_bytes", 0)
        d.update({"catchup_s": r["catchup_s"], "samples": n, "sample_errors": errs, "states": states,
                  "samples_resyncing": resyncing, "streamed_throughout": streamed,
                  "at_fio_end": {"lag_bytes": re_.get("lag_bytes"), "lag_seconds": re_.get("lag_seconds"),
                                 "state": re_.get("state"), "resyncing": re_.get("resyncing"),
                                 "queued_bytes": ge.get("queued_bytes")},
                  "records": records, "replicated_raw_bytes": raw,
                  "replica_cpu_s": (r["d2"] - r["d0"]) / hz,
                  "replica_cpu_pct_fio": 100 * (r["d1"] - r["d0"]) / hz / (r["t1"] - r["t0"]),
                  "replica_cpu_us_per_record": (r["d2"] - r["d0"]) / hz * 1e6 / records if records > 0 else None,
                  "records_applied_while_fio_ran": applied_fio,
                  "replica_cpu_us_per_record_fio_only": (r["d1"] - r["d0"]) / hz * 1e6 / applied_fio if applied_fio > 0 else None})
        if r["phase"] == "coloc" and blkio and r["catchup_s"] != "timeout":
            dev = r["b1"] - r["b0"]
            d.update({"replica_device_bytes": dev,
                      "replica_device_bytes_per_replicated_byte": dev / raw if raw > 0 else None})
    runs.setdefault(r["phase"], {}).setdefault(r["job"], {})["replica" if r["replica"] != "-" else "none"] = d

def load_floor(name):
    """The median of three floor runs (by the floor's own figure)."""
    try:
        fs = [json.loads(l) for l in open(os.path.join(pdir, name))]
    except (OSError, ValueError):
        fs = []
    for f in fs:
        f["floor_s"] = f["writer_stime_s"] + (f["ksoftirqd_s"] or 0)
    fs.sort(key=lambda f: f["floor_s"])
    if not fs:
        return None
    f = fs[len(fs) // 2]
    f["floor_us_per_write_all_runs"] = [round(x["floor_s"] * 1e6 / x["count"], 2) for x in fs]
    f["floor_us_per_write"] = f["floor_s"] * 1e6 / f["count"]
    f["cpu_busy_us_per_write"] = f["cpu_busy_s"] * 1e6 / f["count"]
    f["writer_utime_us_per_write"] = f["writer_utime_s"] * 1e6 / f["count"]
    return f

floor = {j: load_floor(f"floor-{j}.jsonl") for j, _, _ in JOBS}
floor_batched = {j: load_floor(f"floor-batched-{j}.jsonl") for j, _, _ in JOBS}

def lag_note(x):
    e = x["at_fio_end"]
    s = ("streaming throughout" if x["streamed_throughout"] else
         "DID NOT KEEP UP (states " + ", ".join(f"{k} x{v}" for k, v in sorted(x["states"].items()))
         + (f", resyncing in {x['samples_resyncing']} samples" if x["samples_resyncing"] else "") + ")")
    s += f" ({x['samples']} samples)"
    if e.get("lag_bytes") is not None:
        s += f"; at fio end lag {e['lag_bytes'] / M:.1f} MiB, {e['lag_seconds']:.2f} s, state {e['state']}"
    if x["catchup_s"] == "timeout":
        s += f"; NOT caught up within {wait_timeout} s after fio (the co-located phase stopped there)"
    else:
        s += f"; caught up {x['catchup_s']} s after fio"
    return s

def by_thread(x, label):
    b = x.get("primary_cpu_share_by_thread")
    if not b:
        return f"no thread samples ({label})"
    return (f"primary CPU by thread, {label}: "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(b["shares"].items())[:6] if v >= 0.01))

rows = []
iso = runs.get("iso", {})
for job, label, target in JOBS:
    r = iso.get(job, {})
    w, n, f = r.get("replica"), r.get("none"), floor.get(job)
    if not (w and n):
        continue
    extra = w["primary_cpu_us_per_write"] - n["primary_cpu_us_per_write"]
    def floor_row(what, fl, digits, note):
        """A row of Tandem's extra CPU per write against a floor `fl`."""
        per = fl["floor_us_per_write"]
        return {"what": f"{what}, {label}",
                "tandem": f"+{extra:.1f} us/write (Tandem's extra)", "peer": f"{per:.{digits}f} us/write (floor)",
                "ratio": extra / per if per > 0 else None,
                "ratio_text": f"{extra / per:.1f}x floor" if per > 0 else "-",
                "target": "report", "ok": None,
                "note": f"median of {len(fl['floor_us_per_write_all_runs'])} runs "
                        f"({', '.join(str(x) for x in fl['floor_us_per_write_all_runs'])} us/write); " + note}
    if f:
        rows.append(floor_row(
            "a0: floor, loopback TCP send of the same writes", f, 1,
            f"{f['count']} messages of {f['msg_bytes']} B on CPU {f['send_cpu']} -> CPU {f['recv_cpu']}: writer "
            f"stime {f['writer_stime_s']:.2f} s (+ ksoftirqd {f['ksoftirqd_s'] or 0:.2f} s), of which softirq on "
            f"CPU {f['send_cpu']} {f['cpu_softirq_s']:.2f} s; CPU {f['send_cpu']} busy "
            f"{f['cpu_busy_us_per_write']:.1f} us/write (Python {f['writer_utime_us_per_write']:.1f} us and "
            f"anything else on it included)"))
    fb = floor_batched.get(job)
    if fb and n["primary_cpu_us_per_write"]:
        best = (n["primary_cpu_us_per_write"] + fb["floor_us_per_write"]) / n["primary_cpu_us_per_write"]
        rows.append(floor_row(
            f"a0: floor, {fb['batch']} writes per send ({fb['batch'] * fb['msg_bytes'] >> 10} KiB)", fb, 2,
            f"a primary whose only extra cost were these sends would be at a1 = {best:.2f}x (target <= {target}x)"))
        fb["best_a1"] = best
    ratio = w["primary_cpu_us_per_write"] / n["primary_cpu_us_per_write"] if n["primary_cpu_us_per_write"] else None
    ok = ratio is not None and ratio <= target and w["streamed_throughout"]
    rows.append({"what": f"a1: primary CPU per write, {label}",
                 "tandem": f"{w['primary_cpu_us_per_write']:.1f} us (1 replica)",
                 "peer": f"{n['primary_cpu_us_per_write']:.1f} us (no replica)",
                 "ratio": ratio, "ratio_text": "-" if ratio is None else f"{ratio:.2f}x",
                 "target": f"<= {target}x", "ok": ok,
                 "note": f"fio window only: {w['primary_cpu_us_per_write_fio_only']:.1f} vs "
                         f"{n['primary_cpu_us_per_write_fio_only']:.1f} us; replica: " + lag_note(w)
                         + "; " + by_thread(w, "1 replica") + "; " + by_thread(n, "no replica")})
def throughput_row(what, job, w, n, target, ok, note):
    """A row of fio's rate with one replica (w) against none (n)."""
    def speed(x):
        return f"{x['iops'] / 1000:.1f}k IOPS" if job.startswith("randwrite") else f"{x['bw_mib_s']:.0f} MiB/s"
    ratio = w["iops"] / n["iops"] if n["iops"] else None
    return {"what": what, "tandem": speed(w) + " (1 replica)", "peer": speed(n) + " (no replica)",
            "ratio": ratio, "ratio_text": "-" if ratio is None else f"{ratio:.2f}x", "target": target,
            "ok": ok(ratio), "note": note}
for job, label, _ in JOBS:
    r = iso.get(job, {})
    w, n = r.get("replica"), r.get("none")
    if not (w and n):
        continue
    rows.append(throughput_row(
        f"a2: throughput, replica off core 0, {label}", job, w, n, ">= 0.9x",
        lambda ratio: ratio is not None and ratio >= 0.9 and w["streamed_throughout"],
        f"replica: {lag_note(w)}; p99 {w['clat_p99_us']:.0f} vs {n['clat_p99_us']:.0f} us"))
for job, label, _ in JOBS:
    w = iso.get(job, {}).get("replica")
    if w and w.get("replica_cpu_us_per_record") is not None:
        rows.append({"what": f"a: replica CPU per record (tmpfs, CPU 1), {label}",
                     "tandem": f"{w['replica_cpu_us_per_record']:.1f} us/record", "peer": "-", "ratio": None,
                     "ratio_text": "-", "target": "report", "ok": None,
                     "note": f"{w['records']} records ({w['replicated_raw_bytes'] / M:.0f} MiB) applied, replica agent "
                             f"{w['replica_cpu_s']:.1f} s CPU from fio start until caught up ({w['replica_cpu_pct_fio']:.0f}% "
                             f"of a core while fio ran)"
                             + ("" if w["streamed_throughout"] else "; the replica fell behind: a resync is included")
                             + (f"; while fio ran: {w['records_applied_while_fio_ran']} records applied, "
                                f"{w['replica_cpu_us_per_record_fio_only']:.1f} us/record"
                                if w["streamed_throughout"] and w.get("replica_cpu_us_per_record_fio_only") is not None else "")
                             + f"; history on, capped at {iso_hmax}"})
co = runs.get("coloc", {})
for job, label, _ in JOBS:
    w = co.get(job, {}).get("replica")
    if not w:
        continue
    dv = w.get("replica_device_bytes_per_replicated_byte")
    rows.append({"what": f"a: replica device bytes per replicated byte (co-located, disk), {label}",
                 "tandem": "-" if dv is None else f"{dv:.2f}", "peer": "-", "ratio": None, "ratio_text": "-",
                 "target": "report", "ok": None,
                 "note": ("the replica did not catch up: not measured" if w["catchup_s"] == "timeout" else
                          "no blkio cgroup: not measured" if dv is None else
                          f"{w['replica_device_bytes'] / M:.0f} MiB to the disk for {w['replicated_raw_bytes'] / M:.0f} MiB "
                          f"replicated (fio {w['fio_bytes'] / M:.0f} MiB after ramp); replica CPU "
                          f"{w['replica_cpu_us_per_record']:.1f} us/record on disk, default history"
                          + ("" if w["streamed_throughout"] else "; the replica fell behind: a resync is included"))})
for job, label, _ in JOBS:
    r = co.get(job, {})
    w, n = r.get("replica"), r.get("none")
    if not (w and n):
        continue
    rows.append(throughput_row(
        f"a: co-located (informational), {label}", job, w, n, "informational", lambda ratio: None,
        f"fio, primary and replica share both CPUs and the disk; CPU (% of a core while fio ran): "
        f"primary {w['primary_cpu_pct_fio']:.0f}% + replica {w['replica_cpu_pct_fio']:.0f}% + fio "
        f"{w['fio_cpu_pct']:.0f}%, vs primary {n['primary_cpu_pct_fio']:.0f}% + fio {n['fio_cpu_pct']:.0f}%; "
        f"primary CPU per write {w['primary_cpu_us_per_write']:.1f} vs {n['primary_cpu_us_per_write']:.1f} us; "
        f"replica: {lag_note(w)}"))
la = lambda name: (open(os.path.join(pdir, name)).read().split()[:3] if os.path.exists(os.path.join(pdir, name)) else None)
json.dump({"part": "a", "rows": rows, "details": {
    "isolated": {"cpus": {"fio": 0, "primary": 0, "replica": 1}, "replica_data": "tmpfs",
                 "replica_history_max": iso_hmax, "runs": iso},
    "floor": floor, "floor_batched": floor_batched, "colocated": {"runs": co, "blkio_cgroup": bool(blkio)},
    "loadavg_start": la("loadavg-start"), "loadavg_end": la("loadavg-end")}}, sys.stdout, indent=1)
PYEOF
    mv "$PDIR/result.json.new" "$PDIR/result.json"
}

# ---------------------------------------------------------------------------
# part b: async lag under sustained writes
# ---------------------------------------------------------------------------
part_b() {
    local vs out t0 t1 catch
    vs=$(cfg_size "$SIZE_BYTES")
    pair_sites async "$vs"
    start_site dr
    start_site ny
    wait_nbd ny
    wait_repl ny "$WAIT_TIMEOUT" "initial sync"
    status_cmd ny
    tandem_sample_status 0.1 $((LAG_RUNTIME + 60)) "$PDIR/samples.jsonl" "${STATUS_CMD[@]}"
    local sampler=$SAMPLER_PID
    sleep 1
    log "b: ${LAG_RUNTIME}s of random writes at $LAG_RATE/s (4k-64k), lag sampled every 100 ms"
    out="$PDIR/fio.json"
    t0=$(date +%s.%N)
    bench_fio "$out" --name=lag --ioengine=nbd --uri="$(site_uri ny)" \
        --rw=randwrite --bssplit=4k/20:8k/20:16k/20:32k/20:64k/20 --blockalign=4k \
        --rate="$LAG_RATE" --iodepth=8 --numjobs=1 --time_based --runtime="$LAG_RUNTIME" \
        --size="$SIZE_BYTES" --norandommap || pfail "fio failed"
    t1=$(date +%s.%N)
    wait_repl ny "$WAIT_TIMEOUT" "draining after the writes"
    catch=$REPL_S
    stop_pid "$sampler" 5
    stop_sites
    "$PY" - "$PDIR/samples.jsonl" "$t0" "$t1" "$out" "$catch" "$LAG_RATE" >"$PDIR/result.json" <<'PYEOF'
import json, sys
samples, t0, t1, fio_out, catch, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6]
lag_s, lag_b, errs, dts, states = [], [], 0, [], {}
for line in open(samples):
    s = json.loads(line)
    if not (t0 <= s["t"] <= t1):
        continue
    if "doc" not in s:
        errs += 1
        continue
    dts.append(s["dt"])
    r = s["doc"]["groups"][0]["replicas"][0]
    lag_s.append(float(r.get("lag_seconds", 0.0)))
    lag_b.append(int(r.get("lag_bytes", 0)))
    states[r.get("state")] = states.get(r.get("state"), 0) + 1
def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))]
text = open(fio_out).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p50, p99, mx = pct(lag_s, 50), pct(lag_s, 99), max(lag_s) if lag_s else None
det = {"samples": len(lag_s), "sample_errors": errs,
       "sample_call_ms_mean": 1000 * sum(dts) / len(dts) if dts else None,
       "lag_seconds": {"p50": p50, "p99": p99, "max": mx},
       "lag_bytes": {"p50": pct(lag_b, 50), "p99": pct(lag_b, 99), "max": max(lag_b) if lag_b else None},
       "replica_states": states, "fio_write_mib_s": j["bw"] / 1024, "fio_iops": j["iops"],
       "fio_rate": rate, "drain_after_writes_s": catch}
ok = p99 is not None and p99 <= 1.0 and errs == 0
row = {"what": f"b: async lag @ {rate}/s 4k-64k randwrite",
       "tandem": "-" if p99 is None else f"p99 {p99:.3f}s (p50 {p50:.3f}, max {mx:.3f})",
       "peer": "-", "ratio": None, "ratio_text": "-", "target": "p99 <= 1 s", "ok": ok,
       "note": f"{len(lag_s)} samples, fio {j['bw']/1024:.1f} MiB/s, lag_bytes p99 {det['lag_bytes']['p99']}"
               + (f", {errs} failed status calls" if errs else "")}
json.dump({"part": "b", "rows": [row], "details": det}, sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# part c: sync mode latency
# ---------------------------------------------------------------------------
part_c() {
    local vs k out echo_us
    vs=$(cfg_size "$SIZE_BYTES")
    local_site local "$vs"
    pair_sites sync "$vs" sync_replicas=1
    start_site local
    start_site dr
    start_site ny
    wait_nbd local
    wait_nbd ny
    wait_repl ny "$WAIT_TIMEOUT" "initial sync"
    sleep 2.5 # idle links ping every second: lets rtt_ms be measured
    snapshot ny before
    echo_us=$("$PY" - <<'PYEOF'
# loopback TCP round trip (16 bytes, TCP_NODELAY), median of 2000, in us
import socket, threading, time, statistics
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d:
            return
        c.sendall(d)
threading.Thread(target=echo, daemon=True).start()
s = socket.create_connection(srv.getsockname()); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
xs = []
for i in range(2200):
    t = time.perf_counter(); s.sendall(b"x" * 16); n = 0
    while n < 16:
        n += len(s.recv(64))
    if i >= 200:
        xs.append((time.perf_counter() - t) * 1e6)
print("%.1f" % statistics.median(xs))
PYEOF
)
    for k in local ny; do
        drop_caches
        log "c: 4k randwrite QD1 on $([[ $k == ny ]] && echo 'tandem sync mode (1 replica)' || echo 'tandem, no replica')"
        out="$PDIR/$k.json"
        bench_fio "$out" --name=lat --ioengine=nbd --uri="$(site_uri "$k")" \
            --rw=randwrite --bs=4k --iodepth=1 --numjobs=1 --time_based \
            --runtime="$LAT_RUNTIME" --ramp_time="$RAMP" --size="$SIZE_BYTES" --norandommap ||
            pfail "fio on $k failed"
        fio_summary "$out" >"$PDIR/$k.summary" || pfail "cannot read $out"
        read -r iops _ p50 p99 _ <"$PDIR/$k.summary"
        log "    $iops IOPS, p50 ${p50} us, p99 ${p99} us"
    done
    snapshot ny after-write
    sleep 2.5
    snapshot ny after
    stop_sites
    "$PY" - "$PDIR" "$echo_us" >"$PDIR/result.json" <<'PYEOF'
import json, sys, os
pdir, echo_us = sys.argv[1], float(sys.argv[2])
def summ(k):
    iops, bw, p50, p99, mean, _ = map(float, open(os.path.join(pdir, k + ".summary")).read().split())
    return {"iops": iops, "clat_p50_us": p50, "clat_p99_us": p99, "clat_mean_us": mean}
loc, syn = summ("local"), summ("ny")
rtts = {}
sync_state = {}
for lab in ("before", "after-write", "after"):
    try:
        g = json.load(open(os.path.join(pdir, f"status-{lab}.json")))["groups"][0]
        r = g["replicas"][0]
        if r.get("rtt_ms") is not None:
            rtts[lab] = float(r["rtt_ms"]) * 1000
        sync_state[lab] = {"mode": g.get("mode"), "sync_degraded": g.get("sync_degraded"), "state": r.get("state")}
    except (OSError, ValueError, KeyError, IndexError):
        pass
tandem_rtt = min(rtts.values()) if rtts else None
# the stricter (smaller) of Tandem's own RTT and a loopback TCP echo
rtt = min(x for x in (tandem_rtt, echo_us) if x is not None)
limit = loc["clat_p50_us"] + rtt + 200
ok = syn["clat_p50_us"] <= limit
row = {"what": "c: sync mode 4k write QD1, p50", "tandem": f"{syn['clat_p50_us']:.0f} us (sync)",
       "peer": f"{loc['clat_p50_us']:.0f} us (no replica), RTT {rtt:.0f} us",
       "ratio": syn["clat_p50_us"] - loc["clat_p50_us"],
       "ratio_text": f"+{syn['clat_p50_us'] - loc['clat_p50_us']:.0f} us",
       "target": f"<= local+RTT+200us = {limit:.0f} us", "ok": ok,
       "note": f"p99 sync {syn['clat_p99_us']:.0f} us vs {loc['clat_p99_us']:.0f} us; "
               f"{syn['iops']:.0f} vs {loc['iops']:.0f} IOPS; RTT: TCP echo {echo_us:.0f} us, "
               + ("no rtt_ms in status" if tandem_rtt is None else
                  f"Tandem rtt_ms {tandem_rtt:.0f} us (with it the limit would be "
                  f"{loc['clat_p50_us'] + tandem_rtt + 200:.0f} us: "
                  f"{'ok' if syn['clat_p50_us'] <= loc['clat_p50_us'] + tandem_rtt + 200 else 'BELOW'})")}
json.dump({"part": "c", "rows": [row], "details": {"local": loc, "sync": syn, "rtt_tandem_us": rtts,
           "rtt_tcp_echo_us": echo_us, "rtt_used_us": rtt, "limit_us": limit, "group": sync_state}},
          sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# part d: goodput over a shaped link between two network namespaces
# ---------------------------------------------------------------------------
part_d() {
    local va="tndbv$$a" vb="tndbv$$b" vs data out t0 t1 catch
    [[ $(id -u) -eq 0 ]] || pfail "network namespaces need root"
    ip netns add "$NS_A" || pfail "cannot create network namespace $NS_A (ip netns add)"
    ip netns add "$NS_B" || pfail "cannot create network namespace $NS_B"
    ip link add "$va" netns "$NS_A" type veth peer name "$vb" netns "$NS_B" ||
        pfail "cannot create a veth pair between $NS_A and $NS_B"
    ip -n "$NS_A" addr add 10.77.0.1/24 dev "$va"
    ip -n "$NS_B" addr add 10.77.0.2/24 dev "$vb"
    ip -n "$NS_A" link set lo up
    ip -n "$NS_B" link set lo up
    ip -n "$NS_A" link set "$va" up
    ip -n "$NS_B" link set "$vb" up
    ip netns exec "$NS_A" tc qdisc add dev "$va" root tbf rate "$WAN_RATE" burst 32kbit latency 50ms ||
        pfail "cannot shape $va with tc tbf"
    # connectivity check: a TCP connection from A to B (there may be no ping)
    ip netns exec "$NS_B" timeout 10 "$PY" -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.2", int(sys.argv[1]))); s.listen(1); c, _ = s.accept(); c.sendall(b"ok")' "$PORT" &
    local lpid=$!
    track_pid "$lpid"
    local ok=0 try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if ip netns exec "$NS_A" "$PY" -c '
import socket, sys
c = socket.create_connection(("10.77.0.2", int(sys.argv[1])), timeout=2)
sys.exit(0 if c.recv(2) == b"ok" else 1)' "$PORT" 2>/dev/null; then
            ok=1
            break
        fi
        sleep 0.3
    done
    stop_pid "$lpid" 2
    ((ok)) || pfail "no TCP connectivity 10.77.0.1 -> 10.77.0.2 across the veth pair (tried $try times)"
    ip netns exec "$NS_A" tc qdisc show dev "$va" >"$PDIR/tc.txt"
    # TLS must be on: 10.77.0.x is not loopback
    "$TANDEM_BIN" certs create --out "$PDIR/tls" ny dr >"$PDIR/certs.log" 2>&1 ||
        pfail "tandem certs create failed: $(tail -n 3 "$PDIR/certs.log")"
    vs=$(cfg_size "$WAN_SIZE_BYTES")
    local extra=()
    [[ -z "$WAN_QUEUE_MEMORY" ]] || extra=(queue_memory="$WAN_QUEUE_MEMORY")
    pair_sites async "$vs" netns "$NS_A" "$NS_B" 10.77.0.1 10.77.0.2 "$PDIR/tls" "${extra[@]+"${extra[@]}"}"
    data="$PDIR/random.bin"
    log "d: $WAN_BYTES of random data"
    gen_random "$data" "$WAN_BYTES_N"
    start_site dr
    start_site ny
    wait_nbd ny
    wait_repl ny "$WAIT_TIMEOUT" "initial sync over the shaped link"
    log "d: initial comparison of the new $WAN_SIZE volume over the link: ${REPL_S}s"
    snapshot ny before
    status_cmd ny
    local max_s=$((WAN_BYTES_N * 8 * 4 / (${WAN_RATE%mbit} * 1000000) + 120))
    tandem_sample_status 0.2 "$max_s" "$PDIR/samples.jsonl" "${STATUS_CMD[@]}"
    local sampler=$SAMPLER_PID
    sleep 0.5
    log "d: nbdcopy $WAN_BYTES -> primary (ns $NS_A), replica in ns $NS_B behind $WAN_RATE tbf"
    t0=$(date +%s.%N)
    timeout "$max_s" nbdcopy --flush "$data" "$(site_uri ny)" || pfail "nbdcopy failed"
    t1=$(date +%s.%N)
    wait_repl ny "$max_s" "replicating $WAN_BYTES over the link"
    catch=$REPL_S
    snapshot ny after
    stop_pid "$sampler" 5
    ip netns exec "$NS_A" tc -s qdisc show dev "$va" >"$PDIR/tc-stats.txt" 2>&1 || true
    stop_sites
    "$PY" - "$PDIR" "$t0" "$t1" "$catch" "$WAN_BYTES_N" "${WAN_RATE%mbit}" >"$PDIR/result.json" <<'PYEOF'
import json, sys, os
pdir, t0, t1, catch, nbytes, rate_mbit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def rep(doc):
    return doc["groups"][0]["replicas"][0]
before = rep(json.load(open(os.path.join(pdir, "status-before.json"))))
after = rep(json.load(open(os.path.join(pdir, "status-after.json"))))
t_done = t1 + catch                      # replicated (durable on the replica)
elapsed = t_done - t0                    # from the first write to replicated
goodput = nbytes * 8 / elapsed / 1e6
wire = after["wire_bytes"] - before["wire_bytes"]
# progress curve: bytes on the wire (resync chunks are counted in wire_bytes
# only once a resync ends, so add the running resync's sent_bytes)
pts = []
for line in open(os.path.join(pdir, "samples.jsonl")):
    s = json.loads(line)
    if "doc" not in s:
        continue
    r = rep(s["doc"])
    p = r["wire_bytes"] - before["wire_bytes"]
    if r.get("resyncing") and r.get("resync"):
        p += r["resync"].get("sent_bytes", 0)
    pts.append((s["t"], p, r.get("state"), r.get("lag_bytes")))
steady = None
if pts and wire > 0:
    lo = next((t for t, p, *_ in pts if p >= 0.1 * wire), None)
    hi = next((t for t, p, *_ in pts if p >= 0.9 * wire), None)
    if lo is not None and hi is not None and hi > lo:
        steady = 0.8 * wire * 8 / (hi - lo) / 1e6
states = sorted({p[2] for p in pts if t0 <= p[0] <= t_done})
pct = 100.0 * goodput / rate_mbit
row = {"what": f"d: goodput over {rate_mbit} Mbit/s tbf, random data",
       "tandem": f"{goodput:.1f} Mbit/s", "peer": f"{rate_mbit} Mbit/s link",
       "ratio": pct / 100, "ratio_text": f"{pct:.0f}%", "target": ">= 90%", "ok": pct >= 90,
       "note": f"{nbytes/2**20:.0f} MiB replicated in {elapsed:.1f}s (write took {t1-t0:.1f}s); "
               f"wire {wire/2**20:.0f} MiB ({wire/nbytes:.3f}x payload)"
               + (f"; steady wire rate {steady:.1f} Mbit/s" if steady else "")}
json.dump({"part": "d", "rows": [row], "details": {
    "payload_bytes": nbytes, "elapsed_s": elapsed, "write_s": t1 - t0, "drain_after_write_s": catch,
    "goodput_mbit_s": goodput, "wire_bytes": wire, "steady_wire_mbit_s": steady,
    "replica_states_seen": states, "link_rate_mbit": rate_mbit}}, sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# part e: resync after writes while the replica was down
# ---------------------------------------------------------------------------
part_e() {
    local vs out changed wire0 wire1 t0 t1 left
    vs=$(cfg_size "$RESYNC_SIZE_BYTES")
    pair_sites async "$vs"
    start_site dr
    start_site ny
    wait_nbd ny
    wait_repl ny "$WAIT_TIMEOUT" "initial sync"
    log "e: initial comparison of the new $RESYNC_SIZE volume: ${REPL_S}s"
    echo "initial_sync_s $REPL_S" >"$PDIR/extra.txt"
    quiet_begin
    stop_site dr
    log "e: replica stopped; $RESYNC_WRITES of 4k random writes (each block at most once)"
    out="$PDIR/fio.json"
    bench_fio "$out" --name=offline --ioengine=nbd --uri="$(site_uri ny)" \
        --rw=randwrite --bs=4k --iodepth=16 --numjobs=1 --size="$RESYNC_SIZE_BYTES" \
        --io_size="$RESYNC_WRITES_BYTES" --refill_buffers || pfail "fio failed"
    snapshot ny offline
    log "e: counting changed 4 KiB blocks (primary image vs replica image)"
    changed=$(cmp_blocks "${SITE_DATA[ny]}/volumes/$EXPORT.img" "${SITE_DATA[dr]}/volumes/$EXPORT.img" 4096) ||
        pfail "block comparison failed"
    log "e: $changed blocks changed ($((changed * 4096 / 1048576)) MiB)"
    wire0=$(status_json ny | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["groups"][0]["replicas"][0]["wire_bytes"])')
    status_cmd ny
    tandem_sample_status 0.5 "$WAIT_TIMEOUT" "$PDIR/samples.jsonl" "${STATUS_CMD[@]}"
    local sampler=$SAMPLER_PID
    t0=$(date +%s.%N)
    start_site dr
    quiet_end
    wait_repl ny "$WAIT_TIMEOUT" "resync after the replica restarted"
    t1=$(date +%s.%N)
    stop_pid "$sampler" 5
    snapshot ny after
    wire1=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["groups"][0]["replicas"][0]["wire_bytes"])' \
        "$PDIR/status-after.json") || pfail "no status after the resync"
    stop_sites
    log "e: checking that the replica image equals the primary's"
    left=$(cmp_blocks "${SITE_DATA[ny]}/volumes/$EXPORT.img" "${SITE_DATA[dr]}/volumes/$EXPORT.img" 4096) ||
        pfail "block comparison failed"
    "$PY" - "$PDIR" "$changed" "$wire0" "$wire1" "$t0" "$t1" "$left" >"$PDIR/result.json" <<'PYEOF'
import json, sys, os
pdir = sys.argv[1]
changed_blocks, wire0, wire1 = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0, t1, left = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
changed = changed_blocks * 4096
wire = wire1 - wire0
ratio = wire / changed if changed else None
off = json.load(open(os.path.join(pdir, "status-offline.json")))["groups"][0]
aft = json.load(open(os.path.join(pdir, "status-after.json")))["groups"][0]["replicas"][0]
text = open(os.path.join(pdir, "fio.json")).read()
fw = json.loads(text[text.index("{"):])["jobs"][0]["write"]
first_connected = None
for line in open(os.path.join(pdir, "samples.jsonl")):
    s = json.loads(line)
    if "doc" in s and s["t"] >= t0:
        st = s["doc"]["groups"][0]["replicas"][0].get("state")
        if st not in (None, "disconnected", "offline") and first_connected is None:
            first_connected = s["t"] - t0
extra = dict(l.split() for l in open(os.path.join(pdir, "extra.txt")))
ok = ratio is not None and ratio <= 1.1 and left == 0
row = {"what": "e: resync wire bytes after 4k writes offline", "tandem": f"{wire/2**20:.1f} MiB on the wire",
       "peer": f"{changed/2**20:.1f} MiB changed", "ratio": ratio,
       "ratio_text": "-" if ratio is None else f"{ratio:.3f}x", "target": "<= 1.1x", "ok": ok,
       "note": f"resync took {t1-t0:.1f}s from replica start"
               + (f" (link up after ~{first_connected:.1f}s)" if first_connected is not None else "")
               + (f"; REPLICA DIFFERS in {left} blocks after resync" if left else "; replica == primary")}
json.dump({"part": "e", "rows": [row], "details": {
    "changed_blocks": changed_blocks, "changed_bytes": changed, "wire_bytes": wire,
    "fio_written_bytes": fw["io_bytes"], "resync_s": t1 - t0, "link_up_after_s": first_connected,
    "status_while_offline": {"queued_bytes": off.get("queued_bytes"), "lag_bytes": off["replicas"][0].get("lag_bytes"),
                             "state": off["replicas"][0].get("state")},
    "resync_after": aft.get("resync"), "raw_bytes_total": aft.get("raw_bytes"),
    "blocks_differing_after": left, **{k: float(v) for k, v in extra.items()}}}, sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# part f: first sync with a mostly identical replica image, vs rsync
# ---------------------------------------------------------------------------
part_f() {
    local vs src alt t0 t1 tandem_s rsync_s same_t same_r
    vs=$(cfg_size "$FIRST_SIZE_BYTES")
    pair_sites async "$vs"
    mkdir -p "${SITE_DATA[ny]}/volumes" "${SITE_DATA[dr]}/volumes"
    src="${SITE_DATA[ny]}/volumes/$EXPORT.img"
    alt="$PDIR/rsync-dst.img"
    log "f: $FIRST_SIZE of random data for the primary image"
    gen_random "$src" "$FIRST_SIZE_BYTES"
    log "f: replica copy with ${FIRST_DIFF_PCT}% of its 64 KiB chunks altered"
    cp --sparse=never "$src" "$alt"
    "$PY" - "$alt" "$FIRST_DIFF_PCT" >"$PDIR/altered.txt" <<'PYEOF'
import os, random, sys
path, pct = sys.argv[1], int(sys.argv[2])
chunk = 64 * 1024
n = os.path.getsize(path) // chunk
rng = random.Random(20240607)
picked = sorted(rng.sample(range(n), n * pct // 100))
fd = os.open(path, os.O_WRONLY)
for i in picked:
    os.pwrite(fd, os.urandom(chunk), i * chunk)
os.fsync(fd)
os.close(fd)
print(len(picked), n)
PYEOF
    cp --sparse=never "$alt" "${SITE_DATA[dr]}/volumes/$EXPORT.img"
    log "f: $(cut -d' ' -f1 "$PDIR/altered.txt") of $(cut -d' ' -f2 "$PDIR/altered.txt") chunks differ"
    drop_caches
    log "f: tandem: start replica and primary, time until replicated"
    status_cmd ny
    tandem_sample_status 0.5 "$WAIT_TIMEOUT" "$PDIR/samples.jsonl" "${STATUS_CMD[@]}"
    local sampler=$SAMPLER_PID
    t0=$(date +%s.%N)
    start_site dr
    start_site ny
    wait_repl ny "$WAIT_TIMEOUT" "first sync"
    t1=$(date +%s.%N)
    stop_pid "$sampler" 5
    snapshot ny after
    tandem_s=$("$PY" -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$t0" "$t1")
    log "f: tandem: ${tandem_s}s"
    stop_sites
    same_t=yes
    timeout 600 cmp -s "$src" "${SITE_DATA[dr]}/volumes/$EXPORT.img" || same_t=no
    drop_caches
    log "f: rsync --inplace --no-whole-file --ignore-times (same pair of files)"
    t0=$(date +%s.%N)
    timeout "$WAIT_TIMEOUT" rsync --inplace --no-whole-file --ignore-times --stats "$src" "$alt" \
        >"$PDIR/rsync.txt" 2>&1 || pfail "rsync failed: $(tail -n 3 "$PDIR/rsync.txt")"
    t1=$(date +%s.%N)
    rsync_s=$("$PY" -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$t0" "$t1")
    log "f: rsync: ${rsync_s}s"
    same_r=yes
    timeout 600 cmp -s "$src" "$alt" || same_r=no
    "$PY" - "$PDIR" "$tandem_s" "$rsync_s" "$same_t" "$same_r" >"$PDIR/result.json" <<'PYEOF'
import json, sys, os, re
pdir, ts, rs, same_t, same_r = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
r = json.load(open(os.path.join(pdir, "status-after.json")))["groups"][0]["replicas"][0]
alt_n, total_n = map(int, open(os.path.join(pdir, "altered.txt")).read().split())
rsync_txt = open(os.path.join(pdir, "rsync.txt")).read()
lit = re.search(r"Literal data: ([\d,]+)", rsync_txt)
lit = int(lit.group(1).replace(",", "")) if lit else None
ratio = rs / ts if ts > 0 else None
ok = ratio is not None and ratio >= 2 and same_t == "yes"
row = {"what": f"f: first sync, {alt_n}/{total_n} 64K chunks differ", "tandem": f"{ts:.1f} s",
       "peer": f"{rs:.1f} s (rsync)", "ratio": ratio, "ratio_text": "-" if ratio is None else f"{ratio:.2f}x faster",
       "target": ">= 2x faster", "ok": ok,
       "note": f"tandem wire {r.get('wire_bytes', 0)/2**20:.0f} MiB"
               + (f", rsync literal {lit/2**20:.0f} MiB" if lit is not None else "")
               + ("" if same_t == "yes" else "; TANDEM REPLICA != PRIMARY")
               + ("" if same_r == "yes" else "; rsync result differs")}
json.dump({"part": "f", "rows": [row], "details": {
    "tandem_s": ts, "rsync_s": rs, "chunks_altered": alt_n, "chunks": total_n,
    "tandem_wire_bytes": r.get("wire_bytes"), "tandem_resync": r.get("resync"),
    "rsync_literal_bytes": lit, "tandem_replica_identical": same_t == "yes",
    "rsync_result_identical": same_r == "yes"}}, sys.stdout, indent=1)
PYEOF
}

# ---------------------------------------------------------------------------
# running the parts
# ---------------------------------------------------------------------------
# Each part runs in its own subshell and process group (so an interrupt ends
# all of it, and a failing part does not stop the others); it ends its own
# processes on exit.
run_part() {
    local p=$1 idx=$2 rc=0
    mkdir -p "$WORK/$p"
    log "=== part $p ==="
    local t0=$SECONDS
    set -m
    (
        set +m
        set -e
        PDIR=$WORK/$p
        PORT=$((PORT_BASE + 20 * idx))
        trap 'quiet_begin; stop_all_pids' EXIT
        trap 'exit 143' TERM INT
        "part_$p"
    ) &
    PART_PID=$!
    set +m
    wait "$PART_PID" || rc=$?
    PART_PID=
    printf '%s\n' "$((SECONDS - t0))" >"$WORK/$p/elapsed"
    # WARN/ERROR lines in the agents' logs
    "$PY" - "$WORK/$p" >"$WORK/$p/problems.json" <<'PYEOF'
import glob, json, os, re, sys
pdir = sys.argv[1]
quiet = []  # [begin, end] of deliberate stops (UTC, as in the logs); may nest
try:
    depth, start = 0, None
    for l in open(os.path.join(pdir, "quiet")):
        kind, ts = l.split()
        if kind == "begin":
            if depth == 0:
                start = ts
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                quiet.append((start, ts))
    if depth > 0:
        quiet.append((start, "9999"))
except (OSError, ValueError):
    pass
out = {}
for f in sorted(glob.glob(os.path.join(pdir, "*.log"))):
    lines = [l.rstrip("\n") for l in open(f, errors="replace")
             if re.search(r" (WARN|ERROR) |panicked", l)]
    if not lines:
        continue
    def deliberate(l):
        ts = l.split(" ", 1)[0]
        return any(b <= ts <= e for b, e in quiet)
    unexpected = [l for l in lines if not deliberate(l)]
    out[os.path.basename(f)] = {"count": len(unexpected), "during_deliberate_stops": len(lines) - len(unexpected),
                                "first": unexpected[:12],
                                "first_during_stops": [l for l in lines if deliberate(l)][:4]}
sp = os.path.join(pdir, "stop-problems")
if os.path.exists(sp):
    out["stop"] = {"count": 1, "first": open(sp).read().splitlines()}
json.dump(out, sys.stdout, indent=1)
PYEOF
    if ((rc != 0)); then
        [[ -s "$WORK/$p/error" ]] || printf 'exit status %d\n' "$rc" >"$WORK/$p/error"
        warn "part $p failed: $(head -n 1 "$WORK/$p/error")"
    fi
    if ((!KEEP)); then # free the disk space of large images now
        find "$WORK/$p" -name '*.img' -delete 2>/dev/null || true
        rm -f "$WORK/$p/random.bin"
    fi
    log "part $p: $((SECONDS - t0))s"
}

log "parts: ${PARTS[*]}; work dir $WORK ($fstype)"
i=0
for p in "${ALL_PARTS[@]}"; do
    i=$((i + 1))
    want "$p" || continue
    run_part "$p" "$i"
done

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
if tandem_rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || tandem_rev="$tandem_rev+dirty"
else
    tandem_rev=none
fi
mkdir -p "$(dirname "$OUT")"
params=()
for v in RUNTIME RAMP COLOC_RUNTIME SIZE ISO_HISTORY_MAX LAG_RUNTIME LAG_RATE LAT_RUNTIME WAN_BYTES WAN_SIZE WAN_RATE \
    WAN_QUEUE_MEMORY RESYNC_SIZE RESYNC_WRITES FIRST_SIZE FIRST_DIFF_PCT WAIT_TIMEOUT; do
    params+=("$v=${!v}")
done
"$PY" - "$WORK" "$OUT" "$tandem_rev" "$(fio --version 2>/dev/null || echo none)" "$(uname -r)" "$(nproc)" \
    "$fstype" "${PARTS[*]}" "$(rsync --version 2>/dev/null | head -n 1)" "${params[@]}" <<'PYEOF'
import json, os, sys, datetime
work, out_path, rev, fio_ver, kernel, ncpu, fstype, parts, rsync_ver = sys.argv[1:10]
params = dict(a.split("=", 1) for a in sys.argv[10:])
TITLES = {"a": "a: what one async replica costs the primary", "b": "b: async lag", "c": "c: sync latency",
          "d": "d: goodput over shaped link", "e": "e: resync wire bytes", "f": "f: first sync vs rsync"}
results, rows = {}, []
for p in parts.split():
    d = os.path.join(work, p)
    def rd(name):
        try:
            return open(os.path.join(d, name)).read()
        except OSError:
            return None
    res = {"elapsed_s": int((rd("elapsed") or "0").strip() or 0)}
    r = rd("result.json")
    err = rd("error")
    if r:
        res.update(json.loads(r))
        rows += [[x["what"], x["tandem"], x["peer"], x.get("ratio_text") or "-", x["target"],
                  "-" if x["ok"] is None else "ok" if x["ok"] else "BELOW", x.get("note", "")] for x in res["rows"]]
    if err or not r:
        # a part may have written the results it got before it failed
        res["error"] = (err or "no result").strip()
        rows.append([TITLES[p], "FAILED", "-", "-", "-", "FAILED", res["error"].splitlines()[0]])
    pr = rd("problems.json")
    res["log_problems"] = json.loads(pr) if pr else {}
    results[p] = res
head = ["part", "Tandem", "peer", "ratio", "target", "ok?"]
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
        print(f"  {r[0]}: {r[6]}")
probs = [(p, f, v) for p, res in results.items() for f, v in res["log_problems"].items()]
if any(v["count"] for _, _, v in probs):
    print()
    print("warnings/errors in agent logs (outside deliberate agent stops):")
    for p, f, v in probs:
        if v["count"]:
            print(f"  part {p}, {f}: {v['count']} line(s)")
            for l in v["first"][:4]:
                print(f"    {l[:220]}")
quiet_n = sum(v.get("during_deliberate_stops", 0) for _, _, v in probs)
if quiet_n:
    print(f"  ({quiet_n} more warning line(s) while an agent was being stopped on purpose: see the JSON)")
doc = {"benchmark": "replication",
       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
       "tandem_rev": rev, "fio": fio_ver, "rsync": rsync_ver, "kernel": kernel, "cpus": int(ncpu),
       "work_fs": fstype, "params": params, "parts": results,
       "note": "figures from one run; machines are noisy"}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
print(f"results: {out_path}")
print("(figures from one run; machines are noisy)")
PYEOF

# A figure below target is a result; a part that could not run is a failure.
failed=()
for p in "${PARTS[@]}"; do [[ ! -s "$WORK/$p/error" ]] || failed+=("$p"); done
((${#failed[@]} == 0)) || die "part(s) failed: ${failed[*]} (see above)"
