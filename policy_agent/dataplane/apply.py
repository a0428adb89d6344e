"""Dataplane: make the kernel match a DesiredState, with minimal, atomic writes.

Rules and theory
----------------
* Cache, not re-read: the first apply (and every refresh, and every apply after
  a failure) reads the kernel back (``iptables-save -c`` per family, ``ipset
  save``); after a successful write the cache is updated from what was written.
  So an apply with nothing changed runs no process at all and writes nothing.
* Order per apply: (1) ipsets created/filled/updated, one ``ipset restore``
  batch; (2) per family one ``iptables-restore --noflush`` with one
  ``*table ... COMMIT`` per dirty table (atomic per table): new chains, changed
  chains (-R/-A/-D by hash position), hooks repaired; (3) only with sweep
  allowed (every source in sync): stale chains of ours flushed and deleted in
  that same transaction, then (4) stale sets destroyed once no rule in the
  kernel references them, then (5) once, our leftovers in the *other*
  iptables backend removed.
* Cost follows the change, not the state: after a successful apply the
  DesiredState is remembered, and the next apply only plans chains and sets
  whose objects differ from it (identity first, then equality; the compiler
  keeps unchanged chains and sets as the same objects), validates only those
  (reference counts catch removals), skips tables and families with nothing to
  write, and rewrites the ``dump`` metadata file only when endpoints or set
  origins changed. Without a remembered state (first apply, refresh, after a
  failure) every chain is compared with the kernel by hash.
* From empty (docs/decisions/dataplane-performance.md): the ``ipset restore`` is
  streamed set by set as the sets are planned, so the kernel works while we plan
  the rest and the iptables tables; the read-back's three saves run side by side;
  automatic garbage collection is paused for the apply (the first apply of a fresh
  process ran full collections over the whole compiled state otherwise).
* Never flush at start or exit: a new process with the same desired state
  finds every hash in place and writes nothing; a new desired state replaces
  chains atomically per table while the old rules keep enforcing.
* Failures: a failed restore changed nothing in that table; the cache is
  dropped, the kernel re-read, the plan recomputed, and the write retried with
  exponential backoff. After ``retries`` attempts DataplaneError is raised.
* Failure isolation (docs/decisions/dataplane-isolation.md): before a retry,
  the refused batch is taken apart to find what the kernel refuses: the ipset
  changes set by set (bisection over sets, then over a failing set's members
  in a scratch set), a table's chain writes chain by chain (bisection within
  each dependency layer, leaves first). A refused member is left out of its set
  where that narrows (an allow set, the negated anti-spoofing set); a refused
  ``nomatch``, or any refused member of a set a deny/pass rule matches, sets the
  whole set aside. A set or chain the kernel refuses is *set aside*: the kernel
  keeps its previous version (or it stays absent), and so does every chain that
  references it, transitively, up to the endpoint and dispatch chains, which are
  rewritten fail-closed instead: a jump to an absent set-aside NetworkPolicy chain
  is left out (it allows nothing), one to another absent chain becomes a DROP, and
  a goto to an absent endpoint chain is left out of dispatch (the interface hits
  the "unknown interface" deny). Everything else is applied; the report lists what was set
  aside (``set_aside``, ``degraded``). A set-aside object is retried when its
  desired version changes and on every refresh. No failure: one ipset restore
  and one iptables-restore per family, as before.
* Sweep never wedges the apply: a stale chain that a surviving rule still
  jumps to (a foreign chain's rule, or a kept stale chain's) is kept as it is
  and logged once (``dataplane_stale_chain_kept``, with the referrers); it goes
  on a later sweep once nothing jumps to it. If a transaction that deleted
  chains fails although it was planned from a fresh read, chain deletes pause
  until the next refresh (``dataplane_chain_sweep_deferred``). A stale set that
  cannot be destroyed (in use by something we cannot see: the other iptables
  backend, a list:set) is logged, skipped until the next refresh, and never
  fails the apply.
* Ownership: only chains with our prefix, rules carrying our hash comment (or
  jumping to our chains) in built-in chains, and sets with our prefix are ever
  written, flushed or deleted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import AbstractSet, Any, Callable, Iterable, Iterator, Mapping, Sequence

import structlog

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane import ipsets as ips
from policy_agent.dataplane.backend import detect_backend, other_backend
from policy_agent.dataplane.kernel import Kernel, SystemKernel, legacy_available
from policy_agent.dataplane.runner import CommandError, Runner
from policy_agent.desired import Action, Chain, DesiredState, IPSet, Rule
from policy_agent.shared.endpoint import atomic_write
from policy_agent.shared.naming import (
    CHAIN_FROM_WL_DISPATCH,
    CHAIN_TO_WL_DISPATCH,
    owns_chain,
    owns_ipset,
    temp_ipset_name,
)

log = structlog.get_logger(__name__)

STATE_DIR = "/run/policy-agent"


def default_state_path(netns: str | None) -> str:
    """Where apply records what each set and endpoint stands for (read by ``dump``)."""
    return os.path.join(STATE_DIR, f"dataplane-{netns}.json" if netns else "dataplane.json")


class DataplaneError(RuntimeError):
    pass


@dataclass
class ApplyReport:
    backend: str = ""
    iptables_lines: int = 0
    ipset_lines: int = 0
    restore_calls: int = 0
    chains_created: list[str] = field(default_factory=list)
    chains_rewritten: dict[str, int] = field(default_factory=dict)
    chains_deleted: list[str] = field(default_factory=list)
    hooks_repaired: list[str] = field(default_factory=list)
    ipsets_created: list[str] = field(default_factory=list)
    ipsets_updated: dict[str, tuple[int, int]] = field(default_factory=dict)
    ipsets_swapped: list[str] = field(default_factory=list)
    ipsets_destroyed: list[str] = field(default_factory=list)
    other_backend_cleaned: int = 0
    attempts: int = 1
    seconds: float = 0.0
    # Everything the kernel refused and that stays set aside after this apply (the
    # rest is applied): dicts with kind (chain|ipset|member), name, origin, error,
    # and family/table/member where they apply. Non-empty means degraded.
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    isolation_restores: int = 0  # restores run to find what the kernel refused

    @property
    def lines_written(self) -> int:
        return self.iptables_lines + self.ipset_lines

    @property
    def degraded(self) -> bool:
        return bool(self.set_aside)

    @property
    def changed(self) -> bool:
        return self.lines_written > 0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["lines_written"] = self.lines_written
        return {k: v for k, v in d.items() if v}

    def log_fields(self) -> dict[str, Any]:
        """summary() with long name lists shortened to a count and a few examples."""
        out: dict[str, Any] = {}
        for k, v in self.summary().items():
            if k == "set_aside":
                out[k] = len(v)  # logged one by one as dataplane_set_aside
            elif isinstance(v, (list, dict)) and len(v) > 8:
                out[k] = f"{len(v)}: {', '.join(list(v)[:5])}, ..."
            else:
                out[k] = v
        return out


def _validate(desired: DesiredState) -> None:
    for (family, table), chains in desired.chains.items():
        for name, chain in chains.items():
            for target in chain.references:
                if owns_chain(target) and target not in chains:
                    raise ValueError(f"chain {name} ({table}, IPv{family}) jumps to {target}, which is not desired")
            for s in chain.ipsets:
                if s not in desired.ipsets:
                    raise ValueError(f"chain {name} ({table}, IPv{family}) matches ipset {s}, which is not desired")
                if desired.ipsets[s].family != family:
                    raise ValueError(f"chain {name} (IPv{family}) matches ipset {s} of family IPv{desired.ipsets[s].family}")
    for hook in desired.hooks:
        if not any(hook.target in desired.table(f, hook.table) for f in (4, 6)):
            raise ValueError(f"hook {hook.chain} -> {hook.target} targets a chain that is not desired")


def _refs_of(c: Chain, family: int, table: str) -> list[tuple]:
    """What one chain references, as keys of the reference counter."""
    return [("c", family, table, t) for t in c.references] + [("s", family, n) for n in c.ipsets]


def _build_refs(desired: DesiredState) -> Counter:
    refs: Counter = Counter()
    for (family, table), chains in desired.chains.items():
        for c in chains.values():
            refs.update(_refs_of(c, family, table))
    return refs


def _uncount(refs: Counter, keys: list[tuple]) -> None:
    for k in keys:
        n = refs[k] - 1
        if n > 0:
            refs[k] = n
        else:
            del refs[k]


def _differs(new: object, old: object) -> bool:
    return new is not old and new != old


def _set_differs(new: IPSet, old: IPSet | None) -> bool:
    if new is old:
        return False
    if old is not None and new.base is old.members and (new.added or new.removed):
        return True  # a derived change (IPSet.derived) of old: no need to compare every member
    return new != old


@dataclass
class _Delta:
    """What differs between the remembered (last applied) state and a new one."""

    prev: DesiredState
    refs: Counter  # reference counts of the new state
    chains: dict[tuple[int, str], list[str]]  # (family, table) -> new or changed chain names
    sets: dict[str, IPSet]  # new or changed sets
    meta_changed: bool  # endpoints or a set's name/origin/type/family changed (dump metadata)


def _diff(prev: DesiredState, desired: DesiredState, refs: Counter) -> _Delta:
    """Changed chains and sets; ``refs`` is updated in place (the caller drops it if
    this raises). Raises ValueError (via the full _validate, for its message) if the
    new state is broken."""
    chains: dict[tuple[int, str], list[str]] = {}
    bad = False
    removed_chains: list[tuple] = []
    for key in desired.chains.keys() | prev.chains.keys():
        new, old = desired.chains.get(key, {}), prev.chains.get(key, {})
        if new is old:
            continue
        family, table = key
        changed = []
        for name, c in new.items():
            o = old.get(name)
            if o is c or (o is not None and o == c):
                continue
            changed.append(name)
            if o is not None:
                _uncount(refs, _refs_of(o, family, table))
            refs.update(_refs_of(c, family, table))
            if any(owns_chain(t) and t not in new for t in c.references):
                bad = True
            for n in c.ipsets:
                s = desired.ipsets.get(n)
                if s is None or s.family != family:
                    bad = True
        for name in old.keys() - new.keys():
            _uncount(refs, _refs_of(old[name], family, table))
            removed_chains.append(("c", family, table, name))
        if changed:
            chains[key] = changed
    if any(refs[k] > 0 for k in removed_chains):
        bad = True
    sets = {n: s for n, s in desired.ipsets.items() if _set_differs(s, prev.ipsets.get(n))}
    gone = prev.ipsets.keys() - desired.ipsets.keys()
    for n in gone:
        if refs[("s", 4, n)] > 0 or refs[("s", 6, n)] > 0:
            bad = True
    for n, s in sets.items():
        if refs[("s", 10 - s.family, n)] > 0:  # referenced from the other family
            bad = True
    meta = bool(gone) or _differs(desired.endpoints, prev.endpoints) or any(
        (o := prev.ipsets.get(n)) is None or (o.origin, o.family, o.type) != (s.origin, s.family, s.type)
        for n, s in sets.items()
    )
    if bad or desired.hooks != prev.hooks:
        _validate(desired)  # raises with the offending names
    else:
        for hook in desired.hooks:  # cheap: a handful of hooks
            if not any(hook.target in desired.table(f, hook.table) for f in (4, 6)):
                _validate(desired)
    return _Delta(prev, refs, chains, sets, meta)


def _hooks(desired: DesiredState, family: int, kept: _Kept | None = None) -> tuple:
    # Hooks apply to both families, but only where their target chain exists (IPv6 may be off),
    # as desired or as a set-aside chain the kernel keeps.
    k = kept or {}
    return tuple(h for h in desired.hooks
                 if h.target in desired.table(family, h.table) or h.target in k.get((family, h.table), ()))


_Kept = dict  # (family, table) -> names of set-aside chains present in the kernel (kept as they are)
CANARY_SET = "pa4t-isolation-canary"  # ours by name (pa4t-: temporary); created and destroyed at once
CANARY_CHAIN = "pa-isolation-canary"
MAX_ISOLATIONS = 8  # isolation rounds per apply (each finds at least one refused object)
_DISPATCH = (CHAIN_FROM_WL_DISPATCH, CHAIN_TO_WL_DISPATCH)


def _is_dispatch(name: str) -> bool:
    # pa-from-wl-dispatch, pa-to-wl-dispatch and their children: every one ends in the
    # fail-closed "unknown interface" deny, so leaving out a goto narrows.
    return name.startswith(_DISPATCH)


_ENDPOINT = ("pa-tw-", "pa-fw-")
_NP_POLICY = ("pa-pi-", "pa-po-")


def _is_endpoint(name: str) -> bool:
    # pa-tw-/pa-fw-: one pod's policy block. Rewritten rather than set aside when a chain it
    # jumps to is, so that nothing else of the pod's (another policy, an admin-tier deny, a
    # label change) is held back at an older, possibly open version (found in review).
    return name.startswith(_ENDPOINT)


_ALLOW_TARGETS = ("pa-cnp-accept",)


def _sets_whose_members_deny(desired: DesiredState) -> set[str]:
    """Sets where one member fewer would let more through: matched (not negated) by a
    rule that denies or passes, or negated by a rule that allows. Every other use (allow
    when in the set; the anti-spoofing drop when not in it) only narrows when a member is
    left out."""
    out: set[str] = set()
    for tbl in desired.chains.values():
        for c in tbl.values():
            for r in c.rules:
                a = r.action
                if a.verb == "NFLOG":
                    continue
                allows = (a.verb in ("ACCEPT", "RETURN") or (a.verb == "MARK" and bool(a.mark and a.mark[0]))
                          or a.chain_target in _ALLOW_TARGETS)
                m = r.match
                for name, negated in ((m.src_set, m.src_set_negate), (m.dst_set, m.dst_set_negate),
                                      (m.dst_ipport_set, False), (m.src_iface_set, m.src_iface_set_negate)):
                    if name and negated == allows:
                        out.add(name)
    return out


def _without_absent_targets(c: Chain, aside: set[str], present: set[str]) -> Chain:
    """``c`` with each jump to an absent set-aside chain made fail-closed: a NetworkPolicy
    chain only adds allows, so its jump is left out (the policy allows nothing, and the
    pod's block still ends in its deny); any other target (a ClusterNetworkPolicy tier
    chain may deny) becomes a DROP. A present one keeps its old, enforced version."""
    rules: list[Rule] = []
    for r in c.rules:
        t = r.action.chain_target
        if t is None or t not in aside or t in present:
            rules.append(r)
        elif not t.startswith(_NP_POLICY):
            rules.append(Rule(r.match, Action("DROP"), f"{r.comment} (set aside: {t} refused by the kernel)"))
    return Chain(c.name, tuple(rules))


def _chain_origin(c: Chain) -> str:
    """What a chain stands for, from its rules' comments: the pod of an endpoint
    chain ("<ns>/<pod>: ..."), else the first comment naming an object."""
    comments = [r.comment for r in c.rules if r.comment]
    if c.name.startswith(("pa-tw-", "pa-fw-")):
        for cm in reversed(comments):
            if ": " in cm:
                return "pod " + cm.split(": ", 1)[0]
    for cm in comments:
        if "/" in cm:
            return cm
    return comments[0] if comments else ""


def _err(exc: BaseException) -> str:
    text = exc.stderr if isinstance(exc, CommandError) else str(exc)
    return " ".join(text.split())[:300]


def _bisect(items: Sequence[Any], trial: Callable[[Sequence[Any]], bool]) -> list[Any]:
    """The items whose trial fails on their own: 2 log n trials per culprit. ``trial``
    of a group that passes has applied it (so culprits are found leaves-first)."""
    if not items or trial(items):
        return []
    if len(items) == 1:
        return list(items)
    mid = len(items) // 2
    return _bisect(items[:mid], trial) + _bisect(items[mid:], trial)


@dataclass
class _Aside:
    """One object the kernel refused, kept out until its desired version changes (or a refresh)."""

    kind: str  # "ipset" | "chain"
    name: str
    error: str
    origin: str
    obj: Any  # the refused desired version (IPSet or Chain)
    family: int | None = None
    table: str | None = None


class _StageFailed(Exception):
    """A restore of the fast path failed: ``stage`` "ipset" or "iptables" (``families``)."""

    def __init__(self, stage: str, cause: BaseException, families: tuple[int, ...] = ()):
        super().__init__(str(cause))
        self.stage = stage
        self.cause = cause
        self.families = families


class Dataplane:
    def __init__(
        self,
        netns: str | None = None,
        backend: str = "auto",
        kernel: Kernel | None = None,
        state_path: str | None = None,
        families: tuple[int, ...] = (4, 6),
        retries: int = 5,
        backoff: float = 0.05,
        maxelem: int = ips.DEFAULT_MAXELEM,
        sweep_other_backend: bool = True,
    ):
        self.runner = Runner(netns)
        self.netns = netns
        self._backend_setting = backend
        self._kernel = kernel
        self.state_path = state_path
        self.families = families
        self.retries = retries
        self.backoff = backoff
        self.maxelem = maxelem
        self._sweep_other = sweep_other_backend and kernel is None
        self._ipt: dict[int, dict[str, ipt.KTable]] | None = None
        self._sets: dict[str, ips.KSet] | None = None
        # set name -> the desired members object the kernel set was written from (while
        # the cache is trusted): the next version, derived from it, is written as a change
        self._set_sources: dict[str, AbstractSet[str]] = {}
        self._desired: DesiredState | None = None
        self._sweep_ok = False
        # The last state written completely, with the reference counts of its chains:
        # the kernel cache equals it (plus stale leftovers), so the next apply plans only
        # what differs from it. None: compare everything with the cache.
        self._applied: DesiredState | None = None
        self._refs: Counter | None = None
        self._state_text: str | None = None  # last metadata file content written
        # Sweep back-off, cleared by refresh(): a transaction that deleted stale chains
        # failed (retries keep those chains), and stale sets whose destroy failed.
        self._defer_chain_deletes = False
        self._stale_sets_failed: set[str] = set()
        self._defer_stale = False
        self._stale_due = False  # stale sets left for finish()
        self._idle = threading.Event()  # set: no apply running (a background check may go on)
        self._idle.set()
        self._holds = 0
        self._kept_logged: set[tuple] = set()  # (family, table, chain, referrers) logged once
        # Failure isolation: what the kernel refused, kept out of the writes until its
        # desired version changes or the next refresh (which retries everything).
        self._aside_sets: dict[str, _Aside] = {}
        self._aside_members: dict[str, dict[str, str]] = {}  # set -> {member as desired: error}
        self._aside_chains: dict[tuple[int, str, str], _Aside] = {}
        self._aside_logged: set[tuple] = set()  # (kind, name, member) set aside now, logged once
        self._sets_before: dict[str, ips.KSet] | None = None  # kernel sets before this apply's writes
        self._isolation_restores = 0
        # Drift checks in the background (check_start/check_poll): what each write since a
        # check began touched, so the check ignores what we changed ourselves meanwhile.
        self._write_gen = 0
        self._touched: dict[tuple, int] = {}  # ("s", set) / ("c", family, table, chain) -> gen
        self._void_gen = 0  # the cache was dropped at this gen: checks begun before are void
        self._check_job: _DriftCheck | None = None

    # --- kernel access --------------------------------------------------------

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            self._kernel = SystemKernel(self.runner, detect_backend(self.runner, self._backend_setting))
        return self._kernel

    @property
    def backend(self) -> str:
        return self.kernel.backend

    def read_back(self) -> None:
        """Drop the cache and read the kernel (iptables-save per family, ipset save).

        The three saves run side by side: on an empty node they are most of the
        read-back's cost (process start-up), not the parsing."""
        k = self.kernel
        start = getattr(k, "iptables_save_start", None)
        if start is None:  # e.g. FakeKernel
            self._ipt = {f: ipt.parse_save(k.iptables_save(f)) for f in self.families}
            self._sets = ips.parse_ipset_save(k.ipset_save())
            self._set_sources.clear()
            return
        jobs = [start(f) for f in self.families] + [k.ipset_save_start()]
        texts: list[str] = []
        error: CommandError | None = None
        for job in jobs:  # wait for every one, so none is left running on an error
            try:
                texts.append(job.wait())
            except CommandError as exc:
                error = error or exc
        if error is not None:
            raise error
        self._ipt = {f: ipt.parse_save(t) for f, t in zip(self.families, texts)}
        self._sets = ips.parse_ipset_save(texts[-1])
        self._set_sources.clear()

    def close(self) -> None:
        """End the long-lived restore processes (the kernel keeps every rule)."""
        close = getattr(self._kernel, "close", None)
        if close is not None:
            close()

    def invalidate(self) -> None:
        self._ipt = None
        self._sets = None
        self._set_sources.clear()
        self._applied = None
        self._void_gen = self._write_gen

    # --- public operations ----------------------------------------------------

    def apply(self, desired: DesiredState, allow_sweep: bool = False, defer: bool = False) -> ApplyReport:
        """Program ``desired``. ``allow_sweep``: every source is in sync, remove stale state.
        ``defer``: return at the commit and leave destroying stale sets to ``finish()``."""
        with _gc_paused():
            delta = self._check(desired)
            self._desired = desired
            self._sweep_ok = self._sweep_ok or allow_sweep
            self._defer_stale = defer
            try:
                return self._converge(desired, self._sweep_ok, delta)
            finally:
                self._defer_stale = False

    def _check(self, desired: DesiredState) -> _Delta | None:
        """Validate ``desired``; against the remembered state only what changed."""
        if self._applied is not None and self._refs is not None and self._ipt is not None:
            try:
                return _diff(self._applied, desired, self._refs)
            except ValueError:
                self._applied, self._refs = None, None  # counts half-updated: rebuild next time
                raise
        _validate(desired)
        return None

    def sweep(self) -> ApplyReport:
        """Caller says every source is in sync: remove our stale chains and sets."""
        if self._desired is None:
            raise DataplaneError("sweep() before the first apply(): nothing is known to be desired")
        self._sweep_ok = True
        return self._converge(self._desired, True, self._check(self._desired))

    def refresh(self) -> ApplyReport:
        """Re-read the kernel and repair whatever someone else changed; logs each repair."""
        if self._desired is None:
            return ApplyReport(backend=self.backend)
        self.invalidate()
        self._defer_chain_deletes = False  # try the sweep again
        self._stale_sets_failed.clear()
        self._clear_aside()  # retry everything the kernel refused: it heals once the input is fixed
        report = self._converge(self._desired, self._sweep_ok, None)
        if report.changed:
            log.warning("dataplane_repaired", netns=self.netns, **report.log_fields())
        else:
            log.debug("dataplane_refresh_clean", netns=self.netns)
        return report

    def _pause_check(self) -> None:
        # Bounded: a check under a constant stream of applies still ends.
        self._idle.wait(CHECK_PAUSE_MAX_S)

    def check_start(self) -> bool:
        """Begin a drift check: read the kernel in a worker thread and compare it with
        the cache (what we wrote), while applies go on. False if a full ``refresh()`` is
        due instead (nothing cached, something set aside or deferred: a refresh retries
        those) or one is running. ``check_poll()`` collects the result."""
        if self._check_job is not None:
            return True
        if (self._desired is None or self._ipt is None or self._sets is None or self._defer_chain_deletes
                or self._stale_sets_failed or self._aside_sets or self._aside_members or self._aside_chains):
            return False
        self._write_gen += 1
        threaded = getattr(self.kernel, "iptables_save_start", None) is not None
        self._check_job = _DriftCheck(self.kernel, self.families, self._write_gen, self._sets, self._ipt, threaded,
                                      pause=self._pause_check)
        return True

    def check_poll(self) -> ApplyReport | None:
        """None while the check runs. Then: the kernel matched the cache (an empty
        report), or it did not, where nothing of ours wrote since the check began: then
        a full ``refresh()`` repairs it (its report). A check voided by an invalidation
        meanwhile, or that failed to read, ends with a full refresh too."""
        job = self._check_job
        if job is None or not job.done.is_set():
            return None
        self._check_job = None
        if job.error is not None or self._void_gen >= job.gen:
            if job.error is not None:
                log.warning("dataplane_drift_check_failed", netns=self.netns, error=str(job.error))
            return self.refresh()
        drift = sorted(k for k in job.differs if self._touched.get(k, 0) < job.gen)
        # forget what no check running from now on can need
        self._touched = {k: g for k, g in self._touched.items() if g > job.gen}
        if drift:
            log.info("dataplane_drift_found", netns=self.netns, objects=len(drift),
                     examples=[":".join(map(str, k)) for k in drift[:5]])
            return self.refresh()
        log.debug("dataplane_check_clean", netns=self.netns, seconds=round(job.seconds, 3))
        return ApplyReport(backend=self.backend)

    def _touch(self, keys: Iterable[tuple]) -> None:
        gen = self._write_gen
        for k in keys:
            self._touched[k] = gen

    def cleanup(self) -> ApplyReport:
        """Remove every chain, rule and set of ours (both families, both backends)."""
        report = ApplyReport(backend=self.backend)
        kernels: list[Kernel] = [self.kernel]
        if self._sweep_other:
            other = other_backend(self.backend)
            if other == "nft" or legacy_available():
                kernels.append(SystemKernel(self.runner, other))
        for k in kernels:
            for family in self.families:
                tables = ipt.parse_save(k.iptables_save(family))
                text = "".join(ipt.cleanup_table(t).restore_text() for t in tables.values())
                for t in tables.values():
                    report.chains_deleted += [f"{k.backend}:v{family}:{c}" for c in ipt.cleanup_table(t).deleted]
                if text:
                    k.iptables_restore(family, text)
                    report.iptables_lines += _count(text)
                    report.restore_calls += 1
        sets = ips.parse_ipset_save(self.kernel.ipset_save())
        if sets:
            self._settle()
            plan = ips.plan_destroy(sets)
            self.kernel.ipset_restore(plan.restore_text())
            report.ipset_lines += len(plan.lines)
            report.ipsets_destroyed = sorted(sets)
        if self.state_path and os.path.exists(self.state_path):
            os.unlink(self.state_path)
        self._state_text = None
        self.invalidate()
        self._desired = None
        log.info("dataplane_cleaned_up", netns=self.netns, **report.log_fields())
        return report

    # --- the convergence loop -------------------------------------------------

    def _converge(self, desired: DesiredState, sweep: bool, delta: _Delta | None) -> ApplyReport:
        with _gc_paused(), self.checks_held():
            return self._converge_gc_paused(desired, sweep, delta)

    @contextlib.contextmanager
    def checks_held(self) -> Iterator[None]:
        """A background drift check pauses for the block (re-entrant). Its parsing is pure
        Python: running beside an apply, it took the interpreter lock for up to the
        switch interval (5 ms) every time the apply waited for the kernel, tens of ms an
        event (issue 13). The agent holds checks over compile and apply."""
        self._holds += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._idle.set()

    def _converge_gc_paused(self, desired: DesiredState, sweep: bool, delta: _Delta | None) -> ApplyReport:
        start = time.monotonic()
        self._write_gen += 1  # writes from here on are newer than any check already running
        delay = self.backoff
        last: Exception | None = None
        self._sets_before = None
        self._isolation_restores = 0
        attempt = isolations = 0
        while attempt < self.retries:
            attempt += 1
            report = ApplyReport(backend=self.backend, attempts=attempt)
            if self._applied is None or delta is None or delta.prev is not self._applied:
                delta = None  # nothing remembered (first apply, refresh, retry): compare everything
            try:
                self._apply_once(desired, sweep, report, delta)
            except (CommandError, _StageFailed) as exc:
                cause = exc.cause if isinstance(exc, _StageFailed) else exc
                last = cause
                log.warning("dataplane_write_failed", netns=self.netns, attempt=attempt, error=str(cause))
                self.invalidate()
                if isinstance(exc, _StageFailed) and isolations < MAX_ISOLATIONS:
                    try:
                        found = self._isolate(desired, exc)
                    except CommandError as iso_exc:  # e.g. a save failed: retry as before
                        log.warning("dataplane_isolation_failed", netns=self.netns, error=str(iso_exc))
                        found = False
                    self.invalidate()
                    if found:  # progress: apply the rest now, without spending an attempt
                        isolations += 1
                        attempt -= 1
                        continue
                time.sleep(delay)
                delay *= 2
                continue
            report.seconds = time.monotonic() - start
            report.isolation_restores = self._isolation_restores
            report.set_aside = self._aside_report(desired)
            degraded = bool(self._aside_sets or self._aside_members or self._aside_chains)
            # Degraded: the kernel differs from ``desired`` on purpose, so the next apply
            # compares everything with the kernel (by hash) instead of with ``desired``.
            self._refs = None if degraded else (delta.refs if delta is not None else _build_refs(desired))
            self._applied = None if degraded else desired
            if delta is None or delta.meta_changed or self._state_text is None:
                self._write_state(desired)
            if report.changed:
                log.info("dataplane_applied", netns=self.netns, **report.log_fields())
            return report
        log.error("dataplane_apply_gave_up", netns=self.netns, attempts=self.retries, error=str(last))
        raise DataplaneError(f"dataplane apply failed after {self.retries} attempts: {last}") from last

    def _apply_once(self, desired: DesiredState, sweep: bool, report: ApplyReport, delta: _Delta | None) -> None:
        fresh = self._ipt is None or self._sets is None
        if fresh:
            self.read_back()
        assert self._ipt is not None and self._sets is not None
        if self._sets_before is None:
            self._sets_before = dict(self._sets)
        # Without anything set aside this is ``desired`` itself (the fast path). One local
        # only: tracebacks render locals, and a DesiredState renders large.
        desired, keep = self._effective(desired)

        # 1. ipsets first: every set a rule will reference exists and is filled. The
        # batch is streamed to one ``ipset restore`` set by set as it is planned, and
        # runs on while the iptables transactions are planned (2 cores: the planner
        # and ipset overlap); the iptables restores start only after it succeeded,
        # unless the ipset batch is long and no chain they write uses a set it writes
        # (then the order cannot matter to those rules: docs/decisions/event-latency-50k.md).
        # A short one is waited for: a process that exits after our commit deleted rules
        # waits in its exit for the kernel to free them (nftgen.py), 10-40 ms an event.
        feed = _IpsetFeed(self.kernel)
        try:
            plan = ips.plan_ipsets(desired.ipsets if delta is None else delta.sets, self._sets, self.maxelem,
                                   emit=feed.write, sources=self._set_sources)
        except ValueError as exc:  # a member we cannot even parse: isolate it like a refused one
            # Sets streamed before it may be written (ipset restore is not atomic anyway):
            # the isolation re-reads the kernel and puts back what was there before.
            feed.abandon()
            raise _StageFailed("ipset", exc) from exc
        ipset_job = feed.finish()

        # 2./3. one transaction per table, one restore per family.
        todo: list[tuple[int, list[ipt.TablePlan], str]] = []
        kept: list[tuple[int, ipt.TablePlan]] = []
        jobs: list[Any] | None = None
        try:
            for family in self.families:
                tables = self._ipt[family]
                hooks = _hooks(desired, family, keep)
                names = {t for (f, t) in desired.chains if f == family} | {h.table for h in hooks}
                names |= {n for n, t in tables.items() if n not in names and _has_ours(t)}
                plans = []
                for t in sorted(names):
                    only = None if delta is None else delta.chains.get((family, t), ())
                    plans.append(ipt.plan_table(t, desired.table(family, t), hooks, tables.get(t), sweep, only=only,
                                                delete_chains=not self._defer_chain_deletes,
                                                keep=keep.get((family, t), ())))
                kept += [(family, p) for p in plans if p.kept_referenced]
                text = "".join(p.restore_text() for p in plans)
                if text:
                    todo.append((family, plans, text))
            if (ipset_job is not None and todo and len(plan.lines) >= OVERLAP_MIN_LINES
                    and not (_sets_used(desired, todo) & _sets_written(plan))):
                jobs = []
                try:
                    for family, _p, text in todo:
                        jobs.append(_start_iptables(self.kernel, family, text))
                except BaseException:
                    for job in jobs:  # never leave a started restore unwaited
                        _wait(job)
                    raise
        finally:
            if ipset_job is not None:
                try:
                    ipset_job.wait()  # nothing of iptables was written, or nothing that uses these sets
                except CommandError as exc:
                    for job in jobs or ():
                        try:
                            job.wait()  # never leave a restore running; the retry re-reads both
                        except CommandError:
                            pass
                    raise _StageFailed("ipset", exc) from exc
                # Written: the cache says so even if planning raised meanwhile.
                report.ipset_lines += len(plan.lines)
                report.restore_calls += 1
                report.ipsets_created, report.ipsets_updated = plan.created, plan.updated
                report.ipsets_swapped = plan.swapped
                for name, members in plan.members.items():
                    s = desired.ipsets[name]
                    self._sets[name] = ips.KSet(name, s.type, s.family, self.maxelem, members)
                    self._set_sources.pop(name, None)
                for name, (adds, dels) in plan.changes.items():
                    # A new set object: _sets_before may hold the old one (isolation restores it).
                    k = self._sets[name]
                    members = set(k.members)
                    members.difference_update(dels)
                    members.update(adds)
                    self._sets[name] = ips.KSet(name, k.type, k.family, k.maxelem, members)
                self._set_sources.update(plan.sources)
                if self._check_job is not None:
                    self._touch(("s", n) for n in [*plan.members, *plan.changes])

        # The families are independent tables: their restore processes run side by side.
        # Not batches fed to long-lived restores: those commit in a millisecond or two, and
        # two commits at once make the second re-read its table (the kernel's generation
        # changed under it), which costs more than waiting for the first.
        errors = []
        failed_families = []
        outcome: dict[int, CommandError | None] = {}
        if jobs is None:
            jobs = []
            for family, _p, text in todo:
                job = _start_iptables(self.kernel, family, text)
                jobs.append(job)
                if getattr(job, "quick", False):
                    outcome[family] = _wait(job)
        for job, (family, _p, _t) in zip(jobs, todo):
            exc = outcome[family] if family in outcome else _wait(job)
            if exc is not None:
                errors.append(exc)
                failed_families.append(family)
        if errors:
            if fresh and any(p.deleted for _f, plans, _t in todo for p in plans):
                # Planned from what we just read, yet it failed: deleting a stale chain may be
                # what failed (a writer we cannot see, a race): keep stale chains until the next
                # refresh so the rest applies. (Planned from the cache, a jump to a stale chain
                # may simply be new to us: the retry re-reads and keeps that chain.)
                self._defer_chain_deletes = True
                log.warning("dataplane_chain_sweep_deferred", netns=self.netns, error=str(errors[0]))
            # The caller drops the cache and re-reads (one family may be written) and
            # looks for the chains the kernel refuses.
            raise _StageFailed("iptables", errors[0], tuple(failed_families))
        for family, plans, text in todo:
            tables = self._ipt[family]
            report.iptables_lines += _count(text)
            report.restore_calls += 1
            for p in plans:
                if p.lines and self._check_job is not None:
                    self._touch(("c", family, p.table, c)
                                for c in [*p.created, *p.rewritten, *p.deleted, *p.hooks_repaired])
                if p.lines:
                    report.chains_created += [f"v{family}:{c}" for c in p.created]
                    report.chains_rewritten.update({f"v{family}:{c}": n for c, n in p.rewritten.items() if c not in p.created})
                    report.chains_deleted += [f"v{family}:{c}" for c in p.deleted]
                    report.hooks_repaired += [f"v{family}:{p.table}:{c}" for c in p.hooks_repaired]
                    tables[p.table] = _update_model(tables.get(p.table), p, desired, family, keep)

        for family, p in kept:
            self._log_kept(family, p)

        # 4. stale sets, only once nothing of ours or anyone else's references them.
        if sweep:
            stale = self._stale_sets(desired)
            if stale and self._defer_stale:
                # The rules that used them are deleted but maybe not yet freed (nftgen.settle):
                # the caller reports the commit first, then calls finish().
                self._stale_due = True
            elif stale:
                self._destroy_sets(stale, report)
            # 5. once per process: our leftovers in the other backend.
            if self._sweep_other:
                self._sweep_other = False
                try:
                    report.other_backend_cleaned = self._clean_other_backend()
                except CommandError as exc:  # not worth failing our own apply for
                    log.warning("dataplane_other_backend_cleanup_failed", netns=self.netns, error=str(exc))

    def _stale_sets(self, desired: DesiredState) -> list[str]:
        """Our sets in the kernel that nothing desired, and no rule in the kernel, uses."""
        assert self._sets is not None and self._ipt is not None
        # Stale: not desired at all (``self._desired``: a set set aside is still desired).
        wanted = self._desired.ipsets if self._desired is not None else desired.ipsets
        stale = sorted(n for n in self._sets if n not in wanted)
        if not stale:
            return stale
        # Desired chains reference desired sets only (validated); anything else in the
        # kernel (foreign rules, stale chains kept because something jumps to them) may not.
        referenced = {
            s
            for (f, tables) in self._ipt.items()
            for tname, t in tables.items()
            for c in t.chains.values()
            if c.name not in desired.table(f, tname)
            for r in c.rules
            for s in r.ipsets
        }
        return [n for n in stale if n not in referenced and n not in self._stale_sets_failed]

    def _settle(self) -> None:
        settle = getattr(self.kernel, "settle", None)
        if settle is not None:
            settle()

    def finish(self) -> ApplyReport | None:
        """What an ``apply(..., defer=True)`` left for after its commit was reported: have
        the kernel free the rules it deleted (else the next process to close a netfilter
        socket, such as the next event's ``ipset restore``, waits for that), and destroy
        the sets it made stale."""
        self._settle()
        if not self._stale_due:
            return None
        self._stale_due = False
        if self._sets is None or self._ipt is None or self._desired is None:
            return None  # invalidated meanwhile: the next apply re-reads and sweeps
        report = ApplyReport(backend=self.backend)
        stale = self._stale_sets(self._effective(self._desired)[0])
        if stale:
            self._destroy_sets(stale, report)
            log.info("dataplane_stale_sets_destroyed", netns=self.netns, **report.log_fields())
        return report

    def _destroy_sets(self, stale: list[str], report: ApplyReport) -> None:
        """Destroy stale sets; a failure never fails the apply. Something we cannot see
        may still use a set (a rule in the other iptables backend or family, another
        program): ``ipset restore`` stops at the first such set, so the rest are tried
        one by one and the ones that fail are kept until the next refresh."""
        assert self._sets is not None
        self._settle()  # the rules that used them are freed, not only deleted
        dplan = ips.plan_destroy(stale)
        try:
            self.kernel.ipset_restore(dplan.restore_text())
            done = stale
        except CommandError as exc:
            log.warning("dataplane_ipset_destroy_failed", netns=self.netns, sets=len(stale), error=str(exc))
            try:
                left = ips.parse_ipset_save(self.kernel.ipset_save())
            except CommandError:
                left = {n: self._sets[n] for n in stale}
            done = [n for n in stale if n not in left]
            for n in [n for n in stale if n in left]:
                try:
                    self.kernel.ipset_restore(ips.plan_destroy([n]).restore_text())
                    done.append(n)
                except CommandError as exc1:
                    self._stale_sets_failed.add(n)
                    log.warning("dataplane_stale_ipset_kept", netns=self.netns, ipset=n, error=str(exc1))
            done.sort()
        report.ipset_lines += len(done)
        report.restore_calls += 1
        report.ipsets_destroyed = done
        for n in done:
            self._sets.pop(n, None)
            self._set_sources.pop(n, None)
        if self._check_job is not None:
            self._touch(("s", n) for n in done)

    def _log_kept(self, family: int, plan: ipt.TablePlan) -> None:
        for name, referrers in plan.kept_referenced.items():
            key = (family, plan.table, name, tuple(referrers))
            if key in self._kept_logged:
                continue
            self._kept_logged.add(key)
            if referrers:
                log.warning("dataplane_stale_chain_kept", netns=self.netns, family=family, table=plan.table,
                            chain=name, referenced_by=referrers)
            else:
                log.warning("dataplane_stale_chain_kept", netns=self.netns, family=family, table=plan.table,
                            chain=name, reason="chain deletes deferred after a failed transaction")

    def _clean_other_backend(self) -> int:
        other = other_backend(self.backend)
        if other == "legacy" and not legacy_available():
            return 0
        k = SystemKernel(self.runner, other)
        written = 0
        for family in self.families:
            try:
                tables = ipt.parse_save(k.iptables_save(family))
            except CommandError:
                continue
            text = "".join(ipt.cleanup_table(t).restore_text() for t in tables.values())
            if text:
                k.iptables_restore(family, text)
                written += _count(text)
                log.warning("dataplane_other_backend_cleaned", backend=other, family=family, lines=written)
        return written

    # --- failure isolation ----------------------------------------------------

    def _clear_aside(self) -> None:
        self._aside_sets.clear()
        self._aside_members.clear()
        self._aside_chains.clear()

    def _effective(self, desired: DesiredState) -> tuple[DesiredState, _Kept]:
        """``desired`` minus what is set aside, and the set-aside chains the kernel keeps.

        Entries whose desired version changed (or went) are dropped first: they are
        tried again. Needs the kernel cache (presence decides dispatch pruning)."""
        for n, e in list(self._aside_sets.items()):
            if desired.ipsets.get(n) != e.obj:
                del self._aside_sets[n]
        for n, refused in list(self._aside_members.items()):
            s = desired.ipsets.get(n)
            still = {m: err for m, err in refused.items() if s is not None and m in s.members}
            if still:
                self._aside_members[n] = still
            else:
                del self._aside_members[n]
        for k, e in list(self._aside_chains.items()):
            if desired.table(k[0], k[1]).get(k[2]) != e.obj:
                del self._aside_chains[k]
        if not (self._aside_sets or self._aside_members or self._aside_chains):
            return desired, {}
        assert self._ipt is not None
        ipsets = {n: s for n, s in desired.ipsets.items() if n not in self._aside_sets}
        for n, refused in self._aside_members.items():
            if n in ipsets:
                s = ipsets[n]
                # A new value, not a change of the desired set's base: no delta carried.
                ipsets[n] = IPSet(s.name, s.family, s.type, frozenset(m for m in s.members if m not in refused), s.origin)
        chains: dict[tuple[int, str], dict[str, Chain]] = {}
        kept: _Kept = {}
        for (family, table), tbl in desired.chains.items():
            aside, _why = self._closure(desired, family, table)
            if not aside:
                chains[(family, table)] = dict(tbl)
                continue
            have = self._ipt.get(family, {}).get(table)
            present = set(have.chains) if have is not None else set()
            out: dict[str, Chain] = {}
            for name, c in tbl.items():
                if name in aside:
                    continue
                if _is_dispatch(name) and c.references & aside:
                    # A goto to an absent set-aside chain cannot be written; without it the
                    # interface falls through to the "unknown interface" deny (fail closed).
                    # A present one keeps its old, enforced version: the goto stays.
                    c = Chain(name, tuple(r for r in c.rules
                                          if not (r.action.chain_target in aside and r.action.chain_target not in present)))
                elif _is_endpoint(name) and c.references & aside:
                    c = _without_absent_targets(c, aside, present)
                out[name] = c
            chains[(family, table)] = out
            kept[(family, table)] = {n for n in aside if n in present}
        eff = DesiredState(chains=chains, hooks=desired.hooks, ipsets=ipsets, endpoints=desired.endpoints)
        return eff, kept

    def _closure(self, desired: DesiredState, family: int, table: str) -> tuple[set[str], dict[str, str]]:
        """Chains of one table set aside, with why: refused themselves, referencing a
        set-aside set, or (not dispatch nor endpoint chains) jumping to a set-aside chain."""
        tbl = desired.table(family, table)
        why: dict[str, str] = {}
        for (f, t, n), e in self._aside_chains.items():
            if (f, t) == (family, table):
                why[n] = e.error
        if self._aside_sets:
            for n, c in tbl.items():
                bad = sorted(c.ipsets & self._aside_sets.keys())
                if bad and n not in why:
                    why[n] = f"references set-aside ipset {bad[0]}"
        if not why:
            return set(), why
        referrers: dict[str, list[str]] = {}
        for n, c in tbl.items():
            for t in c.references:
                referrers.setdefault(t, []).append(n)
        todo = list(why)
        while todo:
            x = todo.pop()
            for r in referrers.get(x, ()):
                if r not in why and not _is_dispatch(r) and not _is_endpoint(r):
                    why[r] = f"jumps to set-aside chain {x}"
                    todo.append(r)
        return set(why), why

    def _aside_report(self, desired: DesiredState) -> list[dict[str, Any]]:
        """Everything set aside now (logged once per name and error). Chains set aside only
        by reference are listed when their kernel version differs from the desired one."""
        out: list[dict[str, Any]] = []
        for n, e in sorted(self._aside_sets.items()):
            out.append({"kind": "ipset", "name": n, "family": e.obj.family, "origin": e.origin, "error": e.error})
        for n, refused in sorted(self._aside_members.items()):
            s = desired.ipsets[n]
            for m, err in sorted(refused.items()):
                out.append({"kind": "member", "name": n, "member": m, "family": s.family, "origin": s.origin,
                            "error": err})
        if self._aside_sets or self._aside_chains:
            for (family, table), tbl in sorted(desired.chains.items()):
                aside, why = self._closure(desired, family, table)
                have = (self._ipt or {}).get(family, {}).get(table) if self._ipt is not None else None
                for n in sorted(aside):
                    k = have.chains.get(n) if have is not None else None
                    if (family, table, n) not in self._aside_chains and k is not None and \
                            [r.hash for r in k.rules] == list(tbl[n].hashes):
                        continue  # the kernel has the desired version: nothing held back
                    out.append({"kind": "chain", "name": n, "family": family, "table": table,
                                "origin": _chain_origin(tbl[n]), "error": why[n]})
        # Keyed without the error text (it carries restore line numbers, which move with
        # every other change) and only for what is set aside now: bounded, and logged again
        # only when an object is set aside anew.
        now = {(d["kind"], d["name"], d.get("member")) for d in out}
        for d in out:
            key = (d["kind"], d["name"], d.get("member"))
            if key not in self._aside_logged:
                log.warning("dataplane_set_aside", netns=self.netns, **d)
        self._aside_logged = now
        return out

    def _isolate(self, desired: DesiredState, failure: _StageFailed) -> bool:
        """Find what the kernel refused in the failed stage; True if something new was set aside.
        Trials that pass are applied on the way (leaves first: sets, then chains by layer)."""
        self.read_back()
        if not self._canary(failure):
            # The kernel refuses even a trivial batch: not one object's fault (no ipset
            # module, a lock, a dying netns). Nothing is set aside: retry, then error.
            log.warning("dataplane_isolation_skipped", netns=self.netns, stage=failure.stage,
                        reason="a trivial batch fails too", error=_err(failure.cause))
            return False
        if failure.stage == "ipset":
            return self._isolate_sets(desired)
        found = False
        for family in failure.families:
            found |= self._isolate_chains(desired, family)
        return found

    def _canary(self, failure: _StageFailed) -> bool:
        """Does the kernel take a trivial batch of the failed kind (create and remove a
        scratch set or chain)? Only then can a refusal be pinned on an object."""
        self._isolation_restores += 1
        try:
            if failure.stage == "ipset":
                self.kernel.ipset_restore(f"create {CANARY_SET} hash:net family inet\ndestroy {CANARY_SET}\n")
            else:
                for family in failure.families:
                    self.kernel.iptables_restore(family, f"*filter\n:{CANARY_CHAIN} - [0:0]\n-X {CANARY_CHAIN}\nCOMMIT\n")
        except CommandError:
            return False
        return True

    def _isolate_sets(self, desired: DesiredState) -> bool:
        assert self._sets is not None
        eff, _kept = self._effective(desired)
        names = []
        for n in sorted(eff.ipsets):
            try:
                if ips.plan_ipsets({n: eff.ipsets[n]}, self._sets, self.maxelem).lines:
                    names.append(n)
            except ValueError:
                names.append(n)
        errors: dict[str, str] = {}
        bad = _bisect(names, lambda group: self._try_sets(eff.ipsets, group, errors))
        deny_used = _sets_whose_members_deny(desired) if bad else set()
        for n in bad:
            self._isolate_members(desired.ipsets[n], eff.ipsets[n], errors.get(n, ""), n in deny_used)
        return bool(bad)

    def _try_sets(self, sets: dict[str, IPSet], group: Sequence[str], errors: dict[str, str]) -> bool:
        assert self._sets is not None
        try:
            plan = ips.plan_ipsets({n: sets[n] for n in group}, self._sets, self.maxelem)
        except ValueError as exc:
            if len(group) == 1:
                errors[group[0]] = _err(exc)
            return False
        if not plan.lines:
            return True
        self._isolation_restores += 1
        try:
            self.kernel.ipset_restore(plan.restore_text())
        except CommandError as exc:
            if len(group) == 1:
                errors[group[0]] = _err(exc)
            # ipset restore is not atomic (and batches): re-read what it left.
            self._sets = ips.parse_ipset_save(self.kernel.ipset_save())
            return False
        for name, members in plan.members.items():
            s = sets[name]
            self._sets[name] = ips.KSet(name, s.type, s.family, self.maxelem, members)
        return True

    def _isolate_members(self, orig: IPSet, s: IPSet, error: str, deny_used: bool = False) -> None:
        """Which members of one set the kernel refuses, found in a scratch set; they are
        left out, unless leaving one out would widen (a ``nomatch``: an except of a block;
        or any member of a set a deny or pass rule matches: ``deny_used``) or the set
        cannot be created at all: then the whole set is set aside."""
        assert self._sets is not None
        if not owns_ipset(s.name):
            return self._set_aside_set(orig, f"not one of our ipsets: {error}")
        tmp = temp_ipset_name(s.name)
        refused: dict[str, str] = {}
        pairs: list[tuple[str, str]] = []
        for m in sorted(s.members):
            try:
                pairs.append((m, ips.canon_member(s.type, m)))
            except ValueError as exc:
                refused[m] = f"cannot parse member: {exc}"
        if tmp in self._sets:
            self._quiet_restore(f"destroy {tmp}\n")
        head = f"create {tmp} {s.type} family {s.inet} maxelem {self.maxelem} -exist\nflush {tmp}\n"
        errors: dict[str, str] = {}

        def probe(group: Sequence[tuple[str, str]]) -> bool:
            self._isolation_restores += 1
            try:
                self.kernel.ipset_restore(head + "".join(f"add {tmp} {c}\n" for _m, c in group))
                return True
            except CommandError as exc:
                if len(group) == 1:
                    errors[group[0][0]] = _err(exc)
                return False

        try:
            if not probe([]):
                return self._set_aside_set(orig, error or "set cannot be created")
            for m, _c in _bisect(pairs, probe):
                refused[m] = errors.get(m, error)
        finally:
            self._quiet_restore(f"destroy {tmp}\n")
        nomatch = sorted(m for m in refused if "nomatch" in m.split()[1:])
        if nomatch:
            return self._set_aside_set(orig, f"member {nomatch[0]!r} refused: {refused[nomatch[0]]}")
        if refused and deny_used:
            first = sorted(refused)[0]
            return self._set_aside_set(orig, f"member {first!r} refused: {refused[first]} (a deny or pass rule "
                                             "matches this set: leaving the member out would widen)")
        if not refused:  # every member passes alone, yet the set fails: keep its old version
            return self._set_aside_set(orig, error or "refused")
        self._aside_members.setdefault(s.name, {}).update(refused)

    def _set_aside_set(self, s: IPSet, error: str) -> None:
        """Keep the kernel's previous version of the set (or none): a failed batch may
        have changed it part way, so put back what was there before this apply."""
        assert self._sets is not None
        self._aside_sets[s.name] = _Aside("ipset", s.name, error, s.origin, s)
        self._aside_members.pop(s.name, None)
        before = (self._sets_before or {}).get(s.name)
        now = self._sets.get(s.name)
        if before is None:
            if now is not None:
                self._quiet_restore(f"destroy {s.name}\n")
            return
        if now is not None and (now.type, now.family, now.members) == (before.type, before.family, before.members):
            return
        old = IPSet(s.name, before.family, before.type, frozenset(before.members), s.origin)
        try:
            self._quiet_restore(ips.plan_ipsets({s.name: old}, self._sets, before.maxelem).restore_text())
        except ValueError:
            pass

    def _quiet_restore(self, text: str) -> None:
        """Best effort (scratch sets, putting an old version back): logged, never raised."""
        if not text:
            return
        self._isolation_restores += 1
        try:
            self.kernel.ipset_restore(text)
        except CommandError as exc:
            log.warning("dataplane_isolation_cleanup_failed", netns=self.netns, error=_err(exc))

    def _isolate_chains(self, desired: DesiredState, family: int) -> bool:
        """Chains of one family the kernel refuses: per table, by dependency layer (a
        chain after every chain it jumps to), bisecting each layer."""
        assert self._ipt is not None
        found = False
        for table in sorted({t for (f, t) in desired.chains if f == family}):
            eff, _kept = self._effective(desired)
            tbl = eff.table(family, table)
            have = self._ipt[family].get(table) or ipt.KTable(table)
            todo = [n for n, c in tbl.items() if n not in have.chains or ipt.plan_chain(c, have.chains[n])]
            for layer in _layers(tbl, todo):
                eff, _kept = self._effective(desired)  # earlier layers' culprits prune this one
                tbl = eff.table(family, table)
                errors: dict[str, str] = {}
                cands = [n for n in layer if n in tbl]
                def trial(group: Sequence[str], t: str = table, chains: dict = tbl, e: dict = errors) -> bool:
                    return self._try_chains(family, t, chains, group, e)

                for n in _bisect(cands, trial):
                    c = desired.table(family, table)[n]
                    self._aside_chains[(family, table, n)] = _Aside(
                        "chain", n, errors.get(n, "refused"), _chain_origin(c), c, family, table)
                    found = True
        return found

    def _try_chains(self, family: int, table: str, tbl: dict[str, Chain], group: Sequence[str],
                    errors: dict[str, str]) -> bool:
        assert self._ipt is not None
        have = self._ipt[family].get(table)
        plan = ipt.plan_table(table, tbl, (), have, sweep=False, only=group)
        text = plan.restore_text()
        if not text:
            return True
        self._isolation_restores += 1
        try:
            self.kernel.iptables_restore(family, text)
        except CommandError as exc:  # one table: atomic, nothing changed
            if len(group) == 1:
                errors[group[0]] = _err(exc)
            return False
        part = DesiredState(chains={(family, table): tbl})
        self._ipt[family][table] = _update_model(have, plan, part, family)
        return True

    # --- metadata for dump ----------------------------------------------------

    _ep_docs: dict | None = None  # LocalEndpoint -> its asdict(), for the state file

    def _write_state(self, desired: DesiredState) -> None:
        if not self.state_path:
            return
        # Per endpoint once (asdict is slow), and without indent so json uses its C
        # encoder: this ran after every apply and cost ~0.1 s at 50k pods (issue 13).
        ep_docs = self._ep_docs if self._ep_docs is not None else {}
        self._ep_docs = {e: ep_docs.get(e) or asdict(e) for e in desired.endpoints}
        doc = {
            "backend": self.backend,
            "ipsets": {n: {"origin": s.origin, "family": s.family, "type": s.type} for n, s in sorted(desired.ipsets.items())},
            "endpoints": [self._ep_docs[e] for e in desired.endpoints],
        }
        text = json.dumps(doc, sort_keys=True)
        if text == self._state_text:
            return
        if self._state_text is None:
            try:
                with open(self.state_path) as f:
                    if f.read() == text:
                        self._state_text = text
                        return
            except FileNotFoundError:
                pass
        # The shared atomic write: a random temp name in the same directory (mkstemp:
        # O_EXCL, never follows a planted symlink), fsync, rename.
        atomic_write(self.state_path, text)
        self._state_text = text


def _layers(tbl: dict[str, Chain], names: list[str]) -> list[list[str]]:
    """``names`` in dependency layers: each chain after every chain of ``names`` it jumps to."""
    todo = set(names)
    depth: dict[str, int] = {}

    def d(n: str, seen: frozenset = frozenset()) -> int:
        if n not in depth:
            refs = [t for t in tbl[n].references if t in todo and t != n and t not in seen]
            depth[n] = 1 + max((d(t, seen | {n}) for t in refs), default=-1)
        return depth[n]

    out: dict[int, list[str]] = {}
    for n in sorted(todo):
        out.setdefault(d(n), []).append(n)
    return [out[k] for k in sorted(out)]


def _count(text: str) -> int:
    """Kernel lines written: rule/chain lines, not the *table/COMMIT framing."""
    return sum(1 for ln in text.splitlines() if ln and not ln.startswith("*") and ln != "COMMIT")


# The longest a background drift check waits for an apply to end, between two steps.
CHECK_PAUSE_MAX_S = 1.0

# An ipset batch this long runs beside the iptables restores (when independent).
OVERLAP_MIN_LINES = 1000


def _sets_used(desired: DesiredState, todo: list[tuple[int, list[ipt.TablePlan], str]]) -> set[str]:
    """Sets referenced by the chains these restores create or rewrite."""
    out: set[str] = set()
    for family, plans, _text in todo:
        for p in plans:
            tbl = desired.table(family, p.table)
            for name in [*p.created, *p.rewritten]:
                c = tbl.get(name)
                if c is not None:
                    out |= c.ipsets
    return out


def _sets_written(plan: ips.IpsetPlan) -> set[str]:
    return {*plan.members, *plan.changes, *plan.created, *plan.swapped}


def _chain_signatures(tables: Mapping[int, Mapping[str, ipt.KTable]]) -> dict[tuple, tuple]:
    """What a refresh compares, per chain: the rule hashes of our chains, and the
    positions and identities of our rules in anyone's chain (hooks in built-ins)."""
    out: dict[tuple, tuple] = {}
    for family, tbls in tables.items():
        for tname, t in tbls.items():
            for name, c in list(t.chains.items()):
                rules = list(c.rules)
                if owns_chain(name):
                    out[("c", family, tname, name)] = ("-", tuple(r.hash or r.spec for r in rules))
                elif any(r.ours for r in rules):
                    out[("c", family, tname, name)] = (
                        c.policy, tuple((i, r.hash or r.spec) for i, r in enumerate(rules) if r.ours))
    return out


class _DriftCheck:
    """Read the kernel and list what differs from the cache snapshot taken at the start.

    The snapshot is taken in the caller's thread (KSets and chain rule lists are
    replaced, never changed in place, by later applies); the saves, the parse and the
    comparison run in a worker thread, so the loop keeps applying events meanwhile.
    Kernels without the *_start methods (the fake) are checked in the caller's thread."""

    def __init__(self, kernel: Kernel, families: tuple[int, ...], gen: int,
                 sets: Mapping[str, ips.KSet], tables: Mapping[int, Mapping[str, ipt.KTable]], threaded: bool,
                 pause: Callable[[], Any] = lambda: None):
        self.gen = gen
        self._pause = pause if threaded else (lambda: None)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.differs: set[tuple] = set()
        self.seconds = 0.0
        self._sets = dict(sets)
        self._chains = _chain_signatures(tables)
        self._kernel = kernel
        self._families = families
        if threaded:
            threading.Thread(target=self._run, name="dataplane-check", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        t0 = time.monotonic()
        pause = self._pause
        try:
            k = self._kernel
            start = getattr(k, "iptables_save_start", None)
            if start is not None:
                jobs = [start(f) for f in self._families] + [k.ipset_save_start()]
                texts = [j.wait() for j in jobs]
            else:
                texts = [k.iptables_save(f) for f in self._families] + [k.ipset_save()]
            tables = {}
            for f, text in zip(self._families, texts):
                pause()
                tables[f] = ipt.parse_save(text)
            sets = ips.parse_ipset_save(texts[-1], pause=pause)
            pause()
            chains = _chain_signatures(tables)
            self.differs = {key for key in chains.keys() | self._chains.keys()
                            if chains.get(key) != self._chains.get(key)}
            for i, name in enumerate(sets.keys() | self._sets.keys()):
                if i % 16 == 0:
                    pause()
                a, b = sets.get(name), self._sets.get(name)
                if a is None or b is None or (a.type, a.family, a.maxelem) != (b.type, b.family, b.maxelem) \
                        or a.members != b.members:
                    self.differs.add(("s", name))
        except BaseException as exc:  # reported by check_poll; the loop never sees a raise from here
            self.error = exc
        self.seconds = time.monotonic() - t0
        self.done.set()


class _Done:
    """A write that already happened (kernels without the *_start methods, e.g. FakeKernel)."""

    def __init__(self, fn: Any, *args: Any):
        self._exc: CommandError | None = None
        try:
            fn(*args)
        except CommandError as exc:
            self._exc = exc

    def wait(self) -> None:
        if self._exc is not None:
            raise self._exc


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection for the block (re-entrant).

    An apply allocates a lot (rendered lines, the kernel model) but makes no garbage
    cycles worth chasing: without this, the first apply of a fresh process (an agent
    restart, before the agent freezes its heap) ran full collections over the whole
    compiled state in the middle of its writes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _IpsetFeed:
    """The one ``ipset restore`` of an apply, started at the first set's text and fed
    set by set (kernels without ``ipset_restore_stream``: one batch at the end)."""

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self._open = getattr(kernel, "ipset_restore_stream", None)
        self._stream: Any = None
        self._chunks: list[str] = []
        self._settled = False

    def write(self, text: str) -> None:
        if not self._settled and (text.startswith("destroy ") or "\ndestroy " in text):
            # A set recreated (its type changed) may have lost its last rule just now.
            self._settled = True
            settle = getattr(self._kernel, "settle", None)
            if settle is not None:
                settle()
        if self._open is None:
            self._chunks.append(text)
            return
        if self._stream is None:
            self._stream = self._open()
        self._stream.write(text)

    def abandon(self) -> None:
        if self._stream is not None:
            self._stream.kill()
            try:
                self._stream.wait()
            except CommandError:
                pass

    def finish(self) -> Any:
        """The running job (``wait()`` raises CommandError), or None if nothing was planned."""
        if self._stream is not None:
            self._stream.close()
            return self._stream
        return _start_ipset(self._kernel, "".join(self._chunks)) if self._chunks else None


def _wait(job: Any) -> CommandError | None:
    try:
        job.wait()
    except CommandError as exc:
        return exc
    return None


def _start_ipset(kernel: Kernel, text: str) -> Any:
    start = getattr(kernel, "ipset_restore_start", None)
    return start(text) if start else _Done(kernel.ipset_restore, text)


def _start_iptables(kernel: Kernel, family: int, text: str) -> Any:
    start = getattr(kernel, "iptables_restore_start", None)
    return start(family, text) if start else _Done(kernel.iptables_restore, family, text)


def _has_ours(t: ipt.KTable) -> bool:
    """Our chains, or our hooks in a built-in chain (foreign chains are never ours to plan)."""
    return any(owns_chain(n) or (c.builtin and any(r.ours for r in c.rules)) for n, c in t.chains.items())


def _update_model(old: ipt.KTable | None, plan: ipt.TablePlan, desired: DesiredState, family: int,
                  kept: _Kept | None = None) -> ipt.KTable:
    """The cached table as it is after ``plan`` was committed (counters unknown, hashes
    exact), updated in place: only the chains the plan touched are rebuilt."""
    new = old if old is not None else ipt.KTable(plan.table)
    for name in plan.deleted:
        new.chains.pop(name, None)
    chains = desired.table(family, plan.table)
    for name in set(plan.created) | set(plan.rewritten):
        c = chains[name]
        lines = plan.rendered.get(name) or c.render_lines()
        cut = len(f"-A {name} ")
        rules = []
        for ln, h in zip(lines, c.hashes):
            r = ipt.KRule(name, ln[cut:])
            r.__dict__["hash"] = h  # known: no need to parse it back (cached_property slot)
            rules.append(r)
        new.chains[name] = ipt.KChain(name, "-", rules)
    for cname in plan.hooks_repaired:
        kch = new.chains.setdefault(cname, ipt.KChain(cname, "ACCEPT"))
        hooks = [h for h in _hooks(desired, family, kept) if h.table == plan.table and h.chain == cname]
        top = [ipt.KRule(cname, h.render_line()[len(f"-I {cname} 1 "):]) for h in hooks]
        kch.rules = top + [r for r in kch.rules if not r.ours]
    return new
