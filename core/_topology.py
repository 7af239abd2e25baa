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
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
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
    "wait_until",
]

log = logging.getLogger(__name__)

UNDERLAY = IPv4Network("192.0.2.0/24")
ROUTED_UNDERLAY = IPv4Network("198.51.100.0/24")  # the second segment, behind the router namespace
ROUTER_ADDRESS = IPv4Interface("192.0.2.1/24")
STORE_ADDRESS = IPv4Interface("192.0.2.254/24")
HOST_BASE = 10  # host i gets 192.0.2.(10 + i)
MAX_HOSTS = 200
IFNAMSIZ = 15
PREFIX_RE = re.compile(r"^ovd[0-9a-f]{4}-$")
DEFAULT_PREFIX_GLOB = "ovd????-"
STATE_DIR = Path("/run/overlayd-topology")
ETCD_CLIENT_PORT = 2379

T = TypeVar("T")

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


@attrs.frozen
class SubnetEnv:
    """What the daemon wrote to its subnet file (flannel's ``subnet.env``)."""

    network: IPv4Network
    subnet: IPv4Interface  # e.g. 10.244.3.1/24: the gateway address and the lease
    mtu: int
    ipmasq: bool

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network.network_address + 1}/{self.subnet.network.prefixlen}")

    @property
    def container(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network.network_address + 2}/{self.subnet.network.prefixlen}")

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                values[key] = value.strip()
        try:
            return cls(
                network=IPv4Network(values["FLANNEL_NETWORK"]),
                subnet=IPv4Interface(values["FLANNEL_SUBNET"]),
                mtu=int(values["FLANNEL_MTU"]),
                ipmasq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
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
    dst: IPv4Address
    sent: int
    received: int
    rtt_avg_ms: float | None
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


def ping(ns: str, dst: IPv4Address, count: int = 3, timeout: int = 1, interval: float = 0.2) -> PingResult:
    """``ping -c count -W timeout`` from namespace *ns*; never raises for an unreachable peer."""
    argv = ns_exec(ns, ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), "-i", str(interval), str(dst)])
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
    """A "pod": a namespace on the host's cni0 bridge."""

    ns: str
    ifname: str  # inside the container ns
    host_ifname: str  # the host end, a port of cni0
    address: IPv4Interface
    gateway: IPv4Address
    mtu: int

    def ping(self, dst: IPv4Address, count: int = 3, timeout: int = 1) -> PingResult:
        return ping(self.ns, dst, count=count, timeout=timeout)


@attrs.define(eq=False)
class Host:
    """One namespace "machine" on the switch, and what runs on it."""

    cluster: Cluster
    index: int
    ns: str
    underlay_if: str  # inside the host ns
    switch_port: str  # the switch end, a port of the switch bridge
    underlay: IPv4Interface
    workdir: Path
    daemon: NsProcess | None = None
    container: Container | None = None

    @property
    def name(self) -> str:
        return f"host{self.index}"

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

    def routes(self) -> list[dict[str, Any]]:
        """The main routing table, read back with ``ip -j route``."""
        out = self.ip("-j", "route", "show").stdout
        routes: list[dict[str, Any]] = json.loads(out or "[]")
        return routes

    def route_to(self, subnet: IPv4Network) -> dict[str, Any] | None:
        """The route for exactly *subnet*, if any."""
        want = str(subnet)
        for route in self.routes():
            dst = route.get("dst", "")
            if dst == want or (dst == str(subnet.network_address) and subnet.prefixlen == 32):
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
        """cni0 with the subnet's .1 and a container namespace with .2, both at the file's MTU.

        Idempotent: an existing container with the same address is kept; a changed subnet
        rebuilds it.
        """
        env = env or self.subnet_env()
        if env is None:
            raise TopologyError(f"{self.name} has no subnet file yet: start its daemon and wait_ready() first")
        if self.container is not None:
            if self.container.address == env.container and self.container.mtu == env.mtu:
                return self.container
            self.detach_container()
        p = self.cluster.prefix
        cns = self.container_ns
        host_if, cont_if = f"{p}v{self.index}", f"{p}c{self.index}"
        _check_ifname(host_if, cont_if)
        self.cluster.add_netns(cns)
        run(["ip", "-n", cns, "link", "set", "lo", "up"])
        self.ip("link", "add", "cni0", "mtu", str(env.mtu), "type", "bridge")
        self.ip("addr", "add", str(env.gateway), "dev", "cni0")
        self.ip("link", "set", "cni0", "up")
        self.ip("link", "add", host_if, "mtu", str(env.mtu), "type", "veth",
                "peer", "name", cont_if, "mtu", str(env.mtu), "netns", cns)  # fmt: skip
        self.ip("link", "set", host_if, "master", "cni0", "up")
        run(["ip", "-n", cns, "addr", "add", str(env.container), "dev", cont_if])
        run(["ip", "-n", cns, "link", "set", cont_if, "up"])
        run(["ip", "-n", cns, "route", "add", "default", "via", str(env.gateway.ip)])
        self.container = Container(
            ns=cns, ifname=cont_if, host_ifname=host_if, address=env.container, gateway=env.gateway.ip, mtu=env.mtu
        )
        log.debug("%s: container %s at %s", self.name, cns, env.container)
        return self.container

    def detach_container(self) -> None:
        if self.container is None:
            return
        self.cluster.remove_netns(self.container.ns)  # takes the veth pair with it
        self.ip("link", "del", "cni0", check=False)
        self.container = None


def _check_ifname(*names: str) -> None:
    for name in names:
        if len(name) > IFNAMSIZ:
            raise TopologyError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")


# -- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """Switch + hosts (+ store namespace); a context manager that always cleans up.

    ``Cluster(3).build()`` makes the namespaces and the underlay; starting daemons, attaching
    containers and an etcd are separate steps so tests can interleave faults with them.
    """

    def __init__(
        self,
        hosts: int = 3,
        *,
        prefix: str | None = None,
        store_ns: bool = False,
        keep: bool = False,
        workdir: Path | None = None,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise TopologyError(f"hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
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
        self._overlayd: str | None = None
        self._cleaned = False

    # -- bookkeeping --

    @property
    def overlayd(self) -> str:
        if self._overlayd is None:
            self._overlayd = overlayd_executable()
        return self._overlayd

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

    def add_netns(self, ns: str) -> None:
        if not ns.startswith(self.prefix):
            raise TopologyError(f"namespace {ns!r} lacks the run prefix {self.prefix!r}")
        self.namespaces.append(ns)
        self._write_record()  # recorded before it exists, so a crash right after leaves it findable
        add_netns(ns)

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
            self.add_netns(self.switch_ns)
            sw = ["ip", "-n", self.switch_ns]
            run([*sw, "link", "add", self.bridge, "type", "bridge"])
            run([*sw, "link", "set", self.bridge, "up"])
            for _ in range(self.n_hosts):
                self.add_host()
            if self.want_store_ns:
                self._add_store_ns()
        except BaseException:
            if not self.keep:
                self.cleanup()
            raise
        return self

    def _plug(self, ns: str, port: str, inside: str, address: IPv4Interface) -> None:
        """A veth from the switch bridge into *ns*, named *inside* there, with *address*."""
        _check_ifname(port, inside)
        run(["ip", "-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns])
        run(["ip", "-n", self.switch_ns, "link", "set", port, "master", self.bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", str(address), "dev", inside])
        run(["ip", "-n", ns, "link", "set", inside, "up"])

    def add_host(self) -> Host:
        """One more host on the switch (also after ``build``: a node joining)."""
        host = self._new_host(UNDERLAY)
        self._plug(host.ns, host.switch_port, host.underlay_if, host.underlay)
        # Routing between cni0 and the overlay device; inside this namespace only.
        host.exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        if self.router_ns is not None:
            self._route_to_segment2(host)
        self.hosts.append(host)
        return host

    def _new_host(self, segment: IPv4Network) -> Host:
        """The next host's names, its address on *segment*, its work dir and its namespace."""
        index = len(self.hosts)
        if index >= MAX_HOSTS:
            raise TopologyError(f"at most {MAX_HOSTS} hosts")
        host = Host(
            cluster=self,
            index=index,
            ns=f"{self.prefix}h{index}",
            underlay_if=f"{self.prefix}u{index}",
            switch_port=f"{self.prefix}p{index}",
            underlay=IPv4Interface(f"{segment.network_address + HOST_BASE + index}/{segment.prefixlen}"),
            workdir=self.workdir / f"host{index}",
        )
        host.workdir.mkdir(parents=True, exist_ok=True)
        self.add_netns(host.ns)
        return host

    def _route_to_segment2(self, host: Host) -> None:
        if host.underlay.ip in UNDERLAY:
            host.ip("route", "add", str(ROUTED_UNDERLAY), "via", str(ROUTER_ADDRESS.ip))
        else:
            host.ip("route", "add", str(UNDERLAY), "via", str(ROUTED_UNDERLAY.network_address + 1))

    def add_router(self) -> str:
        """The router namespace: on the switch at 192.0.2.1 and the gateway of a second segment
        198.51.100.0/24 (a bridge of its own); first-segment hosts get a route to it."""
        if self.router_ns is not None:
            return self.router_ns
        ns = f"{self.prefix}rt"
        self.add_netns(ns)
        self._plug(ns, f"{self.prefix}pr", f"{self.prefix}r", ROUTER_ADDRESS)
        bridge = f"{self.prefix}br2"
        gateway = f"{ROUTED_UNDERLAY.network_address + 1}/{ROUTED_UNDERLAY.prefixlen}"
        run(["ip", "-n", ns, "link", "add", bridge, "type", "bridge"])
        run(["ip", "-n", ns, "addr", "add", gateway, "dev", bridge])
        run(["ip", "-n", ns, "link", "set", bridge, "up"])
        run(ns_exec(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        self.router_ns = ns
        for host in self.hosts:
            self._route_to_segment2(host)
        if self.store_ns is not None:
            run(["ip", "-n", self.store_ns, "route", "add", str(ROUTED_UNDERLAY), "via", str(ROUTER_ADDRESS.ip)])
        return ns

    def add_routed_host(self) -> Host:
        """One more host on the second segment, one routed hop (the router namespace) away."""
        router = self.add_router()
        host = self._new_host(ROUTED_UNDERLAY)
        ns = host.ns
        _check_ifname(host.switch_port, host.underlay_if)
        port, inside = host.switch_port, host.underlay_if
        run(["ip", "-n", router, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns])
        run(["ip", "-n", router, "link", "set", port, "master", f"{self.prefix}br2", "up"])
        host.ip("addr", "add", str(host.underlay), "dev", inside)
        host.ip("link", "set", inside, "up")
        host.exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self._route_to_segment2(host)
        self.hosts.append(host)
        return host

    def add_plain(self, tag: str, address: IPv4Interface) -> str:
        """A namespace on the switch with *address* and nothing else (no route to the overlay):
        an outside machine, or a stranger that is not in the cluster.  Returns its name."""
        ns = f"{self.prefix}{tag}"
        self.add_netns(ns)
        self._plug(ns, f"{self.prefix}p{tag}", f"{self.prefix}{tag}i", address)
        return ns

    def _add_store_ns(self) -> None:
        self.store_ns = f"{self.prefix}st"
        self.add_netns(self.store_ns)
        self._plug(self.store_ns, f"{self.prefix}ps", f"{self.prefix}s", STORE_ADDRESS)

    # -- services --

    @property
    def etcd_endpoint(self) -> str:
        """The client URL of the etcd in the store namespace; every member's, comma-separated, for a cluster."""
        members = getattr(self.etcd, "members", None)
        if members:
            return ",".join(m.endpoint for m in members)
        return f"http://{STORE_ADDRESS.ip}:{ETCD_CLIENT_PORT}"

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
                listen_host=str(STORE_ADDRESS.ip),
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
            listen_host=str(STORE_ADDRESS.ip),
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

    def ping_matrix(self, count: int = 3, timeout: int = 1, parallel: int = 8) -> dict[tuple[int, int], PingResult]:
        """Every container pings every other container's address; keys are (from, to) host indexes."""
        placed = [(h.index, h.container) for h in self.hosts if h.container is not None]
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {
                (i, j): pool.submit(ping, a.ns, b.address.ip, count, timeout)
                for i, a in placed
                for j, b in placed
                if i != j
            }
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
