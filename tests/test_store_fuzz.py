"""Fuzzed store payloads: what the Consul KV API and the Kubernetes API return, decoded by the
stores' own functions.  Any JSON, of any type, in any field: the decoders return a lease, skip
the entry, or raise one of the project's errors (``GarbledLease`` for one entry,
``DecodeError`` for a whole answer) — never anything else, never a hang.

Consul: a ``GET /v1/kv/<prefix>/?recurse`` answer (``Key``, ``Value`` base64, ``ModifyIndex``,
``CreateIndex``, ``Session``, ``Flags``, ``LockIndex``...) through ``_items``, the store's
``_entries`` (sessions looked up in the fake Consul, ``overlayd.testing.consul_server``, over
HTTP) and the lease decoder; a ``/v1/session/list`` answer's ``TTL`` through ``_ttl_seconds``.
Kubernetes: Node objects (annotations, ``spec.podCIDR(s)``, metadata, weird types) through
``parse_node`` and ``lease_from_node``; and garbage annotations (strings, which any API server
accepts) on Nodes of the fake API server, listed by the real store: skipped, warned once.

Budgets are fixed (``max_examples``, ``derandomize``) so CI time is bounded; the figures are in
docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from overlayd import open_store
from overlayd.decode import DecodeError
from overlayd.errors import GarbledLease
from overlayd.model import Lease
from overlayd.stores.consul import ConsulStore, _items, _ttl_seconds
from overlayd.stores.kubernetes import lease_from_node, parse_node
from overlayd.testing.consul_server import FakeConsul
from overlayd.testing.kube_apiserver import FakeApiServer

PREFIX = "coreos.com/network"
KUBE = "flannel.alpha.coreos.com"
BUDGET = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
addresses = st.sampled_from(["192.0.2.7", "0.0.0.0", "127.0.0.1", "::1", "fd00::1", "10.244.3.1", "", " ", "x"])
subnet_names = st.sampled_from(
    ["10.244.3.0-24", "10.244.3.1-24", "10.244.3.0-33", "fd00:10:244:3::-64", "10.244.3.0", "-24", "", "ä-24"]
) | st.text(max_size=24)  # fmt: skip
lease_docs = st.fixed_dictionaries(
    {},
    optional={
        "PublicIP": addresses | json_values,
        "PublicIPv6": addresses | json_values,
        "BackendType": st.sampled_from(["vxlan", "host-gw", ""]) | json_values,
        "BackendData": st.fixed_dictionaries({}, optional={"VNI": json_values, "VtepMAC": json_values}) | json_values,
    },
)
raw_values = (
    lease_docs.map(lambda doc: json.dumps(doc).encode()) | st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
)
consul_keys = st.builds(
    lambda folder, name: f"{PREFIX}/{folder}{name}",
    st.sampled_from(["subnets/", "v6-subnets/", "", "subnets/x/", "other/"]),
    subnet_names,
) | json_values  # fmt: skip
indexes = st.integers(min_value=-2, max_value=2**64) | json_values
plausible_items = st.fixed_dictionaries(
    {
        "Key": st.builds(lambda name: f"{PREFIX}/subnets/{name}", st.sampled_from(["10.244.3.0-24", "10.244.4.0-24"])),
        "Value": lease_docs.map(lambda doc: base64.b64encode(json.dumps(doc).encode()).decode()),
        "ModifyIndex": st.integers(0, 2**63),
        "CreateIndex": st.integers(0, 2**63),
        "Flags": st.just(0),
        "LockIndex": st.just(0),
    }
)  # fmt: skip
kv_items = plausible_items | st.fixed_dictionaries(
    {},
    optional={
        "Key": consul_keys,
        "Value": raw_values.map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20) | json_values,
        "ModifyIndex": indexes,
        "CreateIndex": indexes,
        "LockIndex": indexes,
        "Flags": indexes,
        "Session": st.sampled_from(["", "a5c3d1a2-0000-4000-8000-000000000001"]) | json_values,
    },
) | json_values  # fmt: skip
kv_answers = st.lists(kv_items, max_size=6) | json_values


@pytest.fixture(scope="module")
def consul_store() -> Iterator[ConsulStore]:
    with FakeConsul() as fake:
        store = open_store("consul", address=fake.address, prefix=PREFIX)
        assert isinstance(store, ConsulStore)
        yield store
        store.close()


def test_consul_kv_answers_decode_or_raise_our_errors(consul_store: ConsulStore) -> None:
    counts = {"leases": 0, "garbled": 0, "answers refused": 0}

    @BUDGET
    @given(kv_answers)
    def check(doc: Any) -> None:
        try:
            items = _items(doc)
        except DecodeError:
            counts["answers refused"] += 1
            return
        for entry in consul_store._entries(items).values():
            try:
                lease = consul_store.lease_from_entry(entry)
            except GarbledLease:
                counts["garbled"] += 1
                continue
            assert isinstance(lease, Lease)
            counts["leases"] += 1

    started = time.monotonic()
    check()
    print(f"consul KV fuzz: {counts} in {time.monotonic() - started:.1f} s")
    assert counts["leases"] and counts["garbled"] and counts["answers refused"]


@BUDGET
@given(st.text(max_size=30) | json_values)
def test_consul_session_ttls_decode_to_a_number(ttl: Any) -> None:
    seconds = _ttl_seconds(ttl)
    assert isinstance(seconds, float)


cidrs = st.sampled_from(["10.244.3.0/24", "10.244.3.1/24", "fd00:10:244:3::/64", "10.244.3.0/33", "", "x"])
annotation_values = st.sampled_from(
    ["true", "false", "vxlan", "192.0.2.7", "0.0.0.0", '{"VtepMAC":"aa:bb:cc:dd:ee:01"}', "{", "[" * 200, "null", ""]
) | st.text(max_size=30)  # fmt: skip
annotation_keys = st.sampled_from(
    [f"{KUBE}/{k}" for k in ("kube-subnet-manager", "public-ip", "public-ip-overwrite", "public-ipv6",
                             "backend-type", "backend-data", "backend-v6-data")]
) | st.text(max_size=12)  # fmt: skip
nodes = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["n1", "", "x" * 300]) | json_values,
                "resourceVersion": json_values,
                "creationTimestamp": st.sampled_from(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "nope"])
                | json_values,
                "annotations": st.dictionaries(annotation_keys, annotation_values | json_values, max_size=6)
                | json_values,
            },
        )
        | json_values,
        "spec": st.fixed_dictionaries(
            {}, optional={"podCIDR": cidrs | json_values, "podCIDRs": st.lists(cidrs | json_values, max_size=3)}
        )
        | json_values,
    },
) | json_values  # fmt: skip


@BUDGET
@given(nodes)
def test_kubernetes_nodes_decode_or_raise_garbled(obj: Any) -> None:
    try:
        node = parse_node(obj)
        lease = lease_from_node(node, KUBE)
    except GarbledLease:
        return
    assert lease is None or isinstance(lease, Lease)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    server = FakeApiServer().start()
    path = tmp_path / "kubeconfig"
    path.write_text(server.kubeconfig())
    yield server, path
    server.stop()


def test_garbage_annotations_from_the_api_server_are_skipped_and_warned_once(
    kube: tuple[FakeApiServer, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, kubeconfig = kube
    good = {f"{KUBE}/kube-subnet-manager": "true", f"{KUBE}/public-ip": "192.0.2.7", f"{KUBE}/backend-type": "vxlan",
            f"{KUBE}/backend-data": '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:07"}'}  # fmt: skip
    garbage = [
        {f"{KUBE}/backend-data": "[" * 5000},  # deeper than the decoder's bound
        {f"{KUBE}/backend-data": '{"VtepMAC": "' + "a" * 100_000 + '"}'},  # larger than an annotation may be
        {f"{KUBE}/public-ip": "not an address"},
        {f"{KUBE}/public-ip": "192.0.2.300"},
    ]
    server.state.create({"metadata": {"name": "good", "annotations": good}, "spec": {"podCIDR": "10.244.7.0/24"}})
    for i, notes in enumerate(garbage):
        meta = {"name": f"bad{i}", "annotations": {**good, **notes}}
        server.state.create({"metadata": meta, "spec": {"podCIDR": f"10.244.{20 + i}.0/24"}})
    store = open_store("kubernetes", kubeconfig=str(kubeconfig), node_name="good", net_conf=str(tmp_path / "nc.json"))
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(3):
            assert [str(x.subnet) for x in store.list_leases().leases] == ["10.244.7.0/24"]
    finally:
        store.close()
    warnings = [r.getMessage() for r in caplog.records if "garbled" in r.getMessage()]
    assert len(warnings) == len(garbage), warnings  # once per Node, not once per listing
    assert store.garbled_skipped == 3 * len(garbage)


def test_distinct_unparsable_nodes_are_each_warned(
    kube: tuple[FakeApiServer, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pod CIDRs with host bits or no CIDR at all (an API server checks only that it parses as
    Go's ParseCIDR): each Node is named in its own warning.  They all used to be reported as
    ``node/?`` at revision 0, so only the first garbled Node ever was."""
    server, kubeconfig = kube
    for name, cidr in (("hostbits", "10.244.3.1/24"), ("bogus", "bogus"), ("bogus2", "10.244.300.0/24")):
        server.state.create({"metadata": {"name": name}, "spec": {"podCIDR": cidr}})
    store = open_store("kubernetes", kubeconfig=str(kubeconfig), node_name="x", net_conf=str(tmp_path / "nc.json"))
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(2):
            assert store.list_leases().leases == ()
    finally:
        store.close()
    warnings = [r.getMessage() for r in caplog.records if "garbled" in r.getMessage()]
    assert len(warnings) == 3 and all(any(f"node/{n}'" in w for w in warnings) for n in ("hostbits", "bogus", "bogus2"))
