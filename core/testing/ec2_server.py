"""A real EC2-compatible HTTP server for tests: moto's, run as its own process on loopback.

Tests of the ``aws-vpc`` backend talk to it through boto3 exactly as they would to AWS, over
HTTP, so nothing in the process under test is patched.  Needs the ``moto[server]`` package
(the ``test`` extra).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any, Self

from .._lab.etcd import free_port

REGION = "us-east-1"
#: Dummy credentials moto accepts; tests grep logs for them to show they never leak.
ACCESS_KEY_ID = "AKIAOVERLAYDTEST0001"
SECRET_ACCESS_KEY = "overlayd-secret-never-logged"


class Ec2Server:
    """``python -m moto.server`` on 127.0.0.1 and a free port; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Self:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto's EC2 server did not start on port {self.port} (is moto[server] installed?)")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    @staticmethod
    def environment() -> dict[str, str]:
        """The SDK variables a daemon under test needs (the dummy credentials, the region)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": REGION}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "ec2",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
