"""Config: flags > environment > config file > default, validated with errors naming the setting."""

from __future__ import annotations

import argparse

import pytest

from policy_agent import config as C


@pytest.fixture
def mdir(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    return str(d)


def _file(tmp_path, text: str) -> str:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_with_only_required(mdir):
    cfg = C.load({"node": "n1", "manifests": mdir}, env={})
    assert cfg.node == "n1"
    assert cfg.metrics_bind == "127.0.0.1"  # localhost unless configured
    assert cfg.refresh_interval == 30.0
    assert cfg.iface_prefix == "eni"
    assert cfg.mark_mask == 0xFFFF0000
    assert not cfg.kube_enabled  # manifests given, no kubeconfig, not in a cluster


def test_precedence_flag_over_env_over_file(tmp_path, mdir):
    path = _file(tmp_path, f"node: from-file\nmanifests: {mdir}\nmetrics_port: 1111\nmin-apply-interval: 0.5\n"
                           "refresh_interval: 7\n")
    env = {"POLICY_AGENT_METRICS_PORT": "2222", "POLICY_AGENT_REFRESH_INTERVAL": "8"}
    cfg = C.load({"metrics_port": 3333}, env=env, config_file=path)
    assert cfg.metrics_port == 3333  # flag wins
    assert cfg.refresh_interval == 8.0  # env over file
    assert cfg.min_apply_interval == 0.5  # file over default (dashes accepted)
    assert cfg.node == "from-file"


def test_config_file_from_environment(tmp_path, mdir):
    path = _file(tmp_path, f"node: n2\nmanifests: {mdir}\nipv6: false\nmark_mask: 0x00ff0000\n")
    cfg = C.load({}, env={"POLICY_AGENT_CONFIG": path})
    assert cfg.node == "n2" and cfg.ipv6 is False and cfg.mark_mask == 0x00FF0000
    assert cfg.node_config().mark_mask == 0x00FF0000


def test_env_values_are_converted(mdir):
    env = {"POLICY_AGENT_NODE": "n3", "POLICY_AGENT_MANIFESTS": mdir, "POLICY_AGENT_IPV6": "no",
           "POLICY_AGENT_MARK_MASK": "0xff000000", "POLICY_AGENT_DENY_ACTION": "REJECT"}
    cfg = C.load({}, env=env)
    assert (cfg.ipv6, cfg.mark_mask, cfg.deny_action) == (False, 0xFF000000, "REJECT")


@pytest.mark.parametrize(
    "flags, env, needle",
    [
        ({}, {}, "'node'"),
        ({"node": "n"}, {"POLICY_AGENT_METRICS_PORT": "http"}, "POLICY_AGENT_METRICS_PORT"),
        ({"node": "n", "metrics_port": 70000}, {}, "metrics_port"),
        ({"node": "n", "metrics_bind": "localhost!"}, {}, "metrics_bind"),
        ({"node": "n", "deny_action": "ALLOW"}, {}, "DROP, REJECT"),
        ({"node": "n", "min_apply_interval": -1}, {}, "min_apply_interval"),
        ({"node": "n", "max_apply_interval": 0.001, "min_apply_interval": 1}, {}, "max_apply_interval"),
        ({"node": "n", "manifests": "/nonexistent/dir"}, {}, "not a directory"),
        ({"node": "n", "iface_prefix": "eth"}, {}, "reserved"),
        ({"node": "n", "mark_mask": 0x80}, {}, "mark mask"),
        ({"node": "n"}, {"POLICY_AGENT_NOPE": "1"}, "POLICY_AGENT_NOPE"),
        ({"node": "n"}, {"POLICY_AGENT_IPV6": "maybe"}, "boolean"),
        ({"node": "n"}, {}, "no source"),
    ],
)
def test_validation_names_the_setting(flags, env, needle, mdir):
    if "manifests" not in flags and needle != "no source":
        flags = {**flags, "manifests": mdir}
    with pytest.raises(C.ConfigError) as ei:
        C.load(flags, env=env)
    assert needle in str(ei.value)


def test_bad_config_file(tmp_path, mdir):
    with pytest.raises(C.ConfigError, match="unknown setting 'colour'"):
        C.load({"node": "n", "manifests": mdir}, env={}, config_file=_file(tmp_path, "colour: blue\n"))
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load({"node": "n", "manifests": mdir}, env={}, config_file=_file(tmp_path, "a: [\n"))
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.load({"node": "n", "manifests": mdir}, env={}, config_file=str(tmp_path / "missing.yaml"))
    with pytest.raises(C.ConfigError, match=r"metrics_port.* from config file .*must be an integer"):
        C.load({"node": "n", "manifests": mdir}, env={}, config_file=_file(tmp_path, "metrics_port: [1]\n"))


def test_kube_auto(mdir, tmp_path):
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\n")
    assert C.load({"node": "n", "kubeconfig": str(kc)}, env={}).kube_enabled
    assert C.load({"node": "n"}, env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).kube_enabled
    assert not C.load({"node": "n", "kube": "off", "manifests": mdir}, env={"KUBERNETES_SERVICE_HOST": "x"}).kube_enabled


def test_argparse_round_trip(mdir, tmp_path):
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    path = _file(tmp_path, "metrics_port: 4444\nipv6: false\n")
    args = p.parse_args(["--node", "n9", "--manifests", mdir, "--ipv6", "--config", path, "--mark-mask", "0xf0000"])
    cfg = C.from_args(args, env={})
    assert (cfg.node, cfg.ipv6, cfg.metrics_port, cfg.mark_mask) == ("n9", True, 4444, 0xF0000)


def test_reference_markdown_covers_every_setting():
    md = C.reference_markdown()
    for s in C.SETTINGS:
        assert f"`{s.flag}`" in md and f"`{s.env}`" in md and f"`{s.name}`" in md
    assert "`0xffff0000`" in md and "(required)" in md
