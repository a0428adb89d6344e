"""cluster/node.py on the real kernel: a node's containerd runs a container in the node's
network + mount namespaces and cgroups; stop leaves no process, cgroup or mount; the
machine's sysctls never change (the ones kubelet writes are masked inside the node)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from policy_agent.lab import netns
from policy_agent.lab.cluster import node

pytestmark = pytest.mark.kernel

BINARIES = ("/bin/sh", "/bin/sleep", "/bin/cat", "/bin/readlink")


def _rootfs(dest: Path) -> Path:
    """A throwaway container rootfs: a few Debian binaries and the libraries they link."""
    for binary in BINARIES:
        files = {os.path.realpath(binary)}
        for line in subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout.splitlines():
            for word in line.split():
                if word.startswith("/"):
                    files.add(word)
        for f in files:
            target = dest / f.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        (dest / binary.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        if not (dest / binary.lstrip("/")).exists():
            shutil.copy2(os.path.realpath(binary), dest / binary.lstrip("/"))
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (dest / d).mkdir(exist_ok=True)
    return dest


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _pids_in_mount_ns(ino: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/mnt").st_ino == ino:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def node_netns():
    with netns.scratch("cn", "node") as name:
        yield name


def _spec(name: str, work: Path) -> node.NodeSpec:
    return node.NodeSpec(
        name="node-t", netns=name, node_ip="10.240.9.10", work=work, kube_bin=Path("/nonexistent"),
        kubelet_kubeconfig=Path("/nonexistent"), proxy_kubeconfig=Path("/nonexistent"),
        ca_file=Path("/nonexistent"), cluster_cidr="10.240.0.0/16", service_cidr="10.96.0.0/16",
        pool_json={"eni": "test"},
    )


def _run_container(state: dict, cid: str, rootfs: Path, *argv: str, detach: bool = False) -> subprocess.CompletedProcess:
    # --net-host: the container shares containerd's network namespace (the node's);
    # --cgroup below the node's cgroup, as kubelet's --cgroup-root places pods.
    args = ["-n", "test", "run", "--net-host", "--rootfs", "--cgroup", f"/{state['netns']}/{cid}"]
    if detach:
        args.append("-d")
    else:
        args.append("--rm")
    res = node._ctr(state, *args, str(rootfs), cid, *argv, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def _assert_gone(state: dict, pids: list[int], mnt_ino: int) -> None:
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"processes left: {alive}"
    assert not _pids_in_mount_ns(mnt_ino), "a process is still in the node's mount namespace"
    left = [c for c in state["cgroups"] if os.path.exists(c)]
    assert not left, f"cgroups left: {left}"
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if state["work"] in line]
    assert not mounts, f"mounts in the root mount namespace: {mounts}"


def test_container_runs_in_node_namespaces_and_stop_leaves_nothing(node_netns, tmp_path):
    snapshot = node.snapshot_sysctls()
    records: list[tuple[str, object]] = []
    state = node.start_node(_spec(node_netns, tmp_path / "node"), lambda k, v: records.append((k, v)),
                            components=("containerd",))
    try:
        holder = state["holder"]["pid"]
        containerd = next(e["pid"] for e in state["pids"] if e["name"].endswith("/containerd"))
        node_net = _ns_inode(f"/run/netns/{node_netns}")
        node_mnt = _ns_inode(f"/proc/{holder}/ns/mnt")
        assert node_mnt != _ns_inode("/proc/self/ns/mnt")
        assert _ns_inode(f"/proc/{containerd}/ns/net") == node_net
        assert _ns_inode(f"/proc/{containerd}/ns/mnt") == node_mnt
        # Everything made is recorded for a crash-safe teardown.
        assert {v["pid"] for k, v in records if k == "pid"} == {holder, containerd}
        assert sorted(v for k, v in records if k == "cgroup") == sorted(state["cgroups"])

        # Inside the node: per-node directories, and kubelet's global sysctls are plain files.
        inside = subprocess.run(
            [*node.node_exec_argv(state), "sh", "-c",
             "echo 10 > /proc/sys/kernel/panic && echo 1 > /proc/sys/vm/overcommit_memory && "
             "cat /proc/sys/kernel/panic && echo conf > /etc/cni/net.d/10-test.conf && cat /etc/vpcip/pool.json"],
            capture_output=True, text=True, timeout=30)
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout.splitlines()[0] == "10"
        assert json.loads("".join(inside.stdout.splitlines()[1:])) == {"eni": "test"}
        assert (tmp_path / "node/root/etc/cni/net.d/10-test.conf").read_text() == "conf\n"
        assert not os.path.exists("/etc/cni/net.d/10-test.conf")
        # containerd accepts a HostToContainer hostPath only on a shared (or slave) mount: the
        # ipamd DaemonSet mounts /var/run/netns (found "on /" through the /var/run symlink).
        # /lib/modules is a Directory hostPath of the agent (missing on a VM kernel).
        props = subprocess.run(
            [*node.node_exec_argv(state), "sh", "-c",
             "findmnt -n -o PROPAGATION /run/netns | tail -1; findmnt -n -o PROPAGATION / | tail -1; test -d /lib/modules && echo ok"],
            capture_output=True, text=True, timeout=30)
        assert props.stdout.split() == ["shared", "shared", "ok"], props
        assert not os.path.exists("/lib/modules")  # made inside the node only
        node.check_sysctls_unchanged(snapshot)

        rootfs = _rootfs(tmp_path / "rootfs")
        out = _run_container(state, "once", rootfs, "/bin/sh", "-c", "readlink /proc/self/ns/net; cat /proc/self/cgroup").stdout
        assert f"net:[{node_net}]" in out
        assert f"/{node_netns}/once" in out

        # A container left running is stopped with the node (found in the node's cgroups).
        _run_container(state, "left", rootfs, "/bin/sleep", "1000", detach=True)
        tasks = node._ctr(state, "-n", "test", "tasks", "ls").stdout.split("\n")[1:]
        cpid = int(next(line.split()[1] for line in tasks if line.startswith("left")))
        shim = int(open(f"/proc/{cpid}/stat").read().rsplit(")", 1)[1].split()[1])
        assert _ns_inode(f"/proc/{cpid}/ns/net") == node_net
        assert _ns_inode(f"/proc/{shim}/ns/mnt") == node_mnt
        assert f"/{node_netns}/left" in open(f"/proc/{cpid}/cgroup").read()
    finally:
        node.stop_node(state)
    _assert_gone(state, [holder, containerd, cpid, shim], node_mnt)
    node.stop_node(state)  # idempotent
    node.check_sysctls_unchanged(snapshot)


def test_stop_from_recorded_state_after_a_crash(node_netns, tmp_path):
    """The holder and containerd died (SIGKILL): stop, from the JSON state alone, still
    kills the orphaned container and shim and removes the cgroups."""
    state = node.start_node(_spec(node_netns, tmp_path / "node"), lambda k, v: None, components=("containerd",))
    try:
        rootfs = _rootfs(tmp_path / "rootfs")
        _run_container(state, "orphan", rootfs, "/bin/sleep", "1000", detach=True)
        tasks = node._ctr(state, "-n", "test", "tasks", "ls").stdout.split("\n")[1:]
        cpid = int(next(line.split()[1] for line in tasks if line.startswith("orphan")))
        mnt = _ns_inode(f"/proc/{state['holder']['pid']}/ns/mnt")
        daemons = [e["pid"] for e in state["pids"]]
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
        assert _alive(cpid)
        recorded = json.loads(json.dumps(state))
    except BaseException:
        node.stop_node(state)
        raise
    node.stop_node(recorded)
    _assert_gone(state, [*daemons, cpid], mnt)


def test_check_sysctls_unchanged_names_the_file():
    snapshot = node.snapshot_sysctls()
    node.check_sysctls_unchanged(snapshot)
    changed = dict(snapshot, **{"/proc/sys/kernel/panic": "12345"})
    with pytest.raises(node.SysctlChanged, match=r"/proc/sys/kernel/panic: '12345' -> "):
        node.check_sysctls_unchanged(changed)


# --- kubelet (standalone: static pods, no API server) ------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _kube_bin() -> Path:
    """The cached kube binaries (scripts/build-kube.sh builds them once, keyed by version)."""
    res = subprocess.run(["bash", str(REPO / "scripts/build-kube.sh")], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    return Path(res.stdout.strip().splitlines()[-1])


def _docker_archive(dest: Path, name: str, files: dict[str, Path], entrypoint: list[str]) -> Path:
    """A one-layer docker-archive image (what `ctr images import` reads)."""
    import hashlib
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arcname, src in files.items():
            tar.add(src, arcname=arcname)
    layer = buf.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Entrypoint": entrypoint},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as tar:
        for arcname, data in ((config_name, config), ("layer.tar", layer), ("manifest.json", manifest)):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def _ca(dest: Path) -> Path:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=test-ca", "-keyout", str(dest.with_suffix(".key")), "-out", str(dest)],
                   check=True, capture_output=True)
    return dest


def test_kubelet_runs_a_static_pod_below_the_node_cgroup_without_touching_machine_sysctls(node_netns, tmp_path):
    kube_bin = _kube_bin()
    pause = _docker_archive(tmp_path / "pause.tar", node.SANDBOX_IMAGE, {"pause": kube_bin / "pause"}, ["/pause"])
    spec = node.NodeSpec(
        name="node-t", netns=node_netns, node_ip="10.240.9.10", work=tmp_path / "node", kube_bin=kube_bin,
        kubelet_kubeconfig=None, proxy_kubeconfig=Path("/nonexistent"), ca_file=_ca(tmp_path / "ca.crt"),
        cluster_cidr="10.240.0.0/16", service_cidr="10.96.0.0/16", pool_json={}, image_archives=(pause,),
    )
    snapshot = node.snapshot_sysctls()
    state = node.start_node(spec, lambda k, v: None, components=("containerd", "kubelet"))
    pids: list[int] = [e["pid"] for e in state["pids"]]
    mnt = _ns_inode(f"/proc/{state['holder']['pid']}/ns/mnt")
    try:
        (tmp_path / "node/manifests/static.yaml").write_text(f"""apiVersion: v1
kind: Pod
metadata: {{name: static-pause, namespace: default}}
spec:
  hostNetwork: true
  containers:
  - {{name: pause, image: "{node.SANDBOX_IMAGE}", imagePullPolicy: Never}}
""")
        cpid = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and cpid is None:
            res = node._ctr(state, "-n", "k8s.io", "tasks", "ls")
            for line in res.stdout.splitlines()[1:]:
                cid, pid, status = line.split()[:3]
                info = node._ctr(state, "-n", "k8s.io", "containers", "info", cid).stdout
                if status == "RUNNING" and '"io.kubernetes.container.name": "pause"' in info:
                    cpid = int(pid)
            time.sleep(1)
        assert cpid, f"static pod never ran; kubelet log:\n{node._log_tail(state, 'kubelet', 40)}"
        pids.append(cpid)
        assert _ns_inode(f"/proc/{cpid}/ns/net") == _ns_inode(f"/run/netns/{node_netns}")
        cgroups = open(f"/proc/{cpid}/cgroup").read()
        assert f":/{node_netns}/kubepods/" in cgroups, cgroups
        # kubelet set its kernel tunables: inside the node only.
        inside = subprocess.run([*node.node_exec_argv(state), "sh", "-c",
                                 "for f in kernel/panic vm/overcommit_memory; do echo $(cat /proc/sys/$f); done"],
                                capture_output=True, text=True, check=True)
        assert inside.stdout.split() == ["10", "1"]
        node.check_sysctls_unchanged(snapshot)
    finally:
        node.stop_node(state)
    _assert_gone(state, pids, mnt)
    node.check_sysctls_unchanged(snapshot)
