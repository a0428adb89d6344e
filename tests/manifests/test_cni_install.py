"""The CNI installer in a temporary root: fresh install, idempotence, upgrade, foreign
conflists (refuse, merge, override), rename, uninstall; and the installed executable
runs on a bare host python3 with nothing but the standard library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from cni_shim import install
from cni_shim.install import InstallError

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3: no venv, no pyroute2, no structlog
AWS_CONFLIST = {
    "cniVersion": "0.4.0",
    "name": "aws-cni",
    "disableCheck": True,
    "plugins": [
        {"name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001"},
        {"name": "egress-cni", "type": "egress-cni", "enabled": "false"},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ],
}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "host"


def bin_path(root: Path) -> Path:
    return root / "opt/cni/bin" / install.EXECUTABLE_NAME


def conf_dir(root: Path) -> Path:
    return root / "etc/cni/net.d"


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def put(path: Path, data: bytes | str | dict) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data).encode() if isinstance(data, dict) else data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    return raw


def run_cni(exe: Path, env: dict[str, str], stdin: str = "") -> tuple[int, dict]:
    """Run the installed executable the way a runtime does: bare environment, on the host's
    system python (its shebang is replaced by an explicit interpreter only for the check)."""
    proc = subprocess.run([str(exe)], input=stdin, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


# --- fresh install -----------------------------------------------------------------

def test_fresh_install_writes_executable_and_conflist(root):
    report = install.install(root=str(root))
    exe, conf = bin_path(root), conf_dir(root) / install.DEFAULT_CONFLIST_NAME
    assert sorted(report.changed) == sorted([str(exe), str(conf)]) and not report.removed
    assert exe.stat().st_mode & 0o777 == 0o755
    assert conf.stat().st_mode & 0o777 == 0o644
    assert json.loads(conf.read_text()) == install.default_conflist()
    assert exe.read_bytes().startswith(b"#!/usr/bin/python3 -I\n")
    # nothing else: no temp files left behind
    assert sorted(listing(root)) == ["etc/cni/net.d/05-vpcip.conflist", "opt/cni/bin/vpcip-cni"]


def test_installed_executable_runs_on_bare_system_python(root):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no system python3")
    probe = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import pyroute2"], capture_output=True)
    assert probe.returncode != 0, "the system python must lack the agent's dependencies for this test to mean anything"
    install.install(root=str(root), python=SYSTEM_PYTHON)
    code, out = run_cni(bin_path(root), {"CNI_COMMAND": "VERSION"}, "{}")
    assert code == 0 and "1.0.0" in out["supportedVersions"]
    # A real ADD with the daemon absent: the executable's client path runs and answers
    # "try again later" (11) instead of crashing on a missing module.
    conf = install.default_conflist()
    conf["plugins"][0]["ipamSocket"] = str(root / "no-daemon.sock")
    env = {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1", "CNI_PATH": "/opt/cni/bin",
    }
    code, out = run_cni(bin_path(root), env, json.dumps(conf))
    assert code == 1 and out["code"] == 11, out


def test_executable_holds_only_the_stdlib_modules_it_imports(root):
    install.install(root=str(root))
    with zipfile.ZipFile(bin_path(root)) as zf:
        names = set(zf.namelist())
    assert {"__main__.py", "cni_shim/__main__.py", "cni_shim/protocol.py", "policy_agent/shared/naming.py"} <= names
    assert not {"cni_shim/daemon.py", "cni_shim/plumbing.py", "cni_shim/install.py"} & names
    assert not any(n.startswith(("policy_agent/compiler", "policy_agent/dataplane")) for n in names)


def test_a_heavy_import_is_refused():
    _, foreign = install.module_closure("cni_shim.plumbing")
    assert "pyroute2" in foreign
    with pytest.raises(InstallError, match="pyroute2"):
        install.build_executable(entry="cni_shim.plumbing")


def test_executable_bytes_are_reproducible():
    assert install.build_executable() == install.build_executable()


# --- idempotence and upgrade ----------------------------------------------------------

def test_second_run_changes_nothing(root):
    install.install(root=str(root))
    before = {p: (os.stat(root / p).st_ino, os.stat(root / p).st_mtime_ns) for p in listing(root)}
    report = install.install(root=str(root))
    assert report.changed == [] and len(report.unchanged) == 2
    assert {p: (os.stat(root / p).st_ino, os.stat(root / p).st_mtime_ns) for p in listing(root)} == before


def test_upgrade_replaces_old_version_by_rename(root):
    old_exe = put(bin_path(root), install.build_executable(version="0.0.1"))
    old_conf = install.default_conflist()
    old_conf["plugins"][0]["mtu"] = 1500
    put(conf_dir(root) / install.DEFAULT_CONFLIST_NAME, install.render_conflist(old_conf))
    inodes = {p: os.stat(root / p).st_ino for p in listing(root)}
    report = install.install(root=str(root))
    assert len(report.changed) == 2
    files = listing(root)
    assert files["opt/cni/bin/vpcip-cni"] != old_exe
    with zipfile.ZipFile(bin_path(root)) as zf:
        assert json.loads(zf.read(install.MARKER))["version"] != "0.0.1"
    assert json.loads(files["etc/cni/net.d/05-vpcip.conflist"])["plugins"][0]["mtu"] == 9001
    # A new inode: the file was renamed over, never rewritten in place.
    assert all(os.stat(root / p).st_ino != ino for p, ino in inodes.items())
    assert sorted(files) == sorted(inodes)


def test_readers_see_old_or_new_never_a_part(root):
    """A reader polling the conflist and the executable while upgrades run in a loop
    only ever sees one complete version or the other."""
    a, b = install.default_conflist(), install.default_conflist()
    b["plugins"][0]["mtu"] = 1500
    versions = {install.render_conflist(a), install.render_conflist(b)}
    old_exes = [install.build_executable(version="1.0.0"), install.build_executable(version="2.0.0")]
    exes = set(old_exes) | {install.build_executable()}
    install.install(root=str(root), conflist=a)
    conf = conf_dir(root) / install.DEFAULT_CONFLIST_NAME
    seen_conf, seen_exe, bad = set(), set(), []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for path, allowed, seen in ((conf, versions, seen_conf), (bin_path(root), exes, seen_exe)):
                data = path.read_bytes()
                (seen.add(data) if data in allowed else bad.append(len(data)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        exe_path = str(bin_path(root))
        for i in range(60):
            install.write_atomic(exe_path, sorted(exes)[i % 2], 0o755)
            install.install(root=str(root), conflist=(a, b)[i % 2])
            # install() also rewrites the executable with the current build; put one of ours back
    finally:
        stop.set()
        t.join(timeout=60)
    assert bad == []
    assert seen_conf == versions and len(seen_exe) >= 2
    assert not [n for n in os.listdir(conf_dir(root)) if n.startswith(".")]


def test_our_conflist_under_an_old_name_is_replaced(root):
    put(conf_dir(root) / "10-vpcip.conflist", install.render_conflist(install.default_conflist()))
    report = install.install(root=str(root))
    assert report.removed == [str(conf_dir(root) / "10-vpcip.conflist")]
    assert sorted(os.listdir(conf_dir(root))) == ["05-vpcip.conflist"]


# --- foreign configuration --------------------------------------------------------------

def test_foreign_conflist_is_refused_and_nothing_changes(root):
    raw = put(conf_dir(root) / "10-aws.conflist", AWS_CONFLIST)
    before = listing(root)
    with pytest.raises(InstallError, match="10-aws.conflist"):
        install.install(root=str(root))
    assert listing(root) == before and (conf_dir(root) / "10-aws.conflist").read_bytes() == raw
    # the same through the command line: exit code 2, message on stderr
    proc = subprocess.run([sys.executable, "-m", "cni_shim.install", f"--root={root}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "another CNI is configured" in proc.stderr
    assert listing(root) == before


def test_merge_keeps_foreign_file_and_takes_its_meta_plugins(root):
    raw = put(conf_dir(root) / "10-aws.conflist", AWS_CONFLIST)
    put(root / "opt/cni/bin/portmap", b"\x7fELF fake portmap")
    report = install.install(root=str(root), on_foreign="merge")
    assert report.merged_plugins == ["portmap"] and report.dropped_plugins == ["egress-cni"]
    ours = json.loads((conf_dir(root) / "05-vpcip.conflist").read_text())
    assert [p["type"] for p in ours["plugins"]] == ["vpcip-cni", "portmap"]
    assert ours["plugins"][1] == AWS_CONFLIST["plugins"][2]
    assert (conf_dir(root) / "10-aws.conflist").read_bytes() == raw
    # ours sorts first, so it is the one the runtime uses
    assert install.cni_config_files(str(conf_dir(root)))[0] == "05-vpcip.conflist"
    # and a second run is a no-op
    assert install.install(root=str(root), on_foreign="merge").changed == []


def test_merge_skips_a_meta_plugin_whose_binary_is_missing(root):
    put(conf_dir(root) / "10-aws.conflist", AWS_CONFLIST)
    report = install.install(root=str(root), on_foreign="merge")
    assert report.merged_plugins == [] and "portmap" in report.dropped_plugins
    assert [p["type"] for p in json.loads((conf_dir(root) / "05-vpcip.conflist").read_text())["plugins"]] == ["vpcip-cni"]


def test_override_installs_ours_alone(root):
    put(conf_dir(root) / "10-aws.conflist", AWS_CONFLIST)
    install.install(root=str(root), on_foreign="override")
    assert json.loads((conf_dir(root) / "05-vpcip.conflist").read_text()) == install.default_conflist()
    assert (conf_dir(root) / "10-aws.conflist").exists()


@pytest.mark.parametrize("mode", ["merge", "override"])
def test_ours_must_sort_first_or_the_install_fails(root, mode):
    put(conf_dir(root) / "00-multus.conf", {"cniVersion": "0.3.1", "name": "multus", "type": "multus"})
    before = listing(root)
    with pytest.raises(InstallError, match="sort"):
        install.install(root=str(root), on_foreign=mode)
    assert listing(root) == before


def test_a_foreign_file_with_our_name_is_never_overwritten(root):
    raw = put(conf_dir(root) / "05-vpcip.conflist", {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]})
    with pytest.raises(InstallError):
        install.install(root=str(root), on_foreign="override")
    assert (conf_dir(root) / "05-vpcip.conflist").read_bytes() == raw


def test_unparseable_foreign_file_is_foreign(root):
    put(conf_dir(root) / "10-broken.conflist", "{not json")
    with pytest.raises(InstallError, match="10-broken"):
        install.install(root=str(root))
    with pytest.raises(InstallError, match="not a JSON object"):
        install.install(root=str(root), on_foreign="merge")


def test_files_without_a_cni_extension_are_ignored(root):
    put(conf_dir(root) / "README", "notes")
    put(conf_dir(root) / ".10-hidden.conflist", AWS_CONFLIST)
    install.install(root=str(root))
    assert (conf_dir(root) / "05-vpcip.conflist").exists()


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["plugins"][0].update(mtu=99999), "mtu"),
        (lambda c: c["plugins"][0].update(vethPrefix="eth"), "vethPrefix"),
        (lambda c: c["plugins"][0].update(type="bridge"), "plugins\\[0\\].type"),
        (lambda c: c.update(plugins=[]), "plugins"),
        (lambda c: c.update(cniVersion="9.9.9"), "9.9.9"),
    ],
)
def test_bad_conflist_is_refused_naming_the_field(root, mutate, message):
    conf = install.default_conflist()
    mutate(conf)
    with pytest.raises(InstallError, match=message):
        install.install(root=str(root), conflist=conf)
    assert not root.exists()


def test_bad_conflist_file_on_the_command_line(tmp_path):
    path = tmp_path / "c.conflist"
    path.write_text("{")
    assert install.main([f"--root={tmp_path / 'host'}", f"--conflist={path}"]) == 2
    assert install.main([f"--root={tmp_path / 'host'}", f"--conflist={tmp_path / 'missing'}"]) == 2
    assert not (tmp_path / "host").exists()


# --- uninstall ----------------------------------------------------------------------------

def test_uninstall_removes_ours_and_keeps_foreign(root):
    raw = put(conf_dir(root) / "10-aws.conflist", AWS_CONFLIST)
    install.install(root=str(root), on_foreign="override")
    put(conf_dir(root) / "04-vpcip-old.conflist", install.render_conflist(install.default_conflist()))
    report = install.uninstall(root=str(root))
    assert len(report.removed) == 3
    assert listing(root) == {"etc/cni/net.d/10-aws.conflist": raw}
    assert install.uninstall(root=str(root)).removed == []  # idempotent


def test_uninstall_keeps_a_vpcip_cni_that_is_not_ours(root):
    put(bin_path(root), b"#!/bin/sh\necho someone else's\n")
    assert install.uninstall(root=str(root)).removed == []
    assert bin_path(root).exists()


def test_command_line_install_and_uninstall(tmp_path):
    root = tmp_path / "host"
    conf = tmp_path / "05-vpcip.conflist"
    conf.write_text(json.dumps(install.default_conflist()))
    cmd = [sys.executable, "-m", "cni_shim.install", f"--root={root}", f"--conflist={conf}", "--on-foreign=refuse",
           "--host-runtime=system"]  # the default, auto, would bundle a runtime into this python-less root
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cni_installed" in proc.stderr
    assert sorted(listing(root)) == ["etc/cni/net.d/05-vpcip.conflist", "opt/cni/bin/vpcip-cni"]
    proc = subprocess.run([sys.executable, "-m", "cni_shim.install", f"--root={root}", "--uninstall"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and listing(root) == {}


def test_plugin_type_matches_the_protocol():
    from cni_shim import protocol

    assert install.PLUGIN_TYPE == protocol.PLUGIN_TYPE
