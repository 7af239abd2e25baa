"""Network-namespace helpers shared by the demo's cluster and the test fixtures (root only).

Everything is done with the ``ip`` command run *into* a namespace (``ip -n NS ...``, ``ip netns
exec NS ...``), never in the caller's namespace, so the root namespace's links, routes and
firewall are not touched and the kernel's state can be read back independently of the code under
test.  Callers own the naming policy (a per-run prefix) and refuse names that are not theirs;
these helpers only do the work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class LabError(RuntimeError):
    """A command that builds, runs or inspects namespaces failed."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short command; raise ``LabError`` with its stderr when it fails and *check*."""
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)!r} did not finish within {timeout:g}s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs *argv* inside namespace *ns*."""
    return ["ip", "netns", "exec", ns, *argv]


def wait_until(predicate: Callable[[], T | None], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll *predicate* until it returns something truthy; return that, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:g}s")
        time.sleep(interval)


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_netns(ns: str) -> None:
    """Make namespace *ns* with ``lo`` up."""
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def netns_pids(ns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def kill_netns_processes(ns: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in *ns* and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in netns_pids(ns) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            log.warning("processes %s in %s survived SIGKILL", pids, ns)
            return
        time.sleep(0.05)


def delete_netns(ns: str) -> None:
    """Kill what runs in *ns*, then delete it; a missing namespace is fine."""
    if not os.path.exists(f"/run/netns/{ns}"):
        return
    kill_netns_processes(ns)
    proc = run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0 and ns in list_netns():
        log.warning("could not delete namespace %s: %s", ns, proc.stderr.strip())


def ip_json(ns: str, *args: str) -> Any:
    """``ip -n <ns> -j <args>`` parsed; e.g. ``ip_json(ns, "-d", "link", "show", "eth0")``."""
    out = run(["ip", "-n", ns, "-j", *args]).stdout
    return json.loads(out) if out.strip() else []


def bridge_json(ns: str, *args: str) -> Any:
    """``bridge -n <ns> -j <args>`` parsed; e.g. ``bridge_json(ns, "fdb", "show", "dev", "vx0")``."""
    out = run(["bridge", "-n", ns, "-j", *args]).stdout
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling *thread* into namespace *name* for the block, then back (for in-process
    code such as a backend, whose netlink sockets bind to the namespace they are opened in)."""
    from pyroute2 import netns as pr_netns

    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(name, flags=0)
        try:
            yield
        finally:
            pr_netns.setns(saved)
    finally:
        os.close(saved)


def call_in_netns(name: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` run inside namespace *name* on the calling thread."""
    with in_netns(name):
        return fn(*args, **kwargs)
