"""A multi-host cluster on one machine, made of network namespaces (internal: demo and e2e tests).

Design note.  Everything is done with the ``ip`` command run *into* a namespace (``ip -n NS ...``,
``ip netns exec NS ...``), never in the caller's namespace: the root namespace's links, routes,
firewall and sysctls are not touched, and what the kernel holds can be read back independently of
the code under test.  The layout is the one of a small rack::

    switch ns  ─ Linux bridge; one port per host (and one for the store)
    host ns i  ─ underlay veth 192.0.2.(10+i)/24, ip_forward=1, runs one ``overlayd``
                 + cni0 bridge (subnet .1) + veth into ...
    container ns i ─ subnet .2, default route via .1 (what a CNI bridge plugin would make)
    store ns   ─ 192.0.2.254/24, where an etcd listens when the etcd store is used

    router ns  ─ (``add_routed_host``) 192.0.2.1 on the switch, 198.51.100.1 on a second bridge:
                 hosts there are one routed hop away from the first segment (DirectRouting
                 cannot reach them; host-gw must refuse them)
    plain ns   ─ (``add_plain``) an address on the switch and nothing else: an "outside" machine
                 with no route to the overlay, or a stranger outside the cluster

IPv6 (``ipv6=True``; with ``ipv4=False`` the underlay is IPv6-only): every namespace gets IPv6
switched on explicitly (``disable_ipv6=0``; a new namespace's defaults are the kernel's, not the
root namespace's), host i also gets 2001:db8:0:1::(10+i)/64 (the router 2001:db8:0:1::1 and
2001:db8:0:2::1 for the second segment, the store 2001:db8:0:1::fe), hosts forward IPv6 too, and
every address is added with ``nodad``: duplicate address detection would keep it "tentative" for a
second or two, which is time a test would have to wait out.  The bridges do not snoop multicast
(no MLD querier runs here, and neighbour discovery is multicast).  The container side gets the
subnet file's IPv6 pair as well (cni0 ``::1``, the container ``::2`` and a v6 default route).

Every namespace and interface name starts with a per-run prefix ``ovd<4 hex>-`` (interface names
stay within the kernel's 15 characters); ``cni0`` is the one exception, on purpose, because that
is the name operators know, and it only ever lives inside a host namespace of ours.  A record in
``/run/overlayd-topology/`` names the owning process, so ``cleanup_leftovers`` removes only what a
run that is no longer alive left behind, never a concurrent run's namespaces.  Processes are
stopped by namespace (``ip netns pids``), so a daemon's children go too.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_interface,
)
from pathlib import Path
from typing import Any, TypeVar

import attrs

from ._lab.netns import (
    LabError,
    add_netns,
    delete_netns,
    kill_netns_processes,
    list_netns,
    netns_pids,
    ns_exec,
    run,
    wait_until,
)

__all__ = [  # the lab helpers the e2e tests reach through this module
    "Cluster",
    "TopologyError",
    "cleanup_leftovers",
    "cluster",
    "delete_netns",
    "kill_netns_processes",
    "list_netns",
    "netns_pids",
    "ns_exec",
    "run",
    "settle_ipv6",
    "wait_until",
]

log = logging.getLogger(__name__)

UNDERLAY = IPv4Network("192.0.2.0/24")
ROUTED_UNDERLAY = IPv4Network("198.51.100.0/24")  # the second segment, behind the router namespace
ROUTER_ADDRESS = IPv4Interface("192.0.2.1/24")
STORE_ADDRESS = IPv4Interface("192.0.2.254/24")
HOST_BASE = 10  # host i gets 192.0.2.(10 + i)
# The IPv6 underlay (documentation prefix 2001:db8::/32): one /64 per segment, same host numbers.
UNDERLAY6 = IPv6Network("2001:db8:0:1::/64")
ROUTED_UNDERLAY6 = IPv6Network("2001:db8:0:2::/64")
ROUTER_ADDRESS6 = IPv6Interface("2001:db8:0:1::1/64")
STORE_ADDRESS6 = IPv6Interface("2001:db8:0:1::fe/64")
MAX_HOSTS = 200
IFNAMSIZ = 15
PREFIX_RE = re.compile(r"^ovd[0-9a-f]{4}-$")
DEFAULT_PREFIX_GLOB = "ovd????-"
STATE_DIR = Path("/run/overlayd-topology")
ETCD_CLIENT_PORT = 2379

T = TypeVar("T")
IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface

_live: weakref.WeakSet[Cluster] = weakref.WeakSet()


# One error for the whole lab: what ``_lab.netns.run`` raises is a TopologyError too.
TopologyError = LabError

# -- small helpers -------------------------------------------------------------------------------


def new_prefix() -> str:
    """A fresh per-run prefix, ``ovd`` + 4 hex digits + ``-``."""
    return f"ovd{secrets.token_hex(2)}-"


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(record: Mapping[str, Any]) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _proc_start_time(pid) == record.get("start")


# -- the subnet file -----------------------------------------------------------------------------


def _nth(subnet: IPInterface, n: int) -> IPInterface:
    """Address *n* of *subnet*'s network, with its prefix length (``_nth(10.244.3.1/24, 2)`` -> .2/24)."""
    net = subnet.network
    return ip_interface(f"{net.network_address + n}/{net.prefixlen}")


@attrs.frozen
class SubnetEnv:
    """What the daemon wrote to its subnet file (flannel's ``subnet.env``): an IPv4 pair, an IPv6
    pair (``FLANNEL_IPV6_*``), or both."""

    network: IPv4Network | None
    subnet: IPv4Interface | None  # e.g. 10.244.3.1/24: the gateway address and the lease
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Interface | None = None  # e.g. fd00:0:0:1::1/64

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(v for v, sub in ((4, self.subnet), (6, self.ipv6_subnet)) if sub is not None)

    def subnet_of(self, family: int) -> IPInterface | None:
        return self.subnet if family == 4 else self.ipv6_subnet

    def gateway_of(self, family: int) -> IPInterface | None:
        """cni0's address of *family*: the subnet's first address (.1, ::1)."""
        sub = self.subnet_of(family)
        return _nth(sub, 1) if sub is not None else None

    def container_of(self, family: int) -> IPInterface | None:
        """The container's address of *family*: the subnet's second address (.2, ::2)."""
        sub = self.subnet_of(family)
        return _nth(sub, 2) if sub is not None else None

    @property
    def gateway(self) -> IPInterface:
        """The first family's gateway (IPv4 when the file has it)."""
        found = self.gateway_of(self.families[0])
        assert found is not None
        return found

    @property
    def container(self) -> IPInterface:
        """The first family's container address (IPv4 when the file has it)."""
        found = self.container_of(self.families[0])
        assert found is not None
        return found

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                values[key] = value.strip()
        try:
            v4 = "FLANNEL_NETWORK" in values or "FLANNEL_SUBNET" in values
            v6 = "FLANNEL_IPV6_NETWORK" in values or "FLANNEL_IPV6_SUBNET" in values
            if not v4 and not v6:
                raise KeyError("FLANNEL_NETWORK (or FLANNEL_IPV6_NETWORK)")
            return cls(
                network=IPv4Network(values["FLANNEL_NETWORK"]) if v4 else None,
                subnet=IPv4Interface(values["FLANNEL_SUBNET"]) if v4 else None,
                mtu=int(values["FLANNEL_MTU"]),
                ipmasq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
                ipv6_network=IPv6Network(values["FLANNEL_IPV6_NETWORK"]) if v6 else None,
                ipv6_subnet=IPv6Interface(values["FLANNEL_IPV6_SUBNET"]) if v6 else None,
            )
        except (KeyError, ValueError) as exc:
            raise TopologyError(f"subnet file is incomplete or malformed: {exc}") from exc

    @classmethod
    def read(cls, path: Path) -> SubnetEnv | None:
        """The parsed file, or None while it does not exist (yet)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return cls.parse(text)


# -- processes -----------------------------------------------------------------------------------


class NsProcess:
    """A long-running command inside a namespace, its output appended to a log file."""

    def __init__(self, ns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        if self.running:
            raise TopologyError(f"{self.argv[0]} in {self.ns} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(
                f"\n=== start #{self.starts + 1} at {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode()
            )
            out.flush()
            # A session of its own: a Ctrl-C at the terminal reaches the CLI, which stops us cleanly.
            self.proc = subprocess.Popen(
                ns_exec(self.ns, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.starts += 1
        log.debug("started pid %d in %s: %s", self.proc.pid, self.ns, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def _signal(self, sig: signal.Signals, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s in %s ignored %s; killing it", self.argv[0], self.ns, sig.name)
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the daemon keeps its lease and kernel state), then wait; SIGKILL after *timeout*."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: a crash, as far as the rest of the cluster can tell."""
        return self._signal(signal.SIGKILL, 5.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def overlayd_executable() -> str:
    """The ``overlayd`` script next to this interpreter (a venv), else the one on PATH."""
    candidate = Path(sys.executable).with_name("overlayd")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("overlayd")
    if found is None:
        raise TopologyError("the overlayd command is not installed (pip install -e . in a venv)")
    return found


def _child_env() -> dict[str, str]:
    # Hermetic: an operator's OVERLAYD_* settings must not leak into the namespace hosts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- hosts and containers ------------------------------------------------------------------------


@attrs.frozen
class PingResult:
    src: str
    dst: IPAddress
    sent: int
    received: int
    rtt_avg_ms: float | None
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


def ping(ns: str, dst: IPAddress, count: int = 3, timeout: int = 1, interval: float = 0.2) -> PingResult:
    """``ping -4|-6 -c count -W timeout`` from namespace *ns*; never raises for an unreachable peer."""
    flags = ["-n", "-q", f"-{dst.version}", "-c", str(count), "-W", str(timeout), "-i", str(interval)]
    argv = ns_exec(ns, ["ping", *flags, str(dst)])
    proc = run(argv, check=False, timeout=count * (interval + timeout) + 10)
    counts = _PING_COUNTS.search(proc.stdout)
    rtt = _PING_RTT.search(proc.stdout)
    return PingResult(
        src=ns,
        dst=dst,
        sent=int(counts.group(1)) if counts else count,
        received=int(counts.group(2)) if counts else 0,
        rtt_avg_ms=float(rtt.group(1)) if rtt else None,
        output=(proc.stdout + proc.stderr).strip(),
    )


@attrs.define
class Container:
    """A "pod": a namespace on the host's cni0 bridge, with an address of each family the host's
    subnet file has (``address`` is the first: IPv4 when there is one)."""

    ns: str
    ifname: str  # inside the container ns
    host_ifname: str  # the host end, a port of cni0
    address: IPInterface
    gateway: IPAddress
    mtu: int
    address6: IPv6Interface | None = None
    gateway6: IPv6Address | None = None

    def address_of(self, family: int) -> IPInterface | None:
        if family == 6:
            return self.address6
        return self.address if self.address.version == 4 else None

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(v for v in (4, 6) if self.address_of(v) is not None)

    def ping(self, dst: IPAddress, count: int = 3, timeout: int = 1) -> PingResult:
        return ping(self.ns, dst, count=count, timeout=timeout)


@attrs.define(eq=False)
class Host:
    """One namespace "machine" on the switch, and what runs on it."""

    cluster: Cluster
    index: int
    ns: str
    underlay_if: str  # inside the host ns
    switch_port: str  # the switch end, a port of the switch bridge
    underlay: IPInterface  # the first family's underlay address (IPv4 unless the underlay is IPv6-only)
    workdir: Path
    underlay6: IPv6Interface | None = None
    daemon: NsProcess | None = None
    container: Container | None = None

    @property
    def name(self) -> str:
        return f"host{self.index}"

    def underlay_of(self, family: int) -> IPInterface | None:
        """This host's underlay address of *family*, if it has one."""
        if family == 6:
            return self.underlay6
        return self.underlay if self.underlay.version == 4 else None

    @property
    def underlay_addresses(self) -> list[IPInterface]:
        return [a for a in (self.underlay_of(4), self.underlay_of(6)) if a is not None]

    @property
    def subnet_file(self) -> Path:
        return self.workdir / "subnet.env"

    @property
    def container_ns(self) -> str:
        return f"{self.cluster.prefix}c{self.index}"

    def exec(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return run(ns_exec(self.ns, argv), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.ns, *args], check=check)

    def routes(self, family: int = 4) -> list[dict[str, Any]]:
        """The main routing table of *family*, read back with ``ip -4|-6 -j route``."""
        out = self.ip(f"-{family}", "-j", "route", "show").stdout
        routes: list[dict[str, Any]] = json.loads(out or "[]")
        return routes

    def route_to(self, subnet: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        """The route for exactly *subnet* (of either family), if any."""
        want = str(subnet)
        for route in self.routes(subnet.version):
            dst = route.get("dst", "")
            if dst == want or (dst == str(subnet.network_address) and subnet.prefixlen == subnet.max_prefixlen):
                return route
        return None

    def subnet_env(self) -> SubnetEnv | None:
        return SubnetEnv.read(self.subnet_file)

    # -- the daemon --

    def daemon_argv(self, global_args: Sequence[str]) -> list[str]:
        return [
            self.cluster.overlayd,
            *global_args,
            "--iface",
            self.underlay_if,
            "--subnet-file",
            str(self.subnet_file),
            "run",
        ]

    def start_daemon(self, global_args: Sequence[str], *, fresh: bool = True) -> NsProcess:
        """Start ``overlayd [global_args] --iface U --subnet-file F run`` in this host.

        With *fresh*, an existing subnet file is removed first, so its reappearance means "ready".
        """
        if self.daemon is None or self.daemon.argv != self.daemon_argv(global_args):
            if self.daemon is not None and self.daemon.running:
                self.daemon.stop()  # first: a running daemon would rewrite the file we remove
            self.daemon = NsProcess(self.ns, self.daemon_argv(global_args), self.workdir / "overlayd.log", _child_env())
        if fresh:
            self.subnet_file.unlink(missing_ok=True)
        self.daemon.start()
        return self.daemon

    def restart_daemon(self, *, fresh: bool = True) -> NsProcess:
        if self.daemon is None:
            raise TopologyError(f"{self.name} has no daemon to restart")
        self.daemon.stop()
        if fresh:
            self.subnet_file.unlink(missing_ok=True)
        self.daemon.start()
        return self.daemon

    def wait_ready(self, timeout: float = 30.0) -> SubnetEnv:
        """Wait for the subnet file; fail early (with the log tail) if the daemon exits."""

        def ready() -> SubnetEnv | None:
            if self.daemon is not None and not self.daemon.running:
                raise TopologyError(
                    f"overlayd on {self.name} exited with {self.daemon.returncode} before it was ready; "
                    f"log {self.daemon.log_path}:\n{self.daemon.log_tail()}"
                )
            return self.subnet_env()

        try:
            return wait_until(ready, timeout, what=f"subnet file of {self.name}")
        except TimeoutError as exc:
            tail = self.daemon.log_tail() if self.daemon else ""
            raise TopologyError(f"{exc}; daemon log:\n{tail}") from exc

    # -- the container side (what the CNI bridge plugin would do) --

    def attach_container(self, env: SubnetEnv | None = None) -> Container:
        """cni0 with the subnet's .1 (and ``::1`` of the IPv6 subnet) and a container namespace
        with .2 (``::2``) and a default route per family, all at the file's MTU.

        Idempotent: an existing container with the same addresses is kept; a changed subnet
        rebuilds it.
        """
        env = env or self.subnet_env()
        if env is None:
            raise TopologyError(f"{self.name} has no subnet file yet: start its daemon and wait_ready() first")
        if self.container is not None:
            same = all(self.container.address_of(f) == env.container_of(f) for f in (4, 6))
            if same and self.container.mtu == env.mtu:
                return self.container
            self.detach_container()
        p = self.cluster.prefix
        cns = self.container_ns
        host_if, cont_if = f"{p}v{self.index}", f"{p}c{self.index}"
        _check_ifname(host_if, cont_if)
        self.cluster.add_netns(cns, ipv6=6 in env.families)
        run(["ip", "-n", cns, "link", "set", "lo", "up"])
        self.ip("link", "add", "cni0", "mtu", str(env.mtu), "type", "bridge")
        if 6 in env.families:
            self.exec(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
            self.ip("link", "set", "cni0", "type", "bridge", "mcast_snooping", "0")
        for family in env.families:
            self.ip("addr", "add", str(env.gateway_of(family)), "dev", "cni0", *_NODAD[family])
        self.ip("link", "set", "cni0", "up")
        self.ip("link", "add", host_if, "mtu", str(env.mtu), "type", "veth",
                "peer", "name", cont_if, "mtu", str(env.mtu), "netns", cns)  # fmt: skip
        self.ip("link", "set", host_if, "master", "cni0", "up")
        for family in env.families:
            run(["ip", "-n", cns, "addr", "add", str(env.container_of(family)), "dev", cont_if, *_NODAD[family]])
        run(["ip", "-n", cns, "link", "set", cont_if, "up"])
        for family in env.families:
            gateway = env.gateway_of(family)
            assert gateway is not None
            run(["ip", "-n", cns, f"-{family}", "route", "add", "default", "via", str(gateway.ip)])
        if 6 in env.families:
            settle_ipv6([cns, self.ns])
        v6 = env.container_of(6)
        gw6 = env.gateway_of(6)
        self.container = Container(
            ns=cns,
            ifname=cont_if,
            host_ifname=host_if,
            address=env.container,
            gateway=env.gateway.ip,
            mtu=env.mtu,
            address6=IPv6Interface(v6) if v6 is not None else None,
            gateway6=IPv6Address(gw6.ip) if gw6 is not None else None,
        )
        log.debug("%s: container %s at %s", self.name, cns, ", ".join(str(env.container_of(f)) for f in env.families))
        return self.container

    def detach_container(self) -> None:
        if self.container is None:
            return
        self.cluster.remove_netns(self.container.ns)  # takes the veth pair with it
        self.ip("link", "del", "cni0", check=False)
        self.container = None


#: ``ip addr add`` flags per family: IPv6 addresses skip duplicate address detection (see the module note).
_NODAD: dict[int, tuple[str, ...]] = {4: (), 6: ("nodad",)}


def _check_ifname(*names: str) -> None:
    for name in names:
        if len(name) > IFNAMSIZ:
            raise TopologyError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")


def _enable_ipv6(ns: str) -> None:
    """IPv6 on in *ns*, for the devices there now and later (a new namespace takes the kernel's
    defaults, and a device moved in takes that namespace's ``default``)."""
    if not Path("/proc/sys/net/ipv6").is_dir():
        raise TopologyError("this kernel has IPv6 disabled (booted with ipv6.disable=1): no IPv6 underlay possible")
    keys = ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0"]
    run(ns_exec(ns, ["sysctl", "-q", "-w", *keys]))
    value = run(ns_exec(ns, ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"])).stdout.strip()
    if value != "0":
        raise TopologyError(f"IPv6 stays disabled in namespace {ns} (net.ipv6.conf.all.disable_ipv6={value})")


def settle_ipv6(namespaces: Sequence[str], timeout: float = 10.0) -> None:
    """Wait until no IPv6 address in *namespaces* is still "tentative".

    Our own addresses skip duplicate address detection (``nodad``), but every link's link-local
    address goes through it (about a second), and until then a router or a host answering from
    behind one drops the first packets (measured: the first ping across the router namespace was
    lost).  A real machine's links have long settled, so the lab waits for that rather than
    switching DAD off for the code under test too.
    """

    def tentative(ns: str) -> bool:
        # A "dadfailed" address stays tentative for good: a duplicate is not ours to wait out.
        links = json.loads(run(["ip", "-n", ns, "-6", "-j", "addr", "show", "tentative"]).stdout or "[]")
        return any(a.get("tentative") and not a.get("dadfailed") for link in links for a in link.get("addr_info", []))

    def settled() -> bool:
        return not any(tentative(ns) for ns in namespaces)

    wait_until(settled, timeout, interval=0.1, what=f"IPv6 duplicate address detection in {', '.join(namespaces)}")


def _add_addresses(ns: str, dev: str, addresses: Sequence[IPInterface]) -> None:
    for address in addresses:
        run(["ip", "-n", ns, "addr", "add", str(address), "dev", dev, *_NODAD[address.version]])


# -- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """Switch + hosts (+ store namespace); a context manager that always cleans up.

    ``Cluster(3).build()`` makes the namespaces and the underlay; starting daemons, attaching
    containers and an etcd are separate steps so tests can interleave faults with them.
    ``Cluster(3, ipv6=True)`` gives the underlay both families, ``Cluster(3, ipv4=False,
    ipv6=True)`` only IPv6 (then ``Host.underlay`` is the IPv6 address).
    """

    def __init__(
        self,
        hosts: int = 3,
        *,
        prefix: str | None = None,
        store_ns: bool = False,
        keep: bool = False,
        workdir: Path | None = None,
        ipv4: bool = True,
        ipv6: bool = False,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise TopologyError(f"hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
        if not ipv4 and not ipv6:
            raise TopologyError("the underlay needs IPv4, IPv6 or both (ipv4=False needs ipv6=True)")
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.prefix = prefix or new_prefix()
        if not PREFIX_RE.match(self.prefix):
            raise TopologyError(f"prefix {self.prefix!r} does not look like ovd<4 hex>-")
        self.n_hosts = hosts
        self.want_store_ns = store_ns
        self.keep = keep
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=self.prefix))
        self.switch_ns = f"{self.prefix}sw"
        self.bridge = f"{self.prefix}br"
        self.store_ns: str | None = None
        self.hosts: list[Host] = []
        self.processes: list[NsProcess] = []
        self.namespaces: list[str] = []
        self.etcd: Any = None  # an overlayd._lab.etcd.EtcdServer once start_etcd() ran
        self.router_ns: str | None = None
        self._settle_later = False  # build() waits for IPv6 DAD once, for every namespace at once
        self._overlayd: str | None = None
        self._cleaned = False

    # -- bookkeeping --

    @property
    def overlayd(self) -> str:
        if self._overlayd is None:
            self._overlayd = overlayd_executable()
        return self._overlayd

    @property
    def families(self) -> tuple[int, ...]:
        """The underlay's families: ``(4,)``, ``(4, 6)`` or ``(6,)``."""
        return tuple(v for v, on in ((4, self.ipv4), (6, self.ipv6)) if on)

    @property
    def record_path(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    def _write_record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        record = {
            "prefix": self.prefix,
            "pid": os.getpid(),
            "start": _proc_start_time(os.getpid()),
            "workdir": str(self.workdir),
            "namespaces": self.namespaces,
        }
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.record_path)

    def add_netns(self, ns: str, *, ipv6: bool = False) -> None:
        """Make namespace *ns* (IPv6 switched on when the cluster or *ipv6* asks for it)."""
        if not ns.startswith(self.prefix):
            raise TopologyError(f"namespace {ns!r} lacks the run prefix {self.prefix!r}")
        self.namespaces.append(ns)
        self._write_record()  # recorded before it exists, so a crash right after leaves it findable
        add_netns(ns)
        if ipv6 or self.ipv6:
            _enable_ipv6(ns)

    def remove_netns(self, ns: str) -> None:
        delete_netns(ns)
        if ns in self.namespaces:
            self.namespaces.remove(ns)
            self._write_record()

    # -- building --

    def build(self) -> Cluster:
        if not self.keep:
            _live.add(self)  # cleaned up at interpreter exit if nobody else did
        try:
            self._settle_later = True
            self.add_netns(self.switch_ns)
            sw = ["ip", "-n", self.switch_ns]
            run([*sw, "link", "add", self.bridge, "type", "bridge", *self._bridge_opts])
            run([*sw, "link", "set", self.bridge, "up"])
            for _ in range(self.n_hosts):
                self.add_host()
            if self.want_store_ns:
                self._add_store_ns()
            self._settle_later = False
            self._settle(*self.namespaces)
        except BaseException:
            if not self.keep:
                self.cleanup()
            raise
        return self

    @property
    def _bridge_opts(self) -> list[str]:
        # Neighbour discovery is multicast and no MLD querier runs here: do not let the bridge snoop.
        return ["mcast_snooping", "0"] if self.ipv6 else []

    def _plug(self, ns: str, port: str, inside: str, address: IPInterface | Sequence[IPInterface]) -> None:
        """A veth from the switch bridge into *ns*, named *inside* there, with *address*(es)."""
        _check_ifname(port, inside)
        run(["ip", "-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns])
        run(["ip", "-n", self.switch_ns, "link", "set", port, "master", self.bridge, "up"])
        _add_addresses(ns, inside, [address] if isinstance(address, IPv4Interface | IPv6Interface) else address)
        run(["ip", "-n", ns, "link", "set", inside, "up"])

    def _settle(self, *namespaces: str) -> None:
        if self.ipv6 and not self._settle_later:
            settle_ipv6(namespaces)

    def _forwarding(self, ns: str) -> None:
        """Routing between cni0 and the overlay device (or between segments); inside *ns* only."""
        keys = ["net.ipv4.ip_forward=1"] + (["net.ipv6.conf.all.forwarding=1"] if self.ipv6 else [])
        run(ns_exec(ns, ["sysctl", "-q", "-w", *keys]))

    def add_host(self) -> Host:
        """One more host on the switch (also after ``build``: a node joining)."""
        host = self._new_host(UNDERLAY, UNDERLAY6)
        self._plug(host.ns, host.switch_port, host.underlay_if, host.underlay_addresses)
        self._forwarding(host.ns)
        if self.router_ns is not None:
            self._route_to_segment2(host)
        self.hosts.append(host)
        self._settle(host.ns, self.switch_ns)
        return host

    def _new_host(self, segment: IPv4Network, segment6: IPv6Network) -> Host:
        """The next host's names, its addresses on *segment* (*segment6*), its work dir and namespace."""
        index = len(self.hosts)
        if index >= MAX_HOSTS:
            raise TopologyError(f"at most {MAX_HOSTS} hosts")
        v4 = IPv4Interface(f"{segment.network_address + HOST_BASE + index}/{segment.prefixlen}")
        v6 = IPv6Interface(f"{segment6.network_address + HOST_BASE + index}/{segment6.prefixlen}")
        host = Host(
            cluster=self,
            index=index,
            ns=f"{self.prefix}h{index}",
            underlay_if=f"{self.prefix}u{index}",
            switch_port=f"{self.prefix}p{index}",
            underlay=v4 if self.ipv4 else v6,
            workdir=self.workdir / f"host{index}",
            underlay6=v6 if self.ipv6 else None,
        )
        host.workdir.mkdir(parents=True, exist_ok=True)
        self.add_netns(host.ns)
        return host

    def _route_to_segment2(self, host: Host) -> None:
        """A route to the other segment, via the router, per underlay family."""
        first = host.underlay.ip in UNDERLAY or host.underlay.ip in UNDERLAY6
        if self.ipv4:
            if first:
                host.ip("route", "add", str(ROUTED_UNDERLAY), "via", str(ROUTER_ADDRESS.ip))
            else:
                host.ip("route", "add", str(UNDERLAY), "via", str(ROUTED_UNDERLAY.network_address + 1))
        if self.ipv6:
            if first:
                host.ip("-6", "route", "add", str(ROUTED_UNDERLAY6), "via", str(ROUTER_ADDRESS6.ip))
            else:
                host.ip("-6", "route", "add", str(UNDERLAY6), "via", str(ROUTED_UNDERLAY6.network_address + 1))

    def add_router(self) -> str:
        """The router namespace: on the switch at 192.0.2.1 and the gateway of a second segment
        198.51.100.0/24 (a bridge of its own); first-segment hosts get a route to it."""
        if self.router_ns is not None:
            return self.router_ns
        ns = f"{self.prefix}rt"
        self.add_netns(ns)
        self._plug(ns, f"{self.prefix}pr", f"{self.prefix}r", self._pick(ROUTER_ADDRESS, ROUTER_ADDRESS6))
        bridge = f"{self.prefix}br2"
        gateways = self._pick(
            IPv4Interface(f"{ROUTED_UNDERLAY.network_address + 1}/{ROUTED_UNDERLAY.prefixlen}"),
            IPv6Interface(f"{ROUTED_UNDERLAY6.network_address + 1}/{ROUTED_UNDERLAY6.prefixlen}"),
        )
        run(["ip", "-n", ns, "link", "add", bridge, "type", "bridge", *self._bridge_opts])
        _add_addresses(ns, bridge, gateways)
        run(["ip", "-n", ns, "link", "set", bridge, "up"])
        self._forwarding(ns)
        self.router_ns = ns
        for host in self.hosts:
            self._route_to_segment2(host)
        if self.store_ns is not None:
            if self.ipv4:
                run(["ip", "-n", self.store_ns, "route", "add", str(ROUTED_UNDERLAY), "via", str(ROUTER_ADDRESS.ip)])
            if self.ipv6:
                run(["ip", "-n", self.store_ns, "-6", "route", "add", str(ROUTED_UNDERLAY6),
                     "via", str(ROUTER_ADDRESS6.ip)])  # fmt: skip
        self._settle(ns, self.switch_ns)
        return ns

    def _pick(self, v4: IPv4Interface, v6: IPv6Interface) -> list[IPInterface]:
        """*v4* and/or *v6*, as the underlay's families ask."""
        return [a for a, on in ((v4, self.ipv4), (v6, self.ipv6)) if on]

    def add_routed_host(self) -> Host:
        """One more host on the second segment, one routed hop (the router namespace) away."""
        router = self.add_router()
        host = self._new_host(ROUTED_UNDERLAY, ROUTED_UNDERLAY6)
        ns = host.ns
        _check_ifname(host.switch_port, host.underlay_if)
        port, inside = host.switch_port, host.underlay_if
        run(["ip", "-n", router, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns])
        run(["ip", "-n", router, "link", "set", port, "master", f"{self.prefix}br2", "up"])
        _add_addresses(ns, inside, host.underlay_addresses)
        host.ip("link", "set", inside, "up")
        self._forwarding(ns)
        self._route_to_segment2(host)
        self.hosts.append(host)
        self._settle(ns, router)
        return host

    def add_plain(self, tag: str, address: IPInterface | Sequence[IPInterface]) -> str:
        """A namespace on the switch with *address* and nothing else (no route to the overlay):
        an outside machine, or a stranger that is not in the cluster.  Returns its name."""
        ns = f"{self.prefix}{tag}"
        self.add_netns(ns)
        self._plug(ns, f"{self.prefix}p{tag}", f"{self.prefix}{tag}i", address)
        self._settle(ns, self.switch_ns)
        return ns

    def _add_store_ns(self) -> None:
        self.store_ns = f"{self.prefix}st"
        self.add_netns(self.store_ns)
        self._plug(self.store_ns, f"{self.prefix}ps", f"{self.prefix}s", self._pick(STORE_ADDRESS, STORE_ADDRESS6))

    # -- services --

    @property
    def store_address(self) -> IPAddress:
        """Where the store namespace's servers listen: its IPv4 address, or its IPv6 one on an
        IPv6-only underlay."""
        return STORE_ADDRESS.ip if self.ipv4 else STORE_ADDRESS6.ip

    @property
    def etcd_endpoint(self) -> str:
        """The client URL of the etcd in the store namespace; every member's, comma-separated, for a cluster."""
        members = getattr(self.etcd, "members", None)
        if members:
            return ",".join(m.endpoint for m in members)
        host = str(self.store_address) if self.ipv4 else f"[{self.store_address}]"
        return f"http://{host}:{ETCD_CLIENT_PORT}"

    def start_process(self, ns: str, argv: Sequence[str], log_name: str) -> NsProcess:
        proc = NsProcess(ns, argv, self.workdir / log_name, _child_env())
        proc.start()
        self.processes.append(proc)
        return proc

    def start_etcd(self, timeout: float = 30.0, *, members: int = 1) -> None:
        """A single-member etcd in the store namespace, serving on the underlay address.

        ``overlayd._lab.etcd.EtcdServer`` with an ``ip netns exec`` command prefix; its health
        check then runs through the same prefix, inside the store namespace (from the caller's
        namespace the underlay address is not reachable).  With *members* > 1, an
        ``EtcdCluster`` of that many members on consecutive ports from 2379 there instead;
        ``etcd_endpoint`` then lists them all.
        """
        if self.store_ns is None:
            raise TopologyError("this cluster was built without a store namespace (store_ns=True)")
        if not Path(shutil.which("etcd") or "/usr/bin/etcd").exists():
            raise TopologyError("the etcd binary is missing (apt-get install etcd-server)")
        from ._lab.etcd import EtcdCluster, EtcdError, EtcdServer

        if members > 1:
            self.etcd = EtcdCluster(
                members,
                listen_host=str(self.store_address),
                base_port=ETCD_CLIENT_PORT,
                command_prefix=["ip", "netns", "exec", self.store_ns],
            )
            try:
                self.etcd.start(timeout)
            except EtcdError as exc:
                raise TopologyError(str(exc)) from exc
            return
        self.etcd = EtcdServer(
            name=f"{self.prefix}etcd",
            listen_host=str(self.store_address),
            client_port=ETCD_CLIENT_PORT,
            peer_port=ETCD_CLIENT_PORT + 1,
            data_dir=self.workdir / "etcd",
            command_prefix=["ip", "netns", "exec", self.store_ns],
        )
        try:
            self.etcd.start(timeout)
        except EtcdError as exc:
            raise TopologyError(str(exc)) from exc

    def overlayd_cli(self, *args: str, host: int = 0, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run an ``overlayd`` admin command inside a host namespace (where the store is reachable)."""
        return self.hosts[host].exec([self.overlayd, *args], check=False, timeout=timeout)

    # -- inspection --

    def containers(self) -> list[Container]:
        return [h.container for h in self.hosts if h.container is not None]

    def ping_matrix(
        self, count: int = 3, timeout: int = 1, parallel: int = 8, *, family: int | None = None
    ) -> dict[tuple[int, int], PingResult]:
        """Every container pings every other container's address of *family* (default: each
        container's first address); keys are (from, to) host indexes.  A container without an
        address of *family* is left out."""

        def target(c: Container) -> IPInterface | None:
            return c.address if family is None else c.address_of(family)

        placed = [(h.index, h.container) for h in self.hosts if h.container is not None]
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {}
            for i, a in placed:
                for j, b in placed:
                    dst = target(b)
                    if i != j and dst is not None and target(a) is not None:
                        futures[(i, j)] = pool.submit(ping, a.ns, dst.ip, count, timeout)
            return {key: fut.result() for key, fut in futures.items()}

    # -- cleanup --

    def cleanup(self) -> None:
        """Stop every process and remove every namespace this run made; safe to call twice."""
        if self._cleaned:
            return
        for proc in [*self.processes, *(h.daemon for h in self.hosts if h.daemon is not None)]:
            with contextlib.suppress(Exception):
                proc.kill()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.kill()
                self.etcd.stop()
            for server in getattr(self.etcd, "members", [self.etcd]):
                with contextlib.suppress(Exception):
                    Path(server.log_path).unlink(missing_ok=True)  # it sits in /tmp when data_dir is ours
        existing = set(list_netns())
        for ns in reversed(self.namespaces):
            if ns in existing:
                delete_netns(ns)
        self.namespaces.clear()
        self.record_path.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._cleaned = True
        log.debug("cluster %s cleaned up", self.prefix)

    def detach(self) -> None:
        """Leave everything running (``--keep``): mark the record so ``cleanup_leftovers`` may take it."""
        self._cleaned = True

    def __enter__(self) -> Cluster:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        if self.keep:
            self.detach()
        else:
            self.cleanup()


@atexit.register
def _cleanup_live_clusters() -> None:
    for live in list(_live):
        with contextlib.suppress(Exception):
            live.cleanup()


def leftovers(prefix_glob: str = DEFAULT_PREFIX_GLOB) -> dict[str, list[str]]:
    """Namespaces per prefix left by runs that are no longer alive (or were kept)."""
    found: dict[str, list[str]] = {}
    for ns in list_netns():
        if not fnmatch.fnmatchcase(ns, prefix_glob + "*"):
            continue
        prefix = ns[: ns.index("-") + 1] if "-" in ns else ns
        found.setdefault(prefix, []).append(ns)
    return found


def cleanup_leftovers(prefix_glob: str = DEFAULT_PREFIX_GLOB, *, force: bool = False) -> list[str]:
    """Remove namespaces (and their processes) of dead or kept runs; return what was removed.

    A prefix is only taken when its record in ``/run/overlayd-topology`` names an owner that has
    exited — so a concurrent run (or another tool's namespaces that happen to match) is left
    alone.  *force* also removes matching namespaces that have no record.
    """
    removed: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                records[path.stem] = json.loads(path.read_text())
    for prefix, namespaces in leftovers(prefix_glob).items():
        record = records.get(prefix)
        if record is None and not force:
            log.info("leaving %s alone: no record of the run that made it (use force)", ", ".join(namespaces))
            continue
        if record is not None and _owner_alive(record):
            log.info("leaving %s alone: its run (pid %s) is still alive", prefix, record.get("pid"))
            continue
        for ns in sorted(namespaces, reverse=True):
            delete_netns(ns)
            removed.append(ns)
    for prefix, record in records.items():
        if fnmatch.fnmatchcase(prefix, prefix_glob) and not _owner_alive(record):
            workdir = record.get("workdir")
            if isinstance(workdir, str) and Path(workdir).name.startswith(prefix):
                shutil.rmtree(workdir, ignore_errors=True)
            (STATE_DIR / f"{prefix}.json").unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def cluster(hosts: int = 3, **kwargs: Any) -> Iterator[Cluster]:
    """``with cluster(3) as c:`` — built on entry, cleaned up on exit (unless ``keep=True``)."""
    c = Cluster(hosts, **kwargs)
    with c:
        yield c
