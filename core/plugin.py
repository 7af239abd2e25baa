"""The public plugin API: what a store or a backend must provide.

Built-in and third-party plugins implement the same ABCs and are registered the same way, as
entry points in the ``overlayd.stores`` / ``overlayd.backends`` groups.  The core instantiates
them (``invoke_on_load=False``, then ``cls.from_options``), so a plugin never parses flags or
environment variables itself: it declares an attrs ``Options`` class and the CLI derives
``--<plugin>-<option>`` flags and ``OVERLAYD_<PLUGIN>_<OPTION>`` variables from it.

Stores implement a few primitives (list, compare-and-create, update, delete, wait for events);
the lease algorithms on top (acquire with reuse, renew, watch with re-list on lost history)
are concrete methods here, so every store behaves alike and a store only overrides them when
its data model differs (Kubernetes assigns subnets itself, for instance).
"""

from __future__ import annotations

import abc
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any, ClassVar, Self, TypeVar

import attrs

from . import ipam
from .config import NetworkConfig
from .errors import ConfigError, HistoryGone, LeaseConflict, LeaseLost, PermanentError
from .model import (
    EventKind,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseList,
    WatchResult,
    diff_lease_lists,
    subnet_to_key,
)
from .plan import Plan

log = logging.getLogger(__name__)

ACQUIRE_ATTEMPTS = 10


def option(
    default: Any,
    help: str,
    converter: Callable[[Any], Any] | None = None,
    secret: bool = False,
    config_key: str | None = None,
) -> Any:
    """Declare one plugin option: a default, a one-line help text, an optional converter.

    ``secret=True`` keeps the value out of logs, ``repr()`` and ``overlayd plugins`` output.
    ``config_key`` names the flannel key in the network config's ``Backend`` object that sets the
    same thing (``"VNI"``, ``"DirectRouting"``); when that key is present it beats the option, see
    :func:`apply_config_keys`.
    """
    return attrs.field(
        default=default,
        converter=converter,
        repr=not secret,
        metadata={"help": help, "secret": secret, "config_key": config_key},
    )


@attrs.frozen
class NoOptions:
    """For plugins that take no options."""


def comma_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """Converter: ``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def seconds(value: float | str | timedelta) -> timedelta:
    """Converter: a number of seconds (or a timedelta) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    return timedelta(seconds=float(value))


def to_bool(value: Any) -> bool:
    """Converter: ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case) or a bool -> bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


OptionsT = TypeVar("OptionsT")


def apply_config_keys(options: OptionsT, backend: Mapping[str, Any], plugin: str) -> OptionsT:
    """*options* with every ``option(config_key=...)`` field set from the network config's
    ``Backend`` object when the key is there (matched case-insensitively, as flannel's Go JSON
    decoding does).

    The network config wins because one document is shared by every host and they must agree
    (on a VNI, a port...); a flag or variable that says otherwise is logged as a warning naming
    both.  A config value of the wrong JSON type is a ``ConfigError`` naming the key.
    """
    by_key = {str(key).lower(): value for key, value in backend.items()}
    changes: dict[str, Any] = {}
    for field in attrs.fields(type(options)):  # type: ignore[arg-type]
        key = field.metadata.get("config_key")
        if not key or key.lower() not in by_key:
            continue
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[arg-type]
        value = _config_value(key, by_key[key.lower()], default, field.converter)
        mine = getattr(options, field.name)
        if mine != default and mine != value:
            shown = "<secret>" if field.metadata.get("secret") else repr(mine)
            log.warning(
                "%s: the network config's Backend sets %s=%r; ignoring --%s-%s %s",
                plugin,
                key,
                value,
                plugin,
                field.name.replace("_", "-"),
                shown,
            )
        changes[field.name] = value
    return attrs.evolve(options, **changes) if changes else options  # type: ignore[misc]


def _config_value(key: str, raw: Any, default: Any, converter: Any) -> Any:
    """A ``Backend`` value checked against the JSON type the option's default implies."""
    where = f"network config: Backend {key}"
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{where} must be true or false, not {raw!r}")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where} must be a whole number, not {raw!r}")
        return raw
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{where} must be a number, not {raw!r}")
        return float(raw)
    if isinstance(default, str) and not isinstance(raw, str):
        raise ConfigError(f"{where} must be a string, not {raw!r}")
    if callable(converter):
        try:
            return converter(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return raw


class Plugin(abc.ABC):
    """What stores and backends share: a name, a description, declared options."""

    #: The entry-point name; the loader sets it on the class it loads.
    name: ClassVar[str] = ""
    #: The attrs class of options; its fields become CLI flags and env vars.
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def from_options(cls, options: Any) -> Self:
        return cls(options)

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Store(Plugin):
    """Where the network config and the leases live."""

    @property
    def lease_ttl(self) -> timedelta:
        """Lifetime of a new or renewed lease: the store's ``ttl`` option, else 24 h."""
        return getattr(self.options, "ttl", None) or timedelta(hours=24)

    @property
    def renew_margin(self) -> timedelta:
        """Renew when less than this is left: the store's ``renew_margin`` option, else 1 h."""
        return getattr(self.options, "renew_margin", None) or timedelta(hours=1)

    # -- network config ---------------------------------------------------------------------

    @abc.abstractmethod
    def get_config(self) -> str | None:
        """The raw network config JSON, or None when there is none yet."""

    @abc.abstractmethod
    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        """Write the raw config; with *only_if_absent*, write only when none exists.

        Returns True when written.
        """

    # -- lease primitives -------------------------------------------------------------------

    @abc.abstractmethod
    def list_leases(self) -> LeaseList:
        """Every live lease and reservation (garbled ones skipped with a warning)."""

    @abc.abstractmethod
    def create_lease(self, lease: Lease) -> Lease | None:
        """Create *lease* with this store's TTL only if its key does not exist.

        Returns the stored lease (with expiration and revision), or None when the key exists.
        """

    @abc.abstractmethod
    def update_lease(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        """Rewrite an existing lease's attrs and refresh its TTL (a reservation stays one).

        Raises ``LeaseLost`` when the key no longer exists.
        """

    @abc.abstractmethod
    def delete_lease(self, lease: Lease) -> None:
        """Remove a lease; a missing key is not an error."""

    @abc.abstractmethod
    def reserve(self, subnet: IPv4Network, public_ip: IPv4Address) -> Lease:
        """Create or turn an entry into a reservation (no TTL) for *public_ip*."""

    @abc.abstractmethod
    def unreserve(self, subnet: IPv4Network) -> None:
        """Remove a reservation; a missing one is not an error."""

    @abc.abstractmethod
    def wait_for_events(self, since_revision: int, timeout: float) -> WatchResult:
        """Lease events after *since_revision*, waiting up to *timeout* seconds for the first.

        Returns an empty result (same revision) on timeout.  Raises ``HistoryGone`` when the
        store no longer holds history that old, and ``StoreUnavailable`` when unreachable.
        """

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    # -- lease algorithms built on the primitives ---------------------------------------------

    def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        prefer: Sequence[IPv4Network] = (),
        rng: random.Random | None = None,
    ) -> Lease:
        """Get this host a lease: reuse its own (matched by public IP), else a preferred free
        subnet, else a random free one.  Lost races are retried a bounded number of times."""
        rng = rng or random.Random()
        for _ in range(ACQUIRE_ATTEMPTS):
            snapshot = self.list_leases()
            own = ipam.find_own_lease(config, snapshot.leases, attrs.public_ip)
            if own is not None:
                try:
                    return self.update_lease(own, attrs)
                except LeaseLost:
                    continue
            subnet = ipam.choose_free_subnet(config, snapshot.leases, prefer=prefer, rng=rng)
            created = self.create_lease(Lease(subnet, attrs, None))
            if created is not None:
                return created
            log.debug("lost the race for %s; trying again", subnet)
        raise LeaseConflict(f"could not claim a subnet after {ACQUIRE_ATTEMPTS} attempts (heavy contention)")

    def renew_lease(self, lease: Lease) -> Lease:
        """Refresh the TTL; ``LeaseLost`` when the lease is gone."""
        return self.update_lease(lease, lease.attrs)

    def release_lease(self, lease: Lease) -> None:
        if not lease.is_reservation:
            self.delete_lease(lease)

    def watch_leases(
        self, stop: threading.Event, since_revision: int | None = None, poll: float = 1.0
    ) -> Iterator[LeaseEvent | LeaseList]:
        """Yield a ``LeaseList`` snapshot first, then events, until *stop* is set.

        With *since_revision*, skip the snapshot and resume after that revision.  When the store
        has lost the history needed to resume, re-list and yield the difference from what this
        watch has seen as events (all of it, when resuming blind), so no change is missed.
        """
        current: dict[str, Lease] = {}
        if since_revision is None:
            snapshot = self.list_leases()
            yield snapshot
            since_revision = snapshot.revision
            current = {lease.key: lease for lease in snapshot.leases}
        while not stop.is_set():
            try:
                result = self.wait_for_events(since_revision, poll)
            except HistoryGone:
                log.info("store history since revision %d is gone; re-listing", since_revision)
                snapshot = self.list_leases()
                events = diff_lease_lists(list(current.values()), snapshot.leases, snapshot.revision)
                current = {lease.key: lease for lease in snapshot.leases}
                since_revision = snapshot.revision
                yield from events
                continue
            for event in result.events:
                if event.lease is not None and event.kind is EventKind.ADDED:
                    current[event.lease.key] = event.lease
                else:
                    current.pop(subnet_to_key(event.subnet), None)
                yield event
            since_revision = result.revision


# -- backends -------------------------------------------------------------------------------


@attrs.frozen
class HostInfo:
    """This host as the backend needs it: the underlay interface and its addresses."""

    iface: str
    iface_index: int
    iface_mtu: int
    public_ip: IPv4Address | None
    public_ipv6: IPv6Address | None = None
    iface_addr: IPv4Address | None = None  # the address on the interface (may differ from public)


class Network(abc.ABC):
    """A backend set up on this host for one network config."""

    #: True when ``prepare`` created kernel state; False when it adopted what a previous run left.
    #: A failed start tears down only what it created, so a restart never cuts live traffic.
    created: bool = True

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """MTU for containers on this host (the subnet file's FLANNEL_MTU)."""

    @property
    @abc.abstractmethod
    def backend_data(self) -> Mapping[str, Any]:
        """What peers need to reach this host, published as the lease's BackendData."""

    def activate(self, lease: Lease) -> None:
        """Finish the local setup once the lease is known (device address, MTU, link up)."""

    def check_peer(self, lease: Lease) -> None:
        """Raise ``GarbledLease`` when a peer's lease cannot be programmed by this backend."""

    def exclusive_claims(self, lease: Lease) -> frozenset[tuple[str, str]]:
        """What *lease* claims that no other lease may hold, as ``(what, value)`` pairs.

        vxlan claims ``("VtepMAC", mac)``: two leases with one MAC would fight over one FDB
        slot.  :func:`overlayd.peers.valid_peers` gives each claim to the oldest lease (this
        host's own lease always keeps its claims here) and skips, with a warning, the others.
        Called only on leases that passed :meth:`check_peer`, and on this host's own lease.
        """
        return frozenset()

    @abc.abstractmethod
    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        """The kernel objects that should exist for these peers (pure, no IO)."""

    @abc.abstractmethod
    def actual_state(self) -> frozenset[Any]:
        """The kernel objects of ours that exist now, read from the kernel."""

    @abc.abstractmethod
    def apply(self, plan: Plan[Any]) -> None:
        """Make the kernel match: remove ``plan.remove``, add ``plan.add``, idempotently."""

    def teardown(self) -> None:
        """Remove everything this network created (``--release-on-exit``)."""


class Backend(Plugin):
    """How packets cross hosts."""

    @classmethod
    def describe(cls, lease: Lease) -> Mapping[str, str]:
        """Columns about *lease* for people (``overlayd leases``, the demo), e.g. ``{"VtepMAC": ...}``.

        Pure: reads only the lease, so the CLI can call it on the backend class without a host.
        The keys are column titles; a lease that lacks a value gets ``"-"``, never an error.
        """
        return {}

    def effective_options(self, config: NetworkConfig) -> Any:
        """This backend's options with the network config's ``Backend`` keys applied on top
        (see :func:`apply_config_keys`)."""
        return apply_config_keys(self.options, config.backend, self.name or type(self).__name__.lower())

    @abc.abstractmethod
    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        """Create local state (e.g. the VXLAN device) so BackendData is known before the lease."""

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        """A ``Network`` for planning only (dry runs): built from the host's lease, creating nothing.

        Its ``desired_state`` must equal what the prepared network would want; ``actual_state``
        may read the kernel; ``apply`` must never be called on it.
        """
        raise PermanentError(f"backend {self.name!r} does not support dry runs")
