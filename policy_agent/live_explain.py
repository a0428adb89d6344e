"""Explain a flow on a live node: from what the agent last applied AND from the kernel.

Two walks of one NEW packet (policy_agent.explain semantics):

* desired: the DesiredState the agent last applied, with the snapshot it was compiled
  from (so ``ns/pod`` resolves for remote pods too);
* kernel: our chains and hooks as ``iptables-save -c`` shows them now (parsed back into
  structured rules by ``rule_from_spec``), our sets as ``ipset save`` shows them, and the
  dataplane state file (which pod each interface is, what each set stands for).

The answer's verdict is the kernel's (that is what packets meet); the trace carries
each rule's live packet/byte counters. Drift: every chain and set on the path (what
either walk visited, and the sets their rules reference) is compared with the desired
state rule by rule (hash and meaning) and member by member, and reported per chain/set.
With no agent (``kernel_only``) the kernel walk is the whole answer, and it says so.

Reading the kernel reuses the dataplane's parsers (iptables.parse_save, ipsets.
parse_ipset_save, ipsets.desired_members); nothing here writes to the kernel.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane import ipsets as ips
from policy_agent.desired import (
    FILTER,
    Action,
    Chain,
    DesiredState,
    Hook,
    IPSet,
    LocalEndpoint,
    Match,
    Rule,
    safe_comment,
)
from policy_agent.explain import (
    HOOK_CHAINS,
    ExplainError,
    Explanation,
    TraceStep,
    explain_state_flow,
    set_contains,
)
from policy_agent.shared.naming import RULE_HASH_PREFIX

KERNEL_ONLY_NOTE = "agent not running: answered from the kernel alone"
MAX_DETAILS = 8  # drift lines shown per chain or set
MAX_FLOWS = 1024  # flows in one batched request


class UnmodelledRule(ValueError):
    """A kernel rule uses a match or target explain does not model."""


# --- kernel rule text -> structured rule ---------------------------------------------

_SET_DIRS = {"src": "src_set", "dst": "dst_set", "dst,dst": "dst_ipport_set", "src,src": "src_iface_set"}
_IGNORED_VALUED = {"--reject-with"}  # target options that do not change the verdict
# Flow log rules (NFLOG + hashlimit, obs/flowlog.py): kept as text, compared by canonical().
_FLOW_LOG_OPTIONS = {"--hashlimit-upto", "--hashlimit-burst", "--hashlimit-mode", "--hashlimit-name",
                     "--nflog-prefix", "--nflog-group"}


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def _ports(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def rule_from_spec(spec: str) -> tuple[str | None, Rule]:
    """``iptables-save`` rule text (after ``-A CHAIN``) -> (our hash or None, Rule).

    Raises UnmodelledRule for anything outside what the compiler writes (and explain
    walks): the kernel walk then stops there instead of guessing."""
    try:
        tokens = shlex.split(spec)
    except ValueError as exc:
        raise UnmodelledRule(f"cannot split rule text: {exc}") from None
    m: dict[str, Any] = {}
    verb, target, xmark = "", None, None
    rule_hash: str | None = None
    comment = ""
    neg = False
    i = 0
    flow_log: list[str] = []

    def arg() -> str:
        nonlocal i
        if i + 1 >= len(tokens):
            raise UnmodelledRule(f"option {tokens[i]} without a value")
        i += 1
        return tokens[i]

    while i < len(tokens):
        t = tokens[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t == "-m":
            if arg() == "hashlimit":  # other module names follow from the options
                flow_log += ["-m", "hashlimit"]
        elif t in _FLOW_LOG_OPTIONS and not neg:
            flow_log += [t, arg()]
        elif t in ("-s", "-d"):
            m["src_net" if t == "-s" else "dst_net"] = arg()
            m[("src_net" if t == "-s" else "dst_net") + "_negate"] = neg
        elif t in ("-i", "-o", "-p") and not neg:
            m[{"-i": "in_iface", "-o": "out_iface", "-p": "protocol"}[t]] = arg()
        elif t == "--comment":
            c = arg()
            if c.startswith(RULE_HASH_PREFIX) and rule_hash is None and not comment:
                rule_hash = c[len(RULE_HASH_PREFIX):]
            elif not comment:
                comment = c
            else:
                raise UnmodelledRule("more than one human comment")
        elif t == "--match-set":
            name, direction = arg(), arg()
            key = _SET_DIRS.get(direction)
            if key is None or (neg and key == "dst_ipport_set"):
                raise UnmodelledRule(f"set match {'! ' if neg else ''}{name} {direction}")
            m[key] = name
            if key != "dst_ipport_set":
                m[key + "_negate"] = neg
        elif t in ("--dport", "--dports") and not neg:
            m["dst_ports"] = _ports(arg())
        elif t == "--ctstate" and not neg:
            m["ctstate"] = tuple(arg().split(","))
        elif t == "--mark" and not neg:
            m["mark"] = _mark(arg())
        elif t == "--src-type" and not neg:
            if arg() != "LOCAL":
                raise UnmodelledRule("addrtype other than --src-type LOCAL")
            m["src_addrtype_local"] = True
        elif t in ("--icmp-type", "--icmpv6-type") and not neg:
            m["icmp_type"] = int(arg().split("/")[0])
        elif t in ("-j", "-g"):
            target = arg()
            if t == "-g":
                verb = "GOTO"
            elif target in ("ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "NFLOG"):
                verb, target = target, None
                if verb == "NFLOG":
                    flow_log += ["-j", "NFLOG"]
            else:
                verb = "JUMP"
        elif t == "--set-xmark" and verb == "MARK":
            xmark = _mark(arg())
        elif t in _IGNORED_VALUED:
            arg()
        else:
            raise UnmodelledRule(f"{'! ' if neg else ''}{t} is not modelled")
        neg = False
        i += 1
    if not verb:
        raise UnmodelledRule("no target")
    if verb == "MARK" and xmark is None:
        raise UnmodelledRule("MARK without --set-xmark")
    if flow_log and verb != "NFLOG":
        raise UnmodelledRule("hashlimit outside a flow log rule")
    if verb == "NFLOG":
        target = " ".join(flow_log)  # explain steps over it: a log decides nothing
    try:
        match = Match(**m)
    except TypeError as exc:
        raise UnmodelledRule(str(exc)) from None
    return rule_hash, Rule(match, Action(verb, target, xmark), comment)


def _net(text: str | None) -> str | None:
    return None if text is None else str(ipaddress.ip_network(text, strict=False))


def canonical(rule: Rule) -> Rule:
    """The rule as the kernel prints it back: addresses normalised, comment made safe."""
    m = rule.match
    action = rule.action
    if action.verb == "NFLOG" and action.log is not None:  # the kernel has only its rendered options
        action = Action("NFLOG", " ".join(action.log.render()))
    return Rule(replace(m, src_net=_net(m.src_net), dst_net=_net(m.dst_net)), action,
                safe_comment(rule.comment))


# --- one read of the kernel ------------------------------------------------------------


@dataclass
class KernelView:
    """Our part of the kernel at one moment, plus the dataplane state file."""

    backend: str
    tables: dict[int, ipt.KTable]  # family -> filter table
    sets: dict[str, ips.KSet]
    meta: dict[str, Any]
    # One request explains many flows against one read: parse and compare each thing once.
    cache: dict[tuple, Any] = field(default_factory=dict)

    def chain(self, family: int, name: str) -> ipt.KChain | None:
        t = self.tables.get(family)
        return t.chains.get(name) if t is not None else None

    def hook_rules(self, family: int, builtin: str) -> list[ipt.KRule]:
        c = self.chain(family, builtin)
        return [r for r in c.rules if r.ours] if c is not None else []


def read_kernel(kernel: Any, families: Iterable[int] = (4, 6), state_path: str | None = None) -> KernelView:
    """iptables-save -c (filter table) per family, ipset save, and the state file."""
    tables = {}
    for f in families:
        t = ipt.parse_save(kernel.iptables_save(f)).get(FILTER)
        if t is not None:
            tables[f] = t
    meta: dict[str, Any] = {}
    if state_path:
        try:
            with open(state_path) as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            meta = {"error": f"cannot read {state_path}: {exc}"}
    return KernelView(kernel.backend, tables, ips.parse_ipset_save(kernel.ipset_save()), meta)


@dataclass
class KernelState:
    state: DesiredState
    hook_order: dict[str, list[str]]  # built-in chain -> our hook targets, top first
    unmodelled: dict[tuple[str, int], str]  # (chain, rule number) -> why


def _endpoint(e: Mapping[str, Any]) -> LocalEndpoint:
    return LocalEndpoint(
        e["namespace"], e["pod"], e["interface"], tuple(e.get("ips", ())),
        tuple(e.get("ingress_policies", ())), tuple(e.get("egress_policies", ())),
        bool(e.get("ingress_isolated")), bool(e.get("egress_isolated")),
    )


def kernel_state(view: KernelView, family: int) -> KernelState:
    """The kernel's chains, hooks and sets of one family as a DesiredState explain can walk."""
    key = ("kernel_state", family)
    if key not in view.cache:
        view.cache[key] = _kernel_state(view, family)
    return view.cache[key]


def _kernel_state(view: KernelView, family: int) -> KernelState:
    chains: dict[str, Chain] = {}
    unmodelled: dict[tuple[str, int], str] = {}
    t = view.tables.get(family)
    hook_order: dict[str, list[str]] = {}
    if t is not None:
        for name, kc in t.owned().items():
            rules = []
            for n, kr in enumerate(kc.rules, start=1):
                try:
                    rules.append(rule_from_spec(kr.spec)[1])
                except UnmodelledRule as exc:
                    unmodelled[(name, n)] = str(exc)
                    # Reaching it stops the walk (explain refuses the verb) instead of guessing.
                    rules.append(Rule(Match(), Action("UNMODELLED"), kr.spec[:200]))
            chains[name] = Chain(name, tuple(rules))
        for builtin in HOOK_CHAINS:
            hook_order[builtin] = [r.target for r in view.hook_rules(family, builtin) if r.target]
    origins = view.meta.get("ipsets", {}) if isinstance(view.meta.get("ipsets"), dict) else {}
    sets = {
        n: IPSet(n, s.family, s.type, frozenset(s.members), (origins.get(n) or {}).get("origin", ""))
        for n, s in view.sets.items()
    }
    hooks = tuple(Hook(FILTER, b, tgt) for b, tgts in hook_order.items() for tgt in tgts)
    endpoints = []
    for e in view.meta.get("endpoints", []) or []:
        try:
            endpoints.append(_endpoint(e))
        except (KeyError, TypeError):
            continue  # a record we cannot read names no pod; addresses still work
    state = DesiredState(chains={(family, FILTER): chains}, hooks=hooks, ipsets=sets, endpoints=tuple(endpoints))
    return KernelState(state, hook_order, unmodelled)


# --- the question ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlowQuery:
    src: str
    dst: str
    protocol: str = "TCP"
    port: int | None = None
    family: int | None = None
    node_ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in ("TCP", "UDP", "SCTP"):
            raise ExplainError(f"protocol must be TCP, UDP or SCTP, not {self.protocol!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ExplainError(f"port must be 1-65535, not {self.port}")
        if self.family not in (None, 4, 6):
            raise ExplainError(f"family must be 4 or 6, not {self.family}")

    @classmethod
    def from_params(cls, params: Mapping[str, list[str]]) -> list["FlowQuery"]:
        """Query parameters -> flows. One flow: from, to, port, protocol (and family,
        node_ip). Several: ``flow=SRC,DST,PORT,PROTOCOL`` repeated (one kernel read)."""
        def one(key: str, default: str | None = None) -> str | None:
            vals = params.get(key) or []
            if len(vals) > 1:
                raise ExplainError(f"parameter {key!r} given {len(vals)} times")
            return vals[0] if vals else default

        def port(text: str | None) -> int | None:
            if text in (None, ""):
                return None
            try:
                return int(text)
            except ValueError:
                raise ExplainError(f"port must be a number, not {text!r}") from None

        fam_text = one("family")
        try:
            family = int(fam_text) if fam_text else None
        except ValueError:
            raise ExplainError(f"family must be 4 or 6, not {fam_text!r}") from None
        node_ips = tuple(params.get("node_ip") or ())
        flows = params.get("flow") or []
        if flows:
            if len(flows) > MAX_FLOWS:
                raise ExplainError(f"at most {MAX_FLOWS} flows per request, not {len(flows)}")
            out = []
            for f in flows:
                parts = f.split(",")
                if len(parts) != 4:
                    raise ExplainError(f"flow must be SRC,DST,PORT,PROTOCOL, not {f!r}")
                out.append(cls(parts[0], parts[1], parts[3].upper() or "TCP", port(parts[2]), family, node_ips))
            return out
        src, dst = one("from"), one("to")
        if not src or not dst:
            raise ExplainError("give from=NS/POD|IP and to=NS/POD|IP (or flow=SRC,DST,PORT,PROTOCOL)")
        return [cls(src, dst, (one("protocol", "TCP") or "TCP").upper(), port(one("port")), family, node_ips)]


# --- drift -----------------------------------------------------------------------------


def _chains_of(trace: Iterable[TraceStep]) -> list[str]:
    """Our chains the packet entered: where a step is, and where a jump went (a chain
    whose rules all failed to match has no step of its own)."""
    seen: dict[str, None] = {}
    for s in trace:
        if s.chain not in HOOK_CHAINS:
            seen.setdefault(s.chain)
        if s.action in ("JUMP", "GOTO"):
            seen.setdefault(s.rule_text.rsplit(" ", 1)[-1])
    return list(seen)


def _sets_of(chains: Iterable[Chain | None]) -> list[str]:
    out: dict[str, None] = {}
    for c in chains:
        if c is not None:
            for name in sorted(c.ipsets):
                out.setdefault(name)
    return list(out)


def _chain_drift(name: str, want: Chain | None, have: ipt.KChain | None) -> dict[str, Any]:
    if want is None and have is None:
        return {"chain": name, "state": "absent", "details": []}
    if want is None:
        return {"chain": name, "state": "not desired", "details": [
            f"the kernel has chain {name} ({len(have.rules)} rules) that the agent's desired state does not"]}
    if have is None:
        return {"chain": name, "state": "missing", "details": [f"chain {name} is not in the kernel"]}
    details: list[str] = []
    by_hash: dict[str, list[tuple[int, ipt.KRule]]] = {}
    for n, kr in enumerate(have.rules, start=1):
        by_hash.setdefault(kr.hash or "", []).append((n, kr))
    wanted = set(want.hashes)
    for i, (h, rule) in enumerate(zip(want.hashes, want.rules), start=1):
        found = by_hash.get(h)
        if not found:
            details.append(f"rule {i} missing in the kernel: {rule.body()}")
            continue
        n, kr = found[0]
        try:
            got = canonical(rule_from_spec(kr.spec)[1])
        except UnmodelledRule:
            got = None
        if got != canonical(rule):
            details.append(f"rule {i} altered (kernel rule {n} carries its hash): kernel has {kr.spec!r}, "
                           f"desired {rule.body()!r}")
        elif n != i:
            details.append(f"rule {i} is at position {n} in the kernel")
    for n, kr in enumerate(have.rules, start=1):
        if kr.hash not in wanted:
            details.append(f"kernel rule {n} is not in the desired state: -A {name} {kr.spec}")
    if details:
        return {"chain": name, "state": "differs", "details": details[:MAX_DETAILS],
                "more": max(0, len(details) - MAX_DETAILS)}
    return {"chain": name, "state": "in sync", "details": []}


def _hook_drift(builtin: str, want: list[str], view: KernelView, family: int) -> dict[str, Any]:
    kc = view.chain(family, builtin)
    have = [r for r in kc.rules if r.ours] if kc is not None else []
    details = []
    if [r.target for r in have] != want:
        details.append(f"our jumps in {builtin} are {[r.target for r in have]}, desired {want}")
    if kc is not None and want:
        first_ours = next((n for n, r in enumerate(kc.rules) if r.ours), None)
        if first_ours:  # rules of others run before ours: they may decide first
            others = [r.save_line() for r in kc.rules[:first_ours]]
            details.append(f"{first_ours} rule(s) of others run before our hook in {builtin}: "
                           + "; ".join(others[:3]))
    return {"chain": builtin, "state": "differs" if details else "in sync", "details": details}


def _set_drift(name: str, want: IPSet | None, have: ips.KSet | None, aside: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"set": name, "origin": want.origin if want is not None else ""}
    if name in aside:
        out["set_aside"] = aside[name]
    if want is None and have is None:
        return {**out, "state": "absent", "details": []}
    if want is None:
        return {**out, "state": "not desired", "details": [f"the kernel has set {name} the desired state does not"]}
    if have is None:
        return {**out, "state": "missing", "details": [f"set {name} is not in the kernel"]}
    details = []
    if (have.type, have.family) != (want.type, want.family):
        details.append(f"kernel set is {have.type} IPv{have.family}, desired {want.type} IPv{want.family}")
    try:
        desired = ips.desired_members(want)
    except ValueError as exc:
        desired = set()
        details.append(str(exc))
    missing, extra = sorted(desired - have.members), sorted(have.members - desired)
    if missing:
        details.append(f"{len(missing)} member(s) missing in the kernel: {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))
    if extra:
        details.append(f"{len(extra)} member(s) in the kernel not desired: {', '.join(extra[:5])}"
                       + (" ..." if len(extra) > 5 else ""))
    out["members"] = len(have.members)
    return {**out, "state": "differs" if details else "in sync", "details": details}


def drift_on_path(desired: DesiredState, view: KernelView, family: int, chains: Iterable[str],
                  kernel_sets: Iterable[str] = (), builtins: Iterable[str] = (),
                  set_aside: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Chains and sets on the path compared with the desired state; never hides a difference."""
    tbl = desired.table(family, FILTER)
    chain_reports = []
    def cached(key: tuple, fn, *args):
        key = ("drift", id(desired), family, *key)
        if key not in view.cache:
            view.cache[key] = fn(*args)
        return view.cache[key]

    for b in builtins:
        want = sorted((h.target for h in desired.hooks if h.table == FILTER and h.chain == b), reverse=True)
        chain_reports.append(cached(("hook", b), _hook_drift, b, want, view, family))
    names = list(dict.fromkeys(chains))
    for name in names:
        chain_reports.append(cached(("chain", name), _chain_drift, name, tbl.get(name), view.chain(family, name)))
    aside = {str(a.get("name")): str(a.get("error", "")) for a in set_aside if a.get("kind") in ("ipset", "set")}
    sets = list(dict.fromkeys([*_sets_of(tbl.get(n) for n in names), *kernel_sets]))
    set_reports = [cached(("set", s), _set_drift, s, desired.ipsets.get(s), view.sets.get(s), aside) for s in sets]
    in_sync = all(r["state"] in ("in sync", "absent") for r in chain_reports + set_reports)
    return {"in_sync": in_sync, "chains": chain_reports, "sets": set_reports}


# --- answers ---------------------------------------------------------------------------


def _counters(step: TraceStep, family: int, view: KernelView, by: str,
              desired: DesiredState | None = None) -> dict[str, Any]:
    """The kernel counters of the rule a step stands for; ``by``: "position" (kernel
    walk) or "hash" (desired walk)."""
    kr: ipt.KRule | None = None
    if step.chain in HOOK_CHAINS:
        hooks = view.hook_rules(family, step.chain)
        if by == "position":
            kr = hooks[step.number - 1] if 0 < step.number <= len(hooks) else None
        else:
            target = step.rule_text.rsplit(" ", 1)[-1]
            kr = next((r for r in hooks if r.target == target), None)
    else:
        kc = view.chain(family, step.chain)
        if kc is not None:
            if by == "position":
                kr = kc.rules[step.number - 1] if 0 < step.number <= len(kc.rules) else None
            elif desired is not None:
                want = desired.table(family, FILTER).get(step.chain)
                h = want.hashes[step.number - 1] if want is not None and step.number <= len(want.hashes) else None
                kr = next((r for r in kc.rules if h and r.hash == h), None)
    if kr is None:
        return {"in_kernel": False, "packets": None, "bytes": None}
    return {"in_kernel": True, "packets": kr.packets, "bytes": kr.bytes}


def _trace(exp: Explanation, view: KernelView, by: str, desired: DesiredState | None = None) -> list[dict]:
    fam = exp.packet.family
    return [{"chain": s.chain, "number": s.number, "rule": s.rule_text, "comment": s.comment, "action": s.action,
             "mark": s.mark, **_counters(s, fam, view, by, desired)} for s in exp.trace]


def _why_not(rule: Rule, exp: Explanation, sets: Mapping[str, IPSet]) -> str:
    """The first condition of ``rule`` the packet does not meet (for rules it did not match)."""
    p, m = exp.packet, rule.match
    if m.protocol is not None and m.protocol != p.protocol:
        return f"the rule is for {m.protocol}, the packet is {p.protocol}"
    if m.dst_ports and (p.dst_port is None or not any(lo <= p.dst_port <= hi for lo, hi in m.dst_ports)):
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in m.dst_ports)
        return f"port {p.dst_port} is not {ports}"
    for net, negate, who, addr in ((m.src_net, m.src_net_negate, "source", p.src),
                                   (m.dst_net, m.dst_net_negate, "destination", p.dst)):
        if net is not None:
            inside = ipaddress.ip_address(addr) in ipaddress.ip_network(net, strict=False) \
                if ipaddress.ip_network(net, strict=False).version == p.family else False
            if inside == negate:
                return f"{who} {addr} is {'' if inside else 'not '}in {net}"
    for name, negate, who, addr, port in ((m.src_set, m.src_set_negate, "source", p.src, None),
                                          (m.dst_set, m.dst_set_negate, "destination", p.dst, None),
                                          (m.dst_ipport_set, False, "destination", p.dst, p.dst_port)):
        if name is None:
            continue
        s = sets.get(name)
        if s is None:
            return f"set {name} does not exist"
        try:
            inside = set_contains(s, addr, p.protocol, port)
        except (ExplainError, ValueError):
            continue
        if inside == negate:
            what = f"{addr}" + (f" {p.protocol}:{port}" if port is not None else "")
            origin = f" ({s.origin}: {len(s.members)} members)" if s.origin else f" ({len(s.members)} members)"
            return f"{who} {what} is {'' if inside else 'not '}in {name}{origin}"
    return "another condition does not hold"


def _consulted(exp: Explanation, state: DesiredState, view: KernelView | None, by: str,
               desired: DesiredState | None = None) -> list[dict[str, Any]]:
    """The policy chains the packet entered, every rule with matched or why not: the policy line."""
    tbl = state.table(exp.packet.family, FILTER)
    hit = {(s.chain, s.number) for s in exp.trace}
    out = []
    for name in _chains_of(exp.trace):
        if not name.startswith(("pa-pi-", "pa-po-")):
            continue
        chain = tbl.get(name)
        if chain is None:
            continue
        rules = []
        for n, r in enumerate(chain.rules, start=1):
            step = TraceStep(name, n, r.comment, r.body(), r.action.verb, 0)
            cnt = _counters(step, exp.packet.family, view, by, desired) if view is not None else {}
            matched = (name, n) in hit
            rules.append({"number": n, "comment": r.comment, "rule": r.body(), "matched": matched,
                          "why_not": "" if matched else _why_not(r, exp, state.ipsets), **cnt})
        out.append({"chain": name, "direction": "ingress" if name.startswith("pa-pi-") else "egress",
                    "rules": rules})
    return out


def _flow(exp: Explanation) -> dict[str, Any]:
    p = exp.packet
    return {"src": p.src, "dst": p.dst, "src_name": exp.src_name, "dst_name": exp.dst_name,
            "protocol": p.protocol.upper(), "port": p.dst_port, "family": p.family, "path": exp.path.describe()}


def _steps(exp: Explanation) -> list[tuple]:
    return [(s.chain, s.number, s.action, s.comment) for s in exp.trace]


def _local_ip(spec: str, state: DesiredState, family: int) -> str | None:
    """NS/POD -> its address of ``family`` from the endpoints (None: it has none); other specs as given."""
    ns, slash, name = spec.partition("/")
    if not slash or spec == "node":
        return spec
    try:
        ipaddress.ip_network(spec, strict=False)
        return spec
    except ValueError:
        pass
    ep = next((e for e in state.endpoints if (e.namespace, e.pod) == (ns, name)), None)
    if ep is None:
        raise ExplainError(f"pod {spec} is not a local pod in the dataplane state file: with the agent stopped, "
                           "name remote pods by their IP address")
    return next((a for a in ep.ips if ipaddress.ip_address(a).version == family), None)


def answer_flow(q: FlowQuery, view: KernelView, *, node: str = "", desired: DesiredState | None = None,
                snapshot: Any = None, set_aside: Iterable[Mapping[str, Any]] = (),
                brief: bool = False) -> dict[str, Any]:
    """One flow: the kernel walk, and with ``desired`` the desired walk and the drift."""
    from policy_agent.model import ClusterSnapshot

    snap = snapshot if snapshot is not None else ClusterSnapshot.of([])
    live = desired is not None
    doc: dict[str, Any] = {"mode": "live" if live else "kernel-only", "node": node, "backend": view.backend,
                           "notes": [] if live else [KERNEL_ONLY_NOTE]}
    if not live and view.meta.get("error"):
        doc["notes"].append(view.meta["error"])
    want: Explanation | None = None
    if live:
        want = explain_state_flow(desired, snap, q.src, q.dst, q.protocol, q.port, node=node, node_ips=q.node_ips,
                                  family=q.family)
    fam = want.packet.family if want is not None else None
    got: Explanation | None = None
    kernel_error = ""
    ks: KernelState | None = None
    for f in ([fam] if fam else ([q.family] if q.family else [4, 6])):
        ks = kernel_state(view, f)
        try:
            # Names: the desired state's endpoints when the agent answers (the state file may lag).
            kstate = replace(ks.state, endpoints=desired.endpoints) if live else ks.state
            src, dst = q.src, q.dst
            if not live:  # no snapshot: NS/POD names a local pod of the state file
                src, dst = _local_ip(src, kstate, f), _local_ip(dst, kstate, f)
                if src is None or dst is None:
                    kernel_error = f"{q.src} and {q.dst} share no address family IPv{f}"
                    continue
            got = explain_state_flow(kstate, snap, src, dst, q.protocol, q.port, node=node,
                                     node_ips=q.node_ips, family=f, hook_order=ks.hook_order)
            break
        except ExplainError as exc:
            kernel_error = str(exc)
            if "UNMODELLED" in kernel_error:
                kernel_error = "the kernel walk reached a rule explain cannot model: " + "; ".join(
                    f"{c} rule {n}: {why}" for (c, n), why in sorted(ks.unmodelled.items()))
            if fam or "share no address family" not in kernel_error:
                break
    if got is None and want is None:
        raise ExplainError(kernel_error or "no answer")
    main = got or want
    assert main is not None
    doc["flow"] = _flow(main)
    doc["verdict"] = main.verdict
    doc["allowed"] = main.allowed
    doc["summary"] = main.summary()
    doc["tiers"] = main.tier_decisions()
    doc["kernel_verdict"] = got.verdict if got is not None else None
    doc["desired_verdict"] = want.verdict if want is not None else None
    if got is None:
        doc["notes"].append(f"kernel walk not possible ({kernel_error}): the trace is the desired state's, "
                            "with the kernel's counters where the rule is in the kernel")
    if not brief:
        doc["trace"] = _trace(got, view, "position") if got is not None else _trace(want, view, "hash", desired)
        if got is not None and ks is not None:
            doc["policies"] = _consulted(got, ks.state, view, "position")
        elif want is not None and desired is not None:
            doc["policies"] = _consulted(want, desired, view, "hash", desired)
    if want is not None:
        f = want.packet.family
        if got is not None and _steps(got) != _steps(want):
            doc["notes"].append("the kernel walk differs from the walk of the agent's desired state")
            if not brief:
                doc["desired_trace"] = _trace(want, view, "hash", desired)
        if got is not None and got.verdict != want.verdict:
            doc["notes"].append(f"the kernel {got.verdict}s what the agent's desired state would {want.verdict}: "
                                "see drift")
            doc["desired_summary"] = want.summary()
        chains = _chains_of(want.trace) + (_chains_of(got.trace) if got is not None else [])
        kernel_sets = _sets_of((ks.state.table(f, FILTER).get(c) for c in _chains_of(got.trace))) \
            if got is not None and ks is not None else []
        builtins = [want.path.chain]
        doc["drift"] = drift_on_path(desired, view, f, chains, kernel_sets, builtins, set_aside)
    else:
        doc["drift"] = None
    return doc


def answer(view: KernelView, queries: list[FlowQuery], **kw: Any) -> dict[str, Any]:
    """Every flow of a request against one read of the kernel."""
    out = []
    for q in queries:
        try:
            out.append(answer_flow(q, view, **kw))
        except (ExplainError, ValueError) as exc:
            out.append({"error": str(exc), "from": q.src, "to": q.dst, "port": q.port, "protocol": q.protocol})
    return {"answers": out}


def serve(agent: Any, params: Mapping[str, list[str]]) -> tuple[int, dict[str, Any]]:
    """The agent's /explain: (HTTP status, JSON document)."""
    try:
        queries = FlowQuery.from_params(params)
    except ExplainError as exc:
        return 400, {"error": str(exc)}
    desired = getattr(agent, "last_desired", None)
    if desired is None:
        return 503, {"error": "the agent has not applied a desired state yet (see /status)"}
    dp = agent.dataplane
    try:
        view = read_kernel(dp.kernel, getattr(dp, "families", (4, 6)), getattr(dp, "state_path", None))
    except Exception as exc:  # noqa: BLE001 - a kernel read failure is an answer, not a crash
        return 500, {"error": f"cannot read the kernel: {exc}"}
    brief = (params.get("detail") or [""])[0] == "verdict"
    doc = answer(view, queries, node=agent.node.node_name, desired=desired, snapshot=agent.store.snapshot(),
                 set_aside=list(getattr(agent, "set_aside", []) or []), brief=brief)
    doc["applied_generation"] = getattr(agent, "applied_generation", None)
    doc["last_apply_time"] = getattr(agent, "last_apply_wall", None) or None
    return 200, doc


# --- text ------------------------------------------------------------------------------


def _count(v: Any) -> str:
    return "-" if v is None else str(v)


def render_text(doc: dict[str, Any]) -> str:
    """One answer as the ``explain`` command prints it."""
    if "error" in doc:
        return f"error: {doc['error']}\n"
    lines = []
    if doc["mode"] == "kernel-only":
        lines.append(f"*** {KERNEL_ONLY_NOTE} (backend {doc['backend']}) ***")
    else:
        lines.append(f"answered by the agent on node {doc['node']} from its last applied state "
                     f"and the kernel now (backend {doc['backend']})")
    lines.append(doc["summary"])
    if doc.get("desired_summary"):
        lines.append("desired state: " + doc["desired_summary"])
    if doc.get("tiers"):
        lines.append("tiers:")
        lines += [f"  {t}" for t in doc["tiers"]]
    if "trace" in doc:
        lines.append("trace (live counters: packets/bytes):")
        for s in doc["trace"]:
            where = f"{s['chain']} #{s['number']}"
            cnt = f"[{_count(s['packets'])}/{_count(s['bytes'])}]" if s["in_kernel"] else "[NOT IN KERNEL]"
            lines.append(f"  {where:<34} {cnt:>16} mark={s['mark']:#x}  {s['rule']}")
    if doc.get("policies"):
        lines.append("policy rules consulted (matched, or the first condition that failed):")
        for c in doc["policies"]:
            lines.append(f"  {c['chain']} ({c['direction']}):" + ("" if c["rules"] else " no rules: allows nothing"))
            for r in c["rules"]:
                cnt = f"[{_count(r.get('packets'))}/{_count(r.get('bytes'))}]" if r.get("in_kernel", True) \
                    else "[NOT IN KERNEL]"
                verdict = "MATCHED" if r["matched"] else f"no match: {r['why_not']}"
                lines.append(f"    #{r['number']} {cnt} {r['comment'] or r['rule']}: {verdict}")
    drift = doc.get("drift")
    if drift is None:
        lines.append("drift: not checked (no desired state to compare with)")
    elif drift["in_sync"]:
        lines.append(f"drift: none: the kernel matches the desired state for the {len(drift['chains'])} chains "
                     f"and {len(drift['sets'])} sets on the path")
    else:
        lines.append("DRIFT: the kernel differs from the agent's desired state on the path:")
        for r in drift["chains"] + drift["sets"]:
            if r["state"] in ("in sync", "absent"):
                continue
            name = r.get("chain") or r.get("set")
            kind = "chain" if "chain" in r else "set"
            lines.append(f"  {kind} {name}: {r['state']}" + (f" (set aside by the dataplane: {r['set_aside']})"
                                                             if r.get("set_aside") else ""))
            lines += [f"    {d}" for d in r["details"]]
            if r.get("more"):
                lines.append(f"    ... and {r['more']} more")
    for n in doc.get("notes", []):
        if n != KERNEL_ONLY_NOTE:
            lines.append(f"note: {n}")
    verdict = doc["verdict"]
    if doc.get("desired_verdict") and doc.get("kernel_verdict") and doc["desired_verdict"] != doc["kernel_verdict"]:
        verdict += f" (the desired state says {doc['desired_verdict']})"
    lines.append(f"verdict: {verdict}" + (" [kernel only]" if doc["mode"] == "kernel-only" else ""))
    return "\n".join(lines) + "\n"
