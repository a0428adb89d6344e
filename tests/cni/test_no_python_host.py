"""vpcip-cni on a host without python (Bottlerocket): the installer's bundled runtime.

The installer runs exactly as the init container runs it (`--root` a temporary host root
with no python in it, so `auto` picks the bundled runtime). The executable is then run in
a private mount namespace that shows the kernel a host without python, two ways:

  masked  this machine's root, with every python on it hidden (empty files/dirs mounted
          over /usr/bin/python*, /usr/lib/python3*, /root/.pyenv, ...) and /opt/cni/bin
          holding what the installer wrote;
  empty   chroot into a root that holds nothing but /opt/cni/bin (and the ipamd socket and
          /var/run/netns, which the runtime provides): no python, no libc, no loader, no shell.

In both, VERSION and the CNI error paths answer, and a real ADD, CHECK and DEL against a
vpcip-ipamd (outside the mount namespace, in lab network namespaces) build and remove the pod.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from cni_lab_helpers import kernel

from cni_shim import install, runtime_bundle
from policy_agent.shared import naming

pytestmark = [pytest.mark.skipif(os.uname().machine != "x86_64", reason="the bundled runtime is x86-64 only")]


def needs_root(test):
    """Mount namespaces (unshare, mount, chroot) need root: a kernel test (must run in CI)."""
    return pytest.mark.kernel(kernel(test))


UNSHARE, CHROOT = shutil.which("unshare") or "unshare", shutil.which("chroot") or "chroot"
# The script's own tools come from here; the CNI's PATH (the runtime's) is restored before exec.
SETUP = 'CNIPATH="$PATH"\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nset -e\n'
BIN = install.DEFAULT_BIN_DIR
EXE = f"{BIN}/{install.EXECUTABLE_NAME}"

# Candidates a host could run python from; in "masked" each one that exists is covered.
PYTHON_FILES = ("/usr/bin/python*", "/usr/local/bin/python*", "/bin/python*", "/usr/lib/x86_64-linux-gnu/libpython3*",
                "/usr/local/lib/libpython3*")
PYTHON_DIRS = ("/usr/lib/python3*", "/usr/local/lib/python3*", "/root/.pyenv", "/usr/lib/python2*")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A host root after the init container ran (manifest arguments, default --host-runtime)."""
    tmp = tmp_path_factory.mktemp("nopython")
    root = tmp / "host"
    conflist = tmp / "05-vpcip.conflist"
    conflist.write_text(json.dumps(install.default_conflist()))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cni_shim.install", f"--root={root}", f"--conflist={conflist}",
         "--name=05-vpcip.conflist", "--on-foreign=refuse"],
        capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "runtime=bundled" in proc.stderr and "found=none" in proc.stderr, proc.stderr
    print(f"\ninstall --host-runtime=auto (bundled): {elapsed:.2f}s, "
          f"bundle {runtime_bundle.size(str(root) + EXE + '.d')} bytes")
    return root


def _script(view: str, root: str, scratch: str, binds: list[str]) -> str:
    """A shell script (run by unshare in a new mount namespace) that builds the host view
    and execs "$@" in it; nothing it mounts is visible outside the namespace."""
    if view == "masked":
        empty_file, empty_dir = os.path.join(scratch, "empty"), os.path.join(scratch, "emptydir")
        return SETUP + textwrap.dedent(f"""\
            mount -t tmpfs -o mode=0755 none /opt
            mkdir -p {BIN}
            mount --bind {root}{BIN} {BIN}
            for f in {' '.join(PYTHON_FILES)}; do
                if [ -f "$f" ] || [ -L "$f" ]; then mount --bind {empty_file} "$f"; fi
            done
            for d in {' '.join(PYTHON_DIRS)}; do
                if [ -d "$d" ]; then mount --bind {empty_dir} "$d"; fi
            done
            export PATH="$CNIPATH"
            exec "$@"
            """)
    new = os.path.join(scratch, "newroot")
    lines = [f"mount --bind {root}{BIN} {new}{BIN}"]
    lines += [f"mount --rbind {b} {new}{b}" for b in binds]
    lines += ['export PATH="$CNIPATH"', f'exec {CHROOT} {new} "$@"']
    return SETUP + "\n".join(lines) + "\n"


@pytest.fixture(params=["masked", "empty"])
def on_host(request, host, tmp_path):
    """run(argv, env, stdin, binds) -> (rc, stdout, stderr) of argv on the python-less host."""
    view = request.param
    scratch = tmp_path / "view"
    (scratch / "emptydir").mkdir(parents=True)
    (scratch / "empty").write_bytes(b"")

    def run(argv: list[str], env: dict[str, str], stdin: str = "", binds: tuple[str, ...] = ()):
        if view == "empty":
            new = scratch / "newroot"
            shutil.rmtree(new, ignore_errors=True)
            for d in (BIN, *binds):
                (new / d.lstrip("/")).mkdir(parents=True)
            assert not [p for p in new.rglob("*") if not p.is_dir()]  # nothing but mount points
        script = _script(view, str(host), str(scratch), list(binds))
        p = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", *argv],
                           input=stdin, env=env, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr

    run.view = view
    return run


def cni_env(command: str, **extra: str) -> dict[str, str]:
    # What containerd passes: CNI_* and a PATH (the plugin dirs); no PYTHON*, no HOME.
    return {"CNI_COMMAND": command, "CNI_PATH": BIN, "PATH": BIN, **extra}


def parse(out: str):
    return json.loads(out) if out.strip() else None


# --- what the installer wrote -------------------------------------------------------------

def test_install_writes_the_bundle_and_a_launcher_shebang(host):
    exe = host / EXE.lstrip("/")
    ident = runtime_bundle.target_of(str(exe))
    bundle = host / (EXE + ".d").lstrip("/") / ident
    assert exe.read_bytes().startswith(f"#!{EXE}.d/{ident}/launch\n".encode())
    assert install.is_our_executable(str(exe))
    assert runtime_bundle.verify(str(bundle))
    files = set(runtime_bundle.read_manifest(str(bundle))["files"])
    assert {"launch", "bin/python3"} <= files and any(f.startswith("libs/ld-linux") for f in files)
    assert any(f.startswith("libs/libc.so") for f in files)
    # only what the executable uses: no OpenSSL, no test suite, no site-packages
    assert not [f for f in files if "libcrypto" in f or "libssl" in f or "/test/" in f or "site-packages" in f]
    # a conflist naming it, as before
    assert json.loads((host / "etc/cni/net.d/05-vpcip.conflist").read_text())["plugins"][0]["type"] == "vpcip-cni"


@needs_root
def test_no_python_is_left_on_the_masked_host(host, tmp_path):
    """In the masked view no python runs from the places a host (or a shebang) takes it from:
    the PATH directories, pyenv, and the stdlib directories are empty. (This machine keeps
    other pythons in odd places, e.g. inside image build roots; the empty view has none.)"""
    scratch = tmp_path / "view"
    (scratch / "emptydir").mkdir(parents=True)
    (scratch / "empty").write_bytes(b"")
    probe = textwrap.dedent("""\
        found=0
        for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin /root/.pyenv/shims /root/.pyenv/bin; do
            for p in "$d"/python* "$d"/pypy*; do
                [ -e "$p" ] || continue
                if "$p" -c 'import sys' >/dev/null 2>&1; then echo "runs: $p"; found=1; fi
            done
        done
        for p in python python3; do
            if PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$p" -c 'import sys' >/dev/null 2>&1
            then echo "runs: $p"; found=1; fi
        done
        for d in /usr/lib/python3* /usr/local/lib/python3* /root/.pyenv; do
            if [ -n "$(ls -A "$d" 2>/dev/null)" ]; then echo "not empty: $d"; found=1; fi
        done
        echo "found=$found"
        """)
    script = _script("masked", str(host), str(scratch), [])
    p = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
                        "/bin/sh", "-c", probe], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("found=0"), p.stdout
    # and the same probe outside the namespace does find one (the probe can fail)
    p = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, text=True, timeout=300)
    assert "found=1" in p.stdout and "runs: /usr/bin/python3" in p.stdout


# --- on the python-less host ------------------------------------------------------------

@needs_root
def test_version_and_max_pods(on_host):
    rc, out, err = on_host([EXE], cni_env("VERSION"), '{"cniVersion": "0.3.1"}')
    assert rc == 0, err
    assert parse(out) == {"cniVersion": "0.3.1", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    rc, out, err = on_host([EXE, "max-pods", "--instance-type", "m5.large"], {"PATH": BIN})
    assert (rc, out.strip()) == (0, "29"), err


@needs_root
def test_cni_errors_name_the_field(on_host, tmp_path):
    sock_dir = str(tmp_path / "sock")
    os.makedirs(sock_dir)
    sock = os.path.join(sock_dir, "ipamd.sock")
    pod = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1"}
    conf = {"cniVersion": "1.0.0", "name": "vpcip", "type": "vpcip-cni", "ipamSocket": sock}
    rc, out, err = on_host([EXE], cni_env("ADD", **pod), json.dumps({**conf, "mtu": 99999}), binds=(sock_dir,))
    assert rc == 1 and parse(out)["code"] == 7 and "'mtu'" in parse(out)["msg"], (out, err)
    rc, out, err = on_host([EXE], cni_env("CHECK", **pod), json.dumps(conf), binds=(sock_dir,))
    assert rc == 1 and parse(out)["code"] == 7 and "'prevResult'" in parse(out)["msg"], (out, err)
    # /proc is not mounted in the empty root, so use a netns path that exists in both views
    pod["CNI_NETNS"] = sock_dir
    rc, out, err = on_host([EXE], cni_env("ADD", **pod), json.dumps(conf), binds=(sock_dir,))
    assert rc == 1 and parse(out)["code"] == 11 and sock in parse(out)["msg"], (out, err)
    rc, out, err = on_host([EXE], cni_env("DEL", **pod), json.dumps(conf), binds=(sock_dir,))
    assert rc == 0 and parse(out) is None and "DEL without daemon" in err, (out, err)


@needs_root
def test_add_check_del_against_a_real_ipamd(on_host, make_lab):
    lab = make_lab()
    netns = lab.new_pod_netns(f"nopy-{on_host.view}")
    pod = f"nopy-{on_host.view}"
    env = {k: v for k, v in lab.env("ADD", cid=f"cid-{pod}", netns=netns, pod=pod, ns="shop").items()
           if k.startswith("CNI_") and k != "CNI_COMMAND"}
    binds = (lab.tmp, "/var/run/netns")
    t0 = time.monotonic()
    rc, out, err = on_host([EXE], cni_env("ADD", **env), json.dumps(lab.conf()), binds=binds)
    add_s = time.monotonic() - t0
    assert rc == 0, (out, err, lab.log_text())
    res = parse(out)
    veth = naming.veth_name("eni", "shop", pod)
    assert res["interfaces"][0]["name"] == veth
    ip4 = res["ips"][0]["address"].split("/")[0]
    links = subprocess.run(["ip", "-j", "-n", lab.node, "link"], capture_output=True, text=True, check=True).stdout
    assert veth in {link["ifname"] for link in json.loads(links)}
    addrs = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                           text=True, check=True).stdout
    assert f"{ip4}/32" in addrs
    rc, out, err = on_host([EXE], cni_env("CHECK", **env), json.dumps(lab.conf(prevResult=res)), binds=binds)
    assert rc == 0 and parse(out) is None, (out, err)
    rc, out, err = on_host([EXE], cni_env("DEL", **env), json.dumps(lab.conf()), binds=binds)
    assert rc == 0 and parse(out) is None, (out, err)
    links = subprocess.run(["ip", "-j", "-n", lab.node, "link"], capture_output=True, text=True, check=True).stdout
    assert veth not in {link["ifname"] for link in json.loads(links)}
    assert lab.dump()["stats"]["assigned"] == 0
    print(f"\n{on_host.view}: ADD through unshare+bundled runtime {add_s * 1000:.0f} ms")


# --- install life cycle with a bundle ---------------------------------------------------------

def test_reinstall_changes_nothing_and_upgrade_keeps_the_previous_bundle_once(tmp_path):
    root = tmp_path / "host"
    first = install.install(root=str(root), host_runtime="bundled")
    exe = root / EXE.lstrip("/")
    bundles = root / (EXE + ".d").lstrip("/")
    ident = runtime_bundle.target_of(str(exe))
    assert first.host_runtime == "bundled" and first.bundle == f"{EXE}.d/{ident}"
    snapshot = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}
    again = install.install(root=str(root), host_runtime="bundled")
    assert again.changed == [] and again.removed == []
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")} == snapshot
    # An older image's bundle, named by the executable: an upgrade keeps it for calls in flight...
    old = bundles / "0123456789abcdef"
    shutil.copytree(bundles / ident, old)
    (exe).write_bytes(exe.read_bytes().replace(ident.encode(), b"0123456789abcdef", 1))
    upgrade = install.install(root=str(root), host_runtime="bundled")
    assert str(exe) in upgrade.changed and old.exists() and runtime_bundle.target_of(str(exe)) == ident
    # ...and the next run removes it.
    assert install.install(root=str(root), host_runtime="bundled").removed == [str(old)]
    # A damaged bundle is rebuilt.
    (bundles / ident / "bin/python3").write_bytes(b"broken")
    assert str(bundles / ident) in install.install(root=str(root), host_runtime="bundled").changed
    assert runtime_bundle.verify(str(bundles / ident))
    # Going to the host's python removes the bundle (at the run after the switch), uninstall all.
    install.install(root=str(root), host_runtime="system")
    install.install(root=str(root), host_runtime="system")
    assert not bundles.exists()
    install.install(root=str(root), host_runtime="bundled")
    assert len(install.uninstall(root=str(root)).removed) == 4  # conflist, executable, bundle, bundle dir
    assert not any(p.is_file() for p in root.rglob("*"))


def test_a_missing_bundle_gives_a_cni_error(tmp_path):
    root = tmp_path / "host"
    bin_dir = str(tmp_path / "bin")
    install.install(root="/", bin_dir=bin_dir, conf_dir=str(tmp_path / "net.d"), host_runtime="bundled")
    exe = os.path.join(bin_dir, "vpcip-cni")
    p = subprocess.run([exe], input="{}", env=cni_env("VERSION"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "supportedVersions" in parse(p.stdout), p.stderr
    shutil.rmtree(exe + ".d/" + runtime_bundle.target_of(exe) + "/libs")
    p = subprocess.run([exe], input="{}", env=cni_env("VERSION"), capture_output=True, text=True, timeout=60)
    out = parse(p.stdout)
    assert p.returncode == 127 and out["code"] == 50 and "bundled runtime" in out["msg"], p
    assert not root.exists()


@needs_root
def test_a_bundle_made_by_debians_python_runs_in_an_empty_root(tmp_path):
    """The image's interpreter is Debian's python3 (static libpython, /usr/lib/python3.11):
    the installer run on it bundles a runtime that needs nothing from the host either."""
    debian = "/usr/bin/python3"
    probe = subprocess.run([debian, "-I", "-c", "import sys; print(sys.prefix, sys.version_info >= (3, 11))"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout.split() != ["/usr", "True"]:
        pytest.skip("no Debian python3 >= 3.11 at /usr/bin/python3")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(install.__file__)))
    root = tmp_path / "host"
    code = f"import sys; sys.path.insert(0, {repo!r}); from cni_shim.install import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([debian, "-I", "-c", code, f"--root={root}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "host_runtime=bundled" in proc.stderr, proc.stderr
    exe = root / EXE.lstrip("/")
    bundle = str(exe) + ".d/" + runtime_bundle.target_of(str(exe))
    assert runtime_bundle.read_manifest(bundle)["python"].startswith("3.11")
    print(f"\nbundle from Debian's python3: {runtime_bundle.size(bundle)} bytes")
    scratch = tmp_path / "view"
    new = scratch / "newroot"
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    conf = json.dumps({"cniVersion": "1.0.0", "name": "vpcip", "type": "vpcip-cni",
                       "ipamSocket": str(sock_dir / "ipamd.sock")})
    pod = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": str(sock_dir),
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1"}
    for command, stdin, rc, want in (("VERSION", "{}", 0, None), ("ADD", conf, 1, 11), ("DEL", "{", 1, 6)):
        shutil.rmtree(new, ignore_errors=True)
        for d in (BIN, str(sock_dir)):
            (new / d.lstrip("/")).mkdir(parents=True)
        script = _script("empty", str(root), str(scratch), [str(sock_dir)])
        p = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", EXE],
                           input=stdin, env=cni_env(command, **pod), capture_output=True, text=True, timeout=120)
        out = parse(p.stdout)
        assert p.returncode == rc, (command, p.stdout, p.stderr)
        if command == "VERSION":
            assert "1.0.0" in out["supportedVersions"]
        else:
            assert out["code"] == want, out
