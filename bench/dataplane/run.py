"""Dataplane benchmark on the compiler's real output, all inside private network
namespaces. Prints JSON (and writes it with --json).

Workload: bench/workload.py at --pods (default 10,000 pods / 2,000 policies / 500
namespaces / 110 local pods) -> policy_agent.compiler.Compiler -> DesiredState: the
ruleset the agent ships, nothing hand-built.

1. from_empty: Dataplane.apply (a warm process: imports, backend detection done) vs
   one raw `ipset restore` + `iptables-restore --noflush` v4 + v6 of the very text the
   state renders to, each into a fresh node namespace, alternating, --rounds rounds;
   median and best. first_apply_fresh_process: the same apply timed inside a new
   Python process (what an agent restart on an empty node pays, imports excluded).
2. deltas: on the programmed node, one small change at a time through the incremental
   compiler (what the agent hands the dataplane): a policy add (selects a local pod), a
   local pod add, a remote pod add, nothing changed; each applied forward and back
   --delta-rounds times; median and max of the forward apply, and lines written.
3. per_packet (unless --no-packets): the server and client pods of
   workload.packet_pair behind real veths of the node namespace, under the full
   ruleset; modes switched by one restore each, alternating rounds (order rotated each
   round):
     none     a first rule `-j ACCEPT` in FORWARD: none of our rules is evaluated
     ct_only  `-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT` then `-j ACCEPT`
              first in FORWARD: the conntrack-only baseline a kube-proxy node pays
     rules    the compiled ruleset as applied
   Per sample: iperf3 TCP throughput for --seconds, and the rate of a bounded loop of
   --conns TCP connects (connect, read the server's greeting, close). Ratios are the
   median of per-round ratios (same load within a round). A connection to a port no
   policy allows is checked to fail under `rules` (the ruleset is really in force).

usage: python bench/dataplane/run.py [--pods 10000] [--backend nft|legacy] [--rounds 3]
           [--delta-rounds 7] [--no-packets | --packets-only] [--packet-rounds 11]
           [--seconds 2] [--conns 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import workload as w  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.compiler import Compiler  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane.apply import Dataplane  # noqa: E402
from policy_agent.dataplane.kernel import binary  # noqa: E402
from policy_agent.desired import render_ipset_restore, render_iptables_save  # noqa: E402
from policy_agent.lab import netns  # noqa: E402
from pairlab import pair_lab, sample  # noqa: E402
from policy_agent.model.types import Labels, LabelSelector, NetworkPolicy, PolicyPort, PolicyType, Protocol, Rule  # noqa: E402
from policy_agent.model.types import Peer as MPeer  # noqa: E402

AREA = "dpbench"


CHILD_APPLY = """
import pickle, sys, time
sys.path.insert(0, sys.argv[4])
from policy_agent import logs
from policy_agent.dataplane.apply import Dataplane
logs.configure("console", "warning", stream=sys.stderr)
with open(sys.argv[1], "rb") as f:
    d = pickle.load(f)
dp = Dataplane(netns=sys.argv[2], backend=sys.argv[3])
_ = dp.kernel
t0 = time.perf_counter()
dp.apply(d)
print(time.perf_counter() - t0)
"""


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def raw_restore(ns: str, backend: str, ipset_text: str, v4: str, v6: str) -> float:
    t0 = time.perf_counter()
    netns.run(ns, "ipset", "restore", input=ipset_text)
    netns.run(ns, binary(backend, 4, "restore"), "--noflush", input=v4)
    netns.run(ns, binary(backend, 6, "restore"), "--noflush", input=v6)
    return time.perf_counter() - t0


def from_empty(backend: str, d, rounds: int) -> dict:
    ours, raw = [], []
    ipset_text = render_ipset_restore(d)
    v4, v6 = render_iptables_save(d, 4), render_iptables_save(d, 6)
    lines = 0
    for r in range(rounds):
        for side in (("ours", "raw") if r % 2 == 0 else ("raw", "ours")):
            ns = netns.unique_name(AREA, f"empty{r}")
            try:
                netns.create(ns)
                if side == "ours":
                    dp = Dataplane(netns=ns, backend=backend)
                    _ = dp.kernel  # backend detection is start-up cost, not apply cost
                    t0 = time.perf_counter()
                    lines = dp.apply(d).lines_written
                    ours.append(time.perf_counter() - t0)
                else:
                    raw.append(raw_restore(ns, backend, ipset_text, v4, v6))
            finally:
                netns.delete(ns)
    o, rw = statistics.median(ours), statistics.median(raw)
    return {"ours_s": round(o, 3), "raw_restore_s": round(rw, 3), "ratio_median": round(o / rw, 2),
            "ours_best_s": round(min(ours), 3), "raw_best_s": round(min(raw), 3),
            "ratio_best": round(min(ours) / min(raw), 2), "rounds": rounds, "lines_written": lines,
            "raw_lines": len(ipset_text.splitlines()) + len(v4.splitlines()) + len(v6.splitlines())}


def fresh_process(backend: str, d, rounds: int) -> dict:
    """First apply of a new process into an empty node, vs the raw restore in the same round."""
    ipset_text = render_ipset_restore(d)
    v4, v6 = render_iptables_save(d, 4), render_iptables_save(d, 6)
    ours, raw = [], []
    root = os.path.dirname(os.path.dirname(HERE))
    with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
        pickle.dump(d, f)
        f.flush()
        for r in range(rounds):
            ns = netns.unique_name(AREA, f"fresh{r}")
            try:
                netns.create(ns)
                out = subprocess.run([sys.executable, "-c", CHILD_APPLY, f.name, ns, backend, root],
                                     capture_output=True, text=True, timeout=600, check=True).stdout
                ours.append(float(out.strip().splitlines()[-1]))
            finally:
                netns.delete(ns)
            ns = netns.unique_name(AREA, f"freshraw{r}")
            try:
                netns.create(ns)
                raw.append(raw_restore(ns, backend, ipset_text, v4, v6))
            finally:
                netns.delete(ns)
    o, rw = statistics.median(ours), statistics.median(raw)
    return {"ours_s": round(o, 3), "raw_restore_s": round(rw, 3), "ratio_median": round(o / rw, 2), "rounds": rounds}


def _extra_policy(ns: str, app: str, name: str) -> NetworkPolicy:
    sel = LabelSelector(Labels({"app": app}))
    return NetworkPolicy(ns, name, sel, (PolicyType.INGRESS,),
                         ingress=(Rule((PolicyPort(Protocol.TCP, 8443),),
                                       (MPeer(pod_selector=LabelSelector(Labels({"tier": "web"}))),)),))


def deltas(dp: Dataplane, c: Compiler, pods, rounds: int) -> dict:
    """Forward and back through the incremental compiler, as the agent does."""
    server, _client = w.packet_pair(pods)
    serial = len(pods) + 100
    out: dict = {}

    def one(name: str, fwd, back) -> None:
        times, undo, rep = [], [], None
        for r in range(rounds):
            fwd(r)
            d = c.desired()
            t0 = time.perf_counter()
            rep = dp.apply(d, allow_sweep=True)
            times.append(time.perf_counter() - t0)
            back(r)
            d = c.desired()
            t0 = time.perf_counter()
            dp.apply(d, allow_sweep=True)
            undo.append(time.perf_counter() - t0)
        out[name] = {"apply_ms": round(1000 * statistics.median(times), 1), "max_ms": round(1000 * max(times), 1),
                     "undo_ms": round(1000 * statistics.median(undo), 1), "iptables_lines": rep.iptables_lines,
                     "ipset_lines": rep.ipset_lines, "chains_rewritten": len(rep.chains_rewritten),
                     "chains_created": len(rep.chains_created), "rounds": rounds}

    app = server.labels["app"]
    one("policy_add",
        lambda r: c.upsert_policy(_extra_policy(server.namespace, app, f"bench-extra-{r}")),
        lambda r: c.delete_policy(server.namespace, f"bench-extra-{r}"))
    one("local_pod_add",
        lambda r: c.upsert_pod(w.pod_obj(server.namespace, 1, serial + r, w.NODE, name=f"bench-local-{r}")),
        lambda r: c.delete_pod(server.namespace, f"bench-local-{r}"))
    one("remote_pod_add",
        lambda r: c.upsert_pod(w.pod_obj(server.namespace, 2, serial + 50 + r, "node-77", name=f"bench-remote-{r}")),
        lambda r: c.delete_pod(server.namespace, f"bench-remote-{r}"))
    same = []
    d = c.desired()
    for _ in range(rounds):
        t0 = time.perf_counter()
        rep = dp.apply(d, allow_sweep=True)
        same.append(time.perf_counter() - t0)
    out["nothing_changed"] = {"apply_ms": round(1000 * statistics.median(same), 2), "lines": rep.lines_written}
    return out


BYPASS = "-m comment --comment bench-bypass -j ACCEPT"
CT_ONLY = "-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment bench-ct-only -j ACCEPT"
MODE_RULES = {"none": [BYPASS], "ct_only": [CT_ONLY, BYPASS], "rules": []}
MODES = ("none", "ct_only", "rules")


def per_packet(backend: str, d, pods, rounds: int, seconds: float, conns: int) -> dict:
    server, client = w.packet_pair(pods)
    eps = {(e.namespace, e.pod): e for e in d.endpoints}
    s_ep, c_ep = eps[server.key], eps[client.key]
    s_ip = str(server.ips[0])
    iperf_port, conn_port = w.PAIR_PORTS
    res: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("tput", "cps") for m in MODES}
    restore = binary(backend, 4, "restore")
    with pair_lab(AREA, backend, d, s_ep, c_ep, conn_port, iperf_port) as (node, pc):
        allowed = netns.probe(pc, s_ip, conn_port, "TCP", 2.0)
        denied = netns.probe(pc, s_ip, w.DENIED_PORT, "TCP", 1.0)
        if not allowed or denied:
            raise SystemExit(f"ruleset not in force as expected: allowed={allowed} denied_port_open={denied}")
        current = "rules"

        def switch(mode: str) -> None:
            nonlocal current
            lines = [f"-D FORWARD {x}" for x in MODE_RULES[current]]
            lines += [f"-I FORWARD {i + 1} {x}" for i, x in enumerate(MODE_RULES[mode])]
            if lines:
                netns.run(node, restore, "--noflush", input="*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
            current = mode

        for r in range(rounds):
            for mode in MODES[r % 3:] + MODES[: r % 3]:
                switch(mode)
                tput, cps = sample(pc, s_ip, iperf_port, conn_port, seconds, conns)
                res[f"tput_{mode}"].append(tput)
                res[f"cps_{mode}"].append(cps)
        switch("rules")

    def paired(k: str, a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(res[f"{k}_{a}"], res[f"{k}_{b}"])), 3)

    return {
        "tcp_gbit_median": {m: round(statistics.median(res[f"tput_{m}"]) / 1e9, 2) for m in MODES},
        "conn_per_s_median": {m: round(statistics.median(res[f"cps_{m}"])) for m in MODES},
        "paired_ratio": {f"{k}_{a}_over_{b}": paired(k, a, b) for k in ("tput", "cps")
                         for a, b in (("rules", "ct_only"), ("rules", "none"), ("ct_only", "none"))},
        "rounds": rounds, "seconds": seconds, "conns": conns,
        "pair": {"server": server.ref, "client": client.ref, "iperf_port": iperf_port, "conn_port": conn_port},
        "raw": res,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--rounds", type=int, default=3, help="from-empty rounds")
    ap.add_argument("--delta-rounds", type=int, default=7)
    ap.add_argument("--no-packets", action="store_true", help="skip the per-packet measurements")
    ap.add_argument("--packets-only", action="store_true", help="only the per-packet measurements")
    ap.add_argument("--no-fresh-process", action="store_true", help="skip the fresh-process first apply")
    ap.add_argument("--packet-rounds", type=int, default=11, help="alternating rounds per mode")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one throughput sample")
    ap.add_argument("--conns", type=int, default=2000, help="TCP connects per connection-rate sample")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logs.configure("console", "warning", stream=sys.stderr)
    result: dict = {"machine": machine(), "backend": args.backend}
    t0 = time.perf_counter()
    namespaces, pods, pols = w.cluster(args.pods)
    c = Compiler(NodeConfig(w.NODE)).load(w.snapshot(namespaces, pods, pols))
    d = c.desired()
    result["workload"] = {"pods": len(pods), "policies": len(pols), "namespaces": len(namespaces),
                          "local_pods": len(d.endpoints), "compile_s": round(time.perf_counter() - t0, 2),
                          "chains": sum(len(t) for t in d.chains.values()),
                          "rules": sum(len(ch.rules) for t in d.chains.values() for ch in t.values()),
                          "ipsets": len(d.ipsets), "ipset_members": sum(len(x.members) for x in d.ipsets.values())}
    if not args.packets_only:
        result["from_empty"] = from_empty(args.backend, d, args.rounds)
        if not args.no_fresh_process:
            result["first_apply_fresh_process"] = fresh_process(args.backend, d, args.rounds)
        ns = netns.unique_name(AREA, "delta")
        try:
            netns.create(ns)
            dp = Dataplane(netns=ns, backend=args.backend)
            dp.apply(d, allow_sweep=True)
            result["deltas"] = deltas(dp, c, pods, args.delta_rounds)
            t0 = time.perf_counter()
            rep = Dataplane(netns=ns, backend=args.backend).apply(c.desired())
            result["restart_same_state"] = {"apply_s": round(time.perf_counter() - t0, 3), "lines": rep.lines_written}
        finally:
            netns.delete(ns)
    if not args.no_packets:
        result["per_packet"] = per_packet(args.backend, d, pods, args.packet_rounds, args.seconds, args.conns)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
