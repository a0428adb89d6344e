"""An unparseable ClusterNetworkPolicy never widens what it would enforce
(docs/decisions/cnp-fallback.md).

Model: the stand-in ladder of fallback_cluster_network_policy. Never wider: every
conformance case's ClusterNetworkPolicies, corrupted field by field, give stand-ins
whose verdicts (reference evaluator, 9 pods x 2 ports x 2 protocols) allow nothing the
intact policy denies. Compiled: the stand-in's rule names tier, policy, priority, rule
and action (render, iptables-save comments) and explain says it decided. Informer: a
policy turning bad keeps its last good version, one that never parsed is its stand-in,
and both are counted as degraded. domainNames: an Accept is a named no-op, a Deny or
Pass denies every destination on its ports.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
from test_compiler_evaluator import make_ns, make_pod, make_policy, rule, sel
from test_policy_fallback import _errors, _ListTransport, _view, _watch

from policy_agent.compiler import compile
from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import render_iptables_save
from policy_agent.explain import explain_flow
from policy_agent.model.parse import (
    describe_cnp_fallback,
    load_yaml_keep_going,
    parse_cluster_network_policy_or_fallback,
    parse_object,
)
from policy_agent.model.types import (
    CNP_STANDIN_RULE_NAME,
    MATCH_ALL,
    ClusterSnapshot,
    CNPAction,
    CNPTier,
)
from policy_agent.sources.kube import RESOURCES, Informer, KubeSource, WatchOptions

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conformance"))
import casedata  # noqa: E402
import reference_eval  # noqa: E402

NODE = NodeConfig("lab")


def cnp(spec: dict, name: str = "guard", rv: str = "1", uid: str = "") -> dict:
    meta = {"name": name, "resourceVersion": rv}
    if uid:
        meta["uid"] = uid
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": meta, "spec": spec}


SUBJ_XA = {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}}
DENY_EGRESS = {"tier": "Admin", "priority": 7, "subject": SUBJ_XA,
               "egress": [{"action": "Deny", "to": [{"pods": {"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                             "podSelector": {}}}]}]}
BAD_CIDR = {"networks": ["10.0.0.1/33"]}


def with_bad_egress(spec: dict) -> dict:
    s = copy.deepcopy(spec)
    s["egress"][0]["to"].append(BAD_CIDR)
    return s


# --- the ladder -----------------------------------------------------------------------------


def test_parses_is_the_policy_itself():
    pol, err = parse_cluster_network_policy_or_fallback(cnp(DENY_EGRESS))
    assert err is None and pol is not None and not pol.fallback_reason


def test_exact_header_keeps_parsed_directions_and_denies_the_broken_one():
    spec = with_bad_egress(DENY_EGRESS)
    spec["ingress"] = [{"action": "Pass", "from": [{"namespaces": {}}]}]
    pol, err = parse_cluster_network_policy_or_fallback(cnp(spec))
    assert err is not None and err.field_path == "spec.egress[0].to[1].networks[0]"
    assert pol.tier is CNPTier.ADMIN and pol.priority == 7
    assert pol.subject_namespaces.match_labels == {"ns": "x"} and pol.subject_pods.match_labels == {"pod": "a"}
    assert pol.ingress[0].action is CNPAction.PASS and pol.ingress[0].name == ""  # as written
    (standin,) = pol.egress
    assert standin.action is CNPAction.DENY and standin.name == CNP_STANDIN_RULE_NAME
    assert pol.fallback_reason.startswith("spec.egress[0].to[1].networks[0]: '10.0.0.1/33'")
    assert describe_cnp_fallback(pol) == ("Admin tier priority 7: Deny all egress for namespaces ns=x pods pod=a; "
                                         "ingress rules as written")


def test_a_direction_of_readable_accepts_only_is_dropped_never_denied():
    spec = {"tier": "Baseline", "priority": 3, "subject": {"namespaces": {}},
            "ingress": [{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"a": "bad value"}}}]}]}
    pol, err = parse_cluster_network_policy_or_fallback(cnp(spec))
    assert err is not None and pol.ingress == () and pol.egress == ()
    assert "ingress: Accept rules only, not enforced" in pol.fallback_reason
    assert describe_cnp_fallback(pol) == "Baseline tier priority 3: denies nothing"


@pytest.mark.parametrize("subject, ns_sel, pod_sel, note", [
    ({"pods": {"podSelector": {"matchLabels": {"pod": "bad value"}}}}, {}, {}, "subject podSelector unreadable"),
    ({"pods": {"namespaceSelector": {"matchLabels": {"ns": "x!"}}, "podSelector": {"matchLabels": {"pod": "a"}}}},
     {}, {"pod": "a"}, "subject namespaceSelector unreadable"),
    ({"namespaces": {"matchExpressions": [{"key": "ns", "operator": "Near"}]}}, {}, {}, "subject namespaces"),
    ({"namespaces": {}, "pods": {"podSelector": {}}}, {}, {}, "subject unreadable"),
    ("everyone", {}, {}, "subject unreadable"),
    ({"pods": ["x"]}, {}, {}, "subject pods unreadable"),
])
def test_an_unreadable_subject_selector_grows_to_everything(subject, ns_sel, pod_sel, note):
    spec = {**DENY_EGRESS, "subject": subject}
    pol, err = parse_cluster_network_policy_or_fallback(cnp(spec))
    assert err is not None and pol is not None
    assert dict(pol.subject_namespaces.match_labels) == ns_sel and not pol.subject_namespaces.match_expressions
    assert dict(pol.subject_pods.match_labels) == pod_sel
    assert note in pol.fallback_reason
    # not exact: even the parseable egress rules are replaced by Deny all
    assert pol.egress[0].name == CNP_STANDIN_RULE_NAME


@pytest.mark.parametrize("patch, tier, prio, note", [
    ({"tier": "Admn"}, CNPTier.ADMIN, -1, "tier unreadable: Admin, priority -1 (before every policy)"),
    ({"tier": None, "priority": "x"}, CNPTier.ADMIN, -1, "tier unreadable"),
    ({"tier": "Baseline", "priority": 1001}, CNPTier.BASELINE, 0, "priority unreadable: 0"),
    ({"priority": "7"}, CNPTier.ADMIN, 0, "priority unreadable: 0"),
])
def test_unreadable_tier_is_admin_and_priority_zero(patch, tier, prio, note):
    pol, err = parse_cluster_network_policy_or_fallback(cnp({**DENY_EGRESS, **patch}))
    assert err is not None and pol.tier is tier and pol.priority == prio and note in pol.fallback_reason
    assert pol.egress[0].name == CNP_STANDIN_RULE_NAME and pol.ingress == ()  # no ingress key: no rules


def test_no_readable_spec_denies_both_directions_for_every_pod_first():
    pol, _ = parse_cluster_network_policy_or_fallback(cnp("nonsense"))  # type: ignore[arg-type]
    assert pol.tier is CNPTier.ADMIN and pol.priority == -1
    assert pol.subject_namespaces == MATCH_ALL and pol.subject_pods == MATCH_ALL
    assert [r.name for r in pol.ingress + pol.egress] == [CNP_STANDIN_RULE_NAME] * 2


@pytest.mark.parametrize("meta", [{}, {"name": ""}, {"name": "Not_A_Name"}])
def test_unkeyable_is_reported_only(meta):
    d = {"kind": "ClusterNetworkPolicy", "metadata": meta, "spec": DENY_EGRESS}
    pol, err = parse_cluster_network_policy_or_fallback(d)
    assert pol is None and err is not None and err.field_path == "metadata.name"


def test_manifest_loader_adds_the_stand_in_only_when_asked():
    text = json.dumps(cnp(with_bad_egress(DENY_EGRESS)))
    objs, errs = load_yaml_keep_going(text, "f.yaml")
    assert objs == [] and len(errs) == 1
    objs, errs = load_yaml_keep_going(text, "f.yaml", fallbacks=True)
    assert len(errs) == 1 and objs[0].fallback_reason and objs[0].name == "guard"


# --- never wider than the intact policy -------------------------------------------------------

BASE = casedata.load_cluster()
PODS = casedata.pod_names(BASE)
IPS = {p: f"10.233.{100 + i}.{10 + i}" for i, p in enumerate(PODS)}
IPS6 = {p: f"fd00:233::{100 + i:x}:{10 + i:x}" for i, p in enumerate(PODS)}


def _snapshot(objs: list[dict]) -> ClusterSnapshot:
    out = []
    for d in objs:
        d = casedata.substitute(d, IPS, IPS6)
        if d["kind"] == "Pod":
            ref = f"{d['metadata']['namespace']}/{d['metadata']['name']}"
            d = {**d, "spec": {**d["spec"], "nodeName": "lab"},
                 "status": {"phase": "Running", "podIPs": [{"ip": IPS[ref]}, {"ip": IPS6[ref]}]}}
        out.append(d)
    parsed = []
    for d in out:
        obj, err = (parse_cluster_network_policy_or_fallback(d) if d["kind"] == "ClusterNetworkPolicy"
                    else (parse_object(d), None))
        if obj is not None:
            parsed.append(obj)
    return ClusterSnapshot.of(parsed)


def _corruptions(spec: dict):
    """(label, corrupted spec): one unreadable field at a time, in every part of the spec."""
    yield "priority", {**spec, "priority": "high"}
    yield "tier", {**spec, "tier": "Admins"}
    subj = copy.deepcopy(spec["subject"])
    key = next(iter(subj))
    subj[key] = {"matchLabels": {"bad": "x y"}} if key == "namespaces" else {**subj[key], "podSelector": 5}
    yield "subject", {**spec, "subject": subj}
    for direction in ("ingress", "egress"):
        for i, r in enumerate(spec.get(direction) or []):
            s = copy.deepcopy(spec)
            s[direction][i] = {**r, "action": "Allow"}
            yield f"{direction}[{i}].action", s
            s = copy.deepcopy(spec)
            s[direction][i] = {**r, "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]}
            yield f"{direction}[{i}].protocols", s


def _policy_objects(case) -> list[tuple[int, dict]]:
    state, out = BASE, []
    for i, step in enumerate(case.steps):
        state = casedata.advance(state, step)
        out += [(i, d) for d in step.get("apply", []) if d["kind"] == "ClusterNetworkPolicy"]
    return out


CNP_CASES = [c for c in casedata.load_cases() if any(_policy_objects(c) for _ in [0])]


@pytest.mark.parametrize("case", CNP_CASES, ids=[c.id for c in CNP_CASES])
def test_stand_ins_never_allow_what_the_policy_denies(case):
    state = BASE
    checked = 0
    for step in case.steps:
        state = casedata.advance(state, step)
        objs = list(state.objects.values())
        intact = _snapshot(objs)
        for idx, d in enumerate(objs):
            if d["kind"] != "ClusterNetworkPolicy":
                continue
            for label, bad in _corruptions(d["spec"]):
                broken = _snapshot(objs[:idx] + [{**d, "spec": bad}] + objs[idx + 1:])
                assert broken.cluster_policies[d["metadata"]["name"]].fallback_reason, label
                fam = case.family
                dsts = {**{p: (IPS6 if fam == 6 else IPS)[p] for p in PODS}, **casedata.node_targets(state, fam)}
                for port in casedata.PORTS:
                    for proto in casedata.PROTOCOLS:
                        for a in PODS:
                            for b, dst in dsts.items():
                                if a == b:
                                    continue
                                pa = tuple(a.split("/"))
                                src_b = reference_eval.resolve(broken, broken.pods[pa], fam)
                                if reference_eval.allowed(broken, src_b, dst, proto, port):
                                    src_i = reference_eval.resolve(intact, intact.pods[pa], fam)
                                    assert reference_eval.allowed(intact, src_i, dst, proto, port), \
                                        f"{label}: {a}->{b} {proto}/{port} widened"
                checked += 1
    assert checked


# --- compiled: rules, render and explain name the stand-in ------------------------------------

NS = [make_ns("x", ns="x"), make_ns("y", ns="y")]
XA = make_pod("a", ns="x", ips=("10.233.0.2",), labels={"pod": "a"}, node="lab")
XB = make_pod("b", ns="x", ips=("10.233.0.3",), labels={"pod": "b"}, node="lab")
YB = make_pod("b", ns="y", ips=("10.233.0.4",), labels={"pod": "b"}, node="lab")


def _standin(spec: dict):
    pol, err = parse_cluster_network_policy_or_fallback(cnp(spec))
    assert err is not None and pol is not None
    return pol


def test_admin_stand_in_denies_its_subject_and_names_itself():
    pol = _standin(with_bad_egress(DENY_EGRESS))
    snap = ClusterSnapshot.of([*NS, XA, XB, YB, pol])
    e = explain_flow(snap, NODE, "x/a", "y/b", "TCP", 80)
    assert not e.allowed
    assert explain_flow(snap, NODE, "x/a", "x/b", "TCP", 80).allowed is False  # Deny *all* for x/a egress
    assert explain_flow(snap, NODE, "x/b", "y/b", "TCP", 80).allowed  # not its subject
    text = e.render()
    assert "admin tier: guard priority 7 rule 0 (deny-all stand-in): Deny [stand-in for an unparseable policy" in text
    assert "decided by the admin tier (Deny)" in text
    assert "Enforced as an unparseable ClusterNetworkPolicy's deny-all stand-in" in e.summary()
    save = render_iptables_save(compile(snap, NODE), 4)
    line = next(ln for ln in save.splitlines() if "deny-all stand-in" in ln)
    assert line.startswith("-A pa-ao-guard ") and line.endswith("-j DROP")
    assert ("admin tier cnp guard priority 7 egress rule 0: Deny, rule name=deny-all stand-in, "
            "unparseable: spec.egress_0_.to_1_.networks_0_") in line


def test_baseline_stand_in_denies_only_what_no_networkpolicy_decides_and_never_accepts():
    spec = {**with_bad_egress(DENY_EGRESS), "tier": "Baseline"}
    spec["egress"][0]["action"] = "Accept"
    spec["egress"][0]["to"][1] = {"networks": "not-a-list"}  # an Accept, but unreadable
    spec["ingress"] = [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}]}]
    pol = _standin(spec)
    # the egress Accept is dropped (readable action), ingress is kept as written (exact header)
    assert pol.egress == () and pol.ingress[0].action is CNPAction.DENY and pol.ingress[0].name == ""
    pol = _standin({**spec, "egress": [{"action": "Pass", "to": "everything"}]})
    assert pol.egress[0].name == CNP_STANDIN_RULE_NAME
    allow_egress = make_policy("open", ns="x", pod_selector=sel({"pod": "a"}), egress=[rule()],
                               types=("Egress",))
    snap = ClusterSnapshot.of([*NS, XA, XB, YB, pol])
    assert not explain_flow(snap, NODE, "x/a", "x/b", "TCP", 80).allowed  # baseline Deny all
    snap = ClusterSnapshot.of([*NS, XA, XB, YB, pol, allow_egress])
    e = explain_flow(snap, NODE, "x/a", "x/b", "TCP", 80)
    assert e.allowed and "baseline tier" not in "\n".join(e.tier_decisions())  # NetworkPolicy decided
    assert "ACCEPT" not in [s.action for s in e.trace if s.chain.startswith("pa-bo-")]


def test_render_lists_the_stand_in_with_what_it_enforces(tmp_path, capsys):
    from policy_agent.cli import main

    f = tmp_path / "p.yaml"
    f.write_text(json.dumps(cnp(with_bad_egress(DENY_EGRESS))))
    assert main(["render", "--node", "lab", "--keep-going", str(f)]) == 1
    assert "guard" not in capsys.readouterr().out
    assert main(["render", "--node", "lab", "--keep-going", "--fallbacks", str(f)]) == 1
    out = capsys.readouterr().out
    assert ("# admin tier priority 7 guard: subject namespaces ns=x pods pod=a, 0 ingress rules, 1 egress rules; "
            "STAND-IN for an unparseable policy (Admin tier priority 7: Deny all egress") in out


# --- domainNames ------------------------------------------------------------------------------


def test_domain_accept_is_a_named_no_op_and_deny_fails_closed_on_its_ports():
    dom = {"domainNames": ["*.example.com"]}
    spec = {"tier": "Admin", "priority": 4, "subject": SUBJ_XA,
            "egress": [{"name": "allow docs", "action": "Accept", "to": [dom]},
                       {"name": "no web", "action": "Deny", "to": [dom],
                        "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}]}
    pol = parse_object(cnp(spec))
    snap = ClusterSnapshot.of([*NS, XA, XB, YB, pol])
    e = explain_flow(snap, NODE, "x/a", "y/b", "TCP", 80)
    assert e.allowed
    tiers = "\n".join(e.tier_decisions())
    assert ("admin tier: guard priority 4 rule 0: domainNames *.example.com not enforced "
            "(no DNS view in this dataplane: matches nothing)") in tiers
    assert "Not enforced: " in e.summary()
    e443 = explain_flow(snap, NODE, "x/a", "y/b", "TCP", 443)
    assert not e443.allowed and "domainNames not resolvable, fail closed" in e443.decided_by.comment
    assert "admin tier: guard priority 4 rule 1 (no web): Deny" in "\n".join(e443.tier_decisions())
    assert explain_flow(snap, NODE, "x/b", "y/b", "TCP", 443).allowed  # not the subject


# --- kube informer ----------------------------------------------------------------------------


@pytest.fixture
def informer():
    events: list = []
    transport = _ListTransport()
    inf = Informer(RESOURCES["ClusterNetworkPolicy"], transport, events.append, source="kube",
                   options=WatchOptions(), on_listed=lambda _i: None)
    inf.events_seen = events  # type: ignore[attr-defined]
    inf.transport = transport  # type: ignore[attr-defined]
    return inf


def test_informer_turned_bad_keeps_last_good_and_never_parsed_is_the_stand_in(informer):
    ev = informer.events_seen
    _watch(informer, "ADDED", cnp(DENY_EGRESS, rv="5", uid="u1"))
    good = _view(ev)["guard"]
    assert not good.fallback_reason
    _watch(informer, "MODIFIED", cnp(with_bad_egress(DENY_EGRESS), rv="6", uid="u1"))
    assert _view(ev)["guard"] is good
    err = _errors(ev)[-1]
    assert err.kind == "ClusterNetworkPolicy" and err.key == "guard"
    assert "spec.egress[0].to[1].networks[0]" in err.message and "last good version" in err.message
    assert informer.degraded_counts() == {"last_good": 1, "fallback": 0}
    # Deleted and re-created (another uid) while bad: no last good version of *this* object.
    informer.transport.items = [cnp(with_bad_egress(DENY_EGRESS), rv="8", uid="u2")]
    informer._list()
    standin = _view(ev)["guard"]
    assert standin.fallback_reason and standin.egress[0].name == CNP_STANDIN_RULE_NAME
    assert "enforcing a fallback: Admin tier priority 7: Deny all egress" in _errors(ev)[-1].message
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 1}
    # A stand-in is never taken for a last good version: still bad in another way, a new stand-in.
    _watch(informer, "MODIFIED", cnp({**with_bad_egress(DENY_EGRESS), "priority": 9}, rv="9", uid="u2"))
    assert _view(ev)["guard"].priority == 9
    _watch(informer, "MODIFIED", cnp(DENY_EGRESS, rv="10", uid="u2"))
    assert not _view(ev)["guard"].fallback_reason
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 0}


def test_kube_source_counts_degraded_cluster_policies_with_network_policies():
    src = KubeSource(lambda e: None, api_client=object(), kinds=("NetworkPolicy", "ClusterNetworkPolicy"))
    src.informers["ClusterNetworkPolicy"].degraded = {"a": "fallback", "b": "last_good"}
    src.informers["NetworkPolicy"].degraded = {("x", "p"): "fallback"}
    assert src.degraded_policies() == {"last_good": 1, "fallback": 2}


def test_events_name_the_cluster_policy():
    from policy_agent.obs.kube_events import EventRecorder, field_of, reason_of
    from policy_agent.sources.events import SourceError

    msg = ("ClusterNetworkPolicy guard: spec.egress[0].to[1].networks[0]: bad (enforcing a fallback: "
           "Admin tier priority 7: Deny all egress for namespaces ns=x pods pod=a, accepts nothing)")
    assert field_of(msg) == "spec.egress[0].to[1].networks[0]" and reason_of(msg) == "PolicyFallback"
    rec = EventRecorder(None, "n1")  # not started: queued only
    rec.observe(SourceError("kube", msg, kind="ClusterNetworkPolicy", key="guard"))
    assert rec._q.get_nowait() == ("", "guard", "PolicyFallback", msg, "spec.egress[0].to[1].networks[0]",
                                   "ClusterNetworkPolicy")


def test_explain_cli_with_fallbacks_walks_the_stand_in(tmp_path, capsys):
    from policy_agent.cli import main

    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {"ns": n}}} for n in "xy"]
    for ns, ip in (("x", "10.233.0.2"), ("y", "10.233.0.4")):
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"namespace": ns, "name": "a" if ns == "x" else "b",
                                  "labels": {"pod": "a" if ns == "x" else "b"}},
                     "spec": {"nodeName": "lab", "containers": [{"name": "c", "image": "i"}]},
                     "status": {"podIPs": [{"ip": ip}]}})
    objs.append(cnp(with_bad_egress(DENY_EGRESS)))
    f = tmp_path / "all.yaml"
    f.write_text("\n---\n".join(json.dumps(o) for o in objs))
    argv = ["explain", "--node", "lab", "--from", "x/a", "--to", "y/b", "--port", "80", str(f)]
    assert main(argv[:1] + ["--keep-going"] + argv[1:]) == 0  # without stand-ins: dropped, allowed
    capsys.readouterr()
    assert main(argv[:1] + ["--keep-going", "--fallbacks"] + argv[1:]) == 1
    out = capsys.readouterr().out
    assert "admin tier: guard priority 7 rule 0 (deny-all stand-in): Deny" in out
    assert "Enforced as an unparseable ClusterNetworkPolicy's deny-all stand-in" in out
