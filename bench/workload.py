"""The generated cluster every benchmark runs on (seeded, deterministic).

Per namespace: 20 pods and 4 NetworkPolicies (0.2 policies per pod), so a size in
pods fixes the rest: 10,000 pods = 500 namespaces / 2,000 policies; 50,000 pods =
2,500 namespaces / 10,000 policies. 110 pods are local to the measured node
(``NODE``); a quarter of the pods are dual-stack. Namespace i's policies:
  1. default-deny ingress (podSelector {}),
  2. app-<k> (k = i % 5) from app-<k+1> of the same namespace on tcp/8080 and the
     named port "http" (8080 + j % 3 on pod j),
  3. tier in (api, web) from pods labelled role=monitor in namespaces team=<t>
     on the named port "metrics" (namespace + pod selector),
  4. egress of the whole namespace: DNS to ns-000, tcp/443 to 0.0.0.0/0 except
     10.0.0.0/8, and any port to the pods of namespaces with the same env label.

Addresses: pod serial s gets 10.<233 + s // 65536>.<(s // 256) % 256>.<s % 256>
(10.233.0.0/16 up to 65,536 pods; the 100k series continues in 10.234/16, in
ipsets only) and fd00:233::<s // 65536>:<s % 65536>. Nothing is sent to any of
them except between the two lab pods of ``packet_pair``.

``packet_pair``: two local pods of ns-001 (serials 21 and 22): the server pod p-001
(app-1, tier api, http = tcp/8081) and the client p-002 (app-2). The server's
policies allow the client on tcp/8080 and tcp/8081 (policy 2); the client's egress
allows any port to its own namespace (policy 4); every other port is denied.
"""

from __future__ import annotations

import ipaddress
import random

from policy_agent.model.types import (
    MATCH_ALL,
    ClusterSnapshot,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

NODE = "node-1"
PODS_PER_NS, POLS_PER_NS, LOCAL = 20, 4, 110
APPS = 5
PAIR_SERIALS = (21, 22)  # ns-001/p-001 (server), ns-001/p-002 (client)
PAIR_PORTS = (8080, 8081)  # allowed client -> server; iperf3 on the first, connects on the second
DENIED_PORT = 9999


def ns_obj(i: int, rng: random.Random) -> Namespace:
    name = f"ns-{i:03d}"
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, "team": f"t{i % 25}",
                                   "env": rng.choice(("prod", "stage", "dev"))}))


def pod_ips(serial: int) -> tuple:
    ips = [ipaddress.ip_address(f"10.{233 + serial // 65536}.{(serial // 256) % 256}.{serial % 256}")]
    if serial % 4 == 0:
        ips.append(ipaddress.ip_address(f"fd00:233::{serial // 65536:x}:{serial % 65536:x}"))
    return tuple(ips)


def pod_obj(ns: str, j: int, serial: int, node: str, labels_extra=None, name: str | None = None) -> Pod:
    labels = {"app": f"app-{j % APPS}", "tier": ("web", "api", "db")[j % 3], "pod-template-hash": f"h{j % 7}"}
    if j % 10 == 0:
        labels["role"] = "monitor"
    labels.update(labels_extra or {})
    ports = (ContainerPort(8080 + j % 3, Protocol.TCP, "http"), ContainerPort(9100, Protocol.TCP, "metrics"))
    return Pod(ns, name or f"p-{j:03d}", Labels(labels), node, pod_ips(serial), ports, phase="Running")


def sel(**labels) -> LabelSelector:
    return LabelSelector(Labels(labels))


def policies_for(i: int, ns: Namespace) -> list[NetworkPolicy]:
    n = ns.name
    k = i % APPS
    env = ns.labels["env"]
    return [
        NetworkPolicy(n, "default-deny", MATCH_ALL, (PolicyType.INGRESS,)),
        NetworkPolicy(
            n, f"app-{k}-ingress", sel(app=f"app-{k}"), (PolicyType.INGRESS,),
            ingress=(Rule((PolicyPort(Protocol.TCP, 8080), PolicyPort(Protocol.TCP, "http")),
                          (Peer(pod_selector=sel(app=f"app-{(k + 1) % APPS}")),)),),
        ),
        NetworkPolicy(
            n, "allow-monitoring",
            LabelSelector(match_expressions=(Requirement("tier", Operator.IN, ("api", "web")),)),
            (PolicyType.INGRESS,),
            ingress=(Rule((PolicyPort(Protocol.TCP, "metrics"),),
                          (Peer(pod_selector=sel(role="monitor"), namespace_selector=sel(team=f"t{(i + 1) % 25}")),)),),
        ),
        NetworkPolicy(
            n, "egress", MATCH_ALL, (PolicyType.EGRESS,),
            egress=(
                Rule((PolicyPort(Protocol.UDP, 53), PolicyPort(Protocol.TCP, 53)),
                     (Peer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "ns-000"})),)),
                Rule((PolicyPort(Protocol.TCP, 443),),
                     (Peer(ip_block=IPBlock(ipaddress.ip_network("0.0.0.0/0"),
                                            (ipaddress.ip_network("10.0.0.0/8"),))),)),
                Rule((), (Peer(namespace_selector=sel(env=env)),)),
            ),
        ),
    ]


def cluster(pods: int = 10_000, local: int = LOCAL, seed: int = 1):
    """(namespaces, pods, policies) for ``pods`` pods (rounded up to whole namespaces)."""
    n_ns = max(2, -(-pods // PODS_PER_NS))
    rng = random.Random(seed)
    namespaces = [ns_obj(i, rng) for i in range(n_ns)]
    total = n_ns * PODS_PER_NS
    chosen = set(rng.sample(range(total), min(total, local)))
    for s in PAIR_SERIALS:  # the per-packet pair is always local; keep the count
        if s not in chosen:
            chosen.discard(next(x for x in sorted(chosen) if x not in PAIR_SERIALS))
            chosen.add(s)
    out_pods, pols = [], []
    for i, ns in enumerate(namespaces):
        for j in range(PODS_PER_NS):
            serial = i * PODS_PER_NS + j
            node = NODE if serial in chosen else f"node-{2 + serial % 90}"
            out_pods.append(pod_obj(ns.name, j, serial, node))
        pols += policies_for(i, ns)
    return namespaces, out_pods, pols


def snapshot(namespaces, pods, policies) -> ClusterSnapshot:
    return ClusterSnapshot.of([*namespaces, *pods, *policies])


def packet_pair(pods) -> tuple[Pod, Pod]:
    """(server, client): see the module docstring."""
    by_key = {p.key: p for p in pods}
    return by_key[("ns-001", "p-001")], by_key[("ns-001", "p-002")]


# New connections per second for the per-packet benches: run with `python -c` inside the
# client pod's netns as `IP PORT N CAP_SECONDS`; prints connections per second.
CONN_CLIENT = """
import socket, sys, time
ip, port, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
done, t0 = 0, time.perf_counter()
while done < n and time.perf_counter() - t0 < cap:
    c = socket.create_connection((ip, port), timeout=2)
    c.recv(64)
    c.close()
    done += 1
print(done / (time.perf_counter() - t0))
"""
