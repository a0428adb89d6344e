"""Agent benchmark: event-to-enforced latency, initial sync, idle CPU, RSS.

Runs the real agent loop (store -> incremental compiler -> real Dataplane) in a
private network namespace (never the root namespace), fed by an in-process
source so the figure is the agent's own: from the event entering the agent's
sink to the kernel commit (iptables-restore / ipset restore returned) that
enforces it, as the agent measures it for /metrics.

Workload (default): 10,000 pods in 100 namespaces, ~110 of them local to this
node, 2,000 NetworkPolicies (20 per namespace: ingress from a pod selector on a
port, every 4th also egress to an ipBlock with an except, every 5th also from a
namespace selector). Then, one event at a time with a pause longer than the
agent's min interval between them (independent events, not a burst):
  pod add        a new local pod (selected by one policy of its namespace)
  label change   alternately a local pod (changes which policies select it) and a
                 remote pod (changes ipset membership)
  policy add     a new policy selecting local pods
  cnp create     a new ClusterNetworkPolicy (Admin and Baseline alternately) whose
                 subject is one namespace: an ingress rule from pods of the namespaces
                 of a team on TCP 80, an egress Deny to a CIDR
  cnp update     each of them again with another priority and the ingress action Pass
  cnp delete     each of them deleted
Then idle CPU (agent + its iptables/ipset children) over --idle seconds, which
includes the periodic kernel refresh, and RSS (VmRSS/VmHWM of this process,
which is the agent plus this driver's copy of the objects).

  sudo .venv/bin/python bench/agent/latency.py --backend nft|legacy [--pods 10000 --policies 2000 --events 200 --idle 60]
  sudo .venv/bin/python bench/agent/latency.py --backend nft --scale 50000   # the scale series' workload

The backend is passed explicitly: in a fresh namespace there are no rules to detect
from, so "auto" would measure whichever backend the tie rule picks on this host.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import workload as w  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.agent import Agent, PushSource  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane.apply import Dataplane  # noqa: E402
from policy_agent.lab import netns  # noqa: E402
from policy_agent.model.types import (  # noqa: E402
    ClusterNetworkPolicy,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    IPBlock,
    LabelSelector,
    Labels,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Rule,
)

NODE = "n1"


def ip_of(n: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.233.0.0")) + 1 + n)


def make_pod(ns: str, name: str, n: int, app: str, role: str, local: bool) -> Pod:
    return Pod(ns, name, Labels({"app": app, "role": role}), NODE if local else f"other-{n % 50}",
               (ip_of(n),), phase="Running")


def make_policy(ns: str, k: int, salt: str = "") -> NetworkPolicy:
    peers = [Peer(pod_selector=LabelSelector(Labels({"role": f"r{k % 5}"})))]
    if k % 5 == 0:
        peers.append(Peer(pod_selector=LabelSelector(Labels({"role": "r0"})),
                          namespace_selector=LabelSelector(Labels({"team": f"t{k % 3}"}))))
    types = [PolicyType.INGRESS]
    egress: tuple[Rule, ...] = ()
    if k % 4 == 0:
        types.append(PolicyType.EGRESS)
        egress = (Rule((PolicyPort(port=443),), (Peer(ip_block=IPBlock(
            ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.233.0.0/16"),))),)),)
    return NetworkPolicy(
        ns, f"pol-{k}{salt}", LabelSelector(Labels({"app": f"app-{k % 20}"})), tuple(types),
        (Rule((PolicyPort(port=8000 + k % 100),), tuple(peers)),), egress,
    )


def make_cnp(e: int) -> ClusterNetworkPolicy:
    peer = CNPPeer("pods", namespace_selector=LabelSelector(Labels({"team": f"t{e % 3}"})),
                   pod_selector=LabelSelector(Labels({"role": f"r{e % 5}"})))
    docs_net = CNPPeer("networks", networks=(ipaddress.ip_network("192.0.2.0/24"),))
    return ClusterNetworkPolicy(
        f"cnp-{e}", CNPTier.ADMIN if e % 2 == 0 else CNPTier.BASELINE, e % 1000,
        subject_namespaces=LabelSelector(Labels({"kubernetes.io/metadata.name": f"ns-{e % 100}"})),
        ingress=(CNPRule(CNPAction.DENY, "from-team", (peer,), (CNPPort(Protocol.TCP, 80, 80),)),),
        egress=(CNPRule(CNPAction.DENY, "no-docs-net", (docs_net,)),),
    )


def workload(n_pods: int, n_policies: int, n_ns: int = 100):
    per_ns = max(1, n_pods // n_ns)
    namespaces = {f"ns-{i}": Namespace(f"ns-{i}", Labels({"kubernetes.io/metadata.name": f"ns-{i}",
                                                          "team": f"t{i % 3}"})) for i in range(n_ns)}
    pods = {}
    n = 0
    for i in range(n_ns):
        for j in range(per_ns):
            local = n % 91 == 0
            p = make_pod(f"ns-{i}", f"p-{j}", n, f"app-{j % 20}", f"r{j % 5}", local)
            pods[p.key] = p
            n += 1
    pols = {}
    per_ns_pol = max(1, n_policies // n_ns)
    for i in range(n_ns):
        for k in range(per_ns_pol):
            pol = make_policy(f"ns-{i}", k)
            pols[pol.key] = pol
    return namespaces, pods, pols, n


def scale_workload(n_pods: int):
    """bench/workload.py (the scale series): 20 pods and 4 policies per namespace."""
    namespaces, pods, pols = w.cluster(n_pods)
    return ({n.name: n for n in namespaces}, {p.key: p for p in pods}, {p.key: p for p in pols}, len(pods) + 1000)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def rss_kb() -> tuple[int, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out["VmRSS"], out["VmHWM"]


class Waiter:
    """Collects on_enforced callbacks; lets the driver wait for the next one of a kind."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, float]] = []

    def __call__(self, kind: str, seconds: float) -> None:
        with self.cond:
            self.seen.append((kind, seconds))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.seen)

    def wait_after(self, mark: int, timeout: float = 60.0) -> float:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.seen) > mark, timeout)
            if not ok:
                raise TimeoutError("event not enforced in time")
            return self.seen[mark][1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=2_000)
    ap.add_argument("--events", type=int, default=200, help="events per scenario")
    ap.add_argument("--gap", type=float, default=0.05, help="pause between events (s)")
    ap.add_argument("--idle", type=float, default=60.0, help="idle CPU window (s)")
    ap.add_argument("--min-interval", type=float, default=0.02)
    ap.add_argument("--refresh-interval", type=float, default=30.0)
    ap.add_argument("--backend", choices=("nft", "legacy", "auto"), default="nft", help="iptables backend")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--scale", type=int, default=0,
                    help="use bench/workload.py with this many pods (0.2 policies per pod) instead of --pods/--policies")
    args = ap.parse_args()
    logs.configure("console", "warning")

    node_ns = netns.unique_name("agbench", "node")
    netns.create(node_ns)
    agent = None
    try:
        if args.scale:
            namespaces, pods, pols, n_next = scale_workload(args.scale)
        else:
            namespaces, pods, pols, n_next = workload(args.pods, args.policies)
        nslist = sorted(namespaces)
        src = PushSource("kube", {"Namespace": namespaces, "Pod": pods, "NetworkPolicy": pols})
        waiter = Waiter()
        node_name = w.NODE if args.scale else NODE
        agent = Agent(NodeConfig(node_name), Dataplane(netns=node_ns, backend=args.backend), [src], min_interval=args.min_interval,
                      refresh_interval=args.refresh_interval, on_enforced=waiter)
        t0 = time.monotonic()
        agent.start()
        if not agent.wait_ready(600):
            raise SystemExit("agent not ready within 600 s")
        initial = time.monotonic() - t0
        st = agent.status()
        print(f"initial sync: {initial:.2f} s  ({st['counts']})", flush=True)

        results: dict[str, list[float]] = {"pod_add": [], "pod_label_change": [], "policy_add": [],
                                           "cnp_create": [], "cnp_update": [], "cnp_delete": []}
        reg = agent.metrics.registry
        split: dict[str, dict[str, float]] = {}

        def sums() -> tuple[float, float, float]:
            g = reg.get_sample_value
            return (g("policy_agent_compile_duration_seconds_sum") or 0.0,
                    g("policy_agent_apply_duration_seconds_sum") or 0.0,
                    g("policy_agent_apply_duration_seconds_count") or 0.0)

        def phase(name: str, before: tuple[float, float, float]) -> None:
            c, a, n = (x - y for x, y in zip(sums(), before))
            # apply_duration covers compile + kernel write; split them per apply
            split[name] = {"applies": int(n), "compile_ms_mean": round(1000 * c / max(n, 1), 2),
                           "kernel_write_ms_mean": round(1000 * (a - c) / max(n, 1), 2)}

        def one(fn) -> float:
            time.sleep(args.gap)
            m = waiter.mark()
            fn()
            return waiter.wait_after(m)

        # pod add: new local pods
        before = sums()
        for e in range(args.events):
            if args.scale:
                p = w.pod_obj(nslist[e % len(nslist)], e % w.PODS_PER_NS, n_next, node_name, name=f"new-{e}")
            else:
                p = make_pod(f"ns-{e % 100}", f"new-{e}", n_next, f"app-{e % 20}", f"r{e % 5}", True)
            n_next += 1
            results["pod_add"].append(one(lambda p=p: src.upsert("Pod", p.key, p)))
        phase("pod_add", before)
        before = sums()
        # label change: alternate local / remote pods
        local = [p for p in pods.values() if p.node_name == node_name]
        remote = [p for p in pods.values() if p.node_name != node_name]
        napps = w.APPS if args.scale else 20
        for e in range(args.events):
            pick = local[e % len(local)] if e % 2 == 0 else remote[(e * 37) % len(remote)]
            base = pods[pick.key]  # current version: a repeat pick must still be a change
            newapp = f"app-{(int(base.labels['app'].split('-')[1]) + 1) % napps}"
            q = Pod(base.namespace, base.name, Labels({**base.labels, "app": newapp}), base.node_name, base.ips,
                    base.ports, phase="Running")
            pods[q.key] = q
            results["pod_label_change"].append(one(lambda q=q: src.upsert("Pod", q.key, q)))
        phase("pod_label_change", before)
        before = sums()
        # policy add
        for e in range(args.events):
            if args.scale:  # selects a local pod's app in its namespace
                lp = local[e % len(local)]
                pol = make_policy(lp.namespace, int(lp.labels["app"].split("-")[1]), salt=f"-new{e}")
            else:
                pol = make_policy(f"ns-{e % 100}", e % 20, salt=f"-new{e}")
            results["policy_add"].append(one(lambda pol=pol: src.upsert("NetworkPolicy", pol.key, pol)))
        phase("policy_add", before)
        # ClusterNetworkPolicy create, update, delete
        cnps = [make_cnp(e) for e in range(args.events)]
        before = sums()
        for c in cnps:
            results["cnp_create"].append(one(lambda c=c: src.upsert("ClusterNetworkPolicy", c.key, c)))
        phase("cnp_create", before)
        before = sums()
        for c in cnps:
            u = dataclasses.replace(c, priority=(c.priority + 500) % 1001, ingress=tuple(
                dataclasses.replace(r, action=CNPAction.PASS) for r in c.ingress))
            results["cnp_update"].append(one(lambda u=u: src.upsert("ClusterNetworkPolicy", u.key, u)))
        phase("cnp_update", before)
        before = sums()
        for c in cnps:
            results["cnp_delete"].append(one(lambda c=c: src.delete("ClusterNetworkPolicy", c.key)))
        phase("cnp_delete", before)

        # idle
        t = os.times()
        w0 = time.monotonic()
        time.sleep(args.idle)
        t2 = os.times()
        wall = time.monotonic() - w0
        cpu = (t2.user - t.user) + (t2.system - t.system) + (t2.children_user - t.children_user) + (
            t2.children_system - t.children_system)
        rss, hwm = rss_kb()
        st = agent.status()
        out = {
            "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.platform()}",
            "workload": {"pods": len(pods), "policies": len(pols), "namespaces": len(namespaces),
                         "local_endpoints": st["counts"]["local_endpoints"], "rules": st["counts"]["rules"],
                         "ipsets": st["counts"]["ipsets"], "events_per_scenario": args.events,
                         "gap_s": args.gap, "min_interval_s": args.min_interval,
                         "backend": agent.dataplane.backend},
            "initial_sync_s": round(initial, 3),
            "latency_ms": {k: {"p50": round(pct(v, 0.5) * 1000, 2), "p99": round(pct(v, 0.99) * 1000, 2),
                               "max": round(max(v) * 1000, 2), "mean": round(statistics.mean(v) * 1000, 2)}
                           for k, v in results.items()},
            "per_apply_split": split,
            "idle_cpu_percent_of_core": round(100 * cpu / wall, 3),
            "idle_window_s": round(wall, 1),
            "rss_mb": round(rss / 1024, 1),
            "peak_rss_mb": round(hwm / 1024, 1),
        }
        print(json.dumps(out, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    finally:
        if agent is not None:
            agent.stop()
        netns.delete(node_ns)


if __name__ == "__main__":
    sys.exit(main())
