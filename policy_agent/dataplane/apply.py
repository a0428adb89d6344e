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
* Never flush at start or exit: a new process with the same desired state
  finds every hash in place and writes nothing; a new desired state replaces
  chains atomically per table while the old rules keep enforcing.
* Failures: a failed restore changed nothing in that table; the cache is
  dropped, the kernel re-read, the plan recomputed, and the write retried with
  exponential backoff. After ``retries`` attempts DataplaneError is raised.
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

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane import ipsets as ips
from policy_agent.dataplane.backend import detect_backend, other_backend
from policy_agent.dataplane.kernel import Kernel, SystemKernel, legacy_available
from policy_agent.dataplane.runner import CommandError, Runner
from policy_agent.desired import Chain, DesiredState, IPSet
from policy_agent.shared.naming import owns_chain

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

    @property
    def lines_written(self) -> int:
        return self.iptables_lines + self.ipset_lines

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
            if isinstance(v, (list, dict)) and len(v) > 8:
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
    sets = {n: s for n, s in desired.ipsets.items() if _differs(s, prev.ipsets.get(n))}
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


def _hooks(desired: DesiredState, family: int) -> tuple:
    # Hooks apply to both families, but only where their target chain exists (IPv6 may be off).
    return tuple(h for h in desired.hooks if h.target in desired.table(family, h.table))


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
        self._kept_logged: set[tuple] = set()  # (family, table, chain, referrers) logged once

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
        """Drop the cache and read the kernel (iptables-save per family, ipset save)."""
        self._ipt = {f: ipt.parse_save(self.kernel.iptables_save(f)) for f in self.families}
        self._sets = ips.parse_ipset_save(self.kernel.ipset_save())

    def invalidate(self) -> None:
        self._ipt = None
        self._sets = None
        self._applied = None

    # --- public operations ----------------------------------------------------

    def apply(self, desired: DesiredState, allow_sweep: bool = False) -> ApplyReport:
        """Program ``desired``. ``allow_sweep``: every source is in sync, remove stale state."""
        delta = self._check(desired)
        self._desired = desired
        self._sweep_ok = self._sweep_ok or allow_sweep
        return self._converge(desired, self._sweep_ok, delta)

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
        report = self._converge(self._desired, self._sweep_ok, None)
        if report.changed:
            log.warning("dataplane_repaired", netns=self.netns, **report.log_fields())
        else:
            log.debug("dataplane_refresh_clean", netns=self.netns)
        return report

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
        start = time.monotonic()
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(1, self.retries + 1):
            report = ApplyReport(backend=self.backend, attempts=attempt)
            if self._applied is None or delta is None or delta.prev is not self._applied:
                delta = None  # nothing remembered (first apply, refresh, retry): compare everything
            try:
                self._apply_once(desired, sweep, report, delta)
            except CommandError as exc:
                last = exc
                log.warning("dataplane_write_failed", netns=self.netns, attempt=attempt, error=str(exc))
                self.invalidate()
                time.sleep(delay)
                delay *= 2
                continue
            report.seconds = time.monotonic() - start
            self._refs = delta.refs if delta is not None else _build_refs(desired)
            self._applied = desired
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

        # 1. ipsets first: every set a rule will reference exists and is filled. The
        # batch runs while the iptables transactions are planned (2 cores: the planner
        # and ipset overlap), and the restores start only after it succeeded.
        plan = ips.plan_ipsets(desired.ipsets if delta is None else delta.sets, self._sets, self.maxelem)
        ipset_job = _start_ipset(self.kernel, plan.restore_text()) if plan.lines else None

        # 2./3. one transaction per table, one restore per family.
        todo: list[tuple[int, list[ipt.TablePlan], str]] = []
        kept: list[tuple[int, ipt.TablePlan]] = []
        try:
            for family in self.families:
                tables = self._ipt[family]
                hooks = _hooks(desired, family)
                names = {t for (f, t) in desired.chains if f == family} | {h.table for h in hooks}
                names |= {n for n, t in tables.items() if _has_ours(t)}
                plans = []
                for t in sorted(names):
                    only = None if delta is None else delta.chains.get((family, t), ())
                    plans.append(ipt.plan_table(t, desired.table(family, t), hooks, tables.get(t), sweep, only=only,
                                                delete_chains=not self._defer_chain_deletes))
                kept += [(family, p) for p in plans if p.kept_referenced]
                text = "".join(p.restore_text() for p in plans)
                if text:
                    todo.append((family, plans, text))
        finally:
            if ipset_job is not None:
                ipset_job.wait()  # raises CommandError: nothing of iptables was written
                # Written: the cache says so even if planning raised meanwhile.
                report.ipset_lines += len(plan.lines)
                report.restore_calls += 1
                report.ipsets_created, report.ipsets_updated = plan.created, plan.updated
                report.ipsets_swapped = plan.swapped
                for name, members in plan.members.items():
                    s = desired.ipsets[name]
                    self._sets[name] = ips.KSet(name, s.type, s.family, self.maxelem, members)

        # The families are independent tables: their restores run side by side.
        jobs = [_start_iptables(self.kernel, family, text) for family, _, text in todo]
        errors = []
        for job in jobs:
            try:
                job.wait()
            except CommandError as exc:
                errors.append(exc)
        if errors:
            if fresh and any(p.deleted for _f, plans, _t in todo for p in plans):
                # Planned from what we just read, yet it failed: deleting a stale chain may be
                # what failed (a writer we cannot see, a race): keep stale chains until the next
                # refresh so the rest applies. (Planned from the cache, a jump to a stale chain
                # may simply be new to us: the retry re-reads and keeps that chain.)
                self._defer_chain_deletes = True
                log.warning("dataplane_chain_sweep_deferred", netns=self.netns, error=str(errors[0]))
            raise errors[0]  # the caller drops the cache and re-reads: one family may be written
        for family, plans, text in todo:
            tables = self._ipt[family]
            report.iptables_lines += _count(text)
            report.restore_calls += 1
            for p in plans:
                if p.lines:
                    report.chains_created += [f"v{family}:{c}" for c in p.created]
                    report.chains_rewritten.update({f"v{family}:{c}": n for c, n in p.rewritten.items() if c not in p.created})
                    report.chains_deleted += [f"v{family}:{c}" for c in p.deleted]
                    report.hooks_repaired += [f"v{family}:{p.table}:{c}" for c in p.hooks_repaired]
                    tables[p.table] = _update_model(tables.get(p.table), p, desired, family)

        for family, p in kept:
            self._log_kept(family, p)

        # 4. stale sets, only once nothing of ours or anyone else's references them.
        if sweep:
            stale = sorted(n for n in self._sets if n not in desired.ipsets)
            if stale:
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
                stale = [n for n in stale if n not in referenced and n not in self._stale_sets_failed]
            if stale:
                self._destroy_sets(stale, report)
            # 5. once per process: our leftovers in the other backend.
            if self._sweep_other:
                self._sweep_other = False
                try:
                    report.other_backend_cleaned = self._clean_other_backend()
                except CommandError as exc:  # not worth failing our own apply for
                    log.warning("dataplane_other_backend_cleanup_failed", netns=self.netns, error=str(exc))

    def _destroy_sets(self, stale: list[str], report: ApplyReport) -> None:
        """Destroy stale sets; a failure never fails the apply. Something we cannot see
        may still use a set (a rule in the other iptables backend or family, another
        program): ``ipset restore`` stops at the first such set, so the rest are tried
        one by one and the ones that fail are kept until the next refresh."""
        assert self._sets is not None
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

    # --- metadata for dump ----------------------------------------------------

    def _write_state(self, desired: DesiredState) -> None:
        if not self.state_path:
            return
        doc = {
            "backend": self.backend,
            "ipsets": {n: {"origin": s.origin, "family": s.family, "type": s.type} for n, s in sorted(desired.ipsets.items())},
            "endpoints": [asdict(e) for e in desired.endpoints],
        }
        text = json.dumps(doc, indent=1, sort_keys=True)
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
        # Atomic replace, no fsync: the file lives on tmpfs (/run) and is rewritten
        # from the desired state by the next agent if lost.
        os.makedirs(os.path.dirname(self.state_path) or ".", exist_ok=True)
        tmp = f"{self.state_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.state_path)
        self._state_text = text


def _count(text: str) -> int:
    """Kernel lines written: rule/chain lines, not the *table/COMMIT framing."""
    return sum(1 for ln in text.splitlines() if ln and not ln.startswith("*") and ln != "COMMIT")


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


def _start_ipset(kernel: Kernel, text: str) -> Any:
    start = getattr(kernel, "ipset_restore_start", None)
    return start(text) if start else _Done(kernel.ipset_restore, text)


def _start_iptables(kernel: Kernel, family: int, text: str) -> Any:
    start = getattr(kernel, "iptables_restore_start", None)
    return start(family, text) if start else _Done(kernel.iptables_restore, family, text)


def _has_ours(t: ipt.KTable) -> bool:
    """Our chains, or our hooks in a built-in chain (foreign chains are never ours to plan)."""
    return any(owns_chain(n) or (c.builtin and any(r.ours for r in c.rules)) for n, c in t.chains.items())


def _update_model(old: ipt.KTable | None, plan: ipt.TablePlan, desired: DesiredState, family: int) -> ipt.KTable:
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
        hooks = [h for h in _hooks(desired, family) if h.table == plan.table and h.chain == cname]
        top = [ipt.KRule(cname, h.render_line()[len(f"-I {cname} 1 "):]) for h in hooks]
        kch.rules = top + [r for r in kch.rules if not r.ours]
    return new
