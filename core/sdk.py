"""The plugin SDK: everything a store or backend plugin may import from overlayd, in one module.

A plugin written against ``overlayd.sdk`` depends on the plugin contracts, the data model and
the kernel helpers only — never on the daemon, the CLI or the library API above them (the layer
contracts in pyproject.toml hold the built-in plugins to that).  docs/writing-a-plugin.md lists
the same names; a name that is not here is internal and may change without notice.
"""

from . import netlink, tun
from .config import NetworkConfig
from .decode import DecodeError, load_json
from .errors import (
    ConfigError,
    GarbledLease,
    HistoryGone,
    KernelError,
    LeaseConflict,
    LeaseLost,
    NotAReservation,
    OverlaydError,
    PermanentError,
    StoreCorrupted,
    StoreUnavailable,
    SubnetExhausted,
    TransientError,
    UserError,
)
from .kernel import FdbEntry, KernelObject, KernelScope, Link, MacAddress, Neighbour, Route
from .model import (
    EventKind,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseList,
    Reservation,
    WatchResult,
    key_to_subnet,
    parse_lease,
    subnet_to_key,
)
from .peers import public_ip_problem
from .plan import Plan, diff, simulate
from .plugin import (
    Backend,
    Change,
    ChangeList,
    Entry,
    EntryList,
    HostInfo,
    LeaseTimingOptions,
    Network,
    NoOptions,
    Plugin,
    Store,
    apply_config_keys,
    check_tls_files,
    comma_list,
    duration,
    is_ipv6_key,
    option,
    seconds,
    to_bool,
)
from .routenet import RouteNetwork
from .udpfwd import COUNTERS, ForwarderProcess
from .udpfwd import Table as ForwardingTable

__all__ = [
    "COUNTERS",
    "Backend",
    "Change",
    "ChangeList",
    "ConfigError",
    "DecodeError",
    "Entry",
    "EntryList",
    "EventKind",
    "FdbEntry",
    "ForwarderProcess",
    "ForwardingTable",
    "GarbledLease",
    "HistoryGone",
    "HostInfo",
    "KernelError",
    "KernelObject",
    "KernelScope",
    "Lease",
    "LeaseAttrs",
    "LeaseConflict",
    "LeaseEvent",
    "LeaseList",
    "LeaseLost",
    "LeaseTimingOptions",
    "Link",
    "MacAddress",
    "Neighbour",
    "Network",
    "NetworkConfig",
    "NoOptions",
    "NotAReservation",
    "OverlaydError",
    "PermanentError",
    "Plan",
    "Plugin",
    "Reservation",
    "Route",
    "RouteNetwork",
    "Store",
    "StoreCorrupted",
    "StoreUnavailable",
    "SubnetExhausted",
    "TransientError",
    "UserError",
    "WatchResult",
    "apply_config_keys",
    "check_tls_files",
    "comma_list",
    "diff",
    "duration",
    "is_ipv6_key",
    "key_to_subnet",
    "load_json",
    "netlink",
    "option",
    "parse_lease",
    "public_ip_problem",
    "seconds",
    "simulate",
    "subnet_to_key",
    "to_bool",
    "tun",
]
