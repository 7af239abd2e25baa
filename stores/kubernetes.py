"""Kubernetes store: flannel's kube subnet manager (``--kube-subnet-manager``) semantics.

On a Kubernetes cluster the subnets are not ours to hand out: the controller manager
(``--allocate-node-cidrs``) writes each Node's ``spec.podCIDRs`` (``spec.podCIDR`` on old
clusters), and every host publishes what its peers need as Node annotations.  So this store
overrides the lease level of ``Store`` instead of implementing the key-value primitives:

* **our lease** is our Node's pod CIDR (one per family).  A Node without one is waited for with
  flannel's most asked-about line, "pod CIDR not assigned to node X yet; is the controller
  manager running with --allocate-node-cidrs?", as a transient error the daemon retries with
  backoff, and a ``UserError`` once ``--kubernetes-pod-cidr-timeout`` has passed.  A CIDR outside
  the network config is a ``ConfigError``: the cluster and the net-conf disagree.
* **publishing**: ``<prefix>/backend-type``, ``backend-data``, ``backend-v6-data``,
  ``public-ip``, ``public-ipv6`` and ``kube-subnet-manager=true`` in flannel's exact format (a
  Node annotated by flannel is a valid peer, and the other way round), by a strategic merge
  patch of the annotations only, retried.  ``<prefix>/public-ip-overwrite`` (and, failing that,
  ``<prefix>/node-public-ip``) on our Node replaces the address we publish, as flannel does.
* **ready**: ``mark_ready`` (called by the daemon once the subnet file is written) sets the
  Node's ``NetworkUnavailable`` condition to False with reason ``FlannelIsUp``, by a strategic
  merge patch of ``nodes/<name>/status`` — merged by condition ``type``, so the kubelet's other
  conditions stay.  A failure is retried on the next listing.
* **peers** are the Nodes with ``kube-subnet-manager=true`` and a pod CIDR.  A lease's
  ``revision`` is a checksum of what it publishes, not the Node's ``resourceVersion``: the
  kubelet rewrites its Node every few seconds, and a heartbeat is not a lease change.  Leases
  never expire (``expiration`` None); renew and release are no-ops; reservations do not exist
  here (the controller manager assigns every CIDR) and ``reserve``/``unreserve``/``release``
  say so.
* **watching**: list, then watch from the list's ``resourceVersion`` (bookmarks accepted), one
  short HTTP stream per ``wait_for_events`` call, as the etcd store does.  resourceVersions are
  opaque strings compared only for equality: the core's integer revisions are tokens this store
  maps to them, and an unknown token or a 410 Gone raises ``HistoryGone``, which re-lists (the
  core's diff turns the re-list into events).  A Node deleted and re-created with another CIDR
  is a REMOVED of the old subnet and an ADDED of the new one.
* The network config is the net-conf file (``/etc/kube-flannel/net-conf.json``, the
  ``kube-flannel-cfg`` ConfigMap mounted in flannel's manifests); ``network init`` writes it
  when it is writable and otherwise says where the config lives.
* Every payload from the API server is decoded bounded (``overlayd.sdk.load_json``): a list, a
  watch event and an annotation each have a size limit, and garbled annotations skip the Node
  with a warning, like a garbled lease.
* The official ``kubernetes`` client provides configuration (kubeconfig, in-cluster service
  account, TLS, tokens) and its HTTP layer; the requests are built here so that the bodies stay
  raw JSON until the bounded decoder has seen them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from overlayd.sdk import (
    ConfigError,
    DecodeError,
    EntryList,
    EventKind,
    GarbledLease,
    HistoryGone,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseList,
    LeaseLost,
    NetworkConfig,
    PermanentError,
    Store,
    StoreCorrupted,
    StoreUnavailable,
    UserError,
    WatchResult,
    load_json,
    option,
    parse_lease,
    seconds,
    subnet_to_key,
    to_bool,
)

log = logging.getLogger(__name__)

#: Deadline of every ordinary request.
REQUEST_TIMEOUT = 10.0
#: Limits of what is read from the API server (a Node is a few KB; a watch event is one Node).
MAX_LIST_BYTES = 256 * 1024 * 1024
MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_ANNOTATION_BYTES = 64 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
#: Managed fields nest deeper than leases do.
MAX_DEPTH = 64
#: Patch attempts (conflicts, unreachable server) and the first pause between them.
PATCH_ATTEMPTS = 5
PATCH_PAUSE = 0.2
#: How long one ``acquire_lease`` call polls our Node for a pod CIDR before it reports the wait.
ACQUIRE_POLL = 5.0
#: resourceVersion tokens remembered (an older token re-lists).
TOKENS = 4096

NOT_ASSIGNED = "pod CIDR not assigned to node {node} yet; is the controller manager running with --allocate-node-cidrs?"


@attrs.frozen
class KubernetesOptions:
    kubeconfig: str = option("", "kubeconfig file; empty: the in-cluster service account, else ~/.kube/config")
    node_name: str = option("", "this host's Node name; empty: the NODE_NAME environment variable")
    net_conf: str = option("/etc/kube-flannel/net-conf.json", "the network config file (flannel's net-conf.json)")
    annotation_prefix: str = option("flannel.alpha.coreos.com", "prefix of the Node annotations")
    set_node_network_unavailable: bool = option(
        True, "set the Node's NetworkUnavailable condition to False once ready", converter=to_bool
    )
    pod_cidr_timeout: timedelta = option(
        timedelta(minutes=10), "seconds to wait for the controller manager to assign a pod CIDR", converter=seconds
    )


def _rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checksum(text: str) -> int:
    return zlib.crc32(text.encode()) or 1


@attrs.frozen
class _Node:
    """What this store reads from one Node object."""

    name: str
    resource_version: str
    created: int  # creationTimestamp as Unix seconds (0 when unknown): older Nodes win claims
    annotations: Mapping[str, str]
    cidrs: tuple[IPv4Network | IPv6Network, ...]

    @property
    def v4(self) -> IPv4Network | None:
        return next((c for c in self.cidrs if isinstance(c, IPv4Network)), None)

    @property
    def v6(self) -> IPv6Network | None:
        return next((c for c in self.cidrs if isinstance(c, IPv6Network)), None)


def parse_node(obj: Any) -> _Node:
    """A ``_Node`` from a decoded Node object; ``GarbledLease`` when it is unusable."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise GarbledLease("not a Node object")
    meta = obj["metadata"]
    name = meta.get("name")
    if not isinstance(name, str) or not name or len(name) > 253:
        raise GarbledLease(f"Node name {name!r:.80} is not usable")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise GarbledLease(f"Node {name}: annotations are not strings")
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise GarbledLease(f"Node {name}: spec is not an object")
    raw = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not isinstance(raw, list):
        raise GarbledLease(f"Node {name}: spec.podCIDRs is not a list")
    cidrs = []
    for text in raw[:2]:
        try:
            cidrs.append(ip_network(str(text), strict=True))
        except ValueError as exc:
            raise GarbledLease(f"Node {name}: pod CIDR {text!r:.60} is not a subnet") from exc
    created = 0
    stamp = meta.get("creationTimestamp")
    if isinstance(stamp, str):
        try:
            created = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
    return _Node(name, str(meta.get("resourceVersion") or ""), created, dict(annotations), tuple(cidrs))


def _ip_or_none(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


def lease_from_node(node: _Node, prefix: str) -> Lease | None:
    """The lease a Node publishes, or None when it is not a peer (no pod CIDR, or not managed by
    flannel or overlayd).  ``GarbledLease`` for annotations that cannot be used."""
    notes = node.annotations
    if notes.get(f"{prefix}/kube-subnet-manager") != "true" or not node.cidrs:
        return None
    data: dict[str, Any] = {
        "PublicIP": _ip_or_none(notes.get(f"{prefix}/public-ip-overwrite") or notes.get(f"{prefix}/public-ip")),
        "PublicIPv6": _ip_or_none(notes.get(f"{prefix}/public-ipv6")),
        "BackendType": notes.get(f"{prefix}/backend-type", ""),
    }
    for field, note in (("BackendData", "backend-data"), ("BackendV6Data", "backend-v6-data")):
        raw = notes.get(f"{prefix}/{note}")
        if raw:
            try:
                data[field] = load_json(raw, what=f"annotation {note}", max_bytes=MAX_ANNOTATION_BYTES)
            except DecodeError as exc:
                raise GarbledLease(f"Node {node.name}: {exc}") from exc
    value = json.dumps(data)
    v4, v6 = node.v4, node.v6
    first: IPv4Network | IPv6Network = v4 if v4 is not None else node.cidrs[0]
    lease = parse_lease(
        subnet_to_key(first),
        value,
        expiration=None,
        revision=_checksum(f"{subnet_to_key(first)} {v6} {value}"),
        created_revision=node.created,
        ipv6=v4 is None,
    )
    if v4 is not None and v6 is not None:
        lease = attrs.evolve(lease, ipv6_subnet=v6)
    return lease


def annotations_for(attrs_: LeaseAttrs, prefix: str) -> dict[str, str]:
    """The annotations flannel writes for *attrs_* (values are strings, JSON compact as Go's)."""

    def compact(value: Any) -> str:
        return json.dumps(value if value else None, separators=(",", ":"))

    notes = {
        f"{prefix}/backend-data": compact(dict(attrs_.backend_data)),
        f"{prefix}/backend-type": attrs_.backend_type,
        f"{prefix}/kube-subnet-manager": "true",
    }
    if attrs_.public_ip is not None:
        notes[f"{prefix}/public-ip"] = str(attrs_.public_ip)
    if attrs_.public_ipv6 is not None:
        notes[f"{prefix}/public-ipv6"] = str(attrs_.public_ipv6)
        notes[f"{prefix}/backend-v6-data"] = compact(dict(attrs_.backend_v6_data or {}))
    return notes


class _Response:
    """A status and the undecoded body (or the open stream) of one API request."""

    def __init__(self, status: int, raw: Any) -> None:
        self.status, self.raw = status, raw

    def body(self, limit: int) -> Any:
        data = b""
        try:
            data = self.raw.read(limit + 1)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"kubernetes API: reading the answer failed: {exc}") from exc
        finally:
            if len(data) > limit or not data:
                self.raw.close()  # not read to the end: never reuse the connection
            self.raw.release_conn()
        try:
            return load_json(data, what="kubernetes API answer", max_bytes=limit, max_depth=MAX_DEPTH)
        except DecodeError as exc:
            raise StoreCorrupted(f"kubernetes API: {exc}") from exc

    def discard(self) -> None:
        """Drop an answer without reading it: the connection is closed, never reused half-read."""
        self.raw.close()
        self.raw.release_conn()

    def message(self) -> str:
        try:
            doc = self.body(MAX_EVENT_BYTES)
        except (StoreUnavailable, StoreCorrupted):
            return f"HTTP {self.status}"
        text = doc.get("message") if isinstance(doc, dict) else None
        return f"HTTP {self.status}: {str(text)[:300]}" if text else f"HTTP {self.status}"


class KubernetesStore(Store):
    """Kubernetes API: pod CIDRs from the Nodes, flannel's Node annotations (--kube-subnet-manager)."""

    Options = KubernetesOptions
    options: KubernetesOptions

    def __init__(self, options: KubernetesOptions) -> None:
        super().__init__(options)
        self._prefix = options.annotation_prefix.strip().rstrip("/")
        if not self._prefix:
            raise UserError("--kubernetes-annotation-prefix is empty; leave it unset for flannel.alpha.coreos.com")
        self._api: kube_client.ApiClient | None = None
        self._lock = threading.Lock()
        self._tokens: OrderedDict[int, str] = OrderedDict()
        self._token_of: dict[str, int] = {}
        self._next_token = 1
        self._known: dict[str, Lease] = {}  # Node name -> its lease, as this store last saw it
        self._waiting_since: float | None = None
        self._ready_pending: Lease | None = None

    def __repr__(self) -> str:
        return f"KubernetesStore(node={self.node_name or '?'}, net_conf={self.options.net_conf})"

    @property
    def node_name(self) -> str:
        return self.options.node_name or os.environ.get("NODE_NAME", "")

    # -- the API client --------------------------------------------------------------------------

    def _client(self) -> kube_client.ApiClient:
        if self._api is not None:
            return self._api
        cfg = kube_client.Configuration()
        path = self.options.kubeconfig
        try:
            if path:
                if not Path(path).is_file():
                    raise UserError(f"kubeconfig {path} does not exist; fix --kubernetes-kubeconfig")
                kube_config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                kube_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                default = Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
                if not default.is_file():
                    raise UserError(
                        "not running in a cluster and there is no kubeconfig at "
                        f"{default}; pass --kubernetes-kubeconfig FILE"
                    )
                kube_config.load_kube_config(config_file=str(default), client_configuration=cfg)  # type: ignore[no-untyped-call]
        except kube_config.ConfigException as exc:
            raise UserError(f"cannot use the kubeconfig: {exc}; fix --kubernetes-kubeconfig") from exc
        cfg.retries = 1
        self._api = kube_client.ApiClient(cfg)
        return self._api

    def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = REQUEST_TIMEOUT,
    ) -> _Response:
        api = self._client()
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            _, url, headers, body, _ = api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            answer = api.rest_client.request(  # type: ignore[no-untyped-call]
                method, url, headers=headers, body=body, _request_timeout=timeout
            )
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"kubernetes API at {api.configuration.host} is unreachable: {exc}") from exc
        except kube_client.ApiException as exc:  # TLS failures come as status 0
            raise StoreUnavailable(f"kubernetes API at {api.configuration.host}: {exc.reason}") from exc
        response = _Response(answer.status, answer.response)
        if response.status in (401, 403):
            raise UserError(
                f"kubernetes API refused {method} {path} ({response.message()}); the service account needs "
                "get/list/watch/patch on nodes and patch on nodes/status (see examples/kubernetes)"
            )
        return response

    def _checked(self, response: _Response, what: str, limit: int = MAX_EVENT_BYTES) -> Any:
        if response.status >= 300:
            raise StoreUnavailable(f"kubernetes API: {what} failed ({response.message()})")
        return response.body(limit)

    def _token(self, resource_version: str) -> int:
        """The integer the core sees for *resource_version* (opaque, compared for equality only)."""
        with self._lock:
            token = self._token_of.get(resource_version)
            if token is None:
                token = self._next_token
                self._next_token += 1
                self._tokens[token] = resource_version
                self._token_of[resource_version] = token
                while len(self._tokens) > TOKENS:
                    _, old = self._tokens.popitem(last=False)
                    self._token_of.pop(old, None)
            return token

    # -- the network config ----------------------------------------------------------------------

    def get_config(self) -> str | None:
        path = Path(self.options.net_conf)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"cannot read the net-conf file {path}: {exc.strerror}; fix --kubernetes-net-conf") from exc
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"net-conf file {path} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"net-conf file {path} is not UTF-8 text") from exc

    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        path = Path(self.options.net_conf)
        if only_if_absent and path.exists():
            return False
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text + ("" if text.endswith("\n") else "\n"))
            tmp.replace(path)
        except OSError as exc:
            raise UserError(
                f"cannot write the net-conf file {path} ({exc.strerror}); on a cluster the network config "
                "lives in the ConfigMap mounted there (kube-flannel-cfg): edit the ConfigMap instead"
            ) from exc
        return True

    # -- key-value primitives: not this store's model --------------------------------------------

    def _no_entries(self) -> PermanentError:
        return PermanentError("the kubernetes store keeps leases in Node objects, not in lease keys")

    def list_entries(self) -> EntryList:
        raise self._no_entries()

    def get_entry(self, key: str) -> Any:
        raise self._no_entries()

    def create_entry(self, key: str, value: str, ttl: timedelta | None) -> Any:
        raise self._no_entries()

    def put_entry(self, current: Any, value: str, ttl: timedelta | None) -> Any:
        raise self._no_entries()

    def delete_entry(self, current: Any) -> bool:
        raise self._no_entries()

    def watch_entries(self, since_revision: int, timeout: float) -> Any:
        raise self._no_entries()

    # -- nodes -----------------------------------------------------------------------------------

    def _node_path(self, name: str, status: bool = False) -> str:
        return f"/api/v1/nodes/{quote(name, safe='')}" + ("/status" if status else "")

    def _get_node(self, name: str) -> _Node | None:
        response = self._request("GET", self._node_path(name))
        if response.status == 404:
            response.discard()
            return None
        try:
            return parse_node(self._checked(response, f"reading Node {name}"))
        except GarbledLease as exc:
            raise StoreCorrupted(f"Node {name} cannot be read: {exc}") from exc

    def _lease_or_report(self, node: _Node) -> Lease | None:
        try:
            return lease_from_node(node, self._prefix)
        except GarbledLease as exc:
            self.report_garbled(f"node/{node.name}", _checksum(node.resource_version), exc)
            return None

    def _patch(self, name: str, body: Any, *, status: bool = False, what: str) -> Any:
        pause = PATCH_PAUSE
        last: Exception | None = None
        for _ in range(PATCH_ATTEMPTS):
            try:
                response = self._request(
                    "PATCH",
                    self._node_path(name, status),
                    body=body,
                    content_type="application/strategic-merge-patch+json",
                )
                if response.status == 404:
                    response.discard()
                    raise LeaseLost(f"Node {name} no longer exists")
                if response.status < 300:
                    return response.body(MAX_EVENT_BYTES)
                last = StoreUnavailable(f"kubernetes API: {what} failed ({response.message()})")
                if response.status not in (409, 429) and response.status < 500:
                    raise last
            except StoreUnavailable as exc:
                last = exc
            time.sleep(pause)
            pause *= 2
        assert last is not None
        raise StoreUnavailable(f"{last} after {PATCH_ATTEMPTS} attempts")

    # -- the lease level -------------------------------------------------------------------------

    def list_leases(self) -> LeaseList:
        """Every Node that publishes a lease (Nodes with garbled annotations skipped, reported once)."""
        doc = self._checked(self._request("GET", "/api/v1/nodes"), "listing Nodes", MAX_LIST_BYTES)
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise StoreCorrupted("kubernetes API: the Node list is not a NodeList")
        version = str((doc.get("metadata") or {}).get("resourceVersion") or "")
        known: dict[str, Lease] = {}
        for item in doc["items"]:
            try:
                node = parse_node(item)
            except GarbledLease as exc:
                meta = item.get("metadata") if isinstance(item, dict) else None
                meta = meta if isinstance(meta, dict) else {}
                name = meta.get("name") if isinstance(meta.get("name"), str) else "?"
                self.report_garbled(f"node/{name}", _checksum(str(meta.get("resourceVersion"))), exc)
                continue
            lease = self._lease_or_report(node)
            if lease is not None:
                known[node.name] = lease
        self._known = known
        self._retry_mark_ready()
        return LeaseList(tuple(known.values()), self._token(version))

    def wait_for_events(self, since_revision: int, timeout: float) -> WatchResult:
        """Watch the Nodes from the resourceVersion behind *since_revision* for up to *timeout* s."""
        with self._lock:
            version = self._tokens.get(since_revision)
        if version is None:
            raise HistoryGone(f"resourceVersion token {since_revision} is not known here")
        wait = max(timeout, 0.05)
        query = [
            ("watch", "1"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(max(1, math.ceil(wait)))),
        ]
        response = self._request("GET", "/api/v1/nodes", query, timeout=(REQUEST_TIMEOUT, wait))
        if response.status == 410:
            response.discard()
            raise HistoryGone(f"resourceVersion {version} is too old")
        if response.status >= 300:
            raise StoreUnavailable(f"kubernetes API: watching Nodes failed ({response.message()})")
        events: list[LeaseEvent] = []
        try:
            for line in self._lines(response.raw):
                version = self._watch_event(line, version, events)
                if events:
                    break
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            pass
        except urllib3.exceptions.HTTPError as exc:
            if not events:
                raise StoreUnavailable(f"kubernetes API: the Node watch broke: {exc}") from exc
        finally:
            response.discard()
        return WatchResult(tuple(events), self._token(version))

    @staticmethod
    def _lines(raw: Any) -> Iterator[bytes]:
        buffer = b""
        for chunk in raw.stream(amt=64 * 1024, decode_content=True):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield line
            if len(buffer) > MAX_EVENT_BYTES:
                raise StoreCorrupted(f"kubernetes API: a watch event is longer than {MAX_EVENT_BYTES} bytes")
        if buffer.strip():
            yield buffer

    def _watch_event(self, line: bytes, version: str, events: list[LeaseEvent]) -> str:
        """Turn one watch line into lease events; returns the resourceVersion to resume from."""
        try:
            doc = load_json(line, what="watch event", max_bytes=MAX_EVENT_BYTES, max_depth=MAX_DEPTH)
        except DecodeError as exc:
            self.report_garbled("watch", _checksum(version), GarbledLease(str(exc)))
            return version
        kind = doc.get("type") if isinstance(doc, dict) else None
        obj = doc.get("object") if isinstance(doc, dict) else None
        if kind == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            if status.get("code") == 410:
                raise HistoryGone(f"resourceVersion {version} is too old ({status.get('message', 'gone')})")
            raise StoreUnavailable(f"kubernetes API: the Node watch failed: {str(obj)[:300]}")
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        new_version = str(meta.get("resourceVersion") or version) if isinstance(meta, dict) else version
        if kind == "BOOKMARK":
            return new_version
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self.report_garbled("watch", _checksum(version), GarbledLease(f"unknown watch event type {kind!r:.40}"))
            return version
        try:
            node = parse_node(obj)
        except GarbledLease as exc:
            self.report_garbled("watch", _checksum(new_version), exc)
            return new_version
        token = self._token(new_version)
        old = self._known.get(node.name)
        new = None if kind == "DELETED" else self._lease_or_report(node)
        if old is not None and (new is None or new.key != old.key):
            events.append(LeaseEvent(EventKind.REMOVED, _subnet(old), old, token))
        if new is not None and new != old:
            events.append(LeaseEvent(EventKind.ADDED, _subnet(new), new, token))
        if new is None:
            self._known.pop(node.name, None)
        else:
            self._known[node.name] = new
        return new_version

    def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        prefer: Sequence[IPv4Network | IPv6Network] = (),
        rng: Any = None,
    ) -> Lease:
        """Our Node's pod CIDR as our lease, with our attributes published on the Node.

        Raises a ``StoreUnavailable`` saying the pod CIDR is not assigned yet (the daemon retries
        it), and a ``UserError`` once that has lasted ``--kubernetes-pod-cidr-timeout``.
        """
        name = self.node_name
        if not name:
            raise UserError(
                "the kubernetes store needs this host's Node name: pass --kubernetes-node-name or set NODE_NAME"
            )
        deadline = time.monotonic() + ACQUIRE_POLL
        while True:
            node = self._get_node(name)
            if node is not None and node.cidrs:
                break
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
            waited = time.monotonic() - self._waiting_since
            limit = self.options.pod_cidr_timeout.total_seconds()
            what = f"node {name} does not exist" if node is None else NOT_ASSIGNED.format(node=name)
            if waited >= limit:
                raise UserError(f"{what}; gave up after {limit:g} s (--kubernetes-pod-cidr-timeout)")
            if time.monotonic() >= deadline:
                raise StoreUnavailable(what)
            time.sleep(0.5)
        self._waiting_since = None
        self._check_in_network(node, config)
        published = self._published_attrs(node, attrs)
        wanted = annotations_for(published, self._prefix)
        if any(node.annotations.get(key) != value for key, value in wanted.items()):
            self._patch(name, {"metadata": {"annotations": wanted}}, what=f"annotating Node {name}")
            log.info("published this host's lease attributes on Node %s", name)
        node = attrs_evolve_annotations(node, wanted)
        lease = lease_from_node(node, self._prefix)
        assert lease is not None
        return lease

    def _check_in_network(self, node: _Node, config: NetworkConfig) -> None:
        v4, v6 = node.v4, node.v6
        if v4 is not None and config.network is not None and not v4.subnet_of(config.network):
            raise ConfigError(
                f"node {node.name} has pod CIDR {v4}, outside the network {config.network} of the net-conf "
                f"{self.options.net_conf}; make the controller manager's --cluster-cidr and Network agree"
            )
        if v6 is not None and config.ipv6_network is not None and not v6.subnet_of(config.ipv6_network):
            raise ConfigError(
                f"node {node.name} has pod CIDR {v6}, outside the IPv6Network {config.ipv6_network} of the net-conf "
                f"{self.options.net_conf}; make the controller manager's --cluster-cidr and IPv6Network agree"
            )
        for version, cidr in ((4, v4), (6, v6)):
            if version in config.families and cidr is None:
                raise ConfigError(
                    f"node {node.name} has no IPv{version} pod CIDR but the net-conf {self.options.net_conf} "
                    f"carries IPv{version}; give the controller manager a --cluster-cidr of both families "
                    "or turn that family off in the net-conf"
                )

    def _published_attrs(self, node: _Node, attrs: LeaseAttrs) -> LeaseAttrs:
        """*attrs* with the public IP the Node's annotations ask for, as flannel honours them."""
        for note in ("public-ip-overwrite", "node-public-ip"):
            text = node.annotations.get(f"{self._prefix}/{note}", "").strip()
            if not text:
                continue
            try:
                address = ip_address(text)
            except ValueError as exc:
                raise ConfigError(f"Node {node.name}: annotation {self._prefix}/{note} {text!r} is not an IP") from exc
            if isinstance(address, IPv4Address):
                log.info("publishing %s as this host's public IP (annotation %s/%s)", address, self._prefix, note)
                return attrs_evolve(attrs, public_ip=address)
        for note in ("public-ipv6-overwrite", "node-public-ipv6"):
            text = node.annotations.get(f"{self._prefix}/{note}", "").strip()
            if text:
                try:
                    v6 = IPv6Address(text)
                except ValueError as exc:
                    raise ConfigError(
                        f"Node {node.name}: annotation {self._prefix}/{note} {text!r} is not IPv6"
                    ) from exc
                return attrs_evolve(attrs, public_ipv6=v6)
        return attrs

    def update_lease(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        """Republish *attrs* on our Node; ``LeaseLost`` when its pod CIDR is no longer *lease*'s."""
        name = self.node_name
        node = self._get_node(name) if name else None
        if node is None or not _holds(node, lease):
            raise LeaseLost(f"lease {lease.key} is no longer the pod CIDR of Node {name or '?'}")
        wanted = annotations_for(self._published_attrs(node, attrs), self._prefix)
        if any(node.annotations.get(key) != value for key, value in wanted.items()):
            self._patch(name, {"metadata": {"annotations": wanted}}, what=f"annotating Node {name}")
        result = lease_from_node(attrs_evolve_annotations(node, wanted), self._prefix)
        assert result is not None
        return result

    def renew_lease(self, lease: Lease) -> Lease:
        """Writes nothing (pod CIDRs do not expire); ``LeaseLost`` when *lease* is no longer our
        Node's pod CIDR."""
        name = self.node_name
        node = self._get_node(name) if name else None
        if node is None or not _holds(node, lease):
            raise LeaseLost(f"lease {lease.key} is no longer the pod CIDR of Node {name or '?'}")
        return lease

    def release_lease(self, lease: Lease) -> None:
        """A no-op: the pod CIDR belongs to the Node until the Node is deleted."""

    def delete_lease(self, lease: Lease) -> None:
        raise UserError(
            f"the kubernetes store cannot release {lease.key}: the controller manager assigned it to a Node; "
            "delete the Node (kubectl delete node NAME) to free it"
        )

    def reserve(self, subnet: IPv4Network | IPv6Network, public_ip: IPv4Address | IPv6Address) -> Lease:
        raise UserError(
            "reservations are not supported by the kubernetes store: the controller manager assigns "
            "every Node's pod CIDR (spec.podCIDR)"
        )

    def unreserve(self, subnet: IPv4Network | IPv6Network) -> None:
        raise UserError(
            "reservations are not supported by the kubernetes store: the controller manager assigns "
            "every Node's pod CIDR (spec.podCIDR)"
        )

    def mark_ready(self, lease: Lease) -> None:
        """Set our Node's NetworkUnavailable condition to False (reason FlannelIsUp), as flannel does.

        A failure is logged and retried on the next listing; it never stops the daemon.
        """
        if not self.options.set_node_network_unavailable or not self.node_name:
            return
        now = _rfc3339_now()
        condition = {
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }
        try:
            self._patch(
                self.node_name, {"status": {"conditions": [condition]}}, status=True, what="setting NetworkUnavailable"
            )
            self._ready_pending = None
            log.info("Node %s: NetworkUnavailable=False (FlannelIsUp)", self.node_name)
        except (StoreUnavailable, LeaseLost, UserError) as exc:
            self._ready_pending = lease
            log.warning("could not set NetworkUnavailable=False on Node %s: %s; will retry", self.node_name, exc)

    def _retry_mark_ready(self) -> None:
        pending = self._ready_pending
        if pending is not None:
            self.mark_ready(pending)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()  # type: ignore[no-untyped-call]
            self._api = None


def _holds(node: _Node, lease: Lease) -> bool:
    """True when every subnet of *lease* (one per family) is still a pod CIDR of *node*."""
    return bool(node.cidrs) and all(lease.subnet_of(v) in (node.v4, node.v6) for v in lease.families)


def _subnet(lease: Lease) -> IPv4Network | IPv6Network:
    subnet = lease.subnet if lease.subnet is not None else lease.ipv6_subnet
    assert subnet is not None
    return subnet


def attrs_evolve(value: LeaseAttrs, **changes: Any) -> LeaseAttrs:
    return attrs.evolve(value, **changes)


def attrs_evolve_annotations(node: _Node, notes: Mapping[str, str]) -> _Node:
    return attrs.evolve(node, annotations={**node.annotations, **notes})
