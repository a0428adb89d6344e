"""Manifest source: an unparseable NetworkPolicy keeps the file's last good content, and one
with no good version is enforced as its no-allow fallback (real files, real inotify)."""

from __future__ import annotations

import pytest
from agent_helpers import wait_for
from helpers.agent_process import write_atomic
from test_sources_files import NS_AND_POD, POLICY, Collector

from policy_agent.model.types import PolicyType
from policy_agent.sources.manifests import ManifestSource

DENY_WEB = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: []
  ingress:
  - from: [{ipBlock: {cidr: 010.0.0.0/8}}]
"""


@pytest.fixture
def src_and_sink(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "a.yaml").write_text(NS_AND_POD)
    c = Collector()
    src = ManifestSource(str(d))
    yield d, src, c
    src.stop()


def test_new_bad_policy_file_enforces_fallback(src_and_sink):
    d, src, c = src_and_sink
    (d / "deny.yaml").write_text(DENY_WEB)
    src.start(c)
    fb = c.get("NetworkPolicy")[("x", "deny-web")]
    assert fb.fallback_reason.startswith("spec.ingress[0].from[0].ipBlock.cidr:")
    assert fb.pod_selector.match_labels == {"app": "web"}
    assert fb.policy_types == (PolicyType.INGRESS, PolicyType.EGRESS)  # egress key present
    assert fb.ingress == () and fb.egress == ()
    (err,) = c.errors
    assert err.kind == "NetworkPolicy" and err.key == "x/deny-web"
    assert "deny.yaml" in err.message and "spec.ingress[0].from[0].ipBlock.cidr" in err.message
    assert "enforcing a fallback" in err.message
    assert src.degraded_policies() == {"last_good": 0, "fallback": 1}
    # Fixed: the parsed policy replaces the fallback.
    write_atomic(d / "deny.yaml", DENY_WEB.replace("010.0.0.0/8", "10.0.0.0/8"))
    wait_for(lambda: not c.get("NetworkPolicy")[("x", "deny-web")].fallback_reason, what="fixed policy")
    assert c.get("NetworkPolicy")[("x", "deny-web")].ingress
    assert src.degraded_policies() == {"last_good": 0, "fallback": 0}


def test_good_file_gets_new_bad_policy_keeps_content_plus_fallback(src_and_sink):
    d, src, c = src_and_sink
    (d / "p.yaml").write_text(POLICY)
    src.start(c)
    good = c.get("NetworkPolicy")[("x", "allow-web")]
    # The same file gains a policy that cannot be parsed, and its good policy changes.
    write_atomic(d / "p.yaml", POLICY.replace("port: 80", "port: 81") + "---\n" + DENY_WEB)
    wait_for(lambda: ("x", "deny-web") in c.get("NetworkPolicy"), what="fallback for the new policy")
    pols = c.get("NetworkPolicy")
    assert pols[("x", "allow-web")] == good  # the whole file's last good content, port 80
    assert pols[("x", "deny-web")].fallback_reason and pols[("x", "deny-web")].ingress == ()
    assert src.degraded_policies() == {"last_good": 0, "fallback": 1}


def test_good_policy_turned_bad_keeps_last_good_not_fallback(src_and_sink):
    d, src, c = src_and_sink
    (d / "deny.yaml").write_text(DENY_WEB.replace("010.0.0.0/8", "10.0.0.0/8"))
    src.start(c)
    good = c.get("NetworkPolicy")[("x", "deny-web")]
    assert not good.fallback_reason
    write_atomic(d / "deny.yaml", DENY_WEB)
    err = wait_for(lambda: c.errors and c.errors[-1], what="error reported")
    assert "last good version of x/deny-web" in err.message
    wait_for(lambda: src.degraded_policies() == {"last_good": 1, "fallback": 0}, what="degraded count")
    assert c.get("NetworkPolicy")[("x", "deny-web")] == good


def test_fallback_yields_to_a_parsed_version_in_another_file(src_and_sink):
    d, src, c = src_and_sink
    (d / "0-bad.yaml").write_text(DENY_WEB)
    (d / "1-good.yaml").write_text(DENY_WEB.replace("010.0.0.0/8", "10.0.0.0/8"))
    src.start(c)
    pol = c.get("NetworkPolicy")[("x", "deny-web")]
    assert not pol.fallback_reason and pol.ingress
    assert src.degraded_policies()["fallback"] == 0


def test_never_good_namespace_file_gets_stand_in(src_and_sink):
    d, src, c = src_and_sink
    (d / "y.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: blocked, tier: 7}}\n")
    src.start(c)
    ns = c.get("Namespace")["y"]
    assert ns.labels["team"] == "blocked" and ns.labels["tier"] == "<unreadable>"
    assert any("metadata.labels[tier]" in e.message for e in c.errors)
