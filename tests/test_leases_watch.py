"""``overlayd leases --watch``: a snapshot, then one line per change, on the real embedded store."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]


def _env(db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    env["OVERLAYD_EMBEDDED_PATH"] = str(db)
    return env


def _run(db: Path, *args: str) -> None:
    proc = subprocess.run([*OVERLAYD, *args], capture_output=True, text=True, env=_env(db), timeout=60)
    assert proc.returncode == 0, proc.stderr


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    return lines


def test_watch_json_streams_a_snapshot_then_each_change(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    _run(db, "network", "init", "--network", "10.244.0.0/16")
    _run(db, "reserve", "10.244.7.0/24", "192.0.2.7")
    proc = subprocess.Popen([*OVERLAYD, "leases", "--watch", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(db))  # fmt: skip
    try:
        lines = _lines(proc)
        snapshot = json.loads(lines.get(timeout=60))
        assert snapshot["event"] == "snapshot"
        assert [x["subnet"] for x in snapshot["leases"]] == ["10.244.7.0/24"]
        _run(db, "reserve", "10.244.8.0/24", "192.0.2.8")
        added = json.loads(lines.get(timeout=60))
        assert added["event"] == "added" and added["subnet"] == "10.244.8.0/24"
        assert added["lease"]["public_ip"] == "192.0.2.8" and added["revision"] > snapshot["revision"]
        _run(db, "unreserve", "10.244.7.0/24")
        removed = json.loads(lines.get(timeout=60))
        assert removed["event"] == "removed" and removed["subnet"] == "10.244.7.0/24"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_watch_table_prints_the_leases_then_changes(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    _run(db, "network", "init", "--network", "10.244.0.0/16")
    proc = subprocess.Popen([*OVERLAYD, "leases", "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(db))  # fmt: skip
    try:
        lines = _lines(proc)
        assert lines.get(timeout=60).split()[:3] == ["SUBNET", "PUBLIC", "IP"]
        assert lines.get(timeout=60).startswith("-- watching from revision")
        _run(db, "reserve", "10.244.9.0/24", "192.0.2.9")
        assert lines.get(timeout=60).split()[:3] == ["ADDED", "10.244.9.0/24", "192.0.2.9"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0  # Ctrl-C is how a watch ends
