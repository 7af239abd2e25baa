"""A small FAKE Consul server for tests: the KV, transaction and session HTTP API, in one process.

No Consul server can be installed where overlayd is tested, so this fake was written from
Consul's public HTTP API documentation (api-docs ``kv``, ``txn``, ``session`` and
``features/blocking``, and the sessions overview).  It is not Consul: it keeps everything in
memory, has one node, no ACLs, no raft, and implements only the endpoints below.  The consul
store talks to it with its real client over real HTTP, so what it enforces is what the store is
tested against; where the documentation leaves a detail open, the choice is noted here.

Rules it enforces (each as the documentation states it):

* ``GET /v1/kv/<key>``: one entry, ``?recurse`` (every key with that prefix), ``?keys``; values
  base64 in JSON with ``CreateIndex``, ``ModifyIndex``, ``LockIndex``, ``Flags``, ``Session``;
  404 when nothing matches; ``X-Consul-Index`` on every answer.  The index of a prefix is the
  highest ``ModifyIndex`` of its keys *and of their tombstones* (so a delete moves it), else the
  index of the whole KV table.  Tombstones are kept until reaped (Consul: after
  ``tombstone_ttl``; here on ``PUT /_fake/reap-tombstones``), which lowers a prefix's index: the
  documented "index goes backwards" case.
* blocking queries: ``?index=N&wait=D`` holds the request until the result's index is greater
  than N or *wait* (default 5 m, at most 10 m, plus up to wait/16 of jitter) has passed; a
  return is no promise of a change.
* ``PUT /v1/kv/<key>`` with ``?cas=`` (0: only if absent; else only if ``ModifyIndex`` matches),
  ``?acquire=<session>`` (fails while another session holds the key or its lock-delay runs;
  takes over a key that no session holds; ``LockIndex`` + 1), ``?release=<session>``, ``?flags=``;
  a plain PUT keeps the key's lock.  ``cas`` with ``acquire``/``release`` is a 400
  "Conflicting flags".  Values larger than 512 KiB are refused (413).  Answers ``true``/``false``.
* ``DELETE /v1/kv/<key>`` with ``?cas=`` and ``?recurse``; a delete leaves a tombstone.
* ``PUT /v1/txn``: up to 128 KV operations (``set cas lock unlock get get-tree check-index
  check-session check-not-exists delete delete-tree delete-cas``), applied atomically: all or
  none, 200 with ``Results`` or 409 with ``Errors`` (``OpIndex``, ``What``); every write of a
  transaction gets the same index; no result for deletes and ``check-not-exists``; ``Value`` is
  null in results except for ``get``/``get-tree``.
* sessions: ``PUT /v1/session/create`` (``TTL`` "10s".."86400s" or none, else 400;
  ``Behavior`` ``release``/``delete``; ``LockDelay`` default 15 s, at most 60 s), ``destroy``,
  ``renew`` (404 once the session is gone), ``GET info`` (``[]`` when gone) and ``list``.  A
  session with a TTL is invalidated when not renewed for twice its TTL (Consul's servers run
  the timer with a multiplier of 2: the TTL is a lower bound).  Invalidation (by TTL or
  destroy) deletes (``delete``) or releases (``release``) every key the session holds, in one
  index, and blocks those keys from being acquired for the session's lock-delay.

Fake-only endpoints for tests: ``PUT /_fake/reap-tombstones``, ``GET /_fake/snapshot`` and
``PUT /_fake/restore`` (put a snapshot back, indexes and all, as a Consul snapshot restore does),
``GET /v1/status/leader`` answers so clients can wait for the server.  With ``--token`` every
``/v1/`` request must carry that ``X-Consul-Token`` or gets a 403 (a stand-in for ACLs).

Run it standalone (the e2e tests start it inside the store network namespace)::

    python -m overlayd.testing.consul_server --host 192.0.2.254 --port 8500
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import random
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_VALUE = 512 * 1024
MAX_TXN_OPS = 128
MIN_TTL, MAX_TTL = 10.0, 86400.0
TTL_MULTIPLIER = 2
DEFAULT_LOCK_DELAY = 15.0
MAX_LOCK_DELAY = 60.0
DEFAULT_WAIT, MAX_WAIT = 300.0, 600.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9.]+)(ns|us|µs|ms|s|m|h)")


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class TxnFailed(Exception):
    def __init__(self, op_index: int, what: str) -> None:
        super().__init__(what)
        self.op_index = op_index
        self.what = what


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "0") in seconds; ``ApiError`` 400 when it is not one."""
    if text in ("", "0"):
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, f"time: invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


class ConsulState:
    """Everything the fake holds; every method runs under ``self.cond``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.index = 10  # a fresh Consul's raft index is well past 0 too
        self.kv: dict[str, dict[str, Any]] = {}
        self.tombstones: dict[str, int] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.deadlines: dict[str, float] = {}  # session id -> monotonic invalidation time
        self.lock_delays: dict[str, float] = {}  # key -> monotonic time it may be acquired again
        self.table_index = 0  # the KV table's index (writes and tombstones)

    # -- reading --

    def prefix_index(self, prefix: str) -> int:
        highest = max((e["ModifyIndex"] for k, e in self.kv.items() if k.startswith(prefix)), default=0)
        grave = max((i for k, i in self.tombstones.items() if k.startswith(prefix)), default=0)
        return max(highest, grave) or self.table_index or 1

    @staticmethod
    def render(entry: dict[str, Any], with_value: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in entry.items() if k != "Value"}
        value = entry["Value"]
        out["Value"] = base64.b64encode(value).decode() if with_value and value is not None else None
        if not out.get("Session"):
            out.pop("Session", None)
        return out

    # -- writing (the caller bumps self.index once per request or transaction) --

    def _write(self, key: str, value: bytes, flags: int, session: str | None) -> dict[str, Any]:
        old = self.kv.get(key)
        entry = {
            "Key": key,
            "Value": value,
            "Flags": flags,
            "CreateIndex": old["CreateIndex"] if old else self.index,
            "ModifyIndex": self.index,
            "LockIndex": old["LockIndex"] if old else 0,
            "Session": old.get("Session", "") if old else "",
        }
        if session is not None:
            entry["Session"] = session
        self.kv[key] = entry
        self.tombstones.pop(key, None)
        self.table_index = self.index
        return entry

    def _delete(self, key: str) -> None:
        if self.kv.pop(key, None) is not None:
            self.tombstones[key] = self.index
            self.table_index = self.index

    def check_session(self, session: str) -> None:
        if session not in self.sessions:
            raise ApiError(500, f'invalid session "{session}"')

    def acquire(self, key: str, value: bytes, flags: int, session: str) -> bool:
        self.check_session(session)
        old = self.kv.get(key)
        if old is not None and old.get("Session"):
            if old["Session"] != session:
                return False
            self._write(key, value, flags, None)  # the holder updates its value, LockIndex unchanged
            return True
        if self.lock_delays.get(key, 0.0) > time.monotonic():
            return False
        entry = self._write(key, value, flags, session)
        entry["LockIndex"] += 1
        return True

    def release(self, key: str, value: bytes, flags: int, session: str) -> bool:
        self.check_session(session)
        old = self.kv.get(key)
        if old is None or old.get("Session") != session:
            return False
        self._write(key, value, flags, "")
        return True

    def invalidate(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        self.deadlines.pop(session_id, None)
        if session is None:
            return
        self.index += 1
        until = time.monotonic() + session["LockDelay"] / 1e9
        for key, entry in list(self.kv.items()):
            if entry.get("Session") != session_id:
                continue
            if session["LockDelay"]:
                self.lock_delays[key] = until
            if session["Behavior"] == "delete":
                self._delete(key)
            else:
                self._write(key, entry["Value"], entry["Flags"], "")
        self.cond.notify_all()

    def expire_sessions(self) -> None:
        now = time.monotonic()
        for session_id, deadline in list(self.deadlines.items()):
            if deadline <= now:
                self.invalidate(session_id)

    # -- transactions --

    def txn(self, ops: list[Any]) -> list[dict[str, Any]]:
        """Apply *ops* atomically (the caller restores a copy on ``TxnFailed``)."""
        results: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            kv = op.get("KV") if isinstance(op, dict) else None
            if not isinstance(kv, dict):
                raise TxnFailed(i, "only KV operations are supported by this fake")
            verb, key = kv.get("Verb", ""), kv.get("Key", "")
            value = base64.b64decode(kv.get("Value") or "")
            flags, index, session = int(kv.get("Flags") or 0), int(kv.get("Index") or 0), kv.get("Session") or ""
            if len(value) > MAX_VALUE:
                raise TxnFailed(i, f"value for key {key!r} exceeds {MAX_VALUE} bytes")
            entry = self.kv.get(key)
            result: dict[str, Any] | None = None
            if verb == "set":
                result = self._write(key, value, flags, None)
            elif verb == "cas":
                if (index == 0 and entry is not None) or (
                    index != 0 and (entry is None or entry["ModifyIndex"] != index)
                ):
                    raise TxnFailed(i, f'failed to set key "{key}", index is stale')
                result = self._write(key, value, flags, None)
            elif verb in ("lock", "unlock"):
                if session not in self.sessions:
                    raise TxnFailed(i, f'invalid session "{session}"')
                free = entry is None or not entry.get("Session")
                if verb == "lock" and free and self.lock_delays.get(key, 0.0) > time.monotonic():
                    raise TxnFailed(i, f'failed to lock key "{key}" due to lock delay')
                if verb == "lock" and not self.acquire(key, value, flags, session):
                    raise TxnFailed(i, f'failed to lock key "{key}", lock is held by another session')
                if verb == "unlock" and not self.release(key, value, flags, session):
                    raise TxnFailed(i, f'failed to unlock key "{key}", lock not held')
                result = self.kv[key]
            elif verb in ("get", "check-index", "check-session"):
                if entry is None:
                    raise TxnFailed(i, f'key "{key}" does not exist')
                if verb == "check-index" and entry["ModifyIndex"] != index:
                    raise TxnFailed(i, f"current modify index {entry['ModifyIndex']} != {index}")
                if verb == "check-session" and entry.get("Session") != session:
                    raise TxnFailed(i, f'lock not held by session "{session}"')
                results.append({"KV": self.render(entry, with_value=verb == "get")})
                continue
            elif verb == "get-tree":
                results.extend({"KV": self.render(e)} for k, e in sorted(self.kv.items()) if k.startswith(key))
                continue
            elif verb == "check-not-exists":
                if entry is not None:
                    raise TxnFailed(i, f'key "{key}" exists')
            elif verb == "delete":
                self._delete(key)
            elif verb == "delete-tree":
                for k in [k for k in self.kv if k.startswith(key)]:
                    self._delete(k)
            elif verb == "delete-cas":
                if entry is None or entry["ModifyIndex"] != index:
                    raise TxnFailed(i, f'failed to delete key "{key}", index is stale')
                self._delete(key)
            else:
                raise TxnFailed(i, f"unknown KV verb {verb!r}")
            if result is not None:
                results.append({"KV": self.render(result, with_value=False)})
        return results

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(
            {"index": self.index, "kv": self.kv, "tombstones": self.tombstones, "table_index": self.table_index}
        )

    def restore(self, snap: dict[str, Any]) -> None:
        self.index = snap["index"]
        self.kv = snap["kv"]
        self.tombstones = snap["tombstones"]
        self.table_index = snap["table_index"]
        self.cond.notify_all()


def _session_view(session: dict[str, Any]) -> dict[str, Any]:
    return dict(session)


class Handler(BaseHTTPRequestHandler):
    server: FakeConsulHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as Consul's agent serves it
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    @property
    def state(self) -> ConsulState:
        return self.server.state

    def _send(self, status: int, body: Any, index: int | None = None, raw: bool = False) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode() if not raw else body
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = unquote(parts.path)
        try:
            token = self.server.token
            if token and path.startswith("/v1/") and path != "/v1/status/leader":
                if self.headers.get("X-Consul-Token") != token:
                    raise ApiError(403, "Permission denied")
            with self.state.cond:
                self.state.expire_sessions()
            if path.startswith("/v1/kv/"):
                self._kv(method, path[len("/v1/kv/") :], params)
            elif path == "/v1/txn" and method == "PUT":
                self._txn()
            elif path.startswith("/v1/session/"):
                self._session(method, path[len("/v1/session/") :])
            elif path == "/v1/status/leader":
                self._send(200, '"127.0.0.1:8300"')
            elif path.startswith("/_fake/"):
                self._fake(method, path[len("/_fake/") :])
            else:
                self._send(404, f"no handler for {method} {path} in this fake\n")
        except ApiError as exc:
            self._send(exc.status, exc.text)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- /v1/kv --

    def _kv(self, method: str, key: str, params: dict[str, str]) -> None:
        state = self.state
        if method == "GET":
            self._kv_get(key, params)
            return
        if method == "PUT":
            if "cas" in params and ("acquire" in params or "release" in params):
                raise ApiError(400, "Conflicting flags: " + "&".join(f"{k}={v}" for k, v in params.items()))
            value = self._body()
            if len(value) > MAX_VALUE:
                raise ApiError(413, f"Request body(value) too large, max size: {MAX_VALUE} bytes.")
            flags = int(params.get("flags") or 0)
            with state.cond:
                state.index += 1
                if "acquire" in params:
                    done = state.acquire(key, value, flags, params["acquire"])
                elif "release" in params:
                    done = state.release(key, value, flags, params["release"])
                elif "cas" in params:
                    cas, entry = int(params["cas"]), state.kv.get(key)
                    done = (entry is None) if cas == 0 else (entry is not None and entry["ModifyIndex"] == cas)
                    if done:
                        state._write(key, value, flags, None)
                else:
                    state._write(key, value, flags, None)
                    done = True
                state.cond.notify_all()
            self._send(200, json.dumps(done))
            return
        if method == "DELETE":
            with state.cond:
                state.index += 1
                if "recurse" in params:
                    for k in [k for k in state.kv if k.startswith(key)]:
                        state._delete(k)
                    done = True
                elif "cas" in params:
                    entry = state.kv.get(key)
                    done = entry is not None and entry["ModifyIndex"] == int(params["cas"])
                    if done:
                        state._delete(key)
                else:
                    state._delete(key)
                    done = True
                state.cond.notify_all()
            self._send(200, json.dumps(done))
            return
        raise ApiError(405, f"method {method} not allowed")

    def _kv_get(self, key: str, params: dict[str, str]) -> None:
        state = self.state
        recurse = "recurse" in params or "keys" in params

        def result() -> tuple[int, list[dict[str, Any]]]:
            if recurse:
                found = [e for k, e in sorted(state.kv.items()) if k.startswith(key)]
                return state.prefix_index(key), found
            entry = state.kv.get(key)
            return state.table_index or 1, [entry] if entry else []

        with state.cond:
            index, found = result()
            min_index = int(params.get("index") or 0)
            if min_index > 0:
                wait = min(parse_duration(params["wait"]) if "wait" in params else DEFAULT_WAIT, MAX_WAIT)
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
                while index <= min_index:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    state.cond.wait(min(remaining, 0.25))
                    state.expire_sessions()
                    index, found = result()
            if not found:
                self._send(404, "", index)
            elif "keys" in params:
                self._send(200, [e["Key"] for e in found], index)
            else:
                self._send(200, [state.render(e) for e in found], index)

    # -- /v1/txn --

    def _txn(self) -> None:
        try:
            ops = json.loads(self._body() or b"null")
        except ValueError as exc:
            raise ApiError(400, f"Failed to parse body: {exc}") from exc
        if not isinstance(ops, list):
            raise ApiError(400, "Failed to parse body: not a list of operations")
        if len(ops) > MAX_TXN_OPS:
            raise ApiError(413, f"Transaction contains too many operations ({len(ops)} > {MAX_TXN_OPS})")
        state = self.state
        with state.cond:
            saved = state.snapshot()
            state.index += 1
            try:
                results = state.txn(ops)
            except TxnFailed as exc:
                state.restore(saved)
                self._send(409, {"Results": None, "Errors": [{"OpIndex": exc.op_index, "What": exc.what}]}, state.index)
                return
            state.cond.notify_all()
            self._send(200, {"Results": results, "Errors": None}, state.index)

    # -- /v1/session --

    def _session(self, method: str, rest: str) -> None:
        state = self.state
        verb, _, session_id = rest.partition("/")
        with state.cond:
            if verb == "create" and method == "PUT":
                self._send(200, {"ID": self._create_session()}, state.index)
            elif verb == "destroy" and method == "PUT":
                state.invalidate(session_id)
                self._send(200, "true")
            elif verb == "renew" and method == "PUT":
                session = state.sessions.get(session_id)
                if session is None:
                    raise ApiError(404, f"Session id '{session_id}' not found")
                ttl = parse_duration(session["TTL"])
                if ttl:
                    state.deadlines[session_id] = time.monotonic() + TTL_MULTIPLIER * ttl
                self._send(200, [_session_view(session)], state.index)
            elif verb == "info" and method == "GET":
                session = state.sessions.get(session_id)
                self._send(200, [_session_view(session)] if session else [], state.index)
            elif verb == "list" and method == "GET":
                self._send(200, [_session_view(s) for s in state.sessions.values()], state.index)
            else:
                raise ApiError(404, f"no handler for {method} /v1/session/{rest} in this fake")

    def _create_session(self) -> str:
        state = self.state
        try:
            spec = json.loads(self._body() or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"Request decode failed: {exc}") from exc
        if not isinstance(spec, dict):
            raise ApiError(400, "Request decode failed: not an object")
        ttl_text = str(spec.get("TTL") or "")
        ttl = parse_duration(ttl_text) if ttl_text else 0.0
        if ttl_text and not MIN_TTL <= ttl <= MAX_TTL:
            raise ApiError(400, f"Invalid Session TTL '{ttl_text}', must be between [10s=24h0m0s]")
        behavior = spec.get("Behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ApiError(400, f"Invalid Behavior setting '{behavior}'")
        delay = spec.get("LockDelay", "15s")
        delay_s = float(delay) / 1e9 if isinstance(delay, int | float) else parse_duration(str(delay))
        delay_s = min(delay_s, MAX_LOCK_DELAY)
        state.index += 1
        session_id = str(uuid.uuid4())
        state.sessions[session_id] = {
            "ID": session_id,
            "Name": str(spec.get("Name") or ""),
            "Node": str(spec.get("Node") or "fake-consul"),
            "LockDelay": int(delay_s * 1e9),
            "Behavior": behavior,
            "TTL": _go_duration(ttl) if ttl else "",
            "NodeChecks": spec.get("NodeChecks", ["serfHealth"]),
            "ServiceChecks": spec.get("ServiceChecks"),
            "CreateIndex": state.index,
            "ModifyIndex": state.index,
        }
        if ttl:
            state.deadlines[session_id] = time.monotonic() + TTL_MULTIPLIER * ttl
        return session_id

    # -- fake-only --

    def _fake(self, method: str, what: str) -> None:
        state = self.state
        with state.cond:
            if what == "reap-tombstones" and method == "PUT":
                state.tombstones.clear()
                state.table_index = max((e["ModifyIndex"] for e in state.kv.values()), default=0)
                state.cond.notify_all()
                self._send(200, "true")
            elif what == "snapshot" and method == "GET":
                snap = state.snapshot()
                snap["kv"] = {k: state.render(e) for k, e in snap["kv"].items()}
                self._send(200, snap)
            elif what == "restore" and method == "PUT":
                snap = json.loads(self._body())
                for entry in snap["kv"].values():
                    entry["Value"] = base64.b64decode(entry["Value"] or "")
                    entry.setdefault("Session", "")
                state.restore(snap)
                self._send(200, "true")
            else:
                raise ApiError(404, f"no fake endpoint {method} /_fake/{what}")


class FakeConsulHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], verbose: bool = False, token: str = "") -> None:
        super().__init__(address, Handler)
        self.state = ConsulState()
        self.verbose = verbose
        self.token = token  # when set, every /v1/ request must carry it (a stand-in for ACLs)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="fake-consul-sessions", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while not self._stop.wait(0.1):
            with self.state.cond:
                self.state.expire_sessions()

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()


class FakeConsul:
    """The fake in a thread of this process: ``with FakeConsul() as consul: consul.address``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "") -> None:
        self.httpd = FakeConsulHTTPServer((host, port), token=token)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-consul", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def state(self) -> ConsulState:
        return self.httpd.state

    def start(self) -> FakeConsul:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeConsul:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sessions(self) -> list[dict[str, Any]]:
        with self.state.cond:
            return [dict(s) for s in self.state.sessions.values()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Consul (KV, txn, sessions) for tests; not Consul.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--token", default="", help="require this X-Consul-Token")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    httpd = FakeConsulHTTPServer((args.host, args.port), verbose=args.verbose, token=args.token)
    print(f"fake consul listening on {args.host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
