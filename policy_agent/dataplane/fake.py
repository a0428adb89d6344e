"""An in-memory kernel speaking the same restore/save dialect as the real one.

Strict where the real kernel is strict, so unit tests catch ordering bugs: a
rule may only jump to an existing chain and match an existing ipset; ``-X``
fails on a referenced or non-empty chain; ``ipset destroy`` fails while a rule
references the set. Each ``*table ... COMMIT`` is atomic (a failing line leaves
the table unchanged); ipset restore is not (like the real one).
"""

from __future__ import annotations

import copy
import re
import shlex

from policy_agent.dataplane.iptables import SET_RE, TARGET_RE
from policy_agent.dataplane.ipsets import canon_member
from policy_agent.dataplane.runner import CommandError

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "raw": ("PREROUTING", "OUTPUT"), "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
VERDICTS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "LOG", "NFLOG", "CONNMARK"}


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
        self._maybe_fail("iptables-restore", text)
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

        if line.startswith(":"):
            name = line[1:].split()[0]
            if name in t and t[name][0] == "-":
                t[name][1].clear()  # --noflush still flushes a declared user chain
            elif name not in t:
                t[name] = ("-", [])
            return
        op, chain, *rest = line.split(" ", 2)
        arg = rest[0] if rest else ""
        if chain not in t:
            err("no such chain")
        rules = t[chain][1]
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
                if s is not None and not exist:
                    err("set already exists")
                if s is None:
                    self.sets[name] = {
                        "type": parts[2],
                        "family": 6 if opts.get("family") == "inet6" else 4,
                        "maxelem": int(opts.get("maxelem", 65536)),
                        "members": set(),
                    }
                continue
            if s is None:
                err("set does not exist")
            if verb in ("add", "del"):
                m = canon_member(s["type"], " ".join(parts[2:]))
                if verb == "add":
                    if m in s["members"] and not exist:
                        err("element already added")
                    s["members"].add(m)
                else:
                    if m not in s["members"] and not exist:
                        err("element not added")
                    s["members"].discard(m)
            elif verb == "swap":
                other = self.sets.get(parts[2])
                if other is None:
                    err("second set does not exist")
                if other["type"] != s["type"]:
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
