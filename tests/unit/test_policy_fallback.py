"""An unparseable NetworkPolicy never opens the pods it isolated (docs/decisions/policy-fallback.md).

Model level: parse_network_policy_or_fallback (cases a-d). Compiled: the fallback
isolates exactly what it selects and allows nothing, and explain says why.
Kube informer: the last good version first, the fallback for a policy that never
parsed, across watch events and relists (the informer driven directly, with a
fake HTTP response instead of a server; tests/apiserver has the real one).
"""

from __future__ import annotations

import copy
import ipaddress
import json

import pytest

from policy_agent.compiler.options import NodeConfig
from policy_agent.explain import explain_flow
from policy_agent.model.parse import (
    UNREADABLE_LABEL_VALUE,
    fallback_namespace,
    load_yaml_keep_going,
    parse_namespace,
    parse_network_policy_or_fallback,
)
from policy_agent.model.types import MATCH_ALL, ClusterSnapshot, Labels, ModelError, NetworkPolicy, Pod, PolicyType
from policy_agent.sources.events import Delete, Replace, SourceError, Upsert
from policy_agent.sources.kube import RESOURCES, Informer, WatchOptions

ING, EG = PolicyType.INGRESS, PolicyType.EGRESS


def policy(spec: dict, name: str = "p", ns: str = "x", rv: str = "1") -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name, "resourceVersion": rv},
        "spec": spec,
    }


WEB = {"matchLabels": {"app": "web"}}
GOOD_SPEC = {
    "podSelector": WEB,
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}],
}
LEADING_ZEROS = {"podSelector": WEB, "ingress": [{"from": [{"ipBlock": {"cidr": "010.0.0.0/8"}}]}]}


# --- model: parse_network_policy_or_fallback ------------------------------------------


def test_a_parses_fine_is_the_policy_itself():
    pol, err = parse_network_policy_or_fallback(policy(GOOD_SPEC))
    assert err is None and pol is not None
    assert pol.fallback_reason == "" and len(pol.ingress) == 1


@pytest.mark.parametrize(
    "spec, field, types",
    [
        # b: selector and directions readable, something else is not.
        (LEADING_ZEROS, "spec.ingress[0].from[0].ipBlock.cidr", (ING,)),
        (
            {"podSelector": WEB, "ingress": [{"ports": [{"port": "no_such"}]}]},
            "spec.ingress[0].ports[0].port",
            (ING,),
        ),
        (  # egress present: the API defaulting adds Egress
            {"podSelector": WEB, "egress": [{"to": [{"ipBlock": {"cidr": "010.0.0.0/8"}}]}]},
            "spec.egress[0].to[0].ipBlock.cidr",
            (ING, EG),
        ),
        (  # egress key present but empty: Egress still (the key alone may name it)
            {"podSelector": WEB, "egress": [], "ingress": [{"ports": [{"port": 0}]}]},
            "spec.ingress[0].ports[0].port",
            (ING, EG),
        ),
        (  # a readable policyTypes is taken as written: egress only
            {"podSelector": WEB, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 99999}]}]},
            "spec.egress[0].ports[0].port",
            (EG,),
        ),
        (  # a bad operator in a peer's selector (not the podSelector)
            {
                "podSelector": WEB,
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}]}],
            },
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
            (ING,),
        ),
        (  # a policyTypes typo: it may name either direction
            {"podSelector": WEB, "policyTypes": ["Ingress", "Egres"]},
            "spec.policyTypes[1]",
            (ING, EG),
        ),
    ],
)
def test_b_same_selector_and_directions_no_allow_rules(spec, field, types):
    pol, err = parse_network_policy_or_fallback(policy(spec))
    assert err is not None and err.field_path == field
    assert f"NetworkPolicy x/p: {field}" in str(err)
    assert isinstance(pol, NetworkPolicy)
    assert pol.key == ("x", "p") and pol.resource_version == "1"
    assert pol.pod_selector.match_labels == {"app": "web"}
    assert pol.policy_types == types
    assert pol.ingress == () and pol.egress == ()
    assert pol.fallback_reason.startswith(f"{field}: ")


def test_b_leading_zeros_reason_names_the_value():
    pol, err = parse_network_policy_or_fallback(policy(LEADING_ZEROS))
    assert "010.0.0.0/8" in pol.fallback_reason and "010.0.0.0/8" in str(err)


@pytest.mark.parametrize(
    "spec, field, types",
    [
        (  # bad selector operator in the podSelector itself
            {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["web"]}]},
             "ingress": [{}]},
            "spec.podSelector.matchExpressions[0].operator",
            (ING,),
        ),
        (  # unreadable podSelector and egress rules present
            {"podSelector": {"matchLabels": {"app": 7}}, "egress": [{}]},
            "spec.podSelector.matchLabels[app]",
            (ING, EG),
        ),
        (  # unreadable podSelector and an unreadable policyTypes
            {"podSelector": "web", "policyTypes": "Ingress"},
            "spec.podSelector",
            (ING, EG),
        ),
    ],
)
def test_c_unreadable_selector_isolates_whole_namespace(spec, field, types):
    pol, err = parse_network_policy_or_fallback(policy(spec))
    assert err is not None and err.field_path == field
    assert pol.pod_selector == MATCH_ALL
    assert pol.policy_types == types
    assert pol.ingress == () and pol.egress == ()
    assert field in pol.fallback_reason and "whole namespace" in pol.fallback_reason


def test_c_spec_not_a_mapping_isolates_both_directions():
    pol, err = parse_network_policy_or_fallback(policy("deny-all"))  # type: ignore[arg-type]
    assert err.field_path == "spec"
    assert pol.pod_selector == MATCH_ALL and pol.policy_types == (ING, EG)


def test_c_later_error_but_selector_also_unreadable_names_both():
    spec = {"podSelector": {"matchLabels": {"app": "web"}, "bogus": 1}}
    pol, err = parse_network_policy_or_fallback(policy(spec))
    assert err.field_path == "spec.podSelector.bogus"
    assert pol.pod_selector == MATCH_ALL


@pytest.mark.parametrize(
    "meta, field",
    [
        ({"namespace": "x"}, "metadata.name"),
        ({"namespace": "Not_A_Label", "name": "p"}, "metadata.namespace"),
        ({"namespace": "x", "name": "Bad_Name"}, "metadata.name"),
    ],
)
def test_d_unkeyable_object_is_reported_only(meta, field):
    d = {"kind": "NetworkPolicy", "metadata": meta, "spec": LEADING_ZEROS}
    pol, err = parse_network_policy_or_fallback(d)
    assert pol is None and err is not None and err.field_path == field


def test_manifest_loader_adds_fallbacks_only_when_asked():
    text = "\n---\n".join(json.dumps(d) for d in (policy(GOOD_SPEC, "good"), policy(LEADING_ZEROS, "bad")))
    objs, errs = load_yaml_keep_going(text, "f.yaml")
    assert [o.name for o in objs] == ["good"] and len(errs) == 1
    objs, errs = load_yaml_keep_going(text, "f.yaml", fallbacks=True)
    assert [(o.name, bool(o.fallback_reason)) for o in objs] == [("good", False), ("bad", True)]
    assert len(errs) == 1 and errs[0].field_path == "spec.ingress[0].from[0].ipBlock.cidr"
    # A wrong apiVersion is not a v1 NetworkPolicy: reported, no stand-in.
    old = {**policy(LEADING_ZEROS, "old"), "apiVersion": "extensions/v1beta1"}
    objs, errs = load_yaml_keep_going(json.dumps(old), "g.yaml", fallbacks=True)
    assert objs == [] and errs[0].field_path == "apiVersion"


# --- compiled: isolation without allows, and explain says why ---------------------------

NODE = NodeConfig("n1")


def _pod(name: str, app: str, ip: str) -> Pod:
    return Pod("x", name, Labels({"app": app}), "n1", (ipaddress.ip_address(ip),), phase="Running")


PODS = [_pod("a", "a", "10.233.70.2"), _pod("web", "web", "10.233.70.3"), _pod("other", "other", "10.233.70.4")]


def _verdict(policies, src: str, dst: str):
    snap = ClusterSnapshot.of([*PODS, *policies])
    return explain_flow(snap, NODE, f"x/{src}", f"x/{dst}", "TCP", 80)


def test_fallback_isolates_exactly_what_it_selects_and_explain_says_why():
    assert _verdict([], "a", "web").allowed  # no policy: open
    fb, _ = parse_network_policy_or_fallback(policy(LEADING_ZEROS))
    e = _verdict([fb], "a", "web")
    assert not e.allowed
    assert "fallback: spec.ingress[0].from[0].ipBlock.cidr" in e.summary()
    assert any("fallback:" in s.rule_text for s in e.trace)  # the rule comment in the dump
    assert _verdict([fb], "a", "other").allowed  # not selected: not isolated
    # The parsed version would have allowed a -> web: the fallback allows nothing.
    good, _ = parse_network_policy_or_fallback(policy(GOOD_SPEC))
    assert _verdict([good], "a", "web").allowed and not _verdict([good], "other", "web").allowed


def test_whole_namespace_fallback_isolates_every_pod():
    fb, _ = parse_network_policy_or_fallback(policy({"podSelector": {"matchLabels": {"app": 7}}}))
    for src, dst in (("a", "web"), ("web", "other"), ("other", "a")):
        assert not _verdict([fb], src, dst).allowed, (src, dst)


def test_egress_fallback_isolates_egress():
    spec = {"podSelector": {"matchLabels": {"app": "a"}}, "egress": [{"to": [{"ipBlock": {"cidr": "010.0.0.0/8"}}]}]}
    fb, _ = parse_network_policy_or_fallback(policy(spec))
    assert fb.policy_types == (ING, EG)
    assert not _verdict([fb], "a", "other").allowed  # a's egress isolated
    assert not _verdict([fb], "web", "a").allowed  # and its ingress (Ingress always)
    assert _verdict([fb], "web", "other").allowed


# --- kube informer: last good first, then the fallback ------------------------------------


class _Resp:
    status = 200

    def __init__(self, body: dict) -> None:
        self._body = json.dumps(body).encode()

    def read(self, *a, **k) -> bytes:
        return self._body

    def stream(self, *a, **k):  # the informer decodes list bodies as they stream
        return iter((self._body,))

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class _ListTransport:
    """Answers every GET with one page holding ``items`` (the list path only)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.rv = 100

    def get(self, path, query, timeout):
        self.rv += 1
        return _Resp({"metadata": {"resourceVersion": str(self.rv)}, "items": copy.deepcopy(self.items)})


@pytest.fixture
def informer():
    events: list = []
    transport = _ListTransport()
    inf = Informer(RESOURCES["NetworkPolicy"], transport, events.append, source="kube",
                   options=WatchOptions(), on_listed=lambda _i: None)
    inf.events_seen = events  # type: ignore[attr-defined]
    inf.transport = transport  # type: ignore[attr-defined]
    return inf


def _watch(inf: Informer, etype: str, d: dict) -> None:
    inf._handle(json.dumps({"type": etype, "object": d}).encode())


def _view(events: list) -> dict:
    view: dict = {}
    for e in events:
        if isinstance(e, Replace):
            view = dict(e.objects)
        elif isinstance(e, Upsert):
            view[e.key] = e.obj
        elif isinstance(e, Delete):
            view.pop(e.key, None)
    return view


def _errors(events: list) -> list[SourceError]:
    return [e for e in events if isinstance(e, SourceError)]


def test_informer_update_to_bad_keeps_last_good_version(informer):
    ev = informer.events_seen
    _watch(informer, "ADDED", policy(GOOD_SPEC, rv="5"))
    good = _view(ev)[("x", "p")]
    assert good.fallback_reason == "" and good.ingress
    n = len(ev)
    _watch(informer, "MODIFIED", policy(LEADING_ZEROS, rv="6"))
    # Nothing re-emitted: the last good version stays enforced; the error is reported.
    assert not [e for e in ev[n:] if isinstance(e, (Upsert, Delete))]
    assert _view(ev)[("x", "p")] is good
    err = _errors(ev)[-1]
    assert err.kind == "NetworkPolicy" and err.key == ("x", "p")
    assert "spec.ingress[0].from[0].ipBlock.cidr" in err.message and "last good version" in err.message
    assert informer.degraded_counts() == {"last_good": 1, "fallback": 0}
    assert informer.resource_version == "6"  # the watch still advances
    # Relist while still bad: the last good version survives it.
    informer.transport.items = [policy(LEADING_ZEROS, rv="6")]
    informer._list()
    assert _view(ev)[("x", "p")] == good and informer.cache()[("x", "p")] == good
    assert informer.degraded_counts() == {"last_good": 1, "fallback": 0}
    # Fixed: the new version flows and the degraded mark goes.
    fixed = {**GOOD_SPEC, "ingress": [{"ports": [{"port": 443}]}]}
    _watch(informer, "MODIFIED", policy(fixed, rv="7"))
    assert _view(ev)[("x", "p")].ingress[0].ports[0].port == 443
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 0}


def test_informer_new_bad_policy_gets_fallback_then_delete_forgets(informer):
    ev = informer.events_seen
    _watch(informer, "ADDED", policy(LEADING_ZEROS, rv="5"))
    fb = _view(ev)[("x", "p")]
    assert fb.fallback_reason.startswith("spec.ingress[0].from[0].ipBlock.cidr")
    assert fb.ingress == () and fb.pod_selector.match_labels == {"app": "web"}
    assert "enforcing a fallback" in _errors(ev)[-1].message
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 1}
    # Still bad in another way: the fallback follows the current object's selector.
    other = {**LEADING_ZEROS, "podSelector": {"matchLabels": {"app": "db"}}}
    _watch(informer, "MODIFIED", policy(other, rv="6"))
    assert _view(ev)[("x", "p")].pod_selector.match_labels == {"app": "db"}
    # A fallback is never mistaken for a last good version on the next relist.
    informer.transport.items = [policy(other, rv="6")]
    informer._list()
    assert _view(ev)[("x", "p")].fallback_reason
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 1}
    # Deleted: dropped, and its state forgotten; re-created bad, it is a fallback again.
    _watch(informer, "DELETED", policy(other, rv="7"))
    assert ("x", "p") not in _view(ev) and informer.degraded_counts()["fallback"] == 0
    _watch(informer, "ADDED", policy(GOOD_SPEC, rv="8"))
    _watch(informer, "DELETED", policy(GOOD_SPEC, rv="9"))
    _watch(informer, "ADDED", policy(LEADING_ZEROS, rv="10"))
    assert _view(ev)[("x", "p")].fallback_reason  # the deleted good one is not its last good


def test_informer_relist_drops_gone_and_keeps_last_good_of_present(informer):
    ev = informer.events_seen
    informer.transport.items = [policy(GOOD_SPEC, "keep", rv="1"), policy(GOOD_SPEC, "gone", rv="2")]
    informer._list()
    good_keep = _view(ev)[("x", "keep")]
    informer.transport.items = [policy(LEADING_ZEROS, "keep", rv="3"), policy(LEADING_ZEROS, "new", rv="4")]
    informer._list()
    view = _view(ev)
    assert view[("x", "keep")] == good_keep  # last good, not the fallback
    assert view[("x", "new")].fallback_reason  # never parsed: fallback
    assert ("x", "gone") not in view
    assert informer.degraded_counts() == {"last_good": 1, "fallback": 1}


def _with_uid(d: dict, uid: str) -> dict:
    d["metadata"]["uid"] = uid
    return d


def test_informer_never_keeps_an_earlier_incarnation_as_last_good(informer):
    """Review finding: deleted and recreated under the same name with an unparseable spec
    while the watch was down, the relist must not keep the deleted object's version."""
    ev = informer.events_seen
    informer.transport.items = [_with_uid(policy(GOOD_SPEC, "p", rv="1"), "uid-old")]
    informer._list()
    assert not _view(ev)[("x", "p")].fallback_reason
    informer.transport.items = [_with_uid(policy(LEADING_ZEROS, "p", rv="5"), "uid-new")]
    informer._list()
    assert _view(ev)[("x", "p")].fallback_reason  # the new object's fallback, not the old allow
    assert informer.degraded_counts() == {"last_good": 0, "fallback": 1}
    # The same object turning bad still keeps its last good version.
    informer.transport.items = [_with_uid(policy(GOOD_SPEC, "q", rv="6"), "uid-q")]
    informer._list()
    good = _view(ev)[("x", "q")]
    informer.transport.items = [_with_uid(policy(LEADING_ZEROS, "q", rv="7"), "uid-q")]
    informer._list()
    assert _view(ev)[("x", "q")] == good


# --- Namespace: never dropped into "name label only" --------------------------------------


def _ns_dict(labels, name: str = "y") -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def test_fallback_namespace_keeps_what_selectors_can_see():
    d = _ns_dict({"team": "blocked", "tier": 7, "Bad Key!": "x"})
    with pytest.raises(ModelError, match=r"metadata.labels\[tier\]"):
        parse_namespace(d)
    ns = fallback_namespace(d)
    assert dict(ns.labels) == {"team": "blocked", "tier": UNREADABLE_LABEL_VALUE, "kubernetes.io/metadata.name": "y"}
    assert fallback_namespace(_ns_dict("team=a")) is None  # labels unreadable as a whole
    assert fallback_namespace(_ns_dict({}, name="Bad_Name")) is None  # cannot be keyed


NOT_BLOCKED = {
    "podSelector": {},
    "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "team", "operator": "NotIn", "values": ["blocked"]}]}}]}],
}


def test_unparseable_namespace_stand_in_does_not_widen_notin():
    """Without its Namespace a pod is matched by the name label only, so a NotIn that
    its real labels fail would let it in; the stand-in keeps the labels it has."""
    web = _pod("web", "web", "10.233.70.3")
    t = Pod("y", "t", Labels({"app": "t"}), "n1", (ipaddress.ip_address("10.233.70.9"),), phase="Running")
    pol, _ = parse_network_policy_or_fallback(policy(NOT_BLOCKED, "not-blocked"))
    bad_ns = _ns_dict({"team": "blocked", "tier": 7})

    def allowed(*ns_objs) -> bool:
        snap = ClusterSnapshot.of([web, t, pol, *ns_objs])
        return explain_flow(snap, NODE, "y/t", "x/web", "TCP", 80).allowed

    assert allowed()  # the hazard the stand-in avoids: unknown namespace = name label only
    assert not allowed(fallback_namespace(bad_ns))
    assert not allowed(parse_namespace(_ns_dict({"team": "blocked"})))  # as the good object


def test_informer_bad_namespace_never_parsed_gets_stand_in():
    events: list = []
    inf = Informer(RESOURCES["Namespace"], _ListTransport(), events.append, source="kube",
                   options=WatchOptions(), on_listed=lambda _i: None)
    _watch(inf, "ADDED", _ns_dict({"team": "blocked", "tier": 7}))
    ns = _view(events)["y"]
    assert ns.labels["team"] == "blocked" and ns.labels["tier"] == UNREADABLE_LABEL_VALUE
    assert "metadata.labels[tier]" in _errors(events)[-1].message
    # Still bad, other labels: the stand-in follows (it is not a last good version).
    _watch(inf, "MODIFIED", _ns_dict({"team": "open", "tier": 7}))
    assert _view(events)["y"].labels["team"] == "open"
    # Good, then bad: the last good version stays.
    _watch(inf, "MODIFIED", _ns_dict({"team": "a"}))
    _watch(inf, "MODIFIED", _ns_dict({"team": "b", "tier": 7}))
    assert _view(events)["y"].labels["team"] == "a"
