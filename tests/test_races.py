"""Races (issue 19): 30 daemons start at once against one store on a network with exactly 30 free subnets.

Each daemon is a real ``overlayd run`` process (``alloc`` backend, ``--firewall none``, its own
``--public-ip`` and subnet file), all of them inside one network namespace made for the test,
against one etcd (running in that namespace on its loopback) or one embedded store file.  The
network config leaves exactly 30 subnets (SubnetMin..SubnetMax).  Expected: 30 distinct leases,
one per public IP, no error in any log; then a 31st daemon exits 1 with one line saying the
network is exhausted, and the namespace's links, addresses, routes and firewall are as before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd._lab.etcd import EtcdServer
from overlayd._topology import overlayd_executable
from overlayd.testing.netns import netns_factory, run, veth

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

__all__ = ["netns_factory"]

HOSTS = 30
CONFIG = {
    "Network": "10.98.0.0/16",
    "SubnetLen": 24,
    "SubnetMin": "10.98.1.0",
    "SubnetMax": f"10.98.{HOSTS}.0",
    "Backend": {"Type": "alloc"},
}


@pytest.fixture
def ns(netns_factory: Callable[..., str]) -> str:
    name, far = netns_factory("race"), netns_factory("raceu")
    veth(name, "eth0", far, "eth0", "203.0.113.1/24", "203.0.113.2/24")
    return name


@pytest.fixture(params=["etcd", "embedded"])
def store_args(request: pytest.FixtureRequest, ns: str, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "etcd":
        if shutil.which("etcd") is None:
            pytest.skip("needs Debian's etcd binary")
        server = EtcdServer(command_prefix=["ip", "netns", "exec", ns])
        server.start()
        try:
            server.etcdctl("put", "/coreos.com/network/config", json.dumps(CONFIG))
            yield ["--store", "etcd", "--etcd-endpoints", server.endpoint]
        finally:
            server.stop()
    else:
        path = tmp_path / "store.db"
        store = open_store("embedded", path=str(path))
        store.put_config(json.dumps(CONFIG))
        store.close()
        yield ["--embedded-path", str(path)]


def _argv(store_args: list[str], tmp: Path, i: int) -> list[str]:
    return [
        overlayd_executable(),
        *store_args,
        "--iface", "eth0",
        "--public-ip", f"198.51.100.{i}",
        "--firewall", "none",
        "--healthz-port", "0",
        "--subnet-file", str(tmp / f"subnet{i}.env"),
        "run",
    ]  # fmt: skip


def _kernel_state(ns: str) -> str:
    views = (["link"], ["addr"], ["route", "show", "table", "all"])
    parts = [run(ns, "ip", "-d", "-j", *what).stdout for what in views]
    nft = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True)
    return "\n".join([*parts, nft.stdout])


def test_thirty_daemons_at_once_get_thirty_distinct_leases_and_a_31st_exits(
    ns: str, store_args: list[str], tmp_path: Path
) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"overlayd{i}.log" for i in range(1, HOSTS + 1)]
    started = time.monotonic()
    try:
        for i, log in enumerate(logs, 1):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, *_argv(store_args, tmp_path, i)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        files = [tmp_path / f"subnet{i}.env" for i in range(1, HOSTS + 1)]
        deadline = time.monotonic() + 180
        while not all(f.exists() for f in files):
            dead = [(i + 1, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            assert not dead, f"daemons exited: {dead}: {logs[dead[0][0] - 1].read_text()}"
            assert time.monotonic() < deadline, "not every daemon wrote its subnet file"
            time.sleep(0.2)
        took = time.monotonic() - started
        subnets = [
            next(line for line in f.read_text().splitlines() if line.startswith("FLANNEL_SUBNET=")) for f in files
        ]
        assert len(set(subnets)) == HOSTS, f"duplicated leases: {sorted(subnets)}"
        for log in logs:
            text = log.read_text()
            assert "Traceback" not in text and " ERROR " not in text and "error" not in text.lower(), text

        before = _kernel_state(ns)
        extra = subprocess.run(
            ["ip", "netns", "exec", ns, *_argv(store_args, tmp_path, HOSTS + 1)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert extra.returncode == 1, extra
        lines = extra.stderr.strip().splitlines()
        assert len(lines) == 1 and "exhausted" in lines[0], extra.stderr
        assert not extra.stdout.strip(), extra.stdout
        assert not (tmp_path / f"subnet{HOSTS + 1}.env").exists()
        assert _kernel_state(ns) == before
        kind = "etcd" if "etcd" in store_args else "embedded"
        print(f"{kind}: {HOSTS} daemons at once: {HOSTS} distinct leases in {took:.1f} s; the 31st: {lines[0]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
