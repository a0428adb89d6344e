"""A NetworkPolicy the API server accepts but our parser rejects never opens a pod.

The object used: an ipBlock ``except`` written as an IPv4-mapped IPv6 CIDR
(``::ffff:10.1.0.0/112`` inside ``10.0.0.0/8``). kube-apiserver validates it with
Go's net.ParseCIDR, which returns it as 10.1.0.0/16, so it passes the "strict
subset of cidr" check; our parser refuses an except of another family. (The
leading-zero ``010.0.0.0/8`` that older servers stored is refused by this
kube-apiserver 1.20.2: it is built with Go >= 1.17, whose ParseCIDR rejects
leading zeros; the unit tests cover that case at the model level.)

1. Informer only: a new such policy is delivered as its no-allow fallback; an
   update of a good policy to such a spec keeps the last good version; both
   reported, both survive the watch, delete forgets.
2. The whole agent against the real kernel in netns, pods in the API server:
   an isolated pod stays isolated (the denied probe stays denied) when its policy
   becomes unparseable, and a new unparseable policy isolates its pods.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from kube_helpers import Recorder, apply, namespace_yaml, pod_yaml, set_pod_ips, wait_for

from policy_agent.model.types import PolicyType
from policy_agent.sources.kube import KubeSource

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(2400)]

MAPPED_EXCEPT = {"cidr": "10.0.0.0/8", "except": ["::ffff:10.1.0.0/112"]}
BAD_FIELD = "spec.ingress[0].from[1].ipBlock.except[0]"


def _ns(tag: str) -> str:
    return f"pa-fb-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _policy(ns: str, name: str, app: str, *, bad: bool, from_app: str = "a", port: int = 8080) -> str:
    peers: list[dict] = [{"podSelector": {"matchLabels": {"app": from_app}}}]
    if bad:
        peers.append({"ipBlock": MAPPED_EXCEPT})
    return json.dumps({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{"from": peers, "ports": [{"port": port}]}]},
    })


def _modes(src: KubeSource, ns: str) -> dict:
    """name -> last_good|fallback of this test's namespace (the cluster is shared by the session)."""
    return {k[1]: m for k, m in dict(src.informers["NetworkPolicy"].degraded).items() if k[0] == ns}


def test_api_server_stores_what_our_parser_rejects(cluster):
    """The premise: the server accepts the object (else the tests below prove nothing)."""
    ns = _ns("premise")
    apply(cluster, namespace_yaml(ns), _policy(ns, "p", "b", bad=True))
    got = json.loads(cluster.kubectl("get", "networkpolicy", "-n", ns, "p", "-o", "json"))
    assert got["spec"]["ingress"][0]["from"][1]["ipBlock"] == MAPPED_EXCEPT


def test_new_bad_policy_is_fallback_and_bad_update_keeps_last_good(cluster):
    rec = Recorder()
    ns = _ns("inf")
    apply(cluster, namespace_yaml(ns), _policy(ns, "listed-bad", "b", bad=True))
    src = KubeSource(rec, cluster.api_client(), kinds=("NetworkPolicy",)).start()
    try:
        assert src.wait_synced(60)
        # Listed while bad and never good: the fallback.
        fb = rec.objects("NetworkPolicy")[(ns, "listed-bad")]
        assert fb.fallback_reason.startswith(f"{BAD_FIELD}:")
        assert fb.pod_selector.match_labels == {"app": "b"}
        assert fb.policy_types == (PolicyType.INGRESS,) and fb.ingress == () and fb.egress == ()
        err = next(e for e in rec.errors if e.key == (ns, "listed-bad"))
        assert err.kind == "NetworkPolicy" and BAD_FIELD in err.message and "fallback" in err.message

        # A good policy, then updated to the bad spec: the last good version stays.
        apply(cluster, _policy(ns, "turns-bad", "c", bad=False, port=80))
        good = wait_for(lambda: rec.objects("NetworkPolicy").get((ns, "turns-bad")), 60, "good policy")
        assert good.ingress[0].ports[0].port == 80 and not good.fallback_reason
        apply(cluster, _policy(ns, "turns-bad", "c", bad=True, port=81))
        err = wait_for(lambda: next((e for e in list(rec.errors) if e.key == (ns, "turns-bad")), None), 60,
                       "SourceError for the bad update")
        assert BAD_FIELD in err.message and "last good version" in err.message
        assert rec.objects("NetworkPolicy")[(ns, "turns-bad")] == good
        assert _modes(src, ns) == {"turns-bad": "last_good", "listed-bad": "fallback"}
        assert src.degraded_policies()["last_good"] >= 1

        # A new bad policy arriving by watch: fallback too.
        apply(cluster, _policy(ns, "watched-bad", "d", bad=True))
        fb2 = wait_for(lambda: rec.objects("NetworkPolicy").get((ns, "watched-bad")), 60, "watched fallback")
        assert fb2.fallback_reason and fb2.pod_selector.match_labels == {"app": "d"} and fb2.ingress == ()

        # Delete forgets; a fix replaces the last good version.
        cluster.kubectl("delete", "networkpolicy", "-n", ns, "listed-bad")
        wait_for(lambda: (ns, "listed-bad") not in rec.objects("NetworkPolicy"), 60, "delete")
        apply(cluster, _policy(ns, "turns-bad", "c", bad=False, port=82))
        wait_for(lambda: rec.objects("NetworkPolicy")[(ns, "turns-bad")].ingress[0].ports[0].port == 82, 60, "fix")
        wait_for(lambda: _modes(src, ns) == {"watched-bad": "fallback"}, 60, "degraded state after delete and fix")
    finally:
        src.close()


# --- the whole agent, real kernel, real traffic ------------------------------------------

IPS = {"a": "10.233.94.2", "b": "10.233.94.3", "c": "10.233.94.4"}
PORT = 8080


class _KubeAdapter:
    """The agent's source shape around a KubeSource on the test cluster (as commands/run.py)."""

    name = "kube"

    def __init__(self, api) -> None:
        self.api = api
        self.src: KubeSource | None = None

    def start(self, sink) -> None:
        self.src = KubeSource(sink, self.api, source=self.name).start()

    def stop(self) -> None:
        if self.src is not None:
            self.src.stop()

    def degraded_policies(self) -> dict[str, int]:
        return self.src.degraded_policies() if self.src is not None else {}


@pytest.mark.kernel
def test_kernel_isolated_pod_stays_isolated_when_its_policy_turns_bad(cluster, tmp_path):
    from policy_agent.agent import Agent
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.dataplane.apply import Dataplane
    from policy_agent.lab import netns
    from policy_agent.shared.naming import veth_name
    from policy_agent.sources.cni import CniSource

    ns = _ns("kern")
    api = cluster.api_client()
    apply(cluster, namespace_yaml(ns), *[pod_yaml(ns, p, {"app": p}, node="n1") for p in IPS])
    for p, ip in IPS.items():
        set_pod_ips(api, ns, p, ip)
    node = netns.unique_name("h3", "kbnode")
    pod_ns = {p: netns.unique_name("h3", f"kb{p}") for p in IPS}
    servers: list = []
    agent = None
    try:
        netns.create(node)
        netns.enable_forwarding(node)
        for p, pns in pod_ns.items():
            netns.create(pns)
            netns.add_veth(node, pns, veth_name("eni", ns, p), [IPS[p]])
        servers = [netns.start_server(pod_ns[p], tcp_ports=[PORT]) for p in ("b", "c")]

        def reach(src: str, dst: str) -> bool:
            return netns.probe(pod_ns[src], IPS[dst], PORT, "TCP", timeout=1.0)

        def eventually(src: str, dst: str, want: bool) -> None:
            wait_for(lambda: reach(src, dst) == want, 60, f"{src}->{dst} {'allowed' if want else 'denied'}")

        def gauge(mode: str) -> float:
            return agent.metrics.registry.get_sample_value("policy_agent_policies_degraded", {"mode": mode})

        agent = Agent(NodeConfig("n1"), Dataplane(netns=node), [_KubeAdapter(api), CniSource(str(tmp_path / "ep"))],
                      min_interval=0.02, refresh_interval=5)
        agent.start()
        assert agent.wait_ready(90), agent.status()
        eventually("c", "b", True)
        assert reach("a", "b") and reach("a", "c")

        apply(cluster, _policy(ns, "isolate-b", "b", bad=False))
        eventually("c", "b", False)
        assert reach("a", "b")

        # The API server accepts an update our parser cannot read: b stays isolated.
        # (Gauges relative: the session's other tests leave bad policies in the cluster.)
        last_good0, fallback0 = gauge("last_good"), gauge("fallback")
        apply(cluster, _policy(ns, "isolate-b", "b", bad=True))
        wait_for(lambda: any(f"{ns}/isolate-b" in e["message"] for e in agent.status()["errors"]["recent"]),
                 60, "error in the status error history")
        wait_for(lambda: gauge("last_good") == last_good0 + 1, 60, "last_good gauge")
        assert not reach("c", "b"), "denied probe became allowed after the policy turned unparseable"
        assert reach("a", "b")

        # A brand-new unparseable policy selecting c: c isolated, nothing allowed.
        apply(cluster, _policy(ns, "isolate-c", "c", bad=True))
        eventually("a", "c", False)
        assert not reach("b", "c")
        wait_for(lambda: gauge("fallback") == fallback0 + 1, 60, "fallback gauge")
        assert not reach("c", "b") and reach("a", "b")
    finally:
        if agent is not None:
            agent.stop()
        for s in servers:
            netns.stop_server(s)
        for pns in [*pod_ns.values(), node]:
            netns.delete(pns)
