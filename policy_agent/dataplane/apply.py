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
* Never flush at start or exit: a new process with the same desired state
  finds every hash in place and writes nothing; a new desired state replaces
  chains atomically per table while the old rules keep enforcing.
* Failures: a failed restore changed nothing in that table; the cache is
  dropped, the kernel re-read, the plan recomputed, and the write retried with
  exponential backoff. After ``retries`` attempts DataplaneError is raised.
* Ownership: only chains with our prefix, rules carrying our hash comment (or
  jumping to our chains) in built-in chains, and sets with our prefix are ever
  written, flushed or deleted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane import ipsets as ips
from policy_agent.dataplane.backend import detect_backend, other_backend
from policy_agent.dataplane.kernel import Kernel, SystemKernel, legacy_available
from policy_agent.dataplane.runner import CommandError, Runner
from policy_agent.desired import DesiredState
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

    # --- public operations ----------------------------------------------------

    def apply(self, desired: DesiredState, allow_sweep: bool = False) -> ApplyReport:
        """Program ``desired``. ``allow_sweep``: every source is in sync, remove stale state."""
        _validate(desired)
        self._desired = desired
        self._sweep_ok = self._sweep_ok or allow_sweep
        return self._converge(desired, self._sweep_ok)

    def sweep(self) -> ApplyReport:
        """Caller says every source is in sync: remove our stale chains and sets."""
        if self._desired is None:
            raise DataplaneError("sweep() before the first apply(): nothing is known to be desired")
        self._sweep_ok = True
        return self._converge(self._desired, True)

    def refresh(self) -> ApplyReport:
        """Re-read the kernel and repair whatever someone else changed; logs each repair."""
        if self._desired is None:
            return ApplyReport(backend=self.backend)
        self.invalidate()
        report = self._converge(self._desired, self._sweep_ok)
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
        self.invalidate()
        self._desired = None
        log.info("dataplane_cleaned_up", netns=self.netns, **report.log_fields())
        return report

    # --- the convergence loop -------------------------------------------------

    def _converge(self, desired: DesiredState, sweep: bool) -> ApplyReport:
        start = time.monotonic()
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(1, self.retries + 1):
            report = ApplyReport(backend=self.backend, attempts=attempt)
            try:
                self._apply_once(desired, sweep, report)
            except CommandError as exc:
                last = exc
                log.warning("dataplane_write_failed", netns=self.netns, attempt=attempt, error=str(exc))
                self.invalidate()
                time.sleep(delay)
                delay *= 2
                continue
            report.seconds = time.monotonic() - start
            self._write_state(desired)
            if report.changed:
                log.info("dataplane_applied", netns=self.netns, **report.log_fields())
            return report
        log.error("dataplane_apply_gave_up", netns=self.netns, attempts=self.retries, error=str(last))
        raise DataplaneError(f"dataplane apply failed after {self.retries} attempts: {last}") from last

    def _apply_once(self, desired: DesiredState, sweep: bool, report: ApplyReport) -> None:
        if self._ipt is None or self._sets is None:
            self.read_back()
        assert self._ipt is not None and self._sets is not None

        # 1. ipsets first: every set a rule will reference exists and is filled.
        plan = ips.plan_ipsets(desired.ipsets, self._sets, self.maxelem)
        if plan.lines:
            self.kernel.ipset_restore(plan.restore_text())
            report.ipset_lines += len(plan.lines)
            report.restore_calls += 1
            report.ipsets_created, report.ipsets_updated, report.ipsets_swapped = plan.created, plan.updated, plan.swapped
            for name in plan.created + plan.swapped + list(plan.updated):
                s = desired.ipsets[name]
                self._sets[name] = ips.KSet(name, s.type, s.family, self.maxelem, ips.desired_members(s))

        # 2./3. one transaction per table, one restore per family.
        for family in self.families:
            tables = self._ipt[family]
            hooks = _hooks(desired, family)
            names = {t for (f, t) in desired.chains if f == family} | {h.table for h in hooks}
            names |= {n for n, t in tables.items() if t.owned() or any(r.ours for c in t.chains.values() for r in c.rules)}
            plans = [ipt.plan_table(t, desired.table(family, t), hooks, tables.get(t), sweep) for t in sorted(names)]
            text = "".join(p.restore_text() for p in plans)
            if not text:
                continue
            self.kernel.iptables_restore(family, text)
            report.iptables_lines += _count(text)
            report.restore_calls += 1
            for p in plans:
                if p.lines:
                    report.chains_created += [f"v{family}:{c}" for c in p.created]
                    report.chains_rewritten.update({f"v{family}:{c}": n for c, n in p.rewritten.items() if c not in p.created})
                    report.chains_deleted += [f"v{family}:{c}" for c in p.deleted]
                    report.hooks_repaired += [f"v{family}:{p.table}:{c}" for c in p.hooks_repaired]
                    tables[p.table] = _model_after(tables.get(p.table), p, desired, family)

        # 4. stale sets, only once nothing of ours or anyone else's references them.
        if sweep:
            referenced = {
                s for tables in self._ipt.values() for t in tables.values() for c in t.chains.values() for r in c.rules for s in r.ipsets
            }
            stale = sorted(n for n in self._sets if n not in desired.ipsets and n not in referenced)
            if stale:
                dplan = ips.plan_destroy(stale)
                self.kernel.ipset_restore(dplan.restore_text())
                report.ipset_lines += len(dplan.lines)
                report.restore_calls += 1
                report.ipsets_destroyed = stale
                for n in stale:
                    del self._sets[n]
            # 5. once per process: our leftovers in the other backend.
            if self._sweep_other:
                report.other_backend_cleaned = self._clean_other_backend()
                self._sweep_other = False

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
        try:
            with open(self.state_path) as f:
                if f.read() == text:
                    return
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(self.state_path) or ".", exist_ok=True)
        tmp = f"{self.state_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.state_path)


def _count(text: str) -> int:
    """Kernel lines written: rule/chain lines, not the *table/COMMIT framing."""
    return sum(1 for ln in text.splitlines() if ln and not ln.startswith("*") and ln != "COMMIT")


def _model_after(old: ipt.KTable | None, plan: ipt.TablePlan, desired: DesiredState, family: int) -> ipt.KTable:
    """The table as it is after ``plan`` was committed (counters unknown, hashes exact)."""
    new = ipt.KTable(plan.table)
    for name, ch in (old.chains.items() if old else ()):
        if name in plan.deleted:
            continue
        new.chains[name] = ipt.KChain(name, ch.policy, list(ch.rules))
    chains = desired.table(family, plan.table)
    for name in set(plan.created) | set(plan.rewritten):
        c = chains[name]
        new.chains[name] = ipt.KChain(name, "-", [ipt.KRule(name, ln[len(f"-A {name} "):]) for ln in c.render_lines()])
    for cname in plan.hooks_repaired:
        kch = new.chains.setdefault(cname, ipt.KChain(cname, "ACCEPT"))
        hooks = [h for h in _hooks(desired, family) if h.table == plan.table and h.chain == cname]
        top = [ipt.KRule(cname, h.render_line()[len(f"-I {cname} 1 "):]) for h in hooks]
        kch.rules = top + [r for r in kch.rules if not r.ours]
    return new
