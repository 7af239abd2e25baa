"""Observability on a real cluster: metrics that move, ``overlayd check`` naming broken peers,
JSON logs with one line per non-empty plan, and no secret in any output.

Metrics are scraped from each host's health server inside its namespace and parsed with
prometheus_client's own text parser.  ``check`` is run on host0 after its daemon was stopped
(SIGTERM keeps the kernel state): nothing repairs the sabotage before the check reads the
kernel, so the outcome does not depend on timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

import attrs
import pytest
from overlayd import _topology as topo
from overlayd.api import installed_plugins
from overlayd.check import MAC_MISMATCH, MTU_BLACKHOLE, NOT_PROGRAMMED, OK, PORT_BLOCKED
from prometheus_client.parser import text_string_to_metric_families

from ._mesh import daemon_args, embedded_args, embedded_store_args, subnets, wait_full_mesh_routes, wait_routes

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PORT = 9180
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_FETCH = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=5).read().decode())"
)


def lo_up(host: topo.Host) -> None:
    host.ip("link", "set", "lo", "up")  # the health server listens on 127.0.0.1 inside the host


def scrape_text(host: topo.Host) -> str:
    return host.exec([sys.executable, "-c", _FETCH, str(PORT)]).stdout


def scrape(host: topo.Host) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(scrape_text(host)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


def wait_metric(host: topo.Host, what: str, ok: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    return topo.wait_until(lambda: (lambda s: s if ok(s) else None)(scrape(host)), timeout, what=f"{host.name}: {what}")


def needs_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")


def test_metrics_move_when_a_peer_joins_a_route_is_deleted_and_the_store_goes_away(make_cluster, figures):
    needs_etcd()
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    args = daemon_args(["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint], "--healthz-port", str(PORT))
    h0, h1, h2 = cluster.hosts
    for host in (h0, h1):
        lo_up(host)
        host.start_daemon(args)
    for host in (h0, h1):
        host.wait_ready(30)
    net1 = subnets_of(h1)
    wait_routes(h0, {net1}, 15)

    s = wait_metric(h0, "one peer programmed", lambda s: value(s, "overlayd_peers_programmed") == 1)
    assert value(s, "overlayd_store_up") == 1
    assert value(s, "overlayd_peers_known") == 1
    for kind in ("route", "neigh", "fdb"):
        assert value(s, "overlayd_kernel_entries", kind=kind) == 1
    assert value(s, "overlayd_reconcile_passes_total", result="ok") >= 1
    assert value(s, "overlayd_reconcile_pass_duration_seconds_count") >= 1
    assert 0 < value(s, "overlayd_lease_expiry_seconds") <= 24 * 3600
    assert any(name == "overlayd_build_info" for name, _ in s)
    added_before = value(s, "overlayd_reconcile_changes_total", op="add")

    # A peer joins.
    lo_up(h2)
    h2.start_daemon(args)
    h2.wait_ready(30)
    s = wait_metric(h0, "two peers programmed", lambda s: value(s, "overlayd_kernel_entries", kind="route") == 2)
    assert value(s, "overlayd_peers_programmed") == 2
    assert value(s, "overlayd_reconcile_changes_total", op="add") >= added_before + 3
    assert value(s, "overlayd_drift_repaired_total", kind="route") == 0

    # A route deleted by hand is drift, repaired at the next pass and counted.
    net2 = subnets_of(h2)
    h0.ip("route", "del", net2)
    deleted = time.monotonic()
    s = wait_metric(h0, "drift repaired", lambda s: value(s, "overlayd_drift_repaired_total", kind="route") == 1)
    figures.add(f"route deleted by hand: counted as repaired drift after {time.monotonic() - deleted:.2f} s")
    assert h0.route_to(IPv4Network(net2)) is not None

    # The store goes away.
    cluster.etcd.kill()
    s = wait_metric(h0, "store down", lambda s: value(s, "overlayd_store_up") == 0, timeout=40)
    assert value(s, "overlayd_errors_total", kind="store_unavailable") >= 1
    assert value(s, "overlayd_store_watch_restarts_total") >= 1
    assert value(s, "overlayd_kernel_entries", kind="route") == 2  # the datapath is kept

    # overlayd status shows the same figures, as a table and as JSON.
    proc = cluster.overlayd_cli("--healthz-port", str(PORT), "status", "--json", host=0)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metrics"]["overlayd_store_up"] == [["", 0]]
    assert doc["metrics"]["overlayd_peers_programmed"] == [["", 2]]
    proc = cluster.overlayd_cli("--healthz-port", str(PORT), "status", host=0)
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == ["overlayd_kernel_entries", "kind=route", "2"] for line in proc.stdout.splitlines())


def subnets_of(host: topo.Host) -> str:
    env = host.subnet_env()
    assert env is not None
    return str(env.subnet.network)


def run_check(cluster: topo.Cluster, host: topo.Host) -> tuple[int, dict[str, Any], str]:
    proc = cluster.overlayd_cli(*embedded_store_args(cluster), "--iface", host.underlay_if,
                                "--subnet-file", str(host.subnet_file), "check", "--json", "--count", "2",
                                host=host.index, timeout=60)  # fmt: skip
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def by_subnet(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {peer["subnet"]: peer for peer in doc["peers"]}


def nft(host: topo.Host, *rule: str) -> None:
    host.exec(["nft", *rule])


def test_check_names_a_sabotaged_fdb_entry_a_blocked_overlay_port_and_an_mtu_blackhole(make_cluster, figures):
    if shutil.which("nft") is None:
        pytest.skip("needs nft (apt-get install nftables)")
    cluster = make_cluster(3)
    args = embedded_args(cluster, "--healthz-port", str(PORT), "--probe-interval", "0.5", "--probe-per-peer")
    h0, h1, h2 = cluster.hosts
    for host in cluster.hosts:
        lo_up(host)
        host.start_daemon(args)
    for host in cluster.hosts:
        host.wait_ready(30)
    wait_full_mesh_routes(cluster)
    nets = {i: str(n) for i, n in subnets(cluster).items()}

    start = time.monotonic()
    code, doc, err = run_check(cluster, h0)
    figures.add(f"check of 2 healthy peers took {time.monotonic() - start:.2f} s")
    assert code == 0, (doc, err)
    assert [peer["diagnosis"] for peer in doc["peers"]] == [OK, OK]
    assert all(peer["overlay"]["ok"] and peer["underlay"]["ok"] and peer["full_size"]["ok"] for peer in doc["peers"])
    wait_metric(h0, "both peers answer the daemon's probes", lambda s: value(s, "overlayd_peers_reachable") == 2)

    # Sabotage: host0's FDB entry for host1 goes (with host0's daemon stopped, nothing repairs
    # it), and host2 drops overlay traffic in its own namespace.
    nft(h2, "add", "table", "inet", "ovdcheck")
    nft(h2, "add", "chain", "inet", "ovdcheck", "in", "{ type filter hook input priority -10 ; }")
    nft(h2, "add", "rule", "inet", "ovdcheck", "in", "udp", "dport", "8472", "drop")
    # The daemon's periodic probes (--probe-interval, --probe-per-peer) see the blocked peer
    # (host0's daemon is still running here; it is stopped below, before the FDB sabotage).
    s = wait_metric(h0, "host2 stops answering", lambda s: value(s, "overlayd_peers_reachable") == 1)
    assert value(s, "overlayd_peer_reachable", peer=nets[2]) == 0
    assert value(s, "overlayd_peer_reachable", peer=nets[1]) == 1
    h0.daemon.stop()
    leases = json.loads(cluster.overlayd_cli(*embedded_store_args(cluster), "leases", "--json").stdout)["leases"]
    mac1 = next(x["backend_data"]["VtepMAC"] for x in leases if x["subnet"] == nets[1])
    h0.exec(["bridge", "fdb", "del", mac1, "dev", "flannel.1", "dst", str(h1.underlay.ip)])

    start = time.monotonic()
    code, doc, err = run_check(cluster, h0)
    figures.add(f"check of 2 broken peers took {time.monotonic() - start:.2f} s")
    assert code == 1, doc
    assert "2 of 2 peer(s) failed the check" in err
    peers = by_subnet(doc)
    assert peers[nets[1]]["diagnosis"].startswith(NOT_PROGRAMMED), peers[nets[1]]
    assert mac1 in peers[nets[1]]["diagnosis"]
    assert peers[nets[2]]["diagnosis"] == PORT_BLOCKED, peers[nets[2]]
    assert peers[nets[2]]["underlay"]["ok"] and not peers[nets[2]]["overlay"]["ok"]

    # host2 now drops only full-size overlay packets; host0's neighbour for host1 gets a wrong MAC.
    nft(h2, "flush", "chain", "inet", "ovdcheck", "in")
    nft(h2, "add", "rule", "inet", "ovdcheck", "in", "udp", "dport", "8472", "meta", "length", "gt", "1000", "drop")
    wrong = "02:00:5e:00:53:99"
    vtep1 = nets[1].split("/")[0]
    h0.ip("neigh", "replace", vtep1, "lladdr", wrong, "dev", "flannel.1", "nud", "permanent")
    code, doc, err = run_check(cluster, h0)
    assert code == 1
    peers = by_subnet(doc)
    assert peers[nets[1]]["diagnosis"].startswith(MAC_MISMATCH) and wrong in peers[nets[1]]["diagnosis"]
    assert peers[nets[2]]["diagnosis"] == MTU_BLACKHOLE, peers[nets[2]]

    # The table form names the same.
    proc = cluster.overlayd_cli(*embedded_store_args(cluster), "--iface", h0.underlay_if,
                                "--subnet-file", str(h0.subnet_file), "check", "--count", "1", timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert MTU_BLACKHOLE in proc.stdout and MAC_MISMATCH in proc.stdout
    print(proc.stdout)


def secret_settings(marker: str, real: tuple[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """TOML tables and env vars setting every installed plugin's secret option (but *real*, the one
    the test sets to a working value) to a distinct marker: a store's token or password, cloud keys."""
    tables: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    markers: list[str] = []
    for plugins in installed_plugins().values():
        for name, cls in plugins.items():
            if not isinstance(cls, type):
                continue
            for field in attrs.fields(cls.Options):
                if field.metadata.get("secret") and (name, field.name) != real:
                    value = f"{marker}-{name}-{field.name}"
                    markers.append(value)
                    tables.setdefault(name, {})[field.name] = value
                    env[f"OVERLAYD_{name.upper().replace('-', '_')}_{field.name.upper()}"] = value
    return tables, env, markers


def test_json_logs_one_line_per_plan_and_no_secret_anywhere(make_cluster, tmp_path):
    needs_etcd()
    cluster = make_cluster(2, store_ns=True)
    cluster.start_etcd()
    password = "pw-" + os.urandom(6).hex()
    cluster.etcd.enable_auth(password=password)
    tables, env, markers = secret_settings("mk" + os.urandom(4).hex(), real=("etcd", "password"))
    # The secrets go in a config file (the process list, and the test harness's log header
    # that repeats the command line, must not carry them either).
    tables.setdefault("etcd", {}).update(username="root", password=password)
    config = tmp_path / "overlayd.toml"
    config.write_text("".join(f"[{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in opts.items())
                              for name, opts in tables.items()))  # fmt: skip
    store = ["--config", str(config), "--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint]
    args = daemon_args(store, "--healthz-port", str(PORT), "--log-format", "json")
    for host in cluster.hosts:
        lo_up(host)
        host.start_daemon(args)
    for host in cluster.hosts:
        host.wait_ready(30)
    wait_full_mesh_routes(cluster)
    h0 = cluster.hosts[0]
    wait_metric(h0, "4 passes", lambda s: value(s, "overlayd_reconcile_passes_total", result="ok") >= 4, timeout=30)

    # A daemon with a wrong password: its error names the flags, never the value.
    wrong = "wrong-" + os.urandom(6).hex()
    bad = cluster.overlayd_cli(*daemon_args(["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint,
                                             "--etcd-username", "root", "--etcd-password", wrong],
                                            "--log-format", "json"),
                               "--iface", cluster.hosts[1].underlay_if, "--subnet-file", str(tmp_path / "x.env"), "run",
                               host=1, timeout=60)  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "--etcd-password" in bad.stderr

    texts = {
        "metrics": scrape_text(h0),
        "status": cluster.overlayd_cli("--healthz-port", str(PORT), "status", "--json").stdout,
        "bad daemon": bad.stdout + bad.stderr,
    }
    child_env = {**{k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}, **env}
    child_env["OVERLAYD_ETCD_PASSWORD"] = password
    for argv in (["plugins"], ["--help"], ["run", "--help"]):
        proc = subprocess.run([cluster.overlayd, *argv], env=child_env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        texts[" ".join(argv)] = proc.stdout + proc.stderr
    for host in cluster.hosts:
        host.daemon.stop()
        texts[f"{host.name} log"] = host.daemon.log_path.read_text()
    for what, text in texts.items():
        for secret in (password, wrong, *markers):
            assert secret not in text, f"{secret!r} appears in {what}"

    log_lines = [line for line in texts["host0 log"].splitlines() if not line.startswith("=== start")]
    docs = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert docs and len(docs) == len([line for line in log_lines if line.strip()]), "every log line is one JSON object"
    assert all({"time", "level", "logger", "message"} <= doc.keys() for doc in docs)
    plans = [doc for doc in docs if doc["message"].startswith("reconciled:")]
    assert len(plans) == 1, plans  # one peer joined: one non-empty plan, however many passes ran
    assert plans[0]["level"] == "info" and plans[0]["added"] == 3 and plans[0]["removed"] == 0
