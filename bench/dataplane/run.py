"""Dataplane benchmark, all inside private network namespaces. Prints JSON.

1. Program from empty (workload.py: 110 local endpoints, 2,000 policies, 10,000
   pods): Dataplane.apply vs one raw `ipset restore` + `iptables-restore` (v4, v6)
   of the same final ruleset, each into a fresh node namespace; median of 3.
2. Deltas on the programmed node: one policy added, one remote pod added, one
   local pod added, nothing changed: seconds and kernel lines written. Each delta
   is applied forward and back (with sweep) --rounds times; medians. Two variants:
   "reused": chains and sets that did not change are the same objects as in the
   previous state, which is what the incremental compiler hands the dataplane (so
   the figure is the agent's); "fresh": every object rebuilt, so the dataplane
   must compare unchanged chains and sets by value.
3. Per packet, two local pods of the ruleset behind real veths: iperf3 TCP
   throughput and new TCP connections/s, ruleset vs no rules, alternating rounds
   (see per_packet for the modes).

usage: python bench/dataplane/run.py [--backend nft|legacy] [--rounds 3] [--packet-rounds 7] [--no-packets]
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


def reuse(prev, d):
    """``d`` with every chain and set equal to one in ``prev`` replaced by prev's object,
    as the incremental compiler does (done before the clock starts)."""
    chains = {}
    for key, table in d.chains.items():
        old = prev.chains.get(key, {})
        chains[key] = {n: (old[n] if n in old and old[n] == c else c) for n, c in table.items()}
    sets = {n: (prev.ipsets[n] if n in prev.ipsets and prev.ipsets[n] == x else x) for n, x in d.ipsets.items()}
    eps = prev.endpoints if prev.endpoints == d.endpoints else d.endpoints
    return type(d)(chains=chains, hooks=prev.hooks, ipsets=sets, endpoints=eps)


def deltas(dp: Dataplane, base, pods, policies, rounds: int) -> dict:
    out: dict = {}
    extra = s.Policy("ns0", "extra", "app=a0", ingress=(s.PolicyRule(s.Peer("ns0", "app=a7"), (("tcp", 8443),)),))
    steps = {
        "policy_added": (pods, policies + [extra]),
        "remote_pod_added": (pods + [w.pod(1, 100, local=False)], policies),
        "local_pod_added": (pods + [w.pod(0, 2, local=True)], policies),
    }
    for variant in ("reused", "fresh"):
        for name, (p, pol) in steps.items():
            times, back, rep = [], [], None
            for _ in range(rounds):
                fwd = s.build(p, pol)
                rev = s.build(pods, policies)
                if variant == "reused":
                    fwd, rev = reuse(base, fwd), base
                t0 = time.perf_counter()
                rep = dp.apply(fwd, allow_sweep=True)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dp.apply(rev, allow_sweep=True)
                back.append(time.perf_counter() - t0)
            out[f"{name}_{variant}"] = {
                "apply_ms": round(1000 * statistics.median(times), 1), "undo_ms": round(1000 * statistics.median(back), 1),
                "iptables_lines": rep.iptables_lines, "ipset_lines": rep.ipset_lines,
                "chains_rewritten": len(rep.chains_rewritten), "chains_created": len(rep.chains_created)}
        same = []
        for _ in range(rounds):
            d = base if variant == "reused" else s.build(pods, policies)
            t0 = time.perf_counter()
            rep = dp.apply(d, allow_sweep=True)
            same.append(time.perf_counter() - t0)
        out[f"nothing_changed_{variant}"] = {"apply_ms": round(1000 * statistics.median(same), 2),
                                             "lines": rep.lines_written}
    return out


BYPASS = "-m comment --comment bench-bypass -j ACCEPT"
CT_FIRST = "-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment bench-ct-first -j ACCEPT"


def per_packet(backend: str, d, rounds: int, seconds: float) -> dict:
    """Modes, switched by one restore each so rounds can alternate quickly (the load on
    this machine drifts; alternating cancels most of the drift):
      none            a first rule ACCEPT in FORWARD: no rule of ours is evaluated
      rules           the ruleset as applied
      rules_ct_first  experiment: the ruleset plus RELATED,ESTABLISHED -> ACCEPT as the
                      first rule of pa-FORWARD (not what the compiler emits today)."""
    node = netns.unique_name("dpbench", "node")
    a, b = w.pod(0, 0), w.pod(0, 1)  # b may reach a on tcp/5201 and tcp/80 (ns0 pol0)
    pa, pb = netns.unique_name("dpbench", "pa"), netns.unique_name("dpbench", "pb")
    modes = ("none", "rules", "rules_ct_first")
    res: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("tput", "cps") for m in modes}
    made = []
    restore = binary(backend, 4, "restore")
    try:
        for ns in (node, pa, pb):
            netns.create(ns)
            made.append(ns)
        netns.enable_forwarding(node)
        netns.add_veth(node, pa, a.iface, a.ips)
        netns.add_veth(node, pb, b.iface, b.ips)
        netns.start_server(pa, tcp_ports=(80,))
        iperf = subprocess.Popen(["ip", "netns", "exec", pa, "iperf3", "-s"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        Dataplane(netns=node, backend=backend).apply(d)
        current = "rules"

        def switch(mode: str) -> None:
            nonlocal current
            lines = {"none": [f"-D FORWARD {BYPASS}"], "rules_ct_first": [f"-D pa-FORWARD {CT_FIRST}"]}.get(current, [])
            lines += {"none": [f"-I FORWARD 1 {BYPASS}"], "rules_ct_first": [f"-I pa-FORWARD 1 {CT_FIRST}"]}.get(mode, [])
            if lines:
                netns.run(node, restore, "--noflush", input="*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
            current = mode

        for r in range(rounds):
            for mode in modes[r % 3:] + modes[: r % 3]:  # rotate the order every round
                switch(mode)
                out = netns.run(pb, "iperf3", "-c", a.ips[0], "-t", str(seconds), "-J", timeout=60).stdout
                res[f"tput_{mode}"].append(json.loads(out)["end"]["sum_received"]["bits_per_second"])
                cps = netns.run(pb, sys.executable, "-c", CONN_CLIENT, a.ips[0], "80", str(seconds), timeout=60).stdout
                res[f"cps_{mode}"].append(float(cps))
        iperf.terminate()
        iperf.wait(10)
    finally:
        for ns in reversed(made):
            netns.delete(ns)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "tcp_gbit": {m: round(med[f"tput_{m}"] / 1e9, 2) for m in modes},
        "tcp_ratio": round(med["tput_rules"] / med["tput_none"], 3),
        "conn_per_s": {m: round(med[f"cps_{m}"]) for m in modes},
        "conn_ratio": round(med["cps_rules"] / med["cps_none"], 3),
        "conn_ratio_ct_first": round(med["cps_rules_ct_first"] / med["cps_none"], 3),
        # ratio within each round (same load), then the median: less sensitive to load drift
        "paired_median_ratio": {f"{k}_{m}": round(statistics.median(
            x / y for x, y in zip(res[f"{k}_{m}"], res[f"{k}_none"])), 3)
            for k in ("tput", "cps") for m in ("rules", "rules_ct_first")},
        "rounds": rounds, "seconds": seconds, "raw": res,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-packets", action="store_true", help="skip the per-packet measurements")
    ap.add_argument("--packet-rounds", type=int, default=7, help="alternating rounds per mode")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one throughput / conn/s sample")
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
        dp.apply(d, allow_sweep=True)
        result["deltas"] = deltas(dp, d, pods, policies, max(args.rounds, 5))
        t0 = time.perf_counter()
        rep = Dataplane(netns=ns, backend=args.backend).apply(d)
        result["restart_same_state"] = {"apply_s": round(time.perf_counter() - t0, 3), "lines": rep.lines_written}
    finally:
        netns.delete(ns)
    if not args.no_packets:
        result["per_packet"] = per_packet(args.backend, d, args.packet_rounds, args.seconds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
