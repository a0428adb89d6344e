"""Which kubeconfig the agent uses, as kubectl/client-go resolve it.

--kubeconfig / POLICY_AGENT_KUBECONFIG > in-cluster (KUBERNETES_SERVICE_HOST) >
$KUBECONFIG (colon-separated, merged by the official client's loader) > ~/.kube/config.
The real-API-server side (`run` with only KUBECONFIG set goes ready) is in
tests/apiserver/test_kubeconfig_env.py.
"""

from __future__ import annotations

import pytest

from policy_agent import config as C


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    (h / ".kube").mkdir(parents=True)
    (h / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
    return h


def _kc(tmp_path, name: str) -> str:
    p = tmp_path / name
    p.write_text("apiVersion: v1\nkind: Config\n")
    return str(p)


def test_only_kubeconfig_env_is_a_source(tmp_path):
    kc = _kc(tmp_path, "a")
    cfg = C.load({"node": "n"}, env={"KUBECONFIG": kc, "HOME": str(tmp_path / "nohome")})
    assert cfg.kube_enabled
    assert cfg.kube_client_source() == (kc, False)


def test_colon_list_kept_whole_for_the_loader_to_merge(tmp_path):
    a, b = _kc(tmp_path, "a"), _kc(tmp_path, "b")
    cfg = C.load({"node": "n"}, env={"KUBECONFIG": f":{a}::{b}:", "HOME": str(tmp_path)})
    assert cfg.kube_client_source() == (f"{a}:{b}", False)  # empty entries dropped, as kubectl does


def test_home_kube_config_when_nothing_else(home):
    cfg = C.load({"node": "n"}, env={"HOME": str(home)})
    assert cfg.kube_enabled
    assert cfg.kube_client_source() == (str(home / ".kube" / "config"), False)


def test_no_home_config_no_source(tmp_path):
    with pytest.raises(C.ConfigError, match="no source: .*KUBECONFIG"):
        C.load({"node": "n"}, env={"HOME": str(tmp_path)})


def test_precedence(tmp_path, home):
    flag, envkc = _kc(tmp_path, "flag"), _kc(tmp_path, "env")
    base = {"HOME": str(home), "KUBECONFIG": envkc}
    # --kubeconfig (or POLICY_AGENT_KUBECONFIG) wins over everything
    assert C.load({"node": "n", "kubeconfig": flag}, env={**base, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
                  ).kube_client_source() == (flag, False)
    assert C.load({"node": "n"}, env={**base, "POLICY_AGENT_KUBECONFIG": flag}).kube_client_source() == (flag, False)
    # in-cluster beats $KUBECONFIG and ~/.kube/config
    assert C.load({"node": "n"}, env={**base, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}).kube_client_source() == (
        None, True)
    # $KUBECONFIG beats ~/.kube/config
    assert C.load({"node": "n"}, env=base).kube_client_source() == (envkc, False)


def test_manifest_directory_keeps_ambient_kubeconfig_off(tmp_path, home):
    """A developer's exported KUBECONFIG must not add a cluster to a manifests-only run."""
    mdir = tmp_path / "m"
    mdir.mkdir()
    cfg = C.load({"node": "n", "manifests": str(mdir)}, env={"HOME": str(home), "KUBECONFIG": _kc(tmp_path, "k")})
    assert not cfg.kube_enabled
    assert C.load({"node": "n", "manifests": str(mdir), "kube": "on"},
                  env={"HOME": str(home)}).kube_enabled


def test_kube_on_without_any_kubeconfig_names_the_setting(tmp_path):
    mdir = tmp_path / "m"
    mdir.mkdir()
    with pytest.raises(C.ConfigError, match="'kubeconfig'.*no kubeconfig"):
        C.load({"node": "n", "manifests": str(mdir), "kube": "on"}, env={"HOME": str(tmp_path)})
