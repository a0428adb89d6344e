"""No root: the executable's parsing and errors, VERSION, max-pods, the pool, the pool file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cni_lab_helpers import VPCIP_CNI, pool_doc

from cni_shim.ipam.limits import max_pods_for
from cni_shim.ipam.pool import Pool, PoolExhausted, Targets
from cni_shim.ipam.provider import PoolFileError, StaticProvider

GOOD = {"cniVersion": "1.0.0", "name": "n", "type": "vpcip-cni", "ipamSocket": "/nonexistent/pa-cni.sock"}


def run(command: str | None, stdin: str, args: tuple = (), **env) -> tuple[int, dict | None, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    if command:
        e["CNI_COMMAND"] = command
    e.update(env)
    p = subprocess.run([VPCIP_CNI, *args], input=stdin, env=e, capture_output=True, text=True, timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else None
    return p.returncode, out, p.stdout + p.stderr


def test_version_needs_no_daemon():
    rc, out, _ = run("VERSION", json.dumps({"cniVersion": "1.0.0"}))
    assert rc == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("itype,expected", [("m5.large", 29), ("t3.medium", 17), ("t3.small", 11),
                                             ("m5.xlarge", 58), ("c5.18xlarge", 737)])
def test_max_pods(itype, expected):
    assert max_pods_for(itype) == expected
    rc, _, text = run(None, "", ("max-pods", "--instance-type", itype))
    assert rc == 0 and text.strip() == str(expected)


def test_max_pods_unknown_type():
    rc, _, text = run(None, "", ("max-pods", "--instance-type", "x9.huge"))
    assert rc == 1 and "unknown instance type 'x9.huge'" in text


ADD_ENV = dict(CNI_CONTAINERID="c1", CNI_IFNAME="eth0", CNI_NETNS="/proc/self/ns/net",
               CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=p")


@pytest.mark.parametrize(
    "command,stdin,env,code,words",
    [
        ("ADD", "{not json", ADD_ENV, 6, "not valid JSON"),
        ("ADD", "", ADD_ENV, 6, "no network configuration"),
        ("ADD", "[1]", ADD_ENV, 6, "not a JSON object"),
        ("ADD", json.dumps({**GOOD, "cniVersion": "9.9.9"}), ADD_ENV, 1, "incompatible CNI version '9.9.9'"),
        ("ADD", json.dumps({k: v for k, v in GOOD.items() if k != "cniVersion"}), ADD_ENV, 7, "'cniVersion'"),
        ("ADD", json.dumps({k: v for k, v in GOOD.items() if k != "name"}), ADD_ENV, 7, "'name'"),
        ("ADD", json.dumps({**GOOD, "vethPrefix": "eth"}), ADD_ENV, 7, "'vethPrefix'"),
        ("ADD", json.dumps({**GOOD, "vethPrefix": "toolong"}), ADD_ENV, 7, "'vethPrefix'"),
        ("ADD", json.dumps({**GOOD, "mtu": 100}), ADD_ENV, 7, "'mtu'"),
        ("ADD", json.dumps({**GOOD, "policyWaitSeconds": "x"}), ADD_ENV, 7, "'policyWaitSeconds'"),
        ("ADD", json.dumps({**GOOD, "type": "bridge"}), ADD_ENV, 7, "'type'"),
        ("ADD", json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}), ADD_ENV, 7,
         "no plugin of type"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_CONTAINERID": ""}, 4, "CNI_CONTAINERID"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_CONTAINERID": "a b"}, 4, "CNI_CONTAINERID"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_IFNAME": ""}, 4, "CNI_IFNAME"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_IFNAME": "a/b"}, 4, "CNI_IFNAME"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_NETNS": ""}, 4, "CNI_NETNS"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_NETNS": "/var/run/netns/pa-cni-none"}, 4, "does not exist"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_ARGS": "K8S_POD_NAME=p"}, 4, "K8S_POD_NAMESPACE"),
        ("ADD", json.dumps(GOOD), {**ADD_ENV, "CNI_ARGS": "garbage"}, 4, "malformed pair"),
        ("CHECK", json.dumps(GOOD), ADD_ENV, 7, "prevResult"),
        ("CHECK", json.dumps({**GOOD, "cniVersion": "0.3.1", "prevResult": {}}), ADD_ENV, 1, "0.4.0"),
        ("GC", json.dumps(GOOD), {}, 1, "1.1.0"),
        ("GC", json.dumps({**GOOD, "cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"x": 1}]}), {}, 7,
         "valid-attachments"),
        ("FROB", json.dumps(GOOD), ADD_ENV, 4, "CNI_COMMAND"),
        ("ADD", json.dumps(GOOD), ADD_ENV, 11, "not reachable"),
        ("STATUS", json.dumps({**GOOD, "cniVersion": "1.1.0"}), {}, 50, "not reachable"),
    ],
)
def test_bad_input_gives_a_clear_cni_error(command, stdin, env, code, words):
    rc, out, text = run(command, stdin, **env)
    assert rc == 1, text
    assert out["code"] == code, out
    assert words in out["msg"], out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}


def test_del_without_daemon_succeeds_and_drops_only_its_own_record(tmp_path):
    from policy_agent.shared.endpoint import EndpointRecord, write_record

    conf = json.dumps({**GOOD, "endpointDir": str(tmp_path)})
    rec = tmp_path / "default.p.json"
    # a newer sandbox's record (another container id) stays
    write_record(str(tmp_path), EndpointRecord("default", "p", "c2", "enix", ("10.233.0.2",)))
    rc, out, text = run("DEL", conf, **ADD_ENV)
    assert rc == 0 and out is None, text
    assert rec.exists()
    write_record(str(tmp_path), EndpointRecord("default", "p", "c1", "enix", ("10.233.0.1",)))
    rc, out, text = run("DEL", conf, **ADD_ENV)
    assert rc == 0 and out is None, text
    assert not rec.exists()


def test_executable_imports_stay_light():
    code = ("import sys, cni_shim.__main__, cni_shim.protocol, cni_shim.client; "
            "print(sorted(m for m in ('pyroute2','yaml','structlog','kubernetes','iptc','boto3','botocore')"
            " if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


# --- pool ------------------------------------------------------------------------------


def provider(**kw) -> StaticProvider:
    return StaticProvider.from_dict(pool_doc(**kw))


def test_warm_eni_target_claims_one_eni_of_addresses_then_more_on_demand():
    p = Pool(provider(enis=3, per_eni=9, limits=(3, 10)), Targets(warm_eni=1, cooldown=0))
    p.reconcile(0)
    assert p.stats(0).total == 9 and p.stats(0).enis == 1
    for i in range(5):
        p.allocate(("n", f"c{i}", "eth0"), 0)
    p.reconcile(0)  # 4 free < 9 wanted: attach the next ENI and fill it (as ipamd does)
    st = p.stats(0)
    assert st.enis == 2 and st.total == 18 and st.available == 13


def test_warm_ip_and_minimum_targets_grow_and_shrink():
    p = Pool(provider(enis=3, per_eni=9, limits=(3, 10)), Targets(warm_ip=2, minimum_ip=5, cooldown=0))
    p.reconcile(0)
    assert p.stats(0).total == 5
    for i in range(4):
        p.allocate(("n", f"c{i}", "eth0"), 0)
    p.reconcile(0)
    assert p.stats(0).available == 2 and p.stats(0).total == 6
    for i in range(4):
        p.release(("n", f"c{i}", "eth0"), 0)
    p.reconcile(0)
    assert p.stats(0).total == 5  # max(min(6-2, 6-5), 0) = 1 released


def test_same_key_gets_same_address_and_cooldown_holds_freed_addresses():
    p = Pool(provider(enis=1, per_eni=2, limits=(1, 3)), Targets(cooldown=30))
    p.reconcile(100)
    a = p.allocate(("n", "c1", "eth0"), 100)
    assert p.allocate(("n", "c1", "eth0"), 100) is a
    b = p.allocate(("n", "c2", "eth0"), 100)
    assert a.ipv4 != b.ipv4
    p.release(a.key, 100)
    with pytest.raises(PoolExhausted) as exc:
        p.allocate(("n", "c3", "eth0"), 110)
    assert "1 cooling down" in str(exc.value) and "at most 4 pods" in str(exc.value)
    assert p.allocate(("n", "c3", "eth0"), 131).ipv4 == a.ipv4


def test_checkpoint_round_trip():
    prov = provider()
    p = Pool(prov, Targets(cooldown=0))
    p.reconcile(0)
    a = p.allocate(("n", "c1", "eth0"), 0, namespace="ns", pod="p")
    q = Pool(prov, Targets(cooldown=0))
    assert q.restore(json.loads(json.dumps(p.to_dict()))) == []
    assert q.find(a.key) == a and q.to_dict() == p.to_dict()


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("limits"), "'instanceType' or 'limits'"),
        (lambda d: d.update(limits=None, instanceType="x1.foo"), "unknown type"),
        (lambda d: d["enis"][0].update(primaryIP="nope"), "enis[0].primaryIP"),
        (lambda d: d["enis"][1].update(deviceNumber=0), "enis[1].deviceNumber"),
        (lambda d: d["enis"][1].update(secondaryIPs=d["enis"][0]["secondaryIPs"]), "listed twice"),
        (lambda d: d["enis"][0].update(secondaryIPv6=["fd00:233::1"]), "enis[0].secondaryIPv6"),
        (lambda d: d.update(enis=[]), "'enis'"),
    ],
)
def test_pool_file_errors_name_the_field(mutate, field):
    doc = pool_doc()
    mutate(doc)
    if doc.get("limits", 1) is None:
        doc.pop("limits")
    with pytest.raises(PoolFileError) as exc:
        StaticProvider.from_dict(doc)
    assert field in str(exc.value)
