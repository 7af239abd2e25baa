"""Metrics: each daemon has its own registry, the exposition parses with prometheus_client's own
parser, the bounded labels, the drift rule, and docs/operations.md lists every metric.

How the figures move on a real cluster (a peer joins, a route deleted by hand, the store going
away) is tests/e2e/test_observability.py.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from overlayd import errors
from overlayd.kernel import FdbEntry, Neighbour, Route
from overlayd.metrics import Metrics, drifted, error_kind, skip_reason
from prometheus_client.parser import text_string_to_metric_families

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def route(n: int) -> Route:
    return Route(
        dst=IPv4Network(f"10.244.{n}.0/24"), dev="flannel.1", gateway=IPv4Address(f"10.244.{n}.0"), onlink=True
    )


def test_two_daemons_in_one_process_do_not_clash() -> None:
    a, b = Metrics(), Metrics()
    a.relisted()
    assert samples(a)[("overlayd_store_relists_total", ())] == 1
    assert samples(b)[("overlayd_store_relists_total", ())] == 0


def test_recorded_figures_appear_in_the_exposition() -> None:
    m = Metrics()
    m.store_up(True)
    m.peers(known=3, programmed=2, skipped_reasons=["PublicIP 127.0.0.1 is a loopback address"])
    m.kernel_entries([route(1), route(2), Neighbour(IPv4Address("10.244.1.0"), "02:00:00:00:00:01", "flannel.1")])
    m.pass_done(0.003, added=3, removed=1)
    m.drift_repaired([route(1)])
    m.error(errors.StoreUnavailable("etcd is down"))
    m.error(ValueError("a bug"))
    m.lease(datetime.now(UTC) + timedelta(hours=1))
    m.counters_source = lambda: {"packets_sent": 7, "Bad Name": 1, "flag": True}
    m.store_source = lambda: 4
    got = samples(m)
    assert got[("overlayd_store_up", ())] == 1
    assert got[("overlayd_peers_known", ())] == 3
    assert got[("overlayd_peers_programmed", ())] == 2
    assert got[("overlayd_peers_skipped", (("reason", "bad_public_ip"),))] == 1
    assert got[("overlayd_peers_skipped", (("reason", "other"),))] == 0
    assert got[("overlayd_kernel_entries", (("kind", "route"),))] == 2
    assert got[("overlayd_kernel_entries", (("kind", "neigh"),))] == 1
    assert got[("overlayd_kernel_entries", (("kind", "fdb"),))] == 0
    assert got[("overlayd_reconcile_passes_total", (("result", "ok"),))] == 1
    assert got[("overlayd_reconcile_pass_duration_seconds_count", ())] == 1
    assert got[("overlayd_reconcile_plan_size_sum", ())] == 4
    assert got[("overlayd_reconcile_changes_total", (("op", "add"),))] == 3
    assert got[("overlayd_drift_repaired_total", (("kind", "route"),))] == 1
    assert got[("overlayd_errors_total", (("kind", "store_unavailable"),))] == 1
    assert got[("overlayd_errors_total", (("kind", "other"),))] == 1
    assert 3500 < got[("overlayd_lease_expiry_seconds", ())] <= 3600
    assert got[("overlayd_forwarder_packets_sent_total", ())] == 7
    assert not any(name.startswith("overlayd_forwarder_") and "sent" not in name for name, _ in got)
    assert got[("overlayd_store_garbled_leases_skipped_total", ())] == 4
    assert any(name == "overlayd_build_info" for name, _ in got)


def test_a_reservation_never_expires_and_no_lease_means_no_figure() -> None:
    m = Metrics()
    assert not any(name == "overlayd_lease_expiry_seconds" for name, _ in samples(m))
    m.lease(None)
    assert math.isinf(samples(m)[("overlayd_lease_expiry_seconds", ())])


def test_a_failing_source_does_not_break_a_scrape() -> None:
    m = Metrics()

    def broken() -> int:
        raise RuntimeError("store closed")

    m.store_source = broken
    assert samples(m)[("overlayd_store_garbled_leases_skipped_total", ())] == 0


def test_per_peer_reachability_is_opt_in_and_forgets_departed_peers() -> None:
    m = Metrics()
    assert not any(name.startswith("overlayd_peer") and "reachable" in name for name, _ in samples(m))
    m.peers_reachable(1)
    m.peer_reachable({"10.244.1.0/24": True, "10.244.2.0/24": False})
    m.peer_reachable({"10.244.1.0/24": False})
    got = samples(m)
    assert got[("overlayd_peers_reachable", ())] == 1
    assert got[("overlayd_peer_reachable", (("peer", "10.244.1.0/24"),))] == 0
    assert ("overlayd_peer_reachable", (("peer", "10.244.2.0/24"),)) not in got


def test_labels_are_bounded() -> None:
    assert error_kind(errors.HistoryGone("x")) == "history_gone"
    assert error_kind(errors.KernelError("x")) == "kernel"
    assert error_kind(errors.ConfigError("x")) == "config"
    assert skip_reason("its VtepMAC 02:.. is already claimed by the older lease 10.244.1.0-24") == "claim_taken"
    assert skip_reason("something nobody foresaw about 10.1.2.3") == "other"


def test_drift_is_what_was_desired_before_and_is_missing_now() -> None:
    fdb = FdbEntry("02:00:00:00:00:01", IPv4Address("192.0.2.11"), "flannel.1")
    before = frozenset({route(1), fdb})
    stray = Route(dst=IPv4Network("10.244.9.0/24"), dev="flannel.1")
    assert drifted(None, [route(1)], []) == []  # first pass: what an earlier run left
    assert drifted(before, [route(1), route(2)], [stray]) == [route(1), stray]  # route(2): a new peer
    assert drifted(before, [], [route(1)]) == []  # a peer that left: not drift


def test_operations_doc_lists_every_metric() -> None:
    m = Metrics()
    m.lease(None)
    m.counters_source = lambda: {"example": 1}
    text = DOCS.read_text()
    documented = set(re.findall(r"`(overlayd_[a-z_]+)`", text))
    for family in text_string_to_metric_families(m.exposition().decode()):
        name = family.name
        if name.endswith("_created"):
            continue  # prometheus_client's creation timestamps of counters and histograms
        if name.startswith("overlayd_forwarder_"):
            continue  # one per backend counter: documented as a pattern
        exposed = {name, f"{name}_total", f"{name}_info"}
        assert exposed & documented, f"{name} is not in docs/operations.md"
    assert "overlayd_forwarder_<name>_total" in text
