"""The firewall rule set as a pure value, and its two renderings (nftables JSON, iptables-save text).

Nothing here touches the kernel: :class:`RuleSet` is what the daemon wants for one address family,
:func:`nft_objects` is exactly what ``nft -j list table <family> overlayd`` prints for it (handles
and counter values aside), and :func:`iptables_tables` is exactly what ``iptables-save`` prints for
our chains.  The drivers compare those renderings with what they read back, so "is anything
different?" is a plain equality test, order included.

The masquerade rules follow flannel's ``FLANNEL-POSTRTG`` chain (pkg/trafficmngr/iptables), in
this order:

1. kube-proxy's masquerade mark (``0x4000/0x4000``) returns: kube-proxy masquerades those itself,
   and a second NAT breaks some kernels;
2. own container subnet -> network returns, and network -> own subnet returns (never NAT inside
   the overlay);
3. outside the network -> own subnet returns (traffic from outside that a node forwards to a
   container keeps its source);
4. network -> anything but multicast is masqueraded (containers reaching the outside);
5. outside the network -> network is masqueraded (the host itself talking to remote containers
   gets an overlay source address that every peer routes back).

Forwarding accepts traffic from and to the network (``FORWARD`` may default to drop, e.g. under
Docker).  The overlay-port allow-list drops UDP to the backend's port from any source that is not
a current lease's public IP; it never *accepts*, so it cannot open what another firewall closes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Literal

import attrs

from ..model import Lease

Family = Literal["ip", "ip6"]
IPNet = IPv4Network | IPv6Network
IPAddr = IPv4Address | IPv6Address

#: The nftables table of ours, one per family (``ip overlayd``, ``ip6 overlayd``).
TABLE = "overlayd"
#: Our iptables chains; each is hooked from one built-in chain by a single jump.
CHAIN_POSTRTG = "OVERLAYD-POSTRTG"
CHAIN_FWD = "OVERLAYD-FWD"
CHAIN_OVERLAY_IN = "OVERLAYD-OVERLAY-IN"
CHAIN_PREFIX = "OVERLAYD-"
#: The nftables set of sources allowed to send to the overlay port.
PEER_SET = "overlay_peers"
#: kube-proxy's KUBE-MARK-MASQ bit: packets carrying it are masqueraded by kube-proxy already.
KUBE_PROXY_MARK = 0x4000

_MULTICAST: dict[Family, IPNet] = {"ip": IPv4Network("224.0.0.0/4"), "ip6": IPv6Network("ff00::/8")}


def _to_frozenset(values: Iterable[IPAddr | str]) -> frozenset[IPAddr]:
    return frozenset(ip_address(v) if isinstance(v, str) else v for v in values)


def _to_net(value: IPNet | str) -> IPNet:
    return ip_network(value) if isinstance(value, str) else value


def _to_opt_net(value: IPNet | str | None) -> IPNet | None:
    return None if value is None else _to_net(value)


@attrs.frozen
class RuleSet:
    """Everything overlayd wants in the firewall for one address family.

    ``allowed_sources`` matters only with ``overlay_port`` set: then UDP to that port from any
    other source is dropped.  A rule set with nothing enabled means "none of ours should exist".
    """

    network: IPNet = attrs.field(converter=_to_net)
    subnet: IPNet | None = attrs.field(default=None, converter=_to_opt_net)
    ip_masq: bool = False
    forward: bool = True
    overlay_port: int | None = None
    allowed_sources: frozenset[IPAddr] = attrs.field(factory=frozenset, converter=_to_frozenset)
    masquerade_fully_random: bool = True

    def __attrs_post_init__(self) -> None:
        v = self.network.version
        if self.subnet is not None and (self.subnet.version != v or not self.subnet.subnet_of(self.network)):  # type: ignore[arg-type]
            raise ValueError(f"subnet {self.subnet} is not inside network {self.network}")
        if self.overlay_port is not None and not 0 < self.overlay_port < 65536:
            raise ValueError(f"overlay port {self.overlay_port} is not a UDP port (1-65535)")
        wrong = sorted(str(a) for a in self.allowed_sources if a.version != v)
        if wrong:
            raise ValueError(f"allowed sources {', '.join(wrong)} are not IPv{v} addresses like {self.network}")

    @property
    def family(self) -> Family:
        return "ip" if self.network.version == 4 else "ip6"

    @property
    def is_empty(self) -> bool:
        """True when no rule of ours should exist for this family."""
        return not (self.ip_masq or self.forward or self.overlay_port is not None)


def desired_ruleset(
    network: IPNet,
    subnet: IPNet | None,
    *,
    ip_masq: bool,
    forward: bool,
    overlay_port: int | None,
    leases: Iterable[Lease] = (),
    own_public_ip: IPAddr | None = None,
    masquerade_fully_random: bool = True,
) -> RuleSet:
    """The rule set for this host: the daemon calls this each pass with the valid leases it holds.

    ``overlay_port=None`` means no allow-list (backend without a UDP port, or
    ``--no-restrict-overlay-port``).  The allowed sources are the leases' public IPs of the
    network's family, plus our own public IP.
    """
    v = network.version
    allowed: set[IPAddr] = set()
    for lease in leases:
        ip = lease.attrs.public_ip if v == 4 else lease.attrs.public_ipv6
        if ip is not None:
            allowed.add(ip)
    if own_public_ip is not None and own_public_ip.version == v:
        allowed.add(own_public_ip)
    return RuleSet(
        network=network,
        subnet=subnet,
        ip_masq=ip_masq,
        forward=forward,
        overlay_port=overlay_port,
        allowed_sources=frozenset(allowed),
        masquerade_fully_random=masquerade_fully_random,
    )


@attrs.frozen
class _Rule:
    """One family-neutral rule: optional mark test, source and destination matches, a verdict."""

    verdict: Literal["return", "accept", "masquerade"]
    saddr: IPNet | None = None
    saddr_neg: bool = False
    daddr: IPNet | None = None
    daddr_neg: bool = False
    mark: int | None = None


def _masq_rules(rs: RuleSet) -> list[_Rule]:
    net, sub = rs.network, rs.subnet
    rules = [_Rule("return", mark=KUBE_PROXY_MARK)]
    if sub is not None:
        rules += [
            _Rule("return", saddr=sub, daddr=net),
            _Rule("return", saddr=net, daddr=sub),
            _Rule("return", saddr=net, saddr_neg=True, daddr=sub),
        ]
    else:
        rules.append(_Rule("return", saddr=net, daddr=net))
    rules += [
        _Rule("masquerade", saddr=net, daddr=_MULTICAST[rs.family], daddr_neg=True),
        _Rule("masquerade", saddr=net, saddr_neg=True, daddr=net),
    ]
    return rules


def _forward_rules(rs: RuleSet) -> list[_Rule]:
    return [_Rule("accept", saddr=rs.network), _Rule("accept", daddr=rs.network)]


# -- nftables -----------------------------------------------------------------------------------------


def _nft_addr(net: IPNet) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _nft_match(protocol: str, field: str, op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}}


def _nft_expr(rs: RuleSet, rule: _Rule) -> list[dict[str, Any]]:
    expr: list[dict[str, Any]] = []
    if rule.mark is not None:
        left = {"&": [{"meta": {"key": "mark"}}, rule.mark]}
        expr.append({"match": {"op": "==", "left": left, "right": rule.mark}})
    if rule.saddr is not None:
        expr.append(_nft_match(rs.family, "saddr", "!=" if rule.saddr_neg else "==", _nft_addr(rule.saddr)))
    if rule.daddr is not None:
        expr.append(_nft_match(rs.family, "daddr", "!=" if rule.daddr_neg else "==", _nft_addr(rule.daddr)))
    if rule.verdict == "masquerade":
        expr.append({"masquerade": {"flags": "fully-random"}} if rs.masquerade_fully_random else {"masquerade": None})
    else:
        expr.append({rule.verdict: None})
    return expr


def _nft_chains(rs: RuleSet) -> Iterator[tuple[dict[str, Any], list[list[dict[str, Any]]]]]:
    """(chain object, rule expressions) for each base chain of ours, in table order."""
    fam = rs.family
    if rs.ip_masq:
        chain = {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100}
        yield chain, [_nft_expr(rs, r) for r in _masq_rules(rs)]
    if rs.forward:
        chain = {"name": "forward", "type": "filter", "hook": "forward", "prio": 0}
        yield chain, [_nft_expr(rs, r) for r in _forward_rules(rs)]
    if rs.overlay_port is not None:
        chain = {"name": "input", "type": "filter", "hook": "input", "prio": 0}
        drop = [
            _nft_match("udp", "dport", "==", rs.overlay_port),
            _nft_match(fam, "saddr", "!=", f"@{PEER_SET}"),
            {"counter": {"packets": 0, "bytes": 0}},
            {"drop": None},
        ]
        yield chain, [drop]


def nft_objects(rs: RuleSet) -> list[dict[str, Any]]:
    """The table as ``nft -j list table`` prints it, without handles, counters zeroed; [] when empty.

    Order: table, set, chains, then each chain's rules (the order nft lists them in).
    """
    if rs.is_empty:
        return []
    fam = rs.family
    objects: list[dict[str, Any]] = [{"table": {"family": fam, "name": TABLE}}]
    if rs.overlay_port is not None:
        peer_set: dict[str, Any] = {
            "family": fam,
            "name": PEER_SET,
            "table": TABLE,
            "type": "ipv4_addr" if fam == "ip" else "ipv6_addr",
        }
        if rs.allowed_sources:
            peer_set["elem"] = [str(a) for a in sorted(rs.allowed_sources)]
        objects.append({"set": peer_set})
    chains = list(_nft_chains(rs))
    for chain, _ in chains:
        objects.append({"chain": {"family": fam, "table": TABLE, **chain, "policy": "accept"}})
    for chain, rules in chains:
        for expr in rules:
            objects.append({"rule": {"family": fam, "table": TABLE, "chain": chain["name"], "expr": expr}})
    return objects


def nft_normalise(listing: Any) -> list[dict[str, Any]]:
    """A ``list table`` JSON answer in the comparable form of :func:`nft_objects`."""
    out: list[dict[str, Any]] = []
    for item in listing.get("nftables", []) if isinstance(listing, dict) else []:
        if not isinstance(item, dict) or "metainfo" in item:
            continue
        ((kind, body),) = item.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "set" and isinstance(body.get("elem"), list):
            body["elem"] = sorted(body["elem"], key=_elem_key)
        if kind == "rule":
            body["expr"] = [_zero_counter(e) for e in body.get("expr", [])]
        out.append({kind: body})
    return out


def _elem_key(elem: Any) -> tuple[int, Any]:
    try:
        addr = ip_address(elem)
        return (addr.version, int(addr))
    except (TypeError, ValueError):
        return (99, str(elem))


def _zero_counter(expr: Any) -> Any:
    if isinstance(expr, dict) and "counter" in expr and isinstance(expr["counter"], dict):
        return {"counter": {"packets": 0, "bytes": 0}}
    return expr


def nft_replace_batch(rs: RuleSet) -> dict[str, Any]:
    """One libnftables JSON batch that makes our table exactly *rs*, applied as one transaction.

    ``add table`` (a no-op when it exists) then ``delete table`` so the delete never fails, then
    everything anew.  The kernel commits the batch atomically: a packet sees the old table or the
    new one, never an empty NAT chain.  An empty rule set leaves the table deleted.
    """
    fam = rs.family
    table = {"family": fam, "name": TABLE}
    cmds: list[dict[str, Any]] = [{"add": {"table": dict(table)}}, {"delete": {"table": dict(table)}}]
    for obj in nft_objects(rs):
        cmds.append({"add": obj})
    return {"nftables": cmds}


def nft_delete_batch(family: Family) -> dict[str, Any]:
    """Delete our table of *family* whether or not it exists (one transaction)."""
    table = {"family": family, "name": TABLE}
    return {"nftables": [{"add": {"table": dict(table)}}, {"delete": {"table": dict(table)}}]}


# -- iptables -----------------------------------------------------------------------------------------


@attrs.frozen
class IptablesTable:
    """Our part of one iptables table: our chains' rules, and the jumps into them from built-ins.

    Rule specs are in ``iptables-save`` form without the ``-A <chain>`` prefix.
    """

    chains: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    jumps: frozenset[tuple[str, str]] = frozenset()  # (built-in chain, spec)

    def same_as(self, other: IptablesTable) -> bool:
        return self.chains == other.chains and self.jumps == other.jumps


def _ipt_addr(net: IPNet) -> str:
    return str(net)


def _ipt_spec(rs: RuleSet, rule: _Rule) -> str:
    parts: list[str] = []
    if rule.saddr is not None:
        parts += (["!"] if rule.saddr_neg else []) + ["-s", _ipt_addr(rule.saddr)]
    if rule.daddr is not None:
        parts += (["!"] if rule.daddr_neg else []) + ["-d", _ipt_addr(rule.daddr)]
    if rule.mark is not None:
        parts += ["-m", "mark", "--mark", f"{rule.mark:#x}/{rule.mark:#x}"]
    if rule.verdict == "masquerade":
        parts += ["-j", "MASQUERADE"] + (["--random-fully"] if rs.masquerade_fully_random else [])
    else:
        parts += ["-j", rule.verdict.upper()]
    return " ".join(parts)


def iptables_tables(rs: RuleSet) -> dict[str, IptablesTable]:
    """Our chains per iptables table (``nat``, ``filter``) as ``iptables-save`` prints them."""
    out = {"nat": IptablesTable(), "filter": IptablesTable()}
    if rs.ip_masq:
        out["nat"] = IptablesTable(
            chains={CHAIN_POSTRTG: tuple(_ipt_spec(rs, r) for r in _masq_rules(rs))},
            jumps=frozenset({("POSTROUTING", f"-j {CHAIN_POSTRTG}")}),
        )
    chains: dict[str, tuple[str, ...]] = {}
    jumps: set[tuple[str, str]] = set()
    if rs.forward:
        chains[CHAIN_FWD] = tuple(_ipt_spec(rs, r) for r in _forward_rules(rs))
        jumps.add(("FORWARD", f"-j {CHAIN_FWD}"))
    if rs.overlay_port is not None:
        bits = 32 if rs.family == "ip" else 128
        allow = tuple(f"-s {a}/{bits} -j RETURN" for a in sorted(rs.allowed_sources))
        chains[CHAIN_OVERLAY_IN] = (*allow, "-j DROP")
        jumps.add(("INPUT", f"-p udp -m udp --dport {rs.overlay_port} -j {CHAIN_OVERLAY_IN}"))
    out["filter"] = IptablesTable(chains=chains, jumps=frozenset(jumps))
    return out


def iptables_parse(save_output: str) -> IptablesTable:
    """Our chains and the jumps into them, from one table's ``iptables-save`` output."""
    chains: dict[str, list[str]] = {}
    jumps: set[tuple[str, str]] = set()
    for line in save_output.splitlines():
        if line.startswith(":" + CHAIN_PREFIX):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            if chain.startswith(CHAIN_PREFIX):
                chains.setdefault(chain, []).append(spec)
            elif f"-j {CHAIN_PREFIX}" in f" {spec}" or f"-g {CHAIN_PREFIX}" in f" {spec}":
                jumps.add((chain, spec))
    return IptablesTable(chains={k: tuple(v) for k, v in chains.items()}, jumps=frozenset(jumps))


def iptables_restore_text(table: str, desired: IptablesTable, actual: IptablesTable) -> str:
    """``iptables-restore --noflush`` input that turns *actual* into *desired* in one commit.

    Declaring a chain of ours flushes it (or creates it); built-in chains are only touched by
    deleting our old jumps and inserting the new ones first; chains no longer wanted are deleted
    once nothing jumps to them.  One COMMIT, so a packet sees the old rules or the new ones.
    """
    stale = [c for c in actual.chains if c not in desired.chains]
    lines = [f"*{table}"]
    lines += [f":{chain} - [0:0]" for chain in [*desired.chains, *stale]]
    for chain, specs in desired.chains.items():
        lines += [f"-A {chain} {spec}" for spec in specs]
    lines += [f"-D {chain} {spec}" for chain, spec in sorted(actual.jumps)]
    lines += [f"-I {chain} 1 {spec}" for chain, spec in sorted(desired.jumps)]
    lines += [f"-X {chain}" for chain in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
