"""Real etcd servers for the demo and for tests: one member, a three-member cluster, TLS and auth on request.

Every process runs Debian's ``/usr/bin/etcd`` on random free ports with a temporary data
directory, both named with a per-run prefix (``OVERLAYD_TEST_PREFIX`` or ``ovt<pid>``) so that
leftovers can be traced to the run that made them.  Each server is started in its own process
group and registered with ``atexit``: a test that fails, or forgets to call ``stop()``, still
leaves no process and no directory behind.

The listen address and a command prefix are parameters, so end-to-end tests can run a member
inside a network namespace::

    EtcdServer(listen_host="192.0.2.1", command_prefix=["ip", "netns", "exec", "ovt-ns1"])

``pause()``/``resume()`` send SIGSTOP/SIGCONT: the TCP sockets stay open but nothing answers,
which is how a hung or partitioned member looks to a client.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import attrs

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
RUN_PREFIX = os.environ.get("OVERLAYD_TEST_PREFIX", f"ovt{os.getpid()}")

_counter = itertools.count(1)
_live: weakref.WeakSet[EtcdServer] = weakref.WeakSet()
_live_lock = threading.Lock()


class EtcdError(RuntimeError):
    """The test etcd would not start, or an etcdctl command failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on *host* right now (binding 127.0.0.1 when *host* is not local)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:  # an address of another network namespace: any free number will do
            sock.close()
            return free_port("127.0.0.1")
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@attrs.frozen
class TLSFiles:
    """PEM files for a test PKI: one CA, a server certificate and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path | str, hosts: Sequence[str] = ("127.0.0.1",), client_name: str = "root") -> TLSFiles:
    """Write a CA, a server cert valid for *hosts* (plus localhost) and a client cert into *directory*.

    The client certificate's common name is *client_name* (etcd maps it to a user when auth is on).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(f"{RUN_PREFIX} test CA"))
        .issuer_name(name(f"{RUN_PREFIX} test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common: str, usage: x509.ObjectIdentifier, sans: Sequence[str]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            entries: list[x509.GeneralName] = []
            for host in sans:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    entries.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = issue("etcd-server", ExtendedKeyUsageOID.SERVER_AUTH, [*hosts, "localhost"])
    client_cert, client_key = issue(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = TLSFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.server_key)
    write_key(client_key, files.client_key)
    return files


class EtcdServer:
    """One etcd member on *listen_host*, on random free ports, with a temporary data dir.

    Use as a context manager, or call ``start()`` and ``stop()``.  ``stop()`` removes the data
    directory; ``kill()`` and ``terminate()`` keep it, so ``start()`` brings the same member back.
    With *tls*, clients must use ``https://`` and (with *client_cert_auth*, the default) present
    a certificate signed by ``tls.ca``.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        listen_host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        data_dir: Path | str | None = None,
        binary: str = ETCD,
        command_prefix: Sequence[str] = (),
        tls: TLSFiles | None = None,
        client_cert_auth: bool = True,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name or f"{RUN_PREFIX}-etcd{next(_counter)}"
        self.listen_host = listen_host
        self._random_ports = client_port is None and peer_port is None and initial_cluster is None
        self.client_port = client_port or free_port(listen_host)
        self.peer_port = peer_port or free_port(listen_host)
        self._own_dir = data_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-")) if data_dir is None else Path(data_dir)
        self.data_dir = self.base_dir / "data" if data_dir is None else Path(data_dir)
        self.log_path = (self.base_dir if self._own_dir else Path(tempfile.gettempdir())) / f"{self.name}.log"
        self.binary = binary
        self.command_prefix = list(command_prefix)
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token or f"{self.name}-cluster"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._started_once = False
        self.auth_user: str | None = None
        self.auth_password: str | None = None
        with _live_lock:
            _live.add(self)

    # -- addresses -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_url_host(self.listen_host)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_url_host(self.listen_host)}:{self.peer_port}"

    def store_options(self, prefix: str | None = None) -> dict[str, str]:
        """Options for ``open_store("etcd", ...)`` that reach this member (TLS and auth included)."""
        options = {"endpoints": self.endpoint}
        if prefix is not None:
            options["prefix"] = prefix
        if self.tls:
            options.update(
                cafile=str(self.tls.ca), certfile=str(self.tls.client_cert), keyfile=str(self.tls.client_key)
            )
        if self.auth_user and self.auth_password:
            options.update(username=self.auth_user, password=self.auth_password)
        return options

    # -- lifecycle -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        args = [
            *self.command_prefix,
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            f"--initial-cluster-token={self.cluster_token}",
            f"--initial-cluster-state={'existing' if self._started_once else 'new'}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            args += [f"--cert-file={self.tls.server_cert}", f"--key-file={self.tls.server_key}"]
            if self.client_cert_auth:  # etcd 3.4 asks every client for a certificate once it has a CA
                args += [f"--trusted-ca-file={self.tls.ca}", "--client-cert-auth"]
        return args + self.extra_args

    def launch(self) -> None:
        """Start the process without waiting for it to be healthy (clusters start members together)."""
        if self.process is not None and self.process.poll() is None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        self._paused = False

    def start(self, timeout: float = 30.0) -> Self:
        for attempt in range(3):
            self.launch()
            try:
                self.wait_healthy(timeout)
                break
            except EtcdError:
                # Another process took a "free" port between our probe and etcd's bind: new ports.
                raced = "address already in use" in self.log_tail(50)
                if not (raced and self._random_ports and not self._started_once and attempt < 2):
                    raise
                self.client_port, self.peer_port = free_port(self.listen_host), free_port(self.listen_host)
                shutil.rmtree(self.data_dir, ignore_errors=True)
        self._started_once = True
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise EtcdError(f"etcd {self.name} exited ({self._exit_text()}); log:\n{self.log_tail()}")
            try:
                if self.healthy():
                    return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise EtcdError(f"etcd {self.name} not healthy after {timeout}s ({last}); log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """True when ``/health`` answers ``{"health":"true"}`` (the member has a leader).

        With a command prefix (another network namespace) the check runs ``etcdctl endpoint
        health`` through the same prefix, since this process may not reach the address.
        """
        if self.command_prefix:
            try:
                self.etcdctl("endpoint", "health", timeout=5.0, auth=False)
            except (EtcdError, subprocess.TimeoutExpired):
                return False
            return True
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0, context=context) as response:
            return b'"true"' in response.read()

    def _exit_text(self) -> str:
        return "not started" if self.process is None else f"exit code {self.process.returncode}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL, like a crash; the data dir stays so ``start()`` can bring the member back."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        if self._paused:
            self._signal(signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._paused = False

    def wipe(self, timeout: float = 30.0) -> None:
        """SIGKILL, delete the data dir, start a fresh member on the same ports: etcd's data lost."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._started_once = False
        self.start(timeout)

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (then SIGKILL), keeping the data dir."""
        if self.process is None:
            return
        if self._paused:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self) -> None:
        """Stop the process and remove everything this server made."""
        self.terminate()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:  # the data dir is the caller's; the log sits in the temp dir
            self.log_path.unlink(missing_ok=True)
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- etcdctl -------------------------------------------------------------------------------

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 30.0, auth: bool = True) -> str:
        """Run ``etcdctl`` against this member (TLS and, once enabled, root credentials included)."""
        command = [*self.command_prefix, ETCDCTL, f"--endpoints={self.endpoint}", "--command-timeout=10s"]
        if self.tls:
            command += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if auth and self.auth_user and self.auth_password:
            command.append(f"--user={self.auth_user}:{self.auth_password}")
        env = {**os.environ, "ETCDCTL_API": "3"}
        result = subprocess.run([*command, *args], capture_output=True, env=env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    def enable_auth(self, password: str = "root-secret", user: str = "root") -> None:
        """Create the root user with *password* and turn authentication on."""
        self.etcdctl("user", "add", user, f"--new-user-password={password}")
        if user == "root":
            self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.auth_user, self.auth_password = user, password

    def compact(self) -> int:
        """Compact the history up to the current revision; returns that revision."""
        import json

        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        revision = int(status[0]["Status"]["header"]["revision"])
        self.etcdctl("compaction", str(revision))
        return revision


class EtcdCluster:
    """*size* members on one host that form one cluster; ``endpoints`` lists them all.

    With *base_port* the members listen on ``base_port + 2i`` (clients) and ``base_port + 2i + 1``
    (peers) -- for a network namespace of the test's own, where every port is free -- else on
    random free ports.  ``leader()`` asks the members' status API which of them leads, so a test
    can SIGKILL exactly that one.
    """

    def __init__(
        self, size: int = 3, *, listen_host: str = "127.0.0.1", base_port: int | None = None, **kwargs: object
    ) -> None:
        token = f"{RUN_PREFIX}-cluster{next(_counter)}"
        names = [f"{token}-m{i}" for i in range(size)]
        if base_port is None:
            ports = [(free_port(listen_host), free_port(listen_host)) for _ in names]
        else:
            ports = [(base_port + 2 * i, base_port + 2 * i + 1) for i in range(size)]
        peers = ",".join(f"{n}=http://{_url_host(listen_host)}:{p}" for n, (_, p) in zip(names, ports, strict=True))
        self.members = [
            EtcdServer(
                name=n,
                listen_host=listen_host,
                client_port=c,
                peer_port=p,
                initial_cluster=peers,
                cluster_token=token,
                **kwargs,  # type: ignore[arg-type]
            )
            for n, (c, p) in zip(names, ports, strict=True)
        ]

    @property
    def endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.members)

    def start(self, timeout: float = 30.0) -> Self:
        try:
            for member in self.members:
                member.launch()
            for member in self.members:
                member.wait_healthy(timeout)
                member._started_once = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def kill(self) -> None:
        """SIGKILL every member (data dirs kept)."""
        for member in self.members:
            member.kill()

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """``etcdctl`` with every running member as an endpoint (a killed one would cost a timeout)."""
        running = [m for m in self.members if m.running and not m._paused] or self.members
        endpoints = ",".join(m.endpoint for m in running)
        return running[0].etcdctl(f"--endpoints={endpoints}", *args, check=check, timeout=timeout)

    def leader(self) -> EtcdServer:
        """The member that leads right now, from the status API (``etcdctl endpoint status``)."""
        import json

        statuses = json.loads(self.etcdctl("endpoint", "status", "-w", "json", check=False) or "[]")
        by_endpoint = {m.endpoint: m for m in self.members}
        for status in statuses:
            header = status["Status"]["header"]
            if header["member_id"] == status["Status"]["leader"] and status["Endpoint"] in by_endpoint:
                return by_endpoint[status["Endpoint"]]
        raise EtcdError(f"no member of {self.endpoints} says it is the leader: {statuses}")

    def member_ids(self) -> dict[str, int]:
        """Each running member's endpoint -> its member id, from the status API."""
        import json

        statuses = json.loads(self.etcdctl("endpoint", "status", "-w", "json", check=False) or "[]")
        return {status["Endpoint"]: int(status["Status"]["header"]["member_id"]) for status in statuses}

    def move_leader(self, member: EtcdServer) -> None:
        """Hand the leadership to *member* (``etcdctl move-leader``, sent to the current leader)."""
        target = self.member_ids()[member.endpoint]
        leader = self.leader()
        if leader is not member:
            leader.etcdctl("move-leader", format(target, "x"))

    def compact(self) -> int:
        """Compact the whole history up to the current revision; returns that revision."""
        return next(m for m in self.members if m.running).compact()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@atexit.register
def _cleanup() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
