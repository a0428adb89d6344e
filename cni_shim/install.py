"""Install the `vpcip-cni` executable and its conflist on a node (the init container's job).

Stdlib only: it runs in the image with the shim's light dependencies, and it
builds what it installs from the shim's own stdlib-only modules.

    python -m cni_shim.install [--root /host] [--conflist FILE] [--on-foreign refuse|merge|override]
                               [--host-runtime auto|system|bundled]
    python -m cni_shim.install --root /host --uninstall

What it writes (paths below --root, which is where the init container mounts the host):
  <bin-dir>/vpcip-cni           a zip application (shebang + zip, like `python -m zipapp`) holding
                                cni_shim and policy_agent.shared (the runtime executes CNI plugins
                                on the host, not in our image), run by, per --host-runtime:
                                  system   the host's python3 >= 3.9 (--python)
                                  bundled  a runtime copied from this image (hosts without python,
                                           e.g. Bottlerocket; see cni_shim.runtime_bundle)
                                  auto     (default) system if <root><python> is python3 >= 3.9,
                                           else bundled
  <bin-dir>/vpcip-cni.d/<id>/   bundled only: the interpreter, its loader and libraries, and the
                                stdlib modules the executable imports
  <conf-dir>/<name>             the conflist (default name 05-vpcip.conflist)

Rules (docs/install.md "The CNI installer"):
  * Atomic: every file is written to a hidden temp file in the same directory, fsynced and
    renamed over the target; readers (the runtime) see the old file or the new one, never a part.
  * Idempotent: a file whose bytes and mode already match is not touched; a second run
    changes nothing. The executable is byte-for-byte reproducible (fixed zip timestamps).
  * Order: the bundled runtime (if any), then the executable, then the conflist (a conflist
    naming a missing binary would fail every pod); uninstall goes the other way round.
  * A CNI config file is "ours" if its first plugin (or, for a .conf, the file itself) has
    type vpcip-cni. Ours under another name (an earlier --name) is removed after the new one
    is in place.
  * Foreign config files (anyone else's .conf/.conflist/.json) are never modified or removed.
    What happens when one exists is --on-foreign:
      refuse   (default) fail with exit code 2 and write nothing: taking a node away from
               another CNI must be a decision, not a side effect of a DaemonSet rollout.
      merge    install ours and copy the chained meta-plugins (portmap, bandwidth, tuning)
               of the foreign config the runtime uses today, if their binaries exist in
               the bin dir; other chained plugins are left out and named in the log.
      override install ours alone.
    In merge and override our file must sort before every foreign one (the runtime uses
    the first file by name), otherwise the install fails instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, field

from policy_agent.shared.endpoint import atomic_write, fsync_dir

PLUGIN_TYPE = "vpcip-cni"  # == cni_shim.protocol.PLUGIN_TYPE (checked by tests)
EXECUTABLE_NAME = "vpcip-cni"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_CONFLIST_NAME = "05-vpcip.conflist"
DEFAULT_PYTHON = "/usr/bin/python3"
# The host interpreter must be at least this: Amazon Linux 2023 ships 3.9. The executable's
# modules are checked against it (tests/cni/test_host_python.py), the bootstrap refuses older.
MIN_HOST_PYTHON = (3, 9)
HOST_RUNTIMES = ("auto", "system", "bundled")
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")  # what libcni reads, in file-name order
MERGEABLE_PLUGINS = ("portmap", "bandwidth", "tuning")
ON_FOREIGN = ("refuse", "merge", "override")
MARKER = "vpcip-cni-install.json"  # inside the zip: who built it, from which version
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

log = logging.getLogger("cni_shim.install")


class InstallError(Exception):
    """The install cannot proceed; the message says which file and what to do."""


# --- the executable ----------------------------------------------------------------

_BOOTSTRAP = '''\
"""vpcip-cni: the CNI executable, installed by cni_shim.install."""
import sys

if sys.version_info < {min_version!r}:
    import json

    sys.stdout.write(json.dumps({{
        "cniVersion": "1.0.0",
        "code": 50,
        "msg": "vpcip-cni needs python3 >= {min_text} on the node",
        "details": "found " + sys.version.split()[0] + " at " + sys.executable,
    }}))
    sys.exit(1)

from {entry} import main  # noqa: E402

sys.exit(main())
'''


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("policy-agent")
    except Exception:  # not installed as a distribution (e.g. a source checkout)
        return "0+unknown"


_OUR_PACKAGES = ("cni_shim", "policy_agent")
ENTRY_MODULE = "cni_shim.__main__"


def _module_file(name: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(path: str, module: str) -> set[str]:
    """Absolute names of every module imported anywhere in the file (also inside functions)."""
    import ast

    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # maybe submodules; kept if they exist
    return names


def module_closure(entry: str = ENTRY_MODULE) -> tuple[dict[str, str], set[str]]:
    """Our modules the entry module can import ({name: file}, with parent packages), and the
    top-level names of anything imported that is neither ours nor the standard library."""
    found: dict[str, str] = {}
    foreign: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        top = name.split(".")[0]
        if top not in _OUR_PACKAGES:
            if top != "__future__" and top not in sys.stdlib_module_names:
                foreign.add(top)
            continue
        path = _module_file(name)
        if path is None:
            if name == entry:
                raise InstallError(f"the shim's entry module {entry} is missing from this image")
            continue  # "from pkg import name" where name is not a module
        found[name] = path
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
        todo.extend(_imports(path, name))
    return found, foreign


def _source_files(entry: str = ENTRY_MODULE) -> list[tuple[str, bytes]]:
    """(archive name, bytes) of the executable's modules, sorted. Refuses heavy imports."""
    found, foreign = module_closure(entry)
    if foreign:
        raise InstallError(
            f"{entry} imports {', '.join(sorted(foreign))}, which is not in the standard library; "
            "the CNI executable runs on the host's bare python3"
        )
    out = []
    for name, path in found.items():
        arc = name.replace(".", "/") + ("/__init__.py" if os.path.basename(path) == "__init__.py" else ".py")
        with open(path, "rb") as f:
            out.append((arc, f.read()))
    return sorted(out)


def build_executable(python: str = DEFAULT_PYTHON, version: str | None = None, entry: str = ENTRY_MODULE,
                     launcher: str = "") -> bytes:
    """The executable's bytes: '#!<python> -I' (or '#!<launcher>') + a deterministic zip.

    -I (isolated mode) keeps PYTHONPATH and user site-packages of the runtime's
    environment out of a program that runs as root on the host; a bundled runtime's
    launcher passes -IS itself.
    """
    if launcher:
        python = launcher
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise InstallError(f"--python {python!r} must be an absolute path without spaces")
    buf = io.BytesIO()
    files = _source_files(entry)
    bootstrap = _BOOTSTRAP.format(
        min_version=MIN_HOST_PYTHON, min_text=".".join(map(str, MIN_HOST_PYTHON)), entry=entry)
    files.append(("__main__.py", bootstrap.encode()))
    meta = {"version": version or _package_version(), "minPython": ".".join(map(str, MIN_HOST_PYTHON))}
    files.append((MARKER, (json.dumps(meta, sort_keys=True) + "\n").encode()))
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=9)
    return (f"#!{launcher}\n" if launcher else f"#!{python} -I\n").encode() + buf.getvalue()


def is_our_executable(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return MARKER in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


# --- the conflist ------------------------------------------------------------------

def default_conflist() -> dict:
    from policy_agent.shared.endpoint import DEFAULT_ENDPOINT_DIR, DEFAULT_STATUS_DIR

    return {
        "cniVersion": "1.0.0",
        "name": "vpcip",
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                "ipamSocket": "/run/vpcip/ipamd.sock",
                "vethPrefix": "eni",
                "mtu": 9001,
                "endpointDir": DEFAULT_ENDPOINT_DIR,
                "statusDir": DEFAULT_STATUS_DIR,
                "policyWaitSeconds": 0,
            }
        ],
    }


def validate_conflist(conf: object, origin: str) -> dict:
    """Check the shape, then let the shim's own parser judge our plugin's fields."""
    if not isinstance(conf, dict):
        raise InstallError(f"{origin}: the conflist must be a JSON object")
    plugins = conf.get("plugins")
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        raise InstallError(f"{origin}: field 'plugins' must be a non-empty list of objects")
    if plugins[0].get("type") != PLUGIN_TYPE:
        raise InstallError(f"{origin}: plugins[0].type must be {PLUGIN_TYPE!r}, not {plugins[0].get('type')!r}")
    for i, p in enumerate(plugins):
        if not isinstance(p.get("type"), str) or not p["type"]:
            raise InstallError(f"{origin}: plugins[{i}] lacks field 'type'")
    try:
        from cni_shim.protocol import CNIError, parse_netconf
    except ImportError:  # the protocol module is the shim's; without it we check the shape only
        return conf
    try:
        parse_netconf(json.dumps(conf), "ADD", "", "")
    except CNIError as exc:
        raise InstallError(f"{origin}: {exc.msg}") from None
    return conf


def _read_cni_config(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _plugins(conf: dict) -> list[dict]:
    if isinstance(conf.get("plugins"), list):
        return [p for p in conf["plugins"] if isinstance(p, dict)]
    return [conf]  # a single-plugin .conf


def is_our_config(path: str) -> bool:
    conf = _read_cni_config(path)
    if conf is None:
        return False
    plugins = _plugins(conf)
    return bool(plugins) and plugins[0].get("type") == PLUGIN_TYPE


def render_conflist(conf: dict) -> bytes:
    return (json.dumps(conf, indent=2) + "\n").encode()


# --- file operations ---------------------------------------------------------------

def write_atomic(path: str, data: bytes, mode: int) -> bool:
    """Replace path with data unless it already has these bytes and mode. True if written."""
    try:
        st = os.stat(path)
        if (st.st_mode & 0o7777) == mode and st.st_size == len(data):
            with open(path, "rb") as f:
                if f.read() == data:
                    return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, mode, sync_dir=True)
    return True


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def cni_config_files(conf_dir: str) -> list[str]:
    """Config file names in the order libcni considers them (by name)."""
    try:
        names = os.listdir(conf_dir)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names
        if n.endswith(CONFIG_EXTENSIONS) and not n.startswith(".") and os.path.isfile(os.path.join(conf_dir, n))
    )


# --- the host's python ------------------------------------------------------------

def _resolve_in_root(root: str, path: str, depth: int = 0) -> str | None:
    """path (absolute, as the host sees it) with every symlink resolved inside root;
    None if it does not exist. Absolute link targets are host paths, hence under root."""
    parts = [p for p in path.split("/") if p]
    resolved = "/"
    for i, part in enumerate(parts):
        candidate = os.path.normpath(os.path.join(resolved, part)) if part != ".." else os.path.dirname(resolved)
        local = _under(root, candidate)
        if os.path.islink(local):
            if depth > 40:
                return None
            target = os.readlink(local)
            rest = "/".join(parts[i + 1:])
            base = target if target.startswith("/") else os.path.join(resolved, target)
            return _resolve_in_root(root, os.path.normpath(os.path.join(base, rest)), depth + 1)
        if not os.path.lexists(local):
            return None
        resolved = candidate
    return resolved


def host_python_version(root: str, python: str) -> tuple[int, int] | None:
    """(major, minor) of the host's interpreter at <root><python>, judged without running it
    (its libraries are the host's, not ours): the resolved file name python3.N, else the one
    stdlib directory <prefix>/lib*/python3.N/ beside it. None if absent or undecidable."""
    import glob
    import re

    real = _resolve_in_root(root, python)
    if real is None or not os.path.isfile(_under(root, real)):
        return None
    m = re.fullmatch(r"python(\d+)\.(\d+)", os.path.basename(real))
    if m:
        return int(m.group(1)), int(m.group(2))
    prefix = os.path.dirname(os.path.dirname(real))
    found = {
        (int(m.group(1)), int(m.group(2)))
        for d in glob.glob(os.path.join(_under(root, prefix), "lib*", "python3.*", "os.py"))
        for m in [re.search(r"python(\d+)\.(\d+)/os\.py$", d)] if m
    }
    return found.pop() if len(found) == 1 else None


def choose_host_runtime(host_runtime: str, root: str, python: str) -> str:
    """'system' or 'bundled' for --host-runtime auto|system|bundled."""
    if host_runtime not in HOST_RUNTIMES:
        raise InstallError(f"--host-runtime must be one of {', '.join(HOST_RUNTIMES)}, not {host_runtime!r}")
    if host_runtime != "auto":
        return host_runtime
    from cni_shim import runtime_bundle

    found = host_python_version(root, python)
    choice = "system" if found is not None and found >= MIN_HOST_PYTHON else "bundled"
    if choice == "bundled" and not runtime_bundle.supported():
        # Before the bundle existed every node ran the host's python3; keep that where we cannot bundle.
        log.warning("cni_host_runtime_bundle_unsupported machine=%s fallback=system host_python=%s",
                    os.uname().machine, python)
        choice = "system"
    log.info("cni_host_runtime_chosen runtime=%s host_python=%s found=%s", choice, python,
             ".".join(map(str, found)) if found else "none")
    return choice


def _search_path() -> list[str]:
    """Where this image's cni_shim and policy_agent packages live (for the bundle's probe)."""
    import cni_shim
    import policy_agent

    return sorted({os.path.dirname(os.path.dirname(os.path.abspath(p.__file__))) for p in (cni_shim, policy_agent)})


# --- install / uninstall -----------------------------------------------------------

@dataclass
class Report:
    host_runtime: str = "system"
    bundle: str = ""  # the bundle directory the executable uses (host path below --root), if any
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    merged_plugins: list[str] = field(default_factory=list)
    dropped_plugins: list[str] = field(default_factory=list)


def plan_conflist(conf: dict, conf_dir: str, bin_dir: str, name: str, on_foreign: str) -> tuple[dict, list[str], list[str]]:
    """Our conflist after looking at the foreign configs; (conflist, merged, dropped)."""
    if on_foreign not in ON_FOREIGN:
        raise InstallError(f"--on-foreign must be one of {', '.join(ON_FOREIGN)}, not {on_foreign!r}")
    foreign = [n for n in cni_config_files(conf_dir) if not is_our_config(os.path.join(conf_dir, n))]
    if not foreign:
        return conf, [], []
    where = ", ".join(os.path.join(conf_dir, n) for n in foreign)
    if on_foreign == "refuse":
        raise InstallError(
            f"another CNI is configured on this node ({where}); nothing was changed. "
            "Remove it, or run the installer with --on-foreign merge (keep its portmap/bandwidth/tuning) "
            "or --on-foreign override; for policy only, do not install the shim at all"
        )
    if not name < foreign[0]:
        raise InstallError(
            f"our conflist {name!r} would sort after {foreign[0]!r}, so the runtime would keep using that one; "
            f"choose a --name that sorts first (e.g. 00-vpcip.conflist)"
        )
    if on_foreign == "override":
        return conf, [], []
    active = _read_cni_config(os.path.join(conf_dir, foreign[0]))
    if active is None:
        raise InstallError(f"{os.path.join(conf_dir, foreign[0])}: not a JSON object, cannot merge its plugins")
    out = json.loads(json.dumps(conf))  # deep copy
    have = {p.get("type") for p in out["plugins"]}
    merged: list[str] = []
    dropped: list[str] = []
    for p in _plugins(active)[1:]:
        ptype = p.get("type")
        if ptype in MERGEABLE_PLUGINS and ptype not in have and os.path.isfile(os.path.join(bin_dir, ptype)):
            out["plugins"].append(p)
            have.add(ptype)
            merged.append(ptype)
        elif ptype not in have:
            dropped.append(str(ptype))
    return out, merged, dropped


def install(
    root: str = "/",
    bin_dir: str = DEFAULT_BIN_DIR,
    conf_dir: str = DEFAULT_CONF_DIR,
    conflist: dict | None = None,
    name: str = DEFAULT_CONFLIST_NAME,
    on_foreign: str = "refuse",
    python: str = DEFAULT_PYTHON,
    host_runtime: str = "system",
) -> Report:
    """Install; host_runtime defaults to "system" here (the explicit --python contract),
    the command line defaults to "auto"."""
    from cni_shim import runtime_bundle

    if not name.endswith(".conflist") or "/" in name or name.startswith("."):
        raise InstallError(f"--name {name!r} must be a plain file name ending in .conflist")
    bdir, cdir = _under(root, bin_dir), _under(root, conf_dir)
    conf = validate_conflist(conflist if conflist is not None else default_conflist(), "conflist")
    # Decide everything before the first write: a refusal leaves the node untouched.
    conf, merged, dropped = plan_conflist(conf, cdir, bdir, name, on_foreign)
    runtime = choose_host_runtime(host_runtime, root, python)
    exe_path = os.path.join(bdir, EXECUTABLE_NAME)
    bundle = None
    if runtime == "bundled":
        try:
            bundle = runtime_bundle.build(os.path.join(bin_dir, EXECUTABLE_NAME), _search_path())
        except runtime_bundle.BundleError as exc:
            raise InstallError(f"--host-runtime=bundled: {exc}") from None
        exe = build_executable(launcher=bundle.shebang_interpreter)
    else:
        exe = build_executable(python)
    report = Report(host_runtime=runtime, bundle=bundle.dirname if bundle else "",
                    merged_plugins=merged, dropped_plugins=dropped)
    os.makedirs(bdir, exist_ok=True)
    os.makedirs(cdir, exist_ok=True)
    # Order: the bundle, then the executable naming it, then the conflist naming that.
    previous = runtime_bundle.target_of(exe_path)
    bundles = exe_path + runtime_bundle.BUNDLE_DIR_SUFFIX
    if bundle is not None:
        try:
            written = runtime_bundle.write(bundle, bundles, _search_path())
        except runtime_bundle.BundleError as exc:
            raise InstallError(f"--host-runtime=bundled: {exc}") from None
        (report.changed if written else report.unchanged).append(os.path.join(bundles, bundle.ident))
    for path, data, mode in (
        (exe_path, exe, 0o755),
        (os.path.join(cdir, name), render_conflist(conf), 0o644),
    ):
        (report.changed if write_atomic(path, data, mode) else report.unchanged).append(path)
    # Keep the bundle the previous executable named: a CNI call started before the rename
    # may still be loading from it. It goes at the next run.
    keep = {previous} | ({bundle.ident} if bundle else set())
    report.removed.extend(runtime_bundle.prune(bundles, keep))
    for other in cni_config_files(cdir):
        path = os.path.join(cdir, other)
        if other != name and is_our_config(path):
            os.unlink(path)
            report.removed.append(path)
    if report.removed:
        fsync_dir(cdir)
    return report


def uninstall(root: str = "/", bin_dir: str = DEFAULT_BIN_DIR, conf_dir: str = DEFAULT_CONF_DIR) -> Report:
    """Remove our conflists, then our executable; foreign files stay."""
    bdir, cdir = _under(root, bin_dir), _under(root, conf_dir)
    report = Report()
    for n in cni_config_files(cdir):
        path = os.path.join(cdir, n)
        if is_our_config(path):
            os.unlink(path)
            report.removed.append(path)
    exe = os.path.join(bdir, EXECUTABLE_NAME)
    if is_our_executable(exe):
        os.unlink(exe)
        report.removed.append(exe)
    elif os.path.exists(exe):
        log.warning("uninstall_kept_foreign_executable path=%s", exe)
    from cni_shim import runtime_bundle

    report.removed.extend(runtime_bundle.prune(exe + runtime_bundle.BUNDLE_DIR_SUFFIX, set()))
    return report


# --- command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cni_shim.install", description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/", help="where the host's file system is mounted (e.g. /host)")
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="CNI binary dir on the host")
    p.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="CNI config dir on the host")
    p.add_argument("--conflist", default="", metavar="FILE",
                   help="our conflist (JSON, first plugin type vpcip-cni); default: built in")
    p.add_argument("--name", default=DEFAULT_CONFLIST_NAME, help="file name of our conflist")
    p.add_argument("--on-foreign", choices=ON_FOREIGN, default="refuse",
                   help="what to do when another CNI config exists (default: refuse)")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="the host's python3 (shebang of the executable)")
    p.add_argument("--host-runtime", choices=HOST_RUNTIMES, default="auto",
                   help="who runs vpcip-cni on the host: the host's python3 >= 3.9 (system), a runtime "
                        "copied from this image to <bin-dir>/vpcip-cni.d (bundled), or system if the "
                        "host has such a python, else bundled (auto, default)")
    p.add_argument("--uninstall", action="store_true", help="remove our conflist(s) and executable")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.uninstall:
            report = uninstall(args.root, args.bin_dir, args.conf_dir)
            log.info("cni_uninstalled removed=%s", ",".join(report.removed) or "-")
            return 0
        conflist = None
        if args.conflist:
            try:
                with open(args.conflist) as f:
                    conflist = json.load(f)
            except OSError as exc:
                raise InstallError(f"--conflist {args.conflist}: cannot read: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise InstallError(f"--conflist {args.conflist}: not valid JSON: {exc}") from None
            validate_conflist(conflist, args.conflist)
        report = install(args.root, args.bin_dir, args.conf_dir, conflist, args.name, args.on_foreign, args.python,
                         args.host_runtime)
    except InstallError as exc:
        log.error("cni_install_failed error=%s", exc)
        return 2
    log.info(
        "cni_installed version=%s host_runtime=%s changed=%s unchanged=%s removed=%s merged_plugins=%s "
        "dropped_plugins=%s",
        _package_version(),
        report.host_runtime,
        ",".join(report.changed) or "-",
        ",".join(report.unchanged) or "-",
        ",".join(report.removed) or "-",
        ",".join(report.merged_plugins) or "-",
        ",".join(report.dropped_plugins) or "-",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
