"""Show what overlayd would program on one host, without changing anything (library API).

OVERLAYD_STORE=etcd OVERLAYD_ETCD_ENDPOINTS=http://127.0.0.1:2379 python dry_run.py 192.0.2.7
"""

from __future__ import annotations

import sys

import overlayd


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: dry_run.py PUBLIC_IP", file=sys.stderr)
        return 2
    store = overlayd.open_store_from_environment()
    try:
        result = overlayd.dry_run(store, sys.argv[1])
    except overlayd.UserError as exc:
        print(f"dry_run: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"host {result.own.attrs.public_ip} holds {result.own.subnet}; {len(result.peers)} peers")
    for obj in sorted(result.desired, key=repr):
        print(f"  want {obj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
