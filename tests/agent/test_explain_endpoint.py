"""GET /explain: served where /status is (the root-only Unix socket; TCP only with
status_over_tcp), bad questions answered 400, no answer before the first apply.
The answers' content against the real kernel and traffic: tests/conformance/test_live_explain.py."""

from __future__ import annotations

import json
import os

import pytest
from agent_helpers import ManualSource, allow_from, make_pod
from obs_helpers import http_get, short_dir

from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.obs.server import ObsServer

Q = "/explain?from=10.233.0.99&to=secret-ns/secret-pod&port=80"


@pytest.fixture
def agent(tmp_path):
    src = ManualSource("kube")
    a = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [src], status_dir=str(tmp_path / "st"),
              min_interval=0.0, refresh_interval=0, gc_freeze=False)
    a.start()
    yield a, src
    a.stop()


def _ready(a, src) -> None:
    src.replace("Namespace", {})
    src.replace("Pod", {("secret-ns", "secret-pod"): make_pod("secret-ns", "secret-pod", ["10.233.0.10"])})
    src.replace("NetworkPolicy", {("secret-ns", "p"): allow_from("secret-ns", "p", {"app": "secret-pod"},
                                                                  {"app": "other"}, port=80)})
    src.in_sync()
    assert a.wait_ready(30)


@pytest.mark.parametrize("over_tcp", [False, True])
def test_explain_where_status_is(agent, over_tcp):
    a, src = agent
    with short_dir() as d:
        server = ObsServer(a, "127.0.0.1", 0, socket_path=os.path.join(d, "run", "agent.sock"),
                           status_over_tcp=over_tcp, timeout=5.0)
        server.start()
        try:
            code, _, body = http_get(server.socket_path, Q)
            assert code == 503 and "not applied a desired state yet" in body
            _ready(a, src)
            code, ctype, body = http_get(server.socket_path, Q)
            assert code == 200 and ctype == "application/json"
            [ans] = json.loads(body)["answers"]
            assert ans["mode"] == "live" and ans["node"] == "n1" and ans["verdict"] == "DROP", ans
            assert ans["flow"]["dst_name"] == "secret-ns/secret-pod"
            code, _, body = http_get(server.url, Q)
            if over_tcp:
                assert code == 200 and json.loads(body)["answers"][0]["verdict"] == "DROP"
            else:
                assert code == 404 and "Unix socket" in body and "secret" not in body
            for bad, why in (("/explain?from=a", "give from="), ("/explain?from=a&to=b&port=x", "number")):
                code, _, body = http_get(server.socket_path, bad)
                assert code == 400 and why in json.loads(body)["error"]
        finally:
            server.stop()
