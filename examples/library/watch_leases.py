"""Print lease changes as they happen, using the library API (Ctrl-C, or --count N, to stop).

OVERLAYD_STORE=etcd OVERLAYD_ETCD_ENDPOINTS=http://127.0.0.1:2379 python watch_leases.py --count 3
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import overlayd


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=0, help="stop after this many changes (0: never)")
    parser.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: never)")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.timeout:
        timer = threading.Timer(args.timeout, stop.set)
        timer.daemon = True
        timer.start()
    store = overlayd.open_store_from_environment()
    seen = 0
    try:
        for item in overlayd.watch(store, stop):
            if isinstance(item, overlayd.LeaseList):
                print(f"snapshot: {len(item.leases)} leases at revision {item.revision}", flush=True)
                continue
            lease = item.lease
            who = f" {lease.attrs.public_ip}" if lease is not None else ""
            print(f"{item.kind.value} {item.subnet}{who} (revision {item.revision})", flush=True)
            seen += 1
            if args.count and seen >= args.count:
                stop.set()
    finally:
        stop.set()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
