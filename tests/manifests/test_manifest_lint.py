"""Our own lint of the manifests, and their consistency with the code they deploy.

Each rule is shown to pass on the manifests and to fail on a manifest that breaks it.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from manifest_util import (
    AGENT_CAPABILITIES,
    ALL_LINTS,
    ALLOWED_RBAC,
    container,
    containers,
    covered,
    documents,
    find,
    host_mounts,
    lint_daemonset,
    lint_images,
    lint_probes,
    lint_rbac,
    lint_resources,
    lint_security,
    manifest_files,
    package_version,
)

DOCS = documents()
IDS = [i for i, _ in DOCS]


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=IDS)
def test_manifest_passes_lint(doc):
    problems = lint_images(doc, package_version())
    for lint in ALL_LINTS:
        problems += lint(doc)
    assert problems == []


def test_no_latest_anywhere():
    for path in manifest_files():
        assert ":latest" not in path.read_text(), path


# --- each rule catches what it is for -------------------------------------------------

def agent_ds():
    return copy.deepcopy(find("DaemonSet", "policy-agent"))


def test_image_lint_catches_latest_and_untagged_and_stale():
    for image, why in (("x/policy-agent:latest", ":latest"), ("x/policy-agent", "no tag"),
                       ("localhost:5000/policy-agent", "no tag"), ("x/policy-agent:0.0.9", "package version")):
        ds = agent_ds()
        container(ds, "policy-agent")["image"] = image
        problems = lint_images(ds, package_version())
        assert len(problems) == 1 and why in problems[0], (image, problems)


def test_resource_lint_catches_missing_requests_and_limits():
    ds = agent_ds()
    del container(ds, "policy-agent")["resources"]["requests"]["cpu"]
    del container(ds, "policy-agent")["resources"]["limits"]
    assert sorted(lint_resources(ds)) == [
        "container policy-agent: resources.limits.memory is not set",
        "container policy-agent: resources.requests.cpu is not set",
    ]


def test_probe_lint_catches_missing_probe_and_node_address():
    ds = agent_ds()
    del container(ds, "policy-agent")["readinessProbe"]
    del container(ds, "policy-agent")["livenessProbe"]["httpGet"]["host"]
    problems = lint_probes(ds)
    assert len(problems) == 2
    assert any("readinessProbe is not set" in p for p in problems)
    assert any("loopback" in p for p in problems)


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["get"]},
        {"apiGroups": ["policy.networking.k8s.io"], "resources": ["clusternetworkpolicies/status"], "verbs": ["update"]},
        {"apiGroups": ["policy.networking.k8s.io"], "resources": ["adminnetworkpolicies"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["*"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies/status"], "verbs": ["get"]},
    ],
)
def test_rbac_lint_catches_wider_rules(rule):
    role = copy.deepcopy(find("ClusterRole", "policy-agent"))
    role["rules"].append(rule)
    assert lint_rbac(role)


def test_security_lint_catches_privilege():
    ds = agent_ds()
    container(ds, "policy-agent")["securityContext"]["privileged"] = True
    assert lint_security(ds) == ["container policy-agent: privileged"]
    ds = agent_ds()
    sc = container(ds, "policy-agent")["securityContext"]
    sc["capabilities"]["add"].append("SYS_ADMIN")
    assert "rejected" in lint_security(ds)[0]


def test_daemonset_lint_catches_missing_toleration_priority_strategy_volume():
    ds = agent_ds()
    spec = ds["spec"]["template"]["spec"]
    spec["tolerations"] = [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]
    del spec["priorityClassName"]
    ds["spec"]["updateStrategy"] = {"type": "OnDelete"}
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "xtables-lock"]
    assert len(lint_daemonset(ds)) == 4


# --- the least-privilege claims, stated positively ---------------------------------------

def test_cluster_role_is_exactly_read_of_pods_namespaces_policies():
    granted = set()
    for rule in find("ClusterRole", "policy-agent")["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                granted |= {(g, r, v) for v in rule["verbs"]}
    assert granted == {(g, r, v) for (g, r), verbs in ALLOWED_RBAC.items() for v in verbs}


def test_only_one_cluster_role_and_it_is_bound_to_the_agent():
    roles = [d for _, d in DOCS if d["kind"] in ("ClusterRole", "Role")]
    assert [r["metadata"]["name"] for r in roles] == ["policy-agent"]
    binding = find("ClusterRoleBinding", "policy-agent")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "policy-agent"}
    sa = find("ServiceAccount", "policy-agent")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "policy-agent",
                                    "namespace": sa["metadata"]["namespace"]}]
    ds = find("DaemonSet", "policy-agent")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "policy-agent"
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"]


def test_ipamd_has_no_api_access():
    ds = find("DaemonSet", "vpcip-ipamd")
    sa = find("ServiceAccount", ds["spec"]["template"]["spec"]["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    assert ds["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    bound = {s["name"] for _, d in DOCS if d["kind"].endswith("RoleBinding") for s in d["subjects"]}
    assert "vpcip-ipamd" not in bound


def test_agent_runs_with_two_capabilities_not_privileged():
    c = container(find("DaemonSet", "policy-agent"), "policy-agent")
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert set(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    spec = find("DaemonSet", "policy-agent")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert "hostPID" not in spec


# --- consistency with the code --------------------------------------------------------

def _agent_env() -> dict[str, str]:
    ds = find("DaemonSet", "policy-agent")
    c = container(ds, "policy-agent")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(find("ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, e
            env[e["name"]] = "node-1.example"  # what the downward API fills in
    return env


def test_agent_configuration_is_accepted_by_the_agent():
    """The ConfigMap + downward API, as the kubelet would set them, load without error,
    and the probes target the port and address the agent will serve on."""
    from policy_agent import config

    env = _agent_env()
    env["KUBERNETES_SERVICE_HOST"] = "10.96.0.1"  # set by the kubelet in every pod
    cfg = config.load(env=env)
    assert cfg.node == "node-1.example"
    assert cfg.kube_enabled
    assert cfg.metrics_bind == "127.0.0.1"
    c = container(find("DaemonSet", "policy-agent"), "policy-agent")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == cfg.metrics_port
        assert c[probe]["httpGet"]["host"] == cfg.metrics_bind
    assert {c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]} == {"/livez", "/readyz"}


def test_a_bad_config_map_value_is_caught_by_the_same_check():
    from policy_agent import config

    env = _agent_env() | {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POLICY_AGENT_METRICS_PORTT": "1"}
    with pytest.raises(config.ConfigError, match="POLICY_AGENT_METRICS_PORTT"):
        config.load(env=env)


def test_agent_mounts_cover_the_paths_the_code_uses():
    from policy_agent.shared.endpoint import DEFAULT_ENDPOINT_DIR, DEFAULT_STATUS_DIR

    mounts = host_mounts(find("DaemonSet", "policy-agent"), "policy-agent")
    assert mounts["/run/xtables.lock"] == ("/run/xtables.lock", "FileOrCreate")
    assert mounts["/lib/modules"][0] == "/lib/modules"
    assert covered(DEFAULT_ENDPOINT_DIR, mounts)
    assert covered(DEFAULT_STATUS_DIR, mounts)
    # apply's metadata file (read by `policy-agent dump`) must be writable with a read-only root
    from policy_agent.dataplane.apply import default_state_path

    assert covered(default_state_path(None), mounts)
    assert not covered("/etc/policy-agent/x", mounts)


def _shim_conflist() -> dict:
    data = find("ConfigMap", "vpcip-cni-config")["data"]
    (name, text), = data.items()
    return name, json.loads(text)


def test_shim_conflist_is_valid_for_the_plugin_and_matches_the_mounts():
    from cni_shim.install import validate_conflist

    name, conf = _shim_conflist()
    validate_conflist(conf, name)  # includes cni_shim.protocol.parse_netconf
    plugin = conf["plugins"][0]
    ds = find("DaemonSet", "vpcip-ipamd")
    daemon = host_mounts(ds, "vpcip-ipamd")
    agent = host_mounts(find("DaemonSet", "policy-agent"), "policy-agent")
    # The executable (on the host) and the daemon meet at the socket; the records
    # the daemon writes are where the agent reads them.
    assert covered(plugin["ipamSocket"], daemon)
    for key in ("endpointDir", "statusDir"):
        assert covered(plugin[key], daemon) and covered(plugin[key], agent)
    cmd = container(ds, "vpcip-ipamd")["command"]
    assert f"--socket={plugin['ipamSocket']}" in cmd
    state = next(a.split("=", 1)[1] for a in cmd if a.startswith("--state-dir="))
    assert covered(state, daemon)
    for probe in ("livenessProbe", "readinessProbe"):
        assert plugin["ipamSocket"] in " ".join(container(ds, "vpcip-ipamd")[probe]["exec"]["command"])
    from policy_agent.shared.naming import DEFAULT_IFACE_PREFIX

    assert plugin["vethPrefix"] == _agent_env()["POLICY_AGENT_IFACE_PREFIX"] == DEFAULT_IFACE_PREFIX


def test_install_cni_init_container_matches_the_installer():
    from cni_shim import install

    ds = find("DaemonSet", "vpcip-ipamd")
    c = container(ds, "install-cni")
    assert c["command"][:3] == ["python", "-m", "cni_shim.install"]
    args = install.build_parser().parse_args(c["command"][3:])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    for host_dir in (args.bin_dir, args.conf_dir):
        inside = args.root.rstrip("/") + host_dir
        assert volumes[mounts[inside]]["hostPath"]["path"] == host_dir
    name, _ = _shim_conflist()
    assert args.name == name and args.conflist.endswith("/" + name)
    conf_mount = next(m for m in c["volumeMounts"] if args.conflist.startswith(m["mountPath"] + "/"))
    assert volumes[conf_mount["name"]]["configMap"]["name"] == "vpcip-cni-config"


def test_commands_in_manifests_are_our_entry_points():
    import configparser

    from manifest_util import REPO

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = {line.split("=")[0].strip() for line in cfg["options.entry_points"]["console_scripts"].split("\n")
               if line.strip()}
    for _, d in DOCS:
        if d["kind"] != "DaemonSet":
            continue
        for _, c in containers(d["spec"]["template"]["spec"]):
            exe = c["command"][0]
            assert exe in scripts | {"python"}, (c["name"], exe)
            if exe == "python":
                assert importlib.util.find_spec(c["command"][2]) is not None


@pytest.mark.parametrize("doc", [d for _, d in DOCS if d["kind"] == "NetworkPolicy"],
                         ids=[i for i, d in DOCS if d["kind"] == "NetworkPolicy"])
def test_examples_parse_into_the_agent_model(doc):
    from policy_agent.model.parse import parse_network_policy

    policy = parse_network_policy(doc)
    assert policy.namespace == doc["metadata"]["namespace"]
    assert policy.name == doc["metadata"]["name"]


def test_examples_cover_the_three_cases():
    from policy_agent.model.parse import parse_network_policy

    policies = {d["metadata"]["name"]: parse_network_policy(d) for _, d in DOCS if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert not deny.ingress and not deny.egress and len(deny.policy_types) == 2
    assert policies["allow-from-frontend"].ingress[0].peers
    egress = find("NetworkPolicy", "billing-egress")["spec"]["egress"]
    blocks = [p["ipBlock"] for r in egress for p in r["to"] if "ipBlock" in p]
    assert any(b.get("except") for b in blocks)


def test_agent_and_daemon_commands_parse_with_the_real_parsers():
    """The argv in the manifests (and the cleanup command in docs/install.md) is accepted
    by the programs themselves, and the agent's flags + the ConfigMap load as a Config."""
    from policy_agent import cli, config

    agent = container(find("DaemonSet", "policy-agent"), "policy-agent")["command"]
    assert agent[0] == "policy-agent"
    args = cli.build_parser().parse_args(agent[1:])
    assert args.command == "run" and args.log_format == "json"
    cfg = config.from_args(args, env=_agent_env() | {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert cfg.node == "node-1.example" and cfg.iface_prefix == "eni"
    assert cli.build_parser().parse_args(["cleanup"]).command == "cleanup"

    from cni_shim import daemon

    ipamd = container(find("DaemonSet", "vpcip-ipamd"), "vpcip-ipamd")["command"]
    assert ipamd[0] == "vpcip-ipamd"
    dargs = daemon.parse_args(ipamd[1:])
    assert dargs.state_dir == "/var/run/vpcip-ipam" and dargs.log_format == "json"
