#!/bin/sh
# /init of tandem-vmkit's test guest (busybox-static; see crates/vmkit).
#
# Loads the modules listed in /lib/modules/load-order (dependency order),
# mounts /proc /sys /dev, mounts the data disk /dev/vda (ext4) at /data and
# runs the workload named by `tandem.workload=` on the kernel command line.
# Everything it says goes to the console (ttyS0), one line per event:
#   TANDEM-INIT <kernel release>      init started
#   MOUNTED                           /data is mounted
#   RESUME <N>                        (write) /data/f<N> is the highest file
#                                     there already: writing goes on at N+1
#   ACK <N>                           /data/f<N> and /data are fsync()ed
#   READY                             (idle) waiting
#   CHECK f<N> ok|BAD                 (check) one file verified
#   CHECKED <files> <bad>             (check) all files verified
#   DONE <N>                          (write with tandem.count) unmounted
#   DD-READY <MiB>                    (dd) the source data is in RAM
#   RATE <bytes> <ns>                 (dd) one round written and fsync()ed
#   TANDEM-ERROR <what>               something failed; powers off
# A file /data/f<N> is one header line "TANDEM-FILE <N> <crc32> <len>"
# followed by <len> random bytes whose CRC-32 (IEEE, busybox crc32) is <crc32>.
PATH=/bin
export PATH

mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

off() {
    sync
    poweroff -f
    # Not reached with ACPI; without it, stop here.
    while :; do sleep 3600; done
}

fail() {
    echo "TANDEM-ERROR $*"
    off
}

echo "TANDEM-INIT $(uname -r)"

while read -r m; do
    insmod "/lib/modules/$m" 2>/dev/null || echo "TANDEM-NOTE module $m not loaded"
done </lib/modules/load-order

workload=idle
count=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    tandem.workload=*) workload=${arg#*=} ;;
    tandem.count=*) count=${arg#*=} ;;
    esac
done

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 300 ] && fail "no /dev/vda after 30 s"
    usleep 100000
done
mkdir -p /data
mount -t ext4 /dev/vda /data || fail "mount /dev/vda"
echo "MOUNTED"

# The highest N of the files /data/f<N> (0: none). A guest started again
# on the same disk (after a crash, or at another site) goes on numbering
# from there instead of overwriting what an earlier boot wrote.
highest_file() {
    top=0
    for f in /data/f*; do
        [ -f "$f" ] || continue
        k=${f#/data/f}
        case "$k" in '' | *[!0-9]*) continue ;; esac
        [ "$k" -gt "$top" ] && top=$k
    done
    echo "$top"
}

write_files() {
    n=$(highest_file)
    [ "$n" -gt 0 ] && echo "RESUME $n"
    end=$((n + count))
    while [ "$count" -eq 0 ] || [ "$n" -lt "$end" ]; do
        n=$((n + 1))
        kib=$((n % 4 + 1))
        dd if=/dev/urandom of=/tmp/body bs=1024 count=$kib 2>/dev/null || fail "dd for f$n"
        crc=$(crc32 </tmp/body)
        { echo "TANDEM-FILE $n $crc $((kib * 1024))" && cat /tmp/body; } >"/data/f$n" ||
            fail "write /data/f$n"
        # busybox sync FILE... fsync()s each named file (and directory).
        sync "/data/f$n" /data || fail "fsync /data/f$n"
        echo "ACK $n"
    done
    umount /data || fail "umount /data"
    echo "DONE $n"
    off
}

check_files() {
    total=0
    bad=0
    for f in /data/f*; do
        [ -f "$f" ] || continue
        total=$((total + 1))
        name=${f#/data/}
        hdr=$(head -n 1 "$f")
        size=$(($(wc -c <"$f") - ${#hdr} - 1))
        crc=$(tail -c +$((${#hdr} + 2)) "$f" | crc32)
        set -- $hdr
        if [ "$1" = TANDEM-FILE ] && [ "f$2" = "$name" ] && [ "$3" = "$crc" ] && [ "$4" = "$size" ]; then
            echo "CHECK $name ok"
        else
            echo "CHECK $name BAD"
            bad=$((bad + 1))
        fi
    done
    umount /data || fail "umount /data"
    echo "CHECKED $total $bad"
    off
}

# dd (tandem.dd_mib=M, default 64; tandem.dd_rounds=R, default 3): M MiB
# of random data made in RAM first, then R rounds of `dd bs=1M oflag=direct
# conv=fsync` of it to a fresh /data/dd, each timed with /proc/uptime (10
# ms steps) and printed as RATE; then DONE <R> and power off.
dd_rounds() {
    mib=64
    rounds=3
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        tandem.dd_mib=*) mib=${arg#*=} ;;
        tandem.dd_rounds=*) rounds=${arg#*=} ;;
        esac
    done
    dd if=/dev/urandom of=/tmp/dd.src bs=1048576 count="$mib" 2>/dev/null || fail "dd source"
    echo "DD-READY $mib"
    r=0
    while [ "$r" -lt "$rounds" ]; do
        r=$((r + 1))
        rm -f /data/dd
        sync /data
        read -r t0 _ </proc/uptime
        dd if=/tmp/dd.src of=/data/dd bs=1048576 oflag=direct conv=fsync 2>/dev/null ||
            fail "dd round $r"
        read -r t1 _ </proc/uptime
        cs=$((${t1%.*}${t1#*.} - ${t0%.*}${t0#*.}))
        echo "RATE $((mib * 1048576)) $((cs * 10000000))"
    done
    umount /data || fail "umount /data"
    echo "DONE $r"
    off
}

case "$workload" in
write) write_files ;;
dd) dd_rounds ;;
check) check_files ;;
idle)
    echo "READY"
    while :; do sleep 3600; done
    ;;
*) fail "unknown workload '$workload'" ;;
esac
