"""``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` over plain HTTP, in a daemon thread.

The handler only reads a ``DaemonStatus`` snapshot and the daemon's metrics registry; it never
touches the store or the kernel, so a slow store cannot make the probe or a scrape hang.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import attrs

from .errors import UserError
from .metrics import Metrics

log = logging.getLogger(__name__)


@attrs.define
class DaemonStatus:
    """What the daemon knows about itself; updated by the reconcile loop."""

    lease_subnet: str | None = None
    lease_expiration: str | None = None
    subnet_file_written: bool = False
    rules_installed: bool = True
    first_reconcile_done: bool = False
    last_reconcile: float = 0.0  # time.monotonic() of the last finished pass
    peers_programmed: int = 0
    store_healthy: bool = False
    last_error: str | None = None
    resync_period: float = 10.0

    def ready(self) -> tuple[bool, str]:
        if self.lease_subnet is None:
            return False, "no lease held"
        if not self.subnet_file_written:
            return False, "subnet file not written"
        if not self.rules_installed:
            return False, "firewall rules not installed"
        if not self.first_reconcile_done:
            return False, "first reconcile not done"
        return True, "ready"

    def alive(self) -> tuple[bool, str]:
        if not self.first_reconcile_done:
            return True, "starting"
        age = time.monotonic() - self.last_reconcile
        if age > max(3 * self.resync_period, 30.0):
            return False, f"last reconcile {age:.0f}s ago"
        return True, "ok"


class HealthServer:
    def __init__(
        self, host: str, port: int, status: Callable[[], DaemonStatus], metrics: Metrics | None = None
    ) -> None:
        self._status = status
        self._metrics = metrics
        handler = self._handler()
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            # Before the store or the kernel is touched: a wrong --healthz-ip (not on this
            # host: EADDRNOTAVAIL, or not an address at all: gaierror) or a port in use.
            why = "not an address of this host" if exc.errno == errno.EADDRNOTAVAIL else exc.strerror or str(exc)
            raise UserError(
                f"cannot serve health checks on {host}:{port}: {why}; fix --healthz-ip / --healthz-port"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="overlayd-healthz", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        status = self._status
        metrics = self._metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                current = status()
                if self.path == "/metrics" and metrics is not None:
                    self._send(200, metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
                    return
                if self.path == "/healthz":
                    ok, reason = current.alive()
                elif self.path == "/readyz":
                    ok, reason = current.ready()
                elif self.path == "/status":
                    ok, reason = True, json.dumps(attrs.asdict(current))
                else:
                    self.send_error(404)
                    return
                self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("healthz: " + format, *args)

        return Handler
