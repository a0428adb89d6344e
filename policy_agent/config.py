"""Frozen agent configuration: flags > environment (POLICY_AGENT_*) > config file > default.

This module is the only reader of environment variables. Every setting is one
row of ``SETTINGS`` (name, type, default, help); the flag, the environment
variable and the config-file key are derived from the name, and the
configuration reference in docs/install.md is generated from the same table
(``reference_markdown()``), so docs and code cannot drift apart.

    flag          --min-apply-interval
    environment   POLICY_AGENT_MIN_APPLY_INTERVAL
    config file   min_apply_interval: 0.05     (YAML mapping, --config / POLICY_AGENT_CONFIG)
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from policy_agent.compiler.options import (
    DEFAULT_FLOW_LOG_GROUP,
    DEFAULT_MARK_MASK,
    ENDPOINT_TO_HOST_ACTIONS,
    FlowLogOptions,
    NodeConfig,
)
from policy_agent.model.types import IPNetwork, PodIPPolicy
from policy_agent.shared.endpoint import DEFAULT_ENDPOINT_DIR, DEFAULT_STATUS_DIR
from policy_agent.shared.naming import DEFAULT_IFACE_PREFIX

ENV_PREFIX = "POLICY_AGENT_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG"


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: str  # "str" | "int" | "float" | "bool" | "choice" | "path"
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("node", "str", "", "Name of this node (spec.nodeName of local pods).", required=True),
    Setting("manifests", "path", "", "Directory of Kubernetes YAML to use as a source (watched)."),
    Setting(
        "kube",
        "choice",
        "auto",
        "Kubernetes API source: auto (on when a kubeconfig is given, or when no manifest directory "
        "is set and the agent runs in a cluster or finds $KUBECONFIG or ~/.kube/config), on, off.",
        choices=("auto", "on", "off"),
    ),
    Setting("kubeconfig", "path", "",
            "kubeconfig file. Empty: the in-cluster service account when KUBERNETES_SERVICE_HOST is set, "
            "else $KUBECONFIG (a colon-separated list, merged as kubectl does), else ~/.kube/config if it exists."),
    Setting("netns", "str", "", "Run the dataplane and link monitor inside this named network namespace."),
    Setting("endpoint_dir", "path", DEFAULT_ENDPOINT_DIR, "Directory of endpoint records written by the CNI shim."),
    Setting("status_dir", "path", DEFAULT_STATUS_DIR, "Directory where endpoint status files are written."),
    Setting("link_monitor", "bool", True, "Watch pod interfaces (our prefix) appearing and disappearing."),
    Setting("iface_prefix", "str", DEFAULT_IFACE_PREFIX, "Host-side pod interface prefix."),
    Setting("mark_mask", "int", DEFAULT_MARK_MASK, "Packet-mark bits the agent may use (e.g. 0xffff0000)."),
    Setting("deny_action", "choice", "DROP", "Verdict for denied packets.", choices=("DROP", "REJECT")),
    Setting(
        "endpoint_to_host_action",
        "choice",
        "RETURN",
        "Pod-to-own-node traffic once the pod's egress policy allowed it: RETURN to the host's own "
        "INPUT rules (host firewall, kube-proxy's KUBE-FIREWALL), ACCEPT at once (skips them) or DROP. "
        "Egress denials are dropped by us in every mode.",
        choices=ENDPOINT_TO_HOST_ACTIONS,
    ),
    Setting("ipv6", "bool", True, "Program ip6tables as well as iptables."),
    Setting(
        "iptables_backend",
        "choice",
        "auto",
        "iptables backend: auto (follow kubelet/kube-proxy hint chains, else the backend with more rules), "
        "nft or legacy. Our rules are swept out of the other backend.",
        choices=("auto", "nft", "legacy"),
    ),
    Setting(
        "state_file",
        "path",
        "",
        "Where the dataplane records what each ipset and interface stands for (read by `dump`); "
        "empty = /run/policy-agent/dataplane[-<netns>].json.",
    ),
    Setting("min_apply_interval", "float", 0.02, "Minimum seconds between two applies (coalesces bursts)."),
    Setting("max_apply_interval", "float", 300.0, "Maximum seconds without a full recompile and apply (resync)."),
    Setting("refresh_interval", "float", 30.0, "Seconds between drift checks: the kernel is read back in the background and only drift costs a repair on the loop (0 = off)."),
    Setting("metrics_bind", "str", "127.0.0.1", "Address of the health/metrics/status HTTP server."),
    Setting("metrics_port", "int", 9909, "Port of the health/metrics/status HTTP server (0 = any free port)."),
    Setting("unready_failures", "int", 3, "Failed applies in a row after which /readyz turns 503."),
    Setting("unready_after", "float", 60.0,
            "Seconds a change may wait without a successful apply before /readyz turns 503."),
    Setting(
        "status_socket",
        "path",
        "",
        "Unix socket serving /status (and /livez /readyz /metrics) to root only (socket 0600, directory 0700); "
        "empty = /run/policy-agent/private/agent[-<netns>].sock.",
    ),
    Setting("status_over_tcp", "bool", False,
            "Also serve /status (pod and policy names, kernel errors) on the TCP metrics port."),
    Setting(
        "pod_networks",
        "str",
        "",
        "Comma-separated CIDRs (IPv4 and/or IPv6: the VPC CIDRs or cluster pod CIDRs) that pod addresses "
        "must lie in; others are left out of the pod and reported. Empty = no range check (unspecified, "
        "loopback, multicast and link-local addresses are always rejected).",
    ),
    Setting(
        "trust_pod_ips_annotation",
        "bool",
        False,
        "Use the user-writable vpc.amazonaws.com/pod-ips annotation while a pod's status has no IP, "
        "only for addresses inside pod_networks (required). Anyone who may edit the pod can write it.",
    ),
    Setting("kube_events", "bool", True,
            "Post a Warning Event on a NetworkPolicy the agent cannot enforce as written (needs create/patch "
            "on events; at most one per policy, reason and field every 10 minutes)."),
    Setting("flow_log", "bool", True,
            "Log denied new connections (NFLOG, rate-limited in the kernel) and write one JSON line per verdict to "
            "flow_log_file, with the policy and rule that decided (`policy-agent flows` reads them). "
            "Established traffic is never logged."),
    Setting("flow_log_allowed", "bool", False,
            "Also log allowed new connections (one NFLOG rule per allow rule; per direction)."),
    Setting("flow_log_group", "int", DEFAULT_FLOW_LOG_GROUP,
            "NFLOG group (0-65535) of the flow log in the dataplane's network namespace; nothing else may bind it."),
    Setting("flow_log_rate", "int", 100,
            "Kernel limit: logged packets per second for the whole node, per verdict and IP family."),
    Setting("flow_log_burst", "int", 200, "Kernel limit: burst of flow_log_rate."),
    Setting("flow_log_per_source_rate", "int", 20,
            "Kernel limit: logged packets per second per source address (0 = no per-source limit)."),
    Setting("flow_log_per_source_burst", "int", 50, "Kernel limit: burst of flow_log_per_source_rate."),
    Setting("flow_log_file", "path", "",
            "Flow log file (JSON lines); empty = /var/log/policy-agent/flows[-<netns>].jsonl."),
    Setting("flow_log_max_bytes", "int", 50 << 20,
            "Size at which the flow log file is rotated to <file>.1 (one old file kept)."),
    Setting("flow_metrics_max_labels", "int", 100,
            "Drop counters by policy and by namespace: at most this many distinct policies (per tier) and "
            "namespaces get their own label; later ones are counted under \"other\"."),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    node: str = ""
    manifests: str = ""
    kube: str = "auto"
    kubeconfig: str = ""
    netns: str = ""
    endpoint_dir: str = DEFAULT_ENDPOINT_DIR
    status_dir: str = DEFAULT_STATUS_DIR
    link_monitor: bool = True
    iface_prefix: str = DEFAULT_IFACE_PREFIX
    mark_mask: int = DEFAULT_MARK_MASK
    deny_action: str = "DROP"
    endpoint_to_host_action: str = "RETURN"
    ipv6: bool = True
    iptables_backend: str = "auto"
    state_file: str = ""
    min_apply_interval: float = 0.02
    max_apply_interval: float = 300.0
    refresh_interval: float = 30.0
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 9909
    unready_failures: int = 3
    unready_after: float = 60.0
    status_socket: str = ""
    status_over_tcp: bool = False
    pod_networks: str = ""
    trust_pod_ips_annotation: bool = False
    kube_events: bool = True
    flow_log: bool = True
    flow_log_allowed: bool = False
    flow_log_group: int = DEFAULT_FLOW_LOG_GROUP
    flow_log_rate: int = 100
    flow_log_burst: int = 200
    flow_log_per_source_rate: int = 20
    flow_log_per_source_burst: int = 50
    flow_log_file: str = ""
    flow_log_max_bytes: int = 50 << 20
    flow_metrics_max_labels: int = 100
    in_cluster: bool = False  # KUBERNETES_SERVICE_HOST was set (derived, not a setting)
    # $KUBECONFIG (colon-separated list), else ~/.kube/config if it exists; "" = neither (derived).
    ambient_kubeconfig: str = ""

    def pod_ip_policy(self) -> PodIPPolicy:
        """Which pod addresses the sources and the store accept (validated by validate())."""
        return PodIPPolicy(parse_pod_networks(self.pod_networks), self.trust_pod_ips_annotation)

    def node_config(self) -> NodeConfig:
        return NodeConfig(
            node_name=self.node,
            iface_prefix=self.iface_prefix,
            mark_mask=self.mark_mask,
            deny_action=self.deny_action,
            endpoint_to_host_action=self.endpoint_to_host_action,
            ipv6=self.ipv6,
            flow_log=self.flow_log_options(),
        )

    def flow_log_options(self) -> FlowLogOptions | None:
        """The NFLOG rules the compiler writes; None = flow logging off."""
        if not (self.flow_log or self.flow_log_allowed):
            return None
        return FlowLogOptions(
            group=self.flow_log_group, deny=self.flow_log, allow=self.flow_log_allowed, rate=self.flow_log_rate,
            burst=self.flow_log_burst, per_source_rate=self.flow_log_per_source_rate,
            per_source_burst=self.flow_log_per_source_burst,
        )

    @property
    def kube_enabled(self) -> bool:
        if self.kube == "on":
            return True
        if self.kube == "off":
            return False
        return bool(self.kubeconfig) or ((self.in_cluster or bool(self.ambient_kubeconfig)) and not self.manifests)

    def kube_client_source(self) -> tuple[str | None, bool]:
        """(kubeconfig, in_cluster) as kubectl/client-go resolve them: --kubeconfig /
        POLICY_AGENT_KUBECONFIG, else in-cluster, else $KUBECONFIG (the official client's
        loader merges a colon-separated list), else ~/.kube/config."""
        if self.kubeconfig:
            return self.kubeconfig, False
        if self.in_cluster:
            return None, True
        return self.ambient_kubeconfig or None, False


DERIVED = ("in_cluster", "ambient_kubeconfig")  # Config fields that are not settings, at the end
assert [f.name for f in fields(Config)][: -len(DERIVED)] == [s.name for s in SETTINGS], (
    "Config fields and SETTINGS differ")
assert tuple(f.name for f in fields(Config))[-len(DERIVED):] == DERIVED


# --- conversion -----------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(s: Setting, value: Any, origin: str) -> Any:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"setting {s.name!r} from {origin}: {why} (got {value!r})")

    if s.type in ("str", "path"):
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if s.type == "choice":
        if not isinstance(value, str) or value not in s.choices:
            raise bad(f"must be one of {', '.join(s.choices)}")
        return value
    if s.type == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("must be a boolean (true/false)")
    if s.type == "int":
        if isinstance(value, bool):
            raise bad("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip(), 0)  # accepts 0xffff0000
            except ValueError:
                raise bad("must be an integer") from None
        raise bad("must be an integer")
    if s.type == "float":
        if isinstance(value, bool):
            raise bad("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("must be a number") from None
        raise bad("must be a number")
    raise AssertionError(s.type)


def read_config_file(path: str) -> dict[str, Any]:
    import yaml  # only here: the CLI's other commands need not pay for it

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of setting: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    require_node: bool = True,
) -> Config:
    """Merge the three layers and validate. ``flags`` maps setting names to values;
    None means "not given". ``env`` defaults to os.environ."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = [k for k in flags if k not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    path = config_file or env.get(CONFIG_FILE_ENV) or ""
    from_file = read_config_file(path) if path else {}

    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.name in flags:
            values[s.name] = _convert(s, flags[s.name], f"flag {s.flag}")
        elif s.env in env:
            values[s.name] = _convert(s, env[s.env], f"environment {s.env}")
        elif s.name in from_file:
            values[s.name] = _convert(s, from_file[s.name], f"config file {path}")
        else:
            values[s.name] = s.default
    for key in env:
        if key.startswith(ENV_PREFIX) and key != CONFIG_FILE_ENV and key[len(ENV_PREFIX) :].lower() not in BY_NAME:
            raise ConfigError(f"unknown environment variable {key} (no such setting)")
    values["in_cluster"] = bool(env.get("KUBERNETES_SERVICE_HOST"))
    values["ambient_kubeconfig"] = ambient_kubeconfig(env)
    cfg = Config(**values)
    validate(cfg, require_node=require_node)
    return cfg


def ambient_kubeconfig(env: Mapping[str, str]) -> str:
    """$KUBECONFIG without empty entries (kubectl skips them), else ~/.kube/config if it is a file."""
    listed = ":".join(p for p in env.get("KUBECONFIG", "").split(":") if p)
    if listed:
        return listed
    home = env.get("HOME")
    if not home:  # as expanduser does without HOME, but never reading os.environ behind the caller's back
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            return ""
    path = os.path.join(home, ".kube", "config")
    return path if os.path.isfile(path) else ""


def validate(cfg: Config, require_node: bool = True) -> None:
    def bad(name: str, why: str) -> ConfigError:
        s = BY_NAME[name]
        return ConfigError(f"setting {name!r} ({s.flag} / {s.env}): {why} (got {getattr(cfg, name)!r})")

    if require_node and not cfg.node:
        raise bad("node", "is required")
    if cfg.node and (len(cfg.node) > 253 or any(c.isspace() for c in cfg.node)):
        raise bad("node", "must be a Kubernetes node name")
    if cfg.min_apply_interval < 0:
        raise bad("min_apply_interval", "must be >= 0")
    if cfg.max_apply_interval <= 0 or cfg.max_apply_interval < cfg.min_apply_interval:
        raise bad("max_apply_interval", "must be > 0 and >= min_apply_interval")
    if cfg.refresh_interval < 0:
        raise bad("refresh_interval", "must be >= 0")
    if cfg.unready_failures < 1:
        raise bad("unready_failures", "must be >= 1")
    if cfg.unready_after <= 0:
        raise bad("unready_after", "must be > 0")
    if cfg.status_socket and not os.path.isabs(cfg.status_socket):
        raise bad("status_socket", "must be an absolute path")
    if len(os.fsencode(cfg.status_socket)) > 107:
        raise bad("status_socket", "is longer than a Unix socket path may be (107 bytes)")
    if not 0 <= cfg.metrics_port <= 65535:
        raise bad("metrics_port", "must be a TCP port (0-65535)")
    try:
        ipaddress.ip_address(cfg.metrics_bind)
    except ValueError:
        raise bad("metrics_bind", "must be an IP address") from None
    if cfg.manifests and not os.path.isdir(cfg.manifests):
        raise bad("manifests", "is not a directory")
    if cfg.kubeconfig and not os.path.isfile(cfg.kubeconfig):
        raise bad("kubeconfig", "is not a file")
    if cfg.kube == "off" and not cfg.manifests and require_node:
        raise bad("manifests", "a manifest directory is needed when the Kubernetes source is off")
    if require_node and not cfg.kube_enabled and not cfg.manifests:
        raise bad("manifests", "no source: give --manifests DIR, --kubeconfig FILE (or set KUBECONFIG, or "
                               "have ~/.kube/config), or run in a cluster")
    if cfg.kube == "on" and cfg.kube_client_source() == (None, False):
        raise bad("kubeconfig", "the Kubernetes source is on but there is no kubeconfig: give --kubeconfig FILE, "
                                "set KUBECONFIG, have ~/.kube/config, or run in a cluster")
    try:
        networks = parse_pod_networks(cfg.pod_networks)
    except ValueError as exc:
        raise bad("pod_networks", str(exc)) from None
    if cfg.trust_pod_ips_annotation and not networks:
        raise bad(
            "trust_pod_ips_annotation",
            "needs pod_networks: without a range the user-writable annotation could bind any address to a pod",
        )
    try:
        NodeConfig(cfg.node or "unset", cfg.iface_prefix, cfg.mark_mask, cfg.deny_action,
                   cfg.endpoint_to_host_action, cfg.ipv6)
    except ValueError as exc:
        raise ConfigError(f"invalid node settings: {exc}") from None
    if not 0 <= cfg.flow_log_group <= 65535:
        raise bad("flow_log_group", "must be an NFLOG group (0-65535)")
    for name in ("flow_log_rate", "flow_log_burst", "flow_log_max_bytes", "flow_metrics_max_labels"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if cfg.flow_log_per_source_rate < 0:
        raise bad("flow_log_per_source_rate", "must be >= 0 (0 = no per-source limit)")
    if cfg.flow_log_per_source_rate and cfg.flow_log_per_source_burst < 1:
        raise bad("flow_log_per_source_burst", "must be >= 1 when flow_log_per_source_rate is set")
    if cfg.flow_log_file and not os.path.isabs(cfg.flow_log_file):
        raise bad("flow_log_file", "must be an absolute path")


def parse_pod_networks(text: str) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/16, fd00::/56`` -> networks. Each item must be a CIDR with no host bits
    set (a typo in the range that polices pod addresses should stop the start, not widen it)."""
    out: list[IPNetwork] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "/" not in item:
            raise ValueError(f"{item!r} is not a CIDR (address/prefix length)")
        try:
            net = ipaddress.ip_network(item)
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a valid CIDR: {exc}") from None
        if net not in out:
            out.append(net)
    return tuple(out)


# --- argparse and docs -------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one flag per setting (default None = "not given", so lower layers show through)."""
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help=f"YAML config file (also {CONFIG_FILE_ENV})")
    for s in SETTINGS:
        if only is not None and s.name not in only:
            continue
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": f"{s.help} [{s.env}]"}
        if s.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = s.type.upper() if s.type != "choice" else "{" + ",".join(s.choices) + "}"
        parser.add_argument(s.flag, **kw)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None, require_node: bool = True) -> Config:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    return load(flags, env=env, config_file=getattr(args, "config_file", None), require_node=require_node)


def _fmt_default(s: Setting) -> str:
    if s.required:
        return "(required)"
    if s.name == "mark_mask":
        return f"`{s.default:#x}`"
    if s.type == "bool":
        return "`true`" if s.default else "`false`"
    if s.default == "":
        return "(empty)"
    return f"`{s.default}`"


def reference_markdown() -> str:
    """The configuration reference table, generated from SETTINGS."""
    fmt: Callable[[Setting], str] = lambda s: (  # noqa: E731
        s.type if s.type != "choice" else " \\| ".join(s.choices)
    )
    lines = [
        "Precedence: command-line flag > environment variable > config file (`--config FILE` or "
        f"`{CONFIG_FILE_ENV}`, a YAML mapping of setting: value) > default.",
        "",
        "| setting (config file) | flag | environment | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        lines.append(f"| `{s.name}` | `{s.flag}` | `{s.env}` | {fmt(s)} | {_fmt_default(s)} | {s.help} |")
    return "\n".join(lines) + "\n"
