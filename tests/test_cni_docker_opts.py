"""``overlayd docker-opts``: dockerd's flags from the subnet file (flannel's mk-docker-opts.sh),
run as the installed command."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

OVERLAYD = str(Path(sys.executable).with_name("overlayd"))
SUBNET_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


def docker_opts(subnet_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    full.update(env)
    argv = [OVERLAYD, "--subnet-file", str(subnet_file), "docker-opts", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=full, timeout=60)


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        (SUBNET_ENV, "--bip=10.244.3.1/24 --mtu=1450 --ip-masq=false"),
        (SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"), "--bip=10.244.3.1/24 --mtu=1450"),
        (
            SUBNET_ENV + "FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:3::1/64\n",
            "--bip=10.244.3.1/24 --mtu=1450 --ip-masq=false --ipv6 --fixed-cidr-v6=fd00:10:0:3::/64",
        ),
    ],
)
def test_prints_the_flags(tmp_path: Path, text: str, flags: str) -> None:
    (tmp_path / "subnet.env").write_text(text)
    result = docker_opts(tmp_path / "subnet.env")
    assert (result.returncode, result.stdout, result.stderr) == (0, flags + "\n", "")


def test_dest_writes_an_env_file_a_shell_and_systemd_can_read(tmp_path: Path) -> None:
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    dest = tmp_path / "run" / "docker"
    result = docker_opts(tmp_path / "subnet.env", "-d", str(dest))
    assert (result.returncode, result.stdout) == (0, "")
    shown = subprocess.run(
        ["sh", "-c", f'. {shlex.quote(str(dest))}; printf "%s|%s|%s" "$DOCKER_OPTS" "$DOCKER_NETWORK_OPTIONS" '
         '"$DOCKER_OPT_BIP"'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flags = "--bip=10.244.3.1/24 --mtu=1450 --ip-masq=false"
    assert shown == f"{flags}|{flags}|--bip=10.244.3.1/24"
    assert oct(dest.stat().st_mode & 0o777) == "0o644"


def test_the_global_subnet_file_env_var_is_used(tmp_path: Path) -> None:
    (tmp_path / "s.env").write_text(SUBNET_ENV)
    full = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    full["OVERLAYD_SUBNET_FILE"] = str(tmp_path / "s.env")
    result = subprocess.run([OVERLAYD, "docker-opts"], capture_output=True, text=True, env=full, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("--bip=10.244.3.1/24"), result.stderr


def test_no_subnet_file_says_the_daemon_has_no_lease(tmp_path: Path) -> None:
    result = docker_opts(tmp_path / "subnet.env")
    assert result.returncode == 1 and result.stdout == ""
    assert "overlayd has no lease yet" in result.stderr and "'overlayd status'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("FLANNEL_MTU=1450\n", "no FLANNEL_NETWORK/FLANNEL_SUBNET"),
        (SUBNET_ENV.replace("1450", "lots"), "FLANNEL_MTU='lots' is not a number"),
        ("FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:3::1/64\nFLANNEL_MTU=1450\n", "--bip"),
    ],
)
def test_a_bad_subnet_file_is_a_user_error(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "subnet.env").write_text(text)
    result = docker_opts(tmp_path / "subnet.env")
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    result = docker_opts(Path("/dev/zero"))
    assert result.returncode == 2 and "not a readable regular file" in result.stderr
