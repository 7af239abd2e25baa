"""List the leases of an overlayd network as a table, using the library API.

The store is chosen exactly as the CLI would: OVERLAYD_STORE, OVERLAYD_<STORE>_<OPTION> variables
and an optional --config TOML file, e.g.

    OVERLAYD_STORE=etcd OVERLAYD_ETCD_ENDPOINTS=http://127.0.0.1:2379 python list_leases.py
"""

from __future__ import annotations

import sys

import overlayd


def main() -> int:
    store = overlayd.open_store_from_environment(config_file=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        config = overlayd.read_network_config(store)
        snapshot = store.list_leases()
    finally:
        store.close()
    print(f"network {config.network if config else '(no config)'}  revision {snapshot.revision}")
    print(f"{'SUBNET':<18} {'PUBLIC IP':<16} {'BACKEND':<8} {'VTEP MAC':<18} EXPIRES")
    for lease in sorted(snapshot.leases, key=lambda x: str(x.subnet)):
        mac = lease.attrs.backend_data.get("VtepMAC", "-")
        expires = "reserved" if lease.expiration is None else lease.expiration.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{lease.subnet!s:<18} {lease.attrs.public_ip!s:<16} {lease.attrs.backend_type:<8} {mac:<18} {expires}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
