"""One IP family's nftables dataplane: one `nft -f -` transaction per sync, only what changed.

The proxier remembers what it wrote (an in-memory mirror of the table's service objects), so a
partial sync sends only differences: map and set elements added, replaced or deleted one by
one, and the chains of changed Services that really changed flushed and re-filled. A full sync
(the first one, after any failure, on request, or hourly) re-adds the table, the base and
fixed chains (flushed and refilled), flushes the per-service maps and sets and refills them,
and writes every Service's chains. The kernel is only read at a full sync (chain and set names,
never rules or elements): to find service chains and affinity sets a previous run left behind.

Stale service chains are flushed at once and deleted by a later transaction once they have
been stale for a second, as upstream does: before kernel 6.2 the kernel notices only a little
later that a map element that referenced a chain is gone. Stale affinity sets are deleted at
once (after the chains using them have been flushed in the same transaction).

Transaction order (one atomic batch): table; chains added and flushed (base, fixed, written
service chains, stale ones); sets and maps declared (and, in a full sync, flushed); affinity
sets deleted and (re)declared; rules; map and set elements deleted, then added.

It implements the Proxier contract (pyproxy.proxier): `sync` returns the common SyncResult with
this mode's figures in `details` (chains, elements added and deleted, stale chains flushed and
deleted, transaction bytes), and `canary_present()` is the cheap `table_intact()` check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from pyproxy.errors import KernelError
from pyproxy.model import IPNetwork, NamespacedName
from pyproxy.nftables.nft import Nft
from pyproxy.nftables.render import (
    NODEPORT_IPS,
    SERVICE_IPS,
    SERVICES,
    TABLE,
    TABLE_COMMENT,
    Chain,
    Element,
    NamedSet,
    ServicePortObjects,
    family_keyword,
    is_affinity_set_name,
    is_service_chain_name,
    port_order,
    render_base,
    render_service_port,
)
from pyproxy.proxier import FULL_SYNC_PERIOD, SyncResult
from pyproxy.proxystate import LazyStates, ProxierConfig, ServicePortState

#: How long a stale chain waits before it is deleted (upstream: one second).
STALE_CHAIN_DELAY = 1.0

ServiceStates = Mapping[NamespacedName, tuple[ServicePortState, ...]]
_ElementKey = tuple[str, str]  # (container, key text)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NftablesProxier:
    """Keeps one family's `kube-proxy` table equal to the desired state."""

    def __init__(
        self,
        config: ProxierConfig,
        nft: Nft | None = None,
        *,
        service_cidrs: Sequence[IPNetwork] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.fam = family_keyword(config.family)
        self.nft = nft or Nft(self.fam, TABLE)
        self._clock = clock
        self._service_cidrs = tuple(service_cidrs)
        self._reset()

    def _reset(self) -> None:
        self.need_full_sync = True
        self._last_full = -FULL_SYNC_PERIOD
        #: Base chains were re-created once (upstream's add+delete: picks up new priorities).
        self._recreated_base = False
        self._no_local_internal = 0
        self._no_local_external = 0
        # The mirror: what this proxier has written into the kernel.
        self._ports: dict[NamespacedName, tuple[ServicePortObjects, ...]] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._affinity_sets: dict[str, NamedSet] = {}
        #: Per element key, who wants it (first owner wins on a clash) and what is in the kernel.
        self._owners: dict[_ElementKey, dict[NamespacedName, Element]] = {}
        self._elements: dict[_ElementKey, Element] = {}
        self._stale_chains: dict[str, float] = {}

    # --- inputs besides the states ---------------------------------------------------------

    def on_service_cidrs_changed(self, cidrs: Sequence[IPNetwork]) -> None:
        """Upstream's OnServiceCIDRsChanged (the next sync rewrites cluster-ips-check)."""
        cidrs = tuple(cidrs)
        if cidrs != self._service_cidrs:
            self._service_cidrs = cidrs
            self.need_full_sync = True

    @property
    def stale_chains(self) -> Collection[str]:
        return self._stale_chains.keys()

    # --- sync ------------------------------------------------------------------------------

    def sync(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult:
        """Make the kernel match `states`; `changed` names the Services whose state may differ
        from the previous sync (None: all of them). Raises KernelError; the next sync is then
        a full one."""
        now = self._clock()
        full = (
            full
            or changed is None
            or self.need_full_sync
            or now - self._last_full >= FULL_SYNC_PERIOD
        )
        deleted = cleanup_failures = 0
        if self._stale_chains:
            try:
                deleted = self.delete_stale_chains(now=now)
            except KernelError:
                # As upstream: not fatal (counted in nftables_cleanup_failures_total); the
                # full sync finds the chains again in the kernel.
                cleanup_failures = 1
                full = True
        self.need_full_sync = True  # until this sync has succeeded
        try:
            result = self._full_sync(states, now) if full else self._partial_sync(states, changed)
        except BaseException:
            self._stale_chains.clear()  # recomputed from the kernel by the full sync
            raise
        self.need_full_sync = False
        if full:
            self._last_full = now
        details = {**result.details, "stale_chains_deleted": deleted}
        return SyncResult(
            full=result.full,
            restore_bytes=result.restore_bytes,
            filter_rules=0,
            nat_rules=0,
            no_local_internal=result.no_local_internal,
            no_local_external=result.no_local_external,
            services_written=result.services_written,
            details=details,
            cleanup_failures=cleanup_failures,
        )

    def delete_stale_chains(self, *, now: float | None = None, force: bool = False) -> int:
        """Delete the chains stale for at least STALE_CHAIN_DELAY (all of them with `force`),
        in a transaction of their own. A failure is not fatal: the next sync is a full one,
        which finds them again."""
        now = self._clock() if now is None else now
        due = [c for c, t in self._stale_chains.items() if force or now - t >= STALE_CHAIN_DELAY]
        if not due:
            return 0
        for chain in due:
            del self._stale_chains[chain]
        self.nft.run("".join(f"delete chain {self.fam} {TABLE} {c}\n" for c in due))
        return len(due)

    def table_intact(self) -> bool:
        """The cheap periodic check (the iptables canary's equivalent): our `services` chain
        still dispatches through @service-ips. False after `nft flush ruleset`, a deleted table
        or a flushed table; the caller then asks for a full sync. Reads one chain only."""
        return self.nft.chain_has_rule(SERVICES, f"vmap @{SERVICE_IPS}")

    def canary_present(self) -> bool:
        """The Proxier contract's canary: `table_intact()`."""
        return self.table_intact()

    def cleanup(self) -> None:
        """Delete our table (only ours: other tables in the family are untouched)."""
        self.nft.delete_table()
        self._reset()

    # --- full sync -------------------------------------------------------------------------

    def _render_all(
        self, states: ServiceStates | LazyStates
    ) -> dict[NamespacedName, tuple[ServicePortObjects, ...]]:
        rendered = {}
        names = states.names() if isinstance(states, LazyStates) else states.keys()
        for name in sorted(names, key=lambda n: (n.namespace, n.name)):
            ports = sorted(_ports_of(states, name), key=port_order)
            if ports:
                rendered[name] = tuple(render_service_port(p, self.config) for p in ports)
        return rendered

    def _full_sync(self, states: ServiceStates | LazyStates, now: float) -> SyncResult:  # noqa: PLR0912, PLR0915 - upstream's syncProxyRules steps in order
        fam = self.fam
        kernel = self.nft.names()
        base = render_base(self.config, self._service_cidrs)
        rendered = self._render_all(states)

        chains: dict[str, tuple[str, ...]] = {}
        affinity: dict[str, NamedSet] = {}
        owners: dict[_ElementKey, dict[NamespacedName, Element]] = {}
        for name, ports in rendered.items():
            for p in ports:
                for c in p.chains:
                    chains[c.name] = c.rules
                for s in p.affinity_sets:
                    affinity[s.name] = s
                for e in p.elements:
                    owners.setdefault((e.container, e.key_text), {})[name] = e
        elements = {k: next(iter(v.values())) for k, v in owners.items()}

        out: list[str] = [f"add table {fam} {TABLE} {{ comment {_quote(TABLE_COMMENT)} ; }}"]
        if not self._recreated_base:
            # Re-create our base chains once, so a changed type/priority does not fail the
            # transaction (upstream does the same add+delete on its first sync).
            for bc in base.base_chains:
                out.append(f"add chain {fam} {TABLE} {bc.name}")
                out.append(f"delete chain {fam} {TABLE} {bc.name}")
        for bc in base.base_chains:
            out.append(base.base_chain_add(bc, fam))
            out.append(f"flush chain {fam} {TABLE} {bc.name}")
        base_chain_names = {bc.name for bc in base.base_chains}
        for c in base.chains:
            if c.name not in base_chain_names:
                out.append(c.add(fam))
                out.append(f"flush chain {fam} {TABLE} {c.name}")
        for cname in chains:
            out.append(f"add chain {fam} {TABLE} {cname}")
            out.append(f"flush chain {fam} {TABLE} {cname}")
        stale = sorted(
            c
            for c in kernel.chains | self._stale_chains.keys()
            if is_service_chain_name(c) and c not in chains
        )
        for cname in stale:
            out.append(f"flush chain {fam} {TABLE} {cname}")

        out.extend(s.add(fam) for s in base.sets)
        out.extend(m.add(fam) for m in base.maps)
        for s in (*base.sets, *base.maps):
            out.append(f"flush {s.kind} {fam} {TABLE} {s.name}")
        if not any(s.name == NODEPORT_IPS for s in base.sets):
            # Make sure no @nodeport-ips is left from a run with other --nodeport-addresses
            # (its users were flushed above); add first, as delete fails on a missing set.
            addr = "ipv4_addr" if fam == "ip" else "ipv6_addr"
            out.append(f"add set {fam} {TABLE} {NODEPORT_IPS} {{ type {addr} ; }}")
            out.append(f"delete set {fam} {TABLE} {NODEPORT_IPS}")

        kernel_affinity = {s for s in kernel.sets if is_affinity_set_name(s)}
        for sname in sorted(kernel_affinity - affinity.keys()):
            out.append(f"delete set {fam} {TABLE} {sname}")
        for sname, aset in affinity.items():
            if sname in kernel_affinity and kernel.set_timeouts.get(sname) != aset.timeout:
                # A different timeout: an add would silently keep the old one, so re-create
                # it (its users were flushed above). A right one keeps its clients.
                out.append(f"delete set {fam} {TABLE} {sname}")
            out.append(aset.add(fam))

        for c in base.chains:
            out.extend(c.rule_lines(fam))
        for cname, rules in chains.items():
            out.extend(Chain(cname, rules).rule_lines(fam))

        out.extend(e.add(fam) for e in base.elements)
        out.extend(e.add(fam) for e in elements.values())

        text = "\n".join(out) + "\n"
        self.nft.run(text)

        self._recreated_base = True
        self._ports = rendered
        self._chains = chains
        self._affinity_sets = affinity
        self._owners = owners
        self._elements = elements
        self._stale_chains = {c: self._stale_chains.get(c, now) for c in stale}
        all_ports = [p for ports in rendered.values() for p in ports]
        self._no_local_internal = sum(p.no_local_internal for p in all_ports)
        self._no_local_external = sum(p.no_local_external for p in all_ports)
        return self._result(
            True,
            text=text,
            services=len(rendered),
            chains=len(chains),
            added=len(elements),
            deleted=0,
            stale=len(stale),
        )

    # --- partial sync ----------------------------------------------------------------------

    def _partial_sync(  # noqa: PLR0912, PLR0915 - upstream's syncProxyRules steps in order
        self, states: ServiceStates | LazyStates, changed: Collection[NamespacedName] | None
    ) -> SyncResult:
        fam = self.fam
        now = self._clock()
        chain_writes: dict[str, tuple[str, ...]] = {}
        stale_now: list[str] = []
        set_deletes: list[str] = []
        set_adds: list[NamedSet] = []
        touched: set[_ElementKey] = set()
        services_written = 0

        for name in sorted(changed or (), key=lambda n: (n.namespace, n.name)):
            ports = sorted(_ports_of(states, name), key=port_order)
            new = tuple(render_service_port(p, self.config) for p in ports)
            old = self._ports.pop(name, ())
            if new:
                self._ports[name] = new
            if new == old:
                continue
            services_written += 1

            self._no_local_internal += sum(p.no_local_internal for p in new) - sum(
                p.no_local_internal for p in old
            )
            self._no_local_external += sum(p.no_local_external for p in new) - sum(
                p.no_local_external for p in old
            )

            old_sets = {s.name: s for p in old for s in p.affinity_sets}
            new_sets = {s.name: s for p in new for s in p.affinity_sets}
            recreated = False
            for sname in old_sets.keys() - new_sets.keys():
                set_deletes.append(sname)
                self._affinity_sets.pop(sname, None)
            for sname, aset in new_sets.items():
                current = self._affinity_sets.get(sname)
                if current != aset:
                    if current is not None:
                        # A new timeout: the set is re-created, so every rule naming it must
                        # be flushed first (below), even where the rule text is the same.
                        set_deletes.append(sname)
                        recreated = True
                    set_adds.append(aset)
                    self._affinity_sets[sname] = aset

            old_chains = {c.name: c.rules for p in old for c in p.chains}
            new_chains = {c.name: c.rules for p in new for c in p.chains}
            for cname, rules in new_chains.items():
                if recreated or self._chains.get(cname) != rules:
                    chain_writes[cname] = rules
                self._stale_chains.pop(cname, None)
            for cname in old_chains.keys() - new_chains.keys():
                self._chains.pop(cname, None)
                stale_now.append(cname)

            for p in old:
                for e in p.elements:
                    key = (e.container, e.key_text)
                    owners = self._owners.get(key)
                    if owners is not None:
                        owners.pop(name, None)
                        if not owners:
                            del self._owners[key]
                    touched.add(key)
            for p in new:
                for e in p.elements:
                    key = (e.container, e.key_text)
                    self._owners.setdefault(key, {})[name] = e
                    touched.add(key)

        element_deletes: list[Element] = []
        element_adds: list[Element] = []
        for key in sorted(touched):
            owners = self._owners.get(key)
            want = next(iter(owners.values())) if owners else None
            have = self._elements.get(key)
            if want == have:
                continue
            if have is not None:
                element_deletes.append(have)
            if want is not None:
                element_adds.append(want)
                self._elements[key] = want
            else:
                del self._elements[key]

        out: list[str] = []
        for cname in chain_writes:
            out.append(f"add chain {fam} {TABLE} {cname}")
            out.append(f"flush chain {fam} {TABLE} {cname}")
        for cname in stale_now:
            out.append(f"flush chain {fam} {TABLE} {cname}")
        for sname in set_deletes:
            out.append(f"delete set {fam} {TABLE} {sname}")
        out.extend(s.add(fam) for s in set_adds)
        for cname, rules in chain_writes.items():
            out.extend(Chain(cname, rules).rule_lines(fam))
        out.extend(e.delete(fam) for e in element_deletes)
        out.extend(e.add(fam) for e in element_adds)

        text = "\n".join(out) + "\n" if out else ""
        if text:
            self.nft.run(text)
        self._chains.update(chain_writes)
        for cname in stale_now:
            self._stale_chains.setdefault(cname, now)
        return self._result(
            False,
            text=text,
            services=services_written,
            chains=len(chain_writes),
            added=len(element_adds),
            deleted=len(element_deletes),
            stale=len(stale_now),
        )

    # --- results ---------------------------------------------------------------------------

    def _result(
        self,
        full: bool,
        *,
        text: str,
        services: int,
        chains: int,
        added: int,
        deleted: int,
        stale: int,
    ) -> SyncResult:
        size = len(text.encode())
        return SyncResult(
            full=full,
            restore_bytes=size,
            filter_rules=0,
            nat_rules=0,
            no_local_internal=self._no_local_internal,
            no_local_external=self._no_local_external,
            services_written=services,
            details={
                "chains": chains,
                "elements_added": added,
                "elements_deleted": deleted,
                "stale_chains_flushed": stale,
                "stale_chains_deleted": 0,
                "transaction_bytes": size,
            },
        )

    def element_count(self) -> int:
        return len(self._elements)

    def written_ports(self) -> Iterable[ServicePortObjects]:
        """Every service port's objects as last written (for a full render to compare)."""
        return (p for ports in self._ports.values() for p in ports)


def _ports_of(
    states: ServiceStates | LazyStates, name: NamespacedName
) -> tuple[ServicePortState, ...]:
    """One Service's ports from a plain mapping or a LazyStates (computed on first use)."""
    return states.get(name) if isinstance(states, LazyStates) else states.get(name, ())
