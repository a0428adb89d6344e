"""Pure iptables logic: parse ``iptables-save -c`` and plan a --noflush transaction.

Read-back is by identity: every rule we write carries ``pa:<hash>`` as its first
comment, and the hash chains over the chain name and all earlier rules
(policy_agent.desired.rule_hashes). A chain is up to date iff its kernel hash
list equals the desired one; otherwise the differing positions are replaced
(``-R``), missing tail rules appended and surplus ones deleted from the end,
so rules before the first difference keep their counters. Built-in chains
(INPUT/FORWARD/OUTPUT...) get our hook rules at the top; if they are not exactly
there, every rule of ours in that chain is deleted by its full text (never by
index: other writers may have shifted it) and the hooks are re-inserted.
Chains and rules not carrying our prefix/hash are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Collection, Iterable, Mapping

from policy_agent.desired import Chain, Hook
from policy_agent.shared.naming import RULE_HASH_PREFIX, owns_chain

HASH_RE = re.compile(r'--comment "?' + re.escape(RULE_HASH_PREFIX) + r'([A-Za-z0-9_-]{16})"?(?:\s|$)')
COMMENT_RE = re.compile(r'--comment ("(?:[^"\\]|\\.)*"|\S+)')
TARGET_RE = re.compile(r"(?:^|\s)-[jg] (\S+)")
SET_RE = re.compile(r"--match-set (\S+)")
_COUNTER_RE = re.compile(r"^\[(\d+):(\d+)\]\s+")


@dataclass
class KRule:
    chain: str
    spec: str  # everything after "-A <chain> ", as iptables-save prints it
    packets: int = 0
    bytes: int = 0

    # Derived from spec once (spec never changes after parsing): the planner asks for
    # hashes and targets of the same cached rules on every apply.
    @cached_property
    def hash(self) -> str | None:
        m = HASH_RE.search(self.spec)
        return m.group(1) if m else None

    @cached_property
    def target(self) -> str | None:
        m = TARGET_RE.search(self.spec)
        return m.group(1) if m else None

    @cached_property
    def ipsets(self) -> list[str]:
        return SET_RE.findall(self.spec)

    @property
    def origin(self) -> str:
        """The human comment (policy, direction, rule), i.e. the first non-hash comment."""
        for c in COMMENT_RE.findall(self.spec):
            c = c[1:-1] if c.startswith('"') else c
            if not c.startswith(RULE_HASH_PREFIX):
                return c
        return ""

    @cached_property
    def ours(self) -> bool:
        t = self.target
        return self.hash is not None or (t is not None and owns_chain(t))

    def save_line(self) -> str:
        return f"-A {self.chain} {self.spec}".rstrip()


@dataclass
class KChain:
    name: str
    policy: str = "-"  # "-" for user chains, ACCEPT/DROP for built-ins
    rules: list[KRule] = field(default_factory=list)

    @property
    def builtin(self) -> bool:
        return self.policy != "-"


@dataclass
class KTable:
    name: str
    chains: dict[str, KChain] = field(default_factory=dict)

    def owned(self) -> dict[str, KChain]:
        return {n: c for n, c in self.chains.items() if owns_chain(n)}


def parse_save(text: str) -> dict[str, KTable]:
    """``iptables-save [-c]`` text -> tables. Only ``*``, ``:`` and ``-A`` lines matter."""
    tables: dict[str, KTable] = {}
    cur: KTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], KTable(line[1:]))
            continue
        if line == "COMMIT" or cur is None:
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            cur.chains.setdefault(parts[0], KChain(parts[0], parts[1] if len(parts) > 1 else "-"))
            continue
        packets = nbytes = 0
        m = _COUNTER_RE.match(line)
        if m:
            packets, nbytes = int(m.group(1)), int(m.group(2))
            line = line[m.end():]
        if line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            cur.chains.setdefault(chain, KChain(chain)).rules.append(KRule(chain, spec, packets, nbytes))
    return tables


def hook_hash(hook: Hook) -> str:
    m = HASH_RE.search(hook.render_line())
    assert m is not None
    return m.group(1)


@dataclass
class TablePlan:
    table: str
    lines: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    rewritten: dict[str, int] = field(default_factory=dict)  # chain -> rule lines written
    hooks_repaired: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # stale chains left in place -> the chains whose rules still jump to them
    kept_referenced: dict[str, list[str]] = field(default_factory=dict)
    rendered: dict[str, list[str]] = field(default_factory=dict)  # chain -> its full -A lines, if rendered

    def restore_text(self) -> str:
        return "\n".join([f"*{self.table}", *self.lines, "COMMIT"]) + "\n" if self.lines else ""


def _spec_of(line: str, name: str) -> str:
    prefix = f"-A {name} "
    assert line.startswith(prefix), line
    return line[len(prefix):]


def plan_chain(chain: Chain, kernel: KChain | None) -> list[str]:
    """Lines that turn ``kernel`` into ``chain`` (no ``:`` declaration)."""
    return _plan_chain(chain, kernel)[0]


def _plan_chain(chain: Chain, kernel: KChain | None) -> tuple[list[str], list[str] | None]:
    """(lines to write, the chain's full -A lines if they had to be rendered)."""
    if kernel is None:
        lines = chain.render_lines()
        return lines, lines
    want = chain.hashes
    have = [r.hash for r in kernel.rules]
    if len(have) == len(want) and all(a == b for a, b in zip(have, want)):
        return [], None  # up to date: nothing rendered
    lines = chain.render_lines()
    out: list[str] = []
    for i, h in enumerate(want):
        if i < len(have):
            if have[i] != h:
                out.append(f"-R {chain.name} {i + 1} {_spec_of(lines[i], chain.name)}")
        else:
            out.append(lines[i])
    for i in range(len(have), len(want), -1):
        out.append(f"-D {chain.name} {i}")
    return out, lines


def plan_table(
    table: str,
    desired: Mapping[str, Chain],
    hooks: Iterable[Hook],
    kernel: KTable | None,
    sweep: bool,
    only: Collection[str] | None = None,
    delete_chains: bool = True,
    keep: Collection[str] = (),
) -> TablePlan:
    """Plan one table. ``only``: the desired chains that may differ from ``kernel``
    (the caller knows the rest are as last written); None compares every chain.
    ``delete_chains=False`` (sweep only): stale hooks go, stale chains stay (the
    dataplane backs off deleting chains after a transaction with deletions failed).
    ``keep``: chains of ours that are not in ``desired`` but stay as the kernel has
    them (set aside after the kernel refused them: never swept, and their rules keep
    what they jump to)."""
    plan = TablePlan(table)
    kernel = kernel or KTable(table)
    chains = kernel.chains
    decl: list[str] = []
    body: list[str] = []
    for name in sorted(desired if only is None else only):
        if not owns_chain(name):
            raise ValueError(f"desired chain {name!r} in table {table} does not carry our prefix")
        kch = chains.get(name)
        if kch is None:
            decl.append(f":{name} - [0:0]")
            plan.created.append(name)
        lines, rendered = _plan_chain(desired[name], kch)
        if rendered is not None:
            plan.rendered[name] = rendered
        if lines:
            plan.rewritten[name] = len(lines)
            body.extend(lines)

    # Hooks in built-in chains.
    by_chain: dict[str, list[Hook]] = {}
    for h in hooks:
        if h.table == table:
            by_chain.setdefault(h.chain, []).append(h)
    builtin = {n: c for n, c in chains.items() if c.builtin}
    hook_lines: list[str] = []
    for cname in sorted(set(by_chain) | set(builtin)):
        want = [hook_hash(h) for h in by_chain.get(cname, [])]
        kch = builtin.get(cname, KChain(cname, "ACCEPT"))
        ours = [r for r in kch.rules if r.ours]
        top = [r.hash for r in kch.rules[: len(want)]]
        if top == want and len(ours) == len(want):
            continue
        if not want and not sweep:
            continue  # only stale hooks here: they go with the sweep
        for r in ours:
            hook_lines.append(f"-D {cname} {r.spec}")
        for h in reversed(by_chain.get(cname, [])):
            hook_lines.append(h.render_line())
        plan.hooks_repaired.append(cname)

    tail: list[str] = []
    if sweep:
        stale = sorted(n for n in chains.keys() - desired.keys() - set(keep) if owns_chain(n))
        if stale:
            kept = stale_chain_referrers(chains, stale, delete_chains, keep)
            plan.kept_referenced = kept
            for name in stale:
                if name in kept:
                    continue
                if chains[name].rules:
                    tail.append(f"-F {name}")
                plan.deleted.append(name)
            tail.extend(f"-X {name}" for name in plan.deleted)
    plan.lines = decl + body + hook_lines + tail
    return plan


def stale_chain_referrers(
    chains: Mapping[str, KChain], stale: Iterable[str], delete: bool = True, keep: Collection[str] = ()
) -> dict[str, list[str]]:
    """Stale chains of ours that must stay, each with the chains that still jump to it.

    ``-X`` of a chain that any rule still jumps to fails, and with it the whole table
    transaction, on every later apply. Rules that survive this transaction are: every
    rule in a foreign (non-built-in, not ours) chain, whoever wrote it; rules in
    built-in chains that are not ours (ours there are hooks: re-planned or deleted in
    the same transaction); the rules of chains of ours in ``keep`` (set aside: they
    stay as they are); and the rules of stale chains that are themselves kept
    (so a kept chain keeps what it jumps to: the closure). Felix keeps referenced
    chains too. ``delete=False``: every stale chain stays (no referrer recorded).
    """
    stale = set(stale)
    if not delete:
        return {n: [] for n in sorted(stale)}
    keep = set(keep)
    refs: dict[str, set[str]] = {}
    for c in chains.values():
        if owns_chain(c.name) and c.name not in keep:
            continue
        for r in c.rules:
            t = r.target
            if t in stale and not (c.builtin and r.ours):
                refs.setdefault(t, set()).add(c.name)
    todo = list(refs)
    while todo:  # a kept chain's own jumps keep their stale targets
        name = todo.pop()
        for r in chains[name].rules:
            t = r.target
            if t in stale and t != name:
                if t not in refs:
                    todo.append(t)
                refs.setdefault(t, set()).add(name)
    return {n: sorted(v) for n, v in sorted(refs.items())}


def cleanup_table(kernel: KTable) -> TablePlan:
    """Remove every rule and chain of ours from one table, nothing else."""
    return plan_table(kernel.name, {}, (), kernel, sweep=True)
