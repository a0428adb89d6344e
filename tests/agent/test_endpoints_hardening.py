"""The agent's endpoints under hostile local clients, over real sockets: timeouts, a bounded
thread count, /status readable by root only (Unix socket 0600 in a 0700 directory), no
object names in the TCP metrics; and the readiness thresholds as settings."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from agent_helpers import ManualSource, allow_from, make_pod, wait_for
from obs_helpers import http_get, short_dir

from policy_agent import agent as agent_mod
from policy_agent import config
from policy_agent.agent import Agent
from policy_agent.commands.run import build_agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.lab import netns
from policy_agent.obs.server import ObsServer, status_socket_path

WORKERS, BACKLOG = 3, 2


@pytest.fixture
def served(tmp_path):
    """A ready agent (fake kernel) behind an ObsServer with a short timeout and a small pool."""
    src = ManualSource("kube")
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [src], status_dir=str(tmp_path / "st"),
                  min_interval=0.0, refresh_interval=0, gc_freeze=False)
    agent.start()
    src.replace("Namespace", {})
    src.replace("Pod", {("secret-ns", "secret-pod"): make_pod("secret-ns", "secret-pod", ["10.233.0.10"],
                                                              labels={"app": "secret-app"})})
    src.replace("NetworkPolicy", {("secret-ns", "secret-policy"): allow_from(
        "secret-ns", "secret-policy", {"app": "secret-app"}, {"app": "other"}, port=80)})
    src.in_sync()
    assert agent.wait_ready(30)
    with short_dir() as d:
        before = threading.active_count()
        server = ObsServer(agent, "127.0.0.1", 0, socket_path=os.path.join(d, "run", "agent.sock"),
                           workers=WORKERS, backlog=BACKLOG, timeout=3.0)
        server.start()
        try:
            yield agent, server, before
        finally:
            server.stop()
            agent.stop()


def _readyz(server) -> tuple[int, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(server.url + "/readyz", timeout=10) as r:
        return r.status, time.monotonic() - t0


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def _pending_bytes(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return b""
    finally:
        sock.setblocking(True)


def test_a_slowloris_client_is_cut_after_the_timeout_and_blocks_nobody(served):
    agent, server, _ = served
    trickle = b"GET /readyz HTTP/1.0\r\n" + b"X-Slow: " + b"a" * 1000  # never ends: only a deadline stops it
    s = socket.create_connection(server.address)
    t0 = time.monotonic()
    cut_after = None
    answered = []
    try:
        for i, byte in enumerate(trickle):
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_after = time.monotonic() - t0
                break
            if i == 1:  # the slow client holds a worker now: others are still served at once
                answered = [_readyz(server) for _ in range(5)]
            time.sleep(1.0)  # one byte a second
            if _closed_by_peer(s):
                cut_after = time.monotonic() - t0
                break
            assert time.monotonic() - t0 < 15, "slow client never cut"
    finally:
        s.close()
    assert cut_after is not None and 2.5 <= cut_after <= 6.0, cut_after  # timeout=3 s for the whole request
    assert [code for code, _ in answered] == [200] * 5
    assert max(took for _, took in answered) < 2.0  # not queued behind the slow client (cut at 3 s)


def test_idle_connections_beyond_the_bound_create_no_threads_and_are_refused_at_once(served):
    agent, server, before = served
    assert threading.active_count() == before + WORKERS + 1  # the pool and the accept thread, made at start
    idle = []
    try:
        for _ in range(50):
            idle.append(socket.create_connection(server.address))
        wait_for(lambda: server.refused >= 50 - WORKERS - BACKLOG, timeout=5, what="excess refused")
        assert threading.active_count() == before + WORKERS + 1
        assert server.refused == 50 - WORKERS - BACKLOG  # nothing finished yet: every slot is held
        busy = [c for c in idle if _pending_bytes(c).startswith(b"HTTP/1.0 503 ")]
        assert len(busy) == server.refused
        # A request now is answered at once (503 busy), not queued behind the idle ones.
        t0 = time.monotonic()
        code, _, body = http_get(server.url, "/readyz")
        assert (code, body) == (503, "busy\n") and time.monotonic() - t0 < 1.0
        # The Unix socket shares the bound and is refused at once too (503, or a closed
        # connection when the close beats the client's request: a Unix peer sees EPIPE).
        t0 = time.monotonic()
        try:
            outcome = http_get(server.socket_path, "/status")[0]
        except (BrokenPipeError, ConnectionResetError):
            outcome = "closed"
        assert outcome in (503, "closed") and time.monotonic() - t0 < 1.0
    finally:
        for c in idle:
            c.close()
    # The idle ones were cut by the timeout (or closed): service is back, with the same threads.
    wait_for(lambda: http_get(server.url, "/readyz")[0] == 200, timeout=10, what="served again")
    assert threading.active_count() == before + WORKERS + 1


def test_status_only_on_the_unix_socket_and_metrics_without_names(served):
    agent, server, _ = served
    code, _, body = http_get(server.url, "/status")
    assert code == 404 and "Unix socket" in body
    code, _, body = http_get(server.socket_path, "/status")
    assert code == 200 and json.loads(body)["counts"]["pods"] == 1
    # Prometheus on TCP: counts only, no namespace, pod, label or policy names.
    _, _, tcp = http_get(server.url, "/metrics")
    assert "policy_agent_local_endpoints 1.0" in tcp
    assert "secret" not in tcp
    assert "secret" not in http_get(server.socket_path, "/metrics")[2]  # not even for root: labels are bounded


def test_socket_is_0600_in_a_0700_directory(served):
    _, server, _ = served
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    dst = os.stat(os.path.dirname(server.socket_path))
    assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == 0


def _connect_as(uid: int | None, path: str) -> str:
    """connect() to ``path`` from a forked child running as ``uid`` (None: stay root)."""
    pid = os.fork()
    if pid == 0:  # child: no pytest, no locks; only raw syscalls, then _exit
        code = 99
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                code = 10
            except PermissionError:
                code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {10: "connected", 13: "denied"}.get(os.waitstatus_to_exitcode(status), "error")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_a_non_root_user_cannot_connect(served):
    _, server, _ = served
    path = server.socket_path
    d = os.path.dirname(path)
    assert _connect_as(None, path) == "connected"  # control: root can
    assert _connect_as(65534, path) == "denied"
    # Each layer alone is enough: the socket's 0600 with a searchable directory ...
    os.chmod(d, 0o711)
    try:
        assert _connect_as(65534, path) == "denied"
    finally:
        os.chmod(d, 0o700)
    # ... and the 0700 directory with a world-writable socket.
    os.chmod(path, 0o666)
    try:
        assert _connect_as(65534, path) == "denied"
    finally:
        os.chmod(path, 0o600)
    assert _connect_as(None, path) == "connected"


def test_the_socket_directory_must_be_private_and_is_never_chmodded(tmp_path):
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [], gc_freeze=False)
    with short_dir() as d:
        os.chmod(d, 0o755)  # e.g. someone points status_socket into a shared directory
        with pytest.raises(OSError, match=r"status_socket.*mode 0700.*0755"):
            ObsServer(agent, "127.0.0.1", 0, socket_path=os.path.join(d, "agent.sock"))
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
        assert not os.path.exists(os.path.join(d, "agent.sock"))
        # A file that is not a socket is never removed.
        os.chmod(d, 0o700)
        with open(os.path.join(d, "agent.sock"), "w") as f:
            f.write("precious")
        with pytest.raises(OSError, match="not a socket"):
            ObsServer(agent, "127.0.0.1", 0, socket_path=os.path.join(d, "agent.sock"))
        assert open(os.path.join(d, "agent.sock")).read() == "precious"


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_stolen():
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [], gc_freeze=False)
    with short_dir() as d:
        path = os.path.join(d, "agent.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)  # bound, never listening: what a killed agent leaves
        stale.close()
        first = ObsServer(agent, "127.0.0.1", 0, socket_path=path)
        first.start()
        try:
            assert http_get(path, "/livez")[0] == 503  # served (the agent loop is not started)
            with pytest.raises(OSError) as err:
                ObsServer(agent, "127.0.0.1", 0, socket_path=path)
            assert err.value.errno == errno.EADDRINUSE and "another agent" in str(err.value)
            assert http_get(path, "/livez")[0] == 503  # still the first one's
        finally:
            first.stop()
        assert not os.path.exists(path)  # removed on stop


def test_default_socket_path_follows_netns():
    assert status_socket_path() == "/run/policy-agent/private/agent.sock"
    assert status_socket_path("", "lab1") == "/run/policy-agent/private/agent-lab1.sock"
    assert status_socket_path("/x/y.sock", "lab1") == "/x/y.sock"
    with pytest.raises(ValueError, match="status_socket"):
        status_socket_path("", "n" * 100)


# --- readiness thresholds as settings ------------------------------------------------------


def test_readiness_thresholds_are_settings_that_reach_the_agent(tmp_path):
    mdir = tmp_path / "m"
    mdir.mkdir()
    cfg = config.load({"node": "n1", "manifests": str(mdir), "unready_failures": 7},
                      env={"POLICY_AGENT_UNREADY_AFTER": "12.5"})
    agent = build_agent(cfg, dataplane=Dataplane(kernel=FakeKernel()), sources=[])
    assert (agent.unready_failures, agent.unready_after) == (7, 12.5)
    # The defaults are the agent's own.
    cfg = config.load({"node": "n1", "manifests": str(mdir)}, env={})
    assert (cfg.unready_failures, cfg.unready_after) == (agent_mod.UNREADY_FAILURES, agent_mod.UNREADY_AFTER)
    assert (cfg.status_socket, cfg.status_over_tcp) == ("", False)


@pytest.mark.parametrize("env, name", [
    ({"POLICY_AGENT_UNREADY_FAILURES": "0"}, "unready_failures"),
    ({"POLICY_AGENT_UNREADY_AFTER": "-1"}, "unready_after"),
    ({"POLICY_AGENT_UNREADY_AFTER": "soon"}, "unready_after"),
    ({"POLICY_AGENT_STATUS_SOCKET": "relative.sock"}, "status_socket"),
    ({"POLICY_AGENT_STATUS_SOCKET": "/" + "x" * 120}, "status_socket"),
    ({"POLICY_AGENT_STATUS_OVER_TCP": "maybe"}, "status_over_tcp"),
])
def test_bad_endpoint_settings_name_the_setting(tmp_path, env, name):
    with pytest.raises(config.ConfigError, match=name):
        config.load({"node": "n1", "manifests": str(tmp_path)}, env=env)


# --- the real command ------------------------------------------------------------------------


@pytest.mark.kernel
def test_run_serves_status_on_the_default_socket_and_status_reads_it(tmp_path):
    node = netns.unique_name("h6", "ep")
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "POLICY_AGENT_METRICS_PORT": str(port)}
    sock = status_socket_path("", node)
    cmd = [sys.executable, "-m", "policy_agent.cli", "--log-format", "json", "run", "--node", "n1",
           "--manifests", str(mdir), "--kube", "off", "--netns", node, "--no-link-monitor",
           "--endpoint-dir", str(tmp_path / "ep"), "--status-dir", str(tmp_path / "st"),
           "--state-file", str(tmp_path / "state.json")]
    netns.create(node)
    log = open(tmp_path / "agent.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            try:
                return http_get(f"http://127.0.0.1:{port}", "/readyz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, 90, what="agent ready")
        assert http_get(f"http://127.0.0.1:{port}", "/status")[0] == 404
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
        r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--netns", node, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["node"] == "n1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not os.path.exists(sock)  # removed on a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        netns.delete(node)
