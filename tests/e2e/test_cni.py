"""overlayd-cni end to end: two namespace hosts running the real ``overlayd`` daemon, pods wired by
the real CNI plugins (Debian's bridge + host-local, driven by ``overlayd-cni``), real pings.

The plugin runs inside each host namespace (``ip netns exec``) with ``CNI_NETNS`` pointing at a
pod namespace of this run, as a runtime would run it on that host: the bridge (a per-run name),
the veths and host-local's data dir (under the run's workdir) never touch the caller's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from overlayd import _topology as topo

from ._mesh import embedded_args, wait_full_mesh_routes

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "data" / "cni-result.schema.json").read_text())
OVERLAYD_CNI = str(Path(sys.executable).with_name("overlayd-cni"))
CNI_PATH = "/usr/lib/cni"


@pytest.fixture(autouse=True)
def _needs_plugins() -> None:
    if not all(os.access(f"{CNI_PATH}/{p}", os.X_OK) for p in ("bridge", "host-local")):
        pytest.skip("Debian's containernetworking-plugins are not installed")


def network(host: topo.Host, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlayd-cni",
        "subnetFile": str(host.subnet_file),
        "dataDir": str(host.workdir / "cni"),
        "subnetFileWait": 1,
        "delegate": {"bridge": f"{host.cluster.prefix}b", "ipam": {"dataDir": str(host.workdir / "ipam")}},
        **extra,
    }


def cni(host: topo.Host, command: str, conf: dict[str, Any], pod: str, cid: str) -> tuple[int, dict[str, Any] | None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "OVERLAYD_"))}
    env.update(CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_IFNAME="eth0", CNI_PATH=CNI_PATH)
    env["CNI_NETNS"] = f"/run/netns/{pod}"
    proc = subprocess.run(
        topo.ns_exec(host.ns, [OVERLAYD_CNI]),
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def reserved(host: topo.Host) -> set[str]:
    folder = host.workdir / "ipam" / "overlay"
    return {p.name for p in folder.iterdir() if p.name[0].isdigit()} if folder.is_dir() else set()


def test_pods_on_two_hosts_get_their_hosts_subnets_and_reach_each_other(make_cluster, figures):
    cluster = make_cluster(2)
    pods = []
    for host in cluster.hosts:
        pod = f"{cluster.prefix}pod{host.index}"
        cluster.add_netns(pod)
        topo.run(["ip", "-n", pod, "link", "set", "lo", "up"])
        pods.append(pod)

    # The runtime calls the plugin before the daemon has a lease: flannel's "subnet.env: no such
    # file", here a CNI error that says what is wrong and what to run.
    start = time.monotonic()
    code, error = cni(cluster.hosts[1], "ADD", network(cluster.hosts[1]), pods[1], "early")
    assert code != 0 and error is not None, error
    jsonschema.validate(error, {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/error"})
    assert error["code"] == 11
    assert "overlayd has no lease yet" in error["msg"] and "'overlayd status'" in error["msg"]
    assert time.monotonic() - start >= 1.0  # it waited subnetFileWait first
    assert cni(cluster.hosts[1], "DEL", network(cluster.hosts[1]), pods[1], "early") == (0, None)

    for host in cluster.hosts:
        host.start_daemon(embedded_args(cluster, "--ip-masq"))
    envs = [host.wait_ready(30) for host in cluster.hosts]
    wait_full_mesh_routes(cluster)

    results = []
    for host, pod, env in zip(cluster.hosts, pods, envs, strict=True):
        start = time.monotonic()
        code, result = cni(host, "ADD", network(host), pod, f"pod{host.index}")
        figures.add(f"ADD on {host.name}: {time.monotonic() - start:.2f} s")
        assert code == 0 and result is not None, result
        jsonschema.validate(result, {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/result-1"})
        [ip] = result["ips"]
        address = ip_interface(ip["address"])
        assert address.network == env.subnet.network, (address, env)
        assert ip["gateway"] == str(env.gateway.ip)
        # Read back from the pod namespace, not from the result.
        [link] = json.loads(topo.run(["ip", "-n", pod, "-j", "addr", "show", "dev", "eth0"]).stdout)
        assert int(link["mtu"]) == env.mtu
        assert {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"} == {str(address)}
        assert reserved(host) == {str(address.ip)}
        results.append(result)

    addresses = [ip_interface(r["ips"][0]["address"]).ip for r in results]
    for i, j in ((0, 1), (1, 0)):
        outcome = topo.ping(pods[i], addresses[j], count=3, timeout=1)
        assert outcome.ok, outcome.output
        figures.add(f"pod{i} -> pod{j} over the overlay: {outcome.rtt_avg_ms} ms")

    for host, pod, result in zip(cluster.hosts, pods, results, strict=True):
        conf = {**network(host), "prevResult": result}
        assert cni(host, "CHECK", conf, pod, f"pod{host.index}") == (0, None)

    for host, pod, result in zip(cluster.hosts, pods, results, strict=True):
        conf = {**network(host), "prevResult": result}
        assert cni(host, "DEL", conf, pod, f"pod{host.index}") == (0, None)
        assert reserved(host) == set()  # host-local released the address
        assert not (host.workdir / "cni" / f"pod{host.index}@eth0").exists()  # and the saved state is gone
        assert cni(host, "DEL", conf, pod, f"pod{host.index}") == (0, None)  # a second DEL succeeds
    assert not topo.ping(pods[0], addresses[1], count=1, timeout=1).ok
