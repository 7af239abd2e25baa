"""The ``aws-vpc`` backend: each lease is a route ``<subnet> -> <instance>`` in the VPC route table(s).

Design history (flannel's ``pkg/backend/awsvpc``, removed in 2022):

* flannel wrote one route per lease event into the route table and deleted a route only when it
  saw the lease expire; a missed event left a stale route, and a host that started later never
  cleaned up.  Here the route table is reconciled like the kernel: desired (every valid lease,
  this host's own included) against actual (one ``DescribeRouteTables`` for all tables), the
  pure ``diff`` keyed by slot ``(table, destination)``; CreateRoute for a new slot, ReplaceRoute
  when the target differs, DeleteRoute for a subnet whose lease is gone.  The table is shared by
  every host and every host wants the same set, so any live host may clean up and the others
  find nothing left to do (``RouteAlreadyExists`` / ``InvalidRoute.NotFound`` count as done).
* **Ownership.**  EC2 routes cannot carry tags, and a per-table tag listing our CIDRs would be a
  read-modify-write race between hosts (and caps at 256 characters, fewer than 50 CIDRs).  So
  ownership is structural and declared once per table: overlayd tags each table it manages
  ``overlayd:<network>`` = ``SubnetLen=<n>`` (a marker people see in the console, and a check
  that no second overlay network with an overlapping range uses the table).  A route is ours
  only when (1) its destination is inside the network and exactly ``/SubnetLen`` long — a
  leasable subnet — (2) its target is an instance (no gateway, NAT, peering, transit gateway...)
  and (3) it was made by CreateRoute (not propagated, not the local route).  Anything else —
  the internet gateway's default route, an instance route outside the network, an aggregate
  inside it — is never replaced or deleted; a foreign route squatting a slot we want is
  reported once and left alone.
* **Stale leases of this host.**  The daemon never hands a host its own stale leases (they name
  its address), but the other hosts see them and route them to this instance.  So a host never
  deletes or replaces a route to its own instance other than its current subnet's: the others,
  who see the whole picture, clean those up.  Otherwise two hosts would flap a route forever.
* **Few API calls.**  ``actual_state`` answers from the last read of the tables and re-reads
  them (one batched ``DescribeRouteTables``) when the audit is due; ``apply`` re-reads first and
  does only what is still needed, so a lease event on 100 hosts costs one Describe each and the
  writes of whichever host comes first.  botocore's own retries are off: :class:`Ec2` backs off
  ``RequestLimitExceeded`` itself (exponential, full jitter) and turns every other AWS error
  into one of ours: ``UnauthorizedOperation`` names the IAM action to grant.
* The route-table quota (50 routes by default) is warned about when a table is 80% full and an
  add that would pass it is refused with a message naming the quota, instead of AWS's error.
* This host's instance gets source/destination checking off (traffic for its subnet is not
  addressed to it).  No kernel device, no kernel state: the container MTU is the underlay MTU.

BackendData is ``{"InstanceId": "i-..."}``.
"""

from __future__ import annotations

import logging
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Network, ip_network
from typing import Any

import attrs
import boto3
import botocore.exceptions
from botocore import xform_name
from botocore.config import Config
from overlayd.sdk import (
    Backend,
    ConfigError,
    GarbledLease,
    HostInfo,
    Lease,
    Network,
    NetworkConfig,
    PermanentError,
    Plan,
    TransientError,
    UserError,
    comma_list,
    option,
)

log = logging.getLogger(__name__)

#: The instance metadata service; tests point this at a local server.
IMDS_BASE_URL = "http://169.254.169.254"
#: IMDS answers in milliseconds on EC2; anywhere else nothing answers, so give up quickly.
IMDS_TIMEOUT = 1.0
IMDS_TOKEN_TTL = 300
#: The AWS default quota of routes per route table.
DEFAULT_ROUTE_LIMIT = 50
#: Warn once a table is this full.
WARN_FRACTION = 0.8
TAG_PREFIX = "overlayd:"

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_TABLE_ID = re.compile(r"^rtb-[0-9a-f]{8,17}$")
#: Route targets that are not an instance: a route naming any of them is never ours.
_OTHER_TARGETS = (
    "GatewayId",
    "NatGatewayId",
    "TransitGatewayId",
    "VpcPeeringConnectionId",
    "LocalGatewayId",
    "CarrierGatewayId",
    "EgressOnlyInternetGatewayId",
    "CoreNetworkArn",
    "DestinationPrefixListId",
)
_THROTTLED = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"})
_UNAVAILABLE = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})
_DENIED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
)


# -- errors ------------------------------------------------------------------------------------


class Ec2Error(PermanentError):
    """EC2 refused a call for a reason retrying will not fix; ``code`` is AWS's error code."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Ec2Denied(UserError):
    """The credentials lack an IAM permission; the message names the action to grant."""


class Ec2Unavailable(TransientError):
    """EC2 could not be reached, kept throttling us, or failed on its side; try again later."""


# -- the API wrapper ---------------------------------------------------------------------------


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter (AWS's advice for ``RequestLimitExceeded``)."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 20.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return float(rand() * min(self.cap, self.base * 2.0**attempt))


class Ec2:
    """Calls EC2 by action name, backing off throttling and translating errors into ours."""

    def __init__(self, client: Any, backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.backoff = backoff
        self.sleep = sleep
        self.throttled = 0  # calls answered with a throttling error, for tests and logs
        self.calls: Counter[str] = Counter()  # requests sent, by action

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        method = getattr(self.client, xform_name(action))
        for attempt in range(self.backoff.attempts):
            self.calls[action] += 1
            try:
                return dict(method(**params))
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _THROTTLED and attempt + 1 < self.backoff.attempts:
                    self.throttled += 1
                    delay = self.backoff.delay(attempt)
                    log.debug("ec2:%s throttled (%s); retrying in %.2f s", action, code, delay)
                    self.sleep(delay)
                    continue
                raise translate(action, exc) from exc
            except _CONNECTION_ERRORS as exc:
                raise Ec2Unavailable(f"EC2 API unreachable for {action}: {exc}") from exc
            except botocore.exceptions.NoCredentialsError as exc:
                raise ConfigError(
                    "aws-vpc: no AWS credentials found; give the instance an IAM role (or set the SDK's "
                    "usual environment variables or config files)"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


def translate(action: str, exc: botocore.exceptions.ClientError) -> Exception:
    """One of our errors for an EC2 error answer to *action*."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")).strip()
    if code in _DENIED:
        return Ec2Denied(
            f"aws-vpc: EC2 refused ec2:{action} ({code}); grant the action ec2:{action} to this host's "
            "IAM role (docs/backends/aws-vpc.md lists the policy)"
        )
    if code in _THROTTLED:
        return Ec2Unavailable(f"EC2 kept throttling ec2:{action} ({code}); backing off")
    if code in _UNAVAILABLE:
        return Ec2Unavailable(f"EC2 failed ec2:{action} on its side ({code}): {message}")
    return Ec2Error(f"ec2:{action} failed ({code}): {message}", code)


# -- instance metadata -------------------------------------------------------------------------


def imds_get(path: str, base_url: str | None = None, timeout: float | None = None) -> str:
    """GET ``/latest/meta-data/<path>`` from the instance metadata service, IMDSv2 token first.

    A PUT for a session token comes first; an endpoint that does not know tokens (404/405: an
    IMDSv1-only emulator) gets a plain GET.  Raises ``ConfigError`` when nothing answers: off EC2
    the caller must be told which flag to pass.
    """
    base = (base_url or IMDS_BASE_URL).rstrip("/")
    wait = IMDS_TIMEOUT if timeout is None else timeout
    headers: dict[str, str] = {}
    try:
        request = urllib.request.Request(
            f"{base}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)},
        )
        with urllib.request.urlopen(request, timeout=wait) as answer:
            headers["X-aws-ec2-metadata-token"] = answer.read().decode("ascii", "replace").strip()
    except urllib.error.HTTPError as exc:
        if exc.code not in (404, 405):
            raise ConfigError(f"the instance metadata service refused a token (HTTP {exc.code})") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the instance metadata service at {base} did not answer ({exc})") from exc
    try:
        request = urllib.request.Request(f"{base}/latest/meta-data/{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=wait) as answer:
            return str(answer.read().decode("utf-8", "replace").strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the instance metadata service at {base} gave no {path} ({exc})") from exc


# -- options and value types -------------------------------------------------------------------


@attrs.frozen
class AwsVpcOptions:
    route_table_id: tuple[str, ...] = option(
        (),
        "route tables to program, comma list (default: the table of the instance's subnet)",
        converter=comma_list,
        config_key="RouteTableID",
    )
    region: str = option("", "AWS region (default: the SDK's configuration, then instance metadata)")
    endpoint_url: str = option("", "EC2 API endpoint URL, for EC2-compatible APIs (default: AWS's)")
    instance_id: str = option("", "this host's EC2 instance ID (default: from instance metadata, IMDSv2)")
    route_limit: int = option(
        DEFAULT_ROUTE_LIMIT, "routes one route table may hold (AWS's quota; raise it after raising the quota)", int
    )
    audit_interval: float = option(60.0, "seconds between full re-reads of the route tables", float)


@attrs.frozen
class VpcRoute:
    """One route of ours: a leased subnet routed to an instance in one route table."""

    route_table_id: str
    destination: IPv4Network
    instance_id: str

    @property
    def key(self) -> tuple[str, IPv4Network]:
        return (self.route_table_id, self.destination)

    def __str__(self) -> str:
        return f"{self.destination} -> {self.instance_id} in {self.route_table_id}"


@attrs.frozen
class TableView:
    """One route table as last read: our routes, the foreign ones by destination, and its size."""

    ours: frozenset[VpcRoute]
    foreign: Mapping[IPv4Network, str]  # destination -> its target, for messages
    size: int


def tag_key(network: IPv4Network) -> str:
    return f"{TAG_PREFIX}{network}"


def is_ours(route: Mapping[str, Any], network: IPv4Network, subnet_len: int) -> bool:
    """True when *route* (a DescribeRouteTables entry) is one overlayd may replace or delete."""
    dst = route.get("DestinationCidrBlock")
    if not dst or not route.get("InstanceId") or route.get("Origin", "CreateRoute") != "CreateRoute":
        return False
    if any(route.get(target) for target in _OTHER_TARGETS):
        return False
    try:
        net = ip_network(dst)
    except ValueError:
        return False
    return isinstance(net, IPv4Network) and net.prefixlen == subnet_len and net.subnet_of(network)


def _target(route: Mapping[str, Any]) -> str:
    for name in ("InstanceId", *_OTHER_TARGETS, "NetworkInterfaceId"):
        if route.get(name):
            return str(route[name])
    return "?"


# -- the network -------------------------------------------------------------------------------


class AwsVpcNetwork(Network):
    """Routes in VPC route tables instead of the kernel; one per lease, this host's included."""

    def __init__(
        self,
        host: HostInfo,
        ec2: Ec2,
        *,
        instance_id: str,
        tables: Sequence[str],
        network: IPv4Network,
        subnet_len: int,
        route_limit: int = DEFAULT_ROUTE_LIMIT,
        audit_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.ec2 = ec2
        self.instance_id = instance_id
        self.tables = tuple(tables)
        self.network = network
        self.subnet_len = subnet_len
        self.route_limit = route_limit
        self.audit_interval = audit_interval
        self.clock = clock
        self.own_subnet: IPv4Network | None = None
        #: A planning-only network (dry runs): ``apply`` and ``teardown`` refuse to run.
        self.offline = False
        self._views: dict[str, TableView] | None = None
        self._audit_due = float("-inf")
        self._reported: set[tuple[str, IPv4Network, str]] = set()
        self._warned_size: dict[str, int] = {}

    @property
    def mtu(self) -> int:
        return self.host.iface_mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {"InstanceId": self.instance_id}

    def activate(self, lease: Lease) -> None:
        if lease.subnet is None:
            raise ConfigError("aws-vpc needs an IPv4 subnet lease (EnableIPv4)")
        self.own_subnet = lease.subnet

    def check_peer(self, lease: Lease) -> None:
        if lease.subnet is None:
            raise GarbledLease(f"lease {lease.key} has no IPv4 subnet; aws-vpc cannot route to it")
        instance = lease.attrs.backend_data.get("InstanceId")
        if not isinstance(instance, str) or not _INSTANCE_ID.match(instance):
            raise GarbledLease(f"lease {lease.key} has no valid BackendData InstanceId (got {instance!r})")

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        """Every table routes every valid lease to its instance; the first lease (by key) wins a
        contested subnet.  This host's own lease is routed too: the table is shared, so every
        host must want the same set."""
        routes: dict[tuple[str, IPv4Network], VpcRoute] = {}
        for lease in [own, *sorted(peers, key=lambda lease: lease.key)]:
            if lease.subnet is None:
                continue
            instance = self.instance_id if lease is own else lease.attrs.backend_data.get("InstanceId")
            if not isinstance(instance, str):
                continue
            for table in self.tables:
                route = VpcRoute(table, lease.subnet, instance)
                routes.setdefault(route.key, route)
        return frozenset(routes.values())

    # -- reading -------------------------------------------------------------------------------

    def read_tables(self) -> dict[str, TableView]:
        """Every table in one batched ``DescribeRouteTables`` (paged when AWS pages)."""
        views: dict[str, TableView] = {}
        params: dict[str, Any] = {"RouteTableIds": list(self.tables)}
        while True:
            answer = self.ec2.call("DescribeRouteTables", **params)
            for table in answer.get("RouteTables", []):
                table_id = str(table["RouteTableId"])
                ours, foreign = set(), {}
                routes = table.get("Routes", [])
                for route in routes:
                    if is_ours(route, self.network, self.subnet_len):
                        ours.add(VpcRoute(table_id, ip_network(route["DestinationCidrBlock"]), route["InstanceId"]))  # type: ignore[arg-type]
                    elif route.get("DestinationCidrBlock"):
                        try:
                            dst = ip_network(route["DestinationCidrBlock"])
                        except ValueError:
                            continue
                        if isinstance(dst, IPv4Network):
                            foreign[dst] = _target(route)
                views[table_id] = TableView(frozenset(ours), foreign, len(routes))
            token = answer.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        # the next audit between 0.75 and 1.25 intervals from now: hosts started together drift apart
        self._views, self._audit_due = views, self.clock() + self.audit_interval * (0.75 + random.random() / 2)
        for table_id, view in views.items():
            self._check_room(table_id, view.size)
        return views

    def _hidden(self, route: VpcRoute) -> bool:
        """A route to this instance for another subnet: a stale lease of ours the others clean up."""
        return route.instance_id == self.instance_id and route.destination != self.own_subnet

    def queue_resync(self) -> None:
        """Make the next ``actual_state`` read the tables again (felix's ``QueueResync``)."""
        self._views = None

    def actual_state(self) -> frozenset[Any]:
        views = self._views
        if views is None or self.clock() >= self._audit_due:
            views = self.read_tables()
        return frozenset(route for view in views.values() for route in view.ours if not self._hidden(route))

    # -- writing -------------------------------------------------------------------------------

    def refuse_offline(self, what: str) -> None:
        if self.offline:
            raise PermanentError(f"{what} called on a planning-only (dry run) network")

    def apply(self, plan: Plan[Any]) -> None:
        self.refuse_offline("apply")
        if plan.empty:
            return
        views = self.read_tables()  # what other hosts did since our last read decides what is left
        failures: list[Exception] = []
        done = 0
        for route in sorted(plan.removals(), key=str):
            view = views.get(route.route_table_id)
            current = self._current(view, route)
            if current is None or current != route or self._hidden(current):
                continue  # gone already, re-pointed meanwhile, or a route to us the others clean up
            try:
                self._delete(route)
                done += 1
            except Ec2Error as exc:
                failures.append(exc)
        sizes = {table_id: view.size for table_id, view in views.items()}
        for route in sorted(plan.add, key=str):
            view = views.get(route.route_table_id)
            if view is None:
                failures.append(Ec2Error(f"route table {route.route_table_id} is gone", "InvalidRouteTableID.NotFound"))
                continue
            current = self._current(view, route)
            if current == route:
                continue
            if route.destination in view.foreign:
                self._report_foreign(route, view.foreign[route.destination])
                continue
            try:
                if current is None:
                    if sizes[route.route_table_id] >= self.route_limit:
                        raise Ec2Error(
                            f"route table {route.route_table_id} holds {sizes[route.route_table_id]} routes, its "
                            f"limit (--aws-vpc-route-limit {self.route_limit}); {route.destination} is not routed: "
                            "raise the 'Routes per route table' quota in AWS and then the flag",
                            "RouteLimitExceeded",
                        )
                    self._create(route)
                    sizes[route.route_table_id] += 1
                    self._check_room(route.route_table_id, sizes[route.route_table_id])
                else:
                    self._replace(route)
                done += 1
            except Ec2Error as exc:
                failures.append(exc)
        self.queue_resync()  # read again next pass: our writes and other hosts' are both news
        if failures:
            for other in failures[1:]:
                log.warning("%s", other)
            raise failures[0]
        log.debug("aws-vpc: %d route changes applied", done)

    @staticmethod
    def _current(view: TableView | None, route: VpcRoute) -> VpcRoute | None:
        if view is None:
            return None
        return next((r for r in view.ours if r.destination == route.destination), None)

    def _create(self, route: VpcRoute) -> None:
        try:
            self.ec2.call(
                "CreateRoute",
                RouteTableId=route.route_table_id,
                DestinationCidrBlock=str(route.destination),
                InstanceId=route.instance_id,
            )
        except Ec2Error as exc:
            if exc.code != "RouteAlreadyExists":  # another host was quicker: the next read decides
                raise
        log.info("aws-vpc: route %s created", route)

    def _replace(self, route: VpcRoute) -> None:
        try:
            self.ec2.call(
                "ReplaceRoute",
                RouteTableId=route.route_table_id,
                DestinationCidrBlock=str(route.destination),
                InstanceId=route.instance_id,
            )
        except Ec2Error as exc:
            if exc.code not in ("InvalidRoute.NotFound", "InvalidParameterValue"):
                raise
            self._create(route)  # deleted by another host meanwhile ("Use CreateRoute instead")
            return
        log.info("aws-vpc: route %s replaced", route)

    def _delete(self, route: VpcRoute) -> None:
        try:
            self.ec2.call("DeleteRoute", RouteTableId=route.route_table_id, DestinationCidrBlock=str(route.destination))
        except Ec2Error as exc:
            if exc.code != "InvalidRoute.NotFound":
                raise
        log.info("aws-vpc: route %s deleted", route)

    def _report_foreign(self, route: VpcRoute, target: str) -> None:
        key = (route.route_table_id, route.destination, target)
        if key not in self._reported:
            self._reported.add(key)
            log.warning(
                "aws-vpc: route table %s has a route for %s to %s that overlayd did not make; left alone, so "
                "%s is not routed: remove that route if the subnet belongs to the overlay",
                route.route_table_id,
                route.destination,
                target,
                route.destination,
            )

    def _check_room(self, table_id: str, size: int) -> None:
        """Warn once per size when a table nears its route limit (80% and up)."""
        if size < WARN_FRACTION * self.route_limit or self._warned_size.get(table_id, -1) >= size:
            return
        self._warned_size[table_id] = size
        log.warning(
            "aws-vpc: route table %s holds %d of its %d routes; raise the AWS 'Routes per route table' quota "
            "(then --aws-vpc-route-limit) before the cluster grows past it",
            table_id,
            size,
            self.route_limit,
        )

    def teardown(self) -> None:
        """Remove this host's own route (``--release-on-exit``: its lease is released too)."""
        self.refuse_offline("teardown")
        if self.own_subnet is None:
            return
        views = self.read_tables()
        for table_id in self.tables:
            route = VpcRoute(table_id, self.own_subnet, self.instance_id)
            if self._current(views.get(table_id), route) == route:
                self._delete(route)
        self.queue_resync()


# -- the backend -------------------------------------------------------------------------------


class AwsVpcBackend(Backend):
    """Route each lease's subnet to its EC2 instance in VPC route tables (no encapsulation)."""

    Options = AwsVpcOptions

    @classmethod
    def describe(cls, lease: Lease) -> Mapping[str, str]:
        instance = lease.attrs.backend_data.get("InstanceId")
        return {"InstanceId": instance if isinstance(instance, str) and instance else "-"}

    def client(self, region: str, endpoint_url: str) -> Any:
        """The boto3 EC2 client: botocore's retries off (ours back off), short timeouts."""
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=20)
        session = boto3.session.Session(region_name=region or None)
        if session.region_name is None:
            try:
                region = imds_get("placement/region")
            except ConfigError as exc:
                raise ConfigError(f"aws-vpc: no AWS region known ({exc}); pass --aws-vpc-region") from exc
            session = boto3.session.Session(region_name=region)
        return session.client("ec2", endpoint_url=endpoint_url or None, config=config)

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        return self._network(config, host, None)

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        """A dry run's network: it reads the API (the instance, the tables) but writes nothing."""
        return self._network(config, host, own)

    def _network(self, config: NetworkConfig, host: HostInfo, own: Lease | None) -> AwsVpcNetwork:
        options: AwsVpcOptions = self.effective_options(config)
        if config.network is None:
            raise ConfigError("aws-vpc needs an IPv4 network (EnableIPv4)")
        instance_id = options.instance_id
        if not instance_id and own is not None:
            instance_id = str(own.attrs.backend_data.get("InstanceId") or "")
        if not instance_id:
            try:
                instance_id = imds_get("instance-id")
            except ConfigError as exc:
                raise ConfigError(
                    f"aws-vpc: cannot learn this host's instance ID: {exc}; pass --aws-vpc-instance-id"
                ) from exc
        if not _INSTANCE_ID.match(instance_id):
            raise ConfigError(f"--aws-vpc-instance-id {instance_id!r} is not an EC2 instance ID (i-0123456789abcdef0)")
        for table_id in options.route_table_id:
            if not _TABLE_ID.match(table_id):
                raise ConfigError(
                    f"--aws-vpc-route-table-id {table_id!r} is not a route table ID (rtb-0123456789abcdef0)"
                )
        if options.route_limit < 1:
            raise ConfigError(f"--aws-vpc-route-limit must be at least 1, not {options.route_limit}")
        ec2 = Ec2(self.client(options.region, options.endpoint_url))
        instance = find_instance(ec2, instance_id)
        tables = find_tables(ec2, options.route_table_id, instance)
        if own is None:
            claim_tables(ec2, tables, config.network, config.subnet_len)
        if own is None and instance.get("SourceDestCheck", True):
            ec2.call("ModifyInstanceAttribute", InstanceId=instance_id, SourceDestCheck={"Value": False})
            log.info("aws-vpc: source/destination check turned off on %s", instance_id)
        network = AwsVpcNetwork(
            host,
            ec2,
            instance_id=instance_id,
            tables=[str(table["RouteTableId"]) for table in tables],
            network=config.network,
            subnet_len=config.subnet_len,
            route_limit=options.route_limit,
            audit_interval=options.audit_interval,
        )
        network.created = False  # nothing exists before the first pass: a failed start removes nothing
        if own is not None:
            network.offline = True
            if own.subnet is not None:
                network.own_subnet = own.subnet
        log.info("aws-vpc: instance %s, route tables %s", instance_id, ", ".join(network.tables))
        return network


def find_instance(ec2: Ec2, instance_id: str) -> Mapping[str, Any]:
    """This host's instance; an unknown ID is a user error naming the flag."""
    try:
        answer = ec2.call("DescribeInstances", InstanceIds=[instance_id])
    except Ec2Error as exc:
        if exc.code.startswith("InvalidInstanceID"):
            raise ConfigError(
                f"--aws-vpc-instance-id {instance_id}: no such instance in this region ({exc.code})"
            ) from exc
        raise
    found = [i for r in answer.get("Reservations", []) for i in r.get("Instances", [])]
    if not found:
        raise ConfigError(f"--aws-vpc-instance-id {instance_id}: no such instance in this region")
    return dict(found[0])


def find_tables(ec2: Ec2, table_ids: Iterable[str], instance: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The route tables to program: the ones named, or the instance subnet's (else the VPC's main)."""
    vpc = instance.get("VpcId")
    table_ids = list(table_ids)
    if table_ids:
        try:
            tables = ec2.call("DescribeRouteTables", RouteTableIds=table_ids).get("RouteTables", [])
        except Ec2Error as exc:
            if exc.code.startswith("InvalidRouteTableID"):
                raise ConfigError(
                    f"--aws-vpc-route-table-id {','.join(table_ids)}: a route table does not exist ({exc.code})"
                ) from exc
            raise
        found = {str(table["RouteTableId"]) for table in tables}
        missing = [t for t in table_ids if t not in found]
        if missing:
            raise ConfigError(f"--aws-vpc-route-table-id {','.join(missing)}: no such route table")
        for table in tables:
            if vpc and table.get("VpcId") != vpc:
                raise ConfigError(
                    f"--aws-vpc-route-table-id {table['RouteTableId']} is in {table.get('VpcId')}, "
                    f"not in this instance's {vpc}"
                )
        return list(tables)
    subnet = instance.get("SubnetId")
    tables = ec2.call("DescribeRouteTables", Filters=[{"Name": "association.subnet-id", "Values": [subnet]}]).get(
        "RouteTables", []
    )
    if not tables:
        tables = ec2.call(
            "DescribeRouteTables",
            Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "association.main", "Values": ["true"]}],
        ).get("RouteTables", [])
    if not tables:
        raise ConfigError(f"aws-vpc: no route table found for subnet {subnet}; pass --aws-vpc-route-table-id")
    return list(tables)


def claim_tables(ec2: Ec2, tables: Iterable[Mapping[str, Any]], network: IPv4Network, subnet_len: int) -> None:
    """Tag each table ``overlayd:<network>`` = ``SubnetLen=<n>``; refuse one another overlay
    network with an overlapping range (or another SubnetLen) already claims."""
    want = f"SubnetLen={subnet_len}"
    untagged = []
    for table in tables:
        table_id = str(table["RouteTableId"])
        tags = {str(tag.get("Key")): str(tag.get("Value")) for tag in table.get("Tags", [])}
        if tags.get(tag_key(network)) == want:
            continue
        for key, value in tags.items():
            if not key.startswith(TAG_PREFIX):
                continue
            try:
                other = ip_network(key[len(TAG_PREFIX) :])
            except ValueError:
                continue
            if isinstance(other, IPv4Network) and other.overlaps(network) and (other, value) != (network, want):
                raise ConfigError(
                    f"route table {table_id} is already used by the overlay network {other} ({value}), which "
                    f"overlaps {network}; use another route table or remove the tag {key!r}"
                )
        untagged.append(table_id)
    if untagged:
        ec2.call("CreateTags", Resources=untagged, Tags=[{"Key": tag_key(network), "Value": want}])
