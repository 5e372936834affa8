"""KernelView against a real kernel: documents applied with iptables-{nft,legacy}-restore in a
throwaway network namespace, read back from what iptables-save prints.

Spec: reference/kube-proxy.md §b (hooks ensured in built-in chains; stale service chains get
`:CHAIN` + `-X CHAIN` in the same restore; the kubelet's KUBE-FIREWALL duplicate and its jumps
are "not removed on cleanup") and issue 2 ("it never flushes or deletes a chain that is not
pyproxy's"; "--cleanup removes every rule and chain pyproxy created and nothing else"). The pure
half (save text written by hand): tests/unit/test_kernelview.py. Needs root: fails without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernel_netns import BACKENDS, netns, run_in, tool
from support import all_hooks, render_overall

from pyproxy.iptables.kernelview import KernelView, cleanup_document
from pyproxy.iptables.vocabulary import is_service_chain, jump_rules

# --- kernel: real save output -----------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


def apply(ns: str, backend: str, document: str) -> None:
    run_in(ns, [tool(backend, "IPv4", "restore"), "--noflush"], document)


def save(ns: str, backend: str) -> str:
    return run_in(ns, [tool(backend, "IPv4", "save")]).stdout


def iptables(ns: str, backend: str, *args: str) -> None:
    run_in(ns, [tool(backend, "IPv4", ""), *args])


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_view_of_an_applied_ruleset(ns: str, backend: str) -> None:
    ruleset, config = render_overall()
    apply(ns, backend, ruleset.document(hooks=jump_rules(config)))
    view = KernelView.from_save(save(ns, backend))
    assert view.service_chains() == ruleset.active_nat_chains
    assert view.missing_hooks(jump_rules(config)) == ()
    assert set(ruleset.filter_chains) <= view.table("filter").chains
    assert set(ruleset.nat_chains) <= view.table("nat").chains
    # The kernel's own spelling of our rules parses back: comments, targets.
    svc_rules = [r for r in view.table("nat").rules if r.chain == "KUBE-SERVICES"]
    assert ("ns1/svc1:p80 cluster IP", "KUBE-SVC-XPGD46QRK7WJZT7O") in {
        (r.comment, r.target) for r in svc_rules
    }
    assert svc_rules[-1].target == "KUBE-NODEPORTS"
    # Applying the same document again with the hooks already there adds nothing.
    again = ruleset.document(hooks=view.missing_hooks(jump_rules(config)))
    apply(ns, backend, again)
    assert KernelView.from_save(save(ns, backend)) == view


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_hooks_of_a_real_kernel(ns: str, backend: str) -> None:
    ruleset, config = render_overall()
    apply(ns, backend, ruleset.document(hooks=jump_rules(config)))
    iptables(ns, backend, "-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
             "kubernetes service portals", "-j", "KUBE-SERVICES")  # fmt: skip
    iptables(ns, backend, "-t", "nat", "-A", "PREROUTING", "-i", "eth9", "-j", "KUBE-SERVICES")
    view = KernelView.from_save(save(ns, backend))
    missing = view.missing_hooks(jump_rules(config))
    assert [(h.table, h.chain, h.target) for h in missing] == [
        ("nat", "PREROUTING", "KUBE-SERVICES")
    ]
    apply(ns, backend, ruleset.document(hooks=missing))
    assert KernelView.from_save(save(ns, backend)).missing_hooks(jump_rules(config)) == ()


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_service_chains_are_deleted_and_nothing_else(ns: str, backend: str) -> None:
    before, config = render_overall()
    apply(ns, backend, before.document(hooks=jump_rules(config)))
    iptables(ns, backend, "-t", "nat", "-N", "DOCKER")
    iptables(ns, backend, "-t", "nat", "-A", "DOCKER", "-i", "docker0", "-j", "RETURN")
    iptables(ns, backend, "-t", "nat", "-N", "KUBE-XLB-OLDKUBEPROXY")  # not one of the 5 prefixes
    view = KernelView.from_save(save(ns, backend))

    after, _ = render_overall(frozenset({"ns7", "ns9"}))
    stale = view.service_chains() - after.active_nat_chains
    assert stale
    assert all(is_service_chain(c) for c in stale)
    doc = after.document(
        stale_chains=view.service_chains(), hooks=view.missing_hooks(jump_rules(config))
    )
    apply(ns, backend, doc)

    now = KernelView.from_save(save(ns, backend))
    assert now.service_chains() == after.active_nat_chains
    assert {"DOCKER", "KUBE-XLB-OLDKUBEPROXY"} <= now.table("nat").chains
    assert [r.spec for r in now.table("nat").rules if r.chain == "DOCKER"] == [
        "-i docker0 -j RETURN"
    ]
    assert now.missing_hooks(jump_rules(config)) == ()


def _foreign_setup(ns: str, backend: str) -> None:
    ruleset, config = render_overall()
    apply(ns, backend, ruleset.document(hooks=jump_rules(config)))
    # Somebody else's chains and rules in every table we touch.
    iptables(ns, backend, "-N", "MY-FIREWALL")
    iptables(ns, backend, "-A", "MY-FIREWALL", "-s", "1.1.1.1", "-j", "DROP")
    iptables(ns, backend, "-I", "INPUT", "2", "-j", "MY-FIREWALL")
    iptables(ns, backend, "-t", "nat", "-N", "DOCKER")
    iptables(ns, backend, "-t", "nat", "-A", "DOCKER", "-i", "docker0", "-j", "RETURN")
    iptables(ns, backend, "-t", "nat", "-A", "PREROUTING", "-j", "DOCKER")


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_removes_ours_and_keeps_foreign_chains(ns: str, backend: str) -> None:
    _foreign_setup(ns, backend)
    iptables(ns, backend, "-t", "mangle", "-N", "KUBE-PROXY-CANARY")
    view = KernelView.from_save(save(ns, backend))
    apply(ns, backend, cleanup_document(view, all_hooks()))

    now = KernelView.from_save(save(ns, backend))
    assert now.service_chains() == frozenset()
    for table in ("filter", "nat", "mangle"):
        leftovers = {c for c in now.table(table).chains if c.startswith("KUBE-")}
        # reference §b: the kubelet's KUBE-FIREWALL duplicate is not removed on cleanup
        assert leftovers <= {"KUBE-FIREWALL"}, table
        assert not [
            r for r in now.table(table).rules if (r.comment or "").startswith("kubernetes ")
        ]
    assert "MY-FIREWALL" in now.table("filter").chains
    assert ("INPUT", "MY-FIREWALL") in {(r.chain, r.target) for r in now.table("filter").rules}
    assert [r.spec for r in now.table("filter").rules if r.chain == "MY-FIREWALL"] == [
        "-s 1.1.1.1/32 -j DROP"
    ]
    assert [r.spec for r in now.table("nat").rules if r.chain in ("DOCKER", "PREROUTING")] == [
        "-j DOCKER",
        "-i docker0 -j RETURN",
    ]
    # Running cleanup again finds nothing more to do.
    assert cleanup_document(now, all_hooks()) == ""


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_removes_kube_firewall_when_no_kubelet_owns_it(ns: str, backend: str) -> None:
    """Deliberate difference: upstream's CleanupLeftovers leaves kubelet's KUBE-FIREWALL hooks
    alone (reference §b). Issue 2 asks --cleanup to remove every rule and chain pyproxy created,
    so without kubelet's canary (nobody else manages KUBE-FIREWALL) pyproxy removes its copy; with
    it, the chain is kubelet's and stays (next test)."""
    ruleset, config = render_overall()
    apply(ns, backend, ruleset.document(hooks=jump_rules(config)))
    view = KernelView.from_save(save(ns, backend))
    apply(ns, backend, cleanup_document(view, all_hooks()))
    now = KernelView.from_save(save(ns, backend))
    assert "KUBE-FIREWALL" not in now.table("filter").chains
    assert not [r for r in now.table("filter").rules if r.target == "KUBE-FIREWALL"]


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_keeps_kube_firewall_when_kubelet_owns_it(ns: str, backend: str) -> None:
    ruleset, config = render_overall()
    apply(ns, backend, ruleset.document(hooks=jump_rules(config)))
    iptables(ns, backend, "-t", "mangle", "-N", "KUBE-KUBELET-CANARY")
    view = KernelView.from_save(save(ns, backend))
    apply(ns, backend, cleanup_document(view, all_hooks()))
    now = KernelView.from_save(save(ns, backend))
    assert "KUBE-FIREWALL" in now.table("filter").chains
    assert len([r for r in now.table("filter").rules if r.chain == "KUBE-FIREWALL"]) == 1
    assert now.service_chains() == frozenset()


def _cleanup_with_foreign_references(ns: str, backend: str) -> KernelView:
    _foreign_setup(ns, backend)
    # A foreign rule using our masquerade chain, and one sending traffic into KUBE-SERVICES.
    iptables(
        ns, backend, "-t", "nat", "-A", "DOCKER", "-s", "172.17.0.0/16", "-j", "KUBE-MARK-MASQ"
    )
    iptables(ns, backend, "-t", "nat", "-A", "PREROUTING", "-i", "eth9", "-j", "KUBE-SERVICES")
    view = KernelView.from_save(save(ns, backend))
    apply(ns, backend, cleanup_document(view, all_hooks()))  # must not fail with "in use"
    return KernelView.from_save(save(ns, backend))


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_keeps_our_chains_that_foreign_rules_jump_to(ns: str, backend: str) -> None:
    now = _cleanup_with_foreign_references(ns, backend)
    nat = now.table("nat")
    assert {"KUBE-MARK-MASQ", "KUBE-SERVICES"} <= nat.chains
    # whatever a kept chain still jumps to exists
    targets = {r.target for r in nat.rules if r.chain in nat.chains}
    assert {t for t in targets if t and t.startswith("KUBE-")} <= nat.chains
    # the foreign rules are intact
    specs = {(r.chain, r.spec) for r in nat.rules}
    assert ("PREROUTING", "-i eth9 -j KUBE-SERVICES") in specs
    assert ("DOCKER", "-s 172.17.0.0/16 -j KUBE-MARK-MASQ") in specs
    assert ("PREROUTING", "-j DOCKER") in specs
    assert "MY-FIREWALL" in now.table("filter").chains


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_removes_our_hooks_even_when_their_chain_is_kept(ns: str, backend: str) -> None:
    """`--cleanup` removes every rule pyproxy created: our hook in PREROUTING is ours even
    though a foreign rule keeps KUBE-SERVICES alive (deleting a rule never breaks a reference)."""
    now = _cleanup_with_foreign_references(ns, backend)
    # (KUBE-FIREWALL's jumps are the kubelet's duplicate: see the test above)
    assert [h for h in all_hooks() if h.target != "KUBE-FIREWALL" and now.has_hook(h)] == []
    hooks = [
        r for r in now.table("nat").rules if r.chain in ("PREROUTING", "OUTPUT", "POSTROUTING")
    ]
    assert not [r for r in hooks if (r.comment or "").startswith("kubernetes ")]


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_empties_our_chains_that_must_be_kept(ns: str, backend: str) -> None:
    """A kept chain is still ours: flushing it is fine (cleanup_document's own docstring), so
    none of pyproxy's rules survive, only the chains foreign rules need."""
    now = _cleanup_with_foreign_references(ns, backend)
    nat = now.table("nat")
    assert [r for r in nat.rules if r.chain.startswith("KUBE-")] == []
    assert {c for c in nat.chains if c.startswith("KUBE-")} == {"KUBE-MARK-MASQ", "KUBE-SERVICES"}
