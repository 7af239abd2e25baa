"""An example third-party overlayd backend, installed as its own package.

``routes-file`` programs no kernel state: it writes the routes this host needs (peer subnet via
peer public IP) to a JSON file, for an external router or a script to apply.  It shows the whole
plugin contract in a few lines: an attrs ``Options`` class (which becomes the flags
``--routes-file-path`` and env var ``OVERLAYD_ROUTES_FILE_PATH`` without any CLI code here), a
``Backend.prepare`` returning a ``Network``, and the desired/actual/apply trio the reconciler
drives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from overlayd.sdk import Backend, HostInfo, Lease, Network, NetworkConfig, Plan, option, simulate


@attrs.frozen
class FileRoute:
    """One line of the routes file; keyed by destination like a kernel route."""

    dst: str
    via: str

    @property
    def key(self) -> str:
        return self.dst


@attrs.frozen
class RoutesFileOptions:
    path: str = option("/run/overlayd/routes.json", "where to write the routes to peers")


class RoutesFileNetwork(Network):
    def __init__(self, host: HostInfo, path: str) -> None:
        self._mtu = host.iface_mtu
        self._path = path

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {"RoutesFile": self._path}

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        return frozenset(FileRoute(str(p.subnet), str(p.attrs.public_ip)) for p in peers if p.key != own.key)

    def actual_state(self) -> frozenset[Any]:
        try:
            with open(self._path) as handle:
                return frozenset(FileRoute(**row) for row in json.load(handle))
        except (FileNotFoundError, ValueError, TypeError):
            return frozenset()

    def apply(self, plan: Plan[Any]) -> None:
        rows = sorted((attrs.asdict(r) for r in simulate(self.actual_state(), plan)), key=lambda row: row["dst"])
        tmp = self._path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        with open(tmp, "w") as handle:
            json.dump(rows, handle, indent=2, sort_keys=True)
        os.replace(tmp, self._path)

    def teardown(self) -> None:
        if os.path.exists(self._path):
            os.unlink(self._path)


class RoutesFileBackend(Backend):
    """Write the routes to peers into a JSON file (an example third-party backend)."""

    Options = RoutesFileOptions
    options: RoutesFileOptions

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        return RoutesFileNetwork(host, self.options.path)

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        return RoutesFileNetwork(host, self.options.path)  # prepare() creates nothing either
