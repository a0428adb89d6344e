"""A self-contained Python runtime for `vpcip-cni` on hosts without python3 (Bottlerocket).

Stdlib only; runs in our image, inside the installer. It copies the installer's own
interpreter next to the executable, with what it needs and nothing the host provides:

  <bin-dir>/vpcip-cni.d/<id>/
    launch                    a 200-byte static ELF, the shebang interpreter of vpcip-cni
    bin/python3               the interpreter ELF (unchanged)
    libs/                     its dynamic loader and shared libraries (from `ld.so --list`),
                              and those of the extension modules below
    <platlibdir>/pythonX.Y/   the standard-library modules the executable imports (traced,
                              see _PROBE), as sourceless .pyc, plus lib-dynload/*.so
    MANIFEST.json             the sha256 of every file above (checked on every install)

Why a launcher: the kernel runs a shebang interpreter with at most one argument, and the
bundled python must be started by the *bundled* loader with `--library-path` (the host's
loader and libc, if any, are of another version). `launch` turns
  launch <script> ARGS  into  libs/ld.so --library-path libs bin/python3 -IS <script> ARGS
with one execve, so no shell, no libc and no python of the host is used. It is generated
here (x86-64 machine code, listed below) because the image has no compiler.

<id> is a hash of everything the bundle is made from (its files' sources and the host
path it is installed at), so a new image gives a new directory, built beside the old one
and renamed into place; the executable is switched afterwards (cni_shim.install).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

BUNDLE_DIR_SUFFIX = ".d"  # vpcip-cni -> vpcip-cni.d
MANIFEST = "MANIFEST.json"
MANIFEST_KIND = "vpcip-cni-runtime"
LAUNCHER = "launch"
PYTHON = "bin/python3"
LIBS = "libs"
SHEBANG_MAX = 127  # BINPRM_BUF_SIZE was 128 before Linux 5.1
# Python flags: -I (ignore PYTHON* env and user site), -S (no site: nothing there is ours).
PYTHON_FLAGS = "-IS"


class BundleError(Exception):
    """The bundle cannot be built here; the message says why."""


# --- the launcher ----------------------------------------------------------------------

def _lea_rip(reg: int, disp: int) -> bytes:
    """lea r64, [rip+disp32] for rax(0), rsi(6), rdi(7)."""
    return bytes([0x48, 0x8D, 0x05 | (reg << 3)]) + struct.pack("<i", disp)


def launcher_elf(loader: str, libdir: str, python: str, flags: str = PYTHON_FLAGS) -> bytes:
    """A static x86-64 ELF that execs `loader --library-path libdir python flags argv[1:]`.

    The kernel starts a shebang interpreter with argv = [launch, script, args...]. We write
    the five fixed pointers just below argv[1] on the stack (the last one over argv[0]),
    so the new argv is [loader, "--library-path", libdir, python, flags, script, args...,
    NULL] and the environment is passed through unchanged. If execve fails, a CNI error
    (code 50) goes to stdout and the exit code is 127.

        mov   rcx, [rsp]              ; argc
        lea   rdx, [rsp+rcx*8+16]     ; envp
        lea   rsi, [rsp-24]           ; new argv: 5 slots ending at argv[0]
        lea   rax, [rip+s0] ; mov [rsi], rax       ... 5 times, s0..s4
        lea   rdi, [rip+s0]
        mov   eax, 59                 ; execve(loader, new argv, envp)
        syscall
        mov   edi, 1 ; lea rsi, [rip+err] ; mov edx, len ; mov eax, 1 ; syscall   ; write
        mov   edi, 127 ; mov eax, 231 ; syscall                                  ; exit_group
    """
    strings = [s.encode() + b"\0" for s in (loader, "--library-path", libdir, python, flags)]
    err = json.dumps({
        "cniVersion": "1.0.0", "code": 50,
        "msg": f"vpcip-cni: cannot execute the bundled runtime {loader}",
        "details": "reinstall with python -m cni_shim.install (--host-runtime=bundled)",
    }).encode() + b"\n"
    base, hdr = 0x400000, 64 + 56
    # Code with placeholder displacements first, to learn its length.
    def code(offsets: list[int], err_off: int) -> bytes:
        c = bytearray(b"\x48\x8b\x0c\x24" b"\x48\x8d\x54\xcc\x10" b"\x48\x8d\x74\x24\xe8")
        stores = [b"\x48\x89\x06", b"\x48\x89\x46\x08", b"\x48\x89\x46\x10", b"\x48\x89\x46\x18", b"\x48\x89\x46\x20"]
        for off, store in zip(offsets, stores):
            c += _lea_rip(0, off - (hdr + len(c) + 7)) + store
        c += _lea_rip(7, offsets[0] - (hdr + len(c) + 7))
        c += b"\xb8\x3b\x00\x00\x00\x0f\x05"
        c += b"\xbf\x01\x00\x00\x00"
        c += _lea_rip(6, err_off - (hdr + len(c) + 7))
        c += b"\xba" + struct.pack("<I", len(err)) + b"\xb8\x01\x00\x00\x00\x0f\x05"
        c += b"\xbf\x7f\x00\x00\x00\xb8\xe7\x00\x00\x00\x0f\x05"
        return bytes(c)

    n = len(code([0] * 5, 0))
    offsets, pos = [], hdr + n
    for s in strings:
        offsets.append(pos)
        pos += len(s)
    body = code(offsets, pos) + b"".join(strings) + err
    size = hdr + len(body)
    ehdr = b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + hdr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + body


def supported() -> bool:
    """True if this machine and interpreter can be bundled (the launcher is x86-64 code)."""
    try:
        python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
        return os.uname().machine == "x86_64" and elf_machine(python) == 0x3E
    except OSError:
        return False


# --- ELF facts and shared libraries -----------------------------------------------------

def elf_interpreter(path: str) -> str:
    """PT_INTERP of a 64-bit little-endian ELF ('' if static)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise BundleError(f"{path}: not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            ptype, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if ptype == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(filesz).rstrip(b"\0").decode()
    return ""


def elf_machine(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    return struct.unpack_from("<H", head, 18)[0]


def shared_libraries(loader: str, path: str) -> dict[str, str]:
    """{soname: real file} the loader resolves for path (what ldd prints), vdso excluded."""
    proc = subprocess.run([loader, "--list", path], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BundleError(f"{loader} --list {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, sep, rest = line.strip().partition(" => ")
        if sep:
            target = rest.rpartition(" (")[0].strip()
            if not target or target == "not found":
                raise BundleError(f"{path}: shared library {name} not found")
            out[name] = os.path.realpath(target)
    return out


# --- which standard-library modules the executable uses --------------------------------

# Runs the executable's code paths in a fresh interpreter (-I -S, as on the host) and prints
# the files of the modules that got imported. The paths: VERSION, ADD/CHECK/DEL/STATUS with
# bad input, ADD and DEL with no daemon (the client's socket path), max-pods; the daemon's
# answer is decoded by json, which these already import. The interpreter runs a zipapp
# through runpy and zipimport (deflate: zlib). Optional accelerators that would pull large
# libraries (OpenSSL for _hashlib, libbz2, liblzma) are blocked here, and so left out: their
# callers fall back (hashlib to its builtin sha1/sha224) or never use them (shutil).
OPTIONAL_LEFT_OUT = ("_hashlib", "_bz2", "bz2", "_lzma", "lzma", "_ssl", "ssl")
_PROBE = r'''
import io, json, os, sys
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None
sys.path[:0] = json.loads(sys.argv[1])
import contextlib, runpy, zipimport, zlib
from cni_shim import __main__ as m
base = {"CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
        "CNI_ARGS": "K8S_POD_NAMESPACE=n;K8S_POD_NAME=p;K8S_POD_UID=u"}
conf = {"cniVersion": "1.0.0", "name": "n", "type": "vpcip-cni", "ipamSocket": "/nonexistent/s",
        "endpointDir": "/nonexistent/e", "statusDir": "/nonexistent/s"}
runs = [("VERSION", "{}"), ("ADD", "{"), ("ADD", "[]"), ("ADD", json.dumps(conf)), ("DEL", json.dumps(conf)),
        ("CHECK", json.dumps(dict(conf, prevResult={"ips": [{"address": "10.0.0.1/32"}]}))),
        ("STATUS", json.dumps(dict(conf, cniVersion="1.1.0"))), ("GC", json.dumps(dict(conf, cniVersion="1.1.0")))]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for cmd, stdin in runs:
        m.run(dict(base, CNI_COMMAND=cmd), stdin)
    m.max_pods_cmd(["--instance-type", "m5.large"])
    "x".encode("latin-1"); "x".encode("ascii")
print(json.dumps(sorted({getattr(mod, "__file__", None) or "" for mod in list(sys.modules.values())} - {""})))
'''


@dataclass(frozen=True)
class Source:
    """One file of the bundle: where it goes, where it comes from, how it is made."""

    arc: str
    path: str
    kind: str  # "copy" (bytes as they are) or "pyc" (compiled, sourceless)
    mode: int


def _stdlib_dirs() -> tuple[str, str]:
    paths = sysconfig.get_paths()
    stdlib = os.path.realpath(paths["stdlib"])
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(paths["platstdlib"], "lib-dynload")
    return stdlib, os.path.realpath(dynload)


def traced_modules(search_path: list[str]) -> list[str]:
    """Files of the stdlib modules the executable's code paths import (probe subprocess)."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, json.dumps(search_path),
                           json.dumps(OPTIONAL_LEFT_OUT)],
                          capture_output=True, text=True, timeout=120, env={"PATH": os.defpath})
    if proc.returncode != 0:
        raise BundleError(f"tracing the executable's imports failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def plan(bundle_root: str, search_path: list[str]) -> tuple[list[Source], dict[str, str]]:
    """Every file of the bundle, and the host paths the launcher uses."""
    python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    machine = elf_machine(python)
    if machine != 0x3E:
        raise BundleError(
            f"the bundled runtime supports x86-64 only (this image's python is ELF machine {machine:#x}); "
            "use --host-runtime=system with a python3 >= 3.9 on the node")
    loader = elf_interpreter(python)
    if not loader:
        raise BundleError(f"{python} has no ELF interpreter (static); not supported")
    stdlib, dynload = _stdlib_dirs()
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    libdir = f"{sys.platlibdir}/{ver}"
    out = [Source(PYTHON, python, "copy", 0o755)]
    elves = [python]
    files = set(traced_modules(search_path))
    # The whole encodings package: stdio may need any codec the host's locale names.
    encodings = os.path.join(stdlib, "encodings")
    files.update(os.path.join(encodings, n) for n in os.listdir(encodings) if n.endswith(".py"))
    for f in sorted(files):
        real = os.path.realpath(f)
        if real.startswith(dynload + os.sep):
            out.append(Source(f"{libdir}/lib-dynload/{os.path.basename(real)}", real, "copy", 0o755))
            elves.append(real)
        elif real.startswith(stdlib + os.sep) and real.endswith(".py"):
            rel = os.path.relpath(real, stdlib)
            if rel.split(os.sep)[0] in ("site-packages", "dist-packages"):
                continue  # ours (resolved from the search path), bundled inside the zipapp
            out.append(Source(f"{libdir}/{rel[:-3]}.pyc", real, "pyc", 0o644))
        elif not any(real.startswith(os.path.realpath(p) + os.sep) for p in search_path):
            raise BundleError(f"the executable imports {f}, which is outside the standard library")
    libs: dict[str, str] = {}
    for elf in elves:
        libs.update(shared_libraries(loader, elf))
    libs[os.path.basename(loader)] = os.path.realpath(loader)
    out.extend(Source(f"{LIBS}/{name}", path, "copy", 0o755) for name, path in sorted(libs.items()))
    root = os.path.join(bundle_root, "%s")  # filled with the bundle id by the caller
    return sorted(out, key=lambda s: s.arc), {
        "loader": f"{root}/{LIBS}/{os.path.basename(loader)}", "libs": f"{root}/{LIBS}", "python": f"{root}/{PYTHON}",
    }


def _pyc(path: str, arc: str) -> bytes:
    """Sourceless, unchecked-hash pyc (PEP 552): valid without its source, no mtime inside."""
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, arc, "exec", dont_inherit=True, optimize=0)
    return importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b01) + importlib.util.source_hash(source) + marshal.dumps(code)


@dataclass
class Bundle:
    """A planned bundle: its id, its files (arc -> (bytes, mode)) and the launcher paths."""

    ident: str
    dirname: str  # host path of vpcip-cni.d/<id>
    files: dict[str, tuple[bytes, int]]

    @property
    def shebang_interpreter(self) -> str:
        return f"{self.dirname}/{LAUNCHER}"


def build(exe_host_path: str, search_path: list[str]) -> Bundle:
    """Plan and read the bundle for an executable installed at exe_host_path (a host path)."""
    bundle_root = exe_host_path + BUNDLE_DIR_SUFFIX
    sources, paths = plan(bundle_root, search_path)
    h = hashlib.sha256(f"{sys.version}\n{bundle_root}\n{PYTHON_FLAGS}\n".encode())
    files: dict[str, tuple[bytes, int]] = {}
    for s in sources:
        with open(s.path, "rb") as f:
            data = f.read()
        h.update(f"{s.arc}\0{s.kind}\0{s.mode:o}\0{len(data)}\0".encode() + data)
        files[s.arc] = (_pyc(s.path, s.arc) if s.kind == "pyc" else data, s.mode)
    ident = h.hexdigest()[:16]
    dirname = f"{bundle_root}/{ident}"
    shebang = f"#!{dirname}/{LAUNCHER}"
    if len(shebang) > SHEBANG_MAX or any(c.isspace() for c in shebang):
        raise BundleError(f"{shebang!r} is longer than {SHEBANG_MAX} bytes or has spaces; choose a shorter --bin-dir")
    files[LAUNCHER] = (launcher_elf(paths["loader"] % ident, paths["libs"] % ident, paths["python"] % ident), 0o755)
    manifest = {"kind": MANIFEST_KIND, "id": ident, "python": sys.version.split()[0],
                "files": {arc: hashlib.sha256(d).hexdigest() for arc, (d, _) in sorted(files.items())}}
    files[MANIFEST] = ((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    return Bundle(ident, dirname, files)


# --- on disk -------------------------------------------------------------------------

def read_manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("kind") == MANIFEST_KIND else None


def verify(directory: str) -> bool:
    """True if directory holds exactly a complete bundle as its manifest lists it."""
    m = read_manifest(directory)
    if m is None or not isinstance(m.get("files"), dict):
        return False
    for arc, digest in m["files"].items():
        try:
            with open(os.path.join(directory, arc), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return False
        except OSError:
            return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def self_check(directory: str, search_path: list[str]) -> None:
    """Run the probe on the bundle's own interpreter, loader and libraries (as the launcher
    would, from wherever the bundle lies now): every module the executable's code paths
    import must come from the bundle (or be ours, from search_path)."""
    m = read_manifest(directory) or {}
    loader = [a for a in m.get("files", {}) if a.startswith(f"{LIBS}/ld-")]
    if len(loader) != 1:
        raise BundleError(f"{directory}: no dynamic loader in the bundle")
    argv = [os.path.join(directory, loader[0]), "--library-path", os.path.join(directory, LIBS),
            os.path.join(directory, PYTHON), PYTHON_FLAGS, "-c", _PROBE, json.dumps(search_path), "[]"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={})
    except OSError as exc:
        raise BundleError(f"the bundled runtime in {directory} cannot run here: {exc}") from None
    if proc.returncode != 0:
        raise BundleError(f"the bundled runtime in {directory} failed its check: {proc.stderr.strip()[-2000:]}")
    allowed = [os.path.realpath(directory)] + [os.path.realpath(p) for p in search_path]
    outside = [f for f in json.loads(proc.stdout)
               if not any(os.path.realpath(f).startswith(a + os.sep) for a in allowed)]
    if outside:
        raise BundleError(f"the bundled runtime in {directory} loaded files from outside it: {outside[:5]}")


def write(bundle: Bundle, local_root: str, search_path: list[str]) -> bool:
    """Make local_root/<id> hold the bundle. Built in a hidden temp dir, checked (self_check)
    and renamed into place, so the directory a launcher names is complete or absent.
    True if written."""
    final = os.path.join(local_root, bundle.ident)
    if verify(final):
        return False
    os.makedirs(local_root, exist_ok=True)
    tmp = os.path.join(local_root, f".tmp-{bundle.ident}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for arc, (data, mode) in sorted(bundle.files.items()):
            path = os.path.join(tmp, arc)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)  # umask-independent
                os.fsync(fd)
            finally:
                os.close(fd)
        for d, _, _ in os.walk(tmp):
            os.chmod(d, 0o755)
        self_check(tmp, search_path)
        if os.path.lexists(final):  # a damaged copy: move it aside, then swap
            aside = os.path.join(local_root, f".old-{bundle.ident}-{os.getpid()}")
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(local_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def target_of(exe_path: str) -> str:
    """The bundle id an installed executable's shebang names ('' if none)."""
    try:
        with open(exe_path, "rb") as f:
            line = f.readline(SHEBANG_MAX + 2)
    except OSError:
        return ""
    if not line.startswith(b"#!") or not line.rstrip().endswith(f"/{LAUNCHER}".encode()):
        return ""
    parts = line[2:].strip().decode(errors="replace").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def prune(local_root: str, keep: set[str]) -> list[str]:
    """Remove bundles (and leftover temp dirs) not in keep; the root too if it ends empty."""
    removed = []
    try:
        names = sorted(os.listdir(local_root))
    except FileNotFoundError:
        return removed
    for n in names:
        path = os.path.join(local_root, n)
        if n in keep or not os.path.isdir(path) or os.path.islink(path):
            continue
        if n.startswith((".tmp-", ".old-")) or read_manifest(path) is not None:
            shutil.rmtree(path)
            removed.append(path)
    if not os.listdir(local_root):
        os.rmdir(local_root)
        removed.append(local_root)
    return removed


def size(directory: str) -> int:
    total = 0
    for d, _, names in os.walk(directory):
        total += sum(os.lstat(os.path.join(d, n)).st_size for n in names)
    return total
