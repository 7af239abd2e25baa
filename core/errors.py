"""One exception family for overlayd.

Every error is either *transient* (the same call may succeed later: retry with backoff) or
*permanent* (retrying will not help: report it clearly).  ``UserError`` is the permanent kind
caused by input the operator can fix; the CLI turns it into one line on stderr and exit code 2.
Boundaries translate foreign exceptions into these with ``raise ... from exc``.
"""

from __future__ import annotations


class OverlaydError(Exception):
    """Base of every error overlayd raises on purpose."""

    transient: bool = False


class TransientError(OverlaydError):
    """Something that may work when tried again later (network blip, lost race)."""

    transient = True


class PermanentError(OverlaydError):
    """Something that will not fix itself; retrying is pointless."""


class UserError(PermanentError):
    """Bad input the operator can fix: bad flag, bad config, unknown plugin."""


class ConfigError(UserError):
    """The network config (or a command-line value) is invalid."""


class PluginNotFound(UserError):
    """No installed store or backend has the requested name."""


class PluginMissingDependency(UserError):
    """A plugin needs an optional extra that is not installed."""


class PluginBroken(PermanentError):
    """A plugin is installed but fails to import (a bug in the plugin, not the user's fault)."""


class SubnetExhausted(PermanentError):
    """Every subnet of the network is leased or reserved."""


class StoreUnavailable(TransientError):
    """The store could not be reached; the call may succeed later."""


class LeaseConflict(TransientError):
    """Another host created or changed the same lease first (a lost compare-and-swap)."""


class LeaseLost(TransientError):
    """Our lease expired or was deleted; acquire again, preferring the same subnet."""


class HistoryGone(TransientError):
    """The store no longer has changes since the requested revision; re-list instead."""


class StoreCorrupted(PermanentError):
    """The store's own data is damaged (e.g. the embedded SQLite file); an operator must act."""


class NotAReservation(UserError):
    """``unreserve`` was asked to remove a live lease; that is ``release``'s job."""


class GarbledLease(PermanentError):
    """A lease key or value in the store cannot be parsed; it is skipped, never programmed."""


class KernelError(PermanentError):
    """The kernel refused a change (missing feature, permission, conflicting object)."""
