"""Parsing /proc/net/ip_vs for kube-proxy IPVS detection (the link check is a kernel test:
tests/kernel/test_kube_proxy_modes.py)."""

from __future__ import annotations

from policy_agent.dataplane.kubeproxy import ipvs_virtual_services

HEADER = (
    "IP Virtual Server version 1.2.1 (size=4096)\n"
    "Prot LocalAddress:Port Scheduler Flags\n"
    "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
)


def test_module_loaded_without_services_is_not_ipvs_mode():
    assert ipvs_virtual_services("") == 0
    assert ipvs_virtual_services(HEADER) == 0


def test_virtual_services_are_counted_not_real_servers():
    text = HEADER + (
        "TCP  0AE9FA0A:0050 rr\n"
        "  -> 0AE94803:1F90      Masq    1      0          0\n"
        "  -> 0AE94804:1F90      Masq    1      0          0\n"
        "UDP  0AE9FA0B:0035 rr\n"
        "SCTP 0AE9FA0C:0050 rr\n"
        "FWM  00000001 rr\n"
        "TCP  [FD00:0233:0000:0000:0000:0000:0000:0010]:0050 rr\n"
    )
    assert ipvs_virtual_services(text) == 5
