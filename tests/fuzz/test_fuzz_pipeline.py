"""Fuzzing parse -> compile -> apply (issue 10, "Prove it"): the fast slice that CI runs.

Generated clusters (tests/fuzz/fuzz_strategies.py) go through the agent's pipeline
(tests/fuzz/fuzz_pipeline.py, which states the invariants and the oracle) on the
fake kernel, and a smaller number on the real kernel in a private netns. Every
example must show 0 crashes, 0 good objects stopped and 0 widenings. The long run
is ``bench/reliability/fuzz.py``; figures in docs/reliability.md.

The explicit clusters below are issue 10's attacks written as a tenant would, and
two checks that the oracle does see a widening when a protection is switched off
(a fuzzer that cannot fail proves nothing).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_pipeline as fp  # noqa: E402
import fuzz_strategies as fs  # noqa: E402

from policy_agent.model.types import PodIPPolicy  # noqa: E402

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FAKE_EXAMPLES = int(os.environ.get("PA_FUZZ_EXAMPLES", "60"))
KERNEL_EXAMPLES = int(os.environ.get("PA_FUZZ_KERNEL_EXAMPLES", "12"))


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,  # the same examples every run: CI is reproducible, a failure reruns
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(autouse=True)
def _quiet():
    fp.quiet_logs()  # conftest resets structlog after each test


def _check(result: fp.Result) -> None:
    assert result.ok, result.describe()


@_settings(FAKE_EXAMPLES)
@given(fs.cluster_st(big_rules=0.02))
def test_fuzz_fake_kernel(cluster):
    _check(fp.run_cluster(cluster, fp.fake_dataplane))


@pytest.fixture(scope="module")
def real_kernel():
    fp.quiet_logs()
    with fp.RealKernel(tag="h7fz") as k:
        yield k


@pytest.mark.kernel
@pytest.mark.slow
@_settings(KERNEL_EXAMPLES)
@given(cluster=fs.cluster_st(max_pods=5, big_rules=0.0))
def test_fuzz_real_kernel(real_kernel, cluster):
    fp.quiet_logs()
    _check(fp.run_cluster(cluster, real_kernel.make, real_kernel=True))


# --- issue 10's attacks, explicit --------------------------------------------------------------


def _pod(name, ns, ip=None, labels=None, node=fs.NODE, annotation=None, ports=()):
    d = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": list(ports)}]},
        "status": {"phase": "Running", **({"podIP": ip} if ip else {})},
    }
    if annotation is not None:
        d["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": annotation}
    return d


def _policy(name, ns, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def poison_pod_cluster(bad_ip: str) -> dict:
    """Attack 1: a pod with no status IP, the annotation naming a bad address, a container
    port named like the policy's port, an anchor pod on the node; then a default-deny
    in another namespace must still be enforced."""
    return {
        "good": [
            _pod("anchor", "tenant", "10.233.0.2", {"app": "anchor"}),
            _pod("victim", "other", "10.233.0.3", {"app": "v"}),
            _pod("remote", "other", "10.233.1.4", {"app": "r"}, node=fs.OTHER_NODE),
            _policy("web", "tenant", {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]}),
        ],
        "poison": [
            _pod("poison", "tenant", None, {"app": "p"}, annotation=bad_ip,
                 ports=[{"containerPort": 80, "name": "web"}]),
        ],
        "late": fs.late_policy("other"),
        "dup_keys": False,
    }


@pytest.mark.parametrize("bad_ip", ["0.0.0.0", "::", "127.0.0.1", "224.0.0.1", "169.254.1.1", "fe80::1", "ff02::1"])
def test_attack_poison_pod_fake_kernel(bad_ip):
    _check(fp.run_cluster(poison_pod_cluster(bad_ip), fp.fake_dataplane))


@pytest.mark.kernel
@pytest.mark.parametrize("bad_ip", ["0.0.0.0", "::", "127.0.0.1", "224.0.0.1", "fe80::1"])
def test_attack_poison_pod_real_kernel(real_kernel, bad_ip):
    # The same bad addresses in status (kubelet-written, but the kernel must not see them either).
    c = poison_pod_cluster(bad_ip)
    c["poison"].append(_pod("poison-status", "tenant", bad_ip, {"app": "p"}, ports=[{"containerPort": 80, "name": "web"}]))
    _check(fp.run_cluster(c, real_kernel.make, real_kernel=True))


def forged_annotation_cluster() -> dict:
    """Attack 2: a tenant pod with no status IP claims the victim's address in the annotation;
    a policy in another namespace allows the tenant's label."""
    return {
        "good": [
            _pod("victim", "victims", "10.233.1.9", {"app": "victim"}, node=fs.OTHER_NODE),
            _pod("db", "prod", "10.233.0.20", {"app": "db"}),
            _policy("db-from-tenant", "prod", {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tenant"}},
                                       "podSelector": {"matchLabels": {"app": "t"}}}]}],
            }),
        ],
        "poison": [_pod("forger", "tenant", None, {"app": "t"}, node=fs.OTHER_NODE,
                        annotation="10.233.1.9,192.0.2.10,10.233.0.250")],
        "late": fs.late_policy("victims"),
        "dup_keys": False,
    }


def test_attack_forged_annotation_is_not_trusted():
    _check(fp.run_cluster(forged_annotation_cluster(), fp.fake_dataplane))


def test_oracle_sees_the_forged_annotation_when_trusted(monkeypatch):
    # Proof that the widening check can fail: trust the annotation (limited to the pod
    # networks, as the setting does) and the victim's address reaches the db.
    monkeypatch.setattr(fp, "POD_IP_POLICY", PodIPPolicy(networks=fp.POD_IP_POLICY.networks, trust_annotation=True))
    r = fp.run_cluster(forged_annotation_cluster(), fp.fake_dataplane)
    assert r.widenings and "10.233.1.9 -> 10.233.0.20" in r.widenings[0], r.describe()


def unparseable_policy_cluster(cidr: str = "010.0.0.0/8") -> dict:
    """Attack 3: an ipBlock an older API server stored (leading zeros) in a policy that isolates."""
    return {
        "good": [
            _pod("a", "x", "10.233.0.5", {"app": "a"}),
            _pod("b", "x", "10.233.0.6", {"app": "b"}),
        ],
        "poison": [_policy("isolate-a", "x", {
            "podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}],
        })],
        "late": fs.late_policy("y"),
        "dup_keys": False,
    }


@pytest.mark.parametrize("cidr", ["010.0.0.0/8", "10.0.0.0/33", "10.233.0.0/24 ", "garbage"])
def test_attack_unparseable_policy_isolates(cidr):
    c = unparseable_policy_cluster(cidr)
    r = fp.run_cluster(c, fp.fake_dataplane)
    _check(r)


def test_oracle_sees_a_dropped_policy(monkeypatch):
    # Without the no-allow fallback the unparseable policy is dropped and b reaches a.
    monkeypatch.setattr(fp, "HAS_FALLBACK", False)
    r = fp.run_cluster(unparseable_policy_cluster(), fp.fake_dataplane)
    assert any("10.233.0.6 -> 10.233.0.5" in w for w in r.widenings), r.describe()


def test_duplicate_keys_last_wins():
    c = copy.deepcopy(unparseable_policy_cluster("10.0.0.0/8"))
    c["dup_keys"] = True
    d = fp.wire(c["good"][0], True)
    assert d["metadata"]["name"] == "a" and d["spec"]["nodeName"] == fs.NODE
    _check(fp.run_cluster(c, fp.fake_dataplane))
