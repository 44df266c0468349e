#!/usr/bin/env bash
# bench/vms.sh — protected VMs (SPEC §6, issue 9): the guest's pause when a
# running VM is onboarded, guest write throughput through Tandem vs a local
# raw file, and failover of a protected VM. Real libvirt daemons (one per
# simulated site), real TCG guests, real agents; the work is done by the
# Rust program crates/vmkit/examples/vms_bench.rs.
#
#   bench/vms.sh                       # every part (~15 min on 2 cores)
#   bench/vms.sh --only throughput     # one part: pivot | throughput | failover
#   TRIALS=2 FO_TRIALS=2 bench/vms.sh  # a quick check
#
# Not a test: run it by hand, as root. A figure that misses its target is a
# result; only a run that cannot be carried out (a tool missing, an agent or
# guest that does not come up, a wait that runs out) exits non-zero.
set -euo pipefail

BENCH_NAME=vms
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$REPO_ROOT/bench/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/vms.sh [--only LIST] [--skip LIST] [--keep] [-h]

Parts (default: all three, in this order):
  pivot       TRIALS x for each mode of PIVOT_MODES: a TCG guest at ny
              writing fsync()ed files (ACK lines on its console) on a local
              raw file is protected: `tandem protect web01 --replica chicago
              --mode MODE`. Figures: the agent's pivot (`tandem status
              --json`: vm.onboarding.disks[0].pivot_ms) and the guest's
              longest gap between two ACKs across the protect command, beside
              its usual gap before (target: pause <= 1 s).
  throughput  the same guest image running `dd bs=1M oflag=direct
              conv=fsync` of DD_MIB MiB to an ext4 file, DD_ROUNDS times (MB/s
              by the guest's clock): on a local raw file; on a Tandem volume
              (Tandem's disk form on the primary's NBD socket) with one async
              replica; with one sync replica. Ratios to the local file.
  failover    FO_TRIALS x a fresh cluster ny, chicago (priority 1), seattle
              (2) with a `tandem witness`: web01 boots at ny on a local file
              (the plain boot: QEMU running -> first write is the TCG
              baseline), `tandem protect web01 --replica chicago --replica
              seattle --mode FO_MODE`; then SIGKILL of ny's agent and ny's
              host lost (its libvirtd and QEMU killed). Figures: kill -> web01's
              QEMU running at the new site (target: median <= 5 s), kill ->
              the guest's first write there.

Options:
  --only LIST   parts to run, comma-separated
  --skip LIST   parts to leave out
  --keep        keep the work directory (configs, agent logs, consoles)
  -h, --help    this text

Environment (defaults in brackets):
  TRIALS        pivot trials per mode [5]
  PIVOT_MODES   [async,sync]
  DISK_MIB      the guest's disk in the pivot and failover parts [64]
  DD_MIB        MiB written per dd round [128]
  DD_ROUNDS     dd rounds per case (the median is reported) [5]
  FO_TRIALS     failover trials [5]
  FO_MODE       the failover group's mode [sync]
  LEASE_TTL     [coordinator] lease_ttl [3s]
  CPUS          taskset CPU list for everything the bench starts [all]
  OUT           JSON result [/tmp/tandem-bench-vms-<date>.json]
  WORK_BASE     parent of the work dir (a disk file system: QEMU opens
                local disks with O_DIRECT) [/var/tmp]
  TANDEM_BIN    tandem binary; default: cargo build --release -p tandem and
                ${CARGO_TARGET_DIR:-target}/release/tandem
EOF
}

ALL_PARTS=(pivot throughput failover)
declare -A RUN=([pivot]=1 [throughput]=1 [failover]=1)
KEEP=0
parts_list() {
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
        (($# >= 2)) || die "--only needs a list (e.g. pivot)"
        for x in "${ALL_PARTS[@]}"; do RUN[$x]=0; done
        parts_list "$2" 1
        shift 2
        ;;
    --only=*) set -- --only "${1#--only=}" "${@:2}" ;;
    --skip)
        (($# >= 2)) || die "--skip needs a list (e.g. failover)"
        parts_list "$2" 0
        shift 2
        ;;
    --skip=*) set -- --skip "${1#--skip=}" "${@:2}" ;;
    --keep) KEEP=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && exit 2 ;;
    esac
done
SEL=()
for x in "${ALL_PARTS[@]}"; do ((RUN[$x])) && SEL+=("$x"); done
((${#SEL[@]} > 0)) || die "nothing left to run"

posint() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 == 0)); then die "$1 must be a positive integer (got '$2')"; fi
}
export TRIALS=${TRIALS:-5} FO_TRIALS=${FO_TRIALS:-5} DD_MIB=${DD_MIB:-128} DD_ROUNDS=${DD_ROUNDS:-5}
export DISK_MIB=${DISK_MIB:-64} PIVOT_MODES=${PIVOT_MODES:-async,sync} FO_MODE=${FO_MODE:-sync}
export LEASE_TTL=${LEASE_TTL:-3s}
for v in TRIALS FO_TRIALS DD_MIB DD_ROUNDS DISK_MIB; do posint "$v" "${!v}"; done
[[ "$LEASE_TTL" =~ ^[0-9.]+(ms|s|m)$ ]] || die "LEASE_TTL must be a duration like 3s or 1500ms"
WORK_BASE=${WORK_BASE:-/var/tmp}
STAMP=$(date +%Y%m%d-%H%M%S)
export OUT=${OUT:-/tmp/tandem-bench-vms-$STAMP.json}
CPUS=${CPUS:-}

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
((EUID == 0)) || die "run as root (libvirt daemons, QEMU on root-owned sockets)"
for t in qemu-system-x86_64:qemu-system-x86 libvirtd:libvirt-daemon-system virsh:libvirt-clients \
    virtlogd:libvirt-daemon-system mkfs.ext4:e2fsprogs debugfs:e2fsprogs unshare:util-linux \
    busybox:busybox-static cpio:cpio; do
    need_cmd "${t%%:*}" "${t#*:}"
done
[[ -z "$CPUS" ]] || need_cmd taskset util-linux
need_cmd cargo

log "building: cargo build --release -p tandem-vmkit --example vms_bench"
(cd "$REPO_ROOT" && cargo build --release -p tandem-vmkit --example vms_bench >&2) ||
    die "building vms_bench failed"
TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
[[ "$TARGET" = /* ]] || TARGET=$REPO_ROOT/$TARGET
DRIVER=$TARGET/release/examples/vms_bench
[[ -x "$DRIVER" ]] || die "$DRIVER not found after the build"
if [[ -n "${TANDEM_BIN:-}" ]]; then
    [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not executable"
else
    log "building: cargo build --release -p tandem"
    (cd "$REPO_ROOT" && cargo build --release -p tandem >&2) || die "cargo build --release -p tandem failed"
    TANDEM_BIN=$TARGET/release/tandem
    [[ -x "$TANDEM_BIN" ]] || die "$TANDEM_BIN not found after the build"
fi
for c in agent witness protect status; do
    "$TANDEM_BIN" "$c" --help >/dev/null 2>&1 || die "'$TANDEM_BIN $c --help' fails"
done
export TANDEM_BIN
log "tandem: $TANDEM_BIN"

# ---------------------------------------------------------------------------
# work dir and cleanup
# ---------------------------------------------------------------------------
[[ -d "$WORK_BASE" ]] || die "WORK_BASE $WORK_BASE does not exist"
WORK=$(mktemp -d "$WORK_BASE/tandem-bench-vms.XXXXXX")
export WORK
DRIVER_PID=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$DRIVER_PID" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        # The driver stops what it started on SIGTERM (agents, witness,
        # site daemons and their QEMUs); give it time, then make sure.
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        local deadline=$((SECONDS + 90))
        while kill -0 "$DRIVER_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$DRIVER_PID" 2>/dev/null; then
            warn "the driver did not stop within 90 s: killing it"
            kill -KILL "$DRIVER_PID" 2>/dev/null || true
        fi
        wait "$DRIVER_PID" 2>/dev/null || true
    fi
    # Site daemons (and QEMUs) of a driver that is gone, whatever happened.
    "$DRIVER" --sweep || true
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

PARTS=$(
    IFS=,
    printf '%s' "${SEL[*]}"
)
export PARTS
log "parts: $PARTS; work dir $WORK; JSON -> $OUT"
PRE=()
[[ -z "$CPUS" ]] || PRE=(taskset -c "$CPUS")
# The driver runs in the background so that this shell's traps fire at
# once on Ctrl-C; it handles SIGINT/SIGTERM itself by stopping everything.
"${PRE[@]+"${PRE[@]}"}" "$DRIVER" </dev/null &
DRIVER_PID=$!
rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=
((rc == 0)) || warn "some trials failed or the run was cut short (driver exit $rc); see above"
exit "$rc"
