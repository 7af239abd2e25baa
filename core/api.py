"""Opening plugins by name: the small surface the CLI and library users share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from . import _loader
from .errors import UserError
from .plugin import Backend, Plugin, Store


def build_options(cls: type[Plugin], values: Mapping[str, Any]) -> Any:
    """``cls.Options`` from a mapping; keys may use dashes or underscores."""
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


def open_store(name: str = "embedded", **options: Any) -> Store:
    """Load the store plugin *name* and open it with *options* (e.g. ``endpoints=[...]``)."""
    cls = _loader.load_store(name)
    return cls.from_options(build_options(cls, options))


def load_backend(name: str = "vxlan", **options: Any) -> Backend:
    """Load the backend plugin *name* and instantiate it with *options*."""
    cls = _loader.load_backend(name)
    return cls.from_options(build_options(cls, options))
