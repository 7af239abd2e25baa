"""Log formats the CLI can install: ``text`` for people, ``json`` for log pipelines.

The library never configures logging (the CLI owns the process); it logs with ``%s``
arguments and, where a figure is worth a field of its own, ``extra={...}`` (the reconcile
line carries ``added``, ``removed``, ``drift``).  The JSON format writes one object per line
with ``time`` (UTC, RFC 3339), ``level``, ``logger``, ``message`` and every such extra field, so
a pipeline can filter on them without parsing the message.

Secrets never reach a log line in the first place (options marked ``secret=True`` have no
repr and are never formatted into messages); the formatter adds no defence of its own, which
would only hide the bug.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in doc:
                doc[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def _ours_or_info(record: logging.LogRecord) -> bool:
    """Debug lines of overlayd only: a library's debug output (pyroute2 logs every netlink
    message, grpc every frame) is one line per packet, which the daemon's logs must never be."""
    return record.levelno >= logging.INFO or record.name == "overlayd" or record.name.startswith("overlayd.")


def configure(level: str, fmt: str, stream: Any) -> None:
    """Install the chosen format on the root logger (the CLI's job; replaces earlier handlers)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_ours_or_info)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
