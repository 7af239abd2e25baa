"""Type-checked with ``mypy --strict`` by ``make typecheck``: the public API as users write it."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address, IPv4Network

import overlayd


def inventory(store: overlayd.Store) -> dict[IPv4Network, IPv4Address | None]:
    return {lease.subnet: lease.attrs.public_ip for lease in store.list_leases().leases if lease.subnet}


def follow(store: overlayd.Store, stop: threading.Event) -> list[str]:
    seen: list[str] = []
    for item in overlayd.watch(store, stop):
        if isinstance(item, overlayd.LeaseEvent):
            seen.append(f"{item.kind.value} {item.subnet}")
    return seen


def plan_for(store: overlayd.Store) -> int:
    result: overlayd.DryRun = overlayd.dry_run(store, "192.0.2.1")
    return len(result.desired)


def start_daemon(stop: threading.Event) -> None:
    settings = overlayd.DaemonSettings(store="embedded", store_options={"path": "/tmp/x.db"}, backend="alloc")
    overlayd.run(settings, stop)


def configure(store: overlayd.Store) -> overlayd.NetworkConfig | None:
    overlayd.write_network_config(store, overlayd.NetworkConfig.from_dict({"Network": "10.244.0.0/16"}), force=True)
    return overlayd.read_network_config(store)


def main() -> None:
    store: overlayd.Store = overlayd.open_store("embedded", path="/tmp/x.db")
    other: overlayd.Store = overlayd.open_store_from_environment()
    backend: overlayd.Backend = overlayd.load_backend("alloc")
    names: list[str] = sorted(overlayd.installed_plugins()["backend"])
    print(inventory(store), configure(other), backend.description(), names)
