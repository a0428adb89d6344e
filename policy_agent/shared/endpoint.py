"""The contract between the CNI shim and the agent: endpoint records and status files.

Stdlib only. The shim writes one endpoint record per pod when CNI ADD has wired
it, and removes it on DEL. The agent scans and watches the record directory, so
it knows a pod's interface and IPs before the API server reports them. Once the
agent has programmed the policy for an endpoint it writes a status file; the
shim's ADD may wait for it (bounded) so a pod never starts before its policy.

Files:
  <endpoint_dir>/<namespace>.<pod>.json   EndpointRecord as JSON
  <status_dir>/<namespace>.<pod>.json     EndpointStatus as JSON
A namespace is a DNS label (no dots), so the first "." splits the key. Writes
are atomic: temp file in the same directory, fsync, rename. Both carry the pod's
UID (``pod_uid``, "" when unknown): the agent merges a record only with the Pod
object of that UID, and the shim accepts only a status for its container and UID.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Iterator

DEFAULT_ENDPOINT_DIR = "/var/run/policy-agent/endpoints"
DEFAULT_STATUS_DIR = "/var/run/policy-agent/endpoint-status"
RECORD_VERSION = 1


def record_key(namespace: str, pod: str) -> str:
    if not namespace or "." in namespace or "/" in namespace or "/" in pod or not pod:
        raise ValueError(f"bad endpoint key {namespace!r}/{pod!r}")
    return f"{namespace}.{pod}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, pod = key.partition(".")
    return namespace, pod


@dataclass(frozen=True)
class EndpointRecord:
    namespace: str
    pod: str
    container_id: str
    interface: str
    ips: tuple[str, ...]
    netns: str = ""
    created: float = 0.0
    version: int = RECORD_VERSION
    # metadata.uid of the pod this sandbox was created for (K8S_POD_UID in CNI_ARGS);
    # "" when the runtime did not say, or the record predates the field.
    pod_uid: str = ""

    @property
    def key(self) -> str:
        return record_key(self.namespace, self.pod)

    def to_json(self) -> str:
        d = asdict(self)
        d["ips"] = list(self.ips)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EndpointRecord":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("endpoint record is not a JSON object")
        missing = [k for k in ("namespace", "pod", "container_id", "interface", "ips") if k not in d]
        if missing:
            raise ValueError(f"endpoint record lacks field(s): {', '.join(missing)}")
        if d.get("version", RECORD_VERSION) != RECORD_VERSION:
            raise ValueError(f"endpoint record version {d.get('version')!r} is not {RECORD_VERSION}")
        if not isinstance(d["ips"], list) or not all(isinstance(i, str) for i in d["ips"]):
            raise ValueError("endpoint record field 'ips' must be a list of strings")
        return cls(
            namespace=str(d["namespace"]),
            pod=str(d["pod"]),
            container_id=str(d["container_id"]),
            interface=str(d["interface"]),
            ips=tuple(d["ips"]),
            netns=str(d.get("netns", "")),
            created=float(d.get("created", 0.0)),
            pod_uid=str(d.get("pod_uid", "") or ""),
        )


@dataclass(frozen=True)
class EndpointStatus:
    """Written by the agent once the endpoint's rules are in the kernel."""

    namespace: str
    pod: str
    container_id: str
    interface: str
    programmed_at: float
    policies: tuple[str, ...] = field(default_factory=tuple)
    # metadata.uid of the Pod object whose policy was programmed ("" if unknown);
    # the shim accepts the file only if it names its own container and pod UID.
    pod_uid: str = ""

    def to_json(self) -> str:
        d = asdict(self)
        d["policies"] = list(self.policies)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EndpointStatus":
        d = json.loads(text)
        return cls(
            namespace=str(d["namespace"]),
            pod=str(d["pod"]),
            container_id=str(d.get("container_id", "")),
            interface=str(d.get("interface", "")),
            programmed_at=float(d.get("programmed_at", 0.0)),
            policies=tuple(d.get("policies", ())),
            pod_uid=str(d.get("pod_uid", "") or ""),
        )


def atomic_write(path: str, data: str | bytes, mode: int = 0o644, sync_dir: bool = False) -> None:
    """Write data to path so readers see the old or the new file, never a part.

    The temp file is hidden and has no extension, so directory scanners (ours,
    libcni's) never pick it up. sync_dir also fsyncs the directory, making the
    rename itself durable across a crash.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # rename(2) over a running executable is fine (no ETXTBSY)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make renames and unlinks in directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _path(directory: str, namespace: str, pod: str) -> str:
    return os.path.join(directory, record_key(namespace, pod) + ".json")


def write_record(directory: str, record: EndpointRecord) -> str:
    path = _path(directory, record.namespace, record.pod)
    atomic_write(path, record.to_json())
    return path


def remove_record(directory: str, namespace: str, pod: str) -> bool:
    try:
        os.unlink(_path(directory, namespace, pod))
        return True
    except FileNotFoundError:
        return False


def read_record(path: str) -> EndpointRecord:
    with open(path) as f:
        return EndpointRecord.from_json(f.read())


def is_record_file(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def scan_records(directory: str) -> Iterator[tuple[str, EndpointRecord | Exception]]:
    """Yield (path, record or the error that made it unreadable) for each record file."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        if not is_record_file(name):
            continue
        path = os.path.join(directory, name)
        try:
            yield path, read_record(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            yield path, exc


def write_status(directory: str, status: EndpointStatus) -> str:
    path = _path(directory, status.namespace, status.pod)
    atomic_write(path, status.to_json())
    return path


def read_status(directory: str, namespace: str, pod: str) -> EndpointStatus | None:
    try:
        with open(_path(directory, namespace, pod)) as f:
            return EndpointStatus.from_json(f.read())
    except (FileNotFoundError, ValueError, KeyError):
        return None


def remove_status(directory: str, namespace: str, pod: str) -> bool:
    try:
        os.unlink(_path(directory, namespace, pod))
        return True
    except FileNotFoundError:
        return False
