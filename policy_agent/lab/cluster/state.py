"""The cluster's record of everything it made (<work>/state.json), and teardown from it.

Every resource is recorded before anything relies on it and the file is rewritten
atomically (fsync, rename) at each record, so ``teardown`` works from the file alone after a
crash of ``up``, of this process or of the cluster's processes. Kinds (see
docs/cluster.md): pid, mount, cgroup, netns, path, node, plus plain facts (info).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

KINDS = ("pid", "mount", "cgroup", "netns", "path", "node", "info")
CGROUP_ROOT = "/sys/fs/cgroup"


class StateError(RuntimeError):
    """A state file or a lock the user must know about."""


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): a pid plus this names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, start: int | None) -> bool:
    """The process ``pid`` started at ``start`` (None: any) still runs (reaps our own zombies)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


class State:
    """state.json under ``work``: an ordered list of {"kind", "value"} records."""

    def __init__(self, work: Path) -> None:
        self.work = Path(work)
        self.path = self.work / "state.json"
        self._lock = threading.Lock()
        self.records: list[dict] = []
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text())["records"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StateError(f"{self.path}: unreadable state file ({exc}); remove what it lists by hand") from None

    def exists(self) -> bool:
        return self.path.exists()

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".state.json.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "w") as f:
            json.dump({"records": self.records}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def record(self, kind: str, value) -> None:
        """Append one resource and save at once (thread-safe)."""
        if kind not in KINDS:
            raise StateError(f"state record: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        if kind == "pid":
            pid = int(value["pid"] if isinstance(value, dict) else value)
            name = value.get("name", "") if isinstance(value, dict) else ""
            value = {"pid": pid, "name": name, "start": proc_start_time(pid)}
        with self._lock:
            self.records.append({"kind": kind, "value": value})
            self.save()

    def values(self, kind: str) -> list:
        with self._lock:
            return [r["value"] for r in self.records if r["kind"] == kind]

    def info(self) -> dict:
        out: dict = {}
        for v in self.values("info"):
            out.update(v)
        return out


@contextlib.contextmanager
def locked(work: Path, what: str):
    """One up/down at a time per work area; a second one fails at once, clearly."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(work / ".lock").read_text().strip()
            raise StateError(f"cluster {what}: another `cluster.sh` is running on {work} ({holder or 'pid unknown'}); "
                             "wait for it or run `cluster.sh down`") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({what})\n".encode())
        yield
    finally:
        os.close(fd)


# --- teardown ------------------------------------------------------------------------


def mounts() -> list[str]:
    """Mount points of this (root) mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            out.append(line.split()[4].replace("\\040", " "))
    return out


def kill_pids(entries: list[dict], grace: float = 5.0) -> list[int]:
    """SIGTERM, wait up to ``grace``, SIGKILL: only processes whose start time still matches."""
    live = [(e["pid"], e.get("start")) for e in entries if pid_alive(e["pid"], e.get("start"))]
    for pid, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p, s) for p, s in live):
        time.sleep(0.05)
    for pid, start in live:
        if pid_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p, s) for p, s in live):
        time.sleep(0.05)
    return [p for p, _ in live]


def _check_cgroup(path: str) -> str:
    real = os.path.realpath(path)
    rel = os.path.relpath(real, CGROUP_ROOT)
    # <hierarchy>/<our top cgroup>[/...]: never a hierarchy root.
    if rel.startswith("..") or len(Path(rel).parts) < 2:
        raise StateError(f"refusing cgroup {path!r}: not below a hierarchy of {CGROUP_ROOT}")
    return real


def kill_cgroup(path: str) -> None:
    """Kill every process left in ``path`` and below (they were started by our runtime)."""
    path = _check_cgroup(path)
    for _ in range(3):
        pids = []
        for dirpath, _dirs, _files in os.walk(path):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
        if not pids:
            return
        kill_pids([{"pid": p, "start": proc_start_time(p)} for p in set(pids)], grace=2.0)


def remove_cgroup(path: str) -> None:
    """rmdir depth-first (cgroupfs directories hold only kernel files)."""
    if not os.path.isdir(path):
        return
    path = _check_cgroup(path)
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        for attempt in range(20):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == 19:
                    raise
                time.sleep(0.1)


def remove_path(path: str) -> None:
    """rm -rf, refusing to descend into a mount (a bind mount would delete its source)."""
    p = os.path.realpath(path)
    if p in ("/", "") or len(Path(p).parts) < 3:
        raise StateError(f"refusing to remove {path!r}: too close to /")
    below = [m for m in mounts() if m == p or m.startswith(p + "/")]
    if below:
        raise StateError(f"refusing to remove {path}: mounts below it: {', '.join(below[:5])}")
    if os.path.isdir(p) and not os.path.islink(p):
        # rm is several times faster than shutil.rmtree on containerd's snapshot trees;
        # --one-file-system is a second guard against crossing into a mount.
        proc = subprocess.run(["rm", "-rf", "--one-file-system", "--", p], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StateError(f"rm -rf {p}: {proc.stderr.strip()[-500:]}")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def teardown(st: State, stop_node: Callable[[dict], None] | None, errors: list[str]) -> None:
    """Remove everything in ``st``, in dependency order; errors are collected, not fatal."""

    def attempt(what: str, fn, *args, **kwargs) -> None:
        t = time.monotonic()
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - keep tearing down, report everything at the end
            errors.append(f"{what}: {exc}")
            log.warning("cluster_teardown_error", what=what, error=str(exc))
        if time.monotonic() - t > 1:
            log.info("cluster_teardown_slow_step", what=what, seconds=round(time.monotonic() - t, 1))

    if stop_node is not None:
        # Nodes are independent: stop them in parallel (each waits on its own processes).
        threads = [threading.Thread(target=attempt, args=(f"stop_node {ns.get('name', '?')}", stop_node, ns))
                   for ns in reversed(st.values("node"))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    pids = list(reversed(st.values("pid")))
    # etcd last: kube-apiserver stops in about 1 s with it, and hangs until SIGKILL without it.
    attempt("processes", kill_pids, [p for p in pids if p.get("name") != "etcd"])
    attempt("processes", kill_pids, [p for p in pids if p.get("name") == "etcd"])
    cgroups = list(reversed(st.values("cgroup")))
    for cg in cgroups:
        attempt(f"processes in cgroup {cg}", kill_cgroup, cg)
    present = set(mounts())
    for m in reversed(st.values("mount")):
        if m in present:
            attempt(f"umount {m}", subprocess.run, ["umount", "-l", m], check=True, capture_output=True)
    from policy_agent.lab import netns

    for name in reversed(st.values("netns")):
        attempt(f"netns {name}", netns.delete, name)
    for cg in cgroups:
        attempt(f"cgroup {cg}", remove_cgroup, cg)
    for p in reversed(st.values("path")):
        attempt(f"path {p}", remove_path, p)
