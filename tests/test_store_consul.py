"""The consul store against the fake Consul (``overlayd.testing.consul_server``) over real HTTP.

The shared store contract runs first; then what is particular to Consul: sessions that run out
or vanish, lock-delay, an index that goes backwards, ACL and option errors, and the fake's own
protocol rules (so a test of the store cannot pass on a fake that is laxer than the docs).
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest
from overlayd.api import open_store
from overlayd.errors import HistoryGone, LeaseLost, StoreUnavailable, UserError
from overlayd.model import EventKind, LeaseEvent, LeaseList
from overlayd.stores.consul import ConsulStore
from overlayd.testing import StoreContract, StoreSpec
from overlayd.testing.consul_server import FakeConsul
from overlayd.testing.store_contract import NETWORK, attrs_for

_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"test{next(_prefixes)}-{time.monotonic_ns()}/network"


def http(fake: FakeConsul, method: str, path: str, body: bytes | str | None = None) -> tuple[int, Any, dict[str, str]]:
    """One raw request to the fake: (status, decoded JSON or text, headers)."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"http://{fake.address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(raw) if raw else None, headers
    except ValueError:
        return status, raw.decode(), headers


def options(fake: FakeConsul, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"address": fake.address, "prefix": prefix, **extra}


class TestConsulStore(StoreContract):
    @pytest.fixture
    def store_spec(self, fake: FakeConsul, prefix: str) -> StoreSpec:
        def write_raw(key: str, value: str) -> None:
            status, done, _ = http(fake, "PUT", f"/v1/kv/{prefix}/subnets/{key}", value)
            assert status == 200 and done is True

        return StoreSpec("consul", options(fake, prefix), write_raw=write_raw, short_ttl=10.0, expiry_slack=15.0)


def session_of(fake: FakeConsul, prefix: str, key: str) -> str:
    status, doc, _ = http(fake, "GET", f"/v1/kv/{prefix}/subnets/{key}")
    assert status == 200
    return str(doc[0]["Session"])


# -- sessions ------------------------------------------------------------------------------------


def test_lease_key_is_locked_by_a_delete_session_with_no_lock_delay(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, prefix, ttl=30))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    status, doc, _ = http(fake, "GET", f"/v1/kv/{prefix}/subnets/{lease.key}")
    assert status == 200 and doc[0]["LockIndex"] == 1
    assert json.loads(base64.b64decode(doc[0]["Value"]))["PublicIP"] == "192.0.2.1"
    _, [session], _ = http(fake, "GET", f"/v1/session/info/{doc[0]['Session']}")
    assert session["Behavior"] == "delete" and session["TTL"] == "30s" and session["LockDelay"] == 0
    assert session["NodeChecks"] == []
    store.close()


def test_session_that_vanished_is_recreated_and_the_same_subnet_reacquired(fake: FakeConsul, prefix: str) -> None:
    """Renew answers 404 once the session is gone (and its key with it): LeaseLost, then the
    daemon's re-acquire (preferring its subnet) gets the same one back at once (LockDelay 0)."""
    store = open_store("consul", **options(fake, prefix, ttl=30))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    assert lease.subnet is not None
    old = session_of(fake, prefix, lease.key)
    assert http(fake, "PUT", f"/v1/session/destroy/{old}")[0] == 200
    assert store.list_leases().leases == ()  # behavior=delete took the key
    assert http(fake, "PUT", f"/v1/session/renew/{old}")[0] == 404
    with pytest.raises(LeaseLost):
        store.renew_lease(lease)
    again = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"), prefer=[lease.subnet])
    assert again.subnet == lease.subnet
    new = session_of(fake, prefix, again.key)
    assert new != old
    assert store.renew_lease(again).subnet == lease.subnet
    store.close()


def test_restarted_host_takes_its_lease_over_from_its_old_session(fake: FakeConsul, prefix: str) -> None:
    """A new daemon on the same host moves the key to its own session, so the old session
    running out later does not delete the lease."""
    first = open_store("consul", **options(fake, prefix, ttl=30))
    lease = first.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    old = session_of(fake, prefix, lease.key)
    first.close()
    second = open_store("consul", **options(fake, prefix, ttl=30))
    again = second.acquire_lease(NETWORK, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:09"))
    assert again.subnet == lease.subnet
    assert session_of(fake, prefix, lease.key) != old
    http(fake, "PUT", f"/v1/session/destroy/{old}")  # the old session runs out
    [kept] = second.list_leases().leases
    assert kept.subnet == lease.subnet and kept.attrs.backend_data["VtepMAC"] == "aa:bb:cc:dd:ee:09"
    second.close()


def test_lock_delay_would_refuse_a_restarted_host_its_subnet(fake: FakeConsul, prefix: str) -> None:
    """Why sessions are made with LockDelay 0: with Consul's default (15 s) the key of an
    invalidated session cannot be locked again for that long."""
    key = f"{prefix}/subnets/10.244.7.0-24"
    _, created, _ = http(fake, "PUT", "/v1/session/create", json.dumps({"TTL": "30s", "Behavior": "delete"}))
    value = attrs_for("192.0.2.1").to_json()
    assert http(fake, "PUT", f"/v1/kv/{key}?acquire={created['ID']}", value)[1] is True
    http(fake, "PUT", f"/v1/session/destroy/{created['ID']}")
    store = open_store("consul", **options(fake, prefix, ttl=30))
    assert store.create_entry("10.244.7.0-24", value, store.lease_ttl) is None  # refused: lock-delay
    # ... while our own sessions (LockDelay 0) leave the subnet free to take at once:
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.2"), prefer=[IPv4Network("10.244.8.0/24")])
    http(fake, "PUT", f"/v1/session/destroy/{session_of(fake, prefix, lease.key)}")
    other = open_store("consul", **options(fake, prefix, ttl=30))
    assert other.create_entry(lease.key, lease.attrs.to_json(), other.lease_ttl) is not None
    store.close()
    other.close()


def test_a_reservation_is_never_taken_over_by_acquire(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, prefix))
    subnet = IPv4Network("10.244.30.0/24")
    store.reserve(subnet, attrs_for("192.0.2.30").public_ip)
    status, doc, _ = http(fake, "GET", f"/v1/kv/{prefix}/subnets/10.244.30.0-24")
    assert status == 200 and "Session" not in doc[0]
    assert store.create_lease(store.lease_from_entry(store.get_entry("10.244.30.0-24"))) is None  # type: ignore[arg-type]
    other = store.acquire_lease(NETWORK, attrs_for("192.0.2.31"), prefer=[subnet])
    assert other.subnet != subnet
    owner = store.acquire_lease(NETWORK, attrs_for("192.0.2.30"))
    assert owner.subnet == subnet and owner.is_reservation
    store.close()


def test_expiration_reflects_consuls_ttl_contract(fake: FakeConsul, prefix: str) -> None:
    mine = open_store("consul", **options(fake, prefix, ttl=600))
    theirs = open_store("consul", **options(fake, prefix, ttl=600))
    before = time.time()
    lease = mine.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    assert lease.expiration is not None
    assert before + 595 <= lease.expiration.timestamp() <= time.time() + 600  # ours: last renewal + TTL
    [seen] = theirs.list_leases().leases
    assert seen.expiration is not None
    assert seen.expiration.timestamp() >= time.time() + 1190  # another host's: up to 2x TTL from now
    mine.close()
    theirs.close()


# -- watching --------------------------------------------------------------------------------------


def test_index_going_backwards_makes_the_watch_relist(fake: FakeConsul, prefix: str) -> None:
    """A snapshot restore puts older indexes back: the watch must not wait for its old index."""
    store = open_store("consul", **options(fake, prefix))
    writer = open_store("consul", **options(fake, prefix))
    writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    _, snapshot, _ = http(fake, "GET", "/_fake/snapshot")
    writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
    writer.acquire_lease(NETWORK, attrs_for("192.0.2.3"))
    listed = store.list_leases()
    assert len(listed.leases) == 3
    stop = threading.Event()
    events = store.watch_leases(stop, poll=0.5)
    first = next(events)
    assert isinstance(first, LeaseList) and len(first.leases) == 3
    seen: list[LeaseEvent | LeaseList] = []
    thread = threading.Thread(target=lambda: seen.extend(itertools.islice(events, 3)), daemon=True)
    thread.start()
    assert http(fake, "PUT", "/_fake/restore", json.dumps(snapshot))[0] == 200
    with pytest.raises(HistoryGone, match="went back"):
        store.wait_for_events(listed.revision, 1.0)
    time.sleep(1.5)  # the watch re-lists after the restore and goes on from the new index
    late = writer.acquire_lease(NETWORK, attrs_for("192.0.2.4"))  # an index at or below the old one
    assert late.revision <= listed.revision
    thread.join(10)
    stop.set()
    kinds = [(e.kind, str(e.subnet)) for e in seen if isinstance(e, LeaseEvent)]
    assert len(kinds) == 3, kinds
    assert sum(kind is EventKind.REMOVED for kind, _ in kinds) == 2  # the two leases the restore undid
    assert kinds[-1] == (EventKind.ADDED, str(late.subnet))
    store.close()
    writer.close()


def test_tombstone_reap_lowering_the_index_is_history_gone(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, prefix))
    store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    newest = store.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
    store.delete_lease(newest)
    listed = store.list_leases()  # the index is the tombstone's
    http(fake, "PUT", "/_fake/reap-tombstones")
    with pytest.raises(HistoryGone):
        store.wait_for_events(listed.revision, 1.0)
    again = store.list_leases()
    assert again.revision < listed.revision and len(again.leases) == 1
    store.close()


def test_a_blocking_return_without_change_is_no_event(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, prefix))
    empty = store.list_leases()  # an empty prefix's index is the whole KV table's (Consul does that)
    http(fake, "PUT", f"/v1/kv/{prefix}-elsewhere/x", "1")
    moved = store.wait_for_events(empty.revision, 0.6)
    assert moved.events == () and moved.revision > empty.revision  # the index moved, nothing for us
    store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    listed = store.list_leases()
    http(fake, "PUT", f"/v1/kv/{prefix}-elsewhere/x", "2")  # now our prefix has an index of its own
    started = time.monotonic()
    result = store.wait_for_events(listed.revision, 0.6)
    assert result.events == () and result.revision == listed.revision
    assert 0.5 <= time.monotonic() - started < 2.0
    store.close()


def test_expired_and_removed_are_told_apart(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, prefix))
    writer = open_store("consul", **options(fake, prefix))
    gone = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    expired = open_store("consul", **options(fake, prefix)).acquire_lease(NETWORK, attrs_for("192.0.2.2"))
    listed = store.list_leases()
    writer.release_lease(gone)
    result = store.wait_for_events(listed.revision, 2.0)
    assert [(e.kind, e.subnet) for e in result.events] == [(EventKind.REMOVED, gone.subnet)]
    http(fake, "PUT", f"/v1/session/destroy/{session_of(fake, prefix, expired.key)}")
    result = store.wait_for_events(result.revision, 2.0)
    assert [(e.kind, e.subnet) for e in result.events] == [(EventKind.EXPIRED, expired.subnet)]
    store.close()
    writer.close()


# -- options and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [5, 86401])
def test_ttl_outside_consuls_range_is_one_line_naming_the_flag(fake: FakeConsul, ttl: int) -> None:
    with pytest.raises(UserError, match=r"--consul-ttl .* between 10 and 86400 seconds"):
        open_store("consul", address=fake.address, ttl=ttl)


def test_bad_options_are_user_errors(tmp_path: Any) -> None:
    with pytest.raises(UserError, match="HOST:PORT"):
        open_store("consul", address="http://nope")
    with pytest.raises(UserError, match="--consul-scheme"):
        open_store("consul", scheme="ftp")
    with pytest.raises(UserError, match="--consul-keyfile"):
        open_store("consul", scheme="https", certfile=str(tmp_path / "c.pem"))
    with pytest.raises(UserError, match="cannot read --consul-cafile"):
        open_store("consul", scheme="https", cafile=str(tmp_path / "missing.pem"))


def test_prefix_has_no_leading_slash(fake: FakeConsul, prefix: str) -> None:
    store = open_store("consul", **options(fake, "/" + prefix + "/"))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    assert http(fake, "GET", f"/v1/kv/{prefix}/subnets/{lease.key}")[0] == 200
    assert ConsulStore.Options().prefix == "coreos.com/network"
    store.close()


def test_token_is_secret_sent_and_a_denial_names_the_acl(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    with FakeConsul(token="s3cret") as guarded:
        store = open_store("consul", address=guarded.address, prefix=prefix, token="s3cret")
        assert "s3cret" not in repr(store) and "s3cret" not in repr(store.options)
        assert store.acquire_lease(NETWORK, attrs_for("192.0.2.1")).subnet is not None
        store.close()
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
        from_env = open_store("consul", address=guarded.address, prefix=prefix)
        assert len(from_env.list_leases().leases) == 1
        from_env.close()
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "wrong")
        denied = open_store("consul", address=guarded.address, prefix=prefix)
        with pytest.raises(UserError, match=r'key_prefix "test.*/network/" write and session write'):
            denied.list_leases()
        denied.close()


def test_unreachable_consul_is_store_unavailable() -> None:
    store = open_store("consul", address="127.0.0.1:1")
    with pytest.raises(StoreUnavailable, match="did not answer"):
        store.list_leases()
    store.close()


# -- the fake's own rules (from Consul's API docs) -------------------------------------------------


def test_fake_refuses_cas_with_acquire_and_lets_acquire_take_a_free_key(fake: FakeConsul, prefix: str) -> None:
    _, created, _ = http(fake, "PUT", "/v1/session/create", json.dumps({"TTL": "10s", "LockDelay": "0s"}))
    session = created["ID"]
    status, text, _ = http(fake, "PUT", f"/v1/kv/{prefix}/k?cas=0&acquire={session}", "v")
    assert status == 400 and "Conflicting flags" in text
    assert http(fake, "PUT", f"/v1/kv/{prefix}/k", "reserved")[1] is True  # no session holds it
    assert http(fake, "PUT", f"/v1/kv/{prefix}/k?acquire={session}", "taken")[1] is True  # why creates use a txn
    status, _, _ = http(fake, "PUT", "/v1/session/create", json.dumps({"TTL": "5s"}))
    assert status == 400


def test_fake_transactions_are_atomic_with_409_errors(fake: FakeConsul, prefix: str) -> None:
    value = base64.b64encode(b"x").decode()
    ops = [
        {"KV": {"Verb": "set", "Key": f"{prefix}/a", "Value": value}},
        {"KV": {"Verb": "check-not-exists", "Key": f"{prefix}/a"}},
    ]
    status, doc, _ = http(fake, "PUT", "/v1/txn", json.dumps(ops))
    assert status == 409 and doc["Errors"][0]["OpIndex"] == 1
    assert http(fake, "GET", f"/v1/kv/{prefix}/a")[0] == 404  # rolled back
    status, doc, headers = http(fake, "PUT", "/v1/txn", json.dumps(ops[:1]))
    assert status == 200 and doc["Results"][0]["KV"]["Value"] is None
    assert doc["Results"][0]["KV"]["ModifyIndex"] == int(headers["X-Consul-Index"])


def test_fake_blocking_query_waits_for_a_newer_index(fake: FakeConsul, prefix: str) -> None:
    http(fake, "PUT", f"/v1/kv/{prefix}/a", "1")
    _, _, headers = http(fake, "GET", f"/v1/kv/{prefix}/?recurse")
    index = int(headers["X-Consul-Index"])
    timer = threading.Timer(0.3, lambda: http(fake, "PUT", f"/v1/kv/{prefix}/b", "2"))
    timer.start()
    started = time.monotonic()
    _, doc, headers = http(fake, "GET", f"/v1/kv/{prefix}/?recurse&index={index}&wait=5s")
    assert 0.25 < time.monotonic() - started < 3 and int(headers["X-Consul-Index"]) > index
    assert sorted(e["Key"] for e in doc) == [f"{prefix}/a", f"{prefix}/b"]


def test_a_garbled_answer_from_consul_is_store_unavailable_not_a_crash() -> None:
    """Every answer is decoded bounded: ~2 KB nested 1100 levels deep is one error, no RecursionError."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from overlayd.testing.store_contract import DEEP_JSON

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = DEEP_JSON.encode()
            self.send_response(200)
            self.send_header("X-Consul-Index", "7")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        store = open_store("consul", address=f"127.0.0.1:{httpd.server_address[1]}")
        with pytest.raises(StoreUnavailable, match="nested more than"):
            store.list_leases()
        with pytest.raises(StoreUnavailable, match="nested more than"):
            store.get_config()
        store.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
