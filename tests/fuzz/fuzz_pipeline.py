"""parse -> compile -> apply -> read back, for one generated cluster, with three invariants.

The pipeline is the agent's, for the API source of one node (no CNI records):
1. every object goes over the wire as JSON (``json.loads``, as the kube source reads
   it; duplicate keys: the last one wins, as in Go) and through the agent's parse:
   ``parse_pod`` with the pod-IP policy the agent uses by default (pod networks
   set, annotation not trusted), ``parse_namespace``, and for NetworkPolicies
   ``parse_network_policy`` with its no-allow fallback when that exists;
2. the incremental ``Compiler`` loads the first cluster (good + poison objects);
   a late default-deny is then upserted; a full ``compile()`` of the final
   cluster must render byte-identically (else a *divergence*);
3. both states are applied, in that order, by ``Dataplane`` to a kernel (the
   fake one, or the real one in a private netns), and the kernel is read back
   (``iptables-save``, ``ipset save``) into a DesiredState that explain walks.

Invariants, each counted:
- **crash**: any exception other than ``ModelError`` from parse, any from
  compile, any but ``DataplaneError`` from apply (those count as apply failures);
- **stopped**: a good object (one the API server accepts, generated as valid) whose
  kernel artifacts are missing or differ after the apply: its policy chains, its
  endpoint chains (local pods), the sets they reference, the static chains and
  hooks (missing -> every good object counts);
- **widening**: a sampled flow that the *kernel* state allows while the reference
  evaluator (tests/reference_eval.py, sharing no code with the compiler) denies
  it on the objects as the API server holds them, read the strict way:
  * a pod's addresses are its kubelet-written status addresses only (the
    user-writable annotation never counts), unwrapped from IPv4-mapped form,
    without the unspecified/loopback/multicast/link-local classes;
  * a NetworkPolicy that does not parse isolates, and allows nothing: the pods
    its podSelector selects (the whole namespace when the selector cannot be
    read), in the directions its policyTypes name (both when unreadable; the
    API's defaulting when absent);
  * an object whose metadata, labels or status addresses the API server would
    refuse does not exist (it can never be stored there);
  * a packet from a pod's veth with a source address that is not the pod's own
    is spoofed: denied.
Flows are between the good pods, pods and external/node/claimed addresses, in the
directions this node sees (local -> local: both policies; local -> elsewhere: the
source's egress; elsewhere -> local: the destination's ingress; local -> node).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fuzz_strategies as fs  # noqa: E402
import reference_eval as ref  # noqa: E402

from policy_agent.compiler import Compiler, compile  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane import ipsets as ips  # noqa: E402
from policy_agent.dataplane import iptables as ipt  # noqa: E402
from policy_agent.dataplane.apply import Dataplane, DataplaneError  # noqa: E402
from policy_agent.dataplane.fake import FakeKernel  # noqa: E402
from policy_agent.desired import (  # noqa: E402
    Chain,
    DesiredState,
    Hook,
    IPSet,
    render_ipset_restore,
    render_iptables_save,
)
from policy_agent.explain import HookPath, Packet, explain  # noqa: E402
from policy_agent.model import parse as mp  # noqa: E402
from policy_agent.model.types import (  # noqa: E402
    MATCH_ALL,
    ClusterSnapshot,
    ModelError,
    NetworkPolicy,
    Pod,
    PolicyType,
)
from policy_agent.shared import naming  # noqa: E402

CONFIG = NodeConfig(fs.NODE)
UPLINK = "eth0"
STATIC_CHAINS = (naming.CHAIN_FORWARD, naming.CHAIN_INPUT, naming.CHAIN_OUTPUT, naming.CHAIN_WL_TO_HOST)


# --- the agent's parse (adapts to what the model offers) ------------------------------------


def _pod_ip_policy():
    cls = getattr(mp, "PodIPPolicy", None)
    if cls is None:
        from policy_agent.model import types as mt

        cls = getattr(mt, "PodIPPolicy", None)
    if cls is None:
        return None
    return cls(networks=tuple(ipaddress.ip_network(n) for n in fs.POD_NETWORKS))


POD_IP_POLICY = _pod_ip_policy()
HAS_FALLBACK = hasattr(mp, "fallback_network_policy")


def agent_parse(d: Any) -> tuple[Any, str]:
    """(model object or None, mode) as the kube source converts ``d``; mode is "",
    "fallback" (a NetworkPolicy enforced as its no-allow stand-in) or "rejected".
    Raises only what the parse raises (ModelError is caught here)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "Pod":
            return (mp.parse_pod(d, POD_IP_POLICY) if POD_IP_POLICY is not None else mp.parse_pod(d)), ""
        if kind == "Namespace":
            return mp.parse_namespace(d), ""
        return mp.parse_network_policy(d), ""
    except ModelError as err:
        if kind == "NetworkPolicy" and HAS_FALLBACK:
            fb = mp.fallback_network_policy(d, err)
            if fb is not None:
                return fb, "fallback"
        return None, "rejected"


def wire(d: dict, dup_keys: bool) -> Any:
    """The object as the kube source decodes it from the API's JSON."""
    text = json.dumps(d, ensure_ascii=False)
    if dup_keys and text.startswith("{") and len(text) > 2:
        # A decoy first: json.loads (like Go's encoding/json) keeps the last duplicate.
        text = '{"metadata": {"name": "decoy", "labels": {"decoy": "\u00fc"}}, "spec": "decoy", ' + text[1:]
    return json.loads(text)


# --- the oracle: objects as the API server holds them, read the strict way ---------------------


def _usable(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(text, str):
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        return None
    return ip


def oracle_pod(d: Any) -> Pod | None:
    """Status addresses only (kubelet-written), usable classes only; None when the API
    server would refuse the object (it never exists there)."""
    if not isinstance(d, dict):
        return None
    status = d.get("status")
    if status is not None and not isinstance(status, dict):
        return None
    status = dict(status or {})
    raw = status.get("podIPs")
    entries: list[Any] = []
    if raw:
        if not isinstance(raw, list) or not all(isinstance(e, dict) and isinstance(e.get("ip"), str) for e in raw):
            return None
        entries = [e["ip"] for e in raw]
    elif status.get("podIP"):
        entries = [status["podIP"]]
    addrs = []
    for t in entries:
        try:
            ipaddress.ip_address(t.strip()) if isinstance(t, str) else None
        except ValueError:
            return None  # the API server validates status addresses
        ip = _usable(t)
        if ip is not None and ip not in addrs:
            addrs.append(ip)
    meta = dict(d.get("metadata") or {}) if isinstance(d.get("metadata"), dict) else d.get("metadata")
    clean = {**d, "metadata": meta, "status": {k: v for k, v in status.items() if k not in ("podIP", "podIPs")}}
    if isinstance(meta, dict):
        meta.pop("annotations", None)
    try:
        pod = mp.parse_pod(clean)
    except ModelError:
        return None
    return Pod(pod.namespace, pod.name, pod.labels, pod.node_name, tuple(addrs), pod.ports, pod.host_network,
               pod.phase, pod.uid)


def oracle_policy(d: Any) -> NetworkPolicy | None:
    try:
        return mp.parse_network_policy(d)
    except ModelError:
        pass
    if not isinstance(d, dict) or not isinstance(d.get("metadata"), dict):
        return None
    meta = d["metadata"]
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not (isinstance(name, str) and name and isinstance(ns, str)):
        return None
    try:  # metadata the API server would refuse: the object cannot exist there
        mp.parse_namespace({"metadata": {"name": ns}})
        mp.parse_network_policy({"metadata": {"name": name, "namespace": ns}})
    except ModelError:
        return None
    spec = d.get("spec")
    spec = spec if isinstance(spec, dict) else None
    try:
        selector = mp.parse_selector((spec or {}).get("podSelector")) if spec is not None else MATCH_ALL
    except ModelError:
        selector = MATCH_ALL
    both = (PolicyType.INGRESS, PolicyType.EGRESS)
    types: tuple[PolicyType, ...] = both
    if spec is not None:
        raw = spec.get("policyTypes")
        if raw is None or raw == []:
            egress = spec.get("egress")
            types = both if egress not in (None, []) else (PolicyType.INGRESS,)
        elif isinstance(raw, list) and raw and all(t in ("Ingress", "Egress") for t in raw):
            types = tuple(t for t in both if t.value in raw)
    return NetworkPolicy(ns, name, selector, types)


def oracle_snapshot(raw_objects: list[Any]) -> ClusterSnapshot:
    objs: list[Any] = []
    for d in raw_objects:
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "Pod":
            o = oracle_pod(d)
        elif kind == "Namespace":
            try:
                o = mp.parse_namespace(d)
            except ModelError:
                o = None
        else:
            o = oracle_policy(d)
        if o is not None:
            objs.append(o)
    return ClusterSnapshot.of(objs)


# --- reading the kernel back as a DesiredState ---------------------------------------------------


def known_rules(*states: DesiredState) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for s in states:
        for chains in s.chains.values():
            for name, c in chains.items():
                for h, r in zip(c.hashes, c.rules):
                    out[(name, h)] = r
    return out


class Unexplained(Exception):
    """The kernel holds a rule of ours that no desired state had."""


def kernel_state(kernel: Any, known: dict, endpoints: tuple, families=(4, 6)) -> DesiredState:
    chains: dict[tuple[int, str], dict[str, Chain]] = {}
    hooks: set[Hook] = set()
    for fam in families:
        for tname, t in ipt.parse_save(kernel.iptables_save(fam)).items():
            for cname, kc in t.owned().items():
                rules = []
                for r in kc.rules:
                    rule = known.get((cname, r.hash))
                    if rule is None:
                        raise Unexplained(f"IPv{fam} {tname} {cname}: {r.save_line()}")
                    rules.append(rule)
                chains.setdefault((fam, tname), {})[cname] = Chain(cname, tuple(rules))
            for c in t.chains.values():
                if c.builtin:
                    for r in c.rules:
                        if r.target and naming.owns_chain(r.target):
                            hooks.add(Hook(tname, c.name, r.target))
    sets = {
        n: IPSet(n, s.family, s.type, frozenset(s.members))
        for n, s in ips.parse_ipset_save(kernel.ipset_save()).items()
        if naming.owns_ipset(n)
    }
    return DesiredState(chains, tuple(sorted(hooks, key=lambda h: (h.table, h.chain, h.target))), sets, endpoints)


def _member_key(set_type: str, m: str) -> tuple:
    text = m.strip()
    nomatch = text.endswith(" nomatch")
    elem = text.split()[0]
    if set_type in ("hash:net", "hash:ip"):
        return (ipaddress.ip_network(elem, strict=False), nomatch)
    if set_type == "hash:net,iface":
        net, _, iface = elem.rpartition(",")
        return (ipaddress.ip_network(net, strict=False), iface, nomatch)
    addr, _, pp = elem.partition(",")
    proto, _, port = pp.rpartition(":")
    return (ipaddress.ip_address(addr), proto or "tcp", port)


def _members(s: IPSet) -> set:
    return {_member_key(s.type, m) for m in s.members}


# --- findings and counters ----------------------------------------------------------------------


@dataclass
class Stats:
    clusters: int = 0
    kernel_clusters: int = 0
    objects: Counter = field(default_factory=Counter)  # by kind, good and poison alike
    poison_objects: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # by kind: ModelError at parse
    fallbacks: int = 0
    pod_ips_rejected: int = 0
    policy_rules: int = 0
    flows: int = 0
    apply_failures: int = 0
    crashes: list = field(default_factory=list)
    stopped: list = field(default_factory=list)
    widenings: list = field(default_factory=list)
    divergences: list = field(default_factory=list)
    valid_rejected: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, r: "Result") -> None:
        self.clusters += 1
        self.kernel_clusters += r.real_kernel
        self.objects.update(r.objects)
        self.poison_objects.update(r.poison_objects)
        self.rejected.update(r.rejected)
        self.fallbacks += r.fallbacks
        self.pod_ips_rejected += r.pod_ips_rejected
        self.policy_rules += r.policy_rules
        self.flows += r.flows
        self.apply_failures += r.apply_failures
        for name in ("crashes", "stopped", "widenings", "divergences", "valid_rejected"):
            getattr(self, name).extend(getattr(r, name))
        self.seconds += r.seconds

    def summary(self, keep: int = 5) -> dict:
        return {
            "clusters": self.clusters,
            "clusters_on_real_kernel": self.kernel_clusters,
            "objects": dict(self.objects),
            "objects_total": sum(self.objects.values()),
            "poison_objects": dict(self.poison_objects),
            "rejected_at_parse": dict(self.rejected),
            "policies_enforced_as_fallback": self.fallbacks,
            "pod_addresses_rejected": self.pod_ips_rejected,
            "policy_rules": self.policy_rules,
            "flows_checked": self.flows,
            "apply_failures": self.apply_failures,
            "crashes": len(self.crashes),
            "stopped_others": len(self.stopped),
            "widenings": len(self.widenings),
            "divergences": len(self.divergences),
            "valid_objects_rejected": len(self.valid_rejected),
            "seconds": round(self.seconds, 2),
            "examples": {
                k: [str(x)[:2000] for x in getattr(self, k)[:keep]]
                for k in ("crashes", "stopped", "widenings", "divergences", "valid_rejected")
                if getattr(self, k)
            },
        }


@dataclass
class Result:
    real_kernel: int = 0
    objects: Counter = field(default_factory=Counter)
    poison_objects: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    pod_ips_rejected: int = 0
    policy_rules: int = 0
    flows: int = 0
    apply_failures: int = 0
    crashes: list = field(default_factory=list)
    stopped: list = field(default_factory=list)
    widenings: list = field(default_factory=list)
    divergences: list = field(default_factory=list)
    valid_rejected: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.stopped or self.widenings or self.divergences or self.valid_rejected)

    def describe(self) -> str:
        out = []
        for k in ("crashes", "stopped", "widenings", "divergences", "valid_rejected"):
            for x in getattr(self, k)[:3]:
                out.append(f"{k}: {x}")
        return "\n".join(out)


def _ref(d: Any) -> str:
    meta = d.get("metadata") if isinstance(d, dict) else None
    if not isinstance(meta, dict):
        return f"{d.get('kind') if isinstance(d, dict) else '?'} ?"
    return f"{d.get('kind')} {meta.get('namespace') or ''}/{str(meta.get('name'))[:40]}"


def _render(s: DesiredState) -> str:
    return render_iptables_save(s, 4) + render_iptables_save(s, 6) + render_ipset_restore(s)


# --- one cluster ---------------------------------------------------------------------------------

KernelFactory = Callable[[], tuple[Any, Callable[[], None]]]  # -> (Dataplane, cleanup)


def fake_dataplane() -> tuple[Dataplane, Callable[[], None]]:
    return Dataplane(kernel=FakeKernel(), retries=2, backoff=0.0), lambda: None


def run_cluster(cluster: dict, make_dataplane: KernelFactory = fake_dataplane, flow_budget: int = 200,
                real_kernel: bool = False) -> Result:
    t0 = time.perf_counter()
    r = Result(real_kernel=int(real_kernel))
    dup = cluster.get("dup_keys", False)
    raw_good = [wire(d, dup) for d in cluster["good"]]
    raw_poison = [wire(d, dup) for d in cluster["poison"]]
    raw_late = wire(cluster["late"], dup)
    for d in raw_good + raw_poison + [raw_late]:
        r.objects[d.get("kind", "?")] += 1
    for d in raw_poison:
        r.poison_objects[d.get("kind", "?")] += 1

    # 1. parse
    parsed: dict[int, Any] = {}
    for i, d in enumerate(raw_good + raw_poison + [raw_late]):
        try:
            obj, mode = agent_parse(d)
        except Exception:  # noqa: BLE001 - a crash is what we count
            r.crashes.append(f"parse {_ref(d)}: {traceback.format_exc(limit=4)}\nobject: {json.dumps(d)[:1500]}")
            continue
        if mode == "rejected":
            r.rejected[d.get("kind", "?")] += 1
        if mode == "fallback":
            r.fallbacks += 1
        if isinstance(obj, Pod):
            r.pod_ips_rejected += len(getattr(obj, "rejected_ips", ()))
        if isinstance(obj, NetworkPolicy):
            r.policy_rules += len(obj.ingress) + len(obj.egress)
        if obj is not None:
            parsed[i] = obj
        if i < len(raw_good) and (obj is None or mode):
            r.valid_rejected.append(f"{_ref(d)} ({mode}): {json.dumps(d)[:800]}")
    n_first = len(raw_good) + len(raw_poison)
    first = [parsed[i] for i in range(n_first) if i in parsed]
    late = parsed.get(n_first)
    if late is None or r.crashes:
        r.seconds = time.perf_counter() - t0
        return r
    # The store keys objects; a later duplicate of a key replaces the earlier (as an update would).
    snap1 = ClusterSnapshot.of(first)
    snap2 = ClusterSnapshot.of(first + [late])

    # 2. compile (incremental, then checked against a full compile)
    try:
        c = Compiler(CONFIG).load(snap1)
        s1 = c.desired()
        c.upsert_policy(late)
        s2 = c.desired()
        full = compile(snap2, CONFIG)
    except Exception:  # noqa: BLE001
        r.crashes.append(f"compile: {traceback.format_exc(limit=6)}\ncluster: {json.dumps(cluster)[:3000]}")
        r.seconds = time.perf_counter() - t0
        return r
    if _render(full) != _render(s2):
        r.divergences.append(f"incremental != full compile for cluster {json.dumps(cluster)[:3000]}")

    # 3. apply both transactions, read the kernel back
    dp, cleanup = make_dataplane()
    try:
        try:
            for state, sweep in ((s1, True), (s2, False)):
                try:
                    dp.apply(state, allow_sweep=sweep)
                except DataplaneError:
                    r.apply_failures += 1  # what it left in the kernel is checked below
            ks = kernel_state(dp.kernel, known_rules(s1, s2), s2.endpoints)
        except Exception:  # noqa: BLE001
            r.crashes.append(f"apply: {traceback.format_exc(limit=6)}\ncluster: {json.dumps(cluster)[:3000]}")
            r.seconds = time.perf_counter() - t0
            return r
    finally:
        cleanup()

    # 4. invariants
    good_first = [parsed[i] for i in range(len(raw_good)) if i in parsed]
    try:
        good_only = compile(ClusterSnapshot.of(good_first + [late]), CONFIG)
    except Exception:  # noqa: BLE001
        r.crashes.append(f"compile (good objects only): {traceback.format_exc(limit=6)}")
        good_only = s2
    _check_stopped(r, s2, ks, good_first + [late], good_only)
    osnap = oracle_snapshot(raw_good + raw_poison + [raw_late])
    _check_widening(r, ks, osnap, s2, raw_poison, flow_budget, seed=len(json.dumps(cluster)))
    r.seconds = time.perf_counter() - t0
    return r


def _check_stopped(r: Result, desired: DesiredState, ks: DesiredState, good: list, good_only: DesiredState) -> None:
    """Every good object's artifacts are in the kernel: its chains exactly as desired, the
    sets they use with at least the members the good objects alone give them."""
    problems: list[str] = []

    def chain_ok(fam: int, table: str, name: str) -> tuple[bool, set[str]]:
        want = desired.table(fam, table).get(name)
        if want is None:
            return True, set()
        have = ks.table(fam, table).get(name)
        if have is None or have.hashes != want.hashes:
            problems.append(f"IPv{fam} {table} chain {name} {'missing' if have is None else 'differs'}")
            return False, set(want.ipsets)
        return True, set(want.ipsets)

    def sets_ok(names: set[str]) -> bool:
        # Members: every one that the good objects alone put there (a poison pod's
        # member may be set aside; a member too many is for the widening check).
        ok = True
        for n in names:
            want, have = good_only.ipsets.get(n) or desired.ipsets.get(n), ks.ipsets.get(n)
            if want is None:
                continue
            if have is None or not _members(want) <= _members(have):
                missing = "missing" if have is None else f"lacks {sorted(map(str, _members(want) - _members(have)))[:3]}"
                problems.append(f"ipset {n} ({want.origin}) {missing}")
                ok = False
        return ok

    static_ok = True
    for (fam, table), chains in desired.chains.items():
        for name in chains:
            if name in STATIC_CHAINS or name.startswith(("pa-from-wl", "pa-to-wl")):
                ok, used = chain_ok(fam, table, name)
                static_ok = static_ok and ok and sets_ok(used)
    have_hooks = set(ks.hooks)
    for h in desired.hooks:
        if h not in have_hooks:
            problems.append(f"hook {h.chain} -> {h.target} missing")
            static_ok = False
    if not static_ok:
        r.stopped.append(f"all {len(good)} good objects: {'; '.join(problems[:6])}")
        return
    eps = {(e.namespace, e.pod): e for e in desired.endpoints}
    for obj in good:
        problems.clear()
        names: list[str] = []
        if isinstance(obj, NetworkPolicy):
            names = [naming.policy_chain(obj.namespace, obj.name, d) for d in ("ingress", "egress")]
        elif isinstance(obj, Pod) and obj.key in eps:
            iface = eps[obj.key].interface
            names = [naming.to_workload_chain(iface), naming.from_workload_chain(iface)]
        used: set[str] = set()
        for (fam, table) in desired.chains:
            for name in names:
                used |= chain_ok(fam, table, name)[1]
        sets_ok(used)
        if problems:
            kind = type(obj).__name__
            r.stopped.append(f"{kind} {obj.namespace}/{obj.name[:40]}: {'; '.join(problems[:4])}")


def _endpoint(osnap: ClusterSnapshot, ip) -> ref.Endpoint:
    owner = next((p for p in osnap.pods.values() if ip in p.ips and ref._peer_pod(p) is not None), None)
    return ref.Endpoint(ip, owner)


def _check_widening(r: Result, ks: DesiredState, osnap: ClusterSnapshot, desired: DesiredState, raw_poison: list,
                    budget: int, seed: int) -> None:
    rnd = random.Random(seed)
    node_ip = ipaddress.ip_address(fs.NODE_IPS[fs.NODE])
    live = [p for p in osnap.pods.values() if ref._peer_pod(p) is not None]
    local = [p for p in live if p.node_name == fs.NODE]
    remote_ips = [ip for p in live if p.node_name != fs.NODE for ip in p.ips]
    claimed: list = []
    for d in raw_poison:
        ann = ((d.get("metadata") or {}).get("annotations") or {}) if isinstance(d.get("metadata"), dict) else {}
        text = ann.get(mp.AWS_POD_IPS_ANNOTATION) if isinstance(ann, dict) else None
        for part in str(text or "").split(","):
            ip = _usable(part)
            if ip is not None and ip not in claimed:
                claimed.append(ip)
    outside = remote_ips + [ipaddress.ip_address(a) for a in fs.EXTERNAL_IPS + (fs.NODE_IPS[fs.OTHER_NODE],)] + claimed
    iface = {p.key: naming.veth_name(naming.DEFAULT_IFACE_PREFIX, p.namespace, p.name) for p in local}

    flows: list[tuple] = []  # (kind, src_ip, dst_ip, in_iface, out_iface, src_pod_key, dst_pod_key)
    for s in local:
        for sip in s.ips:
            for d in local:
                if d is not s:
                    flows += [("local", sip, dip, iface[s.key], iface[d.key]) for dip in d.ips if dip.version == sip.version]
            flows += [("egress", sip, o, iface[s.key], UPLINK) for o in outside if o.version == sip.version]
            if sip.version == 4:
                flows.append(("node", sip, node_ip, iface[s.key], None))
    for d in local:
        for dip in d.ips:
            flows += [("ingress", o, dip, UPLINK, iface[d.key]) for o in outside if o.version == dip.version]
    # Spoofing: a veth of ours (every endpoint the agent programmed) sending with an address not its own.
    own = {p.key: set(p.ips) for p in osnap.pods.values()}
    all_ips = [ip for p in live for ip in p.ips] + claimed + [ipaddress.ip_address(a) for a in fs.EXTERNAL_IPS]
    for e in desired.endpoints:
        for sip in all_ips:
            if sip not in own.get((e.namespace, e.pod), set()):
                targets = [dip for p in local for dip in p.ips if dip.version == sip.version and p.key != (e.namespace, e.pod)]
                dst = targets[0] if targets else ipaddress.ip_address("10.234.0.1" if sip.version == 4 else "fd00:234::1")
                flows.append(("spoof", sip, dst, e.interface, iface.get(_owner_key(osnap, dst), UPLINK)))
    if len(flows) > budget:
        flows = rnd.sample(flows, budget)
    ports = (1, 53, 80, 81, 8080, 65535, 61)
    for kind, sip, dip, in_if, out_if in flows:
        for proto in rnd.sample(("TCP", "UDP", "SCTP"), 2):
            port = rnd.choice(ports)
            r.flows += 1
            src, dst = _endpoint(osnap, sip), _endpoint(osnap, dip)
            if kind == "local":
                want = ref.allowed(osnap, src, dst, proto, port)
            elif kind in ("egress", "node"):
                want = ref.egress_allows(osnap, src, dst, proto, port)
            elif kind == "ingress":
                want = ref.ingress_allows(osnap, src, dst, proto, port)
            else:
                want = False
            path = HookPath("INPUT", in_iface=in_if) if kind == "node" else HookPath("FORWARD", in_iface=in_if, out_iface=out_if)
            pkt = Packet(sip.version, str(sip), str(dip), proto.lower(), port)
            try:
                got = explain(ks, pkt, path, [str(node_ip)])
            except Exception:  # noqa: BLE001
                r.crashes.append(f"explain {kind} {sip}->{dip}: {traceback.format_exc(limit=3)}")
                return
            if got.allowed and not want:
                r.widenings.append(
                    f"{kind}: {proto} {sip} -> {dip}:{port} ({path.describe()}) allowed by the kernel, "
                    f"denied by the strict reference\n{got.render()[-1500:]}"
                )
                if len(r.widenings) > 20:
                    return


def _owner_key(osnap: ClusterSnapshot, ip) -> tuple | None:
    p = next((p for p in osnap.pods.values() if ip in p.ips and ref._peer_pod(p) is not None), None)
    return p.key if p else None


# --- running ------------------------------------------------------------------------------------


def quiet_logs() -> None:
    """Only warnings and errors from the agent's modules (an apply logs at info)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


class RealKernel:
    """A private node netns for the real-kernel slice: one per run, emptied after each cluster."""

    def __init__(self, backend: str = "nft", tag: str = "h7fuzz") -> None:
        from policy_agent.lab import netns

        self.netns = netns
        self.backend = backend
        self.name = netns.unique_name(tag, "node")
        netns.create(self.name)

    def make(self) -> tuple[Dataplane, Callable[[], None]]:
        from policy_agent.dataplane.kernel import SystemKernel
        from policy_agent.dataplane.runner import Runner

        dp = Dataplane(netns=self.name, kernel=SystemKernel(Runner(self.name), self.backend), retries=2, backoff=0.0)
        return dp, dp.cleanup

    def close(self) -> None:
        self.netns.delete(self.name)

    def __enter__(self) -> "RealKernel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
