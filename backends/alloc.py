"""The ``alloc`` backend: lease a subnet, program nothing.

flannel has the same backend.  It is useful when something else does the routing (a cloud
fabric, a router that reads the leases) and it lets tests run many daemons cheaply.  It still
goes through the whole reconcile loop, with an always-empty kernel state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from overlayd.sdk import Backend, HostInfo, Lease, Network, NetworkConfig, Plan


class AllocNetwork(Network):
    created = False  # no kernel state: a failed start has nothing to remove (and says nothing about it)

    def __init__(self, host: HostInfo) -> None:
        self._mtu = host.iface_mtu

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {}

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        return frozenset()

    def actual_state(self) -> frozenset[Any]:
        return frozenset()

    def apply(self, plan: Plan[Any]) -> None:
        return None


class AllocBackend(Backend):
    """Lease a subnet and program nothing (routing is done elsewhere)."""

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        return AllocNetwork(host)

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        return AllocNetwork(host)
