"""The benchmark cluster: 100 namespaces x 100 pods = 10,000 pods, 20 policies per
namespace = 2,000 policies, 110 pods local to this node (2 in each of 55 namespaces).

Pod i of namespace j: labels app=a<i%20>, tier=t<i%4>; IPs 10.233.j.(i+1) and
fd00:233::j:(i+1). Policy k of namespace j selects app=a<k> (k<10) or tier=t<k%4>
(k>=10); ingress from app=a<k+1> in the namespace on tcp/80, tcp/5201, udp/53 and
from tier=t<k%4> in every namespace on tcp/9090; even k also have an egress rule
to app=a<k+3> on tcp/5432. Only policies selecting a local pod are programmed
(330 of 2,000), as felix does.
"""

from __future__ import annotations

from policy_agent.dataplane import sample as s

NAMESPACES = 100
PODS_PER_NS = 100
POLICIES_PER_NS = 20
LOCAL_NS = 55
LOCAL_PER_NS = 2


def pod(j: int, i: int, local: bool | None = None) -> s.Pod:
    if local is None:
        local = j < LOCAL_NS and i < LOCAL_PER_NS
    return s.Pod(f"ns{j}", f"p{i}", (f"10.233.{j}.{i + 1}", f"fd00:233::{j}:{i + 1}"),
                 frozenset({f"app=a{i % 20}", f"tier=t{i % 4}"}), local)


def policy(j: int, k: int) -> s.Policy:
    sel = f"app=a{k}" if k < 10 else f"tier=t{k % 4}"
    ingress = (
        s.PolicyRule(s.Peer(f"ns{j}", f"app=a{(k + 1) % 20}"), (("tcp", 80), ("tcp", 5201), ("udp", 53))),
        s.PolicyRule(s.Peer(None, f"tier=t{k % 4}"), (("tcp", 9090),)),
    )
    egress = (s.PolicyRule(s.Peer(f"ns{j}", f"app=a{(k + 3) % 20}"), (("tcp", 5432),)),) if k % 2 == 0 else None
    return s.Policy(f"ns{j}", f"pol{k}", sel, ingress=ingress, egress=egress)


def pods() -> list[s.Pod]:
    return [pod(j, i) for j in range(NAMESPACES) for i in range(PODS_PER_NS)]


def policies() -> list[s.Policy]:
    return [policy(j, k) for j in range(NAMESPACES) for k in range(POLICIES_PER_NS)]
