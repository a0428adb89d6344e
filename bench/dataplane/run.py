"""Dataplane benchmark, all inside private network namespaces. Prints JSON.

1. Program from empty (workload.py: 110 local endpoints, 2,000 policies, 10,000
   pods): Dataplane.apply vs one raw `ipset restore` + `iptables-restore` (v4, v6)
   of the same final ruleset, each into a fresh node namespace; median of 3.
2. Deltas on the programmed node: one policy added, one remote pod added, one
   local pod added: seconds and kernel lines written.
3. Per packet, two local pods of the ruleset behind real veths: iperf3 TCP
   throughput and new TCP connections/s, ruleset vs no rules, alternating rounds.

usage: python bench/dataplane/run.py [--backend nft|legacy] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workload as w  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.dataplane import sample as s  # noqa: E402
from policy_agent.dataplane.apply import Dataplane  # noqa: E402
from policy_agent.dataplane.kernel import binary  # noqa: E402
from policy_agent.desired import render_ipset_restore, render_iptables_save  # noqa: E402
from policy_agent.lab import netns  # noqa: E402

CONN_CLIENT = """
import socket, sys, time
ip, port, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, end = 0, time.monotonic() + dur
while time.monotonic() < end:
    c = socket.create_connection((ip, port), timeout=2)
    c.recv(64)
    c.close()
    n += 1
print(n / dur)
"""


def from_empty(backend: str, d, rounds: int) -> dict:
    ours, raw = [], []
    ipset_text = render_ipset_restore(d)
    v4, v6 = render_iptables_save(d, 4), render_iptables_save(d, 6)
    for r in range(rounds):
        ns = netns.unique_name("dpbench", f"empty{r}")
        try:
            netns.create(ns)
            dp = Dataplane(netns=ns, backend=backend)
            _ = dp.kernel  # backend detection is start-up cost, not apply cost
            t0 = time.perf_counter()
            rep = dp.apply(d)
            ours.append(time.perf_counter() - t0)
            lines = rep.lines_written
        finally:
            netns.delete(ns)
        try:
            netns.create(ns)
            t0 = time.perf_counter()
            netns.run(ns, "ipset", "restore", input=ipset_text)
            netns.run(ns, binary(backend, 4, "restore"), "--noflush", input=v4)
            netns.run(ns, binary(backend, 6, "restore"), "--noflush", input=v6)
            raw.append(time.perf_counter() - t0)
        finally:
            netns.delete(ns)
    o, rw = statistics.median(ours), statistics.median(raw)
    return {"ours_s": round(o, 3), "raw_restore_s": round(rw, 3), "ratio": round(o / rw, 2), "lines_written": lines,
            "raw_lines": len(ipset_text.splitlines()) + len(v4.splitlines()) + len(v6.splitlines())}


def deltas(dp: Dataplane, pods, policies) -> dict:
    out = {}
    steps = {
        "policy_added": (pods, policies + [s.Policy("ns0", "extra", "app=a0", ingress=(
            s.PolicyRule(s.Peer("ns0", "app=a7"), (("tcp", 8443),)),))]),
        "remote_pod_added": (pods + [w.pod(1, 100, local=False)], None),
        "local_pod_added": (pods + [w.pod(1, 100, local=False), w.pod(0, 2, local=True)], None),
    }
    for name, (p, pol) in steps.items():
        policies = pol or policies
        d = s.build(p, policies)
        t0 = time.perf_counter()
        rep = dp.apply(d)
        out[name] = {"apply_s": round(time.perf_counter() - t0, 4), "iptables_lines": rep.iptables_lines,
                     "ipset_lines": rep.ipset_lines, "chains_rewritten": len(rep.chains_rewritten),
                     "chains_created": len(rep.chains_created)}
        pods = p
    t0 = time.perf_counter()
    rep = dp.apply(d)
    out["nothing_changed"] = {"apply_s": round(time.perf_counter() - t0, 5), "lines": rep.lines_written}
    return out


def per_packet(backend: str, d, rounds: int) -> dict:
    node = netns.unique_name("dpbench", "node")
    a, b = w.pod(0, 0), w.pod(0, 1)  # b may reach a on tcp/5201 and tcp/80 (ns0 pol0)
    pa, pb = netns.unique_name("dpbench", "pa"), netns.unique_name("dpbench", "pb")
    res: dict[str, list[float]] = {"tput_rules": [], "tput_none": [], "cps_rules": [], "cps_none": []}
    made = []
    try:
        for ns in (node, pa, pb):
            netns.create(ns)
            made.append(ns)
        netns.enable_forwarding(node)
        netns.add_veth(node, pa, a.iface, a.ips)
        netns.add_veth(node, pb, b.iface, b.ips)
        netns.start_server(pa, tcp_ports=(80,))
        iperf = subprocess.Popen(["ip", "netns", "exec", pa, "iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        dp = Dataplane(netns=node, backend=backend)
        for _ in range(rounds):
            for mode in ("rules", "none"):
                if mode == "rules":
                    dp.apply(d)
                else:
                    dp.cleanup()
                out = netns.run(pb, "iperf3", "-c", a.ips[0], "-t", "3", "-J", timeout=60).stdout
                res[f"tput_{mode}"].append(json.loads(out)["end"]["sum_received"]["bits_per_second"])
                cps = netns.run(pb, sys.executable, "-c", CONN_CLIENT, a.ips[0], "80", "3", timeout=60).stdout
                res[f"cps_{mode}"].append(float(cps))
        iperf.terminate()
        iperf.wait(10)
    finally:
        for ns in reversed(made):
            netns.delete(ns)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "tcp_gbit_rules": round(med["tput_rules"] / 1e9, 2), "tcp_gbit_none": round(med["tput_none"] / 1e9, 2),
        "tcp_ratio": round(med["tput_rules"] / med["tput_none"], 3),
        "conn_per_s_rules": round(med["cps_rules"]), "conn_per_s_none": round(med["cps_none"]),
        "conn_ratio": round(med["cps_rules"] / med["cps_none"], 3), "raw": res,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logs.configure("console", "warning", stream=sys.stderr)
    t0 = time.perf_counter()
    pods, policies = w.pods(), w.policies()
    d = s.build(pods, policies)
    result = {"backend": args.backend, "build_desired_s": round(time.perf_counter() - t0, 2),
              "chains": sum(len(c) for c in d.chains.values()), "ipsets": len(d.ipsets),
              "ipset_members": sum(len(x.members) for x in d.ipsets.values())}
    result["from_empty"] = from_empty(args.backend, d, args.rounds)
    ns = netns.unique_name("dpbench", "delta")
    try:
        netns.create(ns)
        dp = Dataplane(netns=ns, backend=args.backend)
        dp.apply(d)
        result["deltas"] = deltas(dp, pods, policies)
        t0 = time.perf_counter()
        rep = Dataplane(netns=ns, backend=args.backend).apply(s.build(pods + [w.pod(1, 100, local=False), w.pod(0, 2, local=True)], policies + [s.Policy("ns0", "extra", "app=a0", ingress=(s.PolicyRule(s.Peer("ns0", "app=a7"), (("tcp", 8443),)),))]))
        result["restart_same_state"] = {"apply_s": round(time.perf_counter() - t0, 3), "lines": rep.lines_written}
    finally:
        netns.delete(ns)
    result["per_packet"] = per_packet(args.backend, d, args.rounds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
