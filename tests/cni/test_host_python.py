"""vpcip-cni on the oldest host python we promise (3.9, Amazon Linux 2023).

The executable is installed the way the init container does it (cni_shim.install into a
temporary root) with its shebang naming pyenv's 3.9 interpreter, and is then executed
as the runtime does: the kernel reads the shebang. A machine without 3.9 fails here.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import zipfile
from io import BytesIO

import pytest
from cni_lab_helpers import kernel

from cni_shim import install
from policy_agent.shared import naming

MIN = install.MIN_HOST_PYTHON
HOW_TO_GET = (
    "vpcip-cni must be proven on python {v} (Amazon Linux 2023 ships 3.9), and no {v} interpreter was found "
    "(looked for $PYENV_ROOT/versions/{v}.*/bin/python{v}, `pyenv root`, ~/.pyenv and python{v} on PATH). "
    "Get one with `pyenv install {v}` (the CI machine image carries pyenv interpreters; see `pyenv versions`) "
    "or `apt-get install python{v}` where the distribution has it."
)


def _pyenv_roots() -> list[str]:
    roots = [os.environ.get("PYENV_ROOT", "")]
    if shutil.which("pyenv"):
        proc = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
        roots.append(proc.stdout.strip())
    roots.append(os.path.expanduser("~/.pyenv"))
    return [r for r in dict.fromkeys(roots) if r]


def find_python(major: int, minor: int) -> str | None:
    """The newest patch release of python major.minor we can find (never a hard-coded patch)."""
    v = f"{major}.{minor}"
    found = []
    for root in _pyenv_roots():
        for exe in glob.glob(os.path.join(root, "versions", f"{v}.*", "bin", f"python{v}")):
            m = re.search(rf"/versions/{re.escape(v)}\.(\d+)/", exe)
            if m:
                found.append((int(m.group(1)), exe))
    candidates = [exe for _, exe in sorted(found, reverse=True)]
    if shutil.which(f"python{v}"):
        candidates.append(shutil.which(f"python{v}"))
    for exe in candidates:
        proc = subprocess.run([exe, "-I", "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.split() == [str(major), str(minor)]:
            return exe
    return None


@pytest.fixture(scope="module")
def python39() -> str:
    exe = find_python(*MIN)
    if exe is None:
        pytest.fail(HOW_TO_GET.format(v=".".join(map(str, MIN))), pytrace=False)
    return exe


@pytest.fixture
def installed(tmp_path, python39) -> str:
    """The executable as the installer writes it (temp root, shebang = the 3.9 interpreter)."""
    root = tmp_path / "host"
    report = install.install(root=str(root), python=python39, host_runtime="system")
    assert report.host_runtime == "system"
    exe = root / "opt/cni/bin" / install.EXECUTABLE_NAME
    assert exe.read_bytes().startswith(f"#!{python39} -I\n".encode())
    return str(exe)


def run_exe(exe: str, command: str, stdin: str, **extra: str) -> tuple[int, dict | None, str]:
    """Exec the file itself (the kernel reads its shebang), with a runtime's bare environment."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", **extra}
    p = subprocess.run([exe], input=stdin, env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr


POD_ENV = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1"}


def good_conf(sock: str) -> dict:
    return {"cniVersion": "1.0.0", "name": "vpcip", "type": "vpcip-cni", "ipamSocket": sock}


# --- static: no 3.10+ syntax in anything the executable carries ---------------------------

def bundled_sources() -> dict[str, str]:
    data = install.build_executable()
    with zipfile.ZipFile(BytesIO(data)) as zf:
        return {n: zf.read(n).decode() for n in zf.namelist() if n.endswith(".py")}


def test_every_bundled_module_parses_as_python_3_9():
    sources = bundled_sources()
    assert {"__main__.py", "cni_shim/__main__.py", "cni_shim/protocol.py", "cni_shim/client.py",
            "policy_agent/shared/endpoint.py", "policy_agent/shared/naming.py"} <= set(sources)
    bad = {}
    for name, src in sources.items():
        try:
            ast.parse(src, name, feature_version=MIN)
        except SyntaxError as exc:
            bad[name] = f"line {exc.lineno}: {exc.msg}"
    assert bad == {}


def test_the_static_check_catches_3_10_syntax():
    # The check above is only worth something if ast rejects newer syntax at feature_version 3.9.
    # It is best effort; what no parser sees (`int | str` evaluated at run time, a 3.10+ library
    # call) is why the installed executable also runs on the 3.9 interpreter below.
    for newer in ("match x:\n    case 1:\n        pass\n", "try:\n    pass\nexcept* ValueError:\n    pass\n"):
        with pytest.raises(SyntaxError):
            ast.parse(newer, feature_version=MIN)
    ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 10))


def test_every_bundled_module_compiles_on_python_3_9(python39, tmp_path):
    """The same modules, compiled by the 3.9 interpreter itself; no import needed, so a
    module the quick runs below do not reach is covered too."""
    src = tmp_path / "sources.json"
    src.write_text(json.dumps(bundled_sources()))
    check = (
        "import json, sys\n"
        "bad = {}\n"
        "for name, text in json.load(open(sys.argv[1])).items():\n"
        "    try:\n"
        "        compile(text, name, 'exec', dont_inherit=True)\n"
        "    except SyntaxError as exc:\n"
        "        bad[name] = '%s: %s' % (exc.lineno, exc.msg)\n"
        "print(json.dumps(bad))\n"
    )
    p = subprocess.run([python39, "-I", "-c", check, str(src)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {}
    # and the check itself can fail on 3.9
    src.write_text(json.dumps({"new.py": "match x:\n    case 1:\n        pass\n"}))
    p = subprocess.run([python39, "-I", "-c", check, str(src)], capture_output=True, text=True, timeout=60)
    assert list(json.loads(p.stdout)) == ["new.py"]


def test_bootstrap_floor_is_3_9():
    assert MIN == (3, 9)
    with zipfile.ZipFile(BytesIO(install.build_executable())) as zf:
        assert "(3, 9)" in zf.read("__main__.py").decode()
        assert json.loads(zf.read(install.MARKER))["minPython"] == "3.9"


# --- on the 3.9 interpreter: the commands that need no daemon -------------------------------

def test_version_on_python_3_9(installed, python39):
    rc, out, err = run_exe(installed, "VERSION", '{"cniVersion": "0.4.0"}')
    assert rc == 0, err
    assert out == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    p = subprocess.run([installed, "max-pods", "--instance-type", "m5.large"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert (p.returncode, p.stdout.strip()) == (0, "29"), p.stderr


@pytest.mark.parametrize(
    ("command", "mutate", "code", "words"),
    [
        ("ADD", lambda c: c.update(mtu=99999), 7, "'mtu'"),
        ("ADD", lambda c: c.update(vethPrefix="eth"), 7, "'vethPrefix'"),
        ("ADD", lambda c: c.update(cniVersion="9.9.9"), 1, "9.9.9"),
        ("ADD", lambda c: c.pop("name"), 7, "'name'"),
        ("DEL", lambda c: c.update(policyWaitSeconds="x"), 7, "'policyWaitSeconds'"),
        ("CHECK", lambda c: None, 7, "'prevResult'"),
        ("CHECK", lambda c: c.update(cniVersion="0.3.1"), 1, "CHECK needs cniVersion 0.4.0"),
    ],
)
def test_broken_config_on_python_3_9_names_the_field(installed, tmp_path, command, mutate, code, words):
    conf = good_conf(str(tmp_path / "ipamd.sock"))
    mutate(conf)
    rc, out, err = run_exe(installed, command, json.dumps(conf), **POD_ENV)
    assert rc == 1 and out is not None, err
    assert out["code"] == code and words in out["msg"], out
    assert "Traceback" not in err


def test_bad_environment_on_python_3_9(installed, tmp_path):
    conf = json.dumps(good_conf(str(tmp_path / "ipamd.sock")))
    rc, out, _ = run_exe(installed, "ADD", conf, **{**POD_ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=ns1"})
    assert rc == 1 and out["code"] == 4 and "K8S_POD_NAME" in out["msg"]
    rc, out, _ = run_exe(installed, "ADD", "{not json", **POD_ENV)
    assert rc == 1 and out["code"] == 6


def test_unreachable_daemon_on_python_3_9(installed, tmp_path):
    sock = str(tmp_path / "no-ipamd.sock")
    conf = json.dumps(good_conf(sock))
    rc, out, err = run_exe(installed, "ADD", conf, **POD_ENV)
    assert rc == 1 and out["code"] == 11 and sock in out["msg"] and "ipamSocket" in out["details"], (out, err)
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.233.0.1/32"}]}
    rc, out, _ = run_exe(installed, "CHECK", json.dumps({**good_conf(sock), "prevResult": prev}), **POD_ENV)
    assert rc == 1 and out["code"] == 11 and sock in out["msg"]
    # DEL must succeed without the daemon (the runtime retries DEL forever otherwise).
    rc, out, err = run_exe(installed, "DEL", conf, **POD_ENV)
    assert rc == 0 and out is None and "DEL without daemon" in err


def test_an_older_python_gets_a_cni_error_not_a_traceback(tmp_path):
    old = find_python(3, 8)
    if old is None:
        pytest.skip("no python 3.8 to show the floor with")
    root = tmp_path / "host"
    install.install(root=str(root), python=old)
    rc, out, err = run_exe(str(root / "opt/cni/bin/vpcip-cni"), "VERSION", "{}")
    assert rc == 1 and out["code"] == 50 and "python3 >= 3.9" in out["msg"] and "3.8." in out["details"], err


# --- choosing the runtime: what the installer sees of the host's python ------------------------

def _fake_python(root, path: str, target: str, stdlib: str = "") -> None:
    """root/path -> target (a symlink chain as distributions make them), target a file."""
    full = root / path.lstrip("/")
    full.parent.mkdir(parents=True, exist_ok=True)
    tfull = root / target.lstrip("/") if target.startswith("/") else full.parent / target
    tfull.parent.mkdir(parents=True, exist_ok=True)
    tfull.write_bytes(b"\x7fELF not really")
    if tfull != full:
        full.symlink_to(target)
    if stdlib:
        (root / stdlib.lstrip("/")).mkdir(parents=True)
        (root / stdlib.lstrip("/") / "os.py").write_text("")


@pytest.mark.parametrize(
    ("layout", "found", "runtime"),
    [
        ((("/usr/bin/python3", "python3.9"),), (3, 9), "system"),  # Amazon Linux 2023
        ((("/usr/bin/python3", "/usr/bin/python3.11"),), (3, 11), "system"),  # absolute link target
        ((("/usr/bin", "/bin-real"), ("/bin-real/python3", "python3.12")), (3, 12), "system"),  # dir link
        ((("/usr/bin/python3", "python3.8"),), (3, 8), "bundled"),  # too old
        ((("/usr/bin/python3", "/usr/bin/python3"),), None, "bundled"),  # no version in the name, no stdlib
        ((), None, "bundled"),  # Bottlerocket: nothing at all
    ],
)
def test_auto_picks_system_only_for_a_host_python_3_9_or_newer(tmp_path, layout, found, runtime):
    root = tmp_path / "host"
    root.mkdir()
    for path, target in layout:
        if path == "/usr/bin":
            (root / "bin-real").mkdir()
            (root / "usr").mkdir()
            (root / "usr/bin").symlink_to("/bin-real")
        else:
            _fake_python(root, path, target)
    assert install.host_python_version(str(root), "/usr/bin/python3") == found
    assert install.choose_host_runtime("auto", str(root), "/usr/bin/python3") == runtime
    assert install.choose_host_runtime("system", str(root), "/usr/bin/python3") == "system"
    assert install.choose_host_runtime("bundled", str(root), "/usr/bin/python3") == "bundled"


def test_auto_keeps_the_host_python_where_no_bundle_can_be_built(tmp_path, monkeypatch):
    from cni_shim import runtime_bundle

    monkeypatch.setattr(runtime_bundle, "supported", lambda: False)  # e.g. an arm64 node
    assert install.choose_host_runtime("auto", str(tmp_path), "/usr/bin/python3") == "system"


def test_auto_reads_the_version_from_the_stdlib_directory(tmp_path):
    root = tmp_path / "host"
    _fake_python(root, "/usr/bin/python3", "/usr/bin/python3", stdlib="/usr/lib/python3.10")
    assert install.host_python_version(str(root), "/usr/bin/python3") == (3, 10)
    assert install.choose_host_runtime("auto", str(root), "/usr/bin/python3") == "system"


def test_bad_host_runtime_is_refused(tmp_path):
    with pytest.raises(install.InstallError, match="--host-runtime"):
        install.install(root=str(tmp_path / "h"), host_runtime="docker")
    assert not (tmp_path / "h").exists()


# --- on the 3.9 interpreter: a real ADD, CHECK and DEL against vpcip-ipamd ----------------------

@pytest.mark.kernel
@kernel
def test_add_check_del_on_python_3_9_against_a_real_ipamd(make_lab, installed):
    lab = make_lab()
    netns = lab.new_pod_netns("py39")
    env = lab.env("ADD", cid="cid-py39", netns=netns, pod="py39", ns="shop")
    extra = {k: v for k, v in env.items() if k.startswith("CNI_") and k != "CNI_COMMAND"}
    rc, res, err = run_exe(installed, "ADD", json.dumps(lab.conf()), **extra)
    assert rc == 0, (res, err, lab.log_text())
    veth = naming.veth_name("eni", "shop", "py39")
    assert res["interfaces"][0]["name"] == veth and res["interfaces"][1]["sandbox"] == f"/var/run/netns/{netns}"
    ip4 = res["ips"][0]["address"].split("/")[0]
    node_links = json.loads(subprocess.run(["ip", "-j", "-n", lab.node, "link"], capture_output=True,
                                           text=True, check=True).stdout)
    assert veth in {link["ifname"] for link in node_links}
    pod_addrs = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                               text=True, check=True).stdout
    assert f"{ip4}/32" in pod_addrs
    rc, out, err = run_exe(installed, "CHECK", json.dumps(lab.conf(prevResult=res)), **extra)
    assert rc == 0 and out is None, (out, err)
    rc, out, err = run_exe(installed, "DEL", json.dumps(lab.conf()), **extra)
    assert rc == 0 and out is None, (out, err)
    node_links = json.loads(subprocess.run(["ip", "-j", "-n", lab.node, "link"], capture_output=True,
                                           text=True, check=True).stdout)
    assert veth not in {link["ifname"] for link in node_links}
    assert lab.dump()["stats"]["assigned"] == 0
