"""An in-memory kernel speaking the same restore/save dialect as the real one.

Never more permissive than the real kernel for what we generate (checked by
tests/kernel/dataplane/test_fake_differential.py against ipset and both
iptables-restore backends), so the unit tier sees what the kernel refuses:

* iptables: a rule may only jump to a chain that exists at that line and match
  an existing set of its own family; ``-X`` fails on a referenced or non-empty
  chain, ``-N`` on an existing one; protocols, ports, addresses (family),
  and interface names (15 characters) are checked as iptables
  checks them. Each ``*table ... COMMIT`` is atomic (a failing line leaves the
  table unchanged).
* ipset: members are parsed for the set's type and family; the zero address
  (0.0.0.0, ::) and prefix 0 are refused in every type (the kernel accepts a
  few of those in hash:net and hash:net,iface: the fake is stricter there, on
  purpose); ports 0-65535 with tcp/udp/sctp/udplite; ``nomatch`` only in net
  types; ``create`` of an existing set with other parameters, ``destroy``
  while a rule references the set, and a full set fail. ipset restore is not
  atomic (like the real one): lines before the failing one stay applied.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex

from policy_agent.dataplane.iptables import SET_RE, TARGET_RE
from policy_agent.dataplane.ipsets import _IFACE_RE, canon_member
from policy_agent.dataplane.runner import CommandError

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "raw": ("PREROUTING", "OUTPUT"), "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
VERDICTS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "LOG", "NFLOG", "CONNMARK"}
PROTOCOLS = {"tcp", "udp", "sctp", "udplite", "icmp", "ipv6-icmp", "icmpv6", "all", "esp", "ah", "gre"}
SET_TYPES = {"hash:ip", "hash:ip,port", "hash:net", "hash:net,iface"}
SET_PROTOCOLS = {"tcp", "udp", "sctp", "udplite"}


def _addr(text: str, family: int, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as {what}") from None
    if a.version != family:
        raise ValueError(f"{text!r} is not an IPv{family} address")
    return a


def _net(text: str, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        n = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as a network") from None
    if n.version != family:
        raise ValueError(f"{text!r} is not an IPv{family} network")
    return n


def member_refusal(set_type: str, family: int, text: str) -> str | None:
    """Why ipset would refuse ``add <set> <text>`` (or where the fake is stricter), or None."""
    elem, *flags = text.split()
    try:
        if any(f != "nomatch" for f in flags) or (flags and set_type not in ("hash:net", "hash:net,iface")):
            raise ValueError(f"unknown or misplaced flags {flags}")
        if set_type == "hash:ip":
            a = _addr(elem, family, "an address")
            if int(a) == 0:
                raise ValueError("Null-valued element, cannot be stored in a hash type of set")
        elif set_type == "hash:ip,port":
            ip, sep, port = elem.partition(",")
            proto, colon, num = port.rpartition(":")
            if not sep or not colon or proto not in SET_PROTOCOLS or not num.isdigit() or int(num) > 65535:
                raise ValueError(f"cannot parse {elem!r} as <ip>,<proto>:<port>")
            if int(_addr(ip, family, "an address")) == 0:
                raise ValueError("Kernel error received: Invalid argument (zero address)")
        elif set_type in ("hash:net", "hash:net,iface"):
            net = elem
            if set_type == "hash:net,iface":
                net, sep, iface = elem.rpartition(",")
                name = iface[len("physdev:"):] if iface.startswith("physdev:") else iface
                if not sep or not _IFACE_RE.match(name):
                    raise ValueError(f"cannot parse {elem!r} as <net>,<interface>")
            n = _net(net, family)
            if n.prefixlen == 0:
                raise ValueError("The value of the CIDR parameter of the IP address is invalid")
            if int(n.network_address) == 0 and n.prefixlen == n.max_prefixlen:
                raise ValueError("zero address (fake is stricter than the kernel here)")
        else:
            raise ValueError(f"unsupported set type {set_type}")
    except ValueError as exc:
        return str(exc)
    return None


def rule_refusal(family: int, spec: str, sets: dict, chains: dict) -> str | None:
    """Why iptables-restore would refuse a rule body (matches and target), or None."""
    try:
        toks = shlex.split(spec)
    except ValueError as exc:
        return f"cannot parse rule: {exc}"
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t in ("-p", "--protocol"):
            if nxt is None or not (nxt in PROTOCOLS or (nxt.isdigit() and int(nxt) <= 255)):
                return f"unknown protocol {nxt!r} specified"
        elif t in ("-s", "-d", "--source", "--destination"):
            try:
                _net(nxt or "", family)
            except ValueError:
                return f"host/network {nxt!r} not found"
        elif t in ("-i", "-o"):
            if nxt is None or len(nxt) > 15:
                return f"interface name {nxt!r} must be shorter than IFNAMSIZ (16)"
        elif t in ("--dport", "--sport", "--dports", "--sports"):
            for part in (nxt or "").split(","):
                ends = part.split(":")
                if len(ends) > 2 or not all(e.isdigit() and int(e) <= 65535 for e in ends):
                    return f"invalid port/service {part!r} specified"
        elif t == "--match-set":
            s = sets.get(nxt)
            if s is None:
                return f"Set {nxt} doesn't exist."
            if s["family"] != family:
                return f"The protocol family of set {nxt} is IPv{s['family']}, which is not applicable."
        elif t in ("-j", "-g", "--jump", "--goto"):
            if nxt is None or (nxt not in VERDICTS and nxt not in chains):
                return f"Chain {nxt!r} does not exist"
        i += 1
    return None


class _Rule:
    def __init__(self, spec: str):
        self.spec = spec
        self.packets = 0
        self.bytes = 0


def _norm(spec: str) -> str:
    # iptables-save prints simple comments unquoted-or-quoted; normalise to one form for -D by text.
    return " ".join(shlex.split(spec))


class FakeKernel:
    def __init__(self, backend: str = "nft"):
        self.backend = backend
        self.tables: dict[int, dict[str, dict[str, tuple[str, list[_Rule]]]]] = {4: {}, 6: {}}
        self.sets: dict[str, dict] = {}
        self.fail_next = 0  # fail this many upcoming restores (either kind)
        # Fail the next restore whose text contains this (e.g. "destroy", "-X "); each entry once.
        self.fail_on: list[str] = []
        self.restores: list[tuple[str, str]] = []  # (kind, text) of every successful restore
        self.failed: list[tuple[str, str]] = []  # (kind, text) of every refused restore
        self._family = 4

    # --- iptables -------------------------------------------------------------

    def iptables_save(self, family: int) -> str:
        out = []
        for tname, chains in self.tables[family].items():
            out.append(f"*{tname}")
            for cname, (policy, _rules) in chains.items():
                out.append(f":{cname} {policy} [0:0]")
            for cname, (_policy, rules) in chains.items():
                out.extend(f"[{r.packets}:{r.bytes}] -A {cname} {r.spec}" for r in rules)
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _table(self, family: int, name: str) -> dict:
        return self.tables[family].get(name) or {c: ("ACCEPT", []) for c in BUILTIN.get(name, ())}

    def iptables_restore(self, family: int, text: str) -> None:
        try:
            self._iptables_restore(family, text)
        except CommandError:
            self.failed.append(("iptables", text))
            raise

    def _iptables_restore(self, family: int, text: str) -> None:
        self._maybe_fail("iptables-restore", text)
        self._family = family
        staged = dict(self.tables[family])
        cur_name, cur = None, None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                cur_name, cur = line[1:], copy.deepcopy(self._table(family, line[1:]))
                continue
            if line == "COMMIT":
                self._check_refs(cur, n)
                staged[cur_name] = cur
                cur = None
                continue
            if cur is None:
                raise CommandError(["iptables-restore"], 1, f"line {n}: no table")
            self._line(cur, line, n)
        self.tables[family] = staged
        self.restores.append(("iptables", text))

    def _line(self, t: dict, line: str, n: int) -> None:
        def err(msg: str):
            raise CommandError(["iptables-restore"], 1, f"line {n}: {msg}: {line}")

        if line.startswith("-N "):
            name = line.split()[1]
            if name in t:
                err("Chain already exists")
            t[name] = ("-", [])
            return
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name in t and t[name][0] == "-":
                t[name][1].clear()  # --noflush still flushes a declared user chain
            elif name not in t:
                t[name] = ("-", [])
            return
        op, chain, *rest = line.split(" ", 2) if " " in line else (line, "")
        arg = rest[0] if rest else ""
        if chain not in t:
            err("no such chain")
        rules = t[chain][1]
        if op in ("-A", "-I", "-R"):
            spec = arg.split(" ", 1)[1] if op == "-R" or (op == "-I" and re.match(r"\d+ ", arg)) else arg
            why = rule_refusal(self._family, spec, self.sets, t)
            if why:
                err(why)
        if op == "-A":
            rules.append(_Rule(arg))
        elif op == "-I":
            m = re.match(r"(\d+) (.*)", arg)
            pos, spec = (int(m.group(1)), m.group(2)) if m else (1, arg)
            rules.insert(pos - 1, _Rule(spec))
        elif op == "-R":
            pos, spec = arg.split(" ", 1)
            if not 1 <= int(pos) <= len(rules):
                err("index out of range")
            rules[int(pos) - 1] = _Rule(spec)
        elif op == "-D":
            if arg.isdigit():
                if not 1 <= int(arg) <= len(rules):
                    err("index out of range")
                del rules[int(arg) - 1]
            else:
                for i, r in enumerate(rules):
                    if _norm(r.spec) == _norm(arg):
                        del rules[i]
                        break
                else:
                    err("no such rule")
        elif op == "-F":
            rules.clear()
        elif op == "-X":
            if rules:
                err("chain not empty")
            if any(self._target(r) == chain for _, (_, rs) in t.items() for r in rs):
                err("chain referenced")
            del t[chain]
        else:
            err("unsupported op")

    @staticmethod
    def _target(r: _Rule) -> str | None:
        m = TARGET_RE.search(r.spec)
        return m.group(1) if m else None

    def _check_refs(self, t: dict, n: int) -> None:
        for cname, (_p, rules) in t.items():
            for r in rules:
                tgt = self._target(r)
                if tgt and tgt not in VERDICTS and tgt not in t:
                    raise CommandError(["iptables-restore"], 1, f"COMMIT line {n}: {cname} jumps to missing {tgt}")
                for s in SET_RE.findall(r.spec):
                    if s not in self.sets:
                        raise CommandError(["iptables-restore"], 1, f"COMMIT line {n}: set {s} does not exist")

    def bump(self, family: int, table: str = "filter", packets: int = 1) -> None:
        """Pretend traffic hit every rule (to check that unchanged rules keep counters)."""
        for _p, rules in self.tables[family].get(table, {}).values():
            for r in rules:
                r.packets += packets
                r.bytes += 60 * packets

    # --- ipset ----------------------------------------------------------------

    def ipset_save(self) -> str:
        out = []
        for name, s in self.sets.items():
            fam = "inet" if s["family"] == 4 else "inet6"
            out.append(f"create {name} {s['type']} family {fam} hashsize 1024 maxelem {s['maxelem']} bucketsize 12")
            out.extend(f"add {name} {m}" for m in sorted(s["members"]))
        return "\n".join(out) + ("\n" if out else "")

    def _referenced(self, name: str) -> bool:
        return any(
            name in SET_RE.findall(r.spec)
            for fam in self.tables.values()
            for t in fam.values()
            for _p, rules in t.values()
            for r in rules
        )

    def ipset_restore(self, text: str) -> None:
        try:
            self._ipset_restore(text)
        except CommandError:
            self.failed.append(("ipset", text))
            raise

    def _ipset_restore(self, text: str) -> None:
        self._maybe_fail("ipset restore", text)
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            exist = "-exist" in parts
            parts = [p for p in parts if p != "-exist"]

            def err(msg: str, n=n, line=line):
                raise CommandError(["ipset", "restore"], 1, f"Error in line {n}: {msg}: {line}")

            verb, name = parts[0], parts[1]
            s = self.sets.get(name)
            if verb == "create":
                opts = dict(zip(parts[3::2], parts[4::2]))
                if len(parts) < 3 or parts[2] not in SET_TYPES:
                    err("unknown set type")
                if opts.get("family", "inet") not in ("inet", "inet6") or not str(opts.get("maxelem", "1")).isdigit():
                    err("bad create options")
                new = {
                    "type": parts[2],
                    "family": 6 if opts.get("family") == "inet6" else 4,
                    "maxelem": int(opts.get("maxelem", 65536)),
                    "members": set(),
                }
                if s is not None and not exist:
                    err("set already exists")
                if s is not None and (s["type"], s["family"], s["maxelem"]) != (new["type"], new["family"], new["maxelem"]):
                    err("Set cannot be created: set with the same name already exists")
                if s is None:
                    self.sets[name] = new
                continue
            if s is None:
                err("set does not exist")
            if verb in ("add", "del"):
                text_m = " ".join(parts[2:])
                why = member_refusal(s["type"], s["family"], text_m)
                if why:
                    err(why)
                m = canon_member(s["type"], text_m)
                if verb == "add":
                    if m in s["members"] and not exist:
                        err("element already added")
                    if m not in s["members"] and len(s["members"]) >= s["maxelem"]:
                        err("Hash is full, cannot add more elements")
                    s["members"].add(m)
                else:
                    if m not in s["members"] and not exist:
                        err("element not added")
                    s["members"].discard(m)
            elif verb == "swap":
                other = self.sets.get(parts[2])
                if other is None:
                    err("second set does not exist")
                if (other["type"], other["family"]) != (s["type"], s["family"]):
                    err("types do not match")
                self.sets[name], self.sets[parts[2]] = other, s
            elif verb == "destroy":
                if self._referenced(name):
                    err("set is in use by a kernel component")
                del self.sets[name]
            elif verb == "flush":
                s["members"].clear()
            else:
                err("unknown command")
        self.restores.append(("ipset", text))

    def _maybe_fail(self, what: str, text: str) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise CommandError([what], 1, "injected failure")
        for i, needle in enumerate(self.fail_on):
            if needle in text:
                del self.fail_on[i]
                raise CommandError([what], 1, f"injected failure on {needle!r}")
