"""docs/install.md carries exactly the configuration reference generated from the code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from manifest_util import REPO

SCRIPT = REPO / "scripts" / "gen-config-docs.py"
DOC = REPO / "docs" / "install.md"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config():
    # Skip only while the config module does not exist yet; any other import error fails.
    if importlib.util.find_spec("policy_agent.config") is None:
        pytest.skip("policy_agent/config.py does not exist yet")
    import policy_agent.config

    return policy_agent.config


def test_install_doc_contains_exactly_the_generated_reference():
    config, gen = _config(), _gen()
    text = DOC.read_text()
    assert text.count(gen.BEGIN) == 1 and text.count(gen.END) == 1
    between = text.split(gen.BEGIN)[1].split(gen.END)[0]
    assert between.strip("\n") == config.reference_markdown().rstrip("\n")
    # every setting appears (the reference is not empty or truncated)
    for s in config.SETTINGS:
        assert f"`{s.env}`" in between


def test_check_mode_passes_on_the_doc_and_fails_on_a_stale_copy(tmp_path):
    _config()
    run = [sys.executable, str(SCRIPT), "--check"]
    assert subprocess.run(run, capture_output=True, timeout=120).returncode == 0
    stale = tmp_path / "install.md"
    stale.write_text(DOC.read_text().replace("POLICY_AGENT_METRICS_PORT", "POLICY_AGENT_OLD_NAME"))
    proc = subprocess.run(run + [str(stale)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    # regenerating repairs it, and leaves the rest of the document alone
    assert subprocess.run([sys.executable, str(SCRIPT), str(stale)], capture_output=True, timeout=120).returncode == 0
    assert stale.read_text() == DOC.read_text()


def test_splice_replaces_only_between_markers_and_rejects_bad_markers():
    gen = _gen()
    text = f"intro\n{gen.BEGIN}\nold\n{gen.END}\noutro\n"
    assert gen.splice(text, "new\n") == f"intro\n{gen.BEGIN}\nnew\n{gen.END}\noutro\n"
    for bad in ("no markers", f"{gen.END}\n{gen.BEGIN}\n", f"{gen.BEGIN}{gen.BEGIN}{gen.END}"):
        with pytest.raises(ValueError):
            gen.splice(bad, "x")
