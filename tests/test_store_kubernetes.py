"""The Kubernetes store against the fake API server (``overlayd.testing.kube_apiserver``).

No real API server can be installed here, so the store talks over HTTP, through the official
client, to a fake of ``/api/v1/nodes`` that enforces the rules a node watcher depends on
(resourceVersion, watch resume, 410 Gone, the three patch types, podCIDR immutability).  The
first tests hold the fake itself to those rules; the rest test the store.

The store contract applies only in part: the controller manager, not the store, assigns
subnets, so the contract's tests of subnet allocation (distinct subnets, preferred subnets,
exhaustion, create-if-absent races), TTL expiry, reservations, deleting leases and raw lease
keys do not apply.  They are removed from the subclass below (set to None) and replaced by the
Kubernetes behaviour they correspond to; docs/stores/kubernetes.md lists them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import attrs
import pytest
from overlayd import open_store
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError, HistoryGone, LeaseLost, StoreUnavailable, UserError
from overlayd.model import EventKind, LeaseAttrs, LeaseEvent, LeaseList
from overlayd.plugin import Store
from overlayd.testing import StoreContract, StoreSpec
from overlayd.testing.kube_apiserver import ApiError, FakeApiServer, kubeconfig_for, request
from overlayd.testing.store_contract import DUAL, NETWORK, attrs_for, dual_attrs_for

kubernetes = pytest.importorskip("kubernetes")

PREFIX = "flannel.alpha.coreos.com"


def node(name: str, cidr: str | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec = {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}
    return {
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
                {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ]
        },
    }


def flannel_annotations(ip: str, mac: str) -> dict[str, str]:
    """What flannel (vxlan, IPv4) writes on its Node, byte for byte."""
    return {
        f"{PREFIX}/backend-data": f'{{"VNI":1,"VtepMAC":"{mac}"}}',
        f"{PREFIX}/backend-type": "vxlan",
        f"{PREFIX}/kube-subnet-manager": "true",
        f"{PREFIX}/public-ip": ip,
    }


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def kubeconfig(server: FakeApiServer, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    return path


def open_kube(kubeconfig: Path, tmp_path: Path, name: str = "n1", **options: Any) -> Store:
    return open_store(
        "kubernetes", kubeconfig=str(kubeconfig), node_name=name, net_conf=str(tmp_path / "net-conf.json"), **options
    )


@pytest.fixture
def store(kubeconfig: Path, tmp_path: Path) -> Iterator[Store]:
    opened = open_kube(kubeconfig, tmp_path)
    yield opened
    opened.close()


def core_api(server: FakeApiServer) -> Any:
    cfg = kubernetes.client.Configuration()
    cfg.host = server.url
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))


def next_event(events: Iterator[LeaseEvent | LeaseList], timeout: float = 10) -> LeaseEvent | LeaseList:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(next(events)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert out, f"nothing within {timeout} s"
    return out[0]


# -- the fake holds the protocol rules -------------------------------------------------------------


def test_fake_list_and_watch_resume_with_resource_versions(server: FakeApiServer) -> None:
    api = core_api(server)
    server.state.create(node("a", "10.244.1.0/24"))
    listed = api.list_node()
    version = listed.metadata.resource_version
    server.state.create(node("b", "10.244.2.0/24"))
    server.state.delete("a")
    watch = kubernetes.watch.Watch()
    seen = [
        (e["type"], e["object"].metadata.name)
        for e in watch.stream(api.list_node, resource_version=version, timeout_seconds=1)
    ]
    assert seen == [("ADDED", "b"), ("DELETED", "a")]
    assert int(api.list_node().metadata.resource_version) > int(version)


def test_fake_answers_a_too_old_version_with_410_as_an_error_event(server: FakeApiServer) -> None:
    server.state.create(node("a"))
    old = server.state.list_nodes()["metadata"]["resourceVersion"]
    server.state.create(node("b"))
    server.state.compact()
    code, text = request(server.url, "GET", f"/api/v1/nodes?watch=1&resourceVersion={old}&timeoutSeconds=1")
    event = json.loads(text.splitlines()[0])
    assert code == 200 and event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


def test_fake_patch_types_on_node_and_status(server: FakeApiServer) -> None:
    server.state.create(node("a"))
    cond = {"type": "NetworkUnavailable", "status": "False", "lastTransitionTime": "2026-02-02T00:00:00Z"}
    merged = server.state.patch(
        "a", "application/strategic-merge-patch+json", {"status": {"conditions": [cond]}}, status=True
    )
    assert [c["type"] for c in merged["status"]["conditions"]] == ["Ready", "MemoryPressure", "NetworkUnavailable"]
    replaced = server.state.patch("a", "application/merge-patch+json", {"status": {"conditions": [cond]}}, status=True)
    assert [c["type"] for c in replaced["status"]["conditions"]] == ["NetworkUnavailable"]
    ops = [{"op": "add", "path": f"/metadata/annotations/{PREFIX.replace('/', '~1')}~1x", "value": "1"}]
    patched = server.state.patch("a", "application/json-patch+json", ops, status=False)
    assert patched["metadata"]["annotations"] == {f"{PREFIX}/x": "1"}
    ignored = server.state.patch("a", "application/merge-patch+json", {"status": {"conditions": []}}, status=False)
    assert ignored["status"] == replaced["status"]  # the main resource never changes the status
    with pytest.raises(ApiError) as exc:
        server.state.patch("a", "application/yaml", {}, status=False)
    assert exc.value.code == 415


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"metadata": {"annotations": {"x": 1}}}, 400),  # annotation values are strings
        ({"status": {"conditions": [{"type": "X", "status": "True", "lastTransitionTime": "2026-01-01 00:00"}]}}, 400),
        ({"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}}, 422),  # podCIDR never changes
        ({"spec": {"podCIDR": None, "podCIDRs": None}}, 422),
        ({"metadata": {"resourceVersion": "1"}}, 409),
    ],
)
def test_fake_refuses_what_the_real_server_refuses(server: FakeApiServer, patch: Any, code: int) -> None:
    server.state.create(node("a", "10.244.1.0/24"))
    with pytest.raises(ApiError) as exc:
        server.state.patch("a", "application/merge-patch+json", patch, status="status" in patch)
    assert exc.value.code == code


def test_fake_pod_cidr_goes_from_unset_to_set_once(server: FakeApiServer) -> None:
    server.state.create(node("a"))
    set_once = {"spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"]}}
    server.state.patch("a", "application/strategic-merge-patch+json", set_once, status=False)
    code, _ = request(server.url, "POST", "/api/v1/nodes", json.dumps(node("a")))
    assert code == 409


# -- the store contract, where it applies ----------------------------------------------------------


class TestKubernetesContract(StoreContract):
    """The contract's config tests and same-host reuse run as they are; the others are replaced."""

    @pytest.fixture
    def store_spec(self, server: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> StoreSpec:
        server.state.create(node("n1", "10.244.1.0/24"))
        options = {"kubeconfig": str(kubeconfig), "node_name": "n1", "net_conf": str(tmp_path / "net-conf.json")}
        return StoreSpec("kubernetes", options, supports_ttl=False)

    # Subnet allocation is the controller manager's: nothing to choose, race for or exhaust.
    test_hosts_get_distinct_subnets = None
    test_preferred_subnet_is_used_when_free = None
    test_create_is_compare_and_create = None
    test_exhaustion_is_reported = None
    test_two_processes_racing_never_share_a_subnet = None
    # No TTLs: a pod CIDR lives as long as its Node.
    test_lease_expires_after_ttl = None
    test_renew_extends_and_release_removes = None
    test_created_revision_is_kept_across_renewals = None
    # No reservations (see test_reservations_are_refused).
    test_reservation_is_kept_for_its_owner_only = None
    test_reserve_refuses_a_subnet_leased_by_another_host = None
    test_unreserve_refuses_a_live_lease = None
    # No raw lease keys; garbled annotations are tested below.
    test_garbled_leases_are_skipped = None
    test_deeply_nested_values_are_skipped_on_list_and_watch = None
    test_garbled_entries_are_warned_once_then_counted = None
    test_a_garbled_value_under_our_key_raises_lease_lost = None
    # A Node is this host's by name: there is no other host's lease under our key.
    test_delete_never_removes_another_hosts_lease = None
    test_update_never_overwrites_another_hosts_lease = None
    # One Node is one merged lease of both families (no key per family, nothing to exhaust);
    # replaced by test_dual_stack_node_is_one_merged_lease and the test after it.
    test_dual_stack_lease_is_one_key_per_family_with_the_same_attrs = None
    test_dual_stack_renew_and_release_act_on_both_keys = None
    test_a_lost_ipv6_key_raises_lease_lost = None
    test_ipv6_key_owner_is_the_public_ipv6 = None
    test_ipv6_only_lease = None
    test_ipv6_exhaustion_is_reported = None
    # No reservations and no TTLs; replaced by test_another_node_never_changes_or_removes_our_lease.
    test_release_never_removes_another_hosts_lease = None
    test_a_reservation_survives_every_path_but_unreserve = None
    test_a_lease_turned_into_a_reservation_survives_its_hosts_release = None
    test_racing_hosts_never_take_a_lease_or_a_reservation = None
    # Replaced below by their Kubernetes forms.
    test_acquire_lists_lease_with_flannel_attrs = None
    test_watch_sees_add_and_remove_quickly = None
    test_watch_resumes_from_a_revision = None

    def test_acquire_is_the_nodes_pod_cidr(self, store: Store, other_store: Store) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert lease.subnet == IPv4Network("10.244.1.0/24") and lease.expiration is None
        listed = other_store.list_leases()
        assert [(x.subnet, x.attrs) for x in listed.leases] == [(lease.subnet, lease.attrs)]

    def test_renew_is_a_no_op_and_release_keeps_the_node(self, store: Store, server: FakeApiServer) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        version = server.state.version
        assert store.renew_lease(lease) == lease
        store.release_lease(lease)
        assert server.state.version == version and [x.subnet for x in store.list_leases().leases] == [lease.subnet]

    def test_update_of_a_subnet_that_is_not_our_nodes_raises_lease_lost(self, store: Store) -> None:
        mine = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        other = IPv4Network("10.244.251.0/24")
        with pytest.raises(LeaseLost, match="no longer the pod CIDR of Node n1"):
            store.update_lease(mine.__class__(other, mine.attrs, None), attrs_for("192.0.2.1"))

    def test_dual_stack_node_is_one_merged_lease(
        self, store_spec: StoreSpec, other_store: Store, server: FakeApiServer
    ) -> None:
        dual = node("d1")
        dual["spec"] = {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"]}
        server.state.create(dual)
        store = open_store("kubernetes", **{**store_spec.options, "node_name": "d1"})
        try:
            host = dual_attrs_for("192.0.2.1", "2001:db8::1")
            lease = store.acquire_lease(DUAL, host)
            assert (lease.subnet, lease.ipv6_subnet) == (
                IPv4Network("10.244.2.0/24"),
                IPv6Network("fd00:10:244:2::/64"),
            )
            assert lease.attrs == host
            notes = server.state.get("d1")["metadata"]["annotations"]
            assert notes[f"{PREFIX}/public-ipv6"] == "2001:db8::1"
            assert json.loads(notes[f"{PREFIX}/backend-v6-data"]) == dict(host.backend_v6_data or {})
            [listed] = [x for x in other_store.list_leases().leases if x.subnet == lease.subnet]
            assert (listed.families, listed.ipv6_subnet, listed.attrs) == ((4, 6), lease.ipv6_subnet, host)
            assert store.renew_lease(lease) == lease
            foreign = attrs.evolve(lease, ipv6_subnet=IPv6Network("fd00:10:244:9::/64"))
            with pytest.raises(LeaseLost, match="no longer the pod CIDR of Node d1"):
                store.renew_lease(foreign)
        finally:
            store.close()

    def test_a_family_the_node_lacks_is_a_config_error(self, store: Store) -> None:
        with pytest.raises(ConfigError, match="node n1 has no IPv6 pod CIDR but the net-conf"):
            store.acquire_lease(DUAL, dual_attrs_for("192.0.2.1", "2001:db8::1"))

    def test_another_node_never_changes_or_removes_our_lease(
        self, store: Store, kubeconfig: Path, tmp_path: Path, server: FakeApiServer
    ) -> None:
        """The Kubernetes form of "never delete or overwrite a lease we do not own": n2's client
        tries every path on n1's lease; n1's Node is unchanged."""
        server.state.create(node("n2", "10.244.2.0/24"))
        mine = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        before = json.dumps(server.state.get("n1"), sort_keys=True)
        other = open_kube(kubeconfig, tmp_path, name="n2")
        try:
            theirs = attrs_for("192.0.2.2", mac="aa:bb:cc:dd:ee:02")
            with pytest.raises(LeaseLost):
                other.update_lease(mine, theirs)
            with pytest.raises(LeaseLost):
                other.renew_lease(mine)
            other.release_lease(mine)
            with pytest.raises(UserError, match="delete the Node"):
                other.delete_lease(mine)
            assert other.acquire_lease(NETWORK, theirs).subnet == IPv4Network("10.244.2.0/24")
        finally:
            other.close()
        assert json.dumps(server.state.get("n1"), sort_keys=True) == before

    def test_reservations_and_release_are_refused(self, store: Store) -> None:
        with pytest.raises(UserError, match="reservations are not supported by the kubernetes store"):
            store.reserve(IPv4Network("10.244.5.0/24"), IPv4Address("192.0.2.9"))
        with pytest.raises(UserError, match="reservations are not supported"):
            store.unreserve(IPv4Network("10.244.5.0/24"))
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        with pytest.raises(UserError, match="delete the Node"):
            store.delete_lease(lease)

    def test_watch_sees_add_and_remove_quickly_k8s(
        self, store: Store, other_store: Store, server: FakeApiServer
    ) -> None:
        stop = threading.Event()
        events = store.watch_leases(stop, poll=0.2)
        snapshot = next_event(events)
        assert isinstance(snapshot, LeaseList) and snapshot.leases == ()
        started = time.monotonic()
        lease = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        added = next_event(events)
        assert time.monotonic() - started < 1.0
        assert isinstance(added, LeaseEvent) and added.kind is EventKind.ADDED and added.subnet == lease.subnet
        server.state.delete("n1")
        removed = next_event(events)
        assert isinstance(removed, LeaseEvent) and removed.kind is EventKind.REMOVED and removed.subnet == lease.subnet
        stop.set()

    def test_watch_resumes_from_a_listed_revision(self, store: Store, server: FakeApiServer) -> None:
        store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        start = store.list_leases().revision
        server.state.create(node("n2", "10.244.2.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
        stop = threading.Event()
        event = next_event(store.watch_leases(stop, since_revision=start))
        assert isinstance(event, LeaseEvent) and event.subnet == IPv4Network("10.244.2.0/24")
        stop.set()


# -- Kubernetes semantics --------------------------------------------------------------------------


def test_annotations_are_flannels_exact_format(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n1", "10.244.1.0/24"))
    store.acquire_lease(NETWORK, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:01"))
    assert server.state.get("n1")["metadata"]["annotations"] == flannel_annotations("192.0.2.1", "aa:bb:cc:dd:ee:01")


def test_a_node_annotated_by_flannel_is_a_valid_peer(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("flannel-node", "10.244.7.0/24", flannel_annotations("192.0.2.7", "aa:bb:cc:dd:ee:07")))
    server.state.create(node("no-cidr", None, flannel_annotations("192.0.2.8", "aa:bb:cc:dd:ee:08")))
    server.state.create(node("unmanaged", "10.244.9.0/24"))
    [peer] = store.list_leases().leases
    assert peer.subnet == IPv4Network("10.244.7.0/24")
    assert peer.attrs == LeaseAttrs(IPv4Address("192.0.2.7"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:07"})


def test_public_ip_annotations_are_honoured(kubeconfig: Path, tmp_path: Path, server: FakeApiServer) -> None:
    server.state.create(node("n1", "10.244.1.0/24", {f"{PREFIX}/public-ip-overwrite": "203.0.113.5"}))
    server.state.create(node("n2", "10.244.2.0/24", {f"{PREFIX}/node-public-ip": "203.0.113.6"}))
    for name, want in (("n1", "203.0.113.5"), ("n2", "203.0.113.6")):
        with_store = open_kube(kubeconfig, tmp_path, name)
        lease = with_store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert str(lease.attrs.public_ip) == want
        assert server.state.get(name)["metadata"]["annotations"][f"{PREFIX}/public-ip"] == want
        with_store.close()


def test_other_conditions_survive_our_status_patch(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n1", "10.244.1.0/24"))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    store.mark_ready(lease)
    conditions = {c["type"]: c for c in server.state.get("n1")["status"]["conditions"]}
    assert set(conditions) == {"Ready", "MemoryPressure", "NetworkUnavailable"}
    assert conditions["Ready"]["reason"] == "KubeletReady"
    ours = conditions["NetworkUnavailable"]
    assert (ours["status"], ours["reason"]) == ("False", "FlannelIsUp")
    assert ours["lastTransitionTime"].endswith("Z")


def test_mark_ready_failure_is_retried_on_the_next_listing(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n1", "10.244.1.0/24"))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    server.state.delete("n1")
    store.mark_ready(lease)  # logged, not raised
    server.state.create(node("n1", "10.244.1.0/24"))
    store.list_leases()
    assert any(c["type"] == "NetworkUnavailable" for c in server.state.get("n1")["status"]["conditions"])


def test_pod_cidr_not_assigned_waits_then_gives_up(
    kubeconfig: Path, tmp_path: Path, server: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("overlayd.stores.kubernetes.ACQUIRE_POLL", 1.0)
    server.state.create(node("n1"))
    waiting = open_kube(kubeconfig, tmp_path, pod_cidr_timeout=4)
    with pytest.raises(StoreUnavailable, match=r"pod CIDR not assigned to node n1 yet; is the controller manager "
                       r"running with --allocate-node-cidrs\?"):  # fmt: skip
        waiting.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    assigned = threading.Timer(
        1.0,
        lambda: server.state.patch(
            "n1", "application/merge-patch+json", {"spec": {"podCIDR": "10.244.4.0/24"}}, status=False
        ),
    )
    assigned.start()
    assert waiting.acquire_lease(NETWORK, attrs_for("192.0.2.1")).subnet == IPv4Network("10.244.4.0/24")
    late = open_kube(kubeconfig, tmp_path, "n2", pod_cidr_timeout=0.5)
    with pytest.raises(
        UserError, match=r"node n2 does not exist; gave up after 0.5 s \(--kubernetes-pod-cidr-timeout\)"
    ):
        late.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    waiting.close()
    late.close()


def test_a_pod_cidr_outside_the_network_is_a_config_error(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n1", "10.99.1.0/24"))
    with pytest.raises(ConfigError, match=r"pod CIDR 10\.99\.1\.0/24, outside the network 10\.244\.0\.0/16"):
        store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))


def test_garbled_annotations_are_skipped_and_warned_once(
    store: Store, server: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.state.create(node("good", "10.244.2.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
    deep = {**flannel_annotations("192.0.2.3", "x"), f"{PREFIX}/backend-data": "[" * 1100 + "]" * 1100}
    server.state.create(node("deep", "10.244.3.0/24", deep))
    bad_ip = {**flannel_annotations("192.0.2.4", "x"), f"{PREFIX}/public-ip": "not-an-ip"}
    server.state.create(node("bad-ip", "10.244.4.0/24", bad_ip))
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert [x.subnet for x in store.list_leases().leases] == [IPv4Network("10.244.2.0/24")]
    assert len([r for r in caplog.records if "garbled" in r.getMessage()]) == 2
    assert store.garbled_skipped == 6


def test_heartbeats_are_not_lease_events(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n2", "10.244.2.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
    start = store.list_leases().revision
    beat = {
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-03-03T00:00:00Z"}]}
    }
    server.state.patch("n2", "application/strategic-merge-patch+json", beat, status=True)
    result = store.wait_for_events(start, 1.0)
    assert result.events == () and result.revision != start  # moved past the heartbeat


def test_node_recreated_with_another_pod_cidr(store: Store, server: FakeApiServer) -> None:
    server.state.create(node("n2", "10.244.2.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
    stop = threading.Event()
    events = store.watch_leases(stop, poll=0.2)
    assert isinstance(next_event(events), LeaseList)
    server.state.delete("n2")
    server.state.create(node("n2", "10.244.8.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
    got = [next_event(events), next_event(events)]
    assert [(e.kind, str(e.subnet)) for e in got if isinstance(e, LeaseEvent)] == [
        (EventKind.REMOVED, "10.244.2.0/24"),
        (EventKind.ADDED, "10.244.8.0/24"),
    ]
    stop.set()


def test_410_relists_without_missing_a_node(kubeconfig: Path, tmp_path: Path) -> None:
    fake = FakeApiServer(history=3).start()
    try:
        (tmp_path / "kc").write_text(fake.kubeconfig())
        watcher = open_kube(tmp_path / "kc", tmp_path)
        fake.state.create(node("gone", "10.244.200.0/24", flannel_annotations("192.0.2.200", "aa:bb:cc:dd:ee:c8")))
        stop = threading.Event()
        events = watcher.watch_leases(stop, poll=0.2)
        snapshot = next_event(events)
        assert isinstance(snapshot, LeaseList) and len(snapshot.leases) == 1
        with pytest.raises(HistoryGone):  # what the stream says, seen directly
            for i in range(10):  # more changes than the history window holds
                fake.state.create(
                    node(f"n{i + 10}", f"10.244.{i + 10}.0/24", flannel_annotations(f"192.0.2.{i + 10}", "x"))
                )
            fake.state.delete("gone")
            watcher.wait_for_events(snapshot.revision, 1.0)
        seen = [next_event(events) for _ in range(11)]
        kinds = sorted((e.kind.value, str(e.subnet)) for e in seen if isinstance(e, LeaseEvent))
        assert ("removed", "10.244.200.0/24") in kinds
        assert len([k for k in kinds if k[0] == "added"]) == 10
        stop.set()
        watcher.close()
    finally:
        fake.stop()


def test_unknown_revision_token_is_history_gone(store: Store) -> None:
    with pytest.raises(HistoryGone):
        store.wait_for_events(987654, 0.1)


def test_unreachable_api_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "kc").write_text(kubeconfig_for("http://127.0.0.1:9"))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        open_kube(tmp_path / "kc", tmp_path).list_leases()


# -- the CLI ---------------------------------------------------------------------------------------


def cli(kubeconfig: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    store = ["--store", "kubernetes", "--kubernetes-kubeconfig", str(kubeconfig)]
    argv = [sys.executable, "-c", "from overlayd.cli import main; main()", *store,
            "--kubernetes-net-conf", str(tmp_path / "net-conf.json"), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_cli_network_init_show_leases_and_reserve(kubeconfig: Path, tmp_path: Path, server: FakeApiServer) -> None:
    done = cli(kubeconfig, tmp_path, "network", "init", "--network", "10.244.0.0/16")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "net-conf.json").read_text())["Network"] == "10.244.0.0/16"
    shown = cli(kubeconfig, tmp_path, "network", "show")
    assert shown.returncode == 0 and "10.244.0.0/16" in shown.stdout
    server.state.create(node("peer", "10.244.7.0/24", flannel_annotations("192.0.2.7", "aa:bb:cc:dd:ee:07")))
    listed = cli(kubeconfig, tmp_path, "leases", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [x["subnet"] for x in json.loads(listed.stdout)["leases"]] == ["10.244.7.0/24"]
    refused = cli(kubeconfig, tmp_path, "reserve", "10.244.5.0/24", "192.0.2.9")
    assert refused.returncode == 2
    assert "reservations are not supported by the kubernetes store" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_network_init_on_a_read_only_config_map_says_where_the_config_lives(
    tmp_path: Path, kubeconfig: Path
) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    (mount / "net-conf.json").write_text('{"Network": "10.244.0.0/16"}')
    store = open_store("kubernetes", kubeconfig=str(kubeconfig), node_name="n1", net_conf=str(mount / "net-conf.json"))
    assert NetworkConfig.from_json(store.get_config() or "").network == IPv4Network("10.244.0.0/16")
    mount.chmod(0o500)
    try:
        (mount / "probe").touch()
        writable = True  # root ignores the mode bits
    except PermissionError:
        writable = False
    finally:
        (mount / "probe").unlink(missing_ok=True)
    if writable:
        (mount / "net-conf.json").unlink()
        (mount / "net-conf.json").mkdir()  # a directory cannot be replaced by a file: the write fails
    try:
        with pytest.raises(UserError, match="lives in the ConfigMap mounted there"):
            store.put_config('{"Network": "10.245.0.0/16"}')
    finally:
        mount.chmod(0o700)


def test_garbled_nodes_are_skipped_on_the_watch_path(store: Store, server: FakeApiServer) -> None:
    stop = threading.Event()
    events = store.watch_leases(stop, poll=0.2)
    assert isinstance(next_event(events), LeaseList)
    deep = {**flannel_annotations("192.0.2.3", "x"), f"{PREFIX}/backend-data": "[" * 1100 + "]" * 1100}
    server.state.create(node("deep", "10.244.3.0/24", deep))
    huge = {**flannel_annotations("192.0.2.4", "x"), f"{PREFIX}/backend-data": '{"X": "' + "a" * 80_000 + '"}'}
    server.state.create(node("huge", "10.244.4.0/24", huge))
    server.state.create(node("good", "10.244.2.0/24", flannel_annotations("192.0.2.2", "aa:bb:cc:dd:ee:02")))
    event = next_event(events)
    assert isinstance(event, LeaseEvent) and event.subnet == IPv4Network("10.244.2.0/24")
    assert store.garbled_skipped == 2
    stop.set()


def test_watch_lines_bookmark_error_and_garbage(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    events: list[LeaseEvent] = []
    watch_event = store._watch_event  # type: ignore[attr-defined]
    bookmark = b'{"type":"BOOKMARK","object":{"kind":"Node","metadata":{"resourceVersion":"77"}}}'
    assert watch_event(bookmark, "5", events) == "77" and events == []
    caplog.set_level(logging.WARNING)
    assert watch_event(b"{not json", "77", events) == "77" and events == []
    assert any("garbled" in r.getMessage() for r in caplog.records)
    gone = b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}'
    with pytest.raises(HistoryGone, match="too old"):
        watch_event(gone, "77", events)
    with pytest.raises(StoreUnavailable):
        watch_event(b'{"type":"ERROR","object":{"kind":"Status","code":500}}', "77", events)
