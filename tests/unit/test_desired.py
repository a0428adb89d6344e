"""DesiredState rendering and felix-style chained rule hashes."""

from __future__ import annotations

from policy_agent.desired import (
    ACCEPT,
    Action,
    Chain,
    DesiredState,
    Hook,
    IPSet,
    Match,
    Rule,
    render_ipset_restore,
    render_iptables_save,
    rule_hashes,
    safe_comment,
)


def _chain(*actions: str) -> Chain:
    return Chain("pa-x", tuple(Rule(Match(), Action(a)) for a in actions))


def test_hashes_depend_on_chain_position_and_predecessors():
    a = _chain("DROP", "ACCEPT")
    b = _chain("ACCEPT", "ACCEPT")
    assert a.hashes[0] != b.hashes[0]
    assert a.hashes[1] != b.hashes[1]  # same rule, different predecessor
    assert len(set(_chain("ACCEPT", "ACCEPT").hashes)) == 2
    assert rule_hashes("pa-y", a.rules) != list(a.hashes)
    assert all(len(h) == 16 for h in a.hashes)


def test_render_is_canonical_and_quotes_comments():
    r = Rule(
        Match(in_iface="eni+", protocol="tcp", dst_ports=((80, 80), (8000, 8080)), dst_set="pa4s-x", ctstate=("NEW",)),
        Action("MARK", mark=(0x10000, 0x10000)),
        comment='x/web ingress rule 0 "evil" $(rm)',
    )
    line = Chain("pa-pi-x", (r,)).render_lines()[0]
    assert line.startswith('-A pa-pi-x -m comment --comment "pa:')
    assert '--comment "x/web ingress rule 0 _evil_ __rm_"' in line
    assert "-m multiport --dports 80,8000:8080" in line
    assert line.endswith("-j MARK --set-xmark 0x10000/0x10000")


def test_safe_comment_limits_alphabet_and_length():
    assert safe_comment("a\nb;c") == "a_b_c"
    assert len(safe_comment("x" * 1000)) == 256


def test_render_iptables_save_and_ipset_restore_are_deterministic():
    chains = {"pa-b": Chain("pa-b", (Rule(Match(), ACCEPT),)), "pa-a": Chain("pa-a", (Rule(Match(), Action("JUMP", "pa-b")),))}
    st = DesiredState(
        chains={(4, "filter"): chains},
        hooks=(Hook("filter", "INPUT", "pa-a"),),
        ipsets={"pa4s-b": IPSet("pa4s-b", 4, "hash:net", frozenset({"10.0.0.2/32", "10.0.0.1/32"}), "sel")},
    )
    text = render_iptables_save(st, 4)
    assert text.splitlines()[:3] == ["*filter", ":pa-a - [0:0]", ":pa-b - [0:0]"]
    assert text.rstrip().endswith("COMMIT")
    assert "-I INPUT 1 " in text
    ips = render_ipset_restore(st).splitlines()
    assert ips[1] == "create pa4s-b hash:net family inet maxelem 1048576 -exist"
    assert ips[2:] == ["add pa4s-b 10.0.0.1/32 -exist", "add pa4s-b 10.0.0.2/32 -exist"]
    assert st.table(4)["pa-a"].references == {"pa-b"}


def test_src_iface_set_renders_src_src_and_is_a_referenced_set():
    m = Match(in_iface="eni+", src_iface_set="pa4e-x", src_iface_set_negate=True)
    assert m.render() == ["-i", "eni+", "-m", "set", "!", "--match-set", "pa4e-x", "src,src"]
    assert Match(src_iface_set="pa4e-x").render() == ["-m", "set", "--match-set", "pa4e-x", "src,src"]
    c = Chain("pa-x", (Rule(m, Action("DROP")), Rule(Match(src_set="pa4s-y"), ACCEPT)))
    assert c.ipsets == {"pa4e-x", "pa4s-y"}
    s = IPSet("pa4e-x", 4, "hash:net,iface", frozenset({"10.233.1.5/32,eni1234567890a"}))
    text = render_ipset_restore(DesiredState(ipsets={s.name: s}))
    assert "create pa4e-x hash:net,iface family inet maxelem 1048576 -exist" in text
    assert "add pa4e-x 10.233.1.5/32,eni1234567890a -exist" in text
    # rules without the new field render (and hash) as before
    assert "src,src" not in Rule(Match(src_set="pa4s-y"), ACCEPT).body()
