#!/usr/bin/python3
"""bench/nbd_multi_writer.py - stamped NBD writes to many exports at once,
for the site-loss part of bench/failover.sh.

Run it with Debian's /usr/bin/python3 (python3-libnbd provides `nbd`).

    nbd_multi_writer.py --log FILE --exports A,B,... [--interval-ms N]
        [--retry-ms N] [--timeout S] SITE=DIR [SITE=DIR ...] < COMMANDS

One thread per export. Each writes 4 KiB blocks, one at a time, each with
FUA, at most one every --interval-ms, to whichever site serves the export:
the socket of export E at site S is DIR/E.sock, the sites are tried in the
order given, and the first one whose socket accepts a connection and
completes the NBD handshake is written to until a write or the connection
fails; then the sockets are tried again every --retry-ms. A socket is first
probed with a plain connect (cheap when nobody listens) and only then
handed to libnbd, so fifty exports waiting for a new primary cost little
CPU. The first write after a connection is sent at once (no pacing), so an
acknowledgement by a new primary is logged within --retry-ms of its export
opening plus one write.

Write number N of an export goes to its block N mod (size / 4096); every
block is stamped with (run id, N, epoch of the connection) as by
bench/nbd_writer.py (no read-back here).

One line per event is appended to the log, times from CLOCK_MONOTONIC (ns)
and, for events, also CLOCK_REALTIME (ns, to line up with agents' logs).
The fields up to <offset> are those of bench/nbd_writer.py; the export is
added at the end:

    A <mono> <site> <epoch> <counter> <offset> <export>   write acknowledged
    F <mono> <site> <epoch> <counter> <reason> <export>   write failed
    C <mono> <site> <epoch> <export>                      connected
    D <mono> <site> <epoch> disconnect_timeout <export>   the server did not
                                                          close within 1 s of
                                                          NBD_CMD_DISC
    E <mono> <real> <what> <tag> [args]                   kill / mark / start / quit

Commands (one per line on stdin):

    kill PID TAG    log the time, then SIGKILL PID (same clock as the acks)
    mark TAG        log the time
    quit            stop every thread and exit (also at EOF); threads still
                    busy after 5 s are named in the quit line

The writer exits 0 on quit/EOF/SIGTERM, 2 on bad arguments, 3 when a
thread fails (a bug; the traceback goes to stderr).
"""

import argparse
import faulthandler
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import nbd

BLOCK = 4096
MAGIC = b"TNDMFOVR"
HDR = struct.Struct("<8sQqQ")  # magic, run id, counter, epoch -> 32 bytes


def mono():
    return time.monotonic_ns()


def real():
    return time.time_ns()


def make_block(run_id, counter, epoch):
    return HDR.pack(MAGIC, run_id, counter, epoch) * (BLOCK // HDR.size)


def close_handle(h, disconnect_ms=0):
    """Ends a handle: with disconnect_ms, first a polite NBD_CMD_DISC and up
    to that long for the server to close (never the blocking shutdown(),
    which waits for the server without a limit). True unless that wait ran
    out. Older libnbd Python bindings (Debian 12's 1.14) have no close():
    the handle is then closed when it is garbage-collected."""
    ok = True
    if disconnect_ms:
        try:
            if not (h.aio_is_dead() or h.aio_is_closed()):
                h.aio_disconnect()
                deadline = mono() + disconnect_ms * 1_000_000
                while not (h.aio_is_dead() or h.aio_is_closed()):
                    left = (deadline - mono()) // 1_000_000
                    if left <= 0:
                        ok = False
                        break
                    h.poll(int(min(left, 100)))
        except Exception:
            pass
    try:
        if hasattr(h, "close"):
            h.close()
    except Exception:
        pass
    return ok


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def emit(self, line):
        with self.lock:
            self.f.write(line + "\n")


class ExportWriter(threading.Thread):
    def __init__(self, export, sites, args, log, stop, run_id):
        super().__init__(name=export, daemon=True)
        self.export = export
        self.sockets = [(name, os.path.join(d, export + ".sock")) for name, d in sites]
        self.interval = args.interval_ms * 1_000_000
        self.retry_s = args.retry_ms / 1000
        self.timeout_ms = int(args.timeout * 1000)
        self.log = log
        self.stop = stop
        self.run_id = run_id
        self.h = None
        self.site = None
        self.epoch = 0
        self.nblocks = None
        self.counter = 0

    def drop(self):
        if self.h is not None and not close_handle(self.h, disconnect_ms=1000):
            self.log.emit(f"D {mono()} {self.site} {self.epoch} disconnect_timeout {self.export}")
        self.h = None
        self.site = None

    def wait_for(self, h, cond, timeout_ms):
        deadline = mono() + timeout_ms * 1_000_000
        while not cond():
            if h.aio_is_dead() or h.aio_is_closed():
                return False
            left = (deadline - mono()) // 1_000_000
            if left <= 0:
                return False
            h.poll(int(min(left, 100)))
        return True

    def try_connect(self):
        for name, path in self.sockets:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(path)
            except OSError:
                s.close()
                continue
            h = nbd.NBD()
            try:
                h.set_full_info(True)
                h.set_export_name(self.export)
                fd = s.detach()
                try:
                    h.aio_connect_socket(fd)
                except nbd.Error:
                    os.close(fd)
                    raise
                if not self.wait_for(h, h.aio_is_ready, 2000):
                    raise nbd.Error("handshake did not complete")
                size = h.get_size()
                desc = ""
                try:
                    desc = h.get_export_description() or ""
                except nbd.Error:
                    pass
                m = re.search(r"epoch (\d+)", desc)
                epoch = int(m.group(1)) if m else 0
            except nbd.Error:
                close_handle(h)
                continue
            if self.nblocks is None:
                self.nblocks = size // BLOCK
            elif size // BLOCK != self.nblocks:
                close_handle(h)
                continue
            self.h, self.site, self.epoch = h, name, epoch
            self.log.emit(f"C {mono()} {name} {epoch} {self.export}")
            return True
        return False

    def write_one(self):
        c = self.counter
        self.counter += 1
        off = (c % self.nblocks) * BLOCK
        buf = nbd.Buffer.from_bytearray(make_block(self.run_id, c, self.epoch))
        h, site, epoch = self.h, self.site, self.epoch
        try:
            cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)
            deadline = mono() + self.timeout_ms * 1_000_000
            while not h.aio_command_completed(cookie):
                if h.aio_is_dead() or h.aio_is_closed():
                    raise nbd.Error("connection lost")
                left = (deadline - mono()) // 1_000_000
                if left <= 0:
                    raise nbd.Error("timed out")
                h.poll(int(min(left, 100)))
        except nbd.Error as e:
            reason = re.sub(r"\s+", "_", str(e))[:80] or "error"
            self.log.emit(f"F {mono()} {site} {epoch} {c} {reason} {self.export}")
            self.drop()
            return
        self.log.emit(f"A {mono()} {site} {epoch} {c} {off} {self.export}")

    def run(self):
        try:
            self.loop()
        except BaseException:  # a bug: the whole writer stops, loudly
            traceback.print_exc()
            self.log.emit(f"E {mono()} {real()} thread_error - {self.export}")
            os._exit(3)

    def loop(self):
        next_t = 0
        while not self.stop.is_set():
            if self.h is None:
                if not self.try_connect():
                    self.stop.wait(self.retry_s)
                    continue
                next_t = mono()  # the first write on a connection: at once
            now = mono()
            if now < next_t and self.stop.wait((next_t - now) / 1e9):
                break
            next_t = max(next_t + self.interval, mono() - self.interval)
            self.write_one()
        self.drop()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--exports", required=True, help="comma-separated export names")
    p.add_argument("--interval-ms", type=float, default=50.0,
                   help="per export: at most one write per this many ms (default 50)")
    p.add_argument("--retry-ms", type=float, default=10.0,
                   help="per export: pause between rounds of connection attempts (default 10)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds before a write is given up (default 10)")
    p.add_argument("sites", nargs="+", metavar="SITE=DIR")
    args = p.parse_args()
    sites = []
    for s in args.sites:
        if "=" not in s:
            p.error(f"bad SITE=DIR '{s}'")
        sites.append(tuple(s.split("=", 1)))
    exports = [e for e in args.exports.split(",") if e]
    if not exports or args.interval_ms <= 0 or args.retry_ms <= 0:
        p.error("need exports, and positive --interval-ms and --retry-ms")

    faulthandler.enable()  # a crash in the bindings leaves a trace on stderr
    log = Log(args.log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_id = (os.getpid() << 20) ^ (real() & 0xFFFFF)
    log.emit(f"E {mono()} {real()} start - {run_id} exports={len(exports)}")
    threads = [ExportWriter(e, sites, args, log, stop, run_id) for e in exports]
    for t in threads:
        t.start()

    buf = b""
    while not stop.is_set():
        try:
            r, _, _ = select.select([0], [], [], 0.1)
        except InterruptedError:
            continue
        if not r:
            continue
        data = os.read(0, 4096)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            w = line.decode().split()
            if not w:
                continue
            if w[0] == "kill" and len(w) == 3:
                log.emit(f"E {mono()} {real()} kill {w[2]} {w[1]}")
                try:
                    os.kill(int(w[1]), signal.SIGKILL)
                except (OSError, ValueError) as e:
                    log.emit(f"E {mono()} {real()} kill_failed {w[2]} {getattr(e, 'errno', '-')}")
            elif w[0] == "mark" and len(w) == 2:
                log.emit(f"E {mono()} {real()} mark {w[1]}")
            elif w[0] == "quit":
                stop.set()
            else:
                log.emit(f"E {mono()} {real()} bad_command - {'_'.join(w)}")
    stop.set()
    deadline = time.monotonic() + 5
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t.export for t in threads if t.is_alive()]
    log.emit(f"E {mono()} {real()} quit - {sum(t.counter for t in threads)}"
             + (f" stuck={','.join(stuck)}" if stuck else ""))
    os._exit(0)  # threads still in a write (bounded by --timeout) end with the process


if __name__ == "__main__":
    main()
