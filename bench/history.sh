#!/usr/bin/env bash
# bench/history.sh — the cost of recovery points (issue 12, docs/HISTORY.md),
# side by side in one run: a replica keeping history (retention = "24h")
# vs one without (retention = "0s").
# Not a test: run it by hand, as root (it drops the page cache).
#
#   bench/history.sh                       # everything (~5 min with the defaults)
#   LAG_RUNTIME=120 WA_WRITES=1GiB bench/history.sh
#   TANDEM_BIN=/path/to/tandem bench/history.sh
#
# See bench/README.md ("History") for what it measures and the targets.
set -euo pipefail

BENCH_NAME=history
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/history.sh [--keep] [-h]

Two runs of the same sequence, history off (retention = "0s") and on
(retention = "24h"), each with a primary and one async replica (two agents
on loopback):
  1  replica device bytes written per replicated byte (/proc/PID/io
     write_bytes of the replica agent over the fio job and its catch-up,
     divided by the bytes fio wrote): 4k-64k random writes on a fresh
     (sparse) volume, then on the fully written volume
     (target with history <= 2.0)
  2  async lag under 50 MiB/s 4k-64k random writes, lag_seconds sampled
     every 100 ms (target p99 <= 1 s with history, as without)
With history only:
  3  opening a test view at the OLDEST recovery point, all the run's
     writes (>= 1 GiB) after it, page cache dropped: time from
     `tandem test start` until the view's NBD socket serves a read
     (target <= 5 s)
  4  fio over NBD on a test view (at the point after the prefill, so its
     reads come from the undo log) vs the replica's image served read-only
     by qemu-nbd -r: 4k random read QD16, 1M sequential read QD8
     (target >= 0.8x)

Options:
  --keep        keep the work directory (configs, agent logs, samples)
  -h, --help    this text

Environment:
  SIZE              volume size (1GiB)
  WA_SPARSE_WRITES  1: random writes on the fresh volume (256MiB)
  WA_WRITES         1: random writes on the fully written volume (512MiB)
  LAG_RUNTIME       2: seconds of sustained writes (60)
  LAG_RATE          2: fio --rate (50m = 50 MiB/s)
  READ_RUNTIME      4: seconds per fio read job (20)   RAMP: fio ramp (2)
  WAIT_TIMEOUT      limit for any wait for replication to catch up (300 s)
  OUT               JSON result (default /tmp/tandem-bench-history-<date>.json)
  WORK_BASE         parent of the work dir (default /var/tmp; a real disk)
  PORT_BASE         first TCP port (default 18650; uses PORT_BASE..+19)
  TANDEM_BIN        use this tandem binary instead of building one
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
SIZE=${SIZE:-1GiB}
WA_SPARSE_WRITES=${WA_SPARSE_WRITES:-256MiB}
WA_WRITES=${WA_WRITES:-512MiB}
LAG_RUNTIME=${LAG_RUNTIME:-60}
LAG_RATE=${LAG_RATE:-50m}
READ_RUNTIME=${READ_RUNTIME:-20}
RAMP=${RAMP:-2}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-300}
WORK_BASE=${WORK_BASE:-/var/tmp}
PORT_BASE=${PORT_BASE:-18650}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/tandem-bench-history-$STAMP.json}
posint LAG_RUNTIME "$LAG_RUNTIME"
posint READ_RUNTIME "$READ_RUNTIME"
posint WAIT_TIMEOUT "$WAIT_TIMEOUT"
posint PORT_BASE "$PORT_BASE"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be an integer (seconds)"
[[ "$LAG_RATE" =~ ^[0-9]+[km]?$ ]] || die "LAG_RATE must be a fio rate like 50m"
SIZE_BYTES=$(parse_size "$SIZE")
WA_SPARSE_BYTES=$(parse_size "$WA_SPARSE_WRITES")
WA_BYTES=$(parse_size "$WA_WRITES")
((WA_SPARSE_BYTES <= SIZE_BYTES && WA_BYTES <= 4 * SIZE_BYTES)) || die "WA_SPARSE_WRITES must be <= SIZE, WA_WRITES <= 4 x SIZE"
READY_TIMEOUT=30
EXPORT=vol0
GROUP=g
BSSPLIT=4k/20:8k/20:16k/20:32k/20:64k/20

need_cmd timeout coreutils
need_cmd nbdinfo libnbd-bin
need_cmd qemu-io qemu-utils
need_cmd qemu-nbd qemu-utils
need_cmd fio fio
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (fio --enghelp=nbd fails)"
PY=$(bench_python)
[[ $(id -u) -eq 0 ]] || warn "not root: the page cache cannot be dropped (part 3 is then not a cold open)"

if [[ -n "${TANDEM_BIN:-}" ]]; then
    [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not executable"
else
    # build_tandem assumes ./target; honour CARGO_TARGET_DIR
    need_cmd cargo
    log "building: cargo build --release -p tandem"
    (cd "$REPO_ROOT" && cargo build --release -p tandem >&2) || die "cargo build --release -p tandem failed"
    TANDEM_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/tandem
    [[ -x "$TANDEM_BIN" ]] || die "$TANDEM_BIN not found after the build"
fi
for c in "agent --help" "points --help" "test start --help"; do
    # shellcheck disable=SC2086
    "$TANDEM_BIN" $c >/dev/null 2>&1 || die "'$TANDEM_BIN $c' fails: this tandem has no '${c% --help}' command"
done
log "tandem: $TANDEM_BIN"

# ---------------------------------------------------------------------------
# work dir and cleanup
# ---------------------------------------------------------------------------
[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-history.XXXXXX")
BLKIO_CG=
RESTART_BLKIO=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all_pids
    if [[ -n "$BLKIO_CG" ]]; then
        rmdir "$BLKIO_CG" 2>/dev/null || warn "could not remove the cgroup $BLKIO_CG"
    fi
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
# per mode: two images, the history (everything written, at most), scratch
need_kib=$(((2 * 2 * SIZE_BYTES + 2 * (SIZE_BYTES + WA_BYTES + WA_SPARSE_BYTES) + 60 * 64 * 1048576) / 1024))
avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
((avail_kib >= need_kib)) ||
    die "not enough free space in $WORK_BASE: need ~$((need_kib / 1024)) MiB, have $((avail_kib / 1024)) MiB"

# Device bytes, as a cross-check of write_bytes (which counts a whole page
# cache folio when a write dirties part of it): the replica agent runs in a
# blkio (cgroup v1) group of its own whose throttle statistics count the
# bytes of the bios it submits; a (never reached) 1 TiB/s limit turns them on.
# The agent's fdatasyncs submit nearly all its writes; the kernel's flusher
# threads' writeback is not counted there.
BLKIO_DEV=$(findmnt -no MAJ:MIN -T "$WORK" 2>/dev/null | tr -d ' ') || BLKIO_DEV=
if [[ -n "$BLKIO_DEV" && -d /sys/fs/cgroup/blkio ]] && mkdir "/sys/fs/cgroup/blkio/tandem-bench-history-$$" 2>/dev/null; then
    BLKIO_CG=/sys/fs/cgroup/blkio/tandem-bench-history-$$
    echo "$BLKIO_DEV 1099511627776" >"$BLKIO_CG/blkio.throttle.write_bps_device" 2>/dev/null ||
        warn "cannot enable blkio accounting for $BLKIO_DEV in $BLKIO_CG: no device-byte cross-check"
else
    warn "no cgroup v1 blkio hierarchy (or not root): no device-byte cross-check of write_bytes"
fi
# blkio_written -> bytes the replica agent's cgroup wrote to BLKIO_DEV (0 without)
blkio_written() {
    if [[ -n "$BLKIO_CG" ]]; then
        awk -v d="$BLKIO_DEV" 'BEGIN { n = "0" } $1 == d && $2 == "Write" { n = $3 } END { print n }' "$BLKIO_CG/blkio.throttle.io_service_bytes"
    else
        echo 0
    fi
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
# result KEY=VALUE...: one JSON line of results (values: numbers or strings)
result() {
    "$PY" - "$@" >>"$RESULTS" <<'PYEOF'
import json, sys
d = {}
for a in sys.argv[1:]:
    k, v = a.split("=", 1)
    try:
        d[k] = int(v)
    except ValueError:
        try:
            d[k] = float(v)
        except ValueError:
            d[k] = v
print(json.dumps(d))
PYEOF
}

# ---------------------------------------------------------------------------
# sites of one mode: MDIR, ny (primary) and dr (replica)
# ---------------------------------------------------------------------------
MDIR=
NY_PID=
DR_PID=
cfg() { printf '%s/%s.toml' "$MDIR" "$1"; }
data() { printf '%s/%s' "$MDIR" "$1"; }
sock() { printf '%s/nbd/%s.sock' "$(data "$1")" "$EXPORT"; }
status_of() { timeout 10 "$TANDEM_BIN" status --json --local --config "$(cfg "$1")"; }

start_agent() { # start_agent ny|dr: sets NY_PID or DR_PID, waits for its API
    local k=$1
    tandem_start_agent "$TANDEM_BIN" "$(cfg "$k")" "$MDIR/$k.log"
    if [[ $k == dr ]]; then DR_PID=$AGENT_PID; else NY_PID=$AGENT_PID; fi
    if [[ $k == dr && -n "$BLKIO_CG" ]]; then
        echo "$DR_PID" >"$BLKIO_CG/cgroup.procs" || warn "cannot move the replica agent into $BLKIO_CG"
    fi
    tandem_wait_api "$READY_TIMEOUT" "$AGENT_PID" "$TANDEM_BIN" status --json --local --config "$(cfg "$k")" ||
        fail "agent $k did not come up within ${READY_TIMEOUT}s"
}

# restart_dr: a clean stop of the replica agent (it syncs what it wrote, so
# its cgroup's device bytes are complete: without history the images are
# otherwise synced only every 2 s while records arrive), then a start.
restart_dr() {
    stop_pid "$DR_PID" 30
    [[ "$STOP_STATUS" == 0 ]] || warn "replica agent did not exit cleanly on SIGTERM (status $STOP_STATUS)"
    RESTART_BLKIO=$(blkio_written)
    start_agent dr
}

start_sites() { # start_sites RETENTION PORT
    local ret=$1 port=$2 k
    local common=(peer="ny@127.0.0.1:$port" peer="dr@127.0.0.1:$((port + 2))" primary=ny replicas=dr
        mode=async volume="$EXPORT:$(size_for_config "$SIZE_BYTES")" group="$GROUP" retention="$ret")
    mkdir -p "$(data ny)" "$(data dr)"
    tandem_site_config "$(cfg ny)" site=ny data="$(data ny)" listen="127.0.0.1:$port" \
        api="127.0.0.1:$((port + 1))" "${common[@]}"
    tandem_site_config "$(cfg dr)" site=dr data="$(data dr)" listen="127.0.0.1:$((port + 2))" \
        api="127.0.0.1:$((port + 3))" "${common[@]}"
    for k in dr ny; do start_agent $k; done
    wait_nbd_ready "$NY_PID" "$(sock ny)" "$EXPORT" "$READY_TIMEOUT" "$MDIR/ny.log" ||
        fail "ny did not serve $EXPORT"
}

stop_sites() {
    local p
    for p in "$NY_PID" "$DR_PID"; do
        [[ -n "$p" ]] || continue
        stop_pid "$p" 30
        [[ "$STOP_STATUS" == 0 ]] || warn "agent $p did not exit cleanly on SIGTERM (status $STOP_STATUS)"
    done
    NY_PID=""
    DR_PID=""
}

fail() {
    local k
    warn "$*"
    for k in ny dr; do
        [[ -s "$MDIR/$k.log" ]] || continue
        warn "last lines of $k's log ($MDIR/$k.log):"
        tail -n 15 "$MDIR/$k.log" >&2 || true
    done
    die "$*"
}

REPL_S=
wait_repl() { # wait_repl WHAT
    REPL_S=$(tandem_wait_replicated "$WAIT_TIMEOUT" "$NY_PID,$DR_PID" \
        "$TANDEM_BIN" status --json --local --config "$(cfg ny)") ||
        fail "$1: not replicated within ${WAIT_TIMEOUT}s (or an agent died)"
}

# io_field PID FIELD -> a /proc/PID/io counter
io_field() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/io"; }
# dir_bytes DIR -> apparent bytes of the files under DIR (0 if absent)
dir_bytes() { if [[ -d "$1" ]]; then du -sb "$1" | cut -f1; else echo 0; fi; }
fio_written() { # fio_written JSON -> bytes the first job wrote
    "$PY" -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["io_bytes"])' "$1"
}
now() { date +%s.%N; }

# ---------------------------------------------------------------------------
# 1: replica bytes written per replicated byte
# ---------------------------------------------------------------------------
wa_run() { # wa_run MODE VOLSTATE BYTES
    local mode=$1 vstate=$2 n=$3 out w0 c0 h0 r0 w1 c1 h1 r1 fb t0 t1 b0 b1
    out="$MDIR/wa-$vstate.json"
    # a clean start: what came before (the prefill) is synced by the agent
    # now, not counted in this window
    restart_dr
    wait_repl "before the $vstate write job"
    w0=$(io_field "$DR_PID" write_bytes) c0=$(io_field "$DR_PID" cancelled_write_bytes)
    b0=$(blkio_written)
    h0=$(dir_bytes "$(data dr)/replica/$GROUP/history")
    r0=$(io_field "$DR_PID" read_bytes)
    log "1 [$mode]: $((n / 1048576)) MiB of 4k-64k random writes on the $vstate volume"
    t0=$(now)
    bench_fio "$out" --name=wa --ioengine=nbd --uri="$(nbd_uri "$(sock ny)" "$EXPORT")" \
        --rw=randwrite --bssplit="$BSSPLIT" --blockalign=4k --iodepth=8 --numjobs=1 \
        --size="$SIZE_BYTES" --io_size="$n" --norandommap || fail "fio failed"
    t1=$(now)
    wait_repl "catching up after the $vstate write job"
    local caught=$REPL_S
    w1=$(io_field "$DR_PID" write_bytes) c1=$(io_field "$DR_PID" cancelled_write_bytes)
    h1=$(dir_bytes "$(data dr)/replica/$GROUP/history")
    r1=$(io_field "$DR_PID" read_bytes)
    restart_dr
    b1=$RESTART_BLKIO
    fb=$(fio_written "$out")
    log "    fio wrote $((fb / 1048576)) MiB in $("$PY" -c "print('%.1f' % ($t1 - $t0))")s; replica agent wrote $(((w1 - w0) / 1048576)) MiB (cancelled $(((c1 - c0) / 1048576)) MiB, device $(((b1 - b0) / 1048576)) MiB), history dir +$(((h1 - h0) / 1048576)) MiB; caught up ${caught}s after"
    result kind=wa mode="$mode" vol="$vstate" fio_bytes="$fb" write_bytes=$((w1 - w0)) blkio_bytes=$((b1 - b0)) \
        cancelled_write_bytes=$((c1 - c0)) read_bytes=$((r1 - r0)) history_growth=$((h1 - h0)) \
        fio_s="$("$PY" -c "print($t1 - $t0)")" catchup_s="$caught"
}

# ---------------------------------------------------------------------------
# 2: async lag under sustained writes
# ---------------------------------------------------------------------------
lag_run() { # lag_run MODE
    local mode=$1 out t0 t1 sampler c0 c1 w0 w1 b0 b1
    wait_repl "before the lag run"
    w0=$(io_field "$DR_PID" write_bytes)
    b0=$(blkio_written)
    tandem_sample_status 0.1 $((LAG_RUNTIME + 60)) "$MDIR/samples.jsonl" \
        "$TANDEM_BIN" status --json --local --config "$(cfg ny)"
    sampler=$SAMPLER_PID
    sleep 1
    log "2 [$mode]: ${LAG_RUNTIME}s of 4k-64k random writes at $LAG_RATE/s, lag sampled every 100 ms"
    out="$MDIR/lag.json"
    c0=$(proc_cpu_ticks "$DR_PID")
    t0=$(now)
    bench_fio "$out" --name=lag --ioengine=nbd --uri="$(nbd_uri "$(sock ny)" "$EXPORT")" \
        --rw=randwrite --bssplit="$BSSPLIT" --blockalign=4k \
        --rate="$LAG_RATE" --iodepth=8 --numjobs=1 --time_based --runtime="$LAG_RUNTIME" \
        --size="$SIZE_BYTES" --norandommap || fail "fio failed"
    t1=$(now)
    c1=$(proc_cpu_ticks "$DR_PID")
    wait_repl "draining after the lag run"
    local caught=$REPL_S
    stop_pid "$sampler" 5
    w1=$(io_field "$DR_PID" write_bytes)
    restart_dr
    b1=$RESTART_BLKIO
    "$PY" - "$MDIR/samples.jsonl" "$t0" "$t1" "$out" "$caught" "$mode" "$((c1 - c0))" "$(getconf CLK_TCK)" \
        "$((w1 - w0))" "$((b1 - b0))" >>"$RESULTS" <<'PYEOF'
import json, sys
samples, t0, t1, fio_out, catch, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6]
ticks, hz, wbytes, bbytes = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10])
lag_s, lag_b, errs = [], [], 0
for line in open(samples):
    s = json.loads(line)
    if not (t0 <= s["t"] <= t1):
        continue
    if "doc" not in s:
        errs += 1
        continue
    r = s["doc"]["groups"][0]["replicas"][0]
    lag_s.append(float(r.get("lag_seconds", 0.0)))
    lag_b.append(int(r.get("lag_bytes", 0)))
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))] if xs else None
text = open(fio_out).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(json.dumps({"kind": "lag", "mode": mode, "samples": len(lag_s), "sample_errors": errs,
                  "p50": pct(lag_s, 50), "p99": pct(lag_s, 99), "max": max(lag_s) if lag_s else None,
                  "lag_bytes_p99": pct(lag_b, 99), "fio_mib_s": w["bw"] / 1024, "fio_bytes": w["io_bytes"],
                  "drain_s": catch, "replica_cpu_pct": 100.0 * ticks / hz / (t1 - t0),
                  "write_bytes": wbytes, "blkio_bytes": bbytes,
                  "amplification": wbytes / w["io_bytes"] if w["io_bytes"] else None}))
PYEOF
    tail -n 1 "$RESULTS" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("    lag p50 %.3fs p99 %.3fs max %.3fs; fio %.1f MiB/s; replica agent CPU %.0f%%; replica wrote %.2f bytes per replicated byte (device %.2f)" % (d["p50"], d["p99"], d["max"], d["fio_mib_s"], d["replica_cpu_pct"], d["amplification"], d["blkio_bytes"] / d["fio_bytes"]))' >&2
}

# ---------------------------------------------------------------------------
# 3 and 4: test views
# ---------------------------------------------------------------------------
points_json() { timeout 30 "$TANDEM_BIN" points "$GROUP" --json --config "$(cfg dr)"; }
# point_time WHICH (0 oldest, -1 newest) -> that point's time
point_time() {
    points_json | "$PY" -c 'import json,sys; p=json.load(sys.stdin)["points"]; print(p[int(sys.argv[1])]["time"] if p else "")' "$1"
}

TEST_SOCK=
test_start() { # test_start AT LABEL: opens a test view, sets TEST_SOCK; $MDIR/test-LABEL.json
    local at=$1 label=$2
    timeout 60 "$TANDEM_BIN" test start "$GROUP" --at "$at" --json --config "$(cfg dr)" \
        >"$MDIR/test-$label.json" 2>"$MDIR/test-$label.err" ||
        fail "tandem test start --at $at failed: $(tail -n 3 "$MDIR/test-$label.err")"
    TEST_SOCK=$("$PY" -c 'import json,sys; t=json.load(open(sys.argv[1])); print([e["socket"] for e in t["exports"] if e["volume"] == sys.argv[2]][0])' \
        "$MDIR/test-$label.json" "$EXPORT") || fail "no $EXPORT socket in $(cat "$MDIR/test-$label.json")"
}

open_run() {
    local oldest newest count pbytes hbytes t0 t_cli t_read deadline off
    oldest=$(point_time 0)
    [[ -n "$oldest" ]] || fail "the replica lists no recovery point"
    points_json >"$MDIR/points.json"
    read -r count newest < <("$PY" -c 'import json,sys; p=json.load(open(sys.argv[1]))["points"]; print(len(p), p[-1]["time"])' "$MDIR/points.json")
    hbytes=$(dir_bytes "$(data dr)/replica/$GROUP/history")
    # everything fio wrote to the group since it was created (the oldest
    # point comes with the first writes)
    pbytes=$("$PY" -c 'import json,sys; print(sum(d.get("fio_bytes", 0) for d in map(json.loads, open(sys.argv[1])) if d.get("mode") == "on"))' \
        "$RESULTS")
    log "3: $count points, oldest $oldest, newest $newest; history dir $((hbytes / 1048576)) MiB; ~$((pbytes / 1048576)) MiB written since the volume was created"
    drop_caches
    off=$(((SIZE_BYTES / 2) & ~4095))
    log "3: tandem test start $GROUP --at $oldest (page cache dropped), until a read of the view succeeds"
    t0=$(now)
    test_start "$oldest" oldest
    t_cli=$(now)
    deadline=$((SECONDS + 60))
    until timeout 10 qemu-io -r -f raw -c "read $off 4096" "$(nbd_uri "$TEST_SOCK" "$EXPORT")" >"$MDIR/open-read.txt" 2>&1 &&
        grep -q '^read 4096/4096' "$MDIR/open-read.txt"; do
        ((SECONDS < deadline)) || fail "the test view at $oldest did not serve a read within 60s: $(cat "$MDIR/open-read.txt")"
        sleep 0.05
    done
    t_read=$(now)
    log "    test start answered after $("$PY" -c "print('%.3f' % ($t_cli - $t0))")s, first read served after $("$PY" -c "print('%.3f' % ($t_read - $t0))")s"
    result kind=open point="$oldest" newest="$newest" points="$count" history_bytes="$hbytes" \
        written_since_bytes="$pbytes" cli_s="$("$PY" -c "print($t_cli - $t0)")" read_s="$("$PY" -c "print($t_read - $t0)")"
    timeout 60 "$TANDEM_BIN" test stop "$GROUP" --config "$(cfg dr)" >>"$MDIR/test-stop.txt" 2>&1 ||
        fail "tandem test stop failed: $(tail -n 3 "$MDIR/test-stop.txt")"
}

read_run() { # read_run POINT_TIME
    local at=$1 qsock="$MDIR/image-ro.sock" qpid j jname rw bs qd order k uri what out c0 c1 t0 t1
    test_start "$at" reads
    local view_sock=$TEST_SOCK
    # the same jobs through Tandem's own server on the latest point (whose
    # reads go to the image): tells the server apart from the undo log
    test_start latest latest
    local latest_sock=$TEST_SOCK
    qemu-nbd -r -t -f raw -x "$EXPORT" -k "$qsock" "$(data dr)/volumes/$EXPORT.img" \
        </dev/null >"$MDIR/qemu-nbd.log" 2>&1 &
    qpid=$!
    track_pid "$qpid"
    wait_nbd_ready "$qpid" "$qsock" "$EXPORT" "$READY_TIMEOUT" "$MDIR/qemu-nbd.log" || fail "qemu-nbd did not serve the replica image"
    local jobs=("randread-4k-qd16 randread 4k 16" "read-1m-qd8 read 1M 8")
    for ((j = 0; j < ${#jobs[@]}; j++)); do
        read -r jname rw bs qd <<<"${jobs[$j]}"
        if ((j % 2 == 0)); then order=(view image latest); else order=(latest image view); fi
        for k in "${order[@]}"; do
            case $k in
            view) uri=$(nbd_uri "$view_sock" "$EXPORT") what="test view at the point after the prefill" ;;
            latest) uri=$(nbd_uri "$latest_sock" "$EXPORT") what="test view at the latest point" ;;
            image) uri=$(nbd_uri "$qsock" "$EXPORT") what="replica image (qemu-nbd -r)" ;;
            esac
            drop_caches
            out="$MDIR/read-$k-$jname.json"
            log "4: $jname on the $what"
            c0=$(proc_cpu_ticks "$DR_PID")
            t0=$(now)
            bench_fio "$out" --name="$jname" --ioengine=nbd --uri="$uri" --readonly \
                --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 --time_based \
                --runtime="$READ_RUNTIME" --ramp_time="$RAMP" --size="$SIZE_BYTES" --norandommap ||
                fail "$jname on $k failed"
            t1=$(now)
            c1=$(proc_cpu_ticks "$DR_PID")
            read -r iops bw p50 p99 _ fcpu <<<"$(fio_summary "$out")"
            log "    $iops IOPS, $((bw / 1024)) MiB/s, p50 ${p50} us, p99 ${p99} us"
            result kind=read job="$jname" target="$k" iops="$iops" bw_kib="$bw" p50_us="$p50" p99_us="$p99" \
                replica_cpu_pct="$("$PY" -c "print(100.0 * $((c1 - c0)) / $(getconf CLK_TCK) / ($t1 - $t0))")" fio_cpu_pct="$fcpu" point="$at"
        done
    done
    stop_pid "$qpid" 10
    timeout 60 "$TANDEM_BIN" test stop "$GROUP" --config "$(cfg dr)" >>"$MDIR/test-stop.txt" 2>&1 ||
        fail "tandem test stop failed: $(tail -n 3 "$MDIR/test-stop.txt")"
}

# ---------------------------------------------------------------------------
# one mode: off or on
# ---------------------------------------------------------------------------
run_mode() { # run_mode off|on PORT
    local mode=$1 port=$2 ret after_prefill=""
    if [[ $mode == on ]]; then ret=24h; else ret=0s; fi
    MDIR=$WORK/$mode
    mkdir -p "$MDIR"
    log "=== history $mode (retention = \"$ret\") ==="
    start_sites "$ret" "$port"
    wait_repl "initial sync"
    wa_run "$mode" sparse "$WA_SPARSE_BYTES"
    log "prefill [$mode]: the whole $SIZE volume, sequential 1M QD8"
    bench_fio "$MDIR/prefill.json" --name=prefill --ioengine=nbd --uri="$(nbd_uri "$(sock ny)" "$EXPORT")" \
        --rw=write --bs=1M --iodepth=8 --numjobs=1 --size="$SIZE_BYTES" || fail "prefill failed"
    wait_repl "catching up after the prefill"
    result kind=prefill mode="$mode" fio_bytes="$(fio_written "$MDIR/prefill.json")"
    if [[ $mode == on ]]; then
        # the newest point now is the volume right after the prefill: part 4 reads it
        sleep 1.5
        after_prefill=$(point_time -1)
        [[ -n "$after_prefill" ]] || fail "no recovery point after the prefill"
        log "point after the prefill: $after_prefill"
    fi
    wa_run "$mode" full "$WA_BYTES"
    lag_run "$mode"
    if [[ $mode == on ]]; then
        open_run
        read_run "$after_prefill"
        log "history dir at the end: $(($(dir_bytes "$(data dr)/replica/$GROUP/history") / 1048576)) MiB"
    fi
    status_of dr >"$MDIR/status-dr-end.json" 2>/dev/null || true
    stop_sites
    grep -E ' (WARN|ERROR) |panicked' "$MDIR"/ny.log "$MDIR"/dr.log >"$MDIR/log-problems.txt" 2>/dev/null || true
    if ((!KEEP)); then find "$MDIR" -name '*.img' -delete 2>/dev/null || true; fi
}

T_START=$SECONDS
log "work dir $WORK ($fstype)"
run_mode off "$PORT_BASE"
run_mode on $((PORT_BASE + 10))

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
for v in SIZE WA_SPARSE_WRITES WA_WRITES LAG_RUNTIME LAG_RATE READ_RUNTIME RAMP WAIT_TIMEOUT; do
    params+=("$v=${!v}")
done
"$PY" - "$RESULTS" "$OUT" "$tandem_rev" "$(fio --version)" "$(uname -r)" "$(nproc)" "$fstype" \
    "$((SECONDS - T_START))" "$WORK" "${params[@]}" <<'PYEOF'
import json, os, sys, datetime
res_path, out_path, rev, fio_ver, kernel, ncpu, fstype, elapsed, work = sys.argv[1:10]
params = dict(a.split("=", 1) for a in sys.argv[10:])
res = [json.loads(l) for l in open(res_path)]
def one(**kw):
    for r in res:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None
M = 2 ** 20
rows = []
for vol, label in (("sparse", "fresh sparse volume"), ("full", "fully written volume")):
    on, off = one(kind="wa", mode="on", vol=vol), one(kind="wa", mode="off", vol=vol)
    if not (on and off):
        continue
    # Device bytes (blkio) when counted: write_bytes over-counts on this
    # kernel (see bench/README.md); the headline is the device's.
    dev = lambda r: (r.get("blkio_bytes") or r["write_bytes"]) / r["fio_bytes"]
    a_on, a_off = dev(on), dev(off)
    for r in (on, off):
        r["amplification"] = r["write_bytes"] / r["fio_bytes"]
    rows.append([f"1: replica device bytes written per replicated byte, {label}", f"{a_on:.2f}",
                 f"{a_off:.2f} (history off)", f"{a_on / a_off:.2f}x", "<= 2.0 (on)",
                 "ok" if a_on <= 2.0 else "ABOVE",
                 (f"write_bytes (/proc/PID/io): {on['write_bytes']/on['fio_bytes']:.2f} on, "
                  f"{off['write_bytes']/off['fio_bytes']:.2f} off; " if on.get("blkio_bytes") else "") +
                 f"on: {on['write_bytes']/M:.0f} MiB written for {on['fio_bytes']/M:.0f} MiB "
                 f"(history dir +{on['history_growth']/M:.0f} MiB, cancelled {on['cancelled_write_bytes']/M:.0f} MiB, "
                 f"read {on['read_bytes']/M:.0f} MiB); off: {off['write_bytes']/M:.0f} MiB for "
                 f"{off['fio_bytes']/M:.0f} MiB (cancelled {off['cancelled_write_bytes']/M:.0f} MiB); "
                 f"catch-up after fio {on['catchup_s']:.1f}s on, {off['catchup_s']:.1f}s off"])
on, off = one(kind="lag", mode="on"), one(kind="lag", mode="off")
if on and off:
    rows.append([f"2: async lag p99 @ {params['LAG_RATE']}/s 4k-64k", f"{on['p99']:.3f} s",
                 f"{off['p99']:.3f} s (history off)", "-", "p99 <= 1 s (on)",
                 "ok" if on["p99"] <= 1.0 and not on["sample_errors"] else "ABOVE",
                 f"on: p50 {on['p50']:.3f} max {on['max']:.3f}, fio {on['fio_mib_s']:.1f} MiB/s, replica CPU "
                 f"{on['replica_cpu_pct']:.0f}%, {on['samples']} samples; off: p50 {off['p50']:.3f} max "
                 f"{off['max']:.3f}, fio {off['fio_mib_s']:.1f} MiB/s, replica CPU {off['replica_cpu_pct']:.0f}%"])
if on and off and on.get("amplification") and off.get("amplification"):
    d_on = (on.get("blkio_bytes") or on["write_bytes"]) / on["fio_bytes"]
    d_off = (off.get("blkio_bytes") or off["write_bytes"]) / off["fio_bytes"]
    rows.append([f"1: replica device bytes written per replicated byte, during 2 (full volume, {params['LAG_RATE']}/s)",
                 f"{d_on:.2f}", f"{d_off:.2f} (history off)",
                 f"{d_on / d_off:.2f}x", "<= 2.0 (on)",
                 "ok" if d_on <= 2.0 else "ABOVE",
                 f"write_bytes (/proc/PID/io): {on['amplification']:.2f} on, {off['amplification']:.2f} off; "
                 f"{on['fio_bytes']/M:.0f} MiB replicated on, {off['fio_bytes']/M:.0f} MiB off"])
o = one(kind="open")
if o:
    rows.append(["3: open a test view at the oldest point (cold cache)", f"{o['read_s']:.2f} s", "-", "-",
                 "<= 5 s", "ok" if o["read_s"] <= 5.0 else "ABOVE",
                 f"API answered after {o['cli_s']:.2f} s; {o['history_bytes']/M:.0f} MiB of undo log and "
                 f"~{o['written_since_bytes']/M:.0f} MiB of writes after the point ({o['points']} points, "
                 f"{o['point']} .. {o['newest']})"])
for job, label, f in (("randread-4k-qd16", "4k random read QD16", lambda r: f"{r['iops']/1000:.1f}k IOPS"),
                      ("read-1m-qd8", "1M sequential read QD8", lambda r: f"{r['bw_kib']/1024:.0f} MiB/s")):
    v, i = one(kind="read", job=job, target="view"), one(kind="read", job=job, target="image")
    l = one(kind="read", job=job, target="latest")
    if not (v and i):
        continue
    key = "iops" if job.startswith("randread") else "bw_kib"
    ratio = v[key] / i[key] if i[key] else 0.0
    rows.append([f"4: {label}, test view vs replica image", f(v), f(i) + " (qemu-nbd -r)", f"{ratio:.2f}x",
                 ">= 0.8x", "ok" if ratio >= 0.8 else "BELOW",
                 f"p99 {v['p99_us']:.0f} vs {i['p99_us']:.0f} us; replica agent CPU {v['replica_cpu_pct']:.0f}% "
                 f"while serving the view; point {v['point']}"
                 + (f"; a test view at the latest point (reads from the image, same server): {f(l)}, "
                    f"p99 {l['p99_us']:.0f} us" if l else "")])
head = ["measure", "history on", "peer", "ratio", "target", "ok?"]
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
    print(f"  {r[0]}: {r[6]}")
probs = {}
for mode in ("off", "on"):
    try:
        lines = open(os.path.join(work, mode, "log-problems.txt")).read().splitlines()
    except OSError:
        lines = []
    if lines:
        probs[mode] = lines[:20]
        print(f"\n{len(lines)} WARN/ERROR line(s) in the agent logs with history {mode}; first:")
        for l in lines[:4]:
            print(f"    {l[:220]}")
doc = {"benchmark": "history", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
       "tandem_rev": rev, "fio": fio_ver, "kernel": kernel, "cpus": int(ncpu), "work_fs": fstype,
       "elapsed_s": int(elapsed), "params": params,
       "rows": [dict(zip(head + ["note"], r)) for r in rows], "results": res, "log_problems": probs,
       "note": "figures from one run; machines are noisy"}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
print(f"results: {out_path}")
print("(figures from one run; machines are noisy)")
PYEOF
