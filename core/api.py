"""The library API: what custom tooling (and the CLI itself) uses to work with overlayd.

Everything here is re-exported from ``overlayd``; it is the stable surface.  Nothing in it sets
up logging, installs signal handlers or exits the process: the caller owns the process.

    store = overlayd.open_store("etcd", endpoints="http://10.0.0.5:2379")
    for lease in store.list_leases().leases: ...
    for change in overlayd.watch(store, stop=threading.Event()): ...
    plan = overlayd.dry_run(store, public_ip="192.0.2.7")
"""

from __future__ import annotations

import os
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import attrs

from . import _loader
from ._loader import build_options as build_options  # part of the library API
from .config import DEFAULT_BACKEND_TYPE, NetworkConfig
from .errors import UserError
from .ipam import find_own_lease
from .model import Lease, LeaseEvent, LeaseList
from .peers import valid_peers  # the daemon's own peer filter, so a dry run cannot disagree
from .plan import Plan, diff
from .plugin import Backend, HostInfo, Plugin, Store, merge_leases

ENV_PREFIX = "OVERLAYD"


def store_class(name: str) -> type[Store]:
    """The installed store plugin class called *name* (``PluginNotFound`` lists the installed ones)."""
    return _loader.load_store(name)


def backend_class(name: str) -> type[Backend]:
    """The installed backend plugin class called *name*."""
    return _loader.load_backend(name)


def installed_plugins() -> dict[str, dict[str, type[Plugin] | Exception]]:
    """``{"store": {...}, "backend": {...}}``: each installed plugin's class, or why it cannot load."""
    return {
        "store": _loader.all_plugins(_loader.STORES),
        "backend": _loader.all_plugins(_loader.BACKENDS),
    }


def installed_plugin_names() -> dict[str, list[str]]:
    """``{"store": [...], "backend": [...]}``: the names of the installed plugins, read from the
    entry points without importing any plugin (cheap: no client library is loaded)."""
    return {
        "store": _loader.installed_names(_loader.STORES),
        "backend": _loader.installed_names(_loader.BACKENDS),
    }


def open_store(name: str = "embedded", **options: Any) -> Store:
    """Open the store plugin *name* with *options* (e.g. ``endpoints="http://127.0.0.1:2379"``)."""
    return _loader.new_store(name, options)


def load_backend(name: str = DEFAULT_BACKEND_TYPE, **options: Any) -> Backend:
    """Instantiate the backend plugin *name* with *options*; touches nothing until ``prepare``."""
    return _loader.new_backend(name, options)


def open_store_from_environment(
    config_file: str | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Store:
    """Open the store the CLI would open: ``OVERLAYD_STORE`` and ``OVERLAYD_<STORE>_<OPTION>``
    variables over the ``--config`` TOML file (``config_file`` or ``OVERLAYD_CONFIG``), with
    *overrides* (store options) on top."""
    env = os.environ if environ is None else environ
    doc: dict[str, Any] = {}
    path = config_file or env.get(f"{ENV_PREFIX}_CONFIG")
    if path:
        try:
            with open(path, "rb") as handle:
                doc = tomllib.load(handle)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"cannot read config file {path}: {exc}") from exc
    name = str(env.get(f"{ENV_PREFIX}_STORE") or doc.get("store") or "embedded")
    cls = store_class(name)
    options: dict[str, Any] = {}
    table = doc.get(name, {})
    for field in attrs.fields(cls.Options):
        variable = f"{ENV_PREFIX}_{name.replace('-', '_').upper()}_{field.name.upper()}"
        if variable in env:
            options[field.name] = env[variable]
        elif isinstance(table, dict):
            for key in (field.name, field.name.replace("_", "-")):
                if key in table:
                    options[field.name] = table[key]
    options.update(overrides)
    return cls.from_options(build_options(cls, options))


def read_network_config(store: Store) -> NetworkConfig | None:
    """The validated network config in *store*, or None when there is none."""
    raw = store.get_config()
    return None if raw is None else NetworkConfig.from_json(raw)


def write_network_config(store: Store, config: NetworkConfig, *, force: bool = False) -> None:
    """Store *config*; refuses (``UserError``) to replace an existing one unless *force*."""
    if not store.put_config(config.to_json(), only_if_absent=not force):
        raise UserError("the store already has a network config; use force=True (--force) to replace it")


def watch(store: Store, stop: threading.Event, since_revision: int | None = None) -> Iterator[LeaseEvent | LeaseList]:
    """Iterate over lease changes until *stop* is set: first a ``LeaseList`` snapshot (unless
    resuming from *since_revision*), then ``LeaseEvent``s.  Lost history is handled by re-listing."""
    return store.watch_leases(stop, since_revision=since_revision)


def watch_in_background(
    store: Store, callback: Callable[[LeaseEvent | LeaseList], None], stop: threading.Event
) -> threading.Thread:
    """Call *callback* for every item :func:`watch` yields, in a daemon thread, until *stop*."""

    def pump() -> None:
        for item in watch(store, stop):
            if stop.is_set():
                break
            callback(item)

    thread = threading.Thread(target=pump, name="overlayd-watch", daemon=True)
    thread.start()
    return thread


@attrs.frozen
class DryRun:
    """What the daemon on one host would program, computed without changing anything."""

    own: Lease
    peers: tuple[Lease, ...]
    desired: frozenset[Any]
    plan: Plan[Any] | None  # None unless the kernel was read (``read_kernel=True``)


def dry_run(
    store: Store,
    public_ip: str | IPv4Address | IPv6Address,
    *,
    backend_options: Mapping[str, Any] | None = None,
    read_kernel: bool = False,
) -> DryRun:
    """The desired kernel state (and, with *read_kernel*, the plan against this machine's
    kernel) for the host whose lease carries *public_ip* (its PublicIP, or its PublicIPv6 for
    an IPv6-only host).  A dual-stack host's lease is merged from its key of each family, as
    the daemon holds it.  Nothing is written anywhere."""
    config = read_network_config(store)
    if config is None:
        raise UserError("the store has no network config; create one with 'overlayd network init'")
    try:
        ip = ip_address(str(public_ip))
    except ValueError as exc:
        raise UserError(f"{public_ip!r} is not an IP address") from exc
    snapshot = store.list_leases()
    first = find_own_lease(config, snapshot.leases, ip, ip.version)
    if first is None:
        raise UserError(f"no lease in the store has {'PublicIP' if ip.version == 4 else 'PublicIPv6'} {ip}")
    parts = [first]
    for version in config.families:
        other = first.attrs.public_ip_of(version)
        found = find_own_lease(config, snapshot.leases, other, version) if version != ip.version else None
        if found is not None:
            parts.append(found)
    own = merge_leases(parts)
    backend = load_backend(config.backend_type, **dict(backend_options or {}))
    host = HostInfo(
        iface="", iface_index=0, iface_mtu=1500, public_ip=own.attrs.public_ip, public_ipv6=own.attrs.public_ipv6
    )
    network = backend.offline(config, host, own)
    others = [x for x in snapshot.leases if x.key not in own.keys]
    peers = tuple(valid_peers(config, network, own, others, lambda key, rev, why: None))
    desired = network.desired_state(own, peers)
    plan = diff(desired, network.actual_state()) if read_kernel else None
    return DryRun(own, peers, desired, plan)
