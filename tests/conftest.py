"""Suite-wide rules: kernel, apiserver and cluster tests need root; in CI a skip of one is a
failure. Tests that need the Kubernetes build or the images run last, so that on a fresh machine
the build `scripts/test.sh` starts in the background overlaps everything else."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_MUST_RUN = ("kernel", "apiserver", "cluster")
# Run order: everything else, then the API-server tier, then the real-cluster tier.
_LATE = {"apiserver": 1, "cluster": 2}


def _lateness(item) -> int:
    return max((rank for m, rank in _LATE.items() if item.get_closest_marker(m)), default=0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_lateness)  # stable: file order is kept within each group
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (creates private network namespaces)")
    for item in items:
        if any(item.get_closest_marker(m) for m in _MUST_RUN):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and any(item.get_closest_marker(m) for m in _MUST_RUN):
        # A skipped kernel test in CI hides a broken claim: fail it loudly.
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"kernel/apiserver test skipped in CI: {reason}"


@pytest.fixture(autouse=True, scope="session")
def _flow_log_in_tmp(tmp_path_factory):
    """Agents the tests start write their flow verdict log under pytest's temp dir, never
    into the machine's /var/log (an explicit --flow-log-file, as the lab passes, wins)."""
    key = "POLICY_AGENT_FLOW_LOG_FILE"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(tmp_path_factory.mktemp("flowlog") / "flows.jsonl")
    try:
        yield
    finally:
        os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def _reset_structlog():
    """Entry points configure structlog; don't let one test's set-up leak into the next.

    Each test starts with the production processor chain at debug level: structlog's
    unconfigured default renders exceptions with rich, printing every frame's locals
    (megabytes and seconds per failed apply), which made retry tests time out.
    """
    import structlog

    from policy_agent.logs import configure

    configure("console", "debug")
    yield
    structlog.reset_defaults()
