"""``overlayd check`` and the daemon's ``--probe-interval`` on dual-stack and IPv6-only clusters
(issue 20): each family of each peer is a row (and a metric label) of its own, and a fault in one
family's datapath is named with that family while the other family stays ok.

The clusters are the dual-stack e2e's (tests/e2e/test_dual_stack.py: IPv6 underlay from
2001:db8::/32, overlay fd00::/48 beside 10.244.0.0/16 or alone, vxlan, the embedded store).
``check`` runs on host0 after its daemon was stopped (SIGTERM keeps the kernel state), so nothing
repairs the sabotage before the check reads the kernel.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import pytest
from overlayd import _topology as topo
from overlayd.check import MTU_BLACKHOLE, NOT_PROGRAMMED, OK

from . import test_dual_stack as ds
from .test_observability import PORT, lo_up, value, wait_metric

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

STORE = "embedded"


def run_check(cluster: topo.Cluster, host: topo.Host) -> tuple[int, dict[str, Any], str]:
    proc = cluster.overlayd_cli(*ds.store_args(cluster, STORE), "--iface", host.underlay_if,
                                "--subnet-file", str(host.subnet_file), "check", "--json", "--count", "2",
                                host=host.index, timeout=60)  # fmt: skip
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def rows(doc: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """(family, peer subnet) -> the check's row."""
    return {(peer["family"], peer["subnet"]): peer for peer in doc["peers"]}


def nft(host: topo.Host, *rule: str) -> None:
    host.exec(["nft", *rule])


@pytest.mark.parametrize("mode", ds.MODES)
def test_check_and_probes_name_the_broken_family(make_cluster, figures, mode):
    if shutil.which("nft") is None:
        pytest.skip("needs nft (apt-get install nftables)")
    families = ds.families(mode)
    cluster = ds.make_dual_cluster(make_cluster, mode, STORE)
    ds.init_network(cluster, STORE, mode, "vxlan")
    args = [*ds.daemon_args(cluster, STORE, "vxlan"), "--healthz-port", str(PORT),  # the scrape's port
            "--probe-interval", "0.5", "--probe-per-peer"]  # fmt: skip
    for host in cluster.hosts:
        lo_up(host)
        host.start_daemon(args)
    for host in cluster.hosts:
        host.wait_ready(30)
    ds.wait_mesh_routes(cluster)
    topo.settle_ipv6([host.ns for host in cluster.hosts])
    subnets = ds.overlay_subnets(cluster)  # (host index, family) -> subnet
    owner = {subnet: cluster.hosts[i] for (i, _), subnet in subnets.items()}
    h0, h1, h2 = cluster.hosts

    # Healthy: one ok row per family of each peer, probed over that family's underlay.
    start = time.monotonic()
    code, doc, err = run_check(cluster, h0)
    figures.add(f"{mode}: check of 2 healthy peers x {len(families)} families took {time.monotonic() - start:.2f} s")
    assert code == 0, (doc, err)
    found = rows(doc)
    assert sorted(found) == sorted((f, subnets[(i, f)]) for i in (1, 2) for f in families), sorted(found)
    for (family, _), row in found.items():
        assert row["diagnosis"] == OK, row
        assert row["overlay"]["ok"] and row["underlay"]["ok"] and row["full_size"]["ok"], row
        underlay = owner[row["subnet"]].underlay_of(family)
        assert underlay is not None and row["public_ip"] == str(underlay.ip), row
        assert row["overlay_address"] == row["subnet"].split("/")[0], row  # the VTEP's address, of that family
    assert doc["mtu"] == ds.EXPECTED_MTU["vxlan"]

    # The daemon probes each family of each peer, labelled with that family's subnet.
    s = wait_metric(h0, "every family of every peer answers",
                    lambda s: value(s, "overlayd_peers_reachable") == 2 * len(families))  # fmt: skip
    for i in (1, 2):
        for family in families:
            assert value(s, "overlayd_peer_reachable", peer=subnets[(i, family)]) == 1, (i, family)

    # host2 drops overlay traffic carried over IPv6: only its IPv6 subnet stops answering.
    nft(h2, "add", "table", "inet", "ovdcheck6")
    nft(h2, "add", "chain", "inet", "ovdcheck6", "in", "{ type filter hook input priority -10 ; }")
    nft(h2, "add", "rule", "inet", "ovdcheck6", "in", "meta", "nfproto", "ipv6", "udp", "dport", "8472", "drop")
    s = wait_metric(h0, "host2's IPv6 subnet stops answering",
                    lambda s: value(s, "overlayd_peer_reachable", peer=subnets[(2, 6)]) == 0)  # fmt: skip
    assert value(s, "overlayd_peer_reachable", peer=subnets[(1, 6)]) == 1
    if 4 in families:
        assert value(s, "overlayd_peer_reachable", peer=subnets[(2, 4)]) == 1

    # Sabotage with host0's daemon stopped: host0's IPv6 FDB entry for host1 goes, and host2 drops
    # only full-size overlay packets over IPv6.
    h0.daemon.stop()
    nft(h2, "flush", "chain", "inet", "ovdcheck6", "in")
    nft(h2, "add", "rule", "inet", "ovdcheck6", "in", "meta", "nfproto", "ipv6", "udp", "dport", "8472",
        "meta", "length", "gt", "1000", "drop")  # fmt: skip
    leases = ds.store_leases(cluster, STORE)
    mac1 = leases[(6, subnets[(1, 6)])]["BackendV6Data"]["VtepMAC"]
    assert h1.underlay6 is not None
    h0.exec(["bridge", "fdb", "del", mac1, "dev", ds.vtep_name(6), "dst", str(h1.underlay6.ip)])

    start = time.monotonic()
    code, doc, err = run_check(cluster, h0)
    figures.add(f"{mode}: check with 2 broken IPv6 paths took {time.monotonic() - start:.2f} s")
    assert code == 1, doc
    assert "2 of " in err, err
    found = rows(doc)
    broken1, broken2 = found[(6, subnets[(1, 6)])], found[(6, subnets[(2, 6)])]
    assert broken1["diagnosis"].startswith(NOT_PROGRAMMED) and mac1 in broken1["diagnosis"], broken1
    assert ds.vtep_name(6) in broken1["diagnosis"], broken1
    assert broken2["diagnosis"] == MTU_BLACKHOLE, broken2
    assert broken2["overlay"]["ok"] and not broken2["full_size"]["ok"], broken2
    if 4 in families:
        for i in (1, 2):
            assert found[(4, subnets[(i, 4)])]["diagnosis"] == OK, found[(4, subnets[(i, 4)])]

    # The table names the family of each row.
    proc = cluster.overlayd_cli(*ds.store_args(cluster, STORE), "--iface", h0.underlay_if,
                                "--subnet-file", str(h0.subnet_file), "check", "--count", "1", timeout=60)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split()[0] == "FAMILY"
    assert any(line.split()[:2] == ["IPv6", subnets[(2, 6)]] and MTU_BLACKHOLE in line for line in lines), lines
    print(proc.stdout)
