"""ICMP probes with the system ``ping``, shared by ``overlayd check`` and the daemon's
``--probe-interval``.

Why ``ping`` (iputils) rather than a raw socket: it is installed wherever overlayd's tests run,
handles Don't Fragment (``-M do``), timeouts and the ICMP errors a raw socket would have to parse
by hand, and behaves exactly like the ping an operator types, so its verdict is easy to reproduce.
The cost (a process per probe) is irrelevant at the rate probes run.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import attrs

Address = IPv4Address | IPv6Address

_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


@attrs.frozen
class Probe:
    """One ping's outcome: any reply counts as reachable."""

    ok: bool
    rtt_ms: float | None = None
    detail: str = ""

    def shown(self) -> str:
        if self.ok:
            return f"ok {self.rtt_ms:.2f} ms" if self.rtt_ms is not None else "ok"
        return "FAIL"


Pinger = Callable[..., Probe]

#: How a probe that could not even start ``ping`` begins its detail.
CANNOT_RUN = "cannot run ping"


def ping(dst: Address, *, count: int = 3, timeout: float = 1.0, size: int | None = None, df: bool = False) -> Probe:
    """``ping`` *dst* (see the module note); never raises for an unreachable peer."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}", "-i", "0.2"]
    if size is not None:
        argv += ["-s", str(size)]
    if df:
        argv += ["-M", "do"]
    argv.append(str(dst))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=count * (timeout + 0.2) + 10, check=False)
    except subprocess.TimeoutExpired:
        return Probe(False, detail="ping did not finish")
    except OSError as exc:  # not installed, or not executable: ping's file capability exceeds ours
        return Probe(False, detail=f"{CANNOT_RUN}: {exc.strerror or exc}; probes need ping and CAP_NET_RAW")
    counts, rtt = _COUNTS.search(proc.stdout), _RTT.search(proc.stdout)
    received = int(counts.group(2)) if counts else 0
    detail = (proc.stdout + proc.stderr).strip().splitlines()
    return Probe(received > 0, float(rtt.group(1)) if rtt else None, detail[-1] if detail else "")
