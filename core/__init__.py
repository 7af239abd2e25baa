"""overlayd: a container overlay network in the spirit of flannel.

The public API is what ``__all__`` lists; modules starting with ``_`` are internal.
"""

from .api import (
    DryRun,
    backend_class,
    build_options,
    dry_run,
    installed_plugin_names,
    installed_plugins,
    load_backend,
    open_store,
    open_store_from_environment,
    read_network_config,
    store_class,
    watch,
    watch_in_background,
    write_network_config,
)
from .config import NetworkConfig
from .daemon import DaemonSettings, run
from .errors import (
    ConfigError,
    GarbledLease,
    HistoryGone,
    KernelError,
    LeaseConflict,
    LeaseLost,
    OverlaydError,
    PermanentError,
    PluginMissingDependency,
    PluginNotFound,
    StoreUnavailable,
    SubnetExhausted,
    TransientError,
    UserError,
)
from .model import EventKind, Lease, LeaseAttrs, LeaseEvent, LeaseList, Reservation, WatchResult
from .plugin import Backend, HostInfo, Network, NoOptions, Store, option

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ConfigError",
    "DaemonSettings",
    "DryRun",
    "EventKind",
    "GarbledLease",
    "HistoryGone",
    "HostInfo",
    "KernelError",
    "Lease",
    "LeaseAttrs",
    "LeaseConflict",
    "LeaseEvent",
    "LeaseList",
    "LeaseLost",
    "Network",
    "NetworkConfig",
    "NoOptions",
    "OverlaydError",
    "PermanentError",
    "PluginMissingDependency",
    "PluginNotFound",
    "Reservation",
    "Store",
    "StoreUnavailable",
    "SubnetExhausted",
    "TransientError",
    "UserError",
    "WatchResult",
    "__version__",
    "backend_class",
    "build_options",
    "dry_run",
    "installed_plugin_names",
    "installed_plugins",
    "load_backend",
    "open_store",
    "open_store_from_environment",
    "option",
    "read_network_config",
    "run",
    "store_class",
    "watch",
    "watch_in_background",
    "write_network_config",
]
