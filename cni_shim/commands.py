"""ADD / DEL / CHECK / STATUS / GC inside the daemon, with the pool, plumbing and records injected.

Rules:
- ADD is all or nothing: the allocation is checkpointed as "adding" before any
  kernel change and as "ready" after the last; any failure undoes the plumbing,
  the endpoint record and the allocation. A daemon killed mid-ADD finds the
  "adding" entry on restart and undoes it.
- DEL always succeeds and is idempotent; it removes what it finds.
- One container is handled by one request at a time (per-container lock); the
  pool and the checkpoint change under one pool lock, held only for bookkeeping,
  never across netlink calls.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

import structlog

from cni_shim import plumbing as real_plumbing
from cni_shim.ipam.checkpoint import Checkpoint
from cni_shim.ipam.pool import Allocation, Pool, PoolExhausted
from cni_shim.protocol import (
    ERR_CHECK_FAILED,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_NOT_AVAILABLE,
    ERR_PLUMBING,
    ERR_POOL_EXHAUSTED,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
    make_result,
    result_addresses,
)
from policy_agent.shared import endpoint, naming

log = structlog.get_logger(__name__)

STATUS_POLL_INTERVAL = 0.02


class Service:
    def __init__(
        self,
        pool: Pool,
        checkpoint: Checkpoint,
        plumbing=real_plumbing,
        clock: Callable[[], float] = time.time,
        fault_pause_after_veth: float = 0.0,
    ) -> None:
        self.pool = pool
        self.checkpoint = checkpoint
        self.plumbing = plumbing
        self.clock = clock
        self.fault_pause_after_veth = fault_pause_after_veth
        self.lock = threading.Lock()
        self._container_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.pool_changed = threading.Event()

    # --- helpers ---------------------------------------------------------------------

    def _container_lock(self, container_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._container_locks.setdefault(container_id, threading.Lock())

    def _save(self) -> None:
        self.checkpoint.save(self.pool.to_dict())

    @staticmethod
    def _podnet(a: Allocation, mtu: int = 9001) -> real_plumbing.PodNet:
        return real_plumbing.PodNet(a.host_veth, a.ifname, a.netns, a.ipv4, a.ipv6, mtu, a.table)

    def _undo(self, a: Allocation, cool: bool, endpoint_dir: str = "") -> None:
        """Remove plumbing, record and allocation. Never raises."""
        try:
            self.plumbing.teardown(self._podnet(a))
        except Exception as exc:  # noqa: BLE001 - DEL must go on
            log.warning("teardown_failed", container_id=a.container_id, host_veth=a.host_veth, error=str(exc))
        d = endpoint_dir or a.endpoint_dir
        if d and a.namespace and a.pod:
            try:
                endpoint.remove_record(d, a.namespace, a.pod)
            except (OSError, ValueError) as exc:
                log.warning("endpoint_record_remove_failed", key=f"{a.namespace}/{a.pod}", error=str(exc))
        with self.lock:
            cur = self.pool.find(a.key)
            if cur is not None and cur.ipv4 == a.ipv4:
                self.pool.release(a.key, self.clock(), cool=cool)
                self._save()
        self.pool_changed.set()

    # --- dispatch --------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        fn = {
            "add": self.add, "del": self.delete, "check": self.check, "status": self.status,
            "gc": self.gc, "dump": self.dump, "ping": lambda r: {"pong": True},
        }.get(op)
        try:
            if fn is None:
                raise CNIError(ERR_INVALID_CONFIG, f"unknown daemon op {op!r}")
            return {"ok": True, "result": fn(req)}
        except CNIError as exc:
            log.info("request_failed", op=op, container_id=req.get("container_id"), code=exc.code, msg=exc.msg)
            return {"ok": False, "error": exc.to_dict()}
        except Exception as exc:  # noqa: BLE001 - the answer must always be a CNI error
            log.exception("request_crashed", op=op, container_id=req.get("container_id"))
            return {"ok": False, "error": CNIError(ERR_PLUMBING, f"vpcip-ipamd: {op} failed", repr(exc)).to_dict()}

    # --- ADD -------------------------------------------------------------------------

    def add(self, req: dict[str, Any]) -> dict[str, Any]:
        conf = req["conf"]
        cid, ifname, netns = req["container_id"], req["ifname"], req["netns"]
        ns, pod = req["namespace"], req["pod"]
        try:
            host_veth = naming.veth_name(conf["veth_prefix"], ns, pod)
            endpoint.record_key(ns, pod)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, str(exc)) from None
        if not os.path.exists(netns):
            raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS {netns} does not exist")
        key = (conf["name"], cid, ifname)
        t0 = time.monotonic()
        with self._container_lock(cid):
            with self.lock:
                previous = self.pool.find(key)
                try:
                    a = self.pool.allocate(
                        key, self.clock(), namespace=ns, pod=pod, host_veth=host_veth, netns=netns,
                        endpoint_dir=conf["endpoint_dir"],
                    )
                except PoolExhausted as exc:
                    raise CNIError(ERR_POOL_EXHAUSTED, str(exc)) from None
                a.state = "adding"
                self._save()
            self.pool_changed.set()
            if previous is not None:  # a repeated ADD: rebuild from scratch with the same address
                self.plumbing.teardown(self._podnet(previous))
            pn = real_plumbing.PodNet(host_veth, ifname, netns, a.ipv4, a.ipv6, conf["mtu"], a.table)
            try:
                host_mac, pod_mac = self.plumbing.setup(pn, after_veth=self._fault_hook)
            except real_plumbing.NetnsMissing as exc:
                self._undo(a, cool=False)
                raise CNIError(ERR_INVALID_ENV, str(exc)) from None
            except Exception as exc:
                self._undo(a, cool=False)
                raise CNIError(ERR_PLUMBING, f"setting up {host_veth} for {ns}/{pod} failed (undone)", str(exc)) from None
            try:
                endpoint.write_record(conf["endpoint_dir"], endpoint.EndpointRecord(
                    namespace=ns, pod=pod, container_id=cid, interface=host_veth,
                    ips=tuple(ip for ip in (a.ipv4, a.ipv6) if ip), netns=netns, created=self.clock(),
                ))
            except OSError as exc:
                self._undo(a, cool=False)
                raise CNIError(ERR_IO, f"writing the endpoint record in {conf['endpoint_dir']} failed (undone)",
                               str(exc)) from None
            wait = float(conf.get("policy_wait", 0.0))
            if wait > 0 and not self._wait_programmed(conf["status_dir"], ns, pod, cid, wait):
                self._undo(a, cool=False)
                raise CNIError(
                    ERR_TRY_AGAIN_LATER,
                    f"policy agent did not report {ns}/{pod} programmed within {wait:g}s (undone)",
                    f"no status file with container_id {cid} in {conf['status_dir']}",
                )
            with self.lock:
                a.state = "ready"
                self._save()
            log.info("pod_added", container_id=cid, pod=f"{ns}/{pod}", host_veth=host_veth, ipv4=a.ipv4,
                     ipv6=a.ipv6, eni=a.eni, ms=round((time.monotonic() - t0) * 1000, 1))
            return make_result(host_veth, host_mac, ifname, pod_mac, netns, a.ipv4, a.ipv6)

    def _fault_hook(self) -> None:
        if self.fault_pause_after_veth > 0:  # test-only: lets a test kill us mid-ADD
            log.warning("fault_pause_after_veth", seconds=self.fault_pause_after_veth)
            time.sleep(self.fault_pause_after_veth)

    def _wait_programmed(self, status_dir: str, ns: str, pod: str, cid: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            st = endpoint.read_status(status_dir, ns, pod)
            if st is not None and st.container_id == cid:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(STATUS_POLL_INTERVAL)

    def abort_add(self, req: dict[str, Any]) -> None:
        """The client went away before it got our ADD answer: the runtime saw a failure."""
        log.warning("add_aborted_client_gone", container_id=req.get("container_id"))
        self.delete(req)

    # --- DEL -------------------------------------------------------------------------

    def delete(self, req: dict[str, Any]) -> dict[str, Any]:
        conf = req.get("conf", {})
        cid, ifname = req.get("container_id", ""), req.get("ifname", "")
        key = (conf.get("name", ""), cid, ifname)
        with self._container_lock(cid):
            with self.lock:
                a = self.pool.find(key)
            if a is not None:
                self._undo(a, cool=True, endpoint_dir=conf.get("endpoint_dir", ""))
                log.info("pod_deleted", container_id=cid, pod=f"{a.namespace}/{a.pod}", ipv4=a.ipv4)
                return {}
            # Unknown to the pool: remove what the names say could be left over.
            ns, pod = req.get("namespace", ""), req.get("pod", "")
            if ns and pod:
                try:
                    host_veth = naming.veth_name(conf.get("veth_prefix", "eni"), ns, pod)
                    record = endpoint.read_record(os.path.join(conf.get("endpoint_dir", ""),
                                                               endpoint.record_key(ns, pod) + ".json"))
                except (ValueError, OSError):
                    host_veth, record = "", None
                if host_veth:
                    self.plumbing.teardown(real_plumbing.PodNet(host_veth, ifname, req.get("netns", ""), ""))
                if record is not None and record.container_id == cid:
                    endpoint.remove_record(conf.get("endpoint_dir", ""), ns, pod)
            log.info("pod_deleted_unknown", container_id=cid)
            return {}

    # --- CHECK -----------------------------------------------------------------------

    def check(self, req: dict[str, Any]) -> dict[str, Any]:
        conf = req["conf"]
        key = (conf["name"], req["container_id"], req["ifname"])
        with self._container_lock(req["container_id"]):
            with self.lock:
                a = self.pool.find(key)
            if a is None or a.state != "ready":
                raise CNIError(ERR_UNKNOWN_CONTAINER, f"container {req['container_id']} ifname {req['ifname']} "
                               f"has no address in network {conf['name']}")
            problems = []
            prev = req.get("prev_result") or {}
            want = sorted(ip for ip in (a.ipv4, a.ipv6) if ip)
            got = sorted(result_addresses(prev))
            if want != got:
                problems.append(f"prevResult addresses {got} != allocated {want}")
            host_mac = ""
            for itf in prev.get("interfaces", []) or []:
                if isinstance(itf, dict) and itf.get("name") == a.host_veth and not itf.get("sandbox"):
                    host_mac = itf.get("mac", "")
            pn = real_plumbing.PodNet(a.host_veth, a.ifname, req["netns"], a.ipv4, a.ipv6, conf["mtu"], a.table)
            problems += self.plumbing.check(pn, host_mac)
            path = os.path.join(conf["endpoint_dir"], endpoint.record_key(a.namespace, a.pod) + ".json")
            try:
                if endpoint.read_record(path).container_id != a.container_id:
                    problems.append(f"endpoint record {path} names another container")
            except (OSError, ValueError):
                problems.append(f"endpoint record {path} is missing or unreadable")
            if problems:
                raise CNIError(ERR_CHECK_FAILED, f"CHECK of {a.namespace}/{a.pod} failed: {problems[0]}",
                               "; ".join(problems))
            return {}

    # --- STATUS / GC / dump ----------------------------------------------------------

    def status(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            st = self.pool.stats(self.clock())
        if st.available == 0 and st.total >= self.pool.provider.limits.slots_per_eni * st.enis:
            raise CNIError(ERR_NOT_AVAILABLE, f"no free address: {st.assigned} assigned, {st.cooling} cooling down, "
                           f"node supports at most {st.max_pods} pods")
        return {}

    def gc(self, req: dict[str, Any]) -> dict[str, Any]:
        network = req.get("conf", {}).get("name", "")
        valid = {tuple(v) for v in req.get("valid_attachments") or []}
        with self.lock:
            stale = [a for a in self.pool.allocations_list()
                     if a.network == network and (a.container_id, a.ifname) not in valid]
        freed = 0
        for a in stale:
            lock = self._container_lock(a.container_id)
            if not lock.acquire(blocking=False):
                continue  # an ADD/DEL for it is in flight; the next GC gets it
            try:
                with self.lock:
                    still = self.pool.find(a.key) is a
                if still:
                    self._undo(a, cool=True)
                    freed += 1
            finally:
                lock.release()
        log.info("gc_done", network=network, freed=freed, valid=len(valid))
        return {"freed": freed}

    def dump(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            st = self.pool.stats(self.clock())
            return {"stats": asdict(st), "pool": self.pool.to_dict(),
                    "limits": asdict(self.pool.provider.limits)}

    # --- start-up and pool upkeep ---------------------------------------------------

    def restore(self) -> None:
        """Load the checkpoint; undo half-done ADDs and pods whose veth has gone."""
        data = self.checkpoint.load()
        undo: list[Allocation] = []
        if data is not None:
            dropped = self.pool.restore(data)
            for a in dropped:
                log.warning("checkpoint_allocation_dropped", container_id=a.container_id, ipv4=a.ipv4)
                try:
                    self.plumbing.teardown(self._podnet(a))
                except Exception as exc:  # noqa: BLE001
                    log.warning("teardown_failed", host_veth=a.host_veth, error=str(exc))
            links = self.plumbing.host_links()
            for a in self.pool.allocations_list():
                if a.state != "ready":
                    log.warning("restore_undo_half_add", container_id=a.container_id, ipv4=a.ipv4)
                    undo.append(a)
                elif a.host_veth not in links:
                    log.warning("restore_pod_gone", container_id=a.container_id, ipv4=a.ipv4, host_veth=a.host_veth)
                    undo.append(a)
        with self.lock:
            self._save()
        for a in undo:
            self._undo(a, cool=True)
        self.upkeep()
        st = self.pool.stats(self.clock())
        log.info("pool_restored", undone=len(undo), **asdict(st))

    def upkeep(self) -> None:
        with self.lock:
            claimed, released = self.pool.reconcile(self.clock())
            if claimed or released:
                self._save()
