"""The repository's NetworkPolicy conformance cases against the real cluster.

The upstream e2e model (tests/conformance/cluster.yaml: namespaces x, y, z; pods a, b, c
serving TCP and UDP on 80 and 81 with upstream's port names) made of one-replica
Deployments of the workload image, placed by the scheduler over both nodes; pods wired by
`vpcip-cni` executed by containerd, policy enforced by the agent's DaemonSet. Each case's
steps are applied with kubectl; after each step every ordered pair of pods is probed on
every port and protocol with `kubectl exec` from the source pod (one exec per source row),
and, as upstream does, the whole matrix is probed again until it matches or the step's
time is up. Loopback pairs are ignored, as upstream ignores them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import cluster_helpers as H
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conformance"))
import casedata  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CASES = casedata.load_cases()
STEP_TIMEOUT = 45.0  # seconds a step's matrix may take to converge (policy propagation)
PROBE_TIMEOUT = 1.0
RESULTS: dict[str, dict] = {}
# Kinds a case step may delete by name, and the API version that serves them here.
API_VERSIONS = {"NetworkPolicy": "networking.k8s.io/v1", "ClusterNetworkPolicy": "policy.networking.k8s.io/v1alpha2"}


def skip_reason(case: casedata.Case) -> str:
    """Why a case cannot run on this cluster ('' if it runs)."""
    kinds = {o["kind"] for s in case.steps for o in s.get("apply", [])}
    kinds |= {lab["kind"] for s in case.steps for lab in s.get("label", [])}
    if case.family == 6:
        return "IPv6 case: the cluster tier is IPv4-only (pods get VPC IPv4 addresses only)"
    if "Node" in kinds:
        return ("ClusterNetworkPolicy node peers: the case registers extra Node objects whose addresses the lab "
                "wires as peer namespaces; the cluster's nodes are real kubelets, with no such peers")
    if '"endPort"' in json.dumps(case.steps):
        return ("endPort: the cluster runs Kubernetes 1.20.2, whose NetworkPolicyPort has no endPort field "
                "(added in 1.21 behind a feature gate): the API server would drop it")
    return ""


def model_objects(base: casedata.State) -> tuple[list[dict], list[dict]]:
    """(Namespaces, Deployments) standing for cluster.yaml: one Deployment per Pod, named as
    the pod, with the pod's labels and every container port of the pod on one container."""
    namespaces = [H.namespace(name, (d.get("metadata") or {}).get("labels"))
                  for (kind, _ns, name), d in sorted(base.objects.items()) if kind == "Namespace"]
    deployments = []
    for (kind, ns, name), d in sorted(base.objects.items()):
        if kind != "Pod":
            continue
        ports = [(p["containerPort"], p.get("protocol", "TCP")) for c in d["spec"]["containers"]
                 for p in c.get("ports", [])]
        deployments.append(H.deployment(ns, name, d["metadata"].get("labels") or {}, ports=ports,
                                        spread="conformance"))
    return namespaces, deployments


def matrix_rows(pods: dict[str, H.Pod], refs: list[str]) -> tuple[dict, dict]:
    """One row per source: ({src: (Pod, [Target])}, {src: [(port, proto, dst)] in row order})."""
    rows, index = {}, {}
    for a in refs:
        keys = [(port, proto, b) for port in casedata.PORTS for proto in casedata.PROTOCOLS for b in refs if b != a]
        rows[a] = (pods[a], [H.Target(pods[b].ip, port, proto) for (port, proto, b) in keys])
        index[a] = keys
    return rows, index


def to_matrix(results: dict, index: dict) -> dict:
    """Row results -> {(port, proto): {(from, to): connected}} (casedata.expand's shape)."""
    out: dict = {}
    for a, keys in index.items():
        for (port, proto, b), (ok, _err) in zip(keys, results[a]):
            out.setdefault((port, proto), {})[(a, b)] = ok
    return out


def mismatches(expected: dict, got: dict) -> list[tuple[int, str, str, str, bool]]:
    return [(port, proto, a, b, want) for (port, proto), m in expected.items()
            for (a, b), want in m.items() if got[(port, proto)][(a, b)] != want]


class Model:
    def __init__(self, cluster: H.Cluster, base: casedata.State, pods: dict[str, H.Pod]) -> None:
        self.cluster, self.base, self.pods = cluster, base, pods
        self.refs = casedata.pod_names(base)
        self.applied: list[dict] = []  # policies of the running case
        self.labelled: dict[tuple[str, str, str], set[str]] = {}  # label keys a case touched

    def ips(self) -> dict[str, str]:
        return {ref: p.ip for ref, p in self.pods.items()}

    def _label(self, kind: str, ns: str, name: str, labels: dict, check: bool = True) -> None:
        args = [f"{k}={v}" if v is not None else f"{k}-" for k, v in sorted(labels.items())]
        if kind == "Pod":
            target = ["pod", self.pods[f"{ns}/{name}"].name, "-n", ns]
        else:
            target = ["namespace", name]
        self.cluster.kubectl("label", "--overwrite", *target, *args, check=check)

    def run_step(self, state: casedata.State, step: dict) -> None:
        applied = [copy.deepcopy(o) for o in step.get("apply", [])]
        if applied:
            objs = casedata.substitute(applied, self.ips())
            self.cluster.apply(objs)
            self.applied += objs
        for lab in step.get("label", []):
            key = (lab["kind"], lab.get("namespace", ""), lab["name"])
            self.labelled.setdefault(key, set()).update(lab["labels"])
            self._label(*key, lab["labels"])
        deleted = step.get("delete", [])
        if deleted:
            self.cluster.delete([{"apiVersion": API_VERSIONS.get(d["kind"], "v1"),
                                  "kind": d["kind"], "metadata": {"name": d["name"], "namespace": d.get("namespace")}}
                                 for d in deleted])

    def reset(self) -> None:
        """Back to the base model: the case's policies deleted, its labels restored."""
        if self.applied:
            self.cluster.delete(self.applied)
            self.applied = []
        for (kind, ns, name), keys in self.labelled.items():
            base = (self.base.objects[(kind, "" if kind == "Namespace" else ns, name)].get("metadata") or {})
            base_labels = base.get("labels") or {}
            # Unchecked: a case that failed before its label step left nothing to remove.
            self._label(kind, ns, name, {k: base_labels.get(k) for k in keys}, check=False)
        self.labelled = {}

    def probe(self) -> dict:
        rows, index = matrix_rows(self.pods, self.refs)
        return to_matrix(H.probe_rows(self.cluster, rows, PROBE_TIMEOUT), index)


@pytest.fixture(scope="module")
def model(cluster):
    base = casedata.load_cluster()
    namespaces, deployments = model_objects(base)
    names = [n["metadata"]["name"] for n in namespaces]
    t = time.monotonic()
    cluster.kubectl("delete", "namespace", "--ignore-not-found", *names, timeout=300)  # a kept cluster's leftovers
    cluster.apply(namespaces)
    # The namespaces' default ServiceAccounts must exist before their pods can be created.
    H.wait_for("default ServiceAccounts in x, y, z",
               lambda: all(cluster.kubectl("get", "sa", "default", "-n", n, check=False).returncode == 0
                           for n in names), 60)
    cluster.apply(deployments)
    ready = H.wait_deployments(cluster, deployments, timeout=240)
    pods = {f"{ns}/{name}": pod for (ns, name), pod in ready.items()}
    print(f"conformance model ready in {time.monotonic() - t:.1f}s: "
          + ", ".join(f"{r}={p.ip}@{p.node}" for r, p in sorted(pods.items())), file=sys.stderr)
    yield Model(cluster, base, pods)
    total = len(RESULTS)
    passed = {proto: sum(1 for r in RESULTS.values() if r[proto] and not r.get("failed")) for proto in ("TCP", "UDP")}
    print(f"\ncluster conformance: {total} cases run; TCP {passed['TCP']}/{total}, UDP {passed['UDP']}/{total}; "
          f"{sum(r['cells'] for r in RESULTS.values())} cells, {sum(r['rounds'] for r in RESULTS.values())} "
          f"probe rounds", file=sys.stderr)
    cluster.kubectl("delete", "namespace", "--wait=false", *names, check=False)


def test_model_is_spread_over_the_nodes_with_pool_addresses(model):
    nodes = {p.node for p in model.pods.values()}
    assert nodes == {n.name for n in model.cluster.nodes}, f"pods placed on {nodes} only"
    wrong = [f"{r} {p.ip} on {p.node}" for r, p in model.pods.items() if not H.in_pool(model.cluster, p)]
    assert not wrong, f"pod addresses outside their node's pool: {wrong}"


def _sctp_rules_present(cluster: H.Cluster, ports: list[int]) -> list[int]:
    """Ports with no sctp rule in any node's dump (the agent's `dump`, run in its pod)."""
    dumps = []
    for node in cluster.nodes:
        pod = cluster.agent_pod(node.name)
        dumps.append(cluster.exec((H.AGENT_NS, pod["metadata"]["name"]), "policy-agent", "dump").stdout)
    lines = [ln for d in dumps for ln in d.splitlines() if "sctp" in ln]
    return [p for p in ports if not any(str(p) in ln for ln in lines)]


# Cases this cluster cannot express are not collected at all (a skip of a cluster test is a
# failure in CI); the test below pins exactly which ones and why, so the list cannot grow
# silently.
RUN_CASES = [c for c in CASES if not skip_reason(c)]
NOT_ON_THIS_CLUSTER = {
    "42": "endPort", "43": "endPort", "44": "endPort",
    "69": "node peers", "70": "IPv6", "71": "IPv6",
}


def test_only_the_known_cases_cannot_run_on_this_cluster():
    left_out = {c.id.split("-", 1)[0]: skip_reason(c) for c in CASES if skip_reason(c)}
    assert sorted(left_out) == sorted(NOT_ON_THIS_CLUSTER), left_out
    for num, why in left_out.items():
        assert NOT_ON_THIS_CLUSTER[num] in why, (num, why)
    assert len(RUN_CASES) == len(CASES) - len(NOT_ON_THIS_CLUSTER)


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.id for c in RUN_CASES])
def test_case(model, case):
    model.reset()
    state = model.base
    outcome = {"TCP": True, "UDP": True, "cells": 0, "rounds": 0, "seconds": 0.0}
    t_case = time.monotonic()
    try:
        for i, step in enumerate(case.steps):
            model.run_step(state, step)
            state = casedata.advance(state, step)
            expected = casedata.expand(step["expect"], model.refs)
            deadline = time.monotonic() + STEP_TIMEOUT
            while True:
                got = model.probe()
                outcome["rounds"] += 1
                wrong = mismatches(expected, got)
                if not wrong or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            outcome["cells"] += sum(len(m) for m in expected.values())
            if wrong:
                for (_port, proto, *_rest) in wrong:
                    outcome[proto] = False
                lines = [f"step {i} ({step.get('description', '')}): {a} -> {b} {proto}/{port}: expected "
                         f"{'connected' if want else 'blocked'}, got the opposite"
                         for (port, proto, a, b, want) in wrong[:20]]
                shown = "\n\n".join(
                    casedata.format_matrix(model.refs, got[key], expected[key]) + f"\n({key[1]}/{key[0]}; '!' = wrong)"
                    for key in sorted({(w[0], w[1]) for w in wrong}))
                pytest.fail(f"{case.name}: {len(wrong)} wrong cell(s) after {STEP_TIMEOUT:.0f}s of retries\n"
                            + "\n".join(lines) + "\n\n" + shown, pytrace=False)
        if case.sctp_dump:
            missing = _sctp_rules_present(model.cluster, case.sctp_dump["ports"])
            assert not missing, f"no sctp rule for ports {missing} in the agents' dumps"
    except BaseException:
        if outcome["TCP"] and outcome["UDP"]:
            outcome["failed"] = True  # an error, not a wrong cell (e.g. kubectl apply refused)
        raise
    finally:
        outcome["seconds"] = round(time.monotonic() - t_case, 1)
        RESULTS[case.id] = outcome
