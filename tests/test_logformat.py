"""``--log-format json``: one object per line with time, level, logger, message and extra fields."""

from __future__ import annotations

import io
import json
import logging

from overlayd.logformat import configure


def test_json_lines_carry_the_fields_and_extras() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", "json", stream)
        logging.getLogger("overlayd.daemon").info("reconciled: %d added", 3, extra={"added": 3, "removed": 0})
        logging.getLogger("overlayd.daemon").debug("not shown at info")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "info" and doc["logger"] == "overlayd.daemon"
    assert doc["message"] == "reconciled: 3 added"
    assert doc["added"] == 3 and doc["removed"] == 0
    assert doc["time"].endswith("+00:00")
