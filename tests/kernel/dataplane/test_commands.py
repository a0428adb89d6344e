"""`policy-agent dump` and `policy-agent cleanup` against a programmed namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from policy_agent.lab import specs as s
from policy_agent.dataplane.apply import Dataplane

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "policy_agent.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dump_shows_kernel_counters_origins_sets_and_endpoints_then_cleanup(lab, tmp_path):
    before = lab.snapshot()
    state = str(tmp_path / "dp.json")
    pol = s.Policy("x", "allow-to-a", "app=a", ingress=(s.PolicyRule(s.Peer("x", "app=b"), (("tcp", 80),)),))
    Dataplane(netns=lab.node, backend=lab.backend, state_path=state).apply(s.build(lab.all_pods(), [pol]))
    assert lab.can("b", "a", 80) and not lab.can("c", "a", 80, timeout=0.5)

    doc = json.loads(cli("dump", "--format", "json", "--netns", lab.node, "--backend", lab.backend, "--state-file", state))
    assert doc["backend"] == lab.backend
    v4 = next(t for t in doc["tables"] if t["family"] == 4 and t["table"] == "filter")
    assert {h["chain"] for h in v4["hooks"]} == {"INPUT", "FORWARD", "OUTPUT"}
    rules = {c["name"]: c["rules"] for c in v4["chains"]}
    pi = rules["pa-pi-x.allow-to-a"]
    assert pi[0]["origin"].startswith("x/allow-to-a ingress rule 0 ") and pi[0]["packets"] >= 1  # b's SYN hit it
    assert not any("KUBE" in c for c in rules)
    sets = {x["name"]: x for x in doc["ipsets"]}
    peer = next(x for x in sets.values() if x["family"] == 4 and x["name"].startswith("pa4s"))
    assert peer["members"] == [lab.ips["b"][0]] and peer["origin"] == "pods matching app=b in namespace x"
    a = next(e for e in doc["endpoints"] if e["pod"] == "a")
    assert a["programmed"] and a["ingress_policies"] == ["x/allow-to-a"] and a["ips"] == list(lab.ips["a"])
    assert a["kernel_ingress_chains"] == ["pa-pi-x.allow-to-a"]

    text = cli("dump", "--netns", lab.node, "--backend", lab.backend, "--state-file", state)
    assert "# x/allow-to-a ingress rule 0" in text and "pods matching app=b in namespace x" in text

    cli("cleanup", "--netns", lab.node, "--backend", lab.backend, "--state-file", state)
    assert lab.snapshot() == before
    assert not os.path.exists(state)
    assert lab.can("c", "a", 80)
