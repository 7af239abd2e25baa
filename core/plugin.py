"""The public plugin API: what a store or a backend must provide.

Built-in and third-party plugins implement the same ABCs and are registered the same way, as
entry points in the ``overlayd.stores`` / ``overlayd.backends`` groups.  The core instantiates
them (``invoke_on_load=False``, then ``cls.from_options``), so a plugin never parses flags or
environment variables itself: it declares an attrs ``Options`` class and the CLI derives
``--<plugin>-<option>`` flags and ``OVERLAYD_<PLUGIN>_<OPTION>`` variables from it.

Stores implement small key-value primitives (list with revision, get with version,
create-if-absent, put-if-version, delete-if-version, watch from a revision); the lease policy on
top (decoding, acquire with reuse, owner checks, reservations, renew, watch with re-list on lost
history) is written once here, so every store behaves alike and a store only overrides it when
its data model differs (Kubernetes assigns subnets itself, for instance).
"""

from __future__ import annotations

import abc
import logging
import math
import random
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar, Self, TypeVar

import attrs

from . import ipam
from .config import NetworkConfig
from .errors import (
    ConfigError,
    GarbledLease,
    HistoryGone,
    LeaseConflict,
    LeaseLost,
    NotAReservation,
    PermanentError,
    StoreUnavailable,
    UserError,
)
from .kernel import KernelScope
from .model import (
    EventKind,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseList,
    WatchResult,
    diff_lease_lists,
    key_to_subnet,
    parse_lease,
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


def check_tls_files(flags: str, cafile: str, certfile: str, keyfile: str) -> None:
    """``UserError`` naming the flag when a store's TLS file is not what it should be.

    *flags* is the options' prefix (``"--etcd-"``): the message names ``--etcd-cafile`` and so on.
    Checked with the standard library's ``ssl`` before any connection, because a client library
    would only say "unreachable" and retry forever."""
    if cafile:
        try:
            ssl.create_default_context(cafile=cafile)
        except (ssl.SSLError, ValueError) as exc:
            raise UserError(f"{flags}cafile {cafile} holds no usable PEM CA certificate ({exc})") from exc
    if certfile and keyfile:
        try:
            # an empty password: an encrypted key fails here instead of prompting on a terminal
            ssl.create_default_context().load_cert_chain(certfile, keyfile, password=b"")
        except ssl.SSLError as exc:
            raise UserError(
                f"{flags}certfile {certfile} and {flags}keyfile {keyfile} are not a PEM certificate and its "
                f"unencrypted private key ({exc})"
            ) from exc


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


# -- stores ---------------------------------------------------------------------------------

#: Compare-and-swap rounds of update, delete, reserve and unreserve when the key keeps changing.
CAS_ATTEMPTS = 5
#: A lease must live at least this long: below it, renewals would follow each other too closely.
MIN_TTL = timedelta(seconds=2)
#: ... and at most this long (about ten years; a subnet meant to be kept forever is a reservation).
MAX_TTL = timedelta(days=3650)
#: Renew this long before expiry, unless the TTL is short (then at half the TTL).
DEFAULT_RENEW_MARGIN = timedelta(hours=1)
#: How many (key, revision) pairs of garbled entries are remembered to warn about each once.
GARBLED_MEMORY = 10_000


def duration(value: float | str | timedelta) -> timedelta:
    """Converter for lease timing: seconds -> timedelta.

    A number no timedelta can hold (``inf``, ``nan``, ``1e300``) becomes ``timedelta.max``
    (``-inf``: ``timedelta.min``) instead of an ``OverflowError``; the store then rejects it
    with a message that names its flag.
    """
    if isinstance(value, timedelta):
        return value
    number = float(value)
    if not math.isfinite(number) or abs(number) > 10 * MAX_TTL.total_seconds():
        return timedelta.min if number < 0 else timedelta.max
    return timedelta(seconds=number)


def _shown(value: timedelta) -> str:
    if value in (timedelta.max, timedelta.min):
        return "(not a finite number of seconds)"
    return f"{value.total_seconds():g}"


@attrs.frozen
class LeaseTimingOptions:
    """The lease timing options of every store with TTLs: inherit your ``Options`` from this.

    ``renew_margin`` 0 (the default) means "1 h, or half the TTL when the TTL is 2 h or less",
    so ``--<store>-ttl 600`` alone renews every 300 s.  ``Store.__init__`` validates both.
    """

    ttl: timedelta = option(timedelta(hours=24), "lease lifetime in seconds", converter=duration)
    renew_margin: timedelta = option(
        timedelta(0),
        "renew a lease when less than this many seconds are left (0: 3600, or half the TTL if shorter)",
        converter=duration,
    )

    def check(self, flag_prefix: str) -> None:
        """Raise ``UserError`` naming ``<flag_prefix>ttl`` / ``renew-margin`` for unusable values."""
        ttl, margin = self.ttl, self.renew_margin
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise UserError(
                f"{flag_prefix}ttl {_shown(ttl)} is not usable: give a lease lifetime between "
                f"{MIN_TTL.total_seconds():.0f} and {MAX_TTL.total_seconds():.0f} seconds (default 86400)"
            )
        if margin < timedelta(0) or margin >= ttl:
            raise UserError(
                f"{flag_prefix}renew-margin {_shown(margin)} must be at least 0 and less than "
                f"{flag_prefix}ttl {_shown(ttl)}; leave it unset to renew at half a short TTL"
            )

    @property
    def effective_renew_margin(self) -> timedelta:
        if self.renew_margin:
            return self.renew_margin
        return min(DEFAULT_RENEW_MARGIN, self.ttl / 2)


@attrs.frozen
class Entry:
    """One lease key as a store holds it: what the key-value primitives read and write."""

    key: str  # flannel's key name without the prefix: 10.244.3.0-24 (may be garbage)
    value: str | bytes  # flannel's JSON value, undecoded
    version: int  # the store's modification revision: the compare-and-swap token
    expiration: datetime | None  # None: no TTL, a reservation
    created_revision: int = 0  # the revision that created the key (0 when unknown)
    ipv6: bool = False  # read from the IPv6 key space
    handle: Any = attrs.field(default=None, eq=False, repr=False)  # store-private (etcd: its lease ID)


@attrs.frozen
class EntryList:
    """Every live entry, and the store revision of that consistent snapshot."""

    entries: tuple[Entry, ...]
    revision: int


@attrs.frozen
class Change:
    """One lease key changed: ADDED with the new entry, REMOVED/EXPIRED with the last one if known."""

    kind: EventKind
    key: str
    entry: Entry | None
    revision: int
    ipv6: bool = False


@attrs.frozen
class ChangeList:
    """What ``watch_entries`` returns: the changes after a revision, and the new revision."""

    changes: tuple[Change, ...]
    revision: int


def is_ipv6_key(key: str) -> bool:
    """True for a key of the IPv6 key space (``fd00:10:244:3::-64``)."""
    return ":" in key


def _owner(entry: Entry, version: int = 4) -> IPv4Address | IPv6Address | None:
    """Who holds *entry*: its public address of family *version* (None when unreadable)."""
    try:
        return LeaseAttrs.from_json(entry.value).public_ip_of(version)
    except GarbledLease:
        return None


def _owner_text(entry: Entry, version: int) -> str:
    """The owner of *entry* for a message: its address, or why it has none."""
    try:
        owner = LeaseAttrs.from_json(entry.value).public_ip_of(version)
    except GarbledLease:
        return "an unreadable value"
    return str(owner) if owner is not None else f"a value without a {'PublicIP' if version == 4 else 'PublicIPv6'}"


def _version(key: str) -> int:
    return 6 if is_ipv6_key(key) else 4


def merge_leases(parts: Sequence[Lease]) -> Lease:
    """One lease holding the subnets of *parts* (one per family, read from one key each).

    The attrs are the first part's (every key of a host carries the same JSON); the expiration
    is the earliest, so a renewal due for either key is due for the merged lease, and None
    only when every part is a reservation."""
    assert parts, "a lease has at least one family"
    by_family = {v: part for part in parts for v in part.families}
    expirations = [p.expiration for p in parts if p.expiration is not None]
    created = [p.created_revision for p in parts if p.created_revision]
    return attrs.evolve(
        parts[0],
        subnet=by_family[4].subnet if 4 in by_family else None,
        ipv6_subnet=by_family[6].ipv6_subnet if 6 in by_family else None,
        expiration=min(expirations) if expirations else None,
        revision=max(p.revision for p in parts),
        created_revision=min(created) if created else 0,
    )


class Store(Plugin):
    """Where the network config and the leases live.

    A store implements small key-value primitives over flannel's lease keys
    (``10.244.3.0-24``): ``list_entries`` (a snapshot with its revision), ``get_entry`` (with its
    version), ``create_entry`` (only if absent), ``put_entry`` / ``delete_entry`` (only if the
    version is unchanged) and ``watch_entries`` (changes after a revision).  The lease policy is
    written once, here, on top of them: decoding with garbled entries reported once and
    counted, acquire with reuse, "never overwrite or delete another host's lease", "a missing
    lease raises ``LeaseLost``", "a reservation stays a reservation", compare-and-swap retries
    and their error texts.  ``StoreContract`` (``overlayd.testing``) holds every store to it.

    A store whose data model differs — the Kubernetes store, where the API server assigns
    subnets — may override the lease-level methods (``list_leases``, ``acquire_lease``,
    ``update_lease``, ``delete_lease``, ``reserve``, ``unreserve``, ``wait_for_events``) instead
    and implement the primitives it does not need by raising ``PermanentError``.
    """

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        if isinstance(options, LeaseTimingOptions):
            options.check(f"--{self.name or 'store'}-")
        #: How many times a garbled key or value was skipped (each (key, revision) is warned once).
        self.garbled_skipped = 0
        self._garbled_seen: set[tuple[str, int]] = set()
        self._garbled_lock = threading.Lock()

    @property
    def lease_ttl(self) -> timedelta:
        """Lifetime of a new or renewed lease: the store's ``ttl`` option, else 24 h."""
        if isinstance(self.options, LeaseTimingOptions):
            return self.options.ttl
        return getattr(self.options, "ttl", None) or timedelta(hours=24)

    @property
    def renew_margin(self) -> timedelta:
        """Renew when less than this is left (see ``LeaseTimingOptions``), else 1 h."""
        if isinstance(self.options, LeaseTimingOptions):
            return self.options.effective_renew_margin
        return getattr(self.options, "renew_margin", None) or DEFAULT_RENEW_MARGIN

    # -- network config ---------------------------------------------------------------------

    @abc.abstractmethod
    def get_config(self) -> str | None:
        """The raw network config JSON, or None when there is none yet."""

    @abc.abstractmethod
    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        """Write the raw config; with *only_if_absent*, write only when none exists.

        Returns True when written.
        """

    # -- key-value primitives ---------------------------------------------------------------

    @abc.abstractmethod
    def list_entries(self) -> EntryList:
        """Every live lease entry (expired ones left out), and the revision of the snapshot."""

    @abc.abstractmethod
    def get_entry(self, key: str) -> Entry | None:
        """The live entry of *key* with its version, or None."""

    @abc.abstractmethod
    def create_entry(self, key: str, value: str, ttl: timedelta | None) -> Entry | None:
        """Write *key* only if it does not exist; *ttl* None writes it without expiry.

        Returns the written entry, or None when the key exists.
        """

    @abc.abstractmethod
    def put_entry(self, current: Entry, value: str, ttl: timedelta | None) -> Entry | None:
        """Overwrite *current* only if its version is unchanged; None when it changed or went."""

    @abc.abstractmethod
    def delete_entry(self, current: Entry) -> bool:
        """Delete *current* only if its version is unchanged (a REMOVED, not an EXPIRED, change).

        Returns False when it changed; True when deleted (or already gone).
        """

    @abc.abstractmethod
    def watch_entries(self, since_revision: int, timeout: float) -> ChangeList:
        """Changes after *since_revision*, waiting up to *timeout* seconds for the first.

        Returns no changes (same revision) on timeout.  Raises ``HistoryGone`` when the store no
        longer holds history that old, and ``StoreUnavailable`` when unreachable.
        """

    def mark_ready(self, lease: Lease) -> None:
        """Hook: the daemon calls it once *lease* is set up and its subnet file written.

        Optional; the Kubernetes store reports the Node's network as available here.  It must
        not raise: a store that fails to report logs it and tries again later.
        """

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    # -- decoding ------------------------------------------------------------------------------

    def report_garbled(self, key: str, revision: int, exc: Exception) -> None:
        """Count a skipped garbled entry; warn only the first time for each key and revision."""
        seen = (key[:200], revision)
        with self._garbled_lock:
            self.garbled_skipped += 1
            first = seen not in self._garbled_seen
            if first:
                if len(self._garbled_seen) >= GARBLED_MEMORY:
                    self._garbled_seen.clear()
                self._garbled_seen.add(seen)
        if first:
            log.warning("%s store: skipping garbled lease %.200r (revision %d): %s", self.name, key, revision, exc)

    def lease_from_entry(self, entry: Entry) -> Lease:
        """Decode one entry (bounded, see ``overlayd.decode``); ``GarbledLease`` when unusable."""
        if not entry.key or "/" in entry.key:
            raise GarbledLease(f"unexpected key {entry.key[:200]!r} in the lease key space")
        return parse_lease(
            entry.key,
            entry.value,
            expiration=entry.expiration,
            revision=entry.version,
            created_revision=entry.created_revision,
            ipv6=entry.ipv6,
        )

    # -- lease policy built on the primitives ------------------------------------------------

    def list_leases(self) -> LeaseList:
        """Every live lease and reservation (garbled ones skipped, reported once)."""
        snapshot = self.list_entries()
        leases = []
        for entry in snapshot.entries:
            try:
                leases.append(self.lease_from_entry(entry))
            except GarbledLease as exc:
                self.report_garbled(entry.key, entry.version, exc)
        return LeaseList(tuple(leases), snapshot.revision)

    def wait_for_events(self, since_revision: int, timeout: float) -> WatchResult:
        """Lease events after *since_revision*, waiting up to *timeout* seconds for the first.

        Returns an empty result (same revision) on timeout.  Raises ``HistoryGone`` when the
        store no longer holds history that old, and ``StoreUnavailable`` when unreachable.
        """
        result = self.watch_entries(since_revision, timeout)
        events = []
        for change in result.changes:
            try:
                if change.ipv6 != is_ipv6_key(change.key) or "/" in change.key:
                    raise GarbledLease(f"unexpected key {change.key[:200]!r} in the lease key space")
                subnet = key_to_subnet(change.key)
            except GarbledLease as exc:
                self.report_garbled(change.key, change.revision, exc)
                continue
            lease: Lease | None = None
            if change.entry is not None:
                try:
                    lease = self.lease_from_entry(change.entry)
                except GarbledLease as exc:
                    if change.kind is EventKind.ADDED:
                        self.report_garbled(change.key, change.revision, exc)
                        continue
            events.append(LeaseEvent(change.kind, subnet, lease, change.revision))
        return WatchResult(tuple(events), result.revision)

    def create_lease(self, lease: Lease) -> Lease | None:
        """Create *lease* with this store's TTL only if its key does not exist.

        Returns the stored lease (with expiration and revisions), or None when the key exists.
        """
        entry = self.create_entry(lease.key, lease.attrs.to_json(), self.lease_ttl)
        return None if entry is None else self.lease_from_entry(entry)

    def update_lease(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        """Rewrite our lease's attrs and refresh its TTL on every key it holds (one per family;
        a reservation stays one).

        Raises ``LeaseLost`` when a key no longer exists or now holds another host's lease (or an
        unreadable value): another host's lease is never overwritten.  The owner of a key is the
        public address of its family (PublicIP for ``subnets/``, PublicIPv6 for ``v6-subnets/``).
        """
        return merge_leases([self._update_key(k, attrs) for k in lease.keys])

    def _update_key(self, key: str, attrs: LeaseAttrs) -> Lease:
        value = attrs.to_json()
        me = attrs.public_ip_of(_version(key))
        for _ in range(CAS_ATTEMPTS):
            current = self.get_entry(key)
            if current is None:
                raise LeaseLost(f"lease {key} no longer exists in the store")
            owner = _owner(current, _version(key))
            if me is None or owner != me:
                raise LeaseLost(f"lease {key} now belongs to {_owner_text(current, _version(key))}")
            ttl = None if current.expiration is None else self.lease_ttl
            written = self.put_entry(current, value, ttl)
            if written is not None:
                return self.lease_from_entry(written)
        raise StoreUnavailable(f"lease {key} kept changing under us; try again")

    def renew_lease(self, lease: Lease) -> Lease:
        """Refresh the TTL; ``LeaseLost`` when the lease is gone."""
        return self.update_lease(lease, lease.attrs)

    def delete_lease(self, lease: Lease) -> None:
        """Remove every key of *lease*; a missing key, one that now holds another host's lease,
        or a reservation (``unreserve`` alone removes those: *lease* may predate ``overlayd
        reserve``) is left alone."""
        for key in lease.keys:
            self._delete_key(key, lease.attrs)

    def release_lease(self, lease: Lease) -> None:
        """Give up our lease at shutdown, every key of it; a reservation is kept."""
        if not lease.is_reservation:
            self.delete_lease(lease)

    def _delete_key(self, key: str, attrs: LeaseAttrs) -> None:
        me = attrs.public_ip_of(_version(key))
        for _ in range(CAS_ATTEMPTS):
            current = self.get_entry(key)
            if current is None:
                return
            owner = _owner(current, _version(key))
            if me is None or owner != me:
                log.info("not deleting %s: it now holds the lease of %s", key, _owner_text(current, _version(key)))
                return
            if current.expiration is None:
                log.info("not deleting %s: it is a reservation of %s; 'overlayd unreserve' removes it", key, owner)
                return
            if self.delete_entry(current):
                return
        raise StoreUnavailable(f"lease {key} kept changing under us; try again")

    def reserve(self, subnet: IPv4Network | IPv6Network, public_ip: IPv4Address | IPv6Address) -> Lease:
        """Create a reservation (no TTL) for *public_ip*, or turn its own lease into one.

        An IPv6 subnet is reserved for a PublicIPv6 (in ``v6-subnets/``), an IPv4 one for a
        PublicIP.  ``UserError`` when the subnet holds another host's lease or an unreadable
        value, or when the two families differ.
        """
        if subnet.version != public_ip.version:
            raise UserError(f"subnet {subnet} and public IP {public_ip} are not of the same IP version")
        key = subnet_to_key(subnet)
        version = subnet.version
        mine = (
            LeaseAttrs(public_ip=public_ip, backend_type="")
            if isinstance(public_ip, IPv4Address)
            else LeaseAttrs(public_ip=None, public_ipv6=public_ip, backend_type="")
        )
        for _ in range(CAS_ATTEMPTS):
            current = self.get_entry(key)
            if current is None:
                written = self.create_entry(key, mine.to_json(), None)
            else:
                try:
                    attrs = LeaseAttrs.from_json(current.value)
                except GarbledLease as exc:
                    raise UserError(f"subnet {subnet} holds an unreadable value ({exc}); delete it first") from exc
                if attrs.public_ip_of(version) != public_ip:
                    raise UserError(
                        f"subnet {subnet} is leased by {attrs.public_ip_of(version)}; "
                        "release that lease first or reserve another subnet"
                    )
                written = self.put_entry(current, attrs.to_json(), None)
            if written is not None:
                return self.lease_from_entry(written)
        raise StoreUnavailable(f"subnet {subnet} kept changing under us; try again")

    def unreserve(self, subnet: IPv4Network | IPv6Network) -> None:
        """Remove the reservation of *subnet*; a missing one is not an error.

        ``NotAReservation`` (a ``UserError``) when the subnet holds a live lease: that is
        ``overlayd release``'s job, and ``unreserve`` never deletes it.
        """
        key = subnet_to_key(subnet)
        for _ in range(CAS_ATTEMPTS):
            current = self.get_entry(key)
            if current is None:
                return
            if current.expiration is not None:
                owner = _owner(current, subnet.version)
                raise NotAReservation(
                    f"{subnet} is a live lease of {owner or 'an unreadable value'}, not a reservation; "
                    f"'overlayd release {subnet}' deletes a lease"
                )
            if self.delete_entry(current):
                return
        raise StoreUnavailable(f"subnet {subnet} kept changing under us; try again")

    def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        prefer: Sequence[IPv4Network | IPv6Network] = (),
        rng: random.Random | None = None,
    ) -> Lease:
        """Get this host a lease of every family the network carries (``config.families``),
        merged into one :class:`Lease`: per family, reuse its own (matched by the public address
        of that family), else a preferred free subnet, else a random free one.  Lost races are
        retried a bounded number of times.  Each family is one key (``subnets/``,
        ``v6-subnets/``) carrying the same attrs JSON."""
        rng = rng or random.Random()
        return merge_leases([self._acquire_family(config, attrs, v, prefer, rng) for v in config.families])

    def _acquire_family(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        version: int,
        prefer: Sequence[IPv4Network | IPv6Network],
        rng: random.Random,
    ) -> Lease:
        me = attrs.public_ip_of(version)
        if me is None:
            flag = "--public-ip" if version == 4 else "--public-ipv6"
            raise UserError(f"the IPv{version} network needs this host's IPv{version} public address; pass {flag}")
        for _ in range(ACQUIRE_ATTEMPTS):
            snapshot = self.list_leases()
            own = ipam.find_own_lease(config, snapshot.leases, me, version)
            if own is not None:
                try:
                    return self.update_lease(own, attrs)
                except LeaseLost:
                    continue
            subnet = ipam.choose_free_subnet(config, snapshot.leases, version=version, prefer=prefer, rng=rng)
            draft = Lease(subnet, attrs, None) if isinstance(subnet, IPv4Network) else Lease(None, attrs, None, subnet)
            created = self.create_lease(draft)
            if created is not None:
                return created
            log.debug("lost the race for %s; trying again", subnet)
        raise LeaseConflict(f"could not claim a subnet after {ACQUIRE_ATTEMPTS} attempts (heavy contention)")

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

    #: The UDP port peers send the overlay's packets to (vxlan: its port), or None for a backend
    #: that has none (host-gw, cloud routes).  With ``--restrict-overlay-port`` only the public
    #: IPs of current leases may send to it.
    overlay_port: int | None = None

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """MTU for containers on this host (the subnet file's FLANNEL_MTU)."""

    @property
    @abc.abstractmethod
    def backend_data(self) -> Mapping[str, Any]:
        """What peers need to reach this host, published as the lease's BackendData."""

    @property
    def backend_v6_data(self) -> Mapping[str, Any] | None:
        """What peers need for this host's IPv6 overlay (the lease's BackendV6Data), or None
        when the backend keeps nothing per family (host-gw) or IPv6 is off."""
        return None

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

    def kernel_cache(self) -> KernelScope | None:
        """What of the kernel this network owns, when the daemon may keep it in a cache fed by
        netlink notifications (routes, neighbours, FDB entries written through
        :mod:`overlayd.netlink`); None (the default) keeps the un-cached loop, which calls
        :meth:`actual_state` every pass.  A network that answers must also make
        ``desired_state(own, [peer])`` depend on that one peer only: the daemon then recomputes a
        peer's objects when its lease changes, and diffs only those slots."""
        return None

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

    def counters(self) -> Mapping[str, int]:
        """Running totals this network keeps itself (a userspace forwarder's packets and bytes),
        exported as ``overlayd_forwarder_<name>_total``.  Names are short lowercase words with
        underscores; a fixed set per backend (never per peer).  Called from the metrics thread."""
        return {}


class Backend(Plugin):
    """How packets cross hosts."""

    @classmethod
    def describe(cls, lease: Lease) -> Mapping[str, str]:
        """Columns about *lease* for people (``overlayd leases``, the demo), e.g. ``{"VtepMAC": ...}``.

        Pure: reads only the lease, so the CLI can call it on the backend class without a host.
        The keys are column titles; a lease that lacks a value gets ``"-"``, never an error.
        """
        return {}

    @classmethod
    def probe_address(cls, lease: Lease) -> IPv4Address | IPv6Address | None:
        """The overlay address ``overlayd check`` pings to test the path to *lease*'s host.

        Pure, like :meth:`describe`.  The default is the subnet's first address (``.1``), where
        a CNI bridge puts its gateway; vxlan answers ``<subnet>.0``, its VTEP's own address.
        None: this backend has no address to probe (only the underlay is checked).  A lease of
        one family (what one store key holds) gives that family's address; callers pass
        ``lease.only(family)`` for each family of a lease holding both.
        """
        subnet = lease.subnet if lease.subnet is not None else lease.ipv6_subnet
        if subnet is None or subnet.num_addresses < 4:
            return None
        return subnet.network_address + 1

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
