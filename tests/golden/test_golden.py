"""Golden dumps: each examples/<name>/ cluster rendered for node-1 must equal
tests/golden/<name>.txt byte for byte. Review a diff like code; regenerate with

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/golden
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policy_agent import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent
# The example clusters this suite owns; another directory under examples/ (e.g. a
# lab demo that holds only policies) is checked too once someone adds its golden file.
CLUSTERS = ("default-deny", "egress-allowlist", "ports-dualstack")
NAMES = sorted(set(CLUSTERS) | {p.stem for p in GOLDEN.glob("*.txt")})


def test_every_golden_has_its_example():
    assert {p.stem for p in GOLDEN.glob("*.txt")} <= {p.name for p in EXAMPLES.iterdir() if p.is_dir()}


@pytest.mark.parametrize("name", NAMES)
def test_golden_dump(name, capsys):
    rc = cli.main(["render", "--node", "node-1", str(EXAMPLES / name)])
    out = capsys.readouterr().out
    assert rc == 0
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(out)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert out == path.read_text(), f"{name}: render differs from {path} (UPDATE_GOLDEN=1 to accept after review)"
