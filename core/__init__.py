"""overlayd: a container overlay network in the spirit of flannel.

The public API is what ``__all__`` lists; modules starting with ``_`` are internal.
"""

from .api import build_options, load_backend, open_store
from .config import NetworkConfig
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
    "build_options",
    "load_backend",
    "open_store",
    "option",
]
