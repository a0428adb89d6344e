#!/usr/bin/env python3
"""Test workload for the cluster tier, in the role of upstream e2e's agnhost (stdlib only).

  workload serve [--tcp 80,81] [--udp 80,81]
      TCP: accept, write the hostname (the pod name) and a newline, close.
      UDP: echo each datagram back to its sender.
      Ports default to $WORKLOAD_TCP_PORTS / $WORKLOAD_UDP_PORTS, else 80,81.
  workload probe --proto tcp|udp --host H --port P [--timeout S]
      Like `agnhost connect`: exit 0 when the connection is made (TCP) or the echo comes
      back (UDP), else exit 1 with TIMEOUT, REFUSED or OTHER on stderr. A TCP probe prints
      what the server wrote (its hostname), so a test sees which backend answered.
  workload probe-many [--timeout S] [--repeat --interval S --max-seconds S] [TARGETS]
      One row of a reachability matrix per `kubectl exec`: TARGETS is a JSON list of
      {"host", "port", "proto"} (argument, else stdin), probed in parallel threads. Prints
      one JSON line {"t": <epoch>, "results": [{"ok": bool, "error": str}, ...]} (same order).
      --repeat: probe the list again every --interval seconds, one line per round, until
      stdin closes (`kubectl exec -i`: the test closes it) or --max-seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

DEFAULT_PORTS = "80,81"


def parse_ports(text: str) -> list[int]:
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        port = int(part)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        ports.append(port)
    return ports


def log(*words: object) -> None:
    print(*words, flush=True)


def bind(kind: int, port: int) -> socket.socket:
    """Dual-stack where the pod has IPv6, IPv4 only where it has none."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            return sock
        except OSError:
            sock.close()
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def serve_tcp(sock: socket.socket, port: int, hostname: bytes) -> None:
    while True:
        conn, peer = sock.accept()
        try:
            conn.settimeout(2)
            conn.sendall(hostname + b"\n")
        except OSError:
            pass
        finally:
            conn.close()
        log("tcp", port, "from", peer[0])


def serve_udp(sock: socket.socket, port: int) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        try:
            sock.sendto(data, peer)
        except OSError:
            pass
        log("udp", port, "from", peer[0])


def serve(args: argparse.Namespace) -> int:
    tcp = parse_ports(args.tcp if args.tcp is not None else os.environ.get("WORKLOAD_TCP_PORTS", DEFAULT_PORTS))
    udp = parse_ports(args.udp if args.udp is not None else os.environ.get("WORKLOAD_UDP_PORTS", DEFAULT_PORTS))
    if not tcp and not udp:
        print("workload serve: no port to serve (--tcp/--udp)", file=sys.stderr)
        return 2
    hostname = socket.gethostname().encode()
    threads = []
    # Bind everything before saying "serving": a readiness check can trust that line.
    for port in tcp:
        sock = bind(socket.SOCK_STREAM, port)
        sock.listen(128)
        threads.append(threading.Thread(target=serve_tcp, args=(sock, port, hostname), daemon=True))
    for port in udp:
        threads.append(threading.Thread(target=serve_udp, args=(bind(socket.SOCK_DGRAM, port), port), daemon=True))
    # As PID 1 of a container a signal without a handler is ignored: exit on TERM/INT
    # so a pod deletion does not wait out its grace period.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for t in threads:
        t.start()
    log("serving", "tcp=" + ",".join(map(str, tcp)), "udp=" + ",".join(map(str, udp)))
    stop.wait()
    return 0


def fail(kind: str, detail: object = "") -> int:
    print(f"{kind} {detail}".rstrip(), file=sys.stderr)
    return 1


def probe(args: argparse.Namespace) -> int:
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM)
    except OSError as exc:
        return fail("OTHER", exc)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(args.timeout)
        try:
            sock.connect(addr)
            if args.proto == "tcp":
                try:
                    sys.stdout.write(sock.recv(256).decode(errors="replace"))
                except OSError:
                    pass  # connected is success, as for agnhost connect
                return 0
            payload = f"probe {os.getpid()} {args.host}:{args.port}".encode()
            sock.send(payload)
            reply = sock.recv(65535)
        except (socket.timeout, TimeoutError):
            return fail("TIMEOUT")
        except ConnectionRefusedError:
            return fail("REFUSED")
        except OSError as exc:
            return fail("OTHER", exc)
    if reply != payload:
        return fail("OTHER", f"unexpected reply {reply[:64]!r}")
    print(reply.decode(errors="replace"))
    return 0


def probe_one(proto: str, host: str, port: int, timeout: float) -> tuple[bool, str]:
    """One probe as `probe` makes it: (connected, "" or TIMEOUT/REFUSED/OTHER <detail>)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        family, kind, ipproto, _, addr = infos[0]
        with socket.socket(family, kind, ipproto) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            if proto == "tcp":
                return True, ""
            payload = f"probe {os.getpid()} {threading.get_ident()} {host}:{port}".encode()
            sock.send(payload)
            reply = sock.recv(65535)
    except (socket.timeout, TimeoutError):
        return False, "TIMEOUT"
    except ConnectionRefusedError:
        return False, "REFUSED"
    except OSError as exc:
        return False, f"OTHER {exc}"
    return (True, "") if reply == payload else (False, f"OTHER unexpected reply {reply[:64]!r}")


def parse_targets(text: str) -> list[tuple[str, str, int]]:
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("targets must be a JSON list")
    targets = []
    for i, t in enumerate(items):
        if not isinstance(t, dict) or not {"host", "port", "proto"} <= set(t):
            raise ValueError(f"target {i}: needs host, port and proto, got {t!r}")
        proto = str(t["proto"]).lower()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"target {i}: proto must be tcp or udp, not {t['proto']!r}")
        targets.append((proto, str(t["host"]), int(t["port"])))
    return targets


def probe_round(targets: list[tuple[str, str, int]], timeout: float) -> list[dict]:
    results: list[dict] = [{}] * len(targets)

    def run(i: int) -> None:
        ok, error = probe_one(*targets[i], timeout)
        results[i] = {"ok": ok, "error": error}

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def probe_many(args: argparse.Namespace) -> int:
    if args.targets is None and args.repeat:
        print("workload probe-many: --repeat needs TARGETS as an argument (stdin is the stop signal)", file=sys.stderr)
        return 2
    targets = parse_targets(args.targets if args.targets is not None else sys.stdin.read())
    stop = threading.Event()
    if args.repeat:
        # Closing stdin (the test ends `kubectl exec -i`) stops the loop.
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + args.max_seconds
    while True:
        start = time.monotonic()
        print(json.dumps({"t": round(time.time(), 3), "results": probe_round(targets, args.timeout)}), flush=True)
        if not args.repeat or stop.is_set() or time.monotonic() > deadline:
            return 0
        if stop.wait(max(0.0, args.interval - (time.monotonic() - start))):
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer on TCP and UDP ports")
    s.add_argument("--tcp", help="comma-separated TCP ports (default $WORKLOAD_TCP_PORTS or 80,81)")
    s.add_argument("--udp", help="comma-separated UDP ports (default $WORKLOAD_UDP_PORTS or 80,81)")
    p = sub.add_parser("probe", help="connect once; exit 0 on success, 1 on failure")
    p.add_argument("--proto", choices=("tcp", "udp"), required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=1.0, help="seconds (default 1)")
    m = sub.add_parser("probe-many", help="probe a JSON list of targets in parallel; print a JSON line")
    m.add_argument("targets", nargs="?", help='JSON list of {"host", "port", "proto"} (default: stdin)')
    m.add_argument("--timeout", type=float, default=1.0, help="seconds per probe (default 1)")
    m.add_argument("--repeat", action="store_true", help="repeat until stdin closes or --max-seconds")
    m.add_argument("--interval", type=float, default=0.5, help="seconds between round starts (default 0.5)")
    m.add_argument("--max-seconds", type=float, default=600.0, help="stop repeating after this (default 600)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "probe-many":
            return probe_many(args)
        return serve(args) if args.cmd == "serve" else probe(args)
    except ValueError as exc:
        print(f"workload {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
