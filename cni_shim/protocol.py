"""Pure CNI request/result/error encoding (spec 1.0.0, plus 1.1.0 STATUS and GC).

Stdlib only: the `vpcip-cni` executable imports this and must start fast.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.0.0"
PLUGIN_TYPE = "vpcip-cni"

DEFAULT_SOCKET = "/run/vpcip/ipamd.sock"
DEFAULT_VETH_PREFIX = "eni"
DEFAULT_MTU = 9001
MTU_MIN, MTU_MAX = 576, 9001
MAX_POLICY_WAIT = 300.0
DEFAULT_REQUEST_TIMEOUT = 10.0

GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"

# Well-known codes from the spec; 100+ are ours (documented in docs/cni.md).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_POOL_EXHAUSTED = 100
ERR_CHECK_FAILED = 101
ERR_PLUMBING = 102

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_POD_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # a UUID in practice


class CNIError(Exception):
    """A CNI error result: code, msg, details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, version: str = CURRENT_VERSION) -> dict[str, Any]:
        d: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            d["details"] = self.details
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CNIError":
        return cls(int(d.get("code", ERR_PLUMBING)), str(d.get("msg", "")), str(d.get("details", "")))


@dataclass(frozen=True)
class NetConf:
    """The fields of our plugin's network configuration (validated)."""

    cni_version: str
    name: str
    ipam_socket: str = DEFAULT_SOCKET
    veth_prefix: str = DEFAULT_VETH_PREFIX
    mtu: int = DEFAULT_MTU
    endpoint_dir: str = ""
    status_dir: str = ""
    policy_wait: float = 0.0
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    prev_result: dict | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None  # GC only

    def to_wire(self) -> dict[str, Any]:
        return {
            "cni_version": self.cni_version,
            "name": self.name,
            "veth_prefix": self.veth_prefix,
            "mtu": self.mtu,
            "endpoint_dir": self.endpoint_dir,
            "status_dir": self.status_dir,
            "policy_wait": self.policy_wait,
            "request_timeout": self.request_timeout,  # the daemon keeps its waits under it
        }


@dataclass(frozen=True)
class Request:
    command: str
    conf: NetConf
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def k8s_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def k8s_pod(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def k8s_pod_uid(self) -> str:
        """metadata.uid of the pod (containerd and cri-o pass it); "" when not given.

        ADD rejects a malformed one; other commands (DEL must succeed) ignore it."""
        uid = self.args.get("K8S_POD_UID", "")
        return uid if _POD_UID_RE.match(uid) else ""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "op": self.command.lower(),
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "namespace": self.k8s_namespace,
            "pod": self.k8s_pod,
            "pod_uid": self.k8s_pod_uid,
            "conf": self.conf.to_wire(),
        }
        if self.conf.prev_result is not None:
            d["prev_result"] = self.conf.prev_result
        if self.conf.valid_attachments is not None:
            d["valid_attachments"] = [list(a) for a in self.conf.valid_attachments]
        return d


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS "K1=V1;K2=V2" -> dict. Raises CNIError(4) on a malformed pair."""
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS: malformed pair {part!r} (want KEY=VALUE)")
        out[key] = value
    return out


def _pick_plugin(conf: dict) -> dict:
    """Accept a plugin config (what runtimes send) or a whole conflist (for labs)."""
    if "plugins" not in conf:
        return conf
    plugins = conf["plugins"]
    if not isinstance(plugins, list):
        raise CNIError(ERR_INVALID_CONFIG, "network config: field 'plugins' must be a list")
    for p in plugins:
        if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE:
            merged = dict(p)
            merged.setdefault("name", conf.get("name"))
            merged.setdefault("cniVersion", conf.get("cniVersion"))
            return merged
    raise CNIError(ERR_INVALID_CONFIG, f"conflist has no plugin of type {PLUGIN_TYPE!r}")


def _number(conf: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field {key!r} must be a number, not {value!r}")
    if not lo <= value <= hi:
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field {key!r}={value} must be within {lo:g}..{hi:g}")
    return float(value)


def _string(conf: dict, key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field {key!r} must be a non-empty string")
    return value


def parse_version_only(stdin: str) -> str:
    """cniVersion from stdin for VERSION (lenient: empty stdin means the current version)."""
    if not stdin.strip():
        return CURRENT_VERSION
    try:
        conf = json.loads(stdin)
    except ValueError:
        return CURRENT_VERSION
    v = conf.get("cniVersion") if isinstance(conf, dict) else None
    return v if isinstance(v, str) and v else CURRENT_VERSION


def parse_netconf(stdin: str, command: str, default_endpoint_dir: str, default_status_dir: str) -> NetConf:
    if not stdin.strip():
        raise CNIError(ERR_DECODE, "no network configuration on stdin")
    try:
        raw = json.loads(stdin)
    except ValueError as exc:
        raise CNIError(ERR_DECODE, "network configuration on stdin is not valid JSON", str(exc)) from None
    if not isinstance(raw, dict):
        raise CNIError(ERR_DECODE, "network configuration on stdin is not a JSON object")
    conf = _pick_plugin(raw)
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(ERR_INVALID_CONFIG, "network config: field 'cniVersion' is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command == "CHECK" and version_tuple(version) < (0, 4, 0):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {version}")
    if command in ("STATUS", "GC") and version_tuple(version) < (1, 1, 0):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, not {version}")
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(ERR_INVALID_CONFIG, "network config: field 'name' is missing")
    ptype = conf.get("type", PLUGIN_TYPE)
    if ptype != PLUGIN_TYPE:
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field 'type' is {ptype!r}, not {PLUGIN_TYPE!r}")
    prefix = _string(conf, "vethPrefix", DEFAULT_VETH_PREFIX)
    try:
        from policy_agent.shared.naming import validate_iface_prefix

        validate_iface_prefix(prefix)
    except ValueError as exc:
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field 'vethPrefix': {exc}") from None
    mtu = conf.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, str) and mtu.isdigit():  # AWS templates it as a string
        mtu = int(mtu)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
        raise CNIError(ERR_INVALID_CONFIG, f"network config: field 'mtu'={mtu!r} must be an integer {MTU_MIN}..{MTU_MAX}")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CNIError(ERR_INVALID_CONFIG, "network config: field 'prevResult' must be an object")
    if command == "CHECK" and prev is None:
        raise CNIError(ERR_INVALID_CONFIG, "network config: CHECK needs field 'prevResult'")
    attachments = None
    if command == "GC":
        va = conf.get("cni.dev/valid-attachments", [])
        if not isinstance(va, list):
            raise CNIError(ERR_INVALID_CONFIG, "network config: field 'cni.dev/valid-attachments' must be a list")
        out = []
        for i, a in enumerate(va):
            if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) or not isinstance(a.get("ifname"), str):
                raise CNIError(
                    ERR_INVALID_CONFIG,
                    f"network config: 'cni.dev/valid-attachments'[{i}] needs string fields containerID and ifname",
                )
            out.append((a["containerID"], a["ifname"]))
        attachments = tuple(out)
    return NetConf(
        cni_version=version,
        name=name,
        ipam_socket=_string(conf, "ipamSocket", DEFAULT_SOCKET),
        veth_prefix=prefix,
        mtu=mtu,
        endpoint_dir=_string(conf, "endpointDir", default_endpoint_dir),
        status_dir=_string(conf, "statusDir", default_status_dir),
        policy_wait=_number(conf, "policyWaitSeconds", 0.0, 0.0, MAX_POLICY_WAIT),
        request_timeout=_number(conf, "requestTimeoutSeconds", DEFAULT_REQUEST_TIMEOUT, 0.1, 600.0),
        prev_result=prev,
        valid_attachments=attachments,
    )


def parse_request(env: Mapping[str, str], stdin: str, default_endpoint_dir: str, default_status_dir: str) -> Request:
    """Environment + stdin -> Request, or CNIError naming what is wrong."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    conf = parse_netconf(stdin, command, default_endpoint_dir, default_status_dir)
    if command in ("STATUS", "GC"):
        return Request(command=command, conf=conf)
    container_id = env.get("CNI_CONTAINERID", "")
    if not container_id:
        raise CNIError(ERR_INVALID_ENV, "CNI_CONTAINERID is missing")
    if not _CONTAINER_ID_RE.match(container_id):
        raise CNIError(ERR_INVALID_ENV, f"CNI_CONTAINERID {container_id!r} has characters outside [A-Za-z0-9_.-]")
    ifname = env.get("CNI_IFNAME", "")
    if not ifname:
        raise CNIError(ERR_INVALID_ENV, "CNI_IFNAME is missing")
    if len(ifname) > 15 or "/" in ifname or ifname in (".", "..") or any(c.isspace() for c in ifname):
        raise CNIError(ERR_INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns:
        raise CNIError(ERR_INVALID_ENV, "CNI_NETNS is missing")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    if command == "ADD":
        uid = args.get("K8S_POD_UID", "")
        if uid and not _POD_UID_RE.match(uid):
            raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS: K8S_POD_UID {uid[:140]!r} is not a valid pod UID")
        for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
            if not args.get(key):
                raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS lacks {key} (needed to name the host veth)")
        ns = args["K8S_POD_NAMESPACE"]
        if "." in ns or "/" in ns or "/" in args["K8S_POD_NAME"]:
            raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS: bad pod {ns!r}/{args['K8S_POD_NAME']!r}")
    return Request(command=command, conf=conf, container_id=container_id, netns=netns, ifname=ifname, args=args)


# --- results -----------------------------------------------------------------------


def make_result(
    host_ifname: str, host_mac: str, ifname: str, pod_mac: str, netns: str, ipv4: str, ipv6: str = ""
) -> dict[str, Any]:
    """A 1.0.0 result: host veth, pod interface, addresses with gateways, default routes."""
    ips = [{"address": f"{ipv4}/32", "gateway": GATEWAY_V4, "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": GATEWAY_V4}]
    if ipv6:
        ips.append({"address": f"{ipv6}/128", "gateway": GATEWAY_V6, "interface": 1})
        routes.append({"dst": "::/0", "gw": GATEWAY_V6})
    return {
        "cniVersion": CURRENT_VERSION,
        "interfaces": [
            {"name": host_ifname, "mac": host_mac},
            {"name": ifname, "mac": pod_mac, "sandbox": netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


def encode_result(result: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Convert a 1.0.0-shaped result to the requested version (0.3.x/0.4.0 carry ips[].version)."""
    out = json.loads(json.dumps(result))
    out["cniVersion"] = version
    if version_tuple(version) < (1, 0, 0):
        for ip in out.get("ips", []):
            ip["version"] = "6" if ":" in ip["address"] else "4"
    return out


def result_addresses(result: Mapping[str, Any]) -> list[str]:
    """Bare addresses of a (prev)result's ips, for CHECK."""
    out = []
    for ip in result.get("ips", []) or []:
        try:
            out.append(str(ipaddress.ip_interface(ip["address"]).ip))
        except (KeyError, TypeError, ValueError):
            raise CNIError(ERR_INVALID_CONFIG, f"prevResult: bad ips entry {ip!r}") from None
    return out


def version_result(version: str = CURRENT_VERSION) -> dict[str, Any]:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
