"""aws-vpc end to end: three ``overlayd --store etcd --backend aws-vpc`` daemons against moto's EC2
server and a real etcd, all on loopback.

aws-vpc programs no kernel state (its "kernel" is the VPC route table), so the daemons run in the
root namespace side by side, each with its own instance ID, PublicIP (198.51.100.0/24, never
contacted) and subnet file; ``--firewall none``.  The test checks the root namespace's routes and
links are untouched, that the route table converges, that a route deleted by hand comes back at
the next audit, that a departed host's route goes on the others' next pass, that the dummy
credentials never reach a log, and that an unknown instance or route table stops the start-up
with one line and exit code 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from overlayd.testing.ec2_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, Ec2Server
from overlayd.testing.etcd import EtcdServer

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]
NETWORK = "10.214.0.0/16"

pytestmark = pytest.mark.etcd


@pytest.fixture
def ec2() -> Iterator[Ec2Server]:
    with Ec2Server() as server:
        yield server


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def make_vpc(client: Any, instances: int) -> tuple[str, list[str], str]:
    """A VPC with one subnet, its route table, *instances* instances and an internet gateway route."""
    vpc = client.create_vpc(CidrBlock="172.31.0.0/16")["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock="172.31.1.0/24")["Subnet"]["SubnetId"]
    table = client.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    client.associate_route_table(RouteTableId=table, SubnetId=subnet)
    reply = client.run_instances(ImageId="ami-12c6146b", MinCount=instances, MaxCount=instances, SubnetId=subnet)
    igw = client.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    client.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    client.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    return table, [i["InstanceId"] for i in reply["Instances"]], igw


def routes(client: Any, table: str) -> dict[str, str]:
    found = client.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    return {r["DestinationCidrBlock"]: r.get("InstanceId") or r.get("GatewayId") for r in found}


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYD_", "AWS_"))}
    return {**clean, **Ec2Server.environment()}


def daemon_args(etcd: EtcdServer, ec2: Ec2Server, tmp: Path, n: int, instance: str, *extra: str) -> list[str]:
    return [
        *OVERLAYD,
        "--log-level", "debug",
        "--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/aws-e2e",
        "--backend", "aws-vpc", "--network", NETWORK,
        "--aws-vpc-endpoint-url", ec2.url, "--aws-vpc-instance-id", instance, "--aws-vpc-region", REGION,
        "--aws-vpc-audit-interval", "2",
        "--iface", "lo", "--public-ip", f"198.51.100.{n + 10}",
        "--subnet-file", str(tmp / f"host{n}.env"), "--firewall", "none", "--resync-period", "1",
        *extra,
    ]  # fmt: skip


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def subnet_of(path: Path) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            return str(IPv4Interface(line.split("=", 1)[1]).network)
    return None


def kernel_snapshot() -> tuple[str, set[str]]:
    route_text = subprocess.run(["ip", "-o", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return route_text, {line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if ":" in line}


def test_three_daemons_converge_on_the_route_table_and_clean_up_a_departed_host(
    tmp_path: Path, etcd: EtcdServer, ec2: Ec2Server
) -> None:
    client = ec2.client()
    table, instances, igw = make_vpc(client, 3)
    _, links_before = kernel_snapshot()
    procs: list[subprocess.Popen[str]] = []
    logs = [tmp_path / f"host{n}.log" for n in range(3)]
    try:
        for n in range(3):
            with logs[n].open("w") as log:
                argv = daemon_args(etcd, ec2, tmp_path, n, instances[n], "run")
                procs.append(subprocess.Popen(argv, env=env(), stderr=log, text=True))
        files = [tmp_path / f"host{n}.env" for n in range(3)]
        assert wait_for(lambda: all(subnet_of(f) for f in files)), [p.read_text() for p in logs]
        subnets = [subnet_of(f) for f in files]
        want = {subnet: instances[n] for n, subnet in enumerate(subnets) if subnet}
        started = time.monotonic()
        assert wait_for(lambda: {d: t for d, t in routes(client, table).items() if d in want} == want), routes(
            client, table
        )
        converged = time.monotonic() - started
        print(f"aws-vpc: 3 hosts' routes in the table {converged:.2f} s after the last subnet file")

        # a route deleted by hand comes back at the next audit (--aws-vpc-audit-interval 2)
        client.delete_route(RouteTableId=table, DestinationCidrBlock=str(subnets[1]))
        started = time.monotonic()
        assert wait_for(lambda: routes(client, table).get(str(subnets[1])) == instances[1]), routes(client, table)
        print(f"aws-vpc: a route deleted by hand was back after {time.monotonic() - started:.2f} s")

        # host 2 dies without cleaning up; its lease is released by hand: the others delete its route
        procs[2].kill()
        procs[2].wait(10)
        released = subprocess.run(
            [*OVERLAYD, "--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/aws-e2e",
             "release", str(subnets[2])],
            env=env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert released.returncode == 0, released.stderr
        assert wait_for(lambda: str(subnets[2]) not in routes(client, table)), routes(client, table)
        table_now = routes(client, table)
        assert table_now[str(subnets[0])] == instances[0] and table_now[str(subnets[1])] == instances[1]
        assert table_now["0.0.0.0/0"] == igw  # the foreign route is untouched
        attr = client.describe_instance_attribute(InstanceId=instances[0], Attribute="sourceDestCheck")
        assert attr["SourceDestCheck"]["Value"] is False

        for proc in procs[:2]:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(15) for proc in procs[:2]] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = "\n".join(p.read_text() for p in logs)
    assert "aws-vpc: route" in text  # the daemons did log their changes (debug level and up)
    assert ACCESS_KEY_ID not in text and SECRET_ACCESS_KEY not in text
    assert "Traceback" not in text
    # nothing in the kernel: no route into the overlay, no device made for it
    route_text, links_after = kernel_snapshot()
    assert "10.214." not in route_text
    assert not {name for name in links_after - links_before if name.startswith(("flannel", "overlayd"))}


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--aws-vpc-instance-id", "i-0123456789abcdef0", "--aws-vpc-instance-id i-0123456789abcdef0: no such instance"),
        ("--aws-vpc-route-table-id", "rtb-0123456789abcdef0", "--aws-vpc-route-table-id rtb-0123456789abcdef0"),
    ],
)
def test_unknown_instance_or_route_table_stops_the_start_with_exit_2(
    tmp_path: Path, etcd: EtcdServer, ec2: Ec2Server, flag: str, value: str, fragment: str
) -> None:
    _, instances, _ = make_vpc(ec2.client(), 1)
    argv = daemon_args(etcd, ec2, tmp_path, 0, instances[0], flag, value, "run")
    result = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert fragment in last, result.stderr
    assert ACCESS_KEY_ID not in result.stderr and SECRET_ACCESS_KEY not in result.stderr
