"""An unparseable ClusterNetworkPolicy through the real kube-apiserver (docs/decisions/cnp-fallback.md).

Our CRD (no CEL, so it installs on 1.20) stores a port range with start >= end; the
parser refuses it naming the field. Updated to that, a policy keeps its last good
version (same uid); created so, it is its deny-all stand-in; both are reported as
SourceErrors and counted by degraded_policies(); fixed, the real policy replaces it.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cnp_helpers import cnp, crd_installed, install_crd, kubectl_apply
from kube_helpers import Recorder, wait_for

from policy_agent.model.types import CNP_STANDIN_RULE_NAME, CNPAction
from policy_agent.sources.kube import KubeSource, WatchOptions

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(600)]

FAST = WatchOptions(not_served_recheck=0.3, backoff_initial=0.1, backoff_max=1.0)
SUBJECT = {"namespaces": {"matchLabels": {"team": "a"}}}
GOOD_RANGE = {"range": {"start": 8000, "end": 8080}}
BAD_RANGE = {"range": {"start": 9000, "end": 8000}}  # the CRD takes it, CEL (upstream) would not


def _deny(port: dict) -> list[dict]:
    return [{"name": "no b", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
             "protocols": [{"tcp": {"destinationPort": port}}]}]


def test_turned_bad_keeps_last_good_and_never_parsed_is_the_stand_in(cluster):
    if not crd_installed(cluster):
        install_crd(cluster)
    rec = Recorder()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    kept, fresh = f"pa-fb-kept-{tag}", f"pa-fb-new-{tag}"
    src = KubeSource(rec, cluster.api_client(), kinds=("ClusterNetworkPolicy",), options=FAST).start()
    try:
        assert src.wait_synced(60)
        kubectl_apply(cluster, cnp(kept, "Admin", 10, SUBJECT, ingress=_deny({"number": 80})))
        good = wait_for(lambda: rec.objects("ClusterNetworkPolicy").get(kept), 30, "good policy")
        assert not good.fallback_reason and good.ingress[0].ports[0].start == 80

        kubectl_apply(cluster, cnp(kept, "Admin", 10, SUBJECT, ingress=_deny(BAD_RANGE)))
        err = wait_for(lambda: next((e for e in rec.errors if e.key == kept), None), 30, "error reported")
        assert err.kind == "ClusterNetworkPolicy"
        assert "spec.ingress[0].protocols[0].tcp.destinationPort.range" in err.message
        assert "keeping its last good version" in err.message
        assert rec.objects("ClusterNetworkPolicy")[kept] == good
        assert src.degraded_policies() == {"last_good": 1, "fallback": 0}

        kubectl_apply(cluster, cnp(fresh, "Baseline", 3, SUBJECT, ingress=_deny(BAD_RANGE)))
        standin = wait_for(lambda: rec.objects("ClusterNetworkPolicy").get(fresh), 30, "stand-in")
        assert standin.fallback_reason.startswith("spec.ingress[0].protocols[0].tcp.destinationPort.range")
        assert standin.priority == 3 and standin.subject_namespaces.match_labels == {"team": "a"}
        (rule,) = standin.ingress
        assert rule.action is CNPAction.DENY and rule.name == CNP_STANDIN_RULE_NAME
        assert any(e.key == fresh and "enforcing a fallback: Baseline tier priority 3: Deny all ingress" in e.message
                   for e in rec.errors)
        assert src.degraded_policies() == {"last_good": 1, "fallback": 1}

        kubectl_apply(cluster, cnp(fresh, "Baseline", 3, SUBJECT, ingress=_deny(GOOD_RANGE)))
        fixed = wait_for(lambda: (p := rec.objects("ClusterNetworkPolicy").get(fresh)) and not p.fallback_reason
                         and p, 30, "fixed policy")
        assert fixed.ingress[0].ports[0].end == 8080
        assert src.degraded_policies() == {"last_good": 1, "fallback": 0}
    finally:
        src.close()
        for name in (kept, fresh):
            cluster.kubectl("delete", "--ignore-not-found", "clusternetworkpolicy", name)
