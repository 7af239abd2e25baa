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
