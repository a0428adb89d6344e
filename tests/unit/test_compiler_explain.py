"""Cross-check: policy_agent.explain (another team's DesiredState evaluator) and the
walker in test_compiler_evaluator give the same verdict for every flow of random
clusters compiled by the compiler, and agree with the reference semantics."""

from __future__ import annotations

import random

import pytest
from test_compiler_evaluator import NODE, allowed, node_config, pod_to_pod
from test_compiler_incremental import PROBES, Reference, gen_cluster

from policy_agent.compiler import compile
from policy_agent.compiler.scopes import eligible
from policy_agent.explain import explain_state_flow
from policy_agent.model.types import ClusterSnapshot, PolicyType


@pytest.mark.parametrize("seed", range(12))
def test_explain_and_walker_agree(seed):
    rng = random.Random(1000 + seed)
    objs = gen_cluster(rng, npods=8, npols=rng.randint(1, 5))
    snap = ClusterSnapshot.of(objs)
    state = compile(snap, node_config())
    ref = Reference(objs)
    pods = [o for o in objs if type(o).__name__ == "Pod" and eligible(o)]
    compared = 0
    for src in pods:
        for dst in pods:
            if src is dst or not (src.node_name == NODE or dst.node_name == NODE):
                continue
            for fam in (4, 6):
                if not (src.ips_of(fam) and dst.ips_of(fam)):
                    continue
                for proto, dport in PROBES:
                    mine = allowed(pod_to_pod(state, src, dst, family=fam, proto=proto, dport=dport))
                    theirs = explain_state_flow(state, snap, src, dst, proto, dport, node=NODE, family=fam)
                    assert theirs.allowed == mine, (src.ref, dst.ref, fam, proto, dport, theirs.render())
                    want = True
                    if src.node_name == NODE:
                        want &= ref.direction_ok(src, PolicyType.EGRESS, dst, dst.ips_of(fam)[0], proto, dport, dst)
                    if dst.node_name == NODE:
                        want &= ref.direction_ok(dst, PolicyType.INGRESS, src, src.ips_of(fam)[0], proto, dport, dst)
                    assert mine == want
                    compared += 1
    assert compared > 0
