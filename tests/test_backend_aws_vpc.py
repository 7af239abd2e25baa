"""aws-vpc against moto's EC2 server (a real HTTP server on loopback, talked to through boto3).

Every test builds its own VPC, subnet, route table and instances, so tests share one server
without seeing each other.  Foreign routes (an internet gateway's default route, an instance
route outside the overlay, a gateway route squatting a leasable subnet) are there from the
start and must come out untouched.  Throttling and IAM denials cannot be produced by moto: the
retry wrapper is tested against real ``botocore`` ``ClientError`` objects built here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import attrs
import boto3
import botocore.exceptions
import pytest
from overlayd.backends import aws_vpc
from overlayd.backends.aws_vpc import AwsVpcBackend, AwsVpcNetwork, AwsVpcOptions, Backoff, Ec2, VpcRoute
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError, PermanentError, TransientError, UserError
from overlayd.model import Lease, LeaseAttrs
from overlayd.plan import diff
from overlayd.plugin import HostInfo
from overlayd.testing.ec2_server import REGION, Ec2Server
from overlayd.testing.etcd import free_port

NETWORK = IPv4Network("10.213.0.0/16")


@pytest.fixture(scope="module")
def moto() -> Iterator[Ec2Server]:
    with Ec2Server() as server:
        yield server


@attrs.frozen
class Vpc:
    """One test's VPC: a subnet, its route table, three instances, and the foreign routes."""

    ec2: Any
    vpc_id: str
    table_id: str
    instances: tuple[str, ...]
    foreign: frozenset[tuple[str, str]]  # (destination, target) of routes overlayd must leave alone

    def routes(self) -> frozenset[tuple[str, str]]:
        table = self.ec2.describe_route_tables(RouteTableIds=[self.table_id])["RouteTables"][0]
        return frozenset(
            (r["DestinationCidrBlock"], r.get("InstanceId") or r.get("GatewayId")) for r in table["Routes"]
        )

    def overlay_routes(self) -> dict[str, str]:
        return {dst: target for dst, target in self.routes() - self.foreign if dst != "172.31.0.0/16"}


@pytest.fixture
def vpc(moto: Ec2Server, monkeypatch: pytest.MonkeyPatch) -> Vpc:
    for name, value in Ec2Server.environment().items():
        monkeypatch.setenv(name, value)
    ec2 = moto.client()
    vpc_id = ec2.create_vpc(CidrBlock="172.31.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock="172.31.1.0/24")["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    reply = ec2.run_instances(ImageId="ami-12c6146b", MinCount=4, MaxCount=4, SubnetId=subnet)
    instances = tuple(i["InstanceId"] for i in reply["Instances"])
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc_id)
    foreign = {
        ("0.0.0.0/0", igw),
        ("192.168.50.0/24", instances[3]),
        ("10.213.200.0/24", igw),
        ("10.213.0.0/20", instances[3]),
    }
    for dst, target in foreign:
        kind = "GatewayId" if target.startswith("igw-") else "InstanceId"
        ec2.create_route(RouteTableId=table, DestinationCidrBlock=dst, **{kind: target})
    return Vpc(ec2, vpc_id, table, instances[:3], frozenset(foreign))


def config() -> NetworkConfig:
    return NetworkConfig.from_dict({"Network": str(NETWORK), "SubnetLen": 24, "Backend": {"Type": "aws-vpc"}})


def lease(subnet: str, ip: str, instance: str) -> Lease:
    attrs_ = LeaseAttrs(public_ip=IPv4Address(ip), backend_type="aws-vpc", backend_data={"InstanceId": instance})
    return Lease(IPv4Network(subnet), attrs_, datetime.now(UTC) + timedelta(hours=1))


def host(ip: str) -> HostInfo:
    return HostInfo(iface="eth0", iface_index=0, iface_mtu=9001, public_ip=IPv4Address(ip))


def network(moto: Ec2Server, vpc: Vpc, instance: str, ip: str, **options: Any) -> AwsVpcNetwork:
    opts = AwsVpcOptions(region=REGION, endpoint_url=moto.url, instance_id=instance, **options)
    net = AwsVpcBackend(opts).prepare(config(), host(ip))
    assert isinstance(net, AwsVpcNetwork)
    return net


def reconcile(net: AwsVpcNetwork, own: Lease, peers: list[Lease]) -> tuple[int, int]:
    """One daemon-like pass; returns how many routes the plan added (or replaced) and removed."""
    net.activate(own)
    change = diff(net.desired_state(own, peers), net.actual_state())
    net.apply(change)
    return len(change.add), len(change.removals())


NOTHING = (0, 0)


def others(leases: list[Lease], own: Lease) -> list[Lease]:
    return [x for x in leases if x is not own]


# -- routes ------------------------------------------------------------------------------------


def test_two_hosts_routes_created_replaced_removed_and_foreign_routes_left_alone(moto: Ec2Server, vpc: Vpc) -> None:
    a_id, b_id, c_id = vpc.instances
    a, b = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.2.0/24", "198.51.100.2", b_id)
    net_a = network(moto, vpc, a_id, "198.51.100.1")
    net_b = network(moto, vpc, b_id, "198.51.100.2")
    assert net_a.tables == (vpc.table_id,)  # discovered from the instance's subnet association
    assert net_a.mtu == 9001 and net_a.backend_data == {"InstanceId": a_id}

    assert reconcile(net_a, a, [b]) == (2, 0)
    assert vpc.overlay_routes() == {"10.213.1.0/24": a_id, "10.213.2.0/24": b_id}
    assert reconcile(net_b, b, [a]) == NOTHING  # B wants the same set: nothing left to do
    assert reconcile(net_a, a, [b]) == NOTHING  # a second pass is empty
    net_a.queue_resync()
    assert reconcile(net_a, a, [b]) == NOTHING  # ... also after a fresh read of the table

    # B's lease now names another instance: replaced in place
    b2 = lease("10.213.2.0/24", "198.51.100.2", c_id)
    assert reconcile(net_a, a, [b2]) == (1, 0)
    assert vpc.overlay_routes() == {"10.213.1.0/24": a_id, "10.213.2.0/24": c_id}

    # B's lease is gone: its route is deleted
    assert reconcile(net_a, a, []) == (0, 1)
    assert vpc.overlay_routes() == {"10.213.1.0/24": a_id}
    assert vpc.foreign <= vpc.routes()  # igw default, outside route, squatter and aggregate untouched


def test_three_hosts_converge_and_a_departed_host_is_cleaned_up_by_any_other(moto: Ec2Server, vpc: Vpc) -> None:
    ids = vpc.instances
    leases = [lease(f"10.213.{n + 1}.0/24", f"198.51.100.{n + 1}", ids[n]) for n in range(3)]
    nets = [network(moto, vpc, ids[n], f"198.51.100.{n + 1}") for n in range(3)]
    for n, net in enumerate(nets):
        reconcile(net, leases[n], others(leases, leases[n]))
    want = {f"10.213.{n + 1}.0/24": ids[n] for n in range(3)}
    assert vpc.overlay_routes() == want
    for net in nets:
        net.queue_resync()
    assert [reconcile(net, leases[n], others(leases, leases[n])) for n, net in enumerate(nets)] == [NOTHING] * 3

    # host 3 leaves: host 1 deletes its route; host 2, a moment later, finds nothing to do and no error
    assert reconcile(nets[0], leases[0], [leases[1]]) == (0, 1)
    reconcile(nets[1], leases[1], [leases[0]])
    del want["10.213.3.0/24"]
    assert vpc.overlay_routes() == want
    assert vpc.foreign <= vpc.routes()


def test_quiet_passes_cost_no_api_call_and_one_read_covers_every_table(moto: Ec2Server, vpc: Vpc) -> None:
    a_id, b_id, _ = vpc.instances
    second = vpc.ec2.create_route_table(VpcId=vpc.vpc_id)["RouteTable"]["RouteTableId"]
    a, b = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.2.0/24", "198.51.100.2", b_id)
    net = network(moto, vpc, a_id, "198.51.100.1", route_table_id=(vpc.table_id, second))
    assert reconcile(net, a, [b]) == (4, 0)
    routes = vpc.ec2.describe_route_tables(RouteTableIds=[second])["RouteTables"][0]["Routes"]
    assert {(r["DestinationCidrBlock"], r.get("InstanceId")) for r in routes} >= {
        ("10.213.1.0/24", a_id),
        ("10.213.2.0/24", b_id),
    }
    reconcile(net, a, [b])  # the read after our writes
    before = sum(net.ec2.calls.values())
    for _ in range(10):  # renewals, unrelated events: nothing changes, nothing is asked
        assert reconcile(net, a, [b]) == NOTHING
    assert sum(net.ec2.calls.values()) == before
    net.queue_resync()
    assert reconcile(net, a, [b]) == NOTHING
    assert sum(net.ec2.calls.values()) == before + 1  # both tables in one DescribeRouteTables


def test_a_stale_route_to_this_host_is_left_to_the_others(moto: Ec2Server, vpc: Vpc) -> None:
    """Host A no longer sees its own old lease (the daemon skips it) while B still routes it to A:
    A must not delete it, or the two would flap the route on every pass."""
    a_id, b_id, _ = vpc.instances
    a, b = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.2.0/24", "198.51.100.2", b_id)
    stale_a = lease("10.213.9.0/24", "198.51.100.1", a_id)
    net_a = network(moto, vpc, a_id, "198.51.100.1", audit_interval=0)
    net_b = network(moto, vpc, b_id, "198.51.100.2", audit_interval=0)
    reconcile(net_b, b, [a, stale_a])
    assert reconcile(net_a, a, [b]) == NOTHING
    assert vpc.overlay_routes()["10.213.9.0/24"] == a_id
    reconcile(net_b, b, [a])  # the stale lease expired: B cleans up
    assert "10.213.9.0/24" not in vpc.overlay_routes()


def test_a_foreign_route_squatting_a_leased_subnet_is_reported_once_and_left(
    moto: Ec2Server, vpc: Vpc, caplog: pytest.LogCaptureFixture
) -> None:
    a_id, b_id, _ = vpc.instances
    a, squatted = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.200.0/24", "198.51.100.2", b_id)
    net_a = network(moto, vpc, a_id, "198.51.100.1")
    with caplog.at_level(logging.WARNING, logger="overlayd"):
        reconcile(net_a, a, [squatted])
        reconcile(net_a, a, [squatted])
    assert vpc.foreign <= vpc.routes()
    warnings = [r.getMessage() for r in caplog.records if "did not make" in r.getMessage()]
    assert len(warnings) == 1 and "10.213.200.0/24" in warnings[0]


def test_source_dest_check_off_and_the_table_tagged(moto: Ec2Server, vpc: Vpc) -> None:
    a_id = vpc.instances[0]
    attr = vpc.ec2.describe_instance_attribute(InstanceId=a_id, Attribute="sourceDestCheck")
    assert attr["SourceDestCheck"]["Value"] is True
    network(moto, vpc, a_id, "198.51.100.1")
    attr = vpc.ec2.describe_instance_attribute(InstanceId=a_id, Attribute="sourceDestCheck")
    assert attr["SourceDestCheck"]["Value"] is False
    other = vpc.ec2.describe_instance_attribute(InstanceId=vpc.instances[1], Attribute="sourceDestCheck")
    assert other["SourceDestCheck"]["Value"] is True  # only this host's instance
    tags = vpc.ec2.describe_route_tables(RouteTableIds=[vpc.table_id])["RouteTables"][0]["Tags"]
    assert {"Key": "overlayd:10.213.0.0/16", "Value": "SubnetLen=24"} in tags


def test_an_overlapping_network_already_using_the_table_is_refused(moto: Ec2Server, vpc: Vpc) -> None:
    vpc.ec2.create_tags(Resources=[vpc.table_id], Tags=[{"Key": "overlayd:10.213.0.0/17", "Value": "SubnetLen=24"}])
    with pytest.raises(ConfigError, match=r"already used by the overlay network 10\.213\.0\.0/17"):
        network(moto, vpc, vpc.instances[0], "198.51.100.1")


def test_races_with_other_hosts_count_as_done(moto: Ec2Server, vpc: Vpc) -> None:
    """Another host created, deleted or re-pointed the route between our read and our write."""
    a_id, b_id, _ = vpc.instances
    net = network(moto, vpc, a_id, "198.51.100.1")
    route = VpcRoute(vpc.table_id, IPv4Network("10.213.5.0/24"), b_id)
    net._create(route)
    net._create(route)  # RouteAlreadyExists
    net._delete(route)
    net._delete(route)  # InvalidRoute.NotFound
    net._replace(route)  # gone: created instead
    assert vpc.overlay_routes() == {"10.213.5.0/24": b_id}


def test_a_dry_run_reads_the_table_and_writes_nothing(moto: Ec2Server, vpc: Vpc) -> None:
    a_id, b_id, _ = vpc.instances
    own, b = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.2.0/24", "198.51.100.2", b_id)
    backend = AwsVpcBackend(AwsVpcOptions(region=REGION, endpoint_url=moto.url))
    net = backend.offline(config(), host("198.51.100.1"), own)  # the instance ID comes from the lease
    assert isinstance(net, AwsVpcNetwork)
    change = diff(net.desired_state(own, [b]), net.actual_state())
    assert {str(r.destination) for r in change.add} == {"10.213.1.0/24", "10.213.2.0/24"}
    with pytest.raises(PermanentError, match="dry run"):
        net.apply(change)
    assert vpc.overlay_routes() == {}
    attr = vpc.ec2.describe_instance_attribute(InstanceId=a_id, Attribute="sourceDestCheck")
    assert attr["SourceDestCheck"]["Value"] is True


def test_teardown_removes_only_this_hosts_route(moto: Ec2Server, vpc: Vpc) -> None:
    a_id, b_id, _ = vpc.instances
    a, b = lease("10.213.1.0/24", "198.51.100.1", a_id), lease("10.213.2.0/24", "198.51.100.2", b_id)
    net_a = network(moto, vpc, a_id, "198.51.100.1")
    reconcile(net_a, a, [b])
    net_a.teardown()
    assert vpc.overlay_routes() == {"10.213.2.0/24": b_id}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"instance_id": "i-0123456789abcdef0"}, "--aws-vpc-instance-id i-0123456789abcdef0: no such instance"),
        ({"route_table_id": ("rtb-0123456789abcdef0",)}, "--aws-vpc-route-table-id rtb-0123456789abcdef0"),
        ({"instance_id": "web-1"}, "is not an EC2 instance ID"),
        ({"route_table_id": ("main",)}, "is not a route table ID"),
    ],
)
def test_unknown_instance_or_table_is_a_user_error(
    moto: Ec2Server, vpc: Vpc, options: dict[str, Any], fragment: str
) -> None:
    opts = {"region": REGION, "endpoint_url": moto.url, "instance_id": vpc.instances[0], **options}
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        AwsVpcBackend(AwsVpcOptions(**opts)).prepare(config(), host("198.51.100.1"))


def test_a_table_of_another_vpc_is_refused(moto: Ec2Server, vpc: Vpc) -> None:
    other_vpc = vpc.ec2.create_vpc(CidrBlock="172.30.0.0/16")["Vpc"]["VpcId"]
    other_table = vpc.ec2.create_route_table(VpcId=other_vpc)["RouteTable"]["RouteTableId"]
    with pytest.raises(ConfigError, match="not in this instance's"):
        network(moto, vpc, vpc.instances[0], "198.51.100.1", route_table_id=(other_table,))


def test_route_limit_warned_before_it_is_hit_and_never_passed(
    moto: Ec2Server, vpc: Vpc, caplog: pytest.LogCaptureFixture
) -> None:
    # the table holds 5 routes already (local + 4 foreign); limit 8: warn at 7 (80% is 6.4), refuse the 9th
    ids = vpc.instances
    net = network(moto, vpc, ids[0], "198.51.100.1", route_limit=8)
    own = lease("10.213.1.0/24", "198.51.100.1", ids[0])
    peers = [lease(f"10.213.{n}.0/24", f"198.51.100.{n}", ids[n % 3]) for n in range(2, 6)]
    with caplog.at_level(logging.WARNING, logger="overlayd"), pytest.raises(aws_vpc.Ec2Error) as info:
        reconcile(net, own, peers)
    assert len(vpc.routes()) == 8
    assert "holds 7 of its 8 routes" in caplog.text and "quota" in caplog.text
    assert "its limit (--aws-vpc-route-limit 8)" in str(info.value) and "quota" in str(info.value)


# -- the retry wrapper and error translation -----------------------------------------------------


def client_error(code: str, action: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": f"{code} says AWS"}}, action)


class ScriptedClient:
    """An EC2 client whose describe_route_tables raises the given errors, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def describe_route_tables(self, **params: Any) -> dict[str, Any]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"RouteTables": []}


def test_request_limit_exceeded_is_retried_with_growing_jittered_backoff() -> None:
    slept: list[float] = []
    client = ScriptedClient(*[client_error("RequestLimitExceeded", "DescribeRouteTables")] * 3)
    ec2 = Ec2(client, Backoff(attempts=6, base=0.5, cap=20.0), sleep=slept.append)
    assert ec2.call("DescribeRouteTables") == {"RouteTables": []}
    assert client.calls == 4 and ec2.throttled == 3 and len(slept) == 3
    assert all(0 <= delay <= 0.5 * 2**n for n, delay in enumerate(slept))
    assert [Backoff().delay(n, rand=lambda: 1.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 20, 20]


def test_throttling_that_never_ends_is_a_transient_error() -> None:
    client = ScriptedClient(*[client_error("RequestLimitExceeded", "DescribeRouteTables")] * 10)
    with pytest.raises(TransientError, match="throttling ec2:DescribeRouteTables"):
        Ec2(client, Backoff(attempts=3), sleep=lambda _: None).call("DescribeRouteTables")
    assert client.calls == 3


def test_unauthorized_operation_is_permanent_and_names_the_iam_action() -> None:
    client = ScriptedClient(client_error("UnauthorizedOperation", "DescribeRouteTables"))
    with pytest.raises(UserError, match="grant the action ec2:DescribeRouteTables") as info:
        Ec2(client, sleep=lambda _: None).call("DescribeRouteTables")
    assert not info.value.transient and client.calls == 1


def test_an_unreachable_endpoint_is_transient() -> None:
    port = free_port()
    client = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(TransientError, match="unreachable"):
        Ec2(client).call("DescribeRouteTables")


def test_vpc_route_is_keyed_by_table_and_destination() -> None:
    one = VpcRoute("rtb-1", IPv4Network("10.213.1.0/24"), "i-1")
    other = VpcRoute("rtb-1", IPv4Network("10.213.1.0/24"), "i-2")
    assert one.key == other.key and one != other


def test_describe_shows_the_instance() -> None:
    assert AwsVpcBackend.describe(lease("10.213.1.0/24", "198.51.100.1", "i-0123456789abcdef0")) == {
        "InstanceId": "i-0123456789abcdef0"
    }
    bare = Lease(IPv4Network("10.213.1.0/24"), LeaseAttrs(IPv4Address("198.51.100.1"), "aws-vpc"), None)
    assert AwsVpcBackend.describe(bare) == {"InstanceId": "-"}


# -- instance metadata (IMDSv2) --------------------------------------------------------------------


class Imds:
    """A tiny instance metadata service on loopback; records what it was asked."""

    def __init__(self, instance_id: str, tokens: bool = True) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: str) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                outer.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
                if not tokens:
                    self._answer(405, "")
                elif self.path == "/latest/api/token":
                    self._answer(200, "TOKEN-1")
                else:
                    self._answer(404, "")

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                outer.requests.append(("GET", self.path, token))
                if tokens and token != "TOKEN-1":
                    self._answer(401, "")
                elif self.path == "/latest/meta-data/instance-id":
                    self._answer(200, instance_id)
                elif self.path == "/latest/meta-data/placement/region":
                    self._answer(200, REGION)
                else:
                    self._answer(404, "")

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("tokens", [True, False])
def test_imds_asks_for_a_token_first(tokens: bool) -> None:
    imds = Imds("i-0123456789abcdef0", tokens=tokens)
    try:
        assert aws_vpc.imds_get("instance-id", imds.url) == "i-0123456789abcdef0"
    finally:
        imds.close()
    assert imds.requests[0][:2] == ("PUT", "/latest/api/token") and imds.requests[0][2]
    assert imds.requests[1] == ("GET", "/latest/meta-data/instance-id", "TOKEN-1" if tokens else None)


def test_imds_unreachable_is_a_quick_user_error() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="did not answer"):
        aws_vpc.imds_get("instance-id", f"http://127.0.0.1:{free_port()}", timeout=0.5)
    assert time.monotonic() - started < 3


def test_prepare_learns_the_instance_id_and_region_from_imds(
    moto: Ec2Server, vpc: Vpc, monkeypatch: pytest.MonkeyPatch
) -> None:
    imds = Imds(vpc.instances[1])
    monkeypatch.setattr(aws_vpc, "IMDS_BASE_URL", imds.url)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    try:
        net = AwsVpcBackend(AwsVpcOptions(endpoint_url=moto.url)).prepare(config(), host("198.51.100.2"))
    finally:
        imds.close()
    assert isinstance(net, AwsVpcNetwork) and net.instance_id == vpc.instances[1]
    assert ("GET", "/latest/meta-data/placement/region", "TOKEN-1") in imds.requests


def test_no_imds_and_no_flag_names_the_flag(moto: Ec2Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws_vpc, "IMDS_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="pass --aws-vpc-instance-id"):
        AwsVpcBackend(AwsVpcOptions(region=REGION, endpoint_url=moto.url)).prepare(config(), host("198.51.100.2"))


def test_route_table_id_from_the_network_config_backend_key() -> None:
    cfg = NetworkConfig.from_dict(
        {"Network": str(NETWORK), "Backend": {"Type": "aws-vpc", "RouteTableID": ["rtb-0123456789abcdef0"]}}
    )
    backend = AwsVpcBackend(AwsVpcOptions())
    assert backend.effective_options(cfg).route_table_id == ("rtb-0123456789abcdef0",)
