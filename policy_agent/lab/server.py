"""A tiny TCP+UDP answer server for lab pods (stdlib only, one thread).

Run inside a pod namespace:
    python -m policy_agent.lab.server --tcp 80,81 --udp 80,81 [--name x/a]

TCP: accepts, sends "<name>\\n", closes. UDP: echoes each datagram back,
prefixed with "<name> ". Binds every address (dual-stack "::" when the
namespace has IPv6, else 0.0.0.0). Prints "ready" on stdout once all ports
listen, then only logs to stderr. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def _bind(kind: int, port: int) -> socket.socket:
    try:
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
    except OSError:
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="policy_agent.lab.server")
    ap.add_argument("--tcp", default="", help="comma-separated TCP ports")
    ap.add_argument("--udp", default="", help="comma-separated UDP ports")
    ap.add_argument("--name", default=socket.gethostname())
    args = ap.parse_args(argv)
    ident = args.name.encode()
    sel = selectors.DefaultSelector()
    for port in _ports(args.tcp):
        sel.register(_bind(socket.SOCK_STREAM, port), selectors.EVENT_READ, "tcp")
    for port in _ports(args.udp):
        sel.register(_bind(socket.SOCK_DGRAM, port), selectors.EVENT_READ, "udp")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                if key.data == "tcp":
                    conn, _addr = s.accept()
                    try:
                        conn.setblocking(True)
                        conn.settimeout(1.0)
                        conn.sendall(ident + b"\n")
                    except OSError:
                        pass
                    finally:
                        conn.close()
                else:
                    data, addr = s.recvfrom(4096)
                    s.sendto(ident + b" " + data, addr)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                print(f"server error: {exc}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
