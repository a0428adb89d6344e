"""Fixtures: moto's EC2 server (one per module, reset per test), an IMDSv2 server, a fault proxy."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from emulator import CREDS, REGION, FaultProxy, ImdsServer, ec2_client, make_node, metadata_for, reset_moto, start_moto  # noqa: E402


@pytest.fixture(scope="module")
def moto_url():
    srv, url = start_moto()
    yield url
    srv.stop()


@pytest.fixture
def emu(moto_url, monkeypatch):
    """A fresh emulated EC2 behind the fault proxy; make(...) builds the node and its IMDS."""
    reset_moto(moto_url)
    proxy = FaultProxy(moto_url)
    servers = []
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", proxy.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_REGION", REGION)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(var, raising=False)

    class Emu:
        ec2 = ec2_client(moto_url)
        url = moto_url

        def __init__(self):
            self.proxy = proxy
            self.node = None
            self.imds = None

        def make(self, **kw):
            self.node = make_node(self.ec2, **kw)
            self.imds = ImdsServer(metadata_for(self.ec2, self.node))
            servers.append(self.imds)
            monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.imds.url)
            return self.node

    yield Emu()
    for s in servers:
        s.close()
    proxy.close()
