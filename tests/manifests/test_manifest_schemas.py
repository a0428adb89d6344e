"""Every manifest validates against the Kubernetes OpenAPI schemas of several versions.

kubernetes-validate ships the schemas in its package data: no network at test time.
Strict mode also rejects fields the schema does not know (a typo is an error).
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from manifest_util import documents, find

# Four recent minor versions; the oldest still covers clusters a year or more behind.
VERSIONS = ("1.31.0", "1.33.0", "1.35.0", "1.37.0")
DOCS = documents()


def test_the_validator_ships_our_versions():
    shipped = {v.rsplit(".", 1)[0] for v in all_versions()}
    assert {v.rsplit(".", 1)[0] for v in VERSIONS} <= shipped


def test_manifests_are_found():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
            "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[i for i, _ in DOCS])
def test_manifest_validates(doc, version):
    assert kubernetes_validate.validate(doc, version, strict=True) == version.rsplit(".", 1)[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_validation_is_not_vacuous(version):
    """A misspelt field and a wrong type are caught, so a pass above means something."""
    ds = copy.deepcopy(find("DaemonSet", "policy-agent"))
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, version, strict=True)
    ds = copy.deepcopy(find("DaemonSet", "policy-agent"))
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, version, strict=True)
