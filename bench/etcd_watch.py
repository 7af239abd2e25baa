"""etcd store: watch latency and the CPU cost of an etcd outage.

Starts a private etcd on 127.0.0.1 (random ports, temp dir, removed afterwards) and prints:

* the median / p90 time from "a host starts writing a lease" to "another client's
  ``wait_for_events`` returns it", over 100 changes (and from the write's acknowledgement);
* the CPU seconds this process spends while etcd is SIGSTOPped ("paused": hung, sockets open)
  and then stopped ("stopped": connections refused) for 20 s each, with a watcher that behaves
  like the daemon (wait for events, back off on ``StoreUnavailable``), and how long the watch
  takes to deliver a change once etcd is back.

With ``--compare-etcd3-watch`` it also measures python-etcd3's own ``watch_prefix`` through the
same outage (it busy-loops), to print the ratio.

Usage: ``.venv/bin/python bench/etcd_watch.py [--changes 100] [--outage 20]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from ipaddress import IPv4Network
from typing import Any

from overlayd import open_store
from overlayd.errors import StoreUnavailable
from overlayd.model import Lease, LeaseEvent
from overlayd.plugin import Store
from overlayd.testing.etcd import EtcdServer
from overlayd.testing.store_contract import attrs_for


def watch_latency(server: EtcdServer, changes: int) -> tuple[list[float], list[float]]:
    options = server.store_options("/bench/latency")
    watcher, writer = open_store("etcd", **options), open_store("etcd", **options)
    from_start: list[float] = []
    from_ack: list[float] = []
    try:
        since = watcher.list_leases().revision
        for i in range(changes):
            got: list[float] = []

            def wait(since: int = since, got: list[float] = got) -> None:
                if watcher.wait_for_events(since, 5.0).events:
                    got.append(time.perf_counter())

            thread = threading.Thread(target=wait)
            thread.start()
            time.sleep(0.02)  # let the watch be created, as a long-running watcher's would be
            started = time.perf_counter()
            subnet = IPv4Network(f"10.{200 + i // 256}.{i % 256}.0/24")
            lease = writer.create_lease(Lease(subnet, attrs_for(f"192.0.2.{i % 250 + 1}"), None))
            acked = time.perf_counter()
            thread.join(10)
            assert lease is not None and got, "no event"
            from_start.append(got[0] - started)
            from_ack.append(max(0.0, got[0] - acked))
            since = lease.revision
    finally:
        watcher.close()
        writer.close()
    return from_start, from_ack


def _down(server: EtcdServer, mode: str) -> None:
    if mode == "paused":
        server.pause()  # SIGSTOP: connections stay open, nothing answers
    else:
        server.terminate()  # gone: connections refused


def _up(server: EtcdServer, mode: str) -> None:
    if mode == "paused":
        server.resume()
    else:
        server.start()


def outage(server: EtcdServer, seconds: float, mode: str) -> tuple[float, float, float, int]:
    """(CPU seconds during the outage, seconds until a write is accepted and until the watch
    delivers it once etcd is back, failed watch calls)."""
    options = server.store_options(f"/bench/outage-{mode}")
    watcher, writer = open_store("etcd", **options), open_store("etcd", **options)
    seen: list[LeaseEvent] = []
    failures = 0
    stop = threading.Event()
    since = watcher.list_leases().revision

    def daemon_like(store: Store) -> None:
        nonlocal since, failures
        backoff = 0.2
        while not stop.is_set():
            try:
                result = store.wait_for_events(since, 1.0)
            except StoreUnavailable:
                failures += 1
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            seen.extend(result.events)
            since = result.revision

    thread = threading.Thread(target=daemon_like, args=(watcher,))
    thread.start()
    try:
        time.sleep(0.5)
        _down(server, mode)
        cpu0 = time.process_time()
        time.sleep(seconds)
        cpu = time.process_time() - cpu0
        resumed = time.perf_counter()
        _up(server, mode)
        while True:
            try:
                lease = writer.create_lease(Lease(IPv4Network("10.250.0.0/24"), attrs_for("192.0.2.99"), None))
                break
            except StoreUnavailable:
                time.sleep(0.1)
        assert lease is not None
        written = time.perf_counter() - resumed
        while not any(e.subnet == lease.subnet for e in seen):
            time.sleep(0.01)
            if time.perf_counter() - resumed > 60:
                raise RuntimeError("the watch did not resume within 60 s")
        return cpu, written, time.perf_counter() - resumed, failures
    finally:
        stop.set()
        thread.join(10)
        watcher.close()
        writer.close()


def etcd3_watch_outage(server: EtcdServer, seconds: float, mode: str) -> tuple[float, bool]:
    """python-etcd3's own watch_prefix through the same outage: (CPU seconds, alive afterwards).

    The client runs in a child process (a wedged python-etcd3 watcher thread cannot be stopped);
    this process takes etcd down and up and tells the child when.
    """
    ctx = multiprocessing.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_etcd3_child, args=(server.client_port, commands, results), daemon=True)
    child.start()
    try:
        results.get(timeout=30)  # watching
        _down(server, mode)
        commands.put("start")
        time.sleep(seconds)
        commands.put("stop")
        cpu: float = results.get(timeout=30)
        _up(server, mode)
        commands.put("check")
        alive: bool = results.get(timeout=30)
        return cpu, alive
    finally:
        child.kill()
        child.join()


def _etcd3_child(port: int, commands: Any, results: Any) -> None:
    import etcd3
    import overlayd.stores.etcd  # noqa: F401  (sets up the protobuf runtime etcd3 needs)

    client = etcd3.client("127.0.0.1", port, timeout=5)
    seen = threading.Event()
    client.add_watch_prefix_callback("/bench/etcd3/", lambda _response: seen.set())
    time.sleep(0.5)
    results.put("watching")
    commands.get()
    cpu0 = time.process_time()
    commands.get()
    results.put(time.process_time() - cpu0)
    commands.get()
    time.sleep(1.0)
    try:
        client.put("/bench/etcd3/after", "x")
        results.put(seen.wait(5.0))
    except Exception:
        results.put(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--compare-etcd3-watch", action="store_true")
    args = parser.parse_args()
    with EtcdServer() as server:
        from_start, from_ack = watch_latency(server, args.changes)
        from_start.sort()
        print(
            f"watch latency over {len(from_start)} changes: median {statistics.median(from_start) * 1000:.1f} ms "
            f"(p90 {from_start[int(len(from_start) * 0.9)] * 1000:.1f} ms, max {from_start[-1] * 1000:.1f} ms) "
            f"from write start; median {statistics.median(from_ack) * 1000:.1f} ms from the write's ack"
        )
        for mode in ("paused", "stopped"):
            cpu, written, seen, failures = outage(server, args.outage, mode)
            print(
                f"etcd {mode} for {args.outage:.0f} s: {cpu:.3f} CPU s used by this process "
                f"({cpu / args.outage * 100:.2f}% of one core), {failures} StoreUnavailable to the watcher; "
                f"once etcd was back a write went through after {written:.2f} s and the watcher "
                f"(backing off up to 5 s) saw it after {seen:.2f} s"
            )
            if args.compare_etcd3_watch:
                spin, alive = etcd3_watch_outage(server, args.outage, mode)
                print(
                    f"  python-etcd3 watch_prefix, same outage: {spin:.3f} CPU s "
                    f"({spin / max(cpu, 1e-3):.0f}x ours), {'still delivers' if alive else 'dead'} afterwards"
                )


if __name__ == "__main__":
    main()
