"""Secrets never leave the process: the Consul token and the AWS keys, grepped for in every output.

``test_observability.py`` covers the etcd password (and sets every installed plugin's
``secret=True`` option to a marker in a daemon that does not use it).  Here the secret is in
use, at ``--log-level debug``, and the runs include failures, whose exception texts are where a
secret leaks most easily (a URL with a query string, a request's headers, a client's repr):

* Consul: the fake Consul demands the token (``--token``); two daemons use it (one from the
  config file, one from ``CONSUL_HTTP_TOKEN``); then ``leases`` with a wrong token (403), and
  ``leases`` and the daemon against an address where nothing listens, each given the token on
  the command line.
* AWS: the keys come the way the SDK takes them (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``); an ``aws-vpc`` daemon against moto's EC2 server, then one with an
  EC2 endpoint where nothing listens and one naming an unknown instance.

Grepped: daemon logs, ``/metrics``, ``overlayd status --json``, ``overlayd plugins``,
``--help`` and ``run --help`` (with the secrets in the environment), and every error line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from overlayd import _topology as topo
from overlayd.testing.ec2_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, Ec2Server
from overlayd.testing.etcd import free_port

from ._mesh import CONSUL_PORT, consul_address, daemon_args, wait_full_mesh_routes
from .test_aws_vpc import make_vpc, subnet_of, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]
PORT = 9184


def assert_no_secret(texts: dict[str, str], secrets: list[str]) -> None:
    assert all(len(s) >= 12 for s in secrets)  # long and random: a hit is a leak, not a coincidence
    for what, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} appears in {what}:\n{text[:3000]}"


def without_header(log: str) -> str:
    """A namespace process's log without the harness's ``=== start`` lines, which repeat the
    command line the test itself wrote (a secret on a command line is visible in ps anyway)."""
    return "\n".join(line for line in log.splitlines() if not line.startswith("=== start"))


def help_texts(env: dict[str, str]) -> dict[str, str]:
    texts = {}
    for argv in (["plugins"], ["--help"], ["run", "--help"]):
        proc = subprocess.run([*OVERLAYD, *argv], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        texts[" ".join(argv)] = proc.stdout + proc.stderr
    return texts


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYD_", "AWS_", "CONSUL_"))}
    return {**env, **extra}


def test_consul_token_never_appears(make_cluster, tmp_path: Path, figures) -> None:
    token = "ct-" + os.urandom(8).hex()
    wrong = "wrong-" + os.urandom(8).hex()
    cluster = make_cluster(2, store_ns=True)
    assert cluster.store_ns is not None
    argv = [sys.executable, "-m", "overlayd.testing.consul_server", "--host", str(topo.STORE_ADDRESS.ip)]
    fake = cluster.start_process(cluster.store_ns, [*argv, "--port", str(CONSUL_PORT), "--token", token], "consul.log")
    topo.wait_until(lambda: "listening on" in fake.log_tail(), 30, what="the fake Consul listening")
    address = consul_address(cluster)
    config = tmp_path / "overlayd.toml"
    config.write_text(f'[consul]\ntoken = "{token}"\n')
    store = ["--store", "consul", "--consul-address", address, "--consul-ttl", "10"]
    h0, h1 = cluster.hosts
    for host in cluster.hosts:
        host.ip("link", "set", "lo", "up")
    h0.start_daemon(daemon_args(["--config", str(config), *store], "--healthz-port", str(PORT)))
    os.environ["CONSUL_HTTP_TOKEN"] = token  # host1's daemon takes it from the environment
    try:
        h1.start_daemon(daemon_args(store, "--healthz-port", str(PORT)))
    finally:
        del os.environ["CONSUL_HTTP_TOKEN"]
    for host in cluster.hosts:
        host.wait_ready(30)
    wait_full_mesh_routes(cluster)

    fetch = "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1], timeout=5).read().decode())"
    texts = {"metrics": h0.exec([sys.executable, "-c", fetch, f"http://127.0.0.1:{PORT}/metrics"]).stdout}
    texts["status"] = cluster.overlayd_cli("--healthz-port", str(PORT), "status", "--json").stdout
    denied = cluster.overlayd_cli(*store, "--consul-token", wrong, "leases")
    assert denied.returncode == 2 and "denied" in denied.stderr and "--consul-token" in denied.stderr, denied.stderr
    nowhere = ["--store", "consul", "--consul-address", f"{topo.STORE_ADDRESS.ip}:{CONSUL_PORT + 1}"]
    unreachable = cluster.overlayd_cli(*nowhere, "--consul-token", token, "leases", timeout=60)
    assert unreachable.returncode == 1 and "did not answer" in unreachable.stderr, unreachable.stderr
    texts["wrong token"] = denied.stdout + denied.stderr
    texts["no server"] = unreachable.stdout + unreachable.stderr
    # a daemon whose store is down retries and logs; run it for a few seconds
    stray = cluster.start_process(h1.ns, [cluster.overlayd, *daemon_args(nowhere, "--consul-token", token),
                                          "--iface", h1.underlay_if, "--subnet-file", str(tmp_path / "x.env"), "run"],
                                  "stray.log")  # fmt: skip
    time.sleep(6)
    stray.stop()
    texts["daemon without a server"] = without_header(stray.log_path.read_text())
    assert "did not answer" in texts["daemon without a server"], texts["daemon without a server"]
    texts |= help_texts(clean_env(OVERLAYD_CONSUL_TOKEN=token, CONSUL_HTTP_TOKEN=token))
    for host in cluster.hosts:
        host.daemon.stop()
        texts[f"{host.name} log"] = without_header(host.daemon.log_path.read_text())
    assert "DEBUG" in texts["host0 log"]
    assert_no_secret(texts, [token, wrong])
    figures.add(f"consul token: absent from {len(texts)} outputs (logs at debug, metrics, status, help, errors)")


def test_aws_keys_never_appear(tmp_path: Path, figures) -> None:
    with Ec2Server() as ec2:
        _, instances, _ = make_vpc(ec2.client(), 2)
        env = clean_env(**Ec2Server.environment())
        port = free_port()
        base = [
            *OVERLAYD, "--log-level", "debug", "--embedded-path", str(tmp_path / "store.db"),
            "--backend", "aws-vpc", "--network", "10.215.0.0/16", "--aws-vpc-region", REGION,
            "--iface", "lo", "--firewall", "none", "--healthz-port", str(port),
        ]  # fmt: skip
        texts: dict[str, str] = {}
        log = tmp_path / "daemon.log"
        with log.open("w") as handle:
            daemon = subprocess.Popen(
                [*base, "--aws-vpc-endpoint-url", ec2.url, "--aws-vpc-instance-id", instances[0],
                 "--public-ip", "198.51.100.21", "--subnet-file", str(tmp_path / "a.env"), "run"],
                env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        try:
            assert wait_for(lambda: subnet_of(tmp_path / "a.env") is not None), log.read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                texts["metrics"] = answer.read().decode()
            status = subprocess.run([*OVERLAYD, "--healthz-port", str(port), "status", "--json"],
                                    env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
            assert status.returncode == 0, status.stderr
            texts["status"] = status.stdout + status.stderr
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(15)
        texts["daemon log"] = log.read_text()
        assert "DEBUG" in texts["daemon log"] and "aws-vpc" in texts["daemon log"]
        failures = {
            "no EC2 endpoint": ["--aws-vpc-endpoint-url", f"http://127.0.0.1:{free_port()}",
                                "--aws-vpc-instance-id", instances[1]],
            "unknown instance": ["--aws-vpc-endpoint-url", ec2.url, "--aws-vpc-instance-id", "i-0123456789abcdef0"],
        }  # fmt: skip
        for what, extra in failures.items():
            argv = [*base, *extra, "--public-ip", "198.51.100.22", "--subnet-file", str(tmp_path / "b.env"), "run"]
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
            texts[what] = proc.stdout + proc.stderr
        texts |= help_texts(env)
    assert_no_secret(texts, [ACCESS_KEY_ID, SECRET_ACCESS_KEY])
    figures.add(f"AWS keys: absent from {len(texts)} outputs (debug log, metrics, status, help, 2 failures)")
