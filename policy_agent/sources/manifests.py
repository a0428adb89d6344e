"""Manifest-directory source: Namespaces, Pods and NetworkPolicies from YAML files, watched.

For the lab and for hosts without an API server (``policy-agent run --manifests DIR``).

- Every ``*.yaml``/``*.yml``/``*.json`` below the directory (hidden entries such as
  editor temp files and a ConfigMap mount's ``..data`` internals are skipped, but
  the visible symlinks into them are followed) is parsed with the model parser,
  which applies the API server's defaults (policyTypes, protocol TCP,
  ``kubernetes.io/metadata.name``).
- A file with any bad object is reported as SourceError naming the file, the
  object and the field, and its *last good content* is kept as a whole: applying
  half a file could drop a deny-all while keeping an allow, i.e. widen access.
  A file that was never good contributes nothing of its own, except: a bad
  NetworkPolicy with no version in the file's last good content is enforced as
  its no-allow fallback (model.parse.fallback_network_policy; it isolates what it
  selects, allows nothing), so a new unparseable deny never leaves its pods open;
  a bad ClusterNetworkPolicy likewise gets its deny-all stand-in
  (model.parse.fallback_cluster_network_policy; docs/decisions/cnp-fallback.md).
  A bad Namespace with no good version gets its stand-in too (model.parse.
  fallback_namespace: its labels as selectors would see them), since a missing
  Namespace would be matched by its name label only. A fallback yields to a
  parsed object of the same key in any file. Other files are unaffected. See
  docs/decisions/policy-fallback.md.
- The same object in two files: the first file (path order) wins, the other is
  reported.
- Emits Replace per kind (the store diffs it against what it has, so only real
  changes cause work) and InSync after the initial scan.

Change detection: watchdog (inotify) wakes a worker thread, which debounces
briefly, stats the files and re-reads only those whose (inode, size, mtime)
changed. A slow periodic rescan covers events inotify cannot see.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from policy_agent.model.parse import describe_cnp_fallback, load_yaml_keep_going
from policy_agent.model.types import ClusterNetworkPolicy, Namespace, NetworkPolicy, Node, Pod, PodIPPolicy
from policy_agent.sources.events import InSync, Replace, Sink, SourceError

# Metric label values of degraded_policies() (bounded).
DEGRADED_MODES = ("last_good", "fallback")

log = structlog.get_logger(__name__)

_CHANGE_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
KINDS = ("Namespace", "Pod", "NetworkPolicy", "ClusterNetworkPolicy", "Node")


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Our own reads produce "opened"/"closed_no_write": ignoring them avoids a rescan loop.
        if event.event_type in _CHANGE_EVENTS:
            self._wake.set()


Stamp = tuple[int, int, int]  # inode, size, mtime_ns


class WatchedDir:
    """A directory watched with watchdog; ``scan()`` says which files changed since the last scan."""

    def __init__(
        self,
        path: str,
        accept: Callable[[str], bool],
        on_change: Callable[[], None],
        *,
        recursive: bool,
        debounce: float = 0.01,
        poll_interval: float = 10.0,
        name: str = "dirwatch",
    ) -> None:
        self.path = os.path.abspath(path)
        self.accept = accept
        self.on_change = on_change
        self.recursive = recursive
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.name = name
        self._stamps: dict[str, Stamp] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    def _files(self) -> list[str]:
        out = []
        if self.recursive:
            for root, dirs, files in os.walk(self.path, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and self.accept(f)]
        else:
            out = [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))
                   if not f.startswith(".") and self.accept(f)]
        return out

    def scan(self) -> tuple[list[str], list[str]]:
        """(changed or new files, removed files). Raises OSError if the directory is unreadable."""
        now: dict[str, Stamp] = {}
        for p in self._files():
            try:
                st = os.stat(p)  # follows symlinks (ConfigMap mounts)
            except FileNotFoundError:
                continue
            if not os.path.isfile(p):
                continue
            now[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
        changed = [p for p, s in now.items() if self._stamps.get(p) != s]
        removed = [p for p in self._stamps if p not in now]
        self._stamps = now
        return changed, removed

    def forget(self, path: str) -> None:
        """Make the next scan report ``path`` again (e.g. after a read that raced a write)."""
        self._stamps.pop(path, None)

    def start(self) -> None:
        self._observer = Observer()
        self._observer.schedule(_Wake(self._wake), self.path, recursive=self.recursive)
        self._observer.start()  # before the first scan: no change can fall in between
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            if self._stop.is_set():
                break
            if self._wake.is_set():
                self._stop.wait(self.debounce)  # let a burst of writes land
                self._wake.clear()
            try:
                self.on_change()
            except Exception as exc:  # keep watching whatever went wrong
                log.exception("watched_dir_error", path=self.path, error=str(exc))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)


def _is_manifest(name: str) -> bool:
    return name.endswith(MANIFEST_SUFFIXES)


def _key(obj: Any) -> Any:
    return obj.name if isinstance(obj, Namespace) else obj.key


def _kind(obj: Any) -> str:
    if isinstance(obj, Namespace):
        return "Namespace"
    if isinstance(obj, Pod):
        return "Pod"
    if isinstance(obj, NetworkPolicy):
        return "NetworkPolicy"
    if isinstance(obj, ClusterNetworkPolicy):
        return "ClusterNetworkPolicy"
    if isinstance(obj, Node):
        return "Node"
    raise TypeError(obj)


class ManifestSource:
    def __init__(
        self,
        directory: str,
        name: str | None = None,
        poll_interval: float = 10.0,
        pod_ip_policy: PodIPPolicy | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.pod_ip_policy = pod_ip_policy or PodIPPolicy()
        self.name = name or f"manifests:{self.directory}"
        self._watch = WatchedDir(self.directory, _is_manifest, self._rescan, recursive=True,
                                 poll_interval=poll_interval, name="manifest-source")
        self._good: dict[str, list[Any]] = {}  # file -> objects of its last good version
        # bad file -> fallbacks of its bad policies that have no version in _good[file]
        self._fallbacks: dict[str, list[Any]] = {}
        # bad file -> keys of its bad policies enforced from the file's last good content
        self._kept: dict[str, set[Any]] = {}
        self._degraded: dict[str, int] = dict.fromkeys(DEGRADED_MODES, 0)
        self._errors: dict[str, tuple[str, ...]] = {}  # file -> current error messages
        self._emitted: dict[str, dict[Any, Any]] = {}
        self._sink: Sink | None = None
        self._lock = threading.Lock()
        self._dup_reported: set[tuple[str, Any, str]] = set()

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._watch.start()
        self._rescan(initial=True)
        sink(InSync(self.name))
        log.info("manifest_source_in_sync", directory=self.directory, files=len(self._good),
                 broken=len(self._errors))

    def stop(self) -> None:
        self._watch.stop()

    def degraded_policies(self) -> dict[str, int]:
        """Bad NetworkPolicies and ClusterNetworkPolicies enforced from their last good version /
        as a fallback, by mode."""
        return dict(self._degraded)

    def _error(self, message: str, kind: str = "", key: Any = None) -> None:
        log.warning("manifest_error", source=self.name, message=message)
        if self._sink:
            self._sink(SourceError(self.name, message, kind, key))

    def _read(self, path: str) -> None:
        rel = os.path.relpath(path, self.directory)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            errors: tuple[str, ...] = (f"{rel}: cannot read: {exc}",)
            objects: list = []
            parse_errors: list = []
        else:
            objects, parse_errors = load_yaml_keep_going(text, rel, fallbacks=True, pod_ip_policy=self.pod_ip_policy)
            errors = tuple(str(e) for e in parse_errors)
        if not errors:
            self._good[path] = objects
            self._fallbacks.pop(path, None)
            self._kept.pop(path, None)
            if self._errors.pop(path, None) is not None:
                log.info("manifest_file_fixed", file=rel, objects=len(objects))
            return
        # NetworkPolicy keys are (ns, name), ClusterNetworkPolicy keys a name: never equal.
        good_policies = {o.key for o in self._good.get(path, ()) if isinstance(o, _POLICIES)}
        fallbacks = {
            o.key: o for o in objects
            if isinstance(o, _POLICIES) and o.fallback_reason and o.key not in good_policies
        }
        # A Namespace that never parsed: its stand-in (labels matched as written).
        good_ns = {o.name for o in self._good.get(path, ()) if isinstance(o, Namespace)}
        bad_ns = {e.ref for e in parse_errors if e.kind == "Namespace"} - good_ns
        ns_fallbacks = [o for o in objects if isinstance(o, Namespace) and o.name in bad_ns]
        # Policies of this read that parsed but are not in the last good content (a file
        # that never parsed, or a policy added in the broken edit) are enforced as written:
        # dropping them with their neighbours' errors would leave their pods open.
        fresh = [
            o for o in objects
            if isinstance(o, _POLICIES) and not o.fallback_reason and o.key not in good_policies
        ]
        self._fallbacks[path] = list(fallbacks.values()) + ns_fallbacks + fresh
        self._kept[path] = {
            _bad_key(e.kind, e.ref) for e in parse_errors if e.kind in _POLICY_KINDS
        } & good_policies
        if self._errors.get(path) == errors:
            return  # already reported
        self._errors[path] = errors
        kept = len(self._good.get(path, ()))
        for i, msg in enumerate(errors):
            e = parse_errors[i] if i < len(parse_errors) else None
            kind, ref = getattr(e, "kind", ""), getattr(e, "ref", rel)
            what = f"keeping the file's last good content: {kept} objects"
            fb = fallbacks.get(_bad_key(kind, ref)) if kind in _POLICY_KINDS else None
            if isinstance(fb, NetworkPolicy):
                sel = "all pods of the namespace" if fb.pod_selector.is_empty else fb.pod_selector.canonical()
                dirs = "+".join(t.value for t in fb.policy_types)
                what += f"; enforcing a fallback for {ref}: isolates {sel} for {dirs}, allows nothing"
            elif isinstance(fb, ClusterNetworkPolicy):
                what += f"; enforcing a fallback for {ref}: {describe_cnp_fallback(fb)}, accepts nothing"
            elif kind in _POLICY_KINDS and _bad_key(kind, ref) in good_policies:
                what += f", including the last good version of {ref}"
            log.warning("manifest_bad_object", file=rel, kind=kind, key=ref,
                        field=getattr(e, "field_path", ""),
                        enforced="fallback" if fb is not None else (
                            "last_good" if _bad_key(kind, ref) in self._kept[path] else "nothing"))
            self._error(f"{msg} ({what})", kind=kind, key=ref)

    def _rescan(self, initial: bool = False) -> None:
        with self._lock:
            try:
                changed, removed = self._watch.scan()
            except OSError as exc:
                self._error(f"manifest directory {self.directory}: cannot read: {exc} (keeping its last content)")
                return
            for p in removed:
                self._good.pop(p, None)
                self._fallbacks.pop(p, None)
                self._kept.pop(p, None)
                self._errors.pop(p, None)
            for p in changed:
                self._read(p)
            if not (changed or removed or initial):
                return
            merged: dict[str, dict[Any, Any]] = {k: {} for k in KINDS}
            origin: dict[tuple[str, Any], str] = {}
            for path in sorted(self._good):
                for obj in self._good[path]:
                    kind, key = _kind(obj), _key(obj)
                    first = origin.get((kind, key))
                    if first is not None:
                        if (kind, key, path) not in self._dup_reported:
                            self._dup_reported.add((kind, key, path))
                            rel = os.path.relpath(path, self.directory)
                            self._error(
                                f"{rel}: {kind} {_ref(key)} is also defined in "
                                f"{os.path.relpath(first, self.directory)}; using that one",
                                kind=kind, key=key,
                            )
                        continue
                    origin[(kind, key)] = path
                    merged[kind][key] = obj
            # Fallbacks last: any parsed version of the same object, in any file, wins.
            n_fallback = 0
            for path in sorted(self._fallbacks):
                for fb in self._fallbacks[path]:
                    same = merged[_kind(fb)]
                    if _key(fb) not in same:
                        same[_key(fb)] = fb
                        n_fallback += isinstance(fb, _POLICIES) and bool(fb.fallback_reason)
            self._degraded = {
                "last_good": len(set().union(*self._kept.values())) if self._kept else 0,
                "fallback": n_fallback,
            }
            for kind in KINDS:
                if initial or merged[kind] != self._emitted.get(kind):
                    self._emitted[kind] = merged[kind]
                    if self._sink:
                        self._sink(Replace(self.name, kind, dict(merged[kind])))


def _policy_key(ref: str) -> tuple[str, str]:
    ns, _, name = ref.partition("/")
    return (ns, name)


_POLICIES = (NetworkPolicy, ClusterNetworkPolicy)
_POLICY_KINDS = ("NetworkPolicy", "ClusterNetworkPolicy")


def _bad_key(kind: str, ref: str) -> Any:
    """The model key of a policy an error names: (ns, name), or the cluster policy's name."""
    return ref if kind == "ClusterNetworkPolicy" else _policy_key(ref)


def _ref(key: Any) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)
