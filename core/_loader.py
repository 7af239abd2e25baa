"""Plugin discovery: the only module that imports stevedore.

Plugins are entry points in the ``overlayd.stores`` and ``overlayd.backends`` groups, loaded
with ``invoke_on_load=False`` so the core decides when and how to instantiate them.  A name
that is not installed becomes a ``PluginNotFound`` that lists what is installed; a plugin whose
optional dependency is missing becomes a ``PluginMissingDependency`` with the pip command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import metadata
from typing import Any, TypeVar

import attrs
from stevedore import driver, extension

from .errors import PluginBroken, PluginMissingDependency, PluginNotFound, UserError
from .plugin import Backend, Plugin, Store

log = logging.getLogger(__name__)

STORES = "overlayd.stores"
BACKENDS = "overlayd.backends"

P = TypeVar("P", bound=Plugin)

# Optional extras: the import name a plugin needs -> the extra that installs it.
_EXTRAS = {"boto3": "aws", "botocore": "aws", "consul": "consul", "kubernetes": "kubernetes"}


def installed_names(group: str) -> list[str]:
    """Names of every plugin registered in *group*, whether or not it imports."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})


def load_plugin(group: str, name: str, base: type[P]) -> type[P]:
    """The plugin class registered as *name* in *group*."""
    kind = "store" if group == STORES else "backend"
    if name not in installed_names(group):
        names = ", ".join(installed_names(group)) or "none"
        raise PluginNotFound(f"unknown {kind} {name!r}; installed {kind}s: {names}")
    try:
        manager: driver.DriverManager[Any] = driver.DriverManager(
            namespace=group, name=name, invoke_on_load=False, on_load_failure_callback=_reraise
        )
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "overlayd":
            raise PluginBroken(f"{kind} {name!r} cannot be imported: {exc}") from exc
        extra = _EXTRAS.get(missing)
        hint = f"pip install 'overlayd[{extra}]'" if extra else f"pip install {missing}"
        raise PluginMissingDependency(
            f"{kind} {name!r} needs the Python package {missing!r}; install it with: {hint}"
        ) from exc
    cls = manager.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UserError(f"{kind} plugin {name!r} is not a subclass of overlayd.{base.__name__}")
    cls.name = name
    return cls


def load_store(name: str) -> type[Store]:
    return load_plugin(STORES, name, Store)  # type: ignore[type-abstract]  # issubclass check only


def load_backend(name: str) -> type[Backend]:
    return load_plugin(BACKENDS, name, Backend)  # type: ignore[type-abstract]  # issubclass check only


def all_plugins(group: str) -> dict[str, type[Plugin] | Exception]:
    """Every plugin in *group*: its class, or the error that kept it from loading."""
    base: type[Plugin] = Store if group == STORES else Backend
    out: dict[str, type[Plugin] | Exception] = {}
    for name in installed_names(group):
        try:
            out[name] = load_plugin(group, name, base)
        except (UserError, PluginBroken) as exc:
            out[name] = exc
    return out


def build_options(cls: type[Plugin], values: Mapping[str, Any]) -> Any:
    """``cls.Options`` from a mapping; keys may use dashes or underscores; None means "default"."""
    fields = {field.name for field in attrs.fields(cls.Options)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields)) or "none"
            raise UserError(f"{cls.name or cls.__name__} has no option {key!r}; its options: {known}")
        if value is not None:
            kwargs[name] = value
    try:
        return cls.Options(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad option for {cls.name or cls.__name__}: {exc}") from exc


def new_store(name: str, options: Mapping[str, Any]) -> Store:
    """An instance of the store plugin *name* configured with *options*."""
    cls = load_store(name)
    return cls.from_options(build_options(cls, options))


def new_backend(name: str, options: Mapping[str, Any]) -> Backend:
    """An instance of the backend plugin *name* configured with *options* (touches nothing yet)."""
    cls = load_backend(name)
    return cls.from_options(build_options(cls, options))


def _reraise(manager: extension.ExtensionManager[Any], entrypoint: metadata.EntryPoint, exc: BaseException) -> None:
    raise exc
