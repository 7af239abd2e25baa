"""Network-namespace fixtures for functional and end-to-end tests (root only).

Every namespace made here is named ``<RUN_PREFIX><label>`` where ``RUN_PREFIX`` is
``ovt<4 random hex>-``, fresh for each test process, so parallel runs never collide and leftovers
are recognisable.  All links are created *inside* test namespaces (a veth pair is made in one
namespace with its peer sent straight to the other), so the root namespace's links, routes and
firewall are never touched; every helper refuses a namespace name without the prefix.

The commands themselves are ``overlayd._lab.netns``'s, the same the demo's cluster uses; this
module adds the per-run naming policy, the cleanup guarantees and the fixtures.

Cleanup is guaranteed twice: the pytest fixtures delete their namespaces in a finalizer (which runs
when the test fails), and an ``atexit`` hook deletes whatever this process created and is still
there (e.g. after KeyboardInterrupt).  Processes still running inside a namespace we delete were
started by the test, and are killed first.

Two ways to run code "on a host": :func:`run` (``ip netns exec``, for real commands such as
``ping``) and :func:`in_netns` (``setns(2)`` on the calling *thread*, then back; for in-process
code such as a backend, whose netlink sockets bind to the namespace they are opened in).
Addresses: underlays only from the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24), overlays from 10.x, and both only inside these namespaces.

Usage::

    from overlayd.testing.netns import netns, netns_factory, veth, run  # fixtures + helpers

    def test_ping(netns_factory):
        a, b = netns_factory("a"), netns_factory("b")
        veth(a, "eth0", b, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        run(a, "ping", "-c1", "-W1", "192.0.2.2")
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface, ip_interface
from typing import Any, ParamSpec, TypeVar

import pytest

from .._lab import netns as lab

P = ParamSpec("P")
R = TypeVar("R")

#: The per-run prefix of every namespace the helpers make (``ovt`` + 4 hex digits + ``-``).
RUN_PREFIX = f"ovt{secrets.token_hex(2)}-"

_lock = threading.Lock()
_created: set[str] = set()
_counter = 0


def _ours(name: str) -> str:
    if not name.startswith(RUN_PREFIX):
        raise ValueError(f"refusing to touch namespace {name!r}: it was not made by this test run ({RUN_PREFIX}*)")
    return name


def _ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return lab.run(["ip", *args], check=check, timeout=timeout)


def have_netns_support() -> str | None:
    """None when namespaces can be used here, else the reason why not (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def create_netns(label: str | None = None) -> str:
    """Make a fresh namespace with ``lo`` up and return its name."""
    global _counter
    with _lock:
        _counter += 1
        name = f"{RUN_PREFIX}{label or 'ns'}{_counter}"
        _created.add(name)
    lab.add_netns(name)
    return name


def netns_pids(name: str) -> list[int]:
    return lab.netns_pids(_ours(name))


def delete_netns(name: str) -> None:
    """Kill what the test left running in *name*, then delete it; a missing one is fine."""
    lab.delete_netns(_ours(name))
    with _lock:
        _created.discard(name)


def cleanup_all() -> None:
    """Delete every namespace this process made (and any other of this run's prefix)."""
    with _lock:
        names = set(_created)
    try:
        names |= {n for n in os.listdir("/run/netns") if n.startswith(RUN_PREFIX)}
    except FileNotFoundError:
        pass
    for name in sorted(names):
        delete_netns(name)


atexit.register(cleanup_all)


def run(ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace *ns* (``ip netns exec``) and capture its output."""
    proc = subprocess.run(lab.ns_exec(_ours(ns), cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"[{ns}] {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    return proc


def ip_json(ns: str, *args: str) -> Any:
    """``ip -n <ns> -j <args>`` parsed; e.g. ``ip_json(ns, "-d", "link", "show", "eth0")``."""
    return lab.ip_json(_ours(ns), *args)


def bridge_json(ns: str, *args: str) -> Any:
    """``bridge -n <ns> -j <args>`` parsed; e.g. ``bridge_json(ns, "fdb", "show", "dev", "vx0")``."""
    return lab.bridge_json(_ours(ns), *args)


def _configure(ns: str, ifname: str, address: str | IPv4Interface | None, mtu: int | None) -> None:
    if mtu is not None:
        _ip("-n", ns, "link", "set", ifname, "mtu", str(mtu))
    if address is not None:
        _ip("-n", ns, "addr", "add", str(ip_interface(address)), "dev", ifname)
    _ip("-n", ns, "link", "set", ifname, "up")


def veth(
    ns_a: str,
    name_a: str,
    ns_b: str,
    name_b: str,
    addr_a: str | IPv4Interface | None = None,
    addr_b: str | IPv4Interface | None = None,
    mtu: int | None = None,
) -> None:
    """A veth pair from *ns_a* to *ns_b*, both ends up, optionally addressed (never in the root ns)."""
    _ip("-n", _ours(ns_a), "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", _ours(ns_b))
    _configure(ns_a, name_a, addr_a, mtu)
    _configure(ns_b, name_b, addr_b, mtu)


class Segment:
    """An L2 segment: a namespace holding bridge ``br0``; hosts attach with a veth each.

    The bridge namespace has no addresses, so it is a switch, not a router.
    """

    def __init__(self, ns: str) -> None:
        self.ns = _ours(ns)
        self._ports = 0
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "link", "set", "br0", "up")

    def attach(
        self, host_ns: str, ifname: str = "eth0", address: str | IPv4Interface | None = None, mtu: int | None = None
    ) -> None:
        self._ports += 1
        port = f"p{self._ports}"
        veth(host_ns, ifname, self.ns, port, addr_a=address, mtu=mtu)
        _ip("-n", self.ns, "link", "set", port, "master", "br0")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into namespace *name* for the block, then back."""
    with lab.in_netns(_ours(name)):
        yield


def call_in_netns(name: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` run inside namespace *name* on the calling thread."""
    with in_netns(name):
        return fn(*args, **kwargs)


# -- pytest fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., str]]:
    """``make(label=None) -> name``: fresh namespaces, all deleted after the test (even on failure)."""
    reason = have_netns_support()
    if reason:
        pytest.skip(reason)
    made: list[str] = []

    def make(label: str | None = None) -> str:
        name = create_netns(label)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            delete_netns(name)


@pytest.fixture
def netns(netns_factory: Callable[..., str]) -> str:
    """A fresh network namespace (name) for this test, with ``lo`` up."""
    return netns_factory("t")
