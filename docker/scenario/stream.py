#!/usr/bin/env python3
"""A long-lived TCP stream that notices every lost, reordered or stalled byte.

    stream.py server [--port 7000]
    stream.py client --host 10.231.2.10 [--port 7000] [--rate 200] [--warmup 3] [--run 10]
                     [--drain 8] [--max-stall 8]

The client sends numbered 100-byte lines at `rate`/s for `run` seconds and checks that the
server echoes every one back, complete and in order. After `warmup` seconds it prints
`ready {...}` (the moment to fail a firewall over). When the sending is done it waits up to
`drain` seconds for the echoes still owed, then prints one JSON line:
    {"result": "pass"|"fail", "sent", "received", "max_stall", "stall_at", "stall_wall",
     "errors": [...]}
`max_stall` is the longest silence between two echoes (s), `stall_at` when it began (s since
connect), `stall_wall` its [start, end] in Unix time (to line it up with other logs).
Exit status: 0 pass, 1 fail (reset, closed, corrupt, lost or stalled past `max-stall`),
2 could not connect.
Standard library only: it runs in any container with python3.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time

PAD = b"." * 90


def line(n: int) -> bytes:
    return b"%08d %s\n" % (n, PAD)


def serve(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    print(f"stream server listening on :{port}", flush=True)

    def echo(c: socket.socket, peer: object) -> None:
        total = 0
        try:
            while data := c.recv(65536):
                c.sendall(data)
                total += len(data)
        except OSError as e:
            print(f"stream server: {peer}: {e}", flush=True)
        finally:
            c.close()
            print(f"stream server: {peer} done, {total} bytes echoed", flush=True)

    while True:
        c, peer = srv.accept()
        print(f"stream server: connection from {peer}", flush=True)
        threading.Thread(target=echo, args=(c, peer), daemon=True).start()


def client(a: argparse.Namespace) -> int:
    try:
        c = socket.create_connection((a.host, a.port), timeout=5)
    except OSError as e:
        print(json.dumps({"result": "fail", "errors": [f"connect: {e}"]}), flush=True)
        return 2
    c.setblocking(False)
    t0 = time.monotonic()
    wall0 = time.time() - t0  # monotonic -> Unix time
    print(f"connected from {c.getsockname()[0]}:{c.getsockname()[1]}", flush=True)
    sent = received = 0
    out, buf, errors = b"", b"", []
    last_rx, max_stall, stall_at = t0, 0.0, 0.0
    nxt, ready = t0, False
    send_until = t0 + a.run
    deadline = send_until + a.drain
    while True:
        now = time.monotonic()
        if not ready and now - t0 >= a.warmup:
            ready = True
            print("ready " + json.dumps({"sent": sent, "received": received}), flush=True)
        while now < send_until and now >= nxt and len(out) < 1 << 20:
            sent += 1
            out += line(sent)
            nxt += 1.0 / a.rate
        if received == sent and now >= send_until:
            break
        if now >= deadline:
            errors.append(f"gave up: {sent - received} of {sent} lines not echoed "
                          f"{a.drain:g}s after the last was sent")
            break
        if now - last_rx > a.max_stall and sent > received:
            errors.append(f"stalled: no echo for {now - last_rx:.1f}s "
                          f"({sent - received} lines owed)")
            break
        r, w, _ = select.select([c], [c] if out else [], [], 0.005)
        if w:
            try:
                n = c.send(out)
                out = out[n:]
            except BlockingIOError:
                pass
            except OSError as e:
                errors.append(f"send: {e}")
                break
        if r:
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:  # ConnectionResetError: the stream was reset
                errors.append(f"recv: {e}")
                break
            if not data:
                errors.append("connection closed by the peer")
                break
            now = time.monotonic()
            if now - last_rx > max_stall:
                max_stall, stall_at = now - last_rx, last_rx - t0
            last_rx = now
            buf += data
            *lines, buf = buf.split(b"\n")
            for got in lines:
                if got + b"\n" != line(received + 1):
                    errors.append(f"line {received + 1}: got {got[:20]!r}: lost, "
                                  "reordered or corrupt data")
                    break
                received += 1
            if errors:
                break
    c.close()
    res = {"result": "fail" if errors else "pass", "sent": sent, "received": received,
           "max_stall": round(max_stall, 3), "stall_at": round(stall_at, 3),
           "stall_wall": [round(wall0 + t0 + stall_at, 3),
                          round(wall0 + t0 + stall_at + max_stall, 3)],
           "errors": errors}
    print(json.dumps(res), flush=True)
    return 1 if errors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--rate", type=float, default=200.0, help="lines per second")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--run", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--drain", type=float, default=8.0)
    p.add_argument("--max-stall", type=float, default=8.0)
    a = p.parse_args()
    if a.role == "server":
        serve(a.port)
        return 0
    if not a.host:
        p.error("client needs --host")
    return client(a)


if __name__ == "__main__":
    sys.exit(main())
