"""One cluster node on this machine: its own mount namespace, containerd, kubelet, kube-proxy.

The node's network namespace (``spec.netns``) is made by network.py; this module adds:

- a **mount namespace** held by a holder process (``unshare --mount --propagation private``
  running a small Python program that makes the mounts below, then sleeps). Nothing is ever
  mounted in the machine's own mount namespace, so the namespace and every mount in it die
  with the last process inside. In it:
    * ``/etc``, ``/opt``, ``/var/lib``, ``/var/log`` are overlays of the machine's directories
      with a tmpfs upper layer, so mount points (``/etc/cni/net.d`` ...) can be created
      without writing the machine's directories; the node work dir is bound back over
      itself (it may lie below ``/var/lib``) so writes to it are real;
    * per-node directories ``<work>/root/<path>`` are bound over ``/etc/cni/net.d``,
      ``/opt/cni/bin``, ``/etc/vpcip``, ``/var/lib/kubelet``, ``/var/lib/containerd``,
      ``/var/lib/cni``, ``/var/log/pods``, ``/var/log/containers`` and ``/run`` (so
      ``/run/containerd``, ``/run/netns`` = ``/var/run/netns``, ``/run/vpcip``,
      ``/run/vpcip-ipam``, ``/run/policy-agent``, ``/run/xtables.lock`` are per node);
      ``/run/netns`` is a shared mount (pod netns files reach HostToContainer mounts);
    * the global ``/proc/sys`` files kubelet writes are covered by plain files.
- **cgroups** ``/<netns>`` in every v1 hierarchy (and the v2 one of the hybrid layout, which
  runc also joins); kubelet's ``--cgroup-root``; the node's daemons live in
  ``/<netns>/system``. Every process found in them at stop is ours.
- **containerd** with its own config, root, state and socket under the work dir; kubelet and
  kube-proxy. All are started with ``nsenter --net=/run/netns/<netns>
  --mount=/proc/<holder>/ns/mnt`` (``ip netns exec`` remounts /sys, after which runc finds
  no cgroup mount).

The machine's sysctls are never written: ``snapshot_sysctls()`` before, and
``check_sysctls_unchanged(snapshot)`` after, raise naming the file that changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import structlog

from policy_agent.lab.cluster.state import pid_alive as _alive
from policy_agent.lab.cluster.state import proc_start_time as _start_time

log = structlog.get_logger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SANDBOX_IMAGE = "k8s.gcr.io/pause:3.2"
APT_PACKAGES = {  # binary -> Debian package
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "conntrack": "conntrack",  # kube-proxy clears stale UDP conntrack entries with it
    "iptables": "iptables",
}
LOOPBACK_PLUGIN = Path("/usr/lib/cni/loopback")  # containerd's CRI always sets up `lo` with it
# Global (not per network namespace) sysctls kubelet sets (pkg/kubelet/cm
# setupKernelTunables); covered by plain files inside every node's mount namespace.
MASKED_SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Also watched, not masked: read-only outside the initial network namespace
# (nf_conntrack_max, hashsize) or per network namespace (net.*, checked here in the
# root namespace). kube-proxy is told not to touch conntrack (max-per-core 0, timeouts 0).
WATCHED_FILES = tuple(f"/proc/sys/{s}" for s in MASKED_SYSCTLS) + (
    "/proc/sys/net/netfilter/nf_conntrack_max",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv4/conf/all/route_localnet",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/sys/module/nf_conntrack/parameters/hashsize",
)
OVERLAID = ("/etc", "/opt", "/var/lib", "/var/log")
BOUND_DIRS = (  # node path; its source is <work>/root/<path>
    "/etc/cni/net.d",
    "/etc/vpcip",
    "/opt/cni/bin",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run",
)
# hostPath directories of the manifests that a real node has; made (empty, in an overlay of
# their parent) when this machine lacks them (a VM kernel without /lib/modules).
NEEDED_DIRS = ("/lib/modules",)
HOLDER_TIMEOUT = 60.0
_APT_LOCK = threading.Lock()  # nodes start in parallel threads; one apt-get at a time
RUN_DIRS = ("netns", "containerd", "vpcip", "vpcip-ipam", "policy-agent")


class NodeError(RuntimeError):
    """A node could not be started or stopped; the message names the node and the step."""


class SysctlChanged(AssertionError):
    """A machine sysctl differs from its snapshot."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    netns: str
    node_ip: str
    work: Path
    kube_bin: Path
    kubelet_kubeconfig: Path | None  # None: standalone kubelet (static pods only; tests)
    proxy_kubeconfig: Path
    ca_file: Path
    cluster_cidr: str
    service_cidr: str
    pool_json: dict
    image_archives: tuple[Path, ...] = ()


# --- sysctls ---------------------------------------------------------------------------


def snapshot_sysctls() -> dict[str, str]:
    """The machine's values of every watched file (call from the root namespaces)."""
    out = {}
    for path in WATCHED_FILES:
        with contextlib.suppress(FileNotFoundError):
            out[path] = Path(path).read_text().strip()
    return out


def check_sysctls_unchanged(snapshot: dict[str, str]) -> None:
    """Raise SysctlChanged naming every watched file whose value differs from ``snapshot``."""
    now = snapshot_sysctls()
    changed = [f"{p}: {snapshot[p]!r} -> {now.get(p)!r}" for p in snapshot if now.get(p) != snapshot[p]]
    if changed:
        raise SysctlChanged("machine sysctls changed: " + "; ".join(changed))


# --- processes -------------------------------------------------------------------------


def _kill(entries: Iterable[tuple[int, int | None]], grace: float) -> None:
    """SIGTERM, wait up to ``grace``, SIGKILL; a pid counts only while its start time matches."""
    live = [(p, s) for p, s in entries if _alive(p, s)]
    for pid, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, grace), (None, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in live):
            time.sleep(0.05)
        if sig is not None:
            for pid, start in live:
                if _alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)


def node_exec_argv(node_state: dict) -> list[str]:
    """Argv prefix running a command in the node's network and mount namespaces."""
    return [
        "nsenter",
        f"--net=/run/netns/{node_state['netns']}",
        f"--mount=/proc/{node_state['holder']['pid']}/ns/mnt",
        "--",
    ]


def _spawn(state: dict, name: str, argv: list[str], record: Callable, cgroup: bool = True) -> subprocess.Popen:
    """Start ``argv`` in the node's namespaces (and its system cgroup), logging to logs/<name>.log."""
    logs = Path(state["work"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = " ".join(f"{c}/system/cgroup.procs" for c in state["cgroups"]) if cgroup else ""
    # The shell joins the cgroups, then execs nsenter which execs the daemon: one pid throughout.
    script = 'for f in $PA_CGROUP_PROCS; do echo $$ > "$f" || exit 97; done; exec "$@"'
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script, "sh", *node_exec_argv(state), *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/",
            env={**os.environ, "PA_CGROUP_PROCS": procs}, start_new_session=True,
        )
    entry = {"pid": proc.pid, "name": f"{state['name']}/{name}", "start": _start_time(proc.pid)}
    state["pids"].append(entry)
    record("pid", {"pid": proc.pid, "name": entry["name"]})
    log.info("cluster_node_process_started", node=state["name"], process=name, pid=proc.pid)
    return proc


def _log_tail(state: dict, name: str, lines: int = 15) -> str:
    try:
        text = (Path(state["work"]) / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --- cgroups ---------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 ones and the v2 one of a hybrid layout)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2") and fields[4].startswith(str(CGROUP_ROOT) + "/"):
                out.append(Path(fields[4]))
    return out


def _make_cgroups(netns: str, record: Callable, made: list[str]) -> None:
    """Create /<netns> (and /<netns>/system) in every hierarchy, appending each to ``made``."""
    for hier in _hierarchies():
        top = hier / netns
        for cg in (top, top / "system"):
            if not cg.is_dir():
                cg.mkdir()
            if cg == top:
                record("cgroup", str(top))
                made.append(str(top))
            if (hier / "cpuset.cpus").exists():
                # A v1 cpuset cgroup takes no task until cpus and mems are set.
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (cg / f).write_text((cg.parent / f).read_text())


def _cgroup_pids(cgroups: Iterable[str]) -> set[int]:
    pids: set[int] = set()
    for top in cgroups:
        for dirpath, _dirs, _files in os.walk(top):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _remove_cgroup(top: str) -> None:
    real = Path(os.path.realpath(top))
    if real.parent.parent != CGROUP_ROOT:  # only /sys/fs/cgroup/<hierarchy>/<ours>
        raise NodeError(f"refusing to remove cgroup {top}: not a top cgroup of a hierarchy")
    if not real.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(real), key=lambda t: -t[0].count("/")):
        for attempt in range(50):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if attempt == 49:
                    raise NodeError(f"cgroup {dirpath}: cannot remove ({exc}); processes: "
                                    f"{Path(dirpath, 'cgroup.procs').read_text().split()}") from None
                time.sleep(0.1)


# --- the mount namespace ----------------------------------------------------------------

# Run by the holder: `nsenter --net=... unshare --mount --propagation private python3 -c`.
# Mounts through /proc/self/fd/N reach directories that an overlay made invisible by path.
HOLDER_SRC = r'''
import ctypes, json, os, signal, sys
cfg = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
def mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount %s on %s (%s %s): %s" % (src, dst, fstype, data, os.strerror(err)))
work = cfg["work"]
wfd = os.open(work, os.O_PATH | os.O_DIRECTORY)
ovl = os.path.join(work, "ovl")
mount("tmpfs", ovl, "tmpfs", 0, "mode=755,size=64m")
ofd = os.open(ovl, os.O_PATH | os.O_DIRECTORY)
for i in range(len(cfg["overlaid"])):
    for d in ("upper", "work"):
        os.makedirs("%s/%d/%s" % (ovl, i, d))
for i, parent in enumerate(cfg["overlaid"]):
    mount("overlay", parent, "overlay", 0, "lowerdir=%s,upperdir=/proc/self/fd/%d/%d/upper,"
          "workdir=/proc/self/fd/%d/%d/work" % (parent, ofd, i, ofd, i))
mount("/proc/self/fd/%d" % wfd, work, None, MS_BIND | MS_REC)
for d in cfg["mkdirs"]:
    os.makedirs(d, exist_ok=True)
for src, dst in cfg["binds"]:
    os.makedirs(dst, exist_ok=True)
    mount(src, dst, None, MS_BIND | MS_REC)
mount("/run/netns", "/run/netns", None, MS_BIND)
mount(None, "/run/netns", None, MS_SHARED)
# containerd checks a HostToContainer hostPath by its path string: /var/run/netns (through
# the /var/run symlink) is "on /", which must then be shared too. A new peer group: the
# namespace's copy of / was made private first, so nothing reaches the machine's /.
mount(None, "/", None, MS_SHARED)
for src, dst in cfg["masks"]:
    mount(src, dst, None, MS_BIND)
snapshotter = "native"
probe = cfg["probe"]
for d in ("lower", "upper", "work", "merged"):
    os.makedirs(os.path.join(probe, d), exist_ok=True)
try:
    mount("overlay", probe + "/merged", "overlay", 0,
          "lowerdir=%s/lower,upperdir=%s/upper,workdir=%s/work" % (probe, probe, probe))
    libc.umount2((probe + "/merged").encode(), 0)
    snapshotter = "overlayfs"
except OSError:
    pass
os.close(wfd)
os.close(ofd)
print(json.dumps({"ready": True, "snapshotter": snapshotter}), flush=True)
sys.stdout.close()
os.close(1)
while True:
    signal.pause()
'''


def _start_holder(state: dict, record: Callable) -> None:
    work = Path(state["work"])
    root = work / "root"
    binds = []
    for path in BOUND_DIRS:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        binds.append([str(root / path.lstrip("/")), path])
    for d in RUN_DIRS:
        (root / "run" / d).mkdir(exist_ok=True)
    (root / "run" / "xtables.lock").touch()
    (work / "ovl").mkdir(exist_ok=True)
    masks = []
    sysdir = work / "sysctl"
    sysdir.mkdir(exist_ok=True)
    for name in MASKED_SYSCTLS:
        src = sysdir / name.replace("/", ".")
        src.write_text(Path(f"/proc/sys/{name}").read_text())
        masks.append([str(src), f"/proc/sys/{name}"])
    overlaid, mkdirs = list(OVERLAID), []
    for d in NEEDED_DIRS:
        real = os.path.realpath(d)
        if not os.path.isdir(real):
            mkdirs.append(real)
            if os.path.dirname(real) not in overlaid:
                overlaid.append(os.path.dirname(real))
    cfg = {"work": str(work), "overlaid": overlaid, "mkdirs": mkdirs, "binds": binds, "masks": masks,
           "probe": str(work / "containerd" / "overlay-probe")}
    (work / "holder.json").write_text(json.dumps(cfg, indent=1))
    argv = ["sh", "-c", 'for f in $PA_CGROUP_PROCS; do echo $$ > "$f" || exit 97; done; exec "$@"', "sh",
            "nsenter", f"--net=/run/netns/{state['netns']}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-I", "-c", HOLDER_SRC, str(work / "holder.json")]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "holder.log", "ab") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd="/",
            env={**os.environ, "PA_CGROUP_PROCS": " ".join(f"{c}/system/cgroup.procs" for c in state["cgroups"])},
            start_new_session=True,
        )
    state["holder"] = {"pid": proc.pid, "start": _start_time(proc.pid)}
    state["pids"].append({"pid": proc.pid, "name": f"{state['name']}/holder", "start": state["holder"]["start"]})
    record("pid", {"pid": proc.pid, "name": f"{state['name']}/holder"})
    line = b""
    try:
        # The holder closes stdout right after its one line (or dies: EOF).
        if select.select([proc.stdout], [], [], HOLDER_TIMEOUT)[0]:
            line = proc.stdout.readline()
    finally:
        proc.stdout.close()
    try:
        ready = json.loads(line)
    except ValueError:
        raise NodeError(f"node {state['name']}: mount namespace holder failed: "
                        f"{_log_tail(state, 'holder')}") from None
    state["holder"]["mnt_ns"] = os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino
    state["snapshotter"] = ready["snapshotter"]
    log.info("cluster_node_mount_ns_ready", node=state["name"], holder=proc.pid, snapshotter=ready["snapshotter"])


def _in_our_mount_ns(pid: int, state: dict) -> bool:
    """Process ``pid`` is in this node's mount namespace (identified by its /run bind, not
    only by inode: a freed namespace's inode number can be reused)."""
    ino = (state.get("holder") or {}).get("mnt_ns")
    if ino is None:
        return False
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != ino:
            return False
        run_tail = f"/{Path(state['work']).name}/root/run"
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split()[4] == "/run" and line.split()[3].endswith(run_tail) for line in f)
    except OSError:
        return False


def _mount_ns_pids(state: dict) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _in_our_mount_ns(int(entry), state):
            out.add(int(entry))
    return out


# --- configuration files ----------------------------------------------------------------


def _containerd_config(state: dict) -> str:
    work = Path(state["work"])
    return f"""version = 2
root = "{work}/root/var/lib/containerd"
state = "{work}/root/run/containerd"
oom_score = 0

[grpc]
  address = "{state['containerd_address']}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt-containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Processes here lack CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below ours.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{state['snapshotter']}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


def _kubelet_config(spec: NodeSpec) -> str:
    return f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /{spec.netns}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
protectKernelDefaults: false
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The apiserver reaches the kubelet on node_ip:10250 with a client certificate of the
# cluster CA (exec, logs, port-forward); the serving certificate is self-signed.
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: {"true" if spec.kubelet_kubeconfig else "false"}}}
  x509: {{clientCAFile: "{spec.ca_file}"}}
authorization:
  mode: AlwaysAllow
# Never evict and never collect images: a loaded test machine must not lose pods or
# the imported images (there is no registry to pull them again).
evictionHard: {{"memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%"}}
imageGCHighThresholdPercent: 100
resolvConf: "{spec.work}/resolv.conf"
clusterDomain: cluster.local
serializeImagePulls: false
oomScoreAdj: 0
staticPodPath: "{spec.work}/manifests"
"""


def _kube_proxy_config(spec: NodeSpec) -> str:
    return f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: "{spec.proxy_kubeconfig}"
mode: iptables
clusterCIDR: "{spec.cluster_cidr}"
hostnameOverride: "{spec.name}"
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# 0 leaves nf_conntrack_max (global), hashsize and the timeouts alone: no sysctl written.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"""


# --- start / stop ------------------------------------------------------------------------


def ensure_packages() -> None:
    """apt-get install the runtime packages whose binaries are missing (idempotent)."""
    with _APT_LOCK:
        _ensure_packages()


def _ensure_packages() -> None:
    missing = sorted({pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None})
    if not LOOPBACK_PLUGIN.exists():
        missing.append("containernetworking-plugins")
    if not missing:
        return
    log.info("cluster_node_apt_install", packages=missing)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                             env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise NodeError(f"apt-get install {' '.join(missing)} failed: {res.stderr.strip()[-500:]}")


def _validate(spec: NodeSpec, components: tuple[str, ...]) -> None:
    if not os.path.exists(f"/run/netns/{spec.netns}"):
        raise NodeError(f"node {spec.name}: netns: /run/netns/{spec.netns} does not exist")
    needed = {"kubelet": [("kube_bin", spec.kube_bin / "kubelet"), ("ca_file", spec.ca_file),
                          ("kubelet_kubeconfig", spec.kubelet_kubeconfig)],
              "kube-proxy": [("kube_bin", spec.kube_bin / "kube-proxy"), ("proxy_kubeconfig", spec.proxy_kubeconfig)]}
    for component in components:
        for field, path in needed.get(component, []):
            if path is not None and not Path(path).exists():
                raise NodeError(f"node {spec.name}: {field}: {path} does not exist")
    for archive in spec.image_archives:
        if not Path(archive).is_file():
            raise NodeError(f"node {spec.name}: image_archives: {archive} is not a file")


def _ctr(state: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*node_exec_argv(state), "ctr", "--address", state["containerd_address"], *args],
                          capture_output=True, text=True, timeout=timeout)


def _wait_containerd(state: dict, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if os.path.exists(state["containerd_address"]) and _ctr(state, "version", timeout=20).returncode == 0:
            return
        time.sleep(0.3)
    raise NodeError(f"node {state['name']}: containerd did not come up: {_log_tail(state, 'containerd')}")


def start_node(spec: NodeSpec, record: Callable, components: tuple[str, ...] = ("containerd", "kubelet", "kube-proxy")) -> dict:
    """Start the node; every pid and cgroup is passed to ``record`` as soon as it exists.

    ``components`` lets a test run only containerd. On failure, what was started is
    stopped before the error is raised.
    """
    _validate(spec, components)
    ensure_packages()
    work = Path(spec.work)
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {
        "name": spec.name, "netns": spec.netns, "node_ip": spec.node_ip, "work": str(work),
        "pids": [], "cgroups": [], "holder": None,
        "containerd_address": str(work / "containerd.sock"),
    }
    try:
        _make_cgroups(spec.netns, record, state["cgroups"])
        _start_holder(state, record)
        root = work / "root"
        (root / "etc/vpcip/pool.json").write_text(json.dumps(spec.pool_json, indent=1))
        shutil.copy2(LOOPBACK_PLUGIN, root / "opt/cni/bin/loopback")
        (work / "resolv.conf").write_text("# no cluster DNS in the lab cluster\nnameserver 127.0.0.1\n")
        (work / "containerd").mkdir(exist_ok=True)
        (work / "containerd" / "config.toml").write_text(_containerd_config(state))
        proc = _spawn(state, "containerd", ["containerd", "--config", str(work / "containerd" / "config.toml")], record)
        _wait_containerd(state, proc)
        for archive in spec.image_archives:
            res = _ctr(state, "-n", "k8s.io", "images", "import", "--snapshotter", state["snapshotter"], str(archive))
            if res.returncode != 0:
                raise NodeError(f"node {spec.name}: image_archives: import of {archive} failed: {res.stderr.strip()}")
        started = []
        if "kubelet" in components:
            (work / "kubelet.yaml").write_text(_kubelet_config(spec))
            (work / "manifests").mkdir(exist_ok=True)
            kubeconfig = [f"--kubeconfig={spec.kubelet_kubeconfig}"] if spec.kubelet_kubeconfig else []
            started.append(("kubelet", _spawn(state, "kubelet", [
                str(spec.kube_bin / "kubelet"), f"--config={work / 'kubelet.yaml'}", *kubeconfig,
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{state['containerd_address']}",
                f"--pod-infra-container-image={SANDBOX_IMAGE}",
                f"--node-ip={spec.node_ip}", f"--hostname-override={spec.name}",
                f"--volume-plugin-dir={work / 'volume-plugins'}",
                "--v=2",
            ], record)))
        if "kube-proxy" in components:
            (work / "kube-proxy.yaml").write_text(_kube_proxy_config(spec))
            started.append(("kube-proxy", _spawn(state, "kube-proxy", [
                str(spec.kube_bin / "kube-proxy"), f"--config={work / 'kube-proxy.yaml'}", "--v=2",
            ], record)))
        time.sleep(3 if started else 0)
        for name, proc in started:
            if proc.poll() is not None:
                raise NodeError(f"node {spec.name}: {name} exited ({proc.returncode}): {_log_tail(state, name)}")
    except BaseException:
        with contextlib.suppress(Exception):
            stop_node(state)
        raise
    log.info("cluster_node_started", node=spec.name, components=list(components))
    return state


def stop_node(node_state: dict) -> None:
    """Kill every process of the node, let its mount namespace die, remove its cgroups.

    Idempotent; works from the recorded state alone (after a crash of anything).
    """
    state = node_state
    name = state.get("name", "?")
    cgroups = list(state.get("cgroups") or [])
    holder = state.get("holder") or {}
    daemons = [(e["pid"], e.get("start")) for e in state.get("pids", []) if e.get("pid") != holder.get("pid")]
    # Daemons first (kubelet would restart containers), then all in the node's cgroups
    # (shims and containers), then anything else in the mount namespace, then the holder.
    _kill(daemons, grace=5.0)
    for _ in range(5):
        stray = (_cgroup_pids(cgroups) | _mount_ns_pids(state)) - {holder.get("pid")}
        if not stray:
            break
        _kill([(p, _start_time(p)) for p in stray], grace=2.0)
    if holder.get("pid"):
        _kill([(holder["pid"], holder.get("start"))], grace=2.0)
    leftover = _cgroup_pids(cgroups) | _mount_ns_pids(state)
    if leftover:
        _kill([(p, _start_time(p)) for p in leftover], grace=1.0)
    errors = []
    for top in cgroups:
        try:
            _remove_cgroup(top)
        except (NodeError, OSError) as exc:
            errors.append(str(exc))
    if errors:
        raise NodeError(f"node {name}: stop: " + "; ".join(errors))
    log.info("cluster_node_stopped", node=name)
