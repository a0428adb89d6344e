"""Compiler benchmark: full compile, incremental updates, peak RSS.

Workload: bench/workload.py (default 500 namespaces x 20 pods = 10,000 pods,
4 policies per namespace = 2,000 policies, 110 pods on the measured node;
--pods N picks the size of the scale series).
Incremental: each operation is applied to a warm Compiler and followed by
desired(); both the operation alone and operation+desired() are timed.

Usage: .venv/bin/python bench/compile/run.py [--pods 10000 | --namespaces 500] [--json out.json] [--reps 300]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import workload as w  # noqa: E402
from workload import APPS, LOCAL, NODE, PODS_PER_NS, policies_for, pod_obj  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.compiler import Compiler, compile  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.model.types import ClusterSnapshot, LabelSelector, Labels, Namespace, NetworkPolicy, Pod  # noqa: E402




def workload(seed: int = 1, n_ns: int = 500, n_local: int = LOCAL):
    return w.cluster(n_ns * PODS_PER_NS, n_local, seed)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(xs):
    cpu = CPU.get(id(xs))
    extra = {"cpu_p50_ms": round(pct(cpu, 50) * 1e3, 3), "cpu_p99_ms": round(pct(cpu, 99) * 1e3, 3)} if cpu else {}
    return extra | {"p50_ms": round(pct(xs, 50) * 1e3, 3), "p99_ms": round(pct(xs, 99) * 1e3, 3),
            "max_ms": round(max(xs) * 1e3, 3), "n": len(xs)}


CPU: dict[int, list[float]] = {}


def timed(c: Compiler, op, samples_op, samples_total):
    """Wall time of op and of op+desired(); CPU time of op+desired() kept aside
    (the machine is shared, so wall-clock tails include time spent descheduled)."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    op()
    t1 = time.perf_counter()
    c.desired()
    t2 = time.perf_counter()
    c1 = time.thread_time()
    samples_op.append(t1 - t0)
    samples_total.append(t2 - t0)
    CPU.setdefault(id(samples_total), []).append(c1 - c0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--namespaces", type=int, default=500, help="namespaces (20 pods, 4 policies each)")
    ap.add_argument("--pods", type=int, default=0, help="pods (overrides --namespaces: pods / 20 namespaces)")
    ap.add_argument("--local", type=int, default=LOCAL, help="pods on the measured node")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() after the initial load (moves the loaded objects out of GC scans)")
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
        gc.collect()
        gc.freeze()
    results = {}
    serial = len(pods) + 1000  # new pods get addresses no existing pod has
    local_keys = [p.key for p in pods if p.node_name == NODE]

    # pod add (remote and local, alternating) then delete (delete timed separately)
    add_op, add_tot, del_op, del_tot = [], [], [], []
    for r in range(args.reps):
        ns = namespaces[rng.randrange(n_ns)].name
        serial += 1
        p = pod_obj(ns, rng.randrange(PODS_PER_NS), serial, NODE if r % 2 else "node-7")
        p = Pod(p.namespace, f"new-{serial}", p.labels, p.node_name, p.ips, p.ports, phase="Running")
        timed(c, lambda p=p: c.upsert_pod(p), add_op, add_tot)
        timed(c, lambda p=p: c.delete_pod(p.namespace, p.name), del_op, del_tot)
    results["pod_add"] = {"op": ms(add_op), "op+desired": ms(add_tot)}
    results["pod_delete"] = {"op": ms(del_op), "op+desired": ms(del_tot)}

    # pod label change (a quarter of them on local pods, which also re-selects policies)
    lab_op, lab_tot = [], []
    for r in range(args.reps):
        key = local_keys[rng.randrange(len(local_keys))] if r % 4 == 0 else pods[rng.randrange(len(pods))].key
        old = c.pods[key]
        labels = dict(old.labels)
        labels["app"] = f"app-{rng.randrange(APPS)}"
        labels["role"] = "monitor" if rng.random() < 0.5 else "none"
        new = Pod(old.namespace, old.name, Labels(labels), old.node_name, old.ips, old.ports, phase=old.phase)
        timed(c, lambda new=new: c.upsert_pod(new), lab_op, lab_tot)
    results["pod_label_change"] = {"op": ms(lab_op), "op+desired": ms(lab_tot)}

    # namespace label change (team and env flip: moves 20 pods in/out of namespace-selector sets)
    nsl_op, nsl_tot = [], []
    for _ in range(args.reps):
        old = c.namespaces[namespaces[rng.randrange(n_ns)].name]
        labels = dict(old.labels)
        labels["team"] = f"t{rng.randrange(25)}"
        labels["env"] = rng.choice(("prod", "stage", "dev"))
        new = Namespace(old.name, Labels(labels))
        timed(c, lambda new=new: c.upsert_namespace(new), nsl_op, nsl_tot)
    results["namespace_label_change"] = {"op": ms(nsl_op), "op+desired": ms(nsl_tot)}

    # policy add (new name in a random namespace; then removed again)
    pa_op, pa_tot = [], []
    for r in range(args.reps):
        i = rng.randrange(n_ns)
        ns = c.namespaces[namespaces[i].name]
        base = policies_for(i + rng.randrange(1, 5), ns)[rng.randrange(1, 4)]
        pol = NetworkPolicy(ns.name, f"extra-{r}", base.pod_selector, base.policy_types, base.ingress, base.egress)
        timed(c, lambda pol=pol: c.upsert_policy(pol), pa_op, pa_tot)
        c.delete_policy(pol.namespace, pol.name)
        c.desired()
    results["policy_add"] = {"op": ms(pa_op), "op+desired": ms(pa_tot)}

    # policy add that selects a local pod (activates the policy: chains and selector sets)
    pl_op, pl_tot = [], []
    for r in range(args.reps):
        key = local_keys[rng.randrange(len(local_keys))]
        pod = c.pods[key]
        i = int(key[0].split("-")[1])
        ns = c.namespaces[key[0]]
        base = policies_for(i + rng.randrange(1, 5), ns)[rng.randrange(1, 4)]
        pol = NetworkPolicy(ns.name, f"local-{r}", LabelSelector(Labels({"app": pod.labels["app"]})),
                            base.policy_types, base.ingress, base.egress)
        timed(c, lambda pol=pol: c.upsert_policy(pol), pl_op, pl_tot)
        c.delete_policy(pol.namespace, pol.name)
        c.desired()
    results["policy_add_selecting_local_pod"] = {"op": ms(pl_op), "op+desired": ms(pl_tot)}

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
