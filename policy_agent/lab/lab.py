"""A local cluster in network namespaces: node netns, pods wired by the real CNI, servers, the agent.

Layout of a lab called NAME (nothing of it exists outside its own namespaces):

  netns  palab-NAME.node                 host side: pod veths, routes, iptables/ipsets, vpcip-ipamd
         palab-NAME.pod.<ns>.<pod>       one per local pod, wired by `vpcip-cni` ADD
         palab-NAME.remote.<ns>.<pod>    one per pod on another node (spec.nodeName set to
                                         something else): a plain veth from the node netns under
                                         the non-pod prefix "rmt", so the agent sees it only as a
                                         peer address
         palab-NAME.peer.<node>          one per Node object other than the lab's own whose
                                         status.addresses hold IPs (inside the lab networks):
                                         wired like a remote pod, serving TCP and UDP on 80 and
                                         81, so ClusterNetworkPolicy `nodes` peers can be probed
  addresses  local pods: dual-stack from a static ENI pool (10.233.64-67.x, fd00:233::40-43:x),
             handed out by vpcip-ipamd; remote pods: 10.233.96.x. Labs side by side reuse the
             same addresses: each lives only in its own namespaces.
  state  /var/run/policy-agent-lab/NAME/ state.json, pool.json, conflist, manifests/ (the agent's
                                         manifest directory), endpoints/, endpoint-status/, logs

  provider  ``lab up --provider ec2``: vpcip-ipamd gets ENIs and addresses from an EC2 EMULATOR
             (policy_agent/lab/ec2emu.py: moto's EC2 server + an IMDSv2 server, run inside the
             node netns; never AWS), an m5.large in subnet 10.233.0.0/20; an attach makes a veth
             with the ENI's MAC appear in the node netns (ens<5+device>), which ipamd plumbs.
             Remote pods stay reachable from pods on secondary ENIs by rule 1535 (AWS's
             "excluded CIDRs to main" slot).
  processes  vpcip-ipamd (in the node netns), one answer server per pod (in its netns), the agent
             (root netns, `policy-agent run --netns palab-NAME.node`, HTTP on a free 127.0.0.1
             port) and, with --apiserver, etcd + kube-apiserver (free 127.0.0.1 ports); their
             pids are in state.json, stopped by pid after checking the command line.

``down(NAME)`` works from the namespace prefix and the state directory alone, so it
also cleans up after a crashed or killed ``up``. Lab names are [a-z0-9-]; the "."
after the name keeps lab "a" from matching lab "a-2".
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import structlog
import yaml

from policy_agent.lab import netns
from policy_agent.model.parse import parse_object
from policy_agent.model.types import ModelError
from policy_agent.shared import endpoint as ep
from policy_agent.shared.naming import veth_suffix

log = structlog.get_logger(__name__)

STATE_ROOT = "/var/run/policy-agent-lab"
LAB_POD_NETWORKS = "10.233.0.0/16,fd00:233::/64"
NETNS_ROOT_PREFIX = "palab-"
REMOTE_IFACE_PREFIX = "rmt"
# What a peer node's netns serves (TCP and UDP), as the conformance pods do.
PEER_NODE_PORTS = (80, 81)
REMOTE_POD_CIDR = "10.233.96.0/24"
METRICS_PORT = 9909
_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class LabError(RuntimeError):
    """Something the user should read: which object, which step, what to do."""


def check_name(name: str) -> str:
    if not name or len(name) > 24 or not set(name) <= _NAME_OK or name[0] == "-":
        raise LabError(f"lab name {name!r} must be 1-24 characters of [a-z0-9-]")
    return name


def netns_prefix(name: str) -> str:
    return f"{NETNS_ROOT_PREFIX}{check_name(name)}."


def state_dir(name: str) -> str:
    return os.path.join(STATE_ROOT, check_name(name))


def node_name(name: str) -> str:
    return f"lab-{name}"


def _bin(prog: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), prog)
    if os.path.exists(here):
        return here
    found = shutil.which(prog)
    if not found:
        raise LabError(f"{prog} not found next to {sys.executable} or on PATH (run scripts/setup.sh)")
    return found


def load_docs(paths: Iterable[str]) -> list[dict]:
    docs: list[dict] = []
    for path in paths:
        try:
            with open(path) as f:
                for d in yaml.safe_load_all(f):
                    if d is None:
                        continue
                    if isinstance(d, dict) and str(d.get("kind", "")).endswith("List") and "items" in d:
                        docs.extend(i for i in d["items"] if isinstance(i, dict))
                    else:
                        docs.append(d)
        except OSError as exc:
            raise LabError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise LabError(f"{path}: not valid YAML: {exc}") from None
    for d in docs:
        if not isinstance(d, dict) or d.get("kind") not in LAB_KINDS:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise LabError(f"unsupported object kind {kind!r} (the lab takes {', '.join(LAB_KINDS)})")
        d.setdefault("metadata", {})
        if d["kind"] in CLUSTER_SCOPED:
            d["metadata"].pop("namespace", None)
        else:
            d["metadata"].setdefault("namespace", "default")
        try:
            parse_object(d)  # the agent's own validation, so errors show here, naming the field
        except ModelError as exc:
            raise LabError(str(exc)) from None
    return docs


LAB_KINDS = ("Namespace", "Pod", "NetworkPolicy", "ClusterNetworkPolicy", "Node")
CLUSTER_SCOPED = ("Namespace", "ClusterNetworkPolicy", "Node")


def obj_key(d: dict) -> str:
    m = d["metadata"]
    if d["kind"] in CLUSTER_SCOPED:
        return f"{d['kind']}/{m['name']}"
    return f"{d['kind']}/{m.get('namespace', 'default')}/{m['name']}"


def _pod_ports(d: dict) -> tuple[list[int], list[int]]:
    tcp, udp = set(), set()
    spec = d.get("spec") or {}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for p in c.get("ports") or []:
            proto = (p.get("protocol") or "TCP").upper()
            if proto == "TCP":
                tcp.add(int(p["containerPort"]))
            elif proto == "UDP":
                udp.add(int(p["containerPort"]))
            # SCTP: no SCTP sockets in this kernel; rendered by the agent, never served.
    return sorted(tcp), sorted(udp)


@dataclass
class PodState:
    namespace: str
    name: str
    netns: str
    interface: str
    ips: list[str]
    container_id: str = ""
    remote: bool = False
    server_pid: int = 0

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _pool(max_enis: int = 4, per_eni: int = 15) -> dict:
    enis = []
    for dev in range(max_enis):
        base = 64 + dev
        enis.append({
            "id": f"eni-lab{dev}",
            "deviceNumber": dev,
            "primaryIP": f"10.233.{base}.10",
            "secondaryIPs": [f"10.233.{base}.{11 + i}" for i in range(per_eni)],
            "secondaryIPv6": [f"fd00:233::{base:x}:{11 + i:x}" for i in range(per_eni)],
        })
    return {"instanceType": "lab", "limits": {"maxENIs": max_enis, "ipsPerENI": per_eni + 1}, "enis": enis}


class Lab:
    """One lab, by name. ``Lab(name).up(docs)`` builds it; ``Lab.load(name)`` reopens it."""

    def __init__(self, name: str = "default") -> None:
        self.name = check_name(name)
        self.dir = state_dir(name)
        self.node = node_name(name)
        self.node_netns = netns_prefix(name) + "node"
        self.objects: dict[str, dict] = {}  # obj_key -> the object as given (plus lab fields for pods)
        self.pods: dict[str, PodState] = {}  # "ns/pod" -> state
        self.peer_nodes: dict[str, PodState] = {}  # Node name -> the netns standing for it
        self.pids: dict[str, int] = {}  # "ipamd", "agent"
        self.provider = "static"  # or "ec2": the EC2 emulator (ec2emu) behind vpcip-ipamd
        self.ec2: dict | None = None  # the emulator's {"ec2", "imds", "node", ...} with --provider ec2
        self.agent = True
        self.metrics_port = METRICS_PORT
        self.apiserver: dict | None = None  # {"server", "kubeconfig", "ca", "argv", "log"} with lab up --apiserver
        self.last_publish_time = 0.0  # wall time the last apply() had handed its objects to the agent's source

    # --- paths ------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def flow_log_path(self) -> str:
        """The agent's flow verdict log (`policy-agent flows --file PATH`)."""
        return self.path("flows.jsonl")

    @property
    def manifests(self) -> str:
        return self.path("manifests")

    # --- persistence --------------------------------------------------------------------

    def save(self) -> None:
        data = {
            "name": self.name, "node": self.node, "node_netns": self.node_netns, "agent": self.agent,
            "metrics_port": self.metrics_port, "pids": self.pids, "objects": self.objects, "apiserver": self.apiserver,
            "provider": self.provider, "ec2": self.ec2,
            "pods": {k: vars(p) for k, p in self.pods.items()},
            "peer_nodes": {k: vars(p) for k, p in self.peer_nodes.items()},
        }
        ep.atomic_write(self.path("state.json"), json.dumps(data, indent=1, sort_keys=True))

    @classmethod
    def load(cls, name: str = "default") -> "Lab":
        lab = cls(name)
        try:
            with open(lab.path("state.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up (see `policy-agent lab up`)") from None
        lab.agent = data.get("agent", True)
        lab.metrics_port = data.get("metrics_port", METRICS_PORT)
        lab.pids = data.get("pids", {})
        lab.apiserver = data.get("apiserver")
        lab.provider = data.get("provider", "static")
        lab.ec2 = data.get("ec2")
        lab.objects = data.get("objects", {})
        lab.pods = {k: PodState(**v) for k, v in data.get("pods", {}).items()}
        lab.peer_nodes = {k: PodState(**v) for k, v in data.get("peer_nodes", {}).items()}
        return lab

    # --- up / down ---------------------------------------------------------------------

    def up(self, docs: list[dict], agent: bool = True, timeout: float = 120.0, apiserver: bool = False,
           provider: str = "static") -> None:
        """Build the lab from Namespaces and Pods (and optionally NetworkPolicies).

        With ``apiserver``: etcd + kube-apiserver are started, the objects are created
        through it (the lab plays kubelet: nodeName, status.podIPs) and the agent watches it."""
        if os.path.exists(self.path("state.json")) or netns.list_names(netns_prefix(self.name)):
            raise LabError(f"lab {self.name!r} exists already: `policy-agent lab down --name {self.name}` first")
        self.agent = agent
        if provider not in ("static", "ec2"):
            raise LabError(f"--provider {provider!r}: the lab runs 'static' (a pool file) or 'ec2' (the EC2 emulator)")
        self.provider = provider
        os.makedirs(self.dir, exist_ok=True)
        for sub in ("manifests", "endpoints", "endpoint-status", "ipam", "logs"):
            os.makedirs(self.path(sub), exist_ok=True)
        try:
            self.save()
            netns.create(self.node_netns)
            netns.enable_forwarding(self.node_netns)
            self._start_ipamd()
            self._write_conflist()
            if apiserver:
                self._start_apiserver()
            for d in docs:
                self.objects[obj_key(d)] = copy.deepcopy(d)
            for d in docs:
                if d["kind"] == "Pod":
                    self._add_pod(d)
                elif d["kind"] == "Node":
                    self._sync_peer_node(d["metadata"]["name"], d)
            self._publish(docs)
            self.save()
            if agent:
                self._start_agent()
                self.wait_in_sync(timeout)
        except BaseException:
            log.error("lab_up_failed", lab=self.name, hint="cleaning up")
            with contextlib.suppress(Exception):
                down(self.name)
            raise
        log.info("lab_up", lab=self.name, node_netns=self.node_netns, pods=len(self.pods))

    def _start_apiserver(self) -> None:
        from policy_agent.lab import apiserver as api

        def record(key: str, pid: int) -> None:
            self.pids[key] = pid
            self.save()

        try:
            self.apiserver = api.start(self.path("apiserver"), _spawn, record)
        except (api.ApiserverError, subprocess.CalledProcessError) as exc:
            raise LabError(f"apiserver: {exc}") from None
        self.save()

    def _publish(self, docs: list[dict], deleted: list[dict] = ()) -> None:
        """Hand the objects to the agent's source: the manifest directory, or the apiserver."""
        if self.apiserver is None:
            self._sync_manifests()
            return
        from policy_agent.lab import apiserver as api

        order = {"Namespace": 0, "Node": 0, "Pod": 1, "NetworkPolicy": 2, "ClusterNetworkPolicy": 2}
        kc = self.apiserver["kubeconfig"]
        try:
            if deleted:
                pods = [d for d in deleted if d["kind"] == "Pod"]
                if pods:
                    p = api.kubectl(kc, "delete", "--ignore-not-found", "--grace-period=0", "--force", "-f", "-",
                                    input=api._as_json_list(pods))
                    if p.returncode != 0:
                        raise api.ApiserverError(f"kubectl delete failed: {p.stderr.strip()}")
                api.delete_objects(kc, [d for d in deleted if d["kind"] != "Pod"])
            objs = sorted((self._manifest_doc(d) for d in docs), key=lambda d: order[d["kind"]])
            for d in objs:
                d.pop("status", None)
                d.get("metadata", {}).pop("resourceVersion", None)
            api.apply_objects(kc, objs)
            for d in docs:
                if d["kind"] == "Pod":
                    pod = self.pods[f"{d['metadata']['namespace']}/{d['metadata']['name']}"]
                    api.set_pod_status(self.apiserver["server"], self.apiserver["ca"], pod.namespace, pod.name, pod.ips)
        except api.ApiserverError as exc:
            raise LabError(str(exc)) from None

    def kubectl(self, args: list[str]) -> int:
        if self.apiserver is None:
            raise LabError(f"lab {self.name} has no apiserver: `policy-agent lab up --apiserver` it")
        from policy_agent.lab import apiserver as api

        return subprocess.call([api.kubectl_bin(), "--kubeconfig", self.apiserver["kubeconfig"], *args])

    def _start_ipamd(self) -> None:
        sock = self.path("ipamd.sock")
        argv = ["ip", "netns", "exec", self.node_netns, _bin("vpcip-ipamd"), "--socket", sock,
                "--state-dir", self.path("ipam"), "--log-format", "json", "--cooldown-seconds", "0"]
        env = None
        if self.provider == "ec2":
            self._start_ec2emu()
            from policy_agent.lab.ec2emu import client_env

            env = {**os.environ, **client_env(self.ec2["ec2"], self.ec2["imds"])}
            argv += ["--provider", "ec2", "--cluster-name", self.node, "--pool-interval", "1"]
        else:
            with open(self.path("pool.json"), "w") as f:
                json.dump(_pool(), f, indent=1)
            argv += ["--pool-file", self.path("pool.json")]
        self.pids["ipamd"] = _spawn(argv, self.path("logs", "ipamd.log"), env=env)
        self.save()
        # Connect, not exists(): after a kill -9 the old socket file is still there.
        _wait_for(lambda: _unix_answers(sock), 30, f"vpcip-ipamd socket {sock} (see {self.path('logs', 'ipamd.log')})",
                  alive=self.pids["ipamd"])

    def _start_ec2emu(self) -> None:
        """The EC2 EMULATOR (moto + IMDSv2, ec2emu.py) inside the node netns, once per lab."""
        if self.ec2 is not None and _PROCESS_MARK["ec2emu"] in _cmdline(self.pids.get("ec2emu", 0)):
            return
        try:
            import moto  # noqa: F401 - the emulator's one dependency (the `test` extra)
        except ImportError:
            raise LabError("lab up --provider ec2 needs moto (pip install '.[test]'): it emulates EC2") from None
        out = self.path("ec2emu.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        argv = ["ip", "netns", "exec", self.node_netns, sys.executable, "-m", "policy_agent.lab.ec2emu", "serve",
                "--out", out, "--hotplug"]
        self.pids["ec2emu"] = _spawn(argv, self.path("logs", "ec2emu.log"), cwd=netns._project_root())
        self.save()
        _wait_for(lambda: os.path.exists(out), 60, f"the EC2 emulator (see {self.path('logs', 'ec2emu.log')})",
                  alive=self.pids["ec2emu"])
        with open(out) as f:
            self.ec2 = json.load(f)
        # Pods on secondary ENIs route by their ENI's table; the lab's remote pods live on
        # veths of the node netns (main), so they are an "excluded CIDR" (AWS rule 1535).
        netns.ip(self.node_netns, "rule", "add", "to", REMOTE_POD_CIDR, "lookup", "main", "priority", "1535")
        self.save()

    def ec2_enis(self) -> list[dict]:
        """The ENIs the EC2 emulator reports attached to the lab's instance (DescribeNetworkInterfaces)."""
        if self.ec2 is None:
            raise LabError(f"lab {self.name} runs the static provider (lab up --provider ec2 for EC2)")
        proc = netns.run(self.node_netns, sys.executable, "-m", "policy_agent.lab.ec2emu", "describe",
                         "--ec2", self.ec2["ec2"], "--instance", self.ec2["node"]["instance_id"], timeout=60)
        return json.loads(proc.stdout)

    def _write_conflist(self) -> None:
        conf = {
            "cniVersion": "1.0.0",
            "name": f"vpcip-lab-{self.name}",
            "plugins": [{
                "type": "vpcip-cni",
                "ipamSocket": self.path("ipamd.sock"),
                "vethPrefix": "eni",
                "mtu": 9001,
                "endpointDir": self.path("endpoints"),
                "statusDir": self.path("endpoint-status"),
                "policyWaitSeconds": 0,
                "requestTimeoutSeconds": 30,
            }],
        }
        with open(self.path("10-vpcip.conflist"), "w") as f:
            json.dump(conf, f, indent=1)

    def _cni(self, command: str, pod: PodState) -> dict:
        with open(self.path("10-vpcip.conflist")) as f:
            conflist = f.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": os.path.join(netns.NETNS_DIR, pod.netns),
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                        f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id}",
            "CNI_PATH": os.path.dirname(_bin("vpcip-cni")),
        }
        proc = subprocess.run([_bin("vpcip-cni")], input=conflist, env=env, capture_output=True, text=True,
                              timeout=90)
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            out = {"msg": proc.stdout}
        if proc.returncode != 0:
            raise LabError(f"vpcip-cni {command} for pod {pod.ref} failed (code {out.get('code')}): "
                           f"{out.get('msg')} {out.get('details', '')} {proc.stderr.strip()}".strip())
        return out

    def _add_pod(self, d: dict, on_wired=None) -> PodState:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        spec = d.setdefault("spec", {})
        remote = bool(spec.get("nodeName")) and spec["nodeName"] != self.node
        kind = "remote" if remote else "pod"
        pod = PodState(ns, name, f"{netns_prefix(self.name)}{kind}.{ns}.{name}", "", [], remote=remote)
        netns.create(pod.netns)
        if remote:
            pod.interface = REMOTE_IFACE_PREFIX + veth_suffix(ns, name)
            pod.ips = [self._remote_ip()]
            netns.add_peer_link(self.node_netns, pod.netns, pod.interface, pod.ips)
        else:
            pod.container_id = uuid.uuid4().hex
            result = self._cni("ADD", pod)
            pod.ips = [i["address"].split("/")[0] for i in result.get("ips", [])]
            host = [i for i in result.get("interfaces", []) if not i.get("sandbox")]
            pod.interface = host[0]["name"] if host else ""
            if not pod.ips:
                raise LabError(f"vpcip-cni ADD for pod {pod.ref} returned no address: {result}")
        self.pods[pod.ref] = pod
        self.save()
        if on_wired is not None:
            on_wired(pod)  # the pod's interface exists, its server does not yet, the agent does not know it
        tcp, udp = _pod_ports(d)
        if tcp or udp:
            srv = netns.start_server(pod.netns, tcp, udp, log_path=self.path("logs", f"server.{ns}.{name}.log"),
                                     detach=True, name=pod.ref)
            pod.server_pid = srv.pid
        self.save()
        log.info("lab_pod_added", lab=self.name, pod=pod.ref, ips=pod.ips, interface=pod.interface, remote=remote)
        return pod

    def _node_addresses(self, d: dict) -> list[str]:
        """The IPs of a Node's status.addresses; each must lie in the lab networks (it will
        exist only in a lab namespace) and belong to no pod or other peer node."""
        name = d["metadata"]["name"]
        nets = [ipaddress.ip_network(n) for n in LAB_POD_NETWORKS.split(",")]
        used = {ip for p in self.pods.values() for ip in p.ips}
        used |= {ip for n, p in self.peer_nodes.items() if n != name for ip in p.ips}
        out: list[str] = []
        for a in (d.get("status") or {}).get("addresses") or []:
            try:
                ip = ipaddress.ip_address(str((a or {}).get("address", "")).strip())
            except ValueError:
                continue  # a host name
            if not any(ip.version == n.version and ip in n for n in nets):
                raise LabError(f"Node {name}: status.addresses {ip} is outside the lab networks {LAB_POD_NETWORKS}")
            if str(ip) in used:
                raise LabError(f"Node {name}: status.addresses {ip} is already a pod's or another node's address")
            if str(ip) not in out:
                out.append(str(ip))
        return out

    def _sync_peer_node(self, name: str, d: dict | None) -> None:
        """A Node other than the lab's own, with addresses, gets a netns standing for it (same
        addresses, servers on PEER_NODE_PORTS); changed addresses rewire it, labels alone do not."""
        want = self._node_addresses(d) if d is not None and name != self.node else []
        have = self.peer_nodes.get(name)
        if have is not None and sorted(have.ips) == sorted(want):
            return
        if have is not None:
            self._remove_peer_node(name)
        if not want:
            return
        peer = PodState("node", name, f"{netns_prefix(self.name)}peer.{name}",
                        REMOTE_IFACE_PREFIX + veth_suffix("node", name), want, remote=True)
        netns.create(peer.netns)
        self.peer_nodes[name] = peer
        self.save()
        netns.add_peer_link(self.node_netns, peer.netns, peer.interface, want)
        srv = netns.start_server(peer.netns, PEER_NODE_PORTS, PEER_NODE_PORTS,
                                 log_path=self.path("logs", f"server.node.{name}.log"), detach=True, name=f"node/{name}")
        peer.server_pid = srv.pid
        self.save()
        log.info("lab_peer_node_added", lab=self.name, node=name, ips=want, interface=peer.interface)

    def _remove_peer_node(self, name: str) -> None:
        peer = self.peer_nodes.pop(name, None)
        if peer is None:
            return
        if peer.server_pid:
            _stop_pid(peer.server_pid, "policy_agent.lab.server")
        netns.delete(peer.netns)
        netns.ip(self.node_netns, "link", "del", peer.interface, check=False)
        self.save()

    def _remote_ip(self) -> str:
        used = {ip for p in self.pods.values() for ip in p.ips}
        for i in range(2, 250):
            ip = f"10.233.96.{i}"
            if ip not in used:
                return ip
        raise LabError("no remote pod address left in 10.233.96.0/24")

    def _remove_pod(self, ref: str) -> None:
        pod = self.pods.pop(ref, None)
        if pod is None:
            return
        if pod.server_pid:
            _stop_pid(pod.server_pid, "policy_agent.lab.server")
        if not pod.remote:
            try:
                self._cni("DEL", pod)
            except LabError as exc:
                log.warning("lab_cni_del_failed", pod=ref, error=str(exc))
        netns.delete(pod.netns)
        if pod.remote and pod.interface:
            netns.ip(self.node_netns, "link", "del", pod.interface, check=False)
        self.save()

    def _manifest_doc(self, d: dict) -> dict:
        """What the agent reads: pods get the node and the addresses a kubelet would report."""
        d = copy.deepcopy(d)
        if d["kind"] == "Pod":
            ref = f"{d['metadata']['namespace']}/{d['metadata']['name']}"
            pod = self.pods.get(ref)
            spec = d.setdefault("spec", {})
            if pod is not None:
                if not pod.remote:
                    spec["nodeName"] = self.node
                d["status"] = {"phase": "Running", "podIP": pod.ips[0], "podIPs": [{"ip": ip} for ip in pod.ips]}
        return d

    def _file_of(self, key: str) -> str:
        return os.path.join(self.manifests, key.replace("/", "_") + ".yaml")

    def _sync_manifests(self) -> None:
        """Make manifests/ equal to self.objects: one file per object, atomic writes."""
        want = {self._file_of(k): k for k in self.objects}
        for fname in os.listdir(self.manifests):
            full = os.path.join(self.manifests, fname)
            if full not in want and fname.endswith(".yaml"):
                os.unlink(full)
        for full, k in sorted(want.items()):
            text = yaml.safe_dump(self._manifest_doc(self.objects[k]), sort_keys=True)
            try:
                with open(full) as f:
                    if f.read() == text:
                        continue
            except FileNotFoundError:
                pass
            ep.atomic_write(full, text)

    # --- the agent ------------------------------------------------------------------------

    def _start_agent(self) -> None:
        # The agent runs in the root namespace with --netns: its dataplane, state file
        # (/run/policy-agent/dataplane-<netns>.json) and link monitor are per node netns, so
        # labs side by side never share them. Its HTTP endpoint gets a free localhost port.
        self.metrics_port = _free_port()
        if self.apiserver is None:
            source = ["--manifests", self.manifests, "--kube", "off"]
        else:
            source = ["--kube", "on", "--kubeconfig", self.apiserver["kubeconfig"]]
        argv = [_bin("policy-agent"), "--log-format", "json",
                "run", "--node", self.node, *source,
                "--netns", self.node_netns,
                "--endpoint-dir", self.path("endpoints"), "--status-dir", self.path("endpoint-status"),
                "--metrics-port", str(self.metrics_port), "--metrics-bind", "127.0.0.1",
                "--min-apply-interval", "0.02", "--refresh-interval", "30",
                # Every lab address (local pool, remote pods) is in these: anything else is refused.
                "--pod-networks", LAB_POD_NETWORKS,
                # Flow verdicts stay in the lab's own directory (gone with `lab down`).
                "--flow-log-file", self.flow_log_path]
        self.pids["agent"] = _spawn(argv, self.path("logs", "agent.log"))
        self.save()

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET from the agent's localhost endpoint."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def _status_socket(self) -> str:
        from policy_agent.obs.server import status_socket_path

        return status_socket_path(netns=self.node_netns)

    def agent_status(self) -> dict | None:
        """The agent's /status: on its root-only Unix socket (TCP serves it only with
        status_over_tcp, which the lab does not set)."""
        if not self.agent:
            return None
        try:
            code, body = _unix_get(self._status_socket(), "/status")
        except (OSError, ValueError, ImportError):
            try:
                code, body = self.http_get("/status")  # an agent that serves it on TCP
            except OSError:
                return None
        if code == 200:
            with contextlib.suppress(ValueError):
                return json.loads(body)
        return None

    def in_sync(self) -> bool:
        if not self.agent:
            return False
        try:
            code, _ = self.http_get("/readyz", timeout=2.0)
        except OSError:
            return False
        if code != 200:
            return False
        return self._endpoints_programmed()

    def _endpoints_programmed(self) -> bool:
        for pod in self.pods.values():
            if pod.remote:
                continue
            st = ep.read_status(self.path("endpoint-status"), pod.namespace, pod.name)
            if st is None or st.container_id != pod.container_id:
                return False
        return True

    def wait_in_sync(self, timeout: float = 120.0) -> None:
        _wait_for(self.in_sync, timeout, f"agent of lab {self.name} to report in sync (see {self.path('logs', 'agent.log')})",
                  alive=self.pids.get("agent"))

    # --- stopping and starting the lab's own processes (the churn benchmark) -------------

    def kill(self, key: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to this lab's ``key`` process ("agent", "ipamd", "kube-apiserver", "etcd"),
        found by its pid in state.json after checking its command line, and wait until it is
        gone. Returns the pid. Never looks a process up by name."""
        pid = self.pids.get(key, 0)
        mark = _PROCESS_MARK.get(key)
        if mark is None:
            raise LabError(f"lab {self.name}: no process called {key!r} (have {', '.join(_PROCESS_MARK)})")
        if not pid or mark not in _cmdline(pid):
            raise LabError(f"lab {self.name}: {key} is not running (pid {pid or 'none'})")
        os.kill(pid, sig)
        _wait_for(lambda: not netns._alive(pid), timeout,
                  f"{key} of lab {self.name} (pid {pid}) to exit after {signal.Signals(sig).name}")
        log.info("lab_process_killed", lab=self.name, process=key, pid=pid, signal=signal.Signals(sig).name)
        return pid

    def start(self, key: str, timeout: float = 120.0) -> int:
        """Start this lab's ``key`` process again after ``kill`` (same settings, same state
        directory); returns its new pid once it serves (the agent: once in sync)."""
        if key == "agent":
            if not self.agent:
                raise LabError(f"lab {self.name} runs without the agent")
            self._start_agent()
            self.wait_in_sync(timeout)
        elif key == "ipamd":
            self._start_ipamd()
        elif key == "ec2emu":
            raise LabError(f"lab {self.name}: the EC2 emulator holds EC2's state in memory; it cannot restart")
        elif key == "kube-apiserver":
            from policy_agent.lab import apiserver as api

            if self.apiserver is None or "argv" not in self.apiserver:
                raise LabError(f"lab {self.name} has no apiserver to start again")

            def record(k: str, pid: int) -> None:
                self.pids[k] = pid
                self.save()

            try:
                api.launch(self.apiserver, _spawn, record, timeout)
            except api.ApiserverError as exc:
                raise LabError(f"apiserver: {exc}") from None
        else:
            raise LabError(f"lab {self.name}: cannot start {key!r} (agent, ipamd or kube-apiserver)")
        log.info("lab_process_started", lab=self.name, process=key, pid=self.pids[key])
        return self.pids[key]

    def observed_generation(self) -> int | None:
        """The agent's count of store changes so far (None: agent down or too old to say)."""
        gen = (self.agent_status() or {}).get("observed_generation")
        return gen if isinstance(gen, int) else None

    def wait_enforced(self, since_wall: float, timeout: float = 60.0, since_generation: int | None = None) -> None:
        """Return when the agent has applied everything written at ``since_wall``.

        Evidence: /readyz, every local pod's status file, no pending events, the agent's
        applied_generation equal to its observed_generation, and our change observed:
        observed_generation beyond ``since_generation`` (read before the write) or an
        apply that ended after the write. A write that changes nothing in the model moves
        neither, so no pending events for a settle period is the evidence then."""
        if not self.agent:
            return
        deadline = time.monotonic() + timeout
        settle_until = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            st = self.agent_status() or {}
            gen_ok, seen = True, False
            observed, applied = st.get("observed_generation"), st.get("applied_generation")
            if isinstance(observed, int) and isinstance(applied, int):
                gen_ok = applied >= observed
                seen = since_generation is not None and observed > since_generation
            quiet = st.get("pending_events", 1) == 0 and st.get("in_sync", False)
            applied_after = (st.get("last_apply_time") or 0) >= since_wall
            if quiet and gen_ok and self._counts_match(st) and (seen or applied_after or time.monotonic() >= settle_until) \
                    and self.in_sync():
                return
            time.sleep(0.05)
        raise LabError(f"agent of lab {self.name} did not enforce the change within {timeout:.0f}s "
                       f"(see {self.path('logs', 'agent.log')})")

    def _counts_match(self, st: dict) -> bool:
        """With the manifest source the agent's object counts must equal ours (an apply that
        ran before the source read our files shows the old counts)."""
        if self.apiserver is not None:
            return True
        counts = st.get("counts") or {}
        for kind, key in (("Namespace", "namespaces"), ("Pod", "pods"), ("NetworkPolicy", "policies"),
                          ("ClusterNetworkPolicy", "cluster_policies"), ("Node", "nodes")):
            want = sum(1 for k in self.objects if k.startswith(kind + "/"))
            if key in counts and counts[key] != want:
                return False
        return True

    # --- changes ------------------------------------------------------------------------

    def apply(self, docs: list[dict], timeout: float = 60.0, on_wired=None) -> list[str]:
        """Add or change objects; pods new to the lab are wired and served. Returns what changed.

        ``on_wired(pod)`` is called for each new pod as soon as its CNI ADD returned, before
        its server starts and before the agent is told (the churn benchmark probes from then)."""
        changed = []
        for d in docs:
            key = obj_key(d)
            d = copy.deepcopy(d)
            if d["kind"] == "Pod":
                ref = key.split("/", 1)[1]
                old = self.objects.get(key)
                if ref not in self.pods:
                    self.objects[key] = d
                    self._add_pod(d, on_wired)
                    # Changed by definition (the comparison below would see the object just
                    # stored): without this an apiserver lab never created the new pod's object.
                    changed.append(key)
                    continue
                elif old is not None and (_pod_ports(old) != _pod_ports(d) or
                                          (old.get("spec") or {}).get("nodeName") != (d.get("spec") or {}).get("nodeName")):
                    raise LabError(f"Pod {ref}: only labels can change on a running lab pod (delete and re-add it)")
            elif d["kind"] == "Node":
                self._sync_peer_node(d["metadata"]["name"], d)
            if self.objects.get(key) != d:
                changed.append(key)
            self.objects[key] = d
        since, gen = time.time(), self.observed_generation()
        self._publish([d for d in docs if obj_key(d) in changed])
        self.last_publish_time = time.time()
        self.save()
        if changed:
            self.wait_enforced(since, timeout, gen)
        return changed

    def delete(self, docs: list[dict], timeout: float = 60.0) -> list[str]:
        removed = []
        gone: list[dict] = []
        for d in docs:
            key = obj_key(d)
            if key not in self.objects:
                continue
            gone.append(self.objects.pop(key))
            removed.append(key)
            if d["kind"] == "Namespace":
                ns = d["metadata"]["name"]
                for k in [k for k in self.objects
                          if k.split("/")[1] == ns and k.split("/")[0] not in CLUSTER_SCOPED]:
                    gone.append(self.objects.pop(k))
                    removed.append(k)
        since, gen = time.time(), self.observed_generation()
        self._publish([], gone)  # objects first, then the pods' interfaces (CNI DEL) go
        self.last_publish_time = time.time()
        self.save()
        for k in removed:
            if k.startswith("Pod/"):
                self._remove_pod(k.split("/", 1)[1])
            elif k.startswith("Node/"):
                self._remove_peer_node(k.split("/", 1)[1])
        if removed:
            self.wait_enforced(since, timeout, gen)
        return removed

    # --- observation --------------------------------------------------------------------

    def pod_order(self) -> list[str]:
        return sorted(self.pods, key=lambda r: tuple(r.split("/")))

    def probe(self, port: int = 80, protocol: str = "TCP", src: str | None = None, dst: str | None = None,
              timeout: float = 1.0, attempts: int = 2) -> list[dict]:
        protocol = protocol.upper()
        if protocol not in ("TCP", "UDP"):
            raise LabError(f"--protocol {protocol}: the lab probes TCP or UDP (no SCTP sockets in this kernel)")
        froms = self.pod_order()
        if src:
            if src not in self.pods:
                raise LabError(f"--from {src}: no such pod in lab {self.name} (have {', '.join(froms)})")
            froms = [src]
        targets: list[tuple[str, str]] = []  # (label, ip)
        for ref in self.pod_order():
            ips4 = [ip for ip in self.pods[ref].ips if ":" not in ip] or self.pods[ref].ips
            targets.append((ref, ips4[0]))
        for name in sorted(self.peer_nodes):  # other nodes, for ClusterNetworkPolicy `nodes` peers
            ips4 = [ip for ip in self.peer_nodes[name].ips if ":" not in ip] or self.peer_nodes[name].ips
            targets.append((f"node/{name}", ips4[0]))
        if dst:
            if dst in self.pods:
                targets = [t for t in targets if t[0] == dst]
            else:
                try:
                    import ipaddress

                    ipaddress.ip_address(dst)
                except ValueError:
                    raise LabError(f"--to {dst}: neither a pod of lab {self.name} nor an IP address") from None
                owner = next((r for r, p in self.pods.items() if dst in p.ips), dst)
                targets = [(owner, dst)]
        probes = [netns.Probe(self.pods[f].netns, ip, port, protocol, (f, label))
                  for f in froms for (label, ip) in targets]
        got = netns.probe_many(probes, timeout=timeout, attempts=attempts)
        return [{"from": f, "to": label, "connected": got[(f, label)]} for f in froms for (label, _ip) in targets]

    def status(self) -> dict:
        return {
            "name": self.name,
            "node": self.node,
            "node_netns": self.node_netns,
            "provider": self.provider,
            "in_sync": self.in_sync(),
            "pods": [
                {"namespace": p.namespace, "name": p.name, "netns": p.netns, "interface": p.interface,
                 "ips": list(p.ips), "node": "remote" if p.remote else self.node}
                for p in (self.pods[r] for r in self.pod_order())
            ],
            "peer_nodes": [{"name": n, "netns": p.netns, "interface": p.interface, "ips": list(p.ips)}
                           for n, p in sorted(self.peer_nodes.items())],
        }


# --- process helpers ------------------------------------------------------------------


_PROCESS_MARK = {"agent": "policy-agent", "ipamd": "vpcip-ipamd", "kube-apiserver": "kube-apiserver", "etcd": "etcd",
                 "ec2emu": "policy_agent.lab.ec2emu"}


def _unix_answers(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _unix_get(path: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url`` over HTTP on the Unix socket at ``path``."""
    import socket

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)

    conn = _Conn("localhost", timeout=timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv: list[str], log_path: str, env: dict | None = None, cwd: str | None = None) -> int:
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
    return proc.pid


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_pid(pid: int, must_contain: str, timeout: float = 10.0) -> None:
    """Stop a pid we started, after checking it is still ours (pids get reused after a crash)."""
    if not pid or must_contain not in _cmdline(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and netns._alive(pid):
        time.sleep(0.05)
    if netns._alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(cond, timeout: float, what: str, alive: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if alive and not netns._alive(alive):
            raise LabError(f"waiting for {what}: the process (pid {alive}) exited")
        time.sleep(0.1)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")


def down(name: str = "default") -> list[str]:
    """Remove everything lab ``name`` created, from its state if any, else from names alone."""
    prefix = netns_prefix(name)
    sdir = state_dir(name)
    try:
        lab = Lab.load(name)
    except (LabError, ValueError, TypeError, OSError):
        lab = None
    if lab is not None:
        # Agent first (SIGTERM leaves rules, which go with the namespace), then CNI DEL so
        # ipamd releases addresses cleanly; whatever is left dies with its namespace.
        _stop_pid(lab.pids.get("agent", 0), "policy-agent")
        for peer in list(lab.peer_nodes.values()):
            if peer.server_pid:
                _stop_pid(peer.server_pid, "policy_agent.lab.server")
        for pod in list(lab.pods.values()):
            if pod.server_pid:
                _stop_pid(pod.server_pid, "policy_agent.lab.server")
            if not pod.remote and netns.exists(pod.netns) and os.path.exists(lab.path("ipamd.sock")):
                with contextlib.suppress(Exception):
                    lab._cni("DEL", pod)
        _stop_pid(lab.pids.get("ipamd", 0), "vpcip-ipamd")
        _stop_pid(lab.pids.get("ec2emu", 0), _PROCESS_MARK["ec2emu"])
        _stop_pid(lab.pids.get("kube-apiserver", 0), "kube-apiserver")
        _stop_pid(lab.pids.get("etcd", 0), "etcd")
    removed = netns.cleanup_prefix(prefix)
    with contextlib.suppress(Exception):  # the agent's per-netns dataplane metadata file
        from policy_agent.dataplane.apply import default_state_path

        with contextlib.suppress(FileNotFoundError):
            os.unlink(default_state_path(prefix + "node"))
    with contextlib.suppress(Exception):  # the agent's status socket, left behind by a SIGKILL
        from policy_agent.obs.server import status_socket_path

        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_socket_path(netns=prefix + "node"))
    if os.path.isdir(sdir):
        shutil.rmtree(sdir, ignore_errors=True)
    log.info("lab_down", lab=name, netns_removed=len(removed))
    return removed


def list_labs() -> list[str]:
    names = set()
    with contextlib.suppress(FileNotFoundError):
        names.update(n for n in os.listdir(STATE_ROOT) if not n.startswith("."))
    for n in netns.list_names(NETNS_ROOT_PREFIX):
        names.add(n[len(NETNS_ROOT_PREFIX):].split(".", 1)[0])
    return sorted(names)


def format_matrix(results: list[dict], port: int, protocol: str) -> str:
    """Rows from, columns to; '.' connected, 'X' not."""
    rows = list(dict.fromkeys(r["from"] for r in results))
    cols = list(dict.fromkeys(r["to"] for r in results))
    got = {(r["from"], r["to"]): r["connected"] for r in results}
    w = max([len(c) for c in rows + cols] + [3])
    lines = [f"{protocol}/{port}: rows from, columns to ('.' connected, 'X' blocked)",
             " " * w + " " + " ".join(c.rjust(w) for c in cols)]
    for r in rows:
        lines.append(r.ljust(w) + " " + " ".join(("." if got[(r, c)] else "X").rjust(w) for c in cols))
    return "\n".join(lines)
