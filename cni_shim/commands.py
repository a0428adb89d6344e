"""ADD / DEL / CHECK / STATUS / GC inside the daemon, with the pool, plumbing and records injected.

Rules:
- ADD is all or nothing: the allocation is checkpointed as "adding" before any
  kernel change and as "ready" after the last; any failure undoes the plumbing,
  the endpoint record and the allocation. A daemon killed mid-ADD finds the
  "adding" entry on restart and undoes it.
- DEL always succeeds and is idempotent; it removes only what belongs to its
  container: its allocation; the host veth only if it is the one this container's
  ADD created (same name and ifindex, or, with no ifindex recorded, the veth whose
  peer is its ifname in its netns); the endpoint record and status file only if
  they name this container id. A DEL or GC for an old sandbox therefore never
  touches a newer sandbox of the same pod, whose host veth has the same name.
- ADD of a new sandbox takes the host veth name over: a veth of that name (an
  older sandbox's, or a leftover) is deleted, and older allocations of the name
  are marked as owning no veth (host_veth ""); their addresses stay allocated
  until their own DEL or GC (docs/decisions/cni-identity.md).
- One container is handled by one request at a time (per-container lock); the
  record and veth name of one pod change under a per-pod lock; the pool and the
  checkpoint change under one pool lock, held only for bookkeeping, never across
  netlink calls or provider (EC2) calls. Order: container, pod, pool. Lock tables hold
  only keys in use.
- An ADD that finds no free address never calls the provider itself: it counts itself
  in the pool's demand, wakes the background fill (upkeep) and waits, without the pool
  lock, for a fill round that saw it, at most ``add_wait`` seconds (and never longer
  than the request's own timeout allows). Then code 11 "no free address; the pool is
  growing", or the provider's reason (subnet full, throttled), or code 100 when the
  node is at its limit. Fill and trim rounds run one at a time (fill lock).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable

import structlog

from cni_shim import plumbing as real_plumbing
from cni_shim.ipam.checkpoint import Checkpoint
from cni_shim.ipam.pool import Allocation, Pool, PoolExhausted, PoolShort
from cni_shim.ipam.provider import EniInfo
from cni_shim.locks import KeyedLocks
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


class _Undo(Exception):
    """ADD failed after reserving: undo this allocation, then answer with error."""

    def __init__(self, alloc: Allocation, error: CNIError) -> None:
        super().__init__(error.msg)
        self.alloc = alloc
        self.error = error


class Service:
    def __init__(
        self,
        pool: Pool,
        checkpoint: Checkpoint,
        plumbing=real_plumbing,
        clock: Callable[[], float] = time.time,
        fault_pause_after_veth: float = 0.0,
        add_wait: float = 10.0,
        eni_plumbing: bool = True,
        eni_mtu: int = 9001,
        eni_ops=None,
    ) -> None:
        self.pool = pool
        self.checkpoint = checkpoint
        self.plumbing = plumbing
        self.clock = clock
        self.fault_pause_after_veth = fault_pause_after_veth
        self.add_wait = add_wait  # longest an ADD waits for the background fill
        self.lock = threading.Lock()
        self.filled = threading.Condition(self.lock)  # notified when a fill round ends or an address frees
        self.fill_lock = threading.Lock()  # one reconcile (provider calls) at a time; never the pool lock
        self.rounds_started = 0
        self.rounds_done = 0
        self.background_upkeep = False  # the daemon's upkeep loop runs (else _kick starts a one-shot fill)
        self._filler: threading.Thread | None = None
        self.container_locks = KeyedLocks()
        self.pod_locks = KeyedLocks()
        self.pool_changed = threading.Event()
        # Secondary-ENI host plumbing (cni_shim/eni.py): ENIs with a MAC (EC2) get their link,
        # route table and source rule; ENIs of the pool file have none and are left alone.
        if eni_ops is None and plumbing is real_plumbing:
            from cni_shim import eni as eni_ops
        self.eni_ops = eni_ops
        self.eni_mtu = eni_mtu
        self.eni_plumbing = eni_plumbing and eni_ops is not None
        self.plumbed_enis: dict[str, EniInfo] = {}
        if self.eni_plumbing:
            pool.on_eni_attached = self._eni_up
            pool.on_eni_released = self._eni_down

    # --- helpers ---------------------------------------------------------------------

    def _save(self) -> None:
        self.checkpoint.save(self.pool.to_dict())

    @contextmanager
    def _bookkeeping(self):
        """The pool lock around one step of a reconcile, with a checkpoint write after it."""
        with self.lock:
            yield
            self._save()

    @staticmethod
    def _podnet(a: Allocation, mtu: int = 9001) -> real_plumbing.PodNet:
        return real_plumbing.PodNet(a.host_veth, a.ifname, a.netns, a.ipv4, a.ipv6, mtu, a.table)

    def _owned_ifindex(self, a: Allocation) -> int:
        """ifindex of the host veth that provably is a's own, else 0 (never a newer sandbox's).

        Deletion is by this index, so a link renamed or replaced meanwhile is never hit."""
        if not a.host_veth:
            return 0  # taken over by a newer sandbox of the pod
        if a.host_ifindex:
            return a.host_ifindex if self.plumbing.link_index(a.host_veth) == a.host_ifindex else 0
        # No index recorded: an ADD that died between creating the veth and the
        # checkpoint, or a checkpoint written before indexes were kept. The netns
        # must still be the one of the ADD and hold the veth's peer.
        if a.netns_inode and self.plumbing.netns_inode(a.netns) != a.netns_inode:
            return 0
        return self.plumbing.peer_of(a.host_veth, a.netns, a.ifname)

    def _forget_files(self, ns: str, pod: str, cid: str, endpoint_dir: str, status_dir: str) -> None:
        """Remove the pod's endpoint record and status file if (and only if) they name cid."""
        if not ns or not pod:
            return
        with self.pod_locks.hold(f"{ns}/{pod}"):
            if endpoint_dir:
                try:
                    path = os.path.join(endpoint_dir, endpoint.record_key(ns, pod) + ".json")
                    rec = endpoint.read_record(path)
                except FileNotFoundError:
                    rec = None
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    rec = None  # cannot prove it is ours: leave it (the next ADD overwrites it)
                    log.warning("endpoint_record_unreadable_left", pod=f"{ns}/{pod}", container_id=cid,
                                error=str(exc))
                if rec is not None:
                    if rec.container_id == cid:
                        endpoint.remove_record(endpoint_dir, ns, pod)
                    else:
                        log.info("endpoint_record_of_other_container_left", pod=f"{ns}/{pod}", container_id=cid,
                                 record_container_id=rec.container_id)
            if status_dir:
                try:
                    st = endpoint.read_status(status_dir, ns, pod)
                    if st is not None and st.container_id == cid:
                        endpoint.remove_status(status_dir, ns, pod)
                except (OSError, ValueError) as exc:
                    log.warning("status_file_remove_failed", pod=f"{ns}/{pod}", error=str(exc))

    def _undo(self, a: Allocation, cool: bool, endpoint_dir: str = "", status_dir: str = "") -> None:
        """Remove a's plumbing, record, status file and allocation, and nothing else. Never raises."""
        try:
            idx = self._owned_ifindex(a)
            if a.host_veth and not idx:
                log.info("host_veth_not_owned_left", container_id=a.container_id, host_veth=a.host_veth,
                         recorded_ifindex=a.host_ifindex)
            self.plumbing.teardown(self._podnet(a), idx)
        except Exception as exc:  # noqa: BLE001 - DEL must go on
            log.warning("teardown_failed", container_id=a.container_id, host_veth=a.host_veth, error=str(exc))
        try:
            self._forget_files(a.namespace, a.pod, a.container_id, endpoint_dir or a.endpoint_dir,
                               status_dir or a.status_dir)
        except (OSError, ValueError) as exc:
            log.warning("endpoint_record_remove_failed", key=f"{a.namespace}/{a.pod}", error=str(exc))
        with self.lock:
            cur = self.pool.find(a.key)
            if cur is not None and cur.ipv4 == a.ipv4:
                self.pool.release(a.key, self.clock(), cool=cool)
                self._save()
                self.filled.notify_all()  # an ADD waiting for an address may take it (cooldown 0)
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
        ns, pod, uid = req["namespace"], req["pod"], req.get("pod_uid", "") or ""
        try:
            host_veth = naming.veth_name(conf["veth_prefix"], ns, pod)
            endpoint.record_key(ns, pod)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, str(exc)) from None
        if not os.path.exists(netns):
            raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS {netns} does not exist")
        key = (conf["name"], cid, ifname)
        t0 = time.monotonic()
        with self.container_locks.hold(cid):
            try:
                with self.pod_locks.hold(f"{ns}/{pod}"):
                    a, built = self._reserve_and_wire(req, key, host_veth, uid)
            except _Undo as u:
                self._undo(u.alloc, cool=False)
                raise u.error from None
            wait = float(conf.get("policy_wait", 0.0))
            if wait > 0 and not self._wait_programmed(conf["status_dir"], ns, pod, cid, uid, wait):
                self._undo(a, cool=False)
                raise CNIError(
                    ERR_TRY_AGAIN_LATER,
                    f"policy agent did not report {ns}/{pod} programmed within {wait:g}s (undone)",
                    f"no status file with container_id {cid}" + (f" and pod_uid {uid}" if uid else "")
                    + f" in {conf['status_dir']}",
                )
            with self.lock:
                a.state = "ready"
                self._save()
            log.info("pod_added", container_id=cid, pod=f"{ns}/{pod}", pod_uid=uid, host_veth=host_veth,
                     host_ifindex=built.host_ifindex, ipv4=a.ipv4, ipv6=a.ipv6, eni=a.eni,
                     ms=round((time.monotonic() - t0) * 1000, 1))
            return make_result(host_veth, built.host_mac, ifname, built.pod_mac, netns, a.ipv4, a.ipv6)

    def _reserve_and_wire(self, req: dict[str, Any], key, host_veth: str, uid: str):
        """Allocate, take the veth name over, build, write the record (pod lock held).

        Raises CNIError with nothing reserved, or _Undo once something is."""
        conf = req["conf"]
        cid, ifname, netns = req["container_id"], req["ifname"], req["netns"]
        ns, pod = req["namespace"], req["pod"]
        inode = self.plumbing.netns_inode(netns)
        with self.lock:
            found = self.pool.find(key)
            previous = copy.copy(found) if found is not None else None
            a = self._allocate_locked(key, ns, pod, self._add_wait(conf))
            a.namespace, a.pod, a.pod_uid, a.host_veth, a.netns = ns, pod, uid, host_veth, netns
            a.endpoint_dir, a.status_dir = conf["endpoint_dir"], conf.get("status_dir", "")
            a.netns_inode, a.host_ifindex, a.peer_ifindex = inode, 0, 0
            a.state = "adding"
            # The veth name is the pod's: this (newest) sandbox takes it over. Older
            # allocations of the name keep their addresses until their DEL/GC, but own
            # no veth any more, so that DEL/GC leaves ours alone.
            for other in self.pool.by_host_veth(host_veth):
                if other.key != key:
                    log.warning("host_veth_taken_over", host_veth=host_veth, pod=f"{ns}/{pod}",
                                container_id=cid, pod_uid=uid, old_container_id=other.container_id,
                                old_pod_uid=other.pod_uid, old_ipv4=other.ipv4)
                    other.host_veth, other.host_ifindex, other.peer_ifindex = "", 0, 0
            self._save()
        self.pool_changed.set()
        try:
            if previous is not None:  # a repeated ADD: rebuild from scratch with the same address
                self.plumbing.teardown(self._podnet(previous), self._owned_ifindex(previous))
            else:
                # A status file naming this container id is left from an earlier life of it.
                st = endpoint.read_status(a.status_dir, ns, pod) if a.status_dir else None
                if st is not None and st.container_id == cid:
                    endpoint.remove_status(a.status_dir, ns, pod)
            pn = real_plumbing.PodNet(host_veth, ifname, netns, a.ipv4, a.ipv6, conf["mtu"], a.table)
            try:
                built = self.plumbing.setup(pn, after_veth=self._fault_hook)
            except real_plumbing.NetnsMissing as exc:
                raise _Undo(a, CNIError(ERR_INVALID_ENV, str(exc))) from None
            except Exception as exc:
                raise _Undo(a, CNIError(ERR_PLUMBING, f"setting up {host_veth} for {ns}/{pod} failed (undone)",
                                        str(exc))) from None
            with self.lock:
                a.host_ifindex, a.peer_ifindex = built.host_ifindex, built.peer_ifindex
            try:
                endpoint.write_record(conf["endpoint_dir"], endpoint.EndpointRecord(
                    namespace=ns, pod=pod, container_id=cid, interface=host_veth,
                    ips=tuple(ip for ip in (a.ipv4, a.ipv6) if ip), netns=netns, created=self.clock(),
                    pod_uid=uid,
                ))
            except OSError as exc:
                raise _Undo(a, CNIError(ERR_IO, f"writing the endpoint record in {conf['endpoint_dir']} failed "
                                        "(undone)", str(exc))) from None
        except _Undo:
            raise
        except Exception as exc:
            raise _Undo(a, CNIError(ERR_PLUMBING, f"ADD of {ns}/{pod} failed (undone)", repr(exc))) from None
        return a, built

    def _add_wait(self, conf: dict[str, Any]) -> float:
        """How long an ADD may wait for the fill: add_wait, and under the client's own timeout."""
        timeout = conf.get("request_timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            return max(0.0, min(self.add_wait, float(timeout) * 0.8 - 0.5))
        return self.add_wait

    def _allocate_locked(self, key, ns: str, pod: str, wait: float) -> Allocation:
        """An address for key (pool lock held). Waits for the background fill on self.filled,
        which releases the pool lock while waiting; never calls the provider itself."""
        deadline = time.monotonic() + wait
        want = 0  # the fill round that must have run with this ADD counted in the demand
        try:
            while True:
                try:
                    return self.pool.allocate(key, self.clock())
                except PoolExhausted as exc:
                    raise CNIError(ERR_POOL_EXHAUSTED, str(exc)) from None
                except PoolShort:
                    pass
                if want and self.rounds_done >= want:
                    err = self.pool.grow_error
                    if err is not None:  # EC2 said no (subnet full, throttled): nothing reserved
                        raise CNIError(ERR_TRY_AGAIN_LATER, f"no address for {ns}/{pod} yet: {err}") from None
                    if self.pool.last_wanted and not self.pool.last_claimed:  # the provider has no more
                        raise CNIError(ERR_POOL_EXHAUSTED, str(self.pool.exhausted(self.clock()))) from None
                if not want:
                    self.pool.demand += 1
                    log.info("add_waits_for_pool_fill", pod=f"{ns}/{pod}", container_id=key[1],
                             demand=self.pool.demand, wait=round(wait, 2))
                if not want or self.rounds_done >= want:
                    want = self.rounds_started + 1  # a round that starts from now on counts us
                    self._kick()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CNIError(ERR_TRY_AGAIN_LATER, f"no free address for {ns}/{pod}; the pool is growing",
                                   f"waited {wait:g}s for the background fill; the pod may try again later")
                self.filled.wait(left)
        finally:
            if want:
                self.pool.demand -= 1

    def _kick(self) -> None:
        """Wake the background fill now (the daemon's upkeep loop, else a one-shot thread)."""
        self.pool_changed.set()
        if self.background_upkeep:
            return
        if self._filler is None or not self._filler.is_alive():
            self._filler = threading.Thread(target=self._upkeep_quietly, name="pool-fill", daemon=True)
            self._filler.start()

    def _upkeep_quietly(self) -> None:
        try:
            self.upkeep()
        except Exception:  # noqa: BLE001 - a fill thread must not die noisily
            log.exception("pool_upkeep_failed")

    def _fault_hook(self) -> None:
        if self.fault_pause_after_veth > 0:  # test-only: lets a test kill us mid-ADD
            log.warning("fault_pause_after_veth", seconds=self.fault_pause_after_veth)
            time.sleep(self.fault_pause_after_veth)

    def _wait_programmed(self, status_dir: str, ns: str, pod: str, cid: str, uid: str, timeout: float) -> bool:
        """Wait for the agent's status file naming this container and, when known, this pod UID.

        A file for the same name but another UID is the agent programming an older Pod
        object (its labels, its policies): it must not release this sandbox."""
        deadline = time.monotonic() + timeout
        while True:
            st = endpoint.read_status(status_dir, ns, pod)
            if st is not None and st.container_id == cid and (not uid or st.pod_uid == uid):
                return True
            if time.monotonic() >= deadline:
                if st is not None and st.container_id == cid:
                    log.warning("status_file_pod_uid_mismatch", pod=f"{ns}/{pod}", container_id=cid, pod_uid=uid,
                                status_pod_uid=st.pod_uid)
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
        endpoint_dir, status_dir = conf.get("endpoint_dir", ""), conf.get("status_dir", "")
        with self.container_locks.hold(cid):
            with self.lock:
                a = self.pool.find(key)
            if a is not None:
                self._undo(a, cool=True, endpoint_dir=endpoint_dir, status_dir=status_dir)
                log.info("pod_deleted", container_id=cid, pod=f"{a.namespace}/{a.pod}", ipv4=a.ipv4,
                         host_veth=a.host_veth or "(taken over)")
                return {}
            # Unknown to the pool (a repeated DEL, or a lost checkpoint): remove only
            # what provably is this container's.
            ns, pod = req.get("namespace", ""), req.get("pod", "")
            try:
                host_veth = naming.veth_name(conf.get("veth_prefix", "eni"), ns, pod) if ns and pod else ""
                endpoint.record_key(ns, pod) if ns and pod else None
            except ValueError:
                host_veth, ns, pod = "", "", ""
            if host_veth:
                idx = self.plumbing.peer_of(host_veth, req.get("netns", ""), ifname)
                with self.lock:
                    claimed = any(o.host_ifindex == idx for o in self.pool.by_host_veth(host_veth))
                if idx and not claimed:
                    self.plumbing.teardown(real_plumbing.PodNet(host_veth, ifname, req.get("netns", ""), ""), idx)
                    log.info("stale_host_veth_deleted", container_id=cid, host_veth=host_veth, ifindex=idx)
            self._forget_files(ns, pod, cid, endpoint_dir, status_dir)
            log.info("pod_deleted_unknown", container_id=cid)
            return {}

    # --- CHECK -----------------------------------------------------------------------

    def check(self, req: dict[str, Any]) -> dict[str, Any]:
        conf = req["conf"]
        key = (conf["name"], req["container_id"], req["ifname"])
        with self.container_locks.hold(req["container_id"]):
            with self.lock:
                found = self.pool.find(key)
                a = copy.copy(found) if found is not None else None
            if a is None or a.state != "ready":
                raise CNIError(ERR_UNKNOWN_CONTAINER, f"container {req['container_id']} ifname {req['ifname']} "
                               f"has no address in network {conf['name']}")
            if not a.host_veth:
                raise CNIError(ERR_CHECK_FAILED, f"CHECK of {a.namespace}/{a.pod} failed: its host veth was taken "
                               "over by a newer sandbox of the pod")
            if a.host_ifindex and self.plumbing.link_index(a.host_veth) != a.host_ifindex:
                raise CNIError(ERR_CHECK_FAILED, f"CHECK of {a.namespace}/{a.pod} failed: host veth {a.host_veth} "
                               f"(ifindex {a.host_ifindex}) is missing or was replaced")
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
                rec = endpoint.read_record(path)
                if rec.container_id != a.container_id:
                    problems.append(f"endpoint record {path} names another container")
                elif a.pod_uid and rec.pod_uid != a.pod_uid:
                    problems.append(f"endpoint record {path} names pod UID {rec.pod_uid!r}, not {a.pod_uid!r}")
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
            with self.container_locks.hold(a.container_id, blocking=False) as got:
                if not got:
                    continue  # an ADD/DEL for it is in flight; the next GC gets it
                with self.lock:
                    still = self.pool.find(a.key) is a
                if still:
                    self._undo(a, cool=True)
                    freed += 1
        log.info("gc_done", network=network, freed=freed, valid=len(valid))
        return {"freed": freed}

    def dump(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            st = self.pool.stats(self.clock())
            return {"stats": asdict(st), "pool": self.pool.to_dict(),
                    "limits": asdict(self.pool.provider.limits)}

    # --- start-up and pool upkeep ---------------------------------------------------

    def restore(self) -> None:
        """Load the checkpoint; undo half-done ADDs and pods whose own veth has gone."""
        data = self.checkpoint.load()
        undo: list[Allocation] = []
        if data is not None:
            dropped = self.pool.restore(data)
            for a in dropped:
                log.warning("checkpoint_allocation_dropped", container_id=a.container_id, ipv4=a.ipv4)
                try:
                    self.plumbing.teardown(self._podnet(a), self._owned_ifindex(a))
                except Exception as exc:  # noqa: BLE001
                    log.warning("teardown_failed", host_veth=a.host_veth, error=str(exc))
            links = self.plumbing.host_links()
            for a in self.pool.allocations_list():
                if a.state != "ready":
                    log.warning("restore_undo_half_add", container_id=a.container_id, ipv4=a.ipv4)
                    undo.append(a)
                elif not a.host_veth:
                    # Taken over by a newer sandbox: this sandbox has no network any more.
                    log.warning("restore_pod_gone", container_id=a.container_id, ipv4=a.ipv4, host_veth="")
                    undo.append(a)
                elif a.host_ifindex and links.get(a.host_veth) != a.host_ifindex:
                    log.warning("restore_pod_gone", container_id=a.container_id, ipv4=a.ipv4, host_veth=a.host_veth)
                    undo.append(a)
                elif not a.host_ifindex:
                    # A checkpoint from before ifindexes were kept: adopt the veth if it is provably ours.
                    idx = self._owned_ifindex(a) if a.host_veth in links else 0
                    if idx:
                        a.host_ifindex = idx
                    else:
                        log.warning("restore_pod_gone", container_id=a.container_id, ipv4=a.ipv4,
                                    host_veth=a.host_veth)
                        undo.append(a)
        with self.lock:
            self._save()
        for a in undo:
            self._undo(a, cool=True)
        self.upkeep()
        st = self.pool.stats(self.clock())
        log.info("pool_restored", undone=len(undo), **asdict(st))

    def upkeep(self) -> None:
        """One reconcile round: EC2 calls outside the pool lock, bookkeeping under it.

        Waiting ADDs are notified when the round ends, whatever its outcome."""
        with self.fill_lock:
            with self.lock:
                self.rounds_started += 1
                n = self.rounds_started
            try:
                self.pool.reconcile(self.clock(), guard=self._bookkeeping)
            finally:
                with self.lock:
                    self.rounds_done = n
                    self.filled.notify_all()
            if self.eni_plumbing:
                self._sync_enis()

    # --- secondary-ENI host plumbing ---------------------------------------------------

    def _eni_net(self, info: EniInfo):
        return self.eni_ops.EniNet.of(info, self.eni_mtu)

    def _eni_up(self, info: EniInfo, wait: float = 10.0) -> None:
        """Plumb a secondary ENI; ``wait``: how long its link may take to appear after the attach."""
        if not info.mac or info.is_primary:
            return
        self.eni_ops.setup_eni(self._eni_net(info), wait=wait)
        self.plumbed_enis[info.id] = info
        log.info("eni_host_ready", eni=info.id, mac=info.mac, table=info.table, device=info.device)

    def _eni_down(self, info: EniInfo) -> None:
        if not info.mac or info.is_primary:
            return
        self.eni_ops.teardown_eni(self._eni_net(info))
        self.plumbed_enis.pop(info.id, None)
        log.info("eni_host_removed", eni=info.id, mac=info.mac, table=info.table)

    def _sync_enis(self) -> None:
        """Plumb pool ENIs whose link was not there yet; unplumb ENIs the pool no longer has."""
        with self.lock:
            have = {i: e.info for i, e in self.pool.enis.items()}
        for eid, info in have.items():
            if eid not in self.plumbed_enis and info.mac and not info.is_primary:
                try:
                    self._eni_up(info, wait=0.0)  # one look: never hold the fill lock waiting here
                except Exception as exc:  # noqa: BLE001 - retried at the next upkeep
                    log.warning("eni_host_setup_failed", eni=eid, mac=info.mac, error=str(exc))
        for eid, info in list(self.plumbed_enis.items()):
            if eid not in have:
                try:
                    self._eni_down(info)
                except Exception as exc:  # noqa: BLE001
                    log.warning("eni_host_teardown_failed", eni=eid, error=str(exc))
