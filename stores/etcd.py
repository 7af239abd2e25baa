"""etcd store: the network config and the leases in etcd v3, in flannel's exact layout.

Keys (``prefix`` default ``/coreos.com/network``): ``<prefix>/config``, ``<prefix>/subnets/10.244.3.0-24``,
``<prefix>/v6-subnets/<addr>-<len>``; values are flannel's JSON, so overlayd and flannel nodes
share one etcd.

Design notes:
* python-etcd3 0.12 is the client, but only for what it does well: channels, TLS credentials,
  the auth handshake, unary KV/lease calls and its protobuf stubs.  Its ``watch_prefix``
  machinery is not used: while etcd is down its thread busy-loops a CPU core, and after a
  reconnect the watch is silently dead.
* 0.12's generated protobuf modules only load with the pure-Python protobuf runtime when
  protobuf >= 4 is installed, hence the ``setdefault`` of
  ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION`` before the import (users never have to know).
* ``watch_entries`` keeps **one long-lived gRPC watch stream** (``_WatchStream``), opened at
  ``since_revision + 1`` with ``prev_kv`` and read by a thread of its own into a buffer; a call
  takes what is buffered or waits for it.  A stream per call (the first design) cost a stream
  set-up twice a second per idle daemon and up to 100 ms of latency per event (a new watcher
  starting in the past is "unsynced" and etcd catches those up every 100 ms); a long-lived one
  is synced and hears a write at once.  The stream is tied to the member and to the revision
  the caller is at: a call from another revision (after a re-list), a failover to another
  member, an error or compaction on the stream all end it, and the next call opens a new one
  from the caller's revision — so nothing is ever skipped or replayed twice.  The stream never
  reconnects by itself (python-etcd3's own watch was rejected because its thread busy-loops
  while etcd is down and stays silently dead after a reconnect): its thread records the error
  and ends; the caller gets ``StoreUnavailable`` and backs off.  A *hung* member (SIGSTOP,
  partition) sends no error: after ``WATCH_QUIET`` seconds without a word the call asks for a
  progress report (``WatchProgressRequest``, etcd >= 3.4), and no answer within
  ``WATCH_CREATE_TIMEOUT`` ends the stream as unavailable.  Opening a stream that is not
  confirmed within ``WATCH_CREATE_TIMEOUT`` fails the same way.  Compaction is reported by etcd
  on the stream and becomes ``HistoryGone``; so does a member whose revision is *behind* the
  caller's (a wiped or replaced etcd: a watch from a future revision would wait silently
  forever), which makes the caller list again and see the reset.
* This module implements the key-value primitives of ``Store``; the lease policy (owner
  checks, "a reservation stays a reservation", compare-and-swap retries, decoding, garbled
  entries reported once) is the base class's, shared with every store.
* Every write is a transaction guarded on the key: version 0 for ``create_entry``; the mod
  revision that was read for ``put_entry`` and ``delete_entry``.  Nobody's lease is ever
  overwritten.  An entry with a TTL is bound to its own etcd lease; a key without an etcd lease
  is a reservation (``ttl=None`` writes one).  ``Entry.created_revision`` is the KV's
  ``create_revision``.
* Deletes are told apart by the etcd lease of the deleted key (``prev_kv``): when that lease
  no longer exists the key went because its TTL ran out (``EXPIRED``); when it still exists the
  key was deleted (``REMOVED``).  Revoke rules follow from that: ``delete_entry`` never revokes
  the etcd lease (it owns no key any more and simply runs out); ``put_entry`` grants a new etcd
  lease, as flannel does, and revokes the replaced one once no key uses it; a write that lost
  its compare-and-swap revokes the lease it granted; a failed call never revokes what it
  granted: the write may have been applied, and the revoke would delete the key.
* Options are checked when read: every endpoint must parse as a URL (``http://[::1`` is one
  line naming ``--etcd-endpoints``), the TTL and margin by ``LeaseTimingOptions``; the password
  is an ``option(secret=True)`` and never appears in a repr.
* ``Lease.expiration`` comes from the etcd lease's remaining TTL.  Expiry times of etcd leases
  do not move (we never keep them alive), so they are cached per lease ID; the misses of a
  listing are asked for concurrently (gRPC futures), which keeps a list of 1000 leases fast.
* Several endpoints: calls stick to the member that last answered and move on to the next one
  on a connection error or timeout.  gRPC's reconnect backoff is capped at 1 s so a member that
  comes back is used again within about a second (the daemon retries as often).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from overlayd.sdk import (
    Change,
    ChangeList,
    Entry,
    EntryList,
    EventKind,
    HistoryGone,
    LeaseLost,
    LeaseTimingOptions,
    Store,
    StoreUnavailable,
    UserError,
    check_tls_files,
    comma_list,
    is_ipv6_key,
    option,
)

# python-etcd3 0.12's *_pb2 modules predate protobuf 4's upb runtime; see the design notes.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# gRPC's C core writes its own lines to stderr (a failed TLS handshake: two or three); the store
# turns each failure into one line of ours.  GRPC_VERBOSITY=INFO (or DEBUG) brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc

with warnings.catch_warnings():  # its generated code uses descriptor APIs protobuf deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import etcd3
        from etcd3 import etcdrpc
        from etcd3.etcdrpc import kv_pb2
    except TypeError as _exc:  # protobuf was imported earlier with its C/upb runtime
        raise UserError(
            "the etcd store needs protobuf's pure-Python runtime, but protobuf was already loaded "
            "with another one; start with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python"
        ) from _exc

log = logging.getLogger(__name__)

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE

T = TypeVar("T")

#: Deadline of every unary call; a hung member is given up on after this long.
REQUEST_TIMEOUT = 5.0
#: How long a new watch may take to be confirmed before etcd counts as unreachable.
WATCH_CREATE_TIMEOUT = 2.0
#: A watch stream silent for this long is asked for a progress report (is the member alive?).
WATCH_QUIET = 5.0
#: How long a cached etcd-lease expiry is trusted before it is asked for again.
EXPIRY_CACHE_SECONDS = 60.0
#: Rounds over all members while etcd elects a leader, and the pause between them.
ELECTION_ROUNDS = 4
ELECTION_PAUSE = 0.5

_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # etcd's default --grpc-keepalive-min-time is 5 s; ping less often than that.
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    # a listing of many thousands of leases is larger than gRPC's default 4 MiB
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# gRPC codes that mean "this member cannot answer now": try the next one.
_CONNECTION_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Failure texts of a TLS setup mistake (unknown CA, rejected client cert), as opposed to a
# connection that dropped mid-handshake, which stays a transient StoreUnavailable.
_TLS_HINTS = ("certificate", "x509", "ssl_error_ssl", "tsi_data_corrupted", "wrong_version_number", "alert")
# What a handshake failure means, by fragments of gRPC's (BoringSSL's) detail text, and the fix.
_TLS_PROBLEMS = (
    (("wrong_version_number",), "the endpoint does not speak TLS", "use an http:// endpoint"),
    (
        ("certificate_expired", "certificate has expired"),
        "the server's certificate has expired",
        "renew etcd's server certificate",
    ),
    (
        ("is not in peer certificate", "hostname mismatch", "ip address mismatch"),
        "the server's certificate is not valid for this host name or address",
        "connect to a name in its subjectAltName, or reissue it",
    ),
    (
        ("bad_signature", "certificate_verify_failed", "certificate verify failed", "unable to get local issuer",
         "self signed", "self-signed", "unknown_ca"),
        "the server's certificate is not signed by the CA in --etcd-cafile",
        "pass the CA that signed etcd's server certificate as --etcd-cafile",
    ),
    (
        ("bad_certificate", "certificate_required", "certificate required", "tsi_data_corrupted"),
        "etcd refused this client's certificate (or none was sent)",
        "pass --etcd-certfile and --etcd-keyfile signed by a CA in etcd's --trusted-ca-file",
    ),
)  # fmt: skip


def _tls_problem(detail: str) -> tuple[str, str]:
    """(what is wrong, how to fix it) for a failed TLS handshake, from gRPC's detail text."""
    lowered = detail.lower()
    for fragments, problem, fix in _TLS_PROBLEMS:
        if any(fragment in lowered for fragment in fragments):
            return problem, fix
    return "the TLS handshake failed", "check --etcd-cafile, --etcd-certfile and --etcd-keyfile"


@attrs.frozen
class _Endpoint:
    url: str
    host: str
    port: int
    secure: bool


@attrs.frozen
class _KV:
    """One key as read from etcd."""

    key: str
    value: bytes
    lease_id: int
    mod_revision: int
    create_revision: int = 0


class _Unavailable(Exception):
    """Internal: this member failed; try the next one."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"{endpoint}: {detail}")


def _parse_endpoint(url: str) -> _Endpoint:
    text = url if "://" in url else f"http://{url}"
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed "[::1"
        raise UserError(f"etcd endpoint {url!r} is not a URL ({exc}); fix --etcd-endpoints") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"etcd endpoint {url!r} is not a URL like http://127.0.0.1:2379; fix --etcd-endpoints")
    try:
        port = parts.port or 2379
    except ValueError as exc:
        raise UserError(f"etcd endpoint {url!r} has a bad port; fix --etcd-endpoints") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Endpoint(url=text, host=host, port=port, secure=parts.scheme == "https")


def _endpoint_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """Converter: the comma-separated endpoints, each checked to be a usable URL right away."""
    endpoints = comma_list(value)
    for url in endpoints:
        _parse_endpoint(url)
    return endpoints


@attrs.frozen
class EtcdOptions(LeaseTimingOptions):
    endpoints: tuple[str, ...] = option(
        "http://127.0.0.1:2379", "comma-separated etcd client URLs (http:// or https://)", converter=_endpoint_list
    )
    prefix: str = option("/coreos.com/network", "key prefix of the network config and the leases")
    cafile: str = option("", "CA certificate (PEM) that signed the etcd server certificate")
    certfile: str = option("", "client certificate (PEM) for etcd client-certificate auth")
    keyfile: str = option("", "private key (PEM) of the client certificate")
    username: str = option("", "etcd user name (etcd auth)")
    password: str = option("", "password of the etcd user", secret=True)  # secret: never in a repr


def _rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind *exc* (python-etcd3 re-raises some as its own exceptions)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    return str(text or error)


def _prefix_end(prefix: bytes) -> bytes:
    return bytes(etcd3.utils.increment_last_byte(prefix))


def _kv(kv: Any) -> _KV:
    """A ``_KV`` from etcd's protobuf ``KeyValue``."""
    return _KV(kv.key.decode(errors="replace"), kv.value, kv.lease, int(kv.mod_revision), int(kv.create_revision))


class EtcdStore(Store):
    """etcd v3 cluster, in flannel's key layout (the production store for many hosts)."""

    Options = EtcdOptions
    options: EtcdOptions

    def __init__(self, options: EtcdOptions) -> None:
        super().__init__(options)
        if not options.endpoints:
            raise UserError("no etcd endpoints given; pass --etcd-endpoints http://HOST:2379")
        self._endpoints = [_parse_endpoint(url) for url in options.endpoints]
        self._check_tls_options()
        prefix = "/" + options.prefix.strip("/")
        self._prefix = prefix
        self._config_key = f"{prefix}/config"
        self._v4_dir = f"{prefix}/subnets/"
        self._v6_dir = f"{prefix}/v6-subnets/"
        self._lock = threading.Lock()
        self._clients: dict[int, etcd3.Etcd3Client] = {}
        self._current = 0
        self._expiry: dict[int, tuple[float, float]] = {}  # lease id -> (expires at, fetched at)
        self._stream: _WatchStream | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"EtcdStore(endpoints={','.join(self.options.endpoints)}, prefix={self._prefix})"

    def _check_tls_options(self) -> None:
        options = self.options
        if bool(options.certfile) != bool(options.keyfile):
            raise UserError("etcd client TLS needs both --etcd-certfile and --etcd-keyfile")
        if bool(options.username) != bool(options.password):
            raise UserError("etcd auth needs both --etcd-username and --etcd-password")
        secure = {endpoint.secure for endpoint in self._endpoints}
        if len(secure) > 1:
            raise UserError("etcd endpoints mix http:// and https://; use one scheme for all members")
        if secure == {True} and not options.cafile:
            raise UserError(
                f"etcd endpoint {self._endpoints[0].url} uses https:// but no --etcd-cafile was given: pass the CA "
                "that signed etcd's server certificate (server certificates are always verified)"
            )
        if secure == {False} and (options.cafile or options.certfile):
            raise UserError("TLS files were given but the etcd endpoints use http://; use https:// endpoints")
        for flag, path in (("cafile", options.cafile), ("certfile", options.certfile), ("keyfile", options.keyfile)):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise UserError(f"cannot read --etcd-{flag} {path}: {exc.strerror}") from exc
        check_tls_files("--etcd-", options.cafile, options.certfile, options.keyfile)

    # -- connections --------------------------------------------------------------------------

    def _client(self, index: int) -> etcd3.Etcd3Client:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the etcd store is closed")
            client = self._clients.get(index)
        if client is not None:
            return client
        client = self._connect(self._endpoints[index])
        with self._lock:
            self._clients.setdefault(index, client)
            return self._clients[index]

    def _connect(self, endpoint: _Endpoint, auth: bool = True) -> etcd3.Etcd3Client:
        options = self.options
        user = (options.username or None) if auth else None
        password = (options.password or None) if auth else None
        try:
            client = etcd3.client(
                endpoint.host,
                endpoint.port,
                ca_cert=options.cafile or None,
                cert_key=options.keyfile or None,
                cert_cert=options.certfile or None,
                timeout=REQUEST_TIMEOUT,
                user=user,
                password=password,
                grpc_options=_GRPC_OPTIONS,
            )
        except Exception as exc:
            error = _rpc_error(exc)
            if error is None:
                raise UserError(f"cannot set up the etcd client for {endpoint.url}: {exc}") from exc
            detail = _details(error)
            if "authentication is not enabled" in detail:
                log.warning("etcd at %s has auth disabled; ignoring --etcd-username", endpoint.url)
                return self._connect(endpoint, auth=False)
            self._raise_permanent(error, endpoint.url)
            raise _Unavailable(endpoint.url, detail) from exc
        # python-etcd3 attaches the token twice: as metadata and as call credentials, which gRPC
        # refuses to send over a plain channel.  The metadata alone is what etcd reads.
        client.call_credentials = None
        return client

    def _drop(self, index: int) -> None:
        with self._lock:
            client = self._clients.pop(index, None)
        if client is not None:
            client.close()

    def _raise_permanent(self, error: grpc.RpcError, url: str) -> None:
        """Raise ``UserError`` for errors that no retry fixes (auth, permissions, TLS setup)."""
        code = error.code()
        detail = _details(error)
        lowered = detail.lower()
        if code is grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in lowered:
            raise UserError(
                f"etcd at {url} rejected user {self.options.username!r}: wrong --etcd-username or --etcd-password"
            ) from error
        if code is grpc.StatusCode.PERMISSION_DENIED:
            who = f"user {self.options.username!r}" if self.options.username else "an anonymous client"
            raise UserError(
                f"etcd at {url} denied {who} access to {self._prefix}: grant a role on that prefix, "
                "or pass --etcd-username/--etcd-password"
            ) from error
        needs_auth = "user name is empty" in lowered or code is grpc.StatusCode.UNAUTHENTICATED
        if needs_auth and "invalid auth token" not in lowered:
            raise UserError(
                f"etcd at {url} requires authentication ({detail}); pass --etcd-username and --etcd-password"
            ) from error
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and any(h in lowered for h in _TLS_HINTS):
            problem, fix = _tls_problem(detail)
            raise UserError(
                f"TLS handshake with etcd at {url} failed: {problem} "
                f"({detail.splitlines()[0].rpartition('last error: ')[2][:200]}); {fix}"
            ) from error

    def _call(self, what: str, fn: Callable[[etcd3.Etcd3Client], T]) -> T:
        """Run *fn* on the current member, failing over to the others on connection errors.

        When every member answered "no leader" / "leader changed" (an election is under way),
        wait a moment and go round once more before giving up with ``StoreUnavailable``.
        """
        count = len(self._endpoints)
        failures: list[str] = []
        for round_ in range(ELECTION_ROUNDS):
            if round_:
                time.sleep(ELECTION_PAUSE)
            failures = []
            start = self._current
            for step in range(count):
                index = (start + step) % count
                ok, result, failure = self._call_member(what, fn, index)
                if ok:
                    if index != self._current:
                        log.info("etcd: now using %s", self._endpoints[index].url)
                        self._current = index
                    return result  # type: ignore[return-value]
                failures.append(failure)
                log.debug("etcd %s failed at %s: %s", what, self._endpoints[index].url, failure)
            self._current = (start + 1) % count
            if not all("leader" in failure for failure in failures):
                break
        raise StoreUnavailable(f"etcd unreachable ({what}): {'; '.join(failures)}")

    def _call_member(self, what: str, fn: Callable[[etcd3.Etcd3Client], T], index: int) -> tuple[bool, T | None, str]:
        """(True, result, "") or (False, None, why this member failed)."""
        url = self._endpoints[index].url
        for attempt in range(2):  # a second try only after re-authenticating
            try:
                return True, fn(self._client(index)), ""
            except _Unavailable as exc:
                return False, None, str(exc)
            except (HistoryGone, LeaseLost, UserError, StoreUnavailable):
                raise
            except ValueError as exc:
                if "Channel closed" not in str(exc):
                    raise
                # gRPC's "Cannot invoke RPC: Channel closed!": close() raced this call
                raise StoreUnavailable(f"etcd {what} at {url} failed: the store is closed") from exc
            except Exception as exc:
                error = _rpc_error(exc)
                if error is None:
                    raise
                self._raise_permanent(error, url)
                detail = _details(error)
                if error.code() is grpc.StatusCode.UNAUTHENTICATED and attempt == 0:
                    log.info("etcd auth token at %s expired; authenticating again", url)
                    self._drop(index)
                    continue
                if error.code() not in _CONNECTION_CODES:
                    raise StoreUnavailable(f"etcd {what} failed at {url}: {detail}") from exc
                return False, None, f"{url}: {detail}"
        return False, None, f"{url}: authentication keeps failing"

    # -- small helpers ------------------------------------------------------------------------

    def _get(self, key: str) -> tuple[_KV | None, int]:
        def get(client: etcd3.Etcd3Client) -> tuple[_KV | None, int]:
            response = client.kvstub.Range(
                etcdrpc.RangeRequest(key=key.encode()), REQUEST_TIMEOUT, metadata=client.metadata
            )
            kvs = [_kv(kv) for kv in response.kvs]
            return (kvs[0] if kvs else None), int(response.header.revision)

        return self._call("get", get)

    def _txn(self, compare: Sequence[Any], success: Sequence[Any], what: str) -> tuple[bool, int]:
        def txn(client: etcd3.Etcd3Client) -> tuple[bool, int]:
            request = etcdrpc.TxnRequest(
                compare=[c.build_message() for c in compare],
                success=client._ops_to_requests(list(success)),
                failure=[],
            )
            response = client.kvstub.Txn(request, REQUEST_TIMEOUT, metadata=client.metadata)
            return bool(response.succeeded), int(response.header.revision)

        return self._call(what, txn)

    def _grant(self, lifetime: timedelta) -> tuple[int, datetime]:
        ttl = max(1, round(lifetime.total_seconds()))
        before = time.time()

        def grant(client: etcd3.Etcd3Client) -> tuple[int, int]:
            response = client.leasestub.LeaseGrant(
                etcdrpc.LeaseGrantRequest(TTL=ttl), REQUEST_TIMEOUT, metadata=client.metadata
            )
            if response.error:
                raise StoreUnavailable(f"etcd refused a lease: {response.error}")
            return int(response.ID), int(response.TTL)

        lease_id, granted = self._call("lease grant", grant)
        expires = before + granted
        with self._lock:
            self._expiry[lease_id] = (expires, time.monotonic())
        return lease_id, datetime.fromtimestamp(expires, UTC)

    def _revoke(self, lease_id: int) -> None:
        def revoke(client: etcd3.Etcd3Client) -> None:
            client.leasestub.LeaseRevoke(
                etcdrpc.LeaseRevokeRequest(ID=lease_id), REQUEST_TIMEOUT, metadata=client.metadata
            )

        try:
            self._call("lease revoke", revoke)
        except StoreUnavailable as exc:  # it runs out by itself; it owns no key
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, exc)
        with self._lock:
            self._expiry.pop(lease_id, None)

    def _revoke_if_unused(self, lease_id: int) -> None:
        """Revoke the etcd lease a renewal replaced, unless another key still uses it."""

        def keys(client: etcd3.Etcd3Client) -> int:
            response = client.leasestub.LeaseTimeToLive(
                etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True), REQUEST_TIMEOUT, metadata=client.metadata
            )
            return -1 if response.TTL < 0 else len(response.keys)

        try:
            attached = self._call("lease time-to-live", keys)
        except StoreUnavailable as exc:
            log.debug("could not check replaced etcd lease %x: %s", lease_id, exc)
            return
        if attached == 0:
            self._revoke(lease_id)

    def _remaining(self, lease_ids: Sequence[int], fresh: bool = False) -> dict[int, float | None]:
        """Expiry (epoch seconds) of each etcd lease; None when the lease no longer exists."""
        now_mono = time.monotonic()
        out: dict[int, float | None] = {}
        missing: list[int] = []
        with self._lock:
            for lease_id in set(lease_ids):
                cached = None if fresh else self._expiry.get(lease_id)
                if cached is not None and now_mono - cached[1] < EXPIRY_CACHE_SECONDS:
                    out[lease_id] = cached[0]
                else:
                    missing.append(lease_id)
        if not missing:
            return out

        def ask(client: etcd3.Etcd3Client) -> dict[int, int]:
            futures = [
                (
                    lease_id,
                    client.leasestub.LeaseTimeToLive.future(
                        etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), REQUEST_TIMEOUT, metadata=client.metadata
                    ),
                )
                for lease_id in missing
            ]
            return {lease_id: int(future.result().TTL) for lease_id, future in futures}

        before = time.time()
        ttls = self._call("lease time-to-live", ask)
        with self._lock:
            if len(self._expiry) > 100_000:
                self._expiry.clear()
            for lease_id, ttl in ttls.items():
                if ttl < 0:
                    out[lease_id] = None
                    self._expiry.pop(lease_id, None)
                else:
                    out[lease_id] = before + ttl
                    self._expiry[lease_id] = (before + ttl, now_mono)
        return out

    def _split(self, key: str) -> tuple[str, bool] | None:
        """(name, ipv6) of a full lease key, or None for a key outside both lease directories."""
        for directory, ipv6 in ((self._v4_dir, False), (self._v6_dir, True)):
            if key.startswith(directory):
                return key[len(directory) :], ipv6
        return None

    def _full_key(self, key: str) -> str:
        return (self._v6_dir if is_ipv6_key(key) else self._v4_dir) + key

    def _entry(self, kv: _KV, expires: float | None) -> Entry | None:
        """The entry of a lease key read from etcd (None when outside the lease directories)."""
        split = self._split(kv.key)
        if split is None:
            return None
        name, ipv6 = split
        expiration = None if expires is None else datetime.fromtimestamp(expires, UTC)
        return Entry(name, kv.value, kv.mod_revision, expiration, kv.create_revision, ipv6, handle=kv.lease_id)

    # -- config -------------------------------------------------------------------------------

    def get_config(self) -> str | None:
        kv, _ = self._get(self._config_key)
        return None if kv is None else kv.value.decode(errors="replace")

    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        txn = etcd3.Transactions()
        compare = [txn.version(self._config_key) == 0] if only_if_absent else []
        succeeded, _ = self._txn(compare, [txn.put(self._config_key, text)], "put config")
        return succeeded

    # -- leases -------------------------------------------------------------------------------

    def list_entries(self) -> EntryList:
        def read(client: etcd3.Etcd3Client) -> tuple[list[_KV], int]:
            ops = [
                etcdrpc.RequestOp(
                    request_range=etcdrpc.RangeRequest(
                        key=directory.encode(), range_end=_prefix_end(directory.encode())
                    )
                )
                for directory in (self._v4_dir, self._v6_dir)
            ]
            response = client.kvstub.Txn(etcdrpc.TxnRequest(success=ops), REQUEST_TIMEOUT, metadata=client.metadata)
            kvs = [_kv(kv) for op in response.responses for kv in op.response_range.kvs]
            return kvs, int(response.header.revision)

        kvs, revision = self._call("list leases", read)
        expiries = self._remaining([kv.lease_id for kv in kvs if kv.lease_id])
        entries = []
        for kv in kvs:
            expires = expiries.get(kv.lease_id) if kv.lease_id else None
            if kv.lease_id and expires is None:
                continue  # its etcd lease just ran out; etcd deletes the key any moment
            entry = self._entry(kv, expires)
            if entry is not None:
                entries.append(entry)
        return EntryList(tuple(entries), revision)

    def get_entry(self, key: str) -> Entry | None:
        kv, _ = self._get(self._full_key(key))
        if kv is None:
            return None
        expires = self._remaining([kv.lease_id]).get(kv.lease_id) if kv.lease_id else None
        if kv.lease_id and expires is None:
            return None  # its etcd lease ran out; the key goes any moment
        return self._entry(kv, expires)

    def create_entry(self, key: str, value: str, ttl: timedelta | None) -> Entry | None:
        full = self._full_key(key)
        lease_id, expiration = self._grant(ttl) if ttl is not None else (0, None)
        txn = etcd3.Transactions()
        # No revoke when the call fails: it may have been applied, and revoking would delete the key.
        created, revision = self._txn(
            [txn.version(full) == 0], [txn.put(full, value, lease=lease_id or None)], "create lease"
        )
        if not created:
            if lease_id:
                self._revoke(lease_id)
            return None
        return Entry(key, value, revision, expiration, revision, is_ipv6_key(key), handle=lease_id)

    def put_entry(self, current: Entry, value: str, ttl: timedelta | None) -> Entry | None:
        full = self._full_key(current.key)
        lease_id, expiration = self._grant(ttl) if ttl is not None else (0, None)
        txn = etcd3.Transactions()
        done, revision = self._txn(
            [txn.mod(full) == current.version], [txn.put(full, value, lease=lease_id or None)], "update lease"
        )
        if not done:
            if lease_id:
                self._revoke(lease_id)
            return None
        if current.handle:
            self._revoke_if_unused(current.handle)
        return Entry(current.key, value, revision, expiration, current.created_revision, current.ipv6, handle=lease_id)

    def delete_entry(self, current: Entry) -> bool:
        # The etcd lease is deliberately not revoked: that would make the delete look like an
        # expiry to watchers.  It owns no key now and runs out by itself.
        full = self._full_key(current.key)
        txn = etcd3.Transactions()
        done, _ = self._txn([txn.mod(full) == current.version], [txn.delete(full)], "delete lease")
        if done:
            return True
        kv, _ = self._get(full)
        return kv is None

    # -- watching -----------------------------------------------------------------------------

    def watch_entries(self, since_revision: int, timeout: float) -> ChangeList:
        return self._call("watch", lambda client: self._watch_on(client, since_revision, timeout))

    def _watch_on(self, client: etcd3.Etcd3Client, since_revision: int, timeout: float) -> ChangeList:
        """Changes after *since_revision* from the long-lived stream to *client* (opened or
        replaced as needed, see the design notes), waiting up to *timeout* for the first."""
        with self._lock:
            stream = self._stream
            if stream is not None and not stream.serves(client, since_revision):
                self._stream = None
            else:
                stream = None  # nothing to close
        if stream is not None:
            stream.close()
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the etcd store is closed")
            current = self._stream
        if current is None:
            current = _WatchStream(client, self._prefix, since_revision)
            try:
                current.wait_created()
            except BaseException:
                current.close()
                raise
            with self._lock:
                self._stream = current
        deadline = time.monotonic() + max(timeout, 0.0)
        revision = since_revision
        while True:
            try:
                raw, revision = current.take(deadline)
            except BaseException:
                with self._lock:
                    if self._stream is current:
                        self._stream = None
                current.close()
                raise
            if raw:
                events = self._convert(raw)
                if events:
                    return ChangeList(tuple(events), revision)
                continue  # only keys outside the lease directories changed: keep waiting
            return ChangeList((), revision)

    def _convert(self, raw_events: Sequence[Any]) -> list[Change]:
        """etcd watch events -> changes of lease keys (decoding is the base class's)."""
        puts = [e.kv.lease for e in raw_events if e.type == _PUT and e.kv.lease]
        gone = [e.prev_kv.lease for e in raw_events if e.type == _DELETE and e.prev_kv.lease]
        expiries = self._remaining(puts) if puts else {}
        alive = self._remaining(gone, fresh=True) if gone else {}
        changes: list[Change] = []
        for event in raw_events:
            key = event.kv.key.decode(errors="replace")
            split = self._split(key)
            if split is None:
                continue
            name, ipv6 = split
            revision = int(event.kv.mod_revision)
            if event.type == _PUT:
                kv = _kv(event.kv)
                expires = expiries.get(kv.lease_id) if kv.lease_id else None
                if kv.lease_id and expires is None:
                    continue  # written with an etcd lease that has already run out
                changes.append(Change(EventKind.ADDED, name, self._entry(kv, expires), revision, ipv6))
                continue
            prev = event.prev_kv
            previous = self._entry(_kv(prev), None) if prev.key else None
            expired = bool(prev.lease) and alive.get(prev.lease) is None
            kind = EventKind.EXPIRED if expired else EventKind.REMOVED
            changes.append(Change(kind, name, previous, revision, ipv6))
        return changes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        for client in clients:
            client.close()


def _progress_request() -> Any:
    """A ``WatchRequest`` carrying a ``WatchProgressRequest`` (field 3, empty).  python-etcd3
    0.12's generated code predates etcd 3.4's field, so the message is built from its wire form
    (protobuf keeps unknown fields when serialising)."""
    request = etcdrpc.WatchRequest()
    request.MergeFromString(b"\x1a\x00")
    return request


class _WatchStream:
    """One gRPC watch stream on one member, from one revision on, read by a daemon thread.

    The thread only moves responses into a buffer and records how the stream ended; decoding,
    error translation and waiting happen in the caller's thread (:meth:`take`).  See the design
    notes for when a stream is replaced.
    """

    def __init__(self, client: etcd3.Etcd3Client, prefix: str, since_revision: int) -> None:
        self.client = client
        self.url = str(client._url)
        self._prefix = prefix
        self._since = since_revision
        #: The revision the caller has been given everything up to (what its next call passes).
        self.position = since_revision
        self._cond = threading.Condition()
        self._buffer: list[Any] = []  # raw etcd events, in order
        self._buffered_revision = since_revision
        self._error: BaseException | None = None
        self._created = False
        self._heard = time.monotonic()
        self._progress_asked: float | None = None
        self._requests: queue.Queue[Any] = queue.Queue()
        key = (prefix + "/").encode()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=_prefix_end(key), start_revision=since_revision + 1, prev_kv=True
        )
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        self._call = etcdrpc.WatchStub(client.channel).Watch(self._outgoing(), metadata=client.metadata)
        self._thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._thread.start()

    def serves(self, client: etcd3.Etcd3Client, since_revision: int) -> bool:
        """Can a call from *since_revision* to *client* continue on this stream?"""
        with self._cond:
            return client is self.client and since_revision == self.position and self._error is None

    def _outgoing(self) -> Iterator[Any]:
        while True:
            request = self._requests.get()
            if request is None:
                return  # half-close: the stream ends
            yield request

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self._call:
                with self._cond:
                    self._heard = time.monotonic()
                    self._progress_asked = None
                    if response.compact_revision:
                        error = HistoryGone(
                            f"etcd compacted its history up to revision {response.compact_revision}, past {self._since}"
                        )
                        break
                    if response.canceled:
                        reason = response.cancel_reason or "canceled by the server"
                        if "permission denied" in reason:
                            error = UserError(f"etcd at {self.url} denied watching {self._prefix}: {reason}")
                        else:
                            error = _Unavailable(self.url, f"watch {reason}")
                        break
                    if 0 < response.header.revision < self._since:
                        # etcd's revision only grows in a cluster's life: this is another (wiped) one
                        error = HistoryGone(
                            f"etcd at {self.url} is at revision {response.header.revision}, behind {self._since}: "
                            "the store was reset"
                        )
                        break
                    if response.created:
                        self._created = True
                    if response.events:
                        self._buffer.extend(response.events)
                        top = max(int(event.kv.mod_revision) for event in response.events)
                        self._buffered_revision = max(self._buffered_revision, top)
                    self._cond.notify_all()
            if error is None:
                error = _Unavailable(self.url, "the watch stream ended")
        except grpc.RpcError as exc:
            # raised as is in the caller's thread, so the store's usual rules apply: re-authenticate
            # on an expired token, UserError for auth/permission/TLS, failover on connection codes
            error = exc
        except Exception as exc:  # a channel closed under us, a protobuf surprise: never lose it
            error = _Unavailable(self.url, f"watch stream: {exc}")
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def wait_created(self) -> None:
        """Block until etcd confirms the watch; ``_Unavailable`` (or the stream's error) if it does not."""
        deadline = time.monotonic() + WATCH_CREATE_TIMEOUT
        with self._cond:
            while not self._created and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Unavailable(self.url, f"no answer to a watch within {WATCH_CREATE_TIMEOUT}s")
                self._cond.wait(remaining)
            if not self._created and self._error is not None:
                raise self._error

    def take(self, deadline: float) -> tuple[list[Any], int]:
        """(raw events, revision): what is buffered, else the first events before *deadline*,
        else nothing.  Raises what ended the stream; checks a quiet member for life."""
        with self._cond:
            while not self._buffer and self._error is None:
                now = time.monotonic()
                if self._progress_asked is not None and now - self._progress_asked >= WATCH_CREATE_TIMEOUT:
                    self._error = _Unavailable(
                        self.url, f"the watch stream went silent (no progress report within {WATCH_CREATE_TIMEOUT}s)"
                    )
                    break
                if self._progress_asked is None and now - self._heard >= WATCH_QUIET:
                    self._progress_asked = now
                    self._requests.put(_progress_request())
                if now >= deadline:
                    return [], self.position
                wake = deadline
                if self._progress_asked is not None:
                    wake = min(wake, self._progress_asked + WATCH_CREATE_TIMEOUT)
                else:
                    wake = min(wake, self._heard + WATCH_QUIET)
                self._cond.wait(max(0.0, wake - now))
            if self._buffer:
                raw, self._buffer = self._buffer, []
                self.position = self._buffered_revision
                return raw, self.position
            assert self._error is not None
            raise self._error

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        with self._cond:
            if self._error is None:
                self._error = _Unavailable(self.url, "the watch stream was closed")
            self._cond.notify_all()
