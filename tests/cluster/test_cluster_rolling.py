"""Rolling updates of the agent DaemonSet and of the vpcip-ipamd DaemonSet under continuous
probing: 0 wrongly allowed and 0 wrongly denied probes, and pods started during the update
protected from their first packet.

Servers on both nodes are selected by a policy that admits only `role=allowed` pods. Every
client (allowed and denied, on both nodes) probes both servers on TCP and UDP in a loop
inside one long `kubectl exec` (workload probe-many --repeat, a round every 0.3 s). The
denied clients also sweep every free address of both nodes' pools, from before the
update starts, so a pod created during the update is probed from the moment its address
exists: any answer from it to a denied client is a wrongly allowed probe.
"""

from __future__ import annotations

import sys
import time

import cluster_helpers as H
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NS = "cl-roll"
ROLLOUT_TIMEOUT = 300
PAIR_TIMEOUT = 2.0  # generous: a loaded machine must not turn a slow answer into "denied"
SWEEP_TIMEOUT = 0.5
INTERVAL = 0.3
REACH_AFTER_READY = 30  # seconds a late pod may take, once Ready, to answer an allowed client


def _policy() -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": NS, "name": "servers-from-allowed"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}]}]}}


def _pair_targets(servers: list[H.Pod]) -> list[H.Target]:
    return [H.Target(s.ip, 80, proto) for s in servers for proto in ("TCP", "UDP")]


@pytest.fixture(scope="module")
def env(cluster):
    H.fresh_namespace(cluster, NS)
    cluster.apply([_policy()])  # before any pod: the servers are isolated from their start
    deps = []
    for node in cluster.nodes:
        deps.append(H.deployment(NS, f"server-{node.name}", {"app": "server", "server": node.name}, node=node.name))
        for role in ("allowed", "denied"):
            deps.append(H.deployment(NS, f"{role}-{node.name}", {"role": role, "client": f"{role}-{node.name}"},
                                     node=node.name))
    cluster.apply(deps)
    pods = H.wait_deployments(cluster, deps)
    servers = [p for (_ns, n), p in sorted(pods.items()) if n.startswith("server-")]
    clients = {n: p for (_ns, n), p in sorted(pods.items()) if not n.startswith("server-")}
    targets = _pair_targets(servers)
    want = {n: n.startswith("allowed-") for n in clients}
    H.wait_for("allowed clients reach the servers and denied ones do not",
               lambda: all(all(ok == want[n] for ok, _ in row) for n, row in
                           H.probe_rows(cluster, {n: (p, targets) for n, p in clients.items()}).items()),
               60, interval=1)
    yield cluster, servers, clients
    cluster.kubectl("delete", "namespace", "--wait=false", NS, check=False)


def _sweep_ips(cluster: H.Cluster, per_node: int = 16) -> list[str]:
    """The lowest pool addresses of each node that no live pod holds: vpcip-ipamd hands out
    the first free address, so a new pod gets one of these (coverage is asserted)."""
    live = {p["status"].get("podIP") for p in cluster.get("pods", "-A")["items"]
            if not p["metadata"].get("deletionTimestamp")}
    return [ip for node in cluster.nodes for ip in [a for a in node.pool() if a not in live][:per_node]]


def _rollout(env, ds: str) -> dict:
    cluster, servers, clients = env
    pairs = _pair_targets(servers)
    free = _sweep_ips(cluster)
    sweep = [H.Target(ip, 80, "TCP") for ip in free]
    loops = {n: H.ProbeLoop(cluster, p, pairs, INTERVAL, PAIR_TIMEOUT) for n, p in clients.items()}
    sweeps = {n: H.ProbeLoop(cluster, p, sweep, INTERVAL, SWEEP_TIMEOUT) for n, p in clients.items()
              if n.startswith("denied-")}
    late_names = [f"late-{ds}-{node.name}" for node in cluster.nodes]
    t0 = time.monotonic()
    try:
        for loop in [*loops.values(), *sweeps.values()]:
            loop.wait_rounds(2)
        cluster.kubectl("rollout", "restart", "-n", H.AGENT_NS, f"ds/{ds}")
        # Pods started while the update runs, one per node, selected by the policy.
        cluster.apply([H.bare_pod(NS, name, {"app": "server", "late": ds}, node=node.name)
                       for name, node in zip(late_names, cluster.nodes)])
        cluster.kubectl("rollout", "status", "-n", H.AGENT_NS, f"ds/{ds}", f"--timeout={ROLLOUT_TIMEOUT}s",
                        timeout=ROLLOUT_TIMEOUT + 30)
        rollout_s = time.monotonic() - t0
        late = H.wait_for("the late pods ready", lambda: (lambda ps: ps if len(ps) == len(late_names) else None)(
            cluster.ready_pods(NS, f"late={ds}")), 180)
        ready_at = time.monotonic()
        # The allowed clients reach each late pod once it is Ready (its rules may trail Ready
        # by an apply: measured, bounded).
        allowed = {n: p for n, p in clients.items() if n.startswith("allowed-")}
        reach_s = {}
        for pod in late:
            H.wait_for(f"allowed clients reach {pod.ref}", lambda pod=pod: all(
                all(ok for ok, _ in row) for row in H.probe_rows(
                    cluster, {n: (p, [H.Target(pod.ip, 80, "TCP"), H.Target(pod.ip, 80, "UDP")])
                              for n, p in allowed.items()}, timeout=PAIR_TIMEOUT).values()),
                REACH_AFTER_READY, interval=0.5)
            reach_s[pod.name] = round(time.monotonic() - ready_at, 1)
        n0 = {n: len(lp.rounds) for n, lp in {**loops, **sweeps}.items()}
        for n, lp in {**loops, **sweeps}.items():
            lp.wait_rounds(n0[n] + 2)
    finally:
        for lp in [*loops.values(), *sweeps.values()]:
            lp.stop()
    wrongly_allowed, wrongly_denied = [], []
    probes = 0
    for n, lp in loops.items():
        want = n.startswith("allowed-")
        for t, row in lp.rounds:
            for target, (ok, err) in zip(pairs, row):
                probes += 1
                if ok != want:
                    (wrongly_allowed if ok else wrongly_denied).append(
                        f"{n} -> {target.host}:{target.port}/{target.proto} at +{t - lp.rounds[0][0]:.1f}s {err}")
    late_ips = {p.ip: p.name for p in late}
    uncovered = [p.ref for p in late if p.ip not in free]
    sweep_probes = 0
    late_probes = 0
    for n, lp in sweeps.items():
        for t, row in lp.rounds:
            for target, (ok, _err) in zip(sweep, row):
                sweep_probes += 1
                late_probes += target.host in late_ips
                # Only a late pod counts: a pod of a namespace being deleted may still answer.
                if ok and target.host in late_ips:
                    wrongly_allowed.append(f"{n} -> {target.host}:80/TCP ({late_ips[target.host]}) "
                                           f"answered at +{t - lp.rounds[0][0]:.1f}s")
    stats = {"ds": ds, "rollout_seconds": round(rollout_s, 1), "pair_probes": probes,
             "sweep_probes": sweep_probes, "probes_to_late_pod_addresses": late_probes,
             "rounds_per_loop": {n: len(lp.rounds) for n, lp in loops.items()},
             "late_pods": {p.name: p.ip for p in late}, "late_reachable_after_ready_s": reach_s,
             "wrongly_allowed": len(wrongly_allowed), "wrongly_denied": len(wrongly_denied)}
    print(f"rolling update {stats}", file=sys.stderr)
    assert not uncovered, f"late pods got addresses the sweep did not cover: {uncovered} (free {free})"
    assert not wrongly_allowed and not wrongly_denied, (
        f"{len(wrongly_allowed)} wrongly allowed, {len(wrongly_denied)} wrongly denied of {probes} pair probes "
        f"and {sweep_probes} sweep probes during the {ds} rollout:\n"
        + "\n".join((wrongly_allowed + wrongly_denied)[:40]))
    assert probes > 0 and late_probes > 0
    return stats


def test_agent_rolling_update_under_probing(env):
    _rollout(env, "policy-agent")


def test_ipamd_rolling_update_under_probing(env):
    _rollout(env, "vpcip-ipamd")
