#!/usr/bin/env bash
# bench/nbd.sh — NBD front benchmark: the Tandem agent vs qemu-nbd, side by
# side in one run (SPEC §6). Not a test: run it by hand, as root.
#
#   bench/nbd.sh                   # everything (~5 min with the defaults)
#   bench/nbd.sh --only qemu       # just the qemu-nbd side (proves the harness)
#   bench/nbd.sh --only tandem     # just the Tandem side (both variants + RSS)
#   RUNTIME=60 SIZE=4GiB bench/nbd.sh
#
# See bench/README.md for what it measures and the targets.
set -euo pipefail

BENCH_NAME=nbd
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/nbd.sh [--only qemu|tandem] [--skip LIST] [--keep] [-h]

Compares the Tandem agent's NBD export with qemu-nbd (--cache=none
--aio=native) on the same kind of file, with fio's nbd engine:
  4k randwrite QD16, 4k randread QD16, 1M sequential write QD8,
then measures the agent's RSS with 8 idle 1 GiB volumes.

Servers: qemu     qemu-nbd
         tandem   tandem agent, group with no replica
         replica  tandem agent, group with one replica site that is never
                  started (changes are captured and queued for it)

Options:
  --only qemu|tandem  run only qemu-nbd, or only the Tandem parts
                      (tandem, replica, rss)
  --skip LIST         comma-separated parts to leave out: qemu,tandem,replica,rss
  --keep              keep the work directory (logs, configs) at exit
  -h, --help          this text

Environment:
  RUNTIME    seconds per fio job (default 20)
  RAMP       fio ramp time in seconds, not measured (default 2)
  REPEAT     rounds of all jobs; the report takes the median (default 1)
  SIZE       volume size (default 2GiB)
  OUT        JSON result path (default /tmp/tandem-bench-nbd-<date>.json)
  WORK_BASE  parent of the work dir (default /var/tmp; must be a real disk)
  PORT_BASE  first TCP port for the agents (default 17450)
  TANDEM_BIN use this tandem binary instead of building target/release/tandem
EOF
}

# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
RUN_QEMU=1 RUN_QEMUWB=1 RUN_TANDEM=1 RUN_REPLICA=1 RUN_RSS=1 KEEP=0
while (($# > 0)); do
    case "$1" in
    --only)
        (($# >= 2)) || die "--only needs an argument (qemu|tandem)"
        case "$2" in
        qemu) RUN_QEMU=1 RUN_QEMUWB=1 RUN_TANDEM=0 RUN_REPLICA=0 RUN_RSS=0 ;;
        tandem) RUN_QEMU=0 RUN_QEMUWB=0 RUN_TANDEM=1 RUN_REPLICA=1 RUN_RSS=1 ;;
        *) die "--only: unknown value '$2' (qemu|tandem)" ;;
        esac
        shift 2
        ;;
    --only=*) set -- --only "${1#--only=}" "${@:2}" ;;
    --skip)
        (($# >= 2)) || die "--skip needs an argument"
        IFS=, read -r -a _skips <<<"$2"
        for s in "${_skips[@]}"; do
            case "$s" in
            qemu) RUN_QEMU=0 ;;
            qemuwb) RUN_QEMUWB=0 ;;
            tandem) RUN_TANDEM=0 ;;
            replica) RUN_REPLICA=0 ;;
            rss) RUN_RSS=0 ;;
            *) die "--skip: unknown part '$s' (qemu,qemuwb,tandem,replica,rss)" ;;
            esac
        done
        shift 2
        ;;
    --skip=*) set -- --skip "${1#--skip=}" "${@:2}" ;;
    --keep) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
done
((RUN_QEMU + RUN_TANDEM + RUN_REPLICA + RUN_RSS > 0)) || die "nothing left to run"

RUNTIME=${RUNTIME:-20}
REPEAT=${REPEAT:-1}
RAMP=${RAMP:-2}
SIZE=${SIZE:-2GiB}
WORK_BASE=${WORK_BASE:-/var/tmp}
PORT_BASE=${PORT_BASE:-17450}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/tandem-bench-nbd-$STAMP.json}
if ! [[ "$RUNTIME" =~ ^[0-9]+$ ]] || ((RUNTIME == 0)); then die "RUNTIME must be a positive integer (seconds)"; fi
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be an integer (seconds)"
if ! [[ "$REPEAT" =~ ^[0-9]+$ ]] || ((REPEAT == 0)); then die "REPEAT must be a positive integer"; fi
REPEAT_TAG=
((REPEAT == 1)) || REPEAT_TAG=1
[[ "$PORT_BASE" =~ ^[0-9]+$ ]] || die "PORT_BASE must be a port number"
SIZE_BYTES=$(parse_size "$SIZE")
SIZE_CFG=$(size_for_config "$SIZE_BYTES")
READY_TIMEOUT=30
EXPORT=vol0

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
need_cmd fio fio
need_cmd nbdinfo libnbd-bin
need_cmd timeout coreutils
((RUN_QEMU)) && need_cmd qemu-nbd qemu-utils
PY=$(bench_python)
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (fio --enghelp=nbd fails)"
[[ $(id -u) -eq 0 ]] || warn "not root: page cache cannot be dropped between runs"

if ((RUN_TANDEM || RUN_REPLICA || RUN_RSS)); then
    if [[ -n "${TANDEM_BIN:-}" ]]; then
        # an already built binary (skips the build)
        [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not executable"
        "$TANDEM_BIN" agent --help >/dev/null 2>&1 || die "'$TANDEM_BIN agent --help' fails"
    else
        TANDEM_BIN=$(build_tandem "$REPO_ROOT")
    fi
    log "tandem: $TANDEM_BIN"
fi

# ---------------------------------------------------------------------------
# work dir and cleanup
# ---------------------------------------------------------------------------
[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-nbd.XXXXXX")
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

fstype=$(stat -f -c %T "$WORK")
case "$fstype" in
tmpfs | ramfs) warn "$WORK is on $fstype, not a real disk: figures will not mean much (set WORK_BASE)" ;;
esac
n_images=$((RUN_QEMU + RUN_TANDEM + RUN_REPLICA))
need_kib=$((n_images * SIZE_BYTES * 3 / 2 / 1024 + 1024 * 1024))
avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
((avail_kib >= need_kib)) ||
    die "not enough free space in $WORK_BASE: need ~$((need_kib / 1024)) MiB, have $((avail_kib / 1024)) MiB"

RESULTS="$WORK/results.tsv" # server job iops bw_kib p50_us p99_us cpu_pct
: >"$RESULTS"

# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------
declare -A SRV_PID SRV_SOCK SRV_LOG SRV_LABEL
SRV_LABEL[qemu]="qemu-nbd"
SRV_LABEL[qemuwb]="qemu-nbd writeback (reference)"
SRV_LABEL[tandem]="tandem (no replica configured)"
SRV_LABEL[replica]="tandem (capture for 1 offline replica)"

# start_qemu ID CACHE_ARGS...: qemu-nbd on its own image.
start_qemu() {
    local id=$1
    shift
    local dir="$WORK/$id"
    mkdir -p "$dir"
    truncate -s "$SIZE_BYTES" "$dir/vol0.img"
    SRV_SOCK[$id]="$dir/vol0.sock"
    SRV_LOG[$id]="$dir/qemu-nbd.log"
    qemu-nbd "$@" -f raw --persistent --shared=16 \
        -x "$EXPORT" --socket="${SRV_SOCK[$id]}" "$dir/vol0.img" \
        </dev/null >"${SRV_LOG[$id]}" 2>&1 &
    SRV_PID[$id]=$!
    track_pid "${SRV_PID[$id]}"
}

# write_tandem_config FILE DATA_DIR LISTEN_PORT API_PORT WITH_REPLICA NVOL VOLSIZE
write_tandem_config() {
    local file=$1 data=$2 lport=$3 aport=$4 with_replica=$5 nvol=$6 vsize=$7
    local vols="" i
    for ((i = 0; i < nvol; i++)); do
        vols+="${vols:+, }{ name = \"vol$i\", size = \"$vsize\" }"
    done
    {
        printf '[site]\nname = "bench"\ndata_dir = "%s"\n' "$data"
        printf 'listen = "127.0.0.1:%d"\napi = "127.0.0.1:%d"\n\n' "$lport" "$aport"
        printf '[tls]\nmode = "off"\n\n[coordinator]\nkind = "none"\n\n'
        printf '[[peer]]\nname = "bench"\naddress = "127.0.0.1:%d"\n\n' "$lport"
        if ((with_replica)); then
            # A replica site that is never started: changes are captured and
            # queued for it, as in production.
            printf '[[peer]]\nname = "dr"\naddress = "127.0.0.1:%d"\n\n' $((PORT_BASE + 100))
        fi
        printf '[[group]]\nname = "g"\nprimary = "bench"\n'
        if ((with_replica)); then
            printf 'replicas = [ { site = "dr", priority = 1 } ]\n'
        fi
        printf 'volumes = [ %s ]\n' "$vols"
    } >"$file"
}

# start_tandem ID WITH_REPLICA LISTEN_PORT
start_tandem() {
    local id=$1 with_replica=$2 lport=$3
    local dir="$WORK/$id"
    mkdir -p "$dir/data"
    write_tandem_config "$dir/tandem.toml" "$dir/data" "$lport" $((lport + 1)) "$with_replica" 1 "$SIZE_CFG"
    SRV_SOCK[$id]="$dir/data/nbd/$EXPORT.sock"
    SRV_LOG[$id]="$dir/agent.log"
    NO_COLOR=1 "$TANDEM_BIN" agent --config "$dir/tandem.toml" </dev/null >"${SRV_LOG[$id]}" 2>&1 &
    SRV_PID[$id]=$!
    track_pid "${SRV_PID[$id]}"
}

SERVERS=()
((RUN_QEMU)) && SERVERS+=(qemu)
((RUN_QEMUWB)) && SERVERS+=(qemuwb)
((RUN_TANDEM)) && SERVERS+=(tandem)
((RUN_REPLICA)) && SERVERS+=(replica)

fio_run() { # fio_run OUTFILE ARGS... ; runs fio in the background so signals end it at once
    local out=$1
    shift
    fio --output-format=json --output="$out" "$@" </dev/null >"$out.stdout" 2>&1 &
    local pid=$!
    track_pid "$pid"
    local rc=0
    wait "$pid" || rc=$?
    untrack_pid "$pid"
    if ((rc != 0)); then
        warn "fio failed (exit $rc): fio $*"
        tail -n 20 "$out.stdout" "$out" >&2 2>/dev/null || true
        return 1
    fi
}

# cpu_pct TICKS0 TICKS1 T0 T1 -> % of one core used between two samples
CLK_TCK=$(getconf CLK_TCK)
cpu_pct() {
    "$PY" -c 'import sys; a,b,t0,t1,hz=map(float,sys.argv[1:]); print("%.1f" % (100*(b-a)/hz/max(t1-t0,1e-9)))' \
        "$1" "$2" "$3" "$4" "$CLK_TCK"
}

# run_job ID JOB RW BS IODEPTH ROUND: one measured fio run; appends a line to
# $RESULTS: server job iops bw_kib p50_us p99_us cpu_pct
run_job() {
    local id=$1 jname=$2 rw=$3 bs=$4 qd=$5 r=$6
    local other t0 t1 cpu bg out
    local -A ticks0=()
    drop_caches
    for other in "${SERVERS[@]}"; do ticks0[$other]=$(proc_cpu_ticks "${SRV_PID[$other]}"); done
    log "$jname on ${SRV_LABEL[$id]}${REPEAT_TAG:+ (round $r/$REPEAT)}"
    t0=$(date +%s.%N)
    out="$WORK/$id-$jname-$r.json"
    fio_run "$out" --name="$jname" --ioengine=nbd \
        --uri="$(nbd_uri "${SRV_SOCK[$id]}" "$EXPORT")" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --size="$SIZE_BYTES" --norandommap ||
        die "$jname on ${SRV_LABEL[$id]} failed (server log: ${SRV_LOG[$id]})"
    t1=$(date +%s.%N)
    kill -0 "${SRV_PID[$id]}" 2>/dev/null || die "${SRV_LABEL[$id]} died during $jname (log: ${SRV_LOG[$id]})"
    # server CPU over the whole fio run (ramp included)
    cpu=$(cpu_pct "${ticks0[$id]}" "$(proc_cpu_ticks "${SRV_PID[$id]}")" "$t0" "$t1")
    for other in "${SERVERS[@]}"; do
        [[ "$other" == "$id" ]] && continue
        bg=$(cpu_pct "${ticks0[$other]}" "$(proc_cpu_ticks "${SRV_PID[$other]}")" "$t0" "$t1")
        ((${bg%.*} < 5)) ||
            warn "idle ${SRV_LABEL[$other]} used ${bg}% CPU during $jname on ${SRV_LABEL[$id]}: figures may be disturbed"
    done
    "$PY" - "$out" "$id" "$jname" "$cpu" >>"$RESULTS" <<'PYEOF'
import json, sys
path, server, job, cpu = sys.argv[1:5]
with open(path) as f:
    text = f.read()
# fio may print notes before the JSON object
data = json.loads(text[text.index("{"):])
j = data["jobs"][0]
if j.get("error", 0):
    sys.exit(f"fio reported error {j['error']} in {path}")
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
pct = side.get("clat_ns", {}).get("percentile", {})
p50 = pct.get("50.000000", 0) / 1000.0
p99 = pct.get("99.000000", 0) / 1000.0
print(f"{server}\t{job}\t{side['iops']:.1f}\t{side['bw']}\t{p50:.1f}\t{p99:.1f}\t{cpu}")
PYEOF
    tail -n 1 "$RESULTS" | awk -F'\t' '{ printf "    %.0f IOPS, %.1f MiB/s, p50 %.0f us, p99 %.0f us, server CPU %s%%\n", $3, $4 / 1024, $5, $6, $7 }' >&2
}

if ((${#SERVERS[@]} > 0)); then
    est=$((REPEAT * ${#SERVERS[@]} * 3 * (RUNTIME + RAMP)))
    log "servers: ${SERVERS[*]}; size $SIZE; ${RUNTIME}s per job (+${RAMP}s ramp); measuring ~$((est / 60))m$((est % 60))s plus prefill"
    log "work dir: $WORK ($fstype)"
    for id in "${SERVERS[@]}"; do
        case "$id" in
        qemu) start_qemu qemu --cache=none --aio=native ;;
        qemuwb) start_qemu qemuwb --cache=writeback --aio=threads ;;
        tandem) start_tandem tandem 0 "$PORT_BASE" ;;
        replica) start_tandem replica 1 $((PORT_BASE + 10)) ;;
        esac
    done
    for id in "${SERVERS[@]}"; do
        wait_nbd_ready "${SRV_PID[$id]}" "${SRV_SOCK[$id]}" "$EXPORT" "$READY_TIMEOUT" "${SRV_LOG[$id]}" ||
            die "${SRV_LABEL[$id]} did not come up (limit ${READY_TIMEOUT}s; see above)"
        got=$(nbdinfo --size "$(nbd_uri "${SRV_SOCK[$id]}" "$EXPORT")")
        [[ "$got" == "$SIZE_BYTES" ]] ||
            die "${SRV_LABEL[$id]} exports $got bytes, expected $SIZE_BYTES"
        log "${SRV_LABEL[$id]}: ready (pid ${SRV_PID[$id]}, $got bytes)"
    done

    # Prefill every image fully through its own server, so reads hit data.
    for id in "${SERVERS[@]}"; do
        log "prefill ${SRV_LABEL[$id]}: $SIZE sequential 1M QD8"
        t0=$SECONDS
        fio_run "$WORK/prefill-$id.json" --name=prefill --ioengine=nbd \
            --uri="$(nbd_uri "${SRV_SOCK[$id]}" "$EXPORT")" \
            --rw=write --bs=1M --iodepth=8 --numjobs=1 --size="$SIZE_BYTES" ||
            die "prefill of ${SRV_LABEL[$id]} failed"
        log "prefill ${SRV_LABEL[$id]}: done in $((SECONDS - t0))s"
    done

    # Jobs: name rw bs iodepth. Servers run one at a time; the order rotates
    # from job to job (and round to round), and caches are dropped before
    # every run.
    JOBS=("randwrite-4k-qd16 randwrite 4k 16" "randread-4k-qd16 randread 4k 16" "write-1m-qd8 write 1M 8")
    n=${#SERVERS[@]}
    for ((r = 1; r <= REPEAT; r++)); do
        for ((j = 0; j < ${#JOBS[@]}; j++)); do
            read -r jname rw bs qd <<<"${JOBS[$j]}"
            for ((k = 0; k < n; k++)); do
                run_job "${SERVERS[$(((j + r - 1 + k) % n))]}" "$jname" "$rw" "$bs" "$qd" "$r"
            done
        done
    done

    for id in "${SERVERS[@]}"; do
        stop_pid "${SRV_PID[$id]}" 15
        if [[ "$id" != qemu && "$STOP_STATUS" != 0 ]]; then
            warn "${SRV_LABEL[$id]} did not exit cleanly on SIGTERM (status: $STOP_STATUS); log: ${SRV_LOG[$id]}"
            tail -n 10 "${SRV_LOG[$id]}" >&2 || true
        fi
    done
fi

# ---------------------------------------------------------------------------
# RSS with 8 idle volumes
# ---------------------------------------------------------------------------
RSS_KIB="" HWM_KIB=""
if ((RUN_RSS)); then
    dir="$WORK/rss"
    mkdir -p "$dir/data"
    write_tandem_config "$dir/tandem.toml" "$dir/data" $((PORT_BASE + 20)) $((PORT_BASE + 21)) 0 8 1GiB
    NO_COLOR=1 "$TANDEM_BIN" agent --config "$dir/tandem.toml" </dev/null >"$dir/agent.log" 2>&1 &
    rss_pid=$!
    track_pid "$rss_pid"
    log "RSS: tandem agent with 8 idle 1 GiB volumes (pid $rss_pid)"
    deadline=$((SECONDS + READY_TIMEOUT))
    for ((i = 0; i < 8; i++)); do
        left=$((deadline - SECONDS))
        ((left > 0)) || left=1
        wait_nbd_ready "$rss_pid" "$dir/data/nbd/vol$i.sock" "vol$i" "$left" "$dir/agent.log" ||
            die "tandem (8 volumes) did not serve vol$i (limit ${READY_TIMEOUT}s; see above)"
    done
    sleep 2 # let start-up settle: the figure is for an idle agent
    RSS_KIB=$(proc_rss_kib "$rss_pid" VmRSS)
    HWM_KIB=$(proc_rss_kib "$rss_pid" VmHWM)
    log "RSS: VmRSS $((RSS_KIB / 1024)) MiB (peak $((HWM_KIB / 1024)) MiB), target <= 64 MiB"
    stop_pid "$rss_pid" 15
    [[ "$STOP_STATUS" == 0 ]] || warn "tandem (8 volumes) did not exit cleanly on SIGTERM (status: $STOP_STATUS); log: $dir/agent.log"
fi

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
if tandem_rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null || tandem_rev="$tandem_rev+dirty"
else
    tandem_rev=none
fi
qemu_ver=$(qemu-nbd --version 2>/dev/null | head -n 1 || true)
mkdir -p "$(dirname "$OUT")"
"$PY" - "$RESULTS" "$OUT" "$RUNTIME" "$RAMP" "$SIZE_BYTES" "${RSS_KIB:-}" "${HWM_KIB:-}" \
    "$tandem_rev" "$qemu_ver" "$(fio --version)" "$(uname -r)" "$(nproc)" "$fstype" "$REPEAT" <<'PYEOF'
import json, sys, datetime, statistics
(res_path, out_path, runtime, ramp, size, rss, hwm,
 rev, qemu_ver, fio_ver, kernel, ncpu, fstype, repeat) = sys.argv[1:15]

JOBS = [("randwrite-4k-qd16", "4k randwrite QD16"),
        ("randread-4k-qd16", "4k randread QD16"),
        ("write-1m-qd8", "1M seq write QD8")]
SERVERS = [("qemu", "qemu-nbd"),
           ("qemuwb", "qemu-nbd writeback (reference)"),
           ("tandem", "tandem (no replica configured)"),
           ("replica", "tandem (capture for 1 offline replica)")]

runs = {}
with open(res_path) as f:
    for line in f:
        s, job, iops, bw, p50, p99, cpu = line.rstrip("\n").split("\t")
        runs.setdefault(s, {}).setdefault(job, []).append({
            "iops": float(iops), "bw_mib_s": float(bw) / 1024.0,
            "clat_p50_us": float(p50), "clat_p99_us": float(p99),
            "server_cpu_pct": float(cpu)})

# one figure per server and job: the median over rounds (REPEAT), per field
results = {}
for s, jobs in runs.items():
    for job, rs_ in jobs.items():
        med = {k: statistics.median(r[k] for r in rs_) for k in rs_[0]}
        med["rounds"] = len(rs_)
        med["iops_per_round"] = [r["iops"] for r in rs_]
        results.setdefault(s, {})[job] = med

def fmt(s, job):
    r = results.get(s, {}).get(job)
    if r is None:
        return "-"
    if job.startswith("write-1m"):
        return f"{r['bw_mib_s']:.0f} MiB/s"
    return f"{r['iops'] / 1000:.1f}k IOPS"

def ratio(a, b, job):
    ra, rb = results.get(a, {}).get(job), results.get(b, {}).get(job)
    if ra is None or rb is None or rb["iops"] <= 0:
        return None
    return ra["iops"] / rb["iops"]

def rs(x, target):
    if x is None:
        return "-"
    return f"{x:.2f}x {'ok' if x >= target else 'BELOW'}"

ratios = {}
rows = []
for job, label in JOBS:
    if not any(job in results.get(s, {}) for s, _ in SERVERS):
        continue
    t_q = ratio("tandem", "qemu", job)
    r_q = ratio("replica", "qemu", job)
    r_t = ratio("replica", "tandem", job)
    t_w = ratio("tandem", "qemuwb", job)
    ratios[job] = {"tandem_vs_qemu": t_q, "replica_vs_qemu": r_q,
                   "replica_vs_tandem": r_t, "tandem_vs_qemu_writeback": t_w}
    rows.append([label, fmt("qemu", job), fmt("tandem", job), rs(t_q, 1.0),
                 fmt("replica", job), rs(r_q, 1.0), rs(r_t, 0.9),
                 fmt("qemuwb", job), "-" if t_w is None else f"{t_w:.2f}x"])

print()
if rows:
    head = ["job", "qemu-nbd", "tandem", "tandem/qemu", "tandem+1r",
            "tandem+1r/qemu", "tandem+1r/tandem", "qemu-wb", "tandem/qemu-wb"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    print()
    print("targets (SPEC §6): tandem/qemu >= 1.0x on each job (capture on);")
    print("  tandem+1r/tandem >= 0.9x is the target for one LIVE async replica on")
    print("  loopback; here the replica is offline (capture + queueing only): informational.")
    print("  tandem+1r = tandem (capture for 1 offline replica)")
    print("  qemu-wb = qemu-nbd --cache=writeback --aio=threads: same durability")
    print("  contract as tandem (page cache, fsync on FLUSH/FUA); a reference, not the SPEC peer.")
    print()
    print("details (latency is fio completion latency; server CPU is % of one core"
          + (f"; medians of {repeat} rounds" if int(repeat) > 1 else "") + "):")
    for s, slabel in SERVERS:
        for job, label in JOBS:
            r = results.get(s, {}).get(job)
            if r:
                print(f"  {slabel:40s} {label:18s} {r['iops']:9.0f} IOPS {r['bw_mib_s']:8.1f} MiB/s"
                      f"  p50 {r['clat_p50_us']:7.0f} us  p99 {r['clat_p99_us']:7.0f} us"
                      f"  cpu {r['server_cpu_pct']:5.1f}%"
                      + (("  rounds: " + " ".join(f"{x:.0f}" for x in r["iops_per_round"]))
                         if r["rounds"] > 1 else ""))

rss_doc = None
if rss:
    rss_mib = int(rss) / 1024.0
    rss_doc = {"vm_rss_mib": round(rss_mib, 1), "vm_hwm_mib": round(int(hwm) / 1024.0, 1),
               "volumes": 8, "volume_size": "1GiB", "target_mib": 64,
               "ok": rss_mib <= 64}
    print()
    print(f"agent RSS, 8 idle volumes: {rss_mib:.1f} MiB (peak {int(hwm)/1024:.1f} MiB); "
          f"target <= 64 MiB: {'ok' if rss_mib <= 64 else 'ABOVE'}")

doc = {
    "benchmark": "nbd",
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "tandem_rev": rev, "qemu_nbd": qemu_ver, "fio": fio_ver,
    "kernel": kernel, "cpus": int(ncpu), "work_fs": fstype,
    "params": {"runtime_s": int(runtime), "ramp_s": int(ramp), "size_bytes": int(size),
               "repeat": int(repeat),
               "qemu_nbd_args": "--cache=none --aio=native -f raw --persistent --shared=16",
               "fio": "ioengine=nbd numjobs=1 norandommap time_based"},
    "servers": {k: v for k, v in SERVERS},
    "results": results,
    "ratios": ratios,
    "targets": {"tandem_vs_qemu": 1.0, "replica_vs_tandem": 0.9, "rss_mib": 64},
    "rss": rss_doc,
    "note": "ratios from one run; machines are noisy",
}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print()
print(f"results: {out_path}")
print("(ratios from one run; machines are noisy)")
PYEOF
