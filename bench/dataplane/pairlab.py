"""The per-packet benches' lab (run.py, forward_variants.py): a node namespace holding the
compiled ruleset, a server pod (TCP server on the allowed and the denied port, iperf3) and
a client pod behind veths; and one throughput + connection-rate sample between them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Iterator

import workload as w

from policy_agent.dataplane.apply import Dataplane
from policy_agent.lab import netns


@contextlib.contextmanager
def pair_lab(area: str, backend: str, desired, s_ep, c_ep, conn_port: int, iperf_port: int) -> Iterator[tuple[str, str]]:
    """Yields (node netns, client netns) with ``desired`` applied; removes everything after."""
    node, ps, pc = (netns.unique_name(area, r) for r in ("node", "srv", "cli"))
    made, iperf = [], None
    try:
        for ns in (node, ps, pc):
            netns.create(ns)
            made.append(ns)
        netns.enable_forwarding(node)
        netns.add_veth(node, ps, s_ep.interface, s_ep.ips)
        netns.add_veth(node, pc, c_ep.interface, c_ep.ips)
        netns.start_server(ps, tcp_ports=(conn_port, w.DENIED_PORT))
        iperf = subprocess.Popen(["ip", "netns", "exec", ps, "iperf3", "-s", "-p", str(iperf_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        Dataplane(netns=node, backend=backend).apply(desired)
        yield node, pc
    finally:
        if iperf is not None:
            iperf.terminate()
            iperf.wait(10)
        for ns in reversed(made):
            netns.delete(ns)


def sample(pc: str, s_ip: str, iperf_port: int, conn_port: int, seconds: float, conns: int) -> tuple[float, float]:
    """(iperf3 TCP bits/s over ``seconds``, new TCP connections/s over ``conns`` connects)."""
    out = netns.run(pc, "iperf3", "-c", s_ip, "-p", str(iperf_port), "-t", str(seconds), "-J", timeout=60).stdout
    tput = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    cps = netns.run(pc, sys.executable, "-c", w.CONN_CLIENT, s_ip, str(conn_port), str(conns), "30",
                    timeout=60).stdout
    return tput, float(cps)
