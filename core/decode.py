"""Bounded decoding of data that comes from a store (or any other outside source).

Anyone who can write to the store can write anything: ``json.loads`` of ~2 KB of ``[[[[…]]]]``
(1100 levels) raises ``RecursionError``, which no ``except ValueError`` catches, and a decoder
that reads whatever size it is given lets one huge value cost every daemon its memory.  So every
decode of store data — lease values, lease keys, the network config, and the payloads of the
coming consul and kubernetes stores — goes through :func:`load_json` / :func:`check_text`, which
refuse anything too large or nested too deeply *before* parsing, with a ``DecodeError`` (a
``ValueError``) that callers turn into their own error: ``GarbledLease`` for leases (logged and
skipped), ``ConfigError`` for the config (one line, exit 2).

The depth check is a linear scan that skips string contents; it only runs when the text holds
more brackets than the depth limit, so ordinary values cost two ``str.count`` calls.
"""

from __future__ import annotations

import json
from typing import Any

#: A flannel lease value is ~200 bytes; BackendData of any backend fits in far less than this.
MAX_LEASE_VALUE_BYTES = 64 * 1024
#: A network config is a few hundred bytes.
MAX_CONFIG_BYTES = 1024 * 1024
#: Nesting deeper than this is never a real lease or config (flannel's are 2-3 levels deep).
MAX_DEPTH = 32
#: A lease key (``10.244.3.0-24``, ``fd00:10:244:3::-64``) is far shorter than this.
MAX_KEY_CHARS = 128


class DecodeError(ValueError):
    """Outside data that cannot be used: too large, too deep, not UTF-8 or not JSON."""


def check_text(data: str | bytes, *, what: str, max_bytes: int) -> str:
    """*data* as text, refusing more than *max_bytes* and bytes that are not UTF-8."""
    if len(data) > max_bytes:
        raise DecodeError(f"{what} is {len(data)} bytes long, more than the {max_bytes} allowed")
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return data


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """True when *text* nests arrays/objects deeper than *max_depth* (strings are skipped)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif char in "]}":
            depth -= 1
    return False


def load_json(data: str | bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that never recurses past *max_depth* nor reads more than *max_bytes*.

    Raises ``DecodeError`` naming *what* for anything it will not or cannot decode.
    """
    text = check_text(data, what=what, max_bytes=max_bytes)
    if json_depth_exceeds(text, max_depth):
        raise DecodeError(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: belt and braces, the scan prevents it
        raise DecodeError(f"{what} is not valid JSON ({exc})") from exc
