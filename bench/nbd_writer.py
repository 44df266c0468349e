#!/usr/bin/python3
"""bench/nbd_writer.py - a continuous, stamped NBD writer for bench/failover.sh.

Run it with Debian's /usr/bin/python3 (python3-libnbd provides `nbd`).

    nbd_writer.py --log FILE --export NAME [--interval-us N] [--timeout S] \
        SITE=SOCKET [SITE=SOCKET ...]  < COMMANDS

It writes 4 KiB blocks, one at a time, each with FUA, to whichever of the
sockets serves the export: it connects to the first one (in the order
given) that accepts a connection and completes the NBD handshake, writes
there until a write or the connection fails, then drops the connection and
tries the sockets again every 2 ms. Write number N goes to block
N mod (size / 4096); every byte of the block is a function of (run id, N,
epoch of the connection), so a read-back finds which write a block holds
and whether it is torn.

One line per event is appended to the log, times from CLOCK_MONOTONIC (ns)
and, for events, also CLOCK_REALTIME (ns, to line up with agents' logs):

    A <mono> <site> <epoch> <counter> <offset>     write acknowledged
    F <mono> <site> <epoch> <counter> <reason>     write failed (not acked)
    C <mono> <site> <epoch>                        connected ("epoch N" from
                                                   the export description)
    E <mono> <real> <what> <tag> [args]            kill / mark / start / quit
    V <mono> <real> <tag> <ok|LOST> <site> <epoch> checked=<n> lost=<n> \
        torn=<n> first_lost=<counter>|-            read-back result

Commands (one per line on stdin; read between writes):

    kill PID TAG    log the time, then SIGKILL PID (same clock as the acks)
    mark TAG        log the time
    verify TAG      stop writing; read the whole export back through a
                    connection to the serving site (connecting first if
                    needed, bounded by --timeout); every block must hold the
                    last acknowledged write to it or a later one that was
                    issued (a failed write may or may not have landed);
                    then resume. The expectation is rebased on what was read,
                    so a loss is counted once.
    quit            exit (also at EOF)

The writer exits 0 on quit/EOF, 2 on bad arguments.
"""

import argparse
import os
import re
import select
import signal
import struct
import sys
import time

import nbd

BLOCK = 4096
MAGIC = b"TNDMFOVR"
HDR = struct.Struct("<8sQqQ")  # magic, run id, counter, epoch -> 32 bytes
RETRY_S = 0.002


def mono():
    return time.monotonic_ns()


def real():
    return time.time_ns()


def make_block(run_id, counter, epoch):
    return HDR.pack(MAGIC, run_id, counter, epoch) * (BLOCK // HDR.size)


class Writer:
    def __init__(self, args):
        self.args = args
        self.sites = []
        for s in args.sockets:
            if "=" not in s:
                sys.exit(f"nbd_writer: bad SITE=SOCKET '{s}'")
            name, path = s.split("=", 1)
            self.sites.append((name, path))
        self.log = open(args.log, "a", buffering=1)
        self.run_id = (os.getpid() << 20) ^ (real() & 0xFFFFF)
        self.h = None
        self.site = None
        self.epoch = 0
        self.size = None
        self.nblocks = None
        self.expected = None  # per block: last acked counter (-1: never)
        self.issued = -1  # last counter sent
        self.counter = 0
        self.cmdbuf = b""
        self.quit = False
        self.timeout_ms = int(args.timeout * 1000)

    def emit(self, line):
        self.log.write(line + "\n")

    # -- connection ----------------------------------------------------------
    def drop(self):
        if self.h is not None:
            try:
                self.h.shutdown()
            except Exception:
                pass
            try:
                self.h.close()
            except Exception:
                pass
        self.h = None
        self.site = None

    def wait_for(self, h, cond, timeout_ms):
        """Polls h until cond() holds; False at the deadline or if h dies."""
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
        for name, path in self.sites:
            if not os.path.exists(path):
                continue
            h = nbd.NBD()
            try:
                h.set_full_info(True)
                h.set_export_name(self.args.export)
                h.aio_connect_unix(path)
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
                try:
                    h.close()
                except Exception:
                    pass
                continue
            if self.size is None:
                self.size = size
                self.nblocks = size // BLOCK
                self.expected = [-1] * self.nblocks
            elif size != self.size:
                h.close()
                continue
            self.h, self.site, self.epoch = h, name, epoch
            self.emit(f"C {mono()} {name} {epoch}")
            return True
        return False

    def connect_within(self, timeout_ms):
        deadline = mono() + timeout_ms * 1_000_000
        while self.h is None:
            if self.try_connect():
                return True
            if mono() >= deadline:
                return False
            time.sleep(RETRY_S)
        return True

    # -- I/O -------------------------------------------------------------------
    def io(self, start):
        """Runs one aio command to completion; raises nbd.Error on failure or
        timeout."""
        h = self.h
        cookie = start(h)
        deadline = mono() + self.timeout_ms * 1_000_000
        while not h.aio_command_completed(cookie):
            if h.aio_is_dead() or h.aio_is_closed():
                raise nbd.Error("connection lost")
            left = (deadline - mono()) // 1_000_000
            if left <= 0:
                raise nbd.Error("timed out")
            h.poll(int(min(left, 100)))

    def write_one(self):
        c = self.counter
        self.counter += 1
        blk = c % self.nblocks
        off = blk * BLOCK
        buf = nbd.Buffer.from_bytearray(make_block(self.run_id, c, self.epoch))
        site, epoch = self.site, self.epoch
        self.issued = c
        try:
            self.io(lambda h: h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA))
        except nbd.Error as e:
            reason = re.sub(r"\s+", "_", str(e))[:80] or "error"
            self.emit(f"F {mono()} {site} {epoch} {c} {reason}")
            self.drop()
            return
        self.expected[blk] = c
        self.emit(f"A {mono()} {site} {epoch} {c} {off}")

    def verify(self, tag):
        if not self.connect_within(self.timeout_ms):
            self.emit(f"V {mono()} {real()} {tag} LOST - 0 checked=0 lost=0 torn=0 first_lost=- no_primary")
            return
        chunk = 1 << 20
        per = chunk // BLOCK
        checked = lost = torn = 0
        first_lost = None
        try:
            for base in range(0, self.nblocks, per):
                n = min(per, self.nblocks - base)
                buf = nbd.Buffer(n * BLOCK)
                self.io(lambda h: h.aio_pread(buf, base * BLOCK))
                data = buf.to_bytearray()
                for i in range(n):
                    blk = base + i
                    want = self.expected[blk]
                    b = bytes(data[i * BLOCK:(i + 1) * BLOCK])
                    if b.count(0) == BLOCK:
                        got = -1
                    else:
                        magic, rid, got, ep = HDR.unpack_from(b)
                        if (magic != MAGIC or rid != self.run_id or got % self.nblocks != blk
                                or got > self.issued or b != make_block(rid, got, ep)):
                            torn += 1
                            continue
                    if want >= 0:
                        checked += 1
                    if got < want:
                        lost += 1
                        if first_lost is None or want < first_lost:
                            first_lost = want
                    self.expected[blk] = got
        except nbd.Error as e:
            reason = re.sub(r"\s+", "_", str(e))[:60]
            self.emit(f"V {mono()} {real()} {tag} LOST {self.site} {self.epoch} checked={checked} "
                      f"lost={lost} torn={torn} first_lost=- read_failed:{reason}")
            self.drop()
            return
        verdict = "ok" if lost == 0 and torn == 0 else "LOST"
        fl = "-" if first_lost is None else str(first_lost)
        self.emit(f"V {mono()} {real()} {tag} {verdict} {self.site} {self.epoch} checked={checked} "
                  f"lost={lost} torn={torn} first_lost={fl}")

    # -- commands --------------------------------------------------------------
    def commands(self):
        while True:
            r, _, _ = select.select([0], [], [], 0)
            if not r:
                return
            data = os.read(0, 4096)
            if not data:
                self.quit = True
                return
            self.cmdbuf += data
            while b"\n" in self.cmdbuf:
                line, self.cmdbuf = self.cmdbuf.split(b"\n", 1)
                self.command(line.decode().split())

    def command(self, w):
        if not w:
            return
        if w[0] == "kill" and len(w) == 3:
            self.emit(f"E {mono()} {real()} kill {w[2]} {w[1]}")
            try:
                os.kill(int(w[1]), signal.SIGKILL)
            except OSError as e:
                self.emit(f"E {mono()} {real()} kill_failed {w[2]} {e.errno}")
        elif w[0] == "mark" and len(w) == 2:
            self.emit(f"E {mono()} {real()} mark {w[1]}")
        elif w[0] == "verify" and len(w) == 2:
            self.verify(w[1])
        elif w[0] == "quit":
            self.quit = True
        else:
            self.emit(f"E {mono()} {real()} bad_command - {'_'.join(w)}")

    def run(self):
        self.emit(f"E {mono()} {real()} start - {self.run_id}")
        interval = self.args.interval_us * 1000
        next_t = mono()
        while not self.quit:
            self.commands()
            if self.quit:
                break
            if self.h is None and not self.try_connect():
                time.sleep(RETRY_S)
                continue
            now = mono()
            if now < next_t:
                time.sleep((next_t - now) / 1e9)
            next_t = max(next_t + interval, mono() - interval)
            self.write_one()
        self.emit(f"E {mono()} {real()} quit - {self.counter}")
        self.drop()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--interval-us", type=int, default=1000,
                   help="pace: at most one write per this many microseconds (default 1000)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds before a write, read or connect is given up (default 10)")
    p.add_argument("sockets", nargs="+", metavar="SITE=SOCKET")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Writer(args).run()


if __name__ == "__main__":
    main()
