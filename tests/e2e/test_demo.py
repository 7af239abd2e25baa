"""``overlayd demo`` run as a user would: the installed command, as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from overlayd import _topology as topo
from overlayd.demo import demo_command

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PREFIX_RE = re.compile(r"prefix (ovd[0-9a-f]{4}-)")


def _demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [topo.overlayd_executable(), "demo", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _prefix(proc: subprocess.CompletedProcess[str]) -> str:
    match = PREFIX_RE.search(proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    return match.group(1)


def _ours(prefix: str) -> list[str]:
    return [ns for ns in topo.list_netns() if ns.startswith(prefix)]


def _processes_in_workdir(prefix: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if f"/{prefix}" in line]


def test_demo_three_hosts_succeeds_and_leaves_nothing(figures):
    start = time.monotonic()
    proc = _demo("--hosts", "3")
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: all 6 container pairs reach each other" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("vxlan") >= 3  # one lease row per host
    prefix = _prefix(proc)
    assert _ours(prefix) == []
    assert _processes_in_workdir(prefix) == []
    assert not (topo.STATE_DIR / f"{prefix}.json").exists()
    throughput = re.search(r"Throughput .*: ([\d.]+ \S+)", proc.stdout)
    figures.add(
        f"overlayd demo --hosts 3: {took:.1f} s wall" + (f", iperf3 {throughput.group(1)}" if throughput else "")
    )


def test_demo_keep_then_cleanup():
    kept = _demo("--hosts", "2", "--keep")
    prefix = _prefix(kept)
    try:
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "overlayd demo --cleanup" in kept.stdout
        assert len(_ours(prefix)) == 5  # switch, 2 hosts, 2 containers
        cleaned = _demo("--cleanup", timeout=60)
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        assert _ours(prefix) == []
        assert _processes_in_workdir(prefix) == []
    finally:
        for ns in _ours(prefix):
            topo.delete_netns(ns)


def test_demo_ctrl_c_cleans_up():
    proc = subprocess.Popen(
        [topo.overlayd_executable(), "demo", "--hosts", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prefix = None
    try:
        # Interrupt once the daemons are up (the demo prints the prefix first, then builds).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prefix is None:
            for ns in topo.list_netns():
                if ns.endswith("-c1") and topo.PREFIX_RE.match(ns[:8]):
                    record = topo.STATE_DIR / f"{ns[:8]}.json"
                    if record.exists() and f'"pid": {proc.pid}' in record.read_text():
                        prefix = ns[:8]
            time.sleep(0.05)
        assert prefix is not None, "the demo never attached its containers"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "interrupted" in out
        assert _ours(prefix) == []
        assert _processes_in_workdir(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            for ns in _ours(prefix):
                topo.delete_netns(ns)


def test_demo_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(demo_command, ["--hosts", "2"])
    assert result.exit_code == 2
    assert "needs root" in result.output
    assert "Traceback" not in result.output


@pytest.mark.etcd
def test_demo_on_etcd_store():
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary")
    proc = _demo("--hosts", "2", "--store", "etcd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: all 2 container pairs reach each other" in proc.stdout
    prefix = _prefix(proc)
    assert _ours(prefix) == []
    assert _processes_in_workdir(prefix) == []


def test_a_failed_step_never_says_ok():
    """The ping-matrix line said "ok" over 226 lost pings: a step that finds a failure says FAILED."""
    import io

    from overlayd.demo import Progress

    stream = io.StringIO()
    progress = Progress(stream)
    with progress.step("ping matrix: 2 pairs") as p:
        p.fail("1 of 2 pairs failed")
    with progress.step("next step"):
        pass
    first, second = stream.getvalue().splitlines()
    assert "FAILED 1 of 2 pairs failed" in first and " ok" not in first
    assert second.endswith(")") and "... ok" in second


def test_demo_refuses_more_hosts_than_the_neighbour_table_holds():
    """50 hosts overflowed the kernel's shared neighbour table (gc_thresh3, not settable per
    namespace); the demo now says so before building anything."""
    from overlayd import demo

    size = demo.neighbour_table_size()
    assert size is not None
    too_many = demo.max_hosts_for(size) + 1
    if too_many > topo.MAX_HOSTS:
        pytest.skip(f"gc_thresh3 is {size} here: every allowed --hosts fits")
    before = set(topo.list_netns())
    result = CliRunner().invoke(demo_command, ["--hosts", str(too_many)])
    assert result.exit_code == 2, result.output
    assert "gc_thresh3" in result.output and f"--hosts {too_many - 1} or fewer" in result.output
    assert set(topo.list_netns()) == before
    assert demo.check_scale(too_many - 1, size) is None
    assert demo.check_scale(50, 1024) is not None and demo.max_hosts_for(1024) < 50


def test_demo_ipv6_config_and_lease_rows_of_both_families(tmp_path):
    """--ipv6 writes flannel's dual-stack config; the lease table shows a row per family, the
    IPv6 row with the host's IPv6 address and the BackendV6Data VTEP MAC; a subnet file without
    the IPv6 pair is a failure that names it."""
    from overlayd import demo

    assert demo.network_config("10.244.0.0/16", "vxlan", False) == {
        "Network": "10.244.0.0/16",
        "Backend": {"Type": "vxlan"},
    }
    assert demo.network_config("10.244.0.0/16", "host-gw", True) == {
        "Network": "10.244.0.0/16",
        "Backend": {"Type": "host-gw"},
        "EnableIPv6": True,
        "IPv6Network": "fd00::/48",
        "IPv6SubnetLen": 64,
    }
    cluster = topo.Cluster(1, ipv6=True, workdir=tmp_path)  # never built: only its hosts' addresses are read
    rows = [
        {"subnet": "10.244.5.0/24", "public_ip": "192.0.2.10", "backend_type": "vxlan",
         "backend_data": {"VtepMAC": "aa:aa:aa:aa:aa:01"}, "expiration": None},
        {"subnet": None, "ipv6_subnet": "fd00:0:0:5::/64", "public_ip": "192.0.2.10",
         "public_ipv6": "2001:db8:0:1::a", "backend_type": "vxlan", "backend_data": {"VtepMAC": "aa:aa:aa:aa:aa:01"},
         "backend_v6_data": {"VtepMAC": "aa:aa:aa:aa:aa:06"}, "expiration": None},
    ]  # fmt: skip
    host = topo.Host(
        cluster=cluster,
        index=0,
        ns="unused",
        underlay_if="unused",
        switch_port="unused",
        underlay=topo.IPv4Interface("192.0.2.10/24"),
        workdir=cluster.workdir,
        underlay6=topo.IPv6Interface("2001:db8:0:1::a/64"),
    )
    cluster.hosts = [host]
    header, v4, v6 = demo.format_leases(cluster, rows)
    assert header.split() == ["SUBNET", "HOST", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "EXPIRES"]
    assert v4.split()[:5] == ["10.244.5.0/24", "host0", "192.0.2.10", "vxlan", "aa:aa:aa:aa:aa:01"]
    assert v6.split()[:5] == ["fd00:0:0:5::/64", "host0", "2001:db8:0:1::a", "vxlan", "aa:aa:aa:aa:aa:06"]
    env4 = topo.SubnetEnv.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\n")
    with pytest.raises(topo.TopologyError, match="FLANNEL_IPV6_SUBNET"):
        demo._check_families({0: env4}, (4, 6))
    demo._check_families({0: env4}, (4,))
