"""The firewall drivers: nftables through libnftables JSON, iptables through iptables-restore.

Both read back what the kernel holds, compare it with the rendering of the desired
:class:`~overlayd.firewall.rules.RuleSet`, and replace our part in one transaction only when the
two differ.  Each acts on the network namespace of the calling process (libnftables opens its
netlink socket there; iptables-restore inherits it).
"""

from __future__ import annotations

import abc
import logging
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any, ClassVar

from ..errors import KernelError, UserError
from .rules import (
    TABLE,
    Family,
    IptablesTable,
    RuleSet,
    iptables_parse,
    iptables_restore_text,
    iptables_tables,
    nft_delete_batch,
    nft_normalise,
    nft_objects,
    nft_replace_batch,
)

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = ("ip", "ip6")


class FirewallUnavailable(UserError):
    """The chosen firewall cannot be used on this host (library, binary or kernel support missing)."""


class Firewall(abc.ABC):
    """Keeps overlayd's rules in the kernel equal to a desired :class:`RuleSet`, one family each."""

    name: ClassVar[str]

    @abc.abstractmethod
    def ensure(self, desired: RuleSet) -> bool:
        """Make our rules of ``desired.family`` exactly *desired*; True when a change was applied."""

    @abc.abstractmethod
    def remove(self, families: Iterable[Family] = FAMILIES) -> bool:
        """Delete everything of ours (tables, chains, jumps); True when something was there."""


class NoFirewall(Firewall):
    """``--firewall none``: the operator manages NAT and filtering; overlayd touches nothing."""

    name = "none"

    def ensure(self, desired: RuleSet) -> bool:
        return False

    def remove(self, families: Iterable[Family] = FAMILIES) -> bool:
        return False


class NftablesFirewall(Firewall):
    """Our own table ``overlayd`` per family, replaced whole in one libnftables transaction."""

    name = "nftables"

    def __init__(self, library: str = "libnftables.so.1") -> None:
        try:
            import nftables  # type: ignore[import-untyped]  # pip-nftables ships no type hints
        except ImportError as exc:
            raise FirewallUnavailable(
                "--firewall nftables needs the Python module nftables: pip install pip-nftables "
                "(or choose --firewall iptables)"
            ) from exc
        try:
            self._nft: Any = nftables.Nftables(sofile=library)
        except OSError as exc:
            raise FirewallUnavailable(
                f"--firewall nftables needs libnftables ({exc}): apt-get install libnftables1 "
                "(or choose --firewall iptables)"
            ) from exc
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        rc, _, err = self._nft.json_cmd({"nftables": [{"list": {"tables": None}}]})
        if rc != 0:
            raise FirewallUnavailable(
                f"--firewall nftables: the kernel refused nftables here ({str(err).strip()}); "
                "load nf_tables or choose --firewall iptables"
            )

    def _run(self, batch: dict[str, Any], what: str) -> Any:
        rc, out, err = self._nft.json_cmd(batch)
        if rc != 0:
            raise KernelError(f"nftables refused to {what}: {str(err).strip()}")
        return out

    def actual(self, family: Family) -> list[dict[str, Any]]:
        """Our table of *family* as nft lists it, normalised; [] when it does not exist."""
        rc, out, err = self._nft.json_cmd({"nftables": [{"list": {"table": {"family": family, "name": TABLE}}}]})
        if rc != 0:
            if "No such file or directory" in str(err):
                return []
            raise KernelError(f"nftables refused to list table {family} {TABLE}: {str(err).strip()}")
        return nft_normalise(out)

    def ensure(self, desired: RuleSet) -> bool:
        want = nft_objects(desired)
        if self.actual(desired.family) == want:
            return False
        batch = nft_replace_batch(desired) if want else nft_delete_batch(desired.family)
        self._run(batch, f"replace table {desired.family} {TABLE}")
        log.info("nftables: table %s %s replaced", desired.family, TABLE)
        return True

    def remove(self, families: Iterable[Family] = FAMILIES) -> bool:
        removed = False
        for family in families:
            if self.actual(family):
                self._run(nft_delete_batch(family), f"delete table {family} {TABLE}")
                removed = True
        return removed


class IptablesFirewall(Firewall):
    """Chains of our own in ``nat`` and ``filter``, rewritten with ``iptables-restore --noflush``."""

    name = "iptables"
    _TABLES = ("nat", "filter")

    def __init__(self) -> None:
        for tool in ("iptables-save", "iptables-restore"):
            if shutil.which(tool) is None:
                raise FirewallUnavailable(
                    f"--firewall iptables needs {tool}: apt-get install iptables (or choose --firewall nftables)"
                )
        proc = self._cmd("ip", ["iptables-save", "-t", "nat"], check=False)
        if proc.returncode != 0:
            raise FirewallUnavailable(
                f"--firewall iptables: the kernel refused iptables here ({proc.stderr.strip()}); "
                "load the iptables modules or choose --firewall nftables"
            )

    @staticmethod
    def _tool(family: Family, base: str) -> str:
        return base if family == "ip" else base.replace("iptables", "ip6tables")

    def _cmd(self, family: Family, argv: list[str], stdin: str | None = None, check: bool = True) -> Any:
        argv = [self._tool(family, argv[0]), *argv[1:]]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"{argv[0]} failed: {exc}") from exc
        if check and proc.returncode != 0:
            raise KernelError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def actual(self, family: Family) -> dict[str, IptablesTable]:
        """Our chains and jumps per table, read back with ``iptables-save -t <table>``."""
        if family == "ip6" and shutil.which("ip6tables-save") is None:
            return {t: IptablesTable() for t in self._TABLES}
        return {t: iptables_parse(self._cmd(family, ["iptables-save", "-t", t]).stdout) for t in self._TABLES}

    def _apply(self, family: Family, desired: dict[str, IptablesTable], actual: dict[str, IptablesTable]) -> bool:
        text = "".join(
            iptables_restore_text(t, desired[t], actual[t]) for t in self._TABLES if not desired[t].same_as(actual[t])
        )
        if not text:
            return False
        self._cmd(family, ["iptables-restore", "--noflush", "-w", "5"], stdin=text)
        return True

    def ensure(self, desired: RuleSet) -> bool:
        changed = self._apply(desired.family, iptables_tables(desired), self.actual(desired.family))
        if changed:
            log.info("iptables: chains of %s replaced (%s)", TABLE, desired.family)
        return changed

    def remove(self, families: Iterable[Family] = FAMILIES) -> bool:
        removed = False
        for family in families:
            empty = {t: IptablesTable() for t in self._TABLES}
            removed |= self._apply(family, empty, self.actual(family))
        return removed


def open_firewall(kind: str) -> Firewall:
    """The firewall named by ``--firewall``; ``nftables`` falls back to iptables with a warning.

    Raises :class:`FirewallUnavailable` (one line, exit 2) when neither works, or when
    ``iptables`` was asked for and is not usable.
    """
    if kind == "none":
        return NoFirewall()
    if kind == "iptables":
        return IptablesFirewall()
    if kind != "nftables":
        raise UserError(f"--firewall {kind!r} is not one of nftables, iptables, none")
    try:
        return NftablesFirewall()
    except FirewallUnavailable as nft_exc:
        try:
            fw = IptablesFirewall()
        except FirewallUnavailable as ipt_exc:
            raise FirewallUnavailable(f"{nft_exc}; and the iptables fallback failed: {ipt_exc}") from ipt_exc
        log.warning("%s; falling back to iptables", nft_exc)
        return fw
