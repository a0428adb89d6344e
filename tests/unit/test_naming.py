"""Shared naming: verified upstream vectors, length limits, ownership, no collisions."""

from __future__ import annotations

import itertools

import pytest

from policy_agent.shared import naming

# reference-facts.md §1.3: literals from Calico conversion_test.go and AWS names_test.go.
VECTORS = [
    ("namespace", "podname", "82111e10a96"),
    ("kube-system", "coredns-57ff979f67-qqbdh", "b5faff8a083"),
    ("kube-system", "coredns-57ff979f67-8ns9b", "9571956a6cc"),
    ("default", "sample-pod", "cc21c2d7785"),
    ("default", "nginx-7c5ddbdf54-abcde", "306ce65e73b"),
]


@pytest.mark.parametrize("ns,pod,suffix", VECTORS)
@pytest.mark.parametrize("prefix", ["eni", "cali"])
def test_veth_name_matches_upstream_vectors(prefix, ns, pod, suffix):
    name = naming.veth_name(prefix, ns, pod)
    assert name == prefix + suffix
    assert len(name) <= naming.IFNAME_MAX


def test_multi_nic_index_hashes_pod_dot_index():
    assert naming.veth_name("eni", "default", "sample-pod", index=1) == "enia0b7655f3c9"


@pytest.mark.parametrize("bad", ["", "toolong", "eth", "lo", "vlan", "1ab", "a b", "e/x"])
def test_bad_prefixes_are_rejected(bad):
    with pytest.raises(ValueError):
        naming.veth_name(bad, "default", "p")


def test_chain_names_fit_and_are_owned():
    long_ns = "n" * 63
    long_name = "p" * 253
    for d in ("ingress", "egress"):
        c = naming.policy_chain(long_ns, long_name, d)
        assert len(c) <= naming.CHAIN_MAX and naming.owns_chain(c)
    iface = naming.veth_name("cali", "kube-system", "coredns-57ff979f67-qqbdh")
    assert naming.to_workload_chain(iface) == "pa-tw-" + iface
    assert naming.from_workload_chain(iface) == "pa-fw-" + iface
    assert not naming.owns_chain("KUBE-SERVICES")
    assert not naming.owns_chain("cali-FORWARD")


def test_hashed_chain_names_do_not_collide_with_plain_ones_or_each_other():
    # Names that only differ past the truncation point must still differ.
    names = {naming.policy_chain("default", f"policy-with-a-long-common-prefix-{i}", "ingress") for i in range(2000)}
    assert len(names) == 2000
    # A suffix that looks like a hash is hashed too, so it cannot equal a hashed name.
    plain = naming.length_limited("pa-pi-", "_abc", 28)
    assert plain != "pa-pi-_abc"


def test_ipset_names_are_exactly_31_owned_and_family_specific():
    a4 = naming.ipset_name(4, "s", "x/app=web")
    a6 = naming.ipset_name(6, "s", "x/app=web")
    assert len(a4) == naming.IPSET_MAX == len(a6)
    assert a4 != a6 and a4.startswith("pa4s-") and a6.startswith("pa6s-")
    assert naming.owns_ipset(a4) and naming.owns_ipset(naming.temp_ipset_name(a4))
    assert naming.temp_ipset_name(a4) != a4
    assert not naming.owns_ipset("KUBE-CLUSTER-IP") and not naming.owns_ipset("cali40s:abc")
    with pytest.raises(ValueError):
        naming.ipset_name(5, "s", "x")
    with pytest.raises(ValueError):
        naming.ipset_name(4, "Q", "x")


def test_ipset_names_distinct_over_many_identities():
    idents = [f"ns{i}/app={j}" for i, j in itertools.product(range(100), range(50))]
    assert len({naming.ipset_name(4, "s", x) for x in idents}) == len(idents)


def test_naming_is_stdlib_only():
    import subprocess
    import sys

    code = (
        "import sys; import policy_agent.shared.naming, policy_agent.shared.endpoint; "
        "bad=[m for m in ('yaml','structlog','kubernetes','pyroute2','iptc','watchdog') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
