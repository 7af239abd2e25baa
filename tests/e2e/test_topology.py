"""The namespace cluster harness itself: names, isolation, cleanup, and the leftover sweeper.

These run no daemon; they check that the harness keeps its promises, because every other
end-to-end test (and ``overlayd demo``) relies on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from overlayd import _topology as topo

pytestmark = pytest.mark.root


def _root_ns_links() -> set[str]:
    return {link["ifname"] for link in json.loads(topo.run(["ip", "-j", "link", "show"]).stdout)}


def _running(pid: int) -> bool:
    """True while *pid* exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_names_prefix_isolation_and_cleanup():
    root_links = _root_ns_links()
    root_forward = topo.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout
    cluster = topo.Cluster(3, store_ns=True).build()
    try:
        ours = [ns for ns in topo.list_netns() if ns.startswith(cluster.prefix)]
        assert sorted(ours) == sorted(cluster.namespaces)
        assert len(ours) == 5  # switch, three hosts, store
        for ns in ours:
            for link in json.loads(topo.run(["ip", "-n", ns, "-j", "link", "show"]).stdout):
                name = link["ifname"]
                assert len(name) <= topo.IFNAMSIZ
                assert name == "lo" or name.startswith(cluster.prefix), name
        for host in cluster.hosts:
            assert host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
            for other in cluster.hosts:
                if other is not host:
                    assert topo.ping(host.ns, other.underlay.ip, count=1).ok
            assert topo.ping(host.ns, topo.STORE_ADDRESS.ip, count=1).ok
        # A fake subnet file is enough for the container side.
        host = cluster.hosts[0]
        host.subnet_file.write_text(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n"
        )
        container = host.attach_container()
        assert str(container.address) == "10.244.7.2/24"
        assert host.attach_container() is container  # idempotent
        link = json.loads(topo.run(["ip", "-n", container.ns, "-j", "link", "show", container.ifname]).stdout)[0]
        assert link["mtu"] == 1400
        assert topo.ping(container.ns, container.gateway, count=1).ok
        # Nothing of this reached the root namespace.
        assert _root_ns_links() == root_links
        assert topo.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout == root_forward
    finally:
        cluster.cleanup()
    assert not [ns for ns in topo.list_netns() if ns.startswith(cluster.prefix)]
    assert not cluster.workdir.exists()
    assert not cluster.record_path.exists()


def test_cleanup_kills_processes_started_in_the_namespaces():
    cluster = topo.Cluster(1).build()
    try:
        proc = cluster.start_process(cluster.hosts[0].ns, ["sleep", "600"], "sleep.log")
        assert proc.pid in topo.netns_pids(cluster.hosts[0].ns)
    finally:
        cluster.cleanup()
    assert proc.returncode is not None
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_leftover_sweeper_takes_dead_runs_only():
    # A run that "crashed": built in a child process that exits without cleaning up.
    code = (
        "from overlayd import _topology as t\n"
        "c = t.Cluster(1, keep=True).build()\n"
        "p = c.start_process(c.hosts[0].ns, ['sleep', '600'], 'sleep.log')\n"
        "print(c.prefix, p.pid)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dead, orphan = out.split()[0], int(out.split()[1])
    alive = topo.Cluster(1).build()  # a run in progress: this very process owns it
    try:
        assert [ns for ns in topo.list_netns() if ns.startswith(dead)]
        removed = topo.cleanup_leftovers()
        assert not any(ns.startswith(alive.prefix) for ns in removed)
        assert not [ns for ns in topo.list_netns() if ns.startswith(dead)]
        assert not (topo.STATE_DIR / f"{dead}.json").exists()
        assert sorted(ns for ns in topo.list_netns() if ns.startswith(alive.prefix)) == sorted(alive.namespaces)
        assert not _running(orphan), "the crashed run's process survived the sweep"
    finally:
        alive.cleanup()
        for ns in topo.list_netns():
            if ns.startswith(dead):
                topo.delete_netns(ns)


def test_subnet_env_parsing():
    env = topo.SubnetEnv.parse(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    assert str(env.gateway) == "10.244.3.1/24" and str(env.container) == "10.244.3.2/24"
    assert env.mtu == 1450 and env.ipmasq
    with pytest.raises(topo.TopologyError):
        topo.SubnetEnv.parse("FLANNEL_NETWORK=10.244.0.0/16\n")


def test_bad_prefix_and_sizes_are_refused():
    with pytest.raises(topo.TopologyError):
        topo.Cluster(1, prefix="ovt1234-")
    with pytest.raises(topo.TopologyError):
        topo.Cluster(0)
    with pytest.raises(topo.TopologyError):
        topo.Cluster(topo.MAX_HOSTS + 1)


def _addr_info(ns: str, dev: str) -> list[dict[str, object]]:
    [link] = json.loads(topo.run(["ip", "-n", ns, "-j", "addr", "show", "dev", dev]).stdout)
    return list(link["addr_info"])


@pytest.mark.parametrize("ipv4", [True, False], ids=["dual-stack", "ipv6-only"])
def test_ipv6_underlay_hosts_reach_each_other_also_across_the_router(ipv4):
    """Every host, the routed one and the store reach each other over the IPv6 underlay (and the
    IPv4 one when dual-stack); the addresses are usable at once (nodad); nothing leaks out."""
    root_links = _root_ns_links()
    root_forward6 = topo.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout
    cluster = topo.Cluster(3, store_ns=True, ipv4=ipv4, ipv6=True).build()
    try:
        far = cluster.add_routed_host()
        assert cluster.families == ((4, 6) if ipv4 else (6,))
        for host in cluster.hosts:
            assert host.exec(["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip() == "0"
            assert host.exec(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() == "1"
            assert host.underlay6 is not None and host.underlay6.ip in topo.ROUTED_UNDERLAY6.supernet(new_prefix=32)
            assert (host.underlay_of(4) is not None) == ipv4
            if not ipv4:
                assert host.underlay == host.underlay6
            infos = _addr_info(host.ns, host.underlay_if)
            globals_ = {(a["local"], a["prefixlen"]) for a in infos if a.get("scope") == "global"}
            assert globals_ == {(str(a.ip), a.network.prefixlen) for a in host.underlay_addresses}
            assert not [a for a in infos if a.get("scope") == "global" and a.get("tentative")], infos
        assert str(far.underlay6) == "2001:db8:0:2::d/64"
        for host in cluster.hosts:
            for other in cluster.hosts:
                if other is host:
                    continue
                for address in other.underlay_addresses:
                    result = topo.ping(host.ns, address.ip, count=1, timeout=2)
                    assert result.ok, f"{host.name} -> {address}: {result.output}"
            store = topo.ping(host.ns, cluster.store_address, count=1, timeout=2)
            assert store.ok, store.output
        assert cluster.store_address.version == (4 if ipv4 else 6)
        assert cluster.etcd_endpoint == ("http://192.0.2.254:2379" if ipv4 else "http://[2001:db8:0:1::fe]:2379")

        # The container side from a hand-made subnet file with the IPv6 pair.
        host = cluster.hosts[0]
        v4 = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n" if ipv4 else ""
        host.subnet_file.write_text(
            v4 + "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:7::1/64\nFLANNEL_MTU=1380\n"
            "FLANNEL_IPMASQ=false\n"
        )
        container = host.attach_container()
        assert str(container.address6) == "fd00:0:0:7::2/64" and str(container.gateway6) == "fd00:0:0:7::1"
        assert container.families == ((4, 6) if ipv4 else (6,))
        assert str(container.address) == ("10.244.7.2/24" if ipv4 else "fd00:0:0:7::2/64")
        assert host.attach_container() is container  # idempotent
        default6 = json.loads(topo.run(["ip", "-n", container.ns, "-6", "-j", "route", "show", "default"]).stdout)
        assert [r["gateway"] for r in default6] == ["fd00:0:0:7::1"]
        assert topo.ping(container.ns, container.gateway6, count=1, timeout=2).ok
        if ipv4:
            assert topo.ping(container.ns, container.gateway, count=1, timeout=2).ok
        assert host.route_to(topo.IPv6Network("fd00:0:0:7::/64")) is not None
        assert _root_ns_links() == root_links
        assert topo.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout == root_forward6
    finally:
        cluster.cleanup()
    assert not [ns for ns in topo.list_netns() if ns.startswith(cluster.prefix)]


def test_subnet_env_parsing_ipv6():
    dual = topo.SubnetEnv.parse(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:0:0:3::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n"
    )
    assert dual.families == (4, 6)
    assert str(dual.container) == "10.244.3.2/24" and str(dual.container_of(6)) == "fd00:0:0:3::2/64"
    assert str(dual.gateway_of(6)) == "fd00:0:0:3::1/64"
    only6 = topo.SubnetEnv.parse(
        "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:3::1/64\nFLANNEL_MTU=1430\n"
    )
    assert only6.families == (6,) and only6.network is None and only6.subnet is None
    assert str(only6.container) == "fd00:0:0:3::2/64"
    with pytest.raises(topo.TopologyError):
        topo.SubnetEnv.parse("FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_MTU=1430\n")
    with pytest.raises(topo.TopologyError):
        topo.Cluster(1, ipv4=False, ipv6=False)
