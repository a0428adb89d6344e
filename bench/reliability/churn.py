"""Reliability campaign: continuous probing under churn in the lab (issue 10, "Prove it").

One lab (policy_agent.lab; with ``--apiserver``, the default, the agent watches a real
kube-apiserver + etcd) with 9 pods in 3 namespaces and 4 NetworkPolicies. A prober thread
opens one TCP connection per probed pair (IPv4 and IPv6, port 80) every 50 ms for the whole
run, from inside the source pod's namespace to the destination pod's address, while these
phases run one after the other (each measured on its own):

  baseline      nothing happens: the noise floor
  a-sigterm     the agent stopped with SIGTERM, down for a while, started again (x3)
  a-sigkill     the same with SIGKILL (x3)
  b-ipamd       vpcip-ipamd killed with -9, down for a while, started again, then one pod
                rolled through it (x2)
  c-apiserver   kube-apiserver stopped (SIGTERM) for 60 s; as soon as it answers again an
                allow rule is added, and removed again later
  d-policy      policy updates while probing: an allow rule added/removed, a pod label, a
                namespace label, a podSelector (each toggled there and back)
  e-roll        20 pods rolled like a Deployment rollout: a new pod under a new name is
                created (probed from the moment its CNI ADD returned), then the old one deleted
  final         nothing happens

Every process is the lab's own, found by its pid in the lab's state.json (Lab.kill checks
the command line first); all traffic is between the lab's namespaces; the lab is always
taken down (try/finally), and the run fails if a namespace of it is left.

Per probe: send time, pair, family, outcome (connected, refused, timeout, other error),
phase. Observed verdict "reached" = connected or refused by the destination: the SYN passed
every filter (the deny action is DROP, so nothing on the way answers with a RST; a pod whose
server is not up yet refuses). Expected verdict: tests/reference_eval.py (an evaluator that
shares no code with the compiler) on the objects in force at the send time.

Windows (see docs/reliability.md): a change opens a window when the benchmark starts writing
it and closes it when the lab has the agent's word that the kernel commit is done (Lab.apply
returns: /status applied_generation caught up, endpoint status files written). A new pod's
window opens when its CNI ADD returns. Inside a window the verdict of the state being left
and the verdict of the state being entered are both accepted (a new pod "leaves" the state
where it does not exist: fail closed, denied); anything else is wrong. Outside windows only
the current state's verdict is right. A window longer than --max-window counts the probes
past the cap as outside it.

  sudo .venv/bin/python bench/reliability/churn.py [--name h8-churn] [--out DIR]
        [--no-apiserver] [--phases baseline,a,b,c,d,e,final] [--outage 60] [--rolls 20] ...

Writes DIR/churn.json and DIR/churn.md and prints the markdown table.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import copy
import errno
import ipaddress
import json
import os
import platform
import select
import signal
import socket
import statistics
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "tests"))  # the reference evaluator

import reference_eval as ref  # noqa: E402

from policy_agent.lab import lab as L  # noqa: E402
from policy_agent.lab import netns  # noqa: E402
from policy_agent.model.parse import parse_object  # noqa: E402
from policy_agent.model.types import ClusterSnapshot  # noqa: E402
from policy_agent.shared import netns as shared_netns  # noqa: E402

PORT = 80
CONNECTED, REFUSED, TIMEOUT, ERROR = 1, 2, 0, 3
OUTCOME_NAMES = {CONNECTED: "connected", REFUSED: "refused", TIMEOUT: "timeout", ERROR: "error"}
ALL_PHASES = ("baseline", "a", "b", "c", "d", "e", "final")

# --- workload ---------------------------------------------------------------------------

NAMESPACES = {"prod": {"team": "prod"}, "clients": {"team": "clients"}, "other": {"team": "other"}}
# app -> (namespace, replicas, extra labels)
APPS = {
    "web": ("prod", 4, {}),
    "db": ("prod", 1, {}),
    "client": ("clients", 2, {"role": "client"}),
    "intruder": ("other", 1, {}),
    "monitor": ("other", 1, {}),
}
# (source app, destination app): every such pod pair is probed, both families.
PAIR_RULES = (
    ("client", "web"), ("intruder", "web"), ("monitor", "web"), ("db", "web"),
    ("web", "db"), ("web", "intruder"), ("web", "client"),
    ("intruder", "db"), ("client", "intruder"), ("intruder", "client"),
)
# Pods rolled in phase e, in this order (cycled): a Deployment-like rollout of each app.
ROLL_ORDER = ("web", "client", "web", "intruder", "web", "db", "web", "monitor", "web", "client")


def ns_doc(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels if labels is not None else NAMESPACES[name])}}


def pod_doc(app: str, name: str, labels: dict | None = None) -> dict:
    ns, _, extra = APPS[app]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": dict(labels or {"app": app, **extra})},
            "spec": {"containers": [{"name": "srv", "image": "none",
                                     "ports": [{"containerPort": PORT, "protocol": "TCP", "name": "http"}]}]}}


def np_doc(ns: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def _tcp80() -> list[dict]:
    return [{"port": PORT, "protocol": "TCP"}]


def base_policies() -> list[dict]:
    return [
        np_doc("prod", "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        np_doc("prod", "web-ingress", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "clients"}},
                                   "podSelector": {"matchLabels": {"role": "client"}}}], "ports": _tcp80()}]}),
        np_doc("prod", "web-egress", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": _tcp80()}]}),
        db_ingress("web"),
    ]


def db_ingress(from_app: str) -> dict:
    return np_doc("prod", "db-ingress", {
        "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from_app}}}], "ports": _tcp80()}]})


def allow_monitor() -> dict:
    return np_doc("prod", "allow-monitor", {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "other"}},
                               "podSelector": {"matchLabels": {"app": "monitor"}}}], "ports": _tcp80()}]})


def initial_docs() -> list[dict]:
    docs = [ns_doc(n) for n in NAMESPACES]
    for app, (_ns, replicas, _extra) in APPS.items():
        docs += [pod_doc(app, f"{app}-v0-{i}") for i in range(replicas)]
    return docs + base_policies()


def app_of(doc: dict) -> str:
    return doc["metadata"]["name"].split("-v")[0]


# --- the prober -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    src: str  # ns/pod
    dst: str
    family: int


class Prober:
    """One thread: every ``interval`` a non-blocking TCP connect per planned pair, from a
    socket made inside the source pod's namespace (setns), answers collected with epoll."""

    def __init__(self, interval: float = 0.05, timeout: float = 0.9) -> None:
        self.interval, self.timeout = interval, timeout
        self.pairs: list[Pair] = []
        self._ids: dict[Pair, int] = {}
        self._plan: dict[str, list[tuple[int, str, int]]] = {}  # src netns -> [(pair id, dst ip, family)]
        self.t0 = array("d")
        self.pair = array("l")
        self.outcome = array("b")
        self.ticks = 0
        self.late_ticks = 0  # ticks that began more than one interval late
        self.max_lateness = 0.0
        self.started = self.stopped = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def pair_id(self, p: Pair) -> int:
        if p not in self._ids:
            self._ids[p] = len(self.pairs)
            self.pairs.append(p)
        return self._ids[p]

    def set_plan(self, plan: list[tuple[Pair, str, str]]) -> None:
        """[(pair, source netns, destination ip)] replaces what is probed from the next tick."""
        new: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
        for p, src_ns, ip in plan:
            new[src_ns].append((self.pair_id(p), ip, p.family))
        self._plan = dict(new)  # one reference swap: the thread reads it once per tick

    def settle(self, ticks: int = 2) -> None:
        """Return after ``ticks`` more ticks began: no probe of an older plan is sent after this."""
        want = self.ticks + ticks
        deadline = time.monotonic() + 5
        while self.ticks < want and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(self.interval / 4)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name="prober", daemon=True)
        self.started = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.stopped = time.time()

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc

    def _record(self, t0: float, pid: int, out: int) -> None:
        self.t0.append(t0)
        self.pair.append(pid)
        self.outcome.append(out)

    def _run(self) -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fds: dict[str, int] = {}
        ep = select.epoll()
        pending: dict[int, tuple[socket.socket, float, int]] = {}
        expiry: collections.deque = collections.deque()  # (deadline, fd, sock), in send order
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    lateness = now - next_tick
                    self.max_lateness = max(self.max_lateness, lateness)
                    if lateness > self.interval:
                        self.late_ticks += 1
                        next_tick = now
                    self._launch(own, fds, ep, pending, expiry)
                    self.ticks += 1
                    next_tick += self.interval
                horizon = next_tick if not expiry else min(next_tick, expiry[0][0])
                for fd, _ev in ep.poll(max(0.0, horizon - time.monotonic())):
                    sock, t0, pid = pending.pop(fd)
                    ep.unregister(fd)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self._record(t0, pid, CONNECTED if err == 0 else REFUSED if err == errno.ECONNREFUSED else ERROR)
                    _close(sock, err == 0)
                now = time.monotonic()
                while expiry and expiry[0][0] <= now:
                    _dl, fd, sock = expiry.popleft()
                    got = pending.get(fd)
                    if got is not None and got[0] is sock:
                        del pending[fd]
                        ep.unregister(fd)
                        self._record(got[1], got[2], TIMEOUT)
                        _close(sock, False)
        finally:
            for sock, _t0, _pid in pending.values():
                sock.close()  # stopped mid-flight: not recorded
            ep.close()
            for fd in fds.values():
                os.close(fd)
            os.close(own)

    def _launch(self, own: int, fds: dict[str, int], ep, pending, expiry) -> None:
        plan = self._plan
        for gone in [n for n in fds if n not in plan]:
            os.close(fds.pop(gone))
        deadline = time.monotonic() + self.timeout
        for src_ns, items in plan.items():
            fd = fds.get(src_ns)
            if fd is None:
                try:
                    fd = fds[src_ns] = os.open(os.path.join(netns.NETNS_DIR, src_ns), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
            shared_netns.setns(fd)
            try:
                socks = [socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6,
                                       socket.SOCK_STREAM | socket.SOCK_NONBLOCK) for _pid, _ip, fam in items]
            finally:
                shared_netns.setns(own)
            for sock, (pid, ip, _fam) in zip(socks, items):
                t0 = time.time()
                err = sock.connect_ex((ip, PORT))
                if err == errno.EINPROGRESS:
                    pending[sock.fileno()] = (sock, t0, pid)
                    ep.register(sock.fileno(), select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP)
                    expiry.append((deadline, sock.fileno(), sock))
                else:
                    self._record(t0, pid, CONNECTED if err == 0 else REFUSED if err == errno.ECONNREFUSED else ERROR)
                    _close(sock, err == 0)


def _close(sock: socket.socket, connected: bool) -> None:
    if connected:
        # RST instead of FIN: no TIME_WAIT piles up in the pods at 20 connections/s per pair.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# --- the truth: which objects are in force, and since when ---------------------------------


@dataclass
class Epoch:
    """The objects in force from ``start``; a change opens a window that ``close`` ends."""

    start: float
    snap: ClusterSnapshot
    label: str
    window: bool  # a change the agent has to catch up with (False: nothing to enforce, e.g. a pod gone)
    window_end: float | None = None  # None: the window is still open
    prev: "Epoch | None" = None
    published: float | None = None  # when the change reached the agent's source
    _cache: dict = field(default_factory=dict, repr=False)

    def close(self, when: float | None = None) -> None:
        self.window_end = time.time() if when is None else when

    def expected(self, p: Pair) -> bool | None:
        if p not in self._cache:
            s = self.snap.pods.get(tuple(p.src.split("/")))
            d = self.snap.pods.get(tuple(p.dst.split("/")))
            if s is None or d is None:
                self._cache[p] = None  # one end is not there: fail closed
            else:
                se = ref.Endpoint(next(ip for ip in s.ips if ip.version == p.family), s)
                de = ref.Endpoint(next(ip for ip in d.ips if ip.version == p.family), d)
                self._cache[p] = ref.allowed(self.snap, se, de, "TCP", PORT)
        return self._cache[p]


class Truth:
    """The benchmark's own record of the objects it has written, with pod addresses."""

    def __init__(self, docs: dict[str, dict], ips: dict[str, list[str]]) -> None:
        self.docs = copy.deepcopy(docs)
        self.ips = dict(ips)
        self.epochs: list[Epoch] = []
        self._starts: list[float] = []
        self.begin("initial", window=False)

    def snapshot(self) -> ClusterSnapshot:
        objs = []
        for key, d in self.docs.items():
            o = parse_object(d)
            if d["kind"] == "Pod":
                ref_ = key.split("/", 1)[1]
                # Addresses set here, not through status: what the evaluator needs is the address
                # the lab gave the pod, whatever the parser's address policy says.
                import dataclasses

                o = dataclasses.replace(o, ips=tuple(ipaddress.ip_address(a) for a in self.ips[ref_]),
                                        node_name="lab", phase="Running")
            objs.append(o)
        return ClusterSnapshot.of(objs)

    def begin(self, label: str, set_docs: list[dict] = (), remove: list[str] = (), window: bool = True,
              ips: dict[str, list[str]] | None = None) -> Epoch:
        for d in set_docs:
            self.docs[L.obj_key(d)] = copy.deepcopy(d)
        for k in remove:
            self.docs.pop(k, None)
        self.ips.update(ips or {})
        now = time.time()
        ep = Epoch(now, self.snapshot(), label, window, None if window else now,
                   self.epochs[-1] if self.epochs else None)
        self.epochs.append(ep)
        self._starts.append(now)
        return ep

    def at(self, t: float) -> Epoch:
        i = bisect.bisect_right(self._starts, t) - 1
        return self.epochs[max(i, 0)]


# --- the campaign -----------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    events: list[dict] = field(default_factory=list)
    windows: list[Epoch] = field(default_factory=list)


class Campaign:
    def __init__(self, lab: L.Lab, prober: Prober, args) -> None:
        self.lab, self.prober, self.args = lab, prober, args
        self.phases: list[Phase] = []
        self.truth: Truth | None = None
        self.rev = collections.Counter()
        self.c_changes: list[tuple[Epoch, float]] = []  # (change made as soon as the apiserver was back, ready at)
        self.c_outages: list[tuple[float, float]] = []  # (killed, ready again)

    # plan: which pairs, from which namespace, to which address
    def pods_by_app(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = collections.defaultdict(list)
        for key, d in self.truth.docs.items():
            if d["kind"] == "Pod":
                out[app_of(d)].append(key.split("/", 1)[1])
        return out

    def plan(self) -> list[tuple[Pair, str, str]]:
        by_app = self.pods_by_app()
        out = []
        for sa, da in PAIR_RULES:
            for s in sorted(by_app.get(sa, ())):
                for d in sorted(by_app.get(da, ())):
                    for fam in self.args.families:
                        ip = next((a for a in self.lab.pods[d].ips if ipaddress.ip_address(a).version == fam), None)
                        if ip is not None and s != d:
                            out.append((Pair(s, d, fam), self.lab.pods[s].netns, ip))
        return out

    def replan(self) -> None:
        self.prober.set_plan(self.plan())

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def begin_phase(self, name: str) -> None:
        if self.phases and not self.phase.end:
            self.phase.end = time.time()
        self.phases.append(Phase(name, time.time()))
        print(f"[{time.strftime('%H:%M:%S')}] phase {name}", flush=True)

    def end_phase(self) -> None:
        self.phase.end = time.time()

    def event(self, what: str, **kw) -> None:
        kw = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in kw.items()}
        self.phase.events.append({"t": round(time.time(), 3), "what": what, **kw})

    def hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.prober.error is not None:
                raise RuntimeError(f"prober failed: {self.prober.error!r}")
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    # changes through the lab
    def change(self, label: str, apply: list[dict] = (), delete: list[dict] = (), timeout: float = 60.0) -> Epoch:
        removed = [L.obj_key(d) for d in delete]
        ep = self.truth.begin(label, list(apply), removed)
        if apply:
            self.lab.apply(list(apply), timeout)
        if delete:
            self.lab.delete(list(delete), timeout)
        ep.published = self.lab.last_publish_time
        ep.close()
        self.phase.windows.append(ep)
        self.event("change", label=label, window_s=ep.window_end - ep.start)
        return ep

    def roll(self, app: str) -> None:
        """Deployment-like: the new pod first (probed from its CNI ADD on), then the old one goes."""
        by_app = self.pods_by_app()
        old_ref = sorted(by_app[app], key=lambda r: (int(r.split("-v")[1].split("-")[0]), r))[0]
        old = self.truth.docs[f"Pod/{old_ref}"]
        self.rev[app] += 1
        ns = APPS[app][0]
        new = pod_doc(app, f"{app}-v{self.rev[app]}-0", labels=dict(old["metadata"]["labels"]))
        new_ref = f"{ns}/{new['metadata']['name']}"
        started = time.time()
        box: dict = {}

        def wired(pod: L.PodState) -> None:
            box["ep"] = self.truth.begin(f"pod {new_ref} added", [new], ips={pod.ref: list(pod.ips)})
            self.replan()  # probed to and from from now on: its first packet is ours
            box["wired"] = time.time()

        self.lab.apply([new], self.args.change_timeout, on_wired=wired)
        ep = box["ep"]
        ep.published = self.lab.last_publish_time
        ep.close()
        self.phase.windows.append(ep)
        # The old pod leaves the plan before it leaves the truth, then goes (API object, then CNI DEL).
        keep = [(p, s, ip) for (p, s, ip) in self.plan() if old_ref not in (p.src, p.dst)]
        self.prober.set_plan(keep)
        self.prober.settle()
        self.truth.begin(f"pod {old_ref} removed", remove=[f"Pod/{old_ref}"], window=False)
        self.lab.delete([old], self.args.change_timeout)
        self.event("roll", app=app, old=old_ref, new=new_ref, add_window_s=ep.window_end - ep.start,
                   cni_add_s=box["wired"] - started, total_s=time.time() - started)

    # phases
    def run(self, phases: list[str]) -> None:
        a = self.args
        if "baseline" in phases:
            self.begin_phase("baseline")
            self.hold(a.baseline)
        if "a" in phases:
            for sig, n in ((signal.SIGTERM, a.restarts), (signal.SIGKILL, a.restarts)):
                self.begin_phase("a-" + signal.Signals(sig).name.lower())
                for _ in range(n):
                    t = time.time()
                    pid = self.lab.kill("agent", sig)
                    t_dead = time.time()
                    self.hold(a.down)
                    new = self.lab.start("agent", timeout=180)
                    self.event("agent_restart", signal=signal.Signals(sig).name, old_pid=pid, new_pid=new,
                               exit_s=t_dead - t, down_s=time.time() - t_dead)
                    self.hold(a.settle)
        if "b" in phases:
            self.begin_phase("b-ipamd")
            for i in range(a.ipamd_kills):
                pid = self.lab.kill("ipamd", signal.SIGKILL)
                t_dead = time.time()
                self.hold(a.down)
                new = self.lab.start("ipamd")
                self.event("ipamd_restart", old_pid=pid, new_pid=new, down_s=time.time() - t_dead)
                self.roll(("web", "client")[i % 2])  # a CNI ADD and DEL through the new daemon
                self.hold(a.settle)
        if "c" in phases and self.lab.apiserver is not None:
            self.begin_phase("c-apiserver")
            self.hold(a.settle)
            for _ in range(a.outages):
                # SIGKILL, as a crash or an OOM kill: with SIGTERM kube-apiserver 1.20 drains for
                # ~60 s while half alive, which is not the outage we mean.
                pid = self.lab.kill("kube-apiserver", signal.SIGKILL)
                t_down = time.time()
                self.event("apiserver_stopped", pid=pid)
                self.hold(a.outage)
                t_start = time.time()
                new = self.lab.start("kube-apiserver", timeout=240)
                t_ready = time.time()
                ep = self.change("allow-monitor added right after the apiserver returned", apply=[allow_monitor()],
                                 timeout=max(a.change_timeout, 120))
                self.c_changes.append((ep, t_ready))
                self.c_outages.append((t_down, t_ready))
                self.event("apiserver_back", new_pid=new, stopped_s=t_start - t_down, start_s=t_ready - t_start,
                           unavailable_s=t_ready - t_down, ready_to_published_s=(ep.published or t_ready) - t_ready)
                self.hold(a.settle)
                self.change("allow-monitor removed", delete=[allow_monitor()])
                self.hold(a.settle)
        if "d" in phases:
            self.begin_phase("d-policy")
            for i in range(a.toggles):
                label, apply_, delete_ = self.toggle(i)
                self.change(label, apply_, delete_)
                self.hold(a.hold)
            self.restore()
        if "e" in phases:
            self.begin_phase("e-roll")
            for i in range(a.rolls):
                self.roll(ROLL_ORDER[i % len(ROLL_ORDER)])
                self.hold(a.roll_hold)
        if "final" in phases:
            self.begin_phase("final")
            self.hold(a.baseline)
        self.end_phase()

    def toggle(self, i: int) -> tuple[str, list[dict], list[dict]]:
        """The i-th policy update: four kinds, each there (even round) and back (odd round)."""
        kind, back = (i // 2) % 4, i % 2 == 1
        client = sorted(self.pods_by_app()["client"])[0]
        if kind == 0:
            return (("allow rule removed", [], [allow_monitor()]) if back
                    else ("allow rule added (monitor -> web)", [allow_monitor()], []))
        if kind == 1:
            labels = {"app": "client", "role": "client" if back else "guest"}
            d = pod_doc("client", client.split("/")[1], labels)
            return (f"pod label role={labels['role']} on {client}", [d], [])
        if kind == 2:
            team = "clients" if back else "partners"
            return (f"namespace label team={team} on clients", [ns_doc("clients", {"team": team})], [])
        return (f"db-ingress podSelector app={'web' if back else 'web-canary'}",
                [db_ingress("web" if back else "web-canary")], [])

    def restore(self) -> None:
        """Back to the base objects if the toggles stopped half-way."""
        fixes, drop = [], []
        if "NetworkPolicy/prod/allow-monitor" in self.truth.docs:
            drop.append(allow_monitor())
        if self.truth.docs["Namespace/clients"]["metadata"]["labels"] != NAMESPACES["clients"]:
            fixes.append(ns_doc("clients"))
        if self.truth.docs["NetworkPolicy/prod/db-ingress"] != db_ingress("web"):
            fixes.append(db_ingress("web"))
        for ref_ in self.pods_by_app()["client"]:
            d = self.truth.docs[f"Pod/{ref_}"]
            if d["metadata"]["labels"].get("role") != "client":
                fixes.append(pod_doc("client", ref_.split("/")[1]))
        if fixes or drop:
            self.change("restore base objects", fixes, drop)


# --- analysis ---------------------------------------------------------------------------


def analyse(c: Campaign, max_window: float) -> dict:
    pr, truth = c.prober, c.truth
    names = [p.name for p in c.phases]
    starts = [p.start for p in c.phases]
    counts = {n: collections.Counter() for n in names + ["between"]}
    wrong_samples: list[dict] = []
    # per epoch with a window: records of pairs whose verdict the change flipped
    flips: dict[int, list[tuple[float, bool, bool]]] = collections.defaultdict(list)
    ep_index = {id(e): i for i, e in enumerate(truth.epochs)}
    for t0, pid, out in zip(pr.t0, pr.pair, pr.outcome):
        i = bisect.bisect_right(starts, t0) - 1
        ph = names[i] if i >= 0 and t0 < c.phases[i].end else "between"
        cnt = counts[ph]
        p = pr.pairs[pid]
        ep = truth.at(t0)
        exp = ep.expected(p)
        prev = ep.prev.expected(p) if ep.prev is not None else None
        reached = out in (CONNECTED, REFUSED)
        cnt["probes"] += 1
        down = any(a <= t0 < b for a, b in c.c_outages)
        if down:
            cnt["apiserver_down_probes"] += 1
        cnt[OUTCOME_NAMES[out]] += 1
        if exp is None:
            cnt["unclassified"] += 1  # never happens: the plan follows the truth
            continue
        cnt["expected_allowed" if exp else "expected_denied"] += 1
        end = ep.window_end if ep.window_end is not None else float("inf")
        in_window = ep.window and t0 < min(end, ep.start + max_window)
        if in_window and exp != bool(prev):  # a pod that did not exist was isolated (fail closed)
            flips[ep_index[id(ep)]].append((t0, reached, exp))
        if reached == exp:
            cnt["correct"] += 1
            continue
        if down:
            cnt["apiserver_down_wrong"] += 1
        if in_window and reached == bool(prev):
            verdict = "old_allowed_in_window" if reached else "denied_in_window"
        else:
            verdict = "wrongly_allowed" if reached else "wrongly_denied_outside"
        cnt[verdict] += 1
        if verdict.startswith("wrongly") and len(wrong_samples) < 200:
            wrong_samples.append({"t0": round(t0, 4), "phase": ph, "src": p.src, "dst": p.dst, "family": p.family,
                                  "outcome": OUTCOME_NAMES[out], "expected": exp, "epoch": ep.label,
                                  "in_window": in_window})
    phases = []
    for ph in c.phases:
        closed = [e for e in ph.windows if e.window and e.window_end is not None]
        wins = [e.window_end - e.start for e in closed]
        # From the change reaching the agent's source (kubectl returned, or the manifest file
        # written; a new pod: its CNI ADD returned) to the agent's word / to the probes.
        enforce = [e.window_end - e.published for e in closed if e.published]
        probe_conv, seen_pub = [], []
        for e in closed:
            x = _convergence(flips.get(ep_index[id(e)], []), e)
            if x is not None:
                probe_conv.append(x)
                if e.published:
                    seen_pub.append(max(0.0, e.start + x - e.published))
        cnt = counts[ph.name]
        phases.append({
            "phase": ph.name, "seconds": round(ph.end - ph.start, 1), **{k: cnt.get(k, 0) for k in COUNT_KEYS},
            "windows": len(wins), "window_median_s": _r(statistics.median(wins)) if wins else None,
            "window_max_s": _r(max(wins)) if wins else None,
            "probe_observed_enforcement_median_s": _r(statistics.median(probe_conv)) if probe_conv else None,
            "probe_observed_enforcement_max_s": _r(max(probe_conv)) if probe_conv else None,
            "published_to_enforced_median_s": _r(statistics.median(enforce)) if enforce else None,
            "published_to_enforced_max_s": _r(max(enforce)) if enforce else None,
            "published_to_probes_reflect_median_s": _r(statistics.median(seen_pub)) if seen_pub else None,
            "published_to_probes_reflect_max_s": _r(max(seen_pub)) if seen_pub else None,
            "events": ph.events,
        })
    between = counts["between"]
    conv = []
    for e, ready in c.c_changes:
        seen = _convergence(flips.get(ep_index[id(e)], []), e)
        pub = e.published or e.start
        conv.append({
            "apiserver_ready_to_change_published_s": _r(pub - ready),
            "published_to_agent_enforced_s": _r(e.window_end - pub) if e.window_end else None,
            "published_to_probes_reflect_s": _r(e.start + seen - pub) if seen is not None else None,
            "apiserver_ready_to_probes_reflect_s": _r(e.start + seen - ready) if seen is not None else None,
            "flipped_pairs_probes": len(flips.get(ep_index[id(e)], [])),
        })
    return {"phases": phases, "between_phases": {k: between.get(k, 0) for k in COUNT_KEYS},
            "apiserver_convergence": conv, "wrong_samples": wrong_samples,
            "totals": {k: sum(counts[n].get(k, 0) for n in counts) for k in COUNT_KEYS}}


COUNT_KEYS = ("probes", "correct", "wrongly_allowed", "wrongly_denied_outside", "denied_in_window",
              "old_allowed_in_window", "expected_allowed", "expected_denied", "connected", "refused",
              "timeout", "error", "unclassified", "apiserver_down_probes", "apiserver_down_wrong")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _convergence(recs: list[tuple[float, bool, bool]], ep: Epoch) -> float | None:
    """Seconds from the change's start until the first probe of a flipped pair after which
    every probe of flipped pairs shows the new verdict (None: no such probe in the window)."""
    if not recs:
        return None
    recs = sorted(recs)
    last_old = max((i for i, (_t, reached, exp) in enumerate(recs) if reached != exp), default=-1)
    if last_old + 1 < len(recs):
        return recs[last_old + 1][0] - ep.start
    return (ep.window_end or recs[-1][0]) - ep.start  # still old at the end of the window: the window bounds it


def markdown(result: dict) -> str:
    w, pr = result["workload"], result["prober"]
    lines = [
        f"Machine: {result['machine']['nproc']} cores, kernel {result['machine']['kernel']}, "
        f"Python {result['machine']['python']}; agent source: {result['source']}.",
        f"Workload: {w['pods']} pods in {w['namespaces']} namespaces, {w['policies']} NetworkPolicies; "
        f"{w['pairs_at_start']} probed pairs ({'/'.join('IPv' + str(f) for f in result['args']['families'])}, "
        f"TCP {PORT}), each every {w['interval_ms']:.0f} ms (probe timeout {w['timeout_ms']:.0f} ms); "
        f"{pr['ticks']} ticks, {pr['late_ticks']} began more than one interval late (max lateness "
        f"{pr['max_lateness_ms']} ms).",
        "",
        "| phase | s | probes | wrongly allowed | wrongly denied outside windows | denied inside windows "
        "| previous verdict (allowed) inside windows |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["analysis"]["phases"]:
        lines.append(f"| {p['phase']} | {p['seconds']} | {p['probes']} | {p['wrongly_allowed']} | "
                     f"{p['wrongly_denied_outside']} | {p['denied_in_window']} | {p['old_allowed_in_window']} |")
    t = result["analysis"]["totals"]
    lines.append(f"| **all** | {result['seconds']} | {t['probes']} | {t['wrongly_allowed']} | "
                 f"{t['wrongly_denied_outside']} | {t['denied_in_window']} | {t['old_allowed_in_window']} |")

    def mm(p, key):
        med, mx = p[f"{key}_median_s"], p[f"{key}_max_s"]
        return "-" if med is None else f"{med} / {mx}"

    lines += ["", "Windows (median / max seconds): window = change started -> agent confirms the kernel "
              "commit; published = the change reached the agent's source (kubectl returned; a new pod: "
              "its object and addresses are in the API).", "",
              "| phase | windows | window | published -> agent confirms | published -> probes reflect it |",
              "|---|---|---|---|---|"]
    for p in result["analysis"]["phases"]:
        if p["windows"]:
            lines.append(f"| {p['phase']} | {p['windows']} | {p['window_median_s']} / {p['window_max_s']} | "
                         f"{mm(p, 'published_to_enforced')} | {mm(p, 'published_to_probes_reflect')} |")
    for i, conv in enumerate(result["analysis"]["apiserver_convergence"]):
        lines += ["", f"API server back after outage {i + 1}: ready -> change accepted "
                  f"{conv['apiserver_ready_to_change_published_s']} s; accepted -> agent confirms "
                  f"{conv['published_to_agent_enforced_s']} s; accepted -> probes reflect it "
                  f"{conv['published_to_probes_reflect_s']} s."]
    retries = result.get("agent_watch_retries") or {}
    if retries.get("failures"):
        lines += ["", f"Agent's API watch during the outages: {retries['failures']} failed attempts, "
                  f"longest back-off drawn {retries['max_retry_in_s']} s."]
    wrong = [x for x in result["analysis"]["wrong_samples"]]
    if wrong:
        by = collections.Counter((x["phase"], "allowed" if x["outcome"] in ("connected", "refused") else "denied",
                                  f"IPv{x['family']}") for x in wrong)
        lines += ["", "Wrong probes (first 200) by phase, verdict, family: " +
                  ", ".join(f"{ph} {v} {fam}: {n}" for (ph, v, fam), n in sorted(by.items()))]
    return "\n".join(lines) + "\n"


# --- driver ------------------------------------------------------------------------------


def _watch_retries(path: str) -> dict:
    """The agent's kube watch failures (its JSON log): how many, and the longest back-off drawn."""
    n, longest = 0, 0.0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if '"kube_watch_failed"' not in line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                n += 1
                longest = max(longest, float(ev.get("retry_in") or 0))
    except OSError:
        pass
    return {"failures": n, "max_retry_in_s": round(longest, 3)}


def leftovers(name: str) -> list[str]:
    left = netns.list_names(L.netns_prefix(name))
    if os.path.exists(L.state_dir(name)):
        left.append(L.state_dir(name))
    return left


def main(argv: list[str] | None = None, on_result: Callable[[dict], None] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=f"churn-{os.getpid()}", help="lab name (unique: netns palab-NAME.*)")
    ap.add_argument("--out", default="", help="directory for churn.json and churn.md (default: none, print only)")
    ap.add_argument("--no-apiserver", dest="apiserver", action="store_false",
                    help="manifest source instead of a kube-apiserver (phase c is skipped)")
    ap.add_argument("--phases", default=",".join(ALL_PHASES), help=f"comma-separated, of {','.join(ALL_PHASES)}")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between probes of a pair")
    ap.add_argument("--timeout", type=float, default=0.9, help="seconds a probe waits (below the 1 s SYN retry)")
    ap.add_argument("--families", default="4,6")
    ap.add_argument("--baseline", type=float, default=10.0, help="seconds of steady probing (first and last phase)")
    ap.add_argument("--restarts", type=int, default=3, help="agent restarts per signal (phase a)")
    ap.add_argument("--down", type=float, default=2.0, help="seconds a killed process stays down (a, b)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of probing after each restart")
    ap.add_argument("--ipamd-kills", type=int, default=2)
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the API server stays stopped (phase c)")
    ap.add_argument("--outages", type=int, default=1, help="API server outages (phase c)")
    ap.add_argument("--toggles", type=int, default=16, help="policy updates (phase d)")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds of probing after each policy update")
    ap.add_argument("--rolls", type=int, default=20, help="pods rolled (phase e)")
    ap.add_argument("--roll-hold", type=float, default=1.0)
    ap.add_argument("--change-timeout", type=float, default=60.0)
    ap.add_argument("--max-window", type=float, default=10.0,
                    help="longest transition window accepted; probes past it count as outside")
    args = ap.parse_args(argv)
    args.families = [int(f) for f in args.families.split(",") if f]
    phases = [p for p in args.phases.split(",") if p]
    if bad := [p for p in phases if p not in ALL_PHASES]:
        ap.error(f"--phases: unknown {bad}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    lab = L.Lab(args.name)
    prober = Prober(args.interval, args.timeout)
    camp = Campaign(lab, prober, args)
    docs = initial_docs()
    t_start = time.time()
    try:
        L.down(args.name)  # a leftover of an earlier crashed run of the same name
        lab.up(docs, apiserver=args.apiserver, timeout=300)
        t_up = time.time()
        camp.truth = Truth({L.obj_key(d): d for d in docs}, {r: p.ips for r, p in lab.pods.items()})
        pairs_at_start = len(camp.plan())
        camp.replan()
        prober.start()
        camp.run(phases)
        prober.stop()
    finally:
        prober.stop()
        retries = _watch_retries(lab.path("logs", "agent.log"))
        if args.out and os.path.isdir(lab.path("logs")):
            import shutil

            shutil.copytree(lab.path("logs"), os.path.join(args.out, "logs"), dirs_exist_ok=True)
        L.down(args.name)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    left = leftovers(args.name)
    if left:
        raise RuntimeError(f"lab {args.name} left {left}")
    if prober.error is not None:
        raise RuntimeError(f"prober failed: {prober.error!r}")
    result = {
        "benchmark": "reliability/churn", "source": "kube-apiserver 1.20.2 + etcd" if args.apiserver else "manifests",
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items()},
        "workload": {"namespaces": len(NAMESPACES), "pods": sum(r for _n, r, _e in APPS.values()),
                     "policies": len(base_policies()), "pairs_at_start": pairs_at_start,
                     "interval_ms": args.interval * 1000, "timeout_ms": args.timeout * 1000},
        "lab_up_s": round(t_up - t_start, 1), "seconds": round(prober.stopped - prober.started, 1),
        "prober": {"ticks": prober.ticks, "late_ticks": prober.late_ticks,
                   "max_lateness_ms": round(prober.max_lateness * 1000, 1), "pairs_ever": len(prober.pairs)},
        "analysis": analyse(camp, args.max_window),
        "agent_watch_retries": retries,
        "leftover_netns": left,
    }
    md = markdown(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "churn.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "churn.md"), "w") as f:
            f.write(md)
    print(md, flush=True)
    if on_result:
        on_result(result)
    return result


if __name__ == "__main__":
    main()
