"""The kernel walk of live explain against the real kernel, both iptables backends.

Every example in examples/ compiled for node-1 and applied by the real dataplane into a
private node netns: every rule the kernel prints back parses to the rule we wrote (no
drift on any chain or set), and for every pair of pods and addresses on several ports and
both protocols the walk of the kernel's rules gives the same verdict and the same rule
trace as the walk of the desired state. Then a hand edit with iptables shows up as drift
and changes the kernel walk, not the desired one. Real traffic is in
tests/conformance/test_live_explain.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from policy_agent.compiler import compile as compile_state
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import legacy_available
from policy_agent.lab import netns
from policy_agent.live_explain import FlowQuery, answer, drift_on_path, read_kernel
from policy_agent.model import ClusterSnapshot, load_yaml

pytestmark = [pytest.mark.kernel]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BACKENDS = ["nft", pytest.param("legacy", marks=pytest.mark.skipif(not legacy_available(),
                                                                   reason="no legacy iptables here"))]


def _snapshot() -> ClusterSnapshot:
    objs = []
    for d in ("default-deny", "egress-allowlist", "ports-dualstack"):
        for f in sorted((EXAMPLES / d).glob("*.yaml")):
            objs += load_yaml(f.read_text(), str(f), ignore_unknown=True)
    return ClusterSnapshot.of(objs)


@pytest.fixture(params=BACKENDS)
def node(request):
    with netns.scratch("lx", "node") as name:
        yield name, request.param


def test_kernel_walk_equals_desired_walk_and_no_drift(node):
    ns, backend = node
    snap = _snapshot()
    state = compile_state(snap, NodeConfig(node_name="node-1"))
    dp = Dataplane(netns=ns, backend=backend, sweep_other_backend=False)
    dp.apply(state, allow_sweep=True)
    view = read_kernel(dp.kernel, (4, 6))
    assert view.backend == backend

    for fam in (4, 6):
        rep = drift_on_path(state, view, fam, list(state.table(fam)))
        assert rep["in_sync"], [r for r in rep["chains"] + rep["sets"] if r["state"] != "in sync"][:3]

    local = [f"{e.namespace}/{e.pod}" for e in state.endpoints]
    names = local + ["10.233.9.9", "8.8.8.8"]
    qs = [FlowQuery(a, b, proto, port) for a, b in itertools.permutations(names, 2) if a in local or b in local
          for proto in ("TCP", "UDP") for port in (53, 80, 443, 8080)]
    answers = answer(view, qs, node="node-1", desired=state, snapshot=snap)["answers"]
    ok = [a for a in answers if "error" not in a]
    assert len(ok) == len(qs), [a for a in answers if "error" in a][:3]
    bad = [a for a in ok if a["kernel_verdict"] != a["desired_verdict"] or a["notes"] or not a["drift"]["in_sync"]]
    assert not bad, bad[:2]
    verdicts = {a["verdict"] for a in ok}
    assert verdicts == {"ACCEPT", "DROP"}, verdicts
    assert all(a["trace"] and all(s["in_kernel"] for s in a["trace"]) for a in ok)

    # A hand edit: flush one policy chain. The kernel walk follows it; the drift names it.
    victim = next(a for a in ok if a["allowed"] and any(s["chain"].startswith("pa-pi-") and s["action"] == "MARK"
                                                         for s in a["trace"]))
    chain = next(s["chain"] for s in victim["trace"] if s["chain"].startswith("pa-pi-") and s["action"] == "MARK")
    ip6 = "6" if victim["flow"]["family"] == 6 else ""
    netns.run(ns, f"ip{ip6}tables-{backend}", "-F", chain)
    q = FlowQuery(victim["flow"]["src_name"], victim["flow"]["dst_name"], victim["flow"]["protocol"],
                  victim["flow"]["port"], victim["flow"]["family"])
    [after] = answer(read_kernel(dp.kernel, (4, 6)), [q], node="node-1", desired=state, snapshot=snap)["answers"]
    assert after["desired_verdict"] == "ACCEPT" and after["kernel_verdict"] != "ACCEPT", after
    rep = next(r for r in after["drift"]["chains"] if r["chain"] == chain)
    assert rep["state"] == "differs" and all("missing in the kernel" in d for d in rep["details"])
