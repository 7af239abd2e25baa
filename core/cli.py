"""The ``overlayd`` command: the daemon, store administration, plugin listing, the demo.

The CLI owns the process (logging setup, signal handlers, exit codes); everything it does goes
through the public library API.  Every installed plugin's attrs ``Options`` become global flags
``--<plugin>-<option>`` with env vars ``OVERLAYD_<PLUGIN>_<OPTION>``, derived at start-up, so a
third-party plugin gets flags by being installed; ``--help`` shows them in one titled section
per plugin, after the core options.  ``--config FILE`` (TOML) supplies defaults below flags and
env vars: top-level keys are global options, ``[plugin]`` tables plugin options.

Building those flags imports every plugin (and its client library: grpc for etcd), so it is done
only when the command line can use them: ``overlayd status`` or ``overlayd demo`` with no plugin
flag never import a plugin.  Options of every installed backend are collected, because which
backend is in force is often only known once the daemon has read the network config.

Errors: a ``UserError`` (or a click usage error) is one line on stderr and exit code 2; any
other overlayd error is one line and exit code 1; only a bug shows a traceback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
import sys
import threading
import tomllib
import types
import typing
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs
import click
import cloup

from . import check as checks
from . import logformat
from .api import (
    backend_class,
    installed_plugin_names,
    installed_plugins,
    open_store,
    store_class,
    write_network_config,
)
from .config import NetworkConfig
from .daemon import DaemonSettings
from .daemon import run as run_daemon
from .demo import demo_command
from .errors import OverlaydError, UserError
from .model import Lease, LeaseList
from .peers import public_ip_problem
from .plugin import Backend, Plugin, Store
from .subnetfile import docker_env_file, docker_options, load_subnet_file, write_subnet_file

log = logging.getLogger(__name__)

ENV_PREFIX = "OVERLAYD"


# -- plugin options as flags -------------------------------------------------------------------


def _ident(plugin: str) -> str:
    return plugin.replace("-", "_")


def _click_type(field: attrs.Attribute[Any], annotation: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for an option field."""
    base = annotation
    if isinstance(base, types.UnionType) or typing.get_origin(base) is typing.Union:
        args = [a for a in typing.get_args(base) if a is not type(None)]
        base = args[0] if len(args) == 1 else str
    if base is bool:
        return click.BOOL, True
    if base is int:
        return click.INT, False
    if base in (float, timedelta):
        return click.FLOAT, False
    return click.STRING, False


class _PluginOption(click.Option):
    """A plugin option: unset means "the plugin's default", which help shows as a plain value
    (click puts a string ``show_default`` in parentheses, as if it were a description)."""

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str) and extra.get("default") == f"({self.show_default})":
            extra["default"] = self.show_default
        return extra


def plugin_params(cls: type[Plugin], plugin_name: str) -> list[click.Option]:
    """Click options for every field of the plugin's Options class."""
    hints = typing.get_type_hints(cls.Options)
    params: list[click.Option] = []
    for field in attrs.fields(cls.Options):
        flag = f"{plugin_name}-{field.name.replace('_', '-')}"
        kind, is_flag = _click_type(field, hints.get(field.name, str))
        default = field.default if field.default is not attrs.NOTHING else None
        if isinstance(default, timedelta):
            default = default.total_seconds()
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "***" if field.metadata.get("secret") else default
        help_text = str(field.metadata.get("help", ""))
        decls = [f"--{flag}/--no-{flag}"] if is_flag else [f"--{flag}"]
        params.append(
            _PluginOption(
                [*decls, f"{_ident(plugin_name)}_{field.name}"],
                type=kind,
                default=None,
                help=help_text,
                envvar=f"{ENV_PREFIX}_{_ident(plugin_name).upper()}_{field.name.upper()}",
                show_envvar=True,
                show_default=str(shown),
            )
        )
    return params


def plugin_options(params: dict[str, Any], plugin_name: str, cls: type[Plugin]) -> dict[str, Any]:
    """The values given for *plugin_name*'s options (unset ones left to the plugin's defaults)."""
    out = {}
    for field in attrs.fields(cls.Options):
        value = params.get(f"{_ident(plugin_name)}_{field.name}")
        if value is not None:
            out[field.name] = value
    return out


# -- the config file ---------------------------------------------------------------------------


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return value
    try:
        with open(value, "rb") as handle:
            doc = tomllib.load(handle)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}", ctx, param) from exc
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{value} is not UTF-8 text (byte {exc.start}); save it as UTF-8", ctx, param) from exc
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}", ctx, param) from exc
    defaults: dict[str, Any] = {}
    for key, item in doc.items():
        if isinstance(item, dict):
            for option, option_value in item.items():
                defaults[f"{_ident(key)}_{option.replace('-', '_')}"] = option_value
        else:
            defaults[key.replace("-", "_")] = item
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(defaults) - known)
    if isinstance(ctx.command, _Group) and not ctx.command.plugins_loaded:
        # Plugin tables are checked only when the plugins' flags exist (see _Group).
        prefixes = tuple(f"{_ident(name)}_" for name in _plugin_names())
        unknown = [key for key in unknown if not key.startswith(prefixes)]
    if unknown:
        raise click.BadParameter(f"{value}: unknown setting(s) {', '.join(unknown)}", ctx, param)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _cidr(ctx: click.Context, param: click.Parameter, value: str | None) -> IPv4Network | None:
    if value is None:
        return None
    try:
        return IPv4Network(value, strict=False)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an IPv4 CIDR like 10.244.0.0/16", ctx, param) from exc


# -- the group ---------------------------------------------------------------------------------


#: Commands that need no plugin flag: they run without importing any plugin.
LIGHT_COMMANDS = frozenset({"status", "demo", "docker-opts"})

CORE_OPTIONS = cloup.OptionGroup("Core options")


def _plugin_names() -> list[str]:
    return [name for names in installed_plugin_names().values() for name in names]


class _Group(cloup.Group):
    """A group whose global options include every installed plugin's options, one help section
    per plugin, added on first need (see the module note)."""

    plugins_loaded = False

    def load_plugin_params(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        for kind, plugins in installed_plugins().items():
            for name, cls in plugins.items():
                if not isinstance(cls, type):
                    continue
                section = cloup.OptionGroup(f"{kind.capitalize()} {name} options")
                for param in plugin_params(cls, name):
                    param.group = section  # type: ignore[attr-defined]  # how cloup marks a grouped option
                    self.params.append(param)
        self.arguments, self.option_groups, self.ungrouped_options = self._group_params(self.params)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self._needs_plugins(args):
            self.load_plugin_params()
        return super().parse_args(ctx, args)

    def _needs_plugins(self, args: list[str]) -> bool:
        """False only when *args* name a light command and give no option outside the core ones."""
        core: dict[str, click.Option] = {}
        for candidate in self.params:
            if isinstance(candidate, click.Option):
                core.update(dict.fromkeys([*candidate.opts, *candidate.secondary_opts], candidate))
        i = 0
        while i < len(args):
            token = args[i]
            if not token.startswith("-"):
                return token not in LIGHT_COMMANDS
            param = core.get(token.split("=", 1)[0])
            if param is None:
                return True  # a plugin flag, --help, or a typo: let click see every option
            takes_value = not (param.is_flag or param.count)
            i += 2 if takes_value and "=" not in token else 1
        return True  # no command: the daemon


def _global_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--config",
            "config_file",
            callback=_load_config_file,
            is_eager=True,
            expose_value=False,
            help="TOML file with defaults for any option ([plugin] tables for plugin options).",
        ),
        click.option("--store", default="embedded", show_default=True, help="Store plugin name."),
        click.option("--backend", default=None, help="Backend plugin name (default: the stored config's, else vxlan)."),
        click.option("--network", callback=_cidr, help="Network CIDR, used when the store has no config yet."),
        click.option("--subnet-len", type=click.IntRange(1, 30), help="Subnet length, with --network."),
        click.option("--iface", multiple=True, help="Underlay interface name or IP (repeatable; first match)."),
        click.option("--iface-regex", multiple=True, help="Regex matched against interface names and IPs."),
        click.option("--iface-can-reach", help="Use the interface the kernel would use to reach this IP."),
        click.option("--public-ip", help="IP advertised to peers (default: the interface's)."),
        click.option(
            "--public-ipv6", help="IPv6 address advertised to peers with IPv6 on (default: the interface's global one)."
        ),
        click.option(
            "--subnet-file",
            default="/run/flannel/subnet.env",
            show_default=True,
            help="Where to write the subnet file.",
        ),
        click.option("--ip-masq/--no-ip-masq", default=False, help="Masquerade traffic leaving the network."),
        click.option(
            "--firewall",
            type=click.Choice(["nftables", "iptables", "none"]),
            default="nftables",
            show_default=True,
            help="Where the masquerade, forward and overlay-port rules go (nftables falls back to iptables).",
        ),
        click.option(
            "--forward-rules/--no-forward-rules",
            default=True,
            show_default=True,
            help="Accept forwarding from and to the network.",
        ),
        click.option(
            "--restrict-overlay-port/--no-restrict-overlay-port",
            default=None,
            help="Drop overlay UDP from addresses holding no lease (default: on for backends with a port).",
        ),
        click.option("--healthz-ip", default="127.0.0.1", show_default=True, help="Address of the health server."),
        click.option(
            "--healthz-port",
            type=click.IntRange(0, 65535),
            default=0,
            show_default=True,
            help="Port for /healthz and /readyz (0: off).",
        ),
        click.option(
            "--resync-period",
            type=click.FloatRange(0.1),
            default=300.0,
            show_default=True,
            help="Seconds between audits: a full store re-list, kernel read-back and diff (passes in "
            "between cost only what changed; backends without a kernel cache do a full pass at least every 10 s).",
        ),
        click.option(
            "--probe-interval",
            type=click.FloatRange(0),
            default=0.0,
            show_default=True,
            help="Seconds between pings of every peer's overlay address, exported as metrics (0: off).",
        ),
        click.option(
            "--probe-per-peer/--no-probe-per-peer",
            default=False,
            help="With --probe-interval, export overlayd_peer_reachable per peer (one series per peer).",
        ),
        click.option(
            "--release-on-exit/--keep-on-exit",
            default=False,
            help="On SIGTERM, give the lease back and remove kernel state.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
            help="Log verbosity.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="Log lines as text, or as one JSON object per line (time, level, logger, message, fields).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _mark_core(f: Callable[..., Any]) -> Callable[..., Any]:
    for param in getattr(f, "__click_params__", []):
        param.group = CORE_OPTIONS
    return f


@click.group(cls=_Group, invoke_without_command=True, context_settings={"auto_envvar_prefix": ENV_PREFIX})
@_mark_core
@_global_options
@click.pass_context
def cli(ctx: click.Context, /, **params: Any) -> None:
    """overlayd: a container overlay network in the spirit of flannel.

    With no command, runs the daemon (same as 'overlayd run').
    """
    ctx.obj = params
    logformat.configure(str(params["log_level"]), str(params["log_format"]), sys.stderr)
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


def _params() -> dict[str, Any]:
    return dict(click.get_current_context().find_root().obj)


def _store_from_params(params: dict[str, Any]) -> Store:
    name = params["store"]
    cls = store_class(name)
    return open_store(name, **plugin_options(params, name, cls))


@contextlib.contextmanager
def _opened_store() -> Iterator[Store]:
    """The store the global options name, closed afterwards."""
    store = _store_from_params(_params())
    try:
        yield store
    finally:
        store.close()


def settings_from_params(params: dict[str, Any]) -> DaemonSettings:
    store_cls = store_class(params["store"])
    if params["backend"]:
        backend_class(params["backend"])  # an unknown --backend is a user error before anything runs
    # Every installed backend's options: the daemon picks those of the backend in force once it
    # has read the network config, and warns about options given for another one.
    given = {
        name: plugin_options(params, name, cls)
        for name, cls in installed_plugins()["backend"].items()
        if isinstance(cls, type)
    }
    return DaemonSettings(
        store=params["store"],
        store_options=plugin_options(params, params["store"], store_cls),
        backend=params["backend"],
        plugin_options={name: values for name, values in given.items() if values},
        network=params["network"],
        subnet_len=params["subnet_len"],
        ifaces=tuple(params["iface"]),
        iface_regex=tuple(params["iface_regex"]),
        iface_can_reach=params["iface_can_reach"],
        public_ip=params["public_ip"],
        public_ipv6=params["public_ipv6"],
        subnet_file=params["subnet_file"],
        ip_masq=params["ip_masq"],
        firewall=params["firewall"],
        forward_rules=params["forward_rules"],
        restrict_overlay_port=params["restrict_overlay_port"],
        healthz_ip=params["healthz_ip"],
        healthz_port=params["healthz_port"],
        resync_period=params["resync_period"],
        release_on_exit=params["release_on_exit"],
        probe_interval=params["probe_interval"],
        probe_per_peer=params["probe_per_peer"],
    )


@cli.command()
def run() -> None:
    """Run the daemon: lease a subnet and program the kernel until SIGTERM."""
    settings = settings_from_params(_params())
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum: int, frame: types.FrameType | None) -> None:
        # SIGHUP's default action ends the process silently, skipping --release-on-exit.  The
        # daemon has no state to reload that a restart would not give more safely, so it stays up.
        log.warning("received SIGHUP; overlayd does not reload its settings (restart it to change them), continuing")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    run_daemon(settings, stop)


# -- network config ----------------------------------------------------------------------------


@cli.group()
def network() -> None:
    """Write or show the network config in the store."""


@network.command("init")
@click.option("--network", "network_cidr", callback=_cidr, help="Network CIDR, e.g. 10.244.0.0/16.")
@click.option("--subnet-len", "subnet_len_opt", type=click.IntRange(1, 30), help="Per-host subnet length.")
@click.option("--backend", "backend_opt", help="Backend type (default vxlan).")
@click.option("--from-json", "from_json", type=click.File("r"), help="A flannel network config JSON file.")
@click.option("--force", is_flag=True, help="Replace an existing config.")
def network_init(
    network_cidr: IPv4Network | None,
    subnet_len_opt: int | None,
    backend_opt: str | None,
    from_json: Any,
    force: bool,
) -> None:
    """Write the network config (flannel's JSON) into the store."""
    params = _params()
    if from_json is not None:
        config = NetworkConfig.from_json(from_json.read())
    else:
        cidr = network_cidr or params["network"]
        if cidr is None:
            raise UserError("network init needs --network CIDR (e.g. 10.244.0.0/16) or --from-json FILE")
        doc: dict[str, Any] = {"Network": str(cidr), "Backend": {"Type": backend_opt or params["backend"] or "vxlan"}}
        if subnet_len_opt or params["subnet_len"]:
            doc["SubnetLen"] = subnet_len_opt or params["subnet_len"]
        config = NetworkConfig.from_dict(doc)
    backend_class(config.backend_type)  # an unknown backend is a user error now, not at start-up
    with _opened_store() as store:
        write_network_config(store, config, force=force)
    click.echo(config.to_json())


@network.command("show")
def network_show() -> None:
    """Print the network config stored in the store."""
    with _opened_store() as store:
        raw = store.get_config()
    if raw is None:
        raise UserError("the store has no network config; create one with 'overlayd network init --network CIDR'")
    click.echo(NetworkConfig.from_json(raw).to_json())


# -- leases ------------------------------------------------------------------------------------


def lease_row(lease: Lease) -> dict[str, Any]:
    return {
        "subnet": str(lease.subnet) if lease.subnet else None,
        "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
        "public_ip": str(lease.attrs.public_ip) if lease.attrs.public_ip else None,
        "public_ipv6": str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else None,
        "backend_type": lease.attrs.backend_type,
        "backend_data": dict(lease.attrs.backend_data),
        "backend_v6_data": dict(lease.attrs.backend_v6_data) if lease.attrs.backend_v6_data is not None else None,
        "expiration": lease.expiration.isoformat() if lease.expiration else None,
        "reservation": lease.is_reservation,
        "revision": lease.revision,
    }


def _subnets(lease: Lease) -> str:
    """The lease's subnets, one per family it holds (a Kubernetes Node may hold both)."""
    return ",".join(str(lease.subnet_of(v)) for v in lease.families)


def _public(lease: Lease, families: Sequence[int] | None = None) -> str:
    """The public address of each family (PublicIP for IPv4, PublicIPv6 for IPv6)."""
    return ",".join(str(lease.attrs.public_ip_of(v)) for v in (lease.families if families is None else families))


def _expires_in(lease: Lease) -> str:
    if lease.expiration is None:
        return "never (reserved)"
    left = (lease.expiration - datetime.now(UTC)).total_seconds()
    hours, rest = divmod(max(0, int(left)), 3600)
    return f"{hours}h{rest // 60:02d}m"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="After the table, print every change until interrupted.")
def leases(as_json: bool, watch: bool) -> None:
    """List every lease and reservation."""
    if watch:
        _watch_leases(as_json)
        return
    with _opened_store() as store:
        snapshot = store.list_leases()
    _lease_table(snapshot.leases, snapshot.revision, as_json)


def _watch_leases(as_json: bool) -> None:
    """The table (or one JSON snapshot line), then one line per change (``Store.watch_leases``)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C is how a watch ends: exit 0
        signal.signal(signum, lambda signum, frame: stop.set())
    describe = _describer()
    with _opened_store() as store:
        for item in store.watch_leases(stop):
            if isinstance(item, LeaseList):
                if as_json:
                    rows = [lease_row(x) for x in item.leases]
                    click.echo(json.dumps({"event": "snapshot", "revision": item.revision, "leases": rows}))
                else:
                    _lease_table(item.leases, item.revision, False)
                    click.echo(f"-- watching from revision {item.revision} (Ctrl-C to stop)")
                continue
            lease = item.lease
            if as_json:
                doc = {"event": item.kind.name.lower(), "subnet": str(item.subnet), "revision": item.revision,
                       "lease": lease_row(lease) if lease is not None else None}  # fmt: skip
                click.echo(json.dumps(doc))
            else:
                who = f" {_public(lease, (item.subnet.version,))}" if lease is not None else ""
                extra = "".join(f" {k}={v}" for k, v in describe(lease).items()) if lease is not None else ""
                click.echo(f"{item.kind.name:<8} {item.subnet}{who}{extra} (revision {item.revision})")
            sys.stdout.flush()


def _lease_table(found: Sequence[Lease], revision: int, as_json: bool) -> None:
    rows = sorted(found, key=lambda x: [(v, int(x.subnet_of(v).network_address)) for v in x.families])  # type: ignore[union-attr]
    if as_json:
        click.echo(json.dumps({"revision": revision, "leases": [lease_row(x) for x in rows]}, indent=2))
        return
    describe = _describer()
    details = [describe(lease) for lease in rows]
    columns = list(dict.fromkeys(key for detail in details for key in detail))  # from the backends
    table = [("SUBNET", "PUBLIC IP", "BACKEND", *(c.upper() for c in columns), "EXPIRES")]
    for lease, detail in zip(rows, details, strict=True):
        extra = (detail.get(c, "-") for c in columns)
        table.append((_subnets(lease), _public(lease), lease.attrs.backend_type or "-", *extra,
                      _expires_in(lease)))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _describer() -> Callable[[Lease], Mapping[str, str]]:
    """A lease's backend's own columns (``Backend.describe``), each backend class loaded once;
    none for a backend that is not installed here."""
    classes: dict[str, type[Backend] | None] = {}

    def describe(lease: Lease) -> Mapping[str, str]:
        name = lease.attrs.backend_type
        if name not in classes:
            try:
                classes[name] = backend_class(name) if name else None
            except OverlaydError:
                classes[name] = None
        cls = classes[name]
        return cls.describe(lease) if cls is not None else {}

    return describe


def _subnet_arg(ctx: click.Context, param: click.Parameter, value: str) -> IPv4Network | IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not a subnet like 10.244.3.0/24 or fd00:10:244:3::/64 ({exc})", ctx, param
        ) from exc


def _ip_arg(ctx: click.Context, param: click.Parameter, value: str) -> IPv4Address | IPv6Address:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an IP address", ctx, param) from exc
    problem = public_ip_problem(ip)
    if problem is not None:
        raise click.BadParameter(f"{ip} {problem}; give the host's own underlay address", ctx, param)
    return ip


@cli.command()
@click.argument("subnet", callback=_subnet_arg)
@click.argument("public_ip", callback=_ip_arg)
def reserve(subnet: IPv4Network | IPv6Network, public_ip: IPv4Address | IPv6Address) -> None:
    """Reserve SUBNET for the host with PUBLIC_IP (never expires, never given to another host).

    An IPv6 SUBNET is reserved for the host whose PublicIPv6 is PUBLIC_IP."""
    version = subnet.version
    if public_ip.version != version:
        raise UserError(f"PUBLIC_IP {public_ip} is not an IPv{version} address like SUBNET {subnet}")
    with _opened_store() as store:
        raw = store.get_config()
        if raw is not None:
            config = NetworkConfig.from_json(raw)
            span = config.range_of(version)
            if span is None:
                raise UserError(f"the network config has no IPv{version} network; {subnet} cannot be reserved")
            if not span.contains(subnet):
                raise UserError(
                    f"{subnet} is not a /{span.length} subnet between {span.lo} and {span.hi} of network {span.network}"
                )
            problem = public_ip_problem(public_ip, span.network)
            if problem is not None:
                raise UserError(f"PUBLIC_IP {public_ip} {problem}")
        store.reserve(subnet, public_ip)
    click.echo(f"reserved {subnet} for {public_ip}")


@cli.command()
@click.argument("subnet", callback=_subnet_arg)
def unreserve(subnet: IPv4Network | IPv6Network) -> None:
    """Remove the reservation of SUBNET."""
    with _opened_store() as store:
        store.unreserve(subnet)
    click.echo(f"unreserved {subnet}")


@cli.command()
@click.argument("subnet", callback=_subnet_arg)
def release(subnet: IPv4Network | IPv6Network) -> None:
    """Delete the lease of SUBNET (e.g. a dead host's); its peers remove their routes to it.

    A dual-stack host holds one lease per family: release each subnet."""
    version = subnet.version
    with _opened_store() as store:
        lease = next((x for x in store.list_leases().leases if x.subnet_of(version) == subnet), None)
        if lease is None:
            raise UserError(f"no lease for {subnet}; 'overlayd leases' lists them")
        if lease.is_reservation:
            raise UserError(f"{subnet} is a reservation; remove it with 'overlayd unreserve {subnet}'")
        store.delete_lease(lease.only(version))
    click.echo(f"released {subnet} (was {lease.attrs.public_ip_of(version)})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """This host's daemon: lease, readiness, peers programmed, store health (via --healthz-port)."""
    params = _params()
    port = params["healthz_port"]
    if not port:
        raise UserError("status asks the running daemon: pass the --healthz-port it was started with")
    base = f"http://{params['healthz_ip']}:{port}"
    try:
        with urllib.request.urlopen(f"{base}/status", timeout=5) as response:
            doc = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise OverlaydError(f"no overlayd daemon answers on {base} ({exc})") from exc
    ready = _probe(f"{base}/readyz")
    doc["ready"] = ready
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            figures = status_figures(response.read().decode())
    except (OSError, ValueError) as exc:
        raise OverlaydError(f"the overlayd daemon on {base} serves no metrics ({exc})") from exc
    doc["metrics"] = figures
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"lease:            {doc['lease_subnet']} (expires {doc['lease_expiration'] or 'never: reserved'})")
    click.echo(f"ready:            {ready}")
    click.echo(f"peers programmed: {doc['peers_programmed']}")
    click.echo(f"store healthy:    {doc['store_healthy']}")
    if doc.get("last_error"):
        click.echo(f"last error:       {doc['last_error']}")
    click.echo("")
    rows = [("METRIC", "LABELS", "VALUE")]
    for name, samples in figures.items():
        for labels, value in samples:
            rows.append((name, labels or "-", _figure(value)))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        click.echo(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")


#: Histogram series ``status`` leaves out (the _count and _sum say enough for people).
_HIDDEN_SUFFIXES = ("_bucket", "_created")


def status_figures(text: str) -> dict[str, list[tuple[str, float]]]:
    """The daemon's /metrics as ``{sample name: [(labels, value)]}``, parsed with prometheus_client's
    own parser; histogram buckets and creation timestamps are left out."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(_HIDDEN_SUFFIXES) or not sample.name.startswith("overlayd_"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out.setdefault(sample.name, []).append((labels, sample.value))
    return out


def _figure(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == int(value) or abs(value) >= 1e6:
        return f"{value:.0f}"
    return f"{value:.6g}"


def _probe(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode().strip())
    except urllib.error.HTTPError as exc:
        return f"no: {exc.read().decode().strip()}"


@cli.command("docker-opts")
@click.option(
    "-d",
    "--dest",
    type=click.Path(dir_okay=False),
    help="Write DOCKER_OPTS=/DOCKER_NETWORK_OPTIONS= env-file lines to this file instead of printing the flags.",
)
def docker_opts(dest: str | None) -> None:
    """Docker daemon options (--bip, --mtu, --ip-masq) from the subnet file, like mk-docker-opts.sh."""
    path = _params()["subnet_file"]
    try:
        subnet = load_subnet_file(path)
    except UserError as exc:
        raise UserError(f"--subnet-file {exc}") from exc
    if subnet is None:
        raise OverlaydError(
            f"overlayd has no lease yet: {path} does not exist; is the overlayd daemon running on this host? "
            "Check it with 'overlayd status' (or pass the daemon's --subnet-file)"
        )
    opts = docker_options(subnet)
    if dest is None:
        click.echo(" ".join(opts))
        return
    try:
        write_subnet_file(dest, docker_env_file(opts))
    except OSError as exc:
        raise UserError(f"-d {dest}: cannot write it ({exc.strerror})") from exc


# -- check -------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--count", type=click.IntRange(1, 20), default=3, show_default=True, help="Echo requests per probe.")
@click.option(
    "--timeout", type=click.FloatRange(0.1, 30), default=1.0, show_default=True, help="Seconds to wait for a reply."
)
def check(as_json: bool, count: int, timeout: float) -> None:
    """Probe every peer over the overlay and the underlay, compare the kernel with the leases and
    say what is wrong; exit code 1 when any peer fails.

    Run it on a host where overlayd runs, with the same store, --iface and --subnet-file options.
    """
    result = checks.run_check(settings_from_params(_params()), count=count, timeout=timeout)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for line in checks.table(result):
            click.echo(line)
    failed = result.failed
    if failed:
        raise OverlaydError(f"{len(failed)} of {len(result.peers)} peer(s) failed the check")


# -- plugins -----------------------------------------------------------------------------------


@cli.command()
def plugins() -> None:
    """List the installed stores and backends with their options."""
    for kind, found in installed_plugins().items():
        click.echo(f"{kind}s:")
        for name, cls in found.items():
            if not isinstance(cls, type):
                click.echo(f"  {name:<12} (unavailable: {cls})")
                continue
            click.echo(f"  {name:<12} {cls.description()}")
            for param in plugin_params(cls, name):
                click.echo(f"      {param.opts[0]:<28} {param.help} (default: {param.show_default})")


# -- entry point -------------------------------------------------------------------------------


cli.add_command(demo_command, "demo")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit codes 0 ok, 1 runtime failure, 2 user error."""
    try:
        cli.main(args=argv, prog_name="overlayd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("overlayd: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"overlayd: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"overlayd: error: {exc}", err=True)
        sys.exit(2)
    except OverlaydError as exc:
        click.echo(f"overlayd: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
