"""The command line: user errors are one line and exit 2; plugin options become flags and env vars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]


def run(*args: str, env: dict[str, str] | None = None, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    if path is not None:
        full_env["OVERLAYD_EMBEDDED_PATH"] = str(path)
    full_env.update(env or {})
    return subprocess.run([*OVERLAYD, *args], capture_output=True, text=True, env=full_env, timeout=60)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0]


def test_help_lists_commands_and_plugin_flags() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("network", "leases", "reserve", "unreserve", "plugins", "run", "--embedded-path", "--etcd-endpoints"):
        assert word in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--store", "nope", "leases"), "unknown store 'nope'; installed stores: consul, embedded, etcd, kubernetes"),
        (("network", "init", "--network", "10.0.0.0/40"), "is not an IPv4 CIDR"),
        (("network", "init", "--network", "10.0.0.0/16", "--backend", "warp"), "unknown backend 'warp'"),
        (("network", "init"), "needs --network"),
        (("network", "show"), "has no network config"),
        (("reserve", "10.244.3.7/24", "192.0.2.1"), "is not a subnet"),
        (("reserve", "10.244.3.0/24", "nope"), "is not an IP address"),
        (("reserve", "fd00:1:0:3::/64", "192.0.2.1"), "is not an IPv6 address like SUBNET"),
        (("--embedded-history", "many", "leases"), "'many' is not a valid integer"),
        (("--log-level", "loud", "leases"), "--log-level"),
        (("frobnicate",), "No such command"),
    ],
)
def test_user_errors(db: Path, args: tuple[str, ...], fragment: str) -> None:
    assert_user_error(run(*args, path=db), fragment)


def test_bad_json_config_file(db: Path, tmp_path: Path) -> None:
    bad = tmp_path / "net.json"
    bad.write_text('{"Network": "10.0.0.0/16", "SubnetLen": 40}')
    assert_user_error(run("network", "init", "--from-json", str(bad), path=db), "SubnetLen 40 is too long")
    bad.write_text("{nope")
    assert_user_error(run("network", "init", "--from-json", str(bad), path=db), "not valid JSON")


def test_network_init_show_and_refuse_overwrite(db: Path) -> None:
    assert run("network", "init", "--network", "10.244.0.0/16", "--subnet-len", "26", path=db).returncode == 0
    shown = json.loads(run("network", "show", path=db).stdout)
    assert shown["Network"] == "10.244.0.0/16" and shown["SubnetLen"] == 26 and shown["Backend"] == {"Type": "vxlan"}
    assert_user_error(run("network", "init", "--network", "10.9.0.0/16", path=db), "--force")
    assert run("network", "init", "--network", "10.9.0.0/16", "--force", path=db).returncode == 0


def test_reserve_leases_unreserve(db: Path) -> None:
    run("network", "init", "--network", "10.244.0.0/16", path=db)
    assert run("reserve", "10.244.7.0/24", "192.0.2.7", path=db).returncode == 0
    assert_user_error(run("reserve", "10.99.7.0/24", "192.0.2.7", path=db), "not a /24 subnet")
    table = run("leases", path=db).stdout
    assert "10.244.7.0/24" in table and "never (reserved)" in table
    doc = json.loads(run("leases", "--json", path=db).stdout)
    assert doc["leases"][0]["reservation"] is True and doc["leases"][0]["public_ip"] == "192.0.2.7"
    assert run("unreserve", "10.244.7.0/24", path=db).returncode == 0
    assert json.loads(run("leases", "--json", path=db).stdout)["leases"] == []


def test_env_vars_and_config_file(tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    assert run("network", "init", "--network", "10.1.0.0/16", env={"OVERLAYD_EMBEDDED_PATH": str(db)}).returncode == 0
    config = tmp_path / "overlayd.toml"
    config.write_text(f'store = "embedded"\n[embedded]\npath = "{db}"\n')
    assert json.loads(run("--config", str(config), "network", "show").stdout)["Network"] == "10.1.0.0/16"
    config.write_text("bogus = 1\n")
    assert_user_error(run("--config", str(config), "leases"), "unknown setting(s) bogus")


def test_plugins_lists_builtin_and_third_party_with_options() -> None:
    out = run("plugins").stdout
    assert "embedded" in out and "--embedded-path" in out
    assert "alloc" in out
    # the example third-party package (examples/routes-file-backend) is installed by `make test`
    assert "routes-file" in out and "--routes-file-path" in out


def test_release_deletes_a_lease_but_not_a_reservation(db: Path) -> None:
    import overlayd
    from overlayd.testing.store_contract import attrs_for

    run("network", "init", "--network", "10.244.0.0/16", path=db)
    store = overlayd.open_store("embedded", path=str(db))
    config = overlayd.read_network_config(store)
    assert config is not None
    lease = store.acquire_lease(config, attrs_for("192.0.2.5"))
    store.close()
    run("reserve", "10.244.9.0/24", "192.0.2.9", path=db)
    assert_user_error(run("release", "10.244.9.0/24", path=db), "is a reservation")
    assert_user_error(run("release", "10.244.200.0/24", path=db), "no lease for 10.244.200.0/24")
    result = run("release", str(lease.subnet), path=db)
    assert result.returncode == 0 and "was 192.0.2.5" in result.stdout
    left = json.loads(run("leases", "--json", path=db).stdout)["leases"]
    assert [x["subnet"] for x in left] == ["10.244.9.0/24"]


def test_daemon_run_with_a_third_party_backend_configured_by_flag_and_env(tmp_path: Path) -> None:
    """`overlayd run` as a process, the example routes-file backend's option given as a flag for one
    host and as OVERLAYD_ROUTES_FILE_PATH for the other; each writes the other's route."""
    import signal
    import time

    db = tmp_path / "store.db"
    hosts = []
    for name, ip, how in (("a", "192.0.2.1", "flag"), ("b", "192.0.2.2", "env")):
        routes = tmp_path / f"{name}.json"
        args = ["--backend", "routes-file", "--network", "10.40.0.0/16", "--iface", "lo", "--public-ip", ip,
                "--subnet-file", str(tmp_path / f"{name}.env"), "--resync-period", "0.5"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
        env["OVERLAYD_EMBEDDED_PATH"] = str(db)
        if how == "flag":
            args += ["--routes-file-path", str(routes)]
        else:
            env["OVERLAYD_ROUTES_FILE_PATH"] = str(routes)
        proc = subprocess.Popen([*OVERLAYD, *args, "run"], env=env, stderr=subprocess.PIPE, text=True)
        hosts.append((proc, routes, ip))
    try:
        deadline = time.monotonic() + 20
        want = {"a": "192.0.2.2", "b": "192.0.2.1"}
        got: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            got = {}
            for (_, routes, _), name in zip(hosts, "ab", strict=True):
                if routes.exists():
                    got[name] = [row["via"] for row in json.loads(routes.read_text())]
            if got == {k: [v] for k, v in want.items()}:
                break
            time.sleep(0.1)
        assert got == {k: [v] for k, v in want.items()}
    finally:
        for proc, _, _ in hosts:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in hosts:
            assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.etcd
def test_cli_against_real_etcd_writes_what_etcdctl_reads() -> None:
    from overlayd.testing.etcd import EtcdServer

    with EtcdServer() as etcd:
        store = ("--store", "etcd", "--etcd-endpoints", etcd.endpoint)
        assert run(*store, "network", "init", "--network", "10.244.0.0/16").returncode == 0
        assert json.loads(run(*store, "network", "show").stdout)["Network"] == "10.244.0.0/16"
        assert run(*store, "reserve", "10.244.9.0/24", "192.0.2.9").returncode == 0
        table = run(*store, "leases").stdout
        assert "10.244.9.0/24" in table and "never (reserved)" in table
        config = json.loads(etcd.etcdctl("get", "--print-value-only", "/coreos.com/network/config"))
        assert config["Network"] == "10.244.0.0/16" and config["Backend"] == {"Type": "vxlan"}
        value = etcd.etcdctl("get", "--print-value-only", "/coreos.com/network/subnets/10.244.9.0-24").strip()
        assert value == '{"PublicIP":"192.0.2.9","PublicIPv6":null,"BackendType":"","BackendData":null}'
        assert run(*store, "unreserve", "10.244.9.0/24").returncode == 0
        assert json.loads(run(*store, "leases", "--json").stdout)["leases"] == []
        assert_user_error(run("--store", "etcd", "--etcd-endpoints", "ftp://x", "leases"), "etcd")


def test_plugin_missing_its_optional_dependency_gets_a_pip_hint(tmp_path: Path) -> None:
    """A plugin whose client library is not installed: exit 2 with the extra to install."""
    dist = tmp_path / "fakeconsul-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeconsul\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[overlayd.stores]\nfake-consul = fakeconsul:Store\n")
    # py-consul is installed for the consul store's tests: None in sys.modules makes it unimportable here
    (tmp_path / "fakeconsul.py").write_text("import sys\nsys.modules['consul'] = None\nimport consul\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert_user_error(
        run("--store", "fake-consul", "leases", env=env),
        "store 'fake-consul' needs the Python package 'consul'; install it with: pip install 'overlayd[consul]'",
    )
    listing = run("plugins", env=env)
    assert listing.returncode == 0 and "fake-consul  (unavailable: store 'fake-consul' needs" in listing.stdout


# -- issue 9 / 10: options of the backend in force, start-up checks, signals, lazy plugins --------


def _daemon(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`overlayd ... run` on lo with the embedded store in *tmp_path*."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    full_env["OVERLAYD_EMBEDDED_PATH"] = str(tmp_path / "store.db")
    full_env.update(env or {})
    argv = [*OVERLAYD, "--iface", "lo", "--public-ip", "192.0.2.1", "--subnet-file", str(tmp_path / "subnet.env"),
            "--resync-period", "0.3", *args, "run"]  # fmt: skip
    return subprocess.Popen(argv, env=full_env, stderr=subprocess.PIPE, text=True)


def _peer_lease(db: Path, ip: str, backend: str) -> None:
    from ipaddress import IPv4Address

    import overlayd

    store = overlayd.open_store("embedded", path=str(db))
    config = overlayd.read_network_config(store)
    assert config is not None
    store.acquire_lease(config, overlayd.LeaseAttrs(public_ip=IPv4Address(ip), backend_type=backend))
    store.close()


def _wait(check: Any, timeout: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["flag", "env", "toml"])
def test_backend_options_apply_when_the_backend_comes_from_the_stored_config(tmp_path: Path, how: str) -> None:
    """No --backend: the type comes from `network init`; its options must still be used (they were
    dropped before), and an option for another backend is a warning naming both."""
    import signal

    db = tmp_path / "store.db"
    assert run("network", "init", "--network", "10.41.0.0/16", "--backend", "routes-file", path=db).returncode == 0
    _peer_lease(db, "192.0.2.9", "routes-file")  # so the routes file has something to say
    routes = tmp_path / "routes.json"
    args: list[str] = ["--vxlan-port", "9999"]
    env: dict[str, str] = {}
    if how == "flag":
        args += ["--routes-file-path", str(routes)]
    elif how == "env":
        env["OVERLAYD_ROUTES_FILE_PATH"] = str(routes)
    else:
        config = tmp_path / "overlayd.toml"
        config.write_text(f'[routes-file]\npath = "{routes}"\n')
        args += ["--config", str(config)]
    proc = _daemon(tmp_path, *args, env=env)
    try:
        assert _wait(lambda: (tmp_path / "subnet.env").exists()), "daemon never became ready"
        assert _wait(lambda: routes.exists() and "192.0.2.9" in routes.read_text()), "--routes-file-path was ignored"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "ignoring option(s) --vxlan-port of backend vxlan: the backend in force is routes-file" in stderr


def test_sighup_is_logged_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    """SIGHUP used to end the daemon silently (exit 129) and skip --release-on-exit."""
    import signal
    import time

    import overlayd

    db = tmp_path / "store.db"
    run("network", "init", "--network", "10.42.0.0/16", "--backend", "routes-file", path=db)
    proc = _daemon(tmp_path, "--routes-file-path", str(tmp_path / "r.json"), "--release-on-exit")
    try:
        assert _wait(lambda: (tmp_path / "subnet.env").exists())
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGHUP ended the daemon"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr
    assert "received SIGHUP" in stderr
    store = overlayd.open_store("embedded", path=str(db))
    assert not store.list_leases().leases  # --release-on-exit still ran
    store.close()


def _immutable_dir(tmp_path: Path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    return locked


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("under-file", "is a file, not a directory"),
        ("directory", "is a directory"),
        ("empty", "--subnet-file is empty"),
        ("unwritable", "cannot create files in"),
        ("device", "is not a regular file"),
    ],
)
def test_bad_subnet_file_is_one_line_before_the_store_is_touched(tmp_path: Path, case: str, fragment: str) -> None:
    db = tmp_path / "store.db"
    plain = tmp_path / "plain"
    plain.write_text("x")
    paths = {
        "under-file": str(plain / "subnet.env"),
        "directory": str(tmp_path),
        "empty": "",
        "device": "/dev/full",  # also: reading it used to run until the OOM killer came
    }
    locked = _immutable_dir(tmp_path) if case == "unwritable" else None
    try:
        path = str(locked / "subnet.env") if locked else paths[case]
        result = subprocess.run(
            [*OVERLAYD, "--network", "10.43.0.0/16", "--backend", "routes-file", "--iface", "lo",
             "--public-ip", "192.0.2.1", "--subnet-file", path, "--routes-file-path", str(tmp_path / "r.json"), "run"],
            capture_output=True, text=True, timeout=30, env={**os.environ, "OVERLAYD_EMBEDDED_PATH": str(db)},
        )  # fmt: skip
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert_user_error(result, fragment)
    assert not db.exists(), "the store was touched before the subnet file was checked"


def test_bad_health_address_or_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    db = tmp_path / "store.db"
    common = ["--network", "10.44.0.0/16", "--backend", "routes-file", "--iface", "lo", "--public-ip", "192.0.2.1",
              "--subnet-file", str(tmp_path / "s.env"), "--routes-file-path", str(tmp_path / "r.json")]  # fmt: skip
    result = run(*common, "--healthz-ip", "203.0.113.77", "--healthz-port", "18999", "run", path=db)
    assert_user_error(result, "cannot serve health checks on 203.0.113.77:18999: not an address of this host")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(*common, "--healthz-port", str(port), "run", path=db)
    assert_user_error(result, f"cannot serve health checks on 127.0.0.1:{port}")
    assert not db.exists()


def test_non_utf8_config_file_is_one_line(tmp_path: Path, db: Path) -> None:
    config = tmp_path / "overlayd.toml"
    config.write_bytes(b'store = "embedded"\n# caf\xe9\n')
    assert_user_error(run("--config", str(config), "leases", path=db), "is not UTF-8 text")


def test_status_and_demo_help_import_no_plugin() -> None:
    """Building every plugin's flags imported grpc (etcd) for `overlayd status`."""
    code = (
        "import sys\n"
        "from overlayd.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('grpc', 'etcd3') or m.startswith('overlayd.stores.'))\n"
        "print('HEAVY', heavy)\n"
    )
    for args in (["status"], ["status", "--help"], ["--healthz-port", "1", "status"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY []" in result.stdout, (args, result.stdout, result.stderr)
    # a plugin flag still works in front of a light command, and --help shows it
    result = subprocess.run([sys.executable, "-c", code, "--etcd-prefix", "/x", "status"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert "no such option" not in result.stdout + result.stderr


def test_help_has_one_section_per_plugin_after_the_core_options() -> None:
    out = run("--help").stdout
    core = out.index("Core options:")
    sections = [out.index(f"{title} options:") for title in ("Store embedded", "Store etcd", "Backend vxlan")]
    assert core < min(sections)
    assert out.index("--etcd-endpoints") > out.index("Store etcd options:")
    assert out.index("--vxlan-port") > out.index("Backend vxlan options:")


def test_demo_module_does_not_import_test_code() -> None:
    """`overlayd demo --store etcd` crashed on a plain install: it imported overlayd.testing,
    whose contract suites import pytest.  Block pytest and hypothesis outright and import it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'hypothesis'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import overlayd.demo, overlayd.cli, overlayd._topology as t\n"
        "c = t.Cluster(1, store_ns=True)\n"
        "c.store_ns = c.prefix + 'nowhere'  # not built: etcd cannot start, but its launcher must import\n"
        "try:\n"
        "    c.start_etcd(timeout=2)\n"
        "except t.TopologyError:\n"
        "    pass\n"
        "finally:\n"
        "    c.cleanup()\n"
        "assert 'overlayd.testing' not in sys.modules, sorted(sys.modules)\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "OK", result.stderr


def test_dual_stack_leases_reserve_and_release(db: Path, tmp_path: Path) -> None:
    import overlayd
    from overlayd.testing.store_contract import dual_attrs_for

    conf = tmp_path / "net.json"
    conf.write_text('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:44::/48"}')
    assert run("network", "init", "--from-json", str(conf), path=db).returncode == 0
    store = overlayd.open_store("embedded", path=str(db))
    config = overlayd.read_network_config(store)
    assert config is not None
    lease = store.acquire_lease(config, dual_attrs_for("192.0.2.5", "2001:db8::5"))
    store.close()
    assert run("reserve", "fd00:44:0:9::/64", "2001:db8::9", path=db).returncode == 0
    assert_user_error(run("reserve", "fd00:99:0:9::/64", "2001:db8::9", path=db), "not a /64 subnet between")
    table = run("leases", path=db).stdout.splitlines()
    assert table[0].split()[:3] == ["SUBNET", "PUBLIC", "IP"]
    rows = [line.split()[:2] for line in table[1:]]
    assert rows[0] == [str(lease.subnet), "192.0.2.5"]  # IPv4 first, then IPv6 by address
    assert sorted(rows[1:]) == sorted([[str(lease.ipv6_subnet), "2001:db8::5"], ["fd00:44:0:9::/64", "2001:db8::9"]])
    doc = json.loads(run("leases", "--json", path=db).stdout)["leases"]
    v6 = next(x for x in doc if x["ipv6_subnet"] == str(lease.ipv6_subnet))
    assert v6["public_ipv6"] == "2001:db8::5" and v6["backend_v6_data"]["VNI"] == 1
    result = run("release", str(lease.ipv6_subnet), path=db)
    assert result.returncode == 0 and "was 2001:db8::5" in result.stdout
    left = {x["subnet"] or x["ipv6_subnet"] for x in json.loads(run("leases", "--json", path=db).stdout)["leases"]}
    assert left == {str(lease.subnet), "fd00:44:0:9::/64"}
    assert run("unreserve", "fd00:44:0:9::/64", path=db).returncode == 0


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("fe80::1", "--public-ipv6 fe80::1 is an IPv6 link-local address"),
        ("10.0.0.1", "--public-ipv6 '10.0.0.1' is not an IPv6"),
    ],
)
def test_bad_public_ipv6_is_one_line(db: Path, tmp_path: Path, value: str, fragment: str) -> None:
    args = ["--iface", "lo", "--public-ipv6", value, "--subnet-file", str(tmp_path / "subnet.env"), "run"]
    assert_user_error(run(*args, path=db), fragment)
    assert not db.exists() or json.loads(run("leases", "--json", path=db).stdout)["leases"] == []


def test_ipv6_on_without_an_ipv6_address_is_one_line(db: Path, tmp_path: Path) -> None:
    conf = tmp_path / "net.json"
    conf.write_text(
        '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:44::/48", "Backend": {"Type": "alloc"}}'
    )
    assert run("network", "init", "--from-json", str(conf), path=db).returncode == 0
    args = ["--iface", "lo", "--public-ip", "192.0.2.1", "--subnet-file", str(tmp_path / "subnet.env"), "run"]
    assert_user_error(run(*args, path=db), "interface lo has no global IPv6 address; pass --public-ipv6")
    assert json.loads(run("leases", "--json", path=db).stdout)["leases"] == []
