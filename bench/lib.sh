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

# THREAD_TICKS_PY PID [PERIOD_S OUTFILE]: the per-thread CPU reader behind
# thread_ticks (one reading, printed) and thread_sampler (a reading every
# PERIOD_S appended to OUTFILE while PID lives).
THREAD_TICKS_PY=$(
    cat <<'PYEOF'
import collections, json, os, re, sys, time

def ticks(pid):
    c = collections.Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as g:
                name = g.read().strip()
            with open(f"/proc/{pid}/task/{task}/stat") as g:
                rest = g.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        c[re.sub(r"-(g\d+.*|\d+)$", "", name)] += int(rest[11]) + int(rest[12])
    return c

pid = sys.argv[1]
if len(sys.argv) == 2:
    try:
        print(json.dumps(ticks(pid)))
    except OSError:
        print("{}")
    sys.exit(0)
period, outf = float(sys.argv[2]), sys.argv[3]
nxt = time.monotonic()
with open(outf, "a", buffering=1) as f:
    while os.path.exists(f"/proc/{pid}"):
        t = time.time()
        try:
            c = ticks(pid)
        except OSError:
            break
        f.write(json.dumps({"t": t, "ticks": c}) + "\n")
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
PYEOF
)

# thread_ticks PID -> JSON object {name prefix: utime+stime ticks} over the
# process's live threads; a thread's name loses its group/site/number suffix
# (ship-g0001-dr -> ship, nbd-worker-3 -> nbd-worker).
thread_ticks() {
    "$(bench_python)" -c "$THREAD_TICKS_PY" "$1"
}

# thread_sampler PID PERIOD_S OUTFILE: starts, in the background, a sampler
# that appends every PERIOD_S one JSON line {"t": unix time, "ticks":
# thread_ticks of PID} to OUTFILE, until PID is gone or it is stopped (a
# thread that exits takes its ticks with it: the samples see the threads
# that lived through them). Tracked; sets THREAD_SAMPLER_PID (end it with
# stop_pid).
THREAD_SAMPLER_PID=
thread_sampler() {
    "$(bench_python)" -c "$THREAD_TICKS_PY" "$@" &
    THREAD_SAMPLER_PID=$!
    track_pid "$THREAD_SAMPLER_PID"
}

# ---------------------------------------------------------------------------
# Device bytes of one process: a cgroup-v1 blkio group of its own
# ---------------------------------------------------------------------------
# The blkio throttle statistics of a group count the bytes of the bios its
# processes submit to a device; a (never reached) 1 TiB/s write limit turns
# them on. Writeback by the kernel's flusher threads (or by another
# process's sync) is not counted: cgroup v1 charges it to whoever submits
# it, so a window should end with the process syncing what it wrote (a
# clean stop of a Tandem agent does).

# blkio_group_new NAME PATH: creates /sys/fs/cgroup/blkio/NAME for the
# device holding PATH. Sets BLKIO_GROUP (the directory) and BLKIO_GROUP_DEV
# (MAJ:MIN); returns 1, with both empty, where that is impossible (no
# cgroup-v1 blkio hierarchy, not root). Remove it with blkio_group_remove.
BLKIO_GROUP=
BLKIO_GROUP_DEV=
# shellcheck disable=SC2034 # BLKIO_GROUP* are read by the scripts that source this file
blkio_group_new() {
    local name=$1 path=$2 dev
    BLKIO_GROUP=
    BLKIO_GROUP_DEV=
    dev=$(findmnt -no MAJ:MIN -T "$path" 2>/dev/null | tr -d ' ') || dev=
    [[ -n "$dev" && -d /sys/fs/cgroup/blkio ]] || return 1
    mkdir "/sys/fs/cgroup/blkio/$name" 2>/dev/null || return 1
    if ! echo "$dev 1099511627776" >"/sys/fs/cgroup/blkio/$name/blkio.throttle.write_bps_device" 2>/dev/null; then
        rmdir "/sys/fs/cgroup/blkio/$name" 2>/dev/null || true
        return 1
    fi
    BLKIO_GROUP=/sys/fs/cgroup/blkio/$name
    BLKIO_GROUP_DEV=$dev
}

# blkio_group_written GROUP DEV -> bytes the group's processes wrote to DEV
blkio_group_written() {
    awk -v d="$2" 'BEGIN { n = "0" } $1 == d && $2 == "Write" { n = $3 } END { print n }' \
        "$1/blkio.throttle.io_service_bytes"
}

# blkio_group_remove GROUP: removes it (its processes must have exited).
blkio_group_remove() {
    [[ -z "$1" ]] || rmdir "$1" 2>/dev/null || warn "could not remove the cgroup $1"
}

# ---------------------------------------------------------------------------
# Tandem helpers
# ---------------------------------------------------------------------------

# build_tandem REPO_ROOT -> path of the release binary (build log on stderr;
# CARGO_TARGET_DIR honoured).
build_tandem() {
    local root=$1
    need_cmd cargo
    log "building: cargo build --release -p tandem"
    (cd "$root" && cargo build --release -p tandem >&2) ||
        die "cargo build --release -p tandem failed"
    local bin="${CARGO_TARGET_DIR:-$root/target}/release/tandem"
    [[ -x "$bin" ]] || die "$bin not found after build"
    if ! "$bin" agent --help >/dev/null 2>&1; then
        die "'$bin agent --help' fails: the tandem binary has no working 'agent' command yet"
    fi
    printf '%s' "$bin"
}

# ---------------------------------------------------------------------------
# fio helpers
# ---------------------------------------------------------------------------

# bench_fio OUTFILE ARGS...: one fio run with JSON output to OUTFILE (fio's
# own messages to OUTFILE.stdout). fio runs in the background and is tracked,
# so an interrupt ends it at once. Returns 1 (with the output's tail) if fio
# fails.
bench_fio() {
    bench_fio_on "" "$@"
}

# bench_fio_on CPUS OUTFILE ARGS...: bench_fio, with fio (and the job
# processes it forks) pinned to the CPU list CPUS by `taskset -c` (not
# pinned if CPUS is empty).
bench_fio_on() {
    local cpus=$1 out=$2
    shift 2
    local -a pre=()
    [[ -z "$cpus" ]] || pre=(taskset -c "$cpus")
    "${pre[@]+"${pre[@]}"}" fio --output-format=json --output="$out" "$@" </dev/null >"$out.stdout" 2>&1 &
    local pid=$! rc=0
    track_pid "$pid"
    wait "$pid" || rc=$?
    untrack_pid "$pid"
    if ((rc != 0)); then
        warn "fio failed (exit $rc): fio $*"
        tail -n 20 "$out.stdout" "$out" >&2 2>/dev/null || true
        return 1
    fi
}

# fio_summary JSONFILE -> "iops bw_kib clat_p50_us clat_p99_us clat_mean_us
# fio_cpu_pct" of the first job's write side (its read side if it only
# read); fio_cpu_pct is fio's own usr+sys CPU, % of one core.
fio_summary() {
    "$(bench_python)" - "$1" <<'PYEOF'
import json, sys
with open(sys.argv[1]) as f:
    text = f.read()
data = json.loads(text[text.index("{"):])  # fio may print notes first
j = data["jobs"][0]
if j.get("error", 0):
    sys.exit(f"fio reported error {j['error']} in {sys.argv[1]}")
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
clat = side.get("clat_ns", {})
pct = clat.get("percentile", {})
print("%.1f %d %.1f %.1f %.1f %.1f" % (side["iops"], side["bw"], pct.get("50.000000", 0) / 1e3,
                                       pct.get("99.000000", 0) / 1e3, clat.get("mean", 0) / 1e3,
                                       j.get("usr_cpu", 0) + j.get("sys_cpu", 0)))
PYEOF
}

# ---------------------------------------------------------------------------
# Tandem sites (replication benchmarks)
# ---------------------------------------------------------------------------

# tandem_site_config FILE KEY=VALUE...: writes one site's configuration with
# one group. Keys (repeat peer= and volume=):
#   site=NAME data=DIR listen=HOST:PORT api=HOST:PORT     required
#   peer=NAME@HOST:PORT     every site of the cluster, this one included
#   primary=NAME            the group's primary (required)
#   replicas=A[,B...]       replica sites, priorities 1, 2, ... (default none)
#   mode=async|sync  sync_replicas=N  queue_memory=SIZE  on_sync_loss=...
#   volume=NAME:SIZE        at least one
#   group=NAME              default "g"
#   tls=DIR                 mutual TLS with DIR/ca.pem, DIR/SITE.pem,
#                           DIR/SITE.key (`tandem certs create`); default off
#   retention=DURATION  history_max=SIZE  test_scratch_max=SIZE
#                           the group's recovery-point history (docs/HISTORY.md)
tandem_site_config() {
    local file=$1 kv k v
    shift
    local site="" data="" listen="" api="" primary="" replicas="" mode=""
    local sync_replicas="" queue_memory="" on_sync_loss="" group=g tls=""
    local retention="" history_max="" test_scratch_max=""
    local -a peers=() volumes=()
    for kv in "$@"; do
        k=${kv%%=*} v=${kv#*=}
        case "$k" in
        site) site=$v ;;
        data) data=$v ;;
        listen) listen=$v ;;
        api) api=$v ;;
        peer) peers+=("$v") ;;
        primary) primary=$v ;;
        replicas) replicas=$v ;;
        mode) mode=$v ;;
        sync_replicas) sync_replicas=$v ;;
        queue_memory) queue_memory=$v ;;
        on_sync_loss) on_sync_loss=$v ;;
        volume) volumes+=("$v") ;;
        group) group=$v ;;
        tls) tls=$v ;;
        retention) retention=$v ;;
        history_max) history_max=$v ;;
        test_scratch_max) test_scratch_max=$v ;;
        *) die "tandem_site_config: unknown key '$k'" ;;
        esac
    done
    [[ -n "$site" && -n "$data" && -n "$listen" && -n "$api" && -n "$primary" ]] ||
        die "tandem_site_config: site, data, listen, api and primary are required"
    ((${#volumes[@]} > 0)) || die "tandem_site_config: no volume"
    local p r i=0 reps="" vols=""
    if [[ -n "$replicas" ]]; then
        local -a rl
        IFS=, read -r -a rl <<<"$replicas"
        for r in "${rl[@]}"; do
            i=$((i + 1))
            reps+="${reps:+, }{ site = \"$r\", priority = $i }"
        done
    fi
    for v in "${volumes[@]}"; do
        vols+="${vols:+, }{ name = \"${v%%:*}\", size = \"${v#*:}\" }"
    done
    {
        printf '[site]\nname = "%s"\ndata_dir = "%s"\n' "$site" "$data"
        printf 'listen = "%s"\napi = "%s"\n\n' "$listen" "$api"
        if [[ -n "$tls" ]]; then
            printf '[tls]\nca = "%s/ca.pem"\ncert = "%s/%s.pem"\nkey = "%s/%s.key"\n\n' \
                "$tls" "$tls" "$site" "$tls" "$site"
        else
            printf '[tls]\nmode = "off"\n\n'
        fi
        printf '[coordinator]\nkind = "none"\n\n'
        for p in "${peers[@]+"${peers[@]}"}"; do
            printf '[[peer]]\nname = "%s"\naddress = "%s"\n\n' "${p%%@*}" "${p#*@}"
        done
        printf '[[group]]\nname = "%s"\nprimary = "%s"\nreplicas = [%s]\n' \
            "$group" "$primary" "${reps:+ $reps }"
        [[ -z "$mode" ]] || printf 'mode = "%s"\n' "$mode"
        [[ -z "$sync_replicas" ]] || printf 'sync_replicas = %d\n' "$sync_replicas"
        [[ -z "$queue_memory" ]] || printf 'queue_memory = "%s"\n' "$queue_memory"
        [[ -z "$on_sync_loss" ]] || printf 'on_sync_loss = "%s"\n' "$on_sync_loss"
        [[ -z "$retention" ]] || printf 'retention = "%s"\n' "$retention"
        [[ -z "$history_max" ]] || printf 'history_max = "%s"\n' "$history_max"
        [[ -z "$test_scratch_max" ]] || printf 'test_scratch_max = "%s"\n' "$test_scratch_max"
        printf 'volumes = [ %s ]\n' "$vols"
    } >"$file"
}

# tandem_start_agent BIN CONFIG LOGFILE [NETNS] [CPUS]: starts `tandem agent`
# (inside network namespace NETNS if given, pinned to the CPU list CPUS with
# `taskset -c` if given; `ip netns exec` and taskset exec, so the PID is the
# agent's) and tracks it. Sets AGENT_PID.
AGENT_PID=
tandem_start_agent() {
    local bin=$1 cfg=$2 logf=$3 ns=${4:-} cpus=${5:-}
    local -a pre=()
    [[ -z "$ns" ]] || pre=(ip netns exec "$ns")
    [[ -z "$cpus" ]] || pre+=(taskset -c "$cpus")
    NO_COLOR=1 "${pre[@]+"${pre[@]}"}" "$bin" agent --config "$cfg" </dev/null >>"$logf" 2>&1 &
    AGENT_PID=$!
    track_pid "$AGENT_PID"
}

# tandem_wait_api TIMEOUT_S PID CMD...: polls the status command CMD (e.g.
# `tandem status --json --local --config FILE`, prefixed with `ip netns exec NS`)
# until it prints a document. Returns 1 if PID dies or on timeout.
tandem_wait_api() {
    local timeout=$1 pid=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    while :; do
        kill -0 "$pid" 2>/dev/null || {
            warn "agent (pid $pid) exited before its API answered"
            return 1
        }
        if timeout 5 "$@" >/dev/null 2>&1; then return 0; fi
        ((SECONDS < deadline)) || {
            warn "agent (pid $pid): '$*' did not succeed within ${timeout}s"
            return 1
        }
        sleep 0.1
    done
}

# tandem_wait_replicated TIMEOUT_S PIDS CMD...: polls the primary's status
# command CMD every 0.1 s until every group it is primary for is
# replicated: each replica has state "streaming", lag_bytes 0 and
# durable_seq + 1 >= next_seq. PIDS: comma-separated agent PIDs that must stay
# alive ("-" for none). Prints the seconds waited (3 decimals). Returns 1 on
# timeout or a dead agent, with the last status on stderr.
tandem_wait_replicated() {
    "$(bench_python)" - "$@" <<'PYEOF'
import json, os, subprocess, sys, time
timeout, pids, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
pids = [int(p) for p in pids.split(",") if p not in ("", "-")]
t0 = time.monotonic()
last = None
def replicated(doc):
    groups = [g for g in doc.get("groups", []) if g.get("role") == "primary"]
    if not groups:
        return False
    for g in groups:
        for r in g.get("replicas", []):
            if r.get("state") != "streaming" or r.get("lag_bytes") != 0:
                return False
            if r.get("durable_seq", 0) + 1 < g.get("next_seq", 0):
                return False
    return True
while True:
    for p in pids:
        try:
            os.kill(p, 0)
        except OSError:
            print(f"agent pid {p} is gone; last status: {last}", file=sys.stderr)
            sys.exit(1)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            last = out.stdout
            if replicated(json.loads(out.stdout)):
                print("%.3f" % (time.monotonic() - t0))
                sys.exit(0)
        else:
            last = out.stderr.strip()
    except (subprocess.TimeoutExpired, ValueError) as e:
        last = repr(e)
    if time.monotonic() - t0 > timeout:
        print(f"not replicated within {timeout:.0f}s; last status:\n{last}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.1)
PYEOF
}

# tandem_sample_status PERIOD_S DURATION_S OUTFILE CMD...: starts, in the
# background, a sampler that runs the status command CMD every PERIOD_S for
# at most DURATION_S and appends one JSON line per sample to OUTFILE:
# {"t": unix time before the call, "dt": call seconds, "doc": status} (or
# "err"). Tracked; sets SAMPLER_PID (end it with stop_pid).
SAMPLER_PID=
tandem_sample_status() {
    "$(bench_python)" - "$@" <<'PYEOF' &
import json, subprocess, sys, time
period, duration, outf, cmd = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
end = time.monotonic() + duration
nxt = time.monotonic()
with open(outf, "a", buffering=1) as f:
    while time.monotonic() < end:
        t, m = time.time(), time.monotonic()
        rec = {"t": t}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            if out.returncode == 0:
                rec["doc"] = json.loads(out.stdout)
            else:
                rec["err"] = out.stderr.strip()[-500:]
        except (subprocess.TimeoutExpired, ValueError) as e:
            rec["err"] = repr(e)
        rec["dt"] = round(time.monotonic() - m, 4)
        f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
PYEOF
    SAMPLER_PID=$!
    track_pid "$SAMPLER_PID"
}

# ---------------------------------------------------------------------------
# The floor of shipping writes to another host, on one machine
# ---------------------------------------------------------------------------

# loopback_floor COUNT MSG_BYTES SEND_CPU RECV_CPU [BATCH] -> one JSON object: a
# writer pinned to SEND_CPU sends COUNT messages of MSG_BYTES (one send per
# message, TCP_NODELAY) over a loopback TCP connection to a reader pinned to
# RECV_CPU that reads and discards them. Measured over the send loop (until
# the reader has read everything): the writer's utime and stime
# (getrusage; its utime is the Python interpreter's, not the floor's),
# ksoftirqd/SEND_CPU's CPU, SEND_CPU's softirq and busy time (/proc/stat:
# user+nice+system+irq+softirq, whatever ran there) and the reader's CPU,
# all in seconds. Loopback transmits by queueing the packet for the
# sending CPU's own softirq, usually run on the way out of the send
# syscall: the receive path's protocol work (but not the copy to the
# reader) is done on SEND_CPU, in the writer's context. BATCH (default 1)
# messages go in one send: COUNT is rounded down to a multiple of it, and
# "count" says how many messages went.
loopback_floor() {
    "$(bench_python)" - "$@" <<'PYEOF'
import json, os, resource, socket, sys, time
count, size, send_cpu, recv_cpu = (int(x) for x in sys.argv[1:5])
batch = max(1, int(sys.argv[5])) if len(sys.argv) > 5 else 1
count -= count % batch
hz = os.sysconf("SC_CLK_TCK")

def cpu_line(n):
    with open("/proc/stat") as f:
        for l in f:
            if l.startswith(f"cpu{n} "):
                v = [int(x) for x in l.split()[1:]]
                # user nice system idle iowait irq softirq steal
                return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "softirq": v[6]}
    raise SystemExit(f"no cpu{n} in /proc/stat")

def task_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except OSError:
        return 0

ksoftirqd = None
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == f"ksoftirqd/{send_cpu}":
                    ksoftirqd = int(p)
                    break
        except OSError:
            pass

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
rfd, wfd = os.pipe()
child = os.fork()
if child == 0:
    # the reader: reads and discards; reports its CPU and byte count
    try:
        os.sched_setaffinity(0, {recv_cpu})
        srv.settimeout(60)
        c, _ = srv.accept()
        c.settimeout(60)
        buf = bytearray(4 << 20)
        n = 0
        t = os.times()
        while True:
            k = c.recv_into(buf)
            if k == 0:
                break
            n += k
        u = os.times()
        os.write(wfd, json.dumps({"bytes": n, "cpu_s": (u.user - t.user) + (u.system - t.system)}).encode())
    finally:
        os._exit(0)
os.close(wfd)
os.sched_setaffinity(0, {send_cpu})
s = socket.create_connection(srv.getsockname(), timeout=60)  # bounds every send
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = memoryview(os.urandom(size) * batch)
c0, k0, r0, t0 = cpu_line(send_cpu), task_ticks(ksoftirqd) if ksoftirqd else 0, resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
send = s.sendall
for _ in range(count // batch):
    send(msg)
s.shutdown(socket.SHUT_WR)
reader = json.loads(os.read(rfd, 4096) or b"{}")
t1, r1, k1, c1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF), task_ticks(ksoftirqd) if ksoftirqd else 0, cpu_line(send_cpu)
os.waitpid(child, 0)
s.close()
if reader.get("bytes") != count * size:
    raise SystemExit(f"the reader got {reader.get('bytes')} bytes, not {count * size}")
print(json.dumps({
    "count": count, "msg_bytes": size, "batch": batch, "send_cpu": send_cpu, "recv_cpu": recv_cpu, "wall_s": t1 - t0,
    "writer_utime_s": r1.ru_utime - r0.ru_utime, "writer_stime_s": r1.ru_stime - r0.ru_stime,
    "ksoftirqd_s": (k1 - k0) / hz if ksoftirqd else None,
    "cpu_softirq_s": (c1["softirq"] - c0["softirq"]) / hz, "cpu_busy_s": (c1["busy"] - c0["busy"]) / hz,
    "reader_cpu_s": reader.get("cpu_s")}))
PYEOF
}
