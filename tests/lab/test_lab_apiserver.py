"""`lab up --apiserver`: the agent watches a real kube-apiserver; policies go in with kubectl."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import yaml

from policy_agent.lab import lab as L
from policy_agent.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.apiserver, pytest.mark.slow]


def test_lab_with_apiserver_and_kubectl(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (Debian etcd-server; scripts/setup.sh installs it)")
    name = f"t{os.getpid()}-api"
    L.down(name)
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"ns": "x"}}},
        *[{"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "x", "name": p, "labels": {"pod": p}},
           "spec": {"containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 80}]}]}}
          for p in ("a", "b")],
    ]
    lab = L.Lab(name)
    try:
        lab.up(docs, apiserver=True, timeout=240)
        pids = {k: v for k, v in lab.pids.items() if k in ("etcd", "kube-apiserver", "agent")}
        assert set(pids) == {"etcd", "kube-apiserver", "agent"}
        got = {(r["from"], r["to"]): r["connected"] for r in lab.probe(80, "TCP", attempts=3)}
        assert got[("x/a", "x/b")] and got[("x/b", "x/a")]

        # The operator's workflow: kubectl apply a policy; the agent (watching the apiserver) enforces it.
        pol = tmp_path / "p.yaml"
        pol.write_text(yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                       "metadata": {"namespace": "x", "name": "only-from-trusted"},
                                       "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                                                "ingress": [{"from": [{"podSelector": {"matchLabels": {"trusted": "yes"}}}]}]}}))
        since = time.time()
        assert lab.kubectl(["apply", "-f", str(pol)]) == 0
        lab.wait_enforced(since)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and lab.probe(80, "TCP", "x/a", "x/b", attempts=1)[0]["connected"]:
            time.sleep(0.5)
        assert lab.probe(80, "TCP", "x/a", "x/b", attempts=1)[0]["connected"] is False
        assert lab.probe(80, "TCP", "x/b", "x/a", attempts=3)[0]["connected"] is True

        # A label change through the lab (kubectl apply of the pod) lets x/a in.
        relabelled = dict(docs[1], metadata={"namespace": "x", "name": "a", "labels": {"pod": "a", "trusted": "yes"}})
        lab.apply([relabelled])
        assert lab.probe(80, "TCP", "x/a", "x/b", attempts=3)[0]["connected"] is True

        # A pod added to the running lab is created in the API too (it used to be wired but
        # never created there, so the agent kept it isolated), and the policy lets it in.
        late = dict(docs[1], metadata={"namespace": "x", "name": "c", "labels": {"pod": "c", "trusted": "yes"}})
        assert lab.apply([late]) == ["Pod/x/c"]
        assert lab.kubectl(["get", "pod", "-n", "x", "c", "-o", "name"]) == 0
        assert lab.probe(80, "TCP", "x/c", "x/b", attempts=3)[0]["connected"] is True
        assert lab.probe(80, "TCP", "x/b", "x/c", attempts=3)[0]["connected"] is True
        pids["agent"] = lab.pids["agent"]
    finally:
        L.down(name)
    assert netns.list_names(L.netns_prefix(name)) == []
    assert not os.path.exists(L.state_dir(name))
    assert not any(netns._alive(p) for p in pids.values())
