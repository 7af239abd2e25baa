"""TLS verification is on by default, and a bad certificate is one line naming the endpoint, the
problem and the flag that fixes it (exit code 2, no traceback).

etcd: Debian's etcd serving a certificate for 127.0.0.1 signed by a CA made here with
``cryptography`` (server TLS only: no client certificates asked for).  Consul: the fake Consul
server (``overlayd.testing.consul_server``) behind Python's ``ssl`` with the same kind of
certificate.  Neither store has an option that turns verification off, and none is added: an
https:// etcd endpoint without ``--etcd-cafile`` is refused before any connection is made, and
``--consul-scheme https`` without ``--consul-cafile`` verifies against the system's CAs.
(The Kubernetes store takes TLS from its kubeconfig, whose ``insecure-skip-tls-verify`` is the
kubeconfig's own explicit opt-out, honoured as kubectl does.)
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from overlayd import open_store
from overlayd.errors import UserError
from overlayd.testing.consul_server import FakeConsul
from overlayd.testing.etcd import EtcdServer, TLSFiles, make_tls
from overlayd.testing.store_contract import NETWORK, attrs_for

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]


@attrs.frozen
class Pki:
    good: TLSFiles
    other: TLSFiles  # a second CA, which signed nothing the servers use


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    return Pki(make_tls(root / "good"), make_tls(root / "other"))


@pytest.fixture(scope="module")
def etcd(pki: Pki) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")
    with EtcdServer(tls=pki.good, client_cert_auth=False) as server:
        yield server


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYD, *args], capture_output=True, text=True, timeout=60)


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.etcd
def test_etcd_verifies_the_server_certificate(etcd: EtcdServer, pki: Pki) -> None:
    assert etcd.endpoint.startswith("https://")
    store = ["--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/tls-cli"]
    # (a) the right CA: works
    ok = cli(*store, "--etcd-cafile", str(pki.good.ca), "network", "init", "--network", "10.245.0.0/16")
    assert ok.returncode == 0, ok.stderr
    listed = cli(*store, "--etcd-cafile", str(pki.good.ca), "leases")
    assert listed.returncode == 0 and "SUBNET" in listed.stdout, listed.stderr
    # (b) no CA: refused before connecting, naming the endpoint and the flag
    line = one_line(cli(*store, "leases"))
    assert etcd.endpoint in line and "--etcd-cafile" in line, line
    # (b) a CA that did not sign the server's certificate
    started = time.monotonic()
    line = one_line(cli(*store, "--etcd-cafile", str(pki.other.ca), "leases"))
    took = time.monotonic() - started
    assert f"TLS handshake with etcd at {etcd.endpoint} failed" in line, line
    assert "not signed by the CA in --etcd-cafile" in line, line
    print(f"a wrong --etcd-cafile is reported in {took:.2f} s: {line}")
    # the same through the library, for the daemon's start-up path
    bad = open_store("etcd", endpoints=etcd.endpoint, cafile=str(pki.other.ca), prefix="/tls-cli")
    with pytest.raises(UserError, match="not signed by the CA in --etcd-cafile"):
        bad.get_config()
    bad.close()


@pytest.mark.etcd
def test_a_tls_file_that_is_not_pem_is_named(etcd: EtcdServer, pki: Pki, tmp_path: Path) -> None:
    """A CA file that is not a certificate at all, or a key that is not the certificate's: one
    line naming the flag.  (The CA case used to be "etcd unreachable", exit 1: retried forever.)"""
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    proc = cli("--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-cafile", str(junk), "leases")
    line = one_line(proc)
    assert "--etcd-cafile" in line and "no usable PEM CA certificate" in line, line
    mismatched = ["--etcd-certfile", str(pki.good.client_cert), "--etcd-keyfile", str(pki.other.client_key)]
    line = one_line(cli("--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-cafile", str(pki.good.ca),
                        *mismatched, "leases"))  # fmt: skip
    assert "--etcd-certfile" in line and "--etcd-keyfile" in line, line
    line = one_line(cli("--store", "consul", "--consul-scheme", "https", "--consul-cafile", str(junk), "leases"))
    assert "--consul-cafile" in line and "no usable PEM CA certificate" in line, line


@pytest.fixture
def consul_tls(pki: Pki) -> Iterator[FakeConsul]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.good.server_cert), str(pki.good.server_key))
    fake = FakeConsul()
    fake.httpd.socket = context.wrap_socket(fake.httpd.socket, server_side=True)
    with fake:
        yield fake


def test_consul_verifies_the_server_certificate(consul_tls: FakeConsul, pki: Pki) -> None:
    options = {"address": consul_tls.address, "scheme": "https", "prefix": "tls/network"}
    good = open_store("consul", **options, cafile=str(pki.good.ca))
    try:
        assert good.acquire_lease(NETWORK, attrs_for("192.0.2.1")).subnet is not None
    finally:
        good.close()
    store = ["--store", "consul", "--consul-address", consul_tls.address, "--consul-scheme", "https"]
    listed = cli(*store, "--consul-prefix", "tls/network", "--consul-cafile", str(pki.good.ca), "leases")
    assert listed.returncode == 0 and "192.0.2.1" in listed.stdout, listed.stderr
    for extra in ([], ["--consul-cafile", str(pki.other.ca)]):  # the system's CAs; another CA
        line = one_line(cli(*store, *extra, "leases"))
        assert f"TLS handshake with Consul at https://{consul_tls.address} failed" in line, line
        assert "certificate verify failed" in line and "--consul-cafile" in line, line
