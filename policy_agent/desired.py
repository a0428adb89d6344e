"""Output values: the desired dataplane state as plain, deterministic data.

The compiler builds these; the dataplane renders and applies them; ``explain``
walks them packet by packet. Rules are structured (not strings) so they can be
evaluated, and render to one canonical iptables text each. Every rule we write
carries a first comment ``pa:<hash>`` where the hash chains over the chain
name and every preceding rule (as felix does), so read-back compares hashes,
never re-parsed text.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import AbstractSet, Iterable, Mapping

from policy_agent.shared.naming import RULE_HASH_LEN, RULE_HASH_PREFIX

FAMILIES = (4, 6)
FILTER = "filter"

_COMMENT_UNSAFE = re.compile(r"[^\w @%+=:,./-]")
COMMENT_MAX = 256


def safe_comment(text: str) -> str:
    """Comments end up in iptables-restore input: keep them to a safe alphabet."""
    return _COMMENT_UNSAFE.sub("_", text)[:COMMENT_MAX]


@dataclass(frozen=True)
class Match:
    """Conditions of one rule; all must hold. Unset fields match anything."""

    in_iface: str | None = None  # exact name or "<prefix>+"
    out_iface: str | None = None
    protocol: str | None = None  # "tcp" | "udp" | "sctp" | "icmp" | "ipv6-icmp"
    src_net: str | None = None  # CIDR text, e.g. "10.0.0.5/32"
    src_net_negate: bool = False
    dst_net: str | None = None
    dst_net_negate: bool = False
    src_set: str | None = None  # hash:net set matched on the source address
    src_set_negate: bool = False
    dst_set: str | None = None  # hash:net set matched on the destination address
    dst_set_negate: bool = False
    dst_ipport_set: str | None = None  # hash:ip,port set matched on (dst addr, proto:dst port)
    dst_ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; needs protocol
    ctstate: tuple[str, ...] = ()  # e.g. ("RELATED", "ESTABLISHED")
    mark: tuple[int, int] | None = None  # (value, mask): fwmark & mask == value
    src_addrtype_local: bool = False  # source address is local to the node
    icmp_type: int | None = None  # with protocol "icmp" or "ipv6-icmp"
    src_iface_set: str | None = None  # hash:net,iface set matched on (src addr, incoming iface)
    src_iface_set_negate: bool = False

    def render(self) -> list[str]:
        out: list[str] = []
        if self.in_iface:
            out += ["-i", self.in_iface]
        if self.out_iface:
            out += ["-o", self.out_iface]
        if self.protocol:
            out += ["-p", self.protocol]
        if self.src_net:
            out += (["!"] if self.src_net_negate else []) + ["-s", self.src_net]
        if self.dst_net:
            out += (["!"] if self.dst_net_negate else []) + ["-d", self.dst_net]
        if self.icmp_type is not None:
            if self.protocol == "ipv6-icmp":
                out += ["-m", "icmp6", "--icmpv6-type", str(self.icmp_type)]
            elif self.protocol == "icmp":
                out += ["-m", "icmp", "--icmp-type", str(self.icmp_type)]
            else:
                raise ValueError("icmp_type needs protocol icmp or ipv6-icmp")
        if self.src_addrtype_local:
            out += ["-m", "addrtype", "--src-type", "LOCAL"]
        if self.ctstate:
            out += ["-m", "conntrack", "--ctstate", ",".join(self.ctstate)]
        if self.mark is not None:
            out += ["-m", "mark", "--mark", f"{self.mark[0]:#x}/{self.mark[1]:#x}"]
        if self.src_set:
            out += ["-m", "set"] + (["!"] if self.src_set_negate else []) + ["--match-set", self.src_set, "src"]
        if self.dst_set:
            out += ["-m", "set"] + (["!"] if self.dst_set_negate else []) + ["--match-set", self.dst_set, "dst"]
        if self.dst_ipport_set:
            out += ["-m", "set", "--match-set", self.dst_ipport_set, "dst,dst"]
        if self.src_iface_set:
            neg = ["!"] if self.src_iface_set_negate else []
            out += ["-m", "set"] + neg + ["--match-set", self.src_iface_set, "src,src"]
        if self.dst_ports:
            if not self.protocol:
                raise ValueError("dst_ports needs a protocol")
            if len(self.dst_ports) == 1:
                lo, hi = self.dst_ports[0]
                out += ["--dport", str(lo) if lo == hi else f"{lo}:{hi}"]
            else:
                spec = ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in self.dst_ports)
                out += ["-m", "multiport", "--dports", spec]
        return out


FLOW_VERDICTS = ("deny", "allow")
NFLOG_PREFIX_MAX = 63  # xt_NFLOG keeps prefix[64], NUL included
HASHLIMIT_NAME_MAX = 15  # xt_hashlimit names are IFNAMSIZ with the NUL
FLOW_ID_LEN = 12


@dataclass(frozen=True)
class FlowOrigin:
    """What decided a flow's first packet, carried by the NFLOG rule logged before
    (deny) or with (allow) that decision. Never rendered whole: its short ``id`` is in
    the NFLOG prefix and the agent maps it back through the desired state it applied.

    kind: "networkpolicy" (a NetworkPolicy rule allowed), "no-policy-allowed" (the
    default deny at the end of an isolated pod's NetworkPolicy block: ``isolating`` lists
    the policies), "no-policy-selects" (the default allow of a pod no policy isolates),
    "admin" / "baseline" (a ClusterNetworkPolicy rule of that tier).
    """

    verdict: str  # "deny" | "allow"
    direction: str  # "ingress" | "egress"
    kind: str
    policy: str = ""  # "ns/name" (NetworkPolicy) or the ClusterNetworkPolicy name
    priority: int | None = None  # ClusterNetworkPolicy priority
    rule: int | None = None  # index in spec.ingress / spec.egress
    rule_name: str = ""  # ClusterNetworkPolicy rule name
    endpoint: str = ""  # "ns/pod" whose endpoint chain decided (defaults)
    isolating: tuple[str, ...] = ()  # no-policy-allowed: the policies isolating the pod
    origin: str = ""  # the deciding rule's comment (the same naming as render/dump/explain)

    def __post_init__(self) -> None:
        if self.verdict not in FLOW_VERDICTS:
            raise ValueError(f"flow verdict must be deny or allow, not {self.verdict!r}")
        if self.direction not in ("ingress", "egress"):
            raise ValueError(f"flow direction must be ingress or egress, not {self.direction!r}")

    @cached_property
    def id(self) -> str:
        """Stable short ID: a hash of everything above, so equal origins share it."""
        text = "\x1f".join(
            str(v) for v in (self.verdict, self.direction, self.kind, self.policy, self.priority, self.rule,
                             self.rule_name, self.endpoint, ",".join(self.isolating), self.origin)
        )
        digest = hashlib.sha224(text.encode()).digest()
        return base64.b32encode(digest).decode().lower()[:FLOW_ID_LEN]

    @property
    def prefix(self) -> str:
        """``pa:<d|a>:<i|e>:<id>``: verdict and direction readable without the agent."""
        return f"pa:{self.verdict[0]}:{self.direction[0]}:{self.id}"

    def as_dict(self) -> dict:
        out: dict = {"kind": self.kind}
        for key in ("policy", "priority", "rule", "rule_name", "endpoint"):
            value = getattr(self, key)
            if value not in ("", None):
                out[key] = value
        if self.kind == "no-policy-allowed":
            out["isolating_policies"] = list(self.isolating)
        if self.origin:
            out["origin"] = self.origin
        return out


def hashlimit_name(kind: str, verdict: str, rate: int, burst: int) -> str:
    """One kernel hashlimit table per (kind, verdict, rate, burst): every rule naming it
    shares its buckets, so a limit holds for the whole node (per family), not per rule;
    a changed rate gets a fresh table instead of the old one's configuration."""
    h = hashlib.sha224(f"{kind}/{verdict}/{rate}/{burst}".encode()).hexdigest()[:8]
    name = f"pa-{kind}{verdict[0]}-{h}"
    assert len(name) <= HASHLIMIT_NAME_MAX
    return name


@dataclass(frozen=True)
class FlowLog:
    """NFLOG of a flow verdict (non-terminating), rate-limited in the kernel.

    ``rate``/``burst``: packets per second for the whole node and verdict (one shared
    hashlimit bucket, no mode); ``per_source_rate``/``per_source_burst``: the same per
    source address (hashlimit mode srcip), checked first so a noisy pod spends only its
    own tokens; 0 = no per-source limit.
    """

    group: int
    origin: FlowOrigin
    rate: int
    burst: int
    per_source_rate: int = 0
    per_source_burst: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 65535:
            raise ValueError(f"NFLOG group must be 0-65535, not {self.group}")
        if self.rate < 1 or self.burst < 1 or self.per_source_rate < 0 or self.per_source_burst < 0:
            raise ValueError("flow log rates and bursts must be positive")
        if self.per_source_rate and not self.per_source_burst:
            raise ValueError("a per-source flow log rate needs a per-source burst")

    @property
    def prefix(self) -> str:
        return self.origin.prefix

    def render(self) -> list[str]:
        out: list[str] = []
        v = self.origin.verdict
        if self.per_source_rate:
            out += ["-m", "hashlimit", "--hashlimit-upto", f"{self.per_source_rate}/sec",
                    "--hashlimit-burst", str(self.per_source_burst), "--hashlimit-mode", "srcip",
                    "--hashlimit-name", hashlimit_name("s", v, self.per_source_rate, self.per_source_burst)]
        out += ["-m", "hashlimit", "--hashlimit-upto", f"{self.rate}/sec", "--hashlimit-burst", str(self.burst),
                "--hashlimit-name", hashlimit_name("f", v, self.rate, self.burst)]
        # The order iptables-save prints back: prefix, then group.
        return out + ["-j", "NFLOG", "--nflog-prefix", self.prefix, "--nflog-group", str(self.group)]


@dataclass(frozen=True)
class Action:
    """verb: ACCEPT | DROP | REJECT | RETURN | JUMP | GOTO | MARK | NFLOG.

    JUMP/GOTO take ``target``; MARK takes ``mark`` = (value, mask) and sets the
    masked bits to value (iptables --set-xmark semantics restricted to mask).
    NFLOG takes ``log`` (or, read back from the kernel, its rendered options as ``target``)
    and does not end the walk: the packet goes on to the next rule.
    """

    verb: str
    target: str | None = None
    mark: tuple[int, int] | None = None
    log: FlowLog | None = None

    def render(self) -> list[str]:
        if self.verb == "NFLOG":
            # Read back from the kernel (live explain) only the rendered options are known:
            # they are kept as text in ``target``.
            return self.log.render() if self.log is not None else (self.target or "-j NFLOG").split()
        if self.verb == "JUMP":
            return ["-j", self.target or ""]
        if self.verb == "GOTO":
            return ["-g", self.target or ""]
        if self.verb == "MARK":
            assert self.mark is not None
            return ["-j", "MARK", "--set-xmark", f"{self.mark[0]:#x}/{self.mark[1]:#x}"]
        if self.verb == "REJECT":
            return ["-j", "REJECT"]
        return ["-j", self.verb]

    @property
    def chain_target(self) -> str | None:
        return self.target if self.verb in ("JUMP", "GOTO") else None


ACCEPT = Action("ACCEPT")
DROP = Action("DROP")
RETURN = Action("RETURN")


def _quote(token: str) -> str:
    return f'"{token}"' if (" " in token or not token) else token


@dataclass(frozen=True)
class Rule:
    match: Match
    action: Action
    comment: str = ""  # origin, e.g. "x/allow-web ingress rule 0 peer 1"

    def body(self) -> str:
        """Everything after the hash comment: human comment, match, action."""
        parts: list[str] = []
        if self.comment:
            parts += ["-m", "comment", "--comment", _quote(safe_comment(self.comment))]
        parts += self.match.render() + self.action.render()
        return " ".join(parts)


def rule_hashes(chain_name: str, rules: Iterable[Rule]) -> list[str]:
    """Felix-style chained hashes: each depends on the chain and all earlier rules."""
    return _body_hashes(chain_name, [r.body() for r in rules])


_B64_BYTES = RULE_HASH_LEN * 3 // 4  # whole base64 groups: the same prefix as encoding all of it


def _body_hashes(chain_name: str, bodies: Iterable[str]) -> list[str]:
    h = hashlib.sha224(chain_name.encode()).digest()
    out = []
    head = f"-A {chain_name} HASH ".encode()
    enc = base64.urlsafe_b64encode
    for body in bodies:
        h = hashlib.sha224(h + head + body.encode()).digest()
        out.append(enc(h[:_B64_BYTES]).decode())
    return out


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()

    @cached_property
    def hashes(self) -> tuple[str, ...]:
        return self._rendered[0]

    @cached_property
    def _rendered(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # Hashes and lines from one rendering of each rule body (the body is the costly
        # part), kept with the chain: the compiler hands unchanged chains on as the same
        # objects, so a chain is rendered once in its life, however often it is planned.
        bodies = [r.body() for r in self.rules]
        hashes = tuple(_body_hashes(self.name, bodies))
        head = f'-A {self.name} -m comment --comment "{RULE_HASH_PREFIX}'
        return hashes, tuple(f'{head}{h}" {b}' for h, b in zip(hashes, bodies))

    def render_lines(self) -> list[str]:
        """``-A`` lines as iptables-restore takes them, each with its hash comment."""
        return list(self._rendered[1])

    @property
    def references(self) -> frozenset[str]:
        return frozenset(t for r in self.rules if (t := r.action.chain_target))

    @property
    def ipsets(self) -> frozenset[str]:
        out = set()
        for r in self.rules:
            m = r.match
            out.update(s for s in (m.src_set, m.dst_set, m.dst_ipport_set, m.src_iface_set) if s)
        return frozenset(out)


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain to ours, inserted at the top of the built-in chain."""

    table: str
    chain: str  # INPUT | FORWARD | OUTPUT
    target: str  # our chain

    @property
    def rule(self) -> Rule:
        return Rule(Match(), Action("JUMP", self.target), comment="policy-agent hook")

    def render_line(self) -> str:
        h = rule_hashes(f"hook:{self.chain}", [self.rule])[0]
        return f'-I {self.chain} 1 -m comment --comment "{RULE_HASH_PREFIX}{h}" {self.rule.body()}'


class Members(AbstractSet[str]):
    """An immutable set of ipset members kept as a shared base frozenset and a change to
    it: the next version of a selector set of ~17,000 addresses (one pod more) costs
    the change, not a copy (issue 13). Reads like a frozenset (membership and length
    are O(1); iteration, comparison and the set operators use the frozenset, built once
    and kept). Pickles as a plain frozenset.

    Invariant: ``added`` and ``base`` are disjoint, ``removed`` is within ``base``."""

    __slots__ = ("_base", "_added", "_removed", "_len", "_frozen")
    # change (added + removed) up to which a version shares its base; past it, a copy
    COMPACT_MIN = 64
    COMPACT_FRACTION = 4

    def __init__(self, base: frozenset[str], added: frozenset[str], removed: frozenset[str]):
        self._base, self._added, self._removed = base, added, removed
        self._len = len(base) - len(removed) + len(added)
        self._frozen: frozenset[str] | None = None

    @classmethod
    def derive(cls, prev: AbstractSet[str], add: frozenset[str], rem: frozenset[str]) -> "AbstractSet[str]":
        """``(prev - rem) | add`` for ``add`` disjoint from prev and ``rem`` within it."""
        if isinstance(prev, Members):
            if prev._frozen is not None:  # already built: a free new base
                base, a0, r0 = prev._frozen, frozenset(), frozenset()
            else:
                base, a0, r0 = prev._base, prev._added, prev._removed
        else:
            base, a0, r0 = frozenset(prev), frozenset(), frozenset()
        # an added member was either removed from base before (un-remove it) or is new
        added = (a0 - rem) | frozenset(m for m in add if m not in base) if (a0 or add) else a0
        removed = (r0 - add) | frozenset(m for m in rem if m in base) if (r0 or rem) else r0
        if len(added) + len(removed) > max(cls.COMPACT_MIN, len(base) // cls.COMPACT_FRACTION):
            return (base - removed) | added
        if not added and not removed:
            return base
        return cls(base, added, removed)

    def frozen(self) -> frozenset[str]:
        f = self._frozen
        if f is None:
            f = self._base - self._removed if self._removed else self._base
            f = f | self._added if self._added else f
            self._frozen = f
        return f

    def __contains__(self, m: object) -> bool:
        return m in self._added or (m in self._base and m not in self._removed)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return iter(self.frozen())

    @staticmethod
    def _plain(other: object) -> object:
        return other.frozen() if isinstance(other, Members) else other

    def __eq__(self, other: object) -> bool:
        other = self._plain(other)
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        return self._len == len(other) and self.frozen() == other

    def __hash__(self) -> int:
        return hash(self.frozen())

    def __le__(self, other):
        return self.frozen() <= self._plain(other)

    def __lt__(self, other):
        return self.frozen() < self._plain(other)

    def __ge__(self, other):
        return self.frozen() >= self._plain(other)

    def __gt__(self, other):
        return self.frozen() > self._plain(other)

    def __sub__(self, other):
        return self.frozen() - self._plain(other)

    def __rsub__(self, other):
        return self._plain(other) - self.frozen()

    def __or__(self, other):
        return self.frozen() | self._plain(other)

    __ror__ = __or__

    def __and__(self, other):
        return self.frozen() & self._plain(other)

    __rand__ = __and__

    def __xor__(self, other):
        return self.frozen() ^ self._plain(other)

    __rxor__ = __xor__

    def isdisjoint(self, other) -> bool:
        return self.frozen().isdisjoint(self._plain(other))

    def __repr__(self) -> str:
        return f"Members({len(self)} members, {len(self._added)} added and {len(self._removed)} removed from a base)"

    def __reduce__(self):
        return (frozenset, (tuple(self.frozen()),))


@dataclass(frozen=True)
class IPSet:
    """One ipset. type: "hash:net" | "hash:ip,port" | "hash:net,iface"; family 4 -> inet, 6 -> inet6.

    members are in the text form ipset restore takes: "10.0.0.5/32",
    "10.0.0.0/16", "10.0.1.0/24 nomatch" (hash:net except), "10.0.0.5,tcp:8080",
    "10.0.0.5/32,eni1234567890a" (hash:net,iface: address and interface).
    origin says what the set stands for, for dumps ("selector x/app=web", ...).
    """

    name: str
    family: int
    type: str
    members: AbstractSet[str] = frozenset()  # a frozenset, or Members (a change of one)
    origin: str = ""
    # Where this version came from, when it is a small change of an earlier one:
    # members == (base - removed) | added, with removed <= base and added & base empty
    # (``derived`` checks both). The dataplane writes just that change when the kernel
    # holds ``base`` (identity), so an event costs what changed, not the set's size
    # (issue 13). Not part of the value: equality, hashing and pickles ignore it.
    base: AbstractSet[str] | None = field(default=None, compare=False, repr=False)
    added: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    removed: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def inet(self) -> str:
        return "inet" if self.family == 4 else "inet6"

    @classmethod
    def derived(cls, prev: "IPSet", added: "set[str] | frozenset[str]", removed: "set[str] | frozenset[str]") -> "IPSet":
        """``prev`` with ``removed`` taken out and ``added`` put in (disjoint), remembering the change.

        O(change), not O(members): the new members are a ``Members`` sharing prev's base
        frozenset. Members of ``added`` already in ``prev`` and of ``removed`` not in it
        are no change."""
        base = prev.members
        add = frozenset(m for m in added if m not in base)
        rem = frozenset(m for m in removed if m in base)
        return cls(prev.name, prev.family, prev.type, Members.derive(base, add, rem), prev.origin, base, add, rem)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("base", "added", "removed")}

    def __setstate__(self, state: dict) -> None:
        for k, v in {"base": None, "added": frozenset(), "removed": frozenset(), **state}.items():
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class LocalEndpoint:
    """A pod on this node as the compiler saw it (for dumps, status files, explain)."""

    namespace: str
    pod: str
    interface: str
    ips: tuple[str, ...]
    ingress_policies: tuple[str, ...] = ()  # "ns/name", sorted; empty = not isolated
    egress_policies: tuple[str, ...] = ()
    ingress_isolated: bool = False
    egress_isolated: bool = False


@dataclass(frozen=True)
class DesiredState:
    """chains[(family, table)] -> {name: Chain}; hooks apply to both families."""

    chains: Mapping[tuple[int, str], Mapping[str, Chain]] = field(default_factory=dict)
    hooks: tuple[Hook, ...] = ()
    ipsets: Mapping[str, IPSet] = field(default_factory=dict)
    endpoints: tuple[LocalEndpoint, ...] = ()

    def table(self, family: int, table: str = FILTER) -> Mapping[str, Chain]:
        return self.chains.get((family, table), {})

    def ipsets_of(self, family: int) -> list[IPSet]:
        return [s for _, s in sorted(self.ipsets.items()) if s.family == family]


def render_iptables_save(state: DesiredState, family: int) -> str:
    """iptables-restore --noflush input for one family: all our chains, then hooks."""
    out: list[str] = []
    tables = sorted({t for (f, t) in state.chains if f == family} | {h.table for h in state.hooks})
    for table in tables:
        chains = state.table(family, table)
        out.append(f"*{table}")
        for name in sorted(chains):
            out.append(f":{name} - [0:0]")
        for name in sorted(chains):
            out.extend(chains[name].render_lines())
        for hook in sorted((h for h in state.hooks if h.table == table), key=lambda h: (h.chain, h.target)):
            out.append(hook.render_line())
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_ipset_restore(state: DesiredState, maxelem: int = 1048576) -> str:
    """ipset restore input that creates and fills every desired set (both families)."""
    out: list[str] = []
    for name in sorted(state.ipsets):
        s = state.ipsets[name]
        if s.origin:
            out.append(f"# {name}: {s.origin}")
        out.append(f"create {name} {s.type} family {s.inet} maxelem {maxelem} -exist")
        for m in sorted(s.members):
            out.append(f"add {name} {m} -exist")
    return "\n".join(out) + ("\n" if out else "")


def flow_origins(state: DesiredState) -> dict[str, FlowOrigin]:
    """NFLOG prefix -> what decided, over every family and table of ``state``."""
    out: dict[str, FlowOrigin] = {}
    for tbl in state.chains.values():
        for chain in tbl.values():
            for r in chain.rules:
                if r.action.log is not None:
                    out[r.action.log.prefix] = r.action.log.origin
    return out
