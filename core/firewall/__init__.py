"""Masquerade, forward and overlay-port rules, kept equal to a desired rule set (SPEC §5.4).

Design note.

* **nftables first, through libnftables JSON.**  flannel's nftables mode is still experimental
  and distributions now ship without iptables, so nftables is the default.  We call libnftables
  (``import nftables`` from ``pip-nftables``, backed by Debian's ``libnftables1``) rather than
  spawning ``nft -j``: the JSON batch is the same, but there is no process per pass, errors come
  back as text we can quote, and the library reads the ruleset in the same call.  The whole table
  ``overlayd`` (one per family: ``ip overlayd`` now, ``ip6 overlayd`` for dual stack) is replaced
  in *one* batch (``add table; delete table; add table, sets, chains, rules``), which the kernel
  commits as one transaction: a packet sees the old table or the new one, never an empty NAT
  chain (flannel #2237: its restart flushes ``FLANNEL-POSTRTG`` and pods lose the outside).  The
  allow-list is a named set inside that table, so it changes in the same transaction.
* **iptables as the fallback**, for hosts without nftables support.  Our own chains
  (``OVERLAYD-POSTRTG`` in ``nat``, ``OVERLAYD-FWD`` and ``OVERLAYD-OVERLAY-IN`` in ``filter``),
  each hooked from one built-in chain by one jump, are rewritten by ``iptables-restore
  --noflush``: declaring a chain flushes and refills it inside one ``COMMIT``, so each table
  changes atomically, and built-in chains are touched only to swap our jump.  The allow-list is
  one ``RETURN`` rule per peer, then ``DROP`` (no ipset: one less kernel module and tool).
* **Reconciled, never flushed on restart.**  :meth:`Firewall.ensure` reads back what the kernel
  holds (``list table`` / ``iptables-save``), compares it, order included, with the rendering of
  the desired :class:`RuleSet`, and writes only when they differ.  A restarted daemon therefore
  finds its rules in place and changes nothing; a rule edited by hand is put back on the next
  pass; a changed network or lease set replaces the old rules in the same single transaction.
  Only ``--release-on-exit`` calls :meth:`Firewall.remove`.
* **Never loosen another firewall.**  The allow-list only drops; the masquerade chain only
  returns or masquerades.  The forward chain accepts the network (flannel's ``FLANNEL-FWD``); note
  that in nftables an ``accept`` in our table does not override a ``drop`` in another table's
  forward chain (every base chain votes), which is the kernel's design, not something we undo.

``rules`` is pure (the model and both renderings); ``drivers`` does the IO.
"""

from __future__ import annotations

from .drivers import (
    FAMILIES,
    Firewall,
    FirewallUnavailable,
    IptablesFirewall,
    NftablesFirewall,
    NoFirewall,
    open_firewall,
)
from .rules import (
    CHAIN_FWD,
    CHAIN_OVERLAY_IN,
    CHAIN_POSTRTG,
    KUBE_PROXY_MARK,
    PEER_SET,
    TABLE,
    Family,
    RuleSet,
    desired_ruleset,
    iptables_tables,
    nft_objects,
)

__all__ = [
    "CHAIN_FWD",
    "CHAIN_OVERLAY_IN",
    "CHAIN_POSTRTG",
    "FAMILIES",
    "KUBE_PROXY_MARK",
    "PEER_SET",
    "TABLE",
    "Family",
    "Firewall",
    "FirewallUnavailable",
    "IptablesFirewall",
    "NftablesFirewall",
    "NoFirewall",
    "RuleSet",
    "desired_ruleset",
    "iptables_tables",
    "nft_objects",
    "open_firewall",
]
