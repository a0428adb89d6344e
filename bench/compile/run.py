"""Compiler benchmark: full compile, incremental updates, peak RSS.

Workload: bench/workload.py (default 500 namespaces x 20 pods = 10,000 pods,
4 policies per namespace = 2,000 policies, 110 pods on the measured node;
--pods N picks the size of the scale series).
Incremental: each operation is applied to a warm Compiler (heap frozen after the
load by the agent's own Agent._freeze_heap, so the bench follows whatever the agent
does once ready) and followed by desired(); both the operation alone and
operation+desired() are timed, in wall clock and in CPU time (process_time: the
machine is shared), and the CPU the garbage collector took inside each is reported
beside it (gc_p99_ms, gc_total_ms; --gc-threshold N tries another generation-0
threshold after the freeze), and so is the collection the agent's loop runs after
each event when nothing else is queued (idle_gc_p99_ms, idle_gc_total_ms). Kinds: remote/local pod add, delete and
label change; namespace label change; policy add, update and delete (in a random
namespace, and selecting a local pod); ClusterNetworkPolicy add and delete.

Usage: .venv/bin/python bench/compile/run.py [--pods 10000 | --namespaces 500] [--json out.json] [--reps 300]
       [--gc-threshold N]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import platform
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import workload as w  # noqa: E402
from workload import APPS, LOCAL, NODE, PODS_PER_NS, policies_for, pod_obj  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.agent import Agent  # noqa: E402
from policy_agent.compiler import Compiler, compile  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.model.types import (  # noqa: E402
    ClusterNetworkPolicy,
    ClusterSnapshot,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    LabelSelector,
    Labels,
    Namespace,
    NetworkPolicy,
    Pod,
    Protocol,
)


def _cnp(r: int, subject_ns: str) -> ClusterNetworkPolicy:
    """Admin and Baseline alternately: one namespace as subject, ingress Deny from monitor
    pods of a team's namespaces on tcp/80, egress Deny to a documentation CIDR."""
    peer = CNPPeer("pods", namespace_selector=LabelSelector(Labels({"team": f"t{r % 25}"})),
                   pod_selector=LabelSelector(Labels({"role": "monitor"})))
    net = CNPPeer("networks", networks=(ipaddress.ip_network("192.0.2.0/24"),))
    return ClusterNetworkPolicy(
        f"cnp-{r}", CNPTier.ADMIN if r % 2 == 0 else CNPTier.BASELINE, r % 1000,
        subject_namespaces=LabelSelector(Labels({"kubernetes.io/metadata.name": subject_ns})),
        ingress=(CNPRule(CNPAction.DENY, "from-team", (peer,), (CNPPort(Protocol.TCP, 80, 80),)),),
        egress=(CNPRule(CNPAction.DENY, "no-docs-net", (net,)),),
    )


def workload(seed: int = 1, n_ns: int = 500, n_local: int = LOCAL):
    return w.cluster(n_ns * PODS_PER_NS, n_local, seed)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(xs):
    cpu = CPU.get(id(xs))
    extra = {"cpu_p50_ms": round(pct(cpu, 50) * 1e3, 3), "cpu_p99_ms": round(pct(cpu, 99) * 1e3, 3)} if cpu else {}
    gcs = GC.get(id(xs))
    if gcs:
        # how much of the CPU tail is the collector (a collection lands in whichever op allocates)
        extra |= {"gc_p99_ms": round(pct(gcs, 99) * 1e3, 3), "gc_total_ms": round(sum(gcs) * 1e3, 1)}
    after = AFTER.get(id(xs))
    if after:
        extra |= {"idle_gc_p99_ms": round(pct(after, 99) * 1e3, 3), "idle_gc_total_ms": round(sum(after) * 1e3, 1)}
    return extra | {"p50_ms": round(pct(xs, 50) * 1e3, 3), "p99_ms": round(pct(xs, 99) * 1e3, 3),
            "max_ms": round(max(xs) * 1e3, 3), "n": len(xs)}


CPU: dict[int, list[float]] = {}
GC: dict[int, list[float]] = {}  # CPU seconds the garbage collector took inside each op+desired()
AFTER: dict[int, list[float]] = {}  # CPU seconds of the loop's collection after each event (Agent.idle_gc)
_gc_clock = {"start": 0.0, "spent": 0.0}


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_clock["start"] = time.process_time()
    else:
        _gc_clock["spent"] += time.process_time() - _gc_clock["start"]


def timed(c: Compiler, op, samples_op, samples_total):
    """Wall time of op and of op+desired(); CPU time (process_time) of op+desired() kept
    aside (the machine is shared, so wall-clock tails include time spent descheduled)."""
    _gc_clock["spent"] = 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    op()
    t1 = time.perf_counter()
    c.desired()
    t2 = time.perf_counter()
    c1 = time.process_time()
    samples_op.append(t1 - t0)
    samples_total.append(t2 - t0)
    CPU.setdefault(id(samples_total), []).append(c1 - c0)
    GC.setdefault(id(samples_total), []).append(_gc_clock["spent"])
    # What the agent's loop does once the event is enforced and nothing else is queued
    # (automatic collection is off after Agent._freeze_heap): not in the event's time,
    # reported beside it.
    _gc_clock["spent"] = 0.0
    Agent.idle_gc(True)
    AFTER.setdefault(id(samples_total), []).append(_gc_clock["spent"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--namespaces", type=int, default=500, help="namespaces (20 pods, 4 policies each)")
    ap.add_argument("--pods", type=int, default=0, help="pods (overrides --namespaces: pods / 20 namespaces)")
    ap.add_argument("--local", type=int, default=LOCAL, help="pods on the measured node")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                    help="skip gc.freeze() after the initial load (the agent freezes its heap once ready)")
    ap.add_argument("--gc-threshold", type=int, default=0,
                    help="generation-0 collection threshold after the load (default: what the agent leaves)")
    args = ap.parse_args()
    logs.configure("console", "warning")
    rng = random.Random(42)
    if args.pods:
        args.namespaces = -(-args.pods // PODS_PER_NS)
    namespaces, pods, pols = workload(n_ns=args.namespaces, n_local=args.local)
    n_ns = len(namespaces)
    snap = ClusterSnapshot.of([*namespaces, *pods, *pols])
    node = NodeConfig(NODE)

    gc.collect()
    full, full_cpu = [], []
    for _ in range(5):
        c0 = time.process_time()
        t0 = time.perf_counter()
        state = compile(snap, node)
        full.append(time.perf_counter() - t0)
        full_cpu.append(time.process_time() - c0)
    shape = {
        "chains_v4": len(state.table(4)), "chains_v6": len(state.table(6)),
        "rules_v4": sum(len(c.rules) for c in state.table(4).values()),
        "ipsets": len(state.ipsets), "ipset_members": sum(len(s.members) for s in state.ipsets.values()),
        "endpoints": len(state.endpoints),
        "active_policies": len({p for e in state.endpoints for p in e.ingress_policies + e.egress_policies}),
    }

    c = Compiler(node).load(snap)
    c.desired()
    if args.gc_freeze:
        Agent._freeze_heap()  # what the agent does once ready, whatever that becomes
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    gc.callbacks.append(_gc_callback)
    results = {}
    serial = len(pods) + 1000  # new pods get addresses no existing pod has
    local_keys = [p.key for p in pods if p.node_name == NODE]

    def pod_like(ns: str, j: int, node: str) -> Pod:
        nonlocal serial
        serial += 1
        p = pod_obj(ns, j, serial, node)
        return Pod(p.namespace, f"new-{serial}", p.labels, p.node_name, p.ips, p.ports, phase="Running")

    # pod add then delete, remote and local separately (a local pod also builds its endpoint
    # chains, may activate its namespace's policies and changes the dispatch chains)
    for where, node_name in (("remote", "node-7"), ("local", NODE)):
        add_op, add_tot, del_op, del_tot = [], [], [], []
        for _ in range(args.reps):
            p = pod_like(namespaces[rng.randrange(n_ns)].name, rng.randrange(PODS_PER_NS), node_name)
            timed(c, lambda p=p: c.upsert_pod(p), add_op, add_tot)
            timed(c, lambda p=p: c.delete_pod(p.namespace, p.name), del_op, del_tot)
        results[f"{where}_pod_add"] = {"op": ms(add_op), "op+desired": ms(add_tot)}
        results[f"{where}_pod_delete"] = {"op": ms(del_op), "op+desired": ms(del_tot)}

    # pod label change (app and role: moves the pod between selector sets; a local pod
    # also changes which policies select it)
    remote_keys = [p.key for p in pods if p.node_name != NODE]
    for where, keys in (("remote", remote_keys), ("local", local_keys)):
        lab_op, lab_tot = [], []
        for _ in range(args.reps):
            old = c.pods[keys[rng.randrange(len(keys))]]
            labels = dict(old.labels)
            labels["app"] = f"app-{(int(labels['app'].split('-')[1]) + 1 + rng.randrange(APPS - 1)) % APPS}"
            labels["role"] = "none" if labels.get("role") == "monitor" else "monitor"
            new = Pod(old.namespace, old.name, Labels(labels), old.node_name, old.ips, old.ports, phase=old.phase)
            timed(c, lambda new=new: c.upsert_pod(new), lab_op, lab_tot)
        results[f"{where}_pod_label_change"] = {"op": ms(lab_op), "op+desired": ms(lab_tot)}

    # namespace label change (team and env flip: moves 20 pods in/out of namespace-selector sets)
    nsl_op, nsl_tot = [], []
    for _ in range(args.reps):
        old = c.namespaces[namespaces[rng.randrange(n_ns)].name]
        labels = dict(old.labels)
        labels["team"] = f"t{(int(labels['team'][1:]) + 1 + rng.randrange(24)) % 25}"
        labels["env"] = rng.choice([e for e in ("prod", "stage", "dev") if e != labels["env"]])
        new = Namespace(old.name, Labels(labels))
        timed(c, lambda new=new: c.upsert_namespace(new), nsl_op, nsl_tot)
    results["namespace_label_change"] = {"op": ms(nsl_op), "op+desired": ms(nsl_tot)}

    def extra_policy(ns: Namespace, i: int, name: str, selector: LabelSelector | None = None) -> NetworkPolicy:
        base = policies_for(i + rng.randrange(1, 5), ns)[rng.randrange(1, 4)]
        return NetworkPolicy(ns.name, name, selector or base.pod_selector, base.policy_types, base.ingress,
                             base.egress)

    # policy add, update (a different rule set under the same name) and delete, in a random
    # namespace (most select no local pod: sets and chains only where one does)
    pa_op, pa_tot, pu_op, pu_tot, pd_op, pd_tot = [], [], [], [], [], []
    for r in range(args.reps):
        i = rng.randrange(n_ns)
        ns = c.namespaces[namespaces[i].name]
        pol = extra_policy(ns, i, f"extra-{r}")
        timed(c, lambda pol=pol: c.upsert_policy(pol), pa_op, pa_tot)
        upd = extra_policy(ns, i + 1, f"extra-{r}")
        timed(c, lambda upd=upd: c.upsert_policy(upd), pu_op, pu_tot)
        timed(c, lambda pol=pol: c.delete_policy(pol.namespace, pol.name), pd_op, pd_tot)
    results["policy_add"] = {"op": ms(pa_op), "op+desired": ms(pa_tot)}
    results["policy_update"] = {"op": ms(pu_op), "op+desired": ms(pu_tot)}
    results["policy_delete"] = {"op": ms(pd_op), "op+desired": ms(pd_tot)}

    # the same for a policy that selects a local pod (activates it: chains and selector sets)
    pa_op, pa_tot, pu_op, pu_tot, pd_op, pd_tot = [], [], [], [], [], []
    for r in range(args.reps):
        key = local_keys[rng.randrange(len(local_keys))]
        pod = c.pods[key]
        i = int(key[0].split("-")[1])
        ns = c.namespaces[key[0]]
        sel = LabelSelector(Labels({"app": pod.labels["app"]}))
        pol = extra_policy(ns, i, f"local-{r}", sel)
        timed(c, lambda pol=pol: c.upsert_policy(pol), pa_op, pa_tot)
        upd = extra_policy(ns, i + 1, f"local-{r}", sel)
        timed(c, lambda upd=upd: c.upsert_policy(upd), pu_op, pu_tot)
        timed(c, lambda pol=pol: c.delete_policy(pol.namespace, pol.name), pd_op, pd_tot)
    results["policy_add_selecting_local_pod"] = {"op": ms(pa_op), "op+desired": ms(pa_tot)}
    results["policy_update_selecting_local_pod"] = {"op": ms(pu_op), "op+desired": ms(pu_tot)}
    results["policy_delete_selecting_local_pod"] = {"op": ms(pd_op), "op+desired": ms(pd_tot)}

    # ClusterNetworkPolicy add and delete (one namespace's pods as subject, as bench/agent/latency.py)
    ca_op, ca_tot, cd_op, cd_tot = [], [], [], []
    for r in range(args.reps):
        key = local_keys[rng.randrange(len(local_keys))]
        cnp = _cnp(r, key[0])
        timed(c, lambda cnp=cnp: c.upsert_cluster_policy(cnp), ca_op, ca_tot)
        timed(c, lambda cnp=cnp: c.delete_cluster_policy(cnp.name), cd_op, cd_tot)
    results["cnp_add"] = {"op": ms(ca_op), "op+desired": ms(ca_tot)}
    results["cnp_delete"] = {"op": ms(cd_op), "op+desired": ms(cd_tot)}

    # the incremental state still equals a full compile of the same objects
    final = ClusterSnapshot.of([*c.namespaces.values(), *c.pods.values(), *c.policies.values()])
    consistent = c.desired() == compile(final, node)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "cpu": _cpu_model()},
        "workload": {"namespaces": n_ns, "pods": len(pods), "policies": len(pols), "local_pods": args.local},
        "output_shape": shape,
        "full_compile": {"runs_s": [round(x, 3) for x in full], "median_s": round(statistics.median(full), 3),
                         "cpu_median_s": round(statistics.median(full_cpu), 3)},
        "incremental": results,
        "incremental_equals_full": consistent,
        "peak_rss_mb": round(rss_mb, 1),
        "gc_threshold": gc.get_threshold(),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if consistent else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
