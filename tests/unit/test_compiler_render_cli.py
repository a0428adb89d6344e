"""`policy-agent render`: files, directories, stdin, errors and --keep-going."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from policy_agent import cli

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.233.0.5}]}
---
apiVersion: v1
kind: Service
metadata: {name: ignored, namespace: app}
spec: {ports: [{port: 80}]}
"""

BAD_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: app}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}
"""

GOOD_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: app}
spec:
  podSelector: {}
"""


def _run(argv, capsys):
    rc = cli.main(["render", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_renders_directory_with_sections(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(GOOD)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "p.yml").write_text(GOOD_POLICY)
    (sub / "notes.txt").write_text("not yaml: [")
    rc, out, err = _run(["--node", "n1", str(tmp_path)], capsys)
    assert rc == 0, err
    for header in ("# ==== local endpoints ====", "# ==== iptables (IPv4) ====", "# ==== ip6tables (IPv6) ====",
                   "# ==== ipset ===="):
        assert header in out
    assert "# app/web eni" in out and "ingress=app/deny" in out
    assert "app/web: no ingress policy allowed the packet" in out
    rc2, out2, _ = _run(["--node", "n1", str(tmp_path)], capsys)
    assert out2 == out  # deterministic


def test_invalid_object_names_object_and_field_and_exits_2(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(BAD_POLICY)
    rc, out, err = _run(["--node", "n1", str(tmp_path)], capsys)
    assert rc == 2
    assert out == ""
    assert "app/broken" in err and "spec.ingress[0].from[0].ipBlock.except[0]" in err and "b.yaml" in err


def test_keep_going_renders_the_rest_and_exits_1(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(GOOD + "---" + BAD_POLICY + "---" + GOOD_POLICY)
    rc, out, err = _run(["--node", "n1", "--keep-going", str(tmp_path / "a.yaml")], capsys)
    assert rc == 1
    assert "app/broken" in err
    assert "ingress=app/deny" in out and "broken" not in out


def test_no_ipv6_and_options(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(GOOD + "---" + GOOD_POLICY)
    rc, out, _ = _run(["--node", "n1", "--no-ipv6", "--iface-prefix", "cali", "--deny-action", "REJECT",
                       "--mark-mask", "0x00f00000", str(tmp_path)], capsys)
    assert rc == 0
    assert "IPv6" not in out and "-i cali+" in out and "-j REJECT" in out and "0x100000/0x100000" in out
    rc, _, err = _run(["--node", "n1", "--mark-mask", "0x80", str(tmp_path)], capsys)
    assert rc == 2 and "mark mask" in err


def test_missing_file_exits_2(tmp_path, capsys):
    rc, _, err = _run(["--node", "n1", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "nope.yaml" in err


def test_entrypoint_reads_stdin():
    exe = Path(sys.executable).with_name("policy-agent")
    proc = subprocess.run([str(exe), "render", "--node", "n1", "-"], input=GOOD, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "-A pa-FORWARD" in proc.stdout
