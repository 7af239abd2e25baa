"""The backend contract: behaviour every backend must have, as a pytest suite.

Usage::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend_env(self, ...):
            return BackendEnv("mybackend", {"option": ...}, host=HostInfo(...), enter=in_my_netns)

``enter()`` returns a context manager inside which the backend runs (e.g. a fresh network
namespace for a kernel backend; ``contextlib.nullcontext`` for one that touches no kernel).
The suite drives the backend exactly as the daemon does — prepare, activate, desired vs actual,
apply — and checks what the reconciler relies on: purity, idempotence (a second plan is empty),
removal of departed peers, and a clean teardown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import attrs
import pytest

from ..api import load_backend
from ..config import NetworkConfig
from ..errors import PermanentError
from ..model import Lease, LeaseAttrs
from ..plan import diff
from ..plugin import Backend, HostInfo, Network


@attrs.frozen
class BackendEnv:
    name: str
    options: dict[str, Any]
    host: HostInfo
    enter: Callable[[], AbstractContextManager[Any]]


def lease_for(backend_type: str, index: int, data: dict[str, Any], public_ip: str | None = None) -> Lease:
    """A peer lease in 10.90.0.0/16 (subnet 10.90.<index>.0/24) with the given BackendData."""
    attrs_ = LeaseAttrs(
        public_ip=IPv4Address(public_ip or f"198.51.100.{index}"), backend_type=backend_type, backend_data=data
    )
    return Lease(IPv4Network(f"10.90.{index}.0/24"), attrs_, datetime.now(UTC) + timedelta(hours=1))


class BackendContract:
    """Subclass and provide the ``backend_env`` fixture."""

    #: The network every contract test uses; a backend reads its own keys from ``Backend``.
    network_json = '{"Network": "10.90.0.0/16"}'

    @pytest.fixture
    def backend_env(self) -> BackendEnv:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    @pytest.fixture
    def config(self, backend_env: BackendEnv) -> NetworkConfig:
        doc = json.loads(self.network_json)
        doc["Backend"] = {"Type": backend_env.name}
        return NetworkConfig.from_dict(doc)

    @pytest.fixture
    def backend(self, backend_env: BackendEnv) -> Backend:
        return load_backend(backend_env.name, **backend_env.options)

    @pytest.fixture
    def network(self, backend_env: BackendEnv, backend: Backend, config: NetworkConfig) -> Iterator[Network]:
        with backend_env.enter():
            network = backend.prepare(config, backend_env.host)
            network.activate(self.own(backend_env, network))
        yield network
        with backend_env.enter():
            network.teardown()

    def own(self, env: BackendEnv, network: Network) -> Lease:
        return lease_for(env.name, 1, dict(network.backend_data), public_ip=str(env.host.public_ip))

    def peers(self, env: BackendEnv, network: Network, count: int = 3) -> list[Lease]:
        """Peer leases carrying BackendData shaped like ours (a fresh MAC-like value per peer)."""
        out = []
        for i in range(2, 2 + count):
            data = dict(network.backend_data)
            for key, value in data.items():
                if isinstance(value, str) and value.count(":") == 5:  # a MAC address: make it unique
                    data[key] = f"02:00:00:00:00:{i:02x}"
            out.append(lease_for(env.name, i, data))
        return out

    def reconcile(self, env: BackendEnv, network: Network, peers: list[Lease]) -> int:
        with env.enter():
            plan = diff(network.desired_state(self.own(env, network), peers), network.actual_state())
            network.apply(plan)
        return len(plan)

    # -- the contract --------------------------------------------------------------------------------

    def test_described_and_loadable(self, backend: Backend, backend_env: BackendEnv) -> None:
        assert type(backend).description(), "give the backend class a one-line docstring"
        assert attrs.has(type(backend).Options)
        assert type(backend).name == backend_env.name

    def test_mtu_and_backend_data(self, network: Network, backend_env: BackendEnv) -> None:
        assert 0 < network.mtu <= backend_env.host.iface_mtu
        data = dict(network.backend_data)
        assert json.loads(json.dumps(data)) == data, "BackendData must be plain JSON"
        published = LeaseAttrs(backend_env.host.public_ip, backend_env.name, data)
        assert LeaseAttrs.from_json(published.to_json()).backend_data == (data or {})

    def test_desired_state_is_pure_and_keyed(self, network: Network, backend_env: BackendEnv) -> None:
        peers = self.peers(backend_env, network)
        own = self.own(backend_env, network)
        with backend_env.enter():
            first = network.desired_state(own, peers)
            again = network.desired_state(own, list(reversed(peers)))
        assert first == again
        keys = [obj.key for obj in first]
        assert len(keys) == len(set(keys)), "two desired objects claim one kernel slot"
        with backend_env.enter():
            assert network.desired_state(own, [own]) == network.desired_state(own, [])

    def test_second_reconcile_is_empty(self, network: Network, backend_env: BackendEnv) -> None:
        peers = self.peers(backend_env, network)
        self.reconcile(backend_env, network, peers)
        assert self.reconcile(backend_env, network, peers) == 0

    def test_departed_peers_are_removed(self, network: Network, backend_env: BackendEnv) -> None:
        peers = self.peers(backend_env, network)
        self.reconcile(backend_env, network, peers)
        self.reconcile(backend_env, network, peers[:1])
        own = self.own(backend_env, network)
        with backend_env.enter():
            assert network.actual_state() == network.desired_state(own, peers[:1])
        self.reconcile(backend_env, network, [])
        with backend_env.enter():
            assert network.actual_state() == network.desired_state(own, [])

    def test_teardown_leaves_nothing(self, network: Network, backend_env: BackendEnv) -> None:
        self.reconcile(backend_env, network, self.peers(backend_env, network))
        with backend_env.enter():
            network.teardown()
            assert network.actual_state() == frozenset()

    def test_offline_plan_matches_the_prepared_network(
        self, network: Network, backend: Backend, backend_env: BackendEnv, config: NetworkConfig
    ) -> None:
        own = self.own(backend_env, network)
        peers = self.peers(backend_env, network)
        try:
            offline = backend.offline(config, backend_env.host, own)
        except PermanentError:
            return  # dry runs are optional
        with backend_env.enter():
            assert offline.desired_state(own, peers) == network.desired_state(own, peers)
