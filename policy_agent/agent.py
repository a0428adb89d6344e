"""The agent loop: events from every source -> one store -> throttled compile -> apply.

Rules of the loop (felix's int_dataplane loop, Kubernetes' BoundedFrequencyRunner):

1. Sources run in their own threads and only ever call ``sink(event)``, which
   timestamps the event and queues it. Only the loop thread touches the store,
   the compiler and the dataplane, so none of them needs a lock.
2. Nothing is written to the kernel before every source the desired state
   depends on has sent InSync (not the link monitor: ``gates_sync = False``,
   links change no rule, and a stuck netlink socket must not hold the first
   apply back). Until then the rules of the previous run keep enforcing (no flush
   window). The first apply is a full build and may sweep; later applies are
   incremental and sweep too, because the store is complete from then on.
3. Changes are coalesced: at most one apply per ``min_interval``; a burst of
   events costs one apply. At least every ``max_interval`` the desired state is
   rebuilt from scratch and applied (resync), so an incremental-compiler bug
   cannot persist. ``refresh_interval`` reads the kernel back and repairs drift.
4. A failed apply is retried with exponential backoff; events stay pending
   (and their latency keeps growing) until an apply succeeds.
5. After each successful apply, every local endpoint whose rules are in the
   kernel gets a status file (the CNI shim may wait for it); status files of
   endpoints no longer desired are removed.
6. Stopping never touches the kernel: the rules keep enforcing.
7. Health: /livez is the loop iterating; /readyz needs the first apply and turns
   503 again while applies keep failing (``unready_failures`` in a row, or a change
   waiting longer than ``unready_after`` seconds), so operators see the wedge
   without kubelet restarting a process whose kernel rules still enforce.
8. Generations: every event that changed the store bumps ``observed_generation``;
   a successful apply (or one that found nothing to write) sets
   ``applied_generation`` to the generation it covered. Equal = enforced.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import structlog

from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import DesiredState
from policy_agent.model.types import PodIPPolicy
from policy_agent.obs.metrics import Metrics
from policy_agent.shared import endpoint as ep
from policy_agent.sources.events import Delete, Event, InSync, Replace, Sink, SourceError, Upsert
from policy_agent.store import Changes, Store

log = structlog.get_logger(__name__)

LIVENESS_STALL = 120.0  # seconds without a loop iteration before /livez fails
MAX_BACKOFF = 10.0
# Defaults of the settings unready_failures / unready_after (policy_agent.config).
UNREADY_FAILURES = 3  # consecutive failed applies before /readyz turns 503
UNREADY_AFTER = 60.0  # seconds a change may wait unapplied before /readyz turns 503
# Allocations (generation-0 count) after which the loop collects even while events keep
# coming (automatic collection is off once ready: Agent._freeze_heap).
IDLE_GC_FORCE = 100_000


class Source(Protocol):
    """A source may also have ``gates_sync = False`` (its InSync is not needed before the
    first apply: it feeds nothing the desired state depends on) and ``health() -> dict``
    (``healthy``, ``state``, ``detail``: shown in /status)."""

    name: str

    def start(self, sink: Sink) -> None: ...

    def stop(self) -> None: ...


class Dataplane(Protocol):
    def apply(self, desired: DesiredState, allow_sweep: bool = ..., defer: bool = ...) -> Any: ...

    def finish(self) -> Any: ...

    def refresh(self) -> Any: ...


class IncrementalCompiler(Protocol):
    def upsert_pod(self, pod: Any) -> Any: ...
    def delete_pod(self, namespace: str, name: str) -> Any: ...
    def upsert_namespace(self, ns: Any) -> Any: ...
    def delete_namespace(self, name: str) -> Any: ...
    def upsert_policy(self, policy: Any) -> Any: ...
    def delete_policy(self, namespace: str, name: str) -> Any: ...
    def upsert_cluster_policy(self, cnp: Any) -> Any: ...
    def delete_cluster_policy(self, name: str) -> Any: ...
    def upsert_node(self, node: Any) -> Any: ...
    def delete_node(self, name: str) -> Any: ...
    def desired(self) -> DesiredState: ...


def default_compiler_factory(node: NodeConfig) -> IncrementalCompiler:
    from policy_agent.compiler import Compiler

    return Compiler(node)


@dataclass
class _Pending:
    received: float
    kind: str


class Agent:
    def __init__(
        self,
        node: NodeConfig,
        dataplane: Dataplane,
        sources: Iterable[Source],
        *,
        status_dir: str | None = None,
        min_interval: float = 0.02,
        max_interval: float = 300.0,
        refresh_interval: float = 30.0,
        compiler_factory: Callable[[NodeConfig], IncrementalCompiler] = default_compiler_factory,
        metrics: Metrics | None = None,
        on_enforced: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        unready_failures: int = UNREADY_FAILURES,
        unready_after: float = UNREADY_AFTER,
        gc_freeze: bool = True,
        pod_ip_policy: PodIPPolicy | None = None,
    ) -> None:
        self.node = node
        self.dataplane = dataplane
        self.sources = list(sources)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        # The sync barrier waits only for sources the desired state depends on.
        self.expected_sources = frozenset(s.name for s in self.sources if getattr(s, "gates_sync", True))
        self.status_dir = status_dir
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.refresh_interval = refresh_interval
        self.compiler_factory = compiler_factory
        self.metrics = metrics or Metrics()
        self.metrics.watch_degraded_policies(self.sources)  # unparseable policies: last good / fallback
        self.on_enforced = on_enforced
        self.clock = clock
        if unready_failures < 1 or unready_after <= 0:
            raise ValueError("unready_failures must be >= 1 and unready_after > 0")
        self.unready_failures = unready_failures
        self.unready_after = unready_after
        self.gc_freeze = gc_freeze

        self.store = Store(
            node.node_name, pod_ip_policy,
            on_pod_ip_rejected=lambda reason: self.metrics.pod_ip_rejected.labels(reason).inc(),
        )
        self._queue: queue.SimpleQueue[tuple[float, Event] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._compiler: IncrementalCompiler | None = None
        self._pending: list[_Pending] = []
        self._need_apply = False
        self._force_full = True
        self._failures = 0
        self._retry_at = 0.0
        self._status_written: dict[tuple[str, str], tuple] = {}
        self._unapplied_since: float | None = None  # monotonic arrival of the oldest unapplied change
        self._checking = False  # a background drift check (dataplane.check_start) is running
        self._gc_manual = False  # the loop collects (idle_gc) since the heap was frozen
        self._gc_was_enabled = True

        # Read by status()/health from other threads; plain attribute writes are atomic.
        self.in_sync = False
        self.ready = False
        self.started_at = time.time()
        self.heartbeat = clock()
        self.last_apply_end = 0.0  # monotonic
        self.last_apply_wall = 0.0
        self.last_apply_duration = 0.0
        self.last_apply_reason = ""
        self.last_full_apply = 0.0
        self.last_refresh = 0.0
        self.last_error = ""
        self.last_apply_error = ""
        self.last_apply_failure_wall = 0.0
        # What the kernel refused and the dataplane set aside (the rest is enforced):
        # shown in /status, counted in policy_agent_dataplane_set_aside_objects.
        self.set_aside: list[dict[str, Any]] = []
        self.observed_generation = 0  # bumped by every event that changed the store
        self.applied_generation = 0  # the observed_generation the last successful apply covered
        self.apply_count = 0
        self.rules_programmed = 0
        self.ipsets_programmed = 0
        self.endpoint_count = 0

    # --- the sink: any thread ---------------------------------------------------------

    def sink(self, event: Event) -> None:
        self._queue.put((self.clock(), event))

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("agent already started")
        self._thread = threading.Thread(target=self._run, name="agent-loop", daemon=True)
        self._thread.start()
        for s in self.sources:
            log.info("source_starting", source=s.name)
            s.start(self.sink)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sources and the loop. The kernel is left as it is (rules keep enforcing)."""
        self._stop.set()
        for s in self.sources:
            try:
                s.stop()
            except Exception as exc:  # a broken source must not keep the others running
                log.warning("source_stop_failed", source=s.name, error=str(exc))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        close = getattr(self.dataplane, "close", None)
        if close is not None and (self._thread is None or not self._thread.is_alive()):
            close()  # the long-lived restore processes; the rules stay
        if self._gc_manual and self._gc_was_enabled:
            gc.enable()  # automatic collection again for whatever else runs in this process
            self._gc_manual = False
        log.info("agent_stopped", applies=self.apply_count)

    @property
    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self.clock() - self.heartbeat < LIVENESS_STALL
        )

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return True
            time.sleep(0.02)
        return self.ready

    # --- loop ------------------------------------------------------------------------

    def _next_deadline(self, now: float) -> float:
        deadline = now + 1.0  # heartbeat
        if self.in_sync:
            if self._need_apply or self.store.has_dirty or not self.ready:
                deadline = min(deadline, max(self.last_apply_end + self.min_interval, self._retry_at))
            if self.ready:
                deadline = min(deadline, self.last_full_apply + self.max_interval)
                if self.refresh_interval > 0:
                    deadline = min(deadline, self.last_refresh + self.refresh_interval)
                if self._checking:
                    deadline = min(deadline, now + 0.05)  # collect the drift check soon after it ends
        return deadline

    def _run(self) -> None:
        log.info("agent_loop_started", node=self.node.node_name, sources=sorted(self.expected_sources))
        while not self._stop.is_set():
            now = self.clock()
            self.heartbeat = now
            timeout = max(0.0, self._next_deadline(now) - now)
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None:
                self._handle(item)
                # Drain what else is there: one apply for the whole burst.
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        break
                    self._handle(more)
            if self._stop.is_set():
                break
            try:
                self._tick()
                if self._gc_manual:
                    self.idle_gc(self._queue.empty())
            except Exception as exc:  # never let the loop die; /livez would turn red
                log.exception("agent_loop_error", error=str(exc))
                self.metrics.errors.labels("loop", "").inc()
                self.last_error = f"loop: {exc}"
                time.sleep(0.5)

    def _handle(self, item: tuple[float, Event]) -> None:
        received, event = item
        source = getattr(event, "source", "")
        self.metrics.events.labels(source, type(event).__name__).inc()
        try:
            changed = self.store.apply(event)
        except (TypeError, ValueError) as exc:
            log.warning("event_rejected", source=source, error=str(exc))
            self.metrics.errors.labels("event", source).inc()
            return
        if changed:
            self.observed_generation += 1
            self.metrics.observed_generation.set(self.observed_generation)
        if isinstance(event, (Upsert, Delete, Replace)):
            self._pending.append(_Pending(received, event.kind))
            if self._unapplied_since is None:
                self._unapplied_since = received
        elif isinstance(event, InSync):
            if self.store.sync_counts[source] > 1:
                self.metrics.watch_restarts.labels(source).inc()
            if not self.in_sync and self.expected_sources <= self.store.in_sync_sources:
                self.in_sync = True
                self.metrics.in_sync.set(1)
                log.info("all_sources_in_sync", sources=sorted(self.expected_sources))
        elif isinstance(event, SourceError):
            self.metrics.errors.labels("source", source).inc()
            if event.kind == "watch" or " watch: " in event.message:
                self.metrics.watch_restarts.labels(source).inc()
            log.warning("source_error", source=source, kind=event.kind, key=str(event.key), message=event.message)

    def _tick(self) -> None:
        now = self.clock()
        self.metrics.pending.set(len(self._pending))
        try:
            self._tick_inner(now)
        finally:
            self.metrics.ready.set(1 if self.readiness()[0] else 0)

    def _tick_inner(self, now: float) -> None:
        if not self.in_sync:
            return
        if self.store.has_dirty:
            self._need_apply = True
        elif self.ready and self._pending and not self._need_apply and not self._force_full:
            self._pending.clear()  # these events changed nothing (e.g. a relist of the same objects)
            self._unapplied_since = None
        resync_due = self.ready and now >= self.last_full_apply + self.max_interval
        if resync_due:
            self._force_full = True
        if (self._need_apply or self._force_full or not self.ready) and now >= max(
            self.last_apply_end + self.min_interval, self._retry_at
        ):
            self._apply(now, "resync" if resync_due else ("initial" if not self.ready else "change"))
        now = self.clock()
        if self._checking:
            self._poll_check()
        elif self.ready and self.refresh_interval > 0 and now >= self.last_refresh + self.refresh_interval:
            self._refresh(now)

    # --- compile + apply ----------------------------------------------------------------

    def _full_compiler(self) -> IncrementalCompiler:
        c = self.compiler_factory(self.node)
        snap = self.store.snapshot()
        if hasattr(c, "load"):
            c.load(snap)  # bulk load: the compiler fills each selector set once
            return c
        for ns in snap.namespaces.values():
            c.upsert_namespace(ns)
        for pol in snap.policies.values():
            c.upsert_policy(pol)
        for node in snap.nodes.values():
            c.upsert_node(node)
        for cnp in snap.cluster_policies.values():
            c.upsert_cluster_policy(cnp)
        for pod in snap.pods.values():
            c.upsert_pod(pod)
        return c

    @staticmethod
    def _feed(c: IncrementalCompiler, ch: Changes) -> None:
        # Namespaces and policies before pods: a pod's selection reads both.
        for name, ns in ch.namespaces.items():
            c.upsert_namespace(ns) if ns is not None else c.delete_namespace(name)
        for key, pol in ch.policies.items():
            c.upsert_policy(pol) if pol is not None else c.delete_policy(*key)
        # Nodes before ClusterNetworkPolicies: `nodes` peers read their addresses.
        for name, node in ch.nodes.items():
            c.upsert_node(node) if node is not None else c.delete_node(name)
        for name, cnp in ch.cluster_policies.items():
            c.upsert_cluster_policy(cnp) if cnp is not None else c.delete_cluster_policy(name)
        for key, pod in ch.pods.items():
            c.upsert_pod(pod) if pod is not None else c.delete_pod(*key)

    def _covered(self, generation: int) -> None:
        self.applied_generation = generation
        self.metrics.applied_generation.set(generation)

    def _apply(self, now: float, reason: str) -> None:
        generation = self.observed_generation  # every event handled so far is in the store
        changes = self.store.take_changes()
        pending, self._pending = self._pending, []
        if not changes.model_changed and not self._force_full and self.ready:
            # Only endpoint/link bookkeeping changed, or a relist brought nothing new:
            # the desired state is the same, so nothing to write (status files may change).
            self._need_apply = False
            if changes.endpoints or changes.links:
                self._write_status_files(self._last_desired)
            self._covered(generation)
            self._unapplied_since = None
            return
        t0 = self.clock()
        held = getattr(self.dataplane, "checks_held", None)
        try:
            # A background drift check waits while an event is compiled and applied.
            with held() if held is not None else contextlib.nullcontext():
                if self._force_full or self._compiler is None:
                    self._compiler = self._full_compiler()
                else:
                    self._feed(self._compiler, changes)
                desired = self._compiler.desired()
                t1 = self.clock()
                self.metrics.compile_duration.observe(t1 - t0)
                self._note_set_aside(self.dataplane.apply(desired, allow_sweep=True, defer=True))
        except Exception as exc:
            self._failures += 1
            backoff = min(MAX_BACKOFF, 0.1 * 2 ** (self._failures - 1))
            self._retry_at = self.clock() + backoff
            self._pending = pending + self._pending
            self._force_full = True  # the compiler may have absorbed half a change: rebuild
            self.last_error = f"apply: {exc}"
            self.last_apply_error = str(exc)[:1000]
            self.last_apply_failure_wall = time.time()
            self.metrics.errors.labels("apply", "").inc()
            self.metrics.apply_failures.set(self._failures)
            self.metrics.last_apply_error.info({"error": self.last_apply_error[:200]})
            self.metrics.ready.set(1 if self.readiness()[0] else 0)
            if self._failures == self.unready_failures:
                log.error("agent_unready_applies_failing", failures=self._failures, error=self.last_apply_error)
            log.exception("apply_failed", reason=reason, failures=self._failures, retry_in=round(backoff, 3))
            return
        done = self.clock()
        if self._failures:
            log.info("apply_recovered", failures=self._failures)
            self.metrics.apply_failures.set(0)
        self._failures = 0
        self._retry_at = 0.0
        self._covered(generation)
        self._unapplied_since = None
        if self._force_full:
            self.last_full_apply = done
        self._force_full = False
        self._need_apply = False
        self._last_desired = desired
        self.apply_count += 1
        self.last_apply_end = done
        self.last_apply_wall = time.time()
        self.last_apply_duration = done - t0
        self.last_apply_reason = reason
        m = self.metrics
        m.apply_duration.observe(done - t0)
        m.applies.labels(reason).inc()
        m.last_apply.set(self.last_apply_wall)
        for p in pending:
            m.event_to_enforced.labels(p.kind).observe(done - p.received)
            if self.on_enforced is not None:
                self.on_enforced(p.kind, done - p.received)
        self._record_counts(desired)
        if changes.endpoints or desired.endpoints is not self._status_endpoints or self.apply_count <= 1:
            # Status files depend on the endpoints (and their CNI records) only.
            self._write_status_files(desired)
            self._status_endpoints = desired.endpoints
        if not self.ready:
            self.ready = True
            m.ready.set(1)
            self.last_refresh = done  # the first apply read the kernel back already
            log.info("agent_ready", apply_seconds=round(done - t0, 4), rules=self.rules_programmed,
                     ipsets=self.ipsets_programmed, endpoints=self.endpoint_count)
            if self.gc_freeze:
                self._gc_was_enabled = gc.isenabled()
                self._freeze_heap()
                self._gc_manual = True
        else:
            log.debug("applied", reason=reason, seconds=round(done - t0, 4), changes=changes.count(),
                      events=len(pending))
        # Enforced and reported; now what the apply left for after its commit (stale sets).
        try:
            self.dataplane.finish()
        except Exception as exc:  # a stale set is harmless: the next sweep or refresh retries it
            self.metrics.errors.labels("finish", "").inc()
            log.warning("dataplane_finish_failed", error=str(exc))

    @property
    def last_desired(self) -> DesiredState | None:
        """The desired state the last successful apply wrote (live explain compares the kernel with it)."""
        return self._last_desired

    @staticmethod
    def _freeze_heap() -> None:
        """Move everything alive after the initial sync out of the GC's reach, and from
        then on collect between events (``idle_gc``), not inside them.

        The store, the compiler's indexes and the desired state are hundreds of
        thousands of long-lived objects; every full (generation 2) collection walked
        them all (~140 ms at 10k pods), a latency spike in whichever apply it hit.
        Collect first so no garbage is frozen. Objects created later are tracked as
        usual, but an automatic collection lands in whichever event allocates: at 50k
        pods a young collection over an event's new selector sets cost 13-18 ms of a
        5 ms budget (issue 13). So automatic collection is switched off and the loop
        runs the same generational schedule itself when it has nothing else to do."""
        t0 = time.monotonic()
        gc.collect()
        gc.freeze()
        gc.disable()
        log.info("gc_frozen", objects=gc.get_freeze_count(), seconds=round(time.monotonic() - t0, 4))

    @staticmethod
    def idle_gc(idle: bool) -> float:
        """CPython's generational schedule (its thresholds), run by the loop: when ``idle``
        (nothing queued), or when so much was allocated while busy that waiting longer
        would cost memory. Seconds spent collecting (0.0 if nothing was due)."""
        c0, c1, c2 = gc.get_count()
        t0, t1, t2 = gc.get_threshold()
        if c0 < (t0 if idle else IDLE_GC_FORCE):
            return 0.0
        start = time.process_time()
        gc.collect(2 if c1 >= t1 and c2 >= t2 else 1 if c1 >= t1 else 0)
        return time.process_time() - start

    _last_desired: DesiredState | None = None
    _status_endpoints: tuple | None = None
    _counted: dict | None = None  # (family, table) -> (chains mapping counted, chains, rules)

    def _record_counts(self, desired: DesiredState) -> None:
        # Per table, recount only when the compiler handed a different mapping (it keeps
        # the same one while nothing in that table changed): applies cost the change.
        old = self._counted or {}
        counted = {}
        for key, tbl in desired.chains.items():
            hit = old.get(key)
            counted[key] = hit if hit is not None and hit[0] is tbl else (
                tbl, len(tbl), sum(len(c.rules) for c in tbl.values()))
        self._counted = counted
        total = 0
        for fam in (4, 6):
            n = sum(v[2] for (f, _t), v in counted.items() if f == fam)
            total += n
            self.metrics.rules.labels(str(fam)).set(n)
            self.metrics.chains.labels(str(fam)).set(sum(v[1] for (f, _t), v in counted.items() if f == fam))
        self.rules_programmed = total
        self.ipsets_programmed = len(desired.ipsets)
        self.endpoint_count = len(desired.endpoints)
        self.metrics.ipsets.set(len(desired.ipsets))
        self.metrics.ipset_members.set(sum(len(s.members) for s in desired.ipsets.values()))
        self.metrics.endpoints.set(len(desired.endpoints))

    def _note_set_aside(self, report: Any) -> None:
        aside = list(getattr(report, "set_aside", None) or [])
        self.set_aside = aside
        for kind in ("chain", "ipset", "member"):
            self.metrics.set_aside.labels(kind).set(sum(1 for x in aside if x.get("kind") == kind))

    def _refresh(self, now: float) -> None:
        """Look for drift. A dataplane that can check in the background (``check_start``)
        reads the kernel in a worker thread while events keep being applied; only drift
        found there costs a full refresh on the loop (at 50k pods a full read-back and
        comparison held the loop ~0.4 s every refresh_interval: issue 13)."""
        self.last_refresh = now
        try:
            start = getattr(self.dataplane, "check_start", None)
            if start is not None and start():
                self._checking = True
                return
            self._note_set_aside(self.dataplane.refresh())
            self.metrics.refreshes.inc()
        except Exception as exc:
            self._refresh_failed(exc)

    def _poll_check(self) -> None:
        try:
            report = self.dataplane.check_poll()
        except Exception as exc:
            self._checking = False
            self._refresh_failed(exc)
            return
        if report is not None:
            self._checking = False
            self._note_set_aside(report)
            self.metrics.refreshes.inc()

    def _refresh_failed(self, exc: Exception) -> None:
        self.last_error = f"refresh: {exc}"
        self.metrics.errors.labels("refresh", "").inc()
        log.error("refresh_failed", error=str(exc), exc_info=exc)
        self._force_full = True  # write everything again on the next tick

    # --- endpoint status files -----------------------------------------------------------

    def _write_status_files(self, desired: DesiredState | None) -> None:
        if not self.status_dir or desired is None:
            return
        want: dict[tuple[str, str], tuple] = {}
        for e in desired.endpoints:
            if not e.ips:
                continue  # no address yet: not in the dispatch chains, dropped as unknown
            rec = self.store.endpoint(e.namespace, e.pod)
            pod = self.store.pod(e.namespace, e.pod)
            uid = pod.uid if pod is not None else ""
            if rec is not None and rec.pod_uid and uid and rec.pod_uid != uid:
                continue  # programmed another Pod object's policy: must not release this sandbox
            uid = uid or (rec.pod_uid if rec is not None else "")
            policies = tuple(sorted(set(e.ingress_policies) | set(e.egress_policies)))
            # rec.created: a new record (a new ADD) gets a fresh file even if all else is equal
            want[(e.namespace, e.pod)] = (rec.container_id if rec else "", e.interface, policies, uid,
                                          rec.created if rec else 0.0)
        first = not self._status_written and self.apply_count <= 1
        for key, val in want.items():
            if self._status_written.get(key) == val:
                continue
            try:
                ep.write_status(self.status_dir, ep.EndpointStatus(key[0], key[1], val[0], val[1], time.time(), val[2],
                                                                   val[3]))
                self._status_written[key] = val
            except (OSError, ValueError) as exc:
                self.metrics.errors.labels("status_file", "").inc()
                log.warning("status_file_write_failed", pod=f"{key[0]}/{key[1]}", error=str(exc))
        for key in [k for k in self._status_written if k not in want]:
            ep.remove_status(self.status_dir, *key)
            del self._status_written[key]
        if first:
            # Left over from a previous run for endpoints that are gone now.
            try:
                names = os.listdir(self.status_dir)
            except FileNotFoundError:
                names = []
            for name in names:
                if ep.is_record_file(name):
                    key = ep.split_key(name[: -len(".json")])
                    if key not in want:
                        try:
                            ep.remove_status(self.status_dir, *key)
                        except ValueError:
                            pass

    # --- status (any thread) ---------------------------------------------------------------

    def _oldest_unapplied(self) -> float | None:
        """When the oldest change not yet enforced arrived (monotonic), or None."""
        return self._unapplied_since

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): first apply done, and applies are not failing."""
        if not self.ready:
            if not self.in_sync:
                waiting = sorted(self.expected_sources - self.store.in_sync_sources)
                return False, f"waiting for sources: {', '.join(waiting)}"
            if self._failures:
                return False, f"in sync, first apply failed {self._failures} times: {self.last_apply_error}"
            return False, "in sync, first apply not done yet"
        if self._failures >= self.unready_failures:
            return False, f"last {self._failures} applies failed: {self.last_apply_error}"
        oldest = self._oldest_unapplied()
        if oldest is not None and self.clock() - oldest > self.unready_after:
            why = f": {self.last_apply_error}" if self._failures else " (apply still running)"
            return False, (f"a change has waited {self.clock() - oldest:.0f}s without a successful apply "
                           f"({self._failures} failed in a row){why}")
        return True, "ok"

    def _source_status(self, s: Source) -> dict[str, Any]:
        out: dict[str, Any] = {"in_sync": s.name in self.store.in_sync_sources,
                               "syncs": self.store.sync_counts.get(s.name, 0),
                               "gates_sync": s.name in self.expected_sources}
        health = getattr(s, "health", None)
        if health is not None:
            try:
                out["health"] = health()
            except Exception as exc:  # status must render whatever a source does
                out["health"] = {"healthy": False, "state": "unknown", "detail": f"health check failed: {exc}"}
        return out

    def status(self) -> dict[str, Any]:
        now = self.clock()
        ready, why = self.readiness()
        oldest = self._oldest_unapplied()
        return {
            "node": self.node.node_name,
            "alive": self.alive,
            "in_sync": self.in_sync,
            "ready": self.ready,
            "sources": {s.name: self._source_status(s) for s in sorted(self.sources, key=lambda s: s.name)},
            "last_apply_time": self.last_apply_wall or None,
            "last_apply_age_seconds": round(now - self.last_apply_end, 3) if self.apply_count else None,
            "last_apply_duration_seconds": round(self.last_apply_duration, 6) if self.apply_count else None,
            "last_apply_reason": self.last_apply_reason or None,
            "applies": self.apply_count,
            "healthy": ready,
            "unready_reason": None if ready else why,
            "observed_generation": self.observed_generation,
            "applied_generation": self.applied_generation,
            "apply_failures": {
                "consecutive": self._failures,
                "last_error": self.last_apply_error or None,
                "last_failure_time": self.last_apply_failure_wall or None,
                "oldest_unapplied_age_seconds": round(now - oldest, 3) if oldest is not None else None,
            },
            "pending_events": len(self._pending) + self._queue.qsize(),
            # Objects the kernel refused, kept out (old version or absent) while everything
            # else is enforced; readiness stays up, this is where it shows.
            "degraded": bool(self.set_aside),
            "set_aside": list(self.set_aside),
            "counts": {
                "namespaces": self.store.count("Namespace"),
                "pods": self.store.count("Pod"),
                "policies": self.store.count("NetworkPolicy"),
                "cluster_policies": self.store.count("ClusterNetworkPolicy"),
                "nodes": self.store.count("Node"),
                "endpoint_records": self.store.count("Endpoint"),
                "links": self.store.count("Link"),
                "local_endpoints": self.endpoint_count,
                "rules": self.rules_programmed,
                "ipsets": self.ipsets_programmed,
            },
            "errors": {"total": self.store.error_count + int(self._failures > 0), "recent": list(self.store.errors),
                       "last": self.last_error or None},
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }


class PushSource:
    """A source fed by its owner (tests, benchmarks): start() delivers the initial
    objects as Replace per kind plus InSync; later calls go straight to the sink."""

    def __init__(self, name: str, initial: dict[str, dict] | None = None) -> None:
        self.name = name
        self.initial = initial or {}
        self._sink: Sink | None = None

    def start(self, sink: Sink) -> None:
        self._sink = sink
        for kind, objects in self.initial.items():
            sink(Replace(self.name, kind, dict(objects)))
        sink(InSync(self.name))

    def stop(self) -> None:
        self._sink = None

    def upsert(self, kind: str, key: Any, obj: Any) -> None:
        if self._sink:
            self._sink(Upsert(self.name, kind, key, obj))

    def delete(self, kind: str, key: Any) -> None:
        if self._sink:
            self._sink(Delete(self.name, kind, key))
