"""A fake Kubernetes API server for ``/api/v1/nodes``: enough of the protocol to test a node watcher.

This is a **fake**, written from the API conventions (kubernetes.io "API concepts": resource
versions, watches, bookmarks, 410 Gone, patch types), not a Kubernetes.  No API server can be
installed where the tests run, and the mock servers that exist answer lists without a real
``resourceVersion``, ignore it on watches, never send 410 and merge every PATCH as a plain dict
(so a status patch wipes the other conditions) — exactly the behaviours a node watcher must get
right.  So this one enforces, for Nodes only:

* one cluster-wide ``resourceVersion`` counter; every change that alters an object bumps it
  (a patch that changes nothing does not); the list carries it in ``metadata.resourceVersion``;
* ``GET /api/v1/nodes?watch=1&resourceVersion=R``: a chunked stream of ``{"type", "object"}``
  lines, one per line — the changes after ``R`` from a bounded history window, then live ones
  until ``timeoutSeconds``; without ``R`` (or ``R`` = "0") synthetic ``ADDED`` events for every
  Node first; ``allowWatchBookmarks`` adds a ``BOOKMARK`` with the current version before the
  stream ends; a ``R`` older than the window gets one ``ERROR`` event holding a ``Status`` with
  code 410 (reason ``Expired``) and the stream ends;
* ``POST`` (409 when the name exists), ``GET`` and ``DELETE`` (404 when missing) of one Node;
* ``PATCH`` of ``nodes/<name>`` and ``nodes/<name>/status`` with
  ``application/merge-patch+json`` (RFC 7386: ``null`` deletes, a list is replaced whole — so
  a merge patch of ``status.conditions`` replaces all conditions),
  ``application/strategic-merge-patch+json`` (``status.conditions`` and ``status.addresses``
  merged by ``type``, ``spec.podCIDRs`` merged as a set, other lists replaced) and
  ``application/json-patch+json`` (RFC 6902, JSON pointers with ``~0``/``~1``); anything else is
  415; a patch of the Node keeps its old ``status``, a patch of ``/status`` keeps its old
  ``metadata`` and ``spec``; a ``metadata.resourceVersion`` in a patch that is not the current
  one is a 409 Conflict;
* validation as the real server does it: annotation and label values must be strings (400);
  condition times must be RFC 3339 with a zone (400); ``spec.podCIDR`` / ``spec.podCIDRs`` may
  only go from unset to set, never change or go away (422, "a changed CIDR means the Node was
  deleted and re-created"); ``podCIDRs[0]`` must equal ``podCIDR``; ``metadata.name``, ``uid``
  and ``creationTimestamp`` are immutable (422);
* times it writes (``creationTimestamp``) are RFC 3339 in UTC with ``Z``.

Authentication is not checked.  Runnable standalone, so it can run inside a network namespace
the way etcd does in the end-to-end tests::

    python -m overlayd._lab.kube_apiserver --host 192.0.2.254 --port 6443 [--history 1000]
    python -m overlayd._lab.kube_apiserver request --server http://H:P METHOD PATH [BODY [CONTENT-TYPE]]
    python -m overlayd._lab.kube_apiserver request --server http://H:P POST /fake/compact

``POST /fake/compact`` forgets the watch history (the next watch from an old version gets 410),
like an etcd compaction.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: Watch events kept for resuming; older versions get 410 Gone.
DEFAULT_HISTORY = 1000
#: A request body larger than this is refused (413).
MAX_BODY = 1024 * 1024

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_NODE_PATH = re.compile(r"^/api/v1/nodes/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)(/status)?$")


class ApiError(Exception):
    """An API error answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- patches ---------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


#: Lists merged by a key in a strategic merge patch (the Node's ``patchMergeKey`` tags).
_MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}
#: Lists of scalars merged as sets (``patchStrategy:"merge"``).
_SET_LISTS = {("spec", "podCIDRs")}


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """A strategic merge patch for the Node's few keyed lists; other lists are replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        where = (*path, key)
        if key.startswith("$"):
            continue  # directives ($patch, $retainKeys...) are not needed by the node watcher
        if value is None:
            out.pop(key, None)
        elif where in _MERGE_KEYS and isinstance(value, list):
            out[key] = _merge_keyed(out.get(key) or [], value, _MERGE_KEYS[where])
        elif where in _SET_LISTS and isinstance(value, list):
            merged = list(out.get(key) or [])
            merged += [item for item in value if item not in merged]
            out[key] = merged
        else:
            out[key] = strategic_merge_patch(out.get(key), value, where)
    return out


def _merge_keyed(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ApiError(400, "BadRequest", f"a list item merged by {key!r} lacks {key!r}: {item!r}")
        at = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append(copy.deepcopy(item))
        else:
            out[at] = strategic_merge_patch(out[at], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer {path!r} does not start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist")
    return doc


def _put(doc: Any, parts: list[str], value: Any, *, replace: bool) -> None:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise ApiError(422, "Invalid", f"JSON patch replace of a missing member {last!r}")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise ApiError(422, "Invalid", f"JSON patch index {last!r} is out of range")
    else:
        raise ApiError(422, "Invalid", "JSON patch path goes through a scalar")


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise ApiError(422, "Invalid", f"JSON patch remove of a missing member {last!r}")


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            raise ApiError(400, "BadRequest", f"bad JSON patch operation {op!r}")
        kind, parts = op.get("op"), _pointer(op["path"])
        if not parts:
            raise ApiError(422, "Invalid", "JSON patch of the whole document is not supported")
        if kind == "add":
            _put(doc, parts, copy.deepcopy(op.get("value")), replace=False)
        elif kind == "replace":
            _put(doc, parts, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "remove":
            _remove(doc, parts)
        elif kind in ("move", "copy"):
            source = _pointer(str(op.get("from", "")))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_walk(doc, source))
            _put(doc, parts, value, replace=False)
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise ApiError(422, "Invalid", f"JSON patch test of {op['path']} failed")
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    return doc


# -- the state -------------------------------------------------------------------------------------


def _validate(node: Any, old: dict[str, Any] | None) -> None:
    if not isinstance(node, dict) or not isinstance(node.get("metadata"), dict):
        raise ApiError(400, "BadRequest", "a Node is an object with metadata")
    meta = node["metadata"]
    for field in ("annotations", "labels"):
        values = meta.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise ApiError(400, "BadRequest", f"metadata.{field}: values must be strings")
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise ApiError(400, "BadRequest", "spec and status are objects")
    cidrs = spec.get("podCIDRs") or []
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        raise ApiError(400, "BadRequest", "spec.podCIDRs is a list of strings")
    if cidrs and spec.get("podCIDR") and cidrs[0] != spec["podCIDR"]:
        raise ApiError(422, "Invalid", "spec.podCIDRs[0] must match spec.podCIDR")
    conditions = status.get("conditions") or []
    if not isinstance(conditions, list):
        raise ApiError(400, "BadRequest", "status.conditions is a list")
    for cond in conditions:
        if not isinstance(cond, dict) or not isinstance(cond.get("type"), str):
            raise ApiError(400, "BadRequest", f"a condition needs a type: {cond!r}")
        for field in ("lastTransitionTime", "lastHeartbeatTime"):
            value = cond.get(field)
            if value is not None and (not isinstance(value, str) or not _RFC3339.match(value)):
                raise ApiError(400, "BadRequest", f"condition {cond['type']}.{field} {value!r} is not RFC 3339 time")
    if old is None:
        return
    for field in ("name", "uid", "creationTimestamp"):
        if meta.get(field) != old["metadata"].get(field):
            raise ApiError(422, "Invalid", f"metadata.{field}: field is immutable")
    old_spec = old.get("spec") or {}
    if old_spec.get("podCIDR") and spec.get("podCIDR") != old_spec["podCIDR"]:
        raise ApiError(
            422, "Invalid", 'spec.podCIDR: Forbidden: node updates may not change podCIDR except from "" to valid'
        )
    old_cidrs = old_spec.get("podCIDRs") or []
    if old_cidrs and cidrs != old_cidrs:
        raise ApiError(
            422, "Invalid", 'spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid'
        )


class NodeState:
    """The Nodes, the version counter and the watch history; every method is thread-safe."""

    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.version = 1
        self.history: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=max(1, history))
        self.oldest = 1  # a watch from a version below this has lost history
        self.cond = threading.Condition()

    def _record(self, kind: str, node: dict[str, Any]) -> None:
        if len(self.history) == self.history.maxlen:
            self.oldest = self.history[0][0] + 1
        self.history.append((self.version, kind, copy.deepcopy(node)))
        self.cond.notify_all()

    def _bump(self, node: dict[str, Any]) -> None:
        self.version += 1
        node["metadata"]["resourceVersion"] = str(self.version)

    def list_nodes(self) -> dict[str, Any]:
        with self.cond:
            items = [copy.deepcopy(self.nodes[name]) for name in sorted(self.nodes)]
            return {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }

    def get(self, name: str) -> dict[str, Any]:
        with self.cond:
            if name not in self.nodes:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            return copy.deepcopy(self.nodes[name])

    def create(self, body: Any) -> dict[str, Any]:
        _validate(body, None)
        node = copy.deepcopy(body)
        name = node["metadata"].get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self.cond:
            if name in self.nodes:
                raise ApiError(409, "AlreadyExists", f'nodes "{name}" already exists')
            node["kind"], node["apiVersion"] = "Node", "v1"
            node["metadata"]["uid"] = str(uuid.uuid4())
            node["metadata"]["creationTimestamp"] = now_rfc3339()
            node.setdefault("spec", {})
            node.setdefault("status", {})
            self._bump(node)
            self.nodes[name] = node
            self._record("ADDED", node)
            return copy.deepcopy(node)

    def delete(self, name: str) -> dict[str, Any]:
        with self.cond:
            node = self.nodes.pop(name, None)
            if node is None:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            self._bump(node)
            self._record("DELETED", node)
            return copy.deepcopy(node)

    def patch(self, name: str, content_type: str, body: Any, *, status: bool) -> dict[str, Any]:
        with self.cond:
            if name not in self.nodes:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            old = self.nodes[name]
            if content_type == "application/merge-patch+json":
                new = merge_patch(old, body)
            elif content_type == "application/strategic-merge-patch+json":
                new = strategic_merge_patch(old, body)
            elif content_type == "application/json-patch+json":
                new = json_patch(old, body)
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}"
                )
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise ApiError(422, "Invalid", "the patched object is not a Node")
            wanted = new["metadata"].get("resourceVersion")
            if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object has been modified'
                )
            if status:  # the status subresource changes the status only
                new = {**copy.deepcopy(old), "status": new.get("status") or {}}
            else:  # the main resource never changes the status
                new["status"] = copy.deepcopy(old.get("status") or {})
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            _validate(new, old)
            if new == old:
                return copy.deepcopy(old)
            self._bump(new)
            self.nodes[name] = new
            self._record("MODIFIED", new)
            return copy.deepcopy(new)

    def compact(self) -> None:
        with self.cond:
            self.history.clear()
            self.oldest = self.version + 1

    def events_after(self, version: int) -> list[tuple[int, str, dict[str, Any]]] | None:
        """The recorded events after *version*, or None when that history is gone (caller holds cond)."""
        if version + 1 < self.oldest:
            return None
        return [event for event in self.history if event[0] > version]


# -- HTTP ------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer.HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"fake-apiserver: {format % args}\n")

    def _send(self, code: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, "RequestEntityTooLarge", "request body too large")
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the request body is not JSON: {exc}") from exc

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        state = self.server.state
        try:
            if parts.path == "/fake/compact" and method == "POST":
                state.compact()
                return self._send(200, {"compacted": True})
            if parts.path == "/api/v1/nodes":
                if method == "GET" and query.get("watch") in ("1", "true"):
                    return self._watch(query)
                if method == "GET":
                    return self._send(200, state.list_nodes())
                if method == "POST":
                    return self._send(201, state.create(self._body()))
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on nodes")
            match = _NODE_PATH.match(parts.path)
            if match is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {parts.path}")
            name, status = match.group(1), bool(match.group(3))
            if method == "GET":
                return self._send(200, state.get(name))
            if method == "DELETE" and not status:
                return self._send(200, state.delete(name))
            if method == "PATCH":
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                return self._send(200, state.patch(name, content_type, self._body(), status=status))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        except ApiError as exc:
            self._send(exc.code, exc.status())

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _chunk(self, doc: Any) -> None:
        data = json.dumps(doc).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, query: dict[str, str]) -> None:
        state = self.server.state
        raw = query.get("resourceVersion", "")
        if raw not in ("", "0") and not raw.isdigit():
            raise ApiError(400, "BadRequest", f"resourceVersion {raw!r} is not valid")
        try:
            timeout = min(float(query.get("timeoutSeconds") or 1800), 1800.0)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", "timeoutSeconds is not a number") from exc
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = threading.Event()

        def expire() -> None:
            deadline.set()
            _notify(state)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            with state.cond:
                if raw in ("", "0"):
                    initial = [copy.deepcopy(state.nodes[n]) for n in sorted(state.nodes)]
                    since = state.version
                else:
                    initial, since = [], int(raw)
            for node in initial:
                self._chunk({"type": "ADDED", "object": node})
            while not self.server.stopping.is_set():
                with state.cond:
                    events = state.events_after(since)
                    while events == [] and not deadline.is_set() and not self.server.stopping.is_set():
                        state.cond.wait(1.0)
                        events = state.events_after(since)
                    current = state.version
                if events is None:
                    gone = ApiError(410, "Expired", f"too old resource version: {since} ({state.oldest - 1})")
                    self._chunk({"type": "ERROR", "object": gone.status()})
                    break
                for version, kind, node in events:
                    self._chunk({"type": kind, "object": node})
                    since = version
                if deadline.is_set() and not events:
                    if bookmarks:
                        mark = {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": str(current)}}
                        self._chunk({"type": "BOOKMARK", "object": mark})
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            timer.cancel()
        self.close_connection = True


def _notify(state: NodeState) -> None:
    with state.cond:
        state.cond.notify_all()


class FakeApiServer:
    """The fake on a background thread: ``FakeApiServer().start()`` then ``.url``; ``.state``
    is the ``NodeState`` (what a test or "the controller manager" changes directly)."""

    class HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        state: NodeState
        stopping: threading.Event
        verbose: bool

    def __init__(self, host: str = "127.0.0.1", port: int = 0, history: int = DEFAULT_HISTORY) -> None:
        self.state = NodeState(history)
        self.httpd = self.HTTPServer((host, port), _Handler)
        self.httpd.state = self.state
        self.httpd.stopping = threading.Event()
        self.httpd.verbose = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.stopping.set()
        _notify(self.state)
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def kubeconfig(self) -> str:
        """A kubeconfig (JSON, which is YAML) pointing at this server."""
        return kubeconfig_for(self.url)


def kubeconfig_for(url: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
    )


def request(server: str, method: str, path: str, body: str | None = None, content_type: str = "") -> tuple[int, str]:
    """One HTTP request to a (fake) API server: (status, body text)."""
    data = body.encode() if body is not None else None
    headers = {"Content-Type": content_type or "application/json"} if data is not None else {}
    req = urllib.request.Request(server.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["request"]:
        parser = argparse.ArgumentParser(prog="kube_apiserver request")
        parser.add_argument("--server", required=True)
        parser.add_argument("method")
        parser.add_argument("path")
        parser.add_argument("body", nargs="?")
        parser.add_argument("content_type", nargs="?", default="")
        ns = parser.parse_args(args[1:])
        code, text = request(ns.server, ns.method, ns.path, ns.body, ns.content_type)
        print(text)
        return 0 if code < 400 else 1
    parser = argparse.ArgumentParser(prog="kube_apiserver", description="A fake Kubernetes API server (Nodes only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--history", type=int, default=DEFAULT_HISTORY, help="watch events kept for resuming")
    parser.add_argument("--verbose", action="store_true")
    ns = parser.parse_args(args)
    server = FakeApiServer(ns.host, ns.port, ns.history)
    server.httpd.verbose = ns.verbose
    print(f"fake apiserver listening on {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
