"""The command line: user errors are one line and exit 2; plugin options become flags and env vars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        (("--store", "nope", "leases"), "unknown store 'nope'; installed stores: embedded, etcd"),
        (("network", "init", "--network", "10.0.0.0/40"), "is not an IPv4 CIDR"),
        (("network", "init", "--network", "10.0.0.0/16", "--backend", "warp"), "unknown backend 'warp'"),
        (("network", "init"), "needs --network"),
        (("network", "show"), "has no network config"),
        (("reserve", "10.244.3.7/24", "192.0.2.1"), "is not a subnet"),
        (("reserve", "10.244.3.0/24", "nope"), "is not an IPv4 address"),
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
    (tmp_path / "fakeconsul.py").write_text("import consul  # not installed on purpose\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert_user_error(
        run("--store", "fake-consul", "leases", env=env),
        "store 'fake-consul' needs the Python package 'consul'; install it with: pip install 'overlayd[consul]'",
    )
    listing = run("plugins", env=env)
    assert listing.returncode == 0 and "fake-consul  (unavailable: store 'fake-consul' needs" in listing.stdout
