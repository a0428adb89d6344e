"""live_explain without a kernel: rule text -> rules, drift reports, query parsing; the Event
recorder's rate limit and bounded queue. The kernel side is tests/kernel/test_live_explain_kernel.py
and, with the real agent and traffic, tests/conformance/test_live_explain.py."""

from __future__ import annotations

import pytest

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane.ipsets import KSet
from policy_agent.desired import FILTER, Action, Chain, DesiredState, Hook, IPSet, Match, Rule
from policy_agent.explain import ExplainError
from policy_agent.live_explain import (
    FlowQuery,
    KernelView,
    UnmodelledRule,
    canonical,
    drift_on_path,
    rule_from_spec,
)
from policy_agent.obs.kube_events import EventRecorder, field_of, reason_of

# Lines as iptables-save prints what the compiler writes (both backends print these).
KERNEL_LINES = [
    ('-p tcp -m comment --comment "pa:AAAAAAAAAAAAAAAA" -m comment --comment "x/allow ingress rule 0 peer 0 port 0" '
     '-m set --match-set pa4s-abc src -m tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000',
     Rule(Match(protocol="tcp", src_set="pa4s-abc", dst_ports=((80, 80),)), Action("MARK", mark=(0x10000, 0x10000)),
          "x/allow ingress rule 0 peer 0 port 0")),
    ('-i eni+ -m comment --comment "pa:BBBBBBBBBBBBBBBB" -m comment --comment "anti-spoofing" '
     '-m set ! --match-set pa4a-x src,src -j DROP',
     Rule(Match(in_iface="eni+", src_iface_set="pa4a-x", src_iface_set_negate=True), Action("DROP"), "anti-spoofing")),
    ('-s 10.0.0.0/8 ! -d 10.1.0.0/16 -p udp -m comment --comment "pa:CCCCCCCCCCCCCCCC" '
     '-m multiport --dports 53,20000:20999 -j MARK --set-xmark 0x10000/0x10000',
     Rule(Match(protocol="udp", src_net="10.0.0.0/8", dst_net="10.1.0.0/16", dst_net_negate=True,
                dst_ports=((53, 53), (20000, 20999))), Action("MARK", mark=(0x10000, 0x10000)))),
    ('-o eni1234567890a -m comment --comment "pa:DDDDDDDDDDDDDDDD" -m comment --comment x/a -g pa-tw-eni1234567890a',
     Rule(Match(out_iface="eni1234567890a"), Action("GOTO", "pa-tw-eni1234567890a"), "x/a")),
    ('-m comment --comment "pa:EEEEEEEEEEEEEEEE" -m mark --mark 0x10000/0x10000 -j ACCEPT',
     Rule(Match(mark=(0x10000, 0x10000)), Action("ACCEPT"))),
    ('-m comment --comment "pa:FFFFFFFFFFFFFFFF" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
     Rule(Match(ctstate=("RELATED", "ESTABLISHED")), Action("ACCEPT"))),
    ('-p ipv6-icmp -m comment --comment "pa:GGGGGGGGGGGGGGGG" -m icmp6 --icmpv6-type 135 -j ACCEPT',
     Rule(Match(protocol="ipv6-icmp", icmp_type=135), Action("ACCEPT"))),
    ('-m comment --comment "pa:HHHHHHHHHHHHHHHH" -m addrtype --src-type LOCAL -j pa-x',
     Rule(Match(src_addrtype_local=True), Action("JUMP", "pa-x"))),
    ('-p tcp -m comment --comment "pa:IIIIIIIIIIIIIIII" -m set --match-set pa4p-y dst,dst '
     '-j REJECT --reject-with icmp-port-unreachable',
     Rule(Match(protocol="tcp", dst_ipport_set="pa4p-y"), Action("REJECT"))),
]


@pytest.mark.parametrize("spec,rule", KERNEL_LINES)
def test_kernel_lines_parse_to_the_rule(spec, rule):
    h, got = rule_from_spec(spec)
    assert h is not None and len(h) == 16
    assert canonical(got) == canonical(rule)


@pytest.mark.parametrize("spec", [
    "-m comment --comment x -j LOG --log-prefix drop",
    "-m comment --comment x -m limit --limit 5/s -j ACCEPT",
    "! -p tcp -j DROP",
    "-m comment --comment x",
])
def test_anything_else_is_unmodelled_not_guessed(spec):
    with pytest.raises(UnmodelledRule):
        rule_from_spec(spec)


def _view(chains: dict[str, list[str]], sets: dict[str, KSet] | None = None) -> KernelView:
    t = ipt.KTable(FILTER)
    for name, specs in chains.items():
        t.chains[name] = ipt.KChain(name, "ACCEPT" if name.isupper() else "-",
                                    [ipt.KRule(name, s) for s in specs])
    return KernelView("nft", {4: t}, sets or {}, {})


def _desired() -> tuple[DesiredState, Chain]:
    c = Chain("pa-pi-x.p", (
        Rule(Match(protocol="tcp", src_set="pa4s-a", dst_ports=((80, 80),)), Action("MARK", mark=(0x10000, 0x10000)),
             "x/p ingress rule 0"),
        Rule(Match(protocol="udp", dst_ports=((53, 53),)), Action("MARK", mark=(0x10000, 0x10000)), "x/p rule 1"),
    ))
    s = IPSet("pa4s-a", 4, "hash:net", frozenset({"10.233.0.1/32", "10.233.0.2/32"}), "selector x/app=a")
    d = DesiredState(chains={(4, FILTER): {c.name: c}}, hooks=(Hook(FILTER, "FORWARD", "pa-FORWARD"),),
                     ipsets={s.name: s})
    return d, c


def test_in_sync_chain_and_set():
    d, c = _desired()
    view = _view({c.name: [ln.split(" ", 2)[2] for ln in c.render_lines()]},
                 {"pa4s-a": KSet("pa4s-a", "hash:net", 4, members={"10.233.0.1", "10.233.0.2"})})
    rep = drift_on_path(d, view, 4, [c.name])
    assert rep["in_sync"], rep


def test_deleted_altered_foreign_rules_and_set_members_are_each_reported():
    d, c = _desired()
    lines = [ln.split(" ", 2)[2] for ln in c.render_lines()]
    altered = lines[0].replace("-j MARK --set-xmark 0x10000/0x10000", "-j DROP")  # same hash, other meaning
    view = _view({c.name: [altered, "-p tcp -j ACCEPT"]},  # rule 2 deleted, a foreign rule added
                 {"pa4s-a": KSet("pa4s-a", "hash:net", 4, members={"10.233.0.1", "10.233.0.9"})})
    rep = drift_on_path(d, view, 4, [c.name])
    assert not rep["in_sync"]
    [chain] = rep["chains"]
    text = "\n".join(chain["details"])
    assert chain["state"] == "differs"
    assert "rule 1 altered" in text and "rule 2 missing in the kernel" in text
    assert "kernel rule 2 is not in the desired state: -A pa-pi-x.p -p tcp -j ACCEPT" in text
    [s] = rep["sets"]
    assert s["state"] == "differs" and s["origin"] == "selector x/app=a"
    assert "1 member(s) missing in the kernel: 10.233.0.2" in s["details"]
    assert "1 member(s) in the kernel not desired: 10.233.0.9" in s["details"]


def test_missing_chain_set_and_hook_out_of_place():
    d, c = _desired()
    view = _view({"FORWARD": ["-j ACCEPT", '-m comment --comment "pa:XXXXXXXXXXXXXXXX" -j pa-FORWARD']})
    rep = drift_on_path(d, view, 4, [c.name], builtins=["FORWARD"])
    states = {r.get("chain") or r.get("set"): r["state"] for r in rep["chains"] + rep["sets"]}
    assert states == {"FORWARD": "differs", c.name: "missing", "pa4s-a": "missing"}
    assert "1 rule(s) of others run before our hook in FORWARD" in rep["chains"][0]["details"][0]


def test_query_parameters():
    [q] = FlowQuery.from_params({"from": ["x/a"], "to": ["10.0.0.1"], "port": ["80"], "protocol": ["udp"]})
    assert (q.src, q.dst, q.port, q.protocol) == ("x/a", "10.0.0.1", 80, "UDP")
    qs = FlowQuery.from_params({"flow": ["x/a,y/b,80,TCP", "x/a,y/b,,UDP"]})
    assert [(q.port, q.protocol) for q in qs] == [(80, "TCP"), (None, "UDP")]
    for bad, why in (({"from": ["x/a"]}, "give from="), ({"from": ["a"], "to": ["b"], "port": ["x"]}, "number"),
                     ({"flow": ["a,b,80"]}, "SRC,DST,PORT,PROTOCOL"), ({"from": ["a"], "to": ["b"], "port": ["0"]},
                                                                       "1-65535"),
                     ({"from": ["a", "b"], "to": ["c"]}, "given 2 times")):
        with pytest.raises(ExplainError, match=why):
            FlowQuery.from_params(bad)


# --- Events: rate limit and bounded queue (no API server needed for these) ---------------

MSG = ("NetworkPolicy x/db: spec.ingress[0].from[1].ipBlock.except[0]: '::ffff:10.1.0.0/112' is not the same "
       "IP family as cidr 10.0.0.0/8 (enforcing a fallback: isolates app=db for Ingress, allows nothing)")


def test_event_field_and_reason_from_the_source_error():
    assert field_of(MSG) == "spec.ingress[0].from[1].ipBlock.except[0]"
    assert reason_of(MSG) == "PolicyFallback"
    assert reason_of("NetworkPolicy x/db: spec.x: bad (keeping its last good version (resourceVersion 7))") == \
        "PolicyLastGood"


def test_one_event_per_policy_reason_field_per_interval():
    now = [1000.0]
    rec = EventRecorder(None, "n1", interval=600, clock=lambda: now[0])  # not started: nothing is posted
    assert rec.report("x", "db", "PolicyFallback", MSG, "f")
    for _ in range(5):  # relists re-report it
        assert not rec.report("x", "db", "PolicyFallback", MSG, "f")
    assert rec.suppressed == 5
    assert rec.report("x", "db", "PolicyFallback", MSG, "g")  # another field is another Event
    assert rec.report("x", "other", "PolicyFallback", MSG, "f")
    now[0] += 601
    assert rec.report("x", "db", "PolicyFallback", MSG, "f")  # after the interval: again (a patch)


def test_full_queue_drops_instead_of_blocking():
    rec = EventRecorder(None, "n1", max_queue=2)
    assert rec.report("x", "a", "R", "m") and rec.report("x", "b", "R", "m")
    assert not rec.report("x", "c", "R", "m")
    assert rec.dropped == 1
    # Dropped, so not remembered: it is tried again next time it is reported.
    rec._q.get_nowait()
    assert rec.report("x", "c", "R", "m")
