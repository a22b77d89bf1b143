"""The programs the lab runs as processes inside its namespaces: the UDP flow generator, the
UDP and TCP echo servers and the TCP stream client (`python -m lab.programs COMMAND ARGS`).

`lab.traffic` starts them (`udp_flows_popen`, `udp_echo_server`, `tcp_echo_server`,
`TcpStream`) and reads what they print. A program must print its readiness line (`ready`,
`connected PORT`) only once it can serve, and must not touch anything but its own sockets.
The `lab` package never imports this module, so `-m` runs it exactly once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import sys
import threading
import time

from .traffic import send_udp_flows, stream_line


def _echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)



def _tcp_echo(ip: str, port: int) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        with c, contextlib.suppress(OSError):
            while data := c.recv(65536):
                c.sendall(data)



def _tcp_stream(host: str, port: int, rate: float) -> None:
    """The stream client: sends numbered lines at `rate`/s, checks every echo in order, and
    answers each line on stdin (`status`, or `stop`/EOF to end) with a JSON report."""
    c = socket.create_connection((host, port), timeout=5)
    c.setblocking(False)
    print(f"connected {c.getsockname()[1]}", flush=True)
    sent, expect, max_stall = 0, 1, 0.0
    buf = out = b""
    errors: list[str] = []
    last_rx = nxt = time.monotonic()
    while True:
        r, w, _ = select.select([c, sys.stdin], [c] if out else [], [], 0.005)
        now = time.monotonic()
        if sys.stdin in r:
            cmd = sys.stdin.readline()
            if not cmd or cmd.strip() == "stop":
                break
            print(json.dumps({"sent": sent, "received": expect - 1, "max_stall": max_stall}),
                  flush=True)
        if now >= nxt and len(out) < 65536:
            sent += 1
            out += stream_line(sent) + b"\n"
            nxt += 1.0 / rate
        if out and (c in w or not r):
            try:
                out = out[c.send(out):]
            except BlockingIOError:
                pass
            except OSError as e:
                errors.append(f"send: {e}")
                break
        if c in r:
            try:
                data: bytes | None = c.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as e:
                errors.append(f"recv: {e}")
                break
            if data == b"":
                errors.append("closed by peer")
                break
            if data:
                buf += data
                while b"\n" in buf:
                    got, buf = buf.split(b"\n", 1)
                    if got != stream_line(expect):
                        errors.append(f"out of order or corrupt at {expect}")
                        break
                    expect += 1
                max_stall = max(max_stall, now - last_rx)
                last_rx = now
            if errors:
                break
    print(json.dumps({"sent": sent, "received": expect - 1, "max_stall": round(max_stall, 3),
                      "errors": errors, "final": True}), flush=True)



def _tcp_echo_threaded(ip: str, port: int) -> None:
    """Echo TCP on ip:port, a thread per connection (many short connections in parallel)."""
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(512)
    print("ready", flush=True)

    def serve(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            while d := c.recv(4096):
                c.sendall(d)

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def _tcp_connections(dst: str, port: int, n: int, parallel: int) -> None:
    """`n` TCP connections with their whole life, `parallel` at a time: connect, 3
    request/response rounds of 100 bytes, close (NEW, several UPDATEs, then the FIN_WAIT ..
    TIME_WAIT updates). Prints `completed seconds`."""
    done = 0
    lock = threading.Lock()
    t0 = time.monotonic()

    def worker(k: int) -> None:
        nonlocal done
        for _ in range(k, n, parallel):
            try:
                with socket.create_connection((dst, port), timeout=10) as c:
                    for _ in range(3):
                        c.sendall(b"x" * 100)
                        got = 0
                        while got < 100:
                            got += len(c.recv(4096))
            except OSError:
                continue
            with lock:
                done += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(done, round(time.monotonic() - t0, 3), flush=True)


def _tcp_steps(host: str, port: int) -> None:
    """A TCP client driven from stdin: each line (`x [TIMEOUT]`) sends one numbered 1000-byte
    line and waits for its echo; answers `ok SECONDS`, `corrupt` or `fail ERROR` (then ends)."""
    c = socket.create_connection((host, port), timeout=5)
    print(f"connected {c.getsockname()[1]}", flush=True)
    f = c.makefile("rb")
    for n, cmd in enumerate(sys.stdin, 1):
        words = cmd.split()
        c.settimeout(float(words[1]) if len(words) > 1 else 5.0)
        line = b"%d %s\n" % (n, b"x" * 1000)
        t0 = time.monotonic()
        try:
            c.sendall(line)
            back = f.readline()
        except (OSError, ValueError) as e:
            print(f"fail {type(e).__name__}", flush=True)
            break
        print(f"ok {time.monotonic() - t0:.3f}" if back == line else "corrupt", flush=True)


USAGE = """usage: python -m lab.programs COMMAND ARGS (run inside a lab namespace)
  udpgen SRC DST N DPORT MAX_SECONDS   N UDP flows; prints `sent seconds` when done
  udpecho PORT                         echo UDP on PORT (both families); prints `ready`
  tcpecho IP PORT                      echo TCP on IP:PORT; prints `ready`
  tcpstream HOST PORT RATE             the TcpStream client (commands on stdin)
  tcpserve IP PORT                     echo TCP, a thread per connection; prints `ready`
  tcpconns DST PORT N PARALLEL         N whole TCP connections; prints `completed seconds`
  tcpsteps HOST PORT                   one TCP connection, a checked echo per stdin line"""


def main(argv: list[str]) -> int:
    """The processes `udp_flows_popen`, `udp_echo_server`, `tcp_echo_server` and `TcpStream`
    start; the exit status is 2 with the usage on a bad command line."""
    match argv:
        case ["udpgen", src, dst, n, dport, max_s]:
            family = socket.AF_INET if ipaddress.ip_address(dst).version == 4 else socket.AF_INET6
            with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
                b = send_udp_flows(sock, src, dst, int(n), int(dport), float(max_s))
            print(b.sent, f"{b.seconds:.6f}", flush=True)
        case ["udpecho", port]:
            with contextlib.suppress(KeyboardInterrupt):
                _echo(int(port))
        case ["tcpecho", ip, port]:
            with contextlib.suppress(KeyboardInterrupt):
                _tcp_echo(ip, int(port))
        case ["tcpstream", host, port, rate]:
            _tcp_stream(host, int(port), float(rate))
        case ["tcpserve", ip, port]:
            with contextlib.suppress(KeyboardInterrupt):
                _tcp_echo_threaded(ip, int(port))
        case ["tcpconns", dst, port, n, parallel]:
            _tcp_connections(dst, int(port), int(n), int(parallel))
        case ["tcpsteps", host, port]:
            _tcp_steps(host, int(port))
        case _:
            print(USAGE, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
