"""Least privilege: the daemon runs as a non-root user with CAP_NET_ADMIN as its only capability.

Two namespace hosts on one veth (198.51.100.0/24), each running ``overlayd --backend vxlan`` on
the embedded store (one file, shared) under ``setpriv``: user ``nobody``, CAP_NET_ADMIN in the
bounding, inheritable and ambient sets and nothing else, no_new_privs (so no file capability,
such as ping's cap_net_raw, can add one back).  ``ip netns exec`` runs as root and *then* drops
to setpriv: entering a namespace needs CAP_SYS_ADMIN, which the daemon does not keep.

Each daemon must create its VXLAN device, program the other host (route, neighbour, FDB),
install its masquerade rules (``--ip-masq``, with nftables and with Debian's iptables, which is
iptables-nft: both speak netlink, which CAP_NET_ADMIN covers; iptables-legacy would also need
CAP_NET_RAW and a writable /run/xtables.lock), write its subnet file and answer /readyz; the
test reads all of it back as root and pings across the overlay.  File modes: the subnet file 0644 (container
runtimes read it), the store file and its -wal/-shm 0600, all owned by the daemon's user.

What needs CAP_NET_RAW: only the periodic probes (``--probe-interval``; also ``overlayd check``),
which run the system ``ping``: a capability-less ping needs ICMP datagram sockets, which a
fresh namespace disables (``net.ipv4.ping_group_range = 1 0``).  The last test shows the
probes fail with CAP_NET_ADMIN alone and pass with CAP_NET_RAW added.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from overlayd.testing.netns import RUN_PREFIX, ip_json, netns_factory, run, veth

__all__ = ["netns_factory"]  # the fixture, imported for pytest

NOBODY = 65534
NETWORK = "10.231.0.0/16"
PORT = 9183
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]


def setpriv(caps: str = "net_admin") -> list[str]:
    """setpriv's argv: user nobody, exactly *caps* (comma list) kept across exec, nothing else."""
    wanted = ",".join(f"+{cap}" for cap in caps.split(","))
    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        f"--inh-caps=-all,{wanted}", f"--ambient-caps=-all,{wanted}", f"--bounding-set=-all,{wanted}",
        "--no-new-privs", "--",
    ]  # fmt: skip


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A directory only the daemon's user may enter (pytest's tmp_path is root's alone)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}lp-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    def __init__(self, ns: str, state: Path, name: str, caps: str, *extra: str) -> None:
        self.subnet_file = state / name / "subnet.env"
        self.subnet_file.unlink(missing_ok=True)  # so its appearance means "ready"
        tag = caps.replace(",", "+")
        self.log_path = state.parent / f"{state.name}-{name}-{tag}.log"  # root's: the daemon cannot hide its log
        argv = [
            "ip", "netns", "exec", ns, *setpriv(caps), *OVERLAYD,
            "--embedded-path", str(state / "store.db"), "--backend", "vxlan", "--network", NETWORK,
            "--iface", "eth0", "--subnet-file", str(self.subnet_file), "--healthz-port", str(PORT),
            "--log-level", "debug", *extra, "run",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
        env["HOME"] = str(state)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=state)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"overlayd exited with {self.proc.returncode}:\n{self.log()}"
            if self.subnet_file.exists():
                return dict(line.split("=", 1) for line in self.subnet_file.read_text().split())
            time.sleep(0.1)
        raise AssertionError(f"no subnet file after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


@pytest.fixture
def hosts(netns_factory: Callable[..., str]) -> tuple[str, str]:
    a, b = netns_factory("lpa"), netns_factory("lpb")
    veth(a, "eth0", b, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    for ns in (a, b):
        run(ns, "ip", "link", "set", "lo", "up")
    return a, b


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(\w+):[ \t]*(.*)$", text, re.M))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def http(ns: str, path: str) -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{PORT}{path}', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    out = run(ns, sys.executable, "-c", code).stdout
    status, _, body = out.partition("\n")
    return int(status), body


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_vxlan_daemon_as_nobody_with_cap_net_admin_only(
    hosts: tuple[str, str], state_dir: Path, figures, firewall: str
) -> None:
    a, b = hosts
    started = time.monotonic()
    args = ("--firewall", firewall, "--ip-masq")
    daemons = [Daemon(a, state_dir, "a", "net_admin", *args), Daemon(b, state_dir, "b", "net_admin", *args)]
    try:
        envs = [d.wait_ready() for d in daemons]
        ready = time.monotonic() - started
        for daemon in daemons:
            status = proc_status(daemon.proc.pid)
            assert status["Uid"].split() == [str(NOBODY)] * 4 and status["Gid"].split() == [str(NOBODY)] * 4
            assert int(status["CapEff"], 16) == 1 << CAP_NET_ADMIN, status["CapEff"]
            assert int(status["CapBnd"], 16) == 1 << CAP_NET_ADMIN, status["CapBnd"]
            assert status["Groups"] == ""
        subnets = [env["FLANNEL_SUBNET"] for env in envs]
        vteps = [s.split("/")[0].rsplit(".", 1)[0] + ".0" for s in subnets]
        # each host made its device and programmed the other, read back as root
        for ns, peer_vtep, peer_net in ((a, vteps[1], subnets[1]), (b, vteps[0], subnets[0])):
            [link] = ip_json(ns, "-d", "link", "show", "flannel.1")
            assert link["linkinfo"]["info_kind"] == "vxlan"
            net = peer_net.rsplit(".", 1)[0] + ".0/" + peer_net.split("/")[1]
            deadline = time.monotonic() + 10
            while not any(r["dst"] == net for r in ip_json(ns, "route", "show", "dev", "flannel.1")):
                assert time.monotonic() < deadline, ip_json(ns, "route", "show")
                time.sleep(0.1)
            neigh = ip_json(ns, "neigh", "show", "dev", "flannel.1")
            assert any(n["dst"] == peer_vtep and "PERMANENT" in n["state"] for n in neigh), neigh
            if firewall == "nftables":
                ruleset = run(ns, "nft", "list", "table", "ip", "overlayd").stdout
            else:
                ruleset = run(ns, "iptables-save", "-t", "nat").stdout
            assert "masquerade" in ruleset.lower(), ruleset
            code, body = http(ns, "/readyz")
            assert code == 200, body
        run(a, "ping", "-c", "3", "-i", "0.2", "-W", "2", vteps[1])
        run(b, "ping", "-c", "3", "-i", "0.2", "-W", "2", vteps[0])
        # what the daemons wrote: owned by nobody; the subnet file 0644, the store 0600
        for daemon in daemons:
            info = daemon.subnet_file.stat()
            assert (info.st_uid, mode(daemon.subnet_file)) == (NOBODY, 0o644)
        made = {p.name: (p.stat().st_uid, oct(mode(p))) for p in state_dir.iterdir() if p.is_file()}
        assert made == {name: (NOBODY, oct(0o600)) for name in ("store.db", "store.db-wal", "store.db-shm")}, made
        for daemon in daemons:
            text = daemon.log()
            assert "Traceback" not in text and "Operation not permitted" not in text, text
            assert "Permission denied" not in text, text
        figures.add(
            f"2 vxlan daemons as nobody with CAP_NET_ADMIN only ({firewall}, --ip-masq): ready in {ready:.2f} s"
        )
    finally:
        codes = [d.stop() for d in daemons]
    assert codes == [0, 0]


def test_probes_need_cap_net_raw(hosts: tuple[str, str], state_dir: Path, figures) -> None:
    """``--probe-interval`` pings the peers with the system ping, whose file capability
    (cap_net_raw) is more than the bounding set allows, so exec fails (EPERM) and no probe can
    run; ICMP datagram sockets, the capability-less way, are off in a fresh namespace.  The
    daemon says so once and reports 0 peers reachable (before the fix the probe thread died on
    the PermissionError and the gauge never appeared); with CAP_NET_RAW added, 1 of 1."""
    a, b = hosts
    results: dict[str, float | None] = {}
    for caps in ("net_admin", "net_admin,net_raw"):
        daemons = [
            Daemon(a, state_dir, "a", caps, "--probe-interval", "1"),
            Daemon(b, state_dir, "b", caps, "--probe-interval", "1"),
        ]
        try:
            for daemon in daemons:
                daemon.wait_ready()
            deadline = time.monotonic() + 20
            value = None
            while time.monotonic() < deadline and (value is None or (value == 0 and caps != "net_admin")):
                _, text = http(a, "/metrics")
                found = re.search(r"^overlayd_peers_reachable (\S+)$", text, re.M)
                value = float(found.group(1)) if found else None
                time.sleep(0.5)
            results[caps] = value
            text = daemons[0].log()
            assert "Traceback" not in text, text
            warnings = [line for line in text.splitlines() if "probe: cannot run ping" in line]
            assert len(warnings) == (1 if caps == "net_admin" else 0), warnings
            if warnings:
                assert "CAP_NET_RAW" in warnings[0] and "WARNING" in warnings[0], warnings
        finally:
            for daemon in daemons:
                daemon.stop()
    assert results == {"net_admin": 0.0, "net_admin,net_raw": 1.0}, results
    figures.add(f"probes reached {json.dumps(results)} peers: CAP_NET_RAW is needed only for --probe-interval")
