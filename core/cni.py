"""``overlayd-cni``: the CNI plugin that hands a container its slice of this host's lease.

Design note.  Like flannel's CNI plugin, this plugin makes no interface itself: it reads the
subnet file the daemon writes once it holds a lease (``/run/flannel/subnet.env``), turns it into
a configuration for the standard ``bridge`` plugin with ``host-local`` IPAM (the host subnet as
the range, a route to the whole network, the overlay MTU, ``isGateway``, ``ipMasq`` only when the
daemon does not masquerade itself), and runs that plugin.  The generated configuration is saved
per ``(container id, interface)`` in ``dataDir`` *before* the delegate runs, so a ``DEL`` replays
exactly what ``ADD`` used even after the lease or the config changed, and a half-done ``ADD`` is
undone by the runtime's ``DEL``.  ``DEL`` is idempotent: no saved state (a second ``DEL``, or
state lost in a reboot) still releases what ``host-local`` may hold and then succeeds.

The most common flannel support thread is "open /run/flannel/subnet.env: no such file": the
runtime calls the plugin before the daemon has a lease.  Here ``ADD`` waits a few seconds
(``subnetFileWait``) for the file and then fails with CNI error 11 (try again later) and a
message that names the daemon and ``overlayd status``.

Protocol: CNI 1.0.0 and 1.1.0 (``STATUS``, ``GC``), and 0.3.0/0.3.1/0.4.0 for older runtimes.
Delegates are asked for their ``VERSION`` and called with the requested version when they speak
it, else with the closest one they do; results are converted between the 0.x shape (``ips`` carry
``version``) and the 1.x shape.  Errors are the spec's JSON on stdout with a non-zero exit; logs
go to stderr.  See https://github.com/containernetworking/cni/blob/main/SPEC.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from .errors import OverlaydError, UserError
from .subnetfile import SubnetFile, load_subnet_file

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/overlayd"
DEFAULT_SUBNET_FILE_WAIT = 5.0
MAX_SUBNET_FILE_WAIT = 600.0
#: A network config with a prevResult is a few kilobytes; a megabyte is no config of ours.
MAX_STDIN = 1 << 20

# The spec's well-known error codes (0-99) and ours (100+).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
DELEGATE_FAILED = 100
LEASE_CHANGED = 101

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")
#: Fields a 1.1 result may carry that older result types do not have.
_V11_INTERFACE_KEYS = ("mtu", "socketPath", "pciID")
_V11_ROUTE_KEYS = ("mtu", "advmss", "priority", "table", "scope")


class CniError(OverlaydError):
    """An error reported to the runtime as the spec's error JSON: a code, a short message, details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg if not details else f"{msg}: {details}")
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


# -- versions and results (pure) -----------------------------------------------------------------


def parse_version(raw: object) -> tuple[int, int, int]:
    """``"1.0.0"`` -> ``(1, 0, 0)``; ``CniError`` 1 for anything else."""
    parts = raw.split(".") if isinstance(raw, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version", f"{raw!r} is not a version like 1.0.0")
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_supported(version: object) -> str:
    """*version* when this plugin speaks it; ``CniError`` 1 naming the supported ones otherwise."""
    parse_version(version)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"overlayd-cni does not speak cniVersion {version}; it supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    assert isinstance(version, str)
    return version


def negotiate(requested: str, supported: Sequence[str]) -> str:
    """The version to call a delegate with: *requested* when it speaks it, else the closest
    version with a result type we convert (0.3.0 and later), preferring an older one."""
    want = parse_version(requested)
    usable: list[tuple[tuple[int, int, int], str]] = []
    for version in supported:
        with contextlib.suppress(CniError):
            parsed = parse_version(version)
            if parsed >= (0, 3, 0) and version in SUPPORTED_VERSIONS:
                usable.append((parsed, version))
    if requested in {v for _, v in usable}:
        return requested
    older = sorted(v for v in usable if v[0] < want)
    newer = sorted(v for v in usable if v[0] > want)
    if older:
        return older[-1][1]
    if newer:
        return newer[0][1]
    raise CniError(
        INCOMPATIBLE_VERSION,
        "incompatible CNI version",
        f"the delegate plugin supports {', '.join(supported) or 'no version'}; overlayd-cni needs one of "
        f"{', '.join(SUPPORTED_VERSIONS)}",
    )


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """A 0.3.0+ result re-expressed for *to_version* (0.3.0 to 1.1.0).

    0.x results name each IP's family (``"version": "4"``), 1.x results do not; fields that only
    1.1 defines (an interface's ``mtu``, a route's ``table``, ...) are dropped for older versions.
    """
    source = parse_version(result.get("cniVersion", "0.0.0"))
    if source < (0, 3, 0):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version", f"cannot convert a {source} result")
    target = parse_version(to_version)
    out: dict[str, Any] = {"cniVersion": to_version}
    if "interfaces" in result:
        interfaces = [dict(item) for item in result["interfaces"] or []]
        if target < (1, 1, 0):
            for item in interfaces:
                for key in _V11_INTERFACE_KEYS:
                    item.pop(key, None)
        out["interfaces"] = interfaces
    ips = []
    for item in result.get("ips") or []:
        ip = dict(item)
        if target < (1, 0, 0):
            try:
                family = ipaddress.ip_interface(str(ip["address"])).version
            except (KeyError, ValueError) as exc:
                raise CniError(DECODE_FAILURE, "failed to decode a result", f"bad IP entry {item!r}") from exc
            ip["version"] = str(family)
        else:
            ip.pop("version", None)
        ips.append(ip)
    if ips or "ips" in result:
        out["ips"] = ips
    if "routes" in result:
        routes = [dict(item) for item in result["routes"] or []]
        if target < (1, 1, 0):
            for route in routes:
                for key in _V11_ROUTE_KEYS:
                    route.pop(key, None)
        out["routes"] = routes
    if "dns" in result:
        out["dns"] = dict(result["dns"] or {})
    return out


# -- configuration and environment (pure) --------------------------------------------------------


@attrs.frozen
class PluginConfig:
    """The network configuration the runtime passes on stdin (the keys overlayd-cni reads)."""

    cni_version: str
    name: str
    subnet_file: str = DEFAULT_SUBNET_FILE
    data_dir: str = DEFAULT_DATA_DIR
    subnet_file_wait: float = DEFAULT_SUBNET_FILE_WAIT
    delegate: Mapping[str, Any] = attrs.field(factory=dict)
    ipam: Mapping[str, Any] = attrs.field(factory=dict)  # flannel's top-level "ipam": the delegate's IPAM base
    prev_result: Mapping[str, Any] | None = None
    passthrough: Mapping[str, Any] = attrs.field(factory=dict)  # args, runtimeConfig, dns
    raw: Mapping[str, Any] = attrs.field(factory=dict)


def parse_config(data: bytes, *, command: str = "ADD") -> PluginConfig:
    """The runtime's network configuration; ``CniError`` 6 (not JSON), 1 (version) or 7 (bad key)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(DECODE_FAILURE, "failed to decode the network configuration", str(exc)) from exc
    if not isinstance(doc, dict):
        raise CniError(DECODE_FAILURE, "failed to decode the network configuration", "it is not a JSON object")
    version = check_supported(doc.get("cniVersion", "0.1.0"))

    def bad(key: str, why: str) -> CniError:
        return CniError(INVALID_CONFIG, "invalid network config", f"{key}: {why}")

    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad("name", "required; letters, digits, '_', '.' and '-', starting with a letter or digit")
    paths = {}
    for key, default in (("subnetFile", DEFAULT_SUBNET_FILE), ("dataDir", DEFAULT_DATA_DIR)):
        value = doc.get(key, default)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise bad(key, f"must be a file path such as {default}")
        paths[key] = value
    wait = doc.get("subnetFileWait", DEFAULT_SUBNET_FILE_WAIT)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_SUBNET_FILE_WAIT:
        raise bad("subnetFileWait", f"must be a number of seconds between 0 and {MAX_SUBNET_FILE_WAIT:.0f}")
    delegate = doc.get("delegate", {})
    if not isinstance(delegate, dict):
        raise bad("delegate", "must be an object, merged into the generated bridge configuration")
    kind = delegate.get("type", "bridge")
    if not isinstance(kind, str) or not _NAME.match(kind):
        raise bad("delegate.type", "must be a plugin name such as bridge")
    ipam = doc.get("ipam", {})
    if not isinstance(ipam, dict):
        raise bad("ipam", 'must be an object, the base of the delegate\'s IPAM (e.g. {"routes": [{"dst": "::/0"}]})')
    user_routes = ipam.get("routes", [])
    if not isinstance(user_routes, list) or not all(
        isinstance(r, dict) and _is_cidr(r.get("dst")) for r in user_routes
    ):
        raise bad("ipam.routes", 'must be a list of routes like {"dst": "0.0.0.0/0"}')
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise bad("prevResult", "must be an object")
    if command in ("STATUS", "GC") and parse_version(version) < (1, 1, 0):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version", f"{command} needs cniVersion 1.1.0")
    if command == "CHECK" and parse_version(version) < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version", "CHECK needs cniVersion 0.4.0 or later")
    return PluginConfig(
        cni_version=version,
        name=name,
        subnet_file=paths["subnetFile"],
        data_dir=paths["dataDir"],
        subnet_file_wait=float(wait),
        delegate=delegate,
        ipam=ipam,
        prev_result=prev,
        passthrough={k: doc[k] for k in ("args", "runtimeConfig", "dns") if k in doc},
        raw=doc,
    )


def _is_cidr(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


@attrs.frozen
class Invocation:
    """The ``CNI_*`` environment variables of one call."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: tuple[str, ...] = ()


_NEEDS = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
    "VERSION": (),
}


def parse_environment(env: Mapping[str, str]) -> Invocation:
    """The call's parameters; ``CniError`` 4 naming the variable that is missing or malformed."""
    command = env.get("CNI_COMMAND", "")
    if command not in _NEEDS:
        raise CniError(
            INVALID_ENVIRONMENT,
            "invalid environment variables",
            f"CNI_COMMAND={command!r} is not one of {', '.join(_NEEDS)}",
        )
    for key in _NEEDS[command]:
        if not env.get(key):
            raise CniError(INVALID_ENVIRONMENT, "invalid environment variables", f"{key} is required for {command}")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _NAME.match(container_id):
        raise CniError(
            INVALID_ENVIRONMENT,
            "invalid environment variables",
            f"CNI_CONTAINERID={container_id!r}: letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or _IFNAME_BAD.search(ifname)):
        raise CniError(
            INVALID_ENVIRONMENT,
            "invalid environment variables",
            f"CNI_IFNAME={ifname!r} is not an interface name (1-15 characters, no '/', ':' or space)",
        )
    return Invocation(
        command=command,
        container_id=container_id,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        path=tuple(p for p in env.get("CNI_PATH", "").split(os.pathsep) if p),
    )


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """*base* with *override* on top; objects present in both are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def delegate_config(conf: PluginConfig, subnet: SubnetFile, cni_version: str) -> dict[str, Any]:
    """The configuration of the delegate plugin for this host's lease (flannel's generated one).

    ``bridge`` + ``host-local``: one range per family the subnet file has (IPv4 first, then the
    ``FLANNEL_IPV6_SUBNET``; IPv6-only gives the one IPv6 range), a route per family to the whole
    network, the MTU of the overlay, the bridge as the pods' gateway, and masquerading by the
    bridge plugin only when the daemon does not masquerade (``FLANNEL_IPMASQ``).  As in flannel,
    a top-level ``ipam`` is the base of the IPAM section: its keys are kept (``type`` defaults to
    ``host-local``), its ``routes`` come before the generated ones, and ``ranges`` are always the
    lease's.  ``delegate`` is merged on top; ``name`` and ``cniVersion`` are always the runtime's.
    """
    ranges: list[list[dict[str, str]]] = []
    routes: list[dict[str, str]] = []
    # The route names its gateway (host-local's default one, the subnet's first address): the
    # bridge plugin's CHECK compares the result's routes with the kernel's literally, and a route
    # without "gw" never matches the "via" route it installs (plugins 1.1.1).
    for pool, whole in ((subnet.subnet, subnet.network), (subnet.ipv6_subnet, subnet.ipv6_network)):
        if pool is not None and whole is not None:
            ranges.append([{"subnet": str(pool)}])
            routes.append({"dst": str(whole), "gw": str(pool.network_address + 1)})
    ipam = {"type": "host-local", **conf.ipam}
    ipam.update(ranges=ranges, routes=[*conf.ipam.get("routes", []), *routes])
    base: dict[str, Any] = {"type": "bridge", "mtu": subnet.mtu, "ipMasq": not subnet.ip_masq, "ipam": ipam}
    if conf.delegate.get("type", "bridge") == "bridge":
        base.update({"bridge": "cni0", "isGateway": True})
    out = merge(merge(base, conf.passthrough), conf.delegate)
    out.update({"cniVersion": cni_version, "name": conf.name})
    return out


def lease_mismatch(saved: Mapping[str, Any], subnet: SubnetFile) -> str | None:
    """Why a saved delegate config no longer matches the host's lease, or None when it does.

    Per family: every range the container was added in must still be this host's subnet of that
    family (a dual-stack host whose IPv6 subnet moved while its IPv4 one stayed is a mismatch)."""
    ranges = saved.get("ipam", {}).get("ranges", []) if isinstance(saved.get("ipam"), Mapping) else []
    had = {str(r.get("subnet")) for group in ranges if isinstance(group, list) for r in group if isinstance(r, Mapping)}
    now = {str(s) for s in (subnet.subnet, subnet.ipv6_subnet) if s is not None}
    if had - now:
        return f"the container was added in {', '.join(sorted(had))}, this host now holds {', '.join(sorted(now))}"
    return None


# -- state and delegates (IO) --------------------------------------------------------------------


@attrs.frozen
class StateDir:
    """Saved delegate configs, one file per ``(container id, interface)`` under ``dataDir``.

    The file name is ``<container id>@<interface>``: container ids cannot hold ``@``, so the
    name is unambiguous; the document repeats both, and the network name, for ``GC``.
    """

    path: str

    def file(self, container_id: str, ifname: str) -> str:
        return os.path.join(self.path, f"{container_id}@{ifname}")

    def save(self, network: str, container_id: str, ifname: str, delegate: Mapping[str, Any]) -> None:
        doc = {"network": network, "containerID": container_id, "ifname": ifname, "delegate": delegate}
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(doc, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.file(container_id, ifname))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise CniError(IO_FAILURE, "cannot save the container's state", f"dataDir {self.path}: {exc}") from exc

    def load(self, container_id: str, ifname: str) -> dict[str, Any] | None:
        """The saved document, or None when there is none (never added, deleted, or lost)."""
        path = self.file(container_id, ifname)
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_STDIN + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CniError(IO_FAILURE, "cannot read the container's state", f"{path}: {exc}") from exc
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("delegate"), dict):
            log.warning("%s is not a saved delegate config; ignoring it", path)
            return None
        return doc

    def remove(self, container_id: str, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(container_id, ifname))

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every saved document (for ``GC``)."""
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return
        for name in names:
            cid, sep, ifname = name.partition("@")
            if sep and not name.startswith("."):
                doc = self.load(cid, ifname)
                if doc is not None:
                    yield doc


Runner = Callable[[Sequence[str], bytes, Mapping[str, str]], "subprocess.CompletedProcess[bytes]"]


def _run(argv: Sequence[str], stdin: bytes, env: Mapping[str, str]) -> subprocess.CompletedProcess[bytes]:
    # The delegate's stderr (its log) goes to ours, which the runtime records.
    return subprocess.run(list(argv), input=stdin, stdout=subprocess.PIPE, env=dict(env), check=False)


def find_plugin(kind: str, path: Sequence[str]) -> str:
    """The executable for plugin *kind* on ``CNI_PATH``; ``CniError`` 4 when it is not there."""
    for directory in path:
        candidate = os.path.join(directory, kind)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        INVALID_ENVIRONMENT,
        f"the {kind} plugin is not on CNI_PATH",
        f"looked in {os.pathsep.join(path) or '(empty CNI_PATH)'}; install the standard CNI plugins "
        "(Debian: containernetworking-plugins, in /usr/lib/cni) and list their directory in CNI_PATH",
    )


@attrs.frozen
class Delegate:
    """One delegate plugin executable, called with the runtime's environment."""

    executable: str
    env: Mapping[str, str]
    runner: Runner = _run

    @property
    def kind(self) -> str:
        return os.path.basename(self.executable)

    def call(self, command: str, conf: Mapping[str, Any], **overrides: str | None) -> dict[str, Any] | None:
        env = dict(self.env, CNI_COMMAND=command)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        try:
            proc = self.runner([self.executable], json.dumps(conf).encode(), env)
        except OSError as exc:
            raise CniError(DELEGATE_FAILED, f"cannot run the {self.kind} plugin", str(exc)) from exc
        out = proc.stdout.decode("utf-8", errors="replace").strip()
        try:
            doc = json.loads(out) if out else None
        except ValueError:
            doc = None
        if proc.returncode != 0:
            if isinstance(doc, dict) and isinstance(doc.get("code"), int):
                raise CniError(doc["code"], f"{self.kind}: {doc.get('msg', '')}", str(doc.get("details") or ""))
            raise CniError(DELEGATE_FAILED, f"the {self.kind} plugin failed (exit {proc.returncode})", out[:500])
        if command in ("ADD", "VERSION"):
            if not isinstance(doc, dict):
                raise CniError(DELEGATE_FAILED, f"the {self.kind} plugin printed no result", out[:500])
            return doc
        return None

    def versions(self) -> list[str]:
        doc = self.call("VERSION", {"cniVersion": "1.0.0"}) or {}
        supported = doc.get("supportedVersions")
        return [str(v) for v in supported] if isinstance(supported, list) else []


# -- the commands --------------------------------------------------------------------------------


def no_lease_error(path: str, waited: float, code: int = TRY_AGAIN_LATER) -> CniError:
    """flannel's "subnet.env: no such file", said so that an operator knows what to do."""
    return CniError(
        code,
        f"overlayd has no lease yet: {path} does not exist; is the overlayd daemon running on this node? "
        "Check it with 'overlayd status'",
        f"waited {waited:g} s for {path}, which the overlayd daemon writes once it holds a subnet lease "
        "and has set up this host. Check the daemon with 'overlayd --healthz-port PORT status' and its log "
        "(Kubernetes: the overlayd pod on this node); if it runs with --subnet-file elsewhere, set subnetFile "
        "in the CNI config to the same path",
    )


def read_subnet(conf: PluginConfig, wait: float, *, code: int = TRY_AGAIN_LATER) -> SubnetFile:
    """The subnet file, waiting up to *wait* seconds for it to appear."""
    deadline = time.monotonic() + wait
    while True:
        try:
            subnet = load_subnet_file(conf.subnet_file)
        except UserError as exc:
            raise CniError(code, "overlayd's subnet file is unusable", str(exc)) from exc
        if subnet is not None:
            return subnet
        if time.monotonic() >= deadline:
            raise no_lease_error(conf.subnet_file, wait, code)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


@attrs.frozen
class Plugin:
    """One call: its environment, its config, and how to reach the delegates."""

    inv: Invocation
    conf: PluginConfig
    env: Mapping[str, str]
    runner: Runner = _run

    @property
    def state(self) -> StateDir:
        return StateDir(self.conf.data_dir)

    def delegate(self, kind: str) -> Delegate:
        return Delegate(find_plugin(kind, self.inv.path), self.env, self.runner)

    def add(self) -> dict[str, Any]:
        subnet = read_subnet(self.conf, self.conf.subnet_file_wait)
        kind = str(self.conf.delegate.get("type", "bridge"))
        plugin = self.delegate(kind)
        version = negotiate(self.conf.cni_version, plugin.versions())
        conf = delegate_config(self.conf, subnet, version)
        self.state.save(self.conf.name, self.inv.container_id, self.inv.ifname, conf)
        result = plugin.call("ADD", conf)
        assert result is not None
        return convert_result(result, self.conf.cni_version)

    def _with_prev(self, conf: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(conf)
        if self.conf.prev_result is not None:
            prev = dict(self.conf.prev_result)
            prev.setdefault("cniVersion", self.conf.cni_version)
            out["prevResult"] = convert_result(prev, str(conf["cniVersion"]))
        return out

    def delete(self) -> None:
        saved = self.state.load(self.inv.container_id, self.inv.ifname)
        if saved is not None:
            conf = saved["delegate"]
            self.delegate(str(conf.get("type", "bridge"))).call("DEL", self._with_prev(conf))
            self.state.remove(self.inv.container_id, self.inv.ifname)
            return
        # Nothing saved: a second DEL, an ADD that failed early, or state lost in a reboot.  Release
        # what host-local may still hold for this container (best effort), then succeed.
        try:
            subnet = load_subnet_file(self.conf.subnet_file)
            if subnet is None:
                log.info("DEL %s/%s: no saved state and no subnet file; nothing to do", *self._key())
                return
            kind = str(self.conf.delegate.get("type", "bridge"))
            plugin = self.delegate(kind)
            conf = delegate_config(self.conf, subnet, negotiate(self.conf.cni_version, plugin.versions()))
            plugin.call("DEL", self._with_prev(conf))
        except (CniError, UserError) as exc:
            log.warning("DEL %s/%s without saved state: cleanup failed, ignoring: %s", *self._key(), exc)

    def _key(self) -> tuple[str, str]:
        return self.inv.container_id, self.inv.ifname

    def check(self) -> None:
        if self.conf.prev_result is None:
            raise CniError(INVALID_CONFIG, "invalid network config", "CHECK needs prevResult (the ADD result)")
        saved = self.state.load(self.inv.container_id, self.inv.ifname)
        if saved is None:
            raise CniError(
                UNKNOWN_CONTAINER,
                "container unknown",
                f"no saved state for {self.inv.container_id}/{self.inv.ifname} in {self.conf.data_dir}",
            )
        subnet = read_subnet(self.conf, self.conf.subnet_file_wait)
        conf = saved["delegate"]
        why = lease_mismatch(conf, subnet)
        if why is not None:
            raise CniError(LEASE_CHANGED, "this host's overlayd lease changed since the container was added", why)
        self.delegate(str(conf.get("type", "bridge"))).call("CHECK", self._with_prev(conf))

    def status(self) -> None:
        read_subnet(self.conf, 0.0, code=NOT_AVAILABLE)

    def gc(self) -> None:
        valid_raw = self.conf.raw.get("cni.dev/valid-attachments", [])
        if not isinstance(valid_raw, list):
            raise CniError(INVALID_CONFIG, "invalid network config", "cni.dev/valid-attachments must be a list")
        valid = {
            (str(item.get("containerID")), str(item.get("ifname"))) for item in valid_raw if isinstance(item, dict)
        }
        failed = []
        for doc in self.state.entries():
            key = (str(doc.get("containerID")), str(doc.get("ifname")))
            if doc.get("network") != self.conf.name or key in valid:
                continue
            conf = doc["delegate"]
            try:
                self.delegate(str(conf.get("type", "bridge"))).call(
                    "DEL", conf, CNI_CONTAINERID=key[0], CNI_IFNAME=key[1], CNI_NETNS=None
                )
            except CniError as exc:
                failed.append(f"{key[0]}/{key[1]}: {exc}")
                continue
            self.state.remove(*key)
            log.info("GC: released %s/%s", *key)
        if failed:
            raise CniError(DELEGATE_FAILED, "GC could not release every stale attachment", "; ".join(failed))


def version_info(requested: str | None) -> dict[str, Any]:
    version = requested if requested in SUPPORTED_VERSIONS else LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def execute(env: Mapping[str, str], stdin: bytes, runner: Runner = _run) -> dict[str, Any] | None:
    """Run one CNI call; the document to print on success (None: print nothing), ``CniError`` otherwise."""
    inv = parse_environment(env)
    if inv.command == "VERSION":
        requested = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            doc = json.loads(stdin) if stdin.strip() else {}
            requested = doc.get("cniVersion") if isinstance(doc, dict) else None
        return version_info(requested)
    conf = parse_config(stdin, command=inv.command)
    plugin = Plugin(inv, conf, env, runner)
    if inv.command == "ADD":
        return plugin.add()
    if inv.command == "DEL":
        plugin.delete()
    elif inv.command == "CHECK":
        plugin.check()
    elif inv.command == "STATUS":
        plugin.status()
    elif inv.command == "GC":
        plugin.gc()
    return None


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise CniError(DECODE_FAILURE, "failed to decode the network configuration", f"longer than {MAX_STDIN} bytes")
    return data


def _error_version(stdin: bytes) -> str:
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        version = json.loads(stdin).get("cniVersion")
        if version in SUPPORTED_VERSIONS:
            return str(version)
    return LATEST


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the CNI protocol on stdin/stdout, logs on stderr."""
    del argv  # CNI passes everything in the environment and on stdin
    logging.basicConfig(level=logging.INFO, format="overlayd-cni: %(levelname)s %(message)s", stream=sys.stderr)
    if not os.environ.get("CNI_COMMAND"):
        print(
            f"overlayd-cni: the overlayd CNI plugin; CNI versions {', '.join(SUPPORTED_VERSIONS)}; "
            "run by a container runtime with CNI_COMMAND set (see docs/cni.md)",
            file=sys.stderr,
        )
        sys.exit(0)
    stdin = b""
    try:
        if os.environ["CNI_COMMAND"] != "VERSION" or not sys.stdin.isatty():
            stdin = _read_stdin()
        result = execute(os.environ, stdin)
    except CniError as exc:
        print(json.dumps(exc.to_json(_error_version(stdin))))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    if result is not None:
        print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
