"""The offline images of scripts/build-images.sh: built (or reused from the cache), then each
docker-archive unpacked the way a runtime lays out its layers and its programs run chrooted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
AGENT = f"registry.example.com/policy-agent:{VERSION}"
WORKLOAD = "registry.example.com/policy-agent-workload:test"
PAUSE = "k8s.gcr.io/pause:3.2"

# A fresh machine builds the base and, through build-kube.sh, Kubernetes (the pause program).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3600)]


def build_images() -> Path:
    argv = ["bash", str(REPO / "scripts/build-images.sh")]
    if os.environ.get("POLICY_AGENT_KUBE_DIR"):
        argv += ["--kube-dir", os.environ["POLICY_AGENT_KUBE_DIR"]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def out_dir() -> Path:
    if os.geteuid() != 0:
        pytest.fail("needs root (apt-get, mmdebstrap, buildah, chroot)")
    return build_images()


class Image:
    """A docker-archive unpacked: its config and its merged root file system."""

    def __init__(self, archive: Path, root: Path):
        self.root = root
        with tarfile.open(archive) as outer:
            manifest = json.load(outer.extractfile("manifest.json"))[0]
            self.tags = manifest["RepoTags"]
            self.config = json.load(outer.extractfile(manifest["Config"]))["config"]
            root.mkdir(parents=True)
            for layer in manifest["Layers"]:
                self._apply(outer, layer)

    def _apply(self, outer: tarfile.TarFile, layer: str) -> None:
        # Whiteouts (.wh.NAME, .wh..wh..opq) remove what the layers below put there.
        with tarfile.open(fileobj=outer.extractfile(layer), mode="r|") as tf:
            names = [m.name for m in tf]
        for name in names:
            parent, _, base = name.rstrip("/").rpartition("/")
            target = self.root / parent
            if base == ".wh..wh..opq":
                for child in target.iterdir() if target.is_dir() else ():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif base.startswith(".wh."):
                victim = target / base[4:]
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                elif victim.exists() or victim.is_symlink():
                    victim.unlink()
        src = outer.extractfile(layer)
        proc = subprocess.Popen(["tar", "-x", "--numeric-owner", "--exclude=.wh.*", "-C", str(self.root), "-f", "-"],
                                stdin=subprocess.PIPE)
        shutil.copyfileobj(src, proc.stdin, 1 << 20)
        proc.stdin.close()
        assert proc.wait() == 0, f"unpacking {layer}"

    @property
    def env(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.config.get("Env") or [])

    def argv(self, *args: str, netns: str | None = None, proc: bool = True) -> list[str]:
        """Run in the image: own mount and PID namespace (PID 1, as in a pod), own /proc."""
        argv = ["unshare", "--mount", "--pid", "--fork"]
        if proc:
            argv.append(f"--mount-proc={self.root}/proc")
        argv += ["chroot", str(self.root), *args]
        return (["nsenter", f"--net=/run/netns/{netns}"] + argv) if netns else argv

    def run(self, *args: str, netns: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, netns=netns), env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(out_dir, tmp_path_factory):
    names = json.loads((out_dir / "images.json").read_text())
    base = tmp_path_factory.mktemp("images")
    unpacked = {image: Image(out_dir / tar, base / tar.removesuffix(".tar")) for tar, image in names.items()}
    yield unpacked
    shutil.rmtree(base, ignore_errors=True)


def test_one_archive_per_image_under_its_manifest_name(out_dir, images):
    assert re.fullmatch(r"images-[0-9a-f]{16}", out_dir.name)
    assert json.loads((out_dir / "images.json").read_text()) == {
        "policy-agent.tar": AGENT, "workload.tar": WORKLOAD, "pause.tar": PAUSE}
    for name, image in images.items():
        assert image.tags == [name]  # what `ctr images import` names it
    # The manifests use exactly this name for every container.
    assert f"image: {AGENT}" in (REPO / "manifests/30-daemonset.yaml").read_text()


def test_a_rerun_reuses_the_cache(out_dir):
    # Back to back (in a tree others edit, the fixture's key may be stale by now): the second
    # run finds the first one's directory and builds nothing.
    first = build_images()
    start = time.monotonic()
    assert build_images() == first
    assert time.monotonic() - start < 60


def test_agent_image_runs_its_programs_and_has_the_dataplane_tools(images):
    image = images[AGENT]
    assert image.config["User"] == "0:0"
    assert image.env["PATH"].startswith("/opt/policy-agent/bin:")
    for argv, expect in [
        (["policy-agent", "--help"], "usage"),
        (["vpcip-ipamd", "--help"], "usage"),
        (["python", "-m", "cni_shim.install", "--help"], "usage"),
        (["iptables", "--version"], "nf_tables"),
        (["iptables-legacy", "--version"], "legacy"),
        (["ipset", "--version"], "ipset v7"),
        (["ip", "-V"], "iproute2"),
    ]:
        proc = image.run(*argv)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert expect in (proc.stdout + proc.stderr).lower(), (argv, proc.stdout[-500:])
    # The venv holds the project and its dependencies only: no pip anywhere in the image.
    proc = image.run("python", "-c", "import pip")
    assert proc.returncode != 0 and "No module named 'pip'" in proc.stderr
    assert not list((image.root / "opt/policy-agent/bin").glob("pip*"))


@pytest.fixture
def netns():
    name = f"pa-img-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for_handler(pid: int, sig: int, timeout: float = 10) -> None:
    """Until the process catches sig (SigCgt), so a signal sent is not lost on PID 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if caught & (1 << (sig - 1)):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never caught signal {sig}")


@pytest.mark.kernel
def test_workload_serves_its_ports_and_probes_like_agnhost(images, netns):
    image, agent = images[WORKLOAD], images[AGENT]
    entry = image.config["Entrypoint"] + image.config["Cmd"]
    assert entry == ["/usr/local/bin/workload", "serve"]
    # The image's own entrypoint and command: TCP and UDP on 80 and 81, PID 1 of its namespace.
    server = subprocess.Popen(image.argv(*entry, netns=netns), env=image.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().split() == ["serving", "tcp=80,81", "udp=80,81"]

        def probe(proto: str, port: int, timeout: float = 1.0):
            return image.run("workload", "probe", "--proto", proto, "--host", "127.0.0.1",
                             "--port", str(port), "--timeout", str(timeout), netns=netns)

        for proto in ("tcp", "udp"):
            for port in (80, 81):
                proc = probe(proto, port)
                assert proc.returncode == 0, (proto, port, proc.stderr)
        assert probe("tcp", 80).stdout.strip() == socket.gethostname()  # who answered
        for proto in ("tcp", "udp"):  # nothing there: refused at once
            proc = probe(proto, 82)
            assert (proc.returncode, proc.stderr.strip()) == (1, "REFUSED"), proto
        # Dropped (as a policy drops): the probe waits out its timeout. The rule is made by
        # the agent image's iptables, inside this test's own namespace only.
        for proto in ("tcp", "udp"):
            rule = agent.run("iptables", "-w", "-A", "INPUT", "-p", proto, "--dport", "81", "-j", "DROP", netns=netns)
            assert rule.returncode == 0, rule.stderr
            start = time.monotonic()
            proc = probe(proto, 81, timeout=0.5)
            assert (proc.returncode, proc.stderr.strip()) == (1, "TIMEOUT"), proto
            assert time.monotonic() - start >= 0.5
            assert probe(proto, 80).returncode == 0
        # SIGTERM from outside reaches PID 1 only through a handler: the pod stops at once.
        (workload_pid,) = children(server.pid)
        wait_for_handler(workload_pid, signal.SIGTERM)
        os.kill(workload_pid, signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            for pid in children(server.pid):
                os.kill(pid, signal.SIGKILL)
            server.kill()
            server.wait()


def elf_interpreter(path: Path) -> bool:
    """True when the ELF file names a program interpreter (PT_INTERP): dynamically linked."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "64-bit ELF expected"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_pause_image_is_the_static_pause_program_alone(images):
    image = images[PAUSE]
    assert image.config["Entrypoint"] == ["/pause"]
    assert sorted(p.name for p in image.root.iterdir()) == ["pause"]
    assert not elf_interpreter(image.root / "pause")
    version = subprocess.run(image.argv("/pause", "-v", proc=False), capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("pause.c "), version
    # As a pod sandbox: PID 1, stops cleanly on SIGTERM.
    sandbox = subprocess.Popen(image.argv("/pause", proc=False), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not children(sandbox.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid,) = children(sandbox.pid)
        wait_for_handler(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)
        assert sandbox.wait(timeout=10) == 0
        err = sandbox.stderr.read()
        assert "Shutting down, got signal" in err and "should be the first process" not in err, err
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.wait()
