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

from policy_agent.compiler.options import DEFAULT_MARK_MASK, NodeConfig
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
        "Kubernetes API source: auto (on when a kubeconfig is given or running in a cluster "
        "and no manifest directory is set), on, off.",
        choices=("auto", "on", "off"),
    ),
    Setting("kubeconfig", "path", "", "kubeconfig file; empty = in-cluster service account."),
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
        "ACCEPT",
        "Pod-to-own-node traffic after egress policy.",
        choices=("ACCEPT", "DROP"),
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
    Setting("refresh_interval", "float", 30.0, "Seconds between kernel read-backs that repair drift (0 = off)."),
    Setting("metrics_bind", "str", "127.0.0.1", "Address of the health/metrics/status HTTP server."),
    Setting("metrics_port", "int", 9909, "Port of the health/metrics/status HTTP server (0 = any free port)."),
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
    endpoint_to_host_action: str = "ACCEPT"
    ipv6: bool = True
    iptables_backend: str = "auto"
    state_file: str = ""
    min_apply_interval: float = 0.02
    max_apply_interval: float = 300.0
    refresh_interval: float = 30.0
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 9909
    in_cluster: bool = False  # KUBERNETES_SERVICE_HOST was set (derived, not a setting)

    def node_config(self) -> NodeConfig:
        return NodeConfig(
            node_name=self.node,
            iface_prefix=self.iface_prefix,
            mark_mask=self.mark_mask,
            deny_action=self.deny_action,
            endpoint_to_host_action=self.endpoint_to_host_action,
            ipv6=self.ipv6,
        )

    @property
    def kube_enabled(self) -> bool:
        if self.kube == "on":
            return True
        if self.kube == "off":
            return False
        return bool(self.kubeconfig) or (self.in_cluster and not self.manifests)


assert [f.name for f in fields(Config)][:-1] == [s.name for s in SETTINGS], "Config fields and SETTINGS differ"


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
    cfg = Config(**values)
    validate(cfg, require_node=require_node)
    return cfg


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
        raise bad("manifests", "no source: give --manifests DIR, --kubeconfig FILE, or run in a cluster")
    try:
        NodeConfig(cfg.node or "unset", cfg.iface_prefix, cfg.mark_mask, cfg.deny_action,
                   cfg.endpoint_to_host_action, cfg.ipv6)
    except ValueError as exc:
        raise ConfigError(f"invalid node settings: {exc}") from None


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
