"""Consul store: the network config and the leases in Consul's KV store, in flannel's layout.

Keys (``prefix`` default ``coreos.com/network``, no leading slash: Consul keys have none):
``<prefix>/config``, ``<prefix>/subnets/10.244.3.0-24``, ``<prefix>/v6-subnets/<addr>-<len>``,
with flannel's JSON values — the etcd layout minus the leading slash, so ``overlayd leases``
reads the same on both stores.  flannel itself has no Consul store.

Design notes:
* Client: py-consul (the maintained fork of python-consul), for its HTTP layer only: the
  requests session, TLS (CA, client certificate), the token header and its blocking-query
  timeouts (the query's ``wait`` plus Consul's wait/16 jitter).  Its endpoint wrappers are not
  used: they ``json.loads`` whatever arrives, unbounded, and turn a transaction's 409 into an
  exception without its ``Errors``.  Every payload from Consul goes through
  ``overlayd.sdk.load_json`` (bounded in size and depth); HTTP statuses are mapped here.
* Lease lifetime: every lease key is held by this store's Consul *session* (``Behavior=delete``,
  ``TTL`` = ``--consul-ttl``, no health checks), so Consul deletes the key when the session runs
  out.  Consul takes TTLs of 10 s to 86400 s only (checked at start, naming ``--consul-ttl``),
  and the TTL is a lower bound: its servers run the timer for twice the TTL, so a dead host's
  lease may stay up to 2 x TTL after its last renewal.  Hence ``Lease.expiration`` is, for our own
  session, the last renewal + TTL (the earliest Consul may reap it, what renewal must beat), and
  for another host's session now + 2 x TTL (the latest it can still be there).  Keys held by no
  session are reservations.
* Sessions are created with ``LockDelay 0s``: Consul refuses to lock a key of an invalidated
  session for its lock-delay (15 s by default), which would refuse a restarted host its own
  subnet.  One session per store, created on the first lease write and renewed by every lease
  write (``/v1/session/renew``).  A 404 there means the session is gone, and with it (``delete``)
  its keys: a new session is created, the compare-and-swap on the old key fails, the base class
  raises ``LeaseLost`` and the daemon acquires again, preferring the same subnet.  ``close()``
  keeps the session: a daemon that stops keeps its lease until the TTL runs out, as on etcd.
* Writes are transactions (``/v1/txn``): create = ``check-not-exists`` + ``lock`` with our
  session (``?cas=0`` together with ``?acquire=`` is a 400 "Conflicting flags", and a plain
  ``?acquire=`` would take over a reservation); update = ``cas`` on the ``ModifyIndex`` read
  (the lock is kept), or ``check-index`` + ``unlock`` (by the holder's session) + ``lock`` (ours)
  to move a lease from another session of the same host (a restarted daemon) to ours; delete =
  ``delete-cas``.  A write without an index is never made: it would succeed on someone else's
  key.  Transactions return the new ``ModifyIndex``, so no read follows a write.
* Watching is a blocking query on ``<prefix>/`` (``?recurse&index=&wait=``), resumed from
  ``X-Consul-Index``.  Consul answers with the whole listing, so changes are the difference from
  the listing remembered at that index (an ``ADDED`` per key with a newer ``ModifyIndex`` when
  there is none, e.g. a resume from a revision this store never listed).  A vanished key whose
  session no longer exists ``EXPIRED``; otherwise it was ``REMOVED``.  A return without change is
  normal (the loop goes on, at most every ``MIN_POLL`` seconds); an index of 0 counts as 1; an
  index that goes backwards (a snapshot restore, the highest-index key's tombstone reaped)
  raises ``HistoryGone``, so the caller re-lists and starts again from the new index.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import consul
import requests
from overlayd.sdk import (
    Change,
    ChangeList,
    DecodeError,
    Entry,
    EntryList,
    EventKind,
    HistoryGone,
    LeaseTimingOptions,
    Store,
    StoreUnavailable,
    UserError,
    check_tls_files,
    is_ipv6_key,
    load_json,
    option,
)

log = logging.getLogger(__name__)

#: Consul's limits on a session TTL (api-docs/session: "between 10s and 86400s").
MIN_SESSION_TTL = timedelta(seconds=10)
MAX_SESSION_TTL = timedelta(seconds=86400)
#: Consul's servers invalidate a session this many TTLs after its last renewal, at the latest.
TTL_MULTIPLIER = 2
#: Deadline of a request that does not block; a blocking query gets its wait on top.
REQUEST_TIMEOUT = 5.0
#: A blocking query that returns without change sooner than this is not repeated sooner.
MIN_POLL = 0.05
#: The largest answer read from Consul (a listing of many thousands of leases fits).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Listings remembered by index, to diff a watch answer against.
SNAPSHOTS = 4
#: Session TTLs remembered (another host's session id -> seconds).
SESSION_MEMORY = 10_000


def _address(value: str) -> str:
    """Converter: ``host:port`` (``[v6]:port``), checked at once."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in text:
        raise ValueError(f"{value!r} is not HOST:PORT (like 127.0.0.1:8500); fix --consul-address")
    return text


def _prefix(value: str) -> str:
    return str(value).strip().strip("/")


@attrs.frozen
class ConsulOptions(LeaseTimingOptions):
    address: str = option("127.0.0.1:8500", "Consul HTTP API address, HOST:PORT", converter=_address)
    scheme: str = option("http", "http or https")
    token: str = option("", "ACL token (default: $CONSUL_HTTP_TOKEN)", secret=True)
    prefix: str = option("coreos.com/network", "key prefix of the network config and the leases", converter=_prefix)
    datacenter: str = option("", "Consul datacenter (default: the agent's)")
    cafile: str = option("", "CA certificate (PEM) that signed the Consul server certificate")
    certfile: str = option("", "client certificate (PEM) for Consul's verify_incoming")
    keyfile: str = option("", "private key (PEM) of the client certificate")


def _go_seconds(value: timedelta) -> str:
    return f"{value.total_seconds():.0f}s"


def _decode_value(raw: Any) -> bytes | str:
    """A KV ``Value`` (base64 or null) as bytes; undecodable base64 becomes a garbled value."""
    if raw is None:
        return b""
    if not isinstance(raw, str):
        return "<not a base64 string>"
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return "<not base64>"


@attrs.frozen
class _Item:
    """One KV entry as Consul returned it."""

    key: str
    value: bytes | str
    modify_index: int
    create_index: int
    session: str


def _items(doc: Any) -> list[_Item]:
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise DecodeError("a KV listing is not a JSON list")
    items = []
    for raw in doc:
        if not isinstance(raw, dict) or not isinstance(raw.get("Key"), str):
            continue
        modify, create = raw.get("ModifyIndex"), raw.get("CreateIndex")
        if not isinstance(modify, int) or not isinstance(create, int):
            continue
        session = raw.get("Session") or ""
        items.append(_Item(raw["Key"], _decode_value(raw.get("Value")), modify, create, str(session)))
    return items


def _ssl_reason(exc: BaseException) -> str:
    """The certificate problem behind a requests ``SSLError`` (wrapped two or three deep), not
    its whole text, which repeats the request's URL."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {item.verify_message}"
        if isinstance(item, ssl.SSLError) and item.reason:
            return str(item.reason)
        stack.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return exc.__class__.__name__


class ConsulStore(Store):
    """Consul KV with sessions, in flannel's key layout (leases die with their Consul session)."""

    Options = ConsulOptions
    options: ConsulOptions

    def __init__(self, options: ConsulOptions) -> None:
        super().__init__(options)
        if not MIN_SESSION_TTL <= options.ttl <= MAX_SESSION_TTL:
            raise UserError(
                f"--consul-ttl {options.ttl.total_seconds():g} is not usable: Consul sessions take a TTL "
                f"between {MIN_SESSION_TTL.total_seconds():.0f} and {MAX_SESSION_TTL.total_seconds():.0f} "
                "seconds (default 86400); Consul may keep a dead host's lease up to twice that long"
            )
        if options.scheme not in ("http", "https"):
            raise UserError(f"--consul-scheme {options.scheme!r} is not http or https")
        self._check_tls_options()
        host, _, port = options.address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._url = f"{options.scheme}://{options.address}"
        self._token = options.token or os.environ.get("CONSUL_HTTP_TOKEN", "")
        prefix = options.prefix
        self._prefix = prefix
        self._config_key = f"{prefix}/config"
        self._dirs = ((f"{prefix}/subnets/", False), (f"{prefix}/v6-subnets/", True))
        cert = (options.certfile, options.keyfile) if options.certfile else None
        self._client = consul.Consul(
            host=self._host if ":" not in self._host else f"[{self._host}]",
            port=self._port,
            scheme=options.scheme,
            verify=options.cafile or True,
            cert=cert,
            dc=options.datacenter or None,
            connections_timeout=REQUEST_TIMEOUT,
        )
        self._client.token = self._token  # py-consul lets $CONSUL_HTTP_TOKEN beat an explicit token
        self._lock = threading.Lock()
        self._session: str | None = None
        self._renewed_at: datetime | None = None  # when our session was last created or renewed
        self._ttls: dict[str, float] = {}
        self._snapshots: OrderedDict[int, dict[tuple[str, bool], Entry]] = OrderedDict()
        self._closed = False

    def __repr__(self) -> str:
        return f"ConsulStore(address={self._url}, prefix={self._prefix})"

    def _check_tls_options(self) -> None:
        options = self.options
        if bool(options.certfile) != bool(options.keyfile):
            raise UserError("Consul client TLS needs both --consul-certfile and --consul-keyfile")
        if options.scheme == "http" and (options.cafile or options.certfile):
            raise UserError("TLS files were given but --consul-scheme is http; pass --consul-scheme https")
        for flag, path in (("cafile", options.cafile), ("certfile", options.certfile), ("keyfile", options.keyfile)):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise UserError(f"cannot read --consul-{flag} {path}: {exc.strerror}") from exc
        check_tls_files("--consul-", options.cafile, options.certfile, options.keyfile)

    # -- HTTP ---------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        params: Iterable[tuple[str, str]] = (),
        data: str | bytes = "",
    ) -> Any:
        """One request; returns py-consul's ``Response`` (code, headers, body) for 2xx/404/409."""
        if self._closed:
            raise StoreUnavailable("the consul store is closed")
        query = list(params)
        if self.options.datacenter:
            query.append(("dc", self.options.datacenter))
        headers = self._client.prepare_headers()
        http = self._client.http
        keep: Callable[[Any], Any] = lambda response: response  # noqa: E731 - py-consul's callback slot
        try:
            if method == "GET":
                response = http.get(keep, path, params=query, headers=headers, raw=True)
            elif method == "PUT":
                response = http.put(keep, path, params=query, data=data, headers=headers)
            else:
                response = http.delete(keep, path, params=query, headers=headers)
        except requests.exceptions.SSLError as exc:
            raise UserError(
                f"TLS handshake with Consul at {self._url} failed ({_ssl_reason(exc)}); "
                "check --consul-cafile (the CA that signed Consul's server certificate), --consul-certfile "
                "and --consul-keyfile"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise StoreUnavailable(f"Consul at {self._url} did not answer ({what}): {exc.__class__.__name__}") from exc
        code = int(response.code)
        if code in (401, 403):
            raise UserError(
                f"Consul at {self._url} denied {what} ({code}): the token needs key_prefix "
                f'"{self._prefix}/" write and session write (docs/stores/consul.md); pass --consul-token'
            )
        if code >= 500 or code not in (200, 404, 409):
            body = response.body.decode(errors="replace") if isinstance(response.body, bytes) else str(response.body)
            error = StoreUnavailable if code >= 500 else UserError
            raise error(f"Consul at {self._url} refused {what} ({code}): {body.strip()[:200]}")
        return response

    def _json(self, response: Any, what: str) -> Any:
        try:
            return load_json(response.body, what=f"Consul's answer to {what}", max_bytes=MAX_ANSWER_BYTES)
        except DecodeError as exc:
            raise StoreUnavailable(str(exc)) from exc

    @staticmethod
    def _index(response: Any) -> int:
        try:
            index = int(response.headers.get("X-Consul-Index", "0"))
        except ValueError:
            index = 0
        return max(index, 1)  # api-docs/features/blocking: treat an index below 1 as 1

    def _txn(self, ops: list[dict[str, Any]], what: str) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run *ops* atomically: (applied?, KV results by key); failed ops are logged at debug."""
        response = self._call("PUT", "/v1/txn", what, data=json.dumps(ops))
        doc = self._json(response, what)
        if not isinstance(doc, dict):
            raise StoreUnavailable(f"Consul's answer to {what} is not a JSON object")
        if response.code == 409:
            errors = doc.get("Errors") or []
            log.debug("%s rolled back: %s", what, errors)
            if any("invalid session" in str(e.get("What", "")) for e in errors if isinstance(e, dict)):
                with self._lock:
                    self._session = None
            return False, {}
        results = {}
        for result in doc.get("Results") or []:
            kv = result.get("KV") if isinstance(result, dict) else None
            if isinstance(kv, dict) and isinstance(kv.get("Key"), str):
                results[kv["Key"]] = kv
        return True, results

    # -- sessions -----------------------------------------------------------------------------

    def _live_session(self) -> str:
        """Our session, renewed now (or created when there is none or it is gone)."""
        started = datetime.now(UTC)
        with self._lock:
            session = self._session
        if session is not None:
            response = self._call("PUT", f"/v1/session/renew/{session}", "renew the lease session")
            if response.code == 200:
                with self._lock:
                    self._renewed_at = started
                return session
            log.warning("Consul session %s is gone (it ran out or was destroyed); creating a new one", session)
        body = {
            "Name": f"overlayd {os.uname().nodename}",
            "TTL": _go_seconds(self.options.ttl),
            "Behavior": "delete",
            "LockDelay": "0s",
            "NodeChecks": [],
            "ServiceChecks": [],
            "Checks": [],
        }
        response = self._call("PUT", "/v1/session/create", "create a lease session", data=json.dumps(body))
        doc = self._json(response, "create a session")
        if response.code != 200 or not isinstance(doc, dict) or not isinstance(doc.get("ID"), str):
            raise StoreUnavailable(f"Consul at {self._url} did not create a session: {str(doc)[:200]}")
        created = str(doc["ID"])
        with self._lock:
            self._session = created
            self._renewed_at = started
            self._ttls[created] = self.options.ttl.total_seconds()
        return created

    def _session_ttls(self, sessions: set[str]) -> dict[str, float]:
        """TTL seconds of *sessions* that exist (one ``/v1/session/list`` when some are new)."""
        with self._lock:
            unknown = sessions - self._ttls.keys()
        if unknown:
            doc = self._json(self._call("GET", "/v1/session/list", "list sessions"), "list sessions")
            with self._lock:
                if len(self._ttls) > SESSION_MEMORY:
                    self._ttls.clear()
                for raw in doc if isinstance(doc, list) else []:
                    if isinstance(raw, dict) and isinstance(raw.get("ID"), str):
                        self._ttls[raw["ID"]] = _ttl_seconds(raw.get("TTL"))
        with self._lock:
            return {s: self._ttls[s] for s in sessions if s in self._ttls}

    def _session_exists(self, session: str) -> bool:
        response = self._call("GET", f"/v1/session/info/{session}", "read a session")
        return bool(self._json(response, "read a session")) if response.code == 200 else False

    # -- keys and entries ---------------------------------------------------------------------

    def _split(self, key: str) -> tuple[str, bool] | None:
        for directory, ipv6 in self._dirs:
            if key.startswith(directory):
                return key[len(directory) :], ipv6
        return None

    def _full_key(self, key: str) -> str:
        return f"{self._dirs[1 if is_ipv6_key(key) else 0][0]}{key}"

    def _entries(self, items: list[_Item]) -> dict[tuple[str, bool], Entry]:
        """Lease entries of *items* (keys outside the lease directories and dead sessions left out)."""
        ttls = self._session_ttls({item.session for item in items if item.session})
        with self._lock:
            ours, renewed = self._session, self._renewed_at
        now = datetime.now(UTC)
        entries: dict[tuple[str, bool], Entry] = {}
        for item in items:
            split = self._split(item.key)
            if split is None:
                continue
            expiration: datetime | None = None
            if item.session:
                if item.session == ours and renewed is not None:
                    expiration = renewed + self.options.ttl
                elif item.session in ttls:  # a session without a TTL lives until destroyed: show ours
                    ttl = timedelta(seconds=ttls[item.session]) if ttls[item.session] else self.options.ttl
                    expiration = now + TTL_MULTIPLIER * ttl
                else:
                    continue  # its session is gone: Consul deletes the key any moment
            name, ipv6 = split
            entries[split] = Entry(
                name, item.value, item.modify_index, expiration, item.create_index, ipv6, handle=item.session or None
            )
        return entries

    def _list(self, index: int = 0, wait: float = 0.0) -> tuple[int, list[_Item]]:
        params = [("recurse", "")]
        if index:
            params += [("index", str(index)), ("wait", f"{max(1, int(wait * 1000))}ms")]
        response = self._call("GET", f"/v1/kv/{self._prefix}/", "list leases", params)
        items = _items(self._json(response, "list leases")) if response.code == 200 else []
        return self._index(response), items

    def _remember(self, index: int, entries: dict[tuple[str, bool], Entry]) -> None:
        with self._lock:
            self._snapshots[index] = entries
            self._snapshots.move_to_end(index)
            while len(self._snapshots) > SNAPSHOTS:
                self._snapshots.popitem(last=False)

    # -- network config -----------------------------------------------------------------------

    def get_config(self) -> str | None:
        response = self._call("GET", f"/v1/kv/{self._config_key}", "read the network config")
        if response.code == 404:
            return None
        items = _items(self._json(response, "read the network config"))
        if not items:
            return None
        value = items[0].value
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        params = [("cas", "0")] if only_if_absent else []
        response = self._call("PUT", f"/v1/kv/{self._config_key}", "write the network config", params, text.encode())
        body = response.body.decode() if isinstance(response.body, bytes) else str(response.body)
        return body.strip() == "true"

    # -- key-value primitives -----------------------------------------------------------------

    def list_entries(self) -> EntryList:
        index, items = self._list()
        entries = self._entries(items)
        self._remember(index, entries)
        return EntryList(tuple(entries.values()), index)

    def get_entry(self, key: str) -> Entry | None:
        full = self._full_key(key)
        response = self._call("GET", f"/v1/kv/{full}", "read a lease")
        if response.code == 404:
            return None
        items = [item for item in _items(self._json(response, "read a lease")) if item.key == full]
        return next(iter(self._entries(items).values()), None)

    def _written(self, key: str, value: str, kv: dict[str, Any] | None, session: str | None) -> Entry | None:
        if kv is None or not isinstance(kv.get("ModifyIndex"), int):
            return self.get_entry(key)  # not expected from Consul; read back rather than guess
        expiration = None
        if session is not None:
            with self._lock:
                renewed = self._renewed_at
            expiration = (renewed or datetime.now(UTC)) + self.options.ttl
        created = kv.get("CreateIndex")
        created = created if isinstance(created, int) else 0
        return Entry(key, value, kv["ModifyIndex"], expiration, created, is_ipv6_key(key), handle=session)

    def create_entry(self, key: str, value: str, ttl: timedelta | None) -> Entry | None:
        full = self._full_key(key)
        encoded = base64.b64encode(value.encode()).decode()
        for _ in range(2):  # once more when our session vanished between renew and lock
            session = self._live_session() if ttl is not None else None
            write: dict[str, Any] = {"Verb": "set", "Key": full, "Value": encoded}
            if session is not None:
                write = {"Verb": "lock", "Key": full, "Value": encoded, "Session": session}
            done, results = self._txn(
                [{"KV": {"Verb": "check-not-exists", "Key": full}}, {"KV": write}], "create lease"
            )
            if done:
                return self._written(key, value, results.get(full), session)
            if session is None or self._session is not None:
                return None
        return None

    def put_entry(self, current: Entry, value: str, ttl: timedelta | None) -> Entry | None:
        full = self._full_key(current.key)
        encoded = base64.b64encode(value.encode()).decode()
        holder = current.handle or None
        session = self._live_session() if ttl is not None else None
        ops: list[dict[str, Any]]
        if session is not None and holder == session:
            ops = [{"KV": {"Verb": "cas", "Key": full, "Value": encoded, "Index": current.version}}]
        elif session is None and holder is None:
            ops = [{"KV": {"Verb": "cas", "Key": full, "Value": encoded, "Index": current.version}}]
        else:
            ops = [{"KV": {"Verb": "check-index", "Key": full, "Index": current.version}}]
            if holder is not None:  # another session of ours (a restarted daemon) or a lease turning reservation
                ops.append({"KV": {"Verb": "unlock", "Key": full, "Value": encoded, "Session": holder}})
            if session is not None:
                ops.append({"KV": {"Verb": "lock", "Key": full, "Value": encoded, "Session": session}})
        done, results = self._txn(ops, "update lease")
        if not done:
            return None
        written = self._written(current.key, value, results.get(full), session)
        if written is not None:
            written = attrs.evolve(written, created_revision=written.created_revision or current.created_revision)
        return written

    def delete_entry(self, current: Entry) -> bool:
        full = self._full_key(current.key)
        done, _ = self._txn([{"KV": {"Verb": "delete-cas", "Key": full, "Index": current.version}}], "delete lease")
        if done:
            return True
        return int(self._call("GET", f"/v1/kv/{full}", "read a lease").code) == 404

    # -- watching -----------------------------------------------------------------------------

    def watch_entries(self, since_revision: int, timeout: float) -> ChangeList:
        with self._lock:
            base = self._snapshots.get(since_revision)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ChangeList((), since_revision)
            asked = time.monotonic()
            index, items = self._list(max(since_revision, 1), remaining)
            if index < since_revision:
                with self._lock:
                    self._snapshots.clear()
                raise HistoryGone(
                    f"Consul's index went back from {since_revision} to {index} "
                    "(a snapshot restore, or the newest key's tombstone reaped)"
                )
            if index == since_revision:  # a return without change: normal, ask again
                time.sleep(max(0.0, MIN_POLL - (time.monotonic() - asked)))
                continue
            entries = self._entries(items)
            self._remember(index, entries)
            return ChangeList(tuple(self._diff(base, entries, since_revision, index)), index)

    def _diff(
        self,
        base: dict[tuple[str, bool], Entry] | None,
        entries: dict[tuple[str, bool], Entry],
        since: int,
        index: int,
    ) -> list[Change]:
        changes = []
        for (name, ipv6), entry in entries.items():
            old = base.get((name, ipv6)) if base is not None else None
            if (base is None and entry.version > since) or (
                base is not None and (old is None or old.version != entry.version)
            ):
                changes.append(Change(EventKind.ADDED, name, entry, entry.version, ipv6))
        if base is None:
            return changes
        gone = [(split, entry) for split, entry in base.items() if split not in entries]
        alive = {s: self._session_exists(s) for s in {e.handle for _, e in gone if e.handle}}
        for (name, ipv6), entry in gone:
            expired = bool(entry.handle) and not alive.get(entry.handle, False)
            kind = EventKind.EXPIRED if expired else EventKind.REMOVED
            changes.append(Change(kind, name, entry, index, ipv6))
        return changes

    def close(self) -> None:
        # The session is kept: a daemon that stops keeps its lease until the TTL runs out.
        self._closed = True
        self._client.http.session.close()


def _ttl_seconds(text: Any) -> float:
    """A session's ``TTL`` ("86400s", "1m30s"; "" for none) in seconds."""
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return float(consul.std.parse_duration(text))
    except (KeyError, ValueError):
        return 0.0
