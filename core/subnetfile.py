"""The subnet file (``/run/flannel/subnet.env``): flannel's hand-off to the CNI plugin.

Written atomically (temporary file + rename) and only once the host is ready, so its presence
means "this host has a lease and its datapath is set up".  Read back at start-up so a restarted
daemon prefers the subnet it had.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from ipaddress import IPv4Network, IPv6Network

import attrs


@attrs.frozen
class SubnetFile:
    network: IPv4Network | None
    subnet: IPv4Network | None
    mtu: int
    ip_masq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def render(self) -> str:
        lines = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}")
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet.network_address + 1}/{self.ipv6_subnet.prefixlen}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}")
        return "\n".join(lines) + "\n"


def write_subnet_file(path: str, content: SubnetFile) -> None:
    """Replace *path* atomically with *content*."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content.render())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_env(path: str) -> dict[str, str]:
    """The ``KEY=value`` pairs of a subnet file; empty when it does not exist."""
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key:
            out[key] = value
    return out


def previous_subnet(path: str) -> IPv4Network | None:
    """The IPv4 subnet recorded by a previous run, if the file holds a valid one."""
    raw = read_env(path).get("FLANNEL_SUBNET")
    if not raw:
        return None
    try:
        net = ipaddress.ip_interface(raw).network
    except ValueError:
        return None
    return net if isinstance(net, IPv4Network) else None
