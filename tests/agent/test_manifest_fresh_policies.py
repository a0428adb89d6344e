"""Manifest source: a broken file still enforces the policies in it that parse (review finding:
a file that never parsed used to contribute only its fallbacks, so a valid deny-all next to an
unparseable policy was dropped and its pods stayed open)."""

from __future__ import annotations

from agent_helpers import wait_for
from test_sources_files import NS_AND_POD, POLICY, Collector

from policy_agent.sources.manifests import ManifestSource

DENY_ALL = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}}
"""

BAD = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-legacy, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 010.0.0.0/8}}]
"""


def _write(path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp~")
    tmp.write_text(text)
    tmp.replace(path)


def test_never_good_file_enforces_its_parsed_policies_and_fallbacks(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "a.yaml").write_text(NS_AND_POD)
    (d / "p.yaml").write_text(DENY_ALL + "---\n" + BAD)
    c = Collector()
    src = ManifestSource(str(d))
    try:
        src.start(c)
        pols = c.get("NetworkPolicy")
        assert ("x", "deny-all") in pols and not pols[("x", "deny-all")].fallback_reason
        assert pols[("x", "allow-legacy")].fallback_reason and pols[("x", "allow-legacy")].ingress == ()
        assert src.degraded_policies() == {"last_good": 0, "fallback": 1}
    finally:
        src.stop()


def test_policy_added_in_a_broken_edit_is_enforced(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "a.yaml").write_text(NS_AND_POD)
    (d / "p.yaml").write_text(POLICY)
    c = Collector()
    src = ManifestSource(str(d))
    try:
        src.start(c)
        good = c.get("NetworkPolicy")[("x", "allow-web")]
        _write(d / "p.yaml", POLICY.replace("port: 80", "port: 81") + "---\n" + DENY_ALL + "---\n" + BAD)
        wait_for(lambda: ("x", "deny-all") in c.get("NetworkPolicy"), what="the new valid policy")
        pols = c.get("NetworkPolicy")
        assert pols[("x", "allow-web")] == good  # the file's last good version of an existing policy
        assert not pols[("x", "deny-all")].fallback_reason
        assert pols[("x", "allow-legacy")].fallback_reason
    finally:
        src.stop()
