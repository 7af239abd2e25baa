"""overlayd-cni with Debian's real CNI plugins (``/usr/lib/cni``: bridge, host-local, portmap) on
the real kernel, one "host" and its "pods" in namespaces of this run.

The plugin runs inside the host namespace (``ip netns exec``), so the bridge, the veths and any
iptables rules are made there and never in the caller's namespace; host-local's data dir and our
``dataDir`` live under the test's tmp_path.  Everything is read back independently: the pod's
interface with ``ip -j``, host-local's reservation files, the saved state files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from overlayd._lab.netns import wait_until
from overlayd.testing.netns import RUN_PREFIX, ip_json, netns, netns_factory

__all__ = ["netns", "netns_factory"]  # the fixtures, imported for pytest

pytestmark = pytest.mark.root

SCHEMA = json.loads((Path(__file__).parent / "data" / "cni-result.schema.json").read_text())
OVERLAYD_CNI = str(Path(sys.executable).with_name("overlayd-cni"))
CNI_PATH = "/usr/lib/cni"
SUBNET_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cni" / "10-overlayd.conflist"


@pytest.fixture(autouse=True)
def _needs_plugins() -> None:
    missing = [p for p in ("bridge", "host-local", "portmap") if not os.access(f"{CNI_PATH}/{p}", os.X_OK)]
    if missing:
        pytest.skip(f"Debian's containernetworking-plugins are not installed (missing {missing})")


class Node:
    """A host namespace with a subnet file, and calls of plugins inside it."""

    def __init__(self, ns: str, workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        self.subnet_file = workdir / "subnet.env"
        self.state = workdir / "state"
        self.ipam = workdir / "ipam"
        self.bridge = f"{RUN_PREFIX}b"

    def network(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        return {
            "cniVersion": version,
            "name": "overlay",
            "type": "overlayd-cni",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.state),
            "subnetFileWait": 0.5,
            "delegate": {"bridge": self.bridge, "ipam": {"dataDir": str(self.ipam)}},
            **extra,
        }

    def call(
        self, command: str, conf: dict[str, Any], pod: str | None, cid: str, ifname: str = "eth0", exe: str = ""
    ) -> tuple[int, dict[str, Any] | None]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_IFNAME=ifname, CNI_PATH=CNI_PATH)
        if pod is not None:
            env["CNI_NETNS"] = f"/run/netns/{pod}"
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns, exe or OVERLAYD_CNI],
            input=json.dumps(conf),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None

    def reserved(self) -> set[str]:
        """Addresses host-local holds (one file per address in its data dir)."""
        folder = self.ipam / "overlay"
        if not folder.is_dir():
            return set()
        return {p.name for p in folder.iterdir() if _is_address(p.name)}


def _is_address(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


@pytest.fixture
def node(netns_factory: Callable[..., str], tmp_path: Path) -> Node:
    made = Node(netns_factory("h"), tmp_path)
    made.subnet_file.write_text(SUBNET_ENV)
    return made


def validate(doc: dict[str, Any], version: str) -> None:
    definition = "result-1" if version.startswith("1.") else "result-0"
    jsonschema.validate(doc, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"})


def pod_address(pod: str, ifname: str = "eth0") -> tuple[str, int]:
    [link] = ip_json(pod, "addr", "show", "dev", ifname)
    [v4] = [a for a in link["addr_info"] if a["family"] == "inet"]
    return f"{v4['local']}/{v4['prefixlen']}", int(link["mtu"])


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "0.4.0"])
def test_add_check_del_with_the_real_plugins(node: Node, netns_factory: Callable[..., str], version: str) -> None:
    pod = netns_factory("p")
    conf = node.network(version)
    code, result = node.call("ADD", conf, pod, "pod1")
    assert code == 0 and result is not None, result
    validate(result, version)
    assert result["cniVersion"] == version

    # What the kernel has, read back independently of the result.
    address, mtu = pod_address(pod)
    assert ip_interface(address).network == ip_network("10.244.7.0/24")
    assert mtu == 1400
    [ip] = result["ips"]
    assert ip["address"] == address and ip["gateway"] == "10.244.7.1"
    assert {r["dst"] for r in ip_json(pod, "route", "show")} >= {"10.244.0.0/16"}
    [bridge] = ip_json(node.ns, "addr", "show", "dev", node.bridge)
    assert any(a["local"] == "10.244.7.1" for a in bridge["addr_info"])
    assert node.reserved() == {address.split("/")[0]}
    saved = json.loads((node.state / "pod1@eth0").read_text())
    assert saved["delegate"]["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]

    assert node.call("CHECK", {**conf, "prevResult": result}, pod, "pod1") == (0, None)

    assert node.call("DEL", {**conf, "prevResult": result}, pod, "pod1") == (0, None)
    assert node.reserved() == set()
    assert not (node.state / "pod1@eth0").exists()
    assert "eth0" not in {link["ifname"] for link in ip_json(pod, "link", "show")}
    assert node.call("DEL", conf, pod, "pod1") == (0, None)  # idempotent
    assert node.call("DEL", conf, None, "pod1") == (0, None)  # and without a netns


def test_del_after_the_state_was_lost_still_releases_the_address(node: Node, netns_factory: Callable[..., str]) -> None:
    pod = netns_factory("p")
    code, result = node.call("ADD", node.network(), pod, "lost")
    assert code == 0 and result is not None
    assert len(node.reserved()) == 1
    (node.state / "lost@eth0").unlink()  # what a reboot with a tmpfs dataDir does
    assert node.call("DEL", node.network(), pod, "lost") == (0, None)
    assert node.reserved() == set()


def test_check_fails_when_the_lease_moved(node: Node, netns_factory: Callable[..., str]) -> None:
    pod = netns_factory("p")
    conf = node.network()
    code, result = node.call("ADD", conf, pod, "moved")
    assert code == 0 and result is not None
    node.subnet_file.write_text(SUBNET_ENV.replace("10.244.7.1/24", "10.244.8.1/24"))
    code, error = node.call("CHECK", {**conf, "prevResult": result}, pod, "moved")
    assert code != 0 and error is not None and error["code"] == 101, error
    assert "10.244.7.0/24" in error["details"] and "10.244.8.0/24" in error["details"]
    node.subnet_file.unlink()
    code, error = node.call("CHECK", {**conf, "prevResult": result}, pod, "moved")
    assert code != 0 and error is not None and error["code"] == 11 and "no lease yet" in error["msg"]
    assert node.call("DEL", conf, pod, "moved") == (0, None)  # DEL replays the saved config regardless
    assert node.reserved() == set()


def test_gc_releases_attachments_the_runtime_no_longer_knows(node: Node, netns_factory: Callable[..., str]) -> None:
    keep, drop = netns_factory("p"), netns_factory("p")
    conf = node.network("1.1.0")
    assert node.call("ADD", conf, keep, "keep")[0] == 0
    assert node.call("ADD", conf, drop, "drop")[0] == 0
    kept = pod_address(keep)[0].split("/")[0]
    assert len(node.reserved()) == 2
    valid = {"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    env_free = node.call("GC", {**conf, **valid}, None, "")
    assert env_free == (0, None)
    assert node.reserved() == {kept}
    assert sorted(p.name for p in node.state.iterdir()) == ["keep@eth0"]


def test_the_example_conflist_chains_portmap(node: Node, netns_factory: Callable[..., str]) -> None:
    """examples/cni's conflist, run the way a runtime runs a list: each plugin in order with the
    list's name and version, portmap getting the previous result and its runtimeConfig."""
    pod = netns_factory("p")
    conflist = json.loads(EXAMPLE.read_text())
    first, second = conflist["plugins"]
    assert (first["type"], second["type"]) == ("overlayd-cni", "portmap")
    common = {"cniVersion": conflist["cniVersion"], "name": "overlay"}
    ours = {**first, **common, "subnetFile": str(node.subnet_file), "dataDir": str(node.state)}
    ours["delegate"] = {**ours.get("delegate", {}), "bridge": node.bridge, "ipam": {"dataDir": str(node.ipam)}}
    code, result = node.call("ADD", ours, pod, "web")
    assert code == 0 and result is not None, result
    mapping = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    chained = {**second, **common, "prevResult": result, "runtimeConfig": mapping}
    code, out = node.call("ADD", chained, pod, "web", exe=f"{CNI_PATH}/portmap")
    assert code == 0 and out is not None, out
    validate(out, conflist["cniVersion"])
    assert out["ips"] == result["ips"]  # portmap passes our result through
    assert node.call("DEL", {**chained}, pod, "web", exe=f"{CNI_PATH}/portmap") == (0, None)
    assert node.call("DEL", {**ours, "prevResult": result}, pod, "web") == (0, None)
    assert node.reserved() == set()


# -- both families (hand-made subnet files with the daemon's IPv6 lines) ----------------------------

V6_LINES = "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\n"
DUAL_STACK_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n" + V6_LINES
FAMILY_ENVS = {
    "dual-stack": DUAL_STACK_ENV + "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
    "ipv6-only": V6_LINES + "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
}


def pod_addresses(pod: str, ifname: str = "eth0") -> dict[str, list[str]]:
    """The pod interface's global addresses per family ("inet", "inet6"), read from the kernel."""
    [link] = ip_json(pod, "addr", "show", "dev", ifname)
    found: dict[str, list[str]] = {"inet": [], "inet6": []}
    for a in link["addr_info"]:
        if a.get("scope") == "global":
            found[a["family"]].append(f"{a['local']}/{a['prefixlen']}")
    return found


@pytest.mark.parametrize("mode", sorted(FAMILY_ENVS))
def test_a_pod_gets_an_address_and_routes_of_each_family(
    node: Node, netns_factory: Callable[..., str], mode: str
) -> None:
    """Real bridge + host-local with the two ranges (or the one IPv6 range): the pod holds an
    address of each family in the host's subnets, a route to each whole network, and with
    ``isDefaultGateway`` (the example conflist's delegate) an IPv6 default route via cni's ::1."""
    node.subnet_file.write_text(FAMILY_ENVS[mode])
    pod = netns_factory("p")
    conf = node.network()
    conf["delegate"]["isDefaultGateway"] = True
    code, result = node.call("ADD", conf, pod, "pod6")
    assert code == 0 and result is not None, result
    validate(result, "1.0.0")

    # The kernel, read back independently of the result.
    addresses = pod_addresses(pod)
    [v6] = addresses["inet6"]
    assert (
        ip_interface(v6).network == ip_network("fd00:0:0:1::/64")
        and ip_interface(v6).ip != ip_interface("fd00:0:0:1::1/64").ip
    )
    if mode == "dual-stack":
        [v4] = addresses["inet"]
        assert ip_interface(v4).network == ip_network("10.244.1.0/24")
    else:
        assert addresses["inet"] == []
    routes6 = {r["dst"]: r for r in ip_json(pod, "-6", "route", "show")}
    assert routes6["default"]["gateway"] == "fd00:0:0:1::1", routes6
    assert routes6["fd00::/48"]["gateway"] == "fd00:0:0:1::1", routes6
    routes4 = {r["dst"]: r for r in ip_json(pod, "-4", "route", "show")}
    if mode == "dual-stack":
        assert routes4["default"]["gateway"] == "10.244.1.1" and "10.244.0.0/16" in routes4, routes4
    else:
        assert routes4 == {}
    [bridge] = ip_json(node.ns, "addr", "show", "dev", node.bridge)
    bridge_addresses = {a["local"] for a in bridge["addr_info"]}
    assert "fd00:0:0:1::1" in bridge_addresses
    assert ("10.244.1.1" in bridge_addresses) == (mode == "dual-stack")
    assert {ip_interface(ip["address"]) for ip in result["ips"]} == {
        ip_interface(a) for a in addresses["inet"] + addresses["inet6"]
    }
    saved = json.loads((node.state / "pod6@eth0").read_text())
    ranges = [[{"subnet": "fd00:0:0:1::/64"}]]
    assert saved["delegate"]["ipam"]["ranges"] == (
        [[{"subnet": "10.244.1.0/24"}], *ranges] if mode == "dual-stack" else ranges
    )
    assert node.reserved() == {str(ip_interface(a).ip) for a in addresses["inet"] + addresses["inet6"]}

    # The pod reaches its gateway over IPv6, once the links' link-local addresses have passed
    # duplicate address detection (until then the first packets are dropped, as on any new link).
    def settled() -> bool:
        return not any(ip_json(ns, "-6", "addr", "show", "tentative") for ns in (pod, node.ns))

    wait_until(settled, 10, interval=0.1, what="IPv6 DAD on the pod's links")
    ping = subprocess.run(
        ["ip", "netns", "exec", pod, "ping", "-6", "-n", "-c", "1", "-W", "2", "fd00:0:0:1::1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr

    assert node.call("CHECK", {**conf, "prevResult": result}, pod, "pod6") == (0, None)
    assert node.call("DEL", {**conf, "prevResult": result}, pod, "pod6") == (0, None)
    assert node.reserved() == set()
    assert "eth0" not in {link["ifname"] for link in ip_json(pod, "link", "show")}
