"""The EC2 provider and the pool against moto's EC2 server and an IMDSv2 server (real HTTP).

Where moto 5.2.5 falls short of EC2 the test says so: it ignores Ipv4PrefixCount (prefix
mode runs on botocore's Stubber, which checks every request against the EC2 API model)
and never runs out of subnet addresses (the fault proxy answers as EC2 would).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import urllib.error
import urllib.request

import pytest
from botocore.stub import Stubber
from emulator import CREDS, addresses_of, enis_of

from cni_shim.ipam.ec2 import (
    CREATED_BY,
    TAG_CLUSTER,
    TAG_CREATED_AT,
    TAG_CREATED_BY,
    TAG_INSTANCE,
    Ec2Provider,
    Ec2Settings,
    make_client,
)
from cni_shim.ipam.imds import Imds, ImdsError, read_facts
from cni_shim.ipam.limits import max_pods_prefix
from cni_shim.ipam.pool import Pool, PoolShort, Targets
from cni_shim.ipam.provider import ProviderUnavailable, SubnetExhausted
from cni_shim.ipam.retry import Backoff


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def provider(emu, backoff: Backoff | None = None, **settings) -> Ec2Provider:
    settings.setdefault("cluster_name", "lab")
    p = Ec2Provider.from_environment(Ec2Settings(**settings), imds=Imds())
    p.backoff = backoff or Backoff(sleep=Sleeps(), rng=random.Random(1))
    return p


def key(i: int) -> tuple[str, str, str]:
    return ("vpcip", f"c{i}", "eth0")


def take(pool: Pool, i: int, now: float = 0):
    """What the daemon does for an ADD (commands.Service._allocate_locked), in one thread:
    no free address -> count the ADD in the demand, one fill round, then the address or
    the reason the fill gave."""
    try:
        return pool.allocate(key(i), now)
    except PoolShort:
        pool.demand += 1
        try:
            pool.reconcile(now)
        finally:
            pool.demand -= 1
        if pool.grow_error is not None:
            raise pool.grow_error from None
        return pool.allocate(key(i), now)


def ec2_view(emu) -> dict[str, set[str]]:
    """ENI id -> pod addresses, for every ENI EC2 has in the node's subnet."""
    return {i: addresses_of(e) for i, e in enis_of(emu.ec2, emu.node).items()}


def pool_view(pool: Pool) -> dict[str, set[str]]:
    return {i: {s.ipv4 for s in e.slots} for i, e in pool.enis.items()}


# --- IMDS ------------------------------------------------------------------------------


def test_imds_v2_facts_match_the_instance_and_a_request_without_token_is_refused(emu):
    node = emu.make()
    facts = read_facts(Imds())  # endpoint from AWS_EC2_METADATA_SERVICE_ENDPOINT
    assert (facts.instance_id, facts.instance_type, facts.region) == (node.instance_id, "m5.large", "us-east-1")
    p = facts.primary
    assert (p.interface_id, p.subnet_id, p.security_groups, p.subnet_ipv4_cidrs) == (
        node.primary_eni, node.subnet_id, (node.sg,), (node.subnet_cidr,))
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(emu.imds.url + "latest/meta-data/instance-id", timeout=5)
    assert exc.value.code == 401
    emu.imds.tokens.clear()  # tokens revoked: the client fetches a new one and goes on
    assert Imds().get("instance-id") == node.instance_id
    with pytest.raises(ImdsError):
        Imds(endpoint="http://127.0.0.1:9/", timeout=0.5, attempts=1).get("instance-id")


def test_client_endpoint_comes_from_aws_endpoint_url_ec2(emu):
    emu.make()
    assert make_client("us-east-1").meta.endpoint_url == emu.proxy.url


# --- warm targets ----------------------------------------------------------------------


def test_warm_eni_target_fills_whole_enis_and_releases_an_unused_one(emu):
    node = emu.make(instance_type="m5.large")  # 3 ENIs x 10 IPs: 9 pod addresses per ENI
    prov = provider(emu)
    pool = Pool(prov, Targets(warm_eni=1, cooldown=0))
    pool.reconcile(0)
    assert ec2_view(emu) == pool_view(pool) and len(pool_view(pool)[node.primary_eni]) == 9
    for i in range(9):
        pool.allocate(key(i), 0)
    pool.reconcile(0)  # 0 free < 9: a second ENI, filled
    enis = enis_of(emu.ec2, node)
    assert len(enis) == 2 and ec2_view(emu) == pool_view(pool)
    second = next(e for i, e in enis.items() if i != node.primary_eni)
    tags = {t["Key"]: t["Value"] for t in second["TagSet"]}
    assert tags[TAG_INSTANCE] == node.instance_id and tags[TAG_CLUSTER] == "lab" and tags[TAG_CREATED_BY] == CREATED_BY
    assert TAG_CREATED_AT in tags
    assert second["Attachment"]["DeviceIndex"] == 1
    # moto 5.2.5 accepts but does not apply DeleteOnTermination: the request is all we can see.
    assert emu.proxy.seen["ModifyNetworkInterfaceAttribute"] == 1
    assert second["Groups"][0]["GroupId"] == node.sg and second["SubnetId"] == node.subnet_id
    for i in range(9):
        pool.release(key(i), 0)
    pool.reconcile(1)  # 18 free, keep 9: the unused secondary ENI goes, the primary stays
    assert list(enis_of(emu.ec2, node)) == [node.primary_eni]
    assert ec2_view(emu) == pool_view(pool) and pool.stats(1).available == 9


def test_secondary_eni_holding_a_pod_or_a_cooling_address_is_never_released(emu):
    node = emu.make()
    pool = Pool(provider(emu), Targets(warm_eni=1, cooldown=30))
    pool.reconcile(0)
    for i in range(10):
        take(pool, i)
    pool.reconcile(0)
    for i in range(9):  # the primary ENI's pods go; the one on the secondary stays
        pool.release(key(i), 0)
    pool.reconcile(100)
    assert len(enis_of(emu.ec2, node)) == 2  # secondary holds a pod
    pool.release(key(9), 100)
    pool.reconcile(101)
    assert len(enis_of(emu.ec2, node)) == 2  # its address is cooling down
    pool.reconcile(131)
    assert list(enis_of(emu.ec2, node)) == [node.primary_eni]


def test_warm_ip_and_minimum_ip_targets_grow_and_trim_in_ec2(emu):
    node = emu.make()
    pool = Pool(provider(emu), Targets(warm_ip=2, minimum_ip=5, cooldown=0))
    pool.reconcile(0)
    assert len(ec2_view(emu)[node.primary_eni]) == 5
    for i in range(4):
        pool.allocate(key(i), 0)
    pool.reconcile(0)
    assert len(ec2_view(emu)[node.primary_eni]) == 6 and pool.stats(0).available == 2
    for i in range(4):
        pool.release(key(i), 0)
    pool.reconcile(0)
    assert len(ec2_view(emu)[node.primary_eni]) == 5 and ec2_view(emu) == pool_view(pool)


# --- dual-stack ------------------------------------------------------------------------


def test_dual_stack_slots_get_ipv6_from_the_subnet_and_give_it_back(emu):
    node = emu.make(dual_stack=True)
    pool = Pool(provider(emu, dual_stack=True), Targets(warm_ip=3, cooldown=0))
    pool.reconcile(0)
    a = pool.allocate(key(0), 0)
    pool.reconcile(0)  # 2 free < 3: one more slot, both families
    assert a.ipv6 and ipaddress.IPv6Address(a.ipv6) in ipaddress.IPv6Network(node.subnet_v6)
    eni = enis_of(emu.ec2, node)[node.primary_eni]
    v6_ec2 = {x["Ipv6Address"] for x in eni["Ipv6Addresses"]}
    v6_pool = {s.ipv6 for e in pool.enis.values() for s in e.slots}
    assert v6_pool == v6_ec2 and len(v6_pool) == 4 and "" not in v6_pool
    pool.release(key(0), 0)
    pool.reconcile(0)  # 4 free, warm 3: one slot (both addresses) goes back
    eni = enis_of(emu.ec2, node)[node.primary_eni]
    assert len(eni["Ipv6Addresses"]) == 3 and len(addresses_of(eni)) == 3


# --- exhaustion ------------------------------------------------------------------------


def test_subnet_exhaustion_is_try_again_later_naming_the_subnet_and_the_pool_keeps_serving(emu):
    node = emu.make(subnet_cidr="10.233.0.0/28")  # 16 - 5 reserved - the primary's own
    pool = Pool(provider(emu), Targets(warm_ip=2, cooldown=0))
    pool.reconcile(0)
    got = []
    with pytest.raises(SubnetExhausted) as exc:
        for i in range(20):
            got.append(take(pool, i))
    assert node.subnet_id in str(exc.value) and "try again later" in str(exc.value)
    # The pool holds what EC2 holds: the pods' addresses and at most the warm ones.
    subnet = emu.ec2.describe_subnets(SubnetIds=[node.subnet_id])["Subnets"][0]
    assert subnet["AvailableIpAddressCount"] <= 1 and len(got) >= 8
    assert ec2_view(emu) == pool_view(pool) and {a.ipv4 for a in got} <= ec2_view(emu)[node.primary_eni]
    assert pool.stats(0).available == len(ec2_view(emu)[node.primary_eni]) - len(got) <= 2
    pool.release(key(0), 0)
    assert pool.allocate(key(99), 0).ipv4 in ec2_view(emu)[node.primary_eni]  # still serving
    claimed, _ = pool.reconcile(0)  # upkeep logs the failure, never raises
    assert claimed == 0


def test_exhaustion_reaches_the_pod_as_cni_error_11(emu, tmp_path):
    from cni_shim.commands import Service
    from cni_shim.fake_plumbing import FakePlumbing
    from cni_shim.ipam.checkpoint import Checkpoint

    node = emu.make(subnet_cidr="10.233.0.0/28")
    ck = Checkpoint(str(tmp_path / "state"))
    ck.acquire()
    svc = Service(Pool(provider(emu), Targets(warm_ip=1, cooldown=0)), ck, plumbing=FakePlumbing())
    svc.restore()
    conf = {"name": "vpcip", "veth_prefix": "eni", "mtu": 1500, "endpoint_dir": str(tmp_path / "ep"),
            "status_dir": str(tmp_path / "st"), "policy_wait": 0.0}
    answers = []
    for i in range(12):
        ns = tmp_path / f"ns{i}"
        ns.touch()
        answers.append(svc.handle({"op": "add", "container_id": f"c{i}", "ifname": "eth0", "netns": str(ns),
                                   "namespace": "default", "pod": f"p{i}", "conf": conf}))
    n = len(ec2_view(emu)[node.primary_eni])  # what the /28 could give (moto's accounting)
    assert n >= 8 and [a["ok"] for a in answers] == [True] * n + [False] * (12 - n)
    err = answers[-1]["error"]
    assert err["code"] == 11 and node.subnet_id in err["msg"]
    assert svc.handle({"op": "ping"})["ok"]


# --- restart, adoption, GC ---------------------------------------------------------------


def test_restart_drops_what_ec2_lost_and_adopts_what_the_checkpoint_missed(emu):
    node = emu.make()
    prov = provider(emu)
    pool = Pool(prov, Targets(warm_ip=3, cooldown=0))
    pool.reconcile(0)
    a = pool.allocate(key(0), 0)
    b = pool.allocate(key(1), 0)
    pool.reconcile(0)
    saved = json.loads(json.dumps(pool.to_dict()))
    # While the daemon is down: someone unassigns a's address; a claim after the last
    # checkpoint write left two more on the ENI.
    emu.ec2.unassign_private_ip_addresses(NetworkInterfaceId=node.primary_eni, PrivateIpAddresses=[a.ipv4])
    emu.ec2.assign_private_ip_addresses(NetworkInterfaceId=node.primary_eni, SecondaryPrivateIpAddressCount=2)
    again = Pool(provider(emu), Targets(warm_ip=3, cooldown=0))
    dropped = again.restore(saved)
    assert [d.ipv4 for d in dropped] == [a.ipv4] and again.find(b.key) is not None
    again.reconcile(0)  # adopts the two as free
    assert ec2_view(emu) == pool_view(again)
    again.reconcile(0)  # and trims to the target from there
    assert again.stats(0).available == 3 and ec2_view(emu) == pool_view(again)


def test_an_attached_eni_missing_from_the_checkpoint_is_adopted_then_released(emu):
    node = emu.make()
    pool = Pool(provider(emu), Targets(warm_eni=1, cooldown=0))
    pool.reconcile(0)
    empty = json.loads(json.dumps(pool.to_dict()))
    for i in range(9):
        pool.allocate(key(i), 0)
    pool.reconcile(0)  # attaches and fills a second ENI; the daemon dies before saving
    assert len(enis_of(emu.ec2, node)) == 2
    again = Pool(provider(emu), Targets(warm_eni=1, cooldown=0))
    again.restore(empty)
    again.reconcile(0)
    assert ec2_view(emu) == pool_view(again)
    again.reconcile(0)  # 18 free, keep 9: the adopted ENI holds nothing and goes
    assert list(enis_of(emu.ec2, node)) == [node.primary_eni] and ec2_view(emu) == pool_view(again)


def test_leaked_eni_gc_deletes_only_our_old_unattached_enis(emu):
    node = emu.make()
    prov = provider(emu, leaked_eni_grace=600)

    def eni(tags: dict) -> str:
        spec = [{"ResourceType": "network-interface", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        return emu.ec2.create_network_interface(SubnetId=node.subnet_id, Groups=[node.sg],
                                                TagSpecifications=spec)["NetworkInterface"]["NetworkInterfaceId"]

    ours = {TAG_CREATED_BY: CREATED_BY, TAG_CLUSTER: "lab", TAG_INSTANCE: node.instance_id}
    old = eni({**ours, TAG_CREATED_AT: "2020-01-01T00:00:00Z"})
    young = eni({**ours, TAG_CREATED_AT: "2999-01-01T00:00:00Z"})
    other_cluster = eni({**ours, TAG_CLUSTER: "other", TAG_CREATED_AT: "2020-01-01T00:00:00Z"})
    not_ours = eni({TAG_CLUSTER: "lab", TAG_CREATED_AT: "2020-01-01T00:00:00Z"})
    attached = eni({**ours, TAG_CREATED_AT: "2020-01-01T00:00:00Z"})
    emu.ec2.attach_network_interface(NetworkInterfaceId=attached, InstanceId=node.instance_id, DeviceIndex=2)
    assert prov.gc_leaked() == [old]
    assert set(enis_of(emu.ec2, node)) == {node.primary_eni, young, other_cluster, not_ours, attached}


# --- throttling and partial failures -------------------------------------------------------


def test_throttling_is_retried_with_bounded_full_jitter_backoff(emu):
    node = emu.make()
    sleeps = Sleeps()
    prov = provider(emu, Backoff(attempts=6, base=0.2, cap=5.0, sleep=sleeps, rng=random.Random(7)))
    emu.proxy.fail("AssignPrivateIpAddresses", 3)
    pool = Pool(prov, Targets(warm_ip=4, cooldown=0))
    pool.reconcile(0)
    assert len(ec2_view(emu)[node.primary_eni]) == 4
    assert emu.proxy.seen["AssignPrivateIpAddresses"] == 4 and prov.calls["AssignPrivateIpAddresses"] == 4
    assert len(sleeps) == 3 and all(0 <= s <= min(5.0, 0.2 * 2 ** n) for n, s in enumerate(sleeps))
    # Throttled past the bound: a clear error, nothing claimed, the pool goes on.
    emu.proxy.fail("AssignPrivateIpAddresses", 100)
    pool.allocate(key(0), 0)
    for i in range(1, 4):
        pool.allocate(key(i), 0)
    with pytest.raises(ProviderUnavailable, match="throttled"):
        take(pool, 4)
    assert pool.reconcile(0) == (0, 0)
    emu.proxy.fail("AssignPrivateIpAddresses", 0)
    assert take(pool, 4).ipv4


def test_a_failed_attach_step_rolls_the_eni_back(emu):
    node = emu.make()
    emu.proxy.fail("ModifyNetworkInterfaceAttribute", 1, code="InvalidParameterValue", status=400)
    pool = Pool(provider(emu), Targets(warm_eni=1, cooldown=0))
    pool.reconcile(0)
    for i in range(9):
        pool.allocate(key(i), 0)
    pool.reconcile(0)  # create + attach succeed, DeleteOnTermination fails: detached and deleted
    assert list(enis_of(emu.ec2, node)) == [node.primary_eni] and list(pool.enis) == [node.primary_eni]
    assert emu.proxy.seen["DetachNetworkInterface"] == 1 and emu.proxy.seen["DeleteNetworkInterface"] == 1
    pool.reconcile(0)  # the next round succeeds
    assert len(enis_of(emu.ec2, node)) == 2 and ec2_view(emu) == pool_view(pool)


def test_attached_but_assign_failed_keeps_the_eni_recorded_and_uses_it_later(emu):
    node = emu.make()
    pool = Pool(provider(emu), Targets(warm_eni=1, cooldown=0))
    pool.reconcile(0)
    for i in range(9):
        pool.allocate(key(i), 0)
    emu.proxy.fail("AssignPrivateIpAddresses", 1, code="InvalidParameterValue", status=400)
    pool.reconcile(0)
    second = [i for i in enis_of(emu.ec2, node) if i != node.primary_eni]
    assert len(second) == 1 and second[0] in pool.to_dict()["enis"][1]["id"]  # recorded, not leaked
    pool.reconcile(0)
    assert ec2_view(emu) == pool_view(pool) and len(pool_view(pool)[second[0]]) == 9


def test_dual_stack_ipv6_failure_gives_the_ipv4_addresses_back(emu):
    node = emu.make(dual_stack=True)
    emu.proxy.fail("AssignIpv6Addresses", 1, code="InvalidParameterValue", status=400)
    pool = Pool(provider(emu, dual_stack=True), Targets(warm_ip=3, cooldown=0))
    pool.reconcile(0)
    assert ec2_view(emu)[node.primary_eni] == set() and pool.stats(0).total == 0
    pool.reconcile(0)
    assert len(ec2_view(emu)[node.primary_eni]) == 3


def test_credentials_are_never_logged(emu, caplog, capsys):
    emu.make()
    logging.getLogger().setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG):
        pool = Pool(provider(emu), Targets(warm_ip=2, cooldown=0))
        pool.reconcile(0)
    out = caplog.text + "".join(capsys.readouterr())
    assert pool.stats(0).total == 2
    assert CREDS["aws_secret_access_key"] not in out and CREDS["aws_access_key_id"] not in out


# --- prefix delegation (botocore Stubber: moto 5.2.5 ignores Ipv4PrefixCount) ----------------


def test_prefix_mode_claims_and_releases_whole_28s(emu):
    node = emu.make(instance_type="t3.small")  # 3 ENIs x 4 IPs: 3 prefixes per ENI
    prov = provider(emu, prefix_delegation=True)
    assert prov.limits.max_pods == max_pods_prefix(3, 4, 2) == 110 and prov.limits.slots_per_eni == 48
    eni_desc = {"NetworkInterfaceId": node.primary_eni, "PrivateIpAddress": "10.233.0.4", "MacAddress": "02:00:00:00:00:01",
                "SubnetId": node.subnet_id, "Attachment": {"DeviceIndex": 0, "AttachmentId": "eni-attach-1"}}
    stub = Stubber(prov.client)
    stub.add_response("describe_network_interfaces", {"NetworkInterfaces": [eni_desc]})
    stub.add_response("assign_private_ip_addresses",
                      {"NetworkInterfaceId": node.primary_eni, "AssignedIpv4Prefixes": [{"Ipv4Prefix": "10.233.0.32/28"}]},
                      {"NetworkInterfaceId": node.primary_eni, "Ipv4PrefixCount": 1})
    stub.add_response("assign_private_ip_addresses",
                      {"NetworkInterfaceId": node.primary_eni, "AssignedIpv4Prefixes": [{"Ipv4Prefix": "10.233.0.48/28"}]},
                      {"NetworkInterfaceId": node.primary_eni, "Ipv4PrefixCount": 1})
    stub.add_response("unassign_private_ip_addresses", {},
                      {"NetworkInterfaceId": node.primary_eni, "Ipv4Prefixes": ["10.233.0.48/28"]})
    pool = Pool(prov, Targets(warm_prefix=1, cooldown=0))
    pool._adopted = True  # the stub serves this sequence only
    with stub:
        pool.reconcile(0)  # one /28: 16 free
        assert pool.stats(0).total == 16
        got = [pool.allocate(key(i), 0).ipv4 for i in range(1)]
        assert ipaddress.IPv4Address(got[0]) in ipaddress.IPv4Network("10.233.0.32/28")
        pool.reconcile(0)  # 15 free < 16: a second whole /28
        assert pool.stats(0).total == 32
        pool.release(key(0), 0)
        pool.reconcile(0)  # 32 free, keep 16: one whole free /28 goes back
        assert pool.stats(0).total == 16
        stub.assert_no_pending_responses()
